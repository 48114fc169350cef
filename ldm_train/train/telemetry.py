"""What the loop reports: JSON lines (always), TensorBoard and Weights & Biases (where configured),
and the numbers behind them: FLOPs of a training step, model FLOP utilisation, memory.

MFU = (FLOPs of the model's forward + backward per second) / (peak FLOPs of the devices). The
forward is counted once with ``torch.utils.flop_counter`` on the ``meta`` device (shapes only,
no memory, no time); backward is taken as 2x forward (the usual 6ND-style convention, as in
PaLM's appendix B), and attention's FLOPs are included because the counter sees the matmuls.
"""
from __future__ import annotations

import resource
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from ..config import ConfigError, ModelConfig, TrainConfig
from ..model import build_unet
from ..utils.runs import MetricsLog

# Dense bf16 tensor-core peaks (TFLOP/s) of common training GPUs, by name fragment.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "V100": 125.0}


def forward_flops(model_cfg: ModelConfig, latent_shape: list[int], context_shape: list[int], batch: int = 1) -> int:
    """FLOPs of one U-Net forward on ``batch`` samples, counted on the meta device."""
    with torch.device("meta"):
        model = build_unet(model_cfg)
        z = torch.empty(batch, *latent_shape)
        t = torch.zeros(batch, dtype=torch.long)
        context = torch.empty(batch, *context_shape)
    with FlopCounterMode(display=False) as counter:
        model(z, t, context)
    return counter.get_total_flops()


def peak_flops(train_cfg: TrainConfig, device: torch.device) -> float | None:
    """Peak FLOP/s of one device: configured, or known for the GPU; None on CPU (no MFU then)."""
    if train_cfg.peak_tflops is not None:
        return train_cfg.peak_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for fragment, tflops in PEAK_TFLOPS.items():
            if fragment in name:
                return tflops * 1e12
    return None


def memory_gib(device: torch.device) -> dict[str, float]:
    """Peak accelerator memory of this process, or its peak resident memory on CPU."""
    if device.type == "cuda":
        return {"gpu_mem_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 3)}
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"cpu_rss_gib": round(rss_kib / 2**20, 3)}


class Writers:
    """TensorBoard and wandb sinks for rank 0 (none elsewhere); JSON lines go through MetricsLog.
    One per run: the loop makes it and hands it to the periodic evaluation, so training scalars
    and sample grids land in one TensorBoard event file."""

    def __init__(self, train_cfg: TrainConfig, run_dir: Path, enabled: bool, config: dict | None = None):
        self.tb = None
        self.wandb = None
        if not enabled:
            return
        if train_cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        if train_cfg.wandb_project is not None:
            try:
                import wandb
            except ImportError:
                raise ConfigError("train.wandb_project is set but wandb is not installed (pip install wandb)") from None
            self.wandb = wandb.init(project=train_cfg.wandb_project, dir=str(run_dir), config=config, resume="allow")

    def scalars(self, step: int, values: dict) -> None:
        numbers = {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.tb is not None:
            for k, v in numbers.items():
                self.tb.add_scalar(f"train/{k}", v, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log({f"train/{k}": v for k, v in numbers.items()}, step=step)

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        """An ``H x W x 3`` uint8 image (a sample grid) to TensorBoard."""
        if self.tb is not None:
            self.tb.add_image(tag, image, step, dataformats="HWC")
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


@dataclass
class Telemetry:
    """Where the loop reports (JSON lines, the writers, the progress bar), the constants of its
    rates, and what it has gathered since the last log line: step losses (tensors, so that the
    host syncs only when a line is written), seconds in all and waiting for data, steps."""

    log: MetricsLog
    writers: Writers
    bar: tqdm
    batch_size: int  # per rank and micro-batch
    flops: float  # per sample, forward + backward
    peak: float | None  # FLOP/s of one device; None: no MFU
    losses: list[torch.Tensor] = field(default_factory=list)
    seconds: float = 0.0
    data_seconds: float = 0.0
    steps: int = 0

    def reset(self) -> None:
        self.losses, self.seconds, self.data_seconds, self.steps = [], 0.0, 0.0, 0

    def close(self) -> None:
        self.bar.close()
        self.writers.close()
