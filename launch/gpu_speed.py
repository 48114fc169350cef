"""Issue 17's speed goals (and issue 18's SDXL 1024 px training step) in one run (< 8 minutes on an H200): runs the launch/bench_*.py scripts
with the goal's sizes, side by side with diffusers where they compare, and the EMA update on the
SD 1.5 U-Net's parameters, then prints one table (img/s, MFU, peak memory, compile seconds,
ratio to each anchor of ../shared/anchors/h200-diffusers-sd15-2026-11-28.jsonl) and writes
``$OUT/speed.json``. Each part runs in its own process with a time limit; a part that fails or
runs out of time is reported as such and the others still run.

    python launch/gpu_speed.py                 # GPU (see launch/gpu_speed.sh)
    python launch/gpu_speed.py --smoke         # CPU, tiny sizes: the same commands in seconds
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
ANCHORS = REPO.parent / "shared" / "anchors" / "h200-diffusers-sd15-2026-11-28.jsonl"


def parts(smoke: bool) -> list[tuple[str, list[str], int]]:
    """(name, argv after the python executable, seconds allowed) of every measurement."""
    if smoke:
        unet = ["--device", "cpu", "--config", "tiny", "--batch", "2", "--res", "8", "--reps", "2", "--warmup", "1"]
        return [
            ("unet256_eager", [str(LAUNCH / "bench_unet.py"), *unet], 120),
            ("unet256_cl", [str(LAUNCH / "bench_unet.py"), *unet, "--channels-last"], 120),
            ("sampling", [str(LAUNCH / "bench_sampling.py"), "--config", "tiny", "--steps", "2", "--batch", "1", "--reps", "1"], 120),
            ("sdxl1024_bf16_ckpt", [str(LAUNCH / "bench_unet.py"), "--device", "cpu", "--config", "sdxl-tiny", "--batch", "1",
                                    "--res", "8", "--dtype", "bf16", "--grad-ckpt", "--reps", "1", "--warmup", "1"], 180),
        ]
    unet256 = ["--device", "cuda", "--config", "sd15", "--batch", "64", "--res", "32", "--dtype", "bf16", "--reps", "10"]
    unet512 = ["--device", "cuda", "--config", "sd15", "--batch", "32", "--res", "64", "--dtype", "bf16", "--reps", "10"]
    return [
        ("unet256_eager", [str(LAUNCH / "bench_unet.py"), *unet256], 90),
        ("unet256_compiled_cl", [str(LAUNCH / "bench_unet.py"), *unet256, "--compile", "--channels-last"], 200),
        ("unet512_compiled_cl", [str(LAUNCH / "bench_unet.py"), *unet512, "--compile", "--channels-last", "--no-flops"], 150),
        ("sampling", [str(LAUNCH / "bench_sampling.py"), "--config", "sd15", "--device", "cuda", "--dtype", "bf16",
                      "--batch", "16", "--steps", "50", "--reps", "1"], 60),
        ("encode", [str(LAUNCH / "bench_encode.py"), "--device", "cuda", "--vae", "sd", "--res", "256", "--n", "2048",
                    "--batch", "64", "--dtype", "bf16"], 60),
        ("loader", [str(LAUNCH / "bench_loader.py"), "--device", "cuda", "--configs", "sd15", "--workers", "2",
                    "--sd15-batch", "64", "--sd15-steps", "10", "--sd15-warmup", "2"], 60),
        # issue 18: SDXL base's U-Net training step at 1024 px (128x128 latents), bf16 autocast, gradient
        # checkpointing, ours vs diffusers' in one process (two 2.57 B models + AdamW state: batch 4)
        ("sdxl1024_bf16_ckpt", [str(LAUNCH / "bench_unet.py"), "--device", "cuda", "--config", "sdxl", "--batch", "4",
                                "--res", "128", "--dtype", "bf16", "--grad-ckpt", "--reps", "5", "--warmup", "2",
                                "--no-flops"], 240),
    ]


def run_part(name: str, argv: list[str], limit: int, out: Path) -> dict:
    path = out / f"{name}.json"
    t = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, *argv, "--json", str(path)], capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        return {"error": f"over its {limit} s"}
    (out / f"{name}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0 or not path.is_file():
        return {"error": f"exit {proc.returncode}: {(proc.stdout + proc.stderr)[-400:]}"}
    return {"seconds": round(time.perf_counter() - t, 1), **json.loads(path.read_text())}


def ema_seconds(smoke: bool) -> dict:
    """One EMA update (fp32 shadow, one decay) over the U-Net's parameters, on its device."""
    import torch

    from bench_common import preset, sync
    from bench_unet import PRESETS
    from ldm_train.model import build_unet
    from ldm_train.train.ema import EMA

    device = torch.device("cpu" if smoke else "cuda")
    model = build_unet(preset("tiny" if smoke else "sd15", PRESETS)["model"]).to(device)
    ema = EMA.of_model(model, [0.9999])
    chunks = {k: p.detach().view(-1) for k, p in model.named_parameters()}
    for _ in range(3):
        ema.update(chunks)
    sync(device)
    t = time.perf_counter()
    for _ in range(10):
        ema.update(chunks)
    sync(device)
    return {"ema_update_s": (time.perf_counter() - t) / 10}


def anchors() -> dict[str, float]:
    """img/s of each anchor, by the name the table uses."""
    if not ANCHORS.is_file():
        return {}
    rows = [json.loads(line) for line in ANCHORS.read_text().splitlines() if line.strip()]
    out = {}
    for r in rows:
        if r.get("what") == "train_step" and r.get("latent", 32) == 32 and r.get("batch") == 64:
            out["diffusers " + ("compiled" if r.get("compile") else r.get("model", "eager"))] = r["img_per_s"]
        elif r.get("what") == "train_step" and r.get("latent") == 64:
            out["diffusers 512 b32"] = r["img_per_s"]
        elif r.get("what") in ("ddim50_cfg_sample", "vae_encode") and r.get("res", 256) == 256:
            out[r["what"]] = r["img_per_s"]
    out["mlperf v4.0 sd2 512 per H200"] = 128.0
    return out


def table(results: dict) -> list[str]:
    lines = [f"{'part':<22} {'model':<10} {'img/s':>9} {'mfu':>6} {'mem GiB':>8} {'first s':>8}  ratios to anchors"]
    refs = anchors()
    for name, r in results.items():
        if "error" in r:
            lines.append(f"{name:<22} error: {r['error'][:200]}")
            continue
        for model, m in (r.get("models") or {"-": r}).items():
            img_s = m.get("img_per_s") or m.get("with_decode_img_per_s")
            if img_s is None:
                continue
            ratios = " ".join(f"{k}={img_s / v:.2f}" for k, v in refs.items() if _compares(name, k))
            lines.append(f"{name:<22} {model:<10} {img_s:9.2f} {m.get('mfu', float('nan')):6.3f} "
                         f"{m.get('peak_mem_gib', float('nan')):8.1f} {m.get('first_step_s', float('nan')):8.1f}  {ratios}")
    if "ema_update_s" in results.get("ema", {}) and "unet256_eager" in results and "models" in results["unet256_eager"]:
        step = results["unet256_eager"]["models"]["ours"]["step_s"]["median"]
        lines.append(f"EMA update: {results['ema']['ema_update_s'] * 1e3:.2f} ms = {results['ema']['ema_update_s'] / step:.1%} "
                     "of our eager 256 px step (goal <= 3%)")
    return lines


def _compares(part: str, anchor: str) -> bool:
    if part.startswith("unet256"):
        return anchor.startswith("diffusers") and "512" not in anchor
    if part.startswith("unet512"):
        return "512" in anchor
    return {"sampling": "ddim50_cfg_sample", "encode": "vae_encode"}.get(part) == anchor


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU, tiny sizes (seconds): checks the commands")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "runs/gpu_speed")))
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(LAUNCH))
    results = {}
    for name, cmd, limit in parts(args.smoke):
        results[name] = run_part(name, cmd, limit, args.out)
        print(f"[gpu_speed] {name}: {'error' if 'error' in results[name] else 'ok'}", flush=True)
    try:
        results["ema"] = ema_seconds(args.smoke)
    except Exception as e:  # reported, like a failed part
        results["ema"] = {"error": f"{type(e).__name__}: {e}"}
    (args.out / "speed.json").write_text(json.dumps(results, indent=2, default=str))
    lines = table(results)
    (args.out / "table.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
