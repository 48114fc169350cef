#!/usr/bin/env python
"""Latent-loader throughput against the training step rate it has to feed.

A benchmark, not a test. For each U-Net config (``tiny`` = the project's default model and
latents, 64 px; ``sd15`` = Stable Diffusion 1.5's U-Net from configs/sd15.yaml, 860 M parameters,
256 px latents and 77 x 768 CLIP contexts; or a config file's path: its model section at the sd15
sizes) it

1. writes a synthetic latent cache of that config's shapes (fp16 mean, std, context);
2. measures :class:`ldm_train.latents.loader.LatentLoader` with each worker count in
   ``--workers`` (samples/s in total and per worker, after the first batch);
3. measures the training step rate of the U-Net on ``--device`` (forward, MSE, backward, SGD
   step: AdamW's extra state would make the step slower, so this errs towards a faster step);
4. prints samples needed per second (batch x steps/s) and the ratio loader / needed
   (>= 1: the loader keeps up; the issue's target is >= 10 with the workers a node has).

Examples::

    python launch/bench_loader.py                                  # CPU, about 1-2 minutes
    python launch/bench_loader.py --device cuda --workers 0,4,8,16 --sd15-batch 64 --sd15-steps 10 --sd15-warmup 2
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from webdataset import TarWriter

from bench_common import SD15_CONFIG, preset, preset_arg, run_and_report, sync
from ldm_train.config import ModelConfig
from ldm_train.latents.cache import pack_sample, write_manifest
from ldm_train.latents.loader import LatentLoader
from ldm_train.model.unet import build_unet

# Latents [in_channels, res, res], contexts [context_len, cross_attention_dim].
CONFIGS = {
    "tiny": dict(model={}, res=16, context_len=32),  # the defaults
    "sd15": dict(model=SD15_CONFIG, res=32, context_len=77),
}


def _parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--configs", type=preset_arg(CONFIGS, many=True), default="tiny,sd15",
                   help="comma list of tiny, sd15 or config files (default: %(default)s)")
    p.add_argument("--workers", default="0,1,2", help="comma-separated worker counts")
    p.add_argument("--samples", type=int, default=2048, help="samples in each synthetic cache")
    p.add_argument("--shard-size", type=int, default=256)
    p.add_argument("--seconds", type=float, default=4.0, help="loader measuring time per worker count")
    p.add_argument("--tiny-batch", type=int, default=32)
    p.add_argument("--sd15-batch", type=int, default=1, help="SD 1.5 training batch (CPU default 1; 64 on a GPU)")
    p.add_argument("--steps", type=int, default=3, help="timed training steps of tiny (after one warm-up)")
    p.add_argument("--sd15-steps", type=int, default=1, help="timed training steps of sd15 (~45 s each on 2 CPU cores)")
    p.add_argument("--sd15-warmup", type=int, default=0, help="untimed sd15 steps first (use 1+ on a GPU)")
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


def write_cache(folder: Path, n: int, shard_size: int, latent: list[int], context: list[int]) -> None:
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    outputs = []
    for s in range(0, n, shard_size):
        name = f"latents-{s // shard_size:06d}-000.tar"
        with open(folder / name, "wb") as stream, TarWriter(stream) as sink:
            for i in range(s, min(s + shard_size, n)):
                t = {"mean": torch.randn(latent, generator=g).half(), "std": torch.rand(latent, generator=g).half(),
                     "context": torch.randn(context, generator=g).half()}
                sink.write(pack_sample(f"k{i:07d}", t, f"caption {i}", {}))
        outputs.append({"name": name, "samples": min(shard_size, n - s)})
    write_manifest(folder, {"samples_written": n, "output_shards": outputs, "latent_shape": latent})


def loader_rate(folder: Path, batch: int, workers: int, seconds: float) -> float:
    it = iter(LatentLoader(folder, batch, seed=0, num_workers=workers, shuffle_buffer=256))
    next(it)  # worker start-up and the first blocks are not the steady state
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        n += len(next(it)["key"])
    rate = n / (time.perf_counter() - t0)
    del it  # shuts the workers down
    return rate


def step_rate(cfg: ModelConfig, latent: list[int], context: list[int], batch: int, steps: int, device,
              warmup: int = 1) -> float:
    torch.manual_seed(0)
    model = build_unet(cfg).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    x = torch.randn(batch, *latent, device=device)
    ctx = torch.randn(batch, *context, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)

    def step():
        loss = torch.nn.functional.mse_loss(model(x, t, ctx), x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    rate = steps / (time.perf_counter() - t0)
    del model, opt
    return rate


def run(args: argparse.Namespace, tmp: Path) -> dict:
    device = torch.device(args.device)
    workers = [int(w) for w in args.workers.split(",")]
    results = {"device": str(device), "torch_threads": torch.get_num_threads(), "configs": {}}
    for name in args.configs:
        chosen = preset(name, CONFIGS)
        model_cfg = chosen["model"]
        latent = [model_cfg.in_channels, chosen["res"], chosen["res"]]
        context = [chosen["context_len"], model_cfg.cross_attention_dim]
        batch = args.tiny_batch if name == "tiny" else args.sd15_batch
        folder = tmp / f"config{len(results['configs'])}"
        write_cache(folder, args.samples, args.shard_size, latent, context)
        rates = {w: loader_rate(folder, batch, w, args.seconds) for w in workers}
        n_steps, warmup = (args.steps, 1) if name == "tiny" else (args.sd15_steps, args.sd15_warmup)
        steps = step_rate(model_cfg, latent, context, batch, n_steps, device, warmup)
        needed = batch * steps
        results["configs"][name] = {
            "latent": latent, "context": context, "batch": batch, "steps_per_s": steps, "needed_samples_per_s": needed,
            "loader": {str(w): {"samples_per_s": r, "per_worker": r / max(w, 1), "ratio_to_needed": r / needed}
                       for w, r in rates.items()},
        }
    return results


def table(res: dict) -> str:
    lines = [f"latent loader vs training step rate on {res['device']} ({res['torch_threads']} torch threads)",
             f"{'config':<6}{'batch':>6}{'steps/s':>10}{'needed/s':>11}{'workers':>9}{'loader/s':>11}{'per worker':>12}{'ratio':>10}"]
    for name, r in res["configs"].items():
        for w, lo in r["loader"].items():
            lines.append(f"{name:<6}{r['batch']:>6}{r['steps_per_s']:>10.3f}{r['needed_samples_per_s']:>11.2f}{w:>9}"
                         f"{lo['samples_per_s']:>11.0f}{lo['per_worker']:>12.0f}{lo['ratio_to_needed']:>10.1f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    return run_and_report(run, table, _parse(argv), prefix="bench_loader_")


if __name__ == "__main__":
    raise SystemExit(main())
