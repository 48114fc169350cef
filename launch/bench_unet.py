#!/usr/bin/env python
"""Training-step speed of our U-Net against diffusers' ``UNet2DConditionModel``, same weights.

A benchmark, not a test: it prints a table and (with ``--json``) writes the numbers; nothing
here asserts on speed. Both models are built from one ``ModelConfig`` (ours through
``build_unet``, diffusers' through ``ldm_train.model.diffusers_config_from_model``), then
diffusers' model loads our state dict (the names and shapes match, which is checked), so both
start from identical weights and see identical inputs (latents, integer timesteps, text context,
target; fixed seed). ``--config``: a preset (tiny, small, or sd15 = configs/sd15.yaml's model
section) or the path of any config file, whose model section is used at the sd15 sizes.

One training step = forward (optionally under bf16 autocast; weights stay fp32), MSE loss,
backward, AdamW step (fused, or foreach with ``--no-fused``), ``zero_grad(set_to_none=True)``,
as in ``ldm_train.train.loop``. Steps alternate between the models, ABBA (ours first on even
reps, diffusers first on odd ones) so neither always runs right after the other; each rep gives
a paired ratio diffusers_time / ours_time (> 1: ours is faster).

On CUDA it also reports peak memory per model (the other model's resident weights and
optimizer state subtracted), FLOPs of one forward+backward counted once outside timing with
``torch.utils.flop_counter.FlopCounterMode``, achieved TFLOP/s, and MFU against a bf16 matmul
peak measured in the same process (8192^3, best of several).

Examples::

    python launch/bench_unet.py --config tiny --device cpu --reps 2 --warmup 1
    python launch/bench_unet.py --config small --reps 10 --json runs/bench/small.json
    python launch/bench_unet.py --config sd15 --device cuda --dtype bf16 --batch 64 --compile --channels-last
    python launch/bench_unet.py --config configs/micro.yaml --device cpu --batch 2 --res 8 --context-len 8
    python launch/bench_unet.py --report runs/gpu_bench/*.json     # one table from earlier runs

``launch/gpu_bench_unet.sh`` is the prepared GPU run (H200); it says how to carry diffusers.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench_common import SD15_CONFIG, preset, preset_arg, sync, write_json

MISSING_DIFFUSERS = (
    "bench_unet: diffusers is not importable ({err}).\n"
    "  pip install diffusers==0.42.1   (or carry wheels, see launch/gpu_bench_unet.sh)"
)

# --- configs ----------------------------------------------------------------------------------
# ``model``: keys of the ``model`` config section, or a config file whose model section is used.
PRESETS: dict[str, dict[str, Any]] = {
    # Seconds on one CPU core: the subprocess test's config.
    "tiny": dict(
        model=dict(in_channels=4, out_channels=4, block_out_channels=[32, 64], attention_levels=[False, True],
                   layers_per_block=1, channels_per_head=16, cross_attention_dim=32, norm_num_groups=8),
        batch=2, res=8, context_len=8,
    ),
    # SD-like (2 resnets per level, attention at the two lower levels, 77-token context) at a
    # size a 2-core CPU runs in about a second per step.
    "small": dict(
        model=dict(in_channels=4, out_channels=4, block_out_channels=[64, 128, 128],
                   attention_levels=[False, True, True], layers_per_block=2, channels_per_head=32,
                   cross_attention_dim=128, norm_num_groups=32),
        batch=8, res=32, context_len=77,
    ),
    # Stable Diffusion 1.5's U-Net (859.5 M parameters) from configs/sd15.yaml; 77 CLIP ViT-L
    # tokens of width 768. 32x32 latents = 256 px images.
    "sd15": dict(model=SD15_CONFIG, batch=64, res=32, context_len=77),
    # SDXL-shaped at CPU size: no attention at the first level, per-level transformer depth, linear
    # projections, 64 channels per head, text_time added conditioning (pooled 64 + 6 x 32).
    "sdxl-tiny": dict(
        model=dict(block_out_channels=[64, 128, 128], attention_levels=[False, True, True], layers_per_block=2,
                   channels_per_head=64, cross_attention_dim=128, norm_num_groups=32, transformer_layers_per_block=[1, 2, 3],
                   use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=32,
                   projection_class_embeddings_input_dim=64 + 6 * 32),
        batch=2, res=16, context_len=77,
    ),
    # SDXL base 1.0's U-Net (2.567 B parameters; stable-diffusion-xl-base-1.0 unet/config.json): 77
    # tokens of width 768 + 1280 = 2048, pooled bigG 1280. 128x128 latents = 1024 px images.
    "sdxl": dict(
        model=dict(block_out_channels=[320, 640, 1280], attention_levels=[False, True, True], layers_per_block=2,
                   channels_per_head=64, cross_attention_dim=2048, norm_num_groups=32, transformer_layers_per_block=[1, 2, 10],
                   use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                   projection_class_embeddings_input_dim=2816),
        batch=4, res=128, context_len=77,
    ),
}


# --- helpers ----------------------------------------------------------------------------------

def _summary(xs: list[float]) -> dict:
    return {"min": min(xs), "median": statistics.median(xs), "max": max(xs), "all": xs}


def matmul_peak_tflops(device, n: int = 8192, reps: int = 10) -> float:
    """Best-of-``reps`` bf16 ``n x n @ n x n`` on the GPU, in TFLOP/s (random data)."""
    import torch

    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    best = math.inf
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize(device)
        best = min(best, start.elapsed_time(end) / 1e3)
    del a, b
    torch.cuda.empty_cache()
    return 2 * n**3 / best / 1e12


def _static_bytes(model, opt) -> int:
    """Bytes that stay allocated between steps: parameters and optimizer state."""
    import torch

    seen, total = set(), 0
    tensors = list(model.parameters())
    for state in opt.state.values():
        tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    for t in tensors:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


# --- the benchmark ----------------------------------------------------------------------------

class Runner:
    """One model, its optimizer and its step function."""

    def __init__(self, name, module, call, opt, inputs, autocast, device):
        import torch

        self.name, self.module, self.opt, self.device = name, module, opt, device
        self.call = call  # (sample, t, ctx) -> prediction, possibly through torch.compile
        self.inputs, self.autocast = inputs, autocast
        self.times: list[float] = []
        self.losses: list[torch.Tensor] = []
        self.first_step_s: float | None = None
        self.peak_mem_bytes: int | None = None
        self.flops: int | None = None

    def _loss(self):
        import torch.nn.functional as F

        x, t, ctx, target = self.inputs
        with self.autocast():
            pred = self.call(x, t, ctx)
        return F.mse_loss(pred.float(), target)

    def step(self):
        loss = self._loss()
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.detach()

    def timed_step(self) -> float:
        sync(self.device)
        t0 = time.perf_counter()
        loss = self.step()
        sync(self.device)
        dt = time.perf_counter() - t0
        self.losses.append(loss)
        return dt

    def count_flops(self, eager_call) -> int:
        """FLOPs of one forward + backward of the (uncompiled) module; grads are dropped."""
        from torch.utils.flop_counter import FlopCounterMode

        call, self.call = self.call, eager_call
        try:
            with FlopCounterMode(display=False) as counter:
                self._loss().backward()
        finally:
            self.call = call
            self.opt.zero_grad(set_to_none=True)
        return int(counter.get_total_flops())


def _parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Training-step speed of ldm_train's U-Net vs diffusers' UNet2DConditionModel "
                    "(same config, same weights, same inputs). Ratio = diffusers_time / ours_time: > 1 means ours is faster.",
        epilog="GPU: launch/gpu_bench_unet.sh runs the prepared H200 comparison.",
    )
    p.add_argument("--config", type=preset_arg(PRESETS), default="small", metavar="{tiny,small,sd15,sdxl-tiny,sdxl,FILE}",
                   help="tiny: seconds on CPU; small: SD-like at CPU size; sd15: Stable Diffusion 1.5's U-Net "
                        "(configs/sd15.yaml); FILE: a config file's model section at the sd15 sizes "
                        "(default: %(default)s)")
    p.add_argument("--batch", type=int, help="batch size (default: the preset's: tiny 2, small 8, sd15 64)")
    p.add_argument("--res", type=int, help="latent height = width (default: tiny 8, small 32, sd15 32 = 256 px)")
    p.add_argument("--context-len", type=int, help="text tokens (default: tiny 8, else 77)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: cuda when available")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                   help="bf16 = autocast with fp32 weights and optimizer (default: fp32)")
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    p.add_argument("--channels-last", action="store_true", help="channels_last weights and latents, both models")
    p.add_argument("--grad-ckpt", action="store_true", help="activation (gradient) checkpointing, both models")
    p.add_argument("--no-fused", action="store_true", help="plain (foreach) AdamW instead of the fused kernel")
    p.add_argument("--reps", type=int, default=10, help="timed steps per model (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model first; compile happens here (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="weights and inputs (default: 0)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--no-flops", action="store_true", help="CUDA: skip the FLOP count and the matmul peak")
    p.add_argument("--json", metavar="OUT", help="write the results here")
    p.add_argument("--report", nargs="+", metavar="JSON",
                   help="print one table from JSON files of earlier runs and exit (nothing is built)")
    args = p.parse_args(argv)
    if args.report is None:
        for name in ("reps", "warmup"):
            if getattr(args, name) < (1 if name == "reps" else 0):
                p.error(f"--{name} must be >= {1 if name == 'reps' else 0}")
    return args


def run(args: argparse.Namespace) -> dict:
    try:
        import diffusers
        from diffusers import UNet2DConditionModel
    except ImportError as e:
        sys.exit(MISSING_DIFFUSERS.format(err=e))
    import torch

    from ldm_train.config import OptimizerConfig, TrainConfig
    from ldm_train.model import build_unet, diffusers_config_from_model

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            sys.exit("bench_unet: --device cuda but torch sees no GPU")
    on_cuda = device.type == "cuda"
    if on_cuda:
        torch.backends.cudnn.benchmark = True  # both models; conv algorithm picked during warm-up

    chosen = preset(args.config, PRESETS)
    batch, res = args.batch or chosen["batch"], args.res or chosen["res"]
    ctx_len = args.context_len or chosen["context_len"]
    train_cfg = TrainConfig(compile=args.compile, channels_last=args.channels_last,
                            optimizer=OptimizerConfig(fused=not args.no_fused))
    cfg = chosen["model"]
    if args.grad_ckpt:
        cfg = cfg.model_copy(update={"gradient_checkpointing": True})
    dcfg = diffusers_config_from_model(cfg)

    # Same weights: ours is initialised from the seed, diffusers' loads our state dict.
    t_build = time.perf_counter()
    torch.manual_seed(args.seed)
    with torch.device(device):
        ours = build_unet(cfg)
        theirs = UNet2DConditionModel.from_config(dcfg)
    ours_sd, their_sd = ours.state_dict(), theirs.state_dict()
    ours_shapes = {k: tuple(v.shape) for k, v in ours_sd.items()}
    their_shapes = {k: tuple(v.shape) for k, v in their_sd.items()}
    if ours_shapes != their_shapes:
        only_ours = sorted(set(ours_shapes) - set(their_shapes))[:5]
        only_theirs = sorted(set(their_shapes) - set(ours_shapes))[:5]
        shape_diff = [k for k in ours_shapes.keys() & their_shapes.keys() if ours_shapes[k] != their_shapes[k]][:5]
        sys.exit(f"bench_unet: state dicts differ: only ours {only_ours}, only diffusers {only_theirs}, "
                 f"shapes {shape_diff}")
    theirs.load_state_dict(ours_sd, strict=True)
    del ours_sd, their_sd
    build_s = time.perf_counter() - t_build

    ckpt_mode = None
    if args.grad_ckpt:
        theirs.enable_gradient_checkpointing()
        ckpt_mode = "ModelConfig.gradient_checkpointing (each down/mid/up block)"

    ours.train()
    theirs.train()
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    if args.channels_last:
        ours.to(memory_format=fmt)
        theirs.to(memory_format=fmt)

    g = torch.Generator().manual_seed(args.seed + 1)
    x = torch.randn(batch, cfg.in_channels, res, res, generator=g)
    target = torch.randn(batch, cfg.out_channels, res, res, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    ctx = torch.randn(batch, ctx_len, cfg.cross_attention_dim, generator=g)
    layout = ours.layout  # SDXL (text_time): pooled embedding + size/crop ids, packed after the tokens for ours
    if layout is not None:
        pooled = torch.randn(batch, layout.pooled, generator=g)
        ids = torch.tensor([[res * 8.0, res * 8.0, 0.0, 0.0, res * 8.0, res * 8.0]]).expand(batch, -1)
        ctx = layout.pack(ctx, pooled, ids)
    x = x.to(device).contiguous(memory_format=fmt)
    inputs = (x, t.to(device), ctx.to(device), target.to(device).contiguous(memory_format=fmt))

    kernel = "fused" if train_cfg.optimizer.fused else "foreach"  # as ldm_train.train.loop: no fallback
    opt_name = f"AdamW({kernel}=True)"

    def make_opt(model):
        return torch.optim.AdamW(model.parameters(), lr=1e-4, betas=tuple(train_cfg.optimizer.betas),
                                 weight_decay=train_cfg.optimizer.weight_decay, **{kernel: True})

    opt_ours, opt_theirs = make_opt(ours), make_opt(theirs)

    def ours_eager(s, ts, c):
        return ours(s, ts, c)

    def added(c):
        """diffusers' arguments for our (packed) context: the same tensors, sliced out."""
        if layout is None:
            return {"encoder_hidden_states": c}
        text, pooled_c, ids_c = layout.unpack(c)
        return {"encoder_hidden_states": text, "added_cond_kwargs": {"text_embeds": pooled_c, "time_ids": ids_c}}

    def theirs_eager(s, ts, c):
        return theirs(s, ts, **added(c), return_dict=False)[0]

    if args.compile:
        ours_c, theirs_c = torch.compile(ours), torch.compile(theirs)

        def ours_call(s, ts, c):
            return ours_c(s, ts, c)

        def theirs_call(s, ts, c):
            return theirs_c(s, ts, **added(c), return_dict=False)[0]
    else:
        ours_call, theirs_call = ours_eager, theirs_eager

    if args.dtype == "bf16":
        def autocast():
            return torch.autocast(device.type, dtype=torch.bfloat16)
    else:
        autocast = contextlib.nullcontext

    runners = [
        Runner("ours", ours, ours_call, opt_ours, inputs, autocast, device),
        Runner("diffusers", theirs, theirs_call, opt_theirs, inputs, autocast, device),
    ]
    static: dict[str, int] = {}  # each model's parameters + Adam state (CUDA memory accounting)

    peak = None
    if on_cuda and not args.no_flops:
        peak = matmul_peak_tflops(device)

    # Warm-up (the very first step of each model gives the loss on identical weights).
    for i in range(args.warmup):
        for r in runners:
            dt = r.timed_step()
            if i == 0:
                r.first_step_s = dt
    n_warm = len(runners[0].losses)

    # Timed: ABBA so that neither model always follows the other.
    for rep in range(args.reps):
        order = runners if rep % 2 == 0 else runners[::-1]
        for r in order:
            if on_cuda and rep == 0:
                # Memory of one model's step = peak minus what the other one keeps between steps
                # (its parameters and Adam state; grads are freed by zero_grad(set_to_none=True)).
                other = [o for o in runners if o is not r][0]
                other_static = _static_bytes(other.module, other.opt)
                torch.cuda.reset_peak_memory_stats(device)
            dt = r.timed_step()
            if on_cuda and rep == 0:
                r.peak_mem_bytes = torch.cuda.max_memory_allocated(device) - other_static
                static[r.name] = _static_bytes(r.module, r.opt)
            if r.first_step_s is None:
                r.first_step_s = dt
            r.times.append(dt)

    if on_cuda and not args.no_flops:
        r_ours, r_theirs = runners
        r_ours.flops = r_ours.count_flops(ours_eager)
        r_theirs.flops = r_theirs.count_flops(theirs_eager)

    models: dict[str, dict] = {}
    for r in runners:
        losses = [float(v) for v in r.losses]
        st = _summary(r.times)
        m = {
            "params": sum(p.numel() for p in r.module.parameters()),
            "first_loss": losses[0],
            "losses": losses,
            "first_step_s": r.first_step_s,
            "step_s": st,
            "img_per_s": batch / st["median"],
        }
        if on_cuda:
            m["peak_mem_gib"] = r.peak_mem_bytes / 2**30
            m["static_gib"] = static[r.name] / 2**30
        if r.flops is not None:
            m["tflop_per_step"] = r.flops / 1e12
            m["achieved_tflops"] = r.flops / st["median"] / 1e12
            if peak:
                m["mfu"] = m["achieved_tflops"] / peak
        models[r.name] = m

    paired = [b / a for a, b in zip(runners[0].times, runners[1].times)]
    l_ours, l_theirs = models["ours"]["first_loss"], models["diffusers"]["first_loss"]
    result = {
        "what": "unet_train_step",
        "config": args.config,
        "model_config": cfg.model_dump(),
        "model_config_file": chosen.get("model_file"),
        "diffusers_config": dcfg,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if on_cuda else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "dtype": args.dtype,
        "batch": batch,
        "res": res,
        "context_len": ctx_len,
        "compile": args.compile,
        "channels_last": args.channels_last,
        "grad_ckpt": args.grad_ckpt,
        "grad_ckpt_ours": ckpt_mode,
        "cudnn_benchmark": on_cuda,
        "optimizer": opt_name,
        "warmup": args.warmup,
        "reps": args.reps,
        "seed": args.seed,
        "build_s": build_s,
        "warmup_steps_recorded": n_warm,
        "matmul_bf16_peak_tflops": peak,
        "models": models,
        "ratio": {
            "definition": "diffusers_step_s / ours_step_s (> 1: ours faster)",
            "median_paired": statistics.median(paired),
            "min_paired": min(paired),
            "max_paired": max(paired),
            "of_medians": models["diffusers"]["step_s"]["median"] / models["ours"]["step_s"]["median"],
            "paired": paired,
        },
        "first_loss_rel_diff": abs(l_ours - l_theirs) / max(abs(l_theirs), 1e-30),
    }
    return result


# --- output -----------------------------------------------------------------------------------

def _fmt_s(s: float) -> str:
    return f"{s * 1e3:9.1f}ms" if s < 10 else f"{s:9.2f}s "


def _label(res: dict) -> str:
    parts = [res["config"], res["dtype"], f"b{res['batch']}", f"{res['res']}x{res['res']}"]
    if not res["device"].startswith("cuda"):
        parts.append(f"cpu{res['threads']}t")
    parts += [short for name, short in (("compile", "compile"), ("channels_last", "cl"), ("grad_ckpt", "ckpt"))
              if res.get(name)]
    return " ".join(parts)


def table(results: list[dict]) -> str:
    """One row per (run, model), then the ratio line per run."""
    cuda = any(r["device"].startswith("cuda") for r in results)
    head = f"{'run':<34} {'model':<9} {'params':>11} {'first loss':>11} {'min':>11} {'median':>11} {'max':>11} {'img/s':>8}"
    if cuda:
        head += f" {'peak GiB':>8} {'TFLOP/stp':>9} {'TFLOP/s':>8} {'MFU':>6}"
    lines = [head, "-" * len(head)]
    for res in results:
        for name in ("ours", "diffusers"):
            m = res["models"][name]
            st = m["step_s"]
            row = (f"{_label(res):<34} {name:<9} {m['params']:>11,} {m['first_loss']:>11.6f} "
                   f"{_fmt_s(st['min'])} {_fmt_s(st['median'])} {_fmt_s(st['max'])} {m['img_per_s']:>8.1f}")
            if cuda:
                def f(key, spec):
                    return format(m[key], spec) if m.get(key) is not None else "-"
                row += f" {f('peak_mem_gib', '8.1f'):>8} {f('tflop_per_step', '9.2f'):>9} {f('achieved_tflops', '8.1f'):>8} {f('mfu', '6.3f'):>6}"
            lines.append(row)
        ra = res["ratio"]
        lines.append(
            f"{'':<34} ratio diffusers/ours (>1: ours faster): median {ra['median_paired']:.3f} "
            f"(paired min {ra['min_paired']:.3f}, max {ra['max_paired']:.3f}; ratio of medians {ra['of_medians']:.3f}); "
            f"first-step loss rel diff {res['first_loss_rel_diff']:.1e}"
        )
    return "\n".join(lines)


def header(res: dict) -> str:
    lines = [
        f"U-Net training step, ours vs diffusers {res['diffusers']} (torch {res['torch']}) on "
        f"{res['device']} [{res['device_name']}], {res['threads']} CPU threads",
        f"config {res['config']}{' (' + res['model_config_file'] + ')' if res.get('model_config_file') else ''}: "
        f"{json.dumps(res['model_config'])}",
        f"batch {res['batch']}, latents {res['res']}x{res['res']}, context {res['context_len']} tokens, {res['dtype']}"
        f"{' autocast' if res['dtype'] == 'bf16' else ''}, {res['optimizer']}, compile={res['compile']}, "
        f"channels_last={res['channels_last']}, grad_ckpt={res['grad_ckpt']}"
        f"{' (ours: ' + res['grad_ckpt_ours'] + ')' if res['grad_ckpt'] else ''}, "
        f"warm-up {res['warmup']}, reps {res['reps']} (ABBA order)",
        f"first step (warm-up, compile included): ours {res['models']['ours']['first_step_s']:.2f}s, "
        f"diffusers {res['models']['diffusers']['first_step_s']:.2f}s (ours steps first and also pays the process's "
        "one-time costs)",
    ]
    if res.get("matmul_bf16_peak_tflops"):
        lines.append(f"bf16 matmul peak (8192^3, best of 10): {res['matmul_bf16_peak_tflops']:.1f} TFLOP/s")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = _parse(argv)
    if args.report:
        results = []
        for path in args.report:
            try:
                results.append(json.loads(Path(path).read_text()))
            except (OSError, ValueError) as e:
                print(f"bench_unet: skipping {path}: {e}", file=sys.stderr)
        if not results:
            return 1
        peaks = [r["matmul_bf16_peak_tflops"] for r in results if r.get("matmul_bf16_peak_tflops")]
        if peaks:
            print(f"bf16 matmul peak (best of the runs): {max(peaks):.1f} TFLOP/s on {results[0]['device_name']}")
        print(table(results))
        return 0
    res = run(args)
    print(header(res))
    print(table([res]))
    if args.json:
        print(f"wrote {write_json(args.json, res, indent=1)}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
