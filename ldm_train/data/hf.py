"""Opening a Hugging Face ``datasets`` dataset for ``ldm-train data hf``: a folder written by
``save_to_disk``, a folder or single file of data files ``load_dataset`` reads (parquet, csv,
json, arrow, an imagefolder), or a hub id where the hub is reachable. ``datasets`` is imported
here only, so the rest of the package does not pay for it."""
from __future__ import annotations

from pathlib import Path

from ..utils.hub import hub_unavailable
from .shards import DataError

_FILE_BUILDERS = {".parquet": "parquet", ".csv": "csv", ".json": "json", ".jsonl": "json", ".arrow": "arrow"}


def offline_hint(dataset: str) -> str:
    return (
        f"make a local copy where the hub is reachable (`huggingface-cli download --repo-type dataset {dataset} "
        f"--local-dir DIR`, or datasets.load_dataset('{dataset}').save_to_disk('DIR')), copy DIR here and pass --dataset DIR"
    )


def _load(dataset: str, split: str | None, cache_dir: Path | None):
    import datasets

    path = Path(dataset)
    cache = str(cache_dir) if cache_dir is not None else None
    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        return datasets.load_from_disk(str(path))
    if path.is_file():
        builder = _FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise DataError(f"--dataset {path}: unknown data file type {path.suffix!r} (expected {', '.join(_FILE_BUILDERS)})")
        return datasets.load_dataset(builder, data_files=str(path), split=split, cache_dir=cache)
    if path.is_dir():
        return datasets.load_dataset(str(path), split=split, cache_dir=cache)
    why = hub_unavailable("HF_DATASETS_OFFLINE")
    if why:
        raise DataError(f"--dataset {dataset}: not a local path, and the Hugging Face hub is not usable ({why}); {offline_hint(dataset)}")
    return datasets.load_dataset(dataset, split=split or "train", cache_dir=cache)


def open_dataset(dataset: str, split: str | None, cache_dir: Path | None = None):
    """``(datasets.Dataset, split name)``. Every failure is a :class:`DataError` naming the value:
    from a third-party loader they are nearly always a wrong path, split, format or no network."""
    try:
        loaded = _load(dataset, split, cache_dir)
    except DataError:
        raise
    except Exception as e:  # datasets raises many types (FileNotFoundError, ValueError, hub errors)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        hint = "" if Path(dataset).exists() else f"; if it is a hub id: {offline_hint(dataset)}"
        raise DataError(f"--dataset {dataset}: cannot load it (split {split or 'default'}): {first}{hint}") from None
    return pick_split(loaded, dataset, split)


def pick_split(loaded, dataset: str, split: str | None):
    import datasets

    if not isinstance(loaded, datasets.DatasetDict):
        return loaded, split or str(loaded.split or "train")
    names = list(loaded)
    if split is None:
        if "train" not in names and len(names) != 1:
            raise DataError(f"--dataset {dataset} has splits {', '.join(names)}: choose one with --split")
        split = "train" if "train" in names else names[0]
    if split not in names:
        raise DataError(f"--dataset {dataset}: no split {split!r} (splits: {', '.join(names)})")
    return loaded[split], split


def prepare_columns(ds, dataset: str, image_column: str, caption_column: str):
    """Check the named columns exist; read images as encoded bytes (``Image(decode=False)``) so
    they are copied as they are, not decoded and re-compressed."""
    import datasets

    for flag, column in (("--image-column", image_column), ("--caption-column", caption_column)):
        if column not in ds.column_names:
            raise DataError(f"--dataset {dataset}: no column {column!r} for {flag} (columns: {', '.join(ds.column_names)})")
    if isinstance(ds.features[image_column], datasets.Image):
        ds = ds.cast_column(image_column, datasets.Image(decode=False))
    return ds.select_columns(list(dict.fromkeys([image_column, caption_column])))
