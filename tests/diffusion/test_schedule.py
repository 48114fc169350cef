
import re

import pytest
import torch
from diffusers import DDPMScheduler

from ldm_train.config import DiffusionConfig
from ldm_train.diffusion import NoiseSchedule, build_schedule, make_betas
from ldm_train.diffusion.parameterization import predict, target

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
    torch.testing.assert_close(target(s, x0, eps, t, "v_prediction"), hf.get_velocity(x0, eps, t), atol=1e-6, rtol=1e-5)


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
    for ptype, out in [("epsilon", eps), ("v_prediction", target(s, x0, eps, t, "v_prediction"))]:
        x0_hat, eps_hat = predict(s, out, x_t, t, ptype)
        torch.testing.assert_close(x0_hat, x0, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(eps_hat, eps, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError):
        predict(s, eps, x_t, t, "score")


def test_schedule_validates_shapes():
    with pytest.raises(ValueError):
        NoiseSchedule(torch.zeros(3, dtype=torch.float64), torch.zeros(4, dtype=torch.float64), 3)


# --- zero terminal SNR, SNR/sigma helpers, x0 ("sample") prediction, config checks -----------------


from diffusers import EulerDiscreteScheduler  # noqa: E402

from ldm_train.config import Config, ConfigError  # noqa: E402
from ldm_train.diffusion.checks import check_config  # noqa: E402
from ldm_train.diffusion.parameterization import check_prediction  # noqa: E402
from ldm_train.diffusion.schedule import rescale_zero_terminal_snr  # noqa: E402


def _zero_snr_pair():
    hf = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                       beta_end=0.012, rescale_betas_zero_snr=True)
    cfg = DiffusionConfig(rescale_betas_zero_snr=True, prediction_type="v_prediction")
    return hf, build_schedule(cfg)


@pytest.mark.parametrize("kind", ["linear", "scaled_linear", "cosine"])
def test_rescale_zero_terminal_snr(kind):
    betas = make_betas(kind, 1000, 0.00085, 0.012)
    rescaled = rescale_zero_terminal_snr(betas)
    a, a_new = torch.cumprod(1 - betas, 0), torch.cumprod(1 - rescaled, 0)
    assert a_new[-1] == 0 and rescaled[-1] == 1
    torch.testing.assert_close(a_new[0], a[0], rtol=1e-12, atol=0)  # Lin et al. Alg. 1 keeps ᾱ_0
    assert (a_new[1:] < a_new[:-1]).all()
    torch.testing.assert_close(make_betas(kind, 1000, 0.00085, 0.012, rescale_zero_snr=True), rescaled)


def test_zero_snr_matches_diffusers_and_v_is_finite():
    hf, s = _zero_snr_pair()
    # diffusers rescales in float32; we do it in float64
    torch.testing.assert_close(s.alphas_cumprod.float(), hf.alphas_cumprod, atol=1e-6, rtol=0)
    torch.testing.assert_close(s.betas.float(), hf.betas, atol=1e-5, rtol=1e-4)
    assert s.zero_terminal_snr and not build_schedule(DiffusionConfig()).zero_terminal_snr
    x0, eps, _ = _batch()
    t = torch.tensor([0, 10, 500, 999])
    torch.testing.assert_close(s.add_noise(x0, eps, t), hf.add_noise(x0, eps, t), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(target(s, x0, eps, t, "v_prediction"), hf.get_velocity(x0, eps, t), atol=1e-6, rtol=1e-5)
    x_t = s.add_noise(x0, eps, t)
    for ptype, out in [("v_prediction", target(s, x0, eps, t, "v_prediction")), ("sample", x0)]:
        x0_hat, eps_hat = predict(s, out, x_t, t, ptype)
        assert torch.isfinite(x0_hat).all() and torch.isfinite(eps_hat).all()
        torch.testing.assert_close(x0_hat, x0, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(eps_hat, eps, atol=1e-5, rtol=1e-5)
    assert s.snr(torch.tensor([999])).item() == 0.0 and s.sigmas[-1] == float("inf")
    check_prediction("v_prediction", s)
    check_prediction("sample", s)
    with pytest.raises(ValueError, match="ill-posed"):
        check_prediction("epsilon", s)
    check_prediction("epsilon", build_schedule(DiffusionConfig()))
    with pytest.raises(ValueError, match="unknown prediction_type"):
        check_prediction("score", s)


def test_snr_and_sigmas_match_k_diffusion_definition():
    s = build_schedule(DiffusionConfig())
    hf = EulerDiscreteScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                                beta_end=0.012)
    ac = hf.alphas_cumprod.double()
    torch.testing.assert_close(s.sigmas, ((1 - ac) / ac).sqrt(), rtol=1e-4, atol=0)  # diffusers: float32 ᾱ
    t = torch.arange(1000)
    torch.testing.assert_close(s.snr(t), s.sigmas**-2, rtol=1e-12, atol=0)
    assert (s.sigmas[1:] > s.sigmas[:-1]).all()


@pytest.mark.parametrize("kind", ["scaled_linear", "cosine"])
def test_sample_prediction_round_trip(kind):
    s = build_schedule(DiffusionConfig(beta_schedule=kind))
    x0, eps, _ = _batch(1)
    t = torch.tensor([10, 100, 500, 999])  # at t=0, ε = (x_t - sqrt(ᾱ) x_0)/sqrt(1-ᾱ) amplifies rounding
    x0_hat, eps_hat = predict(s, x0, s.add_noise(x0, eps, t), t, "sample")
    assert torch.equal(x0_hat, x0)
    torch.testing.assert_close(eps_hat, eps, atol=1e-4, rtol=1e-4)


def test_sample_target_and_diffusers_x0_step():
    s = build_schedule(DiffusionConfig())
    x0, eps, t = _batch(2)
    assert torch.equal(target(s, x0, eps, t, "sample"), x0)
    with pytest.raises(ValueError):
        target(s, x0, eps, t, "score")
    # diffusers' DDPMScheduler with prediction_type="sample" forms the same posterior mean μ̃(x_t, x̂_0)
    hf = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                       beta_end=0.012, prediction_type="sample", clip_sample=False, variance_type="fixed_small")
    x_t = s.add_noise(x0[:1], eps[:1], torch.tensor([500]))
    out = hf.step(x0[:1], 500, x_t, generator=torch.Generator().manual_seed(0))
    # step() adds σ z; undo it by comparing against our mean with the same z (DDPM eq. 6-7)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(x_t.shape, generator=g)
    ours = s.posterior_mean(x0[:1], x_t, torch.tensor([500])) + s.posterior_variance(torch.tensor([500])).sqrt().float() * z
    torch.testing.assert_close(out.prev_sample, ours, atol=1e-5, rtol=1e-5)


def _config(prediction, formulation, learned, out_channels, in_channels, sampler, zero_snr=False):
    return Config.model_validate({
        "diffusion": {"prediction_type": prediction, "formulation": formulation, "rescale_betas_zero_snr": zero_snr,
                      "iddpm": {"learned_variance": learned}},
        "model": {"out_channels": out_channels, "in_channels": in_channels}, "eval": {"sampler": sampler}})


# The combinations the configuration can express, each refused naming its keys (ldm_train.diffusion.checks).
@pytest.mark.parametrize("args,match", [
    (("epsilon", "ddpm", True, 4, 4, "ddpm"), "model.out_channels=4: diffusion.iddpm.learned_variance needs 2"),
    (("epsilon", "ddpm", True, 8, 4, "ddim"), "eval.sampler='ddim' would ignore diffusion.iddpm.learned_variance"),
    (("epsilon", "ve_sde", True, 8, 4, "ddpm"), "diffusion.iddpm.learned_variance is Improved DDPM's; it needs"),
    (("epsilon", "ddpm", False, 4, 4, "ddim", True), "diffusion.prediction_type='epsilon' is ill-posed"),
    (("v_prediction", "ve_sde", False, 4, 4, "pc"), "diffusion.prediction_type='v_prediction': diffusion.formulation"),
    (("epsilon", "ve_sde", False, 4, 4, "pc", True), "diffusion.rescale_betas_zero_snr rescales"),
    (("epsilon", "ddpm", False, 4, 4, "pc"), "eval.sampler='pc' samples diffusion.formulation in"),
    (("epsilon", "ncsn", False, 4, 4, "ddim"), "eval.sampler='ddim' samples diffusion.formulation in"),
    (("epsilon", "ddpm", False, 4, 4, "iddpm"), "eval.sampler: unknown sampler 'iddpm'"),
    (("epsilon", "ddpm", False, 8, 4, "ddim"), "model.out_channels=8 must equal model.in_channels=4"),
])
def test_check_config_rejects_naming_the_keys(args, match):
    with pytest.raises(ConfigError, match=re.escape(match)):
        check_config(_config(*args))


def test_check_config_accepts():
    check_config(_config("epsilon", "ddpm", True, 8, 4, "ddpm"))
    check_config(_config("v_prediction", "ddpm", False, 4, 4, "ddim", True))
    check_config(_config("epsilon", "ve_sde", False, 4, 4, "pc"))
    check_config(_config("epsilon", "vp_sde", False, 4, 4, "pf_ode"))
    check_config(_config("epsilon", "ncsn", False, 4, 4, "annealed_langevin"))
    check_config(_config("v_prediction", "ddpm", False, 4, 4, "euler"))


def test_check_config_lists_every_problem_once():
    with pytest.raises(ConfigError) as e:
        check_config(_config("v_prediction", "ve_sde", True, 4, 4, "ddim"))
    lines = str(e.value).splitlines()[1:]
    assert len(lines) == 5, lines  # sampler/formulation, prediction, learned variance x3
