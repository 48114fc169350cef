"""Export: a self-contained inference folder (EMA U-Net, VAE, text tower, scheduler)."""
from .export import export_pipeline, scheduler_for

__all__ = ["export_pipeline", "scheduler_for"]
