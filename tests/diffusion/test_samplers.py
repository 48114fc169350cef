import pytest
import torch
from diffusers import DDIMScheduler

from ldm_train.config import DiffusionConfig
from ldm_train.diffusion import build_schedule
from ldm_train.diffusion.guidance import guided
from ldm_train.diffusion.parameterization import predict
from ldm_train.diffusion.samplers.discrete import ddim_timesteps
from sampling_helpers import run as run_sampler

CFG = DiffusionConfig()  # scaled_linear 0.00085..0.012, T=1000 (Stable Diffusion)
B, L, D = 2, 3, 4


@pytest.fixture(scope="module")
def schedule():
    return build_schedule(CFG)


def _hf(spacing="leading", set_alpha_to_one=True, prediction_type="epsilon"):
    return DDIMScheduler(num_train_timesteps=CFG.num_train_timesteps, beta_schedule=CFG.beta_schedule,
                         beta_start=CFG.beta_start, beta_end=CFG.beta_end, clip_sample=False,
                         set_alpha_to_one=set_alpha_to_one, steps_offset=1, timestep_spacing=spacing,
                         prediction_type=prediction_type)


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("steps", [1, 7, 10, 50, 250])
def test_timesteps_match_diffusers(spacing, steps):
    hf = _hf(spacing)
    hf.set_timesteps(steps)
    ts = ddim_timesteps(1000, steps, spacing)
    assert ts.dtype == torch.int64
    assert torch.equal(ts, hf.timesteps)


def test_timesteps_reject_out_of_range():
    with pytest.raises(ValueError):
        ddim_timesteps(1000, 1000, "leading")  # offset 1 would reach t=1000
    with pytest.raises(ValueError):
        ddim_timesteps(1000, 1001, "trailing")
    assert ddim_timesteps(1000, 1000, "trailing")[-1] == 0


def _conv_denoiser():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 4, 3, padding=1)
    torch.nn.init.normal_(conv.weight, std=0.05)

    def denoiser(x, t, c):
        return conv(x) + 0.01 * t.view(-1, 1, 1, 1) / 1000 + 0.1 * c.mean(dim=(1, 2)).view(-1, 1, 1, 1)
    return denoiser


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 4, 8, 8, generator=g), torch.randn(B, L, D, generator=g), torch.zeros(L, D)


def _hf_loop(hf, denoiser, noise, ctx, steps, eta=0.0, generator=None):
    hf.set_timesteps(steps)
    x = noise
    with torch.no_grad():
        for t in hf.timesteps:
            out = denoiser(x, t.expand(x.shape[0]), ctx)
            x = hf.step(out, t, x, eta=eta, generator=generator).prev_sample
    return x


@pytest.mark.parametrize("spacing,alpha_one,ptype,steps", [
    ("leading", True, "epsilon", 10), ("leading", False, "epsilon", 50), ("trailing", True, "epsilon", 20),
    ("leading", True, "v_prediction", 10)])
def test_ddim_matches_diffusers_loop(schedule, spacing, alpha_one, ptype, steps):
    den = _conv_denoiser()
    noise, ctx, null = _inputs()
    ours = run_sampler("ddim", den, noise, ctx, null, schedule, steps, prediction_type=ptype, spacing=spacing,
                       set_alpha_to_one=alpha_one)
    ref = _hf_loop(_hf(spacing, alpha_one, ptype), den, noise, ctx, steps)
    assert ours.shape == noise.shape and ours.dtype == noise.dtype
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_ddim_eta1_matches_diffusers_with_same_generator(schedule):
    den = _conv_denoiser()
    noise, ctx, null = _inputs()
    ours = run_sampler("ddim", den, noise, ctx, null, schedule, 10, eta=1.0, generator=torch.Generator().manual_seed(5))
    ref = _hf_loop(_hf(), den, noise, ctx, 10, eta=1.0, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_determinism(schedule, eta):
    den = _conv_denoiser()
    noise, ctx, null = _inputs()

    def run(seed):
        return run_sampler("ddim", den, noise, ctx, null, schedule, 8, eta=eta, guidance_scale=2.0,
                           generator=torch.Generator().manual_seed(seed))

    a, b, c = run(1), run(1), run(2)
    assert torch.equal(a, b)
    assert torch.equal(a, c) == (eta == 0.0)  # eta=0 ignores the generator


def test_oracle_recovers_single_point_exactly(schedule):
    x0_star = torch.linspace(-1, 1, 4 * 8 * 8).view(1, 4, 8, 8).repeat(B, 1, 1, 1)
    ac = schedule.alphas_cumprod

    def oracle(x_t, t, c):
        a = ac[t].view(-1, 1, 1, 1).float()
        return (x_t - a.sqrt() * x0_star) / (1 - a).sqrt()

    noise, ctx, null = _inputs(3)
    out = run_sampler("ddim", oracle, noise, ctx, null, schedule, 10)
    torch.testing.assert_close(out, x0_star, atol=1e-4, rtol=0)


def _const_denoiser(calls):
    """Outputs 1 for the null context (all ones) and 3 for the real one (all threes)."""
    def denoiser(x, t, c):
        calls.append((x.shape[0], c.clone()))
        return c.mean(dim=(1, 2)).view(-1, 1, 1, 1).expand_as(x).clone()
    return denoiser


@pytest.mark.parametrize("scale", [0.0, 1.0, 2.5, 7.5])
@pytest.mark.parametrize("ptype", ["epsilon", "v_prediction"])
def test_guidance_combination(schedule, scale, ptype):
    calls = []
    x = torch.randn(B, 4, 8, 8)
    t = torch.full((B,), 500)
    ctx, null = torch.full((B, L, D), 3.0), torch.ones(1, L, D)
    _, eps = predict(schedule, guided(_const_denoiser(calls), ctx, null, scale)(x, t), x, t, ptype)
    _, eps_u = predict(schedule, torch.ones_like(x), x, t, ptype)
    _, eps_c = predict(schedule, torch.full_like(x, 3.0), x, t, ptype)
    torch.testing.assert_close(eps, eps_u + scale * (eps_c - eps_u))
    assert len(calls) == 1
    n, c = calls[0]
    if scale == 1.0:
        assert n == B and torch.equal(c, ctx)  # conditional pass only
    else:
        assert n == 2 * B and torch.equal(c[:B], null.expand(B, L, D)) and torch.equal(c[B:], ctx)


def test_sampler_calls_denoiser_once_per_step(schedule):
    calls = []
    noise = torch.randn(B, 4, 8, 8)
    out = run_sampler("ddim", _const_denoiser(calls), noise, torch.full((B, L, D), 3.0), torch.ones(L, D), schedule,
                      6, guidance_scale=3.0, progress=True)
    assert out.shape == noise.shape and torch.isfinite(out).all()
    assert len(calls) == 6 and all(n == 2 * B for n, _ in calls)


def test_guidance_needs_null_context(schedule):
    noise, ctx, _ = _inputs()
    with pytest.raises(ValueError, match="null_context"):
        run_sampler("ddim", _conv_denoiser(), noise, ctx, None, schedule, 2, guidance_scale=2.0)
    assert run_sampler("ddim", _conv_denoiser(), noise, ctx, None, schedule, 2).shape == noise.shape


def test_quadratic_spacing_is_ddims_formula():
    """DDIM App. D.2: tau_i = floor((sqrt(0.8 T) * i / (S - 1))^2), sampled in descending order."""
    import math

    ts = ddim_timesteps(1000, 10, "quadratic")
    expected = [math.floor((math.sqrt(800) * i / 9) ** 2) for i in range(10)][::-1]
    assert ts.tolist() == expected
    dense = ddim_timesteps(1000, 900, "quadratic")
    assert (dense[:-1] > dense[1:]).all() and int(dense.max()) <= 999


def test_ddim_zero_terminal_snr_v_prediction_matches_diffusers():
    """Lin et al. 2024's recipe: zero terminal SNR, v prediction, trailing spacing; every step too."""
    zsnr = build_schedule(CFG.model_copy(update={"rescale_betas_zero_snr": True, "prediction_type": "v_prediction"}))
    hf = DDIMScheduler(num_train_timesteps=CFG.num_train_timesteps, beta_schedule=CFG.beta_schedule,
                       beta_start=CFG.beta_start, beta_end=CFG.beta_end, clip_sample=False, set_alpha_to_one=True,
                       timestep_spacing="trailing", prediction_type="v_prediction", rescale_betas_zero_snr=True)
    den = _conv_denoiser()
    noise, ctx, null = _inputs()
    ours_steps, ref_steps = [], []
    ours = run_sampler("ddim", den, noise, ctx, null, zsnr, 10, prediction_type="v_prediction", spacing="trailing",
                       callback=lambda i, x: ours_steps.append(x.clone()))
    hf.set_timesteps(10)
    x = noise
    with torch.no_grad():
        for t in hf.timesteps:
            x = hf.step(den(x, t.expand(x.shape[0]), ctx), t, x).prev_sample
            ref_steps.append(x.clone())
    assert torch.isfinite(ours).all()
    for a, b in zip(ours_steps, ref_steps):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
