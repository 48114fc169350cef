"""A streaming, resumable loader of latent shards for training at scale.

The sample order is one global stream, a pure function of (seed, shuffle_buffer) and the data:

1. every epoch the output shards are permuted (seeded by ``(seed, epoch)``) and laid end to end
   (N samples, N from the manifest); that sequence is cut into blocks of ``shuffle_buffer``
   samples, each shuffled by its own seeded permutation (a shuffle buffer whose contents are fixed,
   so any process can rebuild it). Epochs follow each other: global position ``p`` is sample
   ``p % N`` of epoch ``p // N``'s shuffled sequence;
2. every step the W ranks together take the next ``W * B`` positions (B = the per-rank batch):
   rank ``r`` takes the ``r``-th run of B of them. So the stream does not depend on W or B, all
   ranks together see every sample exactly once per epoch, and an epoch boundary may fall inside
   a step (its batch then holds the end of one epoch and the start of the next).

The state is one number, the **global position**: the samples all ranks together have taken. A
run resumed on W' ranks (or with another batch size) continues from that position, so across the
change no sample is skipped or seen twice within the epoch (elastic resume, train/resume.py).

A global block is also the unit of work: DataLoader worker ``w`` of ``n`` reads blocks ``w, w+n,
...`` (counted from where the iterator starts), and of each block only the samples of this rank
(about ``1/W`` of it, one seek each). Since a DataLoader takes items from its workers round-robin,
the blocks reach the main process in order whatever ``n`` is, so the state is exact with any
worker count too.
"""
from __future__ import annotations

import math
import tarfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..data.shards import DataError, expand_shards, split_member
from ..errors import UserError
from .cache import LATENT_MEMBER, read_manifest, unpack_tensors

STATE_VERSION = 2  # 1: per-rank contiguous ranges (before elastic resume); not continued


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
    """The order of samples and which rank takes which; pure arithmetic, shared by the main
    process and the workers. ``start`` is the global position this loader's stream began at (a
    resumed run's), from which the ranks take runs of ``batch`` positions in turn."""

    counts: tuple[int, ...]  # samples per shard
    seed: int
    block: int
    rank: int = 0
    world_size: int = 1
    batch: int = 1
    start: int = 0

    @property
    def total(self) -> int:
        return sum(self.counts)

    @property
    def blocks_per_epoch(self) -> int:
        return math.ceil(self.total / self.block)

    def position(self, k: int) -> int:
        """The global position of this rank's ``k``-th sample (counted from ``start``)."""
        step, j = divmod(k, self.batch)
        return self.start + step * self.batch * self.world_size + self.rank * self.batch + j

    def mine(self, lo: int, hi: int) -> np.ndarray:
        """This rank's global positions in ``[lo, hi)``, in order."""
        p = np.arange(max(lo, self.start), hi, dtype=np.int64)
        return p[((p - self.start) // self.batch) % self.world_size == self.rank]

    def sources(self, epoch: int, block: int, within: np.ndarray) -> list[tuple[int, int]]:
        """``(shard, member)`` of the block's shuffled positions ``within`` (offsets in the block)."""
        lo = block * self.block
        n = min(self.block, self.total - lo)
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.counts))
        ends = np.cumsum([self.counts[s] for s in order])
        laid = lo + np.random.default_rng([self.seed, epoch, block]).permutation(n)[within]
        slot = np.searchsorted(ends, laid, side="right")  # which shard of the laid-out sequence
        first = ends[slot] - np.array([self.counts[s] for s in order])[slot]
        return [(int(order[i]), int(m)) for i, m in zip(slot, laid - first)]


class _Blocks(IterableDataset):
    """Yields this rank's part of the blocks this worker owns, from global position ``first`` on
    (a block of which this rank has nothing yields an empty part, so the order stays checkable)."""

    def __init__(self, plan: Plan, paths: list[Path], first: int):
        self.plan, self.paths, self.first = plan, paths, first
        self._index: dict[int, list] = {}  # per worker process: shard -> member offsets

    def _read(self, shard: int, member: int, f) -> tuple[str, dict, str]:
        if shard not in self._index:
            self._index[shard] = index_shard(self.paths[shard])
        key, members = self._index[shard][member]
        payload = {}
        for ext in (LATENT_MEMBER, "txt"):
            offset, size = members[ext]
            f.seek(offset)
            payload[ext] = f.read(size)
        return key, unpack_tensors(payload[LATENT_MEMBER]), payload["txt"].decode("utf-8")

    def block(self, epoch: int, block: int, lo: int) -> dict:
        """This rank's samples of the block, from global position ``lo`` on."""
        base = epoch * self.plan.total + block * self.plan.block
        hi = base + min(self.plan.block, self.plan.total - block * self.plan.block)
        positions = self.plan.mine(lo, hi)
        if len(positions) == 0:
            return {"key": [], "caption": []}
        files: dict[int, object] = {}
        try:
            samples = []
            for shard, member in self.plan.sources(epoch, block, positions - base):
                f = files.get(shard) or files.setdefault(shard, open(self.paths[shard], "rb"))
                samples.append(self._read(shard, member, f))
        finally:
            for f in files.values():
                f.close()
        tensors = {name: torch.stack([s[1][name] for s in samples]) for name in samples[0][1]}
        return {**tensors, "key": [s[0] for s in samples], "caption": [s[2] for s in samples]}

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch, within = divmod(self.first, self.plan.total)
        block, lo, q = within // self.plan.block, self.first, 0
        while True:
            if q % workers == worker:
                yield {**self.block(epoch, block, lo), "q": q}
            q, block = q + 1, block + 1
            if block == self.plan.blocks_per_epoch:
                epoch, block = epoch + 1, 0
            lo = epoch * self.plan.total + block * self.plan.block


class LatentLoader:
    """Batches of a latent split for one rank, infinite over epochs, resumable exactly.

    ``next(iter(loader))`` -> ``{"mean": [B,C,h,w], "std": [B,C,h,w], "context": [B,L,D]`` (or
    ``"tokens": [B,L]`` int32 for a tokens-only cache), ``"key": list[str], "caption": list[str]}``;
    tensors keep the cache's dtype (fp16/bf16). A cache storing one fixed ``sample`` gives it as
    ``mean`` with ``std`` 0. ``state_dict()`` holds the global position after the batches already
    yielded (every rank of the job having drawn as many); ``load_state_dict()`` makes the next
    ``iter()`` continue there, whatever this loader's rank, world size, batch size or worker count.
    Buffered in memory: about ``(num_workers * prefetch_factor + 1) * shuffle_buffer / world_size``
    samples.
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
        self.plan = Plan(tuple(n for _, n in shards), seed, shuffle_buffer, rank, world_size, batch_size)
        if self.plan.total == 0:
            raise DataError(f"latent cache {self.folder} has no samples")
        self.batch_size, self.num_workers, self.prefetch_factor = batch_size, num_workers, prefetch_factor
        self.samples_yielded = 0  # by this rank, since ``plan.start``

    @classmethod
    def from_config(cls, folder, cfg, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> "LatentLoader":
        """From a :class:`ldm_train.config.LoaderConfig` (``latents.loader``)."""
        return cls(folder, batch_size, seed, rank, world_size, cfg.num_workers, cfg.shuffle_buffer, cfg.prefetch_factor)

    @property
    def samples_per_epoch(self) -> int:
        """Samples in one epoch of the whole job (all ranks together)."""
        return self.plan.total

    @property
    def position(self) -> int:
        """The global position after this rank's batches so far: the samples the job has taken
        when every rank has drawn as many batches (the loop's ranks draw in lockstep)."""
        return self.plan.start + self.samples_yielded * self.plan.world_size

    @property
    def epoch(self) -> int:
        return self.position // self.plan.total

    def state_dict(self) -> dict:
        p = self.plan
        return {"version": STATE_VERSION, "position": self.position, "epoch": self.epoch, "seed": p.seed,
                "shuffle_buffer": p.block, "samples_per_epoch": p.total,
                "rank": p.rank, "world_size": p.world_size, "batch_size": p.batch}  # the last three: information

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        if state.get("buckets"):  # a BucketLoader's (ldm_train.latents.buckets)
            raise LoaderStateError("loader state is of a latent cache with data.buckets, but this cache has none; "
                                   "the run cannot continue exactly")
        for key in ("version", "seed", "shuffle_buffer", "samples_per_epoch"):
            if state.get(key) != mine[key]:
                raise LoaderStateError(
                    f"loader state has {key}={state.get(key)!r} but this loader has {key}={mine[key]!r}; "
                    "the sample order depends on it, so the run cannot continue exactly"
                )
        self.plan = replace(self.plan, start=int(state["position"]))
        self.samples_yielded = 0

    def _blocks(self, first: int) -> Iterator[dict]:
        dataset = _Blocks(self.plan, self.paths, first)
        if self.num_workers == 0:
            yield from dataset
            return
        loader = DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                            prefetch_factor=self.prefetch_factor, persistent_workers=False)
        yield from loader

    def __iter__(self) -> Iterator[dict]:
        pending: list[dict] = []  # pieces of blocks not yet batched
        have = 0
        for q, block in enumerate(self._blocks(self.plan.position(self.samples_yielded))):
            if block.pop("q") != q:  # the round-robin order this design relies on
                raise RuntimeError(f"latent loader: block {q} expected from the workers, got another")
            if not block["key"]:
                continue
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
