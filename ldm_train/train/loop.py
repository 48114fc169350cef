"""The denoiser training loop: one plain function, with logging, checkpointing and evaluation as
separate calls on intervals (the nanoGPT / DiT ``train.py`` shape).

Distribution enters only here, through HF Accelerate (DDP or DeepSpeed ZeRO, see strategy.py):
``accelerator.prepare`` wraps the model from outside, so ``model/`` and ``diffusion/`` stay free
of accelerate and torch.distributed. A step is one optimizer step of
``distributed.gradient_accumulation_steps`` micro-batches of ``train.batch_size`` per rank.
"""
from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from tqdm import tqdm

from ..config import DiffusionConfig, DistributedConfig, ModelConfig, TrainConfig
from ..diffusion import build_objective, build_schedule
from ..model import build_unet
from ..model.unet import context_layout
from ..utils.runs import MetricsLog
from .batches import DevicePrefetch, MemoryBatches, StreamBatches, check_conditioning
from ..errors import Preempted
from .control import NonFiniteGuard, SignalFlag, Watchdog
from .outcome import Readback, StepOutcome
from .ema import EMA, Layout, local_chunks, param_shapes
from .lora import (TEXT_PREFIX, UNET_PREFIX, add_adapter, base_unet, conditioned, load_adapter, read_adapter_file,
                   read_text_adapter_file, split_parts, trainable_parameters)
from .optim import build_lr_scheduler, build_optimizer, check_optimizer
from .async_save import CheckpointWriter
from .resume import TrainParts, restore_training_state, save_training_state
from .strategy import any_rank_true, all_ranks_true, gather_chunks, is_deepspeed, make_accelerator, zero_stage
from .telemetry import Telemetry, Writers, forward_flops, memory_gib, peak_flops

__all__ = ["TrainResult", "make_accelerator", "train_denoiser"]


@dataclass
class TrainResult:
    steps: int
    final_loss: float
    seconds: float
    checkpoint: Path | None
    losses: list[tuple[int, float]] = field(default_factory=list)
    resumed_from: Path | None = None
    nonfinite_skipped: int = 0


def build_parts(model_cfg, train_cfg, dist_cfg, accelerator, batches, seed, adapter_init=None, text=None) -> TrainParts:
    """Model, optimizer and LR schedule (train.optimizer, train.lr_schedule; see optim.py) and EMA,
    prepared for the strategy. Only the U-Net goes through ``prepare``: the frozen autoencoder and
    text tower are not part of training at all. With ``train.lora`` the optimizer and the EMA hold
    the adapter only; ``adapter_init`` (PEFT naming) is a LoRA to continue. With
    ``train.lora.text_encoder`` the prepared model is a :class:`~.lora.TextConditioned` (U-Net + a copy
    of ``text``'s CLIPTextModel, each with its adapter): both adapters are trained, averaged and saved."""
    check_optimizer(train_cfg, dist_cfg, accelerator.device, accelerator.num_processes)
    model = base_unet(model_cfg, seed, fork=False)  # init_from: e.g. a pretrained SD U-Net folder
    if train_cfg.lora.enabled:  # frozen base + adapter: only the adapter is trainable (lora.py)
        add_adapter(model, train_cfg.lora)
        unet_init, text_init = split_parts(adapter_init) if adapter_init is not None else (None, {})
        if unet_init is not None:
            load_adapter(model, unet_init)
        if train_cfg.lora.text_encoder:
            if text is None:
                raise ValueError("train.lora.text_encoder: the loop needs the text tower (train_denoiser(text=...))")
            model = conditioned(model, text, train_cfg.lora)
            if text_init:
                load_adapter(model.text, text_init)
    if train_cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = build_optimizer(trainable_parameters(model), train_cfg, deepspeed=is_deepspeed(accelerator),
                          world=accelerator.num_processes)
    # The scheduler is stepped here once per applied optimizer step, not through Accelerate
    # (whose wrapper steps it once per process, and which DeepSpeed would not step at all).
    sched = build_lr_scheduler(opt, train_cfg)
    model, opt = accelerator.prepare(model, opt)
    zero3 = zero_stage(dist_cfg) == 3
    module = accelerator.unwrap_model(model)
    sharded = zero3 or (dist_cfg.ema_sharded and accelerator.num_processes > 1)
    rank, world = (accelerator.process_index, accelerator.num_processes) if sharded else (0, 1)
    layout = Layout(rank, world, param_shapes(module, zero3))
    ema = EMA(local_chunks(module, layout, zero3), layout, train_cfg.ema_decays, train_cfg.ema_warmup)
    noise_gen = torch.Generator(device=accelerator.device).manual_seed(seed + 1_000_003 + accelerator.process_index)
    return TrainParts(accelerator, model, opt, sched, ema, batches, noise_gen)


def _device_skip(opt) -> torch.optim.Optimizer | None:
    """The torch optimizer inside ``opt`` if it can skip a step on the device: torch's fused
    Adam/AdamW/SGD set ``_step_supports_amp_scaling`` and read ``self.found_inf`` in ``step()``
    (the GradScaler protocol); their kernels change nothing where ``found_inf == 1``."""
    inner = getattr(opt, "optimizer", opt)  # Accelerate's AcceleratedOptimizer wraps it
    return inner if getattr(inner, "_step_supports_amp_scaling", False) else None


def _ddp_step(parts: TrainParts, step_model, objective, micro, clip: float, fp16: bool, before_update: Callable[[], None],
              step: int, ema_due: bool) -> tuple[list, StepOutcome]:
    """Accumulate over the micro-batches (no gradient all-reduce until the last), clip, step.
    A non-finite gradient norm (a NaN loss on any rank makes it NaN on all) skips the update:
    decided on the device where the optimizer takes ``found_inf`` (the host learns it a step
    later, see outcome.py), else on the host at once. ``before_update`` settles the previous step
    (its LR scheduler step sets this step's LR)."""
    acc, model, opt = parts.accelerator, parts.model, parts.optimizer
    losses = []
    for i, batch in enumerate(micro):
        last = i == len(micro) - 1
        sync = nullcontext() if last or acc.num_processes == 1 else model.no_sync()
        with sync, acc.autocast():
            loss, stats = objective(step_model, *batch, parts.noise_gen)
            acc.backward(loss)  # Accelerate divides by the accumulation steps
        losses.append(stats["loss"])
    norm = acc.clip_grad_norm_(model.parameters(), clip if clip > 0 else math.inf)  # a device tensor
    before_update()
    fused = None if fp16 else _device_skip(opt)
    if fused is not None:
        fused.found_inf = (~torch.isfinite(norm)).float()
        opt.step()
        del fused.found_inf
        outcome = StepOutcome(step, Readback(norm.detach().float().reshape(1)), ema_due)
    else:  # this optimizer (or fp16's grad scaler) decides on the host: one read per step
        norm = float(norm)
        applied = math.isfinite(norm)
        if applied or fp16:  # under fp16 the grad scaler skips overflowing steps itself
            opt.step()
            applied = not (fp16 and opt.step_was_skipped)
        outcome = StepOutcome(step, norm, ema_due, applied)
    opt.zero_grad(set_to_none=True)
    return losses, outcome


def _deepspeed_step(parts: TrainParts, objective, next_batch, gas: int, guard: NonFiniteGuard, step: int,
                    ema_due: bool) -> tuple[list, StepOutcome]:
    """DeepSpeed accumulates, clips and steps inside ``engine.step()``. A micro-batch whose loss
    is non-finite on any rank is dropped on all ranks before backward (so DeepSpeed's
    accumulation boundaries stay aligned) and replaced by the next batch; it counts in the guard.
    That agreement is one all-reduce per micro-batch, read on the host (DeepSpeed's own overflow
    and norm bookkeeping read device values in ``step()`` too)."""
    acc, engine = parts.accelerator, parts.model
    losses, skipped_before = [], getattr(engine, "skipped_steps", 0)
    precision = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(acc.mixed_precision)
    while len(losses) < gas:
        # DeepSpeed casts the weights to bf16/fp16 but not the inputs: autocast does (Accelerate's is off here)
        with torch.autocast(acc.device.type, dtype=precision, enabled=precision is not None):
            loss, stats = objective(engine, *next_batch(), parts.noise_gen)
        if not all_ranks_true(bool(torch.isfinite(loss.detach())), acc):
            guard.record(False, step)
            continue
        engine.backward(loss)
        engine.step()
        losses.append(stats["loss"])
    norm = engine.get_global_grad_norm()
    norm = float(norm) if norm is not None else float("nan")
    applied = getattr(engine, "skipped_steps", 0) == skipped_before  # fp16 overflow: DeepSpeed skipped
    return losses, StepOutcome(step, norm, ema_due, applied)


EvalFn = Callable[[int, torch.nn.Module, Writers], object]


def train_denoiser(
    *,
    model: ModelConfig,
    diffusion: DiffusionConfig,
    train: TrainConfig,
    distributed: DistributedConfig,
    accelerator: Accelerator,
    batches: MemoryBatches | StreamBatches,
    run_dir: Path,
    seed: int,
    log: MetricsLog,
    eval_fn: EvalFn | None = None,
    resume_from: Path | None = None,
    objective: Callable | None = None,
    adapter_init: dict[str, torch.Tensor] | None = None,
    text=None,
) -> tuple[torch.nn.Module, EMA, TrainResult]:
    """Train a U-Net on the latent batches of ``batches`` (the caller picks the source, see
    :func:`~ldm_train.train.batches.training_batches`); returns (model, EMA, summary). Checkpoints go to
    ``run_dir/checkpoints``; ``resume_from`` continues a checkpoint exactly. ``eval_fn(step,
    ema_model, writers)`` runs every ``train.eval_every`` steps and at the end, on every rank, and
    writes through the run's one :class:`Writers`. Raises :class:`Preempted` after saving when
    SIGUSR1/SIGTERM arrives. ``objective`` replaces the configured training objective (tests
    inject faults with it). ``adapter_init``: the LoRA ``train.lora.init_from`` names, already read
    (PEFT naming; the stage converts kohya files); None reads a PEFT/diffusers file itself. ``text``: the
    frozen text tower, needed with ``train.lora.text_encoder`` (the batches then hold caption tokens and
    the model encodes them with its adapter; classifier-free dropout swaps in the empty caption's tokens)."""
    if adapter_init is None and train.lora.enabled and train.lora.init_from is not None and resume_from is None:
        adapter_init = read_adapter_file(train.lora.init_from)
        if train.lora.text_encoder:  # the file's text-encoder adapter too, where it has one
            adapter_init = {**{UNET_PREFIX + k: v for k, v in adapter_init.items()},
                            **{TEXT_PREFIX + k: v for k, v in read_text_adapter_file(train.lora.init_from, text).items()}}
    parts = build_parts(model, train, distributed, accelerator, batches, seed, adapter_init, text)
    if resume_from is not None:
        restore_training_state(parts, resume_from, distributed.strategy)
    device, total, gas = accelerator.device, train.steps, distributed.gradient_accumulation_steps
    schedule = build_schedule(diffusion)
    loss_fn = objective or build_objective(diffusion)
    check_conditioning(context_layout(model.model_dump()), batches)  # an SDXL cache needs an SDXL U-Net (and the reverse)
    tokens = getattr(batches, "tokens", False)  # int token ids stay ints (drop_context swaps rows)
    null = batches.null_context.to(device, torch.long if tokens else torch.float32)
    step_model = torch.compile(parts.model) if train.compile else parts.model
    context_shape = [*batches.context_shape, text.width] if tokens else batches.context_shape
    flops = 3 * forward_flops(model, batches.manifest["latent_shape"], context_shape)  # the U-Net's
    peak = peak_flops(train, device)
    writers = Writers(train, run_dir, accelerator.is_main_process)
    bar = tqdm(total=total, initial=parts.counters.step, desc="train", unit="step", dynamic_ncols=True,
               disable=not accelerator.is_main_process)
    tel = Telemetry(log, writers, bar, train.batch_size, flops, peak)
    signals, guard = SignalFlag(), NonFiniteGuard(train.max_nonfinite_steps)
    watchdog = Watchdog(train.watchdog_seconds, accelerator.process_index)
    writer = CheckpointWriter(accelerator.num_processes, train.async_save)  # every rank, here (a gloo group)
    guard.total = parts.counters.nonfinite_skipped
    extra = {"strategy": distributed.strategy, "seed": seed}
    t0, losses, ckpt = time.time(), [], None
    parts.batches = feed = DevicePrefetch(batches, device)  # checkpoints take the state before the batch in flight
    pending: list[StepOutcome] = []
    last_norm = [float("nan")]
    zero3 = zero_stage(distributed) == 3

    def next_batch():
        t = time.perf_counter()
        z, context = feed.next()
        tel.data_seconds += time.perf_counter() - t
        return z, context, null, schedule

    def settle() -> None:
        """What the host does with the steps whose outcome was on the device, in order: the guard
        (which may stop the run before any later update or checkpoint), the LR schedule (applied
        steps only) and the EMA (applied steps only; the weights are still those of that step)."""
        while pending:
            outcome = pending.pop(0)
            last_norm[0], applied = outcome.settle()
            guard.record(applied, outcome.step)
            parts.counters.nonfinite_skipped = guard.total
            if applied:
                parts.scheduler.step()
                if outcome.ema_due:
                    parts.ema.update(local_chunks(accelerator.unwrap_model(parts.model), parts.ema.layout, zero3))

    try:
        while parts.counters.step < total:
            step = parts.counters.step
            watchdog.beat(step)
            writer.poll()  # a background save that failed stops the run here
            t_step = time.perf_counter()
            done, ema_due = step + 1, (step + 1) % train.ema_every == 0
            if is_deepspeed(accelerator):
                step_losses, outcome = _deepspeed_step(parts, loss_fn, next_batch, gas, guard, step, ema_due)
            else:
                micro = [next_batch() for _ in range(gas)]
                step_losses, outcome = _ddp_step(parts, step_model, loss_fn, micro, train.grad_clip,
                                                 distributed.mixed_precision == "fp16", settle, step, ema_due)
            pending.append(outcome)
            parts.counters.step = done
            parts.counters.samples_seen += train.batch_size * gas * accelerator.num_processes
            tel.losses.extend(step_losses)
            tel.seconds += time.perf_counter() - t_step
            tel.steps += 1
            bar.update(1)
            stop = _signalled(signals, accelerator, done, train.signal_check_every)
            every = train.eval_every
            evaluate = not stop and eval_fn is not None and every > 0 and (done % every == 0 or done == total)
            log_due = done % train.log_every == 0 or done == total
            save = done % train.checkpoint_every == 0 or done == total or stop or done in train.milestones
            if not isinstance(outcome.norm, Readback) or log_due or save or evaluate:
                settle()  # the host needs this step's outcome now; else it reads it during the next step
            if log_due:
                losses.append((step, _log(parts, tel, last_norm[0])))
            if save:
                ckpt = save_training_state(parts, run_dir / "checkpoints", train.keep_checkpoints, train.milestones, extra,
                                           writer)
                if stop or done == total:
                    writer.wait()  # the final (or preemption) checkpoint is published before the run ends
            if evaluate:
                eval_fn(done, ema_model(model, parts, device, train=train, seed=seed, text=text), writers)  # every rank: sampling is split
            if stop and done < total:
                raise Preempted(f"stopped by signal {signals.received[0]} after step {done}; checkpoint {ckpt}")
        settle()
        writer.close()
    except BaseException:
        writer.close(raise_errors=False)  # the run's own error is the one to see
        raise
    finally:
        tel.close()
        signals.close()
        watchdog.close()
    tail = [v for _, v in losses[-5:]] or [float("nan")]
    result = TrainResult(total, sum(tail) / len(tail), time.time() - t0, ckpt, losses, resume_from, guard.total)
    return accelerator.unwrap_model(parts.model), parts.ema, result


def _signalled(signals: SignalFlag, accelerator: Accelerator, done: int, every: int) -> bool:
    """Whether to stop after step ``done``, agreed by all ranks so that all stop after the same
    step. A single process reads its own flag (free); several agree by one all-reduce, which
    waits for the device, every ``every`` steps only (train.signal_check_every)."""
    if accelerator.num_processes == 1:
        return signals.raised
    return done % every == 0 and any_rank_true(signals.raised, accelerator)


def _log(parts: TrainParts, tel: Telemetry, norm: float) -> float:
    """Mean loss over the interval (not one noisy batch), rates and memory; rank 0 writes."""
    acc, counters = parts.accelerator, parts.counters
    value = torch.stack(tel.losses).mean().item() if tel.losses else float("nan")
    seconds, steps = tel.seconds, max(tel.steps, 1)
    per_rank_samples = tel.batch_size * acc.gradient_accumulation_steps * tel.steps
    img_s = per_rank_samples * acc.num_processes / max(seconds, 1e-9)
    record = {
        "loss": value,
        "grad_norm": norm,
        "lr": parts.optimizer.param_groups[0]["lr"],
        "img_per_s": round(img_s, 2),
        "step_time": round(seconds / steps, 5),
        "data_time": round(tel.data_seconds / steps, 5),
        "compute_time": round((seconds - tel.data_seconds) / steps, 5),
        "samples_seen": counters.samples_seen,
        "nonfinite_skipped": counters.nonfinite_skipped,
        **memory_gib(acc.device),
    }
    if tel.peak is not None:  # FLOPs per sample x samples per second per device / peak per device
        record["mfu"] = round(tel.flops * per_rank_samples / max(seconds, 1e-9) / tel.peak, 4)
    tel.reset()
    if acc.is_main_process:
        tel.log.write(stage="train", step=counters.step - 1, **record)
        tel.writers.scalars(counters.step, record)
        tel.bar.set_postfix(loss=f"{value:.4f}", img_s=f"{img_s:.1f}")
    return value


def ema_model(model_cfg: ModelConfig, parts: TrainParts, device, index: int = 0, *,
              train: TrainConfig | None = None, seed: int = 0, text=None) -> torch.nn.Module:
    """A full model holding EMA ``index`` (sharded EMAs are gathered once: every rank calls this).
    With ``train.lora``: the frozen base rebuilt as training built it (``seed``, ``model.init_from``)
    with the EMA of the adapter applied; with ``train.lora.text_encoder`` a TextConditioned (the text
    tower's CLIPTextModel with the EMA of its adapter too)."""
    with torch.random.fork_rng(devices=[]):  # building draws init values: keep the training's RNG stream
        if train is not None and train.lora.enabled:
            model = add_adapter(base_unet(model_cfg, seed), train.lora)
            if train.lora.text_encoder:
                model = conditioned(model, text, train.lora)
            model = model.to(device)
        else:
            model = build_unet(model_cfg).to(device)
    parts.ema.copy_to(model, index, gather_chunks(parts.accelerator))
    return model.eval().requires_grad_(False)
