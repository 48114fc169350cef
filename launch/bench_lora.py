"""LoRA vs full fine-tuning of the same U-Net, measured side by side in one run: step time, peak
memory and checkpoint size (what ``train.lora`` saves: the adapter; vs the full fp32 weights).

Each variant runs in its own fresh process (peak RSS cannot be reset within one): it builds the U-Net
(``ldm_train.train.lora.base_unet``; LoRA: + the adapter of ``train.lora``), AdamW over the trainable
parameters, and times ``--steps`` optimizer steps (after 2 warm-up steps) of the training objective on
synthetic latents and text embeddings of the config's shapes. Memory: peak CPU RSS minus the RSS
once the libraries are imported (so: weights, gradients, optimizer state and activations), or the
device's peak allocated memory over the timed steps on a GPU.

    python launch/bench_lora.py                         # the demo's U-Net (configs/demo.yaml), 16x16 latents, CPU
    python launch/bench_lora.py --config sd15 --res 32 --context-len 77 --batch 8 --device cuda --dtype bf16
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def worker(args) -> dict:
    import torch
    from safetensors.torch import save_file

    from ldm_train.config import load_config
    from ldm_train.diffusion import build_objective, build_schedule
    from ldm_train.train.lora import adapter_state, add_adapter, base_unet, trainable_parameters

    torch.set_num_threads(args.threads)
    rss_libs = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # torch & co. imported, nothing built
    overrides = ["train.lora.enabled=true", f"train.lora.rank={args.rank}"] if args.variant == "lora" else []
    cfg = load_config(args.config, overrides + ["model.init_from=null", "model.gradient_checkpointing=false"])
    device = torch.device(args.device)
    model = base_unet(cfg.model, 0)
    if cfg.train.lora.enabled:
        add_adapter(model, cfg.train.lora)
    model.to(device).train()
    opt = torch.optim.AdamW(trainable_parameters(model), lr=1e-4)
    objective, schedule = build_objective(cfg.diffusion), build_schedule(cfg.diffusion)
    gen = torch.Generator(device=device).manual_seed(0)
    z = torch.randn(args.batch, cfg.model.in_channels, args.res, args.res, device=device)
    context = torch.randn(args.batch, args.context_len, cfg.model.cross_attention_dim, device=device)
    null = torch.zeros(args.context_len, cfg.model.cross_attention_dim, device=device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.dtype)

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss, _ = objective(model, z, context, null, schedule, gen)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / args.steps
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_libs)  # ru_maxrss: KiB on Linux
    saved = adapter_state(model) if cfg.train.lora.enabled else {k: v.float() for k, v in model.state_dict().items()}
    with tempfile.TemporaryDirectory() as tmp:
        save_file({k: v.contiguous().cpu() for k, v in saved.items()}, f"{tmp}/model.safetensors")
        size = Path(f"{tmp}/model.safetensors").stat().st_size
    return {
        "variant": args.variant,
        "step_seconds": round(seconds, 4),
        "peak_memory_mib": round(peak / 2**20, 1),
        "trainable_params": sum(p.numel() for p in trainable_parameters(model)),
        "total_params": sum(p.numel() for p in model.parameters()),
        "checkpoint_weights_bytes": size,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="demo", help="preset name or YAML file whose model section is benchmarked")
    ap.add_argument("--res", type=int, default=16, help="latent side (demo: 64 px / 4)")
    ap.add_argument("--context-len", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--variant", choices=["full", "lora"], help=argparse.SUPPRESS)  # the worker process
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(worker(args)))
        return
    rows = []
    for variant in ("full", "lora"):
        cmd = [sys.executable, __file__, *sys.argv[1:], "--variant", variant]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    full, lora = rows
    print(f"{'':22}{'full':>14}{'lora r=' + str(args.rank):>14}{'lora/full':>11}")
    for key in ("step_seconds", "peak_memory_mib", "trainable_params", "checkpoint_weights_bytes"):
        print(f"{key:22}{full[key]:>14}{lora[key]:>14}{lora[key] / full[key]:>11.4f}")
    print(json.dumps({"config": args.config, "device": args.device, "dtype": args.dtype, "batch": args.batch,
                      "res": args.res, "rows": rows}))


if __name__ == "__main__":
    main()
