"""The built-in dataset: every Noto Color Emoji glyph on white, captioned with its English name.

Small, free, offline and varied enough to show text conditioning working ("red heart" vs
"fire"), which is why the demo trains on it. Output is ordinary img2dataset-layout shards, so the
rest of the pipeline cannot tell it from downloaded data.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import emoji as emoji_lib
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from ldm_train.config import EmojiDataConfig
from ldm_train.data.holdout import route
from ldm_train.data.shards import DataError, write_shards

log = logging.getLogger(__name__)

# CBDT bitmap fonts like Noto Color Emoji only open at their strike size; Pillow accepts 109.
FONT_SIZE = 109
# A sequence the font has no ligature for renders as several glyphs side by side: much wider
# than tall. Single glyphs are ~136x128; 1.5 separates them cleanly from 2+ glyphs.
MAX_ASPECT = 1.5


def caption_for(name: str) -> str:
    """``:grinning_face_with_big_eyes:`` -> ``grinning face with big eyes`` (lowercased, so the
    small text encoder never sees two spellings of one word)."""
    return " ".join(name.strip(":").replace("_", " ").split()).lower()


def emoji_key(char: str) -> str:
    """``emoji_1f600``; code points joined by ``-``: unique, and safe as a WebDataset key."""
    return "emoji_" + "-".join(f"{ord(c):x}" for c in char)


def _candidates() -> list[str]:
    """Fully-qualified emoji only (unqualified variants duplicate names), sorted for determinism."""
    fq = emoji_lib.STATUS["fully_qualified"]
    return sorted(e for e, d in emoji_lib.EMOJI_DATA.items() if d.get("status") == fq)


def load_font(font_path: str) -> ImageFont.FreeTypeFont:
    if not Path(font_path).is_file():
        raise DataError(
            f"Noto Color Emoji font not found at {font_path}: install the Debian package "
            "fonts-noto-color-emoji (apt-get install fonts-noto-color-emoji) or set data.emoji.font"
        )
    try:
        return ImageFont.truetype(font_path, FONT_SIZE)
    except OSError as e:
        raise DataError(f"cannot load font {font_path} at size {FONT_SIZE} (need a color emoji font): {e}") from None


def render_one(font: ImageFont.FreeTypeFont, char: str, resolution: int) -> tuple[Image.Image | None, str]:
    """Return ``(RGB image, "")`` or ``(None, skip_reason)``.

    The glyph is cropped to its ink, padded to a square (keeps proportions), composited on white
    and then resized, so every emoji fills the frame the same way whatever its bearings."""
    left, top, right, bottom = font.getbbox(char, mode="RGBA")
    width, height = right - left, bottom - top
    if width <= 0 or height <= 0:
        return None, "empty_glyph"
    if width > MAX_ASPECT * height:
        return None, "multi_glyph"
    canvas = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((-left, -top), char, font=font, embedded_color=True)
    ink = canvas.getchannel("A").getbbox()
    if ink is None:
        return None, "empty_glyph"
    glyph = canvas.crop(ink)
    side = max(glyph.size)
    square = Image.new("RGBA", (side, side), (255, 255, 255, 255))
    square.alpha_composite(glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2))
    return square.convert("RGB").resize((resolution, resolution), Image.Resampling.LANCZOS), ""


def render_emoji(
    font_path: str, resolution: int, limit: int | None = None, *, progress: bool = False
) -> tuple[list[tuple[str, Image.Image, str, dict]], dict]:
    """Render emoji in sorted order; ``limit`` caps the number *rendered* (so a demo asking for
    64 gets 64). Returns ``[(key, image, caption, meta)]`` and ``{total, rendered,
    skipped_by_reason}`` where ``total`` counts the emoji tried."""
    font = load_font(font_path)
    chars = _candidates()
    samples, skipped, total = [], Counter(), 0
    bar = tqdm(chars, desc="render emoji", unit="glyph", disable=not progress)
    for char in bar:
        if limit is not None and len(samples) >= limit:
            break
        total += 1
        image, reason = render_one(font, char, resolution)
        if image is None:
            skipped[reason] += 1
            continue
        caption = caption_for(emoji_lib.EMOJI_DATA[char]["en"])
        meta = {
            "emoji": char,
            "name": caption,
            "codepoints": [f"{ord(c):x}" for c in char],
            "width": resolution,
            "height": resolution,
        }
        samples.append((emoji_key(char), image, caption, meta))
    bar.close()
    report = {"total": total, "rendered": len(samples), "skipped_by_reason": dict(sorted(skipped.items()))}
    return samples, report


def split(samples: list, val_fraction: float) -> tuple[list, list]:
    """Hash split (:func:`~ldm_train.data.holdout.route`, as the converters), each side in input
    order; stable, and independent of which other emoji exist, so adding emoji to the font never
    moves old ones between splits. Small demos (``limit``) never end with an empty val folder."""
    keyed = [(s[0], i) for i, s in enumerate(samples)]
    to_val = {i for val, (_, i) in route(keyed, val_fraction) if val}
    return [s for i, s in enumerate(samples) if i not in to_val], [s for i, s in enumerate(samples) if i in to_val]


def _clear_or_refuse(folder: Path, overwrite: bool) -> None:
    old = sorted(folder.glob("*.tar")) if folder.is_dir() else []
    if old and not overwrite:
        raise DataError(f"{folder} already holds {len(old)} shard(s); pass --overwrite to replace them")
    for path in old + (sorted(folder.glob("*.tar.tmp")) if folder.is_dir() else []):
        path.unlink()


def build_emoji_shards(cfg: EmojiDataConfig, train_dir: Path, val_dir: Path, overwrite: bool = False) -> dict:
    """Render, split, write ``train-*.tar`` / ``val-*.tar`` and ``report.json`` next to them."""
    train_dir, val_dir = Path(train_dir), Path(val_dir)
    load_font(cfg.font)  # fail on a missing font before touching any folder
    for folder in (train_dir, val_dir):
        _clear_or_refuse(folder, overwrite)
    samples, report = render_emoji(cfg.font, cfg.resolution, cfg.limit, progress=True)
    if not samples:
        raise DataError(f"no emoji could be rendered with {cfg.font}: {report}")
    train, val = split(samples, cfg.val_fraction)
    train_paths = write_shards(train, train_dir, "train", cfg.shard_size)
    val_paths = write_shards(val, val_dir, "val", cfg.shard_size)
    report.update(
        train=len(train),
        val=len(val),
        resolution=cfg.resolution,
        font=cfg.font,
        train_shards=[str(p) for p in train_paths],
        val_shards=[str(p) for p in val_paths],
    )
    out = train_dir.parent / "report.json"
    out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    log.info("emoji dataset: %d rendered, %d train, %d val -> %s", report["rendered"], len(train), len(val), out)
    return report
