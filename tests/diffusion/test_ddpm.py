"""DDPM ancestral sampling: determinism, guidance, respacing and learned variance."""
import math

import pytest
import torch

from ldm_train.config import DiffusionConfig
from ldm_train.diffusion import build_schedule
from ldm_train.diffusion.guidance import guided as cfg_model
from ldm_train.diffusion.samplers.discrete import ddpm_grid
from sampling_helpers import run as run_sampler

CFG = DiffusionConfig(num_train_timesteps=100, beta_schedule="linear", beta_start=1e-3, beta_end=0.05)
B, C, L, D = 2, 3, 2, 4


@pytest.fixture(scope="module")
def schedule():
    return build_schedule(CFG)


def _model(out_channels=C, v_value=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(C, C, generator=g) * 0.1 + 0.8 * torch.eye(C)
    W = torch.cat([W, torch.randn(out_channels - C, C, generator=g) * 0.1])  # mean rows independent of extras

    def model(x, t, c):
        out = torch.einsum("oc,bchw->bohw", W, x) + 0.05 * c.mean(dim=(1, 2)).view(-1, 1, 1, 1)
        out = out + 0.01 * t.float().view(-1, 1, 1, 1) / 100
        if v_value is not None:
            out = torch.cat([out[:, :C], torch.full_like(out[:, C:], v_value)], dim=1)
        return out
    return model


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, C, 4, 4, generator=g), torch.randn(B, L, D, generator=g), torch.zeros(L, D)


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_determinism_with_seeds(schedule, variance):
    noise, ctx, null = _inputs()

    def run(seed):
        return run_sampler("ddpm", _model(), noise, ctx, null, schedule, 10, guidance_scale=2.0, variance=variance,
                           generator=torch.Generator().manual_seed(seed))
    a, b, c = run(1), run(1), run(2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == noise.shape and torch.isfinite(a).all()


def test_respaced_with_all_steps_equals_unrespaced_alg2(schedule):
    """steps=T (respaced chain, β recomputed as 1 - ᾱ_t/ᾱ_{t-1}) == steps=None == DDPM Alg. 2 written
    with the schedule's own β_t and σ_t² = β̃_t."""
    model = _model()
    noise, ctx, null = _inputs(1)
    T = CFG.num_train_timesteps
    a = run_sampler("ddpm", model, noise, ctx, null, schedule, T, generator=torch.Generator().manual_seed(0))
    b = run_sampler("ddpm", model, noise, ctx, null, schedule, None, generator=torch.Generator().manual_seed(0))
    assert torch.equal(ddpm_grid(schedule, T), ddpm_grid(schedule, None))
    torch.testing.assert_close(a, b, rtol=0, atol=0)

    betas, ab = schedule.betas.tolist(), schedule.alphas_cumprod.tolist()
    x, g = noise, torch.Generator().manual_seed(0)
    for t in range(T - 1, -1, -1):
        eps = model(x, torch.full((B,), t), ctx)
        ab_prev = ab[t - 1] if t > 0 else 1.0
        # DDPM Alg. 2 line 4: x_{t-1} = 1/sqrt(α_t) (x_t - β_t / sqrt(1 - ᾱ_t) ε) + σ_t z
        mean = (x - betas[t] / math.sqrt(1 - ab[t]) * eps) / math.sqrt(1 - betas[t])
        if t > 0:
            sigma = math.sqrt((1 - ab_prev) / (1 - ab[t]) * betas[t])
            mean = mean + sigma * torch.randn(x.shape, generator=g)
        x = mean
    torch.testing.assert_close(a, x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("steps", [None, 7])
@pytest.mark.parametrize("v,fixed", [(-1.0, "fixed_small"), (1.0, "fixed_large")])
def test_learned_variance_endpoints(schedule, steps, v, fixed):
    """v = -1 gives β̃ (fixed_small) and v = +1 gives β (fixed_large) of the respaced chain."""
    noise, ctx, null = _inputs(2)
    learned = run_sampler("ddpm", _model(2 * C, v_value=v), noise, ctx, null, schedule, steps, variance="learned_range",
                          generator=torch.Generator().manual_seed(4))
    ref = run_sampler("ddpm", _model(C), noise, ctx, null, schedule, steps, variance=fixed,
                      generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(learned, ref, rtol=1e-5, atol=1e-5)
    other = run_sampler("ddpm", _model(C), noise, ctx, null, schedule, steps,
                        variance="fixed_large" if fixed == "fixed_small" else "fixed_small",
                        generator=torch.Generator().manual_seed(4))
    assert not torch.allclose(learned, other, atol=1e-3)


def test_learned_range_needs_doubled_channels(schedule):
    noise, ctx, null = _inputs()
    with pytest.raises(ValueError, match="output channels"):
        run_sampler("ddpm", _model(C), noise, ctx, null, schedule, 3, variance="learned_range")
    with pytest.raises(ValueError, match="variance"):
        run_sampler("ddpm", _model(C), noise, ctx, null, schedule, 3, variance="bogus")


def _const_model(calls, out_channels=C):
    """Output = mean of the context (1 for the null context, 3 for the real one); variance channels
    (if any) = 0.5 for the null context and -0.25 for the real one."""
    def model(x, t, c):
        calls.append((x.shape[0], c.clone(), t.clone()))
        m = c.mean(dim=(1, 2)).view(-1, 1, 1, 1)
        out = m.expand(x.shape[0], C, *x.shape[2:]).clone()
        if out_channels > C:
            out = torch.cat([out, torch.where(m == 1.0, 0.5, -0.25).expand_as(out)], dim=1)
        return out
    return model


@pytest.mark.parametrize("scale", [0.0, 1.0, 2.5, 7.5])
@pytest.mark.parametrize("learned", [False, True])
def test_guidance_combination(scale, learned):
    calls = []
    x = torch.randn(B, C, 4, 4)
    ctx, null = torch.full((B, L, D), 3.0), torch.ones(1, L, D)
    f = cfg_model(_const_model(calls, 2 * C if learned else C), ctx, null, scale)
    out = f(x, torch.tensor(0.37))  # fractional timesteps pass through unchanged
    torch.testing.assert_close(out[:, :C], torch.full_like(x, 1.0 + scale * (3.0 - 1.0)))
    if learned:  # only the mean is guided; the variance comes from the conditional pass (GLIDE)
        torch.testing.assert_close(out[:, C:], torch.full_like(x, -0.25))
    assert len(calls) == 1
    n, c, t = calls[0]
    assert torch.all(t == torch.tensor(0.37))
    if scale == 1.0:
        assert n == B and torch.equal(c, ctx)
    else:
        assert n == 2 * B and torch.equal(c[:B], null.expand(B, L, D)) and torch.equal(c[B:], ctx)


def test_guidance_needs_null_context(schedule):
    noise, ctx, _ = _inputs()
    with pytest.raises(ValueError, match="null_context"):
        run_sampler("ddpm", _model(), noise, ctx, None, schedule, 2, guidance_scale=2.0)


@pytest.mark.parametrize("ptype", ["epsilon", "v_prediction", "sample"])
def test_oracle_recovers_single_point(schedule, ptype):
    """With the exact denoiser of a one-point data set, every respaced chain lands on the point."""
    x0_star = torch.linspace(-1, 1, C * 16).view(1, C, 4, 4).repeat(B, 1, 1, 1)
    ab = schedule.alphas_cumprod

    def oracle(x_t, t, c):
        a = ab[t].view(-1, 1, 1, 1).float()
        eps = (x_t - a.sqrt() * x0_star) / (1 - a).sqrt()
        return {"epsilon": eps, "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * x0_star, "sample": x0_star}[ptype]

    noise, ctx, null = _inputs(3)
    out = run_sampler("ddpm", oracle, noise, ctx, null, schedule, 10, prediction_type=ptype,
                      generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, x0_star, atol=1e-4, rtol=0)


def test_progress_and_callback(schedule):
    noise, ctx, null = _inputs()
    seen = []
    out = run_sampler("ddpm", _model(), noise, ctx, null, schedule, 5, progress=True, callback=lambda i, x: seen.append(i))
    assert seen == list(range(5)) and torch.isfinite(out).all()


def test_epsilon_at_zero_terminal_snr_is_rejected():
    from ldm_train.diffusion.schedule import NoiseSchedule

    betas = torch.linspace(1e-3, 0.05, 10, dtype=torch.float64)
    betas[-1] = 1.0  # ᾱ_{T-1} = 0
    schedule = NoiseSchedule.from_betas(betas)
    noise, ctx, null = _inputs()
    with pytest.raises(ValueError, match="zero terminal SNR"):
        run_sampler("ddpm", _model(), noise, ctx, null, schedule)
    out = run_sampler("ddpm", _model(), noise, ctx, null, schedule, prediction_type="v_prediction",
                      generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out).all()
