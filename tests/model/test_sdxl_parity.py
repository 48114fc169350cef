"""SDXL's U-Net (``addition_embed_type: text_time``, per-level transformer depth, no attention at
the first level) against diffusers' UNet2DConditionModel: equal outputs at random init (fp32) on
tiny SDXL-shaped configs, bit-identical weights back, and the full SDXL base layout key for key."""
from __future__ import annotations

import json

import pytest
import torch

from ldm_train.model import build_unet, diffusers_config_from_model, load_unet, model_config_from_diffusers
from ldm_train.model import write_diffusers_unet
from ldm_train.model.addition import ContextLayout

diffusers = pytest.importorskip("diffusers")
UNet2DConditionModel = diffusers.UNet2DConditionModel

SDXL_DOWN = ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
SDXL_UP = ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]
SDXL_BASE = {  # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json, written out by hand
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.19.0.dev0", "act_fn": "silu",
    "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280], "center_input_sample": False,
    "class_embed_type": None, "class_embeddings_concat": False, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "cross_attention_dim": 2048, "cross_attention_norm": None, "down_block_types": SDXL_DOWN,
    "downsample_padding": 1, "dual_cross_attention": False, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_only_cross_attention": None, "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05, "norm_num_groups": 32, "num_attention_heads": None, "num_class_embeds": None,
    "only_cross_attention": False, "out_channels": 4, "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0, "resnet_skip_time_act": False, "resnet_time_scale_shift": "default",
    "sample_size": 128, "time_cond_proj_dim": None, "time_embedding_act_fn": None, "time_embedding_dim": None,
    "time_embedding_type": "positional", "timestep_post_act": None, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": SDXL_UP, "upcast_attention": None, "use_linear_projection": True,
}
CASES = {  # tiny SDXL shapes: 64 channels per head -> 8 here; pooled width 24 (one row) and 40 (two rows)
    "sdxl-tiny": {**SDXL_BASE, "block_out_channels": [16, 32, 64], "attention_head_dim": [2, 4, 8],
                  "transformer_layers_per_block": [1, 2, 3], "cross_attention_dim": 32, "norm_num_groups": 8,
                  "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 24 + 48},
    "sdxl-tiny-wide-pooled": {**SDXL_BASE, "block_out_channels": [16, 32], "down_block_types": SDXL_DOWN[:2],
                              "up_block_types": SDXL_UP[1:], "attention_head_dim": [2, 4],
                              "transformer_layers_per_block": [1, 2], "cross_attention_dim": 32,
                              "norm_num_groups": 8, "addition_time_embed_dim": 4,
                              "projection_class_embeddings_input_dim": 40 + 24, "layers_per_block": 1},
}


def _diffusers_unet(config: dict, seed: int = 0):
    torch.manual_seed(seed)
    model = UNet2DConditionModel.from_config(config).eval()
    with torch.no_grad():  # diffusers zero-initialises conv_out: non-trivial values everywhere
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def _inputs(config: dict, pooled: int, size: int = 16, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, size, size, generator=g)
    ctx = torch.randn(2, 7, config["cross_attention_dim"], generator=g)
    text_embeds = torch.randn(2, pooled, generator=g)
    time_ids = torch.tensor([[1024.0, 768.0, 0.0, 32.0, 1024.0, 1024.0], [512.0, 900.0, 12.0, 0.0, 896.0, 1152.0]])
    return x, torch.tensor([17, 803]), ctx, text_embeds, time_ids


def _relative(got, expected) -> tuple[float, float]:
    scale = expected.abs().max().item()
    return (got - expected).abs().max().item(), (got - expected).abs().max().item() / scale


@pytest.mark.parametrize("name", list(CASES))
def test_sdxl_unet_matches_diffusers(name, tmp_path):
    config = CASES[name]
    theirs = _diffusers_unet(config)
    theirs.save_pretrained(tmp_path / "diffusers")
    ours = load_unet(tmp_path / "diffusers")
    layout = ours.layout
    assert layout is not None and layout.pooled == config["projection_class_embeddings_input_dim"] - 6 * config[
        "addition_time_embed_dim"]
    x, t, ctx, pooled, ids = _inputs(config, layout.pooled)
    with torch.no_grad():
        expected = theirs(x, t, ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
        got = ours(x, t, ctx, text_embeds=pooled, time_ids=ids)
        packed = ours(x, t, layout.pack(ctx, pooled, ids))
        without_sizes = ours(x, t, ctx, text_embeds=pooled, time_ids=torch.zeros_like(ids))
    abs_err, rel = _relative(got, expected)
    print(f"{name}: max |ours - diffusers| = {abs_err:.2e}, / max |diffusers| = {rel:.2e}")
    assert 0.1 < expected.abs().max().item() < 100
    assert rel <= 1e-5
    assert torch.equal(packed, got)  # the packed context is only a way to carry the same tensors
    assert (without_sizes - got).abs().max() > 1e-3  # the time ids do condition the output

    write_diffusers_unet(tmp_path / "back", model_config_from_diffusers(config, name), ours.state_dict())
    again = UNet2DConditionModel.from_pretrained(tmp_path / "back").eval()
    original = theirs.state_dict()
    assert again.state_dict().keys() == original.keys()
    assert all(torch.equal(v, original[k]) for k, v in again.state_dict().items())
    assert again.config.addition_embed_type == "text_time"


@pytest.mark.parametrize("name", list(CASES))
def test_sdxl_config_round_trips_through_diffusers(name):
    cfg = model_config_from_diffusers(CASES[name], name)
    exported = json.loads(json.dumps(diffusers_config_from_model(cfg)))
    with torch.device("meta"):
        rebuilt = UNet2DConditionModel.from_config(exported)
        original = UNet2DConditionModel.from_config(CASES[name])
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in original.state_dict().items()}
    assert model_config_from_diffusers(dict(rebuilt.config), "rebuilt") == cfg


def test_full_sdxl_base_layout_matches_key_for_key():
    cfg = model_config_from_diffusers(SDXL_BASE, "sdxl-base/unet/config.json")
    assert cfg.attention_levels == [False, True, True] and cfg.transformer_layers_per_block == [1, 2, 10]
    assert (cfg.channels_per_head, cfg.cross_attention_dim, cfg.upcast_attention) == (64, 2048, False)
    with torch.device("meta"):
        theirs = UNet2DConditionModel(**{k: v for k, v in SDXL_BASE.items() if not k.startswith("_")})
        ours = build_unet(cfg)
    their_shapes = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    our_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert sorted(our_shapes) == sorted(their_shapes)
    assert our_shapes == their_shapes
    n = sum(p.numel() for p in ours.parameters())
    print(f"SDXL base U-Net: {n:,} parameters, {len(our_shapes)} tensors")
    assert n == sum(p.numel() for p in theirs.parameters())
    assert ours.layout == ContextLayout(2048, 1280)


def test_text_time_needs_its_widths():
    broken = {**CASES["sdxl-tiny"], "projection_class_embeddings_input_dim": None}
    from ldm_train.model import UnsupportedUNetConfig
    with pytest.raises(UnsupportedUNetConfig, match="projection_class_embeddings_input_dim"):
        model_config_from_diffusers(broken, "x.json")
    with pytest.raises(ValueError, match="projection_class_embeddings_input_dim"):
        build_unet(model_config_from_diffusers(CASES["sdxl-tiny"], "x").model_copy(
            update={"projection_class_embeddings_input_dim": 48}))
