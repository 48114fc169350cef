"""Unit tests of the closed-form Gaussian-mixture denoiser, its adapters and the sliced W2 distance."""
from __future__ import annotations

import pytest
import torch

from ldm_train.diffusion import NoiseSchedule, make_betas
from ldm_train.diffusion.sdes import VESDE, SubVPSDE, VPSDE

from analytic import GaussianMixture, as_discrete_model, as_vp_score, sliced_wasserstein

F64 = torch.float64


def mixture() -> GaussianMixture:
    return GaussianMixture(
        torch.tensor([0.6, 0.4], dtype=F64),
        torch.tensor([[-1.0, 0.5], [1.5, -0.5]], dtype=F64),
        torch.tensor([[[0.4, 0.1], [0.1, 0.2]], [[0.2, -0.05], [-0.05, 0.3]]], dtype=F64),
    )


def test_rejects_bad_parameters():
    with pytest.raises(ValueError):
        GaussianMixture(torch.tensor([0.5, 0.6]), torch.zeros(2, 2), torch.eye(2).repeat(2, 1, 1))
    with pytest.raises(ValueError):
        GaussianMixture(torch.tensor([1.0]), torch.zeros(1, 2), torch.eye(3)[None])
    with pytest.raises(ValueError):
        mixture().denoise(torch.zeros(4, 3), 1.0)


def test_sample_moments():
    """Mixture mean Σ π_k μ_k and covariance Σ π_k (Σ_k + μ_k μ_kᵀ) - m mᵀ within 4 standard errors."""
    g = mixture()
    x, k = g.sample(40_000, torch.Generator().manual_seed(0), return_labels=True)
    m = (g.weights[:, None] * g.means).sum(0)
    cov = (g.weights[:, None, None] * (g.covs + g.means[:, :, None] * g.means[:, None, :])).sum(0) - m[:, None] * m
    se = (torch.diagonal(cov) / x.shape[0]).sqrt()
    assert ((x.mean(0) - m).abs() <= 4 * se).all()
    se_c = ((torch.diagonal(cov)[:, None] * torch.diagonal(cov)[None] + cov**2) / x.shape[0]).sqrt()
    assert ((torch.cov(x.T) - cov).abs() <= 4 * se_c).all()
    counts = torch.bincount(k, minlength=2) / x.shape[0]
    assert ((counts - g.weights).abs() <= 4 * (g.weights * (1 - g.weights) / x.shape[0]).sqrt()).all()


def test_single_gaussian_denoiser_is_linear_conditioning():
    mu, cov = torch.tensor([[0.3, -1.0]], dtype=F64), torch.tensor([[[0.5, 0.2], [0.2, 0.3]]], dtype=F64)
    g = GaussianMixture(torch.ones(1, dtype=F64), mu, cov)
    x = torch.randn(10, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    for sigma in (0.1, 1.0, 10.0):
        expected = mu + (x - mu) @ torch.linalg.solve(cov[0] + sigma**2 * torch.eye(2, dtype=F64), cov[0]).T
        torch.testing.assert_close(g.denoise(x, sigma), expected)


def test_denoiser_limits_and_per_sample_sigma():
    g = mixture()
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(2), dtype=F64)
    torch.testing.assert_close(g.denoise(x, 1e-6), x, rtol=0, atol=1e-9)  # σ → 0: D(x) → x
    far = g.denoise(x, 1e4)
    torch.testing.assert_close(far, (g.weights[:, None] * g.means).sum(0).expand_as(far), rtol=0, atol=1e-6)
    sig = torch.linspace(0.1, 4.0, 8, dtype=F64)
    looped = torch.stack([g.denoise(x[i:i + 1], float(sig[i]))[0] for i in range(8)])
    torch.testing.assert_close(g.denoise(x, sig), looped)
    assert g.denoise(x.float(), 0.5).dtype == torch.float32


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_discrete_model_matches_tweedie(prediction_type):
    """ε̂(x_t) = -sqrt(1-ᾱ_t) ∇ log q(x_t) with q(x_t) = ᾱ^{-D/2} p_σ(x_t / sqrt(ᾱ)) (Tweedie; autograd)."""
    g = mixture()
    sched = NoiseSchedule.from_betas(make_betas("linear", 1000))
    t = torch.tensor([0, 50, 300, 700, 999])
    a = sched.alphas_cumprod[t].view(-1, 1)
    xt = torch.randn(5, 2, generator=torch.Generator().manual_seed(3), dtype=F64).requires_grad_(True)
    sigma = ((1 - a) / a).sqrt().view(-1)
    (grad,) = torch.autograd.grad(g.log_prob(xt / a.sqrt(), sigma).sum(), xt)
    eps = -(1 - a).sqrt() * grad
    out = as_discrete_model(g, sched, prediction_type)(xt.detach(), t, None)
    x0 = (xt.detach() - (1 - a).sqrt() * eps) / a.sqrt()
    expected = {"epsilon": eps, "sample": x0, "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * x0}[prediction_type]
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-8)
    with pytest.raises(ValueError):
        as_discrete_model(g, sched, "x0")


@pytest.mark.parametrize("sde", [VPSDE(), SubVPSDE(), VESDE()], ids=["vp", "subvp", "ve"])
def test_vp_score_is_gradient_of_marginal_log_density(sde):
    g = mixture()
    t = torch.tensor([1e-3, 0.1, 0.5, 0.9], dtype=F64)
    m, s = sde.marginal(t)
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(4), dtype=F64).requires_grad_(True)
    logp = g.log_prob(x / m[:, None], s / m) - 2 * torch.log(m)  # change of variables x = m y
    (grad,) = torch.autograd.grad(logp.sum(), x)
    torch.testing.assert_close(as_vp_score(g, sde)(x.detach(), t), grad, rtol=1e-6, atol=1e-8)


def test_sliced_wasserstein():
    a = torch.randn(500, 3, generator=torch.Generator().manual_seed(5), dtype=F64)
    assert sliced_wasserstein(a, a) == 0.0
    # a translation by c moves every sorted projection by θ·c: SW = mean_θ |θ·c|
    c = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    theta = torch.randn(3, 64, generator=torch.Generator().manual_seed(9), dtype=F64)
    theta = theta / theta.norm(dim=0, keepdim=True)
    expected = float((c @ theta).abs().mean())
    got = sliced_wasserstein(a, a + c, 64, torch.Generator().manual_seed(9))
    assert got == pytest.approx(expected, rel=1e-9)
    # 1-D: the exact W2 between the empirical measures
    u, v = a[:, :1], 2 * a[:, 1:2]
    exact = float((u.sort(0).values - v.sort(0).values).pow(2).mean().sqrt())
    assert sliced_wasserstein(u, v, 4) == pytest.approx(exact, rel=1e-9)
    with pytest.raises(ValueError):
        sliced_wasserstein(a, a[:10])
