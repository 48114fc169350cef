"""``ldm-train data folder``: a folder of images with caption sidecars -> img2dataset shards."""
from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from pathlib import Path

import pytest
from conftest import MICRO, synthetic_samples
from PIL import Image

from ldm_train.cli import main
from ldm_train.config import ConvertDataConfig
from ldm_train.data.convert import convert_folder
from ldm_train.data.shards import DataError, FailedShardsError, SkipReport, iter_samples

FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}


def make_folder(src: Path) -> dict[str, tuple[str, str]]:
    """12 good images in nested folders (png/jpg/webp, some with a .json sidecar) plus one of each
    bad case; returns {relative path: (caption, format)} of the good ones."""
    good = {}
    for i, (key, image, caption, _) in enumerate(synthetic_samples(12, size=24, seed=3)):
        ext = list(FORMATS)[i % 3]
        rel = f"{'sub/deeper/' if i % 4 == 0 else 'sub/' if i % 4 == 1 else ''}{key}.{ext}"
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        image.save(src / rel, format=FORMATS[ext])
        (src / rel).with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
        if i % 5 == 0:
            (src / rel).with_suffix(".json").write_text(json.dumps({"license": "cc0", "i": i}))
        good[rel] = (caption, ext)
    Image.new("RGB", (20, 20)).save(src / "nocaption.png")
    (src / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (src / "corrupt.txt").write_text("a caption")
    Image.new("RGB", (20, 20)).save(src / "latin1.png")
    (src / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    Image.new("RGB", (20, 20)).save(src / "blank.png")
    (src / "blank.txt").write_text("  \n")
    (src / "anim.gif").write_bytes(b"GIF89a")
    (src / "notes.md").write_text("ignored")
    for hostile in ("..hidden dot", "we\nird", "back\\..\\slash"):  # legal Linux file names
        Image.new("RGB", (20, 20), "red").save(src / f"{hostile}.png")
        (src / f"{hostile}.txt").write_text(f"hostile {hostile!r}")
        good[f"{hostile}.png"] = (f"hostile {hostile!r}", "png")
    return good


def members(paths) -> dict[str, dict[str, bytes]]:
    out = {}
    for path in paths:
        with tarfile.open(path) as tf:
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                out.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return out


@pytest.fixture
def src(tmp_path):
    folder = tmp_path / "src"
    folder.mkdir()
    return folder


def test_folder_converts_counts_and_copies_bytes(tmp_path, src):
    good = make_folder(src)
    out = tmp_path / "out"
    cfg = ConvertDataConfig(shard_size=4, val_fraction=0.25)
    result = convert_folder(src, out, cfg)

    assert result["seen"] == 19 and result["kept"] == 15 == len(good)
    assert result["skipped"] == {"bad_caption_utf8": 1, "corrupt_image": 1, "empty_caption": 1, "missing_caption": 1}
    assert result["ignored_files"] == {".gif": 1, ".md": 1} and result["failed_inputs"] == []
    assert result["train"] + result["val"] == 15 and result["val"] >= 1
    assert json.loads((out / "report.json").read_text()) == result
    for path in result["train_shards"] + result["val_shards"]:
        with tarfile.open(path) as tf:
            assert len(tf.getnames()) <= 4 * 3  # shard_size samples of png/txt/json
    assert [Path(p).name for p in result["train_shards"]][0] == "train-000000.tar"

    got = members(result["train_shards"] + result["val_shards"])
    assert len(got) == 15 and all(re.fullmatch(r"[A-Za-z0-9_-]+", k) for k in got)
    by_source = {json.loads(m["json"])["source"]: (k, m) for k, m in got.items()}
    assert set(by_source) == set(good)
    for rel, (caption, ext) in good.items():
        key, m = by_source[rel]
        assert m[ext] == (src / rel).read_bytes()  # copied as is, not re-encoded
        assert m["txt"].decode() == caption
        meta = json.loads(m["json"])
        assert (meta["width"], meta["height"]) == Image.open(src / rel).size
    assert json.loads(by_source["sub/deeper/s00000.png"][1]["json"])["license"] == "cc0"
    # nothing was written outside the output folder, whatever the names
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == sorted(
        ["report.json"] + [Path(p).relative_to(out).as_posix() for p in result["train_shards"] + result["val_shards"]]
    )

    samples = list(iter_samples(str(out / "train"), 16, report := SkipReport()))
    assert report.kept == result["train"] and all(s["original_size"] in ((24, 24), (20, 20)) for s in samples)


def test_refuses_to_overwrite_and_is_deterministic(tmp_path, src):
    make_folder(src)
    out = tmp_path / "out"
    cfg = ConvertDataConfig(shard_size=5, val_fraction=0.2)
    first = convert_folder(src, out, cfg)
    digest = {p: hashlib.sha1(Path(p).read_bytes()).hexdigest() for p in first["train_shards"] + first["val_shards"]}
    with pytest.raises(DataError, match=f"{out}.*--overwrite"):
        convert_folder(src, out, cfg)
    second = convert_folder(src, out, cfg, overwrite=True)
    assert {p: hashlib.sha1(Path(p).read_bytes()).hexdigest() for p in second["train_shards"] + second["val_shards"]} == digest


def test_allow_empty_captions_keeps_uncaptioned_images(tmp_path, src):
    make_folder(src)
    result = convert_folder(src, tmp_path / "out", ConvertDataConfig(allow_empty_captions=True))
    assert result["kept"] == 17 and result["skipped"] == {"bad_caption_utf8": 1, "corrupt_image": 1}
    captions = {json.loads(m["json"])["source"]: m["txt"] for m in members(result["train_shards"] + result["val_shards"]).values()}
    assert captions["nocaption.png"] == b"" and captions["blank.png"] == b""


def test_unreadable_file_is_named_rest_written_then_error_unless_tolerated(tmp_path, src, monkeypatch):
    make_folder(src)
    bad = src / "sub" / "s00001.jpg"
    real = Path.read_bytes

    def read_bytes(self):
        if self == bad:
            raise PermissionError(13, "Permission denied")
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    out = tmp_path / "out"
    with pytest.raises(FailedShardsError, match=r"1 input\(s\) could not be read: .*s00001\.jpg.*--tolerate-failures"):
        convert_folder(src, out, ConvertDataConfig())
    report = json.loads((out / "report.json").read_text())
    assert report["failed_inputs"] == [str(bad)] and "Permission denied" in report["input_errors"][str(bad)]
    assert report["kept"] == 14 and report["skipped"]["unreadable_file"] == 1
    result = convert_folder(src, out, ConvertDataConfig(), tolerate_failed=True, overwrite=True)
    assert result["failed_inputs"] == [str(bad)] and result["train"] + result["val"] == 14


def test_empty_or_missing_source_is_a_clear_error(tmp_path, src):
    with pytest.raises(DataError, match=f"no .jpg/.jpeg/.png/.webp images below {src}"):
        convert_folder(src, tmp_path / "out", ConvertDataConfig())
    with pytest.raises(DataError, match="is not a folder"):
        convert_folder(tmp_path / "nope", tmp_path / "out", ConvertDataConfig())


def test_cli_data_folder(tmp_path, src, capsys, monkeypatch):
    make_folder(src)
    out = tmp_path / "out"
    argv = ["data", "folder", "--src", str(src), "--out", str(out), "--shard-size", "3", "--val-fraction", "0.3",
            "--config", str(MICRO), f"run.dir={tmp_path / 'run'}"]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["shard_size"] == 3 and printed["val_fraction"] == 0.3 and printed["kept"] == 15
    assert main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(argv[:7] + ["0", "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "data.convert.shard_size" in err and "Traceback" not in err

    real = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda p: (_ for _ in ()).throw(OSError(5, "I/O error")) if p.name == "s00002.webp" else real(p))
    assert main(argv + ["--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") >= 1 and "could not be read" in err and "s00002.webp" in err
    assert main(argv + ["--overwrite", "--tolerate-failures"]) == 0
    assert json.loads(capsys.readouterr().out)["failed_inputs"] == [str(src / "s00002.webp")]


def test_non_passthrough_format_is_reencoded_as_png(tmp_path, src):
    Image.new("RGB", (10, 12), (1, 2, 3)).save(src / "odd.png", format="BMP")  # BMP bytes, .png name
    (src / "odd.txt").write_text("bitmap")
    result = convert_folder(src, tmp_path / "out", ConvertDataConfig(val_fraction=0.0))
    (m,) = members(result["train_shards"]).values()
    assert set(m) == {"png", "txt", "json"}
    assert Image.open(io.BytesIO(m["png"])).format == "PNG" and Image.open(io.BytesIO(m["png"])).getpixel((0, 0)) == (1, 2, 3)
