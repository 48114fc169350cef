"""Elastic resume: a checkpoint saved by W ranks continued by W' ranks (resume.py calls this).

What each part of the state becomes on W' ranks:

- **Model and optimizer, DDP**: world-independent already (rank 0 saves the full weights and the
  full AdamW state), loaded as they are.
- **Model and optimizer, ZeRO-1/2/3**: DeepSpeed's partitioned flat fp32 groups are converted once
  by DeepSpeed's own universal checkpoint (``deepspeed.checkpoint.ds_to_universal``: one folder of
  fp32 weight, ``exp_avg`` and ``exp_avg_sq`` per parameter), which every new rank loads its new
  partition from (``checkpoint.load_universal``). torch.distributed.checkpoint cannot do this part:
  it reshards DTensors / ShardedTensors, and ZeRO's state is neither (flat buffers padded per
  group), while DeepSpeed's converter knows its own layout.
- **EMA**: re-cut from the saved chunk files: new rank ``r`` reads, per parameter, only the slices
  of the old chunks that overlap its new chunk (safetensors slicing, no full copy per rank).
- **Data position**: the streaming loader's state is the global position (latents/loader.py), the
  same in every old rank's file, so every new rank continues from it: no sample is skipped or seen
  twice within the epoch. The in-memory source draws with replacement and has no position.
- **RNG streams** (torch, noise, data/latent draws): per rank, and a rank's stream cannot be split
  or merged, so every rank starts fresh streams seeded by ``(run.seed, step, W', rank)``:
  deterministic, and distinct from every stream the run used before.
- **Global batch**: ``train.batch_size`` (and the accumulation) stay per rank, so the global batch
  becomes ``W'/W`` times the old one. The step counter and the LR schedule (indexed by optimizer
  step) continue unchanged, ``train.steps`` still ends the run, and ``samples_seen`` counts what
  was really drawn. Keep the LR or rescale it by hand: the run does not change a setting itself.
"""
from __future__ import annotations

import contextlib
import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from safetensors import safe_open

from ..errors import UserError
from . import checkpoint as ck
from .ema import Layout


class ReshardError(UserError):
    """A checkpoint that cannot be converted to this run's layout (names the file or key)."""


def rank_seed(seed: int, step: int, world: int, rank: int, stream: int) -> int:
    """A seed for RNG stream ``stream`` of ``rank`` after an elastic resume at ``step``."""
    return int(np.random.SeedSequence([seed, step, world, rank, stream]).generate_state(1, np.uint64)[0] >> 1)


def recut_ema(ckpt: Path, layout: Layout, decays: int) -> tuple[dict[str, torch.Tensor], int]:
    """(this rank's EMA chunks in ``layout``, update count) from EMA files of any layout."""
    files = ck.ema_files(ckpt)
    if not files:
        raise ReshardError(f"checkpoint {ckpt} has no EMA files (ema-RRRRR-of-WWWWW.safetensors)")
    with contextlib.ExitStack() as stack:
        handles = [stack.enter_context(safe_open(str(f), "pt")) for f in files]
        meta = handles[0].metadata()
        shapes = {k: tuple(v) for k, v in json.loads(meta["shapes"]).items()}
        if shapes != {k: tuple(v) for k, v in layout.shapes.items()}:
            raise ReshardError(f"{files[0]}: its EMA is of other parameters than this model's")
        old = [Layout(r, len(files), shapes) for r in range(len(files))]
        out = {}
        for i in range(decays):
            for name in shapes:
                start, end = layout.chunk(name)
                pieces = []
                for o, f in zip(old, handles):
                    lo, hi = o.chunk(name)
                    a, b = max(start, lo), min(end, hi)
                    if a < b:
                        pieces.append(f.get_slice(f"{i}/{name}")[a - lo : b - lo])
                out[f"{i}/{name}"] = torch.cat(pieces) if pieces else torch.zeros(0)
    return out, int(meta["num_updates"])


def saved_data_state(ckpt: Path, world: int) -> tuple[dict[str, torch.Tensor], dict]:
    """Old rank 0's data state (tensors, metadata), after checking that every old rank's file is
    there and that the ranks agree on the stream position."""
    states = [ck.read_rank_state(ckpt, r) for r in range(world) if _rank_file(ckpt, r)]
    missing = [f"rank-{r:05d}.safetensors" for r in range(world) if not _rank_file(ckpt, r)]
    if missing:
        raise ReshardError(f"checkpoint {ckpt} was saved by {world} ranks but has no {', '.join(missing)}")
    if states[0][1]["data"].get("loader", {}).get("buckets"):
        raise ReshardError(f"checkpoint {ckpt} streams a bucketed cache (data.buckets), whose batches are dealt to "
                           f"the ranks round-robin: resume it on {world} processes")
    positions = {json.dumps(meta["data"].get("loader", {}).get("position")) for _, meta in states}
    if len(positions) > 1:
        raise ReshardError(f"checkpoint {ckpt}: the ranks' data loaders stopped at different positions {sorted(positions)}")
    return states[0][0], states[0][1]["data"]


def _rank_file(ckpt: Path, rank: int) -> bool:
    return (ckpt / f"rank-{rank:05d}.safetensors").is_file()


def universal_folder(ckpt: Path) -> Path:
    """Where the universal conversion of ``ckpt`` is written (beside it: not a ``step-N`` folder, so
    never taken for a checkpoint; removed once loaded)."""
    return ckpt.parent / f".universal-{ckpt.name}"


def convert_to_universal(ckpt: Path, tag: str) -> Path:
    """Rank 0: DeepSpeed's universal checkpoint of ``ckpt/deepspeed/<tag>``; returns the load dir."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    out = universal_folder(ckpt)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    args = SimpleNamespace(input_folder=str(ckpt / "deepspeed" / tag), output_folder=str(out / f"{tag}_universal"),
                           num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
                           inject_missing_state=True)  # the version key; a plain module has no TP/PP patterns
    with contextlib.redirect_stdout(sys.stderr):  # its progress lines; stdout is the CLI's JSON summary
        ds_to_universal(args)
    return out


def load_universal(engine, folder: Path, tag: str, strict: bool) -> None:
    """Every rank: load its new partition from the universal folder. ``load_universal`` is a
    DeepSpeed config key read only by ``load_checkpoint``: turned on for this one load."""
    config = engine._config
    before = config.load_universal_checkpoint
    config.load_universal_checkpoint = True
    try:
        engine.load_checkpoint(str(folder), tag=f"{tag}_universal", load_module_strict=strict)
    finally:
        config.load_universal_checkpoint = before
