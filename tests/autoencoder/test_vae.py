"""The KL autoencoder: shapes, save/load round trip, error messages, and a short training run."""
from __future__ import annotations

import math

import pytest
import torch

from ldm_train.autoencoder.train_vae import reconstruct, train_vae
from ldm_train.autoencoder.vae import (
    AutoencoderError,
    build_vae,
    decode_latents,
    encode_posterior,
    latent_scale,
    load_vae,
    to_latent,
)
from ldm_train.config import AutoencoderConfig, VAETrainConfig
from ldm_train.data.shards import to_uint8
from ldm_train.utils.runs import MetricsLog

CPU = torch.device("cpu")


def tiny_cfg(channels=(8, 16), groups=4, **train) -> AutoencoderConfig:
    return AutoencoderConfig(
        block_out_channels=list(channels),
        norm_num_groups=groups,
        latent_channels=4,
        train=VAETrainConfig(**{"steps": 30, "batch_size": 8, "crop": None, "lr": 2e-3, "log_every": 1, **train}),
    )


def fixed_images(n: int = 8, size: int = 16, seed: int = 0) -> torch.Tensor:
    """Smooth, structured uint8 NCHW images (blobs of colour), easy to reconstruct."""
    gen = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=gen) * 2 - 1
    x = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    return to_uint8(x.clamp(-1, 1))


def images_float(images_u8: torch.Tensor) -> torch.Tensor:
    return images_u8.float().div(127.5).sub(1.0)


@pytest.mark.parametrize("channels", [(8,), (8, 16), (8, 16, 16)])
def test_encode_decode_shapes(channels):
    torch.manual_seed(0)
    vae = build_vae(tiny_cfg(channels)).eval()
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    mean, std = encode_posterior(vae, x)
    side = 64 // 2 ** (len(channels) - 1)
    assert mean.shape == std.shape == (2, 4, side, side)
    assert (std > 0).all()
    z = to_latent(mean, std, *latent_scale(vae))
    assert z.shape == (2, 4, side, side) and z.dtype == torch.float32
    out = decode_latents(vae, z)
    assert out.shape == (2, 3, 64, 64)
    assert out.min() >= -1 and out.max() <= 1


def test_build_vae_is_fresh_with_unit_scale():
    vae = build_vae(tiny_cfg())
    assert latent_scale(vae) == (1.0, 0.0)
    assert list(vae.config.block_out_channels) == [8, 16]


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(0)
    vae = build_vae(tiny_cfg()).eval()
    vae.register_to_config(scaling_factor=0.5)
    vae.save_pretrained(tmp_path / "vae", safe_serialization=True)
    assert (tmp_path / "vae" / "config.json").is_file()
    assert (tmp_path / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = load_vae(tmp_path / "vae")
    assert latent_scale(loaded) == (0.5, 0.0)
    assert not any(p.requires_grad for p in loaded.parameters())
    assert not loaded.training
    z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(decode_latents(vae, z), decode_latents(loaded, z))
    for (k1, v1), (k2, v2) in zip(vae.state_dict().items(), loaded.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)


def test_load_vae_fp16_dtype(tmp_path):
    build_vae(tiny_cfg()).save_pretrained(tmp_path / "vae", safe_serialization=True)
    assert load_vae(tmp_path / "vae", "fp16").dtype == torch.float16


def test_load_vae_missing_folder_says_what_to_provide(tmp_path):
    missing = tmp_path / "no_vae_here"
    with pytest.raises(AutoencoderError) as info:
        load_vae(missing)
    msg = str(info.value)
    assert str(missing) in msg
    assert "config.json" in msg and "diffusion_pytorch_model.safetensors" in msg
    assert "train-vae" in msg and "autoencoder.path" in msg


def test_load_vae_folder_without_config(tmp_path):
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    with pytest.raises(AutoencoderError, match="config.json"):
        load_vae(tmp_path / "vae")


def test_norm_group_mismatch_names_the_key():
    with pytest.raises(AutoencoderError) as info:
        build_vae(tiny_cfg(channels=(8, 12), groups=8))
    msg = str(info.value)
    assert "autoencoder.norm_num_groups" in msg and "autoencoder.block_out_channels" in msg
    assert "12" in msg


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("vae") / "vae"
    cfg = tiny_cfg()
    images = fixed_images()
    log = MetricsLog(out.parent / "metrics.jsonl")
    vae, summary = train_vae(cfg, images, out, CPU, seed=0, log=log)
    return cfg, images, out, vae, summary, log


def test_train_vae_lowers_l1(trained):
    cfg, images, out, vae, summary, log = trained
    records = [r for r in log.read() if r["stage"] == "vae"]
    assert [r["step"] for r in records] == list(range(30))
    first = records[0]["rec_l1"]
    last5 = sum(r["rec_l1"] for r in records[-5:]) / 5
    assert last5 < 0.8 * first
    assert summary["steps"] == 30
    assert summary["final_rec_l1"] == pytest.approx(sum(r["rec_l1"] for r in records) / 30)
    # deterministic reconstruction error (posterior mean): trained model vs the same init untrained
    torch.manual_seed(0)
    untrained = build_vae(cfg).eval()
    x, before = reconstruct(untrained, images, CPU)
    _, after = reconstruct(vae, images, CPU)
    assert (after - x).abs().mean() < 0.8 * (before - x).abs().mean()


def test_train_vae_saves_loadable_folder_with_scaling_factor(trained):
    cfg, images, out, vae, summary, _ = trained
    loaded = load_vae(out)
    scale, shift = latent_scale(loaded)
    assert scale == pytest.approx(summary["scaling_factor"], rel=1e-6)
    assert shift == pytest.approx(summary["shift_factor"], rel=1e-6)
    assert scale != 1.0

    # 1/std of posterior samples, recomputed the documented way from the saved weights
    x = images_float(images)
    with torch.no_grad():
        dist = loaded.encode(x).latent_dist
    gen = torch.Generator().manual_seed(0)
    z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen)
    assert scale == pytest.approx(float(1.0 / z.std()), rel=1e-3)
    assert shift == pytest.approx(float(z.mean()), abs=1e-3)

    # and independently of the noise draw: Var[z] = E[mean^2 + std^2] - E[mean]^2
    m, s = dist.mean.double(), dist.std.double()
    var = (m.pow(2) + s.pow(2)).mean() - m.mean().pow(2)
    assert scale == pytest.approx(1.0 / math.sqrt(float(var)), rel=0.05)

    # scaled latents of the data then have zero mean and roughly unit variance
    scaled = to_latent(dist.mean, dist.std, scale, shift, generator=torch.Generator().manual_seed(5))
    assert float(scaled.std()) == pytest.approx(1.0, rel=0.1)
    assert abs(float(scaled.mean())) < 0.1


def test_train_vae_is_deterministic(trained, tmp_path):
    cfg, images, _, vae, summary, _ = trained
    short = cfg.model_copy(update={"train": cfg.train.model_copy(update={"steps": 3})})
    a, sa = train_vae(short, images, tmp_path / "a", CPU, seed=0, log=MetricsLog(tmp_path / "a.jsonl"))
    b, sb = train_vae(short, images, tmp_path / "b", CPU, seed=0, log=MetricsLog(tmp_path / "b.jsonl"))
    assert sa["scaling_factor"] == sb["scaling_factor"]
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k


def test_random_crop_training_runs(tmp_path):
    cfg = tiny_cfg(steps=2, crop=8)
    _, summary = train_vae(cfg, fixed_images(4), tmp_path / "vae", CPU, seed=0, log=MetricsLog(tmp_path / "m.jsonl"))
    assert math.isfinite(summary["final_rec_l1"]) and summary["scaling_factor"] > 0
