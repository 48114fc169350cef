"""Round trip and robustness of the shard reader/writer on small synthetic data."""
from __future__ import annotations

import io
import os
import random
import tarfile
import threading
from pathlib import Path

import pytest
import torch
from PIL import Image

from ldm_train.data.shards import (
    DataError,
    SkipReport,
    expand_shards,
    iter_samples,
    load_images,
    preprocess,
    write_shards,
)

RES = 16


def make_samples(n: int, size: int = RES, seed: int = 0) -> list:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        pixels = bytes(rng.randrange(256) for _ in range(size * size * 3))
        image = Image.frombytes("RGB", (size, size), pixels)
        out.append((f"{i:06d}", image, f"caption number {i} ✓", {"index": i}))
    return out


def add_member(path: Path, name: str, data: bytes) -> None:
    """Append a raw member to an existing (uncompressed) tar."""
    with tarfile.open(path, "a") as tf:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))


def test_round_trip_exact(tmp_path):
    samples = make_samples(7)
    paths = write_shards(samples, tmp_path, "train", shard_size=3)
    assert [p.name for p in paths] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert not list(tmp_path.glob("*.tmp"))
    report = SkipReport()
    got = list(iter_samples(str(tmp_path), RES, report))
    assert [s["key"] for s in got] == [s[0] for s in samples]
    assert [s["caption"] for s in got] == [s[2] for s in samples]
    assert [s["meta"] for s in got] == [s[3] for s in samples]
    assert got[4]["shard"] == str(paths[1])
    for s, (_, image, _, _) in zip(got, samples):
        assert s["image"].shape == (3, RES, RES) and s["image"].dtype == torch.float32
        assert torch.equal(s["image"], preprocess(image, RES))
    assert (report.seen, report.kept, dict(report.skipped)) == (7, 7, {})
    assert report.summary() == "kept 7 of 7"


def test_load_images_uint8_exact_and_limit(tmp_path):
    samples = make_samples(5)
    write_shards(samples, tmp_path, "x", shard_size=10)
    images, captions, keys = load_images(str(tmp_path), RES, SkipReport())
    assert images.shape == (5, 3, RES, RES) and images.dtype == torch.uint8
    expected = torch.frombuffer(bytearray(samples[2][1].tobytes()), dtype=torch.uint8)
    assert torch.equal(images[2], expected.view(RES, RES, 3).permute(2, 0, 1))
    assert keys == [s[0] for s in samples] and captions[0] == samples[0][2]
    images, _, keys = load_images(str(tmp_path), RES, SkipReport(), limit=2)
    assert images.shape[0] == 2 and keys == ["000000", "000001"]


def test_corrupt_image_and_bad_caption_counted(tmp_path, caplog):
    (path,) = write_shards(make_samples(4), tmp_path, "s", shard_size=10)
    add_member(path, "bad001.png", b"this is not a png")
    add_member(path, "bad001.txt", b"fine caption")
    add_member(path, "bad002.png", _png_bytes())
    add_member(path, "bad002.txt", b"\xff\xfe not utf-8 \xc3")
    add_member(path, "bad003.txt", b"caption without image")
    add_member(path, "bad004.png", _png_bytes())
    report = SkipReport()
    got = list(iter_samples(str(path), RES, report))
    assert [s["key"] for s in got] == ["000000", "000001", "000002", "000003"]
    assert dict(report.skipped) == {
        "corrupt_image": 1,
        "bad_caption_utf8": 1,
        "missing_image": 1,
        "missing_caption": 1,
    }
    assert report.seen == 8 and report.kept == 4
    assert report.summary() == (
        "kept 4 of 8 (skipped: bad_caption_utf8=1, corrupt_image=1, missing_caption=1, missing_image=1)"
    )
    assert "bad001" in caplog.text and str(path) in caplog.text


def _png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (RES, RES), (10, 20, 30)).save(buf, format="PNG")
    return buf.getvalue()


def test_truncated_png_is_corrupt_image(tmp_path):
    (path,) = write_shards(make_samples(2), tmp_path, "s", shard_size=10)
    add_member(path, "cut.png", _png_bytes()[:40])
    add_member(path, "cut.txt", b"half an image")
    report = SkipReport()
    assert len(list(iter_samples(str(path), RES, report))) == 2
    assert dict(report.skipped) == {"corrupt_image": 1}


@pytest.mark.parametrize("where", ["mid_data", "header_boundary"])
def test_truncated_tar_keeps_earlier_samples(tmp_path, where):
    (path,) = write_shards(make_samples(6), tmp_path, "s", shard_size=10)
    with tarfile.open(path) as tf:
        members = tf.getmembers()
    cut_member = members[10]  # 3 members per sample: this is sample 3's second member
    cut = cut_member.offset_data + 5 if where == "mid_data" else cut_member.offset
    path.write_bytes(path.read_bytes()[:cut])
    report = SkipReport()
    got = list(iter_samples(str(path), RES, report))
    assert [s["key"] for s in got] == ["000000", "000001", "000002"]
    assert dict(report.skipped) == {"unreadable_tar_member": 1}
    assert report.kept + sum(report.skipped.values()) == report.seen


def test_garbage_shard_counted_then_other_shards_read(tmp_path):
    write_shards(make_samples(2), tmp_path, "a", shard_size=10)
    (tmp_path / "b-000000.tar").write_bytes(b"<html>not a tar</html>" * 40)
    report = SkipReport()
    assert len(list(iter_samples(str(tmp_path), RES, report))) == 2
    assert dict(report.skipped) == {"unreadable_shard": 1}


def test_missing_shard_names_path(tmp_path):
    missing = tmp_path / "nope" / "000.tar"
    with pytest.raises(DataError, match=str(missing)):
        expand_shards(str(missing))
    write_shards(make_samples(1), tmp_path, "d", shard_size=1)
    with pytest.raises(DataError, match="d-000001.tar"):
        expand_shards(str(tmp_path / "d-{000000..000001}.tar"))


def test_empty_dataset_errors(tmp_path):
    with pytest.raises(DataError, match="no \\*.tar shards"):
        expand_shards(str(tmp_path))
    empty = tmp_path / "empty.tar"
    tarfile.open(empty, "w").close()
    with pytest.raises(DataError, match="no usable samples.*kept 0 of 0"):
        list(iter_samples(str(empty), RES, SkipReport()))
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    tarfile.open(only_bad / "b-000000.tar", "w").close()
    add_member(only_bad / "b-000000.tar", "zzz.txt", b"orphan caption")
    with pytest.raises(DataError, match="missing_image=1"):
        load_images(str(only_bad), RES, SkipReport())


def test_expand_brace_glob_folder_pipe(tmp_path):
    paths = write_shards(make_samples(5), tmp_path, "t", shard_size=2)
    names = [str(p) for p in paths]
    assert expand_shards(str(tmp_path / "t-{000000..000002}.tar")) == names
    assert expand_shards(str(tmp_path)) == names
    assert expand_shards(str(tmp_path / "t-*.tar")) == names
    assert expand_shards(names[1]) == [names[1]]
    assert expand_shards("pipe:cat /nowhere/x.tar") == ["pipe:cat /nowhere/x.tar"]
    assert expand_shards("pipe:cat d/{0..1}.tar") == ["pipe:cat d/0.tar", "pipe:cat d/1.tar"]


def test_pipe_url_is_read(tmp_path):
    (path,) = write_shards(make_samples(3), tmp_path, "p", shard_size=10)
    got = list(iter_samples(f"pipe:cat {path}", RES, SkipReport()))
    assert [s["key"] for s in got] == ["000000", "000001", "000002"]
    assert got[0]["shard"] == f"pipe:cat {path}"


def test_named_pipe_is_a_local_shard(tmp_path):
    """A FIFO that another process streams a tar into reads like the file itself."""
    (path,) = write_shards(make_samples(3), tmp_path / "src", "p", shard_size=10)
    fifo = tmp_path / "p.tar"
    os.mkfifo(fifo)
    # a daemon: if the reader never opens the FIFO, the writer's open() blocks forever and must not
    # keep the test process alive; the join has a ceiling and says what it saw
    feeder = threading.Thread(target=lambda: fifo.write_bytes(path.read_bytes()), daemon=True)
    feeder.start()
    got = list(iter_samples(str(fifo), RES, SkipReport()))
    feeder.join(timeout=120)
    assert not feeder.is_alive(), f"the feeder is still writing {fifo} 120 s after the reader finished"
    assert [s["key"] for s in got] == ["000000", "000001", "000002"]
    assert expand_shards(str(tmp_path / "*.tar")) == [str(fifo)]


def test_failed_pipe_is_data_error_but_early_stop_is_not(tmp_path):
    with pytest.raises(DataError, match="cat /nonexistent/x.tar"):
        list(iter_samples("pipe:cat /nonexistent/x.tar 2>/dev/null", RES, SkipReport()))
    (path,) = write_shards(make_samples(40, size=32), tmp_path, "p", shard_size=100)
    assert path.stat().st_size > 200_000  # more than a pipe buffer: cat is cut off
    images, _, _ = load_images(f"pipe:cat {path}", RES, SkipReport(), limit=1)
    assert images.shape[0] == 1


@pytest.mark.parametrize("key", ["a/b", "../x", "a.b", "", "sp ace", "nl\n"])
def test_unsafe_key_refused(tmp_path, key):
    sample = make_samples(1)[0]
    with pytest.raises(ValueError, match="unsafe sample key"):
        write_shards([(key, *sample[1:])], tmp_path, "u", shard_size=1)
    assert not list(tmp_path.glob("*.tar*"))


def test_duplicate_key_refused_and_no_partial_shard(tmp_path):
    s = make_samples(1)[0]
    with pytest.raises(ValueError, match="duplicate"):
        write_shards([s, s], tmp_path, "u", shard_size=10)
    assert not list(tmp_path.glob("*.tar*"))


def test_write_jpeg_and_min_size(tmp_path):
    write_shards(make_samples(3, size=8), tmp_path, "j", shard_size=10, image_format="jpg")
    assert "000000.jpg" in tarfile.open(tmp_path / "j-000000.tar").getnames()
    report = SkipReport()
    with pytest.raises(DataError, match="too_small=3"):
        list(iter_samples(str(tmp_path), RES, report, min_size=9))


def test_preprocess_aspect_and_alpha():
    wide = Image.new("RGB", (40, 20), (255, 0, 0))
    wide.paste((0, 0, 255), (0, 0, 6, 20))  # blue strip on the far left is cropped away
    out = preprocess(wide, RES)
    assert out.shape == (3, RES, RES) and out.dtype == torch.float32
    assert torch.allclose(out[0], torch.ones(RES, RES), atol=0.02)
    assert torch.allclose(out[2], -torch.ones(RES, RES), atol=0.02)
    assert preprocess(Image.new("RGB", (9, 33)), RES).shape == (3, RES, RES)
    clear = Image.new("RGBA", (RES, RES), (0, 0, 0, 0))
    assert torch.equal(preprocess(clear, RES), torch.ones(3, RES, RES))
    black = Image.new("RGBA", (RES, RES), (0, 0, 0, 255))
    assert torch.equal(preprocess(black, RES), -torch.ones(3, RES, RES))
    assert preprocess(Image.new("L", (RES, RES), 255), RES).min() == 1.0
