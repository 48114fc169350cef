"""``ldm-train train-clip``: a small open_clip CLIP trained from scratch on the image-caption pairs.

Stable Diffusion conditions its U-Net on a text tower trained contrastively on image-caption pairs
(CLIP) and scores samples with the same kind of model. No pretrained CLIP can be downloaded here, so
this trains one on the built-in data, as open_clip's ``training/train.py`` does: both towers, the
symmetric InfoNCE loss (``open_clip.loss.ClipLoss``) with the learned temperature ``logit_scale``
(initialised to log(1/0.07), clamped to log(100) after every step), AdamW with betas (0.9, 0.98),
eps 1e-6 and weight decay on the matrices only, linear warm-up then cosine decay. Images go through
the model's own open_clip eval transform (the one CLIP score uses), once, before training.
The result is saved in open_clip's folder layout (:mod:`.open_clip_folder`).
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from ..config import ClipConfig
from .encoder import _register
from .open_clip_folder import save_open_clip_folder

# OpenAI CLIP's normalisation, open_clip's default (the emoji are on white, like most photos' sky)
PREPROCESS_CFG = {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711],
                  "interpolation": "bicubic", "resize_mode": "shortest"}


def clip_model_cfg(cfg: ClipConfig) -> dict:
    """open_clip's ``model_cfg`` (the schema of its ``model_configs/*.json``)."""
    v, t = cfg.vision, cfg.text
    return {
        "embed_dim": cfg.embed_dim,
        "vision_cfg": {"image_size": v.image_size, "patch_size": v.patch_size, "width": v.width,
                       "layers": v.layers, "head_width": v.head_width},
        "text_cfg": {"context_length": t.context_length, "vocab_size": 49408, "width": t.width,
                     "heads": t.heads, "layers": t.layers},
    }


def build_clip(cfg: ClipConfig, seed: int):
    """A freshly initialised ``(model, eval preprocess, tokenizer, model_cfg)`` (seeded, RNG untouched)."""
    import open_clip

    model_cfg = clip_model_cfg(cfg)
    name = "ldm-clip-" + hashlib.sha256(json.dumps(model_cfg, sort_keys=True).encode()).hexdigest()[:12]
    _register(name, model_cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, image_mean=PREPROCESS_CFG["mean"], image_std=PREPROCESS_CFG["std"],
            image_interpolation=PREPROCESS_CFG["interpolation"], image_resize_mode=PREPROCESS_CFG["resize_mode"])
    return model, preprocess, open_clip.get_tokenizer(name), model_cfg


def preprocess_images(images_u8: torch.Tensor, preprocess) -> torch.Tensor:
    """uint8 ``[N,3,H,W]`` -> the model's input, through its open_clip eval transform (PIL)."""
    return torch.stack([preprocess(Image.fromarray(im.permute(1, 2, 0).numpy())) for im in images_u8])


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """open_clip's rule: no decay on gains, biases, embeddings' scale (``logit_scale``): ndim < 2."""
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
            {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": weight_decay}]


def cosine_lr(step: int, steps: int, warmup: int) -> float:
    """open_clip's ``cosine_lr``: linear warm-up, then cosine to 0, as a factor of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    e, es = step - warmup, max(1, steps - warmup)
    return 0.5 * (1 + math.cos(math.pi * e / es))


def batches(n: int, batch_size: int, steps: int, generator: torch.Generator):
    """Index batches of shuffled epochs (the last partial batch of an epoch is dropped, as open_clip does)."""
    batch_size = min(batch_size, n)
    done = 0
    while done < steps:
        order = torch.randperm(n, generator=generator)
        for i in range(0, n - batch_size + 1, batch_size):
            if done == steps:
                return
            yield order[i:i + batch_size]
            done += 1


@torch.no_grad()
def retrieval_top1(model, pixels: torch.Tensor, tokens: torch.Tensor, batch_size: int = 256) -> float:
    """Fraction of images whose own caption is the nearest of all ``tokens``' captions."""
    model.eval()
    img = torch.cat([model.encode_image(pixels[i:i + batch_size], normalize=True) for i in range(0, len(pixels), batch_size)])
    txt = torch.cat([model.encode_text(tokens[i:i + batch_size], normalize=True) for i in range(0, len(tokens), batch_size)])
    return float(((img @ txt.T).argmax(1) == torch.arange(len(img))).float().mean())


def train_clip(cfg: ClipConfig, train: tuple[torch.Tensor, list[str]], val: tuple[torch.Tensor, list[str]],
               out: Path, seed: int, log) -> dict:
    """Train on ``train`` (uint8 images, captions), report retrieval on ``val``, save to ``out``."""
    from open_clip.loss import ClipLoss

    model, preprocess, tokenizer, model_cfg = build_clip(cfg, seed)
    pixels, tokens = preprocess_images(train[0], preprocess), tokenizer(train[1])
    val_pixels, val_tokens = preprocess_images(val[0], preprocess), tokenizer(val[1])
    t = cfg.train
    optimizer = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=(0.9, 0.98), eps=1e-6)
    loss_fn, first, loss = ClipLoss(), None, None
    generator = torch.Generator().manual_seed(seed)
    bar = tqdm(enumerate(batches(len(pixels), t.batch_size, t.steps, generator)), total=t.steps, desc="train-clip")
    for step, idx in bar:
        model.train()
        for group in optimizer.param_groups:
            group["lr"] = t.lr * cosine_lr(step, t.steps, t.warmup_steps)
        image_features, text_features, logit_scale = model(pixels[idx], tokens[idx])
        loss = loss_fn(image_features, text_features, logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        value = float(loss.detach())
        first = value if first is None else first
        if (step + 1) % t.log_every == 0 or step + 1 == t.steps:
            log.write(stage="clip", step=step + 1, loss=value, logit_scale=float(model.logit_scale.detach().exp()))
            bar.set_postfix(loss=f"{value:.3f}")
    bar.close()
    model.eval().requires_grad_(False)
    save_open_clip_folder(model, model_cfg, {**PREPROCESS_CFG, "size": cfg.vision.image_size}, out)
    return {
        "steps": t.steps,
        "first_loss": first,
        "final_loss": float(loss.detach()) if loss is not None else None,
        "logit_scale": float(model.logit_scale.detach().exp()),
        "train_pairs": len(pixels),
        "val_retrieval_top1": retrieval_top1(model, val_pixels, val_tokens),
        "val_retrieval_chance": 1 / len(val_pixels),
        "clip": str(out),
    }
