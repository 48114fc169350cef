"""Output folders that never overwrite without ``--overwrite``, device choice, a JSONL metrics log."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from ..errors import UserError


class OutputExistsError(UserError):
    """An output folder already holds results; the message says how to replace them."""


def prepare_output(path: Path, overwrite: bool, what: str) -> Path:
    """Create ``path``; refuse when it already holds files unless ``overwrite`` (then empty it)."""
    if path.exists() and any(path.iterdir()):
        if not overwrite:
            raise OutputExistsError(
                f"{what} output {path} already exists and is not empty; "
                "pass --overwrite to replace it, or choose another folder"
            )
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    path.mkdir(parents=True, exist_ok=True)
    return path


def pick_device(force_cpu: bool = False) -> torch.device:
    """A GPU where present (the demo uses it automatically), else the CPU."""
    if not force_cpu and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


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
