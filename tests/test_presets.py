"""configs/sd15.yaml is Stable Diffusion 1.5 (the launch/bench_*.py scripts take their sd15 preset
from it): its U-Net has exactly the parameters of diffusers' UNet2DConditionModel built from SD
1.5's unet/config.json, translates back to the same ModelConfig, and the VAE and schedule are SD's.
Everything is built on the meta device (shapes only, no memory)."""
from __future__ import annotations

import pytest
import torch

from conftest import REPO
from ldm_train.autoencoder.vae import build_vae
from ldm_train.config import load_config
from ldm_train.model import build_unet, model_config_from_diffusers

diffusers = pytest.importorskip("diffusers")

SD15 = REPO / "configs" / "sd15.yaml"
# The architecture keys of runwayml/stable-diffusion-v1-5's unet/config.json (the rest are diffusers'
# defaults); diffusers' attention_head_dim is the head count there.
SD15_UNET = dict(block_out_channels=[320, 640, 1280, 1280], down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                 up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, layers_per_block=2, attention_head_dim=8,
                 cross_attention_dim=768, norm_num_groups=32, in_channels=4, out_channels=4, sample_size=64)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_sd15_unet_is_diffusers_sd15():
    cfg = load_config(SD15)
    with torch.device("meta"):
        ours = build_unet(cfg.model)
        theirs = diffusers.UNet2DConditionModel(**SD15_UNET)
    assert n_params(ours) == n_params(theirs) == 859_520_964
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    assert model_config_from_diffusers(dict(theirs.config), "sd15") == cfg.model  # heads included


def test_sd15_vae_and_schedule():
    cfg = load_config(SD15)
    with torch.device("meta"):
        vae = build_vae(cfg.autoencoder)
    assert n_params(vae) == 83_653_863  # SD 1.x/2.x AutoencoderKL
    d = cfg.diffusion
    assert (d.num_train_timesteps, d.beta_schedule, d.beta_start, d.beta_end, d.prediction_type) == (
        1000, "scaled_linear", 0.00085, 0.012, "epsilon")
