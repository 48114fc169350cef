"""The built-in emoji dataset: rendering, captions, determinism, shards and report."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from ldm_train.config import EmojiDataConfig
from ldm_train.data.emoji import build_emoji_shards, caption_for, emoji_key, render_emoji, split
from ldm_train.data.shards import DataError, SkipReport, iter_samples

FONT = EmojiDataConfig().font
needs_font = pytest.mark.skipif(
    not Path(FONT).is_file(), reason=f"{FONT} absent: apt-get install fonts-noto-color-emoji (CI installs it)"
)


def test_caption_and_key_helpers():
    assert caption_for(":grinning_face_with_big_eyes:") == "grinning face with big eyes"
    assert caption_for(":Japanese_“here”_button:") == "japanese “here” button"
    assert emoji_key("😀") == "emoji_1f600"
    assert emoji_key("❤️") == "emoji_2764-fe0f"


def test_split_is_stable_and_never_empties_val():
    samples = [(f"k{i}", None, "", {}) for i in range(200)]
    train, val = split(samples, 0.25)
    assert len(train) + len(val) == 200 and 25 < len(val) < 75
    assert split(samples, 0.25) == (train, val)
    train, val = split(samples[:3], 0.01)
    assert len(val) == 1 and len(train) == 2
    assert split(samples[:3], 0.0) == (samples[:3], [])


@needs_font
def test_render_emoji_images_and_captions():
    samples, report = render_emoji(FONT, 32, limit=40)
    assert report["rendered"] == len(samples) == 40
    assert report["total"] == 40 + sum(report["skipped_by_reason"].values())
    for key, image, caption, meta in samples:
        assert image.mode == "RGB" and image.size == (32, 32)
        assert re.fullmatch(r"[^\s:_A-Z]+( [^\s:_A-Z]+)*", caption), caption
        assert "." not in key and meta["name"] == caption and meta["width"] == 32
        assert emoji_key(meta["emoji"]) == key
    assert image.getpixel((0, 0)) == (255, 255, 255)  # white background
    assert len({s[0] for s in samples}) == 40


@needs_font
def test_render_emoji_deterministic():
    a, _ = render_emoji(FONT, 24, limit=40)
    b, _ = render_emoji(FONT, 24, limit=40)
    assert [s[0] for s in a] == [s[0] for s in b]
    assert all(x[1].tobytes() == y[1].tobytes() for x, y in zip(a, b))


@needs_font
def test_build_emoji_shards(tmp_path):
    cfg = EmojiDataConfig(resolution=16, val_fraction=0.25, shard_size=10, limit=40)
    train_dir, val_dir = tmp_path / "data" / "train", tmp_path / "data" / "val"
    report = build_emoji_shards(cfg, train_dir, val_dir)
    assert report["train"] + report["val"] == report["rendered"] == 40
    assert report["val"] > 0
    assert json.loads((tmp_path / "data" / "report.json").read_text(encoding="utf-8")) == report
    assert report["train_shards"] == [str(p) for p in sorted(train_dir.glob("*.tar"))]
    assert len(report["train_shards"]) == -(-report["train"] // 10)
    train = list(iter_samples(str(train_dir), 16, SkipReport()))
    val = list(iter_samples(str(val_dir), 16, SkipReport()))
    assert (len(train), len(val)) == (report["train"], report["val"])
    assert not {s["key"] for s in train} & {s["key"] for s in val}
    assert train[0]["meta"]["emoji"] and train[0]["caption"] == train[0]["meta"]["name"]

    with pytest.raises(DataError, match=f"{re.escape(str(train_dir))}.*--overwrite"):
        build_emoji_shards(cfg, train_dir, val_dir)
    (train_dir / "train-000009.tar").write_bytes(b"stale")
    again = build_emoji_shards(cfg, train_dir, val_dir, overwrite=True)
    assert again == report and not (train_dir / "train-000009.tar").exists()


def test_missing_font(tmp_path):
    cfg = EmojiDataConfig(font=str(tmp_path / "NoFont.ttf"), limit=4)
    with pytest.raises(DataError, match="fonts-noto-color-emoji.*data.emoji.font"):
        build_emoji_shards(cfg, tmp_path / "train", tmp_path / "val")
    assert not (tmp_path / "train").exists()
