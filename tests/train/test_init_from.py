"""``model.init_from``: training starts from a pretrained U-Net folder (either format)."""
from __future__ import annotations

import pytest
import torch

from ldm_train.config import LRScheduleConfig
from ldm_train.model import UNetArchitectureMismatch, build_unet, write_diffusers_unet
from ldm_train.train.batches import MemoryBatches
from ldm_train.train.loop import make_accelerator, train_denoiser
from ldm_train.utils.runs import MetricsLog


def train(micro_run, latents, tmp_path, model_cfg, train_cfg):
    cfg = micro_run.cfg
    return train_denoiser(
        model=model_cfg, diffusion=cfg.diffusion, train=train_cfg, distributed=cfg.distributed,
        accelerator=make_accelerator(cfg.distributed), batches=MemoryBatches(latents, train_cfg.batch_size, 0, 0),
        run_dir=tmp_path / "run", seed=0, log=MetricsLog(tmp_path / "m.jsonl"),
    )


def test_training_starts_from_init_from_weights(micro_run, micro_latents, tmp_path):
    cfg = micro_run.cfg
    torch.manual_seed(123)
    pretrained = build_unet(cfg.model).state_dict()
    write_diffusers_unet(tmp_path / "pre", cfg.model, pretrained)
    model_cfg = cfg.model.model_copy(update={"init_from": str(tmp_path / "pre")})
    # one step at a negligible learning rate: the weights must still be the pretrained ones
    train_cfg = cfg.train.model_copy(update={"steps": 1, "lr": 1e-12, "checkpoint_every": 100,
                                        "lr_schedule": LRScheduleConfig(warmup_steps=0)})
    model, _, _ = train(micro_run, micro_latents, tmp_path, model_cfg, train_cfg)
    fresh = build_unet(cfg.model).state_dict()  # what seed 0 would have given without init_from
    got = model.state_dict()
    for k, v in pretrained.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=1e-6)
    assert any(not torch.allclose(got[k], fresh[k]) for k in fresh)


def test_init_from_a_different_architecture_is_refused(micro_run, micro_latents, tmp_path):
    cfg = micro_run.cfg
    other = cfg.model.model_copy(update={"block_out_channels": [8, 32], "norm_num_groups": 8})
    write_diffusers_unet(tmp_path / "pre", other, build_unet(other).state_dict())
    model_cfg = cfg.model.model_copy(update={"init_from": str(tmp_path / "pre")})
    with pytest.raises(UNetArchitectureMismatch, match="block_out_channels"):
        train(micro_run, micro_latents, tmp_path, model_cfg, cfg.train.model_copy(update={"steps": 1}))
