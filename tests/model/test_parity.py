"""Numerical and structural parity with diffusers' UNet2DConditionModel: random-initialised
diffusers U-Nets of the SD family convert to ours with equal outputs (fp32), and back to
bit-identical tensors that diffusers loads; the full SD 1.5 / SD 2.1 layouts match key for key."""
from __future__ import annotations

import json

import pytest
import torch

from ldm_train.model import (
    UnsupportedUNetConfig,
    build_unet,
    diffusers_config_from_model,
    load_unet,
    model_config_from_diffusers,
    write_diffusers_unet,
)

diffusers = pytest.importorskip("diffusers")
UNet2DConditionModel = diffusers.UNet2DConditionModel

DOWN4 = ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
UP4 = ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
SD15 = {  # runwayml/stable-diffusion-v1-5 unet/config.json
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "act_fn": "silu",
    "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
    "cross_attention_dim": 768, "down_block_types": DOWN4, "downsample_padding": 1, "flip_sin_to_cos": True,
    "freq_shift": 0, "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05,
    "norm_num_groups": 32, "out_channels": 4, "sample_size": 64, "up_block_types": UP4,
}
SD21 = {  # stabilityai/stable-diffusion-2-1 unet/config.json
    **SD15, "_diffusers_version": "0.10.0.dev0", "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024,
    "dual_cross_attention": False, "num_class_embeds": None, "only_cross_attention": False, "sample_size": 96,
    "upcast_attention": True, "use_linear_projection": True,
}
CASES = {
    "tiny": {"block_out_channels": [32, 64], "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
             "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "layers_per_block": 1, "attention_head_dim": 4,
             "cross_attention_dim": 24, "norm_num_groups": 8},
    "sd15-like": {**SD15, "block_out_channels": [32, 64, 64, 64], "cross_attention_dim": 32, "norm_num_groups": 8},
    "sd21-like": {**SD21, "block_out_channels": [16, 32, 64, 64], "attention_head_dim": [1, 2, 4, 4],
                  "cross_attention_dim": 32, "norm_num_groups": 8},
    "depth-class-upcast": {**SD15, "block_out_channels": [32, 64, 64], "down_block_types": DOWN4[1:],
                           "up_block_types": UP4[:3], "transformer_layers_per_block": [2, 1, 3],
                           "attention_head_dim": [2, 4, 8], "num_class_embeds": 5, "upcast_attention": True,
                           "use_linear_projection": True, "cross_attention_dim": 32, "norm_num_groups": 8,
                           "freq_shift": 1, "flip_sin_to_cos": False, "norm_eps": 1e-6, "out_channels": 8},
}


def _diffusers_unet(config: dict, seed: int = 0):
    torch.manual_seed(seed)
    model = UNet2DConditionModel.from_config(config).eval()
    with torch.no_grad():  # non-default, non-symmetric values everywhere (diffusers zero-inits nothing, but be sure)
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def _inputs(config: dict, size: int = 16, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, config.get("in_channels", 4), size, size, generator=g)
    ctx = torch.randn(2, 7, config["cross_attention_dim"], generator=g)
    labels = torch.tensor([1, 4]) if config.get("num_class_embeds") else None
    return x, torch.tensor([17, 803]), ctx, labels


@pytest.mark.parametrize("name", list(CASES))
def test_converted_model_matches_diffusers(name, tmp_path):
    config = CASES[name]
    theirs = _diffusers_unet(config)
    theirs.save_pretrained(tmp_path / "diffusers")  # safetensors by default
    ours = load_unet(tmp_path / "diffusers")
    x, t, ctx, labels = _inputs(config)
    with torch.no_grad():
        expected = theirs(x, t, ctx, class_labels=labels).sample
        got = ours(x, t, ctx, labels)
    scale = expected.abs().max().item()
    relative = (got - expected).abs().max().item() / scale
    print(f"{name}: max |ours - diffusers| / max |diffusers| = {relative:.2e} (scale {scale:.3g})")
    assert 0.1 < scale < 100
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * scale)

    write_diffusers_unet(tmp_path / "back", model_config_from_diffusers(config, name), ours.state_dict())
    again = UNet2DConditionModel.from_pretrained(tmp_path / "back").eval()
    original = theirs.state_dict()
    assert again.state_dict().keys() == original.keys()
    assert all(torch.equal(v, original[k]) for k, v in again.state_dict().items())
    with torch.no_grad():
        assert torch.equal(again(x, t, ctx, class_labels=labels).sample, expected)


@pytest.mark.parametrize("name", list(CASES))
def test_diffusers_config_from_model_builds_the_same_architecture(name):
    cfg = model_config_from_diffusers(CASES[name], name)
    exported = json.loads(json.dumps(diffusers_config_from_model(cfg)))
    with torch.device("meta"):
        rebuilt = UNet2DConditionModel.from_config(exported)
        original = UNet2DConditionModel.from_config(CASES[name])
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in original.state_dict().items()}
    assert model_config_from_diffusers(dict(rebuilt.config), "rebuilt") == cfg


@pytest.mark.parametrize("config, params", [(SD15, 859_520_964), (SD21, 865_910_724)], ids=["sd1.5", "sd2.1"])
def test_full_sd_layouts_match_key_for_key(config, params):
    cfg = model_config_from_diffusers(config, "sd")
    with torch.device("meta"):
        theirs = UNet2DConditionModel(**{k: v for k, v in config.items() if not k.startswith("_")})
        ours = build_unet(cfg)
    their_shapes = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    our_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert sorted(our_shapes) == sorted(their_shapes)
    assert our_shapes == their_shapes
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters()) == params


def test_config_outside_family_names_key():
    kandinsky_like = {**SD15, "addition_embed_type": "text_image"}
    with pytest.raises(UnsupportedUNetConfig) as info:
        model_config_from_diffusers(kandinsky_like, "kandinsky/config.json")
    assert "addition_embed_type" in str(info.value) and "kandinsky/config.json" in str(info.value)
