"""The bucketed streaming loader: batches of one bucket, every sample once per epoch across ranks
(short last batch per bucket, none dropped), an order independent of the worker count, exact resume."""
from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from webdataset import TarWriter

from ldm_train.config import LoaderConfig
from ldm_train.latents.buckets import BucketLoader, open_loader
from ldm_train.latents.cache import pack_sample, write_manifest
from ldm_train.latents.loader import LatentLoader, LoaderStateError

from test_loader import keys, take, write_cache

# bucket (w, h) in pixels -> samples per part: 9, 14, 4 and 1 samples; latents are (w, h) / 8
PARTS = {(64, 128): [5, 4], (96, 96): [6, 3, 5], (128, 64): [4], (112, 80): [1]}
N = sum(map(sum, PARTS.values()))
SIZE = {f"k{i:04d}": b for i, b in enumerate(b for b, counts in PARTS.items() for _ in range(sum(counts)))}


def write_bucketed(folder, parts=PARTS):
    """A bucketed cache whose tensors encode their sample index and have their bucket's shape."""
    folder.mkdir(parents=True, exist_ok=True)
    outputs, i = [], 0
    for (w, h), counts in parts.items():
        for p, count in enumerate(counts):
            name = f"latents-{p:06d}-{w}x{h}-000.tar"
            with open(folder / name, "wb") as stream, TarWriter(stream) as sink:
                for _ in range(count):
                    tensors = {"mean": torch.full((4, h // 8, w // 8), float(i), dtype=torch.float16),
                               "std": torch.ones(4, h // 8, w // 8, dtype=torch.float16),
                               "context": torch.full((3, 4), float(i) / 100, dtype=torch.float16)}
                    sink.write(pack_sample(f"k{i:04d}", tensors, f"caption {i}", {"bucket": [w, h]}))
                    i += 1
            outputs.append({"name": name, "samples": count, "bucket": [w, h]})
    write_manifest(folder, {"samples_written": i, "output_shards": outputs, "buckets": [list(b) for b in parts],
                            "latent_shape": [4, 12, 12]})
    return folder


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return write_bucketed(tmp_path_factory.mktemp("bucketed") / "train")


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["key"] == y["key"] and x["caption"] == y["caption"] and x["bucket"] == y["bucket"]
        for name in ("mean", "std", "context"):
            assert x[name].dtype == y[name].dtype and torch.equal(x[name], y[name]), name


def test_each_batch_is_one_bucket_and_its_tensors_belong_to_its_keys(cache):
    loader = BucketLoader(cache, batch_size=4, seed=1, shuffle_buffer=5)
    batches, _ = take(loader, loader.rank_batches_per_epoch)
    for batch in batches:
        w, h = batch["bucket"]
        assert batch["mean"].shape == (len(batch["key"]), 4, h // 8, w // 8) == batch["std"].shape
        assert all(SIZE[k] == (w, h) for k in batch["key"])
        index = batch["mean"][:, 0, 0, 0].int().tolist()
        assert batch["key"] == [f"k{i:04d}" for i in index] and batch["caption"] == [f"caption {i}" for i in index]
    first_bucket_of = [b["bucket"] for b in batches]
    assert first_bucket_of != sorted(first_bucket_of)  # buckets interleave, not one after another


@pytest.mark.parametrize("world_size,batch_size", [(1, 4), (3, 4), (2, 5)])
def test_every_sample_once_per_epoch_across_ranks_with_short_last_batches(cache, world_size, batch_size):
    epochs = {0: [], 1: []}
    sizes = {0: [], 1: []}
    per_rank = []
    for rank in range(world_size):
        loader = BucketLoader(cache, batch_size=batch_size, seed=7, rank=rank, world_size=world_size, shuffle_buffer=4)
        assert loader.samples_per_epoch == N
        n = loader.rank_batches_per_epoch
        per_rank.append(n)
        batches, _ = take(loader, 2 * n)
        for e in (0, 1):
            epochs[e] += keys(batches[e * n:(e + 1) * n])
            sizes[e] += [(b["bucket"], len(b["key"])) for b in batches[e * n:(e + 1) * n]]
        assert loader.epoch == 2
    assert max(per_rank) - min(per_rank) <= 1
    for e in (0, 1):
        assert sorted(epochs[e]) == sorted(SIZE)  # each exactly once, none dropped
        short = Counter(bucket for bucket, size in sizes[e] if size < batch_size)
        for bucket, counts in PARTS.items():  # one short batch per bucket with a remainder, of that size
            rest = sum(counts) % batch_size
            assert short[bucket] == (1 if rest else 0)
            assert [s for b, s in sizes[e] if b == bucket and s < batch_size] == ([rest] if rest else [])
    assert epochs[0] != epochs[1]  # reshuffled every epoch


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 3 workers on 2 cores, on purpose
def test_order_does_not_depend_on_workers(cache):
    kwargs = dict(batch_size=3, seed=3, shuffle_buffer=4, rank=1, world_size=2)
    reference, _ = take(BucketLoader(cache, num_workers=0, **kwargs), 14)
    for workers in (1, 3):
        batches, _ = take(BucketLoader(cache, num_workers=workers, **kwargs), 14)
        assert_same(batches, reference)
    other, _ = take(BucketLoader(cache, batch_size=3, seed=4, shuffle_buffer=4, rank=1, world_size=2), 14)
    assert keys(other) != keys(reference)


@pytest.mark.parametrize("before,after", [(0, 2), (2, 0)])
def test_resume_continues_exactly_mid_epoch(cache, before, after):
    kwargs = dict(batch_size=4, seed=11, rank=0, world_size=2, shuffle_buffer=4)
    reference, _ = take(BucketLoader(cache, num_workers=0, **kwargs), 12)  # 3 epochs of this rank's 4 batches
    first = BucketLoader(cache, num_workers=before, **kwargs)
    head, it = take(first, 5)
    state = json.loads(json.dumps(first.state_dict()))
    assert state["batches_yielded"] == 5 and state["samples_yielded"] == len(keys(head)) and state["epoch"] == 1
    take(first, 2, it)  # drawn after the snapshot: must not count
    resumed = BucketLoader(cache, num_workers=after, **kwargs)
    resumed.load_state_dict(state)
    tail, _ = take(resumed, 7)
    assert_same(head + tail, reference)


def test_states_that_cannot_continue_are_refused_naming_the_key(cache, tmp_path):
    state = BucketLoader(cache, batch_size=4, seed=1, world_size=2).state_dict()
    with pytest.raises(LoaderStateError, match="batch_size=4"):
        BucketLoader(cache, batch_size=5, seed=1, world_size=2).load_state_dict(state)
    with pytest.raises(LoaderStateError, match="world_size=2"):
        BucketLoader(cache, batch_size=4, seed=1, world_size=1).load_state_dict(state)
    plain = write_cache(tmp_path / "plain")
    with pytest.raises(LoaderStateError, match="with data.buckets, but this cache has none"):
        LatentLoader(plain, batch_size=4, seed=1, world_size=2).load_state_dict(state)
    with pytest.raises(LoaderStateError, match="without data.buckets, but this cache has buckets"):
        BucketLoader(cache, batch_size=4, seed=1).load_state_dict(LatentLoader(plain, batch_size=4, seed=1).state_dict())


def test_open_loader_picks_by_the_manifest(cache, tmp_path):
    cfg = LoaderConfig(num_workers=0, shuffle_buffer=4)
    assert isinstance(open_loader(cache, cfg, 4, 0), BucketLoader)
    assert isinstance(open_loader(write_cache(tmp_path / "plain"), cfg, 4, 0), LatentLoader)
