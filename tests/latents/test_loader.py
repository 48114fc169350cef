"""The streaming latent loader: exactly-once epochs across ranks, an order independent of the
worker count, and exact resume (no replay, no skip) across a change of workers."""
from __future__ import annotations

import json

import pytest
import torch
from webdataset import TarWriter

from ldm_train.latents.cache import pack_sample, write_manifest
from ldm_train.latents.loader import LatentLoader, LoaderStateError

COUNTS = [5, 7, 3, 10, 12]  # uneven shards, 37 samples
N = sum(COUNTS)


def write_cache(folder, counts=COUNTS, dtype=torch.float16):
    """A latent cache whose tensors encode their sample index (so order is checkable)."""
    folder.mkdir(parents=True, exist_ok=True)
    outputs, i = [], 0
    for s, count in enumerate(counts):
        name = f"latents-{s:06d}-000.tar"
        with open(folder / name, "wb") as stream, TarWriter(stream) as sink:
            for _ in range(count):
                tensors = {"mean": torch.full((2, 2, 2), float(i), dtype=dtype), "std": torch.ones(2, 2, 2, dtype=dtype),
                           "context": torch.full((3, 4), float(i) / 100, dtype=dtype)}
                sink.write(pack_sample(f"k{i:04d}", tensors, f"caption {i}", {}))
                i += 1
        outputs.append({"name": name, "samples": count})
    write_manifest(folder, {"samples_written": i, "output_shards": outputs, "latent_shape": [2, 2, 2]})
    return folder


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return write_cache(tmp_path_factory.mktemp("cache") / "train")


def take(loader, n, it=None):
    it = it if it is not None else iter(loader)
    return [next(it) for _ in range(n)], it


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["key"] == y["key"] and x["caption"] == y["caption"]
        for name in ("mean", "std", "context"):
            assert x[name].dtype == y[name].dtype and torch.equal(x[name], y[name]), name


def keys(batches):
    return [k for b in batches for k in b["key"]]


def test_batch_layout(cache):
    batch = next(iter(LatentLoader(cache, batch_size=4, seed=1, shuffle_buffer=6)))
    assert batch["mean"].shape == batch["std"].shape == (4, 2, 2, 2)
    assert batch["context"].shape == (4, 3, 4) and batch["mean"].dtype == torch.float16
    assert len(batch["key"]) == len(batch["caption"]) == 4
    index = batch["mean"][:, 0, 0, 0].int().tolist()  # the tensors belong to their key
    assert batch["key"] == [f"k{i:04d}" for i in index]
    assert batch["caption"] == [f"caption {i}" for i in index]


@pytest.mark.parametrize("world_size", [1, 3])
def test_every_sample_once_per_epoch_across_ranks(cache, world_size):
    epochs = {0: [], 1: []}
    for rank in range(world_size):
        loader = LatentLoader(cache, batch_size=1, seed=7, rank=rank, world_size=world_size, shuffle_buffer=6)
        assert loader.samples_per_epoch == N
        n = loader.rank_samples_per_epoch
        assert abs(n - N / world_size) < 1
        seen = keys(take(loader, 2 * n)[0])
        epochs[0] += seen[:n]
        epochs[1] += seen[n:]
        assert loader.epoch == 2
    for e in (0, 1):
        assert sorted(epochs[e]) == [f"k{i:04d}" for i in range(N)]  # each exactly once
    assert epochs[0] != epochs[1]  # reshuffled every epoch


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 3 workers on 2 cores, on purpose
def test_order_does_not_depend_on_workers(cache):
    reference, _ = take(LatentLoader(cache, batch_size=5, seed=3, shuffle_buffer=6, num_workers=0), 12)
    for workers in (1, 3):
        batches, _ = take(LatentLoader(cache, batch_size=5, seed=3, shuffle_buffer=6, num_workers=workers), 12)
        assert_same(batches, reference)
    other, _ = take(LatentLoader(cache, batch_size=5, seed=4, shuffle_buffer=6), 12)
    assert keys(other) != keys(reference)


def test_order_is_shuffled_within_blocks_and_shards(cache):
    order = keys(take(LatentLoader(cache, batch_size=1, seed=0, shuffle_buffer=8), N)[0])
    assert order != sorted(order)


@pytest.mark.parametrize("before,after", [(0, 2), (2, 1)])
def test_resume_continues_exactly(cache, before, after):
    """12 batches of 5 from 37 samples cross an epoch boundary; stop after 5, restore, go on."""
    kwargs = dict(batch_size=5, seed=11, rank=1, world_size=2, shuffle_buffer=4)
    reference, _ = take(LatentLoader(cache, num_workers=0, **kwargs), 12)
    first = LatentLoader(cache, num_workers=before, **kwargs)
    head, it = take(first, 5)
    state = json.loads(json.dumps(first.state_dict()))  # JSON-serialisable
    assert state["samples_yielded"] == 25 and state["epoch"] == 25 // first.rank_samples_per_epoch
    take(first, 2, it)  # batches drawn after the snapshot must not count for the restored run
    resumed = LatentLoader(cache, num_workers=after, **kwargs)
    resumed.load_state_dict(state)
    tail, _ = take(resumed, 7)
    assert_same(head + tail, reference)


def test_resume_with_another_batch_size(cache):
    kwargs = dict(seed=5, shuffle_buffer=6)
    reference = keys(take(LatentLoader(cache, batch_size=3, **kwargs), 10)[0])
    first = LatentLoader(cache, batch_size=3, **kwargs)
    head, _ = take(first, 4)
    resumed = LatentLoader(cache, batch_size=6, num_workers=2, **kwargs)
    resumed.load_state_dict(first.state_dict())
    assert keys(head) + keys(take(resumed, 3)[0]) == reference


def test_state_from_another_layout_is_refused(cache):
    state = LatentLoader(cache, batch_size=2, seed=1, world_size=2).state_dict()
    with pytest.raises(LoaderStateError, match="world_size=2"):
        LatentLoader(cache, batch_size=2, seed=1, world_size=1).load_state_dict(state)
    with pytest.raises(LoaderStateError, match="seed"):
        LatentLoader(cache, batch_size=2, seed=2, world_size=2).load_state_dict(state)


def test_bf16_cache_keeps_its_dtype(tmp_path):
    folder = write_cache(tmp_path / "bf", counts=[3, 2], dtype=torch.bfloat16)
    batch = next(iter(LatentLoader(folder, batch_size=5, num_workers=1)))
    assert batch["mean"].dtype == batch["context"].dtype == torch.bfloat16
    assert sorted(batch["key"]) == [f"k{i:04d}" for i in range(5)]
