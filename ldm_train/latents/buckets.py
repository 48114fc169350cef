"""Streaming batches of one aspect-ratio bucket at a time, resumable exactly (``data.buckets``).

A bucketed cache (``encode`` with ``data.buckets``) holds one series of parts per bucket. The order
of batches is a pure function of (seed, epoch, batch_size, shuffle_buffer, rank, world_size):

1. every epoch, each bucket's parts are permuted (seeded by ``(seed, epoch, bucket)``) and laid
   end to end, cut into blocks of ``shuffle_buffer`` samples, each block shuffled by its own
   seeded permutation (as :mod:`.loader` does for a whole cache);
2. that sequence of the bucket is cut into batches of ``batch_size``; **the last batch of a
   bucket holds the remainder** (``N_b mod batch_size`` samples, when not 0): it is neither
   dropped nor carried into the next epoch, so every sample is seen exactly once per epoch, and
   each epoch has at most one short batch per bucket (for the whole job, not per rank);
3. all batches of all buckets are permuted (seeded by ``(seed, epoch)``) and dealt to the ranks
   round-robin: rank ``r`` of ``W`` takes batches ``r, r + W, r + 2W, ...`` of that order. Together
   the ranks take every batch of the epoch once; each takes the same number each epoch (within
   one), so their epochs stay in step. A rank's stream runs on over epochs forever.

A batch is also the unit of work: DataLoader worker ``w`` of ``n`` makes batches ``w, w + n, ...``
(counted from where the iterator starts); a DataLoader takes items from its workers round-robin,
so they arrive in order whatever ``n`` is. The state is the number of batches yielded, so a
resumed run continues with exactly the batches it would have seen, with any worker count. The
batch size is part of the order (batches are cut before they are dealt), so it must stay the
same across a resume (the state says so, naming ``batch_size``).

The loss of a short batch is the mean over its samples, as for any batch (so a short batch
weighs as much as a full one in the step); ``train.batch_size`` is the size of the others.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..data.buckets import bucket_name
from ..data.shards import DataError
from .cache import LATENT_MEMBER, read_manifest, unpack_tensors
from .loader import LatentLoader, LoaderStateError, index_shard

STATE_VERSION = 1
_TAG = 0xB0C7  # in every seed of this module: bucket draws never coincide with the plain loader's


@dataclass(frozen=True)
class BucketPlan:
    """The order of batches; pure arithmetic, shared by the main process and the workers."""

    counts: tuple[tuple[int, ...], ...]  # per bucket: samples per part
    seed: int
    rank: int
    world_size: int
    block: int
    batch: int

    def bucket_total(self, b: int) -> int:
        return sum(self.counts[b])

    @property
    def total(self) -> int:
        return sum(map(sum, self.counts))

    def bucket_batches(self, b: int) -> int:
        return math.ceil(self.bucket_total(b) / self.batch)

    @property
    def total_batches(self) -> int:
        return sum(self.bucket_batches(b) for b in range(len(self.counts)))

    @property
    def rank_batches(self) -> int:
        """Batches this rank takes every epoch."""
        return len(range(self.rank, self.total_batches, self.world_size))

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The global batch ids of an epoch in order (a batch id counts bucket 0's batches, then 1's, ...)."""
        return np.random.default_rng([_TAG, self.seed, epoch]).permutation(self.total_batches)

    def locate(self, batch_id: int) -> tuple[int, int]:
        """(bucket, batch within the bucket) of a global batch id."""
        for b in range(len(self.counts)):
            n = self.bucket_batches(b)
            if batch_id < n:
                return b, batch_id
            batch_id -= n
        raise IndexError(batch_id)

    def rank_batch(self, epoch: int, index: int, order: np.ndarray | None = None) -> tuple[int, int]:
        """(bucket, batch within the bucket) of this rank's ``index``-th batch of ``epoch``."""
        order = self.epoch_order(epoch) if order is None else order
        return self.locate(int(order[self.rank + index * self.world_size]))

    def shard_order(self, epoch: int, b: int) -> np.ndarray:
        return np.random.default_rng([_TAG, self.seed, epoch, b]).permutation(len(self.counts[b]))

    def block_shuffle(self, epoch: int, b: int, block: int) -> np.ndarray:
        n = min(self.block, self.bucket_total(b) - block * self.block)
        return np.random.default_rng([_TAG, self.seed, epoch, b, block]).permutation(n)

    def members(self, epoch: int, b: int, j: int) -> list[tuple[int, int]]:
        """``[(part within the bucket, sample within the part)]`` of batch ``j`` of bucket ``b``."""
        order = self.shard_order(epoch, b)
        starts = np.cumsum([0] + [self.counts[b][s] for s in order])
        lo, hi = j * self.batch, min((j + 1) * self.batch, self.bucket_total(b))
        shuffles: dict[int, np.ndarray] = {}
        out = []
        for i in range(lo, hi):
            k, offset = divmod(i, self.block)
            if k not in shuffles:
                shuffles[k] = self.block_shuffle(epoch, b, k)
            u = k * self.block + int(shuffles[k][offset])  # position in the bucket's laid-out parts
            at = int(np.searchsorted(starts, u, side="right")) - 1
            out.append((int(order[at]), u - int(starts[at])))
        return out


class _Batches(IterableDataset):
    """Yields the batches this worker owns, from this rank's batch ``start`` on."""

    def __init__(self, plan: BucketPlan, paths: list[list[Path]], start: int):
        self.plan, self.paths, self.start = plan, paths, start
        self._index: dict[tuple[int, int], list] = {}  # per worker process: (bucket, part) -> member offsets

    def _read(self, b: int, part: int, i: int, f) -> tuple[str, dict, str]:
        if (b, part) not in self._index:
            self._index[(b, part)] = index_shard(self.paths[b][part])
        key, members = self._index[(b, part)][i]
        payload = {}
        for ext in (LATENT_MEMBER, "txt"):
            offset, size = members[ext]
            f.seek(offset)
            payload[ext] = f.read(size)
        return key, unpack_tensors(payload[LATENT_MEMBER]), payload["txt"].decode("utf-8")

    def batch(self, epoch: int, b: int, j: int) -> dict:
        members = self.plan.members(epoch, b, j)
        samples: list = [None] * len(members)
        for part in sorted({p for p, _ in members}):  # one open file per part, samples put back in order
            with open(self.paths[b][part], "rb") as f:
                for n, (p, i) in enumerate(members):
                    if p == part:
                        samples[n] = self._read(b, part, i, f)
        tensors = {name: torch.stack([s[1][name] for s in samples]) for name in samples[0][1]}
        return {**tensors, "key": [s[0] for s in samples], "caption": [s[2] for s in samples], "bucket": b}

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        per_epoch, q, order_epoch, order = self.plan.rank_batches, 0, None, None
        position = self.start
        while True:
            if q % workers == worker:
                epoch, index = divmod(position, per_epoch)
                if epoch != order_epoch:
                    order_epoch, order = epoch, self.plan.epoch_order(epoch)
                yield {**self.batch(epoch, *self.plan.rank_batch(epoch, index, order)), "q": q}
            q, position = q + 1, position + 1


def bucket_parts(folder: Path, manifest: dict) -> tuple[list[tuple[int, int]], list[list[tuple[Path, int]]]]:
    """The buckets ``(w, h)`` of a bucketed cache and, per bucket, its parts ``(path, samples)``."""
    buckets = [tuple(b) for b in manifest["buckets"]]
    parts: list[list[tuple[Path, int]]] = [[] for _ in buckets]
    for o in manifest["output_shards"]:
        if o["samples"] > 0:
            parts[buckets.index(tuple(o["bucket"]))].append((folder / o["name"], o["samples"]))
    return buckets, parts


class BucketLoader:
    """Batches of a bucketed latent split for one rank, each from one bucket, infinite over epochs,
    resumable exactly; the interface of :class:`~ldm_train.latents.loader.LatentLoader`.

    ``next(iter(loader))`` -> ``{"mean": [B,C,h,w], "std", "context" (or "tokens"), "key", "caption",
    "bucket": (w, h)}`` where ``h, w`` are the bucket's latent size and ``B`` is ``batch_size``, or
    fewer for the last batch of a bucket in an epoch (see the module doc)."""

    def __init__(
        self, folder: str | Path, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
        num_workers: int = 0, shuffle_buffer: int = 1024, prefetch_factor: int = 2,
    ):
        if batch_size <= 0 or shuffle_buffer <= 0 or num_workers < 0:
            raise ValueError(f"need batch_size > 0, shuffle_buffer > 0, num_workers >= 0; got "
                             f"{batch_size}, {shuffle_buffer}, {num_workers}")
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        if not self.manifest.get("buckets"):
            raise DataError(f"latent cache {self.folder} was encoded without data.buckets")
        self.buckets, parts = bucket_parts(self.folder, self.manifest)
        self.paths = [[p for p, _ in ps] for ps in parts]
        counts = tuple(tuple(n for _, n in ps) for ps in parts)
        self.plan = BucketPlan(counts, seed, rank, world_size, shuffle_buffer, batch_size)
        if self.plan.rank_batches == 0:
            raise DataError(f"latent cache {self.folder} makes {self.plan.total_batches} batches of up to {batch_size}: "
                            f"none left for rank {rank} of {world_size}")
        self.batch_size, self.num_workers, self.prefetch_factor = batch_size, num_workers, prefetch_factor
        self.batches_yielded = 0
        self.samples_yielded = 0

    @property
    def samples_per_epoch(self) -> int:
        """Samples in one epoch of the whole job (all ranks together)."""
        return self.plan.total

    @property
    def rank_batches_per_epoch(self) -> int:
        return self.plan.rank_batches

    @property
    def epoch(self) -> int:
        return self.batches_yielded // self.plan.rank_batches

    def _layout(self) -> dict:
        p = self.plan
        return {"version": STATE_VERSION, "seed": p.seed, "rank": p.rank, "world_size": p.world_size,
                "shuffle_buffer": p.block, "batch_size": p.batch, "samples_per_epoch": p.total,
                "buckets": {bucket_name(b): sum(c) for b, c in zip(self.buckets, p.counts)}}

    def state_dict(self) -> dict:
        return {**self._layout(), "batches_yielded": self.batches_yielded, "samples_yielded": self.samples_yielded,
                "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        mine = self._layout()
        if not state.get("buckets"):
            raise LoaderStateError("loader state is of a latent cache without data.buckets, but this cache has "
                                   "buckets; the run cannot continue exactly")
        for key in mine:
            if state.get(key) != mine[key]:
                raise LoaderStateError(
                    f"loader state has {key}={state.get(key)!r} but this loader has {key}={mine[key]!r}; "
                    "the order of bucketed batches depends on it, so the run cannot continue exactly")
        self.batches_yielded, self.samples_yielded = int(state["batches_yielded"]), int(state["samples_yielded"])

    def _batches(self, start: int) -> Iterator[dict]:
        dataset = _Batches(self.plan, self.paths, start)
        if self.num_workers == 0:
            yield from dataset
            return
        yield from DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                              prefetch_factor=self.prefetch_factor, persistent_workers=False)

    def __iter__(self) -> Iterator[dict]:
        for q, batch in enumerate(self._batches(self.batches_yielded)):
            if batch.pop("q") != q:  # the round-robin order this design relies on
                raise RuntimeError(f"bucket loader: batch {q} expected from the workers, got another")
            batch["bucket"] = self.buckets[batch["bucket"]]
            self.batches_yielded += 1  # before the yield: the caller holds it now
            self.samples_yielded += len(batch["key"])
            yield batch


def open_loader(folder: str | Path, cfg, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
    """The streaming loader for the cache in ``folder``: a :class:`BucketLoader` when it was
    encoded with ``data.buckets``, else a :class:`~ldm_train.latents.loader.LatentLoader`; ``cfg``
    is a :class:`ldm_train.config.LoaderConfig` (``latents.loader``)."""
    kind = BucketLoader if read_manifest(Path(folder)).get("buckets") else LatentLoader
    return kind(folder, batch_size, seed, rank, world_size, cfg.num_workers, cfg.shuffle_buffer, cfg.prefetch_factor)
