"""Checkpoint writing off the training thread (``train.async_save``), and the commit every save
goes through, synchronous or not.

**How.** At a save the training thread copies its rank's part of the checkpoint to host memory
(:class:`SaveJob`: weights, optimizer state, EMA shadows, RNG and data states; on the GPU a
device-to-host copy, on the CPU a clone, since the optimizer updates the tensors in place) and
hands it to one writer thread, which writes the files, digests them and commits
(:func:`commit`). Training goes on meanwhile; the next save waits for the previous one first.

Why a host copy and a thread rather than ``torch.distributed.checkpoint.async_save``: DCP writes
its own format (``.distcp`` shards plus a metadata file), not this layout of safetensors files
that export, eval and resume read, and it needs its own collectives at load. The copy costs host
memory of one checkpoint of one rank while the write is in flight. The thread writes with the GIL
released for most of the time (file I/O, hashlib on large buffers, safetensors' serialiser).

**DeepSpeed.** ``engine.save_checkpoint`` writes its partitioned model and optimizer states from
the training thread itself (it has no hook to hand us host copies), so under ZeRO that part of a
save stays synchronous; the rest (weights, EMA, RNG and data states, digests, the commit) goes to
the writer.

**Commit.** Each rank digests what it wrote; the ranks then exchange (digests, error) over a
gloo group of their own (not the training's process group: the writer's collectives run beside
the training's, and a group is ordered per group), so all ranks learn together whether any rank
failed. If none did, rank 0 writes ``state.json`` (with every file's digest), renames
``step-N.tmp`` to ``step-N`` and prunes old checkpoints; a second exchange tells every rank the
checkpoint is published. A rank's ``OSError`` (a full disk) makes rank 0 remove the partial
folder and every rank raise :class:`~.checkpoint.CheckpointWriteError` naming the rank and the
file; any other exception is a bug and is re-raised as it is, its ``.tmp`` left as a crash
leaves it. Errors of the writer surface in the training thread at its next step, save or exit.
"""
from __future__ import annotations

import copy
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from . import checkpoint as ck
from .ema import EMA


def host_copy(obj, copy_tensors: bool):
    """``obj`` with every tensor on the host; ``copy_tensors``: fresh memory even for tensors that
    are there already (what a background writer needs while training updates them in place)."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        return t.to("cpu", copy=True) if copy_tensors else t.cpu()
    if isinstance(obj, dict):
        return {k: host_copy(v, copy_tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(host_copy(v, copy_tensors) for v in obj)
    return copy.deepcopy(obj) if copy_tensors else obj


def frozen_ema(ema: EMA, copy_tensors: bool) -> EMA:
    """An EMA object whose shadows are host copies (the live EMA keeps updating)."""
    frozen = copy.copy(ema)
    frozen.decays = list(ema.decays)
    frozen.shadows = [host_copy(shadow, copy_tensors) for shadow in ema.shadows]
    return frozen


@dataclass
class SaveJob:
    """One rank's part of checkpoint ``step``, on the host. ``weights``, ``optimizer`` and
    ``state`` are rank 0's (None elsewhere); ``written``: files this rank already wrote
    (DeepSpeed's), digested with the rest."""

    ckpt_root: Path
    step: int
    keep_last: int
    milestones: list[int]
    rank: int
    world: int
    ema: EMA
    rank_tensors: dict[str, torch.Tensor]
    rank_meta: dict
    weights: dict[str, torch.Tensor] | None = None
    weights_metadata: dict[str, str] | None = None
    optimizer: dict | None = None
    state: dict | None = None
    written: list[Path] = field(default_factory=list)
    failed: str | None = None  # the synchronous part's OSError (DeepSpeed's files), in words

    @property
    def tmp(self) -> Path:
        return ck.step_dir(self.ckpt_root, self.step, tmp=True)

    def write(self) -> dict[str, dict]:
        """This rank's files, then their digests."""
        tmp, paths = self.tmp, list(self.written)
        if self.weights is not None:
            if self.weights_metadata is None:
                ck.save_model_weights(tmp, self.weights)
            else:
                ck.save_model_weights(tmp, self.weights, self.weights_metadata)
            paths.append(tmp / "model.safetensors")
        if self.optimizer is not None:
            ck.save_optimizer(tmp, self.optimizer)
            paths.append(tmp / "optimizer.pt")
        ck.save_ema(tmp, self.ema, self.rank)
        if self.ema.layout.world > 1 or self.rank == 0:  # an unsharded EMA is rank 0's file
            paths.append(tmp / f"ema-{self.ema.layout.rank:05d}-of-{self.ema.layout.world:05d}.safetensors")
        ck.write_rank_state(tmp, self.rank, self.rank_tensors, self.rank_meta)
        paths.append(tmp / f"rank-{self.rank:05d}.safetensors")
        return ck.digests(tmp, paths)


class Comm:
    """The writer's collectives: a gloo group of its own when several processes run."""

    def __init__(self, world: int):
        self.world = world
        self.group = dist.new_group(backend="gloo") if world > 1 else None  # every rank, same point

    def exchange(self, obj) -> list:
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj, group=self.group)
        return out


def _failures(reports: list) -> list[str]:
    return [f"rank {rank}: {error}" for rank, (_, error) in enumerate(reports) if error]


def commit(job: SaveJob, comm: Comm) -> Path:
    """Write, digest, agree, publish (see the module doc); every rank returns the published folder."""
    files, error = {}, job.failed
    try:
        files = job.write() if error is None else {}
    except OSError as e:
        error = ck.write_failure(e)
    reports = comm.exchange((files, error))
    published, failed = None, _failures(reports)
    if job.rank == 0 and not failed:
        try:
            ck.write_state(job.tmp, job.state, {k: v for digests, _ in reports for k, v in digests.items()})
            published = ck.finish_save(job.ckpt_root, job.step, job.keep_last, job.milestones)
        except OSError as e:
            failed = [f"rank 0: {ck.write_failure(e)}"]
    failed = comm.exchange(failed)[0]  # rank 0's verdict, to every rank
    if failed:
        if job.rank == 0:
            ck.discard_save(job.ckpt_root, job.step)
        raise ck.CheckpointWriteError(
            f"checkpoint of step {job.step} not saved ({'; '.join(failed)}); the partial save was removed and "
            f"the previous checkpoint under {job.ckpt_root} is intact: free space there and re-run to resume")
    return published or ck.step_dir(job.ckpt_root, job.step)


class CheckpointWriter:
    """Runs :func:`commit` for each save: inline (``asynchronous=False``) or on one background
    thread, one save at a time. Every rank makes one, at the same point (the gloo group)."""

    def __init__(self, world: int, asynchronous: bool):
        self.comm = Comm(world)
        self.asynchronous = asynchronous
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="ldm-train-ckpt") if asynchronous else None
        self._pending: Future | None = None

    def submit(self, job: SaveJob) -> Path:
        """Start (or, synchronous, do) the save of ``job``; returns where it will be published."""
        self.wait()  # a second save waits for the first
        if self._pool is None:
            return commit(job, self.comm)
        self._pending = self._pool.submit(commit, job, self.comm)
        return ck.step_dir(job.ckpt_root, job.step)

    def poll(self) -> None:
        """Raise the background save's error, if it has failed (free when nothing is pending).
        A single process only: ranks would notice at different steps, and one leaving while the
        others enter a collective hangs them; several ranks raise it together at the next save or
        at the end (the commit's error is agreed, so every rank has it)."""
        if self.comm.world == 1 and self._pending is not None and self._pending.done():
            self.wait()

    def wait(self) -> Path | None:
        """Wait for the save in flight; its error is raised here, in the training thread."""
        pending, self._pending = self._pending, None
        return pending.result() if pending is not None else None

    def close(self, raise_errors: bool = True) -> None:
        """Wait for the save in flight (also on the way out of a failed run: a checkpoint that was
        being written is still published) and stop the thread. ``raise_errors=False`` (the run is
        failing already): the save's error is logged, not raised over the run's own."""
        try:
            self.wait()
        except Exception as e:
            if raise_errors:
                raise
            ck.log.error("the checkpoint being written when the run failed was not saved: %s", e)
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
