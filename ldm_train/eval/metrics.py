"""Image-quality metrics with a pinned protocol: FID and KID (torchmetrics, standard Inception from a
local file, cached reference statistics) and CLIP score (open_clip, local weights).

Pinned FID/KID protocol (written next to every number as ``result["protocol"]``):

* Feature extractor: torchmetrics' ``NoTrainInceptionV3`` ("inception-v3-compat"), i.e. torch-fidelity's
  port of the 2015 TF Inception (``pt_inception-2015-12-05-6726825d.pth``, the weights FID papers use),
  loaded from a LOCAL file (``eval.metrics.inception_weights``), pool3 features (2048-d) by default.
  Nothing is ever downloaded: without the file, :class:`MetricsUnavailable` says which key and file.
* Input: ``uint8`` tensors ``[N, 3, H, W]`` in ``[0, 255]`` for both the real and the generated side
  (generated images are quantised to uint8 before scoring, like saved PNGs; no JPEG anywhere).
* Resize: done by the Inception wrapper itself, identically for both sides: the uint8 image is cast to
  float32 and resized to 299x299 with torch-fidelity's ``interpolate_bilinear_2d_like_tensorflow1x``
  (TF1 bilinear, ``align_corners=False``, no antialiasing; what torch-fidelity and the original TF FID
  code do), then scaled as ``(x - 128) / 128``. torchmetrics >= 1.x defaults to ``antialias=True``
  (``F.interpolate(..., mode="bilinear", antialias=True)``), which gives different numbers; we pass
  ``antialias=False`` unless ``resize="bilinear_antialias"`` is asked for, and the protocol says which.
  A custom ``feature=`` module (tests) receives the uint8 images as given: no resize by this code.
* Features are computed ONCE per image (batches of ``batch_size``) and fed to both torchmetrics
  ``FrechetInceptionDistance`` and ``KernelInceptionDistance`` through a pass-through feature module,
  so FID and KID see exactly the same features. FID statistics are accumulated in float64 (torchmetrics).
* Reference (real) side: ``reset_real_features=False`` semantics across calls through a cache:
  the real features (float32, ``[N, d]``) are saved with safetensors as
  ``reference_cache/<sha256(key)[:16]>.safetensors`` (key JSON in its metadata and in a ``.json``
  beside it) and reused when the full key matches: the caller's ``reference_key`` (dataset spec,
  resolution, ...) plus the number of real images, their H x W, the resize method, the feature
  extractor, its feature dim and a fingerprint of its weights.
* KID: polynomial kernel MMD (degree 3, gamma 1/d, coef 1), ``kid_subsets`` subsets of
  ``min(kid_subset_size, n_real, n_fake)`` images, drawn with a fixed seed (deterministic).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..errors import UserError
from ..utils.hashing import tensor_hash
from ..utils.images import to_uint8  # noqa: F401  (kept here for eval.distributed and stages)

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_SHA256_PREFIX = "6726825d"  # torch-fidelity names its release file after its sha256
RESIZE_METHODS = {
    "tf1_bilinear": (
        "299x299 by torchmetrics NoTrainInceptionV3(antialias=False): torch-fidelity "
        "interpolate_bilinear_2d_like_tensorflow1x (TF1 bilinear, align_corners=False, no antialias) on the "
        "uint8 image cast to float32, then (x-128)/128; same for real and fake"
    ),
    "bilinear_antialias": (
        "299x299 by torchmetrics NoTrainInceptionV3(antialias=True): torch.nn.functional.interpolate("
        "mode='bilinear', align_corners=False, antialias=True) on the uint8 image cast to float32, then "
        "(x-128)/128; same for real and fake"
    ),
}
CUSTOM_RESIZE = "none (custom feature module receives the uint8 [N,3,H,W] images as given)"


class MetricsUnavailable(UserError):
    """A metric cannot be computed here (weights file missing, optional package missing); the message
    names the config key and the file to provide."""


# ----------------------------------------------------------------------------------------- helpers


def _check_u8(images: torch.Tensor, what: str) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        dtype = images.dtype if isinstance(images, torch.Tensor) else None
        raise UserError(f"{what}: expected uint8 images [N, 3, H, W] in [0, 255], got {shape} {dtype}")
    return images


def _require_local(path: str | Path | None, need: str, key: str, provide: str) -> None:
    """Raise :class:`MetricsUnavailable` unless ``path`` is a file: nothing is downloaded here, so
    the message names the config ``key`` to set and what to ``provide``."""
    if path is None or not Path(path).is_file():
        where = "is not set" if path is None else f"= {path} does not exist"
        raise MetricsUnavailable(f"{need} and this machine cannot download them: {key} {where}; set {key} to {provide}")


class _PassThrough(nn.Module):
    """Feature "extractor" for torchmetrics that returns its input: we feed precomputed features."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


# ----------------------------------------------------------------------------------------- Inception


def load_inception(weights_path: str | Path | None, feature: int = 2048, resize: str = "tf1_bilinear") -> nn.Module:
    """The standard FID Inception (torch-fidelity's 2015 weights) through torchmetrics'
    ``NoTrainInceptionV3``, from a local file only; returns a module ``uint8 [N,3,H,W] -> [N, feature]``.

    Never downloads: a ``None`` or missing path raises :class:`MetricsUnavailable` first.
    """
    if resize not in RESIZE_METHODS:
        raise UserError(f"eval.metrics.fid_resize: {resize!r} is not one of {sorted(RESIZE_METHODS)}")
    if feature not in (64, 192, 768, 2048):
        raise UserError(f"eval.metrics.fid_feature: {feature} is not one of 64, 192, 768, 2048")
    _require_local(weights_path, "FID/KID need the Inception weights", "eval.metrics.inception_weights",
                   f"a local copy of {INCEPTION_FILE} (torch-fidelity's release file "
                   "weights-inception-2015-12-05-6726825d.pth)")
    try:
        from torchmetrics.image.fid import NoTrainInceptionV3
        import torch_fidelity  # noqa: F401
    except ImportError as e:  # pragma: no cover - the project depends on torch-fidelity
        raise MetricsUnavailable(f"FID/KID need the torch-fidelity package ({e}); pip install torch-fidelity") from e
    try:
        net = NoTrainInceptionV3(
            name="inception-v3-compat",
            features_list=[str(feature)],
            feature_extractor_weights_path=str(weights_path),
            antialias=(resize == "bilinear_antialias"),
        )
    except Exception as e:
        raise MetricsUnavailable(
            f"eval.metrics.inception_weights: {weights_path} is not a usable Inception state dict ({type(e).__name__}: "
            f"{str(e)[:300]}); provide {INCEPTION_FILE} (torch-fidelity's release file)"
        ) from e
    net.protocol_name = "inception-v3-compat (torch-fidelity pt_inception-2015-12-05)"
    net.num_features = feature
    net.resize_method = resize
    with open(weights_path, "rb") as f:
        net.weights_sha256 = hashlib.file_digest(f, "sha256").hexdigest()
    return net


# ----------------------------------------------------------------------------------------- FID / KID


@dataclass
class FIDProtocol:
    """What a FID/KID number means; ``asdict`` is JSON-serialisable and goes next to the number."""

    feature_extractor: str
    feature_dim: int
    resize: str
    num_real: int
    num_fake: int
    reference_key: dict = field(default_factory=dict)
    input_dtype: str = "uint8 [0,255], RGB, [N,3,H,W]"
    real_size: list[int] = field(default_factory=list)
    fake_size: list[int] = field(default_factory=list)
    weights_sha256: str | None = None
    kid_subsets: int = 0
    kid_subset_size: int = 0
    kid_kernel: str = "polynomial degree 3, gamma 1/d, coef 1"
    fid_impl: str = "torchmetrics.image.fid.FrechetInceptionDistance (float64 statistics)"
    kid_impl: str = "torchmetrics.image.kid.KernelInceptionDistance"

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def _features(net: nn.Module, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    device = next((p.device for p in net.parameters()), torch.device("cpu"))
    out = [net(images[i : i + batch_size].to(device)).float().reshape(min(batch_size, len(images) - i), -1).cpu()
           for i in range(0, len(images), batch_size)]
    return torch.cat(out)


def _describe(feature: nn.Module) -> tuple[str, str, str | None]:
    """(name, resize text, weights sha256) for the protocol."""
    name = getattr(feature, "protocol_name", None)
    if name is not None:
        return name, RESIZE_METHODS[feature.resize_method], getattr(feature, "weights_sha256", None)
    return f"custom:{type(feature).__module__}.{type(feature).__qualname__}", CUSTOM_RESIZE, None


def _cache_path(cache_dir: Path, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir / f"{digest}.safetensors"


def _load_reference(path: Path, key: dict) -> torch.Tensor | None:
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            stored = json.loads((f.metadata() or {}).get("key", "null"))
            if stored != json.loads(json.dumps(key, sort_keys=True)):
                return None
            return f.get_tensor("real_features")
    except Exception:  # a corrupt or foreign file is a miss and is rewritten
        return None


def _save_reference(path: Path, key: dict, feats: torch.Tensor) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(key, sort_keys=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # one per process: ranks may write the same key
    save_file({"real_features": feats.contiguous()}, str(tmp), metadata={"key": text})
    tmp.replace(path)  # atomic: concurrent ranks/readers never see a half-written file
    path.with_suffix(".json").write_text(json.dumps(key, indent=2, sort_keys=True))


def compute_fid_kid(
    real_u8: torch.Tensor,
    fake_u8: torch.Tensor,
    feature: int | nn.Module = 2048,
    reference_cache: str | Path | None = None,
    reference_key: dict | None = None,
    kid_subset_size: int = 1000,
    *,
    inception_weights: str | Path | None = None,
    resize: str = "tf1_bilinear",
    kid_subsets: int = 100,
    batch_size: int = 64,
    seed: int = 0,
) -> dict:
    """FID and KID of ``fake_u8`` against ``real_u8`` (both uint8 ``[N,3,H,W]``) on the same features.

    ``feature``: an ``nn.Module`` (``uint8 images -> [N, d]``; tests, or a preloaded
    :func:`load_inception`) or an Inception layer size (64/192/768/2048), then loaded from
    ``inception_weights`` (raises :class:`MetricsUnavailable` without it). ``reference_cache``: a folder
    for cached real features (``None``: no cache, ``"reference_cache": "off"``). Returns
    ``{"fid", "kid_mean", "kid_std", "protocol": {...}, "reference_cache": "hit"|"miss"|"off"}``.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    _check_u8(real_u8, "real images")
    _check_u8(fake_u8, "generated images")
    if len(real_u8) < 2 or len(fake_u8) < 2:
        raise UserError(f"FID needs at least 2 real and 2 generated images, got {len(real_u8)} and {len(fake_u8)}")
    try:
        json.dumps(reference_key or {})
    except TypeError as e:
        raise UserError(f"reference_key must be JSON-serialisable (strings, numbers, lists, dicts): {e}") from e
    net = load_inception(inception_weights, feature, resize) if isinstance(feature, int) else feature
    net.eval()
    name, resize_text, weights_sha = _describe(net)
    key = {
        **(reference_key or {}),
        "num_real": len(real_u8),
        "real_size": list(real_u8.shape[2:]),
        "resize": resize_text,
        "feature_extractor": name,
        "feature_weights": tensor_hash(net)[:16],
    }

    status, real_feats, path = "off", None, None
    if reference_cache is not None:
        path = _cache_path(Path(reference_cache), key)
        real_feats = _load_reference(path, key)
        status = "hit" if real_feats is not None else "miss"
    if real_feats is None:
        real_feats = _features(net, real_u8, batch_size)
        if path is not None:
            _save_reference(path, key, real_feats)
    fake_feats = _features(net, fake_u8, batch_size)
    dim = real_feats.shape[1]
    if fake_feats.shape[1] != dim:
        raise UserError(f"feature dims differ: real {dim}, fake {fake_feats.shape[1]}")

    fid = FrechetInceptionDistance(feature=_PassThrough(dim), reset_real_features=False)
    fid.update(real_feats, real=True)
    fid.update(fake_feats, real=False)
    subset = min(kid_subset_size, len(real_feats), len(fake_feats))
    with warnings.catch_warnings():  # "will save all extracted features": intended (we pass features)
        warnings.filterwarnings("ignore", message=".*save all extracted features.*")
        kid = KernelInceptionDistance(feature=_PassThrough(dim), subsets=kid_subsets, subset_size=subset,
                                      reset_real_features=False)
    kid.update(real_feats, real=True)
    kid.update(fake_feats, real=False)
    fid_value = float(fid.compute())
    with torch.random.fork_rng(devices=[]):  # KID's random subsets: fixed, without touching caller RNG
        torch.manual_seed(seed)
        kid_mean, kid_std = (float(v) for v in kid.compute())

    protocol = FIDProtocol(
        feature_extractor=name, feature_dim=dim, resize=resize_text, num_real=len(real_u8), num_fake=len(fake_u8),
        reference_key=dict(reference_key or {}), real_size=list(real_u8.shape[2:]), fake_size=list(fake_u8.shape[2:]),
        weights_sha256=weights_sha, kid_subsets=kid_subsets, kid_subset_size=subset,
    )
    return {"fid": fid_value, "kid_mean": kid_mean, "kid_std": kid_std, "protocol": protocol.to_dict(),
            "reference_cache": status}


# ----------------------------------------------------------------------------------------- CLIP score


def load_clip(model_name: str, pretrained_path: str | Path | None):
    """(model, preprocess, tokenizer) of an open_clip architecture from local weights only; a folder
    in open_clip's layout (``open_clip_config.json`` + weights, as ``train-clip`` writes) brings its
    own architecture, and ``model_name`` is then unused."""
    import open_clip

    if pretrained_path is not None and Path(pretrained_path).is_dir():  # open_clip's folder: its own architecture
        from ..text.common import TextEncoderError
        from ..text.open_clip_folder import load_open_clip_folder

        try:
            return load_open_clip_folder(pretrained_path)
        except TextEncoderError as e:
            raise MetricsUnavailable(f"eval.metrics.clip_weights: {e}") from None
    if open_clip.get_model_config(model_name) is None:
        raise MetricsUnavailable(f"eval.metrics.clip_model: {model_name!r} is not an open_clip architecture")
    _require_local(pretrained_path, "CLIP score needs local open_clip weights", "eval.metrics.clip_weights",
                   f"a local open_clip checkpoint (.safetensors or .bin/.pt) of eval.metrics.clip_model={model_name!r} "
                   "(e.g. open_clip_model.safetensors of laion/CLIP-ViT-B-32)")
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=str(pretrained_path))
    except Exception as e:
        raise MetricsUnavailable(
            f"eval.metrics.clip_weights: {pretrained_path} cannot be loaded into eval.metrics.clip_model={model_name!r} "
            f"({type(e).__name__}: {str(e)[:300]})"
        ) from e
    return model.eval().requires_grad_(False), preprocess, open_clip.get_tokenizer(model_name)


@torch.no_grad()
def clip_score(
    images_u8: torch.Tensor,
    prompts: Sequence[str],
    model_name: str,
    pretrained_path: str | Path | None,
    *,
    batch_size: int = 64,
    model: Any = None,
) -> dict:
    """CLIP score of image/prompt pairs: ``100 * mean_i max(cos(E_img(x_i), E_txt(p_i)), 0)``
    (Hessel et al. 2021 with w = 100, the per-pair clamp; torchmetrics' ``CLIPScore`` clamps after
    averaging instead, also returned as ``clip_score_clamp_after_mean``; equal when no cosine is < 0).

    Preprocessing is the model's own open_clip eval transform (``create_model_and_transforms``): each
    uint8 image goes through PIL, resize of the shorter side to the model's image_size (bicubic),
    center crop, to float [0,1], normalise with the model's mean/std (OpenAI CLIP's by default).
    Text: the model's open_clip tokenizer (truncated to its context length).
    ``model``: an already loaded ``(model, preprocess, tokenizer)`` from :func:`load_clip` to reuse.
    """
    from PIL import Image

    _check_u8(images_u8, "CLIP score images")
    if len(prompts) != len(images_u8):
        raise UserError(f"CLIP score: {len(images_u8)} images but {len(prompts)} prompts")
    clip, preprocess, tokenizer = model if model is not None else load_clip(model_name, pretrained_path)
    device = next(clip.parameters()).device
    cos = []
    for i in range(0, len(images_u8), batch_size):
        imgs = images_u8[i : i + batch_size]
        pixels = torch.stack([preprocess(Image.fromarray(im.permute(1, 2, 0).cpu().numpy())) for im in imgs])
        img = clip.encode_image(pixels.to(device)).float()
        txt = clip.encode_text(tokenizer(list(prompts[i : i + batch_size])).to(device)).float()
        img = img / img.norm(dim=-1, keepdim=True)
        txt = txt / txt.norm(dim=-1, keepdim=True)
        cos.append((img * txt).sum(-1).cpu())
    cos = torch.cat(cos).double()
    return {
        "clip_score": float(100 * cos.clamp(min=0).mean()),
        "clip_score_clamp_after_mean": float((100 * cos.mean()).clamp(min=0)),
        "clip_protocol": {
            "model": model_name,
            "weights": str(pretrained_path) if pretrained_path is not None else None,
            "preprocess": "open_clip eval transform of the model (resize shorter side bicubic, center crop, "
                          "normalise with the model's mean/std) on uint8 RGB images via PIL",
            "definition": "100 * mean(max(cos(image, text), 0)) per pair",
            "num_pairs": len(cos),
        },
    }


# ----------------------------------------------------------------------------------------- all


def evaluate_images(
    fake_u8: torch.Tensor,
    real_u8: torch.Tensor | None = None,
    prompts: Sequence[str] | None = None,
    *,
    inception_weights: str | Path | None = None,
    feature: int | nn.Module = 2048,
    resize: str = "tf1_bilinear",
    reference_cache: str | Path | None = None,
    reference_key: dict | None = None,
    kid_subset_size: int = 1000,
    kid_subsets: int = 100,
    clip_model: str | None = "ViT-B-32",
    clip_weights: str | Path | None = None,
    batch_size: int = 64,
    seed: int = 0,
) -> dict:
    """Every metric that can be computed here; one that cannot (missing weights, ...) is recorded as
    ``{"fid": None, "kid_mean": None, "kid_std": None, "fid_error": msg}`` /
    ``{"clip_score": None, "clip_error": msg}`` instead of raising, so training never stops on it.
    FID/KID are skipped (None + error) without ``real_u8``; CLIP score without ``prompts``. With the
    CLIP come ``caption_retrieval`` (each image's own prompt among the distinct prompts) and
    ``fd_clip`` (FD on that CLIP's image features against ``real_u8``; not Inception FID), see
    :mod:`ldm_train.eval.clip_metrics`.
    ``fid_seconds`` / ``clip_seconds``: wall time of each part (the evaluation-cost report).
    Distributed: call it on rank 0 with the images gathered from all ranks."""
    out: dict[str, Any] = {}
    if real_u8 is None:
        out.update(fid=None, kid_mean=None, kid_std=None, fid_error="no real images given")
    else:
        start = time.perf_counter()
        try:
            out.update(compute_fid_kid(
                real_u8, fake_u8, feature, reference_cache, reference_key, kid_subset_size,
                inception_weights=inception_weights, resize=resize, kid_subsets=kid_subsets,
                batch_size=batch_size, seed=seed,
            ))
        except MetricsUnavailable as e:
            out.update(fid=None, kid_mean=None, kid_std=None, fid_error=str(e))
        out["fid_seconds"] = round(time.perf_counter() - start, 3)
    if prompts is None or clip_model is None:
        out.update(clip_score=None, clip_error="no prompts given" if prompts is None else "eval.metrics.clip_model is not set")
    else:
        start = time.perf_counter()
        try:
            bundle = load_clip(clip_model, clip_weights)
            out.update(clip_score(fake_u8, prompts, clip_model, clip_weights, batch_size=batch_size, model=bundle))
            from .clip_metrics import clip_report  # caption retrieval and FD-CLIP with the same CLIP

            out.update(clip_report(bundle, fake_u8, prompts, real_u8))
        except MetricsUnavailable as e:
            out.update(clip_score=None, clip_error=str(e))
        out["clip_seconds"] = round(time.perf_counter() - start, 3)
    return out
