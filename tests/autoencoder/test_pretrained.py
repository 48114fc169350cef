"""Pretrained autoencoders through ``load_vae``: a whole checkpoint folder (``vae/`` found), an
explicit subfolder, scaling and shift factors, dtype and fp16 ``force_upcast``, and clear errors
for hub ids offline and folders that are not a VAE. Tiny random AutoencoderKLs; nothing downloads."""
from __future__ import annotations

import json
import logging

import pytest
import torch
from diffusers import AutoencoderKL

from ldm_train.autoencoder.vae import (
    AutoencoderError,
    build_vae,
    decode_latents,
    encode_posterior,
    latent_scale,
    load_vae,
)
from ldm_train.config import AutoencoderConfig


def tiny_vae(**config) -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16), norm_num_groups=4, latent_channels=4, **config,
    ).eval()


def sd_checkpoint(root, vae: AutoencoderKL):
    """A Stable-Diffusion-like folder: model_index.json, unet/ (a config only), vae/."""
    vae.save_pretrained(root / "vae", safe_serialization=True)
    (root / "unet").mkdir()
    (root / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    (root / "model_index.json").write_text(json.dumps({"vae": ["diffusers", "AutoencoderKL"]}))
    return root


def images(n=2, size=16):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(3)) * 2 - 1


def test_checkpoint_parent_finds_vae_with_scale_and_shift(tmp_path):
    vae = tiny_vae(scaling_factor=0.3611, shift_factor=0.1159)
    root = sd_checkpoint(tmp_path / "sd", vae)
    loaded = load_vae(root)
    assert latent_scale(loaded) == (pytest.approx(0.3611), pytest.approx(0.1159))
    for (k, a), b in zip(vae.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = vae.decode(z / 0.3611 + 0.1159).sample.clamp(-1, 1)
    assert torch.equal(decode_latents(loaded, z), expected)
    # the same folder named directly, and an explicit subfolder
    assert latent_scale(load_vae(root / "vae")) == latent_scale(loaded)
    vae.save_pretrained(tmp_path / "other" / "my_vae")
    assert latent_scale(load_vae(tmp_path / "other", subfolder="my_vae"))[0] == pytest.approx(0.3611)
    with pytest.raises(AutoencoderError, match="no autoencoder at .*other/vae_typo"):
        load_vae(tmp_path / "other", subfolder="vae_typo")


def test_folder_that_is_not_a_vae_is_refused(tmp_path):
    root = sd_checkpoint(tmp_path / "sd", tiny_vae())
    with pytest.raises(AutoencoderError, match=r"unet/config.json describes a UNet2DConditionModel, not an AutoencoderKL"):
        load_vae(root / "unet")


def test_config_without_weights_is_a_clear_error(tmp_path):
    tiny_vae().save_pretrained(tmp_path / "vae")
    (tmp_path / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(AutoencoderError, match=f"cannot load the autoencoder in {tmp_path / 'vae'}"):
        load_vae(tmp_path / "vae")


@pytest.mark.parametrize("value", ["stabilityai/sd-vae-ft-mse", "org/model.v1"])
def test_hub_id_offline_says_how_to_provide_a_local_copy(tmp_path, monkeypatch, value):
    monkeypatch.chdir(tmp_path)  # so the id is not accidentally a local folder
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(AutoencoderError) as info:
        load_vae(value)
    msg = str(info.value)
    assert "\n" not in msg and f"autoencoder.path {value!r} is not a local folder" in msg
    assert f"huggingface-cli download {value} --include 'vae/*'" in msg and "set autoencoder.path" in msg


@pytest.mark.parametrize(
    "config_upcast, dtype, override, expected",
    [
        (True, "fp16", None, torch.float32),  # known to overflow: upcast (as diffusers' pipelines)
        (False, "fp16", None, torch.float16),
        (True, "bf16", None, torch.bfloat16),  # bf16 has fp32's range
        (True, "fp16", False, torch.float16),  # explicit override
        (False, "fp16", True, torch.float32),
        (True, "fp32", None, torch.float32),
    ],
)
def test_force_upcast(tmp_path, caplog, config_upcast, dtype, override, expected):
    tiny_vae(force_upcast=config_upcast).save_pretrained(tmp_path / "vae")
    with caplog.at_level(logging.WARNING, logger="ldm_train.autoencoder.vae"):
        vae = load_vae(tmp_path / "vae", dtype, force_upcast=override)
    assert vae.dtype == expected
    upcast_logged = "running it in fp32 instead of fp16" in caplog.text
    assert upcast_logged == (dtype == "fp16" and expected == torch.float32)


def test_upcast_encoder_gives_the_fp32_numbers(tmp_path):
    tiny_vae(force_upcast=True).save_pretrained(tmp_path / "vae")
    x = images()
    mean32, std32 = encode_posterior(load_vae(tmp_path / "vae", "fp32"), x)
    mean, std = encode_posterior(load_vae(tmp_path / "vae", "fp16"), x)
    assert mean.dtype == torch.float32 and torch.equal(mean, mean32) and torch.equal(std, std32)


def test_config_without_force_upcast_key_follows_diffusers_default(tmp_path):
    tiny_vae().save_pretrained(tmp_path / "vae")
    path = tmp_path / "vae" / "config.json"
    config = json.loads(path.read_text())
    del config["force_upcast"]  # older SD 1.x VAE configs predate the key; diffusers' default is true
    path.write_text(json.dumps(config))
    assert load_vae(tmp_path / "vae", "fp16").dtype == torch.float32


def test_project_vae_is_saved_without_force_upcast(tmp_path):
    vae = build_vae(AutoencoderConfig(block_out_channels=[8, 16], norm_num_groups=4))
    assert vae.config.force_upcast is False
    vae.save_pretrained(tmp_path / "vae")
    assert load_vae(tmp_path / "vae", "fp16").dtype == torch.float16


def test_hub_id_without_network_fails_fast_naming_the_endpoint(tmp_path, monkeypatch):
    import socket

    from huggingface_hub import constants

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    monkeypatch.delenv("https_proxy", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    calls = []

    def no_network(address, timeout=None):
        calls.append((address, timeout))
        raise OSError(-2, "Name or service not known")

    monkeypatch.setattr(socket, "create_connection", no_network)
    with pytest.raises(AutoencoderError, match=r"cannot reach https://huggingface.co: .*Name or service not known"):
        load_vae("org/vae")
    assert calls == [(("huggingface.co", 443), 5)]
