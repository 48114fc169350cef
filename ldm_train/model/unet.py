"""Cross-attention U-Net denoiser eps_theta(z_t, t, tau_theta(y)) of latent diffusion
(Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models", Sec. 3.3).

Arguments of :class:`UNet` (all keyword-only; the ``model`` config section has the same keys,
plus ``init_from``, which is for the training loop, not the constructor):

- ``in_channels`` / ``out_channels``: channels c of the latent z (4 for SD), and of the
  prediction (eps or v; 2c when a learned variance is predicted too).
- ``block_out_channels``: width of each resolution level ("model channels" x "channel
  multiplier" in the paper). Every level but the last halves the resolution.
- ``attention_levels``: ``attention_levels[i]`` puts a spatial transformer after every resnet of
  level i, down and up (the paper's "attention resolutions", per level). The middle block always
  has one. diffusers spells this as ``CrossAttnDownBlock2D`` vs ``DownBlock2D`` per level.
- ``layers_per_block``: resnets per level on the way down ("num res blocks"); the way up has
  one more so it also consumes the level's downsampling skip.
- ``channels_per_head``: channels per attention head ("num head channels"); heads at a level =
  channels // channels_per_head. NB diffusers' ``attention_head_dim`` is the head *count*
  (SD 1.x: 8 heads at every level, SD 2.x: [5, 10, 20, 20]); see :mod:`ldm_train.model.convert`.
- ``num_attention_heads``: optional head count per level; overrides ``channels_per_head``
  (needed for SD 1.x, whose head width grows with the level). Level -1 also sets the middle block.
- ``transformer_layers_per_block``: BasicTransformerBlocks per transformer, int or per level
  (the middle block uses the last level's; the up path mirrors the down path).
- ``cross_attention_dim``: width d_tau of the conditioning sequence tau_theta(y).
- ``use_linear_projection``: nn.Linear proj_in/proj_out (SD 2.x) instead of 1x1 convs (SD 1.x).
- ``flip_sin_to_cos`` / ``freq_shift``: layout of the sinusoidal timestep embedding.
- ``norm_num_groups`` / ``norm_eps``: GroupNorm groups (everywhere) and eps (resnets, out norm).
- ``dropout``: dropout inside the resnets (between norm2 and conv2), as in diffusers.
- ``num_class_embeds``: optional nn.Embedding of class labels added to the time embedding
  (diffusers ``class_embedding``); ``forward`` then needs ``class_labels``.
- ``upcast_attention``: compute attention in fp32 under fp16/bf16 autocast.
- ``addition_embed_type``: ``"text_time"`` for SDXL's added conditioning (pooled text embedding +
  sinusoidal size/crop/target-size ids, :mod:`ldm_train.model.addition`), with
  ``addition_time_embed_dim`` (channels per id) and ``projection_class_embeddings_input_dim``
  (pooled width + 6 x that; diffusers' names). ``forward`` then reads them from the packed context,
  or from ``text_embeds``/``time_ids``.
- ``gradient_checkpointing``: recompute each down/mid/up block in the backward pass (training only).

Module and parameter names are diffusers' ``UNet2DConditionModel``'s, so SD weights load by name.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ldm_train.model.addition import N_TIME_IDS, TEXT_TIME, ContextLayout, pooled_dim
from ldm_train.model.blocks import DownBlock, MidBlock, UpBlock
from ldm_train.model.layers import RESNET_EPS, TimestepEmbedding, Timesteps

if TYPE_CHECKING:
    from ldm_train.config import ModelConfig

NOT_CONSTRUCTOR_KEYS = ("init_from",)  # ModelConfig keys that are not UNet arguments


def level_depths(config: dict) -> list[int]:
    """Transformer depth per level (``transformer_layers_per_block`` broadcast)."""
    depth = config["transformer_layers_per_block"]
    return [depth] * len(config["block_out_channels"]) if isinstance(depth, int) else list(depth)


def level_heads(config: dict) -> list[int]:
    """Attention heads per level: ``num_attention_heads`` or channels // ``channels_per_head``."""
    if config.get("num_attention_heads") is not None:
        return list(config["num_attention_heads"])
    return [max(1, c // config["channels_per_head"]) for c in config["block_out_channels"]]


def attention_sites(config: dict) -> list[int]:
    """Levels whose head/depth settings matter: attention levels and the last (middle block)."""
    n = len(config["block_out_channels"])
    return [i for i in range(n) if config["attention_levels"][i] or i == n - 1]


def _per_level_list(name: str, value, n: int) -> None:
    if isinstance(value, int):
        value = [value]
    elif len(value) != n:
        raise ValueError(f"model.{name} has {len(value)} entries for {n} levels; give an int or one per level")
    if any(v <= 0 for v in value):
        raise ValueError(f"model.{name} must be positive, got {value}")


def validate_config(c: dict) -> None:
    """Fail at construction with the config key in the message, not deep inside a GroupNorm."""
    chs, n = c["block_out_channels"], len(c["block_out_channels"])
    if not chs or any(ch <= 0 for ch in chs):
        raise ValueError(f"model.block_out_channels must be a non-empty list of positive ints, got {chs}")
    if len(c["attention_levels"]) != n:
        raise ValueError(
            f"model.attention_levels has {len(c['attention_levels'])} entries but model.block_out_channels "
            f"has {n}; give one bool per level"
        )
    for name in ("layers_per_block", "channels_per_head", "norm_num_groups", "cross_attention_dim", "norm_eps"):
        if c[name] <= 0:
            raise ValueError(f"model.{name} must be positive, got {c[name]}")
    if not 0.0 <= c["dropout"] < 1.0:
        raise ValueError(f"model.dropout must be in [0, 1), got {c['dropout']}")
    if c["num_class_embeds"] is not None and c["num_class_embeds"] <= 0:
        raise ValueError(f"model.num_class_embeds must be positive or null, got {c['num_class_embeds']}")
    if not 0 <= c["freq_shift"] < chs[0] // 2:
        raise ValueError(f"model.freq_shift must be in [0, block_out_channels[0] // 2), got {c['freq_shift']}")
    _per_level_list("transformer_layers_per_block", c["transformer_layers_per_block"], n)
    if c["num_attention_heads"] is not None:
        _per_level_list("num_attention_heads", c["num_attention_heads"], n)
    for i, ch in enumerate(chs):
        if ch % c["norm_num_groups"]:
            raise ValueError(f"model.block_out_channels[{i}]={ch} is not divisible by model.norm_num_groups={c['norm_num_groups']}")
    _validate_heads(c)
    _validate_addition(c)


def _validate_addition(c: dict) -> None:
    kind = c.get("addition_embed_type")
    if kind is None:
        if c.get("projection_class_embeddings_input_dim") is not None:
            raise ValueError("model.projection_class_embeddings_input_dim is set but model.addition_embed_type is null")
        return
    if kind != TEXT_TIME:
        raise ValueError(f"model.addition_embed_type must be null or {TEXT_TIME!r}, got {kind!r}")
    dim, proj = c["addition_time_embed_dim"], c.get("projection_class_embeddings_input_dim")
    if dim <= 0 or dim % 2:
        raise ValueError(f"model.addition_time_embed_dim must be a positive even number, got {dim}")
    if proj is None or pooled_dim(proj, dim) <= 0:
        raise ValueError(f"model.projection_class_embeddings_input_dim ({proj}) must exceed {N_TIME_IDS} x "
                         f"model.addition_time_embed_dim ({N_TIME_IDS * dim}): the rest is the pooled text width")


def context_layout(config: dict) -> ContextLayout | None:
    """Where a ``text_time`` U-Net finds the pooled embedding and time ids in its context."""
    if config.get("addition_embed_type") != TEXT_TIME:
        return None
    pooled = pooled_dim(config["projection_class_embeddings_input_dim"], config["addition_time_embed_dim"])
    return ContextLayout(config["cross_attention_dim"], pooled)


def _validate_heads(c: dict) -> None:
    heads, chs = level_heads(c), c["block_out_channels"]
    for i in attention_sites(c):
        where = "attention level" if c["attention_levels"][i] else "last level (middle block attention)"
        if c["num_attention_heads"] is not None and chs[i] % heads[i]:
            raise ValueError(
                f"model.block_out_channels[{i}]={chs[i]} ({where}) is not divisible by "
                f"model.num_attention_heads[{i}]={heads[i]}"
            )
        if c["num_attention_heads"] is None and chs[i] % c["channels_per_head"]:
            raise ValueError(
                f"model.block_out_channels[{i}]={chs[i]} ({where}) is not divisible by "
                f"model.channels_per_head={c['channels_per_head']}"
            )


class UNet(nn.Module):
    """The denoiser. ``forward(sample, timestep, context, class_labels=None) -> prediction``
    shaped like ``sample`` (with ``out_channels``). Argument meanings: see the module docstring."""

    def __init__(
        self,
        *,
        in_channels: int = 4,
        out_channels: int = 4,
        block_out_channels: list[int] | tuple[int, ...] = (64, 128, 128),
        attention_levels: list[bool] | tuple[bool, ...] = (False, True, True),
        layers_per_block: int = 1,
        channels_per_head: int = 32,
        cross_attention_dim: int = 128,
        norm_num_groups: int = 32,
        dropout: float = 0.0,
        num_attention_heads: list[int] | None = None,
        transformer_layers_per_block: int | list[int] = 1,
        use_linear_projection: bool = False,
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
        norm_eps: float = RESNET_EPS,
        num_class_embeds: int | None = None,
        upcast_attention: bool = False,
        addition_embed_type: str | None = None,
        addition_time_embed_dim: int = 256,
        projection_class_embeddings_input_dim: int | None = None,
        gradient_checkpointing: bool = False,
    ):
        super().__init__()
        cfg = dict(locals())
        for key in ("self", "__class__"):
            cfg.pop(key, None)
        cfg["block_out_channels"] = chs = list(block_out_channels)
        cfg["attention_levels"] = [bool(a) for a in attention_levels]
        for key in ("num_attention_heads", "transformer_layers_per_block"):
            if isinstance(cfg[key], (list, tuple)):
                cfg[key] = list(cfg[key])
        validate_config(cfg)
        self.config = cfg
        self.gradient_checkpointing = gradient_checkpointing
        temb = 4 * chs[0]
        kw = dict(temb=temb, groups=norm_num_groups, eps=norm_eps, dropout=dropout, context_dim=cross_attention_dim,
                  linear=use_linear_projection, upcast=upcast_attention)
        self.conv_in = nn.Conv2d(in_channels, chs[0], 3, padding=1)
        self.time_proj = Timesteps(chs[0], flip_sin_to_cos, freq_shift)
        self.time_embedding = TimestepEmbedding(chs[0], temb)
        self.class_embedding = nn.Embedding(num_class_embeds, temb) if num_class_embeds else None
        self.layout = context_layout(cfg)
        if self.layout is not None:  # diffusers' names: SDXL weights load by name
            self.add_time_proj = Timesteps(addition_time_embed_dim, flip_sin_to_cos, freq_shift)
            self.add_embedding = TimestepEmbedding(projection_class_embeddings_input_dim, temb)
        heads, depths = level_heads(cfg), level_depths(cfg)
        self.down_blocks = self._build_down(chs, cfg["attention_levels"], heads, depths, layers_per_block, kw)
        self.mid_block = MidBlock(chs[-1], heads=heads[-1], depth=depths[-1], kw=kw)
        self.up_blocks = self._build_up(chs, cfg["attention_levels"], heads, depths, layers_per_block, kw)
        self.conv_norm_out = nn.GroupNorm(norm_num_groups, chs[0], eps=norm_eps)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(chs[0], out_channels, 3, padding=1)

    @staticmethod
    def _build_down(chs, attn, heads, depths, layers, kw) -> nn.ModuleList:
        ins = [chs[0]] + chs[:-1]
        return nn.ModuleList(
            DownBlock(ins[i], chs[i], n_layers=layers, attention=(heads[i], depths[i]) if attn[i] else None,
                      downsample=i < len(chs) - 1, kw=kw)
            for i in range(len(chs))
        )

    @staticmethod
    def _build_up(chs, attn, heads, depths, layers, kw) -> nn.ModuleList:
        """Mirror of the encoder; channel bookkeeping copied from diffusers so shapes match."""
        r = lambda xs: list(reversed(xs))  # noqa: E731
        rchs, rattn, rheads, rdepths, n = r(chs), r(attn), r(heads), r(depths), len(chs)
        blocks, out_ch = [], rchs[0]
        for i in range(n):
            prev_ch, out_ch, skip_ch = out_ch, rchs[i], rchs[min(i + 1, n - 1)]
            blocks.append(UpBlock(prev_ch, out_ch, skip_ch, n_layers=layers + 1,
                                  attention=(rheads[i], rdepths[i]) if rattn[i] else None,
                                  upsample=i < n - 1, kw=kw))
        return nn.ModuleList(blocks)

    @staticmethod
    def _per_sample(value, sample: torch.Tensor, name: str) -> torch.Tensor:
        """Accept int/float scalars, 0-d tensors, [1] or [B] tensors; broadcast to the batch."""
        t = torch.as_tensor(value, device=sample.device)
        t = t.reshape(1) if t.ndim == 0 else t
        if t.ndim != 1 or t.shape[0] not in (1, sample.shape[0]):
            raise ValueError(f"{name} must be a scalar or shape [{sample.shape[0]}], got {tuple(t.shape)}")
        return t.expand(sample.shape[0])

    def _embed(self, timestep, class_labels, sample: torch.Tensor) -> torch.Tensor:
        """Time embedding (+ class embedding): the vector every resnet is conditioned on."""
        t = self._per_sample(timestep, sample, "timestep")
        temb = self.time_embedding(self.time_proj(t).to(sample.dtype))
        if self.class_embedding is None:
            if class_labels is not None:
                raise ValueError("class_labels given but the model has no class embedding (model.num_class_embeds)")
            return temb
        if class_labels is None:
            raise ValueError("class_labels are required: the model has model.num_class_embeds set")
        labels = self._per_sample(class_labels, sample, "class_labels")
        return temb + self.class_embedding(labels).to(sample.dtype)

    def _added(self, text_embeds: torch.Tensor, time_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """add_embedding([pooled ; sinusoid(each time id)]) (diffusers' ``text_time``)."""
        if time_ids.shape != (text_embeds.shape[0], N_TIME_IDS):
            raise ValueError(f"time_ids must be [B, {N_TIME_IDS}], got {tuple(time_ids.shape)}")
        ids = self.add_time_proj(time_ids.flatten()).reshape(time_ids.shape[0], -1)
        return self.add_embedding(torch.cat([text_embeds, ids.to(text_embeds.dtype)], dim=-1).to(dtype))

    def _run(self, block: nn.Module, *args):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def forward(self, sample: torch.Tensor, timestep, context: torch.Tensor,
                class_labels: torch.Tensor | None = None, text_embeds: torch.Tensor | None = None,
                time_ids: torch.Tensor | None = None) -> torch.Tensor:
        """sample [B,C,H,W], timestep scalar or [B], context [B,L,cross_attention_dim],
        class_labels [B] int64 (only with ``num_class_embeds``). A ``text_time`` U-Net takes
        ``text_embeds`` [B,P] and ``time_ids`` [B,6] (diffusers' ``added_cond_kwargs``) or, when
        both are None, unpacks them from the end of ``context`` (:mod:`ldm_train.model.addition`)."""
        if context.ndim != 3 or context.shape[-1] != self.config["cross_attention_dim"]:
            raise ValueError(
                f"context must be [B, L, {self.config['cross_attention_dim']}] "
                f"(model.cross_attention_dim), got {tuple(context.shape)}"
            )
        temb = self._embed(timestep, class_labels, sample)
        if self.layout is not None:
            if text_embeds is None and time_ids is None:
                context, text_embeds, time_ids = self.layout.unpack(context)
            elif text_embeds is None or time_ids is None:
                raise ValueError("give both text_embeds and time_ids, or neither (then the context carries them)")
            temb = temb + self._added(text_embeds, time_ids, temb.dtype)
        elif text_embeds is not None or time_ids is not None:
            raise ValueError("text_embeds/time_ids given but the model has no added conditioning (model.addition_embed_type)")
        h = self.conv_in(sample)
        skips: tuple[torch.Tensor, ...] = (h,)
        for block in self.down_blocks:
            h, block_skips = self._run(block, h, temb, context)
            skips = skips + block_skips
        h = self._run(self.mid_block, h, temb, context)
        for block in self.up_blocks:
            n = len(block.resnets)
            level_skips, skips = skips[-n:], skips[:-n]
            up_size = tuple(skips[-1].shape[-2:]) if skips else None  # resolution of the next level up
            h = self._run(block, h, temb, context, level_skips, up_size)
        return self.conv_out(self.conv_act(self.conv_norm_out(h)))


def unet_kwargs(cfg: "ModelConfig") -> dict:
    """The constructor arguments of a ``model`` config section (drops ``init_from``)."""
    return cfg.model_dump(exclude=set(NOT_CONSTRUCTOR_KEYS))


def build_unet(cfg: "ModelConfig") -> UNet:
    """Build from the ``model`` config section; every key but ``init_from`` is a constructor
    argument. ``init_from`` weights are loaded by the training loop via
    :func:`ldm_train.model.load.load_unet_weights`."""
    return UNet(**unet_kwargs(cfg))
