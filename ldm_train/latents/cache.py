"""The latent cache: ``encode`` writes it once, training reads only it.

Each sample of a latent shard holds
- ``KEY.latent.safetensors``: ``mean`` and ``std`` of the VAE posterior (unscaled, fp16), so
  training draws a fresh ``z ~ N(mean, std^2)`` every epoch (as EDM2 and PixArt do), and
  ``context``: the frozen text tower's per-token embedding of the caption (fp16);
- ``KEY.txt``: the caption; ``KEY.json``: the source shard's metadata plus the original size.

Tensors are stored with safetensors (no pickle). The folder also holds ``null_context.safetensors``
(the embedding of the empty caption, used for classifier-free guidance) and ``manifest.json``
(input shards, sample counts, skip report, VAE scaling, text tower).
"""
from __future__ import annotations

import json
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


def pack_sample(key: str, mean: torch.Tensor, std: torch.Tensor, context: torch.Tensor, caption: str, meta: dict) -> dict:
    tensors = {
        "mean": mean.to(torch.float16).contiguous().cpu(),
        "std": std.to(torch.float16).contiguous().cpu(),
        "context": context.to(torch.float16).contiguous().cpu(),
    }
    return {"__key__": key, LATENT_MEMBER: save(tensors), "txt": caption, "json": json.dumps(meta)}


def save_null_context(folder: Path, context: torch.Tensor) -> None:
    save_file({"context": context.to(torch.float16).contiguous().cpu()}, str(folder / NULL_CONTEXT))


def write_manifest(folder: Path, manifest: dict) -> None:
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    tmp.replace(folder / MANIFEST)


def read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not path.is_file():
        raise DataError(f"{folder} is not a latent cache (no {MANIFEST}); run `ldm-train encode` first")
    return json.loads(path.read_text())


@dataclass
class LatentData:
    """A latent split held in memory (fine for the emoji set; the data issue adds streaming)."""

    mean: torch.Tensor  # [N, C, h, w] fp16
    std: torch.Tensor  # [N, C, h, w] fp16
    context: torch.Tensor  # [N, L, D] fp16
    captions: list[str]
    keys: list[str]
    null_context: torch.Tensor  # [L, D] fp16
    manifest: dict

    def __len__(self) -> int:
        return len(self.keys)


def _all_shards(urls):
    return urls


def load_latents(folder: str | Path) -> LatentData:
    """Read every latent shard of a split folder written by ``encode``."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    shards = expand_shards(str(folder))
    means, stds, contexts, captions, keys = [], [], [], [], []
    # every rank reads the whole (small) split: an explicit identity node splitter says so
    for sample in wds.WebDataset(shards, shardshuffle=False, empty_check=False, nodesplitter=_all_shards):
        tensors = st_load(sample[LATENT_MEMBER])
        means.append(tensors["mean"])
        stds.append(tensors["std"])
        contexts.append(tensors["context"])
        captions.append(sample["txt"].decode("utf-8"))
        keys.append(sample["__key__"])
    if not keys:
        raise DataError(f"latent cache {folder} holds no samples")
    null = load_file(str(folder / NULL_CONTEXT))["context"]
    return LatentData(torch.stack(means), torch.stack(stds), torch.stack(contexts), captions, keys, null, manifest)
