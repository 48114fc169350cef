"""Aspect-ratio buckets: the data.buckets section, nearest-log-ratio assignment, cover-and-crop to
the bucket, and a shard folder of real photographs of mixed shapes read through iter_samples."""
from __future__ import annotations

from collections import Counter

import pytest
import torch
from PIL import Image

from ldm_train.config import BucketsConfig, ConfigError, load_config
from ldm_train.data.buckets import BucketError, assign, check_multiple, nearest
from ldm_train.data.preprocess import crop_box, preprocess
from ldm_train.data.shards import SkipReport, iter_samples, write_shards

from conftest import MICRO
from photos import GRID, PHOTOS, photo, photo_samples

TEST_BUCKETS = [(64, 128), (80, 112), (96, 96), (112, 80), (128, 64)]


def test_grid_from_area_step_and_max_ratio():
    assert BucketsConfig(area=9216, step=16).resolved() == TEST_BUCKETS
    sd = BucketsConfig(area=512 * 512).resolved()  # step 64, max_ratio 2
    assert sd == [(384, 640), (448, 576), (512, 512), (576, 448), (640, 384)]
    for w, h in BucketsConfig(area=1024 * 1024).resolved():
        assert w % 64 == h % 64 == 0 and w * h <= 1024 * 1024 and max(w, h) <= 2 * min(w, h)
        assert w * h > 0.8 * 1024 * 1024  # about the target area
    assert not BucketsConfig().enabled and BucketsConfig(area=4096).enabled


def test_config_keys_and_overrides():
    cfg = load_config(MICRO, GRID)
    assert cfg.data.read_options()["buckets"] == TEST_BUCKETS
    assert "buckets" not in cfg.data.read_options(buckets=False)
    assert "buckets" not in load_config(MICRO).data.read_options()  # off by default: squares
    explicit = load_config(MICRO, ["data.buckets.sizes=[[64, 32], [48, 48]]"])
    assert explicit.data.read_options()["buckets"] == [(64, 32), (48, 48)]


@pytest.mark.parametrize("overrides,words", [
    (["data.buckets.sizes=[[64, 32], [48, 48], [64, 32]]"], "data.buckets.sizes[2] = [64, 32] repeats data.buckets.sizes[0]"),
    (["data.buckets.sizes=[[64, 32], [128, 64]]"], "data.buckets.sizes[1] = [128, 64] has the aspect ratio of data.buckets.sizes[0]"),
    (["data.buckets.sizes=[[64, 32, 1]]"], "data.buckets.sizes[0] = [64, 32, 1]"),
    (["data.buckets.sizes=[[64, 32]]", "data.buckets.area=4096"], "not both"),
    (["data.buckets.sizes=[[64, 32]]", "data.buckets.step=16"], "data.buckets.step belongs to the grid"),
    (["data.buckets.area=4096", "data.buckets.step=128"], "no bucket of area <= 4096"),
    (["data.buckets.aera=4096"], "data.buckets.area"),  # unknown key: a suggestion
])
def test_bad_bucket_config_is_refused_naming_the_entry(overrides, words):
    with pytest.raises(ConfigError) as e:
        load_config(MICRO, overrides)
    assert words in str(e.value)


def test_sizes_must_be_multiples_of_the_autoencoder_factor():
    check_multiple([(64, 128), (128, 64)], 64, "8 x 8")
    with pytest.raises(BucketError, match=r"entry 1 = \[128, 72\]: its height 72 is not a multiple of 64"):
        check_multiple([(64, 128), (128, 72)], 64, "8 x the autoencoder's downsampling factor 8")


def test_nearest_log_aspect_ratio():
    buckets = [(64, 128), (96, 96), (128, 64)]
    assert nearest((1000, 1000), buckets) == 1
    assert nearest((300, 200), buckets) == 2  # log 1.5 is nearer log 2 than log 1
    assert nearest((200, 300), buckets) == 0  # the mirror image goes to the mirror bucket
    # in log space the midpoint of 1:1 and 2:1 is sqrt(2):1, not 1.5:1
    assert nearest((141, 100), buckets) == 1 and nearest((142, 100), buckets) == 2  # sqrt(2) = 1.414...
    assert nearest((100, 100), [(96, 96), (96, 96)]) == 0  # a tie: the earlier bucket
    assert assign((40, 30), TEST_BUCKETS) is None  # covers no bucket: too small
    assert assign((70, 70), TEST_BUCKETS) is None  # 70 < 80, 96, 112, 128: no bucket fits inside
    assert assign((100, 200), TEST_BUCKETS) == (64, 128)
    assert assign((130, 64), TEST_BUCKETS) == (128, 64)


def test_box_is_the_largest_of_the_bucket_ratio_and_pixels_match_cover_then_crop():
    image = photo("coffee")  # 600 x 400 into 112 x 80 (7:5)
    box = crop_box(image.size, target=(112, 80))
    assert box == (20, 0, 580, 400)  # 560 x 400 = 7:5, centred
    tall = crop_box((300, 400), target=(80, 112))
    assert tall == (7, 0, 293, 400) and (tall[2] - tall[0]) / 400 == pytest.approx(80 / 112, abs=2e-3)
    assert crop_box((40, 20)) == crop_box((40, 20), target=(16, 16)) == (10, 0, 30, 20)  # squares as before
    out = preprocess(image, (112, 80), box)
    assert out.shape == (3, 80, 112)
    # the reference: resize to cover (the height to 80), then crop the centre 112 columns
    scale = 80 / 400
    covered = image.resize((round(600 * scale), 80), Image.Resampling.BICUBIC)
    left = (covered.width - 112) // 2
    ref = torch.frombuffer(bytearray(covered.crop((left, 0, left + 112, 80)).tobytes()), dtype=torch.uint8)
    ref = ref.view(80, 112, 3).permute(2, 0, 1).float().div(127.5).sub(1)
    assert (out - ref).abs().mean() < 0.03  # resampling differences only


def test_random_crop_stays_inside_and_keeps_the_bucket_ratio():
    from ldm_train.data.preprocess import sample_rng

    boxes = {crop_box((600, 400), "random", sample_rng(0, f"k{i}"), (112, 80)) for i in range(30)}
    assert len(boxes) > 5
    assert all(b[1] == 0 and b[3] == 400 and b[2] - b[0] == 560 and 0 <= b[0] <= 40 for b in boxes)


def test_photographs_of_mixed_shapes_go_to_their_buckets(tmp_path):
    write_shards(photo_samples(), tmp_path / "shards", "train", 6)
    report = SkipReport()
    samples = list(iter_samples(str(tmp_path / "shards"), 64, report, buckets=TEST_BUCKETS))
    assert report.seen == len(PHOTOS) and dict(report.skipped) == {"too_small": 1}  # camera_tiny, 40 x 30
    assert report.kept == len(samples) == len(PHOTOS) - 1
    counts = Counter(tuple(s["bucket"]) for s in samples)
    assert counts == {(96, 96): 4, (112, 80): 4, (80, 112): 3, (128, 64): 3, (64, 128): 2}
    for s in samples:
        w, h = s["bucket"]
        assert s["image"].shape == (3, h, w) and s["image"].abs().max() <= 1
        left, top, right, bottom = s["crop_box"]
        ow, oh = s["original_size"]
        assert 0 <= left < right <= ow and 0 <= top < bottom <= oh
        assert (right - left) / (bottom - top) == pytest.approx(w / h, rel=0.01)
        assert min(ow - (right - left), oh - (bottom - top)) == 0  # the largest such box: one side whole
    by_key = {s["key"]: s for s in samples}
    assert by_key["p_astronaut_tall"]["original_size"] == (256, 512) and by_key["p_astronaut_tall"]["bucket"] == (64, 128)
    # without buckets the same shards give squares, as before
    squares = list(iter_samples(str(tmp_path / "shards"), 64, SkipReport()))
    assert len(squares) == len(PHOTOS) and all(s["image"].shape == (3, 64, 64) and "bucket" not in s for s in squares)
