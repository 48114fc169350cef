"""Stable Diffusion 1.x / 2.x single-file checkpoints (the original CompVis/Stability layout:
``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.*``), both ways.

Reading gives an :class:`SDCheckpoint`: each component under its diffusers / transformers names
with a config inferred from the tensor shapes (the file carries none), plus ``extras``: the
original-layout tensors no diffusers component holds (SD 1.x ``position_ids``, SD 2.x's last
OpenCLIP block, ``text_projection``, ``logit_scale``), kept verbatim so that writing back gives
the same keys and bytes. Writing is the exact inverse. The diffusers pipeline folder of a checkpoint
is read and written by :mod:`.pipeline_folder`. Only safetensors and
``torch.load(weights_only=True)`` are used: nothing is ever unpickled beyond tensors.

Conventions the configs take from the family (shapes do not say them): SD 1.x has 8 attention
heads at every level (diffusers' ``attention_head_dim=8``), SD 2.x 64 channels per head; both
CLIP towers have 64 channels per head; ``sample_size`` 64 (512 px: a 768-v model's 96 cannot be
seen in its weights); the VAE's ``scaling_factor`` is 0.18215.
"""
from __future__ import annotations

import json
import os
import re
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ldm_train.errors import UserError
from ldm_train.pretrained.sdxl_keys import (
    SDXL_CLIP, SDXL_OPEN_CLIP, SDXL_PREFIXES, SDXL_SCALING_FACTOR, check_sdxl_text, is_sdxl_file, projection_from_open_clip,
    projection_to_open_clip, sdxl_unet_config, with_projection,
)
from ldm_train.pretrained.ldm_keys import (
    OPEN_CLIP_LAYER, OPEN_CLIP_TOP, rename, unet_modules, vae_key_to_diffusers, vae_key_to_ldm,
)

UNET, VAE = "model.diffusion_model.", "first_stage_model."
CLIP, OPEN_CLIP = "cond_stage_model.transformer.", "cond_stage_model.model."
EMA = "model_ema."
SUFFIXES = (".safetensors", ".ckpt", ".pt")
EXTRAS_FILE = "ldm_train_single_file_extras.safetensors"
SCALING_FACTOR = 0.18215
# LatentDiffusion's registered schedule buffers: recomputed from the config by every loader
SCHEDULE = {
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar", "model_ema.decay", "model_ema.num_updates",
}
# Other families, recognised so that they are refused by name: (marker prefix, name)
OTHER_FAMILIES = (
    ("model.diffusion_model.joint_blocks.", "SD3"),
    ("model.diffusion_model.double_blocks.", "FLUX"),
    ("double_blocks.", "FLUX"),
    ("joint_blocks.", "SD3"),
    ("control_model.", "ControlNet"),
    ("low_scale_model.", "SD x4 upscaler"),
    ("model.diffusion_model.label_emb.", "class-conditioned SD (unCLIP / upscaler)"),
    ("down_blocks.", "diffusers-layout"),
)
class SingleFileError(UserError):
    """A file or folder that is not a supported SD checkpoint; the message names it and why."""


@dataclass
class SDCheckpoint:
    family: str  # "sd1" | "sd2" | "sdxl"
    unet_config: dict  # diffusers UNet2DConditionModel config.json
    unet: dict[str, torch.Tensor]  # diffusers UNet2DConditionModel keys
    vae_config: dict  # diffusers AutoencoderKL config.json
    vae: dict[str, torch.Tensor]  # diffusers AutoencoderKL keys
    text_config: dict  # transformers CLIPTextConfig config.json
    text: dict[str, torch.Tensor]  # CLIPTextModel checkpoint keys (text_model.*; every transformers loads them)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # original-layout keys, verbatim
    ema: bool = False  # the U-Net weights came from model_ema.*
    ignored: dict[str, int] = field(default_factory=dict)  # skipped key groups -> count
    text_2_config: dict | None = None  # sdxl: CLIPTextModelWithProjection config.json (OpenCLIP bigG)
    text_2: dict[str, torch.Tensor] | None = None  # sdxl: its checkpoint keys (text_model.*, text_projection.*)


# --------------------------------------------------------------------------------- file access
def _check_path(path: Path) -> None:
    if not path.is_file():
        raise SingleFileError(f"{path}: no such file")
    if path.suffix not in SUFFIXES:
        raise SingleFileError(f"{path}: unsupported checkpoint suffix {path.suffix!r} (use {', '.join(SUFFIXES)})")


def _safetensors_header(path: Path) -> dict[str, tuple[int, ...]]:
    """Shapes from the JSON header, checking that the data the header promises is all there."""
    size = path.stat().st_size
    with path.open("rb") as f:
        raw = f.read(8)
        n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
        if n < 2 or 8 + n > size:
            raise SingleFileError(f"{path}: truncated or corrupt safetensors file (its {size} bytes cannot hold "
                                  "the 8-byte header length and the JSON header it announces)")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise SingleFileError(f"{path}: corrupt safetensors header ({e})") from None
    header.pop("__metadata__", None)
    try:
        end = max((v["data_offsets"][1] for v in header.values()), default=0)
        shapes = {k: tuple(v["shape"]) for k, v in header.items()}
    except (KeyError, TypeError, IndexError):
        raise SingleFileError(f"{path}: corrupt safetensors header (an entry lacks shape or data_offsets)") from None
    if 8 + n + end != size:
        raise SingleFileError(f"{path}: truncated or corrupt safetensors file: its header describes "
                              f"{8 + n + end} bytes, the file has {size}")
    return shapes


def _load_ckpt(path: Path) -> dict:
    try:  # mmap: a zip-format .ckpt is not read into memory just to be inspected
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:  # noqa: BLE001 - any failure of the safe unpickler is the user's file
        found = re.search(r"GLOBAL ([\w.]+)", str(e))  # the class or function the pickle would import
        if not found:
            # torch's text suggests weights_only=False, the one thing not to do: keep its last reason
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and "weights_only" not in ln
                     and not ln.strip().startswith("Check the documentation")]
            reason = (lines[-1] if lines else type(e).__name__)[:200]
            raise SingleFileError(f"{path}: not a readable torch checkpoint ({reason})") from None
        detail = f"it imports {found[1]}"
        raise SingleFileError(
            f"{path}: torch.load(weights_only=True) refused it ({detail}): the file holds code or "
            "objects other than tensors, which only a full unpickle could build, and unpickling runs "
            "whatever code the file carries; convert it to .safetensors with a tool you trust") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise SingleFileError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    return obj


def _load(path: Path) -> tuple[dict[str, torch.Tensor], int]:
    """(tensors, number of non-tensor entries skipped)."""
    if path.suffix == ".safetensors":
        _safetensors_header(path)
        try:
            return load_file(str(path)), 0
        except (SafetensorError, OSError, ValueError) as e:
            raise SingleFileError(f"{path}: corrupt safetensors file ({e})") from None
    state = _load_ckpt(path)
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    return tensors, len(state) - len(tensors)


# ------------------------------------------------------------------------------ classification
def _classify(path: Path, shapes: dict[str, tuple[int, ...]]) -> str:
    """The family ("sd1" | "sd2" | "sdxl"), or a refusal naming what the file is instead."""
    if is_sdxl_file(shapes) and any(k.startswith(UNET) for k in shapes) and any(k.startswith(VAE) for k in shapes):
        try:
            check_sdxl_text(path, shapes)
        except ValueError as e:
            raise SingleFileError(str(e)) from None
        return "sdxl"
    for marker, name in OTHER_FAMILIES:
        if any(k.startswith(marker) for k in shapes):
            if name == "diffusers-layout":
                raise SingleFileError(f"{path}: a diffusers-layout state dict, not an original-layout SD "
                                      "single file; give the diffusers pipeline folder instead")
            raise SingleFileError(f"{path}: {name} single files are not supported yet (found {marker}*); "
                                  "only Stable Diffusion 1.x, 2.x and XL are")
    if not any(k.startswith(UNET) for k in shapes):
        raise SingleFileError(f"{path}: not a Stable Diffusion checkpoint (no {UNET}* U-Net keys)")
    if not any(k.startswith(VAE) for k in shapes):
        raise SingleFileError(f"{path}: no VAE ({VAE}* keys): not a full SD 1.x/2.x checkpoint")
    if CLIP + "text_model.embeddings.token_embedding.weight" in shapes:
        family, width = "sd1", shapes[CLIP + "text_model.embeddings.token_embedding.weight"][1]
    elif OPEN_CLIP + "token_embedding.weight" in shapes:
        family, width = "sd2", shapes[OPEN_CLIP + "token_embedding.weight"][1]
    else:
        raise SingleFileError(f"{path}: no text encoder ({CLIP}* for SD 1.x CLIP, {OPEN_CLIP}* for SD 2.x "
                              "OpenCLIP): not a full SD 1.x/2.x checkpoint")
    context = {s[1] for k, s in shapes.items() if k.startswith(UNET) and k.endswith("attn2.to_k.weight")}
    if context != {width}:
        raise SingleFileError(f"{path}: the U-Net attends to text of width {sorted(context)} "
                              f"(cross_attention_dim) but the text encoder is {width} wide")
    return family


def inspect_single_file(path) -> tuple[str, dict[str, tuple[int, ...]]]:
    """(family, {key: shape}) without reading the tensors of a .safetensors file (a .ckpt is
    memory-mapped where it is a zip); raises :class:`SingleFileError` for every refusal."""
    path = Path(path)
    _check_path(path)
    if path.suffix == ".safetensors":
        shapes = _safetensors_header(path)
    else:
        shapes = {k: tuple(v.shape) for k, v in _load_ckpt(path).items() if isinstance(v, torch.Tensor)}
    return _classify(path, shapes), shapes


def _sub(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


# --------------------------------------------------------------------------------------- U-Net
def _unet_levels(path: Path, unet: dict[str, torch.Tensor]) -> tuple[list[bool], list[int], list[int], int]:
    """(attends, channels, transformer depth per level, layers_per_block) from input_blocks."""
    if "input_blocks.0.0.weight" not in unet:
        raise SingleFileError(f"{path}: no {UNET}input_blocks.0.0.weight: not the SD U-Net layout")
    count = 1 + max(int(k.split(".")[1]) for k in unet if k.startswith("input_blocks."))
    levels: list[list[tuple[int, bool, int]]] = [[]]  # per level: (channels, attends, depth) per resnet
    for i in range(1, count):
        if f"input_blocks.{i}.0.op.weight" in unet:
            levels.append([])
            continue
        if f"input_blocks.{i}.0.out_layers.3.weight" not in unet:
            raise SingleFileError(f"{path}: {UNET}input_blocks.{i} is neither a resnet nor a downsampler")
        depth = len({k.split(".")[4] for k in unet if k.startswith(f"input_blocks.{i}.1.transformer_blocks.")})
        levels[-1].append((unet[f"input_blocks.{i}.0.out_layers.3.weight"].shape[0],
                           f"input_blocks.{i}.1.proj_in.weight" in unet, depth))
    per_level = {len(level) for level in levels}
    shapes = {(len({c for c, _, _ in lv}), len({a for _, a, _ in lv}), len({d for _, _, d in lv})) for lv in levels}
    if len(per_level) != 1 or shapes != {(1, 1, 1)}:
        raise SingleFileError(f"{path}: U-Net levels are not uniform ({levels}): not the SD U-Net layout")
    return [lv[0][1] for lv in levels], [lv[0][0] for lv in levels], [lv[0][2] for lv in levels], per_level.pop()


def unet_config_from_ldm(path: Path, family: str, unet: dict[str, torch.Tensor]) -> dict:
    """A diffusers UNet2DConditionModel config for LDM-named U-Net tensors (prefix stripped)."""
    attends, channels, depths, n = _unet_levels(path, unet)
    if "middle_block.1.proj_in.weight" not in unet or not any(attends):
        raise SingleFileError(f"{path}: the U-Net has no cross-attention: not an SD U-Net")
    proj = unet[next(f"input_blocks.{1 + i * (n + 1)}.1.proj_in.weight" for i, a in enumerate(attends) if a)]
    to_k = next(v for k, v in unet.items() if k.endswith("attn2.to_k.weight"))
    if family != "sd1" and any(c % 64 for c in channels):
        raise SingleFileError(f"{path}: SD 2.x U-Net channels {channels} are not multiples of 64 (its heads)")
    attention_depths = [d for d, a in zip(depths, attends) if a]
    config = {
        "_class_name": "UNet2DConditionModel",
        "sample_size": 64,
        "in_channels": unet["input_blocks.0.0.weight"].shape[1],
        "out_channels": unet["out.2.weight"].shape[0],
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attends],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attends)],
        "block_out_channels": channels,
        "layers_per_block": n,
        "cross_attention_dim": to_k.shape[1],
        # diffusers' attention_head_dim is the head COUNT: SD 1.x 8 everywhere, SD 2.x channels/64
        "attention_head_dim": [c // 64 for c in channels] if family != "sd1" else 8,
        "use_linear_projection": proj.ndim == 2,
        "norm_num_groups": 32, "norm_eps": 1e-5, "act_fn": "silu", "center_input_sample": False,
        "flip_sin_to_cos": True, "freq_shift": 0, "downsample_padding": 1, "mid_block_scale_factor": 1,
    }
    if len(set(attention_depths)) > 1 or attention_depths[0] != 1:
        per_level = [d if a else 1 for d, a in zip(depths, attends)]
        config["transformer_layers_per_block"] = per_level if len(set(attention_depths)) > 1 else attention_depths[0]
    return config


def _unet_table(config: dict) -> list:
    attends = [t.startswith("CrossAttn") for t in config["down_block_types"]]
    return unet_modules(attends, config["layers_per_block"])


def unet_to_diffusers(path: Path, config: dict, unet: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    table, out = _unet_table(config), {}
    for key, value in unet.items():
        new = rename(key, table)
        if new is None:
            raise SingleFileError(f"{path}: unexpected U-Net tensor {UNET}{key}: not the SD U-Net layout")
        out[new] = value
    return out


def unet_to_ldm(config: dict, unet: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    table, out = _unet_table(config), {}
    for key, value in unet.items():
        old = rename(key, table, reverse=True)
        if old is None:
            raise SingleFileError(f"U-Net tensor {key} has no place in the SD single-file layout")
        out[old] = value
    return out


def _pick_unet(path: Path, state: dict[str, torch.Tensor], ema: bool, ignored: dict[str, int]):
    """(LDM U-Net tensors, used EMA): LitEma names model_ema.<name without dots> for
    model.diffusion_model.<name> (the ``model.`` is the DiffusionWrapper it was registered on)."""
    raw = _sub(state, UNET)
    shadow = {k: k[len("model."):].replace(".", "") for k in (UNET + name for name in raw)}
    have = [EMA + flat in state for flat in shadow.values()]
    ema_keys = [k for k in state if k.startswith(EMA) and k not in SCHEDULE]
    if ema_keys and ema:
        if not all(have):
            raise SingleFileError(f"{path}: has {len(ema_keys)} {EMA}* tensors but not one for each of the "
                                  f"{len(raw)} U-Net tensors; read it with ema=False for the raw weights")
        ignored["unet_raw (EMA used)"] = len(raw)
        return {k[len(UNET):]: state[EMA + flat] for k, flat in shadow.items()}, True
    if ema_keys:
        ignored["model_ema (ema=False)"] = len(ema_keys)
    return raw, False


# ----------------------------------------------------------------------------------------- VAE
def vae_config_from_ldm(vae: dict[str, torch.Tensor]) -> dict:
    levels = 1 + max(int(k.split(".")[2]) for k in vae if k.startswith("encoder.down."))
    blocks = {int(k.split(".")[4]) for k in vae if k.startswith("encoder.down.0.block.")}
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": vae["encoder.conv_in.weight"].shape[1],
        "out_channels": vae["decoder.conv_out.weight"].shape[0],
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": [vae[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] for i in range(levels)],
        "layers_per_block": len(blocks),
        "latent_channels": vae["post_quant_conv.weight"].shape[0],
        "act_fn": "silu", "norm_num_groups": 32, "sample_size": 512, "scaling_factor": SCALING_FACTOR,
    }


def _is_vae_attention(key: str) -> bool:
    return ".mid_block.attentions.0.to_" in key and key.endswith(".weight")


def vae_to_diffusers(path: Path, config: dict, vae: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    levels, out = len(config["block_out_channels"]), {}
    for key, value in vae.items():
        new = vae_key_to_diffusers(key, levels)
        if new is None:
            raise SingleFileError(f"{path}: unexpected VAE tensor {VAE}{key}: not the SD VAE layout")
        # LDM's AttnBlock uses 1x1 convs, diffusers' Attention Linear layers: same numbers
        out[new] = value.flatten(1) if _is_vae_attention(new) else value
    return out


def vae_to_ldm(config: dict, vae: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    levels, out = len(config["block_out_channels"]), {}
    for key, value in vae.items():
        old = vae_key_to_ldm(key, levels)
        if old is None:
            raise SingleFileError(f"VAE tensor {key} has no place in the SD single-file layout")
        out[old] = value[:, :, None, None] if _is_vae_attention(key) else value
    return out


# ---------------------------------------------------------------------------------------- text
def _clip_config(family: str, vocab: int, width: int, positions: int, intermediate: int, layers: int,
                 projection: int) -> dict:
    return {
        "architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
        "vocab_size": vocab, "hidden_size": width, "intermediate_size": intermediate,
        "num_hidden_layers": layers, "num_attention_heads": width // 64,  # both CLIPs: 64 channels a head
        "max_position_embeddings": positions, "hidden_act": "gelu" if family == "sd2" else "quick_gelu",
        "layer_norm_eps": 1e-5, "projection_dim": projection, "attention_dropout": 0.0,
        "initializer_factor": 1.0, "initializer_range": 0.02,
        "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 0 if family == "sd2" else 49407,
    }


def _clip_text_from_ldm(state: dict[str, torch.Tensor], prefix: str = CLIP):
    """SD 1.x (and SDXL's first tower): the file holds a transformers CLIPTextModel already (``text_model.*``)."""
    sub = _sub(state, prefix)
    text = {k: v for k, v in sub.items() if k.startswith("text_model.") and not k.endswith(".position_ids")}
    extras = {prefix + k: v for k, v in sub.items() if k not in text}  # position_ids: a buffer, kept verbatim
    p = "text_model."
    layers = len({k.split(".")[3] for k in text if k.startswith(p + "encoder.layers.")})
    vocab, width = text[p + "embeddings.token_embedding.weight"].shape
    config = _clip_config("sd1", vocab, width, text[p + "embeddings.position_embedding.weight"].shape[0],
                          text[p + "encoder.layers.0.mlp.fc1.weight"].shape[0], layers, width)
    return config, text, extras


def _open_clip_text_from_ldm(path: Path, state: dict[str, torch.Tensor], prefix: str = OPEN_CLIP, keep_last: bool = False):
    """SD 2.x conditions on the penultimate OpenCLIP block (then ln_final), so, as in diffusers' SD 2
    ``text_encoder/``, the CLIPTextModel has every block but the last; that one, text_projection
    and logit_scale stay in the extras. ``keep_last`` (SDXL's bigG): every block, and the projection."""
    sub = _sub(state, prefix)
    blocks = 1 + max((int(k.split(".")[2]) for k in sub if k.startswith("transformer.resblocks.")), default=-1)
    if blocks < 2:
        raise SingleFileError(f"{path}: the OpenCLIP text tower has {blocks} blocks; SD 2.x uses the penultimate")
    text, extras = {}, {}
    for key, value in sub.items():
        if key in OPEN_CLIP_TOP:
            text[OPEN_CLIP_TOP[key]] = value
            continue
        parts = key.split(".")
        if parts[:2] != ["transformer", "resblocks"] or (int(parts[2]) == blocks - 1 and not keep_last):
            extras[prefix + key] = value
            continue
        layer, leaf = f"text_model.encoder.layers.{parts[2]}.", ".".join(parts[3:])
        if leaf in ("attn.in_proj_weight", "attn.in_proj_bias"):  # one [3C, ...] tensor -> q, k, v
            for name, chunk in zip("qkv", value.chunk(3)):
                text[f"{layer}self_attn.{name}_proj.{leaf.rsplit('_', 1)[1]}"] = chunk.clone()
            continue
        module, param = leaf.rsplit(".", 1)
        if module not in OPEN_CLIP_LAYER:
            raise SingleFileError(f"{path}: unexpected OpenCLIP tensor {prefix}{key}")
        text[f"{layer}{OPEN_CLIP_LAYER[module]}.{param}"] = value
    vocab, width = sub["token_embedding.weight"].shape
    projection = sub["text_projection"].shape[1] if "text_projection" in sub else width
    config = _clip_config("sd2", vocab, width, sub["positional_embedding"].shape[0],
                          sub["transformer.resblocks.0.mlp.c_fc.weight"].shape[0], blocks - (not keep_last), projection)
    if keep_last:
        text.update(projection_from_open_clip(sub))
        extras.pop(prefix + "text_projection")
    return config, text, extras


def _open_clip_text_to_ldm(config: dict, text: dict[str, torch.Tensor], extras: dict[str, torch.Tensor],
                           prefix: str = OPEN_CLIP, complete: bool = False):
    """Back to open_clip's layout; ``complete`` (SDXL's bigG): every block is there, no identity block."""
    back_top = {v: k for k, v in OPEN_CLIP_TOP.items()}
    back_layer = {v: k for k, v in OPEN_CLIP_LAYER.items()}
    out, n = {}, config["num_hidden_layers"]
    for key, value in text.items():
        if key in back_top:
            out[prefix + back_top[key]] = value
            continue
        if key.startswith("text_projection."):
            continue
        parts = key.split(".")  # text_model.encoder.layers.I.<module>.<param>
        block, module, param = f"{prefix}transformer.resblocks.{parts[3]}.", ".".join(parts[4:-1]), parts[-1]
        if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            if module == "self_attn.q_proj":  # q, k, v back into one in_proj tensor
                qkv = [text[f"{'.'.join(parts[:4])}.self_attn.{x}_proj.{param}"] for x in "qkv"]
                out[f"{block}attn.in_proj_{param}"] = torch.cat(qkv)
            continue
        out[f"{block}{back_layer[module]}.{param}"] = value
    last = f"{prefix}transformer.resblocks.{n}."
    if not complete and not any(k.startswith(last) for k in extras):
        out.update(_identity_block(last, config, text["text_model.final_layer_norm.weight"].dtype))
    return out


def _identity_block(prefix: str, config: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A residual block that returns its input: attention and MLP outputs are zeroed (out_proj and
    c_proj weights and biases 0), so the last and the penultimate layer give the same states and
    a loader that conditions on either (SD 2's penultimate, or a plain last-layer CLIP) gets the
    conditioning of the CLIPTextModel we were given."""
    c, i = config["hidden_size"], config["intermediate_size"]
    z = lambda *s: torch.zeros(*s, dtype=dtype)  # noqa: E731
    return {
        prefix + "ln_1.weight": torch.ones(c, dtype=dtype), prefix + "ln_1.bias": z(c),
        prefix + "attn.in_proj_weight": z(3 * c, c), prefix + "attn.in_proj_bias": z(3 * c),
        prefix + "attn.out_proj.weight": z(c, c), prefix + "attn.out_proj.bias": z(c),
        prefix + "ln_2.weight": torch.ones(c, dtype=dtype), prefix + "ln_2.bias": z(c),
        prefix + "mlp.c_fc.weight": z(i, c), prefix + "mlp.c_fc.bias": z(i),
        prefix + "mlp.c_proj.weight": z(c, i), prefix + "mlp.c_proj.bias": z(c),
    }


def clip_text_state_dict(text: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``SDCheckpoint.text`` under the names ``model.load_state_dict`` wants: transformers >= 5.6
    keeps CLIPTextModel's layers without the ``text_model.`` prefix its checkpoints have."""
    if any(k.startswith("text_model.") for k in model.state_dict()):
        return dict(text)
    return {k.removeprefix("text_model."): v for k, v in text.items()}


# ----------------------------------------------------------------------------- read and write
def read_single_file(path, *, ema: bool = True) -> SDCheckpoint:
    """An SD 1.x / 2.x single file as diffusers components; the EMA U-Net where the file has one
    and ``ema`` (LDM keeps it as ``model_ema.*``)."""
    path = Path(path)
    _check_path(path)
    state, non_tensors = _load(path)
    ckpt = from_single_file_state(state, ema=ema, source=path)
    if non_tensors:
        ckpt.ignored["non-tensor entries"] = non_tensors
    return ckpt


def from_single_file_state(state: dict[str, torch.Tensor], *, ema: bool = True, source="state dict") -> SDCheckpoint:
    """:func:`read_single_file` on an original-layout state dict already in memory (``source``
    names it in refusals); works on meta tensors too, for checks at real SD sizes."""
    path = Path(source)
    family = _classify(path, {k: tuple(v.shape) for k, v in state.items()})
    try:
        return _convert(path, family, state, ema)
    except KeyError as e:  # a config inference met a tensor every SD checkpoint has
        raise SingleFileError(f"{path}: incomplete {family} checkpoint: no tensor {e.args[0]}") from None
    except ValueError as e:  # SDXL widths that do not fit together
        raise SingleFileError(f"{path}: {e}") from None


def _convert(path: Path, family: str, state: dict[str, torch.Tensor], ema: bool) -> SDCheckpoint:
    ignored = {"schedule": sum(k in SCHEDULE and not k.startswith(EMA) for k in state),
               "model_ema.decay/num_updates": sum(k in SCHEDULE and k.startswith(EMA) for k in state)}
    unet_ldm, used_ema = _pick_unet(path, state, ema, ignored)
    unet_config = unet_config_from_ldm(path, family, unet_ldm)
    vae_ldm = _sub(state, VAE)
    extras = {VAE + k: vae_ldm.pop(k) for k in list(vae_ldm) if k.startswith("loss.")}  # a training loss's
    vae_config = vae_config_from_ldm(vae_ldm)
    text_2_config = text_2 = None
    if family == "sdxl":
        text_config, text, text_extras = _clip_text_from_ldm(state, SDXL_CLIP)
        text_2_config, text_2, extras_2 = _open_clip_text_from_ldm(path, state, SDXL_OPEN_CLIP, keep_last=True)
        text_2_config = with_projection(text_2_config)
        text_extras.update(extras_2)
        unet_config = sdxl_unet_config(unet_config, unet_ldm, text_2_config["projection_dim"])
        vae_config["scaling_factor"] = SDXL_SCALING_FACTOR
    elif family == "sd1":
        text_config, text, text_extras = _clip_text_from_ldm(state)
    else:
        text_config, text, text_extras = _open_clip_text_from_ldm(path, state)
    known = (UNET, VAE, EMA, CLIP, OPEN_CLIP, *SDXL_PREFIXES)
    extras.update(text_extras)
    extras.update({k: v for k, v in state.items() if not k.startswith(known) and k not in SCHEDULE})
    return SDCheckpoint(
        family=family, unet_config=unet_config, unet=unet_to_diffusers(path, unet_config, unet_ldm),
        vae_config=vae_config, vae=vae_to_diffusers(path, vae_config, vae_ldm),
        text_config=text_config, text=text, extras=extras, ema=used_ema,
        ignored={k: n for k, n in ignored.items() if n}, text_2_config=text_2_config, text_2=text_2,
    )


def to_single_file_state(ckpt: SDCheckpoint, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The original-layout state dict of ``ckpt`` (what :func:`write_single_file` writes)."""
    state = {UNET + k: v for k, v in unet_to_ldm(ckpt.unet_config, ckpt.unet).items()}
    state.update({VAE + k: v for k, v in vae_to_ldm(ckpt.vae_config, ckpt.vae).items()})
    if ckpt.family == "sd1":
        state.update({CLIP + k: v for k, v in ckpt.text.items()})
    elif ckpt.family == "sd2":
        state.update(_open_clip_text_to_ldm(ckpt.text_config, ckpt.text, ckpt.extras))
    elif ckpt.family == "sdxl":
        state.update({SDXL_CLIP + k: v for k, v in ckpt.text.items()})
        state.update(_open_clip_text_to_ldm(ckpt.text_2_config, ckpt.text_2, ckpt.extras, SDXL_OPEN_CLIP, complete=True))
        state.update(projection_to_open_clip(ckpt.text_2))
    else:
        raise SingleFileError(f"unknown SD family {ckpt.family!r} (sd1, sd2 or sdxl)")
    state.update(ckpt.extras)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    return state


def _separate(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous tensors that share no memory (safetensors refuses shared storage)."""
    seen, out = set(), {}
    for key, value in state.items():
        value = value.detach().contiguous()
        ptr = (value.untyped_storage().data_ptr(), value.storage_offset())
        out[key] = value.clone() if ptr in seen or value.untyped_storage().nbytes() != value.nbytes else value
        seen.add(ptr)
    return out


def write_single_file(path, ckpt: SDCheckpoint, dtype: torch.dtype | None = None) -> None:
    """``ckpt`` in the original SD layout (``dtype`` None keeps each tensor's); .safetensors, or a
    .ckpt/.pt holding ``{"state_dict": ...}`` as LDM saves them. Written to a temporary name first."""
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise SingleFileError(f"{path}: unsupported checkpoint suffix {path.suffix!r} (use {', '.join(SUFFIXES)})")
    state = _separate(to_single_file_state(ckpt, dtype))
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    if path.suffix == ".safetensors":
        save_file(state, str(partial), metadata={"format": "pt"})
    else:
        torch.save({"state_dict": state}, partial)
    os.replace(partial, path)
