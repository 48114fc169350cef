"""Batch sources for the loop, each with a state that a checkpoint stores so that a resumed run
draws exactly the batches the uninterrupted run would have drawn."""
from __future__ import annotations

import torch

from ..autoencoder.vae import to_latent
from ..latents.cache import LatentData


class MemoryBatches:
    """Random batches (with replacement) from a latent split held in memory, drawn with this
    rank's own seeded generator: every rank sees different samples, and the generator's state is
    the whole data state. Latents are fresh draws ``z ~ N(mean, std^2)`` from the cached
    posterior, scaled to the diffusion latent space."""

    def __init__(self, data: LatentData, batch_size: int, seed: int, rank: int):
        self.data = data
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed + rank)
        self.scale = data.manifest["scaling_factor"]
        self.shift = data.manifest["shift_factor"]

    def next(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, len(self.data), (self.batch_size,), generator=self.generator)
        z = to_latent(self.data.mean[idx], self.data.std[idx], self.scale, self.shift, generator=self.generator)
        return z.to(device), self.data.context[idx].to(device, torch.float32)

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, JSON metadata) for the checkpoint's per-rank file."""
        return {"data_generator": self.generator.get_state()}, {"source": "memory"}

    def load(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        if meta.get("source") != "memory":
            raise ValueError(f"checkpoint's data state is from a {meta.get('source')!r} source, not 'memory'")
        self.generator.set_state(tensors["data_generator"])
