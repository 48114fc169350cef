"""SDXL's two text towers (Podell et al. 2023, Sec. 2.1), in diffusers' ``StableDiffusionXLPipeline``
layout: ``text_encoder/`` (CLIP ViT-L, a transformers ``CLIPTextModel``) + ``tokenizer/``, and
``text_encoder_2/`` (OpenCLIP ViT-bigG, a ``CLIPTextModelWithProjection``) + ``tokenizer_2/``.

The conditioning is what diffusers' ``StableDiffusionXLPipeline.encode_prompt`` computes: each
tower's ids padded to 77 and truncated, the hidden states of the penultimate layer (before the
final LayerNorm: ``hidden_states[-2]``; ``text.layer`` N takes ``hidden_states[-N]``) of both,
concatenated along features (768 + 1280 = 2048 for SDXL), and the pooled, projected output of the
second tower (``text_embeds``, 1280), which the U-Net adds to its time embedding. Both towers run
whole (the pooled output needs the last layer), frozen, in fp32.
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from ..config import TextConfig
from .common import TextEncoderError, clip_skip
from .hf import load_clip_model, load_tokenizer, save_clip_model, save_tokenizer

DIRS = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")


class SDXLTextEncoder(torch.nn.Module):
    """``forward(captions) -> context [B, 77, D1 + D2]``; :meth:`encode_with_pooled` also returns
    the pooled embedding ``[B, projection_dim]``. ``tokenize`` stacks both towers' ids: ``[B, 2, 77]``."""

    kind = "sdxl"

    def __init__(self, model: CLIPTextModel, tokenizer, model_2: CLIPTextModelWithProjection, tokenizer_2,
                 layer: str | int = "penultimate"):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.model_2 = model_2.eval().requires_grad_(False)
        self.tokenizer, self.tokenizer_2, self.layer = tokenizer, tokenizer_2, layer
        depth = min(model.config.num_hidden_layers, model_2.config.num_hidden_layers)
        if clip_skip(layer) > depth + 1:
            raise TextEncoderError(f"text.layer: {layer!r} is deeper than the SDXL text towers ({depth} layers)")
        if tokenizer.model_max_length != tokenizer_2.model_max_length:
            raise TextEncoderError(f"the SDXL tokenizers pad to {tokenizer.model_max_length} and "
                                   f"{tokenizer_2.model_max_length} tokens; they must agree (SDXL: 77)")

    @property
    def name(self) -> str:
        a, b = self.model.config, self.model_2.config
        return (f"sdxl-clip-w{a.hidden_size}-l{a.num_hidden_layers}+w{b.hidden_size}-l{b.num_hidden_layers}"
                f"-p{b.projection_dim}-skip{clip_skip(self.layer)}")

    @property
    def width(self) -> int:
        return self.model.config.hidden_size + self.model_2.config.hidden_size

    @property
    def pooled_width(self) -> int:
        return self.model_2.config.projection_dim

    @property
    def context_length(self) -> int:
        return self.tokenizer.model_max_length

    @property
    def weights_module(self) -> torch.nn.Module:
        return torch.nn.ModuleList([self.model, self.model_2])

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        ids = [tok(captions, padding="max_length", max_length=self.context_length, truncation=True,
                   return_tensors="pt").input_ids for tok in (self.tokenizer, self.tokenizer_2)]
        return torch.stack(ids, dim=1)

    @torch.no_grad()
    def encode_tokens_with_pooled(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ids = tokens.to(self.model.device, torch.long)
        n = clip_skip(self.layer)
        first = self.model(input_ids=ids[:, 0], output_hidden_states=True)
        second = self.model_2(input_ids=ids[:, 1], output_hidden_states=True)
        context = torch.cat([first.hidden_states[-n], second.hidden_states[-n]], dim=-1)
        return context, second.text_embeds

    def encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.encode_tokens_with_pooled(tokens)[0]

    def encode_with_pooled(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode_tokens_with_pooled(self.tokenize(captions))

    def forward(self, captions: list[str]) -> torch.Tensor:
        return self.encode_with_pooled(captions)[0]


def sdxl_folders(path: Path) -> list[Path]:
    """The four folders of an SDXL pipeline folder, or a clear error naming the missing one."""
    missing = [d for d in DIRS if not (path / d).is_dir()]
    if missing:
        raise TextEncoderError(f"text.sdxl.path: {path} is not an SDXL pipeline folder: {', '.join(missing)} "
                               f"missing (it needs {', '.join(d + '/' for d in DIRS)})")
    return [path / d for d in DIRS]


def load_sdxl_folders(path: Path, layer: str | int = "penultimate") -> SDXLTextEncoder:
    te, tok, te2, tok2 = sdxl_folders(Path(path))
    return SDXLTextEncoder(load_clip_model(CLIPTextModel, te), load_tokenizer(tok),
                           load_clip_model(CLIPTextModelWithProjection, te2), load_tokenizer(tok2), layer)


def load_sdxl_text(cfg: TextConfig) -> SDXLTextEncoder:
    if cfg.sdxl.path is None:
        raise TextEncoderError("text.encoder is sdxl but text.sdxl.path is not set; set it to an SDXL pipeline "
                               "folder (text_encoder/, tokenizer/, text_encoder_2/, tokenizer_2/)")
    return load_sdxl_folders(Path(cfg.sdxl.path), cfg.layer)


def save_sdxl_text(text: SDXLTextEncoder, root: Path) -> None:
    """The four folders, as ``StableDiffusionXLPipeline.from_pretrained`` reads them."""
    root = Path(root)
    save_clip_model(text.model, root / DIRS[0])
    save_tokenizer(text.tokenizer, root / DIRS[1])
    save_clip_model(text.model_2, root / DIRS[2])
    save_tokenizer(text.tokenizer_2, root / DIRS[3])
