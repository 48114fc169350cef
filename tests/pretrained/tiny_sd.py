"""Tiny randomly initialised Stable Diffusion pipelines, shaped like the real families so that the
conventions a single-file reader relies on hold (nothing is downloaded):

- ``sd1``: SD 1.x: 1x1-conv ``proj_in``/``proj_out``, 8 attention heads at every level
  (diffusers' ``attention_head_dim=8`` is SD 1.x's head COUNT), a transformers ``CLIPTextModel``
  with quick_gelu, 64 channels per head, padded with ``<|endoftext|>``, epsilon prediction;
- ``sd2``: SD 2.x: linear ``proj_in``/``proj_out``, 64 channels per head (``attention_head_dim``
  = channels/64 per level), gelu, padded with ``"!"``, v-prediction (768-v) unless told otherwise.
  Its ``text_encoder/`` is the penultimate-layer tower, as diffusers' SD 2 folders have it.

Both have an SD-shaped ``AutoencoderKL`` (scaling factor 0.18215), the real CLIP vocabulary
(49408 tokens: the embedding is most of the ~13 MB on disk) and 77 positions. The U-Net has three
levels (sd1) or two (sd2) so that both LDM upsampler positions (after a resnet, after an attention)
occur.

Other tests import it as ``from pretrained.tiny_sd import make_tiny_sd`` (``tests/`` is on the path).
"""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from ldm_train.text.tokenizer import EOT, PAD, write_clip_tokenizer

FAMILIES = ("sd1", "sd2")
TEXT_WIDTH = 64  # one 64-channel head, as both CLIP towers have (ViT-L 768/12, ViT-H 1024/16)
CONTEXT = 77
SD_SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                   clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def _unet(family: str) -> UNet2DConditionModel:
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


def _vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=32, sample_size=64, scaling_factor=0.18215,
    )


def _text(family: str) -> CLIPTextModel:
    sd2 = family == "sd2"
    config = CLIPTextConfig(
        vocab_size=49408, hidden_size=TEXT_WIDTH, intermediate_size=4 * TEXT_WIDTH, num_hidden_layers=2,
        num_attention_heads=TEXT_WIDTH // 64, max_position_embeddings=CONTEXT,
        hidden_act="gelu" if sd2 else "quick_gelu", layer_norm_eps=1e-5,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=0 if sd2 else 49407,
        projection_dim=TEXT_WIDTH,
    )
    return CLIPTextModel(config)


def _scheduler(family: str, prediction_type: str | None):
    if family == "sd2":
        return DDIMScheduler(**SD_SCHEDULE, prediction_type=prediction_type or "v_prediction")
    return PNDMScheduler(**{k: v for k, v in SD_SCHEDULE.items() if k != "clip_sample"},
                         skip_prk_steps=True, prediction_type=prediction_type or "epsilon")


def tiny_sd_components(family: str = "sd1", seed: int = 0, prediction_type: str | None = None) -> dict:
    """unet, vae, text_encoder (random, deterministic in ``seed``) and scheduler; no tokenizer."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, not {family!r}")
    torch.manual_seed(seed)
    unet, vae, text = _unet(family), _vae(), _text(family)
    # diffusers zero-initialises conv_out/proj_out, which would hide layout mistakes in outputs
    with torch.no_grad():
        for module in (unet, vae, text):
            for p in module.parameters():
                if p.abs().sum() == 0:
                    p.normal_(0, 0.05)
    return dict(unet=unet.eval(), vae=vae.eval(), text_encoder=text.eval(), scheduler=_scheduler(family, prediction_type))


def make_tiny_sd(folder: Path, family: str = "sd1", *, prediction_type: str | None = None, seed: int = 0) -> Path:
    """A tiny diffusers ``StableDiffusionPipeline`` folder (``save_pretrained``); returns ``folder``."""
    folder = Path(folder)
    parts = tiny_sd_components(family, seed, prediction_type)
    tokenizer = write_clip_tokenizer(folder / "tokenizer", CONTEXT, pad=PAD if family == "sd2" else EOT)
    pipe = StableDiffusionPipeline(**parts, tokenizer=tokenizer, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder
