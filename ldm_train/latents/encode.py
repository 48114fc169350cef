"""``encode``: image-caption shards -> latent shards (VAE posterior + text embedding or tokens).

At scale: every rank of every node (``RANK``/``WORLD_SIZE`` from the launcher) takes input shards
``i`` with ``i % world_size == rank`` and writes ``latents-IIIIII-PPP.tar`` (input shard ``I``,
part ``P`` of at most ``latents.shard_size`` samples), each under ``*.tar.tmp`` and renamed when
complete; then a done-file for the input shard (see :mod:`.ledger`). Rerunning the same command
after a crash skips done input shards and re-encodes the others from scratch (their partial parts
are deleted first), so no sample is lost or duplicated. The last rank to finish writes
``manifest.json`` (the "complete" mark training reads).

Batches never cross input shards, so a shard's tensors are bit-identical whichever rank encodes
it, in whatever order, in however many runs.
"""
from __future__ import annotations

import hashlib
import json
import math
import queue
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from diffusers import AutoencoderKL
from tqdm import tqdm

from ..autoencoder.vae import encode_posterior, latent_scale
from ..config import LatentsConfig
from ..data.buckets import bucket_name, check_multiple
from ..data.shards import DataError, ShardWriter, SkipReport, check_failed_shards, expand_shards, iter_samples
from ..text.encoder import TextEncoder
from ..utils.hashing import tensor_hash
from ..utils.runs import OutputExistsError
from . import ledger
from .cache import DTYPES, pack_sample, save_null_context, write_manifest
from .micro import batch_time_ids
from .ranks import RankGroup, Ranks


@dataclass
class Encoders:
    """The models and settings that turn a batch of decoded samples into latent-shard samples."""

    vae: AutoencoderKL
    text: TextEncoder
    cfg: LatentsConfig
    resolution: int
    device: torch.device
    seed: int = 0  # for ``latents.store: sample``
    read_kwargs: dict = field(default_factory=dict)  # iter_samples options (DataConfig.read_options)
    tolerate_failed: bool = False  # data.tolerate_failed_shards

    @property
    def buckets(self) -> list[tuple[int, int]] | None:
        """``data.buckets`` resolved (``(w, h)`` each), or None: squares at ``resolution``."""
        return self.read_kwargs.get("buckets")

    @property
    def down(self) -> int:
        """The autoencoder's downsampling factor: pixels per latent cell along each side."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def latent_shape(self, size: tuple[int, int] | None = None) -> list[int]:
        """(C, h, w) of the latent of a ``size`` = (width, height) image (None: the square)."""
        w, h = size if size is not None else (self.resolution, self.resolution)
        return [self.vae.config.latent_channels, h // self.down, w // self.down]

    def check_buckets(self) -> None:
        """Bucket sides must be multiples of 8 x the downsampling factor: the latent then halves
        cleanly through a U-Net of up to 4 levels (SD's), whatever its shape."""
        if self.buckets:
            check_multiple(self.buckets, 8 * self.down, f"8 x the autoencoder's downsampling factor {self.down}")

    @property
    def pooled(self) -> bool:
        """SDXL's towers: the pooled embedding and the size/crop ids are stored too."""
        return hasattr(self.text, "encode_with_pooled")

    def context_shape(self) -> list[int]:
        return [self.text.context_length] + ([self.text.width] if self.cfg.text == "embedding" else [])

    def _noise(self, key: str, shape: torch.Size) -> torch.Tensor:
        """A fixed draw per (seed, key): the same latent whichever rank or run encodes it."""
        seed = int.from_bytes(hashlib.sha256(f"{self.seed}:{key}".encode()).digest()[:8], "little")
        return torch.randn(shape, generator=torch.Generator().manual_seed(seed))

    def encode(self, batch: list[dict]) -> list[dict[str, torch.Tensor]]:
        images = torch.stack([s["image"] for s in batch]).to(self.device)
        mean, std = encode_posterior(self.vae, images)
        dtype = DTYPES[self.cfg.dtype]
        captions = [s["caption"] for s in batch]
        if self.pooled:
            if self.cfg.text != "embedding":
                raise DataError("latents.text: tokens is not supported with text.encoder: sdxl; use embedding")
            context, pooled = self.text.encode_with_pooled(captions)
            factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
            target = (mean.shape[-2] * factor, mean.shape[-1] * factor)  # per sample's latent: per bucket too
            text = {"context": context.to(dtype).cpu(), "pooled": pooled.to(dtype).cpu(),
                    "time_ids": batch_time_ids(batch, target)}
        elif self.cfg.text == "embedding":
            text = {"context": self.text(captions).to(dtype).cpu()}
        else:
            text = {"tokens": self.text.tokenize(captions).to(torch.int32)}
        out = []
        for i, s in enumerate(batch):
            if self.cfg.store == "sample":
                z = mean[i].float() + std[i].float() * self._noise(s["key"], mean.shape[1:]).to(mean.device)
                tensors = {"sample": z.to(dtype).cpu()}
            else:
                tensors = {"mean": mean[i].to(dtype).cpu(), "std": std[i].to(dtype).cpu()}
            out.append({**tensors, **{k: v[i] for k, v in text.items()}})
        return out

    def null_pooled(self) -> torch.Tensor | None:
        return self.text.encode_with_pooled([""])[1][0] if self.pooled else None

    def null_context(self) -> torch.Tensor:
        if self.cfg.text == "embedding":
            return self.text([""])[0]
        return self.text.tokenize([""])[0].to(torch.int32)


def fingerprint(enc: Encoders, input_shards: list[str], vae_path: str | None) -> dict:
    """What an output folder's latents depend on; a resumed run must match (see ledger)."""
    return {
        "autoencoder.path": vae_path,
        "autoencoder.config_hash": ledger.config_hash(dict(enc.vae.config)),
        "autoencoder.weights_hash": tensor_hash(enc.vae),
        "autoencoder.dtype": str(enc.vae.dtype),
        "resolution": enc.resolution,
        "text_encoder": enc.text.name,
        "text_encoder.weights_hash": tensor_hash(enc.text.weights_module),
        "latents.dtype": enc.cfg.dtype,
        "latents.store": enc.cfg.store,
        "latents.text": enc.cfg.text,
        "run.seed": enc.seed if enc.cfg.store == "sample" else None,
        # as JSON has it (bucket tuples -> lists), so a resumed run compares equal to the file
        "preprocessing": json.loads(json.dumps({k: v for k, v in sorted(enc.read_kwargs.items())})),
        "input_shards": input_shards,
    }


def _batches(samples: Iterator[dict], size: int) -> Iterator[list[dict]]:
    """Batches of ``size`` samples of one shape: one pending batch per bucket (``"bucket"``; one
    for all without buckets), each yielded when full, the rest at the end in order of first use.
    A pure function of the input shard, so its tensors do not depend on who encodes it."""
    pending: dict = {}
    for s in samples:
        batch = pending.setdefault(s.get("bucket"), [])
        batch.append(s)
        if len(batch) == size:
            yield batch
            pending[s.get("bucket")] = []
    yield from (batch for batch in pending.values() if batch)


def background(items: Iterator, depth: int = 2) -> Iterator:
    """``items`` produced by a thread, up to ``depth`` ahead, in order. Reading, PIL decoding and
    resizing release the GIL, so they overlap the autoencoder instead of leaving the GPU idle."""
    out: queue.Queue = queue.Queue(depth)
    stop = threading.Event()

    def put(message) -> bool:
        while not stop.is_set():  # a consumer that stopped early must not leave us blocked
            try:
                out.put(message, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(("item", item)):
                    return
            put(("end", None))
        except BaseException as e:  # re-raised in the consumer, with its traceback
            put(("end", e))

    thread = threading.Thread(target=produce, name="encode-reader", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = out.get()
            if kind == "end":
                if value is not None:
                    raise value
                return
            yield value
    finally:
        stop.set()
        thread.join()


class PartWriters:
    """Writes the ``latents-IIIIII-PPP.tar`` parts of input shard ``index`` (with buckets:
    ``latents-IIIIII-WxH-PPP.tar``, one series per bucket, so a part holds one shape), each
    renamed from ``.tmp`` when full (the shared :class:`ShardWriter`, 3-digit part numbers)."""

    def __init__(self, out: Path, index: int, max_count: int):
        self.out, self.index, self.max_count = out, index, max_count
        self.writers: dict[tuple[int, int] | None, ShardWriter] = {}

    def write(self, bucket: tuple[int, int] | None, sample: dict) -> None:
        if bucket not in self.writers:
            tag = "" if bucket is None else f"-{bucket_name(bucket)}"
            self.writers[bucket] = ShardWriter(self.out, f"latents-{self.index:06d}{tag}", self.max_count, digits=3)
        self.writers[bucket].write_sample(sample)

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()

    def abort(self) -> None:
        for writer in self.writers.values():
            writer.abort()

    def outputs(self) -> list[dict]:
        """The parts for the done entry and manifest: ``[{"name", "samples"}]`` (+ ``"bucket":
        [w, h]`` with buckets)."""
        out = []
        for bucket, writer in self.writers.items():
            extra = {} if bucket is None else {"bucket": list(bucket)}
            out += [{"name": path.name, "samples": n, **extra} for path, n in zip(writer.paths, writer.sizes)]
        return out


def remove_outputs(out: Path, index: int) -> None:
    """Parts of input shard ``index`` left by an interrupted run (finished or not)."""
    for path in out.glob(f"latents-{index:06d}-*.tar*"):
        path.unlink()


def _failure(report: SkipReport, error: str | None) -> str | None:
    """Why an input shard failed (could not be opened, or broke off: the reader names it), or
    None. Samples read before a break are kept; the shard is retried by the next run unless
    failures are tolerated."""
    if report.failed_shards:
        return "; ".join(report.shard_errors.get(u, "unreadable") for u in report.failed_shards)
    return error


class Progress:
    """tqdm over samples; the total is estimated from the shards done so far, for an ETA."""

    def __init__(self, desc: str, n_shards: int, enabled: bool):
        self.n_shards, self.done_shards, self.samples = n_shards, 0, 0
        self.bar = tqdm(desc=desc, unit="img", dynamic_ncols=True, disable=not enabled, file=sys.stderr)

    def update(self, n: int) -> None:
        self.samples += n
        self.bar.update(n)

    def shard_done(self) -> None:
        self.done_shards += 1
        self.bar.total = round(self.samples / self.done_shards * self.n_shards)
        self.bar.set_postfix_str(f"shards {self.done_shards}/{self.n_shards}", refresh=True)

    def close(self) -> None:
        self.bar.close()


def encode_input_shard(index: int, url: str, out: Path, enc: Encoders, progress: Progress) -> dict:
    """Encode one input shard into its parts and record it as done (or failed)."""
    remove_outputs(out, index)
    report, error, t0 = SkipReport(), None, time.time()
    writer = PartWriters(out, index, enc.cfg.shard_size)
    try:
        samples = iter_samples(url, enc.resolution, report, allow_empty=True, **enc.read_kwargs)
        for batch in background(_batches(samples, enc.cfg.batch_size)):
            for s, tensors in zip(batch, enc.encode(batch)):
                meta = dict(s["meta"], source_shard=url)
                meta.update({k: list(s[k]) for k in ("original_size", "crop_box") if s.get(k) is not None})
                meta.update({"bucket": list(s["bucket"])} if "bucket" in s else {})
                writer.write(s.get("bucket"), pack_sample(s["key"], tensors, s["caption"], meta))
            progress.update(len(batch))
    except DataError as e:  # e.g. a local shard that does not exist
        error = str(e)
    except BaseException:  # the next run re-encodes this input shard from scratch
        writer.abort()
        remove_outputs(out, index)
        raise
    reason = _failure(report, error)
    writer.close()
    entry = {
        "index": index, "shard": url, "status": "ok" if reason is None else "failed", "error": reason,
        "outputs": writer.outputs(), "report": report.as_dict(), "seconds": round(time.time() - t0, 3),
    }
    ledger.write_done(out, index, entry)
    progress.shard_done()
    return entry


def _prepare(out: Path, fp: dict, overwrite: bool, n_inputs: int) -> None:
    """Rank 0, before any rank writes: start over, refuse, or resume."""
    legacy = out.with_name(out.name + ".partial")  # the former whole-folder design's leftovers
    if legacy.is_dir():
        shutil.rmtree(legacy)
    if out.exists() and overwrite:
        shutil.rmtree(out)
    elif ledger.is_complete(out):
        raise OutputExistsError(f"latent cache {out} already exists (complete); pass --overwrite to re-encode")
    elif out.exists() and any(out.iterdir()) and not ledger.progress_dir(out).is_dir():
        raise OutputExistsError(f"{out} holds files but no encode progress; pass --overwrite to replace it")
    out.mkdir(parents=True, exist_ok=True)
    ledger.check_fingerprint(out, fp)
    ledger.forget_failed(out, n_inputs)


def summary_line(name: str, manifest: dict) -> str:
    r = manifest["report"]
    skipped = ", ".join(f"{k}={v}" for k, v in r.get("skipped", {}).items()) or "none"
    failed = ", ".join(f["shard"] for f in manifest["failed_shards"]) or "none"
    buckets = ", ".join(f"{k}={v}" for k, v in manifest.get("bucket_samples", {}).items())
    return (f"encode {name}: samples in {r.get('seen', 0)}, written {manifest['samples_written']}"
            f"{f' (per bucket: {buckets})' if buckets else ''}, skipped: {skipped}; failed shards: {failed}")


def _finish(out: Path, entries: list[dict], shards: list[str], enc: Encoders) -> dict:
    scale, shift = latent_scale(enc.vae)
    manifest = {
        **ledger.merge_entries(entries, shards),
        "resolution": enc.resolution,
        **_bucket_fields(enc),
        "scaling_factor": scale,
        "shift_factor": shift,
        "text_encoder": enc.text.name,
        "context_shape": enc.context_shape(),
        **({"pooled_width": enc.text.pooled_width, "time_ids": True} if enc.pooled else {}),
        "dtype": enc.cfg.dtype,
        "store": enc.cfg.store,
        "text": enc.cfg.text,
        "complete": True,
    }
    print(summary_line(out.name, manifest), file=sys.stderr)
    # not tolerated: no manifest, so the folder stays incomplete and a rerun retries these shards
    check_failed_shards([f["shard"] for f in manifest["failed_shards"]], enc.tolerate_failed,
                        f"encode {out} (finished shards are kept; rerunning retries the failed ones)")
    if manifest["samples_written"] == 0:
        raise DataError(f"no usable samples in {', '.join(shards[:3])}{' ...' if len(shards) > 3 else ''}")
    save_null_context(out, enc.null_context(), DTYPES[enc.cfg.dtype], enc.null_pooled())
    write_manifest(out, manifest)
    return manifest


def _bucket_fields(enc: Encoders) -> dict:
    """``latent_shape`` (with buckets: the bucket nearest to square, the default sampling size),
    and with buckets the list (``buckets``) and each one's latent shape."""
    if not enc.buckets:
        return {"latent_shape": enc.latent_shape(), "buckets": None}
    square = min(enc.buckets, key=lambda b: (abs(math.log(b[0] / b[1])), -b[0] * b[1]))
    return {"latent_shape": enc.latent_shape(square), "buckets": [list(b) for b in enc.buckets],
            "bucket_latent_shapes": {bucket_name(b): enc.latent_shape(b) for b in enc.buckets}}


def encode_split(
    spec: str, out_dir: Path, enc: Encoders, overwrite: bool = False, *,
    group: RankGroup | None = None, vae_path: str | None = None, progress: bool = True,
) -> dict:
    """Encode this rank's share of ``spec`` into ``out_dir``. Returns the manifest (``complete``:
    true) when this rank finished the folder, else ``complete: false`` with this rank's counts."""
    group = group if group is not None else RankGroup(Ranks())
    enc.check_buckets()
    rank, world = group.ranks.rank, group.ranks.world_size
    shards = expand_shards(spec)
    fp = fingerprint(enc, shards, vae_path)
    group.rank0_first(lambda: _prepare(out_dir, fp, overwrite, len(shards)))
    mine = [i for i in range(rank, len(shards), world) if (ledger.read_done(out_dir, i) or {}).get("status") != "ok"]
    desc = f"encode {out_dir.name}" + (f" [rank {rank}/{world}]" if world > 1 else "")
    bar = Progress(desc, len(mine), progress)
    try:
        entries = [encode_input_shard(i, shards[i], out_dir, enc, bar) for i in mine]
    finally:
        bar.close()
    everything = ledger.all_done(out_dir, len(shards))
    if everything is None:  # another rank is still at work; the last one to finish merges
        return {"complete": False, "rank": rank, **ledger.merge_entries(entries, [shards[i] for i in mine])}
    return _finish(out_dir, everything, shards, enc)
