"""The denoiser's optimizer and LR schedule, from ``train.optimizer`` and ``train.lr_schedule``.

Optimizers (``train.optimizer.name``; the keys each one reads are in :data:`READS`):

- ``adamw``: ``torch.optim.AdamW``, the fused kernel where ``fused`` (not under DeepSpeed, which
  steps flat fp32 partitions itself).
- ``adamw8bit``: bitsandbytes' ``AdamW8bit`` (block-wise 8-bit moments), where bitsandbytes imports
  and one step runs on the device (``pip install 'ldm_train[bnb]'``); refused with the reason otherwise.
- ``adafactor``: ``torch.optim.Adafactor`` (factored second moment of each 2-D+ weight), else
  ``transformers.optimization.Adafactor`` on an older torch. Refused under ZeRO (see below).
- ``prodigy``: ``prodigyopt.Prodigy`` (learning-rate free: ``train.lr`` multiplies its estimate
  ``d``, so set ``train.lr=1.0``).
- ``lion``: ``torch.optim.Lion`` where torch has it, else ``lion_pytorch.Lion`` (sign updates; use a
  3-10x smaller ``train.lr`` and a larger ``weight_decay`` than for AdamW).

Under DeepSpeed ZeRO (every stage) Accelerate hands our optimizer to DeepSpeed as its client
optimizer, which then steps it on each rank's *flat 1-D fp32 partition* of all parameters, not on
the parameters: element-wise optimizers (AdamW, AdamW8bit, Lion) are unaffected; Prodigy's global
sums are all-reduced over ranks (its ``fsdp_in_use``), so every rank uses the same ``d``; Adafactor's
factored second moment and its per-tensor RMS scaling need each weight's own shape, so it is refused.
prodigyopt's all-reduce uses CUDA tensors: Prodigy under ZeRO with several processes needs GPUs.
With ``distributed.offload_optimizer`` Accelerate replaces any client optimizer by DeepSpeed's CPU
Adam, so only ``adamw`` is allowed there.
"""
from __future__ import annotations

import functools
import os

import torch

from ..config import ConfigError, DistributedConfig, LRScheduleConfig, OptimizerConfig, TrainConfig
from ..utils.lr import schedule_lambda

# The keys of train.optimizer each optimizer reads (name aside); another key at a non-default value is refused.
READS: dict[str, tuple[str, ...]] = {
    "adamw": ("betas", "weight_decay", "eps", "fused"),
    "adamw8bit": ("betas", "weight_decay", "eps"),
    "adafactor": ("weight_decay",),
    "prodigy": ("betas", "weight_decay", "eps", "d_coef"),
    "lion": ("betas", "weight_decay"),
}
# The keys of train.lr_schedule each schedule reads (warmup_steps: all of them).
SCHEDULE_READS: dict[str, tuple[str, ...]] = {
    "constant": ("warmup_steps",),
    "linear": ("warmup_steps", "min_lr_ratio"),
    "cosine": ("warmup_steps", "min_lr_ratio"),
    "cosine_restarts": ("warmup_steps", "min_lr_ratio", "num_cycles"),
}
# optimizer -> why it cannot run under a ZeRO strategy (DeepSpeed steps flat partitions)
ZERO_UNSUPPORTED = {
    "adafactor": "its factored second moment and per-tensor RMS scaling need each weight's 2-D shape, and "
                 "DeepSpeed ZeRO steps the optimizer on flat 1-D partitions",
}


def _unread(section, reads: tuple[str, ...]) -> list[str]:
    defaults = type(section)()
    return [k for k in type(section).model_fields
            if k != "name" and k not in reads and getattr(section, k) != getattr(defaults, k)]


def _probe_device(dist_cfg: DistributedConfig) -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() and not dist_cfg.cpu else "cpu")


@functools.lru_cache(maxsize=None)
def bnb_unavailable(device: str) -> str | None:
    """Why bitsandbytes' AdamW8bit cannot run on ``device`` (None: one step of it ran there)."""
    try:
        import bitsandbytes as bnb
    except Exception as e:  # ImportError, or a broken native library
        return f"bitsandbytes does not import ({type(e).__name__}: {e}); pip install 'ldm_train[bnb]'"
    try:
        p = torch.nn.Parameter(torch.zeros(4096, device=device))  # >= bnb's min_8bit_size: the 8-bit path
        opt = bnb.optim.AdamW8bit([p], lr=1e-3)
        p.grad = torch.ones_like(p)
        opt.step()
        if not torch.isfinite(p).all():
            return f"bitsandbytes {bnb.__version__}: AdamW8bit gave non-finite values on {device}"
    except Exception as e:
        return f"bitsandbytes {getattr(bnb, '__version__', '?')} cannot step AdamW8bit on {device} ({type(e).__name__}: {e})"
    return None


def _package_missing(name: str, device: str) -> str | None:
    if name == "adamw8bit":
        return bnb_unavailable(device)
    if name == "prodigy":
        try:
            import prodigyopt  # noqa: F401
        except ImportError as e:
            return f"package prodigyopt is not installed ({e}); pip install prodigyopt"
    if name == "lion" and not hasattr(torch.optim, "Lion"):
        try:
            import lion_pytorch  # noqa: F401
        except ImportError as e:
            return f"package lion-pytorch is not installed ({e}); pip install lion-pytorch"
    if name == "adafactor" and not hasattr(torch.optim, "Adafactor"):
        try:
            from transformers.optimization import Adafactor  # noqa: F401
        except ImportError as e:
            return f"torch {torch.__version__} has no Adafactor and transformers does not import ({e})"
    return None


def check_optimizer(train_cfg: TrainConfig, dist_cfg: DistributedConfig, device: torch.device | None = None,
                    world: int | None = None) -> None:
    """Refuse, before any work, an optimizer or schedule this run cannot use, naming the key: a key
    the chosen one does not read, a package that is missing or does not run on the device, a
    strategy it does not support. Called by the train stage first and when the loop builds it."""
    opt, sched = train_cfg.optimizer, train_cfg.lr_schedule
    if unread := _unread(opt, READS[opt.name]):
        raise ConfigError(f"train.optimizer.{unread[0]}: not read by train.optimizer.name={opt.name} "
                          f"(it reads {', '.join(READS[opt.name])})")
    if unread := _unread(sched, SCHEDULE_READS[sched.name]):
        raise ConfigError(f"train.lr_schedule.{unread[0]}: not read by train.lr_schedule.name={sched.name} "
                          f"(it reads {', '.join(SCHEDULE_READS[sched.name])})")
    strategy = dist_cfg.strategy
    if strategy != "ddp" and opt.name in ZERO_UNSUPPORTED:
        raise ConfigError(f"train.optimizer.name={opt.name} is not supported with distributed.strategy={strategy}: "
                          f"{ZERO_UNSUPPORTED[opt.name]}; use strategy=ddp or another optimizer")
    if dist_cfg.offload_optimizer and opt.name != "adamw":
        raise ConfigError(f"train.optimizer.name={opt.name} cannot run with distributed.offload_optimizer=true: "
                          "Accelerate replaces the client optimizer by DeepSpeed's CPU Adam there; use adamw")
    device = device or _probe_device(dist_cfg)
    world = world if world is not None else int(os.environ.get("WORLD_SIZE", "1"))
    if opt.name == "prodigy" and strategy != "ddp" and world > 1 and device.type != "cuda":
        raise ConfigError(f"train.optimizer.name=prodigy is not supported with distributed.strategy={strategy} on "
                          f"{device.type} with {world} processes: prodigyopt all-reduces its sums over the ZeRO "
                          "partitions through CUDA tensors only; use strategy=ddp here, or GPUs")
    if reason := _package_missing(opt.name, str(device)):
        raise ConfigError(f"train.optimizer.name={opt.name} is unavailable: {reason}")


def build_optimizer(params, train_cfg: TrainConfig, *, deepspeed: bool, world: int) -> torch.optim.Optimizer:
    """The optimizer of ``train.optimizer`` over ``params`` (call :func:`check_optimizer` first)."""
    c: OptimizerConfig = train_cfg.optimizer
    lr, wd, betas = train_cfg.lr, c.weight_decay, tuple(c.betas)
    if c.name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=c.eps, weight_decay=wd,
                                 fused=(c.fused and not deepspeed) or None)
    if c.name == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=lr, betas=betas, eps=c.eps, weight_decay=wd)
    if c.name == "adafactor":
        if hasattr(torch.optim, "Adafactor"):
            return torch.optim.Adafactor(params, lr=lr, weight_decay=wd)
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=lr, weight_decay=wd, scale_parameter=False, relative_step=False)
    if c.name == "prodigy":
        from prodigyopt import Prodigy

        # ZeRO: each rank steps its own partition; all-reduce Prodigy's sums so d is global and equal
        return Prodigy(params, lr=lr, betas=betas, eps=c.eps, weight_decay=wd, d_coef=c.d_coef,
                       fsdp_in_use=deepspeed and world > 1)
    if c.name == "lion":
        if hasattr(torch.optim, "Lion"):
            return torch.optim.Lion(params, lr=lr, betas=betas, weight_decay=wd)
        from lion_pytorch import Lion

        return Lion(params, lr=lr, betas=betas, weight_decay=wd)
    raise ConfigError(f"train.optimizer.name: unknown optimizer {c.name!r}")  # unreachable: the config's Literal


def build_lr_scheduler(opt: torch.optim.Optimizer, train_cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """``LambdaLR`` over ``train.steps`` with the multiplier of ``train.lr_schedule`` (its state,
    the step count, is in every checkpoint's state.json)."""
    s: LRScheduleConfig = train_cfg.lr_schedule
    f = schedule_lambda(s.name, s.warmup_steps, train_cfg.steps, decay_start=s.warmup_steps,
                        min_lr_ratio=s.min_lr_ratio, num_cycles=s.num_cycles)
    return torch.optim.lr_scheduler.LambdaLR(opt, f)
