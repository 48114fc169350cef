"""Image -> training tensor: alpha onto white, a square crop box, resampled to the resolution.

Aspect ratio: the crop box is the square whose side is the image's *shorter* side, centred
(``crop="center"``) or at a seeded random offset along the longer side (``crop="random"``); it is
resampled to ``resolution`` x ``resolution`` (bicubic, antialiased on downscale). That is exactly
"resize the shorter side to the resolution, then crop", but the box stays exact in original pixels,
so callers can store it (SDXL-style size/crop conditioning) and reproduce the crop.
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


def crop_box(size: tuple[int, int], crop: str = "center", rng: random.Random | None = None) -> Box:
    """``(left, top, right, bottom)`` in original pixels of the square that becomes the image."""
    w, h = size
    side = min(w, h)
    if crop == "center":
        left, top = (w - side) // 2, (h - side) // 2
    elif crop == "random":
        if rng is None:
            raise ValueError("crop='random' needs an rng (see sample_rng)")
        left, top = rng.randint(0, w - side), rng.randint(0, h - side)
    else:
        raise ValueError(f"crop must be one of {CROPS}, got {crop!r}")
    return left, top, left + side, top + side


def on_white(image: Image.Image) -> Image.Image:
    """RGB, transparent regions composited onto white: in logos/emoji they are background."""
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image.convert("RGB")


def preprocess(image: Image.Image, resolution: int, box: Box | None = None) -> torch.Tensor:
    """Alpha onto white, RGB, ``box`` (default: the centred square) -> ``resolution`` px square,
    bicubic (PIL antialiases on downscale); CHW float in [-1, 1]."""
    image = on_white(image)
    box = box if box is not None else crop_box(image.size)
    if image.size != (resolution, resolution) or box != (0, 0, resolution, resolution):
        image = image.resize((resolution, resolution), Image.Resampling.BICUBIC, box=box)
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    chw = data.view(resolution, resolution, 3).permute(2, 0, 1)
    return chw.float().div(127.5).sub(1.0).contiguous()
