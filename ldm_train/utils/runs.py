"""Run-folder bookkeeping: outputs that are never replaced without ``--overwrite``, the recorded
config of a run, device choice, a JSONL metrics log."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
import yaml

from ..config import Config, dump_config, migrate, with_defaults
from ..errors import UserError


class OutputExistsError(UserError):
    """An output folder already holds results; the message says how to replace them."""


def check_output(path: Path, overwrite: bool, what: str, note: str = "") -> bool:
    """True when ``path`` (a file, or a folder holding files) would be replaced; without
    ``overwrite`` that is refused with :class:`OutputExistsError` instead. The one rule every
    stage checks before it starts work, so that a rerun never silently mixes with, or replaces,
    what an earlier run wrote. ``note`` says why, where "already exists" alone would not."""
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        return False
    if not overwrite:
        detail = f" ({note})" if note else ""
        raise OutputExistsError(
            f"{what} output {path} already exists{detail}; pass --overwrite to replace it, or choose another path"
        )
    return True


def prepare_output(path: Path, overwrite: bool, what: str) -> Path:
    """An empty folder at ``path``: what it held is deleted if ``overwrite``, else refused."""
    if check_output(path, overwrite, what):
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    path.mkdir(parents=True, exist_ok=True)
    return path


# What may change when a run resumes from its checkpoints: how long and how often, not what.
RESUMABLE = (
    "train.steps", "train.log_every", "train.checkpoint_every", "train.eval_every", "train.keep_checkpoints",
    "train.milestones", "train.watchdog_seconds", "latents.loader", "train.tensorboard", "train.wandb_project", "train.max_nonfinite_steps",
)


def record_config(cfg: Config, overwrite: bool, may_differ: tuple[str, ...] = (), write: bool = True) -> Path:
    """Write ``{run}/config.yaml``; refuse to replace one that describes a different run (keys in
    ``may_differ``, such as ``train.steps`` when resuming, may change)."""
    path = cfg.path("{run}") / "config.yaml"
    if path.is_file() and not overwrite:
        # written by an older version: its moved keys in today's places, a key it lacks as its default
        old = with_defaults(migrate(yaml.safe_load(path.read_text()) or {}))
        new = cfg.model_dump()
        diff = [f"{s}.{k}" for s in new for k in new[s] if old.get(s, {}).get(k) != new[s][k]]
        # slurm.* says how a run is submitted, not what it computes: it may change between jobs
        diff = [d for d in diff if d not in may_differ and not d.startswith("slurm.")]
        if diff:
            raise OutputExistsError(
                f"{path} holds a different run (differs in {', '.join(diff[:6])}); "
                "pass --overwrite to replace it, or set run.dir to a new folder"
            )
    if write:
        dump_config(cfg, path)
    return path


def pick_device(force_cpu: bool = False) -> torch.device:
    """A GPU where present (the demo uses it automatically), else the CPU."""
    if not force_cpu and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def last_segment(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """The most recent training run's points: ``metrics.jsonl`` is append-only, and a run that
    was redone with --overwrite starts again, so its steps go down."""
    starts = [i for i in range(1, len(points)) if points[i][0] <= points[i - 1][0]]
    return points[starts[-1] :] if starts else points


class MetricsLog:
    """Append-only JSON lines; each record gets the wall time so curves can be plotted later."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, **record) -> None:
        record.setdefault("time", time.time())
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def curve(self, stage: str, key: str) -> list[tuple[int, float]]:
        """``(step, key)`` of the ``stage`` records of the latest run (see :func:`last_segment`)."""
        return last_segment([(r["step"], r[key]) for r in self.read() if r.get("stage") == stage])
