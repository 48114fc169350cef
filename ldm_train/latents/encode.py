"""``encode``: image-caption shards -> latent shards (VAE posterior + text embeddings).

A split is written into ``<out>.partial/`` and renamed to ``<out>/`` only when complete, so a
crash never leaves a half cache that training would silently read. Per-shard resumption and
multi-rank encoding come with the data-at-scale issue.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch
import webdataset as wds
from diffusers import AutoencoderKL
from tqdm import tqdm

from ..autoencoder.vae import encode_posterior, latent_scale
from ..data.shards import SkipReport, expand_shards, iter_samples
from ..text.encoder import TextEncoder
from ..utils.runs import OutputExistsError
from .cache import pack_sample, save_null_context, write_manifest


def _batches(samples, size: int):
    batch = []
    for s in samples:
        batch.append(s)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def encode_split(
    spec: str,
    out_dir: Path,
    vae: AutoencoderKL,
    text: TextEncoder,
    resolution: int,
    shard_size: int,
    batch_size: int,
    device: torch.device,
    overwrite: bool = False,
) -> dict:
    """Encode every sample of the shards in ``spec``; returns the manifest written to ``out_dir``."""
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise OutputExistsError(f"latent cache {out_dir} already exists; pass --overwrite to re-encode")
        shutil.rmtree(out_dir)
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    shards = expand_shards(spec)
    report = SkipReport()
    t0, written = time.time(), 0
    bar = tqdm(desc=f"encode {out_dir.name}", unit="img", dynamic_ncols=True)
    with wds.ShardWriter(str(partial / "latents-%06d.tar"), maxcount=shard_size, verbose=0) as sink:
        for batch in _batches(iter_samples(spec, resolution, report), batch_size):
            images = torch.stack([s["image"] for s in batch]).to(device)
            mean, std = encode_posterior(vae, images)
            context = text([s["caption"] for s in batch])
            for i, s in enumerate(batch):
                meta = dict(s["meta"], source_shard=s["shard"])
                sink.write(pack_sample(s["key"], mean[i], std[i], context[i], s["caption"], meta))
            written += len(batch)
            bar.update(len(batch))
    bar.close()
    save_null_context(partial, text([""])[0])
    scale, shift = latent_scale(vae)
    manifest = {
        "input_shards": shards,
        "samples_written": written,
        "report": report.as_dict(),
        "resolution": resolution,
        "latent_shape": list(mean.shape[1:]),
        "scaling_factor": scale,
        "shift_factor": shift,
        "text_encoder": text.name,
        "context_shape": [text.context_length, text.width],
        "seconds": time.time() - t0,
    }
    write_manifest(partial, manifest)
    partial.rename(out_dir)
    return manifest
