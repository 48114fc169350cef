"""Exponential moving averages of the weights (Polyak averaging), used for sampling and export.

One EMA per decay in ``train.ema_decays``; update ``t`` uses ``decay_t = min(decay, (1 + t) /
(10 + t))`` when warm-up is on, so early EMA weights are not dominated by the random
initialisation (the schedule of the original LDM/ADM code).

**Sharding.** Each parameter is flattened and cut into ``world`` equal chunks of
``ceil(numel / world)`` elements; rank ``r`` keeps the EMA of chunk ``r`` only. This is exactly
DeepSpeed ZeRO-3's partition layout (``param.ds_tensor`` on rank ``r`` holds that chunk), so under
ZeRO-3 the EMA is updated from the rank's own partition with no gather at all, and under DDP or
ZeRO-1/2 (optional, ``distributed.ema_sharded``) from a view of the full parameter. EMA memory per
rank is then ``1/world`` of the full EMA. :func:`consolidate` rebuilds full tensors, from the
ranks' chunks gathered once (export, evaluation) or read from their checkpoint files.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Layout:
    """Which chunk of every flattened parameter this rank owns (``world=1``: all of it)."""

    rank: int
    world: int
    shapes: dict[str, tuple[int, ...]]

    def chunk(self, name: str) -> tuple[int, int]:
        numel = math.prod(self.shapes[name])
        size = math.ceil(numel / self.world)
        start = min(size * self.rank, numel)
        return start, min(start + size, numel)

    def chunk_size(self, name: str) -> int:
        return math.ceil(math.prod(self.shapes[name]) / self.world)


def local_chunks(model: torch.nn.Module, layout: Layout, zero3: bool) -> dict[str, torch.Tensor]:
    """1-D views of this rank's chunk of every trainable parameter (no copies)."""
    out = {}
    for name, p in model.named_parameters():
        if name not in layout.shapes:
            continue
        start, end = layout.chunk(name)
        if zero3:  # DeepSpeed's partition: the first (end - start) elements are real, the rest padding
            out[name] = p.ds_tensor.detach().view(-1)[: end - start]
        else:
            out[name] = p.detach().view(-1)[start:end]
    return out


def param_shapes(model: torch.nn.Module, zero3: bool) -> dict[str, tuple[int, ...]]:
    """Full shapes of the trainable parameters (under ZeRO-3 ``p.shape`` is empty: use ``ds_shape``)."""
    return {
        n: tuple(p.ds_shape if zero3 else p.shape) for n, p in model.named_parameters() if p.requires_grad
    }


class EMA:
    """EMAs (fp32) of this rank's chunk of the weights, one per decay."""

    def __init__(self, chunks: dict[str, torch.Tensor], layout: Layout, decays: list[float], warmup: bool = True):
        self.layout = layout
        self.decays = list(decays)
        self.warmup = warmup
        self.shadows = [{k: v.float().clone() for k, v in chunks.items()} for _ in self.decays]
        self.num_updates = 0

    @classmethod
    def of_model(cls, model: torch.nn.Module, decays: list[float], warmup: bool = True) -> "EMA":
        """An unsharded EMA of a plain (unwrapped, full) model."""
        layout = Layout(0, 1, param_shapes(model, zero3=False))
        return cls(local_chunks(model, layout, zero3=False), layout, decays, warmup)

    def current_decay(self, decay: float) -> float:
        if not self.warmup:
            return decay
        t = self.num_updates
        return min(decay, (1 + t) / (10 + t))

    @torch.no_grad()
    def update(self, chunks: dict[str, torch.Tensor]) -> None:
        keys = list(self.shadows[0])
        current = [chunks[k].float() for k in keys]  # cast once, shared by every decay
        for decay, shadow in zip(self.decays, self.shadows):
            # one fused kernel over all tensors instead of a Python loop of lerps (every step)
            torch._foreach_lerp_([shadow[k] for k in keys], current, 1.0 - self.current_decay(decay))
        self.num_updates += 1

    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for shadow in self.shadows for v in shadow.values())

    def state_dict(self) -> dict[str, torch.Tensor]:
        """``{decay_index}/{param}`` -> this rank's chunk (what a checkpoint stores per rank)."""
        return {f"{i}/{k}": v.clone() for i, shadow in enumerate(self.shadows) for k, v in shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor], num_updates: int) -> None:
        for i, shadow in enumerate(self.shadows):
            for k, v in shadow.items():
                v.copy_(state[f"{i}/{k}"])
        self.num_updates = num_updates

    def full_weights(self, index: int = 0, gather=None) -> dict[str, torch.Tensor]:
        """Full EMA tensors of decay ``index``. Sharded EMAs need ``gather(chunk) -> list of the
        ranks' chunks`` (padded to equal size): one collective per parameter, done once."""
        shadow = self.shadows[index]
        if self.layout.world == 1:
            return {k: v.view(self.layout.shapes[k]).clone() for k, v in shadow.items()}
        if gather is None:
            raise ValueError("a sharded EMA needs a gather function to rebuild full weights")
        parts = {}
        for k, v in shadow.items():
            padded = torch.zeros(self.layout.chunk_size(k), dtype=v.dtype, device=v.device)
            padded[: v.numel()] = v
            parts[k] = gather(padded)
        return consolidate(parts, self.layout.shapes)

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module, index: int = 0, gather=None) -> None:
        weights = self.full_weights(index, gather)
        for k, p in model.named_parameters():
            if k in weights:
                p.copy_(weights[k].to(p.device, p.dtype))


def consolidate(parts: dict[str, list[torch.Tensor]], shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Every rank's chunk of every parameter (in rank order) -> full tensors."""
    out = {}
    for name, chunks in parts.items():
        shape = tuple(shapes[name])
        flat = torch.cat([c.reshape(-1) for c in chunks])[: math.prod(shape)]
        out[name] = flat.reshape(shape).clone()
    return out
