"""Crop box, aspect handling and the per-sample original size / crop box of ``iter_samples``."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from ldm_train.data.preprocess import crop_box, preprocess, sample_rng
from ldm_train.data.shards import SkipReport, iter_samples, write_shards

RES = 16


def gradient(w: int, h: int) -> Image.Image:
    """Smooth, position-dependent colours: any crop offset or scale error shows in the pixels."""
    x = torch.linspace(0, 255, w).view(1, w).expand(h, w)
    y = torch.linspace(0, 255, h).view(h, 1).expand(h, w)
    rgb = torch.stack([x, y, (x + y) / 2], -1).round().to(torch.uint8)
    return Image.fromarray(rgb.numpy())


def test_center_box_is_the_shorter_side_square():
    assert crop_box((40, 20)) == (10, 0, 30, 20)
    assert crop_box((20, 41)) == (0, 10, 20, 30)
    assert crop_box((16, 16)) == (0, 0, 16, 16)


def test_random_box_is_seeded_by_seed_and_key_and_in_bounds():
    boxes = [crop_box((100, 30), "random", sample_rng(0, f"k{i}")) for i in range(50)]
    assert all(b[1] == 0 and b[3] == 30 and 0 <= b[0] <= 70 and b[2] - b[0] == 30 for b in boxes)
    assert len({b[0] for b in boxes}) > 20  # spread along the long side
    assert boxes == [crop_box((100, 30), "random", sample_rng(0, f"k{i}")) for i in range(50)]
    assert boxes != [crop_box((100, 30), "random", sample_rng(1, f"k{i}")) for i in range(50)]
    with pytest.raises(ValueError, match="crop must be one of"):
        crop_box((10, 10), "middle")


def test_box_resample_equals_resize_shorter_side_then_crop():
    """The documented aspect handling: same pixels (to resampling error) as resizing the shorter
    side to the resolution and cropping the centre."""
    img = gradient(64, 32)
    ours = preprocess(img, RES)
    resized = img.resize((32, RES), Image.Resampling.BICUBIC).crop((8, 0, 8 + RES, RES))
    ref = torch.tensor(list(resized.getdata()), dtype=torch.float32).view(RES, RES, 3).permute(2, 0, 1) / 127.5 - 1
    assert ours.shape == (3, RES, RES)
    assert (ours - ref).abs().max() < 0.05


def test_iter_samples_records_original_size_and_crop_box(tmp_path):
    images = [gradient(48, 24), gradient(20, 60), gradient(RES, RES)]
    write_shards([(f"k{i}", im, f"c{i}", {}) for i, im in enumerate(images)], tmp_path, "s", 10)
    got = list(iter_samples(str(tmp_path), RES, SkipReport()))
    assert [s["original_size"] for s in got] == [(48, 24), (20, 60), (RES, RES)]
    assert [s["crop_box"] for s in got] == [(12, 0, 36, 24), (0, 20, 20, 40), (0, 0, RES, RES)]
    for s, im in zip(got, images):
        assert torch.equal(s["image"], preprocess(im, RES, s["crop_box"]))


def test_random_crop_through_iter_samples_is_reproducible(tmp_path):
    images = [gradient(80, 20 + i) for i in range(8)]
    write_shards([(f"k{i}", im, f"c{i}", {}) for i, im in enumerate(images)], tmp_path, "s", 3)
    spec = str(tmp_path)
    first = list(iter_samples(spec, RES, SkipReport(), crop="random", seed=7))
    again = list(iter_samples(spec, RES, SkipReport(), crop="random", seed=7))
    other = list(iter_samples(spec, RES, SkipReport(), crop="random", seed=8))
    boxes = [s["crop_box"] for s in first]
    assert boxes == [s["crop_box"] for s in again] and boxes != [s["crop_box"] for s in other]
    assert len({b[0] for b in boxes}) > 1
    # the same sample read alone (another rank/worker order) gets the same crop
    alone = list(iter_samples(str(tmp_path / "s-000002.tar"), RES, SkipReport(), crop="random", seed=7))
    assert [s["crop_box"] for s in alone] == boxes[6:]
    for s, im in zip(first, images):
        left, top, right, bottom = s["crop_box"]
        assert right - left == bottom - top == im.size[1] and top == 0
        assert torch.equal(s["image"], preprocess(im, RES, s["crop_box"]))
