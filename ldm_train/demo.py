"""``ldm-train demo``: every stage on the built-in emoji set, timed, with a summary at the end."""
from __future__ import annotations

import json
import resource
import shutil
import time
from pathlib import Path
from typing import Callable

from . import stages
from .config import Config
from .latents.cache import load_latents
from .utils.runs import OutputExistsError, check_output


def _cpu_seconds() -> float:
    """CPU time of this process (all threads) and of its finished children (DataLoader workers)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def _timed(name: str, fn: Callable[[], dict], timings: dict, results: dict, cpu: dict) -> dict:
    print(f"\n== {name} ==", flush=True)
    t0, c0 = time.time(), _cpu_seconds()
    out = fn()
    timings[name] = round(time.time() - t0, 1)
    cpu[name] = round(_cpu_seconds() - c0, 1)
    results[name] = out
    print(f"   {name}: {timings[name]:.1f} s wall, {cpu[name]:.1f} s CPU", flush=True)
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
    cpu: dict[str, float] = {}
    results: dict[str, dict] = {}
    t0, c0 = time.time(), _cpu_seconds()
    step = lambda name, fn: _timed(name, fn, timings, results, cpu)  # noqa: E731
    step("data", lambda: stages.data_emoji(cfg, None, False))
    step("train-vae", lambda: stages.train_vae_stage(cfg, False))
    step("train-clip", lambda: stages.train_clip_stage(cfg, False))
    step("encode", lambda: stages.encode_stage(cfg, False))
    step("train", lambda: stages.train_stage(cfg, False))
    export_dir = cfg.path(cfg.export.dir)
    step("export", lambda: stages.export_stage(cfg, export_dir, False))
    prompts, seen = held_out_prompts(cfg)
    grid = run / "samples.png"
    step("sample", lambda: stages.sample_stage(export_dir, prompts, grid, cfg, False,
                                               references=stages.reference_images(cfg, prompts), keep_images=True))
    images, captions = results["sample"].pop("samples")
    step("eval", lambda: stages.score_stage(cfg, images, captions, prompts))
    summary = {
        "total_seconds": round(time.time() - t0, 1),
        "total_cpu_seconds": round(_cpu_seconds() - c0, 1),
        "seconds_per_stage": timings,
        "cpu_seconds_per_stage": cpu,
        "scores": results["eval"],
        "clip_val_retrieval_top1": results["train-clip"]["val_retrieval_top1"],
        "vae_final_rec_l1": results["train-vae"]["final_rec_l1"],
        "vae_val_rec_l1": results["train-vae"]["val_rec_l1"],
        "denoiser_final_loss": results["train"]["final_loss"],
        "device": results["train"]["device"],
        "outputs": {
            "run": str(run),
            "reconstructions": results["train-vae"]["recon_grid"],
            "samples": str(grid),
            "loss_curve": results["train"]["loss_plot"],
            "clip": results["train-clip"]["clip"],
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
    cpu = summary.get("cpu_seconds_per_stage", {})
    for name, sec in summary["seconds_per_stage"].items():
        print(f"  {name:<10} {sec:8.1f} s wall {cpu.get(name, float('nan')):8.1f} s CPU")
    print(f"  {'total':<10} {summary['total_seconds']:8.1f} s wall {summary.get('total_cpu_seconds', 0):8.1f} s CPU"
          f"  on {summary['device']}")
    print(f"  autoencoder L1: train {summary['vae_final_rec_l1']:.4f}, held-out {summary['vae_val_rec_l1']:.4f}")
    print(f"  CLIP: held-out image->caption retrieval {summary['clip_val_retrieval_top1']:.1%} among all validation captions")
    print(f"  denoiser loss (last logged): {summary['denoiser_final_loss']:.4f}")
    print_scores(summary["scores"])
    if summary["prompts_seen_in_training"]:
        print(f"  note: prompts also in the training split: {summary['prompts_seen_in_training']}")
    for what, where in summary["outputs"].items():
        print(f"  {what:<16} {where}")
    print(f"  summary        {Path(summary['outputs']['run']) / 'summary.json'}")


def print_scores(scores: dict) -> None:
    """The eval table: samples vs real images vs the baselines, by the demo's CLIP."""
    ret, cs, fd = scores["caption_retrieval"], scores["clip_score"], scores["fd_clip"]
    real = ret.get("real_images")
    print(f"  scores by the demo's CLIP ({scores['clip']}):")
    print(f"    {'':<30} {'samples':>9} {'real':>9} {'baseline':>9}")
    print(f"    {'caption retrieval top-1':<30} {ret['samples']['top1']:>9.1%} "
          f"{real['top1'] if real else float('nan'):>9.1%} {ret['samples']['chance_top1']:>9.1%}  (chance, "
          f"{ret['samples']['prompts']} prompts)")
    print(f"    {'CLIP score':<30} {cs['samples']:>9.2f} {cs.get('real_images', float('nan')):>9.2f} "
          f"{cs['shuffled_captions']:>9.2f}  (shuffled captions)")
    print(f"    {'FD-CLIP vs validation images':<30} {fd['samples']:>9.4f} {fd['real_images']:>9.4f} "
          f"{fd['random_noise']:>9.4f}  (noise; {fd['images_per_set']} images a set, not Inception FID)")
