"""Stable Diffusion checkpoints in and out: diffusers pipeline folders and the original single-file
layout (``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.*``)."""
