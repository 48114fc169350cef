"""The U-Net's levels: diffusers' ``CrossAttnDownBlock2D``/``DownBlock2D``,
``UNetMidBlock2DCrossAttn`` and ``CrossAttnUpBlock2D``/``UpBlock2D`` (same attribute names).

Blocks are pure functions of their tensor inputs (no mutation of arguments), so
:func:`torch.utils.checkpoint.checkpoint` can recompute them in the backward pass.
``kw`` carries the settings shared by every level: ``temb`` (time-embedding width), ``groups``
(``norm_num_groups``), ``eps`` (``norm_eps``), ``dropout``, ``context_dim``
(``cross_attention_dim``), ``linear`` (``use_linear_projection``), ``upcast`` (``upcast_attention``).
"""
from __future__ import annotations

import torch
from torch import nn

from ldm_train.model.layers import Downsample2D, ResnetBlock2D, Transformer2DModel, Upsample2D


def _resnet(in_ch: int, out_ch: int, kw: dict) -> ResnetBlock2D:
    return ResnetBlock2D(in_ch, out_ch, kw["temb"], kw["groups"], kw["dropout"], kw["eps"])


def _attentions(ch: int, n: int, heads: int, depth: int, kw: dict) -> nn.ModuleList:
    return nn.ModuleList(
        Transformer2DModel(ch, heads, kw["context_dim"], kw["groups"], depth, kw["linear"], kw["upcast"])
        for _ in range(n)
    )


class DownBlock(nn.Module):
    """One encoder level. ``attention`` = (heads, transformer depth) or None for a plain
    ``DownBlock2D``. Returns the features plus every intermediate output (the decoder's skips)."""

    def __init__(self, in_ch: int, out_ch: int, *, n_layers: int, attention: tuple[int, int] | None,
                 downsample: bool, kw: dict):
        super().__init__()
        self.resnets = nn.ModuleList(_resnet(in_ch if i == 0 else out_ch, out_ch, kw) for i in range(n_layers))
        self.attentions = _attentions(out_ch, n_layers, *attention, kw) if attention else None
        self.downsamplers = nn.ModuleList([Downsample2D(out_ch)]) if downsample else None

    def forward(self, h: torch.Tensor, temb: torch.Tensor, context: torch.Tensor):
        skips = []
        for i, resnet in enumerate(self.resnets):
            h = resnet(h, temb)
            if self.attentions is not None:
                h = self.attentions[i](h, context)
            skips.append(h)
        if self.downsamplers is not None:
            h = self.downsamplers[0](h)
            skips.append(h)
        return h, tuple(skips)


class MidBlock(nn.Module):
    """Bottleneck: resnet, transformer, resnet (diffusers' ``UNetMidBlock2DCrossAttn``)."""

    def __init__(self, ch: int, *, heads: int, depth: int, kw: dict):
        super().__init__()
        self.attentions = _attentions(ch, 1, heads, depth, kw)
        self.resnets = nn.ModuleList(_resnet(ch, ch, kw) for _ in range(2))

    def forward(self, h: torch.Tensor, temb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        h = self.resnets[0](h, temb)
        h = self.attentions[0](h, context)
        return self.resnets[1](h, temb)


class UpBlock(nn.Module):
    """One decoder level. Each resnet eats one skip (concatenated on channels), last-in first-out;
    the last skip comes from the level above in the encoder, hence ``skip_ch`` for it
    (diffusers' ``res_skip_channels`` bookkeeping)."""

    def __init__(self, prev_ch: int, out_ch: int, skip_ch: int, *, n_layers: int,
                 attention: tuple[int, int] | None, upsample: bool, kw: dict):
        super().__init__()
        self.resnets = nn.ModuleList(
            _resnet((prev_ch if i == 0 else out_ch) + (skip_ch if i == n_layers - 1 else out_ch), out_ch, kw)
            for i in range(n_layers)
        )
        self.attentions = _attentions(out_ch, n_layers, *attention, kw) if attention else None
        self.upsamplers = nn.ModuleList([Upsample2D(out_ch)]) if upsample else None

    def forward(self, h: torch.Tensor, temb: torch.Tensor, context: torch.Tensor,
                skips: tuple[torch.Tensor, ...], up_size: tuple[int, int] | None = None) -> torch.Tensor:
        for i, resnet in enumerate(self.resnets):
            h = resnet(torch.cat([h, skips[-1 - i]], dim=1), temb)
            if self.attentions is not None:
                h = self.attentions[i](h, context)
        if self.upsamplers is not None:
            h = self.upsamplers[0](h, up_size)
        return h
