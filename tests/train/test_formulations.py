"""The diffusion formulations as configuration of the same loop and the same sampling entry point."""
from __future__ import annotations

import math

import pytest
import torch

from ldm_train.cli import main
from ldm_train.diffusion import build_objective, build_schedule, sample_from_config
from ldm_train.eval.pipeline import load_pipeline
from ldm_train.eval.sample import generate
from ldm_train.train.batches import MemoryBatches
from ldm_train.train.loop import make_accelerator, train_denoiser
from ldm_train.utils.runs import MetricsLog

from conftest import MICRO

CPU = torch.device("cpu")


def train(micro_run, latents, tmp_path, model_cfg, diffusion_cfg, train_cfg):
    cfg = micro_run.cfg
    return train_denoiser(
        model=model_cfg, diffusion=diffusion_cfg, train=train_cfg, distributed=cfg.distributed,
        accelerator=make_accelerator(cfg.distributed), batches=MemoryBatches(latents, train_cfg.batch_size, 0, 0),
        run_dir=tmp_path / "run", seed=0, log=MetricsLog(tmp_path / "m.jsonl"),
    )


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "euler", "heun", "dpmpp_2m"])
def test_every_sampler_runs_from_the_eval_config(micro_run, sampler):
    pipe = load_pipeline(micro_run.export, CPU)
    cfg = micro_run.cfg.eval.model_copy(update={"sampler": sampler, "steps": 4, "samples_per_prompt": 2,
                                             "samplers": {"euler": {"s_churn": 0.5}, "heun": {"s_churn": 0.5}}})
    a, _ = generate(pipe, ["red circle 0"], cfg, CPU)
    b, _ = generate(pipe, ["red circle 0"], cfg, CPU)
    assert a.shape == (2, 3, 32, 32) and torch.isfinite(a).all()
    assert torch.equal(a, b)  # seeded, also for the stochastic samplers


def test_learned_variance_trains_with_the_hybrid_loss_and_samples_with_iddpm(micro_run, micro_latents, tmp_path):
    cfg = micro_run.cfg
    model_cfg = cfg.model.model_copy(update={"out_channels": 2 * cfg.model.in_channels})
    diffusion_cfg = cfg.diffusion.model_copy(update={"iddpm": cfg.diffusion.iddpm.model_copy(update={"learned_variance": True})})
    train_cfg = cfg.train.model_copy(update={"steps": 3, "log_every": 1})
    model, _, result = train(micro_run, micro_latents, tmp_path, model_cfg, diffusion_cfg, train_cfg)
    assert all(math.isfinite(v) for _, v in result.losses)
    eval_cfg = cfg.eval.model_copy(update={"sampler": "ddpm", "steps": 5})
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    ctx = micro_latents.context[:2].float()
    z = sample_from_config(model.eval(), noise, ctx, micro_latents.null_context.float(), diffusion_cfg, eval_cfg,
                           generator=torch.Generator().manual_seed(1))
    assert z.shape == noise.shape and torch.isfinite(z).all()


@pytest.mark.parametrize(
    "update",
    [{"weighting": "min_snr"}, {"weighting": "edm"}, {"offset_noise": 0.1}, {"timestep_sampling": "logit_normal"}],
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
    assert loss(base.model_copy(update={"loss": base.loss.model_copy(update=update)})) != loss(base)


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["diffusion.iddpm.learned_variance=true"], "out_channels"),
        (["diffusion.rescale_betas_zero_snr=true", "diffusion.prediction_type=epsilon"], "zero-terminal-SNR"),
        (["diffusion.iddpm.learned_variance=true", "model.out_channels=8", "eval.sampler=ddim"], "sampler"),
    ],
)
def test_inconsistent_combinations_are_refused_before_work(tmp_path, capsys, overrides, words):
    code = main(["train", "--config", str(MICRO), f"run.dir={tmp_path}/run", *overrides])
    assert code == 2
    err = capsys.readouterr().err
    assert "inconsistent configuration" in err and words in err
    assert not (tmp_path / "run").exists()


SCORE_CASES = [
    ("vp_sde", "dsm", "pf_ode"),
    ("subvp_sde", "dsm", "pc"),
    ("ve_sde", "dsm", "pc"),
    ("vp_sde", "ssm_vr", "pf_ode"),
    ("ncsn", "dsm", "annealed_langevin"),
    ("ncsn", "ssm", "annealed_langevin"),
]


@pytest.mark.parametrize("formulation, objective, sampler", SCORE_CASES)
def test_score_based_formulations_train_and_sample(micro_run, micro_latents, tmp_path, formulation, objective, sampler):
    """Each score-based formulation is configuration of the same loop and sampling entry point."""
    cfg = micro_run.cfg
    d = cfg.diffusion
    diffusion_cfg = d.model_copy(update={
        "formulation": formulation, "prediction_type": "epsilon",
        "score_matching": d.score_matching.model_copy(update={"objective": objective}),
        "ncsn": d.ncsn.model_copy(update={"num_scales": 8, "sigma_max": 5.0}),
        "sde": d.sde.model_copy(update={"sigma_max": 5.0}),
    })
    train_cfg = cfg.train.model_copy(update={"steps": 3, "log_every": 1})
    model, _, result = train(micro_run, micro_latents, tmp_path, cfg.model, diffusion_cfg, train_cfg)
    assert len(result.losses) == 3 and all(math.isfinite(v) for _, v in result.losses)
    eval_cfg = cfg.eval.model_copy(update={"sampler": sampler, "steps": 3,
                                           "samplers": {"annealed_langevin": {"steps_per_sigma": 1}}})
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    args = (model.eval(), noise, micro_latents.context[:2].float(), micro_latents.null_context.float(),
            diffusion_cfg, eval_cfg)
    a = sample_from_config(*args, generator=torch.Generator().manual_seed(1))
    b = sample_from_config(*args, generator=torch.Generator().manual_seed(1))
    assert a.shape == noise.shape and torch.isfinite(a).all() and torch.equal(a, b)


def test_dsm_objective_is_the_eps_mse_at_the_sde_marginal(micro_latents):
    """VP-SDE DSM with lambda = std^2 equals the eps-MSE: an oracle eps-predictor scores 0."""
    from ldm_train.config import DiffusionConfig
    from ldm_train.diffusion.losses.score import sde_loss
    from ldm_train.diffusion.sdes import build_sde

    cfg = DiffusionConfig(formulation="vp_sde", prediction_type="epsilon", cond_drop_prob=0.0)
    sde = build_sde(cfg)
    x0 = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    gen_state = torch.Generator().manual_seed(5)

    def oracle(x_t, tau, ctx):  # recover eps from x_t using the known x0
        mean, std = sde.marginal(tau / 999.0)
        view = (-1, 1, 1, 1)
        return (x_t - mean.float().view(view) * x0) / std.float().view(view)

    ctx = torch.zeros(4, 3, 8)
    loss, _ = sde_loss(oracle, x0, ctx, ctx[0], sde, cfg, gen_state)
    assert loss.item() < 1e-8


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["diffusion.formulation=vp_sde", "diffusion.prediction_type=epsilon"], "eval.sampler"),
        (["diffusion.formulation=ve_sde", "eval.sampler=pc"], "prediction_type=epsilon"),
        (["eval.sampler=pf_ode"], "score-based"),
        (["diffusion.formulation=ncsn", "diffusion.prediction_type=epsilon", "eval.sampler=pc"], "annealed_langevin"),
    ],
)
def test_score_based_combinations_are_refused(tmp_path, capsys, overrides, words):
    assert main(["train", "--config", str(MICRO), f"run.dir={tmp_path}/run", *overrides]) == 2
    err = capsys.readouterr().err
    assert "inconsistent configuration" in err and words in err
