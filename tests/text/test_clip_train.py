"""``train-clip`` at micro size: the contrastive loss goes down, the folder reloads exactly, open_clip
itself loads it (same features), the text section and the metrics take it, and bad folders are named."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import synthetic_samples
from PIL import Image

from ldm_train.config import ClipConfig, TextConfig
from ldm_train.eval.metrics import MetricsUnavailable, load_clip
from ldm_train.text.clip_train import PREPROCESS_CFG, build_clip, preprocess_images, retrieval_top1, train_clip
from ldm_train.text.common import TextEncoderError
from ldm_train.text.encoder import prepare_text_encoder
from ldm_train.text.open_clip_folder import CONFIG_FILE, WEIGHTS_FILE, load_open_clip_folder, save_open_clip_folder

MICRO_CLIP = {"embed_dim": 32, "vision": {"image_size": 16, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
              "text": {"width": 32, "layers": 1, "heads": 2, "context_length": 16}}


class Log:
    def __init__(self):
        self.records = []

    def write(self, **record):
        self.records.append(record)


def pairs(n, seed, prefix):
    samples = synthetic_samples(n, size=32, seed=seed, prefix=prefix)
    images = torch.stack([torch.from_numpy(np.asarray(s[1])).permute(2, 0, 1) for s in samples])
    return images, [s[2] for s in samples]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    cfg = ClipConfig(**MICRO_CLIP, train={"steps": 40, "batch_size": 12, "lr": 3e-3, "warmup_steps": 4, "log_every": 4})
    out = tmp_path_factory.mktemp("clip") / "clip"
    log = Log()
    summary = train_clip(cfg, pairs(24, 1, "t"), pairs(8, 2, "v"), out, seed=0, log=log)
    return cfg, out, summary, log.records


def test_contrastive_loss_goes_down(trained):
    _, _, summary, records = trained
    losses = [r["loss"] for r in records]
    assert [r["step"] for r in records] == list(range(4, 41, 4)) and all(r["stage"] == "clip" for r in records)
    # InfoNCE of 12 pairs starts near log(12) = 2.48; memorising 24 captioned shapes gets far below
    assert summary["first_loss"] == pytest.approx(2.48, abs=0.4)
    assert sum(losses[-3:]) / 3 < 0.6 * summary["first_loss"]
    assert 1 <= summary["logit_scale"] <= 100  # the learned temperature, clamped as open_clip clamps it


def test_folder_reloads_exactly_and_open_clip_agrees(trained):
    import open_clip

    cfg, out, summary, _ = trained
    assert (out / CONFIG_FILE).is_file() and (out / WEIGHTS_FILE).is_file()
    model, preprocess, tokenizer = load_open_clip_folder(out)
    # open_clip's own reader of its folder layout, not ours
    peer, _, peer_preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    peer.eval()
    state, peer_state = model.state_dict(), peer.state_dict()
    assert set(state) == set(peer_state) and all(torch.equal(state[k], peer_state[k]) for k in state)
    images, captions = pairs(8, 2, "v")
    pixels = preprocess_images(images, preprocess)
    assert torch.equal(pixels, preprocess_images(images, peer_preprocess)) and pixels.shape[-1] == 16
    with torch.no_grad():
        assert torch.equal(model.encode_image(pixels), peer.encode_image(pixels))
        tokens = open_clip.get_tokenizer(f"local-dir:{out}")(captions)
        assert torch.equal(tokens, tokenizer(captions)) and tokens.shape[1] == 16
        assert torch.equal(model.encode_text(tokens), peer.encode_text(tokens))
    # the reloaded model gives the number the training reported, to the bit
    assert retrieval_top1(model, pixels, tokens) == summary["val_retrieval_top1"]


def test_same_seed_same_weights(trained, tmp_path):
    cfg, out, _, _ = trained
    train_clip(cfg, pairs(24, 1, "t"), pairs(8, 2, "v"), tmp_path / "again", seed=0, log=Log())
    assert (tmp_path / "again" / WEIGHTS_FILE).read_bytes() == (out / WEIGHTS_FILE).read_bytes()


def test_text_section_uses_the_folder_as_frozen_tower(trained, tmp_path):
    cfg, out, _, _ = trained
    encoder = prepare_text_encoder(TextConfig(pretrained=str(out)), tmp_path / "text")
    clip, _, tokenizer = load_open_clip_folder(out)
    assert all(torch.equal(v, clip.state_dict()[k]) for k, v in encoder.clip.state_dict().items())
    assert encoder.width == 32 and encoder.context_length == 16
    captions = ["red circle 3", "blue square 7"]
    tokens = tokenizer(captions)
    states = encoder(captions)
    # the per-token states the U-Net attends to are what CLIP pools (end-of-text token) and projects
    pooled = states[torch.arange(2), tokens.argmax(-1)] @ clip.text_projection
    with torch.no_grad():
        assert torch.allclose(pooled, clip.encode_text(tokens), atol=1e-5)


def test_metrics_take_the_folder(trained):
    _, out, _, _ = trained
    model, _, _ = load_clip("ViT-B-32", out)  # the folder's own architecture, not clip_model's
    assert model.visual.image_size == (16, 16)


def test_bad_folders_are_named(trained, tmp_path):
    _, out, _, _ = trained
    missing = tmp_path / "missing"
    missing.mkdir()
    with pytest.raises(TextEncoderError, match=str(missing / CONFIG_FILE)):
        load_open_clip_folder(missing)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / CONFIG_FILE).write_text((out / CONFIG_FILE).read_text())
    (broken / WEIGHTS_FILE).write_bytes((out / WEIGHTS_FILE).read_bytes()[:1000])  # truncated
    with pytest.raises(TextEncoderError, match=str(broken / WEIGHTS_FILE)):
        load_open_clip_folder(broken)
    with pytest.raises(TextEncoderError, match=str(broken / WEIGHTS_FILE)):
        prepare_text_encoder(TextConfig(pretrained=str(broken)), tmp_path / "text")
    with pytest.raises(MetricsUnavailable, match="eval.metrics.clip_weights.*" + str(broken / WEIGHTS_FILE)):
        load_clip("ViT-B-32", broken)
    (broken / CONFIG_FILE).write_text("{not json")
    with pytest.raises(TextEncoderError, match=str(broken / CONFIG_FILE)):
        load_open_clip_folder(broken)
    with pytest.raises(TextEncoderError, match="train-clip"):
        prepare_text_encoder(TextConfig(pretrained=str(tmp_path / "no_such_clip")), tmp_path / "text2")


def test_saved_preprocess_matches_training_preprocess(tmp_path):
    cfg = ClipConfig(**MICRO_CLIP)
    model, preprocess, _, model_cfg = build_clip(cfg, seed=3)
    save_open_clip_folder(model, model_cfg, {**PREPROCESS_CFG, "size": 16}, tmp_path)
    _, reloaded, _ = load_open_clip_folder(tmp_path)
    image = Image.new("RGB", (32, 32), (200, 30, 30))
    assert torch.allclose(preprocess(image), reloaded(image))
