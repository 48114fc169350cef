"""What an ``encode`` output folder has done so far, kept in files so ranks never share one.

``<out>/encode_progress/fingerprint.json``  what the folder is encoded with (autoencoder and text
    tower hashes, resolution, dtypes, input shards); a resumed run must match it key for key.
``<out>/encode_progress/done/NNNNNN.json``   one per finished input shard (index NNNNNN in the
    input list): its output shards with sample counts, its skip report, or why it failed.
``<out>/manifest.json``                      written last, by whichever rank sees every input
    shard done; its presence means "complete" (training reads only complete folders).

Every file is written under a temporary name and renamed, so a crash leaves either nothing or a
whole file, and a done file is only written after the shard's outputs are renamed into place.
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

from ..data.buckets import bucket_name
from ..errors import UserError
from .cache import MANIFEST, write_json_atomic

PROGRESS = "encode_progress"
FINGERPRINT = "fingerprint.json"
# Recorded for the user but not compared: the same weights copied elsewhere are the same model.
INFORMATIONAL = {"autoencoder.path"}


class EncodeMismatchError(UserError):
    """An existing output folder was encoded with something else; the message names the key."""


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def progress_dir(out: Path) -> Path:
    return out / PROGRESS


def done_path(out: Path, index: int) -> Path:
    return progress_dir(out) / "done" / f"{index:06d}.json"


def is_complete(out: Path) -> bool:
    return (out / MANIFEST).is_file()


def check_fingerprint(out: Path, fingerprint: dict) -> None:
    """Record ``fingerprint`` for a new folder, or refuse one recorded with different values."""
    path = progress_dir(out) / FINGERPRINT
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, fingerprint)
        return
    old = json.loads(path.read_text())
    for key in sorted(set(old) | set(fingerprint)):
        if key in INFORMATIONAL or old.get(key) == fingerprint.get(key):
            continue
        was, now = _short(old.get(key)), _short(fingerprint.get(key))
        where = f" (autoencoder.path was {old.get('autoencoder.path')}, now {fingerprint.get('autoencoder.path')})" \
            if key.startswith("autoencoder") else ""
        raise EncodeMismatchError(
            f"{out} was partly encoded with a different {key}: {was}, this run has {now}{where}; "
            "rerun with the same settings to resume, or pass --overwrite to start over"
        )


def _short(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def write_done(out: Path, index: int, entry: dict) -> None:
    path = done_path(out, index)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, entry)


def read_done(out: Path, index: int) -> dict | None:
    path = done_path(out, index)
    return json.loads(path.read_text()) if path.is_file() else None


def forget_failed(out: Path, n_inputs: int) -> None:
    """Failed shards are retried by the next run; drop their entries before any rank starts, so
    no rank mistakes an old failure for this run's result."""
    for i in range(n_inputs):
        entry = read_done(out, i)
        if entry is not None and entry["status"] != "ok":
            done_path(out, i).unlink()


def all_done(out: Path, n_inputs: int) -> list[dict] | None:
    """Every input shard's entry, in input order, or None while any is missing."""
    entries = [read_done(out, i) for i in range(n_inputs)]
    return None if any(e is None for e in entries) else entries


def merge_reports(reports: list[dict]) -> dict:
    """Sum the per-shard skip reports: counts add, reason counters add, lists concatenate,
    other mappings (shard -> error) merge."""
    merged: dict = {}
    for report in reports:
        for key, value in report.items():
            counts = isinstance(value, dict) and all(
                isinstance(v, int) for v in (*value.values(), *merged.get(key, {}).values()))
            if counts:
                merged[key] = dict(sorted((Counter(merged.get(key, {})) + Counter(value)).items()))
            elif isinstance(value, dict):
                merged[key] = {**merged.get(key, {}), **value}
            elif isinstance(value, list):
                merged[key] = merged.get(key, []) + value
            else:
                merged[key] = merged.get(key, 0) + value
    return merged


def merge_entries(entries: list[dict], input_shards: list[str]) -> dict:
    """The counts part of the manifest, from every input shard's done entry."""
    outputs = [o for e in entries for o in e["outputs"]]
    return {
        "input_shards": input_shards,
        "samples_written": sum(o["samples"] for o in outputs),
        "report": merge_reports([e["report"] for e in entries]),
        "failed_shards": [{"shard": e["shard"], "error": e["error"]} for e in entries if e["status"] != "ok"],
        "input_shard_samples": {e["shard"]: sum(o["samples"] for o in e["outputs"]) for e in entries},
        "output_shards": outputs,
        **bucket_samples(outputs),
        "seconds": round(sum(e["seconds"] for e in entries), 3),
    }


def bucket_samples(outputs: list[dict]) -> dict:
    """``{"bucket_samples": {"WxH": n}}`` over parts that name a bucket (``[w, h]``), sorted by
    name; empty for a cache without buckets."""
    counts = Counter()
    for o in outputs:
        if "bucket" in o:
            counts[bucket_name(tuple(o["bucket"]))] += o["samples"]
    return {"bucket_samples": dict(sorted(counts.items()))} if counts else {}
