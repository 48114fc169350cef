"""``ldm-train demo`` end to end on the micro config (emoji data, every stage, a few seconds)."""
from __future__ import annotations

import json

import pytest
from conftest import EMOJI_FONT, MICRO
import torch
from PIL import Image
from safetensors.torch import load_file as safe_load

from ldm_train.cli import main
from ldm_train.latents.cache import load_latents
from ldm_train.utils.runs import MetricsLog

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not EMOJI_FONT.is_file(), reason=f"emoji font not installed at {EMOJI_FONT}"),
]
STAGES = ["data", "train-vae", "train-clip", "encode", "train", "export", "sample", "eval"]


def check_png(path, min_bytes=1000):
    assert path.is_file(), path
    assert path.stat().st_size >= min_bytes, path
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.width > 0 and im.height > 0
        im.load()
        assert len(set(im.convert("L").getdata())) > 2  # not a blank canvas
        return im.size


def test_micro_demo(tmp_path, capsys):
    run = tmp_path / "run"
    # the demo's path: train-clip's text tower conditions the U-Net (micro.yaml alone keeps the random one)
    argv = ["demo", "--config", str(MICRO), f"run.dir={run}", "distributed.cpu=true", "text.pretrained='{run}/clip'"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "demo summary" in out

    summary = json.loads((run / "summary.json").read_text())
    assert list(summary["seconds_per_stage"]) == STAGES
    assert all(isinstance(s, (int, float)) and s >= 0 for s in summary["seconds_per_stage"].values())
    assert list(summary["cpu_seconds_per_stage"]) == STAGES
    assert all(s >= 0 for s in summary["cpu_seconds_per_stage"].values()) and summary["total_cpu_seconds"] > 0
    assert summary["total_seconds"] >= max(summary["seconds_per_stage"].values())
    assert summary["device"] == "cpu"
    assert summary["vae_final_rec_l1"] > 0 and summary["denoiser_final_loss"] > 0
    assert summary["stages"]["train"]["steps"] == 6
    data = summary["stages"]["data"]
    assert data["rendered"] == 48 and data["train"] + data["val"] == 48

    # micro.yaml has no prompts: the demo samples held-out validation captions
    train_captions = load_latents(run / "latents" / "train").captions
    val_captions = load_latents(run / "latents" / "val").captions
    assert len(train_captions) == data["train"] and len(val_captions) == data["val"]
    assert summary["prompts"] == sorted(set(val_captions))[:8]
    assert summary["prompts_seen_in_training"] == sorted(set(summary["prompts"]) & set(train_captions))

    # the text tower is train-clip's (same weights), and the CLIP scored the samples with baselines beside
    clip = safe_load(str(run / "clip" / "open_clip_model.safetensors"))
    tower = safe_load(str(run / "text" / "open_clip_model.safetensors"))
    assert set(tower) == set(clip) and all(torch.equal(tower[k], clip[k]) for k in clip)
    assert summary["stages"]["train-clip"]["steps"] == 8
    scores = summary["scores"]
    n = len(summary["prompts"])
    ret = scores["caption_retrieval"]
    assert ret["samples"]["prompts"] == n and ret["samples"]["chance_top1"] == pytest.approx(1 / n)
    assert ret["samples"]["images"] == 2 * n and ret["real_images"]["images"] == n  # micro prompts are val captions
    assert 0 <= ret["samples"]["top1"] <= 1 and 1 <= ret["samples"]["mean_rank"] <= n
    for key in ("samples", "real_images", "shuffled_captions"):
        assert 0 <= scores["clip_score"][key] <= 100
    fd = scores["fd_clip"]
    assert fd["samples"] >= 0 and fd["real_images"] >= 0 and fd["random_noise"] > 0 and fd["images_per_set"] == 2 * n
    assert "not Inception FID" in fd["note"]
    assert "caption retrieval top-1" in out and "shuffled captions" in out
    curves = MetricsLog(run / "metrics.jsonl").curve("clip", "loss")
    assert [s for s, _ in curves] == [2, 4, 6, 8]

    recon_size = check_png(run / "recon.png")
    samples_size = check_png(run / "samples.png")
    check_png(run / "loss.png")
    assert samples_size == (180 + 3 * 96, 16 + n * 96)  # label, real, samples_per_prompt columns; a row per prompt
    assert recon_size[0] == 4 * 128
    assert summary["outputs"]["samples"] == str(run / "samples.png")

    export = run / "export"
    assert (export / "model_index.json").is_file()
    assert json.loads((export / "model_index.json").read_text())["unet"] == "unet"
    assert (run / "config.yaml").is_file() and (run / "metrics.jsonl").is_file()

    # a second run refuses to touch the folder ...
    mtime = (run / "summary.json").stat().st_mtime_ns
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and "Traceback" not in err
    assert (run / "summary.json").stat().st_mtime_ns == mtime

    # ... unless asked to
    (run / "stale.txt").write_text("from before")
    assert main([*argv, "--overwrite"]) == 0
    assert not (run / "stale.txt").exists()
    again = json.loads((run / "summary.json").read_text())
    assert list(again["seconds_per_stage"]) == STAGES
    assert again["prompts"] == summary["prompts"]
    # same seed, same data, CPU: the numbers repeat exactly
    assert again["vae_final_rec_l1"] == summary["vae_final_rec_l1"]
    assert again["denoiser_final_loss"] == summary["denoiser_final_loss"]
    assert again["scores"] == summary["scores"]
