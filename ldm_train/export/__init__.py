"""Inference folders: diffusers pipelines, and the original single-file layout."""
from .export import export_pipeline, export_single_file

__all__ = ["export_pipeline", "export_single_file"]
