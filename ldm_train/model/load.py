"""Load a U-Net from a diffusers ``UNet2DConditionModel`` folder or a project U-Net folder.

The format is detected from ``config.json``: ``"format": "ldm_train.unet"`` (or a ``model``
section, as in an export's ``unet/``) is ours; ``"_class_name": "UNet2DConditionModel"`` (or
``down_block_types``) is diffusers'. A pipeline folder with a ``unet/`` subfolder works too.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ldm_train.config import ModelConfig
from ldm_train.errors import UserError
from ldm_train.model.convert import (
    CONFIG,
    FORMAT,
    UNetFolderError,
    read_config_json,
    read_diffusers_unet,
    read_project_unet,
)
from ldm_train.model.unet import UNet, attention_sites, build_unet, level_depths, level_heads, unet_kwargs

# Keys that change the function the weights compute; dropout, upcast_attention (precision only),
# gradient_checkpointing and init_from may differ between the config and the folder.
ARCHITECTURE_KEYS = (
    "in_channels", "out_channels", "block_out_channels", "attention_levels", "layers_per_block",
    "cross_attention_dim", "use_linear_projection", "flip_sin_to_cos", "freq_shift", "norm_num_groups",
    "norm_eps", "num_class_embeds", "addition_embed_type", "addition_time_embed_dim",
    "projection_class_embeddings_input_dim",
)


class UNetArchitectureMismatch(UserError):
    """The weights on disk are for another architecture than the configured model."""


def unet_folder(path: str | Path) -> Path:
    """``path`` itself, or its ``unet/`` subfolder for a pipeline/export folder."""
    path = Path(path)
    if not (path / CONFIG).is_file() and (path / "unet" / CONFIG).is_file():
        return path / "unet"
    return path


def detect_format(raw: dict, source: str) -> str:
    """'project' or 'diffusers' from a config.json's content."""
    if raw.get("format") == FORMAT or ("format" not in raw and isinstance(raw.get("model"), dict)):
        return "project"
    if raw.get("_class_name") == "UNet2DConditionModel" or (
        "_class_name" not in raw and "down_block_types" in raw
    ):
        return "diffusers"
    kind = raw.get("_class_name") or raw.get("format")
    raise UNetFolderError(
        f"{source}: not a U-Net config ({kind!r}); provide a diffusers UNet2DConditionModel folder or an "
        f"ldm_train U-Net folder (\"format\": \"{FORMAT}\")"
    )


def read_unet(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(ModelConfig, state dict) of a U-Net folder in either format."""
    folder = unet_folder(path)
    raw = read_config_json(folder, "a diffusers U-Net folder or an ldm_train U-Net folder")
    if detect_format(raw, str(folder / CONFIG)) == "project":
        return read_project_unet(folder)
    return read_diffusers_unet(folder)


def load_unet(path: str | Path, dtype: torch.dtype | None = None) -> UNet:
    """A ready :class:`UNet` (eval mode, CPU) from either format; ``dtype=None`` keeps the
    stored dtypes. Built on the meta device, so the weights are never allocated twice."""
    cfg, state = read_unet(path)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    with torch.device("meta"):
        model = build_unet(cfg)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def architecture_differences(ours: dict, theirs: dict) -> list[str]:
    """``model.<key>: ours vs theirs`` for every key that changes what the weights compute."""
    diffs = [f"model.{k}: {ours[k]!r} in the config, {theirs[k]!r} in the weights' config"
             for k in ARCHITECTURE_KEYS if ours[k] != theirs[k]]
    if diffs:
        return diffs
    sites = attention_sites(ours)
    for key, per_level in (("num_attention_heads/channels_per_head", level_heads),
                           ("transformer_layers_per_block", level_depths)):
        a, b = [per_level(ours)[i] for i in sites], [per_level(theirs)[i] for i in sites]
        if a != b:
            diffs.append(f"model.{key}: {a} in the config, {b} in the weights' config (per attention site, "
                         f"levels {sites}; the last one is also the middle block)")
    return diffs


def load_unet_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Initialise ``model`` (the ``model.init_from`` step) from a folder in either format,
    after checking that both describe the same architecture. Keeps the model's dtype/device."""
    target = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    if not isinstance(target, UNet):
        raise TypeError(f"load_unet_weights needs an ldm_train UNet, got {type(target).__name__}")
    cfg, state = read_unet(path)
    diffs = architecture_differences(target.config, unet_kwargs(cfg))
    if diffs:
        raise UNetArchitectureMismatch(
            f"{path}: weights are for a different U-Net than the configured one:\n  " + "\n  ".join(diffs)
        )
    target.load_state_dict(state, strict=True)
