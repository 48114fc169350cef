"""Building blocks of the cross-attention U-Net (see :mod:`ldm_train.model.unet`).

Attribute names mirror diffusers (``ResnetBlock2D``, ``Transformer2DModel``,
``BasicTransformerBlock``, ``Attention``, ``FeedForward``/``GEGLU``, ``Downsample2D``,
``Upsample2D``, ``Timesteps``, ``TimestepEmbedding``) so that a state dict converted from a
Stable Diffusion checkpoint loads by name. The code itself is ours and pure torch.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

RESNET_EPS = 1e-5  # diffusers UNet2DConditionModel(norm_eps=1e-5) default, used by resnets/out norm
TRANSFORMER_NORM_EPS = 1e-6  # diffusers Transformer2DModel GroupNorm eps (fixed, not norm_eps)
LAYER_NORM_EPS = 1e-5  # diffusers BasicTransformerBlock LayerNorm eps (fixed, not norm_eps)
LOW_PRECISION = (torch.float16, torch.bfloat16)


def timestep_embedding(
    timesteps: torch.Tensor, dim: int, flip_sin_to_cos: bool = True, freq_shift: int = 0,
    max_period: float = 10000.0,
) -> torch.Tensor:
    """Sinusoidal embedding [B] -> [B, dim] (DDPM/Transformer positional encoding); diffusers'
    ``get_timestep_embedding``. ``flip_sin_to_cos`` puts the cos half first, ``freq_shift`` is
    diffusers' ``downscale_freq_shift`` (SD: True, 0), so pretrained time MLPs see their layout."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
    freqs = torch.exp(exponent / (half - freq_shift))
    args = timesteps.float()[:, None] * freqs[None, :]
    sin, cos = torch.sin(args), torch.cos(args)
    emb = torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb


class Timesteps(nn.Module):
    """Parameter-free wrapper so the module tree has ``time_proj`` like diffusers."""

    def __init__(self, num_channels: int, flip_sin_to_cos: bool = True, freq_shift: int = 0):
        super().__init__()
        self.num_channels, self.flip_sin_to_cos, self.freq_shift = num_channels, flip_sin_to_cos, freq_shift

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        return timestep_embedding(timesteps, self.num_channels, self.flip_sin_to_cos, self.freq_shift)


class TimestepEmbedding(nn.Module):
    """Two-layer SiLU MLP lifting the sinusoid to the resnets' time-conditioning width."""

    def __init__(self, in_dim: int, embed_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, embed_dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(embed_dim, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class ResnetBlock2D(nn.Module):
    """Pre-norm residual block; the time embedding is added as a per-channel bias after conv1
    (diffusers ``resnet_time_scale_shift="default"``). ``eps`` is the U-Net's ``norm_eps``."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, groups: int, dropout: float,
                 eps: float = RESNET_EPS):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nonlinearity = nn.SiLU()
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.nonlinearity(self.norm1(x)))
        h = h + self.time_emb_proj(self.nonlinearity(temb))[:, :, None, None]
        h = self.conv2(self.dropout(self.nonlinearity(self.norm2(h))))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, upcast: bool = False) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v via ``scaled_dot_product_attention`` (flash/mem-efficient kernels
    on GPU). ``upcast`` (diffusers ``upcast_attention``, needed by SD 2.1-v in fp16) computes it in
    fp32 when q/k/v are fp16/bf16 (autocast or a half-precision model), then casts back."""
    if upcast and q.dtype in LOW_PRECISION:
        with torch.autocast(q.device.type, enabled=False):
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        return out.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v)


class Attention(nn.Module):
    """Multi-head (cross-)attention. Self-attention when ``context_dim`` is None."""

    def __init__(self, query_dim: int, heads: int, dim_head: int, context_dim: int | None = None,
                 upcast: bool = False):
        super().__init__()
        inner = heads * dim_head
        context_dim = context_dim or query_dim
        self.heads, self.upcast = heads, upcast
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim), nn.Dropout(0.0)])

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.heads, -1).transpose(1, 2)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        q, k, v = self._split(self.to_q(x)), self._split(self.to_k(context)), self._split(self.to_v(context))
        out = attention(q, k, v, self.upcast)
        out = out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
        return self.to_out[1](self.to_out[0](out))


class GEGLU(nn.Module):
    """Gated GELU (Shazeer 2020): one projection yields value and gate."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """``net = [GEGLU, Dropout, Linear]`` so keys are ``ff.net.0.proj`` / ``ff.net.2``."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, dim * mult), nn.Dropout(dropout), nn.Linear(dim * mult, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention to the text context, GEGLU MLP; each pre-LN + residual."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int, upcast: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn1 = Attention(dim, heads, dim_head, upcast=upcast)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn2 = Attention(dim, heads, dim_head, context_dim, upcast=upcast)
        self.norm3 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nn.Module):
    """Spatial transformer (LDM Sec. 3.3): the HxW feature map as a token sequence of length H*W.

    ``heads`` x ``channels // heads`` attention; ``depth`` stacks BasicTransformerBlocks
    (diffusers ``transformer_layers_per_block``; SDXL uses >1). ``linear`` selects diffusers'
    ``use_linear_projection`` (SD 2.x: nn.Linear on tokens) instead of SD 1.x's 1x1 convs."""

    def __init__(self, channels: int, heads: int, context_dim: int, groups: int, depth: int = 1,
                 linear: bool = False, upcast: bool = False):
        super().__init__()
        self.linear = linear
        self.norm = nn.GroupNorm(groups, channels, eps=TRANSFORMER_NORM_EPS)
        proj = nn.Linear if linear else (lambda i, o: nn.Conv2d(i, o, 1))
        self.proj_in = proj(channels, channels)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(channels, heads, channels // heads, context_dim, upcast) for _ in range(depth)
        )
        self.proj_out = proj(channels, channels)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        hs = self.norm(x)
        if self.linear:
            tokens = self.proj_in(hs.permute(0, 2, 3, 1).reshape(b, h * w, c))
        else:
            tokens = self.proj_in(hs).permute(0, 2, 3, 1).reshape(b, h * w, c)  # [B, HW, C]
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        if self.linear:
            out = self.proj_out(tokens).reshape(b, h, w, c).permute(0, 3, 1, 2)
        else:
            out = self.proj_out(tokens.reshape(b, h, w, c).permute(0, 3, 1, 2))
        return x + out


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv (learned downsampling, as in SD)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour upsampling then 3x3 conv. ``size`` (the matching skip's HxW) keeps odd
    resolutions aligned with the encoder path; it defaults to exactly 2x."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)
