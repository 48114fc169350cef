"""Behaviour of the cross-attention U-Net: shapes, conditioning, gradients, learning, and
name/shape/number compatibility with diffusers' UNet2DConditionModel."""
from __future__ import annotations


import pytest
import torch

from ldm_train.config import ModelConfig
from ldm_train.model import UNet, build_unet

TINY = dict(
    in_channels=4,
    out_channels=4,
    block_out_channels=[32, 64],
    attention_levels=[False, True],
    layers_per_block=1,
    attention_head_dim=16,
    cross_attention_dim=24,
    norm_num_groups=8,
    dropout=0.0,
)


@pytest.fixture(scope="module")
def tiny() -> UNet:
    torch.manual_seed(0)
    return UNet(**TINY).eval()


def _inputs(batch=2, size=16, ctx_len=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, size, size, generator=g)
    ctx = torch.randn(batch, ctx_len, TINY["cross_attention_dim"], generator=g)
    return x, ctx


@pytest.mark.parametrize("size", [16, 8])
@pytest.mark.parametrize("timestep", [torch.tensor([3, 900]), torch.tensor([0.5, 42.25]), 7, 7.5, torch.tensor(11)])
def test_output_shape(tiny, size, timestep):
    x, ctx = _inputs(size=size)
    with torch.no_grad():
        out = tiny(x, timestep, ctx)
    assert out.shape == (2, 4, size, size)
    assert torch.isfinite(out).all()


def test_scalar_timestep_equals_broadcast_batch(tiny):
    x, ctx = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(tiny(x, 250, ctx), tiny(x, torch.tensor([250, 250]), ctx))


def test_odd_resolution_and_out_channels():
    torch.manual_seed(0)
    model = UNet(**{**TINY, "out_channels": 8}).eval()
    x = torch.randn(1, 4, 9, 11)
    with torch.no_grad():
        out = model(x, 5, torch.randn(1, 3, 24))
    assert out.shape == (1, 8, 9, 11)


def test_context_and_timestep_change_output(tiny):
    x, ctx = _inputs()
    _, other_ctx = _inputs(seed=2)
    with torch.no_grad():
        base = tiny(x, 100, ctx)
        assert (tiny(x, 100, other_ctx) - base).abs().max() > 1e-4
        assert (tiny(x, 900, ctx) - base).abs().max() > 1e-4


def test_bad_inputs_raise(tiny):
    x, ctx = _inputs()
    with pytest.raises(ValueError, match="cross_attention_dim"):
        tiny(x, 1, torch.randn(2, 5, 23))
    with pytest.raises(ValueError, match="timestep"):
        tiny(x, torch.tensor([1, 2, 3]), ctx)


def test_gradients_reach_every_parameter():
    """DDP (find_unused_parameters=False) needs every parameter in the graph."""
    torch.manual_seed(0)
    model = UNet(**{**TINY, "layers_per_block": 2})
    x, ctx = _inputs(size=8)
    model(x, torch.tensor([10, 20]), ctx).square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_overfits_a_fixed_batch():
    torch.manual_seed(0)
    model = UNet(**TINY)
    x, ctx = _inputs(size=8)
    t = torch.tensor([10, 500])
    target = torch.randn_like(x, generator=torch.Generator().manual_seed(3))
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(30):
        loss = torch.nn.functional.mse_loss(model(x, t, ctx), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


# --- diffusers compatibility ---------------------------------------------------------------

def _diffusers_twin(kw: dict):
    """The UNet2DConditionModel an SD checkpoint for ``kw`` would be. diffusers' SD1-era
    ``attention_head_dim`` is the head *count*, so pass channels // head_dim per level."""
    from diffusers import UNet2DConditionModel

    levels = kw["attention_levels"]
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=kw["in_channels"],
        out_channels=kw["out_channels"],
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in levels],
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in levels[::-1]],
        block_out_channels=kw["block_out_channels"],
        layers_per_block=kw["layers_per_block"],
        cross_attention_dim=kw["cross_attention_dim"],
        norm_num_groups=kw["norm_num_groups"],
        attention_head_dim=[max(1, c // kw["attention_head_dim"]) for c in kw["block_out_channels"]],
        act_fn="silu",
    ).eval()


@pytest.mark.parametrize(
    "kw",
    [
        TINY,
        {**TINY, "block_out_channels": [16, 32, 32], "attention_levels": [True, False, True], "layers_per_block": 2},
    ],
    ids=["tiny", "3-level-lpb2"],
)
def test_matches_diffusers_state_dict_and_output(kw):
    """Exact key set and shapes (so SD weights convert by name). Loading diffusers' weights
    also gives the same output, which pins the forward wiring, eps values and time embedding."""
    torch.manual_seed(0)
    ours, theirs = UNet(**kw).eval(), _diffusers_twin(kw)
    our_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    their_shapes = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert sorted(our_shapes) == sorted(their_shapes)
    assert our_shapes == their_shapes
    ours.load_state_dict(theirs.state_dict())
    x, ctx = _inputs(size=8)
    t = torch.tensor([7, 640])
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t, ctx), theirs(x, t, ctx).sample, atol=1e-5, rtol=1e-4)


# --- config ------------------------------------------------------------------------------

def test_build_unet_from_default_config():
    cfg = ModelConfig()
    model = build_unet(cfg)
    assert model.config == cfg.model_dump()
    assert len(model.down_blocks) == len(cfg.block_out_channels)
    # A fixed architecture's size pins the block layout (the diffusers key/shape test pins names).
    sd_like = build_unet(cfg.model_copy(update={"block_out_channels": [64, 128, 128]}))
    assert sum(p.numel() for p in sd_like.parameters()) == 6_715_588


@pytest.mark.parametrize(
    "change, key",
    [
        ({"attention_levels": [False]}, "attention_levels"),
        ({"block_out_channels": [32, 60]}, "norm_num_groups"),
        ({"block_out_channels": [32, 72], "norm_num_groups": 4}, "attention_head_dim"),
        ({"attention_head_dim": 12}, "attention_head_dim"),
        ({"block_out_channels": [], "attention_levels": []}, "block_out_channels"),
        ({"layers_per_block": 0}, "layers_per_block"),
        ({"dropout": 1.0}, "dropout"),
    ],
)
def test_bad_config_raises_naming_key(change, key):
    with pytest.raises(ValueError, match=f"model.{key}"):
        UNet(**{**TINY, **change})
