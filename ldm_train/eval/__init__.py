"""Evaluation: load a run or export, sample with DDIM + classifier-free guidance, score."""
from .pipeline import Pipeline, PipelineError, load_pipeline
from .sample import generate

__all__ = ["Pipeline", "PipelineError", "generate", "load_pipeline"]
