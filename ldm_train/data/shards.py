"""Image-caption WebDataset shards in the img2dataset layout: ``KEY.png|jpg|jpeg|webp``,
``KEY.txt`` (UTF-8 caption), ``KEY.json`` (metadata).

Reading is done with :mod:`tarfile` in streaming mode rather than ``wds.WebDataset``: webdataset's
handlers see an exception, not the sample it belongs to, so they cannot tell "corrupt image" from
"bad caption" from "truncated shard", and a tar cut on a header boundary ends silently there. With
tarfile we group members by key ourselves, count every dropped sample by reason, and detect a
missing end-of-archive marker. Non-local URLs (``pipe:``, ``http://``) are opened with webdataset's
``gopen`` so the same code reads them.

A shard that cannot be read to its end (unopenable, zero bytes, not a tar, truncated, a ``pipe:``
command that fails) never stops the job: it is counted, named in ``SkipReport.failed_shards`` and
the other shards are read. Commands then exit non-zero unless ``data.tolerate_failed_shards``
(:func:`check_failed_shards`). Keys read from tars pass through :func:`safe_key`, so a member
named ``../../x.png`` can never become a path outside an output folder downstream.
"""
from __future__ import annotations

import glob
import hashlib
import io
import json
import logging
import os
import re
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterable, Iterator, NamedTuple

import braceexpand
import torch
from PIL import Image
from webdataset import TarWriter, gopen

from ..errors import UserError
from ..utils.images import to_uint8
from .buckets import assign
from .preprocess import crop_box, preprocess, sample_rng

log = logging.getLogger(__name__)

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")  # preference order when a sample has several
_PIL_FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}
_SAFE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_WARN_FIRST = 3  # log this many skips per reason, then only the summary


class DataError(UserError):
    """A user mistake about data (missing shard, empty dataset, ...); the message names the file."""


class FailedShardsError(DataError):
    """Some shards or input files could not be read; the rest was processed. Names them."""


class EncodedImage(NamedTuple):
    """An image already encoded as ``ext`` (png/jpg/jpeg/webp) bytes: written as is, so converters
    keep the source's quality and spend no time re-compressing."""

    ext: str
    data: bytes


@dataclass
class SkipReport:
    """Counts every sample seen, kept or skipped (by reason), so nothing is dropped silently.

    Invariant after iteration: ``kept + sum(skipped.values()) == seen``."""

    seen: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    failed_shards: list[str] = field(default_factory=list)  # shards that could not be read to the end
    shard_errors: dict[str, str] = field(default_factory=dict)  # shard -> what went wrong

    def add(self, reason: str, key: str, url: str) -> None:
        """Count one skipped sample; log the first few per reason so the cause is visible."""
        self.skipped[reason] += 1
        n = self.skipped[reason]
        if n <= _WARN_FIRST:
            more = " (further skips for this reason are only counted)" if n == _WARN_FIRST else ""
            log.warning("skipping sample %r in %s: %s%s", key, url, reason, more)

    def fail_shard(self, url: str, error: str) -> None:
        """Name a shard (or input file) that broke off or could not be read (logged, never raised)."""
        self.failed_shards.append(url)
        self.shard_errors[url] = error
        log.error("could not read %s: %s; continuing with the rest", url, error)

    def as_dict(self) -> dict:
        return {
            "seen": self.seen,
            "kept": self.kept,
            "skipped": dict(sorted(self.skipped.items())),
            "failed_shards": list(self.failed_shards),
            "shard_errors": dict(self.shard_errors),
        }

    def summary(self) -> str:
        """One line, e.g. ``kept 95 of 100 (skipped: corrupt_image=3, bad_caption_utf8=2)``."""
        line = f"kept {self.kept} of {self.seen}"
        if self.skipped:
            parts = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items()))
            line += f" (skipped: {parts})"
        if self.failed_shards:
            line += f"; {len(self.failed_shards)} failed shard(s): {', '.join(self.failed_shards[:3])}"
            line += " ..." if len(self.failed_shards) > 3 else ""
        return line


def check_failed_shards(failed: list[str], tolerate: bool, what: str) -> None:
    """Raise :class:`FailedShardsError` naming ``failed`` (shards or input files) unless
    ``tolerate``: a job finishes the readable rest, then exits non-zero so nobody mistakes a
    partial result for a complete one."""
    if failed and not tolerate:
        names = ", ".join(failed[:5]) + (f" and {len(failed) - 5} more" if len(failed) > 5 else "")
        raise FailedShardsError(
            f"{what}: {len(failed)} input(s) could not be read: {names}; the rest was processed. "
            "Fix or remove them, or set data.tolerate_failed_shards=true (--tolerate-failures) to accept"
        )


def safe_key(raw: str, hashed: bool = False) -> str:
    """``raw`` if it is already a safe key (and not ``hashed``), else its letters/digits/``_``/``-``
    (other runs -> ``_``, at most 80) plus 8 hex digits of its SHA-1: distinct names stay distinct,
    and no separator or ``..`` survives, so the key can never name a path outside an output folder."""
    if _SAFE_KEY.fullmatch(raw) and not hashed:
        return raw
    slug = re.sub(r"[^A-Za-z0-9_-]+", "_", raw).strip("_")[:80]
    digest = hashlib.sha1(raw.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    return f"{slug}-{digest}" if slug else digest


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
        missing = [u for u in urls if not _is_local_shard(Path(u))]
        if missing:
            raise DataError(f"shard not found: {missing[0]} ({len(missing)} of {len(urls)} missing from {spec})")
        return urls
    if any(c in spec for c in "*?["):
        urls = sorted(glob.glob(spec))
        if not urls:
            raise DataError(f"no shards match {spec}")
        return urls
    if not _is_local_shard(path):
        raise DataError(f"shard not found: {path}")
    return [str(path)]


def _is_local_shard(path: Path) -> bool:
    """A file, or a named pipe that another process streams a tar into."""
    return path.is_file() or path.is_fifo()


def _check_key(key: str, seen: set[str]) -> None:
    """webdataset splits key/extension at the first dot, and keys become tar paths: refuse
    anything that would change meaning on read (dots, slashes) or merge two samples."""
    if not isinstance(key, str) or not _SAFE_KEY.fullmatch(key):
        raise ValueError(f"unsafe sample key {key!r}: use letters, digits, '_' and '-' only")
    if key in seen:
        raise ValueError(f"duplicate sample key {key!r}")
    seen.add(key)


def _encode(key: str, image: Image.Image | EncodedImage, caption: str, meta: dict, fmt: str) -> dict:
    if isinstance(image, EncodedImage):
        if image.ext not in _PIL_FORMATS:
            raise ValueError(f"EncodedImage.ext must be one of {sorted(_PIL_FORMATS)}, got {image.ext!r}")
        fmt, data = image.ext, image.data
    else:
        buf = io.BytesIO()
        if fmt in ("jpg", "jpeg") and image.mode not in ("RGB", "L"):
            image = image.convert("RGB")
        image.save(buf, format=_PIL_FORMATS[fmt])
        data = buf.getvalue()
    return {
        "__key__": key,
        fmt: data,
        "txt": caption.encode("utf-8"),
        "json": json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8"),
    }


class ShardWriter:
    """Writes ``out_dir/{prefix}-000000.tar``, ... with ``shard_size`` samples each (numbers
    ``digits`` wide): the one tar writer, for image-caption shards (:meth:`write`) and for ready
    samples such as latent-shard parts (:meth:`write_sample`).

    Each shard is written as ``*.tar.tmp`` and renamed when complete, so a crash never leaves a
    half-written ``*.tar`` that a reader would pick up. Tar mtimes are fixed for reproducible
    bytes. ``paths`` and ``sizes`` list the completed shards and their sample counts. As a context
    manager, an exception discards the shard being written."""

    def __init__(self, out_dir: Path, prefix: str, shard_size: int, image_format: str = "png", *, digits: int = 6):
        self.fmt = image_format.lower()
        if self.fmt not in _PIL_FORMATS:
            raise ValueError(f"image_format must be one of {sorted(_PIL_FORMATS)}, got {image_format!r}")
        if shard_size <= 0:
            raise ValueError(f"shard_size must be positive, got {shard_size}")
        self.out_dir, self.prefix, self.shard_size, self.digits = Path(out_dir), prefix, shard_size, digits
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.paths: list[Path] = []
        self.sizes: list[int] = []
        self.count = 0
        self._keys: set[str] = set()
        self._writer, self._stream, self._tmp, self._in_shard = None, None, None, 0

    def write(self, key: str, image: Image.Image | EncodedImage, caption: str, meta: dict) -> None:
        """One image-caption sample (img2dataset layout); refuses unsafe or repeated keys."""
        _check_key(key, self._keys)
        self.write_sample(_encode(key, image, caption, meta, self.fmt))

    def write_sample(self, sample: dict) -> None:
        """A ready sample: ``__key__`` and bytes per member extension, written as they are."""
        if self._writer is None:
            final = self.out_dir / f"{self.prefix}-{len(self.paths):0{self.digits}d}.tar"
            self._tmp = final.with_name(final.name + ".tmp")
            self._stream = open(self._tmp, "wb")
            self._writer = TarWriter(self._stream, encoder=False, mtime=0.0)
        self._writer.write(sample)
        self.count += 1
        self._in_shard += 1
        if self._in_shard == self.shard_size:
            self._finish()

    def _close_shard(self) -> None:
        self._writer.close()
        self._stream.close()
        self._writer, self._in_shard = None, 0

    def _finish(self) -> None:
        final, size = self._tmp.with_suffix(""), self._in_shard  # drop ".tmp"
        self._close_shard()
        os.replace(self._tmp, final)
        self.paths.append(final)
        self.sizes.append(size)

    def close(self) -> list[Path]:
        if self._writer is not None:
            self._finish()
        return self.paths

    def abort(self) -> None:
        """Discard the shard being written (completed shards stay)."""
        if self._writer is not None:
            self._close_shard()
            self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.abort() if exc_type is not None else self.close()


def write_shards(
    samples: Iterable[tuple[str, Image.Image | EncodedImage, str, dict]],
    out_dir: Path,
    prefix: str,
    shard_size: int,
    image_format: str = "png",
) -> list[Path]:
    """Write all ``(key, image, caption, meta)`` with a :class:`ShardWriter`; the shard paths."""
    with ShardWriter(out_dir, prefix, shard_size, image_format) as writer:
        for key, image, caption, meta in samples:
            writer.write(key, image, caption, meta)
    return writer.paths


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
    return gopen(url, "rb") if _is_remote(url) else open(url, "rb")


def split_member(name: str) -> tuple[str, str] | None:
    """``dir/000123.png`` -> (``dir/000123``, ``png``), splitting at the first dot like webdataset
    (so ``KEY.latent.safetensors`` has extension ``latent.safetensors``), the extension lowercased;
    None for a name without one (not a sample member). A leading ``./`` (``tar cf x.tar .``) is
    not part of the key."""
    while name.startswith("./"):
        name = name[2:]
    head, _, base = name.rpartition("/")
    if "." not in base:
        return None
    stem, ext = base.split(".", 1)
    return (f"{head}/{stem}" if head else stem), ext.lower()


def _close(stream: IO[bytes], check: bool) -> str | None:
    """A ``pipe:`` whose command failed (wrong URL, network) raises here: the error, as text. A
    consumer that stopped early is never an error, whatever the exit status of a command killed
    mid-write (webdataset ignores only SIGPIPE's 141)."""
    try:
        stream.close()
    except OSError as e:
        return str(e) if check else None
    return None


def _tar_groups(url: str, report: SkipReport) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield ``(key, {ext: bytes})`` per sample. A shard that breaks off (truncated, garbled, a
    failed command) yields what came before, counts the pending sample as ``unreadable_tar_member``
    (or the shard as ``unreadable_shard`` when nothing was read) and is named in the report."""
    key, group, error = None, {}, None
    try:
        stream = _open(url)
    except OSError as e:
        stream, error = None, f"cannot open: {e}"
    done = stream is None
    try:
        if stream is not None:
            tf = tarfile.open(fileobj=stream, mode="r|*", tarinfo=_EndTrackingTarInfo)
            for member in tf:
                parts = split_member(member.name) if member.isfile() else None
                if parts is None:
                    continue  # directories and extension-less files are not sample members
                if parts[0] != key and key is not None:
                    yield key, group
                    group = {}
                key = parts[0]
                group[parts[1]] = tf.extractfile(member).read()
            end = getattr(tf, "end_reason", "eof")
            error = None if end == "eof" else f"tar breaks off ({end})"
            done = True
    except (tarfile.TarError, OSError, EOFError) as e:
        error, done = f"not a readable tar ({type(e).__name__}: {e})", True
    finally:  # not done: the consumer stopped early (GeneratorExit)
        closed = _close(stream, check=done) if stream is not None else None
    error = error or (f"command failed: {closed}" if closed else None)
    if error:
        report.seen += 1
        reason = "unreadable_tar_member" if key is not None else "unreadable_shard"
        report.add(reason, key or "<tar header>", url)
        report.fail_shard(url, error)
    elif key is not None:
        yield key, group


def _decode(
    key: str, group: dict[str, bytes], resolution: int, min_size: int, crop: str, seed: int,
    buckets: list[tuple[int, int]] | None = None,
) -> tuple[str, dict | None]:
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
            target = assign(img.size, buckets) if buckets else (resolution, resolution)
            if min(img.size) < min_size or target is None:
                return "too_small", None
            box = crop_box(img.size, crop, sample_rng(seed, key) if crop == "random" else None, target)
            tensor = preprocess(img, target, box)
            size = img.size
    except Exception:  # PIL raises many types (OSError, SyntaxError, ValueError, bomb errors)
        return "corrupt_image", None
    sample = {"key": key, "image": tensor, "caption": caption, "meta": meta}
    extra = {"bucket": target} if buckets else {}
    return "", dict(sample, original_size=tuple(size), crop_box=box, **extra)


def iter_samples(
    spec: str,
    resolution: int,
    report: SkipReport,
    min_size: int = 0,
    *,
    crop: str = "center",
    seed: int = 0,
    allow_empty: bool = False,
    buckets: list[tuple[int, int]] | None = None,
) -> Iterator[dict]:
    """Yield ``{"key", "image" (CHW float [-1, 1]), "caption", "meta", "shard", "original_size"
    ((w, h) in pixels), "crop_box" ((left, top, right, bottom) in original pixels)}`` in shard order.

    Images whose shorter side is below ``min_size`` are skipped as ``too_small``; ``crop`` is
    ``center`` or ``random`` (seeded by ``seed`` and the key). With ``buckets`` (``(w, h)`` each, see
    :mod:`.buckets`) each image is cropped to its bucket instead of a ``resolution`` square, the
    sample says which (``"bucket"``), and an image that covers no bucket is ``too_small``. Bad
    samples are skipped and counted in ``report``, failed shards named in ``report.failed_shards``. Raises :class:`DataError` at
    the end when nothing at all was usable (training on zero samples is always a mistake), unless
    ``allow_empty`` (a caller reading one shard of many)."""
    for url in expand_shards(spec):
        for raw_key, group in _tar_groups(url, report):
            report.seen += 1
            key = safe_key(raw_key)
            reason, sample = _decode(key, group, resolution, min_size, crop, seed, buckets)
            if sample is None:
                report.add(reason, raw_key, url)
                continue
            report.kept += 1
            sample["shard"] = url
            yield sample
    if report.kept == 0 and not allow_empty:
        raise DataError(f"no usable samples in {spec}: {report.summary()}")
    if report.skipped:
        log.warning("%s: %s", spec, report.summary())


def load_images(
    spec: str, resolution: int, report: SkipReport, limit: int | None = None, **read
) -> tuple[torch.Tensor, list[str], list[str]]:
    """The whole (small) dataset in memory as uint8 NCHW (4x smaller than float), with captions
    and keys; for the VAE trainer and tests. ``read``: :func:`iter_samples`' options."""
    if limit is not None and limit <= 0:
        raise ValueError(f"limit must be positive or None, got {limit}")
    images, captions, keys = [], [], []
    samples = iter_samples(spec, resolution, report, **read)
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
