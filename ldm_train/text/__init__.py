"""Text conditioning: a frozen open_clip text tower (same layer as the autoencoder)."""
from .encoder import TextEncoder, TextEncoderError, load_text_encoder, prepare_text_encoder

__all__ = ["TextEncoder", "TextEncoderError", "load_text_encoder", "prepare_text_encoder"]
