"""Rank and world size from the launcher (``torchrun``, ``accelerate launch`` set ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``), and the one collective that
``encode`` needs: rank 0 prepares the output folder while the others wait, and a mistake found
there is raised on every rank (otherwise the others would wait for a rank that is gone).

Everything after that is coordinated through files (one done-file per input shard), so a long,
uneven encode never sits in a collective that could time out.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist

from ..errors import UserError

_MESSAGE_BYTES = 4096  # an error message crosses ranks as a fixed-size uint8 tensor (no pickle)


class LaunchError(UserError):
    """Inconsistent launcher environment (rank outside world size, missing rendezvous address)."""


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise LaunchError(f"environment variable {name}={raw!r} is not an integer") from None


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> "Ranks":
        ranks = cls(_env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0))
        if ranks.world_size < 1 or not 0 <= ranks.rank < ranks.world_size:
            raise LaunchError(f"RANK={ranks.rank} is not within WORLD_SIZE={ranks.world_size}")
        return ranks

    def device(self, device: torch.device) -> torch.device:
        """One GPU per local rank (``cuda`` -> ``cuda:LOCAL_RANK``); CPU stays CPU."""
        if device.type == "cuda" and device.index is None:
            return torch.device("cuda", self.local_rank)
        return device


def _send_message(message: str | None) -> str | None:
    buf = torch.zeros(_MESSAGE_BYTES + 1, dtype=torch.uint8)
    if message is not None:
        data = message.encode("utf-8")[:_MESSAGE_BYTES]
        buf[0] = 1
        buf[1 : 1 + len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    dist.broadcast(buf, src=0)
    if buf[0] == 0:
        return None
    return bytes(buf[1:].tolist()).rstrip(b"\0").decode("utf-8", errors="replace")


class RankGroup:
    """A gloo process group for the duration of a ``with`` block (none for one process)."""

    def __init__(self, ranks: Ranks):
        self.ranks = ranks
        self._owned = False

    def __enter__(self) -> "RankGroup":
        if self.ranks.world_size > 1 and not dist.is_initialized():
            for name in ("MASTER_ADDR", "MASTER_PORT"):
                if not os.environ.get(name):
                    raise LaunchError(f"WORLD_SIZE={self.ranks.world_size} but {name} is not set; launch with torchrun or accelerate launch")
            # gloo works on CPU-only and GPU machines alike; only a tiny broadcast travels over it.
            # The long timeout covers rank 0 preparing a large output folder (--overwrite).
            dist.init_process_group("gloo", rank=self.ranks.rank, world_size=self.ranks.world_size,
                                    timeout=timedelta(hours=2))
            self._owned = True
        return self

    def __exit__(self, *exc) -> None:
        if self._owned:
            dist.destroy_process_group()

    def rank0_first(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on rank 0 while the others wait; its UserError is raised on every rank."""
        error: UserError | None = None
        if self.ranks.rank == 0:
            try:
                fn()
            except UserError as e:
                error = e
        if self.ranks.world_size == 1 or not dist.is_initialized():  # alone, or ranks simulated in one process
            if error is not None:
                raise error
            return
        message = _send_message(str(error) if error is not None else None)
        if error is not None:
            raise error
        if message is not None:
            raise UserError(message)
