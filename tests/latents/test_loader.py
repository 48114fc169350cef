"""The streaming latent loader: exactly-once epochs across ranks, an order independent of the
worker count, and exact resume (no replay, no skip) across a change of workers, batch size and
number of ranks."""
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


def job_steps(loaders, steps, its=None):
    """``steps`` lockstep steps of all ranks: the keys of each step, rank 0's batch first."""
    its = its or [iter(lo) for lo in loaders]
    return [[k for it in its for k in next(it)["key"]] for _ in range(steps)], its


def ranks(world_size, batch_size, **kwargs):
    return [LatentLoader(batch_size=batch_size, rank=r, world_size=world_size, **kwargs) for r in range(world_size)]


def assert_epochs_exactly_once(sequence):
    """Cut into consecutive epochs of N, each full one holds every key once, the last no key twice."""
    for e in range(0, len(sequence), N):
        epoch = sequence[e : e + N]
        assert len(set(epoch)) == len(epoch), f"a key twice in epoch {e // N}"
        if len(epoch) == N:
            assert sorted(epoch) == [f"k{i:04d}" for i in range(N)]


@pytest.mark.parametrize("world_size", [1, 3])
def test_every_sample_once_per_epoch_across_ranks(cache, world_size):
    """3 ranks x batch 2 for 13 steps: 78 samples, two full epochs of 37 and 4 of the third."""
    loaders = ranks(world_size, 2, folder=cache, seed=7, shuffle_buffer=6)
    assert loaders[0].samples_per_epoch == N
    steps, _ = job_steps(loaders, 13 * 3 // world_size)
    sequence = [k for step in steps for k in step]
    assert_epochs_exactly_once(sequence)
    assert sequence[:N] != sequence[N : 2 * N]  # reshuffled every epoch
    assert loaders[0].position == len(sequence) and loaders[0].epoch == len(sequence) // N


def test_the_stream_does_not_depend_on_ranks_or_batch_size(cache):
    """The job's sequence (steps in order, ranks in order within a step) is one global stream."""
    reference = keys(take(LatentLoader(cache, batch_size=1, seed=7, shuffle_buffer=6), 60)[0])
    for world_size, batch in ((2, 3), (3, 2), (4, 5)):
        steps, _ = job_steps(ranks(world_size, batch, folder=cache, seed=7, shuffle_buffer=6), 60 // (world_size * batch))
        assert [k for step in steps for k in step] == reference


@pytest.mark.parametrize("before, after", [(1, 2), (2, 1), (2, 3), (3, 2)])
def test_elastic_resume_continues_the_stream(cache, before, after):
    """W ranks take 5 steps of 3 (mid-epoch), save rank 0's state; W' ranks resume from it (any
    rank's state is the same global position). Across the change no key is skipped or repeated
    within an epoch: the job's sequence is the uninterrupted stream's."""
    kwargs = dict(folder=cache, seed=3, shuffle_buffer=5)
    first = ranks(before, 3, **kwargs)
    head, its = job_steps(first, 5)
    states = [lo.state_dict() for lo in first]
    assert {s["position"] for s in states} == {5 * 3 * before}
    job_steps(first, 2, its)  # drawn after the snapshot: must not count for the resumed run
    resumed = ranks(after, 3, **kwargs)
    for lo in resumed:
        lo.load_state_dict(states[0])
    tail, _ = job_steps(resumed, 8)
    sequence = [k for step in head + tail for k in step]
    assert len(sequence) > N  # the change falls in epoch 0 and the run crosses into epoch 1
    assert_epochs_exactly_once(sequence)
    assert sequence == keys(take(LatentLoader(cache, batch_size=1, **{k: v for k, v in kwargs.items() if k != "folder"}),
                                 len(sequence))[0])


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
    assert state["position"] == 50 and state["epoch"] == 50 // N  # 25 samples of each of 2 ranks
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


def test_state_from_another_order_is_refused(cache):
    state = LatentLoader(cache, batch_size=2, seed=1, world_size=2).state_dict()
    with pytest.raises(LoaderStateError, match="seed"):
        LatentLoader(cache, batch_size=2, seed=2, world_size=2).load_state_dict(state)
    with pytest.raises(LoaderStateError, match="shuffle_buffer"):
        LatentLoader(cache, batch_size=2, seed=1, shuffle_buffer=3).load_state_dict(state)
    with pytest.raises(LoaderStateError, match="version=1"):  # the per-rank layout of earlier versions
        LatentLoader(cache, batch_size=2, seed=1).load_state_dict(dict(state, version=1))


def test_bf16_cache_keeps_its_dtype(tmp_path):
    folder = write_cache(tmp_path / "bf", counts=[3, 2], dtype=torch.bfloat16)
    batch = next(iter(LatentLoader(folder, batch_size=5, num_workers=1)))
    assert batch["mean"].dtype == batch["context"].dtype == torch.bfloat16
    assert sorted(batch["key"]) == [f"k{i:04d}" for i in range(5)]
