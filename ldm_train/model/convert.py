"""Conversion between diffusers' ``UNet2DConditionModel`` and :class:`ldm_train.model.UNet`:
configs, state dicts and folders. Reads and writes JSON + safetensors directly (diffusers is never
imported; weights are never unpickled).

The supported family is the SD U-Net: ``CrossAttnDownBlock2D``/``DownBlock2D`` levels, mirrored up
blocks, ``UNetMidBlock2DCrossAttn``, SiLU, positional (sinusoidal) time embedding, optional
``num_class_embeds`` class embedding, SDXL's ``addition_embed_type: text_time``. Anything else with a non-default value raises
:class:`UnsupportedUNetConfig` naming the key.

diffusers quirk: ``num_attention_heads`` must be None there, and its ``attention_head_dim`` is
then the head COUNT per level (SD 1.x: 8; SD 2.x: [5, 10, 20, 20]); ours is channels per head.
Parameter names are identical in both models by design, so the state-dict mapping is the identity
plus a strict key/shape check (:func:`check_state_dict`).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ldm_train.config import ModelConfig, migrate
from ldm_train.errors import UserError
from ldm_train.model.family import (
    ADDITION_TYPES, CROSS_DOWN, CROSS_UP, FAMILY_DEFAULTS, IGNORED, MID, MUST_BE, PLAIN_DOWN, PLAIN_UP, same_value,
)
from ldm_train.model.unet import attention_sites, build_unet, level_heads, validate_config

FORMAT = "ldm_train.unet"
CONFIG = "config.json"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_INDEX = DIFFUSERS_WEIGHTS + ".index.json"
PROJECT_WEIGHTS = "model.safetensors"


class UnsupportedUNetConfig(UserError):
    """A diffusers U-Net config outside the SD U-Net family; the message names key and source."""


class UNetWeightsError(UserError):
    """Missing, unexpected or wrongly shaped tensors; the message names them."""


class UNetFolderError(UserError):
    """A U-Net folder lacks a file or has an unreadable config; the message says what to provide."""




def _refuse(source: str, key: str, value, why: str) -> UnsupportedUNetConfig:
    return UnsupportedUNetConfig(f"{source}: unsupported UNet2DConditionModel config {key}={value!r}: {why}")


def _check_outside_family(cfg: dict, source: str) -> None:
    for key, value in cfg.items():
        if key.startswith("_") or key in IGNORED or key in FAMILY_DEFAULTS:
            continue
        if key not in MUST_BE:
            raise _refuse(source, key, value, "unknown key (not part of the SD U-Net family)")
        ok = any(same_value(value, allowed) for allowed in MUST_BE[key])
        if key == "only_cross_attention" and isinstance(value, list):
            ok = all(v is False for v in value)
        if not ok:
            why = f"ldm_train's U-Net supports only {' or '.join(repr(v) for v in MUST_BE[key])}"
            if key == "num_attention_heads":
                why += " (diffusers takes the head count from attention_head_dim)"
            raise _refuse(source, key, value, why)


def _get(cfg: dict, key: str):
    return cfg.get(key, FAMILY_DEFAULTS[key])


def _levels(cfg: dict, source: str) -> list[bool]:
    """attention_levels from down_block_types; up_block_types must mirror them."""
    down, up = list(_get(cfg, "down_block_types")), list(_get(cfg, "up_block_types"))
    for i, kind in enumerate(down):
        if kind not in (CROSS_DOWN, PLAIN_DOWN):
            raise _refuse(source, f"down_block_types[{i}]", kind, f"only {CROSS_DOWN} and {PLAIN_DOWN}")
    levels = [kind == CROSS_DOWN for kind in down]
    mirror = [CROSS_UP if a else PLAIN_UP for a in reversed(levels)]
    if up != mirror:
        raise _refuse(source, "up_block_types", up, f"must mirror down_block_types, i.e. {mirror}")
    if len(_get(cfg, "block_out_channels")) != len(down):
        raise _refuse(source, "block_out_channels", _get(cfg, "block_out_channels"), "one entry per down block")
    return levels


def _one_value(cfg: dict, key: str, n: int, source: str):
    """diffusers allows per-level layers_per_block / cross_attention_dim; ours has one value."""
    value = _get(cfg, key)
    if isinstance(value, (list, tuple)):
        if len(value) != n or len(set(value)) != 1:
            raise _refuse(source, key, value, "per-level values that differ are not supported")
        return value[0]
    return value


def _depths(cfg: dict, n: int, source: str) -> int | list[int]:
    value = _get(cfg, "transformer_layers_per_block")
    if isinstance(value, (list, tuple)):
        if len(value) != n or not all(isinstance(v, int) for v in value):
            raise _refuse(source, "transformer_layers_per_block", value, "give an int or one int per level")
        return list(value)
    return value


def _heads(cfg: dict, chs: list[int], levels: list[bool], source: str) -> dict:
    """diffusers' head COUNT(s) (its ``attention_head_dim``) -> our ``channels_per_head``, or
    per-level counts if widths differ."""
    raw, n = _get(cfg, "attention_head_dim"), len(chs)
    heads = [raw] * n if not isinstance(raw, (list, tuple)) else list(raw)
    if len(heads) != n:
        raise _refuse(source, "attention_head_dim", raw, "give an int or one head count per level")
    sites = attention_sites({"block_out_channels": chs, "attention_levels": levels})
    for i in sites:
        if not isinstance(heads[i], int) or heads[i] <= 0 or chs[i] % heads[i]:
            raise _refuse(source, "attention_head_dim", raw, f"level {i}: {chs[i]} channels do not split into that many heads")
    heads = [h if i in sites else (h if isinstance(h, int) and h > 0 else 1) for i, h in enumerate(heads)]
    widths = {chs[i] // heads[i] for i in sites}
    if len(widths) == 1:
        return {"channels_per_head": widths.pop(), "num_attention_heads": None}
    return {"channels_per_head": chs[sites[0]] // heads[sites[0]], "num_attention_heads": heads}


def _addition(cfg: dict, source: str) -> dict:
    """SDXL's ``addition_embed_type: text_time`` keys (the others are refused by MUST_BE)."""
    kind = _get(cfg, "addition_embed_type")
    if kind not in ADDITION_TYPES:
        raise _refuse(source, "addition_embed_type", kind, f"only {' or '.join(map(repr, ADDITION_TYPES))}")
    if kind is None:
        return {}
    dim, proj = _get(cfg, "addition_time_embed_dim"), _get(cfg, "projection_class_embeddings_input_dim")
    if dim is None or proj is None:
        raise _refuse(source, "addition_embed_type", kind,
                      "text_time needs addition_time_embed_dim and projection_class_embeddings_input_dim")
    return {"addition_embed_type": kind, "addition_time_embed_dim": dim, "projection_class_embeddings_input_dim": proj}


def model_config_from_diffusers(cfg: dict, source: str) -> ModelConfig:
    """Translate a diffusers ``UNet2DConditionModel`` config (``config.json`` as a dict).
    Raises :class:`UnsupportedUNetConfig` naming the key and ``source`` outside the family."""
    _check_outside_family(cfg, source)
    levels = _levels(cfg, source)
    chs, n = list(_get(cfg, "block_out_channels")), len(levels)
    if _get(cfg, "norm_num_groups") is None:
        raise _refuse(source, "norm_num_groups", None, "the U-Net needs GroupNorm")
    kw = dict(
        in_channels=_get(cfg, "in_channels"), out_channels=_get(cfg, "out_channels"), block_out_channels=chs,
        attention_levels=levels, layers_per_block=_one_value(cfg, "layers_per_block", n, source),
        cross_attention_dim=_one_value(cfg, "cross_attention_dim", n, source),
        norm_num_groups=_get(cfg, "norm_num_groups"), dropout=float(_get(cfg, "dropout")),
        transformer_layers_per_block=_depths(cfg, n, source),
        use_linear_projection=_get(cfg, "use_linear_projection"), flip_sin_to_cos=_get(cfg, "flip_sin_to_cos"),
        freq_shift=_get(cfg, "freq_shift"), norm_eps=float(_get(cfg, "norm_eps")),
        num_class_embeds=_get(cfg, "num_class_embeds"),
        upcast_attention=bool(_get(cfg, "upcast_attention")),  # SDXL's config has null
        **_heads(cfg, chs, levels, source), **_addition(cfg, source),
    )
    try:
        model_cfg = ModelConfig(**kw)
        validate_config(model_cfg.model_dump())
    except ValueError as e:  # pydantic's ValidationError is a ValueError too
        raise UnsupportedUNetConfig(f"{source}: cannot translate this UNet2DConditionModel config: {e}") from None
    return model_cfg


def diffusers_config_from_model(cfg: ModelConfig, sample_size: int | None = None) -> dict:
    """A config ``UNet2DConditionModel(**config)`` accepts and that builds the same architecture.
    ``attention_head_dim`` is written as diffusers' head count (an int when equal at every level)."""
    c, levels = cfg.model_dump(), cfg.attention_levels
    heads = level_heads(c)
    return {
        "_class_name": "UNet2DConditionModel", "sample_size": sample_size,
        "in_channels": c["in_channels"], "out_channels": c["out_channels"],
        "flip_sin_to_cos": c["flip_sin_to_cos"], "freq_shift": c["freq_shift"],
        "down_block_types": [CROSS_DOWN if a else PLAIN_DOWN for a in levels],
        "mid_block_type": MID, "up_block_types": [CROSS_UP if a else PLAIN_UP for a in reversed(levels)],
        "block_out_channels": list(c["block_out_channels"]), "layers_per_block": c["layers_per_block"],
        "dropout": c["dropout"], "act_fn": "silu", "norm_num_groups": c["norm_num_groups"], "norm_eps": c["norm_eps"],
        "cross_attention_dim": c["cross_attention_dim"],
        "transformer_layers_per_block": c["transformer_layers_per_block"],
        "attention_head_dim": heads[0] if len(set(heads)) == 1 else heads,
        "use_linear_projection": c["use_linear_projection"], "num_class_embeds": c["num_class_embeds"],
        "upcast_attention": c["upcast_attention"],
        **({"addition_embed_type": c["addition_embed_type"], "addition_time_embed_dim": c["addition_time_embed_dim"],
            "projection_class_embeddings_input_dim": c["projection_class_embeddings_input_dim"]}
           if c["addition_embed_type"] else {}),
    }


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name -> shape of the U-Net ``cfg`` describes (built on the meta device)."""
    with torch.device("meta"):
        model = build_unet(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _listing(names: list[str], limit: int = 8) -> str:
    more = f" ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_state_dict(state_dict: dict[str, torch.Tensor], cfg: ModelConfig, source: str) -> None:
    """Refuse missing or unexpected tensors and shape mismatches, naming each tensor."""
    expected = expected_shapes(cfg)
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = [f"{k} has shape {tuple(state_dict[k].shape)}, the config needs {expected[k]}"
             for k in expected if k in state_dict and tuple(state_dict[k].shape) != expected[k]]
    problems = [f"missing tensors: {_listing(missing)}"] if missing else []
    problems += [f"unexpected tensors: {_listing(unexpected)}"] if unexpected else []
    problems += wrong[:8]
    if problems:
        raise UNetWeightsError(f"{source}: weights do not fit the U-Net config:\n  " + "\n  ".join(problems))


def state_dict_from_diffusers(state_dict: dict, cfg: ModelConfig, source: str = "diffusers state dict") -> dict:
    """diffusers tensor names -> ours (identical names; checked, tensors and dtypes untouched)."""
    check_state_dict(state_dict, cfg, source)
    return dict(state_dict)


def state_dict_to_diffusers(state_dict: dict, cfg: ModelConfig, source: str = "ldm_train state dict") -> dict:
    """Our tensor names -> diffusers' (identical names; checked, tensors and dtypes untouched)."""
    check_state_dict(state_dict, cfg, source)
    return dict(state_dict)


# --- folders --------------------------------------------------------------------------------

def read_config_json(folder: str | Path, what: str) -> dict:
    """``folder/config.json`` as a dict; a clear error when the folder or file is missing."""
    path = Path(folder) / CONFIG
    if not path.is_file():
        raise UNetFolderError(f"{folder}: no {CONFIG}; provide {what}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UNetFolderError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise UNetFolderError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    return raw


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise UNetFolderError(f"{path}: not a readable safetensors file ({e})") from None


def _read_diffusers_weights(folder: Path) -> tuple[dict[str, torch.Tensor], str]:
    """``diffusion_pytorch_model.safetensors``, or the shards its ``.index.json`` lists."""
    single, index = folder / DIFFUSERS_WEIGHTS, folder / DIFFUSERS_INDEX
    if single.is_file():
        return _load_safetensors(single), str(single)
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            if not (folder / shard).is_file():
                raise UNetFolderError(f"{index}: lists shard {shard}, which is not in {folder}; provide it")
            state.update(_load_safetensors(folder / shard))
        return state, str(index)
    found = sorted(p.name for p in folder.glob("diffusion_pytorch_model*"))
    hint = f" (found only {', '.join(found)}; pickled .bin weights are never loaded: convert them to safetensors)" if found else ""
    raise UNetFolderError(f"{folder}: no U-Net weights; provide {DIFFUSERS_WEIGHTS} "
                          f"(or a sharded {DIFFUSERS_INDEX} with its shards) next to {CONFIG}{hint}")


def read_diffusers_unet(folder: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """A diffusers ``UNet2DConditionModel`` folder -> (ModelConfig, our state dict), checked."""
    folder = Path(folder)
    raw = read_config_json(folder, "the UNet2DConditionModel config.json of a diffusers U-Net folder")
    cfg = model_config_from_diffusers(raw, str(folder / CONFIG))
    state, source = _read_diffusers_weights(folder)
    return cfg, state_dict_from_diffusers(state, cfg, source)


def _save(state: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(path), metadata={"format": "pt"})


def write_diffusers_unet(folder: str | Path, cfg: ModelConfig, state_dict: dict[str, torch.Tensor],
                         sample_size: int | None = None) -> Path:
    """Write a folder ``UNet2DConditionModel.from_pretrained`` loads (dtypes kept)."""
    folder = Path(folder)
    out = state_dict_to_diffusers(state_dict, cfg)
    folder.mkdir(parents=True, exist_ok=True)
    config = diffusers_config_from_model(cfg, sample_size)
    (folder / CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    _save(out, folder / DIFFUSERS_WEIGHTS)
    return folder


def write_project_unet(folder: str | Path, cfg: ModelConfig, state_dict: dict[str, torch.Tensor]) -> Path:
    """Project format: ``config.json`` = {"format": "ldm_train.unet", "model": ...} + ``model.safetensors``."""
    folder = Path(folder)
    check_state_dict(state_dict, cfg, "state dict to write")
    folder.mkdir(parents=True, exist_ok=True)
    config = {"format": FORMAT, "model": cfg.model_dump()}
    (folder / CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    _save(state_dict, folder / PROJECT_WEIGHTS)
    return folder


def project_model_config(raw: dict, source: str) -> ModelConfig:
    """The ModelConfig of a project config.json (also the export stage's ``unet/config.json``,
    which has the ``model`` key without ``format``)."""
    if raw.get("format", FORMAT) != FORMAT or not isinstance(raw.get("model"), dict):
        raise UNetFolderError(f"{source}: not an ldm_train U-Net config (needs \"format\": \"{FORMAT}\" and \"model\")")
    try:
        return ModelConfig.model_validate(migrate({"model": raw["model"]})["model"])  # also a folder from before a rename
    except ValueError as e:
        raise UNetFolderError(f"{source}: invalid \"model\" section: {e}") from None


def read_project_unet(folder: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Project folder -> (ModelConfig, state dict), checked against each other."""
    folder = Path(folder)
    raw = read_config_json(folder, f"an ldm_train U-Net config.json ({{\"format\": \"{FORMAT}\", \"model\": ...}})")
    cfg = project_model_config(raw, str(folder / CONFIG))
    weights = folder / PROJECT_WEIGHTS
    if not weights.is_file():
        raise UNetFolderError(f"{folder}: no weights; provide {PROJECT_WEIGHTS} next to {CONFIG}")
    state = _load_safetensors(weights)
    check_state_dict(state, cfg, str(weights))
    return cfg, state
