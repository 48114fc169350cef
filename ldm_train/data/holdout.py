"""The train/val hold-back by a hash of the sample key, shared by the emoji set and the converters."""
from __future__ import annotations

import hashlib
from typing import Iterable, Iterator, TypeVar

Sample = TypeVar("Sample", bound=tuple)  # ``(key, ...)``


def _key_digest(key: str) -> bytes:
    return hashlib.sha1(key.encode("utf-8")).digest()


def is_val(key: str, val_fraction: float) -> bool:
    """Stable across runs, machines and Python versions (unlike ``hash()``), and independent of
    which other samples exist, so adding samples never moves old ones between splits."""
    return int.from_bytes(_key_digest(key)[:8], "big") / 2**64 < val_fraction


def route(samples: Iterable[Sample], val_fraction: float) -> Iterator[tuple[bool, Sample]]:
    """``(to_val, sample)`` for each sample, streaming: val is :func:`is_val` of the key.

    So that val is never empty on small inputs, the lowest-hash train candidate is held back (one
    sample in memory) and comes last: to val if nothing else went there and another sample went to
    train, else to train. With ``val_fraction`` 0 nothing is held back and val stays empty."""
    held, held_digest, n_train, n_val = None, b"", 0, 0
    for sample in samples:
        if is_val(sample[0], val_fraction):
            n_val += 1
            yield True, sample
            continue
        digest = _key_digest(sample[0])
        if val_fraction > 0 and (held is None or digest < held_digest):
            sample, held, held_digest = held, sample, digest
        if sample is not None:
            n_train += 1
            yield False, sample
    if held is not None:
        yield n_val == 0 and n_train > 0, held
