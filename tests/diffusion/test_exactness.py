"""Exactness of the samplers with the closed-form Gaussian-mixture denoiser (issue 4).

With the exact posterior mean in place of a network, a sampler's output differs from the data only
by its discretisation error and Monte-Carlo noise. Each test compares a sampler's output with an
independent fresh data sample of the same size through the same statistics (hard assignment to
the most responsible component, then per-component weight, mean and covariance); the difference
must lie within Z = 4 two-sample standard errors computed from the sample counts:
  weight:     sqrt(2 π(1-π) / n)
  mean_i:     sqrt(Σ_ii / n_a + Σ_ii / n_b)
  cov_ij:     sqrt((Σ_ii Σ_jj + Σ_ij²) (1/n_a + 1/n_b))   (Wishart variance of a sample covariance)
With ~150 such comparisons at 4 standard errors the family-wise false-alarm rate is about 1 % for a
perfect sampler; the seeds are fixed, so the outcome is deterministic. Step counts are chosen so
the discretisation bias is small against these errors, not the tolerances against the bias.
"""
from __future__ import annotations

import math

import pytest
import torch

from ldm_train.diffusion import NoiseSchedule, make_betas, sample
from ldm_train.diffusion.guidance import guided
from ldm_train.diffusion.parameterization import SDEScore, predict
from ldm_train.diffusion.samplers.discrete import ddim_timesteps
from ldm_train.diffusion.samplers.langevin import sample_annealed_langevin
from ldm_train.diffusion.samplers.sde import sample_pc, sample_pf_ode, sde_grid
from ldm_train.diffusion.sdes import VESDE, SubVPSDE, VPSDE, geometric_sigmas

from analytic import GaussianMixture, as_discrete_model, as_vp_score, sliced_wasserstein

N = 4000
Z = 4.0
F64 = torch.float64


def make_mixture() -> GaussianMixture:
    """Three anisotropic, distinct 2-D Gaussians with unequal weights."""
    return GaussianMixture(
        torch.tensor([0.5, 0.3, 0.2], dtype=F64),
        torch.tensor([[-2.0, 0.0], [2.0, 1.0], [0.0, -2.5]], dtype=F64),
        torch.tensor([[[0.3, 0.15], [0.15, 0.2]], [[0.1, -0.05], [-0.05, 0.4]], [[0.5, 0.0], [0.0, 0.05]]],
                     dtype=F64),
    )


GMM = make_mixture()
SCHEDULE = NoiseSchedule.from_betas(make_betas("linear", 1000))


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def fresh():
    return GMM.sample(N, gen(100))


@pytest.fixture(scope="module")
def sw_floor(fresh):
    """(mean, sd) of SW(new data, fresh) over 20 independent data samples of size N: the distribution
    an exact sampler's SW to ``fresh`` follows (~0.09 ± 0.025 at N = 4000)."""
    d = torch.tensor([sw(GMM.sample(N, gen(200 + i)), fresh) for i in range(20)])
    return float(d.mean()), float(d.std())


def check_sw(name, x, fresh, floor, capsys) -> None:
    """Report SW(x, fresh) against the data-vs-data floor; it must be within 4 sd of the floor's mean."""
    mean, sd = floor
    d = sw(x, fresh)
    with capsys.disabled():
        print(f"\n{name}: SW to data {d:.4f}; data-vs-data {mean:.4f} ± {sd:.4f}", end="")
    assert d <= mean + Z * sd, (name, d, floor)


def mixture_stats(x: torch.Tensor):
    """Per-component (weights [K], counts [K], means [K, D], covs [K, D, D]) after assigning each
    point to its most responsible component under the true mixture."""
    k = GMM.responsibilities(x).argmax(-1)
    counts = torch.bincount(k, minlength=GMM.K)
    means = torch.stack([x[k == j].mean(0) for j in range(GMM.K)])
    covs = torch.stack([torch.cov(x[k == j].T) for j in range(GMM.K)])
    return counts / x.shape[0], counts, means, covs


def assert_matches_mixture(x: torch.Tensor, ref: torch.Tensor, check_covs: bool = True) -> None:
    assert torch.isfinite(x).all()
    wa, na, ma, ca = mixture_stats(x.to(F64))
    wb, nb, mb, cb = mixture_stats(ref)
    n = x.shape[0]
    se_w = (2 * wb * (1 - wb) / n).sqrt()
    assert ((wa - wb).abs() <= Z * se_w).all(), f"weights {wa} vs {wb} (se {se_w})"
    inv = (1 / na + 1 / nb).to(F64)
    var = torch.diagonal(cb, dim1=-2, dim2=-1)  # [K, D]
    se_m = (var * inv[:, None]).sqrt()
    assert ((ma - mb).abs() <= Z * se_m).all(), f"means {ma} vs {mb} (se {se_m})"
    if check_covs:
        se_c = ((var[:, :, None] * var[:, None, :] + cb**2) * inv[:, None, None]).sqrt()
        assert ((ca - cb).abs() <= Z * se_c).all(), f"covs {ca} vs {cb} (se {se_c})"


def sw(a, b) -> float:
    return sliced_wasserstein(a, b, 256, gen(7))


def ddim(x_T, steps, eta=0.0, spacing="leading", seed=3):
    model = as_discrete_model(GMM, SCHEDULE, "epsilon")
    ctx = torch.zeros(x_T.shape[0], 1, 1, dtype=F64)
    return sample("ddim", guided(model, ctx, None, 1.0), x_T, SCHEDULE, steps, eta=eta, generator=gen(seed),
                  spacing=spacing)


def noise(n=N, seed=1):
    return torch.randn(n, 2, generator=gen(seed), dtype=F64)


# -- the analytic denoiser itself -------------------------------------------------------------
def test_denoiser_is_posterior_mean_by_monte_carlo():
    """D(x; σ) equals a self-normalised importance estimate of E[x_0 | x] from prior samples."""
    x0 = GMM.sample(200_000, gen(0))
    for sigma in (0.3, 1.0):
        x = torch.tensor([[0.5, -0.5], [-1.5, 0.2], [1.0, 2.0]], dtype=F64)
        logw = -((x[:, None, :] - x0[None]) ** 2).sum(-1) / (2 * sigma**2)  # N(x; x0, σ² I) up to a constant
        w = torch.softmax(logw, dim=1)
        mc = w @ x0
        ess = 1 / (w**2).sum(1)
        tol = Z * x0.std(0).max() / ess.sqrt()
        assert ((GMM.denoise(x, sigma) - mc).abs().max(1).values <= tol).all()


def test_score_matches_autograd_of_log_density():
    x = torch.randn(16, 2, generator=gen(0), dtype=F64).requires_grad_(True)
    for sigma in (0.05, 0.7, 5.0):
        (grad,) = torch.autograd.grad(GMM.log_prob(x, sigma).sum(), x)
        torch.testing.assert_close(GMM.score(x.detach(), sigma), grad, rtol=1e-8, atol=1e-8)
    per_sample = torch.linspace(0.1, 3, 16, dtype=F64)
    (grad,) = torch.autograd.grad(GMM.log_prob(x, per_sample).sum(), x)
    torch.testing.assert_close(GMM.score(x.detach(), per_sample), grad, rtol=1e-8, atol=1e-8)


# -- DDIM -------------------------------------------------------------------------------------
def test_ddim_reproduces_mixture(fresh, sw_floor, capsys):
    x = ddim(noise(), 100)
    assert_matches_mixture(x, fresh)
    check_sw("DDIM 100 steps eta=0", x, fresh, sw_floor, capsys)


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_discrete_model_parameterisations_agree(prediction_type):
    xt, t = noise(64), torch.randint(0, 1000, (64,), generator=gen(2))
    eps = as_discrete_model(GMM, SCHEDULE, "epsilon")(xt, t, None)
    out = as_discrete_model(GMM, SCHEDULE, prediction_type)(xt, t, None)
    if prediction_type == "v_prediction":
        _, eps2 = predict(SCHEDULE, out, xt, t, "v_prediction")
    else:
        a = SCHEDULE.alpha_bar(t, xt)
        eps2 = (xt - a.sqrt() * out) / (1 - a).sqrt()
    torch.testing.assert_close(eps2, eps, rtol=1e-7, atol=1e-7)


def test_ddim_eta0_beats_eta1_at_few_steps():
    """DDIM paper Table 1: at 10 and 20 steps η = 0 is closer to the data than η = 1."""
    n = 16_000  # the gap must beat the SW noise floor (data vs data ~0.02 at this n)
    ref = GMM.sample(n, gen(102))
    x_T = noise(n, 5)
    for steps in (10, 20):
        d0, d1 = sw(ddim(x_T, steps, 0.0), ref), sw(ddim(x_T, steps, 1.0), ref)
        assert d0 < d1, (steps, d0, d1)


def ddim_invert(x0: torch.Tensor, steps: int, spacing: str = "trailing") -> torch.Tensor:
    """Run DDIM eq. 12 (η = 0) backwards: from ᾱ = 1 up the same timesteps sample_ddim descends,
    with ε̂ evaluated at the current (less noisy) x and the target timestep (as diffusers'
    DDIMInverseScheduler)."""
    model = as_discrete_model(GMM, SCHEDULE, "epsilon")
    ts = ddim_timesteps(1000, steps, spacing).flip(0).tolist()  # ascending
    table = SCHEDULE.alphas_cumprod.tolist()
    x, a_prev = x0, 1.0
    for t in ts:
        eps = model(x, torch.full((x.shape[0],), t, dtype=torch.int64), None)
        x0_hat = (x - math.sqrt(1 - a_prev) * eps) / math.sqrt(a_prev)  # eq. 9 at the current level
        x = math.sqrt(table[t]) * x0_hat + math.sqrt(1 - table[t]) * eps  # eq. 12 (η = 0) to level t
        a_prev = table[t]
    return x


def test_ddim_inversion_error_shrinks_with_steps():
    x0 = GMM.sample(500, gen(11))
    errs = []
    for steps in (10, 20, 50, 100):
        rec = ddim(ddim_invert(x0, steps), steps, spacing="trailing")
        errs.append(float((rec - x0).norm(dim=1).mean()))
    assert all(b < a for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < errs[0] / 4, errs  # 10x the steps: a first-order method gains ~10x


def slope(err_coarse: float, err_fine: float, n_coarse: int, n_fine: int) -> float:
    """The order p in err ∝ steps^-p from two step counts (log-log slope)."""
    return math.log(err_coarse / err_fine) / math.log(n_fine / n_coarse)


def test_ddim_is_first_order():
    """Trailing spacing: every grid starts at t = 999 and ends at ᾱ = 1, so all discretise one ODE."""
    x_T = noise(500, 12)
    ref = ddim(x_T, 1000, spacing="trailing")
    e = {s: float((ddim(x_T, s, spacing="trailing") - ref).norm(dim=1).mean()) for s in (25, 50)}
    p = slope(e[25], e[50], 25, 50)
    assert 0.7 <= p <= 1.5, (e, p)


# -- score SDEs -------------------------------------------------------------------------------
SDES = {"vp": VPSDE(), "subvp": SubVPSDE(), "ve": VESDE()}


@pytest.mark.parametrize("name", list(SDES))
def test_probability_flow_reproduces_mixture(name, fresh, sw_floor, capsys):
    sde = SDES[name]
    x_T = sde.prior_sample((N, 2), gen(20), dtype=F64)
    x = sample_pf_ode(SDEScore(as_vp_score(GMM, sde), sde), x_T, sde_grid(sde, 50), method="heun", final_denoise=False)
    assert_matches_mixture(x, fresh)
    check_sw(f"PF-ODE {name} Heun 50 steps", x, fresh, sw_floor, capsys)


def test_probability_flow_orders():
    """Euler is first order, Heun second, against the same ODE solved with 1000 Heun steps."""
    sde = VPSDE()
    score = SDEScore(as_vp_score(GMM, sde), sde)
    x_T = sde.prior_sample((500, 2), gen(21), dtype=F64)
    ref = sample_pf_ode(score, x_T, sde_grid(sde, 1000), method="heun", final_denoise=False)
    err = {}
    for method, (n1, n2) in {"euler": (50, 100), "heun": (25, 50)}.items():
        for s in (n1, n2):
            x = sample_pf_ode(score, x_T, sde_grid(sde, s), method=method, final_denoise=False)
            err[method, s] = float((x - ref).norm(dim=1).mean())
    p_euler = slope(err["euler", 50], err["euler", 100], 50, 100)
    p_heun = slope(err["heun", 25], err["heun", 50], 25, 50)
    assert 0.7 <= p_euler <= 1.5, (err, p_euler)
    assert 1.6 <= p_heun <= 3.0, (err, p_heun)


@pytest.mark.parametrize("name,predictor", [("vp", "reverse_diffusion"), ("vp", "euler_maruyama"),
                                            ("subvp", "reverse_diffusion"), ("ve", "reverse_diffusion"),
                                            ("ve", "euler_maruyama")])
def test_pc_reproduces_mixture(name, predictor, fresh, sw_floor, capsys):
    sde = SDES[name]
    x_T = sde.prior_sample((N, 2), gen(30), dtype=F64)
    x = sample_pc(SDEScore(as_vp_score(GMM, sde), sde), x_T, sde_grid(sde, 100), generator=gen(31),
                  predictor=predictor, corrector="langevin", snr=0.16)
    assert_matches_mixture(x, fresh)
    check_sw(f"PC {name} {predictor}+Langevin 100 steps", x, fresh, sw_floor, capsys)


def test_annealed_langevin_reproduces_mixture(fresh, sw_floor, capsys):
    """NCSN: σ from 10 (above the data's spread) to 0.01, ε = 2e-5 (Song & Ermon 2019's σ_L and ε).

    Weights and means only: with α_i ∝ σ_i² the chain stops mixing along the data's own spread once
    σ_i² << Σ_k, so the covariance keeps the inflation from the levels where σ_i² ~ Σ_k (measured
    ~+13 % here; the bias Song & Ermon 2020, Technique 4, tune ε and T against)."""
    sigmas = geometric_sigmas(0.01, 10.0, 30, dtype=F64)
    x0 = 10.0 * torch.randn(N, 2, generator=gen(40), dtype=F64)
    x = sample_annealed_langevin(GMM.score, x0, sigmas, generator=gen(41), steps_per_sigma=20, step_lr=2e-5)
    assert_matches_mixture(x, fresh, check_covs=False)
    check_sw("annealed Langevin 30x20", x, fresh, sw_floor, capsys)


# -- DDPM and the EDM-grid samplers of samplers/discrete.py / samplers/karras.py --------------
def test_ddpm_reproduces_mixture(fresh, sw_floor, capsys):
    model = as_discrete_model(GMM, SCHEDULE, "epsilon")
    x = sample("ddpm", guided(model, torch.zeros(N, 1, 1, dtype=F64), None, 1.0), noise(N, 50), SCHEDULE, None,
               generator=gen(51))
    assert_matches_mixture(x, fresh)
    check_sw("DDPM 1000 steps", x, fresh, sw_floor, capsys)


KARRAS = ("euler", "heun", "dpmpp_2m")


def _karras(name):
    from ldm_train.diffusion.samplers import karras

    return {"euler": karras.sample_euler, "heun": karras.sample_heun, "dpmpp_2m": karras.sample_dpmpp_2m}[name]


def _karras_grid(n):
    from ldm_train.diffusion.samplers.karras import karras_sigmas

    return karras_sigmas(n, 0.002, 80.0)  # EDM's σ_min, σ_max, ρ = 7


@pytest.mark.parametrize("name", ["heun", "dpmpp_2m"])
def test_karras_samplers_reproduce_mixture(name, fresh, sw_floor, capsys):
    x = _karras(name)(GMM.denoise, 80.0 * noise(N, 60), _karras_grid(40))
    assert_matches_mixture(x, fresh)
    check_sw(f"{name} 40 steps (EDM grid)", x, fresh, sw_floor, capsys)


@pytest.mark.parametrize("name,lo,hi", [("euler", 0.7, 1.5), ("heun", 1.6, 3.0), ("dpmpp_2m", 1.6, 3.0)])
def test_karras_samplers_order(name, lo, hi):
    """Error against the same sampler at 1000 steps falls as steps^-p, p the promised order
    (Euler 1; Heun and DPM-Solver++(2M) 2), measured between 20 and 40 steps on the ρ = 7 grid."""
    f = _karras(name)
    x_T = 80.0 * noise(300, 13)
    ref = f(GMM.denoise, x_T, _karras_grid(1000))
    e20, e40 = (float((f(GMM.denoise, x_T, _karras_grid(n)) - ref).norm(dim=1).mean()) for n in (20, 40))
    p = slope(e20, e40, 20, 40)
    assert lo <= p <= hi, (e20, e40, p)
