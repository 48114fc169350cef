"""The diffusers ``StableDiffusionPipeline`` folder of an :class:`~.single_file.SDCheckpoint`, both
ways: ``unet/``, ``vae/``, ``text_encoder/`` + ``tokenizer/``, ``scheduler/``, ``model_index.json``."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ldm_train.pretrained.single_file import CLIP, EXTRAS_FILE, SDCheckpoint, SingleFileError, _separate
from ldm_train.pretrained.sdxl_keys import SCHEDULER_SDXL
from ldm_train.text.tokenizer import EOT, PAD, write_clip_tokenizer

SCHEDULER_DEFAULTS = {  # the schedulers of SD 1.5 and SD 2.1 (768-v) as their folders have them
    "sd1": {"_class_name": "PNDMScheduler", "num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
            "beta_start": 0.00085, "beta_end": 0.012, "set_alpha_to_one": False, "skip_prk_steps": True,
            "steps_offset": 1, "trained_betas": None, "prediction_type": "epsilon"},
    "sd2": {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
            "beta_start": 0.00085, "beta_end": 0.012, "clip_sample": False, "set_alpha_to_one": False,
            "steps_offset": 1, "trained_betas": None, "prediction_type": "v_prediction"},
    "sdxl": SCHEDULER_SDXL,
}


def sd_model_index(scheduler_class: str, diffusers_version: str) -> dict:
    """``model_index.json`` of a StableDiffusionPipeline without safety checker or feature extractor."""
    return {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers_version,
        "feature_extractor": [None, None], "image_encoder": [None, None], "requires_safety_checker": False,
        "safety_checker": [None, None], "scheduler": ["diffusers", scheduler_class],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
    }


def sdxl_model_index(scheduler_class: str, diffusers_version: str) -> dict:
    """``model_index.json`` of a StableDiffusionXLPipeline (two towers, two tokenizers)."""
    return {
        "_class_name": "StableDiffusionXLPipeline", "_diffusers_version": diffusers_version,
        "feature_extractor": [None, None], "image_encoder": [None, None], "force_zeros_for_empty_prompt": True,
        "scheduler": ["diffusers", scheduler_class], "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def _read_component(folder: Path, name: str, weights: str) -> tuple[dict, dict[str, torch.Tensor]]:
    config, tensors = folder / name / "config.json", folder / name / weights
    for needed in (config, tensors):
        if not needed.is_file():
            raise SingleFileError(f"{folder}: not an SD pipeline folder: {needed.relative_to(folder)} is missing")
    try:
        return json.loads(config.read_text()), load_file(str(tensors))
    except (ValueError, SafetensorError, OSError) as e:
        raise SingleFileError(f"{folder}: cannot read {name}/ ({e})") from None


def read_pipeline_folder(folder) -> SDCheckpoint:
    """A diffusers SD 1.x / 2.x pipeline folder (``unet/``, ``vae/``, ``text_encoder/``, safetensors
    weights) as an :class:`SDCheckpoint`; the family is SD 2.x where the U-Net projects linearly."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SingleFileError(f"{folder}: no such folder")
    unet_config, unet = _read_component(folder, "unet", "diffusion_pytorch_model.safetensors")
    vae_config, vae = _read_component(folder, "vae", "diffusion_pytorch_model.safetensors")
    text_config, text = _read_component(folder, "text_encoder", "model.safetensors")
    family = "sd2" if unet_config.get("use_linear_projection") else "sd1"
    text = {k if k.startswith("text_model.") else "text_model." + k: v for k, v in text.items()}
    text_2_config = text_2 = None
    if (folder / "text_encoder_2").is_dir():  # an SDXL pipeline
        family = "sdxl"
        text_2_config, text_2 = _read_component(folder, "text_encoder_2", "model.safetensors")
        text_2 = {k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k: v for k, v in text_2.items()}
    extras_file = folder / "text_encoder" / EXTRAS_FILE
    if extras_file.is_file():
        extras = load_file(str(extras_file))
    elif family == "sd1":  # SD 1.x files carry CLIP's position_ids buffer; A1111-era loaders expect it
        positions = text_config.get("max_position_embeddings", 77)
        extras = {CLIP + "text_model.embeddings.position_ids": torch.arange(positions)[None]}
    else:
        extras = {}
    width, context = text_config.get("hidden_size"), unet_config.get("cross_attention_dim")
    width += text_2_config.get("hidden_size", 0) if text_2_config else 0
    if width != context:
        raise SingleFileError(f"{folder}: the U-Net's cross_attention_dim {context} differs from the "
                              f"text encoder's width {width}")
    unet_config.setdefault("_class_name", "UNet2DConditionModel")
    vae_config.setdefault("_class_name", "AutoencoderKL")
    return SDCheckpoint(family=family, unet_config=unet_config, unet=unet, vae_config=vae_config, vae=vae,
                        text_config=text_config, text=text, extras=extras, ema=False, ignored={},
                        text_2_config=text_2_config, text_2=text_2)


def _diffusers_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("diffusers")
    except PackageNotFoundError:
        return "0.42.1"


def write_pipeline_folder(ckpt: SDCheckpoint, out: Path, scheduler_config: dict | None = None) -> Path:
    """A diffusers ``StableDiffusionPipeline`` folder (no safety checker) that
    ``from_pretrained(out, local_files_only=True)`` loads; ``ckpt.extras`` go to
    ``text_encoder/ldm_train_single_file_extras.safetensors`` so that :func:`read_pipeline_folder`
    and :func:`write_single_file` give the original file back. Built under ``out.partial`` first."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SingleFileError(f"{out}: exists and is not empty; choose a new folder")
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    version = _diffusers_version()
    scheduler = dict(scheduler_config or SCHEDULER_DEFAULTS[ckpt.family])
    parts = {
        "unet": ({**ckpt.unet_config, "_diffusers_version": version}, ckpt.unet, "diffusion_pytorch_model.safetensors"),
        "vae": ({**ckpt.vae_config, "_diffusers_version": version}, ckpt.vae, "diffusion_pytorch_model.safetensors"),
        "text_encoder": (ckpt.text_config, ckpt.text, "model.safetensors"),
    }
    if ckpt.family == "sdxl":
        parts["text_encoder_2"] = (ckpt.text_2_config, ckpt.text_2, "model.safetensors")
    for name, (config, tensors, weights) in parts.items():
        (partial / name).mkdir(parents=True)
        (partial / name / "config.json").write_text(json.dumps(config, indent=2))
        save_file(_separate(tensors), str(partial / name / weights), metadata={"format": "pt"})
    if ckpt.extras:
        save_file(_separate(ckpt.extras), str(partial / "text_encoder" / EXTRAS_FILE), metadata={"format": "pt"})
    write_clip_tokenizer(partial / "tokenizer", ckpt.text_config.get("max_position_embeddings", 77),
                         pad=PAD if ckpt.family == "sd2" else EOT)
    if ckpt.family == "sdxl":  # bigG's tokenizer pads with "!"
        write_clip_tokenizer(partial / "tokenizer_2", ckpt.text_2_config.get("max_position_embeddings", 77), pad=PAD)
    (partial / "scheduler").mkdir()
    scheduler.setdefault("_class_name", SCHEDULER_DEFAULTS[ckpt.family]["_class_name"])
    (partial / "scheduler" / "scheduler_config.json").write_text(json.dumps({**scheduler, "_diffusers_version": version}, indent=2))
    index = (sdxl_model_index if ckpt.family == "sdxl" else sd_model_index)(scheduler["_class_name"], version)
    (partial / "model_index.json").write_text(json.dumps(index, indent=2))
    if out.exists():
        out.rmdir()
    os.replace(partial, out)
    return out
