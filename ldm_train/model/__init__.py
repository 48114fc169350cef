"""The latent-diffusion denoiser: a cross-attention U-Net in pure torch."""
from ldm_train.model.unet import UNet, build_unet

__all__ = ["UNet", "build_unet"]
