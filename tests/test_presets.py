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


# ---- the Stable Diffusion presets (issue 13) ----

# stabilityai/stable-diffusion-2-base's unet/config.json, architecture keys (attention_head_dim: heads per level)
SD2_UNET = dict(SD15_UNET, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024, use_linear_projection=True)


def test_sd2_base_pretrain_unet_is_diffusers_sd2_base():
    cfg = load_config("sd2-base-pretrain")
    with torch.device("meta"):
        ours = build_unet(cfg.model)
        theirs = diffusers.UNet2DConditionModel(**SD2_UNET)
    assert n_params(ours) == n_params(theirs) == 865_910_724
    assert model_config_from_diffusers(dict(theirs.config), "sd2").model_dump(exclude={"gradient_checkpointing"}) == \
        cfg.model.model_dump(exclude={"gradient_checkpointing"})
    assert (cfg.text.model_name, cfg.text.layer, cfg.distributed.strategy, cfg.distributed.mixed_precision) == (
        "ViT-H-14", "penultimate", "zero2", "bf16")
    assert (cfg.data.resolution, cfg.train.lr, cfg.train.batch_size) == (256, 1e-4, 2048)


@pytest.mark.parametrize("name, prediction, size", [("sd15-finetune", "epsilon", 512), ("sd21-finetune", "v_prediction", 768),
                                                    ("sdxl-finetune", "epsilon", 1024)])
def test_finetune_presets_name_what_to_supply(name, prediction, size):
    text = (REPO / "configs" / f"{name}.yaml").read_text()
    assert "Provide" in text and "single file" in text
    cfg = load_config(name)
    assert cfg.pretrained is not None and cfg.diffusion.prediction_type == prediction and cfg.data.resolution == size
    assert cfg.train.lr == 1e-5 and cfg.train.optimizer.name == "adamw" and cfg.train.ema_decays == [0.9999]


def test_sd2_base_pretrain_runs_on_tiny_stand_ins(tmp_path):
    """The preset's recipe on tiny stand-ins of the same families: an SD-shaped VAE folder, a tiny open_clip
    tower on its penultimate layer, an SD 2-shaped U-Net (linear projections, 64 channels per head)."""
    from conftest import synthetic_samples
    from ldm_train.cli import main
    from ldm_train.data.shards import write_shards
    from pretrained.tiny_sd import make_tiny_sd

    sd = make_tiny_sd(tmp_path / "sd", "sd1")
    tiny = [f"run.dir={tmp_path / 'run'}", f"autoencoder.path={sd}", "data.resolution=16", "data.min_size=0",
            "text.model_name=null", "text.pretrained=null", "text.width=64", "text.layers=3", "text.heads=1",
            "text.context_length=77", "model.block_out_channels=[64,128]", "model.attention_levels=[true,true]",
            "model.layers_per_block=1", "model.cross_attention_dim=64", "train.steps=2", "train.batch_size=4",
            "train.lr_schedule.warmup_steps=1", "train.eval_every=0", "train.tensorboard=false",
            "distributed.strategy=ddp", "distributed.mixed_precision=no", "distributed.cpu=true", "latents.batch_size=8"]
    cfg = load_config("sd2-base-pretrain", tiny)
    write_shards(synthetic_samples(8, seed=1, prefix="t"), cfg.path(cfg.data.train_shards), "train", 8)
    write_shards(synthetic_samples(4, seed=2, prefix="v"), cfg.path(cfg.data.val_shards), "val", 8)
    for stage in ("encode", "train"):
        assert main([stage, "--config", "sd2-base-pretrain", *tiny]) == 0
    from ldm_train.text import load_text

    text = load_text(cfg.text, cfg.path(cfg.text.dir))
    assert text.context_length == 77 and text.width == 64
    assert (tmp_path / "run" / "checkpoints" / "step-0000002").is_dir()
