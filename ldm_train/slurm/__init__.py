"""Slurm jobs for the pipeline's stages: render the sbatch script from ``slurm/job.sbatch``,
submit it, and report a run's jobs. Text and subprocess only: this package never imports the
training layers (the job script runs ``ldm-train`` on the nodes)."""
from .render import JobRequest, render
from .status import format_status, status
from .submit import request_for, submit

__all__ = ["JobRequest", "format_status", "render", "request_for", "status", "submit"]
