"""The SD U-Net family as diffusers' ``UNet2DConditionModel`` configs describe it: which config
keys :mod:`ldm_train.model.convert` translates (with diffusers' defaults, since old configs omit
keys) and which must keep a fixed value. Data only."""
from __future__ import annotations

CROSS_DOWN, PLAIN_DOWN = "CrossAttnDownBlock2D", "DownBlock2D"
CROSS_UP, PLAIN_UP = "CrossAttnUpBlock2D", "UpBlock2D"
MID = "UNetMidBlock2DCrossAttn"

# Translated keys -> diffusers' UNet2DConditionModel default.
FAMILY_DEFAULTS = {
    "in_channels": 4, "out_channels": 4, "flip_sin_to_cos": True, "freq_shift": 0,
    "down_block_types": [CROSS_DOWN, CROSS_DOWN, CROSS_DOWN, PLAIN_DOWN],
    "up_block_types": [PLAIN_UP, CROSS_UP, CROSS_UP, CROSS_UP],
    "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "dropout": 0.0,
    "norm_num_groups": 32, "norm_eps": 1e-5, "cross_attention_dim": 1280, "transformer_layers_per_block": 1,
    "attention_head_dim": 8, "use_linear_projection": False, "num_class_embeds": None, "upcast_attention": False,
    # SDXL (addition_embed_type "text_time"): pooled text + size/crop ids added to the time embedding
    "addition_embed_type": None, "addition_time_embed_dim": None, "projection_class_embeddings_input_dim": None,
}
ADDITION_TYPES = (None, "text_time")

# Keys outside the family -> the values we accept (diffusers' default, or an equivalent).
MUST_BE = {
    "mid_block_type": (MID,),
    "act_fn": ("silu",),
    "time_embedding_type": ("positional",),
    "num_attention_heads": (None,),  # diffusers refuses it too; attention_head_dim is the count
    "center_input_sample": (False,),
    "only_cross_attention": (False,),
    "mid_block_only_cross_attention": (None, False),
    "downsample_padding": (1,),
    "mid_block_scale_factor": (1,),
    "dual_cross_attention": (False,),
    "class_embed_type": (None,),
    "addition_embed_type_num_heads": (64,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1,),
    "time_embedding_dim": (None,),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "attention_type": ("default",),
    "class_embeddings_concat": (False,),
    "cross_attention_norm": (None,),
    "reverse_transformer_layers_per_block": (None,),
}

IGNORED = {"sample_size"}  # not architecture; "_class_name", "_diffusers_version", ... too


def same_value(a, b) -> bool:
    """``==`` that keeps bools apart from ints (``True`` is not a padding of 1)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return a == b
