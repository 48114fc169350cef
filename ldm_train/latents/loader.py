"""A streaming, resumable loader of latent shards for training at scale.

The sample order is a pure function of (seed, epoch, rank, world_size, shuffle_buffer):

1. every epoch the output shards are permuted (seeded by ``(seed, epoch)``) and laid end to end;
   rank ``r`` of ``W`` takes the contiguous samples ``[r N / W, (r + 1) N / W)`` of that sequence,
   so all ranks together see every sample exactly once per epoch (N from the manifest);
2. the rank's part is cut into blocks of ``shuffle_buffer`` samples, each shuffled by its own
   seeded permutation (a shuffle buffer whose contents are fixed, so any process can rebuild it);
3. the rank's stream runs on over epochs forever; batch ``j`` is its samples ``[jB, (j+1)B)``.

A block is also the unit of work: DataLoader worker ``w`` of ``n`` reads blocks ``w, w+n, ...``
(counted from where the iterator starts), and since a DataLoader takes items from its workers
round-robin, the blocks reach the main process in order whatever ``n`` is. The state is then just
the number of samples yielded to the caller, so a resumed run continues with exactly the samples
it would have seen (no replay, no skip), with any worker count or batch size.
"""
from __future__ import annotations

import math
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..data.shards import DataError, expand_shards, split_member
from ..errors import UserError
from .cache import LATENT_MEMBER, read_manifest, unpack_tensors

STATE_VERSION = 1


class LoaderStateError(UserError):
    """A loader state that does not belong to this data/seed/rank layout; names the key."""


def index_shard(path: Path) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """``[(key, {ext: (offset, size)})]`` of a local tar, read by seeking from header to header,
    so reading sample ``i`` later costs one seek and one read."""
    samples: list[tuple[str, dict[str, tuple[int, int]]]] = []
    with tarfile.open(path, "r:") as tf:
        for member in tf:
            if not member.isfile():
                continue
            split = split_member(member.name)
            if split is None:  # not a sample member (no extension)
                continue
            key, ext = split
            if not samples or samples[-1][0] != key:
                samples.append((key, {}))
            samples[-1][1][ext] = (member.offset_data, member.size)
    return samples


def shard_list(folder: Path, manifest: dict) -> list[tuple[Path, int]]:
    """(path, samples) of every latent shard; counted from the tars for caches written before
    the manifest listed them."""
    if "output_shards" in manifest:
        return [(folder / o["name"], o["samples"]) for o in manifest["output_shards"] if o["samples"] > 0]
    return [(Path(p), len(index_shard(Path(p)))) for p in expand_shards(str(folder))]


@dataclass(frozen=True)
class Plan:
    """The order of samples; pure arithmetic, shared by the main process and the workers."""

    counts: tuple[int, ...]  # samples per shard
    seed: int
    rank: int
    world_size: int
    block: int

    @property
    def total(self) -> int:
        return sum(self.counts)

    @property
    def rank_range(self) -> tuple[int, int]:
        return self.rank * self.total // self.world_size, (self.rank + 1) * self.total // self.world_size

    @property
    def rank_samples(self) -> int:
        lo, hi = self.rank_range
        return hi - lo

    @property
    def blocks_per_epoch(self) -> int:
        return math.ceil(self.rank_samples / self.block)

    def segments(self, epoch: int, block: int) -> list[tuple[int, int, int]]:
        """``[(shard, first, end)]`` of a block, in stream order (before its shuffle)."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.counts))
        lo = self.rank_range[0] + block * self.block
        hi = min(lo + self.block, self.rank_range[1])
        out, start = [], 0
        for shard in order:
            end = start + self.counts[shard]
            if end > lo and start < hi:
                out.append((int(shard), max(lo, start) - start, min(hi, end) - start))
            if end >= hi:
                break
            start = end
        return out

    def shuffle(self, epoch: int, block: int, n: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch, self.rank, self.world_size, block]).permutation(n)


class _Blocks(IterableDataset):
    """Yields the shuffled blocks this worker owns, from block ``start`` (epoch, block) on."""

    def __init__(self, plan: Plan, paths: list[Path], start: tuple[int, int]):
        self.plan, self.paths, self.start = plan, paths, start
        self._index: dict[int, list] = {}  # per worker process: shard -> member offsets

    def _read(self, shard: int, first: int, end: int) -> Iterator[tuple[str, dict, str]]:
        if shard not in self._index:
            self._index[shard] = index_shard(self.paths[shard])
        with open(self.paths[shard], "rb") as f:
            for key, members in self._index[shard][first:end]:
                payload = {}
                for ext in (LATENT_MEMBER, "txt"):
                    offset, size = members[ext]
                    f.seek(offset)
                    payload[ext] = f.read(size)
                yield key, unpack_tensors(payload[LATENT_MEMBER]), payload["txt"].decode("utf-8")

    def block(self, epoch: int, block: int) -> dict:
        samples = [s for seg in self.plan.segments(epoch, block) for s in self._read(*seg)]
        order = self.plan.shuffle(epoch, block, len(samples))
        samples = [samples[i] for i in order]
        tensors = {name: torch.stack([s[1][name] for s in samples]) for name in samples[0][1]}
        return {**tensors, "key": [s[0] for s in samples], "caption": [s[2] for s in samples]}

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch, block, q = *self.start, 0
        while True:
            if q % workers == worker:
                yield {**self.block(epoch, block), "q": q}
            q, block = q + 1, block + 1
            if block == self.plan.blocks_per_epoch:
                epoch, block = epoch + 1, 0


class LatentLoader:
    """Batches of a latent split for one rank, infinite over epochs, resumable exactly.

    ``next(iter(loader))`` -> ``{"mean": [B,C,h,w], "std": [B,C,h,w], "context": [B,L,D]`` (or
    ``"tokens": [B,L]`` int32 for a tokens-only cache), ``"key": list[str], "caption": list[str]}``;
    tensors keep the cache's dtype (fp16/bf16). A cache storing one fixed ``sample`` gives it as
    ``mean`` with ``std`` 0. ``state_dict()`` counts the samples of batches already yielded;
    ``load_state_dict()`` makes the next ``iter()`` continue right after them. Buffered in memory:
    about ``(num_workers * prefetch_factor + 1) * shuffle_buffer`` samples.
    """

    def __init__(
        self, folder: str | Path, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
        num_workers: int = 0, shuffle_buffer: int = 1024, prefetch_factor: int = 2,
    ):
        if batch_size <= 0 or shuffle_buffer <= 0 or num_workers < 0:
            raise ValueError(f"need batch_size > 0, shuffle_buffer > 0, num_workers >= 0; got "
                             f"{batch_size}, {shuffle_buffer}, {num_workers}")
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        shards = shard_list(self.folder, self.manifest)
        self.paths = [p for p, _ in shards]
        self.plan = Plan(tuple(n for _, n in shards), seed, rank, world_size, shuffle_buffer)
        if self.plan.rank_samples == 0:
            raise DataError(f"latent cache {self.folder} has {self.plan.total} samples: none left for rank {rank} of {world_size}")
        self.batch_size, self.num_workers, self.prefetch_factor = batch_size, num_workers, prefetch_factor
        self.samples_yielded = 0

    @classmethod
    def from_config(cls, folder, cfg, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> "LatentLoader":
        """From a :class:`ldm_train.config.LoaderConfig` (``latents.loader``)."""
        return cls(folder, batch_size, seed, rank, world_size, cfg.num_workers, cfg.shuffle_buffer, cfg.prefetch_factor)

    @property
    def samples_per_epoch(self) -> int:
        """Samples in one epoch of the whole job (all ranks together)."""
        return self.plan.total

    @property
    def rank_samples_per_epoch(self) -> int:
        return self.plan.rank_samples

    @property
    def epoch(self) -> int:
        return self.samples_yielded // self.plan.rank_samples

    def state_dict(self) -> dict:
        p = self.plan
        return {"version": STATE_VERSION, "samples_yielded": self.samples_yielded, "epoch": self.epoch,
                "seed": p.seed, "rank": p.rank, "world_size": p.world_size, "shuffle_buffer": p.block,
                "samples_per_epoch": p.total}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        if state.get("buckets"):  # a BucketLoader's (ldm_train.latents.buckets)
            raise LoaderStateError("loader state is of a latent cache with data.buckets, but this cache has none; "
                                   "the run cannot continue exactly")
        for key in ("version", "seed", "rank", "world_size", "shuffle_buffer", "samples_per_epoch"):
            if state.get(key) != mine[key]:
                raise LoaderStateError(
                    f"loader state has {key}={state.get(key)!r} but this loader has {key}={mine[key]!r}; "
                    "the sample order depends on it, so the run cannot continue exactly"
                )
        self.samples_yielded = int(state["samples_yielded"])

    def _blocks(self, start: tuple[int, int]) -> Iterator[dict]:
        dataset = _Blocks(self.plan, self.paths, start)
        if self.num_workers == 0:
            yield from dataset
            return
        loader = DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                            prefetch_factor=self.prefetch_factor, persistent_workers=False)
        yield from loader

    def __iter__(self) -> Iterator[dict]:
        within = self.samples_yielded % self.plan.rank_samples
        start = (self.epoch, within // self.plan.block)
        skip = within % self.plan.block
        pending: list[dict] = []  # pieces of blocks not yet batched
        have = 0
        for q, block in enumerate(self._blocks(start)):
            if block.pop("q") != q:  # the round-robin order this design relies on
                raise RuntimeError(f"latent loader: block {q} expected from the workers, got another")
            if skip:
                block, skip = _slice(block, skip, None), 0
            pending.append(block)
            have += len(block["key"])
            while have >= self.batch_size:
                batch, pending = _take(pending, self.batch_size)
                have -= self.batch_size
                self.samples_yielded += self.batch_size  # before the yield: the caller holds it now
                yield batch


def _slice(block: dict, lo: int, hi: int | None) -> dict:
    return {k: v[lo:hi] for k, v in block.items()}


def _take(pending: list[dict], n: int) -> tuple[dict, list[dict]]:
    """The first ``n`` samples of the pending pieces as one batch, and what remains."""
    parts, rest = [], list(pending)
    while n > 0:
        piece = rest.pop(0)
        size = len(piece["key"])
        if size > n:
            parts.append(_slice(piece, 0, n))
            rest.insert(0, _slice(piece, n, None))
            n = 0
        else:
            parts.append(piece)
            n -= size
    batch = {k: (torch.cat([p[k] for p in parts]) if torch.is_tensor(parts[0][k]) else [x for p in parts for x in p[k]])
             for k in parts[0]}
    return batch, rest
