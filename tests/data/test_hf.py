"""``ldm-train data hf``: Hugging Face ``datasets`` (saved folders, data files) -> shards; offline
a hub id is a clear one-line error. Everything is local; nothing downloads."""
from __future__ import annotations

import io
import json
import tarfile

import datasets
import pytest
from conftest import MICRO, synthetic_samples
from PIL import Image

from ldm_train.cli import main
from ldm_train.config import ConvertDataConfig
from ldm_train.data.convert import convert_hf
from ldm_train.data.shards import DataError, FailedShardsError

FEATURES = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def read_members(paths) -> dict[str, dict[str, bytes]]:
    out = {}
    for path in paths:
        with tarfile.open(path) as tf:
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                out.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return out


def small_dataset(n: int, seed: int = 0) -> datasets.Dataset:
    samples = synthetic_samples(n, size=20, seed=seed)
    return datasets.Dataset.from_dict({"image": [s[1] for s in samples], "text": [s[2] for s in samples]}, features=FEATURES)


def test_saved_dataset_dict_default_and_named_split(tmp_path):
    d = datasets.DatasetDict({"train": small_dataset(7), "test": small_dataset(3, seed=1)})
    d.save_to_disk(tmp_path / "ds")
    cfg = ConvertDataConfig(shard_size=3, val_fraction=0.2)
    result = convert_hf(str(tmp_path / "ds"), tmp_path / "out", cfg, "image", "text")
    assert (result["split"], result["seen"], result["kept"], result["skipped"]) == ("train", 7, 7, {})
    assert result["train"] + result["val"] == 7 and result["val"] >= 1
    got = read_members(result["train_shards"] + result["val_shards"])
    assert sorted(got) == [f"{i:09d}" for i in range(7)]
    expected = synthetic_samples(7, size=20)
    for key, m in got.items():
        i = int(key)
        assert m["txt"].decode() == expected[i][2]
        assert m["png"] == png_bytes(expected[i][1])  # datasets stores PIL images as PNG; copied as is
        assert json.loads(m["json"]) == {"index": i, "width": 20, "height": 20}

    test = convert_hf(str(tmp_path / "ds"), tmp_path / "out_test", cfg, "image", "text", split="test")
    assert (test["split"], test["kept"]) == ("test", 3)
    with pytest.raises(DataError, match=r"no split 'validation' \(splits: train, test\)"):
        convert_hf(str(tmp_path / "ds"), tmp_path / "o3", cfg, "image", "text", split="validation")


def test_columns_must_exist_and_are_named(tmp_path):
    small_dataset(2).save_to_disk(tmp_path / "ds")
    with pytest.raises(DataError, match=r"no column 'caption' for --caption-column \(columns: image, text\)"):
        convert_hf(str(tmp_path / "ds"), tmp_path / "out", ConvertDataConfig(), "image", "caption")


def test_parquet_bytes_list_captions_and_bad_rows(tmp_path):
    good = synthetic_samples(4, size=18)
    table = {
        "jpg": [{"bytes": png_bytes(s[1]), "path": None} for s in good] + [{"bytes": b"junk", "path": None}, None],
        "caps": [[s[2], "second caption"] for s in good[:2]] + [good[2][2], None, "corrupt row", "no image"],
    }
    features = datasets.Features({"jpg": datasets.Image(), "caps": datasets.Value("string")})
    # mixed list/str captions are not one arrow type: store lists as a separate dataset and concatenate
    lists = datasets.Dataset.from_dict({"jpg": table["jpg"][:2], "caps": table["caps"][:2]},
                                       features=datasets.Features({"jpg": datasets.Image(), "caps": datasets.Sequence(datasets.Value("string"))}))
    lists.to_parquet(tmp_path / "lists.parquet")
    rest = datasets.Dataset.from_dict({"jpg": table["jpg"][2:], "caps": table["caps"][2:]}, features=features)
    rest.to_parquet(tmp_path / "rest.parquet")
    cache = tmp_path / "cache"

    a = convert_hf(str(tmp_path / "lists.parquet"), tmp_path / "a", ConvertDataConfig(val_fraction=0.0), "jpg", "caps", cache_dir=cache)
    assert a["kept"] == 2
    assert [m["txt"].decode() for m in read_members(a["train_shards"]).values()] == [good[0][2], good[1][2]]

    b = convert_hf(str(tmp_path / "rest.parquet"), tmp_path / "b", ConvertDataConfig(val_fraction=0.0), "jpg", "caps", cache_dir=cache)
    assert (b["seen"], b["kept"]) == (4, 1)
    assert b["skipped"] == {"corrupt_image": 1, "missing_caption": 1, "missing_image": 1}


def test_csv_file_with_relative_image_paths(tmp_path):
    ds_dir = tmp_path / "csvds"
    (ds_dir / "img").mkdir(parents=True)
    rows = ["file,caption"]
    for key, image, caption, _ in synthetic_samples(3, size=16):
        image.save(ds_dir / "img" / f"{key}.webp", format="WEBP", lossless=True)
        rows.append(f"img/{key}.webp,{caption}")
    rows.append("img/missing.webp,gone")
    (ds_dir / "data.csv").write_text("\n".join(rows) + "\n")
    cfg, spec = ConvertDataConfig(val_fraction=0.0), str(ds_dir / "data.csv")
    with pytest.raises(FailedShardsError, match=r"could not be read: .*data.csv:train\[3\]"):
        convert_hf(spec, tmp_path / "out", cfg, "file", "caption", cache_dir=tmp_path / "cache")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["kept"] == 3 and report["skipped"] == {"unreadable_file": 1}
    result = convert_hf(spec, tmp_path / "out", cfg, "file", "caption", tolerate_failed=True, overwrite=True,
                        cache_dir=tmp_path / "cache")
    got = read_members(result["train_shards"])
    assert all(set(m) == {"webp", "txt", "json"} for m in got.values())
    assert got["000000000"]["webp"] == (ds_dir / "img" / "s00000.webp").read_bytes()


def test_imagefolder_with_metadata(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    rows = ["file_name,caption"]
    for key, image, caption, _ in synthetic_samples(4, size=16):
        image.save(folder / f"{key}.png")
        rows.append(f"{key}.png,{caption}")
    (folder / "metadata.csv").write_text("\n".join(rows) + "\n")
    result = convert_hf(str(folder), tmp_path / "out", ConvertDataConfig(val_fraction=0.0), "image", "caption",
                        cache_dir=tmp_path / "cache")
    got = read_members(result["train_shards"])
    assert sorted(m["txt"].decode() for m in got.values()) == sorted(s[2] for s in synthetic_samples(4, size=16))
    assert {m["png"] for m in got.values()} == {(folder / f"s{i:05d}.png").read_bytes() for i in range(4)}


def test_hub_id_offline_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError) as info:
        convert_hf("someorg/captions", tmp_path / "out", ConvertDataConfig(), "image", "text")
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("--dataset someorg/captions: not a local path")
    assert "huggingface-cli download --repo-type dataset someorg/captions" in msg and "--dataset DIR" in msg
    assert not (tmp_path / "out").exists()


def test_cli_data_hf(tmp_path, capsys, monkeypatch):
    small_dataset(5).save_to_disk(tmp_path / "ds")
    base = ["data", "hf", "--image-column", "image", "--caption-column", "text", "--config", str(MICRO),
            f"run.dir={tmp_path / 'run'}"]
    assert main(base + ["--dataset", str(tmp_path / "ds"), "--shard-size", "2"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["kept"] == 5 and printed["shard_size"] == 2
    assert (tmp_path / "run" / "data" / "report.json").is_file()  # default --out: parent of data.train_shards
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(base + ["--dataset", "org/name"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ldm-train data: error: --dataset org/name: not a local path") and err.count("\n") == 1
