"""``pretrained:`` an SDXL pipeline folder (diffusers' ``StableDiffusionXLPipeline`` layout: the SD
parts plus ``text_encoder_2/`` and ``tokenizer_2/``): which extra parts it needs, the text keys it
sets (``text.encoder: sdxl``, SDXL's penultimate layer) and the widths that must agree."""
from __future__ import annotations

from pathlib import Path

from ..model.addition import pooled_dim

SDXL_INDEX = "StableDiffusionXLPipeline"
SDXL_PARTS = ("text_encoder_2/config.json", "tokenizer_2")


def is_sdxl(index_name: str, folder: Path) -> bool:
    return index_name == SDXL_INDEX or (folder / "text_encoder_2").is_dir()


def sdxl_text_updates(text_set: set[str], sdxl_set: set[str], folder: Path) -> dict:
    up: dict[str, object] = {}
    if "encoder" not in text_set and "path" not in sdxl_set:
        up["text.encoder"], up["text.sdxl.path"] = "sdxl", str(folder)
    if "layer" not in text_set:
        up["text.layer"] = "penultimate"  # encode_prompt's hidden_states[-2]
    return up


def check_sdxl_widths(unet: dict, text: dict, text_2: dict, folder: Path) -> list[str]:
    """The two towers' widths must add up to the U-Net's context, and bigG's projection must be its pooled width."""
    errors = []
    width = (text.get("hidden_size") or 0) + (text_2.get("hidden_size") or 0)
    if width != unet.get("cross_attention_dim"):
        errors.append(f"text: {folder}/text_encoder + text_encoder_2 are {width} wide together but the U-Net attends "
                      f"to cross_attention_dim {unet.get('cross_attention_dim')}: these are not parts of one model")
    proj, time_dim = unet.get("projection_class_embeddings_input_dim"), unet.get("addition_time_embed_dim")
    if unet.get("addition_embed_type") != "text_time" or proj is None or time_dim is None:
        errors.append(f"unet: {folder}/unet/config.json is not an SDXL U-Net (addition_embed_type text_time)")
    elif pooled_dim(proj, time_dim) != text_2.get("projection_dim"):
        errors.append(f"text: {folder}/text_encoder_2 projects to {text_2.get('projection_dim')} but the U-Net takes a "
                      f"pooled embedding of {pooled_dim(proj, time_dim)}")
    return errors
