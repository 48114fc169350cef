"""Training checkpoints: ``<run>/checkpoints/step-XXXXXXX/``, everything exact resume needs.

=============================  ==========  =============================================
file                           written by  holds
=============================  ==========  =============================================
``state.json``                 rank 0      step and sample counters, skipped steps, world
                                           size, strategy, EMA decays and update count,
                                           LR-scheduler and grad-scaler state (DDP)
``model.safetensors``          rank 0      the raw weights, full (gathered under ZeRO-3); with
                                           ``train.lora`` the adapter only (PEFT key names,
                                           metadata ``lora_rank``, ``lora_alpha``, ...)
``optimizer.pt``               rank 0      DDP: AdamW state (read with ``weights_only=True``)
``deepspeed/``                 every rank  ZeRO: DeepSpeed's partitioned model/optimizer/LR
                                           state (``engine.save_checkpoint``; LoRA: the
                                           frozen base left out)
``ema-RRRRR-of-WWWWW``         each rank   its EMA chunk per decay (one file when unsharded)
``.safetensors``
``rank-RRRRR.safetensors``     each rank   torch/CUDA RNG states, the data and noise
                                           generators, the data loader's state (metadata)
=============================  ==========  =============================================

All ranks write into ``step-N.tmp/``; once every rank is done, rank 0 renames it to ``step-N``.
A crash or ``kill -9`` during a save leaves only a ``.tmp`` folder, which is ignored and cleared
by the next save, so the previous checkpoint stays the latest loadable one. Multi-node runs need
the run folder on a filesystem every node sees (as for any shared checkpoint).
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..errors import UserError
from .ema import EMA, consolidate

PREFIX = "step-"


class CheckpointNotFound(UserError):
    """``--step N`` names a step without a complete checkpoint."""

_EMA_FILE = re.compile(r"ema-(\d{5})-of-(\d{5})\.safetensors")


def _cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}


def step_dir(ckpt_root: Path, step: int, tmp: bool = False) -> Path:
    return ckpt_root / f"{PREFIX}{step:07d}{'.tmp' if tmp else ''}"


def save_ema(folder: Path, ema: EMA, rank: int) -> None:
    """This rank's EMA chunks; unsharded EMAs are written by rank 0 only."""
    sharded = ema.layout.world > 1
    if not sharded and rank != 0:
        return
    meta = {"decays": json.dumps(ema.decays), "shapes": json.dumps(ema.layout.shapes), "num_updates": str(ema.num_updates)}
    name = f"ema-{ema.layout.rank:05d}-of-{ema.layout.world:05d}.safetensors"
    save_file(_cpu(ema.state_dict()), str(folder / name), metadata=meta)


def ema_files(ckpt: Path) -> list[Path]:
    files = sorted(p for p in ckpt.glob("ema-*-of-*.safetensors") if _EMA_FILE.fullmatch(p.name))
    if files:
        world = int(_EMA_FILE.fullmatch(files[0].name).group(2))
        if len(files) != world:
            raise FileNotFoundError(f"checkpoint {ckpt} has {len(files)} of {world} EMA shard files")
    return files


def load_ema_chunk(ckpt: Path, rank: int, world: int) -> tuple[dict[str, torch.Tensor], int]:
    """(this rank's EMA state, update count), for resuming with the same layout."""
    path = ckpt / f"ema-{rank:05d}-of-{world:05d}.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {ckpt} has no {path.name} (was it saved with another world size?)")
    with safe_open(str(path), "pt") as f:
        num_updates = int(f.metadata()["num_updates"])
    return load_file(str(path)), num_updates


def consolidated_ema(ckpt: Path, decay: float | None = None) -> dict[str, torch.Tensor]:
    """Full EMA weights from the per-rank files (the first decay unless ``decay`` is given)."""
    files = ema_files(ckpt)
    if not files:
        raise FileNotFoundError(f"checkpoint {ckpt} has no EMA weights")
    with safe_open(str(files[0]), "pt") as f:
        meta = f.metadata()
    decays, shapes = json.loads(meta["decays"]), json.loads(meta["shapes"])
    if decay is not None and decay not in decays:
        raise FileNotFoundError(f"checkpoint {ckpt} has EMAs for decays {decays}, not {decay}")
    index = 0 if decay is None else decays.index(decay)
    ranks = [load_file(str(p)) for p in files]
    parts = {name: [r[f"{index}/{name}"] for r in ranks] for name in shapes}
    return consolidate(parts, shapes)


def write_rank_state(folder: Path, rank: int, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    save_file(_cpu(tensors), str(folder / f"rank-{rank:05d}.safetensors"), metadata={"state": json.dumps(meta)})


def read_rank_state(ckpt: Path, rank: int) -> tuple[dict[str, torch.Tensor], dict]:
    path = ckpt / f"rank-{rank:05d}.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {ckpt} has no {path.name} (was it saved with another world size?)")
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["state"])
    return load_file(str(path)), meta


def begin_save(ckpt_root: Path, step: int) -> Path:
    """Rank 0: a fresh ``step-N.tmp`` folder (a stale one from a crashed save is cleared)."""
    tmp = step_dir(ckpt_root, step, tmp=True)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def finish_save(ckpt_root: Path, step: int, keep_last: int, milestones: list[int]) -> Path:
    """Rank 0, after every rank wrote its part: publish ``step-N`` and prune old checkpoints."""
    final, tmp = step_dir(ckpt_root, step), step_dir(ckpt_root, step, tmp=True)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for stale in ckpt_root.glob(f"{PREFIX}*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    keep = {step_dir(ckpt_root, m) for m in milestones}
    for old in list_checkpoints(ckpt_root)[:-keep_last]:
        if old not in keep:
            shutil.rmtree(old)
    return final


def save_model_weights(folder: Path, weights: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    save_file(_cpu(weights), str(folder / "model.safetensors"), metadata=metadata)


def save_json(folder: Path, name: str, state: dict) -> None:
    (folder / name).write_text(json.dumps(state, indent=2))


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (``.tmp`` folders are unfinished saves)."""
    if not ckpt_root.is_dir():
        return []
    return sorted(p for p in ckpt_root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and not p.name.endswith(".tmp"))


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    found = list_checkpoints(ckpt_root)
    return found[-1] if found else None


def pick_checkpoint(ckpt_root: Path, step: int | None = None) -> Path | None:
    """The complete checkpoint of ``step`` (None: the latest); a step that has none is refused
    naming the steps there are."""
    if step is None:
        return latest_checkpoint(ckpt_root)
    found = {checkpoint_step(c): c for c in list_checkpoints(ckpt_root)}
    if step not in found:
        have = ", ".join(str(s) for s in sorted(found)) or "none"
        raise CheckpointNotFound(f"no complete checkpoint of step {step} under {ckpt_root} (steps there: {have})")
    return found[step]


def split_step_folder(path: Path) -> tuple[Path, int | None]:
    """``RUN/checkpoints/step-N`` -> (RUN, N); any other path -> (path, None)."""
    if path.name.startswith(PREFIX) and path.parent.name == "checkpoints" and path.name[len(PREFIX):].isdigit():
        return path.parent.parent, checkpoint_step(path)
    return path, None


def checkpoint_step(ckpt: Path) -> int:
    """The step a ``step-N`` folder holds, from its name (no files read)."""
    return int(ckpt.name[len(PREFIX) :])


def latest_step(ckpt_root: Path) -> int:
    """The step of the latest complete checkpoint, 0 without one (what ``status.json`` reports)."""
    latest = latest_checkpoint(ckpt_root)
    return checkpoint_step(latest) if latest else 0


def load_weights(ckpt: Path, which: str = "ema") -> dict[str, torch.Tensor]:
    """``which`` is ``ema`` (the first decay), ``ema@DECAY`` or ``model``; full tensors."""
    if which == "model":
        path = ckpt / "model.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {ckpt} has no {path.name}")
        return load_file(str(path))
    if which != "ema" and not which.startswith("ema@"):
        raise FileNotFoundError(f"checkpoint {ckpt}: no weights called {which!r} (model, ema or ema@DECAY)")
    if which == "ema" and (ckpt / "ema.safetensors").is_file():  # checkpoints of earlier versions
        return load_file(str(ckpt / "ema.safetensors"))
    decay = float(which.split("@", 1)[1]) if which.startswith("ema@") else None
    return consolidated_ema(ckpt, decay)


def load_optimizer_state(ckpt: Path) -> dict:
    return torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True)


def read_state(ckpt: Path) -> dict:
    return json.loads((ckpt / "state.json").read_text())
