"""Data: image-caption WebDataset shards (img2dataset layout) and the built-in emoji dataset."""
from ldm_train.data.shards import (
    DataError,
    SkipReport,
    expand_shards,
    iter_samples,
    load_images,
    preprocess,
    write_shards,
)

__all__ = ["DataError", "SkipReport", "expand_shards", "iter_samples", "load_images", "preprocess", "write_shards"]
