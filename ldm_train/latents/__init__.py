"""The latent cache: written once by ``encode``, the only thing training reads."""
from .cache import LatentData, load_latents, read_manifest
from .encode import encode_split

__all__ = ["LatentData", "encode_split", "load_latents", "read_manifest"]
