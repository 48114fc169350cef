"""The latent-diffusion denoiser: a cross-attention U-Net in pure torch, plus conversion from
and to diffusers' ``UNet2DConditionModel`` folders (JSON + safetensors, no diffusers import)."""
from ldm_train.model.unet import UNet, build_unet
from ldm_train.model.convert import (
    UNetFolderError,
    UNetWeightsError,
    UnsupportedUNetConfig,
    diffusers_config_from_model,
    model_config_from_diffusers,
    read_diffusers_unet,
    read_project_unet,
    write_diffusers_unet,
    write_project_unet,
)
from ldm_train.model.load import UNetArchitectureMismatch, load_unet, load_unet_weights

__all__ = [
    "UNet", "build_unet", "load_unet", "load_unet_weights", "model_config_from_diffusers",
    "diffusers_config_from_model", "read_diffusers_unet", "write_diffusers_unet", "read_project_unet",
    "write_project_unet", "UnsupportedUNetConfig", "UNetWeightsError", "UNetFolderError",
    "UNetArchitectureMismatch",
]
