"""``ldm-train demo``: every stage on the built-in emoji set, timed, with a summary at the end."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Callable

from . import stages
from .config import Config
from .latents.cache import load_latents
from .utils.runs import OutputExistsError, check_output


def _timed(name: str, fn: Callable[[], dict], timings: dict, results: dict) -> dict:
    print(f"\n== {name} ==", flush=True)
    t0 = time.time()
    out = fn()
    timings[name] = round(time.time() - t0, 1)
    results[name] = out
    print(f"   {name}: {timings[name]:.1f} s", flush=True)
    return out


def held_out_prompts(cfg: Config) -> tuple[list[str], list[str]]:
    """The configured prompts, or the first validation captions; returns (prompts, those seen in training)."""
    train = load_latents(cfg.path(cfg.latents.dir) / "train")
    prompts = list(cfg.eval.prompts)
    if not prompts:
        val = load_latents(cfg.path(cfg.latents.dir) / "val")
        prompts = sorted(set(val.captions))[:8]
    seen = sorted(set(prompts) & set(train.captions))
    return prompts, seen


def run_demo(cfg: Config, overwrite: bool) -> dict:
    run = cfg.path("{run}")
    if check_output(run, overwrite, "demo"):
        if not (run / "config.yaml").is_file() or run.resolve() in (Path.cwd().resolve(), Path.home().resolve()):
            # --overwrite deletes the folder: only ever one that an earlier run made.
            raise OutputExistsError(f"{run} does not look like an ldm_train run folder (no config.yaml); not deleting it")
        shutil.rmtree(run)
    timings: dict[str, float] = {}
    results: dict[str, dict] = {}
    t0 = time.time()
    _timed("data", lambda: stages.data_emoji(cfg, None, False), timings, results)
    _timed("train-vae", lambda: stages.train_vae_stage(cfg, False), timings, results)
    _timed("encode", lambda: stages.encode_stage(cfg, False), timings, results)
    _timed("train", lambda: stages.train_stage(cfg, False), timings, results)
    export_dir = cfg.path(cfg.export.dir)
    _timed("export", lambda: stages.export_stage(cfg, export_dir, False), timings, results)
    prompts, seen = held_out_prompts(cfg)
    grid = run / "samples.png"
    _timed("sample", lambda: stages.sample_stage(export_dir, prompts, grid, cfg, False), timings, results)
    summary = {
        "total_seconds": round(time.time() - t0, 1),
        "seconds_per_stage": timings,
        "vae_final_rec_l1": results["train-vae"]["final_rec_l1"],
        "vae_val_rec_l1": results["train-vae"]["val_rec_l1"],
        "denoiser_final_loss": results["train"]["final_loss"],
        "device": results["train"]["device"],
        "outputs": {
            "run": str(run),
            "reconstructions": results["train-vae"]["recon_grid"],
            "samples": str(grid),
            "loss_curve": results["train"]["loss_plot"],
            "export": str(export_dir),
            "metrics": str(run / "metrics.jsonl"),
        },
        "prompts": prompts,
        "prompts_seen_in_training": seen,
        "stages": results,
    }
    (run / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def print_summary(summary: dict) -> None:
    print("\n== demo summary ==")
    for name, sec in summary["seconds_per_stage"].items():
        print(f"  {name:<10} {sec:8.1f} s")
    print(f"  {'total':<10} {summary['total_seconds']:8.1f} s  on {summary['device']}")
    print(f"  autoencoder L1: train {summary['vae_final_rec_l1']:.4f}, held-out {summary['vae_val_rec_l1']:.4f}")
    print(f"  denoiser loss (last logged): {summary['denoiser_final_loss']:.4f}")
    if summary["prompts_seen_in_training"]:
        print(f"  note: prompts also in the training split: {summary['prompts_seen_in_training']}")
    for what, where in summary["outputs"].items():
        print(f"  {what:<16} {where}")
    print(f"  summary        {Path(summary['outputs']['run']) / 'summary.json'}")
