"""Evaluation cost: images/s of DDIM with classifier-free guidance through the project's sampler
(``ldm_train.diffusion.sample_from_config``) and U-Net, plus the VAE decode, against the anchor of
diffusers' SD-1.5 U-Net on one H200 in bf16 at 512 px, batch 16, 50 steps: 3.37 img/s.

Weights are random (the speed does not depend on them); the SD-1.5 preset is the real
architecture (859.5 M-parameter U-Net, SD's 83.7 M-parameter VAE decoder, 77 tokens of 768).

    python launch/bench_sampling.py                                   # tiny, CPU, seconds
    python launch/bench_sampling.py --config sd15 --device cuda --dtype bf16 --batch 16 --steps 50
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

ANCHOR_IMG_S = 3.37  # diffusers SD-1.5 U-Net, H200, bf16, 512 px, batch 16, 50 DDIM steps with CFG
PRESETS = {
    "tiny": dict(model=dict(block_out_channels=[16, 32], attention_levels=[False, True], attention_head_dim=8,
                            cross_attention_dim=32, norm_num_groups=8), vae=[8, 16], latent=[4, 8, 8], context=[16, 32]),
    "sd15": dict(model=dict(block_out_channels=[320, 640, 1280, 1280], attention_levels=[True, True, True, False],
                            layers_per_block=2, num_attention_heads=[8, 8, 8, 8], attention_head_dim=40,
                            cross_attention_dim=768), vae=[128, 256, 512, 512], latent=[4, 64, 64], context=[77, 768]),
}


def build(preset: dict, device, dtype):
    from diffusers import AutoencoderKL

    from ldm_train.config import ModelConfig
    from ldm_train.model import build_unet

    unet = build_unet(ModelConfig(**preset["model"])).to(device, dtype).eval()
    levels = len(preset["vae"])
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
                        block_out_channels=tuple(preset["vae"]), layers_per_block=2, latent_channels=4,
                        norm_num_groups=min(32, preset["vae"][0]), scaling_factor=0.18215)
    return unet, vae.to(device, dtype).eval().requires_grad_(False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (default: 50)")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--reps", type=int, default=2, help="timed repetitions (default: 2)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()

    import torch

    from ldm_train.autoencoder.vae import decode_latents
    from ldm_train.config import DiffusionConfig, EvalConfig
    from ldm_train.diffusion import sample_from_config

    preset = PRESETS[args.config]
    torch_device = torch.device(args.device)
    unet, vae = build(preset, torch_device, {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype])
    diffusion = DiffusionConfig(prediction_type="epsilon")
    eval_cfg = EvalConfig(sampler="ddim", steps=args.steps, guidance_scale=args.guidance)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(args.batch, *preset["latent"], generator=g).to(torch_device)
    context = torch.randn(args.batch, *preset["context"], generator=g).to(torch_device)
    null = torch.zeros(preset["context"]).to(torch_device)

    def sync():
        if torch_device.type == "cuda":
            torch.cuda.synchronize()

    def run(steps: int):
        cfg = eval_cfg.model_copy(update={"steps": steps})
        with torch.no_grad(), torch.autocast(torch_device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16"):
            t0 = time.perf_counter()
            z = sample_from_config(unet, noise, context, null, diffusion, cfg)
            sync()
            t1 = time.perf_counter()
            decode_latents(vae, z)
            sync()
        return t1 - t0, time.perf_counter() - t1

    run(2)  # warm-up: kernels, allocator
    times = [run(args.steps) for _ in range(args.reps)]
    loop_s = min(t for t, _ in times)
    decode_s = min(d for _, d in times)
    row = {
        "config": args.config, "device": args.device, "dtype": args.dtype, "batch": args.batch, "steps": args.steps,
        "guidance": args.guidance, "unet_evals_per_image": 2 * args.steps,
        "sampling_img_per_s": round(args.batch / loop_s, 3), "with_decode_img_per_s": round(args.batch / (loop_s + decode_s), 3),
        "decode_share": round(decode_s / (loop_s + decode_s), 3), "anchor_img_per_s": ANCHOR_IMG_S,
    }
    row["ratio_to_anchor"] = round(row["with_decode_img_per_s"] / ANCHOR_IMG_S, 3)
    for k, v in row.items():
        print(f"{k:>22}: {v}")
    if args.config != "sd15" or args.device == "cpu":
        print("(the anchor is for sd15 on an H200; other settings are not comparable to it)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
