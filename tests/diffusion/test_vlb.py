"""Forward process, posterior q(x_{t-1}|x_t,x_0), learned variance and L_vlb against closed forms."""
import math

import pytest
import torch

from ldm_train.diffusion.schedule import NoiseSchedule, make_betas
from ldm_train.diffusion.losses.simple import hybrid_loss
from ldm_train.diffusion.losses.vlb import (
    discretized_gaussian_log_likelihood,
    model_log_variance,
    normal_kl,
    vlb_term,
)

KINDS = [("linear", 1e-4, 0.02, False), ("scaled_linear", 0.00085, 0.012, False), ("cosine", 1e-4, 0.02, False),
         ("scaled_linear", 0.00085, 0.012, True)]
IDS = ["linear", "scaled_linear", "cosine", "scaled_linear_zero_snr"]


def _schedule(kind, start, end, zero_snr, T=1000):
    return NoiseSchedule.from_betas(make_betas(kind, T, start, end, rescale_zero_snr=zero_snr))


@pytest.mark.parametrize("kind,start,end,zero_snr", KINDS, ids=IDS)
def test_posterior_matches_gaussian_conditioning(kind, start, end, zero_snr):
    """q(x_{t-1}|x_t,x_0) from the joint Gaussian of (x_{t-1}, x_t) | x_0 built only from
    q(x_{t-1}|x_0) = N(sqrt(ᾱ_{t-1}) x_0, (1-ᾱ_{t-1})) and q(x_t|x_{t-1}) = N(sqrt(α_t) x_{t-1}, β_t):
    E = m + k (x_t - sqrt(α_t) m), Var = P - k sqrt(α_t) P, k = sqrt(α_t) P / (α_t P + β_t)."""
    s = _schedule(kind, start, end, zero_snr)
    T = s.num_train_timesteps
    betas = s.betas
    abar = torch.cumprod(1 - betas, 0)
    t = torch.arange(T)
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    alpha = 1 - betas
    P = 1 - abar_prev  # Var(x_{t-1} | x_0)
    cov_xt = alpha * P + betas  # Var(x_t | x_0)
    k = alpha.sqrt() * P / cov_xt  # Cov(x_{t-1}, x_t) / Var(x_t)
    var_ref = P - k * alpha.sqrt() * P
    # mean = sqrt(ᾱ_{t-1}) x_0 + k (x_t - sqrt(α_t) sqrt(ᾱ_{t-1}) x_0): coefficients of x_0 and x_t
    c0_ref = abar_prev.sqrt() * (1 - k * alpha.sqrt())
    ct_ref = k
    c0, ct = s.posterior_mean_coef(t)
    torch.testing.assert_close(c0, c0_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ct, ct_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(s.posterior_variance(t), var_ref, rtol=1e-9, atol=1e-15)
    assert s.posterior_variance(t)[0] == 0  # x_{-1} = x_0
    clipped = s.posterior_log_variance_clipped(t)
    assert torch.isfinite(clipped).all() and clipped[0] == clipped[1]
    torch.testing.assert_close(clipped[1:], var_ref[1:].log(), rtol=1e-9, atol=1e-12)
    # on tensors: posterior_mean gathers the same coefficients, cast to the input dtype
    x0, xt = torch.randn(4, 3), torch.randn(4, 3)
    tt = torch.tensor([0, 1, T // 2, T - 1])
    ref = c0_ref[tt, None] * x0.double() + ct_ref[tt, None] * xt.double()
    got = s.posterior_mean(x0, xt, tt)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind,start,end,zero_snr", KINDS, ids=IDS)
def test_forward_moments_monte_carlo(kind, start, end, zero_snr):
    """x_t = add_noise(x_0, ε, t) has mean sqrt(ᾱ_t) x_0 and variance 1 - ᾱ_t (DDPM eq. 4)."""
    s = _schedule(kind, start, end, zero_snr)
    N = 100_000
    g = torch.Generator().manual_seed(0)
    x0 = torch.tensor([1.5, -0.7, 0.0, 2.0], dtype=torch.float64)
    t = torch.tensor([0, 300, 700, 999])
    eps = torch.randn(N, 4, generator=g, dtype=torch.float64)
    xt = s.add_noise(x0.expand(N, 4).T.contiguous(), eps.T.contiguous(), t).T  # rows: [4] batch over t
    a = s.alphas_cumprod[t]
    mean_ref, var_ref = a.sqrt() * x0, 1 - a
    # 6 standard errors: mean SE = sqrt(var/N); sample-variance SE = var sqrt(2/N)
    assert ((xt.mean(0) - mean_ref).abs() <= 6 * (var_ref / N).sqrt() + 1e-12).all()
    assert ((xt.var(0) - var_ref).abs() <= 6 * var_ref * math.sqrt(2 / N) + 1e-12).all()


def test_learned_variance_endpoints_are_exact():
    s = _schedule("linear", 1e-4, 0.02, False)
    t = torch.arange(1, 1000, 37)
    ones = torch.ones(t.shape[0], 2, 3, 3)
    lv_hi = model_log_variance(s, ones, t)
    lv_lo = model_log_variance(s, -ones, t)
    assert torch.equal(lv_hi, s.betas.log().float()[t].view(-1, 1, 1, 1).expand_as(ones))
    assert torch.equal(lv_lo, s.posterior_variance(t).log().float().view(-1, 1, 1, 1).expand_as(ones))
    torch.testing.assert_close(lv_hi.double().exp()[:, 0, 0, 0], s.betas[t], rtol=1e-6, atol=0)
    torch.testing.assert_close(lv_lo.double().exp()[:, 0, 0, 0], s.posterior_variance(t), rtol=1e-6, atol=0)
    mid = model_log_variance(s, torch.zeros_like(ones), t)[:, 0, 0, 0].double()
    torch.testing.assert_close(mid, 0.5 * (s.betas[t].log() + s.posterior_variance(t).log()), rtol=1e-6, atol=0)


def test_normal_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    m1, m2, lv1, lv2 = (torch.randn(50, generator=g, dtype=torch.float64) for _ in range(4))
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(m1, (0.5 * lv1).exp()),
                                            torch.distributions.Normal(m2, (0.5 * lv2).exp()))
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), ref)


def test_discretized_gaussian_matches_exact_bin_mass():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (200,), generator=g).double() / 127.5 - 1.0
    means = x + 0.05 * torch.randn(200, generator=g, dtype=torch.float64)
    log_scales = torch.full_like(x, math.log(0.03))
    got = discretized_gaussian_log_likelihood(x, means, log_scales)
    n = torch.distributions.Normal(means, log_scales.exp())
    hi = torch.where(x > 0.999, torch.ones_like(x), n.cdf(x + 1 / 255))
    lo = torch.where(x < -0.999, torch.zeros_like(x), n.cdf(x - 1 / 255))
    ref = (hi - lo).log()
    # ADM's tanh approximation of Φ is accurate to ~1e-3 in probability
    torch.testing.assert_close(got.exp(), ref.exp(), atol=2e-3, rtol=0)


@pytest.mark.parametrize("prediction_type", ["sample", "epsilon", "v_prediction"])
def test_vlb_of_exact_denoiser_on_gaussian_data(prediction_type):
    """Data x_0 ~ N(μ, s²) (1-D). The exact denoiser x̂_0 = E[x_0|x_t] = μ + sqrt(ᾱ) s²/(ᾱ s² + 1-ᾱ) (x_t - sqrt(ᾱ) μ)
    makes μ_θ - μ̃ = c_0 (x̂_0 - x_0), so E L_{t-1} = ½[log(σ²/β̃) + β̃/σ² - 1 + c_0² Var(x_0|x_t)/σ²] / log 2
    with Var(x_0|x_t) = s² (1-ᾱ)/(ᾱ s² + 1-ᾱ) and model variance σ² from v."""
    s = _schedule("cosine", 1e-4, 0.02, False)
    mu, sd, N = 0.3, 0.4, 200_000
    g = torch.Generator().manual_seed(0)
    for t_int, v in [(1, -1.0), (10, 0.0), (500, 0.5), (999, 1.0)]:
        t = torch.full((N,), t_int)
        a = s.alphas_cumprod[t_int].item()
        x0 = mu + sd * torch.randn(N, 1, generator=g, dtype=torch.float64)
        eps = torch.randn(N, 1, generator=g, dtype=torch.float64)
        xt = s.add_noise(x0, eps, t)
        x0_hat = mu + math.sqrt(a) * sd**2 / (a * sd**2 + 1 - a) * (xt - math.sqrt(a) * mu)
        eps_hat = (xt - math.sqrt(a) * x0_hat) / math.sqrt(1 - a)
        out = {"sample": x0_hat, "epsilon": eps_hat,
               "v_prediction": math.sqrt(a) * eps_hat - math.sqrt(1 - a) * x0_hat}[prediction_type]
        var_out = torch.full_like(xt, v)
        got = vlb_term(s, x0, xt, t, out, var_out, prediction_type)
        # per-sample: independent KL via torch.distributions with the DDPM eq. 7 posterior
        beta, abar_prev = s.betas[t_int].item(), s.alphas_cumprod[t_int - 1].item()
        beta_tilde = (1 - abar_prev) / (1 - a) * beta
        c0 = math.sqrt(abar_prev) * beta / (1 - a)
        ct = math.sqrt(1 - beta) * (1 - abar_prev) / (1 - a)
        model_var = math.exp((v + 1) / 2 * math.log(beta) + (1 - v) / 2 * math.log(beta_tilde))
        q = torch.distributions.Normal(c0 * x0 + ct * xt, math.sqrt(beta_tilde))
        p = torch.distributions.Normal(c0 * x0_hat + ct * xt, math.sqrt(model_var))
        ref = torch.distributions.kl_divergence(q, p)[:, 0] / math.log(2)
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-9)
        # expectation: closed form, MC tolerance from the χ² term's standard error
        post_var = sd**2 * (1 - a) / (a * sd**2 + 1 - a)
        quad = c0**2 * post_var / model_var
        closed = 0.5 * (math.log(model_var / beta_tilde) + beta_tilde / model_var - 1 + quad) / math.log(2)
        tol = 6 * 0.5 * quad * math.sqrt(2 / N) / math.log(2) + 1e-12
        assert abs(got.mean().item() - closed) <= tol, (t_int, got.mean().item(), closed, tol)


def test_vlb_term_at_t0_is_decoder_nll():
    s = _schedule("linear", 1e-4, 0.02, False)
    x0 = torch.randint(0, 256, (3, 2, 4, 4)).float() / 127.5 - 1
    xt = s.add_noise(x0, torch.randn_like(x0), torch.zeros(3, dtype=torch.long))
    out = vlb_term(s, x0, xt, torch.zeros(3, dtype=torch.long), x0, torch.ones_like(x0), "sample")
    log_scale = 0.5 * s.betas[0].log().float()
    # perfect x̂_0 -> mean = x_0 exactly (c_0 = 1, c_t = 0 at t = 0)
    ref = -discretized_gaussian_log_likelihood(x0, x0, torch.full_like(x0, log_scale.item()))
    torch.testing.assert_close(out, ref.flatten(1).mean(1) / math.log(2))


def test_hybrid_loss_stop_gradient_on_mean():
    """The mean channels get gradient only from L_simple; the variance channels only from L_vlb."""
    s = _schedule("cosine", 1e-4, 0.02, False)
    B, C = 6, 2
    x0 = torch.rand(B, C, 4, 4) * 2 - 1
    param = torch.zeros(B, 2 * C, 4, 4, requires_grad=True)
    ctx = torch.zeros(B, 3, 4)

    def run(weight):
        param.grad = None
        loss, stats = hybrid_loss(lambda x, t, c: param * 1.0, x0, ctx, torch.zeros(3, 4), s, "epsilon", 0.1,
                                  generator=torch.Generator().manual_seed(0), vlb_weight=weight)
        loss.backward()
        return loss, stats, param.grad.clone()

    loss, stats, grad = run(0.001)
    _, stats0, grad0 = run(0.0)
    assert set(stats) == {"loss", "loss_simple", "loss_vlb", "t_mean", "cond_drop_frac"}
    torch.testing.assert_close(loss, stats["loss_simple"] + 0.001 * stats["loss_vlb"])
    assert torch.equal(grad[:, :C], grad0[:, :C])  # stop-gradient: λ L_vlb does not touch the mean
    assert grad[:, C:].abs().sum() > 0 and grad0[:, C:].abs().sum() == 0
    with pytest.raises(ValueError, match="2\\*C"):
        hybrid_loss(lambda x, t, c: x, x0, ctx, torch.zeros(3, 4), s, "epsilon", 0.1)


def test_hybrid_loss_at_zero_terminal_snr():
    s = _schedule("scaled_linear", 0.00085, 0.012, True)
    x0 = torch.rand(4, 2, 3, 3) * 2 - 1
    ctx = torch.zeros(4, 3, 4)

    def den(x, t, c):
        return torch.zeros(x.shape[0], 4, 3, 3)

    # t = T-1 (SNR 0) forced by a one-step schedule tail: evaluate the term directly and via the loss
    t = torch.full((4,), 999)
    xt = s.add_noise(x0, torch.randn_like(x0), t)
    assert torch.isfinite(vlb_term(s, x0, xt, t, torch.zeros_like(x0), torch.zeros_like(x0), "v_prediction")).all()
    loss, _ = hybrid_loss(den, x0, ctx, torch.zeros(3, 4), s, "v_prediction", 0.0,
                          generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="ill-posed"):
        hybrid_loss(den, x0, ctx, torch.zeros(3, 4), s, "epsilon", 0.0)
