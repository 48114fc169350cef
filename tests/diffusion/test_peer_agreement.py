"""Peer agreement with diffusers: the same model outputs give the same trajectory, step by step.

A deterministic fake network (a fixed seeded linear map of x, t and the context) is called by both
our sampler and diffusers' scheduler loop; each intermediate sample is compared with a relative
error (||ours - ref|| / ||ref||) below 1e-5, and so is the set of timesteps the network sees.

Documented differences (tested on the part that matches):
- EulerDiscreteScheduler with churn evaluates the network at t(σ_i) and scales by σ_i although it
  denoises at σ̂_i = (1 + γ) σ_i; ours (like k-diffusion, EDM Alg. 2) uses σ̂_i. Compared with churn 0.
- DPMSolverMultistepScheduler rounds its Karras timesteps (``.round()``); ours interpolates unless
  ``x0_denoiser(..., quantize=True)``, which the comparison uses. DPM-Solver runs in VP coordinates
  (x_t); ours in VE coordinates (x = x_t sqrt(1 + σ²)); the comparison rescales.
- diffusers keeps its tables in float32; ours are float64 (the source of the ~1e-7 differences).
"""
import math

import pytest
import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

from ldm_train.config import DiffusionConfig
from ldm_train.diffusion import build_schedule
from ldm_train.diffusion.guidance import guided as cfg_model
from ldm_train.diffusion.parameterization import discrete_sigmas, to_x0_eps
from ldm_train.diffusion.parameterization import sigma_denoiser as x0_denoiser
from ldm_train.diffusion.samplers.discrete import ddpm_step
from ldm_train.diffusion.samplers.karras import karras_sigmas, sample_dpmpp_2m, sample_euler
from sampling_helpers import run as run_sampler
from ldm_train.diffusion.schedule import NoiseSchedule

CFG = DiffusionConfig()  # scaled_linear 0.00085..0.012, T = 1000
B, C, H, L, Dm = 2, 4, 4, 3, 4
HF_KW = dict(num_train_timesteps=CFG.num_train_timesteps, beta_schedule=CFG.beta_schedule,
             beta_start=CFG.beta_start, beta_end=CFG.beta_end)


def fake_model(out_channels=C, learned=False, seed=0):
    """out = W x + a t / 1000 + b mean(c): deterministic, depends on x, t (float ok) and context."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_channels, C, generator=g) * 0.1 + 0.8 * torch.eye(out_channels, C)  # ~ an ε-predictor
    a = torch.randn(out_channels, generator=g) * 0.1
    bias = torch.randn(out_channels, generator=g) * 0.1

    def model(x, t, c):
        t = torch.as_tensor(t, dtype=torch.float32).expand(x.shape[0])
        out = torch.einsum("oc,bchw->bohw", W, x) + (a.view(1, -1, 1, 1) * t.view(-1, 1, 1, 1) / 1000)
        out = out + bias.view(1, -1, 1, 1) * c.mean(dim=(1, 2)).view(-1, 1, 1, 1)
        if learned:  # second half is the variance interpolation v in [-1, 1]
            out = torch.cat([out[:, :C], torch.tanh(out[:, C:])], dim=1)
        return out
    return model


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, C, H, H, generator=g), torch.randn(B, L, Dm, generator=g)


def _schedule_from(hf) -> NoiseSchedule:
    """Our schedule object holding diffusers' own float32 tables (as float64), so a comparison tests
    the sampler's maths; our float64 tables differ from them by float32 rounding, which reaches
    ~1e-5 relative in σ_0 = sqrt((1 - ᾱ_0) / ᾱ_0) (cancellation in 1 - (1 - β_0))."""
    ours = build_schedule(CFG).alphas_cumprod
    if not hf.config.rescale_betas_zero_snr:
        torch.testing.assert_close(ours, hf.alphas_cumprod.double(), atol=2e-7, rtol=1e-5)
    return NoiseSchedule(hf.betas.double(), hf.alphas_cumprod.double(), CFG.num_train_timesteps)


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-12))


def _assert_traj(ours, ref, tol=1e-5):
    assert len(ours) == len(ref) and len(ref) > 0
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert _rel(a, b) < tol, f"step {i}: relative error {_rel(a, b):.2e}"


def _local_rescale_zero_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2024, Alg. 1 (used if schedule.rescale_zero_terminal_snr is not there yet)."""
    sqrt_ab = torch.cumprod(1 - betas, 0).sqrt()
    a0, aT = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - aT) * a0 / (a0 - aT)
    ab = sqrt_ab**2
    alphas = torch.cat([ab[:1], ab[1:] / ab[:-1]])
    return 1 - alphas


def _zero_snr_betas(betas):
    from ldm_train.diffusion import schedule as sched_mod

    fn = getattr(sched_mod, "rescale_zero_terminal_snr", None)
    if fn is not None:
        try:
            out = fn(betas)
            if isinstance(out, torch.Tensor) and out.shape == betas.shape:
                return out.to(torch.float64)
        except TypeError:
            pass
    return _local_rescale_zero_snr(betas)


# ---------------------------------------------------------------- DDPM
@pytest.mark.parametrize("ptype,variance,steps,zero_snr", [
    ("epsilon", "fixed_small", 25, False),
    ("v_prediction", "fixed_small", 25, False),
    ("epsilon", "fixed_small", None, False),  # all 1000 steps
    ("epsilon", "fixed_large", 10, False),
    ("epsilon", "learned_range", 10, False),
    ("v_prediction", "fixed_small", 25, True),
    ("v_prediction", "fixed_large", 1000, True),
    ("sample", "fixed_small", 25, False),
])
def test_ddpm_matches_diffusers(ptype, variance, steps, zero_snr):
    hf = DDPMScheduler(**HF_KW, clip_sample=False, prediction_type=ptype, variance_type=variance,
                       rescale_betas_zero_snr=zero_snr)
    hf.set_timesteps(steps or CFG.num_train_timesteps)
    schedule = _schedule_from(hf)
    if zero_snr:  # the rescale itself (ours or the local Lin et al. Alg. 1) against diffusers'
        ours_ab = torch.cumprod(1 - _zero_snr_betas(build_schedule(CFG).betas), 0)
        torch.testing.assert_close(ours_ab, hf.alphas_cumprod.double(), atol=1e-6, rtol=1e-5)
        assert ours_ab[-1] == 0 and hf.alphas_cumprod[-1] == 0
    model = fake_model(2 * C if variance == "learned_range" else C, learned=variance == "learned_range")
    noise, ctx = _inputs()

    seen, ours = [], []
    def spy(x, t, c):
        seen.append(t.clone())
        return model(x, t, c)
    run_sampler("ddpm", spy, noise, ctx, None, schedule, steps, prediction_type=ptype, variance=variance,
                generator=torch.Generator().manual_seed(7), callback=lambda i, x: ours.append(x.clone()))

    ref, x, g = [], noise, torch.Generator().manual_seed(7)
    with torch.no_grad():
        for t in hf.timesteps:
            out = model(x, t.expand(B), ctx)
            x = hf.step(out, t, x, generator=g).prev_sample
            ref.append(x)
    assert [int(t[0]) for t in seen] == hf.timesteps.tolist()
    # over all 1000 steps float32 rounding (different operation order) accumulates to ~1e-5;
    # the step-by-step check from identical inputs is test_ddpm_single_steps_match_diffusers
    _assert_traj(ours, ref, tol=1e-5 if (steps or CFG.num_train_timesteps) < 100 else 5e-5)


@pytest.mark.parametrize("ptype", ["epsilon", "v_prediction"])
def test_ddpm_single_steps_match_diffusers(ptype):
    """All 1000 steps, each from diffusers' own previous sample (no accumulation): 1e-5 relative."""
    hf = DDPMScheduler(**HF_KW, clip_sample=False, prediction_type=ptype)
    hf.set_timesteps(CFG.num_train_timesteps)
    table = _schedule_from(hf).alphas_cumprod.tolist()
    model = fake_model()
    x, ctx = _inputs(4)
    g_hf, g_ours = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    with torch.no_grad():
        for t in hf.timesteps:
            out = model(x, t.expand(B), ctx)
            ref = hf.step(out, t, x, generator=g_hf).prev_sample
            ab, ab_prev = table[int(t)], table[int(t) - 1] if t > 0 else 1.0
            z = torch.randn(x.shape, generator=g_ours) if t > 0 else None
            ours = ddpm_step(x, to_x0_eps(out, x, math.sqrt(ab), math.sqrt(1 - ab), ptype)[0], ab, ab_prev, "fixed_small", None, z)
            assert _rel(ours, ref) < 1e-5, f"t={int(t)}: {_rel(ours, ref):.2e}"
            x = ref


# ---------------------------------------------------------------- Euler (Karras sigmas)
def _hf_euler_loop(hf, model, x, ctx, steps):
    hf.set_timesteps(steps)
    x = x * hf.sigmas[0]
    ts, traj = [], []
    with torch.no_grad():
        for t in hf.timesteps:
            ts.append(float(t))
            out = model(hf.scale_model_input(x, t), t.expand(B), ctx)
            x = hf.step(out, t, x).prev_sample
            traj.append(x)
    return ts, traj


@pytest.mark.parametrize("ptype,steps,zero_snr", [
    ("epsilon", 8, False), ("epsilon", 30, False), ("v_prediction", 8, False), ("v_prediction", 30, False),
    ("v_prediction", 12, True)])
def test_euler_karras_matches_diffusers(ptype, steps, zero_snr):
    hf = EulerDiscreteScheduler(**HF_KW, prediction_type=ptype, use_karras_sigmas=True,
                                rescale_betas_zero_snr=zero_snr)
    if zero_snr:  # diffusers floors ᾱ_{T-1} = 0 at 2^-24 in place; ours does so in discrete_sigmas
        assert float(hf.alphas_cumprod[-1]) == 2.0**-24
        ac = hf.alphas_cumprod.double()
        ac[-1] = 0.0
        schedule = NoiseSchedule(hf.betas.double(), ac, CFG.num_train_timesteps)
        assert float(discrete_sigmas(schedule)[-1]) == pytest.approx(4096.0, rel=1e-6)
    else:
        schedule = _schedule_from(hf)
    sig = discrete_sigmas(schedule)
    sigmas = karras_sigmas(steps, float(sig[0]), float(sig[-1]))
    model = fake_model()
    noise, ctx = _inputs(1)
    ts, ref = _hf_euler_loop(hf, model, noise, ctx, steps)
    torch.testing.assert_close(sigmas.float(), hf.sigmas, rtol=1e-5, atol=0)

    seen, ours = [], []
    def spy(x, t, c):
        seen.append(float(t[0]))
        return model(x, t, c)
    D = x0_denoiser(cfg_model(spy, ctx, None), schedule, ptype)
    sample_euler(D, noise * float(sigmas[0]), sigmas, callback=lambda i, x: ours.append(x.clone()))
    assert seen == pytest.approx(ts, rel=1e-5, abs=1e-3)  # fractional t(σ) by log-σ interpolation
    _assert_traj(ours, ref)


def test_euler_karras_with_guidance_matches_diffusers_loop():
    """Classifier-free guidance through cfg_model equals guiding diffusers' loop by hand."""
    steps, scale = 10, 4.0
    hf = EulerDiscreteScheduler(**HF_KW, prediction_type="v_prediction", use_karras_sigmas=True)
    schedule = _schedule_from(hf)
    sig = discrete_sigmas(schedule)
    sigmas = karras_sigmas(steps, float(sig[0]), float(sig[-1]))
    model = fake_model()
    noise, ctx = _inputs(2)
    null = torch.zeros(L, Dm)

    def guided(x, t, c):
        u, k = model(x, t, null.expand(B, L, Dm)), model(x, t, c)
        return u + scale * (k - u)
    _, ref = _hf_euler_loop(hf, guided, noise, ctx, steps)
    ours = []
    D = x0_denoiser(cfg_model(model, ctx, null, scale), schedule, "v_prediction")
    sample_euler(D, noise * float(sigmas[0]), sigmas, callback=lambda i, x: ours.append(x.clone()))
    _assert_traj(ours, ref)


# ---------------------------------------------------------------- DPM-Solver++(2M)
@pytest.mark.parametrize("ptype", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps", [6, 20])
def test_dpmpp_2m_karras_matches_diffusers(ptype, steps):
    hf = DPMSolverMultistepScheduler(**HF_KW, prediction_type=ptype, algorithm_type="dpmsolver++",
                                     solver_order=2, use_karras_sigmas=True, final_sigmas_type="zero",
                                     lower_order_final=True)
    hf.set_timesteps(steps)
    schedule = _schedule_from(hf)
    sig = discrete_sigmas(schedule)
    sigmas = karras_sigmas(steps, float(sig[0]), float(sig[-1]))
    torch.testing.assert_close(sigmas.float(), hf.sigmas, rtol=1e-5, atol=0)
    model = fake_model()
    noise, ctx = _inputs(3)

    # diffusers works on x_t (VP); start from the same x_T = x(σ_max) / sqrt(1 + σ_max²)
    s_max = float(sigmas[0])
    x, ref, ts = noise * s_max / math.sqrt(1 + s_max**2), [], []
    with torch.no_grad():
        for t in hf.timesteps:
            ts.append(int(t))
            x = hf.step(model(x, t.expand(B), ctx), t, x).prev_sample
            ref.append(x)

    seen, ours = [], []
    def spy(x, t, c):
        seen.append(float(t[0]))
        return model(x, t, c)
    D = x0_denoiser(cfg_model(spy, ctx, None), schedule, ptype, quantize=True)
    # callback converts our VE sample at σ_{i+1} to VP: x_t = x / sqrt(1 + σ²)
    sample_dpmpp_2m(D, noise * s_max, sigmas,
                    callback=lambda i, x: ours.append(x / math.sqrt(1 + float(sigmas[i + 1]) ** 2)))
    assert seen == [float(t) for t in ts]
    _assert_traj(ours, ref)
