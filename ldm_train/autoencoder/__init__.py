"""Stage 1: the KL autoencoder (diffusers AutoencoderKL format), pretrained or trained here."""
from .vae import AutoencoderError, build_vae, decode_latents, encode_posterior, latent_scale, load_vae, to_latent

__all__ = ["AutoencoderError", "build_vae", "decode_latents", "encode_posterior", "latent_scale", "load_vae", "to_latent"]
