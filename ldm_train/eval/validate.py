"""Held-out denoising loss: a cheap, deterministic signal of generalisation between sample grids.

The loss is measured at fixed timesteps with fixed noise (seeded), on the validation latents'
posterior means, so two checkpoints are compared on exactly the same inputs.
"""
from __future__ import annotations

import torch

from ..autoencoder.vae import to_latent
from ..diffusion import NoiseSchedule
from ..diffusion.parameterization import target
from ..latents.cache import LatentData
from ..model.addition import ContextLayout


@torch.no_grad()
def validation_loss(
    unet: torch.nn.Module,
    data: LatentData,
    schedule: NoiseSchedule,
    prediction_type: str,
    device,
    timesteps: tuple[int, ...] = (50, 250, 500, 750, 950),
    seed: int = 0,
    batch_size: int = 128,
) -> dict[str, float]:
    """Mean squared error of the prediction per fixed timestep, and their mean."""
    gen = torch.Generator().manual_seed(seed)
    scale, shift = data.manifest["scaling_factor"], data.manifest["shift_factor"]
    x0_all = to_latent(data.mean, torch.zeros_like(data.std), scale, shift)
    # All noise drawn up front, one tensor per timestep: the result does not depend on batch_size.
    noise = {t: torch.randn(x0_all.shape, generator=gen) for t in timesteps}
    sums = {t: 0.0 for t in timesteps}
    for i in range(0, len(data), batch_size):
        x0 = x0_all[i : i + batch_size].to(device)
        context = data.context[i : i + batch_size].float()
        if data.time_ids is not None:  # an SDXL cache: pooled embedding and size/crop ids packed after the tokens
            layout = ContextLayout(context.shape[-1], data.pooled.shape[-1])
            context = layout.pack(context, data.pooled[i : i + batch_size].float(), data.time_ids[i : i + batch_size])
        context = context.to(device)
        for t_val in timesteps:
            eps = noise[t_val][i : i + batch_size].to(device)
            t = torch.full((x0.shape[0],), t_val, dtype=torch.int64, device=device)
            out = unet(schedule.add_noise(x0, eps, t), t, context)[:, : x0.shape[1]]  # mean part if 2C
            want = target(schedule, x0, eps, t, prediction_type)
            sums[t_val] += torch.nn.functional.mse_loss(out.float(), want.float(), reduction="sum").item()
    per_t = {f"t{t}": s / x0_all.numel() for t, s in sums.items()}
    return {"val_loss": sum(per_t.values()) / len(per_t), **per_t}


def validation_loss_buckets(unet: torch.nn.Module, parts: list[LatentData], schedule: NoiseSchedule,
                            prediction_type: str, device, **kwargs) -> dict[str, float]:
    """:func:`validation_loss` over a split held as one part per latent shape (aspect-ratio
    buckets): each part's per-timestep mean weighted by its number of latent elements, so the
    result is the mean over every element of the split, as for a split of one shape."""
    if len(parts) == 1:
        return validation_loss(unet, parts[0], schedule, prediction_type, device, **kwargs)
    sizes = [p.mean.numel() for p in parts]
    results = [validation_loss(unet, p, schedule, prediction_type, device, **kwargs) for p in parts]
    per_t = {k: sum(r[k] * n for r, n in zip(results, sizes)) / sum(sizes) for k in results[0] if k != "val_loss"}
    return {"val_loss": sum(per_t.values()) / len(per_t), **per_t}
