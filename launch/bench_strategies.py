"""Training throughput and memory per distribution strategy, measured side by side in one run.

For each strategy (DDP, ZeRO-1/2/3) it launches ``--nproc`` processes with torchrun, trains the
chosen U-Net config on synthetic latents (random posteriors and text embeddings of the right
shapes: the data path is not what is measured) and reports per strategy: images/s over the
timed steps (after warm-up), the EMA bytes each rank holds, the parameter elements each rank
stores, peak memory (GPU, or CPU RSS), and MFU where the device's peak is known.

    python launch/bench_strategies.py                               # tiny + mid on CPU, 2 processes
    python launch/bench_strategies.py --configs mid --steps 20 --json runs/bench/strategies.json
    python launch/bench_strategies.py --configs sd15 --strategies zero2 --nproc 1 --dtype bf16 --batch 16

``tiny`` is configs/micro.yaml's U-Net (8x8 latents), ``mid`` the demo's (16x16), ``sd15``
Stable Diffusion 1.5's from configs/sd15.yaml (32x32 latents = 256 px, 77 tokens of 768; a GPU
config). A config file's path also works: its model section at the sd15 sizes.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_common import SD15_CONFIG, preset, preset_arg, write_json

# Latents [in_channels, res, res], contexts [context_len, cross_attention_dim].
PRESETS = {
    "tiny": dict(model=dict(block_out_channels=[16, 32], attention_levels=[False, True], channels_per_head=8,
                            cross_attention_dim=32, norm_num_groups=8), res=8, context_len=16, batch=8),
    "mid": dict(model={}, res=16, context_len=32, batch=16),
    "sd15": dict(model=SD15_CONFIG, res=32, context_len=77, batch=16),
}


def worker(args) -> None:
    """One rank (under torchrun): train, then write this rank's report."""
    import torch

    from ldm_train.config import DistributedConfig, LRScheduleConfig, TrainConfig, DiffusionConfig
    from ldm_train.latents.cache import LatentData
    from ldm_train.train.batches import MemoryBatches
    from ldm_train.train.loop import train_denoiser
    from ldm_train.train.strategy import make_accelerator
    from ldm_train.utils.runs import MetricsLog

    chosen = preset(args.config, PRESETS)
    model_cfg = chosen["model"]
    latent = [model_cfg.in_channels, chosen["res"], chosen["res"]]
    context = [chosen["context_len"], model_cfg.cross_attention_dim]
    batch = args.batch or chosen["batch"]
    n = 256
    g = torch.Generator().manual_seed(0)
    data = LatentData(
        torch.randn(n, *latent, generator=g).half(), torch.full((n, *latent), 0.1).half(),
        torch.randn(n, *context, generator=g).half(), [""] * n, [str(i) for i in range(n)],
        torch.zeros(context).half(), {"scaling_factor": 1.0, "shift_factor": 0.0, "latent_shape": latent},
    )
    dist_cfg = DistributedConfig(strategy=args.strategy, mixed_precision=args.dtype, cpu=args.device == "cpu")
    total = args.warmup + args.steps
    train_cfg = TrainConfig(steps=total, batch_size=batch, lr_schedule=LRScheduleConfig(warmup_steps=1), log_every=1, checkpoint_every=10**9,
                            tensorboard=False, watchdog_seconds=0)
    acc = make_accelerator(dist_cfg, train_cfg)
    run = Path(args.run)
    model, ema, _ = train_denoiser(
        model=model_cfg, diffusion=DiffusionConfig(), train=train_cfg, distributed=dist_cfg, accelerator=acc,
        batches=MemoryBatches(data, batch, 0, acc.process_index), run_dir=run, seed=0,
        log=MetricsLog(run / f"metrics-{acc.process_index}.jsonl"))
    zero3 = args.strategy == "zero3"
    params = list(model.parameters())
    report = {
        "local_param_elements": sum(p.ds_tensor.numel() if zero3 else p.numel() for p in params),
        "full_param_elements": sum(int(torch.Size(p.ds_shape).numel()) if zero3 else p.numel() for p in params),
        "ema_bytes": ema.nbytes(),
    }
    if torch.cuda.is_available() and args.device != "cpu":
        report["gpu_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    (run / f"report-{acc.process_index}.json").write_text(json.dumps(report))
    acc.end_training()


def measure(config: str, strategy: str, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
               "--no-python", sys.executable, __file__, "--worker", "--run-dir", tmp, "--config", config, "--strategy", strategy, "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--dtype", args.dtype, "--device", args.device]
        if args.batch:
            cmd += ["--batch", str(args.batch)]
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            return {"config": config, "strategy": strategy, "error": proc.stderr[-1500:]}
        recs = [json.loads(line) for line in (Path(tmp) / "metrics-0.jsonl").read_text().splitlines()]
        timed = [r for r in recs if r.get("stage") == "train" and r["step"] >= args.warmup]
        seconds = sum(r["step_time"] for r in timed)
        batch = args.batch or preset(config, PRESETS)["batch"]
        ranks = [json.loads((Path(tmp) / f"report-{i}.json").read_text()) for i in range(args.nproc)]
        out = {
            "config": config, "strategy": strategy, "processes": args.nproc, "batch_per_rank": batch,
            "img_per_s": round(batch * args.nproc * len(timed) / seconds, 2),
            "ema_mib_per_rank": round(max(r["ema_bytes"] for r in ranks) / 2**20, 3),
            "full_ema_mib": round(4 * ranks[0]["full_param_elements"] / 2**20, 3),
            "param_fraction_per_rank": round(max(r["local_param_elements"] for r in ranks) / ranks[0]["full_param_elements"], 3),
            "peak_mem_gib": round(max(r.get("gpu_peak_gib", 0) for r in ranks) or timed[-1].get("cpu_rss_gib", 0), 3),
        }
        if "mfu" in timed[-1]:
            out["mfu"] = round(sum(r["mfu"] for r in timed) / len(timed), 4)
        return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", type=preset_arg(PRESETS, many=True), default="tiny,mid",
                   help="comma list of: " + ", ".join(PRESETS) + " or config files (default: tiny,mid)")
    p.add_argument("--strategies", default="ddp,zero2,zero3", help="comma list of ddp, zero1, zero2, zero3")
    p.add_argument("--nproc", type=int, default=2, help="processes (default: 2)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (default: 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default: 3)")
    p.add_argument("--batch", type=int, default=None, help="batch per rank (default: the preset's)")
    p.add_argument("--dtype", choices=["no", "bf16", "fp16"], default="no", help="mixed precision (default: no)")
    p.add_argument("--device", choices=["auto", "cpu"], default="auto", help="cpu: force the CPU")
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--run-dir", dest="run", help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--strategy", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    rows = [measure(c, s, args) for c in args.configs for s in args.strategies.split(",")]
    cols = ["config", "strategy", "processes", "batch_per_rank", "img_per_s", "ema_mib_per_rank", "full_ema_mib",
            "param_fraction_per_rank", "peak_mem_gib", "mfu"]
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(str(r.get(c, "")) for c in cols) if "error" not in r else f"{r['config']} {r['strategy']}: FAILED {r['error']}")
    for config in args.configs:
        base = next((r for r in rows if r["config"] == config and r["strategy"] == "ddp" and "error" not in r), None)
        for r in rows:
            if base and r["config"] == config and r is not base and "error" not in r:
                print(f"{config}: {r['strategy']} / ddp img/s = {r['img_per_s'] / base['img_per_s']:.2f}")
    if args.json:
        write_json(args.json, rows)


if __name__ == "__main__":
    main()
