"""``pretrained: PATH``: one key to start from Stable Diffusion.

PATH is a diffusers Stable Diffusion pipeline folder (``model_index.json``, ``unet/``, ``vae/``,
``text_encoder/``, ``tokenizer/``, ``scheduler/``) or a single-file checkpoint in the original SD
1.x/2.x layout, which is converted once into such a folder under ``{run}/pretrained/``. From the
folder come the U-Net's architecture (``model.*``) and weights (``model.init_from``), the VAE
(``autoencoder.path``), the text tower (``text.encoder: transformers``), the training resolution
and the noise schedule with its ``prediction_type``. :func:`apply_pretrained` fills those keys
before any stage runs, so every stage (encode, train, sample, eval, export) sees the same parts.

Keys the user set win, with two exceptions refused naming both values: an architecture key the
weights contradict (they would not load), and a schedule or prediction type other than the one the
network learnt, unless ``diffusion.change_pretrained_schedule`` says it is meant (fine-tuning
epsilon -> v is legitimate; doing it silently is not).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import Config, ConfigError, DiffusionConfig, _set_dotted
from ..errors import UserError
from ..model.convert import model_config_from_diffusers
from ..model.load import architecture_differences
from ..model.unet import unet_kwargs
from .scheduler import SCHEDULE_KEYS, ddim_scheduler, schedule_keys
from .sdxl import SDXL_PARTS, check_sdxl_widths, is_sdxl, sdxl_text_updates

log = logging.getLogger(__name__)

PARTS = ("unet/config.json", "vae/config.json", "text_encoder/config.json", "tokenizer",
         "scheduler/scheduler_config.json")
NOT_YET = {"StableDiffusionXLImg2Img": "the SDXL refiner", "StableDiffusion3": "SD3", "StableCascade": "Stable Cascade",
           "Flux": "FLUX", "PixArt": "PixArt", "Kandinsky": "Kandinsky"}
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")
# model.* keys that do not change what the weights compute: the user's value is kept.
FREE_MODEL_KEYS = ("dropout", "gradient_checkpointing", "upcast_attention", "init_from")
CONVERT_WAIT_S = 3600.0  # other ranks wait this long at most for local rank 0's conversion


class PretrainedError(UserError):
    """A ``pretrained`` path that is not a usable SD model, or a config that contradicts it."""


def _where() -> str:
    return ("a diffusers Stable Diffusion pipeline folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, "
            "scheduler/) or an SD 1.x/2.x single-file checkpoint (.safetensors, .ckpt)")


@dataclass(frozen=True)
class Pretrained:
    """The configs of a pipeline folder; the weights stay on disk until a stage loads them."""

    folder: Path
    unet: dict
    vae: dict
    text: dict
    scheduler: dict
    text_2: dict | None = None  # SDXL's second tower (text_encoder_2/config.json)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise PretrainedError(f"pretrained: {path} is not readable JSON ({e})") from None


def read_pipeline_configs(folder: Path) -> Pretrained:
    """Check that ``folder`` is an SD pipeline and read its components' configs (refusals first)."""
    index = folder / "model_index.json"
    if not index.is_file():
        raise PretrainedError(f"pretrained: {folder} has no model_index.json: not a diffusers pipeline; expected {_where()}")
    name = str(_read_json(index).get("_class_name", ""))
    family = next((v for k, v in NOT_YET.items() if name.startswith(k)), None)
    if family is not None:
        raise PretrainedError(f"pretrained: {index} is a {name} ({family}): {family} models are not supported yet "
                              "(SD 1.x and 2.x are)")
    parts = PARTS + (SDXL_PARTS if is_sdxl(name, folder) else ())
    missing = [p for p in parts if not (folder / p).exists()]
    if missing:
        raise PretrainedError(f"pretrained: {folder} lacks {', '.join(missing)}; a Stable Diffusion pipeline folder "
                              f"has all of {', '.join(p.split('/')[0] + '/' for p in parts)}")
    text_2 = _read_json(folder / SDXL_PARTS[0]) if len(parts) > len(PARTS) else None
    return Pretrained(folder, *(_read_json(folder / p) for p in (PARTS[0], PARTS[1], PARTS[2], PARTS[4])), text_2)


def _stamp(path: Path, prediction_type: str) -> str:
    st = path.stat()
    key = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}:{prediction_type}"
    return hashlib.sha256(key.encode()).hexdigest()[:10]


def _single_file_schedule(family: str, cfg: Config, path: Path) -> DiffusionConfig:
    """SD 1.x and 2.x all train on the same scaled-linear schedule; only the prediction type of
    SD 2.x (768-v: v_prediction, 512-base: epsilon) cannot be told from the weights."""
    explicit = "prediction_type" in cfg.diffusion.model_fields_set
    if family == "sd2" and not explicit:
        raise PretrainedError(
            f"pretrained: {path} is an SD 2.x checkpoint, whose 768-v (v_prediction) and 512-base (epsilon) "
            "versions have the same weights layout: set diffusion.prediction_type to v_prediction or epsilon")
    prediction = cfg.diffusion.prediction_type if explicit else "epsilon"
    return DiffusionConfig(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                           beta_end=0.012, prediction_type=prediction)


def convert_single_file(path: Path, cfg: Config) -> Path:
    """The pipeline folder of a single file: ``{run}/pretrained/NAME-HASH`` (written once, atomically;
    local rank 0 converts, the node's other ranks wait for its folder)."""
    from .pipeline_folder import write_pipeline_folder
    from .single_file import inspect_single_file, read_single_file

    family, _ = inspect_single_file(path)  # refusals (SDXL, truncated, pickled code...) before any work
    schedule = _single_file_schedule(family, cfg, path)
    out = cfg.path("{run}") / "pretrained" / f"{path.stem}-{_stamp(path, schedule.prediction_type)}"
    if (out / "model_index.json").is_file():
        return out
    if int(os.environ.get("LOCAL_RANK", "0")) != 0:
        return _wait_for(out, path)
    log.info("pretrained: converting %s (%s single file) into the pipeline folder %s", path, family, out)
    partial = out.with_name(f"{out.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    write_pipeline_folder(read_single_file(path), partial, dict(ddim_scheduler(schedule).config))
    try:
        partial.rename(out)
    except OSError:  # another process of this node finished first: its folder is the same conversion
        shutil.rmtree(partial, ignore_errors=True)
    return out


def _wait_for(out: Path, path: Path) -> Path:
    """Poll for local rank 0's conversion (a state on disk, not a fixed wait), with a ceiling."""
    start = time.monotonic()
    while not (out / "model_index.json").is_file():
        if time.monotonic() - start > CONVERT_WAIT_S:
            raise PretrainedError(f"pretrained: waited {CONVERT_WAIT_S:.0f} s for local rank 0 to convert {path} "
                                  f"into {out}; it has not appeared (did rank 0 fail?)")
        time.sleep(2.0)
    return out


def open_pretrained(cfg: Config) -> Pretrained:
    path = Path(cfg.pretrained)
    if path.is_file():
        if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
            raise PretrainedError(f"pretrained: {path} is a file but not a checkpoint ({', '.join(SINGLE_FILE_SUFFIXES)}); "
                                  f"expected {_where()}")
        return read_pipeline_configs(convert_single_file(path, cfg))
    if path.is_dir():
        return read_pipeline_configs(path)
    raise PretrainedError(
        f"pretrained: {path} not found; provide {_where()}. Nothing is downloaded here: for a Hugging Face Hub id, "
        "run `huggingface-cli download ID --local-dir DIR` where the hub is reachable, copy DIR here and set pretrained: DIR")


# ---- filling the config ----

def _model_section(cfg: Config, pre: Pretrained, errors: list[str]) -> dict:
    source = str(pre.folder / PARTS[0])
    derived = model_config_from_diffusers(pre.unet, source)
    mine = {k: getattr(cfg.model, k) for k in cfg.model.model_fields_set}
    candidate = derived.model_copy(update=mine)
    errors += [d.replace("the weights' config", source) for d in
               architecture_differences(unet_kwargs(candidate), unet_kwargs(derived))]
    out = candidate.model_dump()
    out["init_from"] = mine.get("init_from") or str(pre.folder / "unet")
    return out


def _diffusion_updates(cfg: Config, pre: Pretrained, errors: list[str]) -> dict:
    source = str(pre.folder / PARTS[4])
    theirs = {**schedule_keys(pre.scheduler, source), "formulation": "ddpm"}
    explicit, updates = cfg.diffusion.model_fields_set, {}
    for key, value in theirs.items():
        ours = getattr(cfg.diffusion, key)
        if key not in explicit:
            updates[key] = value
        elif ours != value and not cfg.diffusion.change_pretrained_schedule:
            errors.append(f"diffusion.{key}: {ours!r} in the config, {value!r} in {source} (the pretrained network "
                          "learnt that one); set diffusion.change_pretrained_schedule: true to train with yours")
        elif ours != value:
            log.warning("pretrained: training with diffusion.%s=%r; the pretrained network learnt %r "
                        "(diffusion.change_pretrained_schedule)", key, ours, value)
    return updates


def _check_text_width(pre: Pretrained, errors: list[str]) -> None:
    width, context = pre.text.get("hidden_size"), pre.unet.get("cross_attention_dim")
    if width != context:
        errors.append(f"text: {pre.folder / PARTS[2]} is {width} wide but the U-Net ({pre.folder / PARTS[0]}) "
                      f"attends to cross_attention_dim {context}: these are not parts of one model")


def _updates(cfg: Config, pre: Pretrained, errors: list[str]) -> dict[str, object]:
    """{dotted key: value} that the pretrained folder sets (keys the user left unset)."""
    up: dict[str, object] = {"model": _model_section(cfg, pre, errors)}
    up.update({f"diffusion.{k}": v for k, v in _diffusion_updates(cfg, pre, errors).items()})
    if "path" not in cfg.autoencoder.model_fields_set:
        up["autoencoder.path"] = str(pre.folder)  # load_vae finds its vae/
        for key in ("block_out_channels", "layers_per_block", "latent_channels", "norm_num_groups"):
            if key in pre.vae and key not in cfg.autoencoder.model_fields_set:
                up[f"autoencoder.{key}"] = pre.vae[key]
    text_set = cfg.text.model_fields_set
    if pre.text_2 is not None:
        up.update(sdxl_text_updates(text_set, cfg.text.sdxl.model_fields_set, pre.folder))
    elif "encoder" not in text_set and "path" not in cfg.text.transformers.model_fields_set:
        up["text.encoder"], up["text.transformers.path"] = "transformers", str(pre.folder)
    if "resolution" not in cfg.data.model_fields_set and pre.unet.get("sample_size"):
        down = 2 ** (len(pre.vae.get("block_out_channels", [0] * 4)) - 1)
        up["data.resolution"] = int(pre.unet["sample_size"]) * down
    return up


def apply_pretrained(cfg: Config) -> Config:
    """``cfg`` with the keys ``pretrained`` sets filled in (unchanged without ``pretrained``).
    Raises :class:`PretrainedError` listing every contradiction, one line each."""
    if cfg.pretrained is None:
        check_init_from(cfg)
        return cfg
    pre = open_pretrained(cfg)
    errors: list[str] = []
    updates = _updates(cfg, pre, errors)
    if updates.get("text.encoder") == "transformers":  # the pipeline's own text tower
        _check_text_width(pre, errors)
    if updates.get("text.encoder") == "sdxl":
        errors += check_sdxl_widths(pre.unet, pre.text, pre.text_2, pre.folder)
    if errors:
        raise PretrainedError(f"the config contradicts pretrained {cfg.pretrained}:\n  " + "\n  ".join(errors))
    tree = cfg.model_dump()
    # data.buckets refuses grid keys next to an explicit sizes list *when set*: a full dump would set them all
    tree["data"]["buckets"] = cfg.data.buckets.model_dump(exclude_unset=True)
    for key, value in updates.items():
        _set_dotted(tree, key, value)
    if "lr" not in cfg.train.model_fields_set and cfg.train.lr > 1e-4:
        log.warning("pretrained: train.lr is %g (the default, meant for training from scratch); fine-tuning Stable "
                    "Diffusion uses about 1e-5 (configs/sd15-finetune.yaml)", cfg.train.lr)
    try:
        resolved = Config.model_validate(tree)
    except ValueError as e:
        raise ConfigError(f"pretrained {cfg.pretrained}: {e}") from None
    log.info("pretrained: %s sets %s", pre.folder, ", ".join(k for k in updates))
    return resolved


# ---- model.init_from alone ----

def init_from_schedule(path: Path) -> tuple[dict, str] | None:
    """The schedule keys recorded next to a U-Net folder (a pipeline's ``scheduler/`` or an
    export's full diffusion section), and where; None when nothing says what it learnt."""
    for root in (path, path.parent):
        ours = root / "scheduler" / "ldm_train_diffusion.json"
        if ours.is_file():
            raw = _read_json(ours)
            return {k: raw[k] for k in SCHEDULE_KEYS if k in raw}, str(ours)
        theirs = root / "scheduler" / "scheduler_config.json"
        if theirs.is_file():
            return schedule_keys(_read_json(theirs), str(theirs)), str(theirs)
    return None


def check_init_from(cfg: Config) -> None:
    """``model.init_from`` without ``pretrained``: the configured schedule must be the one the
    weights learnt, where their folder says (else a warning that it cannot be checked)."""
    if cfg.model.init_from is None:
        return
    found = init_from_schedule(Path(cfg.model.init_from))
    if found is None:
        log.warning("model.init_from %s: no scheduler config beside it, so its prediction type cannot be checked; "
                    "training it as diffusion.prediction_type=%s", cfg.model.init_from, cfg.diffusion.prediction_type)
        return
    theirs, source = found
    diffs = [f"diffusion.{k}: {getattr(cfg.diffusion, k)!r} in the config, {v!r} in {source}"
             for k, v in theirs.items() if getattr(cfg.diffusion, k) != v]
    if diffs and not cfg.diffusion.change_pretrained_schedule:
        raise PretrainedError(
            f"model.init_from {cfg.model.init_from} learnt another schedule than the config's:\n  " + "\n  ".join(diffs)
            + "\n  set them as the weights have them (or use `pretrained:`, which does), or set "
              "diffusion.change_pretrained_schedule: true to retrain on yours")
