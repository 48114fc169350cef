"""``export``: a self-contained folder for inference, independent of the training run folder.

With a transformers CLIP text tower (Stable Diffusion's; ``text.encoder: transformers``) the
folder is a diffusers ``StableDiffusionPipeline``, loadable as it is::

    export/
      model_index.json            StableDiffusionPipeline: which component lives where
      unet/                       EMA weights as a diffusers UNet2DConditionModel folder
      vae/                        diffusers AutoencoderKL folder (save_pretrained)
      text_encoder/, tokenizer/   transformers CLIPTextModel (cut at text.layer) + CLIPTokenizer
      scheduler/                  a diffusers DDIMScheduler config (+ our full diffusion section)

With an open_clip tower, ``text_encoder/`` holds the open_clip config + weights and
``model_index.json`` says ``"_class_name": "ldm_train"`` with a note: diffusers cannot load that
tower, so ``--diffusers-pipeline DIR`` converts it (``ldm_train.export.sd_pipeline``).
``--single-file FILE`` also writes the original SD single-file layout (A1111, ComfyUI).
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from ..autoencoder.vae import DTYPES
from ..config import ModelConfig
from ..eval.pipeline import DIFFUSION_FILE, Pipeline
from ..model.convert import write_diffusers_unet
from ..pretrained.scheduler import ddim_scheduler
from ..text import save_text_components
from ..pretrained.pipeline_folder import _diffusers_version, sdxl_model_index
from .sd_pipeline import _model_index, write_sd_pipeline

OPEN_CLIP_NOTE = ("an ldm_train export with an open_clip text tower, which diffusers cannot load: "
                  "`ldm-train export --diffusers-pipeline DIR` converts it into a StableDiffusionPipeline folder")


def export_pipeline(out_dir: Path, pipe: Pipeline, dtype: str = "fp32") -> Path:
    """Write the export folder from a loaded pipeline (atomically: ``<out>.partial`` renamed when
    complete); ``model_index.json``'s class name says whether it is a diffusers pipeline."""
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    unet = getattr(pipe.unet, "_orig_mod", pipe.unet)
    weights = {k: v.to(DTYPES[dtype]).contiguous().cpu() for k, v in unet.state_dict().items()}
    write_diffusers_unet(partial / "unet", ModelConfig.model_validate(unet.config), weights,
                         sample_size=pipe.latent_shape[-1])
    pipe.vae.to(DTYPES[dtype]).save_pretrained(partial / "vae", safe_serialization=True)
    save_text_components(pipe.text, partial)
    ddim_scheduler(pipe.diffusion).save_config(partial / "scheduler")
    # The full diffusion section too (learned variance, weighting...), which diffusers has no key for.
    (partial / "scheduler" / DIFFUSION_FILE).write_text(json.dumps(pipe.diffusion.model_dump(), indent=2))
    if (partial / "tokenizer_2").is_dir():  # SDXL's two towers: a StableDiffusionXLPipeline folder
        index = sdxl_model_index(json.loads((partial / "scheduler" / "scheduler_config.json").read_text())["_class_name"],
                                 _diffusers_version())
    elif (partial / "tokenizer").is_dir():
        index = _model_index(partial)
    else:
        index = {"_class_name": "ldm_train", "_note": OPEN_CLIP_NOTE, "unet": "unet", "vae": "vae",
                 "text_encoder": "text_encoder", "scheduler": "scheduler", "latent_shape": list(pipe.latent_shape)}
    (partial / "model_index.json").write_text(json.dumps(index, indent=2))
    shutil.rmtree(out_dir, ignore_errors=True)
    partial.rename(out_dir)
    return out_dir


def is_diffusers_pipeline(export_dir: Path) -> bool:
    return json.loads((export_dir / "model_index.json").read_text()).get("_class_name") in (
        "StableDiffusionPipeline", "StableDiffusionXLPipeline")


def export_single_file(export_dir: Path, path: Path, dtype: str) -> Path:
    """The export as one SD 1.x/2.x single file (original key layout), via its diffusers form."""
    from ..pretrained.pipeline_folder import read_pipeline_folder
    from ..pretrained.single_file import write_single_file

    partial = path.with_name(f"{path.stem}.partial{path.suffix}")  # the writer checks the suffix
    if is_diffusers_pipeline(export_dir):
        write_single_file(partial, read_pipeline_folder(export_dir), DTYPES[dtype])
    else:  # open_clip tower: converted to a CLIPTextModel first, in a scratch folder
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            pipeline = write_sd_pipeline(export_dir, Path(tmp) / "pipeline")
            write_single_file(partial, read_pipeline_folder(pipeline), DTYPES[dtype])
    partial.replace(path)
    return path
