"""What one CLIP can say about generated images besides CLIP score: caption retrieval and a
Fréchet distance on its image features, each next to the baselines that give it meaning.

* **Caption retrieval** (``caption_retrieval``): for each image, the rank of its own prompt among
  the candidate prompts by cosine similarity of CLIP embeddings (top-1 accuracy and mean rank;
  chance is 1/number of prompts). Real images of the same prompts, ranked the same way, are the
  ceiling the CLIP itself allows.
* **FD-CLIP** (``frechet_distance``): the Fréchet distance between Gaussians fitted to the
  L2-normalised CLIP image embeddings of two image sets (the FID formula, computed by torchmetrics'
  ``FrechetInceptionDistance`` on these features). It is **not** Inception FID and not comparable
  to it or across CLIP models: only sets scored by the same CLIP against the same reference, of the
  same size (the estimate is biased by the sample count), compare. Baselines: real images of the
  other split (floor) and uniform noise images (what "no image at all" scores).
* **Shuffled captions**: CLIP score of the same images each paired with another prompt, the level
  an image that ignores its prompt reaches.
"""
from __future__ import annotations

from typing import Sequence

import torch
from PIL import Image

from .metrics import _PassThrough, _check_u8

FD_NOTE = ("Frechet distance of L2-normalised image embeddings of this CLIP (FID's formula, torchmetrics); "
           "not Inception FID: compare only sets of the same size, same CLIP and same reference")


@torch.no_grad()
def image_features(bundle, images_u8: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """L2-normalised CLIP image embeddings ``[N, D]`` of uint8 images (the model's own preprocess)."""
    clip, preprocess, _ = bundle
    _check_u8(images_u8, "CLIP images")
    device = next(clip.parameters()).device
    out = []
    for i in range(0, len(images_u8), batch_size):
        pixels = torch.stack([preprocess(Image.fromarray(im.permute(1, 2, 0).cpu().numpy()))
                              for im in images_u8[i:i + batch_size]])
        out.append(clip.encode_image(pixels.to(device)).float().cpu())
    feats = torch.cat(out)
    return feats / feats.norm(dim=-1, keepdim=True)


@torch.no_grad()
def text_features(bundle, prompts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """L2-normalised CLIP text embeddings ``[M, D]``."""
    clip, _, tokenizer = bundle
    device = next(clip.parameters()).device
    out = [clip.encode_text(tokenizer(list(prompts[i:i + batch_size])).to(device)).float().cpu()
           for i in range(0, len(prompts), batch_size)]
    feats = torch.cat(out)
    return feats / feats.norm(dim=-1, keepdim=True)


def caption_retrieval(image_feats: torch.Tensor, prompt_feats: torch.Tensor, targets: Sequence[int]) -> dict:
    """Rank (1 = nearest) of each image's own prompt ``targets[i]`` among all ``prompt_feats``."""
    sims = image_feats @ prompt_feats.T
    own = sims[torch.arange(len(sims)), torch.as_tensor(list(targets))]
    ranks = (sims > own[:, None]).sum(1) + 1  # ties count for the image
    return {"top1": float((ranks == 1).float().mean()), "mean_rank": float(ranks.float().mean()),
            "chance_top1": 1 / prompt_feats.shape[0], "images": len(ranks), "prompts": prompt_feats.shape[0]}


def pair_score(image_feats: torch.Tensor, prompt_feats: torch.Tensor, targets: Sequence[int]) -> float:
    """CLIP score ``100 * mean max(cos, 0)`` of each image with prompt ``targets[i]`` (Hessel et al.)."""
    own = (image_feats * prompt_feats[torch.as_tensor(list(targets))]).sum(-1).double()
    return float(100 * own.clamp(min=0).mean())


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """FID's formula on two feature sets ``[N, D]``, ``[M, D]`` (float64 statistics, torchmetrics)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"a Frechet distance needs at least 2 features per set, got {len(a)} and {len(b)}")
    fid = FrechetInceptionDistance(feature=_PassThrough(a.shape[1]), reset_real_features=False)
    fid.update(a.float(), real=True)
    fid.update(b.float(), real=False)
    return max(float(fid.compute()), 0.0)


def shifted(targets: Sequence[int], n: int) -> list[int]:
    """Each target moved to the next prompt: every image paired with a prompt not its own (n > 1)."""
    return [(t + 1) % n for t in targets]


def noise_images(n: int, size: tuple[int, int], seed: int) -> torch.Tensor:
    """``n`` uniform-noise uint8 RGB images: the Fréchet distance of "no image at all"."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, *size), generator=g, dtype=torch.uint8)


def clip_report(bundle, fake_u8: torch.Tensor, prompts: Sequence[str], real_u8: torch.Tensor | None) -> dict:
    """For ``evaluate_images``: caption retrieval of the samples among their distinct prompts and
    FD-CLIP against the real images (where given)."""
    candidates = sorted(set(prompts))
    targets = [candidates.index(p) for p in prompts]
    fake = image_features(bundle, fake_u8)
    out = {"caption_retrieval": caption_retrieval(fake, text_features(bundle, candidates), targets)}
    if real_u8 is not None and len(real_u8) >= 2 and len(fake) >= 2:
        out["fd_clip"] = frechet_distance(image_features(bundle, real_u8), fake)
        out["fd_clip_note"] = FD_NOTE
    return out


def scores_with_baselines(bundle, samples: tuple[torch.Tensor, Sequence[str]], prompts: Sequence[str],
                          real: tuple[torch.Tensor, Sequence[str]], reference: torch.Tensor,
                          floor: torch.Tensor, seed: int = 0) -> dict:
    """The demo's scores: ``samples`` (uint8 images, their prompts, each one of ``prompts``) against
    ``real`` images of the same prompts (the ceiling), the samples with shuffled captions, and for
    FD-CLIP against ``reference`` (the validation images): ``floor`` (as many real images of the
    other split as there are samples) and as many noise images."""
    images, sample_prompts = samples
    index = {p: i for i, p in enumerate(prompts)}
    targets = [index[p] for p in sample_prompts]
    real_images, real_prompts = real
    real_targets = [index[p] for p in real_prompts]
    text = text_features(bundle, prompts)
    fake, ref = image_features(bundle, images), image_features(bundle, reference)
    noise = noise_images(len(images), tuple(images.shape[2:]), seed)
    out = {
        "clip_score": {"samples": pair_score(fake, text, targets),
                       "shuffled_captions": pair_score(fake, text, shifted(targets, len(prompts)))},
        "caption_retrieval": {"samples": caption_retrieval(fake, text, targets)},
        "fd_clip": {"samples": frechet_distance(ref, fake),
                    "real_images": frechet_distance(ref, image_features(bundle, floor[:len(images)])),
                    "random_noise": frechet_distance(ref, image_features(bundle, noise)),
                    "reference_images": len(reference), "images_per_set": len(images), "note": FD_NOTE},
    }
    if len(real_images):
        real_feats = image_features(bundle, real_images)
        out["clip_score"]["real_images"] = pair_score(real_feats, text, real_targets)
        out["caption_retrieval"]["real_images"] = caption_retrieval(real_feats, text, real_targets)
    return out
