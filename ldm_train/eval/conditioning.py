"""The conditioning a sampler gives the U-Net for prompts: the text tower's per-token context, and
for an SDXL U-Net (``addition_embed_type: text_time``) the pooled embedding and the size/crop ids
packed after it (:mod:`ldm_train.model.addition`). Sampling asks for an uncropped image of the
size it draws, as diffusers' ``StableDiffusionXLPipeline`` does by default: original size =
target size = (height, width), crop corner (0, 0)."""
from __future__ import annotations

import torch

from ..model.addition import time_ids


def _layout(unet: torch.nn.Module):
    return getattr(getattr(unet, "_orig_mod", unet), "layout", None)


def prompt_context(unet: torch.nn.Module, text, captions: list[str], size_hw: tuple[int, int]) -> torch.Tensor:
    """[B, L(+k), D] for ``captions`` at an image size of ``size_hw`` pixels."""
    layout = _layout(unet)
    if layout is None:
        return text(captions)
    context, pooled = text.encode_with_pooled(captions)
    ids = torch.tensor([time_ids(size_hw, (0, 0), size_hw)], device=context.device).expand(len(captions), -1)
    return layout.pack(context.float(), pooled.float(), ids)


def null_context(unet: torch.nn.Module, text, negative_prompt: str | None) -> torch.Tensor:
    """The unconditional context of classifier-free guidance: ``negative_prompt`` or the empty
    caption (as trained), without SDXL's time-id row, which guidance then keeps from the prompt."""
    layout = _layout(unet)
    if layout is None:
        return text([negative_prompt or ""])[0]
    context, pooled = text.encode_with_pooled([negative_prompt or ""])
    return layout.pack_null(context[0].float(), pooled[0].float())
