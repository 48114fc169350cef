"""The loader every stage calls (``ldm_train.text.towers``): both kinds, ``text.layer`` recorded
or refused, exports saved and reloaded exactly, and every bad path refused in one line, offline."""
from __future__ import annotations

import json
import shutil
import socket

import pytest
import torch

from ldm_train.config import TextConfig
from ldm_train.text import TextEncoderError, load_text, load_text_components, prepare_text, save_text_components
from ldm_train.text.encoder import CONFIG_FILE
from ldm_train.text.tokenizer import EOT, write_clip_tokenizer
from ldm_train.utils.hashing import tensor_hash

from test_sd_layouts import CAPTIONS, clip_text_model, hf_cfg

OPEN_CLIP = dict(width=32, layers=3, heads=2, context_length=16, seed=3, pretrained=None)  # the random tower


@pytest.fixture(scope="module")
def sd1_dir(tmp_path_factory):
    """A diffusers-layout folder with only the parts a text tower needs."""
    root = tmp_path_factory.mktemp("sd1")
    clip_text_model("quick_gelu").save_pretrained(root / "text_encoder")
    write_clip_tokenizer(root / "tokenizer", 77, pad=EOT)
    return root


def state(module) -> dict:
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_same(a, b):
    sa, sb = state(a.weights_module), state(b.weights_module)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert torch.equal(a.tokenize(CAPTIONS), b.tokenize(CAPTIONS))
    assert torch.equal(a(CAPTIONS), b(CAPTIONS))


@pytest.mark.parametrize("layer", ["last", 2])
def test_transformers_components_roundtrip_exact(sd1_dir, tmp_path, layer):
    text = load_text(hf_cfg(sd1_dir, layer=layer), tmp_path)
    save_text_components(text, tmp_path / "export")
    assert (tmp_path / "export" / "text_encoder" / "config.json").is_file()
    assert (tmp_path / "export" / "tokenizer" / "vocab.json").is_file()
    config = json.loads((tmp_path / "export" / "text_encoder" / "config.json").read_text())
    assert config["num_hidden_layers"] == (3 if layer == "last" else 2)  # the cut is what is saved
    again = load_text_components(tmp_path / "export")
    assert again.kind == "transformers" and again.layer == "last"
    assert_same(text, again)


def test_open_clip_components_roundtrip_exact(tmp_path):
    text = prepare_text(TextConfig(**OPEN_CLIP, layer="penultimate"), tmp_path / "text")
    save_text_components(text, tmp_path / "export")
    again = load_text_components(tmp_path / "export")
    assert again.kind == "open_clip" and again.layer == "penultimate" and again.source_layers == 3
    assert len(again.clip.transformer.resblocks) == 2
    assert_same(text, again)


def test_open_clip_folder_records_layer_and_stages_reload_it(tmp_path):
    cfg = TextConfig(**OPEN_CLIP, layer=2)
    text = prepare_text(cfg, tmp_path / "text")
    meta = json.loads((tmp_path / "text" / CONFIG_FILE).read_text())
    assert meta["layer"] == 2 and meta["source_layers"] == 3 and meta["model_cfg"]["text_cfg"]["layers"] == 2
    assert_same(text, load_text(cfg, tmp_path / "text"))
    assert_same(text, load_text(TextConfig(**OPEN_CLIP, layer="penultimate"), tmp_path / "text"))  # the same layer
    assert_same(text, prepare_text(cfg, tmp_path / "text"))
    full = prepare_text(TextConfig(**OPEN_CLIP), tmp_path / "full")
    assert tensor_hash(full.weights_module) != tensor_hash(text.weights_module)
    assert not torch.allclose(full(CAPTIONS), text(CAPTIONS), atol=1e-3)


def test_open_clip_changed_layer_refused(tmp_path):
    prepare_text(TextConfig(**OPEN_CLIP), tmp_path / "text")
    with pytest.raises(TextEncoderError, match=r"text.layer is 'penultimate' but .* saved with layer 'last'"):
        load_text(TextConfig(**OPEN_CLIP, layer="penultimate"), tmp_path / "text")


def test_weights_module_hash_is_the_old_clip_hash(tmp_path):
    text = prepare_text(TextConfig(**OPEN_CLIP), tmp_path / "text")
    assert text.weights_module is text.clip  # existing latent caches keep their fingerprint


@pytest.mark.parametrize("kind", ["open_clip", "transformers"])
def test_layer_deeper_than_tower_refused(sd1_dir, tmp_path, kind):
    cfg = TextConfig(**OPEN_CLIP, layer=4) if kind == "open_clip" else hf_cfg(sd1_dir, layer=4)
    with pytest.raises(TextEncoderError, match=r"^text.layer: 4 \(clip skip 4\) is deeper than the text tower, which has 3 layers"):
        prepare_text(cfg, tmp_path / "text")
    assert not (tmp_path / "text").exists()


def test_missing_folder_refused(tmp_path):
    with pytest.raises(TextEncoderError, match=rf"text.transformers.path: {tmp_path / 'nope'} holds neither config.json"):
        load_text(hf_cfg(tmp_path / "nope"), tmp_path)


def test_unset_path_refused(tmp_path):
    with pytest.raises(TextEncoderError, match="text.transformers.path is not set"):
        load_text(TextConfig(encoder="transformers"), tmp_path)


def test_missing_tokenizer_refused(sd1_dir, tmp_path):
    clip_text_model("quick_gelu").save_pretrained(tmp_path / "pipe" / "text_encoder")
    with pytest.raises(TextEncoderError, match=r"no tokenizer for .*text_encoder .*set text.transformers.tokenizer"):
        load_text(hf_cfg(tmp_path / "pipe"), tmp_path)
    cfg = TextConfig(encoder="transformers", transformers={"path": str(tmp_path / "pipe"), "tokenizer": str(tmp_path / "t")})
    with pytest.raises(TextEncoderError, match=rf"text.transformers.tokenizer: {tmp_path / 't'} is not a folder"):
        load_text(cfg, tmp_path)
    cfg.transformers.tokenizer = str(sd1_dir / "tokenizer")  # named explicitly: found
    assert load_text(cfg, tmp_path).context_length == 77


def test_broken_folders_refused_in_one_line(sd1_dir, tmp_path):
    (tmp_path / "bad" / "text_encoder").mkdir(parents=True)
    (tmp_path / "bad" / "text_encoder" / "config.json").write_text("{not json")
    (tmp_path / "bad" / "tokenizer").mkdir()
    with pytest.raises(TextEncoderError, match="cannot read .*config.json") as e:
        load_text(hf_cfg(tmp_path / "bad"), tmp_path)
    assert "\n" not in str(e.value)
    with pytest.raises(TextEncoderError, match="cannot load a CLIPTokenizer"):
        load_text(TextConfig(encoder="transformers", transformers={
            "path": str(sd1_dir), "tokenizer": str(tmp_path / "bad" / "tokenizer")}), tmp_path)


def test_hub_id_refused_without_network(tmp_path, monkeypatch):
    def no_network(*a, **k):
        raise AssertionError("tried the network")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TextEncoderError, match=r"'openai/clip-vit-large-patch14' is not a local folder; as a Hugging Face Hub id.*huggingface-cli download"):
        load_text(hf_cfg("openai/clip-vit-large-patch14"), tmp_path)


def test_components_folder_without_tower_refused(tmp_path):
    with pytest.raises(TextEncoderError, match="holds neither open_clip_config.json"):
        load_text_components(tmp_path)
    clip_text_model("gelu").save_pretrained(tmp_path / "text_encoder")
    with pytest.raises(TextEncoderError, match="no tokenizer/ folder"):
        load_text_components(tmp_path)


def test_saved_tokenizer_has_slow_tokenizer_files(sd1_dir, tmp_path):
    """vocab.json/merges.txt as written from open_clip's BPE: transformers 4's CLIPTokenizer reads them."""
    text = load_text(hf_cfg(sd1_dir), tmp_path)
    save_text_components(text, tmp_path / "export")
    for name in ("vocab.json", "merges.txt"):
        saved = (tmp_path / "export" / "tokenizer" / name).read_text(encoding="utf-8")
        given = (sd1_dir / "tokenizer" / name).read_text(encoding="utf-8")
        assert (json.loads(saved) == json.loads(given)) if name.endswith("json") else saved == given, name


def test_fp16_checkpoint_runs_in_fp32(sd1_dir, tmp_path):
    """SD checkpoints are often saved in fp16; the tower runs in fp32 as encode_prompt's reference does."""
    clip_text_model("quick_gelu").half().save_pretrained(tmp_path / "text_encoder")
    shutil.copytree(sd1_dir / "tokenizer", tmp_path / "tokenizer")
    text = load_text(hf_cfg(tmp_path), tmp_path)
    assert all(p.dtype == torch.float32 for p in text.parameters())
    assert text(CAPTIONS).dtype == torch.float32
