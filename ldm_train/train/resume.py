"""Saving and restoring the whole training state, for every strategy (layout: checkpoint.py).

Exactness: model, optimizer, LR scheduler, grad scaler, every EMA, the step/sample counters,
every rank's torch RNG state and its data and noise generators are restored, so on a
deterministic device (CPU) a run of 2N steps equals N steps + resume + N steps bit for bit.

Elastic: a checkpoint of W ranks resumes on W' ranks (reshard.py says what each part becomes);
the data position carries over exactly, the reduction order (and so the bits) cannot.
"""
from __future__ import annotations

import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator

from ..errors import UserError
from . import checkpoint as ck
from . import reshard
from .async_save import CheckpointWriter, SaveJob, frozen_ema, host_copy
from .ema import EMA
from .lora import has_adapter, load_adapter, rank_alpha, select_adapter
from .strategy import any_rank_true, is_deepspeed

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
    deepspeed = is_deepspeed(acc)
    tmp = _begin(acc, ckpt_root, step, deepspeed)
    adapter = has_adapter(acc.unwrap_model(parts.model))
    written, failed = [], None
    if deepspeed:  # every rank writes its partition; a LoRA's frozen base is rebuilt on resume, not saved
        try:
            with ck.writing(tmp / "deepspeed"):
                parts.model.save_checkpoint(str(tmp / "deepspeed"), tag=DS_TAG, exclude_frozen_parameters=adapter)
        except OSError as e:  # a full disk: the commit tells every rank, and removes the partial save
            failed = ck.write_failure(e)
            # save_checkpoint's writes all come after its other collectives and before its closing
            # barrier, where the ranks that wrote wait: meet them there (else they hang)
            acc.wait_for_everyone()
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


def _begin(acc: Accelerator, ckpt_root: Path, step: int, deepspeed: bool) -> Path:
    """Rank 0 creates ``step-N.tmp`` (and DeepSpeed's folder in it, so that save_checkpoint's own
    ``makedirs``, which come before its collectives, cannot fail on one rank); all ranks learn
    together whether that worked."""
    tmp, failed = ck.step_dir(ckpt_root, step, tmp=True), None
    if acc.is_main_process:
        try:
            ck.begin_save(ckpt_root, step)
            if deepspeed:
                (tmp / "deepspeed" / DS_TAG).mkdir(parents=True)
        except OSError as e:
            failed = ck.write_failure(e)
            ck.discard_save(ckpt_root, step)
    if any_rank_true(failed is not None, acc):  # also the barrier: the folder exists for every rank
        raise ck.CheckpointWriteError(
            f"checkpoint of step {step} not saved (rank 0: {failed or 'see its error'}); the previous checkpoint "
            f"under {ckpt_root} is intact: free space there and re-run to resume")
    return tmp


def adapter_metadata(module: torch.nn.Module) -> dict[str, str]:
    """What a LoRA file reader needs beside the tensors (safetensors metadata is str -> str)."""
    rank, alpha = rank_alpha(module)
    return {"format": "peft_lora", "lora_rank": str(rank), "lora_alpha": repr(alpha)}


def check_compatible(ckpt: Path, parts: TrainParts, strategy: str) -> dict:
    """The checkpoint's state.json, if this run can continue it: the same strategy and EMA
    decays (another world size or EMA sharding is converted, not refused)."""
    state = ck.read_state(ckpt)
    if state.get("strategy") != strategy:
        raise ResumeError(f"{ckpt} was saved with distributed.strategy={state.get('strategy')}, this run uses "
                          f"{strategy}: resume with distributed.strategy={state.get('strategy')} (or start over with --overwrite)")
    if state["ema"]["decays"] != parts.ema.decays:
        raise ResumeError(f"{ckpt} holds EMAs {state['ema']['decays']}; this run wants {parts.ema.decays} (train.ema_decays)")
    if not isinstance(state.get("world_size"), int) or state["world_size"] < 1:
        raise ResumeError(f"{ckpt}/state.json: world_size={state.get('world_size')!r} is not a process count")
    return state


def _restore_model(parts: TrainParts, ckpt: Path, state: dict, adapter: bool) -> None:
    acc = parts.accelerator
    module = acc.unwrap_model(parts.model)
    if is_deepspeed(acc):  # LoRA: the checkpoint has the adapter only, the base is already in place
        if state["world_size"] == acc.num_processes:
            parts.model.load_checkpoint(str(ckpt / "deepspeed"), tag=DS_TAG, load_module_strict=not adapter)
            return
        if adapter:
            raise ResumeError(f"{ckpt}: a LoRA run under {state['strategy']} resumes on {state['world_size']} "
                              f"processes only (this run has {acc.num_processes}); DeepSpeed's universal checkpoint "
                              "needs every parameter, and a LoRA checkpoint leaves the frozen base out")
        folder = reshard.universal_folder(ckpt)
        if acc.is_main_process:
            reshard.convert_to_universal(ckpt, DS_TAG)
        acc.wait_for_everyone()
        reshard.load_universal(parts.model, folder, DS_TAG, strict=True)
        acc.wait_for_everyone()
        if acc.is_main_process:
            shutil.rmtree(folder, ignore_errors=True)
        return
    if adapter:
        load_adapter(module, ck.load_weights(ckpt, "model"))
    else:
        module.load_state_dict(ck.load_weights(ckpt, "model"))
    parts.optimizer.load_state_dict(ck.load_optimizer_state(ckpt))  # full on every rank: any world size
    if acc.scaler is not None and "grad_scaler" in state:
        acc.scaler.load_state_dict(state["grad_scaler"])


def _restore_ema(parts: TrainParts, ckpt: Path, state: dict) -> None:
    layout = parts.ema.layout
    if state["ema"]["world"] == layout.world:
        chunk, num_updates = ck.load_ema_chunk(ckpt, layout.rank, layout.world)
    else:  # another world size (sharded EMA) or distributed.ema_sharded changed: re-cut
        chunk, num_updates = reshard.recut_ema(ckpt, layout, len(parts.ema.decays))
    parts.ema.load_state_dict(chunk, num_updates)


def _restore_rank(parts: TrainParts, ckpt: Path, state: dict) -> None:
    """This rank's RNG streams and data state: its own file on the same world size; else the data
    position (every old rank's agrees) and fresh streams seeded for (seed, step, world, rank)."""
    acc = parts.accelerator
    rank, world = acc.process_index, acc.num_processes
    if state["world_size"] == world:
        tensors, meta = ck.read_rank_state(ckpt, rank)
        parts.batches.load(tensors, meta["data"])
        torch.set_rng_state(tensors["torch_cpu"])
        parts.noise_gen.set_state(tensors["noise_generator"])
        if "torch_cuda" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(tensors["torch_cuda"], acc.device)
        return
    tensors, data = reshard.saved_data_state(ckpt, state["world_size"])
    parts.batches.load(tensors, data)
    seed = [state.get("seed", 0), state["step"], world, rank]
    parts.batches.reseed(reshard.rank_seed(*seed, 0))
    torch.manual_seed(reshard.rank_seed(*seed, 1))  # the CPU and every CUDA device
    parts.noise_gen.manual_seed(reshard.rank_seed(*seed, 2))
    if acc.is_main_process:
        per_rank = parts.batches.batch_size * acc.gradient_accumulation_steps
        print(f"[ldm_train] elastic resume of {ckpt} (saved by {state['world_size']} processes) on {world}: "
              f"global batch {per_rank * state['world_size']} -> {per_rank * world} samples per step "
              f"(train.batch_size stays per process; the LR schedule continues by step)", file=sys.stderr, flush=True)


def restore_training_state(parts: TrainParts, ckpt: Path, strategy: str) -> None:
    """Load ``ckpt`` into ``parts`` (every rank calls this), converting a checkpoint of another
    world size (reshard.py)."""
    ck.verify_checkpoint(ckpt, contents=False)  # every file there, at its size (digests: when it was picked)
    state = check_compatible(ckpt, parts, strategy)
    adapter = has_adapter(parts.accelerator.unwrap_model(parts.model))
    if adapter != state.get("lora", False):
        raise ResumeError(f"{ckpt} was saved {'with' if state.get('lora') else 'without'} train.lora; this run "
                          f"trains {'a LoRA adapter' if adapter else 'full weights'}")
    _restore_model(parts, ckpt, state, adapter)
    parts.scheduler.load_state_dict(state["lr_scheduler"])
    for group, lr in zip(parts.scheduler.optimizer.param_groups, parts.scheduler.get_last_lr()):
        group["lr"] = lr  # the LR of the next step, whatever the optimizer's own checkpoint held
    _restore_ema(parts, ckpt, state)
    _restore_rank(parts, ckpt, state)
    parts.counters = Counters(state["step"], state["samples_seen"], state["nonfinite_skipped"])
