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
    "train.async_save", "train.verify_checkpoints",
)


# What each stage pins: the config keys that shaped its inputs and outputs. A rerun of the stage
# in the same run folder (resuming it) is compared on these only, so another stage's settings may
# change freely; slurm.*, eval.*, export.* pin nothing. Dotted prefixes of ``section.key``.
STAGE_PINS = {
    "train-vae": ("data", "autoencoder", "run.seed"),
    "train-clip": ("data", "clip", "run.seed"),
    "encode": ("pretrained", "data", "autoencoder", "text", "latents"),  # + run.seed with latents.store: sample
    "train": ("pretrained", "model", "diffusion", "train", "distributed", "latents.loader", "run.seed"),
}
# What the latent cache ``train`` reads was made with (the encode record's keys, checked always).
CACHE_PINS = ("pretrained", "data", "autoencoder", "text", "latents")
NOT_PINNED = {"encode": ("latents.loader",), "cache": ("latents.loader",)}  # the training loader


class LatentCacheMismatchError(UserError):
    """The latent cache was encoded with other settings than the config says; the message names them."""


def stage_record(run: Path, stage: str) -> Path:
    return run / "stages" / f"{stage}.yaml"


def _read_record(path: Path) -> dict:
    # written by an older version: its moved keys in today's places, a key it lacks as its default
    return with_defaults(migrate(yaml.safe_load(path.read_text()) or {}))


def _pinned(key: str, pins: tuple[str, ...], skip: tuple[str, ...]) -> bool:
    under = lambda k, p: k == p or k.startswith(p + ".")  # noqa: E731
    return any(under(key, p) for p in pins) and not any(under(key, s) for s in skip)


def _diff(old: dict, new: dict, pins: tuple[str, ...] | None, skip: tuple[str, ...] = ()) -> list[str]:
    """``section.key`` names whose values differ, among ``pins`` (None: every key but slurm.*)."""
    diff = [s for s in new if not isinstance(new[s], dict) and old.get(s) != new[s]]  # top-level keys (pretrained)
    diff += [f"{s}.{k}" for s in new if isinstance(new[s], dict) for k in new[s] if (old.get(s) or {}).get(k) != new[s][k]]
    if pins is None:  # slurm.* says how a run is submitted, not what it computes: it may change between jobs
        return [d for d in diff if d not in skip and not d.startswith("slurm.")]
    return [d for d in diff if _pinned(d, pins, skip)]


def _was_now(key: str, old: dict, new: dict) -> str:
    """``distributed.strategy (ddp there, zero3 now)`` for a short scalar value; else the key."""
    was, now = (_dotted(d, key) for d in (old, new))
    scalar = all(v is None or isinstance(v, (str, int, float, bool)) and len(str(v)) <= 40 for v in (was, now))
    return f"{key} ({was} there, {now} now)" if scalar else key


def _dotted(d: dict, key: str):
    for part in key.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def stage_pins(stage: str, cfg: Config) -> tuple[str, ...]:
    seeded = stage == "encode" and cfg.latents.store == "sample"  # run.seed seeds the fixed draw
    return STAGE_PINS[stage] + (("run.seed",) if seeded else ())


def _own_record(run: Path, stage: str) -> Path | None:
    """The stage's record; in a run folder of an older version (no ``stages/``), whose config.yaml
    was compared whole by every stage, that config.yaml."""
    path = stage_record(run, stage)
    if path.is_file():
        return path
    legacy = run / "config.yaml"
    return legacy if not (run / "stages").is_dir() and legacy.is_file() else None


def check_latent_cache(cfg: Config) -> None:
    """Refuse a latent cache (``{latents.dir}/train``) encoded with other data/autoencoder/text/latents
    settings than ``cfg`` says: from the encode record of this run when it describes this cache,
    and from what the cache's manifest and fingerprint record (any cache, also one copied in)."""
    run, cache = cfg.path("{run}"), cfg.path(cfg.latents.dir) / "train"
    new = cfg.model_dump()
    diff = []
    record = _own_record(run, "encode")
    if record is not None:
        old = _read_record(record)
        if old["latents"]["dir"] == cfg.latents.dir:  # else the record is of another cache
            diff = _diff(old, new, CACHE_PINS, NOT_PINNED["cache"])
    manifest, fp = cache / "manifest.json", cache / "encode_progress" / "fingerprint.json"
    if manifest.is_file():  # (an incomplete cache is refused by the loader)
        m = json.loads(manifest.read_text())
        said = {"data.resolution": (m.get("resolution"), cfg.data.resolution), "latents.dtype": (m.get("dtype"), cfg.latents.dtype),
                "latents.store": (m.get("store"), cfg.latents.store), "latents.text": (m.get("text"), cfg.latents.text)}
        pre = json.loads(fp.read_text()).get("preprocessing") if fp.is_file() else None
        if isinstance(pre, dict):
            opts = cfg.data.read_options()
            said.update({f"data.{k}": (pre.get(o), opts[o]) for k, o in (("min_size", "min_size"), ("crop", "crop"), ("crop_seed", "seed"))})
        diff += [k for k, (was, now) in said.items() if was is not None and was != now and k not in diff]
        # buckets or none: a cache without the key was written before buckets existed (none)
        wanted = [list(b) for b in cfg.data.buckets.resolved()] if cfg.data.buckets.enabled else None
        if m.get("buckets") != wanted and not any(k.startswith("data.buckets") for k in diff):
            diff.append("data.buckets")
    if diff:
        raise LatentCacheMismatchError(
            f"latent cache {cache} was encoded with other settings than this config (differs in "
            f"{', '.join(diff[:6])}); set them back, or re-encode: ldm-train encode --overwrite with this config"
        )


def record_config(cfg: Config, overwrite: bool, may_differ: tuple[str, ...] = (), write: bool = True,
                  stage: str | None = None) -> Path:
    """Write ``{run}/config.yaml`` (the resolved config of the last stage run); refuse to replace
    one that describes a different run (keys in ``may_differ``, such as ``train.steps`` when
    resuming, may change). With ``stage`` (train-vae, encode, train), only the keys that stage pins
    (:data:`STAGE_PINS`) are compared, with ``{run}/stages/{stage}.yaml`` (its record, also
    written); ``train`` also checks the latent cache it reads (:func:`check_latent_cache`), with
    or without ``overwrite``."""
    run = cfg.path("{run}")
    path = run / "config.yaml"
    record = path if stage is None else _own_record(run, stage)
    if stage == "train":
        check_latent_cache(cfg)
    if record is not None and record.is_file() and not overwrite:
        pins = None if stage is None else stage_pins(stage, cfg)
        old, new = _read_record(record), cfg.model_dump()
        diff = _diff(old, new, pins, may_differ + NOT_PINNED.get(stage, ()))
        if diff:
            said = ", ".join(_was_now(d, old, new) for d in diff[:6])
            raise OutputExistsError(
                f"{record} holds a different {stage + ' ' if stage else ''}run (differs in {said}); "
                "pass --overwrite to replace it, or set run.dir to a new folder"
            )
    if write:
        trained = stage_record(run, "train")
        if stage not in (None, "train") and trained.is_file():
            # sample/eval read {run}/config.yaml: keep the model and objective its checkpoints have
            old = _read_record(trained)
            dump_config(Config.model_validate({**cfg.model_dump(), "model": old["model"], "diffusion": old["diffusion"]}), path)
        else:
            dump_config(cfg, path)
        if stage is not None:
            dump_config(cfg, stage_record(run, stage))
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
