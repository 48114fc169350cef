"""SDXL single files (Stability's ``sd_xl_base_1.0.safetensors`` layout) both ways:
``model.diffusion_model.*`` (the U-Net; its ``label_emb.0.{0,2}`` is diffusers' ``add_embedding``),
``first_stage_model.*`` (the VAE, as SD's), ``conditioner.embedders.0.transformer.*`` (CLIP ViT-L,
already a transformers ``CLIPTextModel``: ``text_model.*``) and ``conditioner.embedders.1.model.*``
(OpenCLIP ViT-bigG in open_clip's layout -> a ``CLIPTextModelWithProjection``, every block kept,
since SDXL takes the penultimate states AND the pooled output of the last; open_clip's
``text_projection`` [width, proj] is transformers' ``text_projection.weight`` transposed).

``addition_time_embed_dim`` is not in the weights: it is (label_emb input - bigG projection) / 6.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..model.addition import N_TIME_IDS

SDXL_CLIP = "conditioner.embedders.0.transformer."
SDXL_OPEN_CLIP = "conditioner.embedders.1.model."
SDXL_PREFIXES = (SDXL_CLIP, SDXL_OPEN_CLIP)
SDXL_SCALING_FACTOR = 0.13025
SCHEDULER_SDXL = {"_class_name": "EulerDiscreteScheduler", "num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
                  "beta_start": 0.00085, "beta_end": 0.012, "steps_offset": 1, "timestep_spacing": "leading",
                  "interpolation_type": "linear", "use_karras_sigmas": False, "trained_betas": None,
                  "prediction_type": "epsilon"}


def is_sdxl_file(shapes: dict) -> bool:
    return any(k.startswith(SDXL_PREFIXES) for k in shapes)


def sdxl_unet_config(config: dict, unet_ldm: dict[str, torch.Tensor], pooled: int) -> dict:
    """The SD-family config read from the blocks, plus SDXL's added-conditioning keys."""
    proj = unet_ldm["label_emb.0.0.weight"].shape[1]
    time_dim, rest = divmod(proj - pooled, N_TIME_IDS)
    if rest or time_dim <= 0:
        raise ValueError(f"label_emb takes {proj} features, which is not the bigG projection {pooled} + 6 x a width")
    return {**config, "addition_embed_type": "text_time", "addition_time_embed_dim": time_dim,
            "projection_class_embeddings_input_dim": proj, "sample_size": 128}


def projection_from_open_clip(sub: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"text_projection.weight": sub["text_projection"].t().contiguous()}


def projection_to_open_clip(text_2: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {SDXL_OPEN_CLIP + "text_projection": text_2["text_projection.weight"].t().contiguous()}


def with_projection(config: dict) -> dict:
    return {**config, "architectures": ["CLIPTextModelWithProjection"]}


def check_sdxl_text(path: Path, shapes: dict) -> None:
    """Both towers present, and their widths add up to the U-Net's context (raises ValueError)."""
    a = shapes.get(SDXL_CLIP + "text_model.embeddings.token_embedding.weight")
    b = shapes.get(SDXL_OPEN_CLIP + "token_embedding.weight")
    if a is None or b is None or SDXL_OPEN_CLIP + "text_projection" not in shapes:
        raise ValueError(f"{path}: an SDXL file needs both {SDXL_CLIP}* (CLIP ViT-L) and {SDXL_OPEN_CLIP}* "
                         "(OpenCLIP bigG with text_projection); a refiner (one tower) is not supported")
    context = {s[1] for k, s in shapes.items() if k.startswith("model.diffusion_model.") and k.endswith("attn2.to_k.weight")}
    if context != {a[1] + b[1]}:
        raise ValueError(f"{path}: the U-Net attends to text of width {sorted(context)} but the towers are "
                         f"{a[1]} + {b[1]} wide")
