"""Image-caption WebDataset shards in the img2dataset layout: ``KEY.png|jpg|jpeg|webp``,
``KEY.txt`` (UTF-8 caption), ``KEY.json`` (metadata).

Reading is done with :mod:`tarfile` in streaming mode rather than ``wds.WebDataset``: webdataset's
handlers see an exception, not the sample it belongs to, so they cannot tell "corrupt image" from
"bad caption" from "truncated shard", and a tar cut on a header boundary ends silently there. With
tarfile we group members by key ourselves, count every dropped sample by reason, and detect a
missing end-of-archive marker. Non-local URLs (``pipe:``, ``http://``) are opened with webdataset's
``gopen`` so the same code reads them.
"""
from __future__ import annotations

import glob
import io
import json
import logging
import os
import re
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterable, Iterator

import braceexpand
import torch
from PIL import Image
from webdataset import TarWriter, gopen

from ..errors import UserError

log = logging.getLogger(__name__)

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")  # preference order when a sample has several
_PIL_FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}
_SAFE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_WARN_FIRST = 3  # log this many skips per reason, then only the summary


class DataError(UserError):
    """A user mistake about data (missing shard, empty dataset, ...); the message names the file."""


@dataclass
class SkipReport:
    """Counts every sample seen, kept or skipped (by reason), so nothing is dropped silently.

    Invariant after iteration: ``kept + sum(skipped.values()) == seen``."""

    seen: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)

    def add(self, reason: str, key: str, url: str) -> None:
        """Count one skipped sample; log the first few per reason so the cause is visible."""
        self.skipped[reason] += 1
        n = self.skipped[reason]
        if n <= _WARN_FIRST:
            more = " (further skips for this reason are only counted)" if n == _WARN_FIRST else ""
            log.warning("skipping sample %r in %s: %s%s", key, url, reason, more)

    def as_dict(self) -> dict:
        return {"seen": self.seen, "kept": self.kept, "skipped": dict(sorted(self.skipped.items()))}

    def summary(self) -> str:
        """One line, e.g. ``kept 95 of 100 (skipped: corrupt_image=3, bad_caption_utf8=2)``."""
        line = f"kept {self.kept} of {self.seen}"
        if self.skipped:
            parts = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items()))
            line += f" (skipped: {parts})"
        return line


def _is_remote(spec: str) -> bool:
    return spec.startswith("pipe:") or re.match(r"^[a-z][a-z0-9+]*://", spec) is not None


def expand_shards(spec: str) -> list[str]:
    """Turn a shard spec (folder, brace pattern, glob, single tar, ``pipe:``/URL) into a list.

    Local paths are checked here so a typo fails before training starts, naming the file.
    Remote specs are only brace-expanded (``pipe:curl .../{000..009}.tar``), never checked."""
    if _is_remote(spec):
        return list(braceexpand.braceexpand(spec))
    path = Path(spec)
    if path.is_dir():
        tars = sorted(str(p) for p in path.glob("*.tar"))
        if not tars:
            raise DataError(f"no *.tar shards in folder {path}")
        return tars
    if "{" in spec:
        urls = list(braceexpand.braceexpand(spec))
        missing = [u for u in urls if not Path(u).is_file()]
        if missing:
            raise DataError(f"shard not found: {missing[0]} ({len(missing)} of {len(urls)} missing from {spec})")
        return urls
    if any(c in spec for c in "*?["):
        urls = sorted(glob.glob(spec))
        if not urls:
            raise DataError(f"no shards match {spec}")
        return urls
    if not path.is_file():
        raise DataError(f"shard not found: {path}")
    return [str(path)]


def _check_key(key: str, seen: set[str]) -> None:
    """webdataset splits key/extension at the first dot, and keys become tar paths: refuse
    anything that would change meaning on read (dots, slashes) or merge two samples."""
    if not isinstance(key, str) or not _SAFE_KEY.fullmatch(key):
        raise ValueError(f"unsafe sample key {key!r}: use letters, digits, '_' and '-' only")
    if key in seen:
        raise ValueError(f"duplicate sample key {key!r}")
    seen.add(key)


def _encode(key: str, image: Image.Image, caption: str, meta: dict, fmt: str) -> dict:
    buf = io.BytesIO()
    if fmt in ("jpg", "jpeg") and image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    image.save(buf, format=_PIL_FORMATS[fmt])
    return {
        "__key__": key,
        fmt: buf.getvalue(),
        "txt": caption.encode("utf-8"),
        "json": json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8"),
    }


def write_shards(
    samples: Iterable[tuple[str, Image.Image, str, dict]],
    out_dir: Path,
    prefix: str,
    shard_size: int,
    image_format: str = "png",
) -> list[Path]:
    """Write ``out_dir/{prefix}-000000.tar``, ... with ``shard_size`` samples each.

    Each shard is written as ``*.tar.tmp`` and renamed when complete, so a crash never leaves a
    half-written ``*.tar`` that a reader would pick up. Tar mtimes are fixed for reproducible bytes."""
    fmt = image_format.lower()
    if fmt not in _PIL_FORMATS:
        raise ValueError(f"image_format must be one of {sorted(_PIL_FORMATS)}, got {image_format!r}")
    if shard_size <= 0:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    keys: set[str] = set()
    writer, stream, tmp, count = None, None, None, 0
    try:
        for key, image, caption, meta in samples:
            _check_key(key, keys)
            if writer is None:
                final = out_dir / f"{prefix}-{len(paths):06d}.tar"
                tmp = final.with_name(final.name + ".tmp")
                stream = open(tmp, "wb")
                writer = TarWriter(stream, encoder=False, mtime=0.0)
                paths.append(final)
            writer.write(_encode(key, image, caption, meta, fmt))
            count += 1
            if count == shard_size:
                _finish(writer, stream, tmp, paths[-1])
                writer, count = None, 0
        if writer is not None:
            _finish(writer, stream, tmp, paths[-1])
            writer = None
    finally:
        if writer is not None:  # an exception mid-shard: leave no partial file behind
            writer.close()
            stream.close()
            tmp.unlink(missing_ok=True)
            paths.pop()
    return paths


def _finish(writer: TarWriter, stream: IO[bytes], tmp: Path, final: Path) -> None:
    writer.close()
    stream.close()
    os.replace(tmp, final)


def preprocess(image: Image.Image, resolution: int) -> torch.Tensor:
    """Alpha onto white, RGB, shorter side -> ``resolution`` (bicubic), centre crop; CHW in [-1, 1].

    White, not black, because transparent regions of logos/emoji are meant to be background."""
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    image = image.convert("RGB")
    w, h = image.size
    if (w, h) != (resolution, resolution):
        scale = resolution / min(w, h)
        size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
        image = image.resize(size, Image.Resampling.BICUBIC)  # PIL resize antialiases on downscale
        left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
        image = image.crop((left, top, left + resolution, top + resolution))
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    chw = data.view(resolution, resolution, 3).permute(2, 0, 1)
    return chw.float().div(127.5).sub(1.0).contiguous()


class _EndTrackingTarInfo(tarfile.TarInfo):
    """Records why tarfile stopped: it ends *silently* on a truncated or garbled header, which
    would drop the rest of a shard without a trace. Only a zero block means a proper end."""

    @classmethod
    def fromtarfile(cls, tf):
        tf.end_reason = None
        try:
            return super().fromtarfile(tf)
        except tarfile.EOFHeaderError:
            tf.end_reason = "eof"
            raise
        except tarfile.HeaderError as e:
            tf.end_reason = type(e).__name__
            raise


def _open(url: str) -> IO[bytes]:
    try:
        return gopen(url, "rb") if _is_remote(url) else open(url, "rb")
    except OSError as e:
        raise DataError(f"cannot open shard {url}: {e}") from None


def _split_name(name: str) -> tuple[str, str] | None:
    """``dir/000123.png`` -> (``dir/000123``, ``png``), splitting at the first dot like webdataset."""
    head, _, base = name.rpartition("/")
    if "." not in base:
        return None
    stem, ext = base.split(".", 1)
    return (f"{head}/{stem}" if head else stem), ext.lower()


def _close(stream: IO[bytes], url: str, check: bool) -> None:
    """A ``pipe:`` whose command failed (wrong URL, network) raises here: that is a missing
    shard, so a DataError. A consumer that stopped early is never an error, whatever the exit
    status of a command killed mid-write (webdataset ignores only SIGPIPE's 141)."""
    try:
        stream.close()
    except OSError as e:
        if check:
            raise DataError(f"cannot read shard {url}: {e}") from None


def _tar_groups(url: str, report: SkipReport) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield ``(key, {ext: bytes})`` per sample. A shard that breaks off (truncated, garbled)
    yields what came before and counts the pending sample as ``unreadable_tar_member``."""
    key, group, broken, done = None, {}, False, False
    stream = _open(url)
    try:
        tf = tarfile.open(fileobj=stream, mode="r|*", tarinfo=_EndTrackingTarInfo)
        for member in tf:
            parts = _split_name(member.name) if member.isfile() else None
            if parts is None:
                continue  # directories and extension-less files are not sample members
            if parts[0] != key and key is not None:
                yield key, group
                group = {}
            key = parts[0]
            group[parts[1]] = tf.extractfile(member).read()
        broken, done = getattr(tf, "end_reason", "eof") != "eof", True
    except (tarfile.TarError, OSError, EOFError):
        broken, done = True, True
    finally:  # not done: the consumer stopped early (GeneratorExit)
        _close(stream, url, check=done)
    if broken:
        report.seen += 1
        reason = "unreadable_tar_member" if key is not None else "unreadable_shard"
        report.add(reason, key or "<tar header>", url)
    elif key is not None:
        yield key, group


def _decode(key: str, group: dict[str, bytes], resolution: int, min_size: int) -> tuple[str, dict | None]:
    """Return ``(skip_reason, None)`` or ``("", sample)``."""
    ext = next((e for e in IMAGE_EXTS if e in group), None)
    if ext is None:
        return "missing_image", None
    if "txt" not in group:
        return "missing_caption", None
    try:
        caption = group["txt"].decode("utf-8").strip()
    except UnicodeDecodeError:
        return "bad_caption_utf8", None
    try:
        meta = json.loads(group["json"].decode("utf-8")) if "json" in group else {}
    except (UnicodeDecodeError, ValueError):
        return "bad_meta_json", None
    try:
        with Image.open(io.BytesIO(group[ext])) as img:
            img.load()
            if min(img.size) < min_size:
                return "too_small", None
            tensor = preprocess(img, resolution)
    except Exception:  # PIL raises many types (OSError, SyntaxError, ValueError, bomb errors)
        return "corrupt_image", None
    return "", {"key": key, "image": tensor, "caption": caption, "meta": meta}


def iter_samples(spec: str, resolution: int, report: SkipReport, min_size: int = 0) -> Iterator[dict]:
    """Yield ``{"key", "image" (CHW float [-1, 1]), "caption", "meta", "shard"}`` in shard order.

    Bad samples are skipped and counted in ``report``; raises :class:`DataError` at the end when
    nothing at all was usable, since training on zero samples is always a mistake."""
    for url in expand_shards(spec):
        for key, group in _tar_groups(url, report):
            report.seen += 1
            reason, sample = _decode(key, group, resolution, min_size)
            if sample is None:
                report.add(reason, key, url)
                continue
            report.kept += 1
            sample["shard"] = url
            yield sample
    if report.kept == 0:
        raise DataError(f"no usable samples in {spec}: {report.summary()}")
    if report.skipped:
        log.warning("%s: %s", spec, report.summary())


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float -> uint8 (exact inverse of :func:`preprocess` on its own output)."""
    return images.add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8)


def load_images(
    spec: str, resolution: int, report: SkipReport, limit: int | None = None
) -> tuple[torch.Tensor, list[str], list[str]]:
    """The whole (small) dataset in memory as uint8 NCHW (4x smaller than float), with captions
    and keys; for the VAE trainer and tests."""
    if limit is not None and limit <= 0:
        raise ValueError(f"limit must be positive or None, got {limit}")
    images, captions, keys = [], [], []
    samples = iter_samples(spec, resolution, report)
    try:
        for sample in samples:
            images.append(to_uint8(sample["image"]))
            captions.append(sample["caption"])
            keys.append(sample["key"])
            if limit is not None and len(images) >= limit:
                break
    finally:
        samples.close()
    if not images:
        raise DataError(f"no usable samples in {spec}: {report.summary()}")
    return torch.stack(images), captions, keys
