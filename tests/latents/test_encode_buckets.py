"""``encode`` with data.buckets: real photographs of mixed shapes -> one series of latent parts
per bucket, the manifest counting per bucket; bad bucket lists and a changed list refused."""
from __future__ import annotations

import json
import tarfile

import pytest
import torch
from safetensors.torch import load as st_load

from ldm_train.autoencoder.vae import build_vae, encode_posterior
from ldm_train.config import AutoencoderConfig, LatentsConfig, TextConfig
from ldm_train.data.buckets import BucketError
from ldm_train.data.preprocess import crop_box, preprocess
from ldm_train.data.shards import write_shards
from ldm_train.latents.encode import Encoders, encode_split
from ldm_train.latents.ledger import EncodeMismatchError
from ldm_train.text.encoder import prepare_text_encoder

from photos import PHOTOS, photo, photo_samples

CPU = torch.device("cpu")
BUCKETS = [(64, 128), (80, 112), (96, 96), (112, 80), (128, 64)]
COUNTS = {"64x128": 2, "80x112": 3, "96x96": 4, "112x80": 4, "128x64": 3}  # see tests/data/test_buckets.py


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.manual_seed(0)
    vae = build_vae(AutoencoderConfig(block_out_channels=[8, 16], norm_num_groups=4)).eval()  # factor 2
    text = prepare_text_encoder(TextConfig(width=32, layers=1, heads=2, context_length=16, pretrained=None),
                                tmp_path_factory.mktemp("text") / "t")
    return vae, text


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    write_shards(photo_samples(), folder, "src", shard_size=6)  # 17 photos: 3 input shards
    return folder


def encoders(models, buckets=BUCKETS, **latents):
    vae, text = models
    cfg = LatentsConfig(shard_size=2, batch_size=3, **latents)
    return Encoders(vae, text, cfg, 64, CPU, read_kwargs={"min_size": 0, "crop": "center", "seed": 0, "buckets": buckets})


@pytest.fixture(scope="module")
def encoded(tmp_path_factory, models, shards):
    out = tmp_path_factory.mktemp("lat") / "train"
    return out, encode_split(str(shards), out, encoders(models), progress=False)


def members(path):
    with tarfile.open(path) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf if m.isfile()}


def test_summary_line_counts_per_bucket(encoded):
    from ldm_train.latents.encode import summary_line

    line = summary_line("train", encoded[1])
    assert "written 16 (per bucket: 112x80=4, 128x64=3, 64x128=2, 80x112=3, 96x96=4), skipped: too_small=1" in line


def test_manifest_counts_per_bucket(encoded):
    out, manifest = encoded
    assert manifest["samples_written"] == len(PHOTOS) - 1
    assert manifest["report"]["skipped"] == {"too_small": 1}  # camera_tiny
    assert manifest["bucket_samples"] == COUNTS
    assert manifest["buckets"] == [list(b) for b in BUCKETS]
    assert manifest["bucket_latent_shapes"] == {f"{w}x{h}": [4, h // 2, w // 2] for w, h in BUCKETS}
    assert manifest["latent_shape"] == [4, 48, 48]  # the bucket nearest to square
    per_bucket = {}
    for o in manifest["output_shards"]:
        assert o["name"].startswith("latents-") and f"-{o['bucket'][0]}x{o['bucket'][1]}-" in o["name"]
        assert 0 < o["samples"] <= 2  # latents.shard_size
        per_bucket[f"{o['bucket'][0]}x{o['bucket'][1]}"] = per_bucket.get(f"{o['bucket'][0]}x{o['bucket'][1]}", 0) + o["samples"]
    assert per_bucket == COUNTS
    assert sorted(p.name for p in out.glob("latents-*.tar")) == sorted(o["name"] for o in manifest["output_shards"])


def test_each_part_holds_one_shape_and_the_crop_of_each_sample(encoded, models):
    out, manifest = encoded
    vae = models[0]
    for o in manifest["output_shards"]:
        w, h = o["bucket"]
        files = members(out / o["name"])
        keys = sorted({name.split(".", 1)[0] for name in files})
        assert len(keys) == o["samples"]
        for key in keys:
            tensors = st_load(files[f"{key}.latent.safetensors"])
            assert tensors["mean"].shape == tensors["std"].shape == (4, h // 2, w // 2)
            meta = json.loads(files[f"{key}.json"])
            assert meta["bucket"] == [w, h]
            image = photo(key.removeprefix("p_"))
            assert meta["original_size"] == list(image.size)
            assert meta["crop_box"] == list(crop_box(image.size, target=(w, h)))
            # the stored posterior is the autoencoder's of that crop (fp16 storage, batched with others)
            with torch.no_grad():
                mean, _ = encode_posterior(vae, preprocess(image, (w, h), tuple(meta["crop_box"]))[None])
            torch.testing.assert_close(tensors["mean"].float(), mean[0].float(), atol=2e-3, rtol=1e-3)


def test_sizes_not_multiples_of_8_x_the_factor_are_refused_before_writing(tmp_path, models, shards):
    with pytest.raises(BucketError, match=r"entry 1 = \[72, 64\]: its width 72 is not a multiple of 16 "
                                          r"\(8 x the autoencoder's downsampling factor 2\)"):
        encode_split(str(shards), tmp_path / "out", encoders(models, [(64, 64), (72, 64)]), progress=False)
    assert not (tmp_path / "out").exists()


def test_resuming_with_other_buckets_is_refused(tmp_path, models, shards):
    out = tmp_path / "train"
    enc = encoders(models)
    out.mkdir()
    from ldm_train.latents import ledger
    from ldm_train.latents.encode import fingerprint
    from ldm_train.data.shards import expand_shards

    ledger.check_fingerprint(out, fingerprint(enc, expand_shards(str(shards)), None))  # an interrupted run's record
    (out / ledger.PROGRESS / "done").mkdir()
    with pytest.raises(EncodeMismatchError, match="preprocessing"):
        encode_split(str(shards), out, encoders(models, BUCKETS[:3]), progress=False)
    with pytest.raises(EncodeMismatchError, match="preprocessing"):
        encode_split(str(shards), out, encoders(models, None), progress=False)
