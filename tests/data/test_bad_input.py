"""Bad input when reading image shards (issue 5): each case is skipped with a counted reason, never
a crash or a silent drop; a shard that fails is named and the others are read; hostile member
names never become paths outside an output folder."""
from __future__ import annotations

import io
import re
import tarfile
from pathlib import Path

import pytest
from conftest import synthetic_samples
from PIL import Image

from ldm_train.data.shards import (
    FailedShardsError,
    SkipReport,
    check_failed_shards,
    iter_samples,
    write_shards,
)

RES = 16


def add_member(path: Path, name: str, data: bytes) -> None:
    with tarfile.open(path, "a") as tf:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))


def png(size=(RES, RES)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


def good_shard(folder: Path, prefix: str = "a", n: int = 3) -> Path:
    (path,) = write_shards(synthetic_samples(n, size=RES, prefix=prefix), folder, prefix, shard_size=100)
    return path


def read(spec: str, **kw) -> tuple[list[dict], SkipReport]:
    report = SkipReport()
    return list(iter_samples(spec, RES, report, **kw)), report


def test_zero_byte_shard_is_named_and_the_rest_is_read(tmp_path):
    good = good_shard(tmp_path)
    empty = tmp_path / "b-000000.tar"
    empty.write_bytes(b"")
    got, report = read(str(tmp_path))
    assert [s["key"] for s in got] == ["a00000", "a00001", "a00002"]
    assert (report.seen, report.kept, dict(report.skipped)) == (4, 3, {"unreadable_shard": 1})
    assert report.failed_shards == [str(empty)] and str(good) not in report.shard_errors
    assert report.as_dict()["failed_shards"] == [str(empty)]
    assert "1 failed shard(s): " + str(empty) in report.summary()


def test_failed_pipe_commands_are_named_and_the_good_one_is_read(tmp_path):
    good = good_shard(tmp_path)
    spec = f"pipe:{{false,cat {good},cat /nonexistent/x.tar 2>/dev/null}}"
    got, report = read(spec)
    assert len(got) == 3 and all(s["shard"] == f"pipe:cat {good}" for s in got)
    assert report.failed_shards == ["pipe:false", "pipe:cat /nonexistent/x.tar 2>/dev/null"]
    assert dict(report.skipped) == {"unreadable_shard": 2}
    assert report.kept + sum(report.skipped.values()) == report.seen == 5


def test_truncated_tar_is_a_failed_shard_but_keeps_earlier_samples(tmp_path):
    path = good_shard(tmp_path, n=6)
    with tarfile.open(path) as tf:
        cut = tf.getmembers()[10].offset_data + 5  # inside sample 3's second member
    path.write_bytes(path.read_bytes()[:cut])
    other = good_shard(tmp_path, prefix="z", n=2)
    got, report = read(str(tmp_path))
    assert [s["key"] for s in got] == ["a00000", "a00001", "a00002", "z00000", "z00001"]
    assert dict(report.skipped) == {"unreadable_tar_member": 1}
    assert report.failed_shards == [str(path)] and str(other) not in report.failed_shards


def test_corrupt_image_missing_caption_too_small_are_counted_not_failed(tmp_path):
    path = good_shard(tmp_path, n=3)  # 16 px images
    add_member(path, "corrupt.png", b"\x89PNG\r\n\x1a\n but then garbage")
    add_member(path, "corrupt.txt", b"a caption")
    add_member(path, "nocap.png", png())
    add_member(path, "big.png", png((40, 24)))
    add_member(path, "big.txt", b"large enough")
    got, report = read(str(path), min_size=20)
    assert [s["key"] for s in got] == ["big"]
    assert dict(report.skipped) == {"too_small": 3, "corrupt_image": 1, "missing_caption": 1}
    assert (report.seen, report.kept, report.failed_shards) == (6, 1, [])
    assert got[0]["original_size"] == (40, 24) and got[0]["crop_box"] == (8, 0, 32, 24)


def test_only_failed_shards_is_a_data_error_unless_allow_empty(tmp_path):
    (tmp_path / "x.tar").write_bytes(b"")
    with pytest.raises(Exception, match=r"no usable samples .*x\.tar"):
        read(str(tmp_path / "x.tar"))
    got, report = read(str(tmp_path / "x.tar"), allow_empty=True)
    assert got == [] and report.failed_shards == [str(tmp_path / "x.tar")]


def test_check_failed_shards_raises_naming_them_unless_tolerated():
    check_failed_shards([], False, "encode")
    check_failed_shards(["a.tar"], True, "encode")
    names = [f"s{i}.tar" for i in range(7)]
    with pytest.raises(FailedShardsError) as info:
        check_failed_shards(names, False, "train-vae")
    msg = str(info.value)
    assert msg.startswith("train-vae: 7 input(s) could not be read: s0.tar, s1.tar")
    assert "and 2 more" in msg and "data.tolerate_failed_shards=true" in msg and "\n" not in msg


HOSTILE = ["../../evil", "/abs/olute", "a/b/../../c", "dir/ok", "./plain", "sp ace\nnl"]


def test_hostile_member_names_become_safe_distinct_keys(tmp_path):
    shard = tmp_path / "in" / "hostile.tar"
    shard.parent.mkdir()
    tarfile.open(shard, "w").close()
    for i, name in enumerate(HOSTILE):
        add_member(shard, f"{name}.png", png())
        add_member(shard, f"{name}.txt", f"caption {i}".encode())
    got, report = read(str(shard))
    keys = [s["key"] for s in got]
    assert report.kept == len(HOSTILE) and len(set(keys)) == len(HOSTILE)
    assert all(re.fullmatch(r"[A-Za-z0-9_-]+", k) for k in keys), keys
    assert keys[HOSTILE.index("./plain")] == "plain"  # tar's ./ prefix is not part of the key
    assert keys[0].startswith("evil-") and [s["caption"] for s in got] == [f"caption {i}" for i in range(6)]

    out = tmp_path / "out"
    write_shards([(s["key"], Image.new("RGB", (4, 4)), s["caption"], {}) for s in got], out, "o", 100)
    with tarfile.open(out / "o-000000.tar") as tf:
        names = tf.getnames()
        tf.extractall(out / "extracted", filter="data")  # raises on any path outside
    assert all("/" not in n and ".." not in n for n in names)
    assert sorted(p.name for p in (out / "extracted").iterdir()) == sorted(f"{k}.{e}" for k in keys for e in ("json", "png", "txt"))
    assert not (tmp_path.parent / "evil.png").exists() and not Path("/abs/olute.png").exists()


def test_train_vae_stops_on_failed_shards_before_training_unless_tolerated(tmp_path):
    from conftest import micro_config

    from ldm_train import stages

    cfg = micro_config(tmp_path / "run", "autoencoder.train.steps=1")
    train = cfg.path(cfg.data.train_shards)
    write_shards(synthetic_samples(4, size=RES), train, "train", 10)
    write_shards(synthetic_samples(2, size=RES, prefix="v"), cfg.path(cfg.data.val_shards), "val", 10)
    (train / "train-000001.tar").write_bytes(b"")
    with pytest.raises(FailedShardsError, match=r"train-vae: 1 input\(s\) could not be read: .*train-000001.tar"):
        stages.train_vae_stage(cfg, False)
    assert not (cfg.path(cfg.autoencoder.path) / "config.json").exists()
    tolerant = micro_config(tmp_path / "run", "autoencoder.train.steps=1", "data.tolerate_failed_shards=true")
    assert stages.train_vae_stage(tolerant, True)["steps"] == 1
    assert (cfg.path(cfg.autoencoder.path) / "config.json").is_file()
