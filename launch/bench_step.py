"""The training loop's steady-state step on synthetic in-memory latents: seconds per step and
host-synchronising calls per step.

It runs whatever ``ldm_train`` is importable, so two checkouts compare side by side with the same
script, back to back (the figures of a note)::

    PYTHONPATH=/work/main  python launch/bench_step.py --configs micro,demo --json main.json
    PYTHONPATH=/work/wt17  python launch/bench_step.py --configs micro,demo --json wt17.json

Synchronising calls are counted by wrapping what reads a tensor's value on the host
(``Tensor.item``, ``__float__``, ``__bool__``, ``__int__``, ``tolist``) and the all-reduce the loop
uses (``torch.distributed.all_reduce``). On a GPU each of those blocks the host until the device has
run everything queued before it. A run of N + M steps and one of N steps, both logging and saving
only at their last step, differ by M steady-state steps; their difference in counts / M is the
per-step figure. Loss logging, checkpoints and evaluation are on intervals and excluded that way.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
READS = ("item", "__float__", "__bool__", "__int__", "tolist")


@contextmanager
def count_syncs():
    """Counts host reads of tensor values and all-reduces while active: ``{name: calls}``."""
    import torch.distributed as dist

    counts = {name: 0 for name in (*READS, "all_reduce")}
    originals = {name: getattr(torch.Tensor, name) for name in READS}

    def wrap(name, fn):
        def counted(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)
        return counted

    for name, fn in originals.items():
        setattr(torch.Tensor, name, wrap(name, fn))
    all_reduce = dist.all_reduce
    dist.all_reduce = wrap("all_reduce", all_reduce)
    try:
        yield counts
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)
        dist.all_reduce = all_reduce


def synthetic_latents(model_cfg, n: int = 64, size: int = 8, tokens: int = 8):
    """A LatentData of random posteriors and text embeddings with the model's sizes."""
    from ldm_train.latents.cache import LatentData

    g = torch.Generator().manual_seed(0)
    c, d = model_cfg.in_channels, model_cfg.cross_attention_dim
    mean = torch.randn(n, c, size, size, generator=g).half()
    std = (0.1 * torch.rand(n, c, size, size, generator=g)).half()
    context = torch.randn(n, tokens, d, generator=g).half()
    manifest = {"latent_shape": [c, size, size], "scaling_factor": 0.18215, "shift_factor": 0.0}
    keys = [f"{i:05d}" for i in range(n)]
    return LatentData(mean, std, context, keys, keys, torch.zeros(tokens, d).half(), manifest)


def run_steps(cfg, data, steps: int, batch: int, run_dir: Path, counting: bool) -> tuple[float, dict]:
    """Train ``steps`` steps (logging and saving at the last one only): (seconds, sync counts)."""
    from ldm_train.train.batches import MemoryBatches
    from ldm_train.train.loop import make_accelerator, train_denoiser
    from ldm_train.utils.runs import MetricsLog

    tc = cfg.train.model_copy(update=dict(steps=steps, batch_size=batch, log_every=10**6, checkpoint_every=10**6,
                                          eval_every=0, tensorboard=False, watchdog_seconds=0))
    acc = make_accelerator(cfg.distributed)
    kw = dict(model=cfg.model, diffusion=cfg.diffusion, train=tc, distributed=cfg.distributed, accelerator=acc,
              batches=MemoryBatches(data, batch, 0, 0), run_dir=run_dir, seed=0, log=MetricsLog(run_dir / "m.jsonl"))
    t = time.perf_counter()
    if counting:
        with count_syncs() as counts:
            train_denoiser(**kw)
    else:
        counts = {}
        train_denoiser(**kw)
    return time.perf_counter() - t, dict(counts)


def bench(name: str, steps: int, extra: int, batch: int) -> dict:
    from ldm_train.config import load_config

    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    cfg = cfg.model_copy(update={"distributed": cfg.distributed.model_copy(update={"cpu": True})})
    data = synthetic_latents(cfg.model)
    with tempfile.TemporaryDirectory() as tmp:
        run_steps(cfg, data, 2, batch, Path(tmp) / "warm", counting=False)
        short_s, short = run_steps(cfg, data, steps, batch, Path(tmp) / "a", counting=True)
        long_s, long = run_steps(cfg, data, steps + extra, batch, Path(tmp) / "b", counting=True)
    per_step = {k: (long[k] - short[k]) / extra for k in long}
    import ldm_train

    return {"config": name, "batch": batch, "steady_steps": extra, "step_s": (long_s - short_s) / extra,
            "syncs_per_step": sum(per_step.values()), "syncs_by_kind": per_step, "ldm_train": ldm_train.__file__}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="micro,demo", help="comma list of configs/*.yaml names")
    p.add_argument("--steps", type=int, default=3, help="steps of the shorter run")
    p.add_argument("--extra", type=int, default=10, help="steady-state steps the longer run adds")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    rows = [bench(c, args.steps, args.extra, args.batch) for c in args.configs.split(",")]
    for r in rows:
        print(f"{r['config']:>6} batch {r['batch']}: {r['step_s'] * 1e3:8.1f} ms/step  "
              f"{r['syncs_per_step']:5.2f} syncs/step {r['syncs_by_kind']}  ({r['ldm_train']})")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
