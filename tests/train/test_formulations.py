"""The diffusion formulations as configuration of the same loop and the same sampling entry point."""
from __future__ import annotations

import math

import pytest
import torch

from ldm_train.cli import main
from ldm_train.diffusion.objective import build_objective
from ldm_train.diffusion.sampling import sample_from_config
from ldm_train.diffusion import build_schedule
from ldm_train.eval.pipeline import load_pipeline
from ldm_train.eval.sample import generate
from ldm_train.train.loop import make_accelerator, train_denoiser
from ldm_train.utils.runs import MetricsLog

from conftest import MICRO

CPU = torch.device("cpu")


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "euler", "heun", "dpmpp_2m"])
def test_every_sampler_runs_from_the_eval_config(micro_run, sampler):
    pipe = load_pipeline(micro_run.export, CPU)
    cfg = micro_run.cfg.eval.model_copy(update={"sampler": sampler, "steps": 4, "samples_per_prompt": 2, "s_churn": 0.5})
    a, _ = generate(pipe, ["red circle 0"], cfg, CPU)
    b, _ = generate(pipe, ["red circle 0"], cfg, CPU)
    assert a.shape == (2, 3, 32, 32) and torch.isfinite(a).all()
    assert torch.equal(a, b)  # seeded, also for the stochastic samplers


def test_learned_variance_trains_with_the_hybrid_loss_and_samples_with_iddpm(micro_run, micro_latents, tmp_path):
    cfg = micro_run.cfg
    model_cfg = cfg.model.model_copy(update={"out_channels": 2 * cfg.model.in_channels})
    diffusion_cfg = cfg.diffusion.model_copy(update={"learned_variance": True})
    train_cfg = cfg.train.model_copy(update={"steps": 3, "log_every": 1})
    model, _, result = train_denoiser(
        model_cfg, diffusion_cfg, train_cfg, make_accelerator(cfg.distributed), micro_latents,
        tmp_path / "run", 0, MetricsLog(tmp_path / "m.jsonl"),
    )
    assert all(math.isfinite(v) for _, v in result.losses)
    eval_cfg = cfg.eval.model_copy(update={"sampler": "iddpm", "steps": 5})
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    ctx = micro_latents.context[:2].float()
    z = sample_from_config(
        model.eval(), noise, ctx, micro_latents.null_context.float(), build_schedule(diffusion_cfg),
        eval_cfg, diffusion_cfg, torch.Generator().manual_seed(1),
    )
    assert z.shape == noise.shape and torch.isfinite(z).all()


@pytest.mark.parametrize(
    "update",
    [{"loss_weighting": "min_snr"}, {"loss_weighting": "edm"}, {"offset_noise": 0.1}, {"timestep_sampling": "logit_normal"}],
)
def test_objective_options_change_the_loss(micro_run, micro_latents, update):
    """Each option reaches the loss: same seed and batch, a different value than the default."""
    base = micro_run.cfg.diffusion
    schedule = build_schedule(base)
    x0 = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    ctx = micro_latents.context[:4].float()

    def model(x, t, c):
        return 0.3 * x

    def loss(cfg):
        value, _ = build_objective(cfg)(model, x0, ctx, micro_latents.null_context.float(), schedule, torch.Generator().manual_seed(3))
        return value.item()

    assert loss(base) == loss(base)
    assert loss(base.model_copy(update=update)) != loss(base)


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["diffusion.learned_variance=true"], "out_channels"),
        (["diffusion.rescale_betas_zero_snr=true", "diffusion.prediction_type=epsilon"], "zero-terminal-SNR"),
        (["diffusion.learned_variance=true", "model.out_channels=8", "eval.sampler=ddim"], "sampler"),
    ],
)
def test_inconsistent_combinations_are_refused_before_work(tmp_path, capsys, overrides, words):
    code = main(["train", "--config", str(MICRO), f"run.dir={tmp_path}/run", *overrides])
    assert code == 2
    err = capsys.readouterr().err
    assert "inconsistent configuration" in err and words in err
    assert not (tmp_path / "run").exists()
