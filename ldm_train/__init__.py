"""ldm_train: a latent diffusion training pipeline.

Stages (imports flow one way): data -> autoencoder / text -> latents -> model -> diffusion ->
train -> eval -> export. ``model`` and ``diffusion`` never import accelerate, deepspeed or
torch.distributed.
"""
__version__ = "0.1.0"


def load_unet(path, dtype=None):
    """A trained or pretrained U-Net from a diffusers ``UNet2DConditionModel`` folder or an
    ldm_train U-Net folder (see :func:`ldm_train.model.load.load_unet`). Imports torch lazily, so
    ``import ldm_train`` stays light."""
    from ldm_train.model.load import load_unet as _load_unet

    return _load_unet(path, dtype)
