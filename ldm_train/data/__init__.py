"""Data: image-caption WebDataset shards (img2dataset layout), converters and the built-in emoji dataset."""
from ldm_train.data.preprocess import crop_box, preprocess
from ldm_train.data.shards import (
    DataError,
    EncodedImage,
    FailedShardsError,
    ShardWriter,
    SkipReport,
    check_failed_shards,
    expand_shards,
    iter_samples,
    load_images,
    safe_key,
    write_shards,
)

__all__ = [
    "DataError", "EncodedImage", "FailedShardsError", "ShardWriter", "SkipReport", "check_failed_shards",
    "crop_box", "expand_shards", "iter_samples", "load_images", "preprocess", "safe_key", "write_shards",
]
