"""SDXL's two text towers against diffusers' ``StableDiffusionXLPipeline.encode_prompt`` on a tiny
random SDXL pipeline folder (fp32): the concatenated penultimate states and the pooled output."""
from __future__ import annotations

import pytest
import torch

from ldm_train.config import TextConfig
from ldm_train.text import SDXLTextEncoder, TextEncoderError, load_text, load_text_components, save_text_components
from pretrained.tiny_sd import BIGG_WIDTH, POOLED_WIDTH, TEXT_WIDTH, make_tiny_sd

diffusers = pytest.importorskip("diffusers")
CAPTIONS = ["a photograph of an astronaut riding a horse", "", "two cats! " * 30]  # empty and truncated too


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
    return make_tiny_sd(tmp_path_factory.mktemp("sdxl") / "pipe", "sdxl")


def _ours(folder, layer="penultimate") -> SDXLTextEncoder:
    return load_text(TextConfig(encoder="sdxl", layer=layer, sdxl={"path": str(folder)}), folder / "unused")


def _diffusers(folder, captions, clip_skip=None):
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)
    embeds, _, pooled, _ = pipe.encode_prompt(captions, device="cpu", num_images_per_prompt=1,
                                              do_classifier_free_guidance=False, clip_skip=clip_skip)
    return embeds, pooled


def _report(name, got, expected) -> float:
    err = (got - expected).abs().max().item()
    print(f"{name}: max abs {err:.2e}, max rel {err / expected.abs().max().item():.2e}")
    return err


def test_conditioning_equals_encode_prompt(sdxl_folder):
    text = _ours(sdxl_folder)
    context, pooled = text.encode_with_pooled(CAPTIONS)
    embeds, their_pooled = _diffusers(sdxl_folder, CAPTIONS)
    assert context.shape == (3, 77, (TEXT_WIDTH + BIGG_WIDTH)) and text.width == (TEXT_WIDTH + BIGG_WIDTH)
    assert pooled.shape == (3, POOLED_WIDTH) and text.pooled_width == POOLED_WIDTH
    assert _report("context", context, embeds) <= 1e-6
    assert _report("pooled", pooled, their_pooled) <= 1e-6
    assert torch.equal(text(CAPTIONS), context)


def test_clip_skip_counts_like_diffusers(sdxl_folder):
    context, _ = _ours(sdxl_folder, layer=3).encode_with_pooled(CAPTIONS[:1])
    embeds, _ = _diffusers(sdxl_folder, CAPTIONS[:1], clip_skip=1)  # diffusers: hidden_states[-(1 + 2)]
    assert _report("clip skip 3", context, embeds) <= 1e-6


def test_saved_towers_reload_and_diffusers_reads_them(sdxl_folder, tmp_path):
    text = _ours(sdxl_folder)
    save_text_components(text, tmp_path / "export")
    again = load_text_components(tmp_path / "export")
    assert isinstance(again, SDXLTextEncoder)
    for (a, b) in zip(again.encode_with_pooled(CAPTIONS), text.encode_with_pooled(CAPTIONS)):
        assert torch.equal(a, b)
    from transformers import CLIPTextModelWithProjection
    model = CLIPTextModelWithProjection.from_pretrained(tmp_path / "export" / "text_encoder_2", local_files_only=True)
    assert torch.equal(model.text_projection.weight, text.model_2.text_projection.weight)


def test_missing_second_tower_is_named(sdxl_folder, tmp_path):
    import shutil
    shutil.copytree(sdxl_folder, tmp_path / "pipe")
    shutil.rmtree(tmp_path / "pipe" / "tokenizer_2")
    with pytest.raises(TextEncoderError, match="tokenizer_2"):
        _ours(tmp_path / "pipe")
