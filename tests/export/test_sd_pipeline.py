"""The export as a diffusers StableDiffusionPipeline folder: same token ids, same text states."""
from __future__ import annotations

import filecmp
import json
import shutil
from pathlib import Path

import diffusers
import open_clip
import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from conftest import MICRO
from ldm_train.cli import main
from ldm_train.config import TextConfig
from ldm_train.export.sd_pipeline import (
    SDPipelineError,
    check_clip_text,
    clip_text_config,
    write_clip_text_model,
    write_sd_pipeline,
)
from ldm_train.text import load_text_components, prepare_text, save_text_components
from ldm_train.text.encoder import TextEncoder, load_text_encoder, save_text_encoder, tiny_clip_config
from ldm_train.text.tokenizer import EOT, write_clip_tokenizer
from ldm_train.utils.runs import OutputExistsError

CAPTIONS = [
    "",
    "red circle 0",
    "A Red CIRCLE!!",
    "hello, world... it's OK?? (yes) -- no; [x] {y} #1 @me $5 100% a+b=c",
    "Café naïve résumé Ærøskøbing straße İstanbul",
    "日本語のテキスト",
    "🐶 dog 🎉 party 👍🏽",
    "a very long caption that goes on " * 10,  # truncated: the last id stays the end token
    "   lots   of\twhitespace\n here  ",
    "don't WON'T I'M we'll they've",
    "!!! <|endoftext|> 3.14",
]


@pytest.fixture(scope="module")
def sd_dir(micro_run, tmp_path_factory):
    return write_sd_pipeline(micro_run.export, tmp_path_factory.mktemp("sd") / "pipe")


@pytest.fixture(scope="module")
def text(micro_run):
    return load_text_encoder(micro_run.export / "text_encoder")


@pytest.fixture(scope="module")
def pipe(sd_dir):
    return diffusers.StableDiffusionPipeline.from_pretrained(sd_dir)


def tiny_tower(tmp_path, name: str, **text_cfg) -> TextEncoder:
    """An in-memory open_clip CLIP with the micro text tower, varied by ``text_cfg``."""
    cfg = tiny_clip_config(TextConfig(width=32, layers=2, heads=2, context_length=16, pretrained=None))
    quick = text_cfg.pop("quick_gelu", False)
    cfg["text_cfg"].update(text_cfg)
    (tmp_path / f"{name}.json").write_text(json.dumps({**cfg, "quick_gelu": quick}))
    open_clip.add_model_config(tmp_path / f"{name}.json")
    torch.manual_seed(0)
    return TextEncoder(open_clip.create_model(name), open_clip.get_tokenizer(name), name)


def test_layout(sd_dir, micro_run):
    index = json.loads((sd_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["tokenizer"] == ["transformers", "CLIPTokenizer"]
    assert index["safety_checker"] == [None, None] and index["feature_extractor"] == [None, None]
    assert index["requires_safety_checker"] is False
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        assert (sd_dir / "tokenizer" / name).is_file(), name
    assert (sd_dir / "text_encoder" / "model.safetensors").is_file()
    for rel in ("unet/diffusion_pytorch_model.safetensors", "vae/config.json", "scheduler/scheduler_config.json"):
        assert filecmp.cmp(sd_dir / rel, micro_run.export / rel, shallow=False), rel
    assert not sd_dir.with_name(sd_dir.name + ".partial").exists()


def test_tokenizer_ids_equal_open_clip(sd_dir, text):
    tok = CLIPTokenizer.from_pretrained(sd_dir / "tokenizer")
    assert tok.model_max_length == text.context_length and tok.pad_token_id == 0
    ids = tok(CAPTIONS, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
    ours = text.tokenize(CAPTIONS)
    assert torch.equal(ids.input_ids, ours)
    assert ours[7, -1] == 49407 and ours[0, :3].tolist() == [49406, 49407, 0]


def test_known_tokenizer_differences(sd_dir, text):
    """open_clip runs ftfy + html.unescape before BPE; a CLIPTokenizer cannot (see module docstring)."""
    tok = CLIPTokenizer.from_pretrained(sd_dir / "tokenizer")
    for caption in ["&amp;", "“quoted”", "ﬁne", "ΟΔΟΣ"]:
        ids = tok([caption], padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids
        assert ids != text.tokenize([caption]).tolist(), caption


def test_text_encoder_hidden_states_equal_ours(sd_dir, text):
    model, info = CLIPTextModel.from_pretrained(sd_dir / "text_encoder", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ids = text.tokenize(CAPTIONS)
    with torch.no_grad():
        theirs = model.eval()(ids).last_hidden_state
    torch.testing.assert_close(theirs, text.encode_tokens(ids), rtol=0, atol=1e-5)


def test_pipeline_loads_and_generates(pipe, micro_run):
    size = pipe.unet.config.sample_size * 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    assert size == micro_run.cfg.data.resolution
    out = pipe(
        ["red circle 0", "blue square 2"], num_inference_steps=2, guidance_scale=3.0, height=size, width=size,
        generator=torch.Generator().manual_seed(0), output_type="pt",
    )
    assert out.images.shape == (2, 3, size, size)
    assert torch.isfinite(out.images).all() and out.images.min() >= 0 and out.images.max() <= 1


def test_pipeline_prompt_embeddings_equal_ours(pipe, text):
    prompts = ["red circle 0", "A Red CIRCLE!! with a much longer caption than the context"]
    cond, uncond = pipe.encode_prompt(prompts, torch.device("cpu"), 1, True)
    torch.testing.assert_close(cond, text(prompts), rtol=0, atol=1e-5)
    torch.testing.assert_close(uncond, text(["", ""]), rtol=0, atol=1e-5)


def test_refuses_existing_output_without_overwrite(micro_run, tmp_path):
    out = tmp_path / "pipe"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="overwrite"):
        write_sd_pipeline(micro_run.export, out)
    assert (out / "keep.txt").read_text() == "mine"
    write_sd_pipeline(micro_run.export, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model_index.json").is_file()


def test_quick_gelu_tower_converts_exactly(tmp_path):
    text = tiny_tower(tmp_path, "sdp-quick", quick_gelu=True)
    assert clip_text_config(text).hidden_act == "quick_gelu"
    write_clip_text_model(text, tmp_path / "te")
    model = CLIPTextModel.from_pretrained(tmp_path / "te").eval()
    ids = text.tokenize(CAPTIONS)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).last_hidden_state, text.encode_tokens(ids), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "variant, reason",
    [
        ({"no_causal_mask": True}, "not causal"),
        ({"ls_init_value": 0.1}, "layer scale"),
        ({"qk_norm": True}, "CustomResidualAttentionBlock"),
        ({"vocab_size": 1000}, "vocabulary"),
    ],
)
def test_refuses_towers_that_are_not_plain_clip(tmp_path, variant, reason):
    text = tiny_tower(tmp_path, f"sdp-{'-'.join(variant)}", **variant)
    with pytest.raises(SDPipelineError, match=reason):
        check_clip_text(text)


def test_refuses_foreign_tokenizer(text):
    other = TextEncoder(text.clip, lambda captions: torch.zeros(len(captions), 16, dtype=torch.long), text.name)
    with pytest.raises(SDPipelineError, match="tokenizer"):
        check_clip_text(other)


def test_refusal_writes_nothing(micro_run, tmp_path):
    export = tmp_path / "export"
    shutil.copytree(micro_run.export, export)
    shutil.rmtree(export / "text_encoder")
    bidir = tiny_tower(tmp_path, "sdp-bidir", no_causal_mask=True)
    save_text_encoder(bidir, export / "text_encoder", open_clip.get_model_config("sdp-bidir"))
    with pytest.raises(SDPipelineError, match="causal"):
        write_sd_pipeline(export, tmp_path / "pipe")
    assert not (tmp_path / "pipe").exists() and not (tmp_path / "pipe.partial").exists()


def test_cli_export_with_diffusers_pipeline(micro_run, tmp_path, capsys):
    exp, sd = tmp_path / "exp", tmp_path / "sd"
    argv = ["export", "--config", str(MICRO), f"run.dir={micro_run.run}", "distributed.cpu=true",
            "--out", str(exp), "--diffusers-pipeline", str(sd)]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["export"] == str(exp) and summary["diffusers_pipeline"] == str(sd)
    assert json.loads((sd / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    shutil.rmtree(exp)  # a fresh export, but the pipeline folder is taken
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert str(sd) in err and "--overwrite" in err and "Traceback" not in err
    assert main([*argv, "--overwrite"]) == 0


# ---- text.layer: a cut tower converts at its cut depth; a transformers tower is copied ----

def _export_with_text(micro_run, tmp_path, save) -> Path:
    export = tmp_path / "export"
    shutil.copytree(micro_run.export, export)
    shutil.rmtree(export / "text_encoder")
    save(export)
    return export


def test_penultimate_tower_converts_at_cut_depth(micro_run, tmp_path):
    """SD 2.x's layout: the CLIPTextModel has one layer fewer and diffusers' plain encode_prompt
    gives our penultimate-layer states."""
    t = micro_run.cfg.text
    cfg = TextConfig(width=t.width, heads=t.heads, context_length=t.context_length, layers=3, layer="penultimate",
                     pretrained=None)
    text = prepare_text(cfg, tmp_path / "text")
    assert clip_text_config(text).num_hidden_layers == 2
    export = _export_with_text(micro_run, tmp_path, lambda root: save_text_components(text, root))
    sd = write_sd_pipeline(export, tmp_path / "pipe")
    assert json.loads((sd / "text_encoder" / "config.json").read_text())["num_hidden_layers"] == 2
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(sd)
    cond = pipe.encode_prompt(CAPTIONS, torch.device("cpu"), 1, False)[0]
    torch.testing.assert_close(cond, text(CAPTIONS), rtol=0, atol=1e-6)


def test_transformers_tower_is_copied(micro_run, tmp_path):
    t = micro_run.cfg.text
    torch.manual_seed(0)
    model = CLIPTextModel(CLIPTextConfig(hidden_size=t.width, intermediate_size=4 * t.width, num_hidden_layers=2,
                                         num_attention_heads=t.heads, max_position_embeddings=77, hidden_act="quick_gelu"))
    model.save_pretrained(tmp_path / "src" / "text_encoder")
    write_clip_tokenizer(tmp_path / "src" / "tokenizer", 77, pad=EOT)
    text = load_text_components(tmp_path / "src")
    export = _export_with_text(micro_run, tmp_path, lambda root: save_text_components(text, root))
    sd = write_sd_pipeline(export, tmp_path / "pipe")
    again = load_text_components(sd)
    assert again.kind == "transformers"
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(sd)
    cond = pipe.encode_prompt(CAPTIONS, torch.device("cpu"), 1, False)[0]
    torch.testing.assert_close(cond, text(CAPTIONS), rtol=0, atol=1e-6)
