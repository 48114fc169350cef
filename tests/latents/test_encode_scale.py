"""``encode`` at scale: ranks split the input shards, the last rank merges, a rerun resumes, a
different autoencoder or resolution is refused, failed shards are named; storage options."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import synthetic_samples

from ldm_train.autoencoder.vae import build_vae
from ldm_train.config import AutoencoderConfig, LatentsConfig, TextConfig
from ldm_train.data.shards import FailedShardsError, write_shards
from ldm_train.latents import ledger
from ldm_train.latents.cache import MANIFEST, load_latents
from ldm_train.latents.encode import Encoders, encode_split
from ldm_train.latents.loader import LatentLoader
from ldm_train.latents.ranks import RankGroup, Ranks

CPU = torch.device("cpu")
RES = 16


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.manual_seed(0)
    vae = build_vae(AutoencoderConfig(block_out_channels=[8, 16], norm_num_groups=4)).eval()
    text = prepare_text(tmp_path_factory.mktemp("text") / "t")
    return vae, text


def prepare_text(folder):
    from ldm_train.text.encoder import prepare_text_encoder

    return prepare_text_encoder(TextConfig(width=32, layers=1, heads=2, context_length=16, pretrained=None), folder)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """5 input shards of 3, 3, 3, 3, 1 samples, some not square (their crop box is recorded)."""
    folder = tmp_path_factory.mktemp("src")
    samples = synthetic_samples(13, size=RES)
    wide = [(k, im.resize((RES * 2, RES)) if i % 2 else im, c, m) for i, (k, im, c, m) in enumerate(samples)]
    write_shards(wide, folder, "src", shard_size=3)
    return folder


def encoders(models, resolution=RES, **latents):
    vae, text = models
    cfg = LatentsConfig(**{"shard_size": 2, "batch_size": 2, **latents})
    return Encoders(vae, text, cfg, resolution, CPU)


def run(spec, out, enc, rank=0, world=1, overwrite=False):
    return encode_split(str(spec), out, enc, overwrite, group=RankGroup(Ranks(rank, world)), progress=False)


def tars(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.glob("latents-*.tar"))}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, models, source):
    out = tmp_path_factory.mktemp("ref") / "train"
    return out, run(source, out, encoders(models))


def test_parts_per_input_shard_and_metadata(reference):
    out, manifest = reference
    assert manifest["samples_written"] == 13
    assert manifest["input_shard_samples"] == dict(zip(manifest["input_shards"], [3, 3, 3, 3, 1]))
    assert [o["name"] for o in manifest["output_shards"]][:3] == [
        "latents-000000-000.tar", "latents-000000-001.tar", "latents-000001-000.tar"]
    data = load_latents(out)
    assert data.keys == [f"s{i:05d}" for i in range(13)]
    loaded = LatentLoader(out, batch_size=13)
    assert sorted(next(iter(loaded))["key"]) == data.keys


def test_metadata_has_original_size_and_crop_box(reference):
    import webdataset as wds

    out, _ = reference
    metas = {s["__key__"]: json.loads(s["json"]) for s in wds.WebDataset(str(out / "latents-000000-000.tar"), shardshuffle=False)}
    assert metas["s00001"]["original_size"] == [RES * 2, RES]
    assert metas["s00001"]["crop_box"] == [RES // 2, 0, RES // 2 + RES, RES]
    assert metas["s00000"]["original_size"] == [RES, RES] and metas["s00000"]["source_shard"].endswith("src-000000.tar")


def test_ranks_split_shards_and_the_last_one_merges(tmp_path, models, source, reference):
    out = tmp_path / "train"
    enc = encoders(models)
    first = run(source, out, enc, rank=0, world=2)
    assert first["complete"] is False and not (out / MANIFEST).exists()
    assert first["input_shards"] == [str(source / f"src-00000{i}.tar") for i in (0, 2, 4)]
    second = run(source, out, enc, rank=1, world=2)
    assert second["complete"] is True and (out / MANIFEST).is_file()
    assert tars(out) == tars(reference[0])
    assert {k: v for k, v in second.items() if k != "seconds"} == {k: v for k, v in reference[1].items() if k != "seconds"}


def test_resume_discards_partial_outputs_and_skips_done_shards(tmp_path, models, source, reference):
    out = tmp_path / "train"
    enc = encoders(models)
    run(source, out, enc, rank=0, world=2)  # shards 0, 2, 4 done: as if the job died there
    done_before = {i: ledger.done_path(out, i).stat().st_mtime_ns for i in (0, 2, 4)}
    (out / "latents-000001-000.tar").write_bytes(b"a part renamed before the crash")
    (out / "latents-000003-000.tar.tmp").write_bytes(b"a part being written at the crash")
    manifest = run(source, out, enc)  # the same command, one process
    assert manifest["complete"] and manifest["samples_written"] == 13
    assert tars(out) == tars(reference[0])
    assert not list(out.glob("*.tmp"))
    assert {i: ledger.done_path(out, i).stat().st_mtime_ns for i in (0, 2, 4)} == done_before  # not redone


def test_complete_output_is_refused_without_overwrite(reference, models, source):
    from ldm_train.utils.runs import OutputExistsError

    with pytest.raises(OutputExistsError, match="overwrite"):
        run(source, reference[0], encoders(models))


@pytest.mark.parametrize("change,key", [("resolution", "resolution"), ("vae", "autoencoder.weights_hash"),
                                        ("dtype", "latents.dtype")])
def test_resuming_with_other_settings_is_refused(tmp_path, models, source, change, key):
    out = tmp_path / "train"
    run(source, out, encoders(models), rank=0, world=2)
    vae, text = models
    if change == "vae":
        other = build_vae(AutoencoderConfig(block_out_channels=[8, 16], norm_num_groups=4)).eval()
        enc = encoders((other, text))
    elif change == "resolution":
        enc = encoders(models, resolution=RES * 2)
    else:
        enc = encoders(models, dtype="bf16")
    with pytest.raises(ledger.EncodeMismatchError, match=key):
        run(source, out, enc)
    assert not (out / MANIFEST).exists()
    run(source, out, enc, overwrite=True)  # --overwrite starts over with the new settings
    assert (out / MANIFEST).is_file()


def test_failed_shard_is_named_retried_or_tolerated(tmp_path, models, source, reference):
    src = tmp_path / "src"
    shutil.copytree(source, src)
    good = (src / "src-000002.tar").read_bytes()
    (src / "src-000002.tar").write_bytes(b"")  # zero-byte shard
    out = tmp_path / "train"
    with pytest.raises(FailedShardsError, match="src-000002.tar"):
        run(src, out, encoders(models))
    assert not (out / MANIFEST).exists()  # incomplete: training will not read it
    (src / "src-000002.tar").write_bytes(good)  # fixed: the rerun retries only that shard
    manifest = run(src, out, encoders(models))
    assert manifest["samples_written"] == 13 and manifest["failed_shards"] == []
    (src / "src-000002.tar").write_bytes(b"")
    tolerated = encoders(models)
    tolerated.tolerate_failed = True
    manifest = run(src, tmp_path / "tol", tolerated)
    assert manifest["samples_written"] == 10
    assert [f["shard"] for f in manifest["failed_shards"]] == [str(src / "src-000002.tar")]
    assert manifest["report"]["skipped"] == {"unreadable_shard": 1}


def test_tokens_bf16_and_fixed_sample(tmp_path, models, source, reference):
    out = tmp_path / "train"
    manifest = run(source, out, encoders(models, dtype="bf16", store="sample", text="tokens"))
    assert manifest["context_shape"] == [16] and manifest["store"] == "sample"
    data = load_latents(out)
    ref = load_latents(reference[0])
    assert data.context is None and data.tokens.shape == (13, 16) and data.tokens.dtype == torch.int32
    assert data.mean.dtype == torch.bfloat16 and torch.equal(data.std, torch.zeros_like(data.std))
    gap = (data.mean.float() - ref.mean.float()).abs() / ref.std.float()
    assert 0 < gap.mean() < 3  # a draw from the posterior: about one std from its mean
    again = run(source, tmp_path / "again", encoders(models, dtype="bf16", store="sample", text="tokens"))
    assert again["samples_written"] == 13 and tars(tmp_path / "again") == tars(out)  # the draw is fixed
    batch = next(iter(LatentLoader(out, batch_size=4)))
    assert batch["tokens"].shape == (4, 16) and "context" not in batch


def test_merge_reports_adds_counts_and_names():
    merged = ledger.merge_reports([
        {"seen": 3, "kept": 2, "skipped": {"corrupt_image": 1}, "failed_shards": [], "shard_errors": {}},
        {"seen": 2, "kept": 0, "skipped": {"unreadable_shard": 1, "corrupt_image": 1}, "failed_shards": ["b.tar"],
         "shard_errors": {"b.tar": "not a tar"}},
    ])
    assert merged == {"seen": 5, "kept": 2, "skipped": {"corrupt_image": 2, "unreadable_shard": 1},
                      "failed_shards": ["b.tar"], "shard_errors": {"b.tar": "not a tar"}}




def test_background_reader_keeps_order_raises_and_stops():
    from ldm_train.latents.encode import background

    assert list(background(iter(range(50)), depth=2)) == list(range(50))

    def broken():
        yield 1
        raise ValueError("bad shard")

    it = background(broken())
    assert next(it) == 1
    with pytest.raises(ValueError, match="bad shard"):
        next(it)
    early = background(iter(range(1000)), depth=1)
    assert next(early) == 0
    early.close()  # the producer thread must notice and end (join returns)
