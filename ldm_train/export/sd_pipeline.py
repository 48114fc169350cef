"""A diffusers ``StableDiffusionPipeline`` folder assembled from an export whose text tower is a
plain open_clip CLIP text transformer.

``unet/``, ``vae/`` and ``scheduler/`` are diffusers folders already (hard-linked, or copied
across file systems). ``text_encoder/`` becomes a transformers ``CLIPTextModel`` (its
``last_hidden_state`` is our ``TextEncoder.encode_tokens``: the states after ``ln_final``) and
``tokenizer/`` a ``CLIPTokenizer`` built from open_clip's own BPE file, padding with ``"!"``
(id 0, as open_clip pads) like Stable Diffusion 2.x. A tower saved with ``text.layer`` is already
cut at that layer (SD 2.x's penultimate: 23 of ViT-H's 24 layers), so the ``CLIPTextModel`` has
that depth and diffusers' plain ``encode_prompt`` reproduces our states, as diffusers' own SD 2
``text_encoder/`` does. An export whose tower is a transformers ``CLIPTextModel`` already is
copied as it is (``text_encoder/`` and ``tokenizer/``).

Tokenizer caveat: open_clip cleans captions with ``ftfy.fix_text``, ``html.unescape`` and
Python's ``str.lower`` before BPE; a ``CLIPTokenizer`` only applies NFC, whitespace folding and a
per-character lower-case. Captions those steps change tokenize differently: HTML entities
(``&amp;``), curly quotes, ligatures (``ﬁ``), full-width forms, mojibake, control characters that
ftfy deletes (``\x0b``, ``\x1c``), Greek final sigma, and the literal strings
``<start_of_text>``/``<end_of_text>`` (special tokens to open_clip only).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from open_clip.tokenizer import SimpleTokenizer, _clean_lower
from open_clip.transformer import QuickGELU, ResidualAttentionBlock
from safetensors.torch import save_file
from transformers import CLIPTextConfig

from ..errors import UserError
from ..text.encoder import TextEncoder
from ..text.hf import HFTextEncoder
from ..text.towers import load_text_components, save_text_components
from ..text.tokenizer import VOCAB_SIZE, open_clip_bpe, write_clip_tokenizer
from ..utils.runs import check_output

COPIED = ("unet", "vae", "scheduler")


class SDPipelineError(UserError):
    """The export cannot become a StableDiffusionPipeline; the message says why."""


# ---- refusal: only a plain CLIP text transformer with open_clip's BPE tokenizer converts ----

def _refuse(reason: str) -> None:
    raise SDPipelineError(f"cannot build a diffusers CLIPTextModel from this text tower: {reason}")


def _hidden_act(act: torch.nn.Module) -> str | None:
    if isinstance(act, QuickGELU):
        return "quick_gelu"
    if type(act) is torch.nn.GELU:
        return {"none": "gelu", "tanh": "gelu_pytorch_tanh"}.get(act.approximate)
    return None


def _check_tokenizer(text: TextEncoder) -> None:
    tok = text.tokenizer
    if type(tok) is not SimpleTokenizer:
        _refuse(f"its tokenizer is {type(tok).__name__}, not open_clip's CLIP BPE SimpleTokenizer")
    if tok.reduction_fn is not None or tok.clean_fn is not _clean_lower:
        _refuse("its tokenizer uses a non-default text reduction or cleaning")
    if tok.encoder != {t: i for i, t in enumerate(open_clip_bpe()[0])}:
        _refuse("its tokenizer vocabulary is not open_clip's default BPE (extra special tokens?)")
    if tok.context_length != text.context_length:
        _refuse(f"tokenizer context {tok.context_length} != {text.context_length} positions")


def _check_block(i: int, block: torch.nn.Module) -> None:
    if type(block) is not ResidualAttentionBlock:
        _refuse(f"layer {i} is a {type(block).__name__} (qk-norm / cosine attention / extra norms)")
    if not (isinstance(block.ls_1, torch.nn.Identity) and isinstance(block.ls_2, torch.nn.Identity)):
        _refuse(f"layer {i} uses layer scale")
    attn = block.attn
    if not attn._qkv_same_embed_dim or attn.in_proj_bias is None or attn.bias_k is not None or attn.add_zero_attn:
        _refuse(f"layer {i} attention is not a packed-qkv MultiheadAttention with biases")
    if _hidden_act(block.mlp.gelu) is None:
        _refuse(f"layer {i} activation {block.mlp.gelu!r} is neither GELU nor QuickGELU")


def check_clip_text(text: TextEncoder) -> None:
    """Raise :class:`SDPipelineError` naming the reason unless the tower converts exactly."""
    clip = text.clip
    if getattr(clip, "text", None) is not None or not all(
        hasattr(clip, a) for a in ("token_embedding", "positional_embedding", "transformer", "ln_final")
    ):
        _refuse("it is a custom or Hugging Face text tower, not open_clip's CLIP text transformer")
    if clip.token_embedding.num_embeddings != VOCAB_SIZE:
        _refuse(f"its vocabulary has {clip.token_embedding.num_embeddings} tokens, not {VOCAB_SIZE}")
    n = text.context_length
    mask = getattr(clip, "attn_mask", None)
    if mask is None or mask.shape != (n, n) or not torch.equal(torch.isinf(mask), torch.ones(n, n).triu(1).bool()):
        _refuse("its attention is not causal (CLIPTextModel always applies a causal mask)")
    for i, block in enumerate(clip.transformer.resblocks):
        _check_block(i, block)
    norms = [m for b in clip.transformer.resblocks for m in (b.ln_1, b.ln_2)] + [clip.ln_final]
    if any(not isinstance(m, torch.nn.LayerNorm) or m.weight is None or m.bias is None for m in norms):
        _refuse("its norms are not affine LayerNorms with bias")
    if len({m.eps for m in norms}) != 1:
        _refuse("its LayerNorms use different eps values")
    _check_tokenizer(text)


# ---- conversion ----

def clip_text_config(text: TextEncoder) -> CLIPTextConfig:
    check_clip_text(text)
    clip = text.clip
    blocks = clip.transformer.resblocks
    proj = clip.text_projection  # None, an nn.Linear or a [width, embed_dim] matrix
    if isinstance(proj, torch.nn.Linear):
        proj = proj.weight.T
    projection_dim = text.width if proj is None else proj.shape[1]
    return CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=text.width,
        intermediate_size=blocks[0].mlp.c_fc.out_features,
        num_hidden_layers=len(blocks),
        num_attention_heads=blocks[0].attn.num_heads,
        max_position_embeddings=text.context_length,
        hidden_act=_hidden_act(blocks[0].mlp.gelu),
        layer_norm_eps=clip.ln_final.eps,
        projection_dim=projection_dim,
        bos_token_id=VOCAB_SIZE - 2,
        eos_token_id=VOCAB_SIZE - 1,
        pad_token_id=0,
    )


def _linear(prefix: str, layer: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {f"{prefix}.weight": layer.weight, f"{prefix}.bias": layer.bias}


def clip_text_state_dict(text: TextEncoder) -> dict[str, torch.Tensor]:
    """open_clip text-tower weights under HF ``CLIPTextModel`` checkpoint names (``text_model.*``)."""
    check_clip_text(text)
    clip, p = text.clip, "text_model."
    state = {
        p + "embeddings.token_embedding.weight": clip.token_embedding.weight,
        p + "embeddings.position_embedding.weight": clip.positional_embedding,
        **_linear(p + "final_layer_norm", clip.ln_final),
    }
    for i, b in enumerate(clip.transformer.resblocks):
        layer = f"{p}encoder.layers.{i}."
        qkv_w, qkv_b = b.attn.in_proj_weight.chunk(3), b.attn.in_proj_bias.chunk(3)
        for name, w, bias in zip("qkv", qkv_w, qkv_b):
            state[f"{layer}self_attn.{name}_proj.weight"] = w
            state[f"{layer}self_attn.{name}_proj.bias"] = bias
        state.update(_linear(layer + "self_attn.out_proj", b.attn.out_proj))
        state.update(_linear(layer + "layer_norm1", b.ln_1))
        state.update(_linear(layer + "layer_norm2", b.ln_2))
        state.update(_linear(layer + "mlp.fc1", b.mlp.c_fc))
        state.update(_linear(layer + "mlp.fc2", b.mlp.c_proj))
    return {k: v.detach().clone().contiguous().cpu() for k, v in state.items()}


def write_clip_text_model(text: TextEncoder, folder: Path) -> None:
    """``config.json`` + ``model.safetensors`` under the checkpoint names every transformers
    version loads (``text_model.*``; transformers 5 drops that prefix in memory only)."""
    config, state = clip_text_config(text), clip_text_state_dict(text)
    config.architectures = ["CLIPTextModel"]
    config.dtype = str(state["text_model.final_layer_norm.weight"].dtype).removeprefix("torch.")
    config.save_pretrained(folder)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _link_tree(src: Path, dst: Path) -> None:
    """Hard-link the files of ``src`` into ``dst`` (copy where linking is not possible)."""

    def link(s: str, d: str) -> None:
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    shutil.copytree(src, dst, copy_function=link)


def _model_index(export_dir: Path) -> dict:
    import diffusers

    from ..pretrained.pipeline_folder import sd_model_index

    scheduler = json.loads((export_dir / "scheduler" / "scheduler_config.json").read_text())["_class_name"]
    return sd_model_index(scheduler, diffusers.__version__)


def _check_paths(export_dir: Path, out_dir: Path, overwrite: bool) -> None:
    needed = ["unet/config.json", "vae/config.json", "scheduler/scheduler_config.json", "text_encoder"]
    missing = [n for n in needed if not (export_dir / n).exists()]
    if missing:
        raise SDPipelineError(
            f"{export_dir} is not an ldm_train export (missing {', '.join(missing)}); run `ldm-train export`"
        )
    if out_dir.resolve() == export_dir.resolve():
        raise SDPipelineError(f"the pipeline folder must differ from the export folder {export_dir}")
    check_output(out_dir, overwrite, "diffusers pipeline")


def write_sd_pipeline(export_dir: Path, out_dir: Path, overwrite: bool = False) -> Path:
    """Write the StableDiffusionPipeline folder (atomically: ``<out>.partial`` renamed when complete)."""
    export_dir, out_dir = Path(export_dir), Path(out_dir)
    _check_paths(export_dir, out_dir, overwrite)
    text = load_text_components(export_dir)
    if not isinstance(text, HFTextEncoder):
        check_clip_text(text)  # refuse before anything is written
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for name in COPIED:
        _link_tree(export_dir / name, partial / name)
    if isinstance(text, HFTextEncoder):
        save_text_components(text, partial)
    else:
        write_clip_text_model(text, partial / "text_encoder")
        write_clip_tokenizer(partial / "tokenizer", text.context_length)
    (partial / "model_index.json").write_text(json.dumps(_model_index(export_dir), indent=2))
    if out_dir.is_dir():
        shutil.rmtree(out_dir)
    elif out_dir.exists():
        out_dir.unlink()
    partial.rename(out_dir)
    return out_dir
