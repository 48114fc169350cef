"""What an evaluation reports about generated images: FID/KID against the validation images and
CLIP score against the prompts (:class:`ImageMetrics`), and the images themselves as files."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import Config, EvalConfig
from ..data.shards import SkipReport, load_images, write_shards
from ..utils.images import to_pil, to_uint8
from .metrics import evaluate_images


@dataclass
class ImageMetrics:
    """``metrics(images, prompts) -> dict``: FID/KID against one fixed reference and CLIP score
    (or, without local weights, why not: see ``eval.metrics.inception_weights`` / ``clip_weights``).
    The reference, the validation images, is read once when this is built, not at every
    evaluation; the Inception features of it are cached under ``eval.metrics.fid_reference_dir``."""

    eval_cfg: EvalConfig
    real: torch.Tensor  # uint8 [N, 3, H, W]
    reference_key: dict
    reference_cache: Path
    clip_weights: str | None = None  # eval.metrics.clip_weights with {run} expanded

    @classmethod
    def from_config(cls, cfg: Config) -> ImageMetrics:
        spec = cfg.shards(cfg.data.val_shards)
        real, _, _ = load_images(spec, cfg.data.resolution, SkipReport())
        key = {"dataset": spec, "resolution": cfg.data.resolution, "resize": cfg.eval.metrics.fid_resize}
        weights = cfg.eval.metrics.clip_weights
        return cls(cfg.eval, real, key, cfg.path(cfg.eval.metrics.fid_reference_dir),
                   str(cfg.path(weights)) if weights is not None else None)

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> dict:
        e = self.eval_cfg.metrics
        return evaluate_images(
            to_uint8(images), self.real, prompts, inception_weights=e.inception_weights, feature=e.fid_feature,
            resize=e.fid_resize, reference_cache=self.reference_cache, reference_key=self.reference_key,
            kid_subset_size=e.kid_subset_size, kid_subsets=e.kid_subsets, clip_model=e.clip_model,
            clip_weights=self.clip_weights, seed=self.eval_cfg.seed,
        )


def write_eval_images(out_dir: Path, images: torch.Tensor, prompts: list[str], shards: bool) -> dict:
    """PNG files + a JSON index of their prompts, so that other tools can score the same images;
    optionally the same as img2dataset-layout shards."""
    folder = out_dir / "images"
    folder.mkdir(parents=True, exist_ok=True)
    keys = [f"sample_{i:06d}" for i in range(len(prompts))]
    pils = [to_pil(img) for img in images]
    for key, pil in zip(keys, pils):
        pil.save(folder / f"{key}.png")
    (folder / "index.json").write_text(json.dumps(dict(zip(keys, prompts)), indent=2))
    out = {"folder": str(folder)}
    if shards:
        samples = ((k, p, c, {"index": i}) for i, (k, p, c) in enumerate(zip(keys, pils, prompts)))
        out["shards"] = [str(s) for s in write_shards(samples, out_dir / "shards", "samples", 1000)]
    return out
