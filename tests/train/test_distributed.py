"""Two real processes (torchrun, gloo on the CPU) for each strategy: DDP, DeepSpeed ZeRO-2 and
ZeRO-3 through Accelerate. Loss goes down, ranks agree, ZeRO-3 really partitions, the EMA per
rank is ~1/world, resume after kill -9 is bitwise exact, SIGUSR1 checkpoints and resumes.

The first DeepSpeed launch on a machine JIT-compiles its shared-memory comm op into torch's
extension cache (~1 min, once); later launches reuse it.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from conftest import MICRO, REPO, copy_run
from waiting import poll_until

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

DRIVER = Path(__file__).with_name("dist_driver.py")
STRATEGIES = ["ddp", "zero2", "zero3"]


def env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def torchrun(*args: str, nproc: int = 2) -> list[str]:
    """``nproc`` processes on this machine (test_elastic.py uses 1, 2 and 3). torchrun forwards
    only SIGTERM/SIGINT/SIGHUP/SIGQUIT to its workers unless told (the flag, or
    PET_SIGNALS_TO_HANDLE; TORCHELASTIC_SIGNALS_TO_HANDLE is overwritten by it)."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
        "--signals-to-handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", *args,
    ]


def train_cmd(run: Path, *overrides: str) -> list[str]:
    return torchrun("-m", "ldm_train.cli", "train", "--config", str(MICRO), f"run.dir={run}", "distributed.cpu=true", *overrides)


def run_ok(cmd: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env())
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def final_state(run: Path, step: int) -> dict[str, torch.Tensor]:
    """Raw weights, every EMA chunk and the optimizer state of checkpoint ``step``, flattened."""
    ckpt = run / "checkpoints" / f"step-{step:07d}"
    out = {f"model/{k}": v for k, v in load_file(str(ckpt / "model.safetensors")).items()}
    for f in sorted(ckpt.glob("ema-*.safetensors")):
        out.update({f"{f.stem}/{k}": v for k, v in load_file(str(f)).items()})
    for f in sorted(ckpt.rglob("*.pt")):  # DDP's optimizer.pt, DeepSpeed's partitioned states
        out.update({f"{f.relative_to(ckpt)}/{k}": v for k, v in _tensors(torch.load(f, map_location="cpu", weights_only=False))})
    return out


def _tensors(obj, prefix=""):
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}.{i}")


def kill_tree(proc: subprocess.Popen) -> None:
    """kill -9 the launcher and its workers (torchrun starts each worker in its own session)."""
    family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for p in family:
        p.send_signal(signal.SIGKILL)
    psutil.wait_procs(family, timeout=120)


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_two_ranks_learn_agree_and_shard(micro_run, tmp_path, strategy):
    """The driver trains on a fixed batch and reports, per rank: losses, a checksum of the full
    weights, parameter storage on the rank, and EMA bytes on the rank."""
    run = copy_run(micro_run, tmp_path / "run")
    run_ok(torchrun(str(DRIVER), str(run), strategy, "30"), tmp_path)
    reports = [json.loads((run / f"report-{rank}.json").read_text()) for rank in (0, 1)]
    assert sorted(r["rank"] for r in reports) == [0, 1]
    r0, r1 = sorted(reports, key=lambda r: r["rank"])
    first, last = sum(r0["losses"][:5]) / 5, sum(r0["losses"][-5:]) / 5
    assert last < 0.85 * first, (first, last)
    assert r0["weights_checksum"] == r1["weights_checksum"]  # ranks hold the same model
    assert r0["ema_checksum"] == r1["ema_checksum"]
    full = r0["full_param_elements"]
    if strategy == "zero3":  # each rank stores about half of every parameter, and half the EMA
        for r in (r0, r1):
            assert r["local_param_elements"] <= full / 2 + 2 * r["num_params"]
            assert r["ema_bytes"] <= r["full_ema_bytes"] / 2 + 8 * r["num_params"]
        assert r0["local_param_elements"] + r1["local_param_elements"] >= full
    else:
        assert r0["local_param_elements"] == full
        assert r0["ema_bytes"] == r0["full_ema_bytes"]


@pytest.mark.parametrize("strategy", ["ddp", "zero2"])
def test_nan_on_one_rank_skips_the_step_on_both(micro_run, tmp_path, strategy):
    """Rank 1's loss is NaN at step 4: both ranks skip it (DDP: the all-reduced gradient is NaN;
    DeepSpeed: the ranks agree before backward), count it, and stay finite and identical."""
    run = copy_run(micro_run, tmp_path / "run")
    run_ok(torchrun(str(DRIVER), str(run), strategy, "8", "4"), tmp_path)
    r0, r1 = (json.loads((run / f"report-{rank}.json").read_text()) for rank in (0, 1))
    assert r0["nonfinite_skipped"] == r1["nonfinite_skipped"] == 1
    assert r0["finite"] and r1["finite"]
    assert r0["weights_checksum"] == r1["weights_checksum"]


@pytest.mark.parametrize("strategy, extra", [("ddp", ()), ("zero3", ()), (  # ZeRO-2 runs with bf16 and accumulation
    "zero2", ("distributed.mixed_precision=bf16", "distributed.gradient_accumulation_steps=2")),
], ids=["ddp", "zero3", "zero2-bf16-accum2"])
def test_resume_after_kill_is_bitwise_exact(micro_run, tmp_path, strategy, extra):
    """2N steps in one go == N steps, kill -9, resume for N more: weights, EMA and optimizer
    state bit for bit. The kill lands after checkpoint N; on-disk, anything later is what a kill
    at that moment leaves, so later checkpoints are removed if the run got further."""
    n = 4
    common = [f"train.steps={2 * n}", f"train.checkpoint_every={n}", f"distributed.strategy={strategy}",
              "train.log_every=1", "train.ema_decays=[0.9,0.99]", *extra]
    whole = copy_run(micro_run, tmp_path / "whole")
    run_ok(train_cmd(whole, *common), tmp_path)

    cut = copy_run(micro_run, tmp_path / "cut")
    proc = subprocess.Popen(train_cmd(cut, *common), cwd=tmp_path, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    mark = cut / "checkpoints" / f"step-{n:07d}"
    poll_until(lambda: mark.is_dir() or proc.poll() is not None, 300, f"{mark.name} (or the run's end)", interval=0.01)
    kill_tree(proc)
    assert mark.is_dir()
    for later in (cut / "checkpoints").glob("step-*"):
        if later.name > mark.name:
            shutil.rmtree(later)
    out = run_ok(train_cmd(cut, *common), tmp_path)
    summary, _ = json.JSONDecoder().raw_decode(out.stdout[out.stdout.index("{"):])
    assert summary["resumed_from"] == str(mark)
    assert_same(final_state(whole, 2 * n), final_state(cut, 2 * n))


def test_sigusr1_checkpoints_exits_and_resumes_exactly(micro_run, tmp_path):
    """SIGUSR1 to the launcher (forwarded to both ranks): both stop after the same step, save,
    status.json says preempted; re-running finishes equal to an uninterrupted run."""
    common = ["train.steps=30", "train.checkpoint_every=100", "train.log_every=1"]
    whole = copy_run(micro_run, tmp_path / "whole")
    run_ok(train_cmd(whole, *common), tmp_path)

    cut = copy_run(micro_run, tmp_path / "cut")
    proc = subprocess.Popen(train_cmd(cut, *common), cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = cut / "metrics.jsonl"
    poll_until(lambda: metrics.is_file() and metrics.read_text().count("\n") >= 2, 300, "two logged steps", interval=0.01)
    proc.send_signal(signal.SIGUSR1)
    output, _ = proc.communicate(timeout=300)
    status = json.loads((cut / "status.json").read_text())
    assert status["state"] == "preempted", output[-3000:]
    stopped = status["step"]
    assert 0 < stopped < 30
    assert (cut / "checkpoints" / f"step-{stopped:07d}" / "state.json").is_file()
    run_ok(train_cmd(cut, *common), tmp_path)
    assert json.loads((cut / "status.json").read_text())["state"] == "finished"
    assert_same(final_state(whole, 30), final_state(cut, 30))


def test_zero3_with_offload_trains_and_evaluates_across_ranks(micro_run, tmp_path):
    """ZeRO-3 with optimizer and parameter offload (DeepSpeedCPUAdam, JIT-compiled once per
    machine) trains; the periodic evaluation samples on the gathered EMA, split over both ranks."""
    run = copy_run(micro_run, tmp_path / "run", ("latents", "vae", "text", "data"))
    run_ok(train_cmd(run, "train.steps=2", "train.eval_every=2", "distributed.strategy=zero3",
                     "distributed.offload_optimizer=true", "distributed.offload_params=true"), tmp_path)
    assert json.loads((run / "status.json").read_text())["state"] == "finished"
    ckpt = run / "checkpoints" / "step-0000002"
    assert (ckpt / "deepspeed").is_dir() and len(list(ckpt.glob("ema-*-of-00002.safetensors"))) == 2
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"stage": "eval"' in line]
    assert len(evals) == 1 and evals[0]["protocol"]["processes"] == 2 and evals[0]["protocol"]["weights"] == "EMA"
    assert (run / "samples" / "step-0000002.png").is_file()


def test_accelerate_launch_with_the_shipped_multi_node_config_and_deepspeed_json(micro_run, tmp_path):
    """`accelerate launch --config_file launch/accelerate/multi_node.yaml` (one machine, 2
    processes) with `distributed.deepspeed_config=launch/deepspeed/zero2.json`."""
    accelerate = Path(sys.executable).parent / "accelerate"
    run = copy_run(micro_run, tmp_path / "run")
    cmd = [str(accelerate), "launch", "--config_file", str(REPO / "launch" / "accelerate" / "multi_node.yaml"),
           "--num_machines", "1", "--num_processes", "2", "--machine_rank", "0", "--main_process_port", "0",
           "-m", "ldm_train.cli", "train", "--config", str(MICRO), f"run.dir={run}", "train.steps=3",
           "distributed.cpu=true", "distributed.strategy=zero2",
           f"distributed.deepspeed_config={REPO / 'launch' / 'deepspeed' / 'zero2.json'}"]
    run_ok(cmd, tmp_path)
    status = json.loads((run / "status.json").read_text())
    assert (status["state"], status["step"]) == ("finished", 3)
    ckpt = run / "checkpoints" / "step-0000003"
    assert {p.name for p in ckpt.glob("rank-*.safetensors")} == {"rank-00000.safetensors", "rank-00001.safetensors"}
