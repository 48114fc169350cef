"""The text tower as Stable Diffusion ships it in diffusers' layout: a transformers ``CLIPTextModel``
(``text_encoder/``) and its ``CLIPTokenizer`` (``tokenizer/``).

The conditioning is what diffusers' ``StableDiffusionPipeline.encode_prompt`` computes: ids padded
to ``tokenizer.model_max_length`` (77) and truncated, no attention mask (CLIP is causal and SD
never masked the padding), the ``last_hidden_state`` (after ``final_layer_norm``) in fp32.
``text.layer`` keeps only the first layers (see :mod:`ldm_train.text.common`), so the cut tower's
``last_hidden_state`` is ``encode_prompt(clip_skip=N-1)``'s states and an exported tower
reproduces them in diffusers with no clip-skip setting.

Offline only: a path that is not a local folder (a Hub id included) is refused with one line
saying what to provide; nothing is downloaded.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file
from transformers import CLIPTextModel, CLIPTokenizer

from ..config import TextConfig
from .common import TextEncoderError, first_line, kept_layers

MODEL_DIR, TOKENIZER_DIR = "text_encoder", "tokenizer"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # org/name, as the Hub spells repo ids
# fp32 whatever the checkpoint's dtype (transformers 5 loads in the saved dtype by default); the
# keyword was torch_dtype before transformers 4.56
_DTYPE_KW = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"


class HFTextEncoder(torch.nn.Module):
    """Tokenizer + transformers ``CLIPTextModel``; the interface of the open_clip ``TextEncoder``."""

    kind = "transformers"

    def __init__(self, model: CLIPTextModel, tokenizer: CLIPTokenizer, layer: str | int = "last",
                 source_layers: int | None = None):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.layer = layer
        self.source_layers = source_layers or model.config.num_hidden_layers
        if self.context_length > model.config.max_position_embeddings:
            raise TextEncoderError(
                f"the tokenizer pads to {self.context_length} tokens but the CLIPTextModel has only "
                f"{model.config.max_position_embeddings} positions; use the tokenizer saved with the model")

    @property
    def name(self) -> str:
        c = self.model.config
        return f"transformers-clip-text-w{c.hidden_size}-l{c.num_hidden_layers}of{self.source_layers}"

    @property
    def width(self) -> int:
        return self.model.config.hidden_size

    @property
    def context_length(self) -> int:
        return self.tokenizer.model_max_length

    @property
    def weights_module(self) -> torch.nn.Module:
        """The module whose weights define the conditioning (hashed by the latent cache)."""
        return self.model

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        # exactly encode_prompt's call
        return self.tokenizer(captions, padding="max_length", max_length=self.context_length,
                              truncation=True, return_tensors="pt").input_ids

    @torch.no_grad()
    def encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        ids = tokens.to(self.model.device, torch.long)  # a tokens-only cache stores int32
        return self.model(input_ids=ids).last_hidden_state

    def forward(self, captions: list[str]) -> torch.Tensor:
        return self.encode_tokens(self.tokenize(captions))


# ---- where the files are ----

def _refuse_missing(key: str, path: Path, what: str) -> None:
    value = str(path)
    if not path.exists() and _HUB_ID.fullmatch(value) and not value.startswith((".", "/")):
        raise TextEncoderError(
            f"{key} {value!r} is not a local folder; as a Hugging Face Hub id it cannot be loaded here "
            f"(nothing is downloaded). Download it where the hub is reachable (`huggingface-cli download {value} "
            f"--include 'text_encoder/*' 'tokenizer/*' --local-dir DIR`), copy DIR here and set {key} to it")
    raise TextEncoderError(f"{key}: {path} {what}")


def find_folders(cfg: TextConfig) -> tuple[Path, Path]:
    """(CLIPTextModel folder, CLIPTokenizer folder) named by ``text.transformers``."""
    if cfg.transformers.path is None:
        raise TextEncoderError("text.encoder is transformers but text.transformers.path is not set; set it to a "
                               "CLIPTextModel folder or a Stable Diffusion pipeline folder (text_encoder/, tokenizer/)")
    path = Path(cfg.transformers.path)
    if (path / "config.json").is_file():
        model, beside = path, [path.parent / TOKENIZER_DIR, path / TOKENIZER_DIR]
    elif (path / MODEL_DIR / "config.json").is_file():
        model, beside = path / MODEL_DIR, [path / TOKENIZER_DIR]
    else:
        _refuse_missing("text.transformers.path", path, "holds neither config.json nor text_encoder/config.json; "
                        "provide a CLIPTextModel folder or a Stable Diffusion pipeline folder")
    if cfg.transformers.tokenizer is not None:
        tokenizer = Path(cfg.transformers.tokenizer)
        if not tokenizer.is_dir():
            _refuse_missing("text.transformers.tokenizer", tokenizer, "is not a folder; provide a CLIPTokenizer "
                            "folder (vocab.json, merges.txt, tokenizer_config.json)")
        return model, tokenizer
    for tokenizer in beside:
        if tokenizer.is_dir():
            return model, tokenizer
    raise TextEncoderError(f"text.transformers.path: no tokenizer for {model} (looked for "
                           f"{' and '.join(map(str, beside))}); set text.transformers.tokenizer to its CLIPTokenizer folder")


# ---- load, cut, save ----

def _cut(model: CLIPTextModel, layer: str | int) -> CLIPTextModel:
    """Keep the layers up to ``text.layer``; the config says so too, so save_pretrained reloads it."""
    depth = kept_layers(layer, model.config.num_hidden_layers)
    encoder = getattr(model, "text_model", model).encoder  # transformers 4 nests it in text_model
    encoder.layers = encoder.layers[:depth]
    model.config.num_hidden_layers = depth
    return model


def load_hf_folders(model_dir: Path, tokenizer_dir: Path, layer: str | int = "last") -> HFTextEncoder:
    """A tower from local folders, in fp32, cut at ``layer``."""
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise TextEncoderError(f"cannot read {model_dir / 'config.json'}: {first_line(e)}") from None
    total = config.get("num_hidden_layers", config.get("text_config", {}).get("num_hidden_layers", 12))
    kept_layers(layer, total)  # refuse a layer too deep before reading the weights
    model = load_clip_model(CLIPTextModel, model_dir)
    return HFTextEncoder(_cut(model, layer), load_tokenizer(tokenizer_dir), layer, total)


def load_clip_model(cls, model_dir: Path):
    """A transformers CLIP text model class (``CLIPTextModel``, ``...WithProjection``) from a local folder, fp32."""
    try:
        return cls.from_pretrained(model_dir, local_files_only=True, **{_DTYPE_KW: torch.float32})
    except (OSError, ValueError, KeyError) as e:
        raise TextEncoderError(f"cannot load a {cls.__name__} from {model_dir}: {first_line(e)}") from None


def load_tokenizer(tokenizer_dir: Path) -> CLIPTokenizer:
    """A ``CLIPTokenizer`` from a local folder, refusing one transformers would build empty."""
    if not (tokenizer_dir / "tokenizer.json").is_file() and not all(
            (tokenizer_dir / f).is_file() for f in ("vocab.json", "merges.txt")):
        # transformers 5 would build an empty tokenizer from such a folder, without a word
        raise TextEncoderError(f"cannot load a CLIPTokenizer from {tokenizer_dir}: it has neither tokenizer.json "
                               "nor vocab.json + merges.txt; copy the tokenizer/ saved with the model there")
    try:
        tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise TextEncoderError(f"cannot load a CLIPTokenizer from {tokenizer_dir}: {first_line(e)}; provide "
                               "vocab.json, merges.txt and tokenizer_config.json") from None
    return tokenizer


def load_hf_text(cfg: TextConfig) -> HFTextEncoder:
    """The tower ``text.transformers`` names, cut at ``text.layer``."""
    model_dir, tokenizer_dir = find_folders(cfg)
    return load_hf_folders(model_dir, tokenizer_dir, cfg.layer)


def save_hf_text(text: HFTextEncoder, root: Path) -> None:
    """``root/text_encoder/`` (config + ``model.safetensors``) and ``root/tokenizer/``, as
    diffusers' ``StableDiffusionPipeline.from_pretrained`` reads them. The weights go under the
    ``text_model.*`` names that every transformers version loads (transformers 5 writes them
    without the prefix, which transformers 4 cannot read)."""
    save_clip_model(text.model, root / MODEL_DIR)
    save_tokenizer(text.tokenizer, root / TOKENIZER_DIR)


def save_clip_model(model, model_dir: Path) -> None:
    """config.json + ``model.safetensors`` with every text-tower tensor under ``text_model.*``
    (a projection stays ``text_projection.*``), the names both transformers 4 and 5 load."""
    model_dir.mkdir(parents=True, exist_ok=True)
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(model_dir)
    state = {k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k: v.detach().contiguous().cpu()
             for k, v in model.state_dict().items()}
    state.pop("text_model.embeddings.position_ids", None)  # a buffer, rebuilt at load
    save_file(state, str(model_dir / "model.safetensors"), metadata={"format": "pt"})


def save_tokenizer(tokenizer: CLIPTokenizer, folder: Path) -> None:
    """``save_pretrained`` plus ``vocab.json`` and ``merges.txt``: transformers 5 writes only
    ``tokenizer.json``, and transformers 4's (slow) ``CLIPTokenizer``, which diffusers pipelines
    name in ``model_index.json``, reads only those two."""
    tokenizer.save_pretrained(folder)
    model = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    if not (folder / "vocab.json").is_file():
        (folder / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False), encoding="utf-8")
    if not (folder / "merges.txt").is_file():
        (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
