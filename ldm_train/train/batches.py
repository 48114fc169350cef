"""Batch sources for the loop, each with a state that a checkpoint stores so that a resumed run
draws exactly the batches the uninterrupted run would have drawn."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from ..autoencoder.vae import to_latent
from ..config import LoaderConfig, TrainConfig
from ..data.shards import DataError
from ..latents.cache import NULL_CONTEXT, LatentData, load_latents, read_manifest
from ..latents.loader import LatentLoader


class MemoryBatches:
    """Random batches (with replacement) from a latent split held in memory, drawn with this
    rank's own seeded generator: every rank sees different samples, and the generator's state is
    the whole data state. Latents are fresh draws ``z ~ N(mean, std^2)`` from the cached
    posterior, scaled to the diffusion latent space."""

    def __init__(self, data: LatentData, batch_size: int, seed: int, rank: int, tokens: bool = False):
        self.data = data
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed + rank)
        self.manifest = data.manifest
        self.tokens = check_text(data.manifest, tokens, "the latent cache")
        self.null_context = data.null_context
        self.context_shape = list((data.tokens if self.tokens else data.context).shape[1:])
        self.scale = data.manifest["scaling_factor"]
        self.shift = data.manifest["shift_factor"]

    def next(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, len(self.data), (self.batch_size,), generator=self.generator)
        z = to_latent(self.data.mean[idx], self.data.std[idx], self.scale, self.shift, generator=self.generator)
        if self.tokens:  # the caption tokens: the loop's model encodes them (train.lora.text_encoder)
            return z.to(device), self.data.tokens[idx].to(device, torch.long)
        return z.to(device), self.data.context[idx].to(device, torch.float32)

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, JSON metadata) for the checkpoint's per-rank file."""
        return {"data_generator": self.generator.get_state()}, {"source": "memory"}

    def load(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        if meta.get("source") != "memory":
            raise ValueError(f"checkpoint's data state is from a {meta.get('source')!r} source, not 'memory'")
        self.generator.set_state(tensors["data_generator"])


class StreamBatches:
    """Batches streamed from the latent shards by :class:`LatentLoader` (each rank its share,
    shuffled with a seeded buffer, DataLoader workers reading ahead): for splits too big to hold
    in memory. The state is the loader's (samples yielded: exact across a change of worker
    count) and the generator of the latent draws."""

    def __init__(self, folder: Path, loader_cfg: LoaderConfig, batch_size: int, seed: int, rank: int, world_size: int,
                 tokens: bool = False):
        self.manifest = read_manifest(folder)
        self.tokens = check_text(self.manifest, tokens, folder)
        self.loader = LatentLoader.from_config(folder, loader_cfg, batch_size, seed, rank, world_size)
        self.null_context = load_file(str(folder / NULL_CONTEXT))["context"]
        self.context_shape = list(self.manifest["context_shape"])
        self.generator = torch.Generator().manual_seed(seed + rank)
        self.scale = self.manifest["scaling_factor"]
        self.shift = self.manifest["shift_factor"]
        self._batches = None

    def next(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._batches is None:
            self._batches = iter(self.loader)
        batch = next(self._batches)
        z = to_latent(batch["mean"], batch["std"], self.scale, self.shift, generator=self.generator)
        if self.tokens:
            return z.to(device), batch["tokens"].to(device, torch.long)
        return z.to(device), batch["context"].to(device, torch.float32)

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        return {"latent_generator": self.generator.get_state()}, {"source": "stream", "loader": self.loader.state_dict()}

    def load(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        if meta.get("source") != "stream":
            raise ValueError(f"checkpoint's data state is from a {meta.get('source')!r} source, not 'stream'")
        self.loader.load_state_dict(meta["loader"])
        self.generator.set_state(tensors["latent_generator"])
        self._batches = None  # the next batch continues right after the checkpoint's last one


def check_text(manifest: dict, tokens: bool, folder) -> bool:
    """The cache's ``latents.text`` must be what the run trains on: embeddings (a frozen text tower) or,
    with ``train.lora.text_encoder`` (the tower trains), caption tokens; returns whether tokens."""
    cached = manifest.get("text", "embedding")
    if tokens and cached != "tokens":
        raise DataError(f"latent cache {folder} holds text embeddings; train.lora.text_encoder trains the text "
                        "encoder on caption tokens (re-encode with latents.text=tokens)")
    if not tokens and cached != "embedding":
        raise DataError(f"latent cache {folder} holds caption tokens only; training needs text embeddings "
                        "(re-encode with latents.text=embedding, or train the text encoder: train.lora.text_encoder)")
    return tokens


def training_batches(
    folder: Path, *, train: TrainConfig, loader: LoaderConfig, seed: int, rank: int, world_size: int
) -> MemoryBatches | StreamBatches:
    """The loop's one batch source for the latent split in ``folder``, by ``train.data_source``:
    held in memory (small sets) or streamed from its shards (any size)."""
    tokens = train.lora.enabled and train.lora.text_encoder
    if train.data_source == "memory":
        check_text(read_manifest(folder), tokens, folder)  # before reading the split
        return MemoryBatches(load_latents(folder), train.batch_size, seed, rank, tokens)
    return StreamBatches(folder, loader, train.batch_size, seed, rank, world_size, tokens)
