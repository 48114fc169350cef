"""Stage 1: a KL-regularised autoencoder in the diffusers ``AutoencoderKL`` format.

A pretrained VAE folder (e.g. Stable Diffusion's ``vae/``) and one trained by ``train-vae`` are
loaded by the same :func:`load_vae`, so every later stage is agnostic of where it came from.
Latents fed to the diffusion model are ``z = scaling_factor * (posterior_sample - shift_factor)``
(LDM sec. 4.3.2: rescale so the latents have roughly unit variance).

:func:`load_vae` takes a VAE folder, a whole Stable Diffusion checkpoint folder (its ``vae/`` is
found), or a Hub id where the hub is reachable. In fp16, a VAE whose config sets diffusers'
``force_upcast`` (VAEs known to overflow in fp16, e.g. SD-XL's) runs in fp32 instead, as
diffusers' pipelines do; the project's own VAEs are saved with ``force_upcast: false``.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from ..errors import UserError
from ..config import AutoencoderConfig
from ..utils.hub import hub_unavailable

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # org/name, as the Hub spells repo ids


class AutoencoderError(UserError):
    """A VAE folder that cannot be used; the message names the path and what to provide."""


def build_vae(cfg: AutoencoderConfig) -> AutoencoderKL:
    """A fresh, randomly initialised AutoencoderKL; downsampling factor 2**(levels-1)."""
    levels = len(cfg.block_out_channels)
    for ch in cfg.block_out_channels:
        if ch % cfg.norm_num_groups:
            raise AutoencoderError(
                f"autoencoder.block_out_channels: {ch} is not divisible by autoencoder.norm_num_groups={cfg.norm_num_groups}"
            )
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_num_groups,
        scaling_factor=1.0,
        force_upcast=False,  # small and trained here in fp32; nothing known to overflow in fp16
    )


def load_vae(
    path: str | Path, dtype: str = "fp32", subfolder: str | None = None, force_upcast: bool | None = None
) -> AutoencoderKL:
    """A diffusers AutoencoderKL from a local folder, the parent of a ``vae/`` folder, or a Hub id.

    ``subfolder``: where the VAE sits inside ``path`` (default: ``path`` itself, else ``vae/``).
    ``force_upcast``: None follows the VAE's config (diffusers' flag; absent means true)."""
    value = str(path)
    folder = _local_folder(Path(path), subfolder)
    if folder is None:
        if Path(path).exists() or not _HUB_ID.fullmatch(value):
            raise AutoencoderError(_missing_message(Path(path) / (subfolder or "")))
        return _load_hub(value, subfolder, dtype, force_upcast)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise AutoencoderError(f"{folder / 'config.json'} describes a {config['_class_name']}, not an AutoencoderKL; set autoencoder.path to the VAE folder")
    torch_dtype = _run_dtype(dtype, config, force_upcast, str(folder))
    try:
        vae = AutoencoderKL.from_pretrained(folder, torch_dtype=torch_dtype, local_files_only=True)
    except (OSError, ValueError) as e:
        raise AutoencoderError(f"cannot load the autoencoder in {folder}: {_first_line(e)}") from None
    return vae.eval().requires_grad_(False)


def _missing_message(folder: Path) -> str:
    return (
        f"no autoencoder at {folder}: expected a diffusers AutoencoderKL folder with config.json and "
        "diffusion_pytorch_model.safetensors (or a checkpoint folder with it in vae/). Train one with "
        "`ldm-train train-vae`, or copy a pretrained VAE folder (e.g. a Stable Diffusion checkpoint's vae/) "
        "there and set autoencoder.path"
    )


def _local_folder(path: Path, subfolder: str | None) -> Path | None:
    """The folder holding config.json: ``path/subfolder``, else ``path``, else ``path/vae``."""
    candidates = [path / subfolder] if subfolder else [path, path / "vae"]
    for folder in candidates:
        if (folder / "config.json").is_file():
            if folder != candidates[0]:
                log.info("autoencoder: using %s (the vae/ folder of %s)", folder, path)
            return folder
    return None


def _run_dtype(dtype: str, config: dict, force_upcast: bool | None, where: str) -> torch.dtype:
    """fp16 with ``force_upcast`` -> fp32 (bf16 has fp32's range, so it never needs this)."""
    upcast = config.get("force_upcast", True) if force_upcast is None else force_upcast
    if dtype == "fp16" and upcast:
        log.warning("autoencoder %s: config sets force_upcast (known to overflow in fp16): running it in fp32 instead of fp16", where)
        return torch.float32
    return DTYPES[dtype]


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _hub_message(repo: str, why: str) -> str:
    return (
        f"autoencoder.path {repo!r} is not a local folder; as a Hugging Face Hub id it cannot be loaded here ({why}). "
        f"Download it where the hub is reachable (`huggingface-cli download {repo} --include 'vae/*' --local-dir DIR`; "
        "a VAE-only repo without --include), copy DIR here and set autoencoder.path to it (its vae/ is found)"
    )


def _load_hub(repo: str, subfolder: str | None, dtype: str, force_upcast: bool | None) -> AutoencoderKL:
    """From the Hub (VAE-only repos at the root, full checkpoints in ``vae/``), where reachable."""
    why = hub_unavailable()
    if why:
        raise AutoencoderError(_hub_message(repo, why))
    error = None
    for sub in [subfolder] if subfolder else [None, "vae"]:
        try:
            config = AutoencoderKL.load_config(repo, subfolder=sub)
            torch_dtype = _run_dtype(dtype, config, force_upcast, f"{repo} ({sub or 'root'})")
            vae = AutoencoderKL.from_pretrained(repo, subfolder=sub, torch_dtype=torch_dtype)
            return vae.eval().requires_grad_(False)
        except Exception as e:  # hub/network errors come in many types; all mean "not here"
            error = e
    raise AutoencoderError(_hub_message(repo, _first_line(error)))


def latent_scale(vae: AutoencoderKL) -> tuple[float, float]:
    """(scaling_factor, shift_factor) from the VAE's config; shift is 0 for SD 1/2 VAEs."""
    shift = getattr(vae.config, "shift_factor", None)
    return float(vae.config.scaling_factor), float(shift or 0.0)


@torch.no_grad()
def encode_posterior(vae: AutoencoderKL, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Images in [-1,1] -> posterior (mean, std), unscaled, in the VAE's dtype."""
    dist = vae.encode(images.to(vae.dtype)).latent_dist
    return dist.mean, dist.std


def to_latent(mean: torch.Tensor, std: torch.Tensor, scale: float, shift: float, generator=None) -> torch.Tensor:
    """Draw z ~ N(mean, std^2) from a cached posterior and rescale to the diffusion latent space."""
    eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=torch.float32)
    return (mean.float() + std.float() * eps - shift) * scale


@torch.no_grad()
def decode_latents(vae: AutoencoderKL, z: torch.Tensor) -> torch.Tensor:
    """Scaled latents -> images in [-1, 1] (float32)."""
    scale, shift = latent_scale(vae)
    x = vae.decode((z / scale + shift).to(vae.dtype)).sample
    return x.float().clamp(-1, 1)
