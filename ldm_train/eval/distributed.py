"""Sampling split across the processes of a launcher (``accelerate launch``, ``torchrun``):
each rank samples its share (``generate(rank=, world_size=)``) and every rank receives all
images back in the original order, so metrics are computed on the full set."""
from __future__ import annotations

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from ..config import EvalConfig
from ..utils.images import to_uint8
from .pipeline import Pipeline
from .sample import generate


def generate_across_ranks(
    pipe: Pipeline, prompts: list[str], eval_cfg: EvalConfig, accelerator: Accelerator, progress: bool = False
) -> tuple[torch.Tensor, list[str]]:
    rank, world = accelerator.process_index, accelerator.num_processes
    images, captions = generate(pipe, prompts, eval_cfg, accelerator.device, progress=progress, rank=rank, world_size=world)
    total = len(prompts) * eval_cfg.samples_per_prompt
    order = list(range(rank, total, world))
    # uint8 on the CPU: 4x smaller to send than float, and what the metrics consume anyway
    mine = [(i, img, cap) for i, img, cap in zip(order, to_uint8(images), captions)]
    everything = sorted(gather_object(mine) if world > 1 else mine, key=lambda item: item[0])
    u8 = torch.stack([img for _, img, _ in everything])
    return u8.float().div(127.5).sub(1.0), [cap for _, _, cap in everything]
