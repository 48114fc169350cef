"""A whole CLIP (both towers) in open_clip's own folder layout, the one its Hub checkpoints use:
``open_clip_config.json`` (``{"model_cfg": ..., "preprocess_cfg": ...}``) beside
``open_clip_model.safetensors``. ``open_clip.create_model_and_transforms("local-dir:DIR")`` and
``open_clip.get_tokenizer("local-dir:DIR")`` read it, so a folder written here is an ordinary
open_clip checkpoint, and any such folder can be read here.

Checked before open_clip sees it, so that a missing or broken file is named in one line.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from .common import TextEncoderError, first_line

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
LOCAL_DIR = "local-dir:"  # open_clip's schema for a local folder of this layout


def is_open_clip_folder(path: str | Path | None) -> bool:
    return path is not None and Path(path).is_dir()


def read_model_cfg(folder: str | Path) -> dict:
    """The folder's ``model_cfg``; a missing or unreadable config is refused naming the file."""
    folder = Path(folder)
    cfg_path, weights = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    for need in (cfg_path, weights):
        if not need.is_file():
            raise TextEncoderError(f"open_clip folder {folder}: {need} not found; run `ldm-train train-clip` "
                                   f"(it writes {CONFIG_FILE} and {WEIGHTS_FILE}) or name another open_clip folder")
    try:
        meta = json.loads(cfg_path.read_text(encoding="utf-8"))
        return dict(meta["model_cfg"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise TextEncoderError(f"cannot read the open_clip config {cfg_path}: {first_line(e)} "
                               "(expected JSON with a model_cfg entry)") from None


def load_open_clip_folder(folder: str | Path):
    """``(model, eval preprocess, tokenizer)`` from ``folder``, through open_clip's ``local-dir:``."""
    import open_clip

    folder = Path(folder)
    read_model_cfg(folder)
    name = LOCAL_DIR + str(folder)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(name)
    except Exception as e:  # a truncated or foreign weights file: name it, no traceback
        raise TextEncoderError(f"cannot load the open_clip weights {folder / WEIGHTS_FILE}: {first_line(e)}") from None
    return model.eval().requires_grad_(False), preprocess, open_clip.get_tokenizer(name)


def save_open_clip_folder(model: torch.nn.Module, model_cfg: dict, preprocess_cfg: dict, folder: Path) -> Path:
    """Write ``model``'s weights and configs into ``folder`` (created)."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    meta = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}
    (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
    return folder
