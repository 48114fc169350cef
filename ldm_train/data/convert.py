"""Converters to img2dataset-layout shards: ``ldm-train data folder`` (a folder of images with
caption sidecars) and ``ldm-train data hf`` (a Hugging Face ``datasets`` dataset).

Both write ``OUT/train/train-*.tar``, ``OUT/val/val-*.tar`` (split by a hash of the key, as the
emoji set is) and ``OUT/report.json``. Image bytes are copied as they are when they are PNG, JPEG
or WebP (no re-compression; other formats become PNG), after a full decode that catches corrupt
files. Every input that is not written is counted by reason; inputs that cannot be read at all
(I/O errors) are also named, and the command fails at the end unless told to tolerate them.
"""
from __future__ import annotations

import io
import json
import logging
import os
import time
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator

from PIL import Image
from tqdm import tqdm

from ..config import ConvertDataConfig
from .holdout import route
from .shards import DataError, EncodedImage, ShardWriter, SkipReport, check_failed_shards, safe_key

log = logging.getLogger(__name__)

FOLDER_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")
_KEEP_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # PIL format -> member extension
Sample = tuple[str, EncodedImage, str, dict]


def check_image(data: bytes) -> tuple[EncodedImage, tuple[int, int]]:
    """Fully decode (a truncated file fails here, not at training time); keep the bytes when the
    format is one readers take, else re-encode as PNG. Raises whatever PIL raises."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        ext = _KEEP_FORMATS.get(img.format)
        if ext is None:
            buf = io.BytesIO()
            has_alpha = img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info
            img.convert("RGBA" if has_alpha else "RGB").save(buf, format="PNG")
            return EncodedImage("png", buf.getvalue()), img.size
        return EncodedImage(ext, data), img.size


def folder_key(rel: str) -> str:
    """A key from a relative path: always hashed, so ``a.jpg``/``a.png`` or ``a b``/``a_b`` never
    collide, and a hostile name (``..``, separators, newlines) yields letters, digits, ``_``, ``-``."""
    return safe_key(rel.rsplit(".", 1)[0], hashed=True) if "." in rel else safe_key(rel, hashed=True)


def split_samples(samples: Iterable[Sample], fraction: float, train: ShardWriter, val: ShardWriter) -> None:
    """Validation = a stable hash of the key, as the emoji set (:func:`~.holdout.route`: never an
    empty val/ on small inputs, one sample held in memory)."""
    for to_val, sample in route(samples, fraction):
        (val if to_val else train).write(*sample)


def _check_caption(caption: str, allow_empty: bool) -> tuple[str, str | None]:
    caption = caption.strip()
    return ("empty_caption", None) if not caption and not allow_empty else ("", caption)


def _read_caption(path: Path, allow_empty: bool) -> tuple[str, str | None]:
    """(skip_reason or "", caption). OSError propagates: an unreadable file is a failed input."""
    if not path.is_file():
        return ("", "") if allow_empty else ("missing_caption", None)
    try:
        return _check_caption(path.read_bytes().decode("utf-8"), allow_empty)
    except UnicodeDecodeError:
        return "bad_caption_utf8", None


def _read_meta(path: Path) -> tuple[str, dict | None]:
    if not path.is_file():
        return "", {}
    try:
        meta = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return "bad_meta_json", None
    return ("", meta) if isinstance(meta, dict) else ("bad_meta_json", None)


def list_folder(src: Path) -> tuple[list[Path], Counter]:
    """Image files below ``src`` (sorted, so keys and shards are the same on every machine) and
    a count of the other files by suffix, reported rather than dropped silently."""
    if not src.is_dir():
        raise DataError(f"--src {src} is not a folder")
    images, ignored = [], Counter()
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        suffix = path.suffix.lower()
        if suffix in FOLDER_IMAGE_EXTS:
            images.append(path)
        elif suffix not in (".txt", ".json"):
            ignored[suffix or "(no suffix)"] += 1
    if not images:
        raise DataError(f"no {'/'.join(FOLDER_IMAGE_EXTS)} images below {src}")
    return images, ignored


def folder_samples(src: Path, images: list[Path], report: SkipReport, allow_empty: bool) -> Iterator[Sample]:
    """``(key, image, caption, meta)`` per image with a ``NAME.txt`` caption next to it (and
    optional ``NAME.json`` metadata); the rest is counted in ``report``."""
    for path in tqdm(images, desc=f"data folder {src.name}", unit="img", dynamic_ncols=True):
        rel = path.relative_to(src).as_posix()
        report.seen += 1
        try:
            reason, caption = _read_caption(path.with_suffix(".txt"), allow_empty)
            reason2, meta = _read_meta(path.with_suffix(".json")) if not reason else (reason, None)
            data = path.read_bytes() if not reason2 else b""
        except OSError as e:
            report.add("unreadable_file", rel, str(src))
            report.fail_shard(str(path), f"{type(e).__name__}: {e.strerror or e}")
            continue
        if reason or reason2:
            report.add(reason or reason2, rel, str(src))
            continue
        try:
            image, (w, h) = check_image(data)
        except Exception:  # PIL raises many types (OSError, SyntaxError, ValueError, bomb errors)
            report.add("corrupt_image", rel, str(src))
            continue
        report.kept += 1
        yield folder_key(rel), image, caption, {**meta, "source": rel, "width": w, "height": h}


def write_converted(
    samples: Iterable[Sample], out: Path, cfg: ConvertDataConfig, report: SkipReport, overwrite: bool, info: dict
) -> dict:
    """Route samples to ``out/train`` or ``out/val`` shards, then write ``out/report.json``."""
    clear_outputs(out, overwrite)
    t0 = time.time()
    with ShardWriter(out / "train", "train", cfg.shard_size) as train, ShardWriter(out / "val", "val", cfg.shard_size) as vw:
        split_samples(samples, cfg.val_fraction, train, vw)
    counts = report.as_dict()
    result = {
        **info,
        "seen": counts["seen"],
        "kept": counts["kept"],
        "skipped": counts["skipped"],
        "failed_inputs": counts["failed_shards"],
        "input_errors": counts["shard_errors"],
        "train": train.count,
        "val": vw.count,
        "shard_size": cfg.shard_size,
        "val_fraction": cfg.val_fraction,
        "seconds": round(time.time() - t0, 2),
        "train_shards": [str(p) for p in train.paths],
        "val_shards": [str(p) for p in vw.paths],
    }
    tmp = out / "report.json.tmp"
    tmp.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, out / "report.json")
    log.info("%s: %s -> %s", info.get("source"), report.summary(), out)
    return result


def clear_outputs(out: Path, overwrite: bool) -> None:
    """Refuse to mix with (or silently replace) an earlier conversion unless ``overwrite``."""
    old = [p for d in ("train", "val") for p in sorted((out / d).glob("*.tar*"))]
    old += [p for p in (out / "report.json",) if p.exists()]
    if old and not overwrite:
        raise DataError(f"{out} already holds a converted dataset ({old[0]}); pass --overwrite to replace it")
    for path in old:
        path.unlink()


def convert_folder(
    src: Path, out: Path, cfg: ConvertDataConfig, tolerate_failed: bool = False, overwrite: bool = False
) -> dict:
    """``ldm-train data folder``: images (nested folders too) with ``NAME.txt`` captions -> shards."""
    src, out = Path(src), Path(out)
    images, ignored = list_folder(src)
    if ignored:
        log.warning("%s: ignored files that are not %s images: %s", src, "/".join(FOLDER_IMAGE_EXTS), dict(ignored))
    report = SkipReport()
    info = {"kind": "folder", "source": str(src), "ignored_files": dict(sorted(ignored.items()))}
    samples = folder_samples(src, images, report, cfg.allow_empty_captions)
    result = write_converted(samples, out, cfg, report, overwrite, info)
    check_failed_shards(report.failed_shards, tolerate_failed, f"data folder {src}")
    return result


def hf_caption(value, allow_empty: bool) -> tuple[str, str | None]:
    """(skip_reason or "", caption): a string, or the first of a list of strings (COCO-style)."""
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        value = value[0]
    if value is None:
        return ("", "") if allow_empty else ("missing_caption", None)
    if not isinstance(value, str):
        return "bad_caption_type", None
    return _check_caption(value, allow_empty)


def hf_image_bytes(value, base: Path | None) -> bytes | None:
    """The encoded bytes of an image cell: ``{"bytes", "path"}`` (``datasets.Image(decode=False)``),
    raw bytes, a file path (relative to the dataset folder), or a PIL image. OSError: unreadable."""
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return value["bytes"]
        value = value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, Image.Image):
        buf = io.BytesIO()
        value.save(buf, format="PNG")
        return buf.getvalue()
    if isinstance(value, str) and value:
        path = Path(value)
        return (path if path.is_absolute() or base is None else base / path).read_bytes()
    return None


def hf_samples(ds, image_column: str, caption_column: str, base: Path | None, name: str,
               report: SkipReport, allow_empty: bool) -> Iterator[Sample]:
    for i, row in enumerate(tqdm(ds, desc=f"data hf {name}", unit="img", dynamic_ncols=True)):
        key = f"{i:09d}"
        report.seen += 1
        reason, caption = hf_caption(row[caption_column], allow_empty)
        if reason:
            report.add(reason, key, name)
            continue
        try:
            data = hf_image_bytes(row[image_column], base)
        except OSError as e:
            report.add("unreadable_file", key, name)
            report.fail_shard(f"{name}[{i}]", f"{type(e).__name__}: {e.strerror or e}")
            continue
        if data is None:
            report.add("missing_image", key, name)
            continue
        try:
            image, (w, h) = check_image(data)
        except Exception:  # PIL raises many types
            report.add("corrupt_image", key, name)
            continue
        report.kept += 1
        yield key, image, caption, {"index": i, "width": w, "height": h}


def convert_hf(
    dataset: str, out: Path, cfg: ConvertDataConfig, image_column: str, caption_column: str,
    split: str | None = None, tolerate_failed: bool = False, overwrite: bool = False, cache_dir: Path | None = None,
) -> dict:
    """``ldm-train data hf``: a ``datasets`` dataset (saved folder, data files, or hub id) -> shards."""
    from .hf import open_dataset, prepare_columns

    ds, split = open_dataset(dataset, split, cache_dir)
    ds = prepare_columns(ds, dataset, image_column, caption_column)
    base = Path(dataset) if Path(dataset).is_dir() else Path(dataset).parent  # relative image paths
    report = SkipReport()
    info = {"kind": "hf", "source": dataset, "split": split, "image_column": image_column,
            "caption_column": caption_column}
    name = f"{dataset}:{split}"
    samples = hf_samples(ds, image_column, caption_column, base, name, report, cfg.allow_empty_captions)
    result = write_converted(samples, Path(out), cfg, report, overwrite, info)
    check_failed_shards(report.failed_shards, tolerate_failed, f"data hf {dataset}")
    return result
