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
    channels_per_head=16,
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
    ``attention_head_dim`` is the head *count*, so pass channels // channels_per_head per level."""
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
        attention_head_dim=[max(1, c // kw["channels_per_head"]) for c in kw["block_out_channels"]],
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
    assert model.config == cfg.model_dump(exclude={"init_from"})
    assert build_unet(cfg.model_copy(update={"init_from": "/nowhere"})).config == model.config
    assert len(model.down_blocks) == len(cfg.block_out_channels)
    # A fixed architecture's size pins the block layout (the diffusers key/shape test pins names).
    sd_like = build_unet(cfg.model_copy(update={"block_out_channels": [64, 128, 128]}))
    assert sum(p.numel() for p in sd_like.parameters()) == 6_715_588


@pytest.mark.parametrize(
    "change, key",
    [
        ({"attention_levels": [False]}, "attention_levels"),
        ({"block_out_channels": [32, 60]}, "norm_num_groups"),
        ({"block_out_channels": [32, 72], "norm_num_groups": 4}, "channels_per_head"),
        ({"channels_per_head": 12}, "channels_per_head"),
        ({"block_out_channels": [], "attention_levels": []}, "block_out_channels"),
        ({"layers_per_block": 0}, "layers_per_block"),
        ({"dropout": 1.0}, "dropout"),
        ({"transformer_layers_per_block": [1, 1, 1]}, "transformer_layers_per_block"),
        ({"transformer_layers_per_block": 0}, "transformer_layers_per_block"),
        ({"num_attention_heads": [2]}, "num_attention_heads"),
        ({"num_attention_heads": [2, 3]}, "num_attention_heads"),
        ({"freq_shift": 16}, "freq_shift"),
        ({"norm_eps": 0.0}, "norm_eps"),
        ({"num_class_embeds": 0}, "num_class_embeds"),
    ],
)
def test_bad_config_raises_naming_key(change, key):
    with pytest.raises(ValueError, match=f"model.{key}"):
        UNet(**{**TINY, **change})


# --- SD-family options ---------------------------------------------------------------------

def test_defaults_of_new_options_keep_the_sd1_layout():
    """The options added for the SD family default to the SD 1.x layout the model always had."""
    model = UNet(**TINY)
    tf = model.down_blocks[1].attentions[0]
    assert isinstance(tf.proj_in, torch.nn.Conv2d) and len(tf.transformer_blocks) == 1
    assert tf.transformer_blocks[0].attn1.heads == 64 // TINY["channels_per_head"]
    assert model.class_embedding is None and model.conv_norm_out.eps == 1e-5


def test_linear_projection_depths_and_heads_per_level():
    model = UNet(**{**TINY, "block_out_channels": [32, 64, 64], "attention_levels": [True, False, True],
                    "use_linear_projection": True, "transformer_layers_per_block": [2, 1, 3],
                    "num_attention_heads": [1, 5, 4], "norm_eps": 1e-6})
    down0, mid, up = model.down_blocks[0].attentions[0], model.mid_block.attentions[0], model.up_blocks
    assert isinstance(down0.proj_in, torch.nn.Linear) and isinstance(down0.proj_out, torch.nn.Linear)
    assert len(down0.transformer_blocks) == 2 and down0.transformer_blocks[0].attn2.heads == 1
    assert len(mid.transformer_blocks) == 3 and mid.transformer_blocks[0].attn1.heads == 4  # last level's
    assert up[0].attentions[0].transformer_blocks[0].attn1.heads == 4  # up path mirrors the down path
    assert len(up[2].attentions[0].transformer_blocks) == 2 and up[1].attentions is None
    assert model.down_blocks[0].resnets[0].norm1.eps == 1e-6
    x, ctx = _inputs(size=8)
    with torch.no_grad():
        assert model(x, 3, ctx).shape == x.shape


def test_class_embedding_conditions_the_output():
    torch.manual_seed(0)
    model = UNet(**{**TINY, "num_class_embeds": 3}).eval()
    x, ctx = _inputs(size=8)
    with torch.no_grad():
        a, b = model(x, 5, ctx, torch.tensor([0, 1])), model(x, 5, ctx, torch.tensor([2, 1]))
        torch.testing.assert_close(model(x, 5, ctx, 1), model(x, 5, ctx, torch.tensor([1, 1])))
    assert (a[0] - b[0]).abs().max() > 1e-4
    torch.testing.assert_close(a[1], b[1])
    with pytest.raises(ValueError, match="class_labels"):
        model(x, 5, ctx)
    with pytest.raises(ValueError, match="num_class_embeds"):
        UNet(**TINY)(x, 5, ctx, torch.tensor([0, 1]))


def test_timestep_embedding_layouts():
    """flip_sin_to_cos / freq_shift as in diffusers' get_timestep_embedding."""
    from ldm_train.model.layers import timestep_embedding

    t = torch.tensor([0.0, 3.0, 999.0])
    for flip, shift in [(True, 0), (False, 1), (True, 1)]:
        freqs = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(4) / (4 - shift))
        args = t[:, None] * freqs[None]
        halves = [torch.cos(args), torch.sin(args)] if flip else [torch.sin(args), torch.cos(args)]
        torch.testing.assert_close(timestep_embedding(t, 8, flip, shift), torch.cat(halves, -1))


@pytest.mark.parametrize("upcast", [False, True])
def test_upcast_attention_under_autocast(monkeypatch, upcast):
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        seen.append(q.dtype)
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    model = UNet(**{**TINY, "upcast_attention": upcast}).eval()
    x, ctx = _inputs(size=8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, 5, ctx)
    assert seen and set(seen) == {torch.float32 if upcast else torch.bfloat16}
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_gradient_checkpointing_same_gradients_only_in_training(monkeypatch):
    import ldm_train.model.unet as unet_module

    calls = []
    real = unet_module.checkpoint
    monkeypatch.setattr(unet_module, "checkpoint", lambda *a, **k: calls.append(k) or real(*a, **k))
    kw = {**TINY, "layers_per_block": 2, "num_class_embeds": 2}
    torch.manual_seed(0)
    plain = UNet(**kw)
    ckpt = UNet(**{**kw, "gradient_checkpointing": True})
    ckpt.load_state_dict(plain.state_dict())
    x, ctx = _inputs(size=8)
    grads = []
    for model in (plain, ckpt):
        model(x, torch.tensor([3, 700]), ctx, torch.tensor([0, 1])).square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert len(calls) == len(ckpt.down_blocks) + 1 + len(ckpt.up_blocks)
    assert all(k == {"use_reentrant": False} for k in calls)
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, msg=name)
    calls.clear()
    with torch.no_grad():
        ckpt(x, 3, ctx, 0)
    ckpt.eval()(x, 3, ctx, 0)
    assert calls == []


@pytest.mark.slow
def test_training_step_compiles_fullgraph():
    """forward + backward under torch.compile(fullgraph=True) (AOTAutograd traces the backward)
    with every option that adds control flow on; the eager gradients are reproduced."""
    kw = {**TINY, "attention_levels": [True, True], "num_class_embeds": 2, "use_linear_projection": True,
          "transformer_layers_per_block": [1, 2], "upcast_attention": True, "gradient_checkpointing": True}
    torch.manual_seed(0)
    model = UNet(**kw)
    x, ctx = _inputs(size=8)
    t, labels = torch.tensor([3, 700]), torch.tensor([0, 1])
    explain = torch._dynamo.explain(model)(x, t, ctx, labels)
    assert explain.graph_break_count == 0, explain.break_reasons
    torch._dynamo.reset()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the fp32 upcast branch of the attention
        explain = torch._dynamo.explain(model)(x, t, ctx, labels)
    assert explain.graph_break_count == 0, explain.break_reasons
    torch._dynamo.reset()
    model(x, t, ctx, labels).square().mean().backward()
    eager = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    compiled(x, t, ctx, labels).square().mean().backward()
    for name, grad in eager.items():
        torch.testing.assert_close(model.get_parameter(name).grad, grad, msg=name, rtol=1e-4, atol=1e-6)
