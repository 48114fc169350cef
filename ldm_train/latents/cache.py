"""The latent cache: ``encode`` writes it once, training reads only it.

Each sample of a latent shard holds
- ``KEY.latent.safetensors``: ``mean`` and ``std`` of the VAE posterior (unscaled, fp16 or bf16:
  ``latents.dtype``), so training draws a fresh ``z ~ N(mean, std^2)`` every epoch (as EDM2 and
  PixArt do), or with ``latents.store: sample`` one fixed draw ``sample`` instead (half the bytes;
  readers return it as ``mean`` with ``std = 0``); and ``context``, the frozen text tower's
  per-token embedding of the caption, or with ``latents.text: tokens`` only its ``tokens`` (int32);
  with SDXL's towers also ``pooled`` (the pooled text embedding) and ``time_ids`` (float32, the
  six size/crop ids of :mod:`.micro`);
- ``KEY.txt``: the caption; ``KEY.json``: the source shard's metadata, ``source_shard``, and
  ``original_size`` / ``crop_box`` where the reader provides them.

Tensors are stored with safetensors (no pickle). The folder also holds ``null_context.safetensors``
(the embedding of the empty caption, used for classifier-free guidance, with SDXL its ``pooled`` too) and ``manifest.json``
(input shards, sample counts, skip report, VAE scaling, text tower).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import webdataset as wds
from safetensors.torch import load as st_load
from safetensors.torch import load_file, save, save_file

from ..data.shards import DataError, expand_shards

LATENT_MEMBER = "latent.safetensors"
NULL_CONTEXT = "null_context.safetensors"
MANIFEST = "manifest.json"


DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def pack_sample(key: str, tensors: dict[str, torch.Tensor], caption: str, meta: dict) -> dict:
    """One latent-shard sample; ``tensors`` already in their stored dtype (see module doc). Every
    member is bytes (UTF-8 text, as webdataset's encoder would make it), so
    :meth:`ShardWriter.write_sample <ldm_train.data.shards.ShardWriter.write_sample>` writes it as is."""
    stored = {k: v.contiguous().cpu() for k, v in tensors.items()}
    return {"__key__": key, LATENT_MEMBER: save(stored), "txt": caption.encode("utf-8"),
            "json": json.dumps(meta).encode("utf-8")}


def save_null_context(folder: Path, context: torch.Tensor, dtype: torch.dtype = torch.float16,
                      pooled: torch.Tensor | None = None) -> None:
    """The empty caption's embedding (or, as int32, its tokens), and SDXL's pooled one, written atomically."""
    value = context.contiguous().cpu() if not context.is_floating_point() else context.to(dtype).contiguous().cpu()
    tensors = {"context": value} | ({"pooled": pooled.to(dtype).contiguous().cpu()} if pooled is not None else {})
    tmp = folder / f"{NULL_CONTEXT}.{os.getpid()}.tmp"
    save_file(tensors, str(tmp))
    os.replace(tmp, folder / NULL_CONTEXT)


def write_json_atomic(path: Path, data: dict) -> None:
    """Write-then-rename with a per-process temporary name, so concurrent writers (ranks) never
    interleave bytes and a reader sees the old file or the new one, never half of one."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def write_manifest(folder: Path, manifest: dict) -> None:
    write_json_atomic(folder / MANIFEST, manifest)


def unpack_tensors(payload: bytes) -> dict[str, torch.Tensor]:
    """``mean``/``std`` (a stored fixed ``sample`` becomes mean with std 0) and ``context`` or
    ``tokens``, whichever the cache holds."""
    tensors = st_load(payload)
    if "sample" in tensors:
        sample = tensors.pop("sample")
        tensors["mean"], tensors["std"] = sample, torch.zeros_like(sample)
    return tensors


def read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not path.is_file():
        raise DataError(f"{folder} is not a latent cache (no {MANIFEST}); run `ldm-train encode` first")
    return json.loads(path.read_text())


@dataclass
class LatentData:
    """A latent split held in memory (``train.data_source=memory``: fine for small sets like the
    emoji one); large caches are streamed instead by :class:`ldm_train.latents.loader.LatentLoader`
    (``train.data_source=stream``)."""

    mean: torch.Tensor  # [N, C, h, w] fp16
    std: torch.Tensor  # [N, C, h, w] fp16
    context: torch.Tensor | None  # [N, L, D] fp16; None when the cache holds tokens only
    captions: list[str]
    keys: list[str]
    null_context: torch.Tensor  # [L, D] fp16 ([L] int32 tokens when the cache holds tokens)
    manifest: dict
    tokens: torch.Tensor | None = None  # [N, L] int32 with ``latents.text: tokens``
    pooled: torch.Tensor | None = None  # [N, P] with SDXL's towers
    time_ids: torch.Tensor | None = None  # [N, 6] float32 with SDXL's towers
    null_pooled: torch.Tensor | None = None  # [P] with SDXL's towers

    def __len__(self) -> int:
        return len(self.keys)


def _all_shards(urls):
    return urls


def load_latent_buckets(folder: str | Path) -> list[LatentData]:
    """A split held in memory as one :class:`LatentData` per latent shape: per bucket (in the
    manifest's order, empty ones left out) for a cache encoded with ``data.buckets``, else one."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if not manifest.get("buckets"):
        return [load_latents(folder)]
    parts = []
    for bucket in manifest["buckets"]:
        names = [str(folder / o["name"]) for o in manifest["output_shards"] if o.get("bucket") == bucket and o["samples"]]
        if names:
            parts.append(load_latents(folder, names))
    return parts


def load_latents(folder: str | Path, shards: list[str] | None = None) -> LatentData:
    """Read every latent shard of a split folder written by ``encode`` (or only ``shards``)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    shards = shards if shards is not None else expand_shards(str(folder))
    means, stds, contexts, tokens, captions, keys = [], [], [], [], [], []
    extras: dict[str, list] = {"pooled": [], "time_ids": []}
    # every rank reads the whole (small) split: an explicit identity node splitter says so
    for sample in wds.WebDataset(shards, shardshuffle=False, empty_check=False, nodesplitter=_all_shards):
        tensors = unpack_tensors(sample[LATENT_MEMBER])
        means.append(tensors["mean"])
        stds.append(tensors["std"])
        (contexts if "context" in tensors else tokens).append(tensors.get("context", tensors.get("tokens")))
        for name, values in extras.items():
            if name in tensors:
                values.append(tensors[name])
        captions.append(sample["txt"].decode("utf-8"))
        keys.append(sample["__key__"])
    if not keys:
        raise DataError(f"latent cache {folder} holds no samples")
    if len({m.shape for m in means}) > 1:
        shapes = ", ".join(sorted(manifest.get("bucket_samples", {})))
        raise DataError(f"latent cache {folder} holds latents of several shapes (data.buckets: {shapes}); "
                        "it is read one bucket at a time (load_latent_buckets, or the streaming loader)")
    nulls = load_file(str(folder / NULL_CONTEXT))
    context = torch.stack(contexts) if contexts else None
    token_ids = torch.stack(tokens) if tokens else None
    stacked = {k: torch.stack(v) if v else None for k, v in extras.items()}
    return LatentData(torch.stack(means), torch.stack(stds), context, captions, keys, nulls["context"], manifest,
                      token_ids, **stacked, null_pooled=nulls.get("pooled"))
