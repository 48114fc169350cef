"""Stage 2 training: the loop (HF Accelerate), EMA and checkpoints."""
from .checkpoint import latest_checkpoint, load_weights
from .ema import EMA
from .loop import TrainResult, make_accelerator, train_denoiser

__all__ = ["EMA", "TrainResult", "latest_checkpoint", "load_weights", "make_accelerator", "train_denoiser"]
