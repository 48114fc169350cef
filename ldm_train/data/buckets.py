"""Aspect-ratio buckets: which ``(width, height)`` an image is trained at.

An image of ``(w, h)`` pixels goes to the bucket whose log aspect ratio ``log(bw / bh)`` is
nearest to ``log(w / h)`` (log, so that 2:1 and 1:2 are equally far from 1:1; ties go to the
earlier bucket of the list). It is then resized to cover the bucket and cropped to it
(:func:`ldm_train.data.preprocess.crop_box` with the bucket as target), so no part of a
non-square picture is thrown away beyond what the aspect mismatch forces.

An image that covers no bucket (``w < bw`` or ``h < bh`` for every bucket) is too small for
any of them and is skipped as ``too_small``; one that covers some bucket but not its nearest is
upscaled to it, as a square crop is upscaled to ``data.resolution`` today.
"""
from __future__ import annotations

import math

from ..errors import UserError

Size = tuple[int, int]


class BucketError(UserError):
    """A bucket list that cannot be used with this autoencoder; names the entry."""


def bucket_name(size: Size) -> str:
    """``"576x448"``: how manifests and shard names spell a bucket."""
    return f"{size[0]}x{size[1]}"


def check_multiple(buckets: list[Size], multiple: int, why: str) -> None:
    """Refuse a bucket whose width or height is not a multiple of ``multiple`` (``why`` says
    where the number comes from), naming the entry."""
    for i, (w, h) in enumerate(buckets):
        for side, value in (("width", w), ("height", h)):
            if value % multiple:
                raise BucketError(f"data.buckets entry {i} = [{w}, {h}]: its {side} {value} is not a multiple of "
                                  f"{multiple} ({why})")


def nearest(size: Size, buckets: list[Size]) -> int:
    """Index of the bucket of nearest log aspect ratio to an image of ``size``."""
    ratio = math.log(size[0] / size[1])
    return min(range(len(buckets)), key=lambda i: abs(math.log(buckets[i][0] / buckets[i][1]) - ratio))


def covers_any(size: Size, buckets: list[Size]) -> bool:
    """Whether an image of ``size`` is at least as large as some bucket in both directions."""
    return any(size[0] >= w and size[1] >= h for w, h in buckets)


def assign(size: Size, buckets: list[Size]) -> Size | None:
    """The bucket of an image of ``size``, or None when it is too small for every bucket."""
    if not covers_any(size, buckets):
        return None
    return buckets[nearest(size, buckets)]
