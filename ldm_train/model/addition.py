"""SDXL's added conditioning (Podell et al. 2023, "SDXL: Improving Latent Diffusion Models for
High-Resolution Image Synthesis", Sec. 2.2; diffusers' ``addition_embed_type="text_time"``).

Besides cross-attention to the token sequence, the SDXL U-Net adds to its time embedding
``add_embedding([pooled text ; Fourier(time_ids)])``, where ``time_ids`` are the six numbers of
the micro-conditioning: original size (h, w), crop top-left (top, left) and target size (h, w),
each embedded sinusoidally with ``addition_time_embed_dim`` channels (``add_time_proj``).

Packed context: every stage of this project moves the conditioning as ONE tensor ``context``
(caches, loaders, classifier-free guidance's drop and doubled batch, GPU prefetch, checkpoints),
so the added conditions travel as extra rows at the end of the sequence, ``[B, L + k, D]``:
``pooled_rows`` rows holding the pooled embedding (zero-padded to a multiple of D), then one row
whose first six entries are the time ids. The U-Net strips them before cross-attention. The null
context of classifier-free guidance covers the text and pooled rows only
(:meth:`ContextLayout.pack_null`), so dropping the caption keeps the sizes, as SDXL trains.
Pack in fp32 (sizes above 256 are not all exact in bf16).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

N_TIME_IDS = 6  # original (h, w), crop top-left (top, left), target (h, w)
TEXT_TIME = "text_time"


def pooled_dim(projection_class_embeddings_input_dim: int, addition_time_embed_dim: int) -> int:
    """Width of the pooled text embedding diffusers' config implies (SDXL base: 2816 - 6 * 256 = 1280)."""
    return projection_class_embeddings_input_dim - N_TIME_IDS * addition_time_embed_dim


@dataclass(frozen=True)
class ContextLayout:
    """Where the pooled embedding and time ids sit in a packed context (module docstring)."""

    width: int  # cross_attention_dim D
    pooled: int  # pooled text width P

    @property
    def pooled_rows(self) -> int:
        return -(-self.pooled // self.width)

    @property
    def extra_rows(self) -> int:
        return self.pooled_rows + 1

    def _pooled_block(self, pooled: torch.Tensor) -> torch.Tensor:
        if pooled.shape[-1] != self.pooled:
            raise ValueError(f"pooled text embedding must have {self.pooled} features, got {pooled.shape[-1]}")
        pad = self.pooled_rows * self.width - self.pooled
        flat = torch.nn.functional.pad(pooled, (0, pad))
        return flat.reshape(*pooled.shape[:-1], self.pooled_rows, self.width)

    def pack(self, context: torch.Tensor, pooled: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
        """``[B, L, D]``, ``[B, P]``, ``[B, 6]`` -> ``[B, L + k, D]`` (in ``context``'s dtype)."""
        if time_ids.shape[-1] != N_TIME_IDS:
            raise ValueError(f"time_ids must have {N_TIME_IDS} entries per sample, got {tuple(time_ids.shape)}")
        pooled = self._pooled_block(pooled.to(context.dtype))
        ids = torch.nn.functional.pad(time_ids.to(context.dtype), (0, self.width - N_TIME_IDS))[..., None, :]
        return torch.cat([context, pooled, ids], dim=-2)

    def pack_null(self, null_context: torch.Tensor, null_pooled: torch.Tensor) -> torch.Tensor:
        """``[L, D]`` and ``[P]`` of the empty caption -> ``[L + pooled_rows, D]``: shorter than a
        packed context by the time-id row, which :func:`drop_context` therefore leaves alone."""
        return torch.cat([null_context, self._pooled_block(null_pooled.to(null_context.dtype))], dim=-2)

    def unpack(self, packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``[B, L + k, D]`` -> (context ``[B, L, D]``, pooled ``[B, P]``, time_ids ``[B, 6]``)."""
        if packed.shape[-2] <= self.extra_rows:
            raise ValueError(f"a packed SDXL context needs more than {self.extra_rows} rows (tokens, then "
                             f"{self.pooled_rows} pooled row(s) and one time-id row), got {tuple(packed.shape)}")
        text, pooled, ids = packed.split([packed.shape[-2] - self.extra_rows, self.pooled_rows, 1], dim=-2)
        pooled = pooled.reshape(*pooled.shape[:-2], -1)[..., : self.pooled]
        return text, pooled, ids[..., 0, :N_TIME_IDS]

    def drop_time_ids(self, packed: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
        """Zero the time ids of the samples where ``drop`` ([B] bool): the size terms' condition
        dropout (our choice of "unconditional" sizes: all zero)."""
        keep = (~drop).to(packed.dtype).view(-1, 1)
        ids = packed[:, -1:, :] * keep[:, :, None]
        return torch.cat([packed[:, :-1, :], ids], dim=1)


def time_ids(original_size, crop_top_left, target_size) -> list[float]:
    """diffusers' ``add_time_ids`` order: original (h, w) + crop (top, left) + target (h, w)."""
    return [float(v) for v in (*original_size, *crop_top_left, *target_size)]
