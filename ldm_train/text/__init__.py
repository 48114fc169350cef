"""Text conditioning: a frozen CLIP text tower, open_clip's or transformers' (same layer as the
autoencoder). Stages use :mod:`ldm_train.text.towers`; ``text.layer`` is in :mod:`.common`."""
from .common import TextEncoderError, clip_skip, kept_layers
from .encoder import TextEncoder, load_text_encoder, prepare_text_encoder
from .hf import HFTextEncoder
from .sdxl import SDXLTextEncoder
from .towers import AnyTextEncoder, load_text, load_text_components, prepare_text, save_text_components

__all__ = [
    "AnyTextEncoder", "HFTextEncoder", "SDXLTextEncoder", "TextEncoder", "TextEncoderError", "clip_skip", "kept_layers",
    "load_text", "load_text_components", "load_text_encoder", "prepare_text", "prepare_text_encoder",
    "save_text_components",
]
