"""``train-vae``: fit a small AutoencoderKL on image shards (reconstruction + KL, LDM's first stage).

The loss is LDM's ``L_rec + kl_weight * KL`` with both terms summed per image and averaged over
the batch, here divided by the pixel count so ``kl_weight`` keeps LDM's meaning (1e-6) while the
reconstruction term is a readable mean absolute error. No perceptual or adversarial term: their
pretrained networks are not available offline, and at 64 px an L1 loss already reconstructs
recognisably. The latent scaling and shift are measured on the data afterwards (1 / std and mean of latents).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from tqdm import tqdm

from ..config import AutoencoderConfig
from ..utils.lr import warmup_cosine
from ..utils.runs import MetricsLog
from .vae import build_vae


def vae_loss(vae: AutoencoderKL, x: torch.Tensor, kl_weight: float) -> tuple[torch.Tensor, dict]:
    posterior = vae.encode(x).latent_dist
    recon = vae.decode(posterior.sample()).sample
    rec = (recon - x).abs().mean()
    kl = posterior.kl().mean() / x[0].numel()
    return rec + kl_weight * kl, {"rec_l1": rec.item(), "kl": kl.item()}


def random_crop(batch: torch.Tensor, size: int | None, gen: torch.Generator) -> torch.Tensor:
    """One random crop per batch: the VAE is convolutional, so small crops train it 4x cheaper."""
    h, w = batch.shape[-2:]
    if size is None or size >= min(h, w):
        return batch
    top = int(torch.randint(0, h - size + 1, (1,), generator=gen))
    left = int(torch.randint(0, w - size + 1, (1,), generator=gen))
    return batch[..., top : top + size, left : left + size]


def _to_float(batch_u8: torch.Tensor, device) -> torch.Tensor:
    return batch_u8.to(device, non_blocking=True).float().div(127.5).sub(1.0)


@torch.no_grad()
def measure_latent_stats(vae: AutoencoderKL, images_u8: torch.Tensor, device, batch: int = 64, limit: int = 1024) -> tuple[float, float]:
    """(scaling_factor, shift_factor) = (1 / std, mean) of posterior samples, so that
    ``(z - shift) * scale`` has zero mean and unit variance: SD computed its 0.18215 the same way
    (LDM sec. 4.3.2); the shift is SD3's addition, needed here because images on a white
    background give latents with a large mean offset."""
    zs = []
    gen = torch.Generator(device=device).manual_seed(0)
    for i in range(0, min(limit, images_u8.shape[0]), batch):
        dist = vae.encode(_to_float(images_u8[i : i + batch], device)).latent_dist
        zs.append(dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen, device=device))
    z = torch.cat(zs).float()
    return float(1.0 / z.std()), float(z.mean())


def train_vae(
    cfg: AutoencoderConfig,
    images_u8: torch.Tensor,
    out_dir: Path,
    device: torch.device,
    seed: int,
    log: MetricsLog,
) -> tuple[AutoencoderKL, dict]:
    """Train on an in-memory uint8 NCHW image tensor and save a diffusers folder to ``out_dir``."""
    tc = cfg.train
    torch.manual_seed(seed)
    vae = build_vae(cfg).to(device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=tc.lr, weight_decay=0.0)
    # A short warm-up over a cosine that starts at once: converges in few steps without late oscillation.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(max(1, tc.steps // 20), tc.steps, decay_start=0))
    gen = torch.Generator().manual_seed(seed)
    n = images_u8.shape[0]
    t0, losses = time.time(), []
    bar = tqdm(range(tc.steps), desc="train-vae", unit="step", dynamic_ncols=True)
    for step in bar:
        idx = torch.randint(0, n, (min(tc.batch_size, n),), generator=gen)
        batch = random_crop(images_u8[idx], tc.crop, gen)
        loss, stats = vae_loss(vae, _to_float(batch, device), tc.kl_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(stats["rec_l1"])
        if (step + 1) % tc.log_every == 0 or step == tc.steps - 1:
            recent = losses[-tc.log_every :]  # mean over the interval, not one noisy batch
            log.write(stage="vae", step=step, rec_l1=sum(recent) / len(recent), kl=stats["kl"])
            bar.set_postfix(rec_l1=f"{stats['rec_l1']:.4f}", kl=f"{stats['kl']:.2f}")
    vae.eval()
    scale, shift = measure_latent_stats(vae, images_u8, device)
    vae.register_to_config(scaling_factor=scale, shift_factor=shift)
    vae.to("cpu").save_pretrained(out_dir, safe_serialization=True)
    vae.to(device)
    tail = losses[-min(50, len(losses)) :] if losses else [float("nan")]
    summary = {
        "steps": tc.steps,
        "final_rec_l1": sum(tail) / len(tail),
        "scaling_factor": scale,
        "shift_factor": shift,
        "seconds": time.time() - t0,
        "saved_to": str(out_dir),
    }
    return vae, summary


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, images_u8: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(originals, reconstructions from the posterior mean), both in [-1, 1] on the CPU."""
    x = _to_float(images_u8, device)
    recon = vae.decode(vae.encode(x.to(vae.dtype)).latent_dist.mean).sample.float().clamp(-1, 1)
    return x.cpu(), recon.cpu()
