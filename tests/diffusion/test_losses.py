import pytest
import torch

from ldm_train.config import DiffusionConfig
from ldm_train.diffusion import build_schedule, diffusion_loss

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
        return eps if prediction_type == "epsilon" else schedule.v_target(x0, eps, t)
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
