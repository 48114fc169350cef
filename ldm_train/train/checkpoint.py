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

**Verification.** ``state.json`` is written last, by rank 0, and lists every other file of the
checkpoint (every rank's, DeepSpeed's included) with its size and SHA-256 (``files``), plus the
SHA-256 of its own content (``state_sha256``). Each rank hashes the files it wrote; rank 0
gathers the digests. SHA-256 because Python's hashlib runs it on the CPU's SHA extensions (1.8
GB/s here, faster than BLAKE2b's 0.6; xxh3 is 10x faster but not a cryptographic hash and not a
declared dependency), and ``sha256sum`` checks a file by hand. A missing, truncated or changed
file is named (:class:`CheckpointCorrupt`); resuming the latest checkpoint falls back to the
newest one that verifies, with a warning (:func:`resume_checkpoint`). A save that fails on an
``OSError`` (a full disk, a quota) removes its ``.tmp`` folder and raises :class:`CheckpointWriteError`;
the previous checkpoint is untouched.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..errors import UserError
from .ema import EMA, consolidate

PREFIX = "step-"
DIGEST = "sha256"
FULL_BELOW = 1 << 20  # bytes free under which a write failure with no errno is taken for a full disk
log = logging.getLogger(__name__)


class CheckpointNotFound(UserError):
    """``--step N`` names a step without a complete checkpoint."""


class CheckpointCorrupt(UserError):
    """A checkpoint whose files are missing, truncated or differ from the digests ``state.json`` recorded."""


class CheckpointWriteError(UserError):
    """A save failed on the filesystem (full disk, quota, I/O error); the partial save was removed."""

_EMA_FILE = re.compile(r"ema-(\d{5})-of-(\d{5})\.safetensors")


def _cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}


@contextmanager
def writing(path: Path):
    """Make a failed write of ``path`` an ``OSError`` naming it: safetensors reports a full disk as
    ``SafetensorError("... (os error 28)")``, torch.save as a RuntimeError whose context is the OSError."""
    try:
        yield
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from e
    except Exception as e:
        cause = e
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__cause__ or cause.__context__
        code = cause.errno if cause is not None else None
        found = re.search(r"os error (\d+)", str(e))
        code = code or (int(found.group(1)) if found else None) or _full_disk(path)
        if code is None:
            raise
        raise OSError(code, os.strerror(code), str(path)) from e


def _full_disk(path: Path) -> int | None:
    """ENOSPC if the filesystem of ``path`` has (almost) no room left. torch.save to a file name
    writes through a C++ stream that reports a full disk as ``RuntimeError("basic_ios::clear:
    iostream error")`` or ``"... unexpected pos ..."``, with no errno anywhere (DeepSpeed's
    checkpoint engine saves that way); the filesystem itself says why."""
    where = Path(path)
    while not where.exists() and where != where.parent:
        where = where.parent
    return errno.ENOSPC if shutil.disk_usage(where).free < FULL_BELOW else None


def file_digest(path: Path) -> dict:
    """``{"bytes": size, "sha256": hex}`` of a file (read in chunks; hashlib releases the GIL)."""
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, DIGEST).hexdigest()
    return {"bytes": path.stat().st_size, DIGEST: digest}


_RANK_IN_NAME = re.compile(r"^(?:rank-|ema-)(\d{5})|zero_pp_rank_(\d+)_")


def owned_files(folder: Path, rank: int, world: int, under: str = "") -> list[Path]:
    """The files below ``folder/under`` that ``rank`` digests: those whose name carries a rank
    (``rank-R``, ``ema-R-of-W``, DeepSpeed's ``zero_pp_rank_R``) belong to it, the rest to rank 0."""
    root = folder / under if under else folder
    mine = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        found = _RANK_IN_NAME.search(path.name)
        owner = int(next(g for g in found.groups() if g is not None)) % world if found else 0
        if owner == rank and path.name != "state.json":
            mine.append(path)
    return mine


def digests(folder: Path, paths: list[Path]) -> dict[str, dict]:
    """``{relative posix path: file_digest}`` for ``paths`` inside ``folder``."""
    return {p.relative_to(folder).as_posix(): file_digest(p) for p in paths}


def _state_digest(state: dict) -> str:
    body = {k: v for k, v in state.items() if k != "state_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def write_state(folder: Path, state: dict, files: dict[str, dict]) -> None:
    """``state.json``, last: the run state, every other file's digest and its own."""
    state = dict(state, digest=DIGEST, files=dict(sorted(files.items())))
    state["state_sha256"] = _state_digest(state)
    save_json(folder, "state.json", state)


def write_failure(e: OSError) -> str:
    """An OSError in a few words, naming the file: ``no space left on device (ENOSPC) writing X``."""
    code = errno.errorcode.get(e.errno, str(e.errno)) if e.errno else type(e).__name__
    where = f" writing {e.filename}" if e.filename else ""
    return f"{(e.strerror or str(e)).lower()} ({code}){where}"


def verify_checkpoint(ckpt: Path, contents: bool = True) -> bool:
    """Raise :class:`CheckpointCorrupt` naming every file of ``ckpt`` that is missing, of another
    size or (``contents``) of another SHA-256 than ``state.json`` recorded. False: a checkpoint from
    before digests were recorded (nothing to check against); True: verified."""
    state_file = ckpt / "state.json"
    try:
        state = json.loads(state_file.read_text())
    except FileNotFoundError:
        raise CheckpointCorrupt(f"checkpoint {ckpt}: state.json is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointCorrupt(f"checkpoint {ckpt}: state.json is not valid JSON ({e}): truncated or damaged") from None
    if "files" not in state:
        return False
    problems = []
    if state.get("state_sha256") != _state_digest(state):
        problems.append("state.json (its content differs from its recorded sha256)")
    for name, want in state["files"].items():
        path = ckpt / name
        if not path.is_file():
            problems.append(f"{name} (missing)")
        elif path.stat().st_size != want["bytes"]:
            problems.append(f"{name} ({path.stat().st_size} bytes, {want['bytes']} recorded: truncated or replaced)")
        elif contents and file_digest(path)[DIGEST] != want[DIGEST]:
            problems.append(f"{name} (its sha256 differs from the recorded one: damaged)")
    if problems:
        raise CheckpointCorrupt(f"checkpoint {ckpt} is damaged: " + "; ".join(problems))
    return True


def step_dir(ckpt_root: Path, step: int, tmp: bool = False) -> Path:
    return ckpt_root / f"{PREFIX}{step:07d}{'.tmp' if tmp else ''}"


def save_ema(folder: Path, ema: EMA, rank: int) -> None:
    """This rank's EMA chunks; unsharded EMAs are written by rank 0 only."""
    sharded = ema.layout.world > 1
    if not sharded and rank != 0:
        return
    meta = {"decays": json.dumps(ema.decays), "shapes": json.dumps(ema.layout.shapes), "num_updates": str(ema.num_updates)}
    name = f"ema-{ema.layout.rank:05d}-of-{ema.layout.world:05d}.safetensors"
    with writing(folder / name):
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
    path = folder / f"rank-{rank:05d}.safetensors"
    with writing(path):
        save_file(_cpu(tensors), str(path), metadata={"state": json.dumps(meta)})


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


def discard_save(ckpt_root: Path, step: int) -> None:
    """Rank 0, after a failed save: remove what it left (the previous checkpoints stay)."""
    shutil.rmtree(step_dir(ckpt_root, step, tmp=True), ignore_errors=True)


def save_optimizer(folder: Path, state: dict) -> None:
    path = folder / "optimizer.pt"
    with writing(path), open(path, "wb") as f:  # through a Python file: a full disk raises its OSError
        torch.save(state, f)


def save_model_weights(folder: Path, weights: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    with writing(folder / "model.safetensors"):
        save_file(_cpu(weights), str(folder / "model.safetensors"), metadata=metadata)


def save_json(folder: Path, name: str, state: dict) -> None:
    with writing(folder / name):
        (folder / name).write_text(json.dumps(state, indent=2))


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (``.tmp`` folders are unfinished saves)."""
    if not ckpt_root.is_dir():
        return []
    return sorted(p for p in ckpt_root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and not p.name.endswith(".tmp"))


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    found = list_checkpoints(ckpt_root)
    return found[-1] if found else None


def resume_checkpoint(ckpt_root: Path, verify: bool = True) -> Path | None:
    """The newest complete checkpoint whose files verify (``verify=False``: sizes only). A damaged
    one is skipped with a warning naming its files, for the one before; if every one is damaged,
    :class:`CheckpointCorrupt` lists them. Every rank calls this and, reading the same files,
    picks the same checkpoint without communicating."""
    found, damaged = list_checkpoints(ckpt_root), []
    for ckpt in reversed(found):
        try:
            if not verify_checkpoint(ckpt, contents=verify):
                log.warning("checkpoint %s predates recorded digests: resuming from it unverified", ckpt)
        except CheckpointCorrupt as e:
            damaged.append(str(e))
            log.warning("%s; trying the checkpoint before it", e)
            continue
        if damaged:
            log.warning("resuming from %s, the newest checkpoint that verifies (skipped %d damaged)", ckpt, len(damaged))
        return ckpt
    if damaged:
        raise CheckpointCorrupt(f"no checkpoint under {ckpt_root} verifies: " + " | ".join(damaged)
                                + " (start over with --overwrite)")
    return None


def pick_checkpoint(ckpt_root: Path, step: int | None = None) -> Path | None:
    """The complete, verified checkpoint of ``step`` (None: the latest that verifies, see
    :func:`resume_checkpoint`); a step that has none is refused naming the steps there are, a
    damaged one naming its files."""
    if step is None:
        return resume_checkpoint(ckpt_root)
    found = {checkpoint_step(c): c for c in list_checkpoints(ckpt_root)}
    if step not in found:
        have = ", ".join(str(s) for s in sorted(found)) or "none"
        raise CheckpointNotFound(f"no complete checkpoint of step {step} under {ckpt_root} (steps there: {have})")
    verify_checkpoint(found[step])
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
