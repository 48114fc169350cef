"""The frozen open_clip text tower: built once from a tiny config, saved, and reloaded exactly."""
from __future__ import annotations

import json

import pytest
import torch

from ldm_train.config import TextConfig
from ldm_train.text.encoder import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    TextEncoderError,
    load_text_encoder,
    prepare_text_encoder,
)

CAPTIONS = ["red heart", "grinning face with big eyes", "fire"]


def tiny(**kw) -> TextConfig:
    return TextConfig(**{"width": 32, "layers": 1, "heads": 2, "context_length": 16, "seed": 1234, "pretrained": None, **kw})


def weights(encoder) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in encoder.clip.state_dict().items()}


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def tower(tmp_path_factory):
    folder = tmp_path_factory.mktemp("text") / "text"
    return folder, prepare_text_encoder(tiny(), folder)


def test_prepare_creates_folder(tower):
    folder, encoder = tower
    assert (folder / CONFIG_FILE).is_file() and (folder / WEIGHTS_FILE).is_file()
    meta = json.loads((folder / CONFIG_FILE).read_text())
    assert meta["name"] == encoder.name
    assert meta["model_cfg"]["text_cfg"]["width"] == 32
    assert meta["model_cfg"]["text_cfg"]["context_length"] == 16


def test_output_shape_and_frozen(tower):
    _, encoder = tower
    out = encoder(CAPTIONS)
    assert out.shape == (3, 16, 32)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert encoder.width == 32 and encoder.context_length == 16
    assert not out.requires_grad
    assert not any(p.requires_grad for p in encoder.parameters())
    assert not encoder.clip.training


def test_tokens_are_truncated_to_context_length(tower):
    _, encoder = tower
    long = " ".join(["word"] * 100)
    assert encoder.tokenize([long]).shape == (1, 16)
    assert encoder([long]).shape == (1, 16, 32)


def test_same_seed_same_weights_different_seed_different(tmp_path, tower):
    _, encoder = tower
    again = prepare_text_encoder(tiny(), tmp_path / "a")
    other = prepare_text_encoder(tiny(seed=99), tmp_path / "b")
    assert same_weights(weights(encoder), weights(again))
    assert not same_weights(weights(encoder), weights(other))
    assert torch.equal(encoder(CAPTIONS), again(CAPTIONS))
    assert not torch.allclose(encoder(CAPTIONS), other(CAPTIONS))


def test_load_reloads_bitwise(tower):
    folder, encoder = tower
    loaded = load_text_encoder(folder)
    assert loaded.name == encoder.name
    assert same_weights(weights(encoder), weights(loaded))
    assert torch.equal(encoder(CAPTIONS), loaded(CAPTIONS))
    assert not any(p.requires_grad for p in loaded.parameters())


def test_prepare_reuses_existing_folder(tower):
    """A second prepare (e.g. encode re-run with another seed in the config) keeps the saved tower."""
    folder, encoder = tower
    reused = prepare_text_encoder(tiny(seed=7), folder)
    assert same_weights(weights(encoder), weights(reused))


def test_different_captions_different_embeddings(tower):
    _, encoder = tower
    out = encoder(["red heart", "fire", "red heart"])
    assert not torch.allclose(out[0], out[1])
    assert torch.equal(out[0], out[2])
    # a caption's embedding does not depend on the rest of the batch, up to fp32 summation order
    # (CPU attention kernels split their sums by shape: ~2e-6 on some CPUs, 0 on others)
    torch.testing.assert_close(encoder(["red heart"])[0], out[0], rtol=1e-5, atol=1e-5)


def test_prepare_leaves_caller_rng_untouched(tmp_path):
    torch.manual_seed(42)
    state = torch.get_rng_state()
    expected = torch.rand(5)
    torch.set_rng_state(state)
    prepare_text_encoder(tiny(seed=3), tmp_path / "t")
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(torch.rand(5), expected)


def test_missing_pretrained_names_the_key(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(TextEncoderError) as info:
        prepare_text_encoder(tiny(pretrained=str(missing)), tmp_path / "t")
    msg = str(info.value)
    assert "text.pretrained" in msg and str(missing) in msg
    assert not (tmp_path / "t" / CONFIG_FILE).exists()


def test_unknown_model_name_names_the_key(tmp_path):
    with pytest.raises(TextEncoderError, match="text.model_name"):
        prepare_text_encoder(tiny(model_name="no-such-arch-xyz"), tmp_path / "t")


def test_load_from_empty_folder(tmp_path):
    with pytest.raises(TextEncoderError) as info:
        load_text_encoder(tmp_path)
    assert CONFIG_FILE in str(info.value) and WEIGHTS_FILE in str(info.value)
