"""ldm_train: a latent diffusion training pipeline.

Stages (imports flow one way): data -> autoencoder / text -> latents -> model -> diffusion ->
train -> eval -> export. ``model`` and ``diffusion`` never import accelerate, deepspeed or
torch.distributed.
"""
__version__ = "0.1.0"
