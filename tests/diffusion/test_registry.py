"""The sampler registry: one shape for every sampler, and a new sampler is one function + one line."""
import inspect

import pytest
import torch

from ldm_train.cli import build_parser
from ldm_train.config import ConfigError, load_config
from ldm_train.diffusion import SAMPLERS, sample_from_config
from ldm_train.diffusion.checks import check_config
from ldm_train.diffusion.samplers import DDPM_ONLY, SIGMA, Sampler, settings_model
from ldm_train.diffusion.samplers.karras import karras_grid


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_sampler_has_the_one_shape(name):
    params = list(inspect.signature(SAMPLERS[name].fn).parameters.values())
    assert [p.kind for p in params[:3]] == [inspect.Parameter.POSITIONAL_OR_KEYWORD] * 3  # model, x, grid
    assert [(p.name, p.kind, p.default) for p in params[3:5]] == [
        ("generator", inspect.Parameter.KEYWORD_ONLY, None), ("callback", inspect.Parameter.KEYWORD_ONLY, None)]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is not p.empty for p in params[5:])
    # its settings are its keyword-only parameters (and its grid's), with the function's defaults
    defaults = settings_model(name)().model_dump()
    assert {p.name: p.default for p in params[5:]}.items() <= defaults.items()


def sample_scaled_euler(D, x, sigmas, *, generator=None, callback=None, gain: float = 1.0):
    """A sampler written for this test: Euler on the σ grid with its step scaled by ``gain``."""
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        d = (x - D(x, s[i])) / s[i]  # dx/dσ of the probability-flow ODE (EDM eq. 3)
        x = x + gain * (s[i + 1] - s[i]) * d
        if callback is not None:
            callback(i, x)
    return x


def test_a_new_sampler_is_one_function_and_one_registry_line(monkeypatch):
    monkeypatch.setitem(SAMPLERS, "scaled_euler", Sampler(sample_scaled_euler, SIGMA, karras_grid, DDPM_ONLY))
    # it is a value of eval.sampler, its keyword settings are config keys, checked by type and name
    cfg = load_config(None, ["eval.sampler=scaled_euler", "eval.samplers.scaled_euler.gain=1", "eval.steps=6"])
    check_config(cfg)
    with pytest.raises(ConfigError, match=r"eval.samplers.scaled_euler.gian: unknown key \(did you mean 'gain'\?\)"):
        check_config(load_config(None, ["eval.sampler=scaled_euler", "eval.samplers.scaled_euler.gian=1"]))
    with pytest.raises(ConfigError, match=r"scaled_euler.*samples diffusion.formulation in \('ddpm',\)"):
        check_config(load_config(None, ["eval.sampler=scaled_euler", "diffusion.formulation=vp_sde",
                                        "diffusion.prediction_type=epsilon"]))
    # a choice of the CLI
    args = build_parser().parse_args(["eval", "--checkpoint", "x", "--sampler", "scaled_euler"])
    assert args.sampler == "scaled_euler"
    # and it runs through the same entry point as the built-in ones: gain 1 is Euler exactly
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 4, 3, padding=1)

    def net(x, t, c):
        return conv(x) * 0.1 + 0.01 * c.mean() + 0.0 * t.view(-1, 1, 1, 1)

    noise, ctx, null = torch.randn(2, 4, 8, 8), torch.randn(2, 3, 8), torch.zeros(3, 8)
    with torch.no_grad():
        ours = sample_from_config(net, noise, ctx, null, cfg.diffusion, cfg.eval)
        euler = sample_from_config(net, noise, ctx, null, cfg.diffusion, cfg.eval.model_copy(update={"sampler": "euler"}))
        faster = sample_from_config(net, noise, ctx, null, cfg.diffusion,
                                    cfg.eval.model_copy(update={"samplers": {"scaled_euler": {"gain": 0.5}}}))
    torch.testing.assert_close(ours, euler, rtol=0, atol=0)
    assert not torch.allclose(faster, euler)


def test_unknown_sampler_in_the_config_is_refused_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"eval.sampler: unknown sampler 'dpmpp2m' \(did you mean 'dpmpp_2m'\?\)"):
        check_config(load_config(None, ["eval.sampler=dpmpp2m"]))
    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "--checkpoint", "x", "--sampler", "nope"])
