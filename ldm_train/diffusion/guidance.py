"""Classifier-free guidance (Ho & Salimans 2022): the null context in training, and its one use in sampling.

Code name            -> paper symbol
``context``          -> c, the text conditioning (cross-attention keys/values)
``null_context``     -> ∅, the embedding of the empty caption, trained in place of c with
                        probability p_uncond (``cond_drop_prob``; Ho & Salimans Alg. 1)
``guidance_scale``   -> s = 1 + w (eq. 6): o(∅) + s (o(c) - o(∅)); s = 1 is the plain conditional model

Guidance space: for fixed (x_t, t) the ε, v and x_0 parameterisations are affine functions of each
other (DDIM eq. 9; Salimans & Ho sec. 4) and the guided combination is affine (weights 1 - s and s
sum to one), so guiding the network's own output is *identical* to guiding ε or x̂_0, for every
sampler. :func:`guided` therefore wraps the network once, before any parameterisation, as
diffusers' pipelines do. With a learned variance (2C output channels for a C-channel sample) only
the first C (mean) channels are guided; the variance comes from the conditional pass (GLIDE).
"""
from __future__ import annotations

from typing import Callable

import torch

Net = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # net(x_t, t, context)
ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def drop_context(context: torch.Tensor, null_context: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """Replace ``context[i]`` by ``null_context`` where ``drop[i]`` (bool ``[B]``).

    ``null_context`` is ``[L, D]`` or ``[1, L, D]`` and broadcasts over the batch. A null context
    with fewer rows than ``context`` replaces only the leading rows: SDXL's packed context keeps its
    size/crop row (:mod:`ldm_train.model.addition`)."""
    null = null_context.to(device=context.device, dtype=context.dtype)
    if context.dim() == 3 and null.dim() >= 2 and null.shape[-2] < context.shape[-2]:
        n = null.shape[-2]
        return torch.cat([drop_context(context[:, :n], null, drop), context[:, n:]], dim=1)
    null = null.expand_as(context)
    mask = drop.view(-1, *([1] * (context.dim() - 1)))
    return torch.where(mask, null, context)


def guided(net: Net, context: torch.Tensor, null_context: torch.Tensor | None,
           guidance_scale: float = 1.0) -> ModelFn:
    """``f(x_t, t) -> output`` with the context bound: one network call per evaluation, on the
    doubled batch [∅, c] when ``guidance_scale != 1`` (eq. 6, in output space; module docstring).

    ``t`` may be a 0-dim or ``[B]`` tensor, integer or fractional; it is passed on unchanged
    (expanded to ``[B]``)."""
    if guidance_scale != 1.0 and null_context is None:
        raise ValueError("guidance_scale != 1 needs a null_context")

    def f(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        B, C = x_t.shape[0], x_t.shape[1]
        t = torch.as_tensor(t, device=x_t.device)
        t = t.expand(B) if t.dim() == 0 else t
        if guidance_scale == 1.0:
            return net(x_t, t, context)
        null = drop_context(context, null_context, torch.ones(B, dtype=torch.bool, device=context.device))
        out = net(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([null, context]))
        out_u, out_c = out.chunk(2)
        mean_u, mean_c = out_u[:, :C], out_c[:, :C]
        mean = mean_u + guidance_scale * (mean_c - mean_u)  # Ho & Salimans eq. 6
        if out_c.shape[1] > C:  # learned variance: keep the conditional variance channels (GLIDE)
            mean = torch.cat([mean, out_c[:, C:]], dim=1)
        return mean

    return f
