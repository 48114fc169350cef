"""What both text towers (open_clip and transformers) share: the error type and ``text.layer``.

``text.layer`` picks the hidden states the U-Net attends to. Stable Diffusion 1.x uses the last
layer, 2.x the penultimate (Stability's ``FrozenOpenCLIPEmbedder(layer="penultimate")``), and
kohya's ``--clip_skip N`` counts from the end (1 = last, 2 = penultimate). Either way the final
LayerNorm follows, as diffusers' ``encode_prompt(clip_skip=N-1)`` applies it. We apply the
choice by keeping only the first ``L-N+1`` layers at load, so the tower's plain output *is* the
chosen layer (the dropped layers cost nothing, and an exported tower needs no clip-skip setting).
"""
from __future__ import annotations

from ..errors import UserError


class TextEncoderError(UserError):
    """A text-tower folder, checkpoint or setting that cannot be used; the message names it."""


def clip_skip(layer: str | int) -> int:
    """``text.layer`` as kohya's clip-skip count N (1 = last layer, 2 = penultimate)."""
    if layer == "last":
        return 1
    if layer == "penultimate":
        return 2
    if isinstance(layer, int) and not isinstance(layer, bool) and layer >= 1:
        return layer
    raise TextEncoderError(f"text.layer: {layer!r} is not last, penultimate or a clip-skip count >= 1")


def kept_layers(layer: str | int, total: int) -> int:
    """How many of the tower's ``total`` layers the chosen hidden states come after."""
    depth = total - clip_skip(layer) + 1
    if depth < 1:
        raise TextEncoderError(
            f"text.layer: {layer!r} (clip skip {clip_skip(layer)}) is deeper than the text tower, which has "
            f"{total} layer{'s' if total != 1 else ''}; use a clip skip of at most {total}")
    return depth


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
