"""``encode``: image shards -> latent cache, read back by ``load_latents``."""
from __future__ import annotations

import io
import tarfile

import pytest
import torch
from conftest import synthetic_samples

from ldm_train.autoencoder.vae import build_vae, encode_posterior
from ldm_train.config import AutoencoderConfig, LatentsConfig, TextConfig
from ldm_train.data.shards import DataError, preprocess, write_shards
from ldm_train.latents.cache import MANIFEST, NULL_CONTEXT, load_latents, read_manifest
from ldm_train.latents.encode import Encoders, encode_split
from ldm_train.text.encoder import prepare_text_encoder
from ldm_train.utils.runs import OutputExistsError

CPU = torch.device("cpu")
RES = 16
N = 11  # not a multiple of the batch or shard size


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.manual_seed(0)
    vae = build_vae(AutoencoderConfig(block_out_channels=[8, 16], norm_num_groups=4)).eval()
    vae.register_to_config(scaling_factor=0.7)
    text = prepare_text_encoder(
        TextConfig(width=32, layers=1, heads=2, context_length=16, pretrained=None), tmp_path_factory.mktemp("text") / "t"
    )
    return vae, text


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    samples = synthetic_samples(N, size=RES)
    write_shards(samples, folder, "src", shard_size=4)
    return folder, samples


def encode(spec, out, models, overwrite=False, shard_size=5, batch_size=3, **latents):
    vae, text = models
    enc = Encoders(vae, text, LatentsConfig(shard_size=shard_size, batch_size=batch_size, **latents), RES, CPU)
    return encode_split(str(spec), out, enc, overwrite, progress=False)


@pytest.fixture(scope="module")
def encoded(tmp_path_factory, models, source):
    out = tmp_path_factory.mktemp("lat") / "train"
    manifest = encode(source[0], out, models)
    return out, manifest


def test_manifest_counts(encoded, source, models):
    out, manifest = encoded
    folder, samples = source
    assert manifest == read_manifest(out)
    assert manifest["samples_written"] == N
    assert manifest["report"] == {"seen": N, "kept": N, "skipped": {}, "failed_shards": [], "shard_errors": {}}
    assert manifest["failed_shards"] == [] and manifest["complete"] is True
    assert sum(manifest["input_shard_samples"].values()) == N
    assert manifest["input_shards"] == sorted(str(p) for p in folder.glob("*.tar"))
    assert manifest["latent_shape"] == [4, RES // 2, RES // 2]
    assert manifest["context_shape"] == [16, 32]
    assert manifest["scaling_factor"] == pytest.approx(0.7)
    assert manifest["shift_factor"] == 0.0
    assert manifest["resolution"] == RES
    assert manifest["text_encoder"] == models[1].name
    # one part per input shard (4, 4, 3 samples; at most 5 per part)
    assert sorted(p.name for p in out.glob("latents-*.tar")) == [f"latents-00000{i}-000.tar" for i in range(3)]
    assert [o["samples"] for o in manifest["output_shards"]] == [4, 4, 3]
    assert (out / NULL_CONTEXT).is_file() and (out / MANIFEST).is_file()


def test_no_partial_folder_left(encoded):
    out, _ = encoded
    assert not out.with_name(out.name + ".partial").exists()
    assert not list(out.parent.glob("*.partial"))
    assert not list(out.glob("*.tmp"))


def test_load_latents_shapes_and_order(encoded, source, models):
    out, _ = encoded
    _, samples = source
    data = load_latents(out)
    assert len(data) == N
    assert data.mean.shape == data.std.shape == (N, 4, RES // 2, RES // 2)
    assert data.context.shape == (N, 16, 32)
    assert data.null_context.shape == (16, 32)
    assert data.mean.dtype == data.std.dtype == data.context.dtype == torch.float16
    assert (data.std > 0).all()
    assert data.captions == [s[2] for s in samples]
    assert data.keys == [s[0] for s in samples]
    assert data.manifest["samples_written"] == N


def test_cached_values_match_the_models(encoded, source, models):
    out, _ = encoded
    _, samples = source
    vae, text = models
    data = load_latents(out)
    images = torch.stack([preprocess(s[1], RES) for s in samples[:4]])
    mean, std = encode_posterior(vae, images)
    torch.testing.assert_close(data.mean[:4].float(), mean.half().float())
    torch.testing.assert_close(data.std[:4].float(), std.half().float())
    context = text([s[2] for s in samples[:4]])
    # the encoder ran batches of 3, this batch of 4: attention's fp32 sums may differ at ~1e-6
    # with the batch (CPU kernels split by shape), which can flip one fp16 rounding: one ulp
    torch.testing.assert_close(data.context[:4].float(), context.half().float(), rtol=2**-10, atol=1e-5)
    torch.testing.assert_close(data.null_context.float(), text([""])[0].half().float())


def _append(tar_path, name: str, payload: bytes) -> None:
    with tarfile.open(tar_path, "a") as tf:
        info = tarfile.TarInfo(name)
        info.size = len(payload)
        tf.addfile(info, io.BytesIO(payload))


def test_corrupt_image_is_skipped_and_counted(tmp_path, models):
    src = tmp_path / "src"
    samples = synthetic_samples(5, size=RES)
    (first, _) = write_shards(samples, src, "src", shard_size=3)
    _append(first, "zzbad.png", b"definitely not a png")
    _append(first, "zzbad.txt", b"a broken sample")
    manifest = encode(src, tmp_path / "out", models)
    assert manifest["samples_written"] == 5
    assert manifest["report"]["seen"] == 6 and manifest["report"]["kept"] == 5
    assert manifest["report"]["skipped"] == {"corrupt_image": 1}
    assert read_manifest(tmp_path / "out")["report"]["skipped"] == {"corrupt_image": 1}
    data = load_latents(tmp_path / "out")
    assert data.keys == [s[0] for s in samples]
    assert "a broken sample" not in data.captions


def test_rerun_without_overwrite_refuses(encoded, source, models):
    out, _ = encoded
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(OutputExistsError, match="overwrite"):
        encode(source[0], out, models)
    assert sorted(p.name for p in out.iterdir()) == before


def test_rerun_with_overwrite_replaces(tmp_path, source, models):
    out = tmp_path / "lat"
    encode(source[0], out, models)
    (out / "stale.txt").write_text("old")
    manifest = encode(source[0], out, models, overwrite=True, shard_size=2)
    assert manifest["samples_written"] == N
    assert not (out / "stale.txt").exists()
    assert len(list(out.glob("latents-*.tar"))) == 6  # 4, 4, 3 samples in parts of at most 2
    assert len(load_latents(out)) == N
    assert not list(tmp_path.glob("*.partial"))


def test_stale_partial_folder_is_replaced(tmp_path, source, models):
    out = tmp_path / "lat"
    partial = tmp_path / "lat.partial"
    partial.mkdir()
    (partial / "latents-000099.tar").write_bytes(b"junk from a crashed run")
    encode(source[0], out, models)
    assert not partial.exists()
    assert len(load_latents(out)) == N


def test_empty_output_folder_is_fine(tmp_path, source, models):
    out = tmp_path / "lat"
    out.mkdir()
    assert encode(source[0], out, models)["samples_written"] == N


def test_load_latents_without_manifest(tmp_path):
    with pytest.raises(DataError, match="encode"):
        load_latents(tmp_path)
