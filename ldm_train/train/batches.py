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
from ..latents.buckets import open_loader
from ..model.addition import ContextLayout


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``; to a GPU through pinned memory with ``non_blocking=True``, so the copy
    is queued on the current stream instead of blocking the host (from pageable memory CUDA
    copies synchronously through a staging buffer)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


class LatentDraw:
    """The generator of the posterior draws ``z ~ N(mean, std^2)``, made on the batch's device.

    On the CPU the draw uses the source's own host generator, interleaved with its index draws:
    the stream of every earlier version, so CPU runs and their checkpoints are unchanged. On an
    accelerator the draw runs there with a generator of that device (seeded apart, saved in the
    checkpoint as ``latent_generator_device``; meta ``draw: device``). A checkpoint without
    ``draw`` (written before the draw moved) resumes with the host draw, its original stream."""

    def __init__(self, host: torch.Generator, seed: int):
        self.host, self.seed = host, seed + 7_919
        self.on_host = False  # a pre-device-draw checkpoint: keep drawing on the host
        self._device_gen: torch.Generator | None = None
        self._device_state: torch.Tensor | None = None

    def generator(self, device: torch.device) -> torch.Generator:
        if device.type == "cpu" or self.on_host:
            return self.host
        if self._device_gen is None:
            self._device_gen = torch.Generator(device).manual_seed(self.seed)
            if self._device_state is not None:
                self._device_gen.set_state(self._device_state)
        return self._device_gen

    def state(self) -> dict[str, torch.Tensor]:
        if self._device_gen is not None:
            return {"latent_generator_device": self._device_gen.get_state()}
        return {"latent_generator_device": self._device_state} if self._device_state is not None else {}

    def meta(self) -> dict:
        return {} if self.on_host else {"draw": "device"}

    def reseed(self, seed: int) -> None:
        """Fresh streams (elastic resume: a rank's stream cannot be split across ranks)."""
        self.host.manual_seed(seed)
        self.seed, self.on_host, self._device_gen, self._device_state = seed + 7_919, False, None, None

    def load(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        self.on_host = meta.get("draw") != "device"
        self._device_gen, self._device_state = None, tensors.get("latent_generator_device")


class DevicePrefetch:
    """The loop's view of a batch source: on a GPU the next batch's host work and copies are
    queued on a side stream while the current step runs; on the CPU (``ahead`` off) it passes
    batches straight through, so behaviour there is unchanged. A checkpoint taken while a batch is
    in flight stores the source's state from *before* that batch, so a resumed run draws it again."""

    def __init__(self, source, device: torch.device, ahead: bool | None = None):
        self.source, self.device = source, device
        self.ahead = device.type == "cuda" if ahead is None else ahead
        self.stream = torch.cuda.Stream(device) if self.ahead and device.type == "cuda" else None
        self._next = None  # (z, context, source state before it)

    def _fetch(self):
        state = self.source.state()
        if self.stream is None:
            return (*self.source.next(self.device), state)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # its inputs exist before it starts
        with torch.cuda.stream(self.stream):
            z, context = self.source.next(self.device)
        return z, context, state

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.ahead:
            return self.source.next(self.device)
        if self._next is None:
            self._next = self._fetch()
        z, context, _ = self._next
        if self.stream is not None:
            main = torch.cuda.current_stream(self.device)
            main.wait_stream(self.stream)
            for t in (z, context):  # made on the side stream, used on the main one: the caching
                t.record_stream(main)  # allocator must not reuse their memory before main is done
        self._next = self._fetch()
        return z, context

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        return self._next[2] if self._next is not None else self.source.state()

    def load(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        self.source.load(tensors, meta)
        self._next = None

    def reseed(self, seed: int) -> None:
        self.source.reseed(seed)
        self._next = None

    def __getattr__(self, name):  # manifest, null_context, context_shape, ...
        return getattr(self.source, name)


class MicroConditioning:
    """SDXL caches (``pooled`` + ``time_ids`` stored by ``encode``): the source hands the loop a
    packed context (:mod:`ldm_train.model.addition`) and a null context without the time-id row, so
    caption dropout keeps the sizes; ``train.size_cond_drop_prob`` zeroes a sample's ids, drawn from
    the source's host generator (saved in checkpoints) only when it is above 0."""

    def __init__(self, manifest: dict, null_context: torch.Tensor, null_pooled: torch.Tensor | None,
                 drop_prob: float, generator: torch.Generator, folder):
        if null_pooled is None:
            raise DataError(f"latent cache {folder}: it has SDXL's pooled embeddings but {NULL_CONTEXT} lacks "
                            "'pooled'; encode again")
        self.layout = ContextLayout(null_context.shape[-1], manifest["pooled_width"])
        self.null_context = self.layout.pack_null(null_context.float(), null_pooled.float())
        self.context_shape = [null_context.shape[-2] + self.layout.extra_rows, null_context.shape[-1]]
        self.drop_prob, self.generator = drop_prob, generator

    def pack(self, context: torch.Tensor, pooled: torch.Tensor, time_ids: torch.Tensor,
             device: torch.device) -> torch.Tensor:
        if self.drop_prob > 0:  # drawn on the host: the same mask on every device
            drop = torch.rand(time_ids.shape[0], generator=self.generator) < self.drop_prob
            time_ids = time_ids * (~drop).to(time_ids.dtype)[:, None]
        packed = self.layout.pack(context.float(), pooled.float(), time_ids.float())
        return to_device(packed, device)


def micro_conditioning(manifest: dict, null_context: torch.Tensor, null_pooled, drop_prob: float,
                       generator: torch.Generator, folder) -> MicroConditioning | None:
    return (MicroConditioning(manifest, null_context, null_pooled, drop_prob, generator, folder)
            if manifest.get("time_ids") else None)


def check_conditioning(layout: ContextLayout | None, batches) -> None:
    """An SDXL cache needs a text_time U-Net (``layout``: its :func:`~ldm_train.model.unet.context_layout`)
    of the same widths, and the reverse."""
    micro = getattr(batches, "micro", None)
    if (layout is None) != (micro is None) or (layout is not None and layout != micro.layout):
        have = f"pooled width {micro.layout.pooled}, context width {micro.layout.width}" if micro else "no pooled embedding"
        need = (f"pooled width {layout.pooled}, context width {layout.width}" if layout
                else "no added conditioning (model.addition_embed_type null)")
        raise DataError(f"the latent cache holds {have} but the U-Net takes {need}; encode with the U-Net's text "
                        "towers (text.encoder: sdxl for an SDXL U-Net)")


class MemoryBatches:
    """Random batches (with replacement) from a latent split held in memory, drawn with this
    rank's own seeded generator: every rank sees different samples, and the generator's state is
    the whole data state. Latents are fresh draws ``z ~ N(mean, std^2)`` from the cached
    posterior, scaled to the diffusion latent space."""

    def __init__(self, data: LatentData, batch_size: int, seed: int, rank: int, tokens: bool = False,
                 size_drop: float = 0.0):
        self.data = data
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed + rank)
        self.draw = LatentDraw(self.generator, seed + rank)
        self.manifest = data.manifest
        self.tokens = check_text(data.manifest, tokens, "the latent cache")
        self.null_context = data.null_context
        self.context_shape = list((data.tokens if self.tokens else data.context).shape[1:])
        self.scale = data.manifest["scaling_factor"]
        self.shift = data.manifest["shift_factor"]
        self.micro = micro_conditioning(data.manifest, data.null_context, data.null_pooled, size_drop,
                                        self.generator, "in memory")
        if self.micro is not None:
            self.null_context, self.context_shape = self.micro.null_context, self.micro.context_shape

    def next(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, len(self.data), (self.batch_size,), generator=self.generator)
        mean, std = to_device(self.data.mean[idx], device), to_device(self.data.std[idx], device)
        z = to_latent(mean, std, self.scale, self.shift, generator=self.draw.generator(device))
        if self.tokens:  # the caption tokens: the loop's model encodes them (train.lora.text_encoder)
            return z, to_device(self.data.tokens[idx], device).long()
        if self.micro is not None:
            return z, self.micro.pack(self.data.context[idx], self.data.pooled[idx], self.data.time_ids[idx], device)
        return z, to_device(self.data.context[idx], device).float()

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, JSON metadata) for the checkpoint's per-rank file."""
        return {"data_generator": self.generator.get_state(), **self.draw.state()}, {"source": "memory", **self.draw.meta()}

    def load(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        if meta.get("source") != "memory":
            raise ValueError(f"checkpoint's data state is from a {meta.get('source')!r} source, not 'memory'")
        self.generator.set_state(tensors["data_generator"])
        self.draw.load(tensors, meta)

    def reseed(self, seed: int) -> None:
        """Fresh index and latent draws (elastic resume; the draws are with replacement, so there
        is no position to carry over)."""
        self.draw.reseed(seed)


class StreamBatches:
    """Batches streamed from the latent shards by :class:`~ldm_train.latents.loader.LatentLoader`
    (or, for a cache encoded with ``data.buckets``, :class:`~ldm_train.latents.buckets.BucketLoader`:
    each batch from one bucket, so its shape varies from batch to batch) (each rank its share,
    shuffled with a seeded buffer, DataLoader workers reading ahead): for splits too big to hold
    in memory. The state is the loader's (the global position, exact across a change of worker
    count, batch size or number of processes; bucketed: the batches yielded) and the generator of
    the latent draws."""

    def __init__(self, folder: Path, loader_cfg: LoaderConfig, batch_size: int, seed: int, rank: int, world_size: int,
                 tokens: bool = False, size_drop: float = 0.0):
        self.manifest = read_manifest(folder)
        self.tokens = check_text(self.manifest, tokens, folder)
        self.loader = open_loader(folder, loader_cfg, batch_size, seed, rank, world_size)  # bucketed or not
        nulls = load_file(str(folder / NULL_CONTEXT))
        self.null_context = nulls["context"]
        self.context_shape = list(self.manifest["context_shape"])
        self.generator = torch.Generator().manual_seed(seed + rank)
        self.micro = micro_conditioning(self.manifest, nulls["context"], nulls.get("pooled"), size_drop,
                                        self.generator, folder)
        if self.micro is not None:
            self.null_context, self.context_shape = self.micro.null_context, self.micro.context_shape
        self.draw = LatentDraw(self.generator, seed + rank)
        self.scale = self.manifest["scaling_factor"]
        self.shift = self.manifest["shift_factor"]
        self.batch_size = batch_size
        self.last_keys: list[str] = []  # the sample keys of the latest batch (what a step trained on)
        self._batches = None

    def next(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._batches is None:
            self._batches = iter(self.loader)
        batch = next(self._batches)
        self.last_keys = batch["key"]
        mean, std = to_device(batch["mean"], device), to_device(batch["std"], device)
        z = to_latent(mean, std, self.scale, self.shift, generator=self.draw.generator(device))
        if self.tokens:
            return z, to_device(batch["tokens"], device).long()
        if self.micro is not None:
            return z, self.micro.pack(batch["context"], batch["pooled"], batch["time_ids"], device)
        return z, to_device(batch["context"], device).float()

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {"latent_generator": self.generator.get_state(), **self.draw.state()}
        return tensors, {"source": "stream", "loader": self.loader.state_dict(), **self.draw.meta()}

    def load(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        if meta.get("source") != "stream":
            raise ValueError(f"checkpoint's data state is from a {meta.get('source')!r} source, not 'stream'")
        self.loader.load_state_dict(meta["loader"])
        self.generator.set_state(tensors["latent_generator"])
        self.draw.load(tensors, meta)
        self._batches = None  # the next batch continues right after the checkpoint's last one

    def reseed(self, seed: int) -> None:
        """Fresh latent draws (elastic resume); the sample position is the loader's, kept."""
        self.draw.reseed(seed)


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
        manifest = read_manifest(folder)
        check_text(manifest, tokens, folder)  # before reading the split
        if manifest.get("buckets"):
            raise DataError(f"latent cache {folder} was encoded with data.buckets (latents of several shapes); "
                            "train.data_source: memory holds one shape: set train.data_source=stream")
        return MemoryBatches(load_latents(folder), train.batch_size, seed, rank, tokens, train.size_cond_drop_prob)
    return StreamBatches(folder, loader, train.batch_size, seed, rank, world_size, tokens, train.size_cond_drop_prob)
