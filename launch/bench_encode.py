#!/usr/bin/env python
"""Encode throughput: the full ``encode`` path against the autoencoder's own encode speed.

A benchmark, not a test. In one run, on one device, on the same images:

- ``vae only``: ``encode_posterior`` on pre-decoded tensors already on the device (the ceiling);
- ``text only``: the text tower on the captions (part of the full path, shown for attribution);
- ``bare vae + text``: both bare models, one after the other (their times added): the ceiling of
  the full path, which runs both;
- ``full encode``: ``ldm_train.latents.encode.encode_split`` from image-caption shards (tar
  reading, image decoding, resize/crop, VAE, text tower, fp16 packing, writing latent shards).

The ratio full / bare says how much of the bare models' speed the pipeline keeps (1.0 = data
handling fully hidden; the goal on a GPU is 0.9); full / vae-only is kept for older results.
``--sd15``: Stable Diffusion 1.5's models at random init: its VAE (configs/sd15.yaml) and CLIP
ViT-L/14's text tower (a transformers CLIPTextModel, 77 tokens), as ``text.encoder:
transformers`` loads it. Prints a table and writes JSON (``--json``).

Examples::

    python launch/bench_encode.py                                  # CPU, demo VAE, 64 px (~1 min)
    python launch/bench_encode.py --device cuda --vae sd --res 256 --n 4096 --batch 64 --dtype bf16
    python launch/bench_encode.py --sd15 --res 512 --n 16 --batch 8                  # CPU, SD 1.5 models
    python launch/bench_encode.py --device cuda --sd15 --res 512 --n 2048 --batch 64 --dtype bf16
    python launch/bench_encode.py --device cuda --vae-path /models/sd-vae --res 512 --dtype bf16
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench_common import SD15_CONFIG, run_and_report, sd15_text_encoder, sync
from ldm_train.autoencoder.vae import DTYPES, build_vae, encode_posterior, load_vae
from ldm_train.config import AutoencoderConfig, LatentsConfig, TextConfig, load_config
from ldm_train.data.shards import preprocess, write_shards
from ldm_train.latents.encode import Encoders, encode_split
from ldm_train.text import prepare_text


def _parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--vae", choices=["demo", "sd"], default="demo",
                   help="demo: the project's default VAE; sd: SD's architecture (configs/sd15.yaml), random init")
    p.add_argument("--vae-path", default=None, help="a diffusers AutoencoderKL folder instead of --vae")
    p.add_argument("--text", choices=["demo", "sd15"], default="demo",
                   help="demo: the project's default open_clip tower; sd15: CLIP ViT-L/14 (transformers), random init")
    p.add_argument("--sd15", action="store_true", help="Stable Diffusion 1.5's models: --vae sd --text sd15")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="autoencoder dtype")
    p.add_argument("--res", type=int, default=64, help="training resolution (images are stored 25%% larger, so resized)")
    p.add_argument("--n", type=int, default=512, help="images")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--shard-size", type=int, default=128, help="images per input shard")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.sd15:
        args.vae, args.text = "sd", "sd15"
    return args


def _images(n: int, size: int, seed: int = 0):
    """Smooth random colour fields as JPEG-like content (decoding cost close to photos')."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC)
        yield f"b{i:06d}", image, f"random field number {i}", {"i": i}


def _timed(fn, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def run(args: argparse.Namespace, tmp: Path) -> dict:
    device = torch.device(args.device)
    src_res = args.res * 5 // 4
    samples = list(_images(args.n, src_res))
    write_shards(samples, tmp / "src", "src", args.shard_size, image_format="jpg")
    if args.vae_path:
        vae = load_vae(args.vae_path, args.dtype).to(device)
    else:
        torch.manual_seed(0)
        vae_cfg = load_config(SD15_CONFIG).autoencoder if args.vae == "sd" else AutoencoderConfig()
        vae = build_vae(vae_cfg).to(device, DTYPES[args.dtype]).eval()
    text = (sd15_text_encoder(tmp / "tokenizer") if args.text == "sd15" else prepare_text(TextConfig(pretrained=None), tmp / "text")).to(device)
    pixels = torch.stack([preprocess(im, args.res) for _, im, _, _ in samples]).to(device)
    captions = [c for _, _, c, _ in samples]
    batches = range(0, args.n, args.batch)
    encode_posterior(vae, pixels[: args.batch])  # warm-up (kernels, allocator)
    text(captions[: args.batch])
    vae_s = _timed(lambda: [encode_posterior(vae, pixels[i : i + args.batch]) for i in batches], device)
    text_s = _timed(lambda: [text(captions[i : i + args.batch]) for i in batches], device)
    enc = Encoders(vae, text, LatentsConfig(batch_size=args.batch, shard_size=args.shard_size), args.res, device)
    full_s = _timed(lambda: encode_split(str(tmp / "src"), tmp / "out", enc, progress=False), device)
    written = json.loads((tmp / "out" / "manifest.json").read_text())["samples_written"]
    assert written == args.n, f"encode wrote {written} of {args.n}"
    params = sum(p.numel() for p in vae.parameters())
    return {
        "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch_threads": torch.get_num_threads(), "vae": args.vae_path or args.vae, "vae_params": params,
        "text": f"{args.text} ({text.name})", "text_params": sum(p.numel() for p in text.parameters()),
        "dtype": args.dtype, "res": args.res, "source_res": src_res, "n": args.n, "batch": args.batch,
        "vae_only_img_per_s": args.n / vae_s, "text_only_img_per_s": args.n / text_s,
        "bare_img_per_s": args.n / (vae_s + text_s), "full_encode_img_per_s": args.n / full_s,
        "ratio_full_to_vae": vae_s / full_s, "ratio_full_to_bare": (vae_s + text_s) / full_s,
        "seconds": {"vae_only": vae_s, "text_only": text_s, "full_encode": full_s},
    }


def table(r: dict) -> str:
    rows = [("vae only (pre-decoded tensors)", r["vae_only_img_per_s"]), ("text tower only", r["text_only_img_per_s"]),
            ("bare vae + text (sum of times)", r["bare_img_per_s"]),
            ("full encode (shards -> latent shards)", r["full_encode_img_per_s"])]
    head = (f"encode benchmark: {r['device_name']}, {r['vae']} VAE ({r['vae_params'] / 1e6:.1f} M params, {r['dtype']}), "
            f"text {r['text']} ({r['text_params'] / 1e6:.1f} M params, fp32), "
            f"{r['n']} images {r['source_res']} px -> {r['res']} px, batch {r['batch']}")
    lines = [head, f"{'path':<40}{'img/s':>10}"] + [f"{name:<40}{v:>10.2f}" for name, v in rows]
    lines.append(f"{'ratio full / bare vae + text':<40}{r['ratio_full_to_bare']:>10.3f}")
    lines.append(f"{'ratio full / vae only':<40}{r['ratio_full_to_vae']:>10.3f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    return run_and_report(run, table, _parse(argv), prefix="bench_encode_")


if __name__ == "__main__":
    raise SystemExit(main())
