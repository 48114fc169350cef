"""Image -> training tensor: alpha onto white, a crop box, resampled to the training size.

Aspect ratio: the crop box is the largest box of the target's aspect ratio that fits the image
(for a square target: the square whose side is the image's *shorter* side), centred
(``crop="center"``) or at a seeded random offset along the longer direction (``crop="random"``);
it is resampled to the target size (``resolution`` x ``resolution``, or a bucket's ``(w, h)``;
bicubic, antialiased on downscale). That is exactly "resize so the image covers the target, then
crop", but the box stays exact in original pixels, so callers can store it (SDXL-style size/crop
conditioning) and reproduce the crop.
"""
from __future__ import annotations

import random

import torch
from PIL import Image

CROPS = ("center", "random")

Box = tuple[int, int, int, int]


def sample_rng(seed: int, key: str) -> random.Random:
    """A per-sample generator from (seed, key): the same crop for a sample whatever the shard
    order, the rank or the worker that reads it (str seeds are hashed with SHA-512, not ``hash()``)."""
    return random.Random(f"{seed}:{key}")


def box_size(size: tuple[int, int], target: tuple[int, int] | None) -> tuple[int, int]:
    """The largest ``(width, height)`` of ``target``'s aspect ratio (None: a square) inside an image
    of ``size``, in whole pixels (the long side of a non-square box rounded to the nearest one)."""
    w, h = size
    if target is None or target[0] == target[1]:
        side = min(w, h)
        return side, side
    tw, th = target
    if w * th >= h * tw:  # the image is wider than the target: the full height is kept
        return min(w, max(1, round(h * tw / th))), h
    return w, min(h, max(1, round(w * th / tw)))


def crop_box(size: tuple[int, int], crop: str = "center", rng: random.Random | None = None,
             target: tuple[int, int] | None = None) -> Box:
    """``(left, top, right, bottom)`` in original pixels of the box that becomes the image: the
    largest one of ``target``'s aspect ratio (``(w, h)``; None: a square)."""
    w, h = size
    bw, bh = box_size(size, target)
    if crop == "center":
        left, top = (w - bw) // 2, (h - bh) // 2
    elif crop == "random":
        if rng is None:
            raise ValueError("crop='random' needs an rng (see sample_rng)")
        left, top = rng.randint(0, w - bw), rng.randint(0, h - bh)
    else:
        raise ValueError(f"crop must be one of {CROPS}, got {crop!r}")
    return left, top, left + bw, top + bh


def on_white(image: Image.Image) -> Image.Image:
    """RGB, transparent regions composited onto white: in logos/emoji they are background."""
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image.convert("RGB")


def preprocess(image: Image.Image, resolution: int | tuple[int, int], box: Box | None = None) -> torch.Tensor:
    """Alpha onto white, RGB, ``box`` (default: the centred box of the target's aspect ratio) ->
    ``resolution`` px square or ``(width, height)``, bicubic (PIL antialiases on downscale); CHW
    float in [-1, 1]."""
    w, h = (resolution, resolution) if isinstance(resolution, int) else resolution
    image = on_white(image)
    box = box if box is not None else crop_box(image.size, target=(w, h))
    if image.size != (w, h) or box != (0, 0, w, h):
        image = image.resize((w, h), Image.Resampling.BICUBIC, box=box)
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    chw = data.view(h, w, 3).permute(2, 0, 1)
    return chw.float().div(127.5).sub(1.0).contiguous()
