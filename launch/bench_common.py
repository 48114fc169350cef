"""What the launch/bench_*.py scripts share: where the SD 1.5 preset lives, how a ``--config``
value becomes a U-Net config, and the run-in-a-temporary-folder-then-report frame.

The scripts import it as a sibling (``import bench_common``): Python puts a script's own folder
first on ``sys.path``, so this works for ``python launch/bench_x.py`` from any directory, with no
path set-up. ldm_train itself comes from the environment (the editable install, or PYTHONPATH on
the GPU box, see launch/gpu_bench_unet.sh).
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SD15_CONFIG = REPO / "configs" / "sd15.yaml"  # Stable Diffusion 1.5: U-Net, VAE, noise schedule


def config_file(value: str) -> Path:
    """A config file named on the command line: as given, else relative to the repo root."""
    path = Path(value)
    if not path.is_file() and not path.is_absolute() and (REPO / path).is_file():
        path = REPO / path
    return path


def preset_arg(presets: dict, many: bool = False):
    """argparse ``type`` for ``--config``: a preset name or a config file's path (checked now);
    ``many``: a comma list of them, parsed to a list."""

    def one(value: str) -> str:
        if value in presets or config_file(value).is_file():
            return value
        raise argparse.ArgumentTypeError(f"{value!r} is neither a preset ({', '.join(presets)}) nor a config file")

    return (lambda values: [one(v) for v in values.split(",")]) if many else one


def preset(value: str, presets: dict, like: str = "sd15") -> dict:
    """``presets[value]`` with its ``model`` as a ``ModelConfig``. A preset's model is inline keys
    (a dict) or a config file (a Path: its ``model`` section). A ``value`` that is not a preset
    name is a config file: preset ``like``'s sizes with that file's model section."""
    from ldm_train.config import ModelConfig, load_config

    chosen = dict(presets[value]) if value in presets else {**presets[like], "model": config_file(value)}
    model = chosen["model"]
    if isinstance(model, Path):
        chosen["model_file"] = str(model)
        chosen["model"] = load_config(model).model
    else:
        chosen["model"] = ModelConfig(**model)
    return chosen


def sync(device) -> None:
    """Wait for the GPU, so that wall-clock times cover the work (nothing to wait for on CPU)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_and_report(run, table, args, prefix: str) -> int:
    """``run(args, tmp)`` in a fresh temporary folder (always removed), print ``table(result)``,
    and write the result to ``args.json`` when given. The ``main`` of a script's benchmark."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        result = run(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(table(result))
    if args.json is not None:
        write_json(args.json, result)
    return 0


def write_json(path, obj, indent: int = 2) -> Path:
    """``obj`` as JSON at ``path`` (parent folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=indent) + "\n")
    return path


# CLIP ViT-L/14's text tower, the one Stable Diffusion 1.x conditions on (openai/clip-vit-large-patch14's
# text_config, as SD 1.5's text_encoder/config.json has it): 123 M parameters.
SD15_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                 layer_norm_eps=1e-5, projection_dim=768, bos_token_id=0, eos_token_id=2, pad_token_id=1)


def sd15_text_encoder(folder: Path, seed: int = 0, **overrides):
    """SD 1.5's text tower at random init (``overrides``: smaller sizes for tests): a transformers
    ``CLIPTextModel`` with the offline CLIP tokenizer written to ``folder`` (77 tokens, padding
    with the end token as SD 1.x does), in ldm_train's ``HFTextEncoder``."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    from ldm_train.text.hf import HFTextEncoder
    from ldm_train.text.tokenizer import EOT, write_clip_tokenizer

    config = CLIPTextConfig(**{**SD15_TEXT, **overrides})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPTextModel(config)
    return HFTextEncoder(model, write_clip_tokenizer(folder, config.max_position_embeddings, pad=EOT))
