"""Frozen open_clip text tower that turns captions into per-token embeddings for cross-attention.

Stable Diffusion conditions its U-Net on the hidden states of a CLIP text transformer (one
vector per token, ``[B, context_length, width]``), not on the pooled CLIP embedding, so we run
open_clip's text transformer up to ``ln_final`` and stop there. ``text.layer`` (see
:mod:`ldm_train.text.common`) is applied when the tower is built: the saved folder holds only the
layers kept (SD 2.x's penultimate: 23 of ViT-H's 24, as Stability's ``FrozenOpenCLIPEmbedder``
runs them) and records the choice in ``open_clip_config.json``, so every stage reloads the same
tower and a later change of ``text.layer`` is refused rather than silently mixed.
"""
from __future__ import annotations

import copy
import hashlib
import json
import tempfile
from pathlib import Path

import open_clip
import torch
from safetensors.torch import save_file

from ..config import TextConfig
from .common import TextEncoderError, clip_skip, first_line, kept_layers
from .open_clip_folder import WEIGHTS_FILE as FOLDER_WEIGHTS
from .open_clip_folder import is_open_clip_folder, read_model_cfg

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"


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
    """Tokenizer + open_clip CLIP text transformer; ``forward(captions) -> [B, L, width]``.

    ``model_cfg``: the open_clip config to save with it (None: ``name`` is open_clip's own);
    ``layer``/``source_layers``: the ``text.layer`` it was cut at and the depth before the cut."""

    kind = "open_clip"

    def __init__(self, clip: torch.nn.Module, tokenizer, name: str, model_cfg: dict | None = None,
                 layer: str | int = "last", source_layers: int | None = None):
        super().__init__()
        self.clip = clip.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.name = name
        self.model_cfg = model_cfg
        self.layer = layer
        self.source_layers = source_layers or len(clip.transformer.resblocks)

    @property
    def weights_module(self) -> torch.nn.Module:
        """The module whose weights define the conditioning (hashed by the latent cache)."""
        return self.clip

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
    # the weights are already cut at the layer: record it, never cut again
    return TextEncoder(clip, open_clip.get_tokenizer(name), name, meta.get("model_cfg"),
                       meta.get("layer", "last"), meta.get("source_layers"))


def save_text_encoder(encoder: TextEncoder, folder: Path, model_cfg: dict | None = None) -> None:
    """``model_cfg``: None = the one the encoder carries (a tower cut at its layer always has one)."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in encoder.clip.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE))
    meta = {"name": encoder.name, "model_cfg": model_cfg if model_cfg is not None else encoder.model_cfg,
            "layer": encoder.layer, "source_layers": encoder.source_layers}
    (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=2))


def check_layer(encoder: TextEncoder, cfg: TextConfig, folder: Path) -> TextEncoder:
    """Refuse a saved tower cut at another layer than ``text.layer`` says (the latents depend on it)."""
    if clip_skip(encoder.layer) != clip_skip(cfg.layer):
        raise TextEncoderError(
            f"text.layer is {cfg.layer!r} but the tower in {folder} was saved with layer {encoder.layer!r}; "
            "set text.layer back, or encode again into a new text.dir (the latent cache depends on it)")
    return encoder


def _cut(clip: torch.nn.Module, name: str, model_cfg: dict | None, layer: str | int):
    """Keep the first layers up to ``layer`` (see :mod:`ldm_train.text.common`): returns the
    (name, model_cfg) that rebuild the cut tower. A new name, so open_clip's own entry stays intact."""
    blocks = clip.transformer.resblocks
    depth = kept_layers(layer, len(blocks))
    if depth == len(blocks):
        return name, model_cfg
    clip.transformer.resblocks = blocks[:depth]
    clip.transformer.layers = depth
    model_cfg = copy.deepcopy(model_cfg if model_cfg is not None else open_clip.get_model_config(name))
    model_cfg["text_cfg"]["layers"] = depth
    name = f"{name}-text{depth}of{len(blocks)}"
    _register(name, model_cfg)
    return name, model_cfg


def prepare_text_encoder(cfg: TextConfig, folder: Path) -> TextEncoder:
    """Load the tower saved in ``folder``, or build it once from ``cfg`` (cut at ``cfg.layer``)
    and save it there."""
    if (folder / CONFIG_FILE).is_file():
        return check_layer(load_text_encoder(folder), cfg, folder)
    if is_open_clip_folder(cfg.pretrained):  # open_clip's folder layout names its own architecture
        model_cfg = read_model_cfg(cfg.pretrained)
        name = "ldm-open-clip-dir-" + hashlib.sha256(json.dumps(model_cfg, sort_keys=True).encode()).hexdigest()[:12]
        _register(name, model_cfg)
    elif cfg.model_name is not None:
        name, model_cfg = cfg.model_name, None
        if open_clip.get_model_config(name) is None:
            raise TextEncoderError(f"text.model_name: {name!r} is not an open_clip architecture")
    else:
        name, model_cfg = f"ldm-tiny-text-w{cfg.width}-l{cfg.layers}-h{cfg.heads}", tiny_clip_config(cfg)
        _register(name, model_cfg)
    # a layer deeper than the tower is refused before anything is built or read
    kept_layers(cfg.layer, (model_cfg or open_clip.get_model_config(name))["text_cfg"].get("layers", 12))
    weights = str(Path(cfg.pretrained) / FOLDER_WEIGHTS) if is_open_clip_folder(cfg.pretrained) else cfg.pretrained
    if cfg.pretrained is not None and not Path(weights).is_file():
        raise TextEncoderError(
            f"text.pretrained: {cfg.pretrained} not found. This machine cannot download weights; "
            "run `ldm-train train-clip` (it writes the open_clip folder clip.dir), or provide a local open_clip "
            "checkpoint file (.safetensors or .pt) or folder and set text.pretrained to it (null: a random tower)"
        )
    with torch.random.fork_rng(devices=[]):  # seed the init without touching the caller's RNG
        torch.manual_seed(cfg.seed)
        try:
            clip = open_clip.create_model(name, pretrained=weights)
        except Exception as e:  # a truncated file or another architecture's weights: name the file
            if weights is None:
                raise
            raise TextEncoderError(f"text.pretrained: cannot load {weights} into {name}: {first_line(e)}") from None
    tokenizer, total = open_clip.get_tokenizer(name), len(clip.transformer.resblocks)
    name, model_cfg = _cut(clip, name, model_cfg, cfg.layer)
    encoder = TextEncoder(clip, tokenizer, name, model_cfg, cfg.layer, total)
    save_text_encoder(encoder, folder)
    return encoder
