"""Training checkpoints: ``<run>/checkpoints/step-XXXXXXX/``.

Each holds ``model.safetensors`` (raw weights), ``ema.safetensors`` (EMA weights, what sampling and
export use), ``optimizer.pt`` (read back with ``weights_only=True``, no pickled code) and
``state.json`` (step, EMA update count, LR-scheduler state). A checkpoint is written under a
``.tmp`` name and renamed when complete, so a crash mid-save leaves the previous one loadable.
Full exact resume (RNG and data-loader state, ZeRO shards) is the distributed issue's.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

PREFIX = "step-"


def _state(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}


def save_checkpoint(
    ckpt_root: Path,
    step: int,
    model: torch.nn.Module,
    ema_state: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    state: dict,
    keep_last: int,
) -> Path:
    final = ckpt_root / f"{PREFIX}{step:07d}"
    tmp = ckpt_root / f"{PREFIX}{step:07d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(_state(model.state_dict()), str(tmp / "model.safetensors"))
    save_file(_state(ema_state), str(tmp / "ema.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps(dict(state, step=step), indent=2))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in list_checkpoints(ckpt_root)[:-keep_last]:
        shutil.rmtree(old)
    return final


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (``.tmp`` folders are unfinished saves)."""
    if not ckpt_root.is_dir():
        return []
    return sorted(p for p in ckpt_root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and not p.name.endswith(".tmp"))


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    found = list_checkpoints(ckpt_root)
    return found[-1] if found else None


def load_weights(ckpt: Path, which: str = "ema") -> dict[str, torch.Tensor]:
    """``which`` is ``ema`` or ``model``."""
    path = ckpt / f"{which}.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {ckpt} has no {path.name}")
    return load_file(str(path))


def load_optimizer_state(ckpt: Path) -> dict:
    return torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True)


def read_state(ckpt: Path) -> dict:
    return json.loads((ckpt / "state.json").read_text())
