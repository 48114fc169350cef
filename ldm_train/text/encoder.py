"""Frozen open_clip text tower that turns captions into per-token embeddings for cross-attention.

Stable Diffusion conditions its U-Net on the last hidden states of a CLIP text transformer
(one vector per token, ``[B, context_length, width]``), not on the pooled CLIP embedding, so we
run open_clip's text transformer up to ``ln_final`` and stop there.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import open_clip
import torch
from safetensors.torch import save_file

from ..errors import UserError
from ..config import TextConfig

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"


class TextEncoderError(UserError):
    """A text-tower folder or checkpoint that cannot be used; the message names the file."""


def tiny_clip_config(cfg: TextConfig) -> dict:
    """An open_clip model config with a tiny vision tower (unused) and the configured text tower."""
    return {
        "embed_dim": cfg.width,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 32},
        "text_cfg": {
            "context_length": cfg.context_length,
            "vocab_size": 49408,
            "width": cfg.width,
            "heads": cfg.heads,
            "layers": cfg.layers,
        },
    }


class TextEncoder(torch.nn.Module):
    """Tokenizer + open_clip CLIP text transformer; ``forward(captions) -> [B, L, width]``."""

    def __init__(self, clip: torch.nn.Module, tokenizer, name: str):
        super().__init__()
        self.clip = clip.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.name = name

    @property
    def width(self) -> int:
        return self.clip.token_embedding.weight.shape[1]

    @property
    def context_length(self) -> int:
        return self.clip.positional_embedding.shape[0]

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        return self.tokenizer(captions)

    @torch.no_grad()
    def encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        clip = self.clip
        x = clip.token_embedding(tokens.to(clip.token_embedding.weight.device))
        x = x + clip.positional_embedding
        x = clip.transformer(x, attn_mask=clip.attn_mask)
        return clip.ln_final(x)

    def forward(self, captions: list[str]) -> torch.Tensor:
        return self.encode_tokens(self.tokenize(captions))


def _register(name: str, model_cfg: dict) -> None:
    """open_clip only builds architectures from its registry, which it fills from JSON files
    named after the model; write ours to a scratch folder so reading never writes beside the weights."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.json"
        path.write_text(json.dumps(model_cfg))
        open_clip.add_model_config(path)


def load_text_encoder(folder: str | Path) -> TextEncoder:
    """Reload a tower saved by :func:`save_text_encoder` (or :func:`prepare_text_encoder`)."""
    folder = Path(folder)
    cfg_path, weights = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not cfg_path.is_file() or not weights.is_file():
        raise TextEncoderError(
            f"text encoder folder {folder} must hold {CONFIG_FILE} and {WEIGHTS_FILE}; "
            "run `ldm-train encode` (which creates it) or point text.dir at a saved tower"
        )
    meta = json.loads(cfg_path.read_text())
    name = meta["name"]
    if meta.get("model_cfg") is not None:
        _register(name, meta["model_cfg"])
    clip = open_clip.create_model(name, pretrained=str(weights))
    return TextEncoder(clip, open_clip.get_tokenizer(name), name)


def save_text_encoder(encoder: TextEncoder, folder: Path, model_cfg: dict | None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in encoder.clip.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE))
    (folder / CONFIG_FILE).write_text(json.dumps({"name": encoder.name, "model_cfg": model_cfg}, indent=2))


def prepare_text_encoder(cfg: TextConfig, folder: Path) -> TextEncoder:
    """Load the tower saved in ``folder``, or build it once from ``cfg`` and save it there."""
    if (folder / CONFIG_FILE).is_file():
        return load_text_encoder(folder)
    if cfg.model_name is not None:
        name, model_cfg = cfg.model_name, None
        if open_clip.get_model_config(name) is None:
            raise TextEncoderError(f"text.model_name: {name!r} is not an open_clip architecture")
    else:
        name, model_cfg = f"ldm-tiny-text-w{cfg.width}-l{cfg.layers}-h{cfg.heads}", tiny_clip_config(cfg)
        _register(name, model_cfg)
    if cfg.pretrained is not None and not Path(cfg.pretrained).is_file():
        raise TextEncoderError(
            f"text.pretrained: {cfg.pretrained} not found. This machine cannot download weights; "
            "provide a local open_clip checkpoint file (.safetensors or .pt) and set text.pretrained to it"
        )
    with torch.random.fork_rng(devices=[]):  # seed the init without touching the caller's RNG
        torch.manual_seed(cfg.seed)
        clip = open_clip.create_model(name, pretrained=cfg.pretrained)
    encoder = TextEncoder(clip, open_clip.get_tokenizer(name), name)
    save_text_encoder(encoder, folder, model_cfg)
    return encoder
