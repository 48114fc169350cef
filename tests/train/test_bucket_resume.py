"""Training on aspect-ratio buckets end to end: scikit-image photographs of mixed shapes ->
img2dataset shards -> a tiny VAE -> encode with data.buckets -> a few streamed steps with batches
of changing shapes; cut and resumed (another worker count), the weights equal bitwise; a cache
encoded with other buckets (or none) is refused naming data.buckets."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from ldm_train.cli import main
from ldm_train.data.shards import write_shards
from ldm_train.train import checkpoint as ck
from PIL import Image

from conftest import MICRO, micro_config
from photos import GRID, photo_samples

# 16 photographs kept, per bucket (w x h): 64x128: 2, 80x112: 3, 96x96: 4, 112x80: 4, 128x64: 3. With
# batches of 3 an epoch is 7 batches, 3 of them short (2, 1 and 1 samples); 8 steps cross into the second.
COMMON = [*GRID, "train.data_source=stream", "train.batch_size=3", "train.steps=8", "train.checkpoint_every=4",
          "latents.loader.shuffle_buffer=4"]


@pytest.fixture(scope="module")
def bucket_run(tmp_path_factory):
    from ldm_train import stages

    run = tmp_path_factory.mktemp("buckets") / "run"
    cfg = micro_config(run, *COMMON)
    write_shards(photo_samples("t"), cfg.path(cfg.data.train_shards), "train", 6)
    write_shards(photo_samples("v")[:4], cfg.path(cfg.data.val_shards), "val", 6)
    stages.train_vae_stage(cfg, False)
    summary = stages.encode_stage(cfg, False)
    return run, summary


def cli_train(run, *overrides) -> int:
    return main(["train", "--config", str(MICRO), f"run.dir={run}", "distributed.cpu=true", *COMMON, *overrides])


def copy(run, root):
    root.mkdir(parents=True)
    for part in ("latents", "stages", "vae", "text", "data"):
        shutil.copytree(run / part, root / part)
    return root


def weights(run, step):
    return load_file(str(run / "checkpoints" / f"step-{step:07d}" / "model.safetensors"))


def test_the_encoded_photographs_per_bucket(bucket_run):
    run, summary = bucket_run
    manifest = json.loads((run / "latents" / "train" / "manifest.json").read_text())
    assert manifest["bucket_samples"] == {"112x80": 4, "128x64": 3, "64x128": 2, "80x112": 3, "96x96": 4}
    assert summary["train"]["samples"] == 16 and summary["train"]["skipped"]["skipped"] == {"too_small": 1}
    assert summary["train"]["buckets"] == manifest["bucket_samples"]


def test_bucketed_training_resumes_bitwise_with_another_worker_count(bucket_run, tmp_path, capsys):
    run, _ = bucket_run
    whole = copy(run, tmp_path / "whole")
    assert cli_train(whole, "latents.loader.num_workers=0") == 0
    cut = copy(run, tmp_path / "cut")
    assert cli_train(cut, "latents.loader.num_workers=0") == 0
    shutil.rmtree(cut / "checkpoints" / "step-0000008")
    capsys.readouterr()
    assert cli_train(cut, "latents.loader.num_workers=2") == 0
    assert json.loads(capsys.readouterr().out)["resumed_from"].endswith("step-0000004")
    a, b = weights(whole, 8), weights(cut, 8)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    _, meta = ck.read_rank_state(cut / "checkpoints" / "step-0000008", 0)
    loader = meta["data"]["loader"]
    assert loader["batches_yielded"] == 8 and loader["epoch"] == 1 and loader["batch_size"] == 3
    # the first epoch's 16 samples (its 7 batches, short ones included), then one batch of the second
    assert loader["samples_yielded"] - 16 in (1, 2, 3)
    assert loader["buckets"] == {"64x128": 2, "80x112": 3, "96x96": 4, "112x80": 4, "128x64": 3}
    # evaluation of the bucketed run: the held-out loss over the val split's 4 buckets, images at eval.width/height
    out = tmp_path / "eval"
    assert main(["eval", "--checkpoint", str(cut), "--out", str(out), "--num-samples", "2", "--steps", "2",
                 "--config", str(MICRO), f"run.dir={cut}", "distributed.cpu=true", *COMMON,
                 "eval.width=64", "eval.height=128"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["val_samples"] == 4 and report["val_loss"] > 0
    assert Image.open(out / "images" / "sample_000000.png").size == (64, 128)


def test_a_cache_with_other_buckets_or_none_is_refused_naming_the_key(bucket_run, tmp_path, capsys):
    run, _ = bucket_run
    plain = copy(run, tmp_path / "plain")
    shutil.rmtree(plain / "stages")  # a cache copied in: only its manifest says what it holds
    assert main(["train", "--config", str(MICRO), f"run.dir={plain}", "distributed.cpu=true", "train.steps=1",
                 "train.data_source=stream"]) == 2
    assert "data.buckets" in capsys.readouterr().err
    assert cli_train(plain, "data.buckets.area=4096") == 2
    assert "data.buckets" in capsys.readouterr().err
    assert main(["train", "--config", str(MICRO), f"run.dir={plain}", "distributed.cpu=true", *GRID,
                 "train.steps=1"]) == 2  # memory holds one shape
    assert "train.data_source=stream" in capsys.readouterr().err
