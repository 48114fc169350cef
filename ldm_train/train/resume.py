"""Saving and restoring the whole training state, for every strategy (layout: checkpoint.py).

Exactness: model, optimizer, LR scheduler, grad scaler, every EMA, the step/sample counters,
every rank's torch RNG state and its data and noise generators are restored, so on a
deterministic device (CPU) a run of 2N steps equals N steps + resume + N steps bit for bit.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator

from ..errors import UserError
from . import checkpoint as ck
from .async_save import CheckpointWriter, SaveJob, frozen_ema, host_copy
from .ema import EMA
from .lora import has_adapter, load_adapter, rank_alpha, select_adapter
from .strategy import is_deepspeed

DS_TAG = "state"


@dataclass
class Counters:
    step: int = 0  # optimizer steps taken (skipped non-finite steps included)
    samples_seen: int = 0  # over all ranks
    nonfinite_skipped: int = 0


@dataclass
class TrainParts:
    """Everything the loop mutates, as one bundle for save/restore."""

    accelerator: Accelerator
    model: torch.nn.Module  # as returned by accelerator.prepare (DDP wrapper or DeepSpeed engine)
    optimizer: object
    scheduler: object
    ema: EMA
    batches: object  # MemoryBatches or a streaming source with state()/load()
    noise_gen: torch.Generator
    counters: Counters = field(default_factory=Counters)


class ResumeError(UserError):
    """A checkpoint that cannot resume this run (another world size, strategy or EMA set)."""


def _rank_tensors(parts: TrainParts) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, meta = parts.batches.state()
    tensors = dict(tensors, torch_cpu=torch.get_rng_state(), noise_generator=parts.noise_gen.get_state())
    if torch.cuda.is_available():
        tensors["torch_cuda"] = torch.cuda.get_rng_state(parts.accelerator.device)
    return tensors, {"data": meta}


def save_training_state(parts: TrainParts, ckpt_root: Path, keep_last: int, milestones: list[int], extra: dict,
                        writer: CheckpointWriter | None = None) -> Path:
    """Every rank calls this; returns the ``step-N`` folder, published on return unless ``writer``
    is asynchronous (then once ``writer.wait()`` returns; see async_save.py)."""
    acc, step = parts.accelerator, parts.counters.step
    writer = writer or CheckpointWriter(acc.num_processes, asynchronous=False)
    writer.wait()  # the previous save is published before this one starts
    if acc.is_main_process:
        ck.begin_save(ckpt_root, step)
    acc.wait_for_everyone()
    tmp = ck.step_dir(ckpt_root, step, tmp=True)
    deepspeed = is_deepspeed(acc)
    adapter = has_adapter(acc.unwrap_model(parts.model))
    written, failed = [], None
    if deepspeed:  # every rank writes its partition; a LoRA's frozen base is rebuilt on resume, not saved
        try:
            with ck.writing(tmp / "deepspeed"):
                parts.model.save_checkpoint(str(tmp / "deepspeed"), tag=DS_TAG, exclude_frozen_parameters=adapter)
        except OSError as e:  # a full disk: the commit tells every rank, and removes the partial save
            failed = ck.write_failure(e)
        acc.wait_for_everyone()  # all of DeepSpeed's files are there: each rank digests its own
        written = [] if failed else ck.owned_files(tmp, acc.process_index, acc.num_processes, under="deepspeed")
    weights = acc.get_state_dict(parts.model)  # a collective under ZeRO-3 (gathered to rank 0)
    copy = writer.asynchronous  # the writer's tensors must not change while training goes on
    tensors, meta = _rank_tensors(parts)
    job = SaveJob(ckpt_root, step, keep_last, milestones, acc.process_index, acc.num_processes,
                  frozen_ema(parts.ema, copy), host_copy(tensors, copy), host_copy(meta, copy), written=written, failed=failed)
    if acc.is_main_process:
        job.weights = host_copy(select_adapter(weights) if adapter else weights, copy)
        job.weights_metadata = adapter_metadata(acc.unwrap_model(parts.model)) if adapter else None
        if not deepspeed:
            job.optimizer = host_copy(parts.optimizer.state_dict(), copy)
        state = dict(asdict(parts.counters), world_size=acc.num_processes, lora=adapter, **extra)
        state["ema"] = {"decays": parts.ema.decays, "num_updates": parts.ema.num_updates, "world": parts.ema.layout.world}
        state["lr_scheduler"] = parts.scheduler.state_dict()
        if not deepspeed:
            if acc.scaler is not None:
                state["grad_scaler"] = acc.scaler.state_dict()
        job.state = host_copy(state, copy)
    return writer.submit(job)


def adapter_metadata(module: torch.nn.Module) -> dict[str, str]:
    """What a LoRA file reader needs beside the tensors (safetensors metadata is str -> str)."""
    rank, alpha = rank_alpha(module)
    return {"format": "peft_lora", "lora_rank": str(rank), "lora_alpha": repr(alpha)}


def check_compatible(ckpt: Path, parts: TrainParts, strategy: str) -> dict:
    state = ck.read_state(ckpt)
    acc = parts.accelerator
    if state.get("world_size") != acc.num_processes:
        raise ResumeError(
            f"{ckpt} was saved by {state.get('world_size')} processes, this run has {acc.num_processes}: "
            "resume with the same number of processes (or start over with --overwrite)"
        )
    if state.get("strategy") != strategy:
        raise ResumeError(f"{ckpt} was saved with distributed.strategy={state.get('strategy')}, this run uses {strategy}")
    if state["ema"]["decays"] != parts.ema.decays or state["ema"]["world"] != parts.ema.layout.world:
        raise ResumeError(
            f"{ckpt} holds EMAs {state['ema']['decays']} over {state['ema']['world']} shard(s); this run wants "
            f"{parts.ema.decays} over {parts.ema.layout.world} (train.ema_decays, distributed.ema_sharded)"
        )
    return state


def restore_training_state(parts: TrainParts, ckpt: Path, strategy: str) -> None:
    """Load ``ckpt`` into ``parts`` (every rank calls this)."""
    ck.verify_checkpoint(ckpt, contents=False)  # every file there, at its size (digests: when it was picked)
    state = check_compatible(ckpt, parts, strategy)
    acc = parts.accelerator
    module = acc.unwrap_model(parts.model)
    adapter = has_adapter(module)
    if adapter != state.get("lora", False):
        raise ResumeError(f"{ckpt} was saved {'with' if state.get('lora') else 'without'} train.lora; this run "
                          f"trains {'a LoRA adapter' if adapter else 'full weights'}")
    if is_deepspeed(acc):  # LoRA: the checkpoint has the adapter only, the base is already in place
        parts.model.load_checkpoint(str(ckpt / "deepspeed"), tag=DS_TAG, load_module_strict=not adapter)
    else:
        if adapter:
            load_adapter(module, ck.load_weights(ckpt, "model"))
        else:
            module.load_state_dict(ck.load_weights(ckpt, "model"))
        parts.optimizer.load_state_dict(ck.load_optimizer_state(ckpt))
        if acc.scaler is not None and "grad_scaler" in state:
            acc.scaler.load_state_dict(state["grad_scaler"])
    parts.scheduler.load_state_dict(state["lr_scheduler"])
    for group, lr in zip(parts.scheduler.optimizer.param_groups, parts.scheduler.get_last_lr()):
        group["lr"] = lr  # the LR of the next step, whatever the optimizer's own checkpoint held
    chunk, num_updates = ck.load_ema_chunk(ckpt, parts.ema.layout.rank, parts.ema.layout.world)
    parts.ema.load_state_dict(chunk, num_updates)
    tensors, meta = ck.read_rank_state(ckpt, acc.process_index)
    parts.batches.load(tensors, meta["data"])
    torch.set_rng_state(tensors["torch_cpu"])
    parts.noise_gen.set_state(tensors["noise_generator"])
    if "torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["torch_cuda"], acc.device)
    parts.counters = Counters(state["step"], state["samples_seen"], state["nonfinite_skipped"])
