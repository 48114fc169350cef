
import pytest
import torch
from diffusers import DDPMScheduler

from ldm_train.config import DiffusionConfig
from ldm_train.diffusion import NoiseSchedule, build_schedule, make_betas

KINDS = [("linear", "linear", 1e-4, 0.02), ("scaled_linear", "scaled_linear", 0.00085, 0.012),
         ("cosine", "squaredcos_cap_v2", 1e-4, 0.02)]


@pytest.mark.parametrize("kind,hf_kind,start,end", KINDS)
def test_betas_match_diffusers(kind, hf_kind, start, end):
    betas = make_betas(kind, 1000, start, end)
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule=hf_kind, beta_start=start, beta_end=end).betas
    assert betas.dtype == torch.float64 and betas.shape == (1000,)
    torch.testing.assert_close(betas.float(), ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["linear", "scaled_linear", "cosine"])
def test_alphas_cumprod_monotone_in_unit_interval(kind):
    s = build_schedule(DiffusionConfig(beta_schedule=kind))
    a = s.alphas_cumprod
    assert a.dtype == torch.float64 and s.num_train_timesteps == 1000
    assert (a > 0).all() and (a < 1).all()
    assert (a[1:] < a[:-1]).all()


def test_unknown_kind_rejected():
    with pytest.raises(ValueError, match="unknown beta schedule"):
        make_betas("quadratic", 10, 1e-4, 0.02)


def _hf_and_ours():
    hf = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    return hf, build_schedule(DiffusionConfig())


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    x0, eps = torch.randn(4, 3, 5, 5, generator=g), torch.randn(4, 3, 5, 5, generator=g)
    return x0, eps, torch.tensor([0, 1, 500, 999])


def test_add_noise_and_velocity_match_diffusers():
    hf, s = _hf_and_ours()
    x0, eps, t = _batch()
    x_t = s.add_noise(x0, eps, t)
    assert x_t.dtype == torch.float32
    torch.testing.assert_close(x_t, hf.add_noise(x0, eps, t), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(s.v_target(x0, eps, t), hf.get_velocity(x0, eps, t), atol=1e-6, rtol=1e-5)


def test_casts_to_input_dtype():
    s = build_schedule(DiffusionConfig())
    x0, eps, t = _batch()
    assert s.add_noise(x0.bfloat16(), eps.bfloat16(), t).dtype == torch.bfloat16
    assert s.add_noise(x0.double(), eps.double(), t).dtype == torch.float64


@pytest.mark.parametrize("kind", ["scaled_linear", "cosine"])
def test_pred_to_x0_eps_round_trip(kind):
    s = build_schedule(DiffusionConfig(beta_schedule=kind))
    x0, eps, t = _batch(1)
    t = torch.tensor([0, 10, 500, 900])  # cosine's last steps make x0 ill-conditioned in float32
    x_t = s.add_noise(x0, eps, t)
    for ptype, out in [("epsilon", eps), ("v_prediction", s.v_target(x0, eps, t))]:
        x0_hat, eps_hat = s.pred_to_x0_eps(out, x_t, t, ptype)
        torch.testing.assert_close(x0_hat, x0, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(eps_hat, eps, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError):
        s.pred_to_x0_eps(eps, x_t, t, "sample")


def test_schedule_validates_shapes():
    with pytest.raises(ValueError):
        NoiseSchedule(torch.zeros(3, dtype=torch.float64), torch.zeros(4, dtype=torch.float64), 3)
