"""SDXL's micro-conditioning from what ``encode`` reads (Podell et al. 2023, Sec. 2.2): each
sample's ``original_size`` (h, w of the source image), ``crop_coords_top_left`` (top, left) and
``target_size`` (h, w), diffusers' ``add_time_ids`` order.

The reader records the crop as a box in ORIGINAL pixels that is then resized to the training
size; SDXL measures the crop's corner in the resized image (the image is resized so it covers the
target, then cropped: diffusers' ``train_text_to_image_sdxl.py``). So the corner is scaled by the
box's resize factor per axis. The target size is the latent's spatial size times the VAE factor,
so per-bucket shapes get their own.
"""
from __future__ import annotations

import torch


def time_ids(original_size, crop_box, target_hw: tuple[int, int]) -> list[float]:
    """``original_size`` (w, h) and ``crop_box`` (left, top, right, bottom) as the reader gives
    them, the target (h, w) in pixels -> the six ids. No crop box: the whole image, corner (0, 0)."""
    w, h = original_size
    th, tw = target_hw
    if crop_box is None:
        top = left = 0.0
    else:
        left_px, top_px, right_px, bottom_px = crop_box
        top = round(top_px * th / (bottom_px - top_px))
        left = round(left_px * tw / (right_px - left_px))
    return [float(h), float(w), float(top), float(left), float(th), float(tw)]


def batch_time_ids(batch: list[dict], target_hw: tuple[int, int]) -> torch.Tensor:
    """[B, 6] float32; a sample without ``original_size`` counts as already at the target size."""
    rows = []
    for s in batch:
        size = s.get("original_size") or (target_hw[1], target_hw[0])
        rows.append(time_ids(size, s.get("crop_box"), target_hw))
    return torch.tensor(rows, dtype=torch.float32)
