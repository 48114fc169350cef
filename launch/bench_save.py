"""The training stall of one checkpoint save, synchronous vs ``train.async_save``, side by side.

For each U-Net config it trains on synthetic latents (one process, the real loop) twice, with
``train.async_save`` false and true, and one checkpoint due at step ``--save-at``. Per mode:

- ``save_s``: time the training thread spends in the save call (sync: the whole write, digests
  and commit; async: the host copy and the hand-over);
- ``stall_s``: ``save_s`` plus what the next ``--after`` steps took beyond the median step time
  before the save: the background writer competes for the CPU (and the disk) with training;
- ``ckpt_mib``: the checkpoint's size on disk.

It prints both and the ratio async / sync. Not a timed test: figures for the notes.

    python launch/bench_save.py                                  # demo and large U-Nets, CPU
    python launch/bench_save.py --configs demo --steps-before 5 --json runs/bench/save.json
    python launch/bench_save.py --smoke                          # tiny sizes (the test's)

``tiny`` is configs/micro.yaml's U-Net, ``demo`` the demo preset's (the ModelConfig defaults,
16x16 latents), ``large`` a ~4x wider and deeper CPU U-Net (levels 128-256-512-512, 2 resnets each).
The run folder is a temporary directory (``--dir`` chooses where: the disk is part of the figure).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench_common import preset, preset_arg, write_json

PRESETS = {
    "tiny": dict(model=dict(block_out_channels=[16, 32], attention_levels=[False, True], channels_per_head=8,
                            cross_attention_dim=32, norm_num_groups=8), res=8, context_len=16, batch=4),
    "demo": dict(model={}, res=16, context_len=32, batch=4),
    "large": dict(model=dict(block_out_channels=[128, 256, 512, 512], attention_levels=[False, True, True, False],
                             layers_per_block=2, channels_per_head=64, cross_attention_dim=256),
                  res=16, context_len=32, batch=2),
}


def synthetic_batches(model_cfg, chosen, batch: int):
    import torch

    from ldm_train.latents.cache import LatentData
    from ldm_train.train.batches import MemoryBatches

    latent = [model_cfg.in_channels, chosen["res"], chosen["res"]]
    context = [chosen["context_len"], model_cfg.cross_attention_dim]
    n, g = 64, torch.Generator().manual_seed(0)
    data = LatentData(
        torch.randn(n, *latent, generator=g).half(), torch.full((n, *latent), 0.1).half(),
        torch.randn(n, *context, generator=g).half(), [""] * n, [str(i) for i in range(n)],
        torch.zeros(context).half(), {"scaling_factor": 1.0, "shift_factor": 0.0, "latent_shape": latent},
    )
    return MemoryBatches(data, batch, 0, 0)


def measure(config: str, async_save: bool, args, root: Path) -> dict:
    """One run of ``save-at + after`` steps with one save at ``save-at`` (timed by wrapping the
    loop's save call), its step times from the metrics log."""
    import json

    from ldm_train.config import DiffusionConfig, DistributedConfig, LRScheduleConfig, TrainConfig
    from ldm_train.train import loop
    from ldm_train.train.strategy import make_accelerator
    from ldm_train.utils.runs import MetricsLog

    chosen = preset(config, PRESETS)
    total = args.save_at + args.after
    train_cfg = TrainConfig(steps=total + 1, batch_size=chosen["batch"], lr_schedule=LRScheduleConfig(warmup_steps=1),
                            log_every=1, checkpoint_every=10**9, milestones=[args.save_at], tensorboard=False,
                            watchdog_seconds=0, async_save=async_save)
    dist_cfg = DistributedConfig(cpu=True)
    run = root / f"{config}-{'async' if async_save else 'sync'}"
    saves, real_save = [], loop.save_training_state

    def timed_save(parts, *a, **kw):
        t = time.perf_counter()
        out = real_save(parts, *a, **kw)
        saves.append((parts.counters.step, time.perf_counter() - t))
        return out

    loop.save_training_state = timed_save  # the benchmark's probe; restored below
    try:
        stop = _StopAfter(total)
        loop.train_denoiser(
            model=chosen["model"], diffusion=DiffusionConfig(), train=train_cfg, distributed=dist_cfg,
            accelerator=make_accelerator(dist_cfg, train_cfg), batches=synthetic_batches(chosen["model"], chosen, chosen["batch"]),
            run_dir=run, seed=0, log=MetricsLog(run / "metrics.jsonl"), objective=stop.objective())
    except _Done:
        pass
    finally:
        loop.save_training_state = real_save
    steps = {r["step"]: r["step_time"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
             if r.get("stage") == "train"}
    before = [steps[s] for s in range(1, args.save_at)]  # step 0 warms up
    after = [steps[s] for s in range(args.save_at, args.save_at + args.after)]  # the save came after step save_at - 1
    typical = statistics.median(before)
    save_s = dict(saves)[args.save_at]
    ckpt = run / "checkpoints" / f"step-{args.save_at:07d}"
    size = sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file()) if ckpt.is_dir() else 0
    return {"config": config, "mode": "async" if async_save else "sync", "step_s": round(typical, 4),
            "save_s": round(save_s, 4), "stall_s": round(save_s + sum(t - typical for t in after), 4),
            "ckpt_mib": round(size / 2**20, 1)}


class _Done(Exception):
    """Ends a run after the measured steps (no final save to time)."""


class _StopAfter:
    """The default objective, ending the run once ``total`` steps were taken: a step past the save
    and its aftermath would add a final save the benchmark does not measure."""

    def __init__(self, total: int):
        self.total, self.calls = total, 0

    def objective(self):
        from ldm_train.config import DiffusionConfig
        from ldm_train.diffusion import build_objective

        base = build_objective(DiffusionConfig())

        def run(*args):
            if self.calls == self.total:
                raise _Done
            self.calls += 1
            return base(*args)

        return run


def table(rows: list[dict]) -> str:
    cols = ["config", "mode", "step_s", "save_s", "stall_s", "ckpt_mib"]
    lines = [" | ".join(cols)] + [" | ".join(str(r[c]) for c in cols) for r in rows]
    for config in dict.fromkeys(r["config"] for r in rows):
        sync, async_ = (next(r for r in rows if r["config"] == config and r["mode"] == m) for m in ("sync", "async"))
        lines.append(f"{config}: async / sync save_s = {async_['save_s'] / sync['save_s']:.3f}, "
                     f"stall_s = {async_['stall_s'] / sync['stall_s']:.3f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", type=preset_arg(PRESETS, many=True), default="demo,large",
                   help="comma list of: " + ", ".join(PRESETS) + " or config files (default: demo,large)")
    p.add_argument("--save-at", type=int, default=6, help="the step whose save is timed (default: 6)")
    p.add_argument("--after", type=int, default=6, help="steps after it that count towards the stall (default: 6)")
    p.add_argument("--dir", type=Path, default=None, help="where the runs are written (default: a temporary folder)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: tiny config, save at 3, 3 steps after")
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = p.parse_args(argv)
    if args.smoke:
        args.configs, args.save_at, args.after = ["tiny"], 3, 3
    import torch

    torch.set_num_threads(1)  # a shared CPU: one training thread, the writer beside it
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench-save-") as tmp:
        rows = [measure(c, mode, args, Path(tmp)) for c in args.configs for mode in (False, True)]
    print(table(rows))
    if args.json is not None:
        write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
