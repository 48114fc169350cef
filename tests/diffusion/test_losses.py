import pytest
import torch

from ldm_train.config import DiffusionConfig
from ldm_train.diffusion import build_schedule
from ldm_train.diffusion.losses.simple import diffusion_loss
from ldm_train.diffusion.parameterization import target

B, L, D = 8, 3, 4


@pytest.fixture(scope="module")
def schedule():
    return build_schedule(DiffusionConfig())


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 4, 6, 6, generator=g), torch.randn(B, L, D, generator=g) + 5.0


def _oracle(schedule, x0, prediction_type):
    """Recovers the true ε (or v) from x_t because it knows this batch's x0 (DDPM eq. 4 inverted)."""
    def denoiser(x_t, t, context):
        a = schedule.alphas_cumprod[t].view(-1, 1, 1, 1).float()
        eps = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
        return eps if prediction_type == "epsilon" else target(schedule, x0, eps, t, "v_prediction")
    return denoiser


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_oracle_denoiser_has_zero_loss(schedule, prediction_type):
    x0, ctx = _data()
    g = torch.Generator().manual_seed(1)
    loss, stats = diffusion_loss(_oracle(schedule, x0, prediction_type), x0, ctx, torch.zeros(L, D),
                                 schedule, prediction_type, 0.1, generator=g)
    assert loss.ndim == 0 and loss.item() < 1e-8
    assert set(stats) == {"loss", "t_mean", "cond_drop_frac"}


def test_same_seed_same_loss_and_grad_flows(schedule):
    x0, ctx = _data()
    net = torch.nn.Conv2d(4, 4, 3, padding=1)
    torch.nn.init.normal_(net.weight, std=0.1)

    def run(seed):
        return diffusion_loss(lambda x, t, c: net(x) + c.mean(), x0, ctx, torch.zeros(1, L, D), schedule,
                              "epsilon", 0.5, generator=torch.Generator().manual_seed(seed))[0]

    a, b, c = run(3), run(3), run(4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    a.backward()
    assert net.weight.grad is not None and net.weight.grad.abs().sum() > 0


def _recording(seen):
    def denoiser(x_t, t, context):
        seen.append(context.clone())
        return torch.zeros_like(x_t)
    return denoiser


@pytest.mark.parametrize("null_shape", [(L, D), (1, L, D)])
def test_cond_drop_prob_extremes(schedule, null_shape):
    x0, ctx = _data()
    null = torch.full(null_shape, -7.0)
    for p, expect_null in [(1.0, True), (0.0, False)]:
        seen = []
        for seed in range(5):
            _, stats = diffusion_loss(_recording(seen), x0, ctx, null, schedule, "epsilon", p,
                                      generator=torch.Generator().manual_seed(seed))
            assert stats["cond_drop_frac"].item() == float(expect_null)
        for got in seen:
            assert torch.equal(got, null.expand(B, L, D) if expect_null else ctx)


def test_partial_drop_replaces_whole_samples(schedule):
    x0, ctx = _data()
    seen = []
    diffusion_loss(_recording(seen), x0, ctx, torch.zeros(L, D), schedule, "epsilon", 0.5,
                   generator=torch.Generator().manual_seed(0))
    dropped = (seen[0] == 0).flatten(1).all(1)
    kept = (seen[0] == ctx).flatten(1).all(1)
    assert (dropped ^ kept).all() and 0 < dropped.sum() < B


def test_rejects_bad_prob(schedule):
    x0, ctx = _data()
    with pytest.raises(ValueError):
        diffusion_loss(_recording([]), x0, ctx, torch.zeros(L, D), schedule, "epsilon", 1.5)


# --- weighting, offset noise, timestep sampling -------------------------------------------------

import math  # noqa: E402

import torch.nn.functional as F  # noqa: E402

from ldm_train.diffusion.losses.simple import loss_weight, sample_timesteps  # noqa: E402


def _old_loss(denoiser, x0, ctx, null, schedule, ptype, p, seed):
    """The loss as written before the keyword options (reference for bit-identity)."""
    from ldm_train.diffusion.guidance import drop_context
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, schedule.num_train_timesteps, (x0.shape[0],), generator=g)
    eps = torch.randn(x0.shape, generator=g, dtype=x0.dtype)
    drop = torch.rand(x0.shape[0], generator=g) < p
    out = denoiser(schedule.add_noise(x0, eps, t), t, drop_context(ctx, null, drop))
    return F.mse_loss(out.float(), target(schedule, x0, eps, t, ptype).float())


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_defaults_are_bit_identical_to_plain_loss(schedule, prediction_type):
    x0, ctx = _data()
    net = torch.nn.Conv2d(4, 4, 3, padding=1)

    def den(x, t, c):
        return net(x) + c.mean()

    ref = _old_loss(den, x0, ctx, torch.zeros(L, D), schedule, prediction_type, 0.3, 7)
    plain, _ = diffusion_loss(den, x0, ctx, torch.zeros(L, D), schedule, prediction_type, 0.3,
                              generator=torch.Generator().manual_seed(7))
    explicit, _ = diffusion_loss(den, x0, ctx, torch.zeros(L, D), schedule, prediction_type, 0.3,
                                 generator=torch.Generator().manual_seed(7), weighting="uniform",
                                 offset_noise=0.0, timestep_sampling="uniform")
    assert torch.equal(ref, plain) and torch.equal(ref, explicit)


def _x0_error_denoiser(schedule, x0, delta, prediction_type):
    """Predicts x̂_0 = x_0 + delta, expressed in ``prediction_type`` via DDPM eq. 4 / Salimans & Ho."""
    def denoiser(x_t, t, context):
        a = schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
        x0_hat = (x0 + delta).double()
        eps_hat = (x_t.double() - a.sqrt() * x0_hat) / (1 - a).sqrt()
        out = {"sample": x0_hat, "epsilon": eps_hat,
               "v_prediction": a.sqrt() * eps_hat - (1 - a).sqrt() * x0_hat}[prediction_type]
        return out.float()
    return denoiser


@pytest.mark.parametrize("weighting", ["min_snr", "edm"])
def test_weightings_are_the_same_x0_space_loss_for_every_target(schedule, weighting):
    """Hang et al. 2023 and EDM define the weight on ‖x̂_0 - x_0‖²; expressed on ε, v or x_0 targets
    (‖x̂_0 - x_0‖² = ‖ε̂ - ε‖²/SNR = ‖v̂ - v‖²/(SNR + 1)) the same x̂_0 error gives the same loss."""
    x0, ctx = _data()
    delta = 0.1 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(5))
    losses = []
    for ptype in ["sample", "epsilon", "v_prediction"]:
        loss, _ = diffusion_loss(_x0_error_denoiser(schedule, x0, delta, ptype), x0.double(), ctx, torch.zeros(L, D),
                                 schedule, ptype, 0.0, generator=torch.Generator().manual_seed(2),
                                 weighting=weighting, min_snr_gamma=5.0, timestep_sampling="logit_normal")
        losses.append(loss.item())
    assert losses[0] > 0
    for other in losses[1:]:
        assert other == pytest.approx(losses[0], rel=1e-4)


def test_loss_weight_formulas(schedule):
    t = torch.tensor([0, 100, 400, 999])
    a = schedule.alphas_cumprod[t]
    snr = a / (1 - a)
    g = 5.0
    torch.testing.assert_close(loss_weight(schedule, t, "epsilon", "min_snr", g), snr.clamp(max=g) / snr)
    torch.testing.assert_close(loss_weight(schedule, t, "v_prediction", "min_snr", g), snr.clamp(max=g) / (snr + 1))
    torch.testing.assert_close(loss_weight(schedule, t, "sample", "min_snr", g), snr.clamp(max=g))
    sigma, sd = snr.rsqrt(), 0.5
    lam = (sigma**2 + sd**2) / (sigma * sd) ** 2  # EDM Table 1
    torch.testing.assert_close(loss_weight(schedule, t, "sample", "edm", sigma_data=sd), lam)
    torch.testing.assert_close(loss_weight(schedule, t, "epsilon", "edm", sigma_data=sd), lam * sigma**2)
    torch.testing.assert_close(loss_weight(schedule, t, "v_prediction", "edm", sigma_data=sd),
                               lam * sigma**2 / (1 + sigma**2))
    # v-prediction with σ_data = 1 is EDM's weighting already (Karras et al. sec. 5)
    torch.testing.assert_close(loss_weight(schedule, t, "v_prediction", "edm", sigma_data=1.0),
                               torch.ones(4, dtype=torch.float64))
    assert torch.equal(loss_weight(schedule, t, "epsilon"), torch.ones(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="unknown weighting"):
        loss_weight(schedule, t, "epsilon", "p2")


def test_weights_finite_at_zero_terminal_snr():
    from ldm_train.diffusion import NoiseSchedule, make_betas
    s = NoiseSchedule.from_betas(make_betas("scaled_linear", 1000, 0.00085, 0.012, rescale_zero_snr=True))
    t = torch.tensor([0, 500, 999])
    for ptype in ["v_prediction", "sample"]:
        for w in ["min_snr", "edm"]:
            assert torch.isfinite(loss_weight(s, t, ptype, w)).all()
    x0, ctx = _data()
    loss, _ = diffusion_loss(lambda x, t, c: torch.zeros_like(x), x0, ctx, torch.zeros(L, D), s, "v_prediction",
                             0.1, generator=torch.Generator().manual_seed(0), weighting="min_snr")
    assert torch.isfinite(loss)


def test_offset_noise_is_a_per_sample_channel_constant(schedule):
    x0 = torch.zeros(B, 4, 6, 6)
    ctx = torch.zeros(B, L, D)
    seen = {}

    def rec(key):
        def den(x_t, t, c):
            seen[key] = (x_t, t)
            return torch.zeros_like(x_t)
        return den

    for key, s in [("plain", 0.0), ("offset", 0.1)]:
        diffusion_loss(rec(key), x0, ctx, torch.zeros(L, D), schedule, "epsilon", 0.0,
                       generator=torch.Generator().manual_seed(3), offset_noise=s)
    (xa, ta), (xb, tb) = seen["plain"], seen["offset"]
    assert torch.equal(ta, tb)
    s1a = (1 - schedule.alphas_cumprod[ta]).sqrt().float().view(-1, 1, 1, 1)
    shift = (xb - xa) / s1a  # = 0.1 n, n ~ N(0,1) per (sample, channel)
    spread = shift.flatten(2).std(2)
    assert spread.max() < 1e-5 and shift.abs().max() > 1e-3
    with pytest.raises(ValueError):
        diffusion_loss(rec("x"), x0, ctx, torch.zeros(L, D), schedule, "epsilon", 0.0, offset_noise=-1.0)


def test_logit_normal_timesteps():
    T, n = 1000, 20_000
    g = torch.Generator().manual_seed(0)
    t = sample_timesteps(n, T, g, "cpu", "logit_normal", 0.0, 1.0)
    assert t.dtype == torch.int64 and t.min() >= 0 and t.max() <= T - 1
    # t < T·sigmoid(m) with probability 1/2; 6 standard errors of a proportion
    assert abs((t < T // 2).float().mean().item() - 0.5) < 6 * math.sqrt(0.25 / n)
    shifted = sample_timesteps(n, T, g, "cpu", "logit_normal", 1.0, 1.0)
    thresh = int(T / (1 + math.exp(-1.0)))
    assert abs((shifted < thresh).float().mean().item() - 0.5) < 6 * math.sqrt(0.25 / n) + 1 / T
    # logit-normal puts less mass at the ends than uniform
    assert (t < 50).float().mean() < 0.05 / 2
    with pytest.raises(ValueError):
        sample_timesteps(4, T, g, "cpu", "cubic")
