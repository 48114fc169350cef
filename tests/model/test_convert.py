"""diffusers config translation, the strict state-dict check, folder I/O in both formats and
load_unet / load_unet_weights. No diffusers here (see test_parity.py for that)."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import ldm_train
from ldm_train.config import ModelConfig
from ldm_train.errors import UserError
from ldm_train.model import (
    UNetArchitectureMismatch,
    UNetFolderError,
    UNetWeightsError,
    UnsupportedUNetConfig,
    build_unet,
    diffusers_config_from_model,
    load_unet,
    load_unet_weights,
    model_config_from_diffusers,
    read_diffusers_unet,
    read_project_unet,
    write_diffusers_unet,
    write_project_unet,
)

MODEL_DIR = Path(__file__).resolve().parents[2] / "ldm_train" / "model"
TINY = ModelConfig(block_out_channels=[16, 32], attention_levels=[False, True], channels_per_head=8,
                   cross_attention_dim=12, norm_num_groups=8)
# SD 1.x-style diffusers config at toy width: attention_head_dim = 8 heads at every level.
SD1_STYLE = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "sample_size": 64,
    "block_out_channels": [32, 64, 64, 64], "layers_per_block": 2, "cross_attention_dim": 32,
    "attention_head_dim": 8, "norm_num_groups": 8, "center_input_sample": False, "downsample_padding": 1,
    "mid_block_scale_factor": 1, "act_fn": "silu", "flip_sin_to_cos": True, "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SD2_STYLE = {**SD1_STYLE, "attention_head_dim": [1, 2, 4, 4], "block_out_channels": [16, 32, 64, 64],
             "use_linear_projection": True, "dual_cross_attention": False, "only_cross_attention": False,
             "num_class_embeds": None, "upcast_attention": True, "class_embed_type": None}


def _state(cfg: ModelConfig, dtype=torch.float32, seed=0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.to(dtype) for k, v in build_unet(cfg).state_dict().items()}


# --- config translation ----------------------------------------------------------------------

def test_sd1_style_head_counts_become_per_level_heads():
    cfg = model_config_from_diffusers(SD1_STYLE, "sd1.json")
    assert cfg.attention_levels == [True, True, True, False]
    assert cfg.num_attention_heads == [8, 8, 8, 8]  # head width 4, 8, 8: not one channels_per_head
    assert (cfg.layers_per_block, cfg.cross_attention_dim, cfg.use_linear_projection) == (2, 32, False)


def test_sd2_style_constant_head_width_becomes_channels_per_head():
    cfg = model_config_from_diffusers(SD2_STYLE, "sd2.json")
    assert (cfg.channels_per_head, cfg.num_attention_heads) == (16, None)
    assert cfg.use_linear_projection and cfg.upcast_attention


def test_missing_keys_take_diffusers_defaults():
    cfg = model_config_from_diffusers({"_class_name": "UNet2DConditionModel"}, "x")
    assert cfg.block_out_channels == [320, 640, 1280, 1280] and cfg.num_attention_heads == [8] * 4
    assert (cfg.cross_attention_dim, cfg.layers_per_block, cfg.norm_eps) == (1280, 2, 1e-5)


@pytest.mark.parametrize("cfg", [
    TINY,
    ModelConfig(),
    ModelConfig(block_out_channels=[32, 64, 96], attention_levels=[True, False, True], num_attention_heads=[2, 3, 4],
                channels_per_head=16, transformer_layers_per_block=[1, 2, 3], use_linear_projection=True, flip_sin_to_cos=False,
                freq_shift=1, norm_eps=1e-6, num_class_embeds=10, upcast_attention=True, in_channels=3,
                out_channels=6, layers_per_block=2, dropout=0.1, norm_num_groups=16),
], ids=["tiny", "default", "everything"])
def test_config_round_trip(cfg):
    back = model_config_from_diffusers(json.loads(json.dumps(diffusers_config_from_model(cfg))), "rt")
    assert back.model_dump() == cfg.model_dump()
    assert diffusers_config_from_model(cfg)["_class_name"] == "UNet2DConditionModel"


def test_diffusers_head_count_is_int_when_equal():
    cfg = model_config_from_diffusers(SD1_STYLE, "sd1.json")
    assert diffusers_config_from_model(cfg, sample_size=64)["attention_head_dim"] == 8
    assert diffusers_config_from_model(cfg, sample_size=64)["sample_size"] == 64


@pytest.mark.parametrize("key, value", [
    ("addition_embed_type", "text_time"), ("encoder_hid_dim", 768), ("only_cross_attention", True),
    ("only_cross_attention", [False, True, False, False]), ("dual_cross_attention", True),
    ("class_embed_type", "timestep"), ("resnet_time_scale_shift", "scale_shift"), ("conv_in_kernel", 7),
    ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"), ("mid_block_type", None), ("time_cond_proj_dim", 256),
    ("attention_type", "gated"), ("reverse_transformer_layers_per_block", [[1], [1], [1], [1]]),
    ("num_attention_heads", 8), ("act_fn", "gelu"), ("time_embedding_type", "fourier"),
    ("downsample_padding", True), ("center_input_sample", True), ("some_future_key", 1),
    ("down_block_types", ["SimpleCrossAttnDownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D"]),
    ("up_block_types", ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]),
    ("layers_per_block", [2, 2, 1, 1]), ("cross_attention_dim", [32, 64, 64, 64]),
    ("transformer_layers_per_block", [[1, 2], 1, 1, 1]), ("attention_head_dim", 7), ("norm_num_groups", None),
    ("block_out_channels", [32, 64, 64]),
])
def test_outside_the_family_is_refused_naming_key_and_source(key, value):
    with pytest.raises(UnsupportedUNetConfig) as info:
        model_config_from_diffusers({**SD1_STYLE, key: value}, "/models/odd/config.json")
    assert isinstance(info.value, UserError)
    assert key in str(info.value) and "/models/odd/config.json" in str(info.value)


@pytest.mark.parametrize("key, value", [
    ("only_cross_attention", [False] * 4), ("mid_block_only_cross_attention", None), ("mid_block_scale_factor", 1.0),
    ("class_embed_type", None), ("addition_embed_type_num_heads", 64), ("transformer_layers_per_block", [1, 2, 3, 4]),
    ("layers_per_block", [2, 2, 2, 2]), ("sample_size", 96), ("_name_or_path", "x"),
])
def test_defaults_and_equivalents_are_accepted(key, value):
    model_config_from_diffusers({**SD1_STYLE, key: value}, "ok.json")


# --- state-dict check and folders ----------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_project_folder_round_trip_is_bit_identical(tmp_path, dtype):
    state = _state(TINY, dtype)
    write_project_unet(tmp_path, TINY, state)
    assert json.loads((tmp_path / "config.json").read_text())["format"] == "ldm_train.unet"
    cfg, back = read_project_unet(tmp_path)
    assert cfg == TINY and back.keys() == state.keys()
    assert all(back[k].dtype == dtype and torch.equal(back[k], state[k]) for k in state)


def test_project_folder_written_before_the_rename_reads_attention_head_dim_as_channels_per_head(tmp_path):
    write_project_unet(tmp_path, TINY, _state(TINY, torch.float32))
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["model"]["attention_head_dim"] = raw["model"].pop("channels_per_head")
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert read_project_unet(tmp_path)[0] == TINY


def test_diffusers_folder_round_trip_and_shards(tmp_path):
    cfg = model_config_from_diffusers(SD2_STYLE, "sd2")
    state = _state(cfg, torch.float16)
    write_diffusers_unet(tmp_path / "one", cfg, state)
    back_cfg, back = read_diffusers_unet(tmp_path / "one")
    assert back_cfg == cfg and all(torch.equal(back[k], v) and back[k].dtype == v.dtype for k, v in state.items())
    shards, names = tmp_path / "sharded", sorted(state)
    shards.mkdir()
    (shards / "config.json").write_text(json.dumps(diffusers_config_from_model(cfg)))
    halves = {"part-1.safetensors": names[::2], "part-2.safetensors": names[1::2]}
    for file, keys in halves.items():
        save_file({k: state[k] for k in keys}, str(shards / file))
    index = {"weight_map": {k: f for f, keys in halves.items() for k in keys}}
    (shards / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    _, sharded = read_diffusers_unet(shards)
    assert all(torch.equal(sharded[k], v) for k, v in state.items())
    (shards / "part-2.safetensors").unlink()
    with pytest.raises(UNetFolderError, match="part-2.safetensors"):
        read_diffusers_unet(shards)


def _broken_folder(tmp_path: Path, change) -> Path:
    state = _state(TINY)
    change(state)
    (tmp_path / "config.json").write_text(json.dumps(diffusers_config_from_model(TINY)))
    save_file(state, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    return tmp_path


KEY = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"


@pytest.mark.parametrize("change, words", [
    (lambda s: s.pop(KEY), ["missing", KEY]),
    (lambda s: s.update({"down_blocks.1.extra.weight": torch.zeros(2)}), ["unexpected", "down_blocks.1.extra.weight"]),
    (lambda s: s.update({KEY: torch.zeros(32, 13)}), [KEY, "(32, 13)", "(32, 12)"]),
], ids=["missing", "extra", "shape"])
def test_bad_tensors_are_refused_naming_them(tmp_path, change, words):
    folder = _broken_folder(tmp_path, change)
    for read in (read_diffusers_unet, load_unet):
        with pytest.raises(UNetWeightsError) as info:
            read(folder)
        assert all(w in str(info.value) for w in words), str(info.value)


def test_missing_files_say_what_to_provide(tmp_path):
    with pytest.raises(UNetFolderError, match="config.json"):
        read_diffusers_unet(tmp_path / "nowhere")
    with pytest.raises(UNetFolderError, match="config.json"):
        load_unet(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(SD1_STYLE))
    with pytest.raises(UNetFolderError, match="provide diffusion_pytorch_model.safetensors"):
        read_diffusers_unet(tmp_path)
    (tmp_path / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(UNetFolderError, match="found only diffusion_pytorch_model.bin.*safetensors"):
        load_unet(tmp_path)
    project = tmp_path / "project"
    project.mkdir()
    (project / "config.json").write_text(json.dumps({"format": "ldm_train.unet", "model": TINY.model_dump()}))
    with pytest.raises(UNetFolderError, match="provide model.safetensors"):
        read_project_unet(project)
    (project / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(UNetFolderError, match="AutoencoderKL"):
        load_unet(project)


# --- load_unet / load_unet_weights ---------------------------------------------------------

def test_load_unet_detects_format_and_keeps_dtype(tmp_path):
    state = _state(TINY, torch.float16)
    write_project_unet(tmp_path / "ours", TINY, state)
    write_diffusers_unet(tmp_path / "pipe" / "unet", TINY, state)
    for path in (tmp_path / "ours", tmp_path / "pipe", tmp_path / "pipe" / "unet"):
        model = ldm_train.load_unet(path)
        assert not model.training and model.config == build_unet(TINY).config
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
        assert model.conv_in.weight.dtype == torch.float16 and not model.conv_in.weight.is_meta
        assert model.conv_in.weight.requires_grad
    model = load_unet(tmp_path / "ours", dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    x = torch.randn(1, 4, 8, 8)
    assert model(x, 10, torch.randn(1, 3, 12)).shape == x.shape


def test_export_stage_unet_folder_loads(tmp_path):
    """The export's unet/config.json ({"model": ..., "latent_shape": ...}) is the project format."""
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"model": TINY.model_dump(), "latent_shape": [4, 8, 8]}))
    save_file(_state(TINY), str(tmp_path / "unet" / "model.safetensors"))
    assert load_unet(tmp_path).config["cross_attention_dim"] == 12


def test_load_unet_weights_initialises_and_checks_architecture(tmp_path):
    state = _state(TINY, seed=1)
    write_diffusers_unet(tmp_path, TINY, state)
    model = build_unet(TINY.model_copy(update={"upcast_attention": True, "dropout": 0.1, "init_from": str(tmp_path)}))
    model = model.to(torch.bfloat16)
    load_unet_weights(model, tmp_path)
    assert all(torch.equal(v, state[k].to(torch.bfloat16)) and v.dtype == torch.bfloat16
               for k, v in model.state_dict().items())
    for change, key in [({"cross_attention_dim": 16}, "model.cross_attention_dim"),
                        ({"channels_per_head": 16}, "model.num_attention_heads/channels_per_head"),
                        ({"transformer_layers_per_block": 2}, "model.transformer_layers_per_block"),
                        ({"freq_shift": 1}, "model.freq_shift")]:
        with pytest.raises(UNetArchitectureMismatch, match=key):
            load_unet_weights(build_unet(TINY.model_copy(update=change)), tmp_path)


# --- import hygiene --------------------------------------------------------------------------

def test_model_code_never_imports_diffusers_or_distributed_stacks():
    pattern = re.compile(r"^\s*(import|from)\s+(diffusers|accelerate|deepspeed|torch\.distributed)\b", re.M)
    for path in MODEL_DIR.glob("*.py"):
        assert not pattern.search(path.read_text()), path.name


def test_imports_stay_light():
    code = (
        "import sys, ldm_train; assert callable(ldm_train.load_unet); assert 'torch' not in sys.modules;"
        "import ldm_train.model.load;"
        "bad = [m for m in ('diffusers', 'accelerate', 'deepspeed') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
