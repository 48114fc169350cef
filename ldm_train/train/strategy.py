"""Distribution strategies, applied from outside the model through HF Accelerate.

``distributed.strategy``:

- ``ddp``: every rank holds the model, gradients and optimizer states; gradients are all-reduced
  (torch DDP). A single process is the same path with a world of 1.
- ``zero1`` / ``zero2`` / ``zero3``: DeepSpeed ZeRO stage 1/2/3 partitions the optimizer states /
  + the gradients / + the parameters across ranks (Rajbhandari et al. 2020). Optional CPU offload
  of optimizer states (``offload_optimizer``) and, under ZeRO-3, of parameters (``offload_params``).

The DeepSpeed config is built here from the typed sections (batch size, accumulation, clipping,
precision, stage, offload); ``distributed.deepspeed_config`` names a JSON file to start from
(``launch/deepspeed/*.json``), whose keys this project sets are overridden and whose other keys
(bucket sizes, overlap, ...) are kept. Only the trainable U-Net goes through ``prepare``: the
frozen autoencoder and text tower never reach ZeRO's partitioning or the optimizer (training reads
pre-encoded latents).

On CPU the process group uses gloo: without ``InitProcessGroupKwargs(backend="gloo")`` each rank
would believe it is rank 0 of 1 while DeepSpeed ran a world of 2.
"""
from __future__ import annotations

import json
import os
import socket
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

from ..config import ConfigError, DistributedConfig, TrainConfig

ZERO_STAGES = {"zero1": 1, "zero2": 2, "zero3": 3}


def zero_stage(cfg: DistributedConfig) -> int:
    """0 for ddp, else the ZeRO stage."""
    return ZERO_STAGES.get(cfg.strategy, 0)


def check_strategy(cfg: DistributedConfig) -> None:
    if cfg.offload_params and cfg.strategy != "zero3":
        raise ConfigError("distributed.offload_params needs distributed.strategy=zero3 (only ZeRO-3 partitions parameters)")
    if cfg.offload_optimizer and cfg.strategy == "ddp":
        raise ConfigError("distributed.offload_optimizer needs a ZeRO strategy (distributed.strategy=zero1|zero2|zero3)")
    if cfg.strategy != "ddp" and cfg.cpu and torch.cuda.is_available():
        raise ConfigError(
            f"distributed.cpu=true cannot force DeepSpeed ({cfg.strategy}) onto the CPU of a GPU machine; "
            "use distributed.strategy=ddp, or hide the GPUs (CUDA_VISIBLE_DEVICES=)"
        )
    if cfg.deepspeed_config is not None and not Path(cfg.deepspeed_config).is_file():
        raise ConfigError(f"distributed.deepspeed_config: no such file {cfg.deepspeed_config}")


def deepspeed_config(dist_cfg: DistributedConfig, train_cfg: TrainConfig) -> dict:
    """The DeepSpeed JSON for this run (no ``auto`` values left for Accelerate to guess)."""
    base: dict = {}
    if dist_cfg.deepspeed_config is not None:
        try:
            base = json.loads(Path(dist_cfg.deepspeed_config).read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"distributed.deepspeed_config {dist_cfg.deepspeed_config}: not valid JSON ({e})") from None
        for key in ("optimizer", "scheduler"):  # the loop owns AdamW and the LR schedule
            if key in base:
                raise ConfigError(f"distributed.deepspeed_config {dist_cfg.deepspeed_config}: remove {key!r}; set train.* instead")
    zero = dict(base.get("zero_optimization", {}), stage=zero_stage(dist_cfg))
    if dist_cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if dist_cfg.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if zero["stage"] == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True  # raw weights in every checkpoint
    return dict(
        base,
        train_micro_batch_size_per_gpu=train_cfg.batch_size,
        gradient_accumulation_steps=dist_cfg.gradient_accumulation_steps,
        gradient_clipping=train_cfg.grad_clip,
        zero_optimization=zero,
        bf16={"enabled": dist_cfg.mixed_precision == "bf16"},
        fp16={"enabled": dist_cfg.mixed_precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        steps_per_print=base.get("steps_per_print", 10**9),
        wall_clock_breakdown=False,
    )


def make_accelerator(dist_cfg: DistributedConfig, train_cfg: TrainConfig | None = None) -> Accelerator:
    """The Accelerator for this strategy; the launcher's environment gives rank and world size."""
    check_strategy(dist_cfg)
    if dist_cfg.strategy != "ddp" and "RANK" not in os.environ:
        _single_process_env()
    use_cpu = dist_cfg.cpu or not torch.cuda.is_available()
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1 or dist_cfg.strategy != "ddp"
    gloo = InitProcessGroupKwargs(backend="gloo", timeout=timedelta(minutes=30))
    handlers = [gloo] if use_cpu and launched else []  # a lone DDP process needs no process group
    kwargs = dict(
        mixed_precision=dist_cfg.mixed_precision,
        gradient_accumulation_steps=dist_cfg.gradient_accumulation_steps,
        kwargs_handlers=handlers,
    )
    if dist_cfg.strategy == "ddp":
        # cpu=use_cpu, not dist_cfg.cpu: on a machine without a GPU, Accelerate given cpu=False under
        # torchrun reports DistributedType.NO, so it neither wraps the model in DDP (no gradient
        # all-reduce: each rank would train on its own) nor makes wait_for_everyone a barrier
        return Accelerator(cpu=use_cpu, **kwargs)
    if train_cfg is None:
        raise ValueError("a ZeRO strategy needs the train section (batch size, clipping)")
    # cpu=True would make Accelerate drop the DeepSpeed plugin; DeepSpeed finds the CPU itself
    plugin = DeepSpeedPlugin(hf_ds_config=deepspeed_config(dist_cfg, train_cfg))
    return Accelerator(deepspeed_plugin=plugin, **kwargs)


def _single_process_env() -> None:
    """DeepSpeed always runs a process group; without a launcher it would look for MPI. A lone
    process (``ldm-train train`` on one GPU) gets the environment a launcher would give it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def is_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.state.deepspeed_plugin is not None


def all_ranks_true(flag: bool, accelerator: Accelerator) -> bool:
    """True only if ``flag`` is true on every rank (one tiny all-reduce)."""
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor([0 if flag else 1], device=accelerator.device, dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item()) == 0


def any_rank_true(flag: bool, accelerator: Accelerator) -> bool:
    return not all_ranks_true(not flag, accelerator)


def gather_chunks(accelerator: Accelerator):
    """``chunk -> [chunk of rank 0, ..., chunk of rank W-1]`` (equal sizes), for EMA consolidation."""

    def gather(chunk: torch.Tensor) -> list[torch.Tensor]:
        if accelerator.num_processes == 1:
            return [chunk]
        out = [torch.empty_like(chunk) for _ in range(accelerator.num_processes)]
        dist.all_gather(out, chunk.contiguous())
        return out

    return gather
