"""``ldm-train encode`` as real processes: killed with SIGKILL mid-run and rerun, and launched as
2 ranks with torchrun; both give bit-identical latent shards to one uninterrupted process."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from conftest import MICRO, synthetic_samples
from waiting import poll_until

from ldm_train import stages
from ldm_train.autoencoder.vae import build_vae
from ldm_train.config import load_config
from ldm_train.data.shards import write_shards
from ldm_train.text.encoder import prepare_text_encoder

pytestmark = pytest.mark.slow
N_SHARDS, PER_SHARD = 24, 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Input shards, a saved VAE and text tower shared by every run, and the reference run."""
    root = tmp_path_factory.mktemp("scale")
    write_shards(synthetic_samples(N_SHARDS * PER_SHARD, size=24, seed=3), root / "data" / "train", "tr", PER_SHARD)
    write_shards(synthetic_samples(6, size=24, seed=4, prefix="v"), root / "data" / "val", "va", 4)
    overrides = [
        "distributed.cpu=true", "data.resolution=16", "latents.batch_size=3", "latents.shard_size=2",
        f"data.train_shards={root / 'data' / 'train'}", f"data.val_shards={root / 'data' / 'val'}",
        f"autoencoder.path={root / 'vae'}", f"text.dir={root / 'text'}",
    ]
    cfg = load_config(MICRO, [f"run.dir={root / 'reference'}", *overrides])
    torch.manual_seed(0)
    build_vae(cfg.autoencoder).save_pretrained(root / "vae")
    prepare_text_encoder(cfg.text, root / "text")
    stages.encode_stage(cfg, False)
    return root, overrides


def command(root, overrides, run_dir):
    return ["encode", "--config", str(MICRO), f"run.dir={run_dir}", *overrides]


def env():
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")


def outputs(run_dir):
    """Every latent shard's bytes and the manifests without timings, per split."""
    result = {}
    for split in ("train", "val"):
        folder = run_dir / "latents" / split
        manifest = json.loads((folder / "manifest.json").read_text())
        manifest.pop("seconds")
        result[split] = ({p.name: p.read_bytes() for p in sorted(folder.glob("*.tar"))}, manifest,
                         (folder / "null_context.safetensors").read_bytes())
    return result


def test_kill_and_resume_gives_the_uninterrupted_result(setup, tmp_path):
    """The kill lands at a point fixed by the data, not by timing: input shard 1 is swapped for a
    FIFO that no one writes, so the encoder finishes shard 0 and then blocks opening shard 1."""
    root, overrides = setup
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "ldm_train.cli", *command(root, overrides, run_dir)]
    done = run_dir / "latents" / "train" / "encode_progress" / "done"
    shard1 = sorted((root / "data" / "train").glob("*.tar"))[1]
    shard1.rename(shard1.with_name("held.bin"))
    os.mkfifo(shard1)
    try:
        with open(tmp_path / "stderr.txt", "w") as err:
            proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=err, cwd=tmp_path)

            def shard0_done() -> bool:
                assert proc.poll() is None, (tmp_path / "stderr.txt").read_text()[-3000:]
                return (done / "000000.json").is_file()

            poll_until(shard0_done, 300, "encode to finish input shard 0")
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    finally:
        shard1.unlink()
        shard1.with_name("held.bin").rename(shard1)
    assert proc.returncode == -signal.SIGKILL
    assert sorted(p.name for p in done.glob("*.json")) == ["000000.json"]  # killed mid-run
    assert not (run_dir / "latents" / "train" / "manifest.json").exists()
    rerun = subprocess.run(cmd, env=env(), capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert outputs(run_dir) == outputs(root / "reference")


@pytest.mark.multiprocess
def test_two_processes_give_the_one_process_result(setup, tmp_path):
    root, overrides = setup
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "ldm_train.cli", *command(root, overrides, run_dir)]
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[rank 1/2]" in proc.stderr  # both ranks encoded
    assert outputs(run_dir) == outputs(root / "reference")
