"""Conditioning as Stable Diffusion computes it: our text towers against diffusers'
``StableDiffusionPipeline.encode_prompt`` (the peer), fp32, on tiny random pipelines saved in
diffusers' layout (SD 1.x: quick_gelu, padding with the end token; SD 2.x: gelu, padding with "!",
``text_encoder/`` already one layer short), and an open_clip tower shaped like ViT-H's with
``layer: penultimate`` against the SD 2-style CLIPTextModel made from the same weights."""
from __future__ import annotations

import diffusers
import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ldm_train.config import TextConfig
from ldm_train.export.sd_pipeline import clip_text_config, clip_text_state_dict
from ldm_train.text import load_text, prepare_text
from ldm_train.text.tokenizer import EOT, PAD, write_clip_tokenizer

CAPTIONS = ["", "a red circle", "A photo of an astronaut riding a horse, 4k!!", "a long caption " * 30]
WIDTH, LAYERS = 32, 3


def clip_text_model(hidden_act: str, seed: int = 0) -> CLIPTextModel:
    """SD's text_encoder/config.json keys (SD 1.5's legacy bos/eos/pad ids too), scaled down."""
    torch.manual_seed(seed)
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=WIDTH, intermediate_size=4 * WIDTH, num_hidden_layers=LAYERS,
        num_attention_heads=2, max_position_embeddings=77, hidden_act=hidden_act, layer_norm_eps=1e-5,
        bos_token_id=0, eos_token_id=2, pad_token_id=1,
    )).eval()


def sd_pipeline(text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer) -> diffusers.StableDiffusionPipeline:
    """Any tiny U-Net/VAE/scheduler around the text tower: encode_prompt uses only the tower."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(32, 32), layers_per_block=1, sample_size=8, cross_attention_dim=WIDTH,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    vae = diffusers.AutoencoderKL(block_out_channels=(32,), down_block_types=("DownEncoderBlock2D",),
                                  up_block_types=("UpDecoderBlock2D",), latent_channels=4)
    return diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=diffusers.DDIMScheduler(steps_offset=1, clip_sample=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def encode_prompt(pipe, captions, clip_skip=None) -> torch.Tensor:
    te = pipe.text_encoder
    if clip_skip is not None and not hasattr(te, "text_model"):
        # diffusers 0.42 reaches the final LayerNorm as text_encoder.text_model.final_layer_norm, a path
        # transformers 5 removed (CLIPTextModel holds it directly): alias it, outside the module tree
        object.__setattr__(te, "text_model", te)
    with torch.no_grad():
        return pipe.encode_prompt(captions, torch.device("cpu"), 1, do_classifier_free_guidance=False,
                                  clip_skip=clip_skip)[0]


def saved_pipeline(root, hidden_act: str, pad: str):
    tokenizer = write_clip_tokenizer(root / "tok", 77, pad=pad)
    pipe = sd_pipeline(clip_text_model(hidden_act), tokenizer)
    pipe.save_pretrained(root / "pipe")
    return root / "pipe", diffusers.StableDiffusionPipeline.from_pretrained(root / "pipe", local_files_only=True)


def hf_cfg(path, **kw) -> TextConfig:
    return TextConfig(encoder="transformers", transformers={"path": str(path)}, **kw)


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    return saved_pipeline(tmp_path_factory.mktemp("sd1"), "quick_gelu", EOT)


@pytest.fixture(scope="module")
def sd2(tmp_path_factory):
    return saved_pipeline(tmp_path_factory.mktemp("sd2"), "gelu", PAD)


def close(a, b):
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_sd1_equals_encode_prompt(sd1, tmp_path):
    path, pipe = sd1
    text = load_text(hf_cfg(path), tmp_path)
    assert text.context_length == 77 and text.width == WIDTH
    assert (text.tokenize(["a"])[0, 3:] == pipe.tokenizer.eos_token_id).all()  # SD 1.x pads with the end token
    ours = text(CAPTIONS)
    assert ours.dtype == torch.float32 and ours.shape == (len(CAPTIONS), 77, WIDTH)
    close(ours, encode_prompt(pipe, CAPTIONS))


@pytest.mark.parametrize("layer", [2, "penultimate"])
def test_sd1_clip_skip_equals_encode_prompt(sd1, tmp_path, layer):
    path, pipe = sd1
    text = load_text(hf_cfg(path, layer=layer), tmp_path)
    assert len(text.model.encoder.layers) == LAYERS - 1  # cut, not run and discarded
    close(text(CAPTIONS), encode_prompt(pipe, CAPTIONS, clip_skip=1))
    assert not torch.allclose(text(CAPTIONS), encode_prompt(pipe, CAPTIONS), atol=1e-3)


def test_sd1_text_encoder_folder_with_tokenizer_beside(sd1, tmp_path):
    path, pipe = sd1
    close(load_text(hf_cfg(path / "text_encoder"), tmp_path)(CAPTIONS), encode_prompt(pipe, CAPTIONS))


def test_sd2_layout_equals_encode_prompt(sd2, tmp_path):
    path, pipe = sd2
    text = prepare_text(hf_cfg(path), tmp_path / "unused")
    assert not (tmp_path / "unused").exists()  # nothing copied into the run
    assert (text.tokenize(["a"])[0, 3:] == 0).all()  # "!" is id 0, as open_clip pads
    close(text(CAPTIONS), encode_prompt(pipe, CAPTIONS))


def test_tokens_then_encode_tokens_equals_forward(sd2, tmp_path):
    text = load_text(hf_cfg(sd2[0]), tmp_path)
    tokens = text.tokenize(CAPTIONS).to(torch.int32)  # as a tokens-only latent cache stores them
    assert torch.equal(text.encode_tokens(tokens), text(CAPTIONS))


# ---- open_clip ViT-H-style tower, layer penultimate == diffusers' SD 2 text encoder ----

def open_clip_cfg(layer) -> TextConfig:
    # ViT-H-14's text tower scaled down: gelu, 77 positions, pad zeros (open_clip's tokenizer)
    return TextConfig(width=WIDTH, layers=LAYERS, heads=2, context_length=77, seed=7, layer=layer, pretrained=None)


def sd2_text_encoder(full, folder) -> CLIPTextModel:
    """What diffusers' SD 2 conversion makes of an open_clip tower: one layer fewer, plain output."""
    config = clip_text_config(full)
    config.num_hidden_layers -= 1
    drop = f"text_model.encoder.layers.{LAYERS - 1}."
    state = {k: v for k, v in clip_text_state_dict(full).items() if not k.startswith(drop)}
    config.save_pretrained(folder)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return CLIPTextModel.from_pretrained(folder, local_files_only=True).eval()


@pytest.fixture(scope="module")
def open_clip_towers(tmp_path_factory):
    root = tmp_path_factory.mktemp("oc")
    full = prepare_text(open_clip_cfg("last"), root / "full")
    cut = prepare_text(open_clip_cfg("penultimate"), root / "cut")
    return full, cut, sd2_text_encoder(full, root / "hf"), write_clip_tokenizer(root / "tok", 77)


def test_open_clip_penultimate_equals_sd2_text_encoder(open_clip_towers):
    full, cut, hf, tokenizer = open_clip_towers
    assert len(cut.clip.transformer.resblocks) == LAYERS - 1 and cut.source_layers == LAYERS
    ids = tokenizer(CAPTIONS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(cut.tokenize(CAPTIONS), ids)
    with torch.no_grad():
        close(cut(CAPTIONS), hf(ids).last_hidden_state)
        # and Stability's FrozenOpenCLIPEmbedder(layer="penultimate") on the uncut tower, by hand
        clip = full.clip
        x = clip.token_embedding(ids) + clip.positional_embedding
        for block in clip.transformer.resblocks[:-1]:
            x = block(x, attn_mask=clip.attn_mask)
        close(cut(CAPTIONS), clip.ln_final(x))


def test_open_clip_penultimate_equals_encode_prompt(open_clip_towers):
    _, cut, hf, tokenizer = open_clip_towers
    close(cut(CAPTIONS), encode_prompt(sd_pipeline(hf, tokenizer), CAPTIONS))
