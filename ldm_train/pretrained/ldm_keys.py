"""Key tables between the original CompVis/Stability layout of a Stable Diffusion checkpoint and
the diffusers / transformers names, for each component (prefixes stripped):

- U-Net (``model.diffusion_model.*``): the LDM ``UNetModel`` numbers its blocks in one flat list
  (``input_blocks.N.M``: N counts resnets *and* downsamplers, M is resnet 0 / attention 1;
  ``output_blocks.N.M`` with an upsampler at M=1 or, after an attention, M=2). Which number is
  which diffusers module follows from the config, so :func:`unet_modules` derives the table from it.
  Inside a ``SpatialTransformer`` the names already are diffusers' (diffusers copied them).
- VAE (``first_stage_model.*``): ``encoder.down.N.block.M`` and friends; the decoder's ``up.N`` is
  numbered from the *lowest* resolution in diffusers (``up_blocks.0`` = LDM ``up.{L-1}``).
- OpenCLIP text tower (``cond_stage_model.model.*``, SD 2.x) <-> transformers ``CLIPTextModel``.

Everything here is pure string work; :mod:`ldm_train.pretrained.single_file` moves the tensors.
"""
from __future__ import annotations

import re

# ---------------------------------------------------------------------------------------- U-Net
RESNET = {  # LDM ResBlock -> diffusers ResnetBlock2D
    "in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut",
}
IDENTITY: dict[str, str] = {}  # SpatialTransformer == diffusers Transformer2DModel, name for name
UNET_TOP = {  # (LDM module, diffusers module, leaf renames)
    "time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
    "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out",
    "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2",  # SDXL's text_time
}


def unet_modules(levels: list[bool], layers_per_block: int) -> list[tuple[str, str, dict[str, str]]]:
    """(LDM module, diffusers module, leaf renames) for an SD U-Net whose level ``b`` attends when
    ``levels[b]``, with ``layers_per_block`` resnets per down level (one more per up level)."""
    modules = [(ldm, dif, {}) for ldm, dif in UNET_TOP.items()]
    n, last = layers_per_block, len(levels) - 1
    index = 1
    for b, attends in enumerate(levels):
        for j in range(n):
            modules.append((f"input_blocks.{index}.0", f"down_blocks.{b}.resnets.{j}", RESNET))
            if attends:
                modules.append((f"input_blocks.{index}.1", f"down_blocks.{b}.attentions.{j}", IDENTITY))
            index += 1
        if b < last:
            modules.append((f"input_blocks.{index}.0.op", f"down_blocks.{b}.downsamplers.0.conv", {}))
            index += 1
    modules += [("middle_block.0", "mid_block.resnets.0", RESNET),
                ("middle_block.1", "mid_block.attentions.0", IDENTITY),
                ("middle_block.2", "mid_block.resnets.1", RESNET)]
    index = 0
    for u, attends in enumerate(reversed(levels)):  # up block 0 is the deepest level
        for j in range(n + 1):
            modules.append((f"output_blocks.{index}.0", f"up_blocks.{u}.resnets.{j}", RESNET))
            if attends:
                modules.append((f"output_blocks.{index}.1", f"up_blocks.{u}.attentions.{j}", IDENTITY))
            if j == n and u < last:
                modules.append((f"output_blocks.{index}.{2 if attends else 1}.conv", f"up_blocks.{u}.upsamplers.0.conv", {}))
            index += 1
    return modules


def rename(key: str, modules: list[tuple[str, str, dict[str, str]]], reverse: bool = False) -> str | None:
    """``key`` under the other naming (LDM -> diffusers, or back with ``reverse``); None if no
    module of the table holds it. The longest matching module prefix wins."""
    best = None
    for ldm, dif, leaves in modules:
        src, dst = (dif, ldm) if reverse else (ldm, dif)
        if key.startswith(src + ".") and (best is None or len(src) > len(best[0])):
            best = (src, dst, {v: k for k, v in leaves.items()} if reverse else leaves)
    if best is None:
        return None
    src, dst, leaves = best
    rest = key[len(src) + 1 :]
    if "." not in rest:  # a parameter of the module itself (conv_in.weight)
        return f"{dst}.{rest}"
    leaf, param = rest.rsplit(".", 1)
    if leaves and leaf not in leaves:
        return None
    return f"{dst}.{leaves.get(leaf, leaf)}.{param}"


# ------------------------------------------------------------------------------------------ VAE
VAE_RESNET = {"nin_shortcut": "conv_shortcut"}  # norm1/conv1/norm2/conv2 keep their names
VAE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
VAE_TOP = {"norm_out": "conv_norm_out"}


def vae_key_to_diffusers(key: str, levels: int) -> str | None:
    """``encoder.down.1.block.0.nin_shortcut.weight`` -> ``encoder.down_blocks.1.resnets.0.conv_shortcut.weight``."""
    side, rest = key.split(".", 1) if "." in key else (key, "")
    if side in ("quant_conv", "post_quant_conv"):
        return key
    if side not in ("encoder", "decoder"):
        return None
    rules = (
        (r"(down|up)\.(\d+)\.block\.(\d+)\.(\w+)\.(\w+)", lambda m: (
            f"{_level(m[1], m[2], levels)}.resnets.{m[3]}.{VAE_RESNET.get(m[4], m[4])}.{m[5]}")),
        (r"(down|up)\.(\d+)\.(downsample|upsample)\.conv\.(\w+)", lambda m: (
            f"{_level(m[1], m[2], levels)}.{m[3]}rs.0.conv.{m[4]}")),
        (r"mid\.block_(\d)\.(\w+)\.(\w+)", lambda m: (
            f"mid_block.resnets.{int(m[1]) - 1}.{VAE_RESNET.get(m[2], m[2])}.{m[3]}")),
        (r"mid\.attn_1\.(\w+)\.(\w+)", lambda m: (
            f"mid_block.attentions.0.{VAE_ATTENTION[m[1]]}.{m[2]}" if m[1] in VAE_ATTENTION else None)),
        (r"(conv_in|conv_out|norm_out)\.(\w+)", lambda m: f"{VAE_TOP.get(m[1], m[1])}.{m[2]}"),
    )
    return _rewrite(side, rest, rules)


def _rewrite(side: str, rest: str, rules) -> str | None:
    """``side.<rule(rest)>`` for the first (pattern, build) rule matching ``rest``; None when none does."""
    for pattern, build in rules:
        match = re.fullmatch(pattern, rest)
        if match:
            new = build(match)
            return None if new is None else f"{side}.{new}"
    return None


def _level(kind: str, n: str, levels: int) -> str:
    return f"down_blocks.{n}" if kind == "down" else f"up_blocks.{levels - 1 - int(n)}"


def vae_key_to_ldm(key: str, levels: int) -> str | None:
    """The inverse of :func:`vae_key_to_diffusers`."""
    side, rest = key.split(".", 1) if "." in key else (key, "")
    if side in ("quant_conv", "post_quant_conv"):
        return key
    if side not in ("encoder", "decoder"):
        return None
    back_resnet = {v: k for k, v in VAE_RESNET.items()}
    back_attention = {v: k for k, v in VAE_ATTENTION.items()}
    back_top = {v: k for k, v in VAE_TOP.items()}
    rules = (
        (r"(down|up)_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(\w+)", lambda m: (
            f"{_ldm_level(m[1], m[2], levels)}.block.{m[3]}.{back_resnet.get(m[4], m[4])}.{m[5]}")),
        (r"(down|up)_blocks\.(\d+)\.(down|up)samplers\.0\.conv\.(\w+)", lambda m: (
            f"{_ldm_level(m[1], m[2], levels)}.{m[3]}sample.conv.{m[4]}")),
        (r"mid_block\.resnets\.(\d)\.(\w+)\.(\w+)", lambda m: (
            f"mid.block_{int(m[1]) + 1}.{back_resnet.get(m[2], m[2])}.{m[3]}")),
        (r"mid_block\.attentions\.0\.(\w+(?:\.0)?)\.(\w+)", lambda m: (
            f"mid.attn_1.{back_attention[m[1]]}.{m[2]}" if m[1] in back_attention else None)),
        (r"(conv_in|conv_out|conv_norm_out)\.(\w+)", lambda m: f"{back_top.get(m[1], m[1])}.{m[2]}"),
    )
    return _rewrite(side, rest, rules)


def _ldm_level(kind: str, n: str, levels: int) -> str:
    return f"down.{n}" if kind == "down" else f"up.{levels - 1 - int(n)}"


# ------------------------------------------------------------------------- OpenCLIP text tower
OPEN_CLIP_LAYER = {  # open_clip ResidualAttentionBlock -> transformers CLIPEncoderLayer
    "ln_1": "layer_norm1", "attn.out_proj": "self_attn.out_proj", "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
}
OPEN_CLIP_TOP = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}
