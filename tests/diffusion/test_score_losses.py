"""Score objectives learn the analytic score of a noised 2-D Gaussian mixture (NCSN / SSM)."""
import math

import pytest
import torch

from ldm_train.diffusion.losses.score import sliced_score_matching_loss
from ldm_train.diffusion.sdes import geometric_sigmas

from analytic import dsm_loss, max_pairwise_distance, num_noise_scales

MEANS = torch.tensor([[-2.0, -2.0], [-2.0, 2.0], [2.0, -2.0], [2.0, 2.0]])
WEIGHTS = torch.tensor([0.1, 0.2, 0.3, 0.4])
VAR = 0.1  # isotropic component variance
SIGMA = 0.5  # the one noise level both objectives are trained at


def _sample_mixture(n, g):
    k = torch.multinomial(WEIGHTS, n, replacement=True, generator=g)
    return MEANS[k] + math.sqrt(VAR) * torch.randn(n, 2, generator=g)


def _mixture_score(x, var):
    """∇_x log Σ_k w_k N(x; μ_k, var·I) = Σ_k r_k(x) (μ_k - x)/var (r: responsibilities)."""
    d = x[:, None, :] - MEANS.to(x.dtype)[None]  # [N, K, 2]; in x's dtype (float64 x: float64 maths)
    r = torch.softmax(WEIGHTS.to(x.dtype).log() - d.pow(2).sum(-1) / (2 * var), dim=1)
    return -(r[..., None] * d).sum(1) / var


def test_mixture_score_helper_matches_autograd():
    x = torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    comps = torch.distributions.MultivariateNormal(MEANS.double(), VAR * torch.eye(2, dtype=torch.float64))
    mix = torch.distributions.MixtureSameFamily(torch.distributions.Categorical(WEIGHTS.double()), comps)
    (g,) = torch.autograd.grad(mix.log_prob(x).sum(), x)
    torch.testing.assert_close(_mixture_score(x.detach(), VAR), g)


def _net(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(2, 64), torch.nn.SiLU(), torch.nn.Linear(64, 64), torch.nn.SiLU(),
                               torch.nn.Linear(64, 2))


def _train(objective, steps=300, seed=0):
    """Returns the score MSE against the analytic noised-mixture score at steps 0, N/2, N."""
    net = _net(seed)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed + 1)
    ge = torch.Generator().manual_seed(1234)
    x_eval = _sample_mixture(4096, ge) + SIGMA * torch.randn(4096, 2, generator=ge)
    s_eval = _mixture_score(x_eval, VAR + SIGMA**2)
    errs = []
    for step in range(steps + 1):
        if step in (0, steps // 2, steps):
            with torch.no_grad():
                errs.append((net(x_eval) - s_eval).pow(2).sum(1).mean().item())
        if step == steps:
            break
        x = _sample_mixture(256, g)
        loss = objective(net, x, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return errs


def _dsm(net, x, g):
    return dsm_loss(lambda xt, sigma: net(xt), x, torch.tensor([SIGMA]), generator=g)


def _ssm_vr(net, x, g):
    x_noisy = x + SIGMA * torch.randn(x.shape, generator=g)  # SSM on samples of the noised mixture
    return sliced_score_matching_loss(net, x_noisy, n_projections=1, variance_reduced=True, generator=g)


@pytest.mark.parametrize("objective", [_dsm, _ssm_vr], ids=["dsm", "ssm_vr"])
def test_score_error_falls_with_training(objective):
    e0, e_half, e_end = _train(objective)
    assert e_half < 0.5 * e0, (e0, e_half, e_end)
    assert e_end < 0.8 * e_half, (e0, e_half, e_end)


def test_sliced_score_matching_equals_score_matching_objective_in_expectation():
    """For a linear score s(x) = A x: E_v[vᵀ A v] = tr(A) and E_v[(vᵀ A x)²] = ‖A x‖², so SSM (eq. 8)
    and SSM-VR average to the Hyvärinen objective tr(A) + ½ E‖A x‖²."""
    A = torch.tensor([[-1.0, 0.3], [0.2, -0.5]])
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    exact = A.trace() + 0.5 * (x @ A.T).pow(2).sum(1).mean()
    g = torch.Generator().manual_seed(1)
    vr = sliced_score_matching_loss(lambda y: y @ A.T, x, 4000, True, g)
    plain = sliced_score_matching_loss(lambda y: y @ A.T, x, 4000, False, g)
    rad = sliced_score_matching_loss(lambda y: y @ A.T, x, 4000, True, g, projection="rademacher")
    for est in (vr, plain, rad):
        assert abs(est.item() - exact.item()) < 0.05 * abs(exact.item()), (est, exact)


def test_dsm_loss_of_the_optimal_denoiser_is_its_floor():
    """With s(x̃, σ) = -(x̃ - x)/σ² (knowing x), σ s + z = 0: the loss is exactly 0."""
    x = torch.randn(32, 3)
    g = torch.Generator().manual_seed(0)
    sig = geometric_sigmas(0.01, 1.0, 5)

    def oracle(xt, sigma):
        return -(xt - x) / sigma[:, None] ** 2

    assert dsm_loss(oracle, x, sig, generator=g).item() < 1e-8


def test_geometric_sigmas_and_improved_techniques():
    s = geometric_sigmas(0.01, 50.0, 10)
    assert s.shape == (10,) and math.isclose(s[0].item(), 50.0, rel_tol=1e-6)
    assert math.isclose(s[-1].item(), 0.01, rel_tol=1e-6)
    ratios = s[:-1] / s[1:]
    torch.testing.assert_close(ratios, torch.full_like(ratios, ratios[0].item()))
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0], [1.0, 1.0]])
    assert max_pairwise_distance(x) == pytest.approx(5.0)
    # NCSNv2 Technique 2: more dimensions -> ratio closer to 1 -> more levels
    assert num_noise_scales(0.01, 50.0, 2) < num_noise_scales(0.01, 50.0, 3 * 32 * 32)
    with pytest.raises(ValueError):
        geometric_sigmas(1.0, 0.5, 10)
