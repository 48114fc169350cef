"""A step's outcome (gradient norm, applied or skipped) kept on the device until the host needs it.

Reading a device value from Python (``float(t)``, ``t.item()``, ``bool(t)``) blocks the host until
the device has finished every kernel queued before it, so the host stops queueing the next step and
the device idles while Python catches up. The loop therefore decides a non-finite step's skip on
the device (the fused AdamW's ``found_inf``: its kernel leaves weights, moments and step counts
untouched where ``found_inf == 1``) and starts a non-blocking copy of the norm into pinned host
memory. The host reads that copy one step later (:meth:`Readback.read`), after the next step's
forward and backward are queued: the event it waits on was recorded a whole step earlier, so the
wait never drains the device's queue. What needs the value on the host (the LR scheduler, stepped
only on applied steps, the EMA update and the non-finite guard) happens then, before the next
optimizer step, which keeps their semantics exact.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


class Readback:
    """A non-blocking device-to-host copy of a 1-D float tensor, read later."""

    def __init__(self, values: torch.Tensor):
        self.event = None
        if values.device.type == "cuda":
            # a pinned destination makes copy_(non_blocking=True) asynchronous (CUDA semantics);
            # torch's caching host allocator keeps the block until the copy's stream passes it
            self.host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            self.host.copy_(values, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:  # CPU (gloo, tests): the values are host memory already; nothing is pending
            self.host = values.detach()

    def read(self) -> list[float]:
        if self.event is not None:
            self.event.synchronize()  # recorded a step ago: waits only if the host ran > 1 step ahead
        return self.host.numpy().tolist()  # host memory: no device involved


@dataclass
class StepOutcome:
    """One optimizer step: ``norm`` as a :class:`Readback` (deferred) or a float (known), whether
    it was applied where that is known on the host already (fp16's grad scaler, DeepSpeed), and
    whether an EMA update is due after it."""

    step: int
    norm: Readback | float
    ema_due: bool
    applied: bool | None = None  # None: applied iff the norm is finite

    def settle(self) -> tuple[float, bool]:
        """(gradient norm, applied)."""
        norm = self.norm.read()[0] if isinstance(self.norm, Readback) else self.norm
        return norm, math.isfinite(norm) if self.applied is None else self.applied
