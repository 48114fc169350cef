"""One way in for every stage, whichever kind of text tower ``text.encoder`` names.

- ``prepare_text(cfg, folder)``: ``encode``. open_clip: build the tower once (cut at
  ``text.layer``) and save it in ``folder``, or reload it from there. transformers: load it from
  ``text.transformers.path`` (nothing is copied into the run).
- ``load_text(cfg, folder)``: every later stage (the same tower ``encode`` used).
- ``save_text_components(text, root)`` / ``load_text_components(root)``: exports.
  ``root/text_encoder/`` is a transformers ``CLIPTextModel`` (with ``root/tokenizer/``, what
  diffusers' ``StableDiffusionPipeline`` expects) or our open_clip folder; the loader tells which.
"""
from __future__ import annotations

from pathlib import Path

from ..config import TextConfig
from .common import TextEncoderError
from .encoder import CONFIG_FILE, TextEncoder, check_layer, load_text_encoder, prepare_text_encoder, save_text_encoder
from .hf import MODEL_DIR, TOKENIZER_DIR, HFTextEncoder, load_hf_folders, load_hf_text, save_hf_text
from .sdxl import DIRS as SDXL_DIRS
from .sdxl import SDXLTextEncoder, load_sdxl_folders, load_sdxl_text, save_sdxl_text

AnyTextEncoder = TextEncoder | HFTextEncoder | SDXLTextEncoder


def prepare_text(cfg: TextConfig, folder: Path) -> AnyTextEncoder:
    if cfg.encoder == "sdxl":
        return load_sdxl_text(cfg)
    if cfg.encoder == "transformers":
        return load_hf_text(cfg)
    return prepare_text_encoder(cfg, Path(folder))


def load_text(cfg: TextConfig, folder: Path) -> AnyTextEncoder:
    if cfg.encoder == "sdxl":
        return load_sdxl_text(cfg)
    if cfg.encoder == "transformers":
        return load_hf_text(cfg)
    folder = Path(folder)
    return check_layer(load_text_encoder(folder), cfg, folder)


def save_text_components(text: AnyTextEncoder, root: Path) -> None:
    root = Path(root)
    if isinstance(text, SDXLTextEncoder):
        save_sdxl_text(text, root)
    elif isinstance(text, HFTextEncoder):
        save_hf_text(text, root)
    else:
        save_text_encoder(text, root / MODEL_DIR)


def load_text_components(root: Path) -> AnyTextEncoder:
    """The tower saved by :func:`save_text_components` (already cut: loaded as it is)."""
    root = Path(root)
    model_dir = root / MODEL_DIR
    if (root / SDXL_DIRS[2] / "config.json").is_file():
        return load_sdxl_folders(root)  # saved as encode_prompt's towers: the layer is SDXL's penultimate
    if (model_dir / CONFIG_FILE).is_file():
        return load_text_encoder(model_dir)
    if (model_dir / "config.json").is_file():
        if not (root / TOKENIZER_DIR).is_dir():
            raise TextEncoderError(f"{root} has a CLIPTextModel in {MODEL_DIR}/ but no {TOKENIZER_DIR}/ folder "
                                   "beside it; copy the CLIPTokenizer saved with the model there")
        return load_hf_folders(model_dir, root / TOKENIZER_DIR)
    raise TextEncoderError(f"{model_dir} holds neither {CONFIG_FILE} (an open_clip tower) nor config.json "
                           "(a CLIPTextModel); export again with `ldm-train export`")
