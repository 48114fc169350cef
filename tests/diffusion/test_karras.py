"""Karras et al. (2022) samplers and DPM-Solver++(2M) on an analytic Gaussian, plus the σ grid.

Data x_0 ~ N(μ, s² I) in 2-D. Its exact denoiser is D(x, σ) = (s² x + σ² μ) / (s² + σ²), and the
probability-flow ODE dx/dσ = (x - D)/σ (EDM eq. 3) has the closed-form solution
x(σ) = μ + (x(σ_max) - μ) sqrt(s² + σ²) / sqrt(s² + σ_max²).
"""
import math

import pytest
import torch

from ldm_train.config import DiffusionConfig
from ldm_train.diffusion import build_schedule
from ldm_train.diffusion.parameterization import discrete_sigmas, sigma_to_t
from ldm_train.diffusion.parameterization import sigma_denoiser as x0_denoiser
from ldm_train.diffusion.samplers.karras import karras_sigmas, sample_dpmpp_2m, sample_euler, sample_heun
from sampling_helpers import run as run_sampler

MU = torch.tensor([1.0, -0.5], dtype=torch.float64)
S = 0.5
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0


def D_exact(x, sigma):
    sigma = float(sigma)
    return (S**2 * x + sigma**2 * MU) / (S**2 + sigma**2)


def ode_exact(x_start, sigma_start, sigma):
    return MU + (x_start - MU) * math.sqrt(S**2 + sigma**2) / math.sqrt(S**2 + sigma_start**2)


def _start(n, seed=0):
    """Exact marginal at σ_max: x = μ + sqrt(s² + σ_max²) ε (float64)."""
    g = torch.Generator().manual_seed(seed)
    return MU + math.sqrt(S**2 + SIGMA_MAX**2) * torch.randn(n, 2, generator=g, dtype=torch.float64)


def test_karras_sigmas_eq5():
    s = karras_sigmas(10, SIGMA_MIN, SIGMA_MAX, rho=7.0)
    assert s.shape == (11,) and s.dtype == torch.float64 and s[-1] == 0
    assert s[0].item() == pytest.approx(SIGMA_MAX) and s[-2].item() == pytest.approx(SIGMA_MIN)
    assert torch.all(s[:-1] > s[1:])
    i = torch.arange(10, dtype=torch.float64)
    ref = (SIGMA_MAX ** (1 / 7) + i / 9 * (SIGMA_MIN ** (1 / 7) - SIGMA_MAX ** (1 / 7))) ** 7  # EDM eq. 5
    torch.testing.assert_close(s[:-1], ref)
    assert karras_sigmas(1, 0.1, 5.0).tolist() == pytest.approx([5.0, 0.0])
    with pytest.raises(ValueError):
        karras_sigmas(0, 0.1, 1.0)


def test_sigma_to_t_interpolates_log_sigma():
    sig = discrete_sigmas(build_schedule(DiffusionConfig()))
    t = sigma_to_t(sig[[0, 17, 999]], sig)
    torch.testing.assert_close(t, torch.tensor([0.0, 17.0, 999.0], dtype=torch.float64))
    mid = (sig[40].log() + sig[41].log()).div(2).exp()  # halfway in log σ -> t = 40.5
    assert float(sigma_to_t(mid.view(1), sig)) == pytest.approx(40.5)
    assert float(sigma_to_t(mid.view(1), sig, quantize=True)) in (40.0, 41.0)
    assert float(sigma_to_t(torch.tensor([1e-6]), sig)) == 0.0 and float(sigma_to_t(torch.tensor([1e6]), sig)) == 999


def _final_error(sampler, n):
    x_T = _start(256)
    sigmas = karras_sigmas(n, SIGMA_MIN, SIGMA_MAX)[:-1]  # stop at σ_min: compare with the exact ODE there
    out = sampler(D_exact, x_T.clone(), sigmas)
    return float((out - ode_exact(x_T, SIGMA_MAX, SIGMA_MIN)).abs().max())


def _slope(sampler, ns):
    errs = [_final_error(sampler, n) for n in ns]
    logs = [(math.log(n), math.log(e)) for n, e in zip(ns, errs)]
    return -(logs[-1][1] - logs[0][1]) / (logs[-1][0] - logs[0][0]), errs


def test_order_of_convergence():
    """Deterministic samplers against the exact PF-ODE: error ∝ N^-1 (Euler) vs N^-2 (Heun, DPM++(2M))."""
    ns = [16, 32, 64]
    p_euler, e_euler = _slope(sample_euler, ns)
    p_heun, e_heun = _slope(sample_heun, ns)
    p_dpm, e_dpm = _slope(sample_dpmpp_2m, ns)
    assert 0.8 < p_euler < 1.3, (p_euler, e_euler)
    assert 1.7 < p_heun < 2.5, (p_heun, e_heun)
    assert 1.7 < p_dpm < 2.6, (p_dpm, e_dpm)
    assert e_heun[-1] < e_euler[-1] / 10 and e_dpm[-1] < e_euler[-1] / 10


@pytest.mark.parametrize("sampler,n,churn", [
    (sample_euler, 200, 0.0), (sample_heun, 40, 0.0), (sample_dpmpp_2m, 40, 0.0),
    # with churn (EDM Alg. 2 stochastic) Euler converges slowly: variance 0.20 at N=100, 0.235 at N=400
    (sample_euler, 800, 40.0), (sample_heun, 120, 12.0)])
def test_moments_converge(sampler, n, churn):
    """Final samples have mean μ and variance s² (20 000 samples, fixed seeds)."""
    x_T = _start(20000, seed=1)
    sigmas = karras_sigmas(n, SIGMA_MIN, SIGMA_MAX)
    kw = {} if sampler is sample_dpmpp_2m else dict(generator=torch.Generator().manual_seed(2), s_churn=churn)
    out = sampler(D_exact, x_T, sigmas, **kw)
    # standard errors: mean s/sqrt(N) = 0.0035, variance s² sqrt(2/N) = 0.0025
    torch.testing.assert_close(out.mean(0), MU, atol=0.015, rtol=0)
    torch.testing.assert_close(out.var(0), torch.full((2,), S**2, dtype=torch.float64), atol=0.012, rtol=0)


def test_few_steps_error_falls_with_steps():
    """The variance error of deterministic Euler shrinks as N grows (first order)."""
    x_T = _start(4000, seed=3)
    errs = []
    for n in (4, 8, 16, 32):
        out = sample_euler(D_exact, x_T.clone(), karras_sigmas(n, SIGMA_MIN, SIGMA_MAX))
        errs.append(float((out.var(0) - ode_exact(x_T, SIGMA_MAX, 0.0).var(0)).abs().max()))
    assert all(a > b for a, b in zip(errs, errs[1:])), errs


@pytest.mark.parametrize("sampler", [sample_euler, sample_heun])
def test_churn_determinism(sampler):
    x_T = _start(8).float()
    sigmas = karras_sigmas(6, SIGMA_MIN, SIGMA_MAX)

    def run(seed, churn):
        return sampler(D_exact_f32, x_T.clone(), sigmas, generator=torch.Generator().manual_seed(seed), s_churn=churn)
    a, b, c = run(1, 10.0), run(1, 10.0), run(2, 10.0)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(run(1, 0.0), run(2, 0.0))  # no churn: the generator is unused
    # churn limited to [s_tmin, s_tmax]: an empty window is the deterministic sampler
    empty = sampler(D_exact_f32, x_T.clone(), sigmas, generator=torch.Generator().manual_seed(1), s_churn=10.0,
                    s_tmin=1e3, s_tmax=1e4)
    assert torch.equal(empty, run(1, 0.0))


def D_exact_f32(x, sigma):
    return D_exact(x.double(), sigma).to(x.dtype)


def test_heun_evaluation_count():
    calls = []

    def D(x, sigma):
        calls.append(sigma)
        return D_exact(x, sigma)
    sample_heun(D, _start(4), karras_sigmas(5, SIGMA_MIN, SIGMA_MAX))
    assert len(calls) == 2 * 5 - 1 and calls[-1] == pytest.approx(SIGMA_MIN)


@pytest.mark.parametrize("sampler", ["euler", "heun", "dpmpp_2m"])
@pytest.mark.parametrize("ptype", ["epsilon", "v_prediction"])
def test_network_wrapper_recovers_single_point(sampler, ptype):
    """karras_sample (cfg_model + x0_denoiser) with the exact network for a one-point data set."""
    schedule = build_schedule(DiffusionConfig())
    x0_star = torch.linspace(-1, 1, 2 * 4 * 4).view(1, 2, 4, 4).repeat(2, 1, 1, 1)

    def oracle(x_t, t, c):
        # network at fractional t: interpolate ᾱ in log σ like x0_denoiser does (exactness not needed:
        # for a one-point data set any consistent σ gives x̂_0 = x0_star)
        sig = discrete_sigmas(schedule)
        lo = t.floor().long().clamp(max=998)
        w = (t - lo).double()
        s = ((1 - w) * sig[lo].log() + w * sig[lo + 1].log()).exp().view(-1, 1, 1, 1)
        a = (1 / (1 + s**2)).float()
        x0 = x0_star[:1]  # broadcasts over the doubled (guided) batch
        eps = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
        return eps if ptype == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0

    noise = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    ctx = torch.randn(2, 3, 4)
    out = run_sampler(sampler, oracle, noise, ctx, torch.zeros(3, 4), schedule, 8, guidance_scale=3.0,
                      prediction_type=ptype)
    torch.testing.assert_close(out, x0_star, atol=1e-4, rtol=0)


def test_x0_denoiser_sample_prediction_and_errors():
    schedule = build_schedule(DiffusionConfig())
    D = x0_denoiser(lambda x_t, t: torch.full_like(x_t, 2.0), schedule, "sample")
    assert torch.equal(D(torch.zeros(1, 1, 2, 2), 3.0), torch.full((1, 1, 2, 2), 2.0))
    with pytest.raises(ValueError):
        x0_denoiser(lambda x_t, t: x_t, schedule, "bogus")
    with pytest.raises(ValueError):
        run_sampler("bogus", lambda x, t, c: x, torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 1), None, schedule, 2)
