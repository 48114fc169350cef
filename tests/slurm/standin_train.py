"""TEST FIXTURE: a stand-in for ``ldm-train train`` that follows the training side's preemption
contract, so the Slurm side can be tested without the real training loop:

- run as ``python -m standin_train train --config CFG [--overwrite]`` (alone or under torchrun);
  reads ``run.dir``, ``train.steps`` and ``train.checkpoint_every`` from CFG;
- each step updates a value that depends on every earlier step (so a resume must be exact);
  rank 0 logs ``{"stage": "train", "step": N}`` to ``{run}/metrics.jsonl``;
- on SIGUSR1/SIGTERM it finishes the step, checkpoints, writes ``status.json`` =
  ``{"state": "preempted", "step": N}`` and exits 75; at the end ``{"state": "finished"}``;
- re-running resumes from the latest ``{run}/checkpoints/step-N/``.

Knobs for the tests (environment): ``STANDIN_HOLD_AT=K`` makes the first start (restart count 0)
wait at step K until a signal comes, so the signal always lands mid-run without timing guesses;
``STANDIN_CRASH_ON_SIGNAL=1`` makes it crash (exit 1, state failed) instead of checkpointing;
``STANDIN_SAVE_SECONDS=S`` makes the save on a signal take S seconds, as a large checkpoint does
(the launcher must wait for it rather than let the ranks be killed).
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import yaml

# The handler only appends to a list: a lock taken in a handler (Event.set) deadlocks when a second
# signal's handler runs nested inside the first (Slurm signals every process of the step and
# torchrun forwards the same signal again, milliseconds apart).
received: list[int] = []
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


def on_signal(signum, frame):
    received.append(signum)


def latest(run: Path) -> dict:
    done = sorted(p for p in (run / "checkpoints").glob("step-*") if not p.name.endswith(".tmp"))
    return json.loads((done[-1] / "state.json").read_text()) if done else {"step": 0, "value": 1}


def save(run: Path, step: int, value: int) -> None:
    final = run / "checkpoints" / f"step-{step:07d}"
    tmp = final.with_name(final.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "state.json").write_text(json.dumps({"step": step, "value": value}))
    tmp.rename(final)


def write_status(run: Path, state: str, step: int) -> None:
    tmp = run / "status.json.tmp"
    tmp.write_text(json.dumps({"state": state, "step": step}))
    tmp.replace(run / "status.json")


def main(argv: list[str]) -> int:
    assert argv[0] == "train", argv
    cfg = yaml.safe_load(Path(argv[argv.index("--config") + 1]).read_text())
    run, steps, every = Path(cfg["run"]["dir"]), cfg["train"]["steps"], cfg["train"]["checkpoint_every"]
    rank0 = int(os.environ.get("RANK", "0")) == 0
    for sig in SIGNALS:
        signal.signal(sig, on_signal)
    state = latest(run)
    step, value = state["step"], state["value"]
    hold = int(os.environ.get("STANDIN_HOLD_AT", "-1")) if os.environ.get("SLURM_RESTART_COUNT", "0") == "0" else -1
    if rank0:
        run.mkdir(parents=True, exist_ok=True)
        write_status(run, "running", step)
    while step < steps:
        if step == hold:  # no ceiling: the test signals, or the cluster's stop cancels the job
            signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)  # from here a signal waits for sigwait
            if not received:
                received.append(signal.sigwait(SIGNALS))
            signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
        value = (value * 1_000_003 + step + 1) % (2**61 - 1)  # each step depends on all before it
        step += 1
        if rank0:
            with (run / "metrics.jsonl").open("a") as f:
                f.write(json.dumps({"stage": "train", "step": step - 1, "loss": 1.0 / step}) + "\n")
        if received:
            if os.environ.get("STANDIN_CRASH_ON_SIGNAL") == "1":
                if rank0:
                    write_status(run, "failed", step)
                return 1
            if rank0:
                time.sleep(float(os.environ.get("STANDIN_SAVE_SECONDS", "0")))  # a big checkpoint
                save(run, step, value)
                write_status(run, "preempted", step)
            return 75
        if rank0 and (step % every == 0 or step == steps):
            save(run, step, value)
    if rank0:
        write_status(run, "finished", step)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
