"""Tiny randomly initialised Stable Diffusion pipelines, shaped like the real families so that the
conventions a single-file reader relies on hold (nothing is downloaded):

- ``sd1``: SD 1.x: 1x1-conv ``proj_in``/``proj_out``, 8 attention heads at every level
  (diffusers' ``attention_head_dim=8`` is SD 1.x's head COUNT), a transformers ``CLIPTextModel``
  with quick_gelu, 64 channels per head, padded with ``<|endoftext|>``, epsilon prediction;
- ``sd2``: SD 2.x: linear ``proj_in``/``proj_out``, 64 channels per head (``attention_head_dim``
  = channels/64 per level), gelu, padded with ``"!"``, v-prediction (768-v) unless told otherwise.
  Its ``text_encoder/`` is the penultimate-layer tower, as diffusers' SD 2 folders have it.

- ``sdxl``: SDXL: no attention at the first level, transformer depth [1, 2] (SDXL: [1, 2, 10]),
  64 channels per head, linear projections, ``addition_embed_type: text_time``; two towers, a
  ``CLIPTextModel`` (quick_gelu, padded with ``<|endoftext|>``, ViT-L's) and a
  ``CLIPTextModelWithProjection`` (gelu, padded with ``"!"``, bigG's), whose penultimate states
  concatenate to the U-Net's 64 + 128 = 192-wide context and whose projection (32) is the pooled embedding;
  an ``EulerDiscreteScheduler`` and scaling factor 0.13025, as SDXL base.

All have an SD-shaped ``AutoencoderKL`` (scaling factor 0.18215), the real CLIP vocabulary
(49408 tokens: the embedding is most of the ~13 MB on disk) and 77 positions. The U-Net has three
levels (sd1) or two (sd2) so that both LDM upsampler positions (after a resnet, after an attention)
occur.

Other tests import it as ``from pretrained.tiny_sd import make_tiny_sd`` (``tests/`` is on the path).
"""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, PNDMScheduler, StableDiffusionPipeline,
    StableDiffusionXLPipeline, UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from ldm_train.text.tokenizer import EOT, PAD, write_clip_tokenizer

FAMILIES = ("sd1", "sd2", "sdxl")
BIGG_WIDTH = 128  # the tiny bigG: wider than the tiny ViT-L, as 1280 > 768 (diffusers' single-file loader tells them apart so)
POOLED_WIDTH = 32  # the tiny bigG's projection_dim (SDXL: 1280)
TIME_EMBED = 8  # addition_time_embed_dim (SDXL: 256)
TEXT_WIDTH = 64  # one 64-channel head, as both CLIP towers have (ViT-L 768/12, ViT-H 1024/16)
CONTEXT = 77
SD_SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                   clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def _sdxl_unet() -> UNet2DConditionModel:
    channels = (64, 128)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=channels, layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=[c // 64 for c in channels], transformer_layers_per_block=[1, 2],
        cross_attention_dim=TEXT_WIDTH + BIGG_WIDTH, norm_num_groups=32, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=TIME_EMBED,
        projection_class_embeddings_input_dim=POOLED_WIDTH + 6 * TIME_EMBED,
    )


def _unet(family: str) -> UNet2DConditionModel:
    if family == "sdxl":
        return _sdxl_unet()
    sd2 = family == "sd2"
    # sd1: SD's pattern (attention levels, then a plain one), two resnets per level; sd2: two
    # attending levels of 1 and 2 heads, one resnet per level (an upsampler after an attention)
    channels = (64, 128) if sd2 else (32, 32, 64)
    cross, plain = ("CrossAttnDownBlock2D", "CrossAttnUpBlock2D"), ("DownBlock2D", "UpBlock2D")
    kinds = [cross, cross] if sd2 else [cross, cross, plain]
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=channels,
        layers_per_block=1 if sd2 else 2,
        down_block_types=tuple(k[0] for k in kinds), up_block_types=tuple(k[1] for k in reversed(kinds)),
        # diffusers' attention_head_dim is a head COUNT: SD 1.x 8 everywhere, SD 2.x channels/64
        attention_head_dim=[c // 64 for c in channels] if sd2 else 8,
        cross_attention_dim=TEXT_WIDTH, norm_num_groups=32, use_linear_projection=sd2,
    )


def _vae(scaling_factor: float = 0.18215) -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=32, sample_size=64, scaling_factor=scaling_factor,
    )


def _text(family: str, projection: bool = False) -> CLIPTextModel:
    sd2 = family == "sd2" or projection
    width = BIGG_WIDTH if projection else TEXT_WIDTH
    config = CLIPTextConfig(
        vocab_size=49408, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=2,
        num_attention_heads=width // 64, max_position_embeddings=CONTEXT,
        hidden_act="gelu" if sd2 else "quick_gelu", layer_norm_eps=1e-5,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=0 if sd2 else 49407,
        projection_dim=POOLED_WIDTH if projection else TEXT_WIDTH,
    )
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def _scheduler(family: str, prediction_type: str | None):
    if family == "sdxl":
        return EulerDiscreteScheduler(**{k: v for k, v in SD_SCHEDULE.items() if k not in ("clip_sample", "set_alpha_to_one")},
                                      prediction_type=prediction_type or "epsilon", timestep_spacing="leading")
    if family == "sd2":
        return DDIMScheduler(**SD_SCHEDULE, prediction_type=prediction_type or "v_prediction")
    return PNDMScheduler(**{k: v for k, v in SD_SCHEDULE.items() if k != "clip_sample"},
                         skip_prk_steps=True, prediction_type=prediction_type or "epsilon")


def tiny_sd_components(family: str = "sd1", seed: int = 0, prediction_type: str | None = None) -> dict:
    """unet, vae, text_encoder (random, deterministic in ``seed``) and scheduler; no tokenizer."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, not {family!r}")
    torch.manual_seed(seed)
    xl = family == "sdxl"
    unet, vae, text = _unet(family), _vae(0.13025 if xl else 0.18215), _text(family)
    extra = {"text_encoder_2": _text(family, projection=True)} if xl else {}
    # diffusers zero-initialises conv_out/proj_out, which would hide layout mistakes in outputs
    with torch.no_grad():
        for module in (unet, vae, text, *extra.values()):
            for p in module.parameters():
                if p.abs().sum() == 0:
                    p.normal_(0, 0.05)
    return dict(unet=unet.eval(), vae=vae.eval(), text_encoder=text.eval(), scheduler=_scheduler(family, prediction_type),
                **{k: v.eval() for k, v in extra.items()})


def make_tiny_sd(folder: Path, family: str = "sd1", *, prediction_type: str | None = None, seed: int = 0) -> Path:
    """A tiny diffusers ``StableDiffusionPipeline`` (``StableDiffusionXLPipeline`` for sdxl) folder (``save_pretrained``); returns ``folder``."""
    folder = Path(folder)
    parts = tiny_sd_components(family, seed, prediction_type)
    if family == "sdxl":  # ViT-L's tokenizer pads with the end token, bigG's with "!"
        tokenizers = dict(tokenizer=write_clip_tokenizer(folder / "tokenizer", CONTEXT, pad=EOT),
                          tokenizer_2=write_clip_tokenizer(folder / "tokenizer_2", CONTEXT, pad=PAD))
        StableDiffusionXLPipeline(**parts, **tokenizers, force_zeros_for_empty_prompt=True,
                                  add_watermarker=False).save_pretrained(folder)
        return folder
    tokenizer = write_clip_tokenizer(folder / "tokenizer", CONTEXT, pad=PAD if family == "sd2" else EOT)
    pipe = StableDiffusionPipeline(**parts, tokenizer=tokenizer, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder
