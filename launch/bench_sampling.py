"""Evaluation cost: images/s of DDIM with classifier-free guidance through the project's sampler
(``ldm_train.diffusion.sample_from_config``) and U-Net, plus the VAE decode, against the anchor of
diffusers' SD-1.5 U-Net on one H200 in bf16 at 512 px, batch 16, 50 steps: 3.37 img/s.

Weights are random (the speed does not depend on them); the SD-1.5 preset is the real
architecture (configs/sd15.yaml: 859.5 M-parameter U-Net, SD's 83.7 M-parameter VAE decoder; 77
tokens of 768). ``--config`` also takes a config file's path: its model and autoencoder sections
at the sd15 sizes.

    python launch/bench_sampling.py                                   # tiny, CPU, seconds
    python launch/bench_sampling.py --config sd15 --device cuda --dtype bf16 --batch 16 --steps 50
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench_common import SD15_CONFIG, preset, preset_arg

ANCHOR_IMG_S = 3.37  # diffusers SD-1.5 U-Net, H200, bf16, 512 px, batch 16, 50 DDIM steps with CFG
# Latents [in_channels, res, res] (res = image px / 8), contexts [context_len, cross_attention_dim];
# sd15 (and a config file) give the model and autoencoder sections.
PRESETS = {
    "tiny": dict(model=dict(block_out_channels=[16, 32], attention_levels=[False, True], channels_per_head=8,
                            cross_attention_dim=32, norm_num_groups=8),
                 vae=dict(block_out_channels=[8, 16], layers_per_block=2, norm_num_groups=8), res=8, context_len=16),
    "sd15": dict(model=SD15_CONFIG, res=64, context_len=77),
}


def build(chosen: dict, device, dtype):
    """The U-Net and the VAE (random init, eval, no gradients), and the latent and context shapes."""
    from ldm_train.autoencoder.vae import build_vae
    from ldm_train.config import AutoencoderConfig, load_config
    from ldm_train.model import build_unet

    cfg = chosen["model"]
    unet = build_unet(cfg).to(device, dtype).eval()
    vae_cfg = AutoencoderConfig(**chosen["vae"]) if "vae" in chosen else load_config(chosen["model_file"]).autoencoder
    vae = build_vae(vae_cfg).to(device, dtype).eval().requires_grad_(False)
    latent = [cfg.in_channels, chosen["res"], chosen["res"]]
    return unet, vae, latent, [chosen["context_len"], cfg.cross_attention_dim]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=preset_arg(PRESETS), default="tiny", metavar="{tiny,sd15,FILE}",
                   help="sd15: configs/sd15.yaml; FILE: a config file at the sd15 sizes (default: tiny)")
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
    from ldm_train.config import EvalConfig, load_config
    from ldm_train.diffusion import sample_from_config

    torch_device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    unet, vae, latent, context_shape = build(preset(args.config, PRESETS), torch_device, dtype)
    diffusion = load_config(SD15_CONFIG).diffusion  # SD 1.5: scaled_linear, epsilon
    eval_cfg = EvalConfig(sampler="ddim", steps=args.steps, guidance_scale=args.guidance)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(args.batch, *latent, generator=g).to(torch_device)
    context = torch.randn(args.batch, *context_shape, generator=g).to(torch_device)
    null = torch.zeros(context_shape).to(torch_device)

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
