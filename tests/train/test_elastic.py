"""Elastic exact resume: a run checkpointed by W processes continues on W' (torchrun, gloo on the
CPU), for DDP and DeepSpeed ZeRO-1/2/3, the EMA sharded (re-cut to the new layout).

One run per strategy is handed from launch to launch: W = 2 for steps 0-2, then 1 for 2-4 (2->1),
2 for 4-6 (1->2), 3 for 6-8 (2->3); every launch resumes the run folder's latest checkpoint, as a
requeued job does. Bitwise equality with an uninterrupted run is impossible across a change of
world size (the all-reduce order changes), so each change checks instead:

- **state**: right after the load, the full model weights, the optimizer's fp32 weights and AdamW
  moments per parameter (gathered through DeepSpeed's ``safe_get_full_*``; DDP: the AdamW state),
  every EMA, its update count, the LR and the scheduler step equal *bitwise* those the saving
  launch held when it saved (elastic_driver.py dumps both);
- **samples**: the job's sequence of sample keys (steps in order, ranks in order) over all
  launches is exactly the uninterrupted global stream, and no epoch holds a key twice or misses one;
- **layout**: the next checkpoint has W' EMA chunk files (1 on one process), ``world_size`` W' and
  ``samples_seen`` counting the global batches really drawn (``train.batch_size`` stays per process);
- **loss**: the resumed launch's mean loss over the same steps is within half the initial drop of
  the loss of the saving launch, which ran on past the checkpoint uninterrupted (no jump back).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import MICRO, copy_run
from ldm_train.latents.loader import LatentLoader
from ldm_train.train import checkpoint as ck
from test_distributed import run_ok, torchrun

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

DRIVER = Path(__file__).with_name("elastic_driver.py")
BATCH, EVERY, SHUFFLE = 2, 2, 8
CHAINS = {  # strategy -> processes of each launch: the full matrix where the layouts differ
    "ddp": [2, 1, 2, 3],
    "zero1": [2, 1],  # ZeRO-1 and ZeRO-2 share DeepSpeed's stage-1/2 optimizer (and its universal load)
    "zero2": [2, 1, 2, 3],
    "zero3": [2, 1, 2, 3],
}


def overrides(run: Path, strategy: str, steps: int) -> list[str]:
    return [f"run.dir={run}", "distributed.cpu=true", f"distributed.strategy={strategy}", "distributed.ema_sharded=true",
            "train.data_source=stream", f"latents.loader.shuffle_buffer={SHUFFLE}", f"train.batch_size={BATCH}",
            f"train.steps={steps}", f"train.checkpoint_every={EVERY}", "train.keep_checkpoints=10", "train.log_every=1",
            "train.ema_decays=[0.9,0.99]"]


def launch(run: Path, strategy: str, steps: int, processes: int, resume_at: int, cwd: Path) -> None:
    """Resume (or start) on ``processes``: later checkpoints are removed, as a job preempted after
    checkpoint ``resume_at`` would have left none."""
    for later in ck.list_checkpoints(run / "checkpoints"):
        if ck.checkpoint_step(later) > resume_at:
            shutil.rmtree(later)
    run_ok(torchrun(str(DRIVER), *overrides(run, strategy, steps), nproc=processes), cwd)


def stream(run: Path, n: int) -> list[str]:
    """The first ``n`` keys of the uninterrupted global stream, read by one loader of batch 1."""
    seed = ck.read_state(ck.latest_checkpoint(run / "checkpoints"))["seed"]
    loader = iter(LatentLoader(run / "latents" / "train", batch_size=1, seed=seed, shuffle_buffer=SHUFFLE))
    return [next(loader)["key"][0] for _ in range(n)]


def job_sequence(run: Path, chain: list[int]) -> list[str]:
    """Keys in the job's order: each launch's steps until the next launch's checkpoint."""
    out = []
    for i, world in enumerate(chain):
        per_rank = [json.loads((run / f"keys-{i * EVERY}-{r}.json").read_text()) for r in range(world)]
        steps = EVERY if i < len(chain) - 1 else len(per_rank[0])
        out += [k for s in range(steps) for r in range(world) for k in per_rank[r][s]]
    return out


def assert_state_carried(run: Path, step: int) -> None:
    saved, loaded = (load_file(str(run / f"state-{kind}-{step}.safetensors")) for kind in ("saved", "loaded"))
    assert saved.keys() == loaded.keys()
    assert any(k.startswith("exp_avg_sq/") for k in saved) and any(k.startswith("ema1/") for k in saved)
    different = [k for k in saved if not torch.equal(saved[k], loaded[k])]
    assert not different, different[:5]


def mean(losses: dict, steps) -> float:
    return sum(losses[str(s)] for s in steps) / len(steps)


@pytest.mark.parametrize("strategy", list(CHAINS))
def test_resume_on_another_number_of_processes(micro_run, tmp_path, strategy):
    chain = CHAINS[strategy]
    steps = EVERY * len(chain)
    run = copy_run(micro_run, tmp_path / "run")
    for i, world in enumerate(chain):
        launch(run, strategy, steps, world, i * EVERY, tmp_path)
    n_train = micro_run.n_train
    samples = 0
    losses = [json.loads((run / f"losses-{i * EVERY}.json").read_text()) for i in range(len(chain))]
    start = mean(losses[0], range(2))
    for i, (before, after) in enumerate(zip(chain, chain[1:]), start=1):
        at = i * EVERY
        assert_state_carried(run, at)
        samples += EVERY * BATCH * before
        nxt = ck.read_state(run / "checkpoints" / f"step-{at + EVERY:07d}")
        samples_after = samples + EVERY * BATCH * after
        assert (nxt["world_size"], nxt["samples_seen"]) == (after, samples_after), nxt
        shards = sorted(p.name for p in (run / "checkpoints" / f"step-{at + EVERY:07d}").glob("ema-*.safetensors"))
        assert shards == [f"ema-{r:05d}-of-{after:05d}.safetensors" for r in range(after)]
        rest = range(at, steps)  # the saving launch ran on to the end uninterrupted
        whole, resumed = mean(losses[i - 1], rest), mean(losses[i], rest)
        assert abs(resumed - whole) <= 0.5 * (start - whole), (strategy, before, after, start, whole, resumed)
    assert not list((run / "checkpoints").glob(".universal-*"))  # the DeepSpeed conversion is cleared
    sequence = job_sequence(run, chain)
    total = sum(EVERY * BATCH * w for w in chain)
    assert len(sequence) == total
    for e in range(0, total, n_train):
        epoch = sequence[e : e + n_train]
        assert len(set(epoch)) == len(epoch), f"a sample twice in epoch {e // n_train}"
    if len(chain) == 4:  # 32 samples of 24: the run crosses into a second epoch
        assert total > n_train and len(set(sequence[:n_train])) == n_train  # epoch 0 has every sample
    assert sequence == stream(run, total)
