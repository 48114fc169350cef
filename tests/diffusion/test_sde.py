"""Unit tests of the forward SDEs, the PF-ODE / predictor-corrector samplers and annealed Langevin."""
from __future__ import annotations

import pytest
import torch

from ldm_train.diffusion.parameterization import SDEScore
from ldm_train.diffusion.samplers.langevin import sample_annealed_langevin
from ldm_train.diffusion.samplers.sde import sample_pc, sample_pf_ode, sde_grid
from ldm_train.diffusion.sdes import VESDE, SubVPSDE, VPSDE, tweedie_denoise

from analytic import Counter, GaussianMixture, as_vp_score

F64 = torch.float64
SDES = {"vp": VPSDE(), "subvp": SubVPSDE(), "ve": VESDE()}


def gen(seed):
    return torch.Generator().manual_seed(seed)


def test_closed_form_marginals():
    t = torch.linspace(0.01, 1, 7, dtype=F64)
    m, s = SDES["vp"].marginal(t)
    torch.testing.assert_close(m**2 + s**2, torch.ones_like(t))  # variance preserving
    m2, s2 = SDES["subvp"].marginal(t)
    torch.testing.assert_close(m2, m)
    torch.testing.assert_close(s2, 1 - m**2)  # sub-VP std <= VP std
    assert (s2 <= s).all()
    m3, s3 = SDES["ve"].marginal(t)
    torch.testing.assert_close(s3, 0.01 * 5000.0**t)
    assert float(SDES["ve"].sigma(1.0)) == pytest.approx(50.0)
    torch.testing.assert_close(SDES["vp"].sigma(t), s / m)


@pytest.mark.parametrize("name", list(SDES))
def test_marginal_solves_the_moment_odes(name):
    """For dx = f(t) x dt + g(t) dw: d m/dt = f m and d std²/dt = 2 f std² + g² (Särkkä & Solin
    eq. 5.50-5.51), checked by central differences (VE: d σ²/dt = g² with the σ_min convention)."""
    sde, h = SDES[name], 1e-6
    one = torch.ones(1, 1, dtype=F64)
    for t in (0.05, 0.3, 0.8):
        f, g = sde.sde(one, torch.tensor([t], dtype=F64))
        f, g = float(f), float(g)
        (m_hi, s_hi), (m_lo, s_lo), (m, s) = sde.marginal(t + h), sde.marginal(t - h), sde.marginal(t)
        assert float(m_hi - m_lo) / (2 * h) == pytest.approx(f * float(m), rel=1e-6, abs=1e-9)
        assert float(s_hi**2 - s_lo**2) / (2 * h) == pytest.approx(2 * f * float(s) ** 2 + g**2, rel=1e-6)


@pytest.mark.parametrize("name", list(SDES))
def test_discretisation_matches_marginal_to_first_order(name):
    """One forward chain step (f_i, G_i) over dt reproduces the marginal's variance growth."""
    sde, dt = SDES[name], 1e-4
    one = torch.ones(1, 1, dtype=F64)
    for t in (0.2, 0.7):
        f, G = sde.discretize(one, torch.tensor([t], dtype=F64), dt)
        m0, s0 = sde.marginal(t - dt)
        m1, s1 = sde.marginal(t)
        # var(x_t) = (1 + f_i)² var(x_{t-dt}) + G_i²; mean scales by (1 + f_i)
        assert float((1 + f) * m0) == pytest.approx(float(m1), rel=1e-6)
        assert float((1 + f) ** 2 * s0**2 + G**2) == pytest.approx(float(s1**2), rel=1e-4)


def test_prior_sample():
    x = SDES["ve"].prior_sample((20_000, 2), gen(0), dtype=F64)
    assert float(x.std()) == pytest.approx(50.0, rel=0.02)
    y = SDES["vp"].prior_sample((3, 2), gen(0), dtype=F64)
    torch.testing.assert_close(y, torch.randn(3, 2, generator=gen(0), dtype=F64) * float(SDES["vp"].marginal(1.0)[1]))


GMM = GaussianMixture(torch.tensor([0.5, 0.5], dtype=F64), torch.tensor([[-1.0, 0.0], [1.0, 0.5]], dtype=F64),
                      torch.eye(2, dtype=F64).repeat(2, 1, 1) * 0.2)


@pytest.mark.parametrize("name", list(SDES))
def test_sampler_nfe_and_determinism(name):
    sde = SDES[name]
    x_T = sde.prior_sample((16, 2), gen(1), dtype=F64)
    for method, per_step in (("euler", 1), ("heun", 2)):
        c = Counter(as_vp_score(GMM, sde))
        a = sample_pf_ode(SDEScore(c, sde), x_T, sde_grid(sde, 7), method=method, final_denoise=True)
        assert c.calls == 7 * per_step + 1
        torch.testing.assert_close(sample_pf_ode(SDEScore(c, sde), x_T, sde_grid(sde, 7), method=method,
                                                 final_denoise=True), a, rtol=0, atol=0)
    for predictor in ("reverse_diffusion", "euler_maruyama"):
        c = Counter(as_vp_score(GMM, sde))
        a = sample_pc(SDEScore(c, sde), x_T, sde_grid(sde, 5), generator=gen(2), predictor=predictor,
                      corrector="langevin", n_corrector=2)
        assert c.calls == 5 * 3 + 1
        b = sample_pc(SDEScore(c, sde), x_T, sde_grid(sde, 5), generator=gen(2), predictor=predictor,
                      corrector="langevin", n_corrector=2)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        c.calls = 0
        sample_pc(SDEScore(c, sde), x_T, sde_grid(sde, 5), generator=gen(2), predictor=predictor, corrector="none",
                  final_denoise=False)
        assert c.calls == 5
    with pytest.raises(ValueError):
        sample_pc(SDEScore(c, sde), x_T, sde_grid(sde, 5), predictor="ancestral")
    with pytest.raises(ValueError):
        sample_pf_ode(SDEScore(c, sde), x_T, sde_grid(sde, 5), method="rk4")


def test_tweedie_step_is_the_exact_denoiser():
    sde = SDES["vp"]
    x = torch.randn(10, 2, generator=gen(3), dtype=F64)
    m, s = sde.marginal(0.3)
    torch.testing.assert_close(tweedie_denoise(as_vp_score(GMM, sde), sde, x, 0.3), GMM.denoise(x / m, s / m))


def test_annealed_langevin_rejects_ascending_sigmas():
    with pytest.raises(ValueError):
        sample_annealed_langevin(GMM.score, torch.zeros(2, 2, dtype=F64), torch.tensor([0.1, 1.0], dtype=F64),
                                 steps_per_sigma=1, step_lr=1e-3)


def test_langevin_reaches_the_discrete_chains_stationary_variance():
    """Target N(0, v I): x' = (1 - α/(2v)) x + sqrt(α) z has stationary variance α / (1 - (1 - α/(2v))²)
    (Alg. 1's update with the exact score -x/v); 20000 chains, 4 standard errors. NFE = L·T + 1."""
    v, sigma, lr = 0.5, 0.5, 0.05
    score = Counter(lambda x, s: -x / (v + 0 * s))
    x = sample_annealed_langevin(score, torch.zeros(20_000, 1, dtype=F64), torch.tensor([sigma], dtype=F64),
                                 generator=gen(4), steps_per_sigma=300, step_lr=lr, final_denoise=False)
    assert score.calls == 300
    alpha = lr  # α = ε σ²/σ_L² = ε for a single level
    rho = 1 - alpha / (2 * v)
    expected = alpha / (1 - rho**2)
    se = expected * (2 / x.shape[0]) ** 0.5
    assert abs(float(x.var()) - expected) <= 4 * se
