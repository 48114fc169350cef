"""Cross-attention U-Net denoiser eps_theta(z_t, t, tau_theta(y)) of latent diffusion
(Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models", Sec. 3.3).

Arguments of :class:`UNet` (all keyword-only; the ``model`` config section has the same keys):

- ``in_channels`` / ``out_channels``: channels c of the latent z in R^{h x w x c} produced by
  the stage-1 autoencoder (4 for SD), and of the prediction (eps or v, same shape as z).
- ``block_out_channels``: width of each resolution level, i.e. the paper's "model channels"
  times its "channel multiplier" list. Every level but the last halves the resolution.
- ``attention_levels``: ``attention_levels[i]`` puts a spatial transformer after every resnet
  of level i (down and up path): the paper's "attention resolutions", given per level instead of
  per downsampling factor. The middle block always has one (as in SD).
- ``layers_per_block``: the paper's "num res blocks": resnets per level on the way down; the
  way up has one more so it also consumes the level's downsampling skip.
- ``attention_head_dim``: channels per attention head (the paper's "num head channels");
  heads at a level = channels // attention_head_dim. NB diffusers' argument of the same name is
  the head *count* for SD 1.x; parameter shapes do not depend on it.
- ``cross_attention_dim``: width d_tau of the conditioning sequence tau_theta(y) in
  R^{M x d_tau} (the text encoder's hidden size), the key/value input of every cross-attention.
- ``norm_num_groups``: GroupNorm groups of every resnet and transformer input norm.
- ``dropout``: dropout inside the resnets (between norm2 and conv2), as in diffusers.

Module and parameter names follow diffusers' ``UNet2DConditionModel`` (SD 1.x layout: conv
projections in the transformers, one transformer block per attention) so SD weights can be
converted by name; the test suite checks key-for-key and shape-for-shape equality.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from ldm_train.model.layers import (
    RESNET_EPS,
    Downsample2D,
    ResnetBlock2D,
    TimestepEmbedding,
    Timesteps,
    Transformer2DModel,
    Upsample2D,
)

if TYPE_CHECKING:
    from ldm_train.config import ModelConfig


class DownBlock(nn.Module):
    """One encoder level: diffusers' ``CrossAttnDownBlock2D`` (``DownBlock2D`` if no attention).
    Returns the features plus every intermediate output, which the decoder takes as skips."""

    def __init__(self, in_ch: int, out_ch: int, *, n_layers: int, attention: bool, downsample: bool, **kw):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, kw["temb"], kw["groups"], kw["dropout"])
            for i in range(n_layers)
        )
        self.attentions = _attentions(out_ch, n_layers, kw) if attention else None
        self.downsamplers = nn.ModuleList([Downsample2D(out_ch)]) if downsample else None

    def forward(self, h, temb, context):
        skips = []
        for i, resnet in enumerate(self.resnets):
            h = resnet(h, temb)
            if self.attentions is not None:
                h = self.attentions[i](h, context)
            skips.append(h)
        if self.downsamplers is not None:
            h = self.downsamplers[0](h)
            skips.append(h)
        return h, skips


class MidBlock(nn.Module):
    """Bottleneck: resnet, transformer, resnet (diffusers' ``UNetMidBlock2DCrossAttn``)."""

    def __init__(self, ch: int, **kw):
        super().__init__()
        self.attentions = _attentions(ch, 1, kw)
        self.resnets = nn.ModuleList(ResnetBlock2D(ch, ch, kw["temb"], kw["groups"], kw["dropout"]) for _ in range(2))

    def forward(self, h, temb, context):
        h = self.resnets[0](h, temb)
        h = self.attentions[0](h, context)
        return self.resnets[1](h, temb)


class UpBlock(nn.Module):
    """One decoder level: diffusers' ``CrossAttnUpBlock2D`` (``UpBlock2D`` if no attention).
    Each resnet eats one skip (concatenated on channels); the last skip comes from the level
    below, hence ``skip_ch`` for it (diffusers' ``res_skip_channels`` bookkeeping)."""

    def __init__(self, prev_ch, out_ch, skip_ch, *, n_layers: int, attention: bool, upsample: bool, **kw):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(
                (prev_ch if i == 0 else out_ch) + (skip_ch if i == n_layers - 1 else out_ch),
                out_ch, kw["temb"], kw["groups"], kw["dropout"],
            )
            for i in range(n_layers)
        )
        self.attentions = _attentions(out_ch, n_layers, kw) if attention else None
        self.upsamplers = nn.ModuleList([Upsample2D(out_ch)]) if upsample else None

    def forward(self, h, temb, context, skips: list[torch.Tensor], up_size=None):
        for i, resnet in enumerate(self.resnets):
            h = resnet(torch.cat([h, skips.pop()], dim=1), temb)
            if self.attentions is not None:
                h = self.attentions[i](h, context)
        if self.upsamplers is not None:
            h = self.upsamplers[0](h, up_size)
        return h


def _attentions(ch: int, n: int, kw: dict) -> nn.ModuleList:
    return nn.ModuleList(Transformer2DModel(ch, kw["head_dim"], kw["context_dim"], kw["groups"]) for _ in range(n))


def _validate(block_out_channels, attention_levels, layers_per_block, head_dim, groups, dropout) -> None:
    """Fail at construction with the config key in the message, not deep inside a GroupNorm."""
    if not block_out_channels or any(c <= 0 for c in block_out_channels):
        raise ValueError(f"model.block_out_channels must be a non-empty list of positive ints, got {block_out_channels}")
    if len(attention_levels) != len(block_out_channels):
        raise ValueError(
            f"model.attention_levels has {len(attention_levels)} entries but model.block_out_channels "
            f"has {len(block_out_channels)}; give one bool per level"
        )
    for name, value in (("layers_per_block", layers_per_block), ("attention_head_dim", head_dim),
                        ("norm_num_groups", groups)):
        if value <= 0:
            raise ValueError(f"model.{name} must be positive, got {value}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"model.dropout must be in [0, 1), got {dropout}")
    last = len(block_out_channels) - 1
    for i, c in enumerate(block_out_channels):
        if c % groups:
            raise ValueError(f"model.block_out_channels[{i}]={c} is not divisible by model.norm_num_groups={groups}")
        if (attention_levels[i] or i == last) and c % head_dim:
            where = "attention level" if attention_levels[i] else "last level (middle block attention)"
            raise ValueError(
                f"model.block_out_channels[{i}]={c} ({where}) is not divisible by model.attention_head_dim={head_dim}"
            )


class UNet(nn.Module):
    """The denoiser. ``forward(sample, timestep, context) -> prediction`` shaped like ``sample``
    (with ``out_channels``). Argument meanings: see the module docstring."""

    def __init__(
        self,
        *,
        in_channels: int = 4,
        out_channels: int = 4,
        block_out_channels: list[int] | tuple[int, ...] = (64, 128, 128),
        attention_levels: list[bool] | tuple[bool, ...] = (False, True, True),
        layers_per_block: int = 1,
        attention_head_dim: int = 32,
        cross_attention_dim: int = 128,
        norm_num_groups: int = 32,
        dropout: float = 0.0,
    ):
        super().__init__()
        chs, attn = list(block_out_channels), [bool(a) for a in attention_levels]
        _validate(chs, attn, layers_per_block, attention_head_dim, norm_num_groups, dropout)
        self.config = dict(
            in_channels=in_channels, out_channels=out_channels, block_out_channels=chs, attention_levels=attn,
            layers_per_block=layers_per_block, attention_head_dim=attention_head_dim,
            cross_attention_dim=cross_attention_dim, norm_num_groups=norm_num_groups, dropout=dropout,
        )
        temb = 4 * chs[0]
        kw = dict(temb=temb, groups=norm_num_groups, dropout=dropout, head_dim=attention_head_dim,
                  context_dim=cross_attention_dim)
        self.conv_in = nn.Conv2d(in_channels, chs[0], 3, padding=1)
        self.time_proj = Timesteps(chs[0])
        self.time_embedding = TimestepEmbedding(chs[0], temb)
        self.down_blocks = self._build_down(chs, attn, layers_per_block, kw)
        self.mid_block = MidBlock(chs[-1], **kw)
        self.up_blocks = self._build_up(chs, attn, layers_per_block, kw)
        self.conv_norm_out = nn.GroupNorm(norm_num_groups, chs[0], eps=RESNET_EPS)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(chs[0], out_channels, 3, padding=1)

    @staticmethod
    def _build_down(chs, attn, layers, kw) -> nn.ModuleList:
        ins = [chs[0]] + chs[:-1]
        return nn.ModuleList(
            DownBlock(ins[i], chs[i], n_layers=layers, attention=attn[i], downsample=i < len(chs) - 1, **kw)
            for i in range(len(chs))
        )

    @staticmethod
    def _build_up(chs, attn, layers, kw) -> nn.ModuleList:
        """Mirror of the encoder; channel bookkeeping copied from diffusers so shapes match."""
        rchs, rattn, n = chs[::-1], attn[::-1], len(chs)
        blocks, out_ch = [], rchs[0]
        for i in range(n):
            prev_ch, out_ch, skip_ch = out_ch, rchs[i], rchs[min(i + 1, n - 1)]
            blocks.append(UpBlock(prev_ch, out_ch, skip_ch, n_layers=layers + 1, attention=rattn[i],
                                  upsample=i < n - 1, **kw))
        return nn.ModuleList(blocks)

    def _time_embed(self, timestep, sample: torch.Tensor) -> torch.Tensor:
        """Accept int/float scalars, 0-d tensors, [1] or [B] tensors; broadcast to the batch."""
        t = torch.as_tensor(timestep, device=sample.device)
        t = t.reshape(1) if t.ndim == 0 else t
        if t.ndim != 1 or t.shape[0] not in (1, sample.shape[0]):
            raise ValueError(f"timestep must be a scalar or shape [{sample.shape[0]}], got {tuple(t.shape)}")
        t = t.expand(sample.shape[0])
        return self.time_embedding(self.time_proj(t).to(sample.dtype))

    def forward(self, sample: torch.Tensor, timestep, context: torch.Tensor) -> torch.Tensor:
        """sample [B,C,H,W], timestep scalar or [B], context [B,L,cross_attention_dim]."""
        if context.ndim != 3 or context.shape[-1] != self.config["cross_attention_dim"]:
            raise ValueError(
                f"context must be [B, L, {self.config['cross_attention_dim']}] "
                f"(model.cross_attention_dim), got {tuple(context.shape)}"
            )
        temb = self._time_embed(timestep, sample)
        h = self.conv_in(sample)
        skips = [h]
        for block in self.down_blocks:
            h, block_skips = block(h, temb, context)
            skips.extend(block_skips)
        h = self.mid_block(h, temb, context)
        for block in self.up_blocks:
            n = len(block.resnets)
            level_skips, skips = skips[-n:], skips[:-n]
            up_size = skips[-1].shape[-2:] if skips else None  # resolution of the next level up
            h = block(h, temb, context, level_skips, up_size)
        return self.conv_out(self.conv_act(self.conv_norm_out(h)))


def build_unet(cfg: "ModelConfig") -> UNet:
    """Build from the ``model`` config section; every key maps 1:1 to a constructor argument."""
    return UNet(**cfg.model_dump())
