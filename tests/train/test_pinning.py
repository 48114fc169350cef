"""What a run folder pins: each stage compares only the config keys that shaped its own inputs
and outputs (``ldm_train.utils.runs.STAGE_PINS``), and ``train`` checks the latent cache it reads
against the config. A first ``train`` after ``encode`` may set any training key."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from ldm_train.cli import main
from ldm_train.config import load_config
from ldm_train.utils.runs import LatentCacheMismatchError, OutputExistsError, record_config

from conftest import MICRO, copy_run


def cli(stage, run, *args) -> int:
    return main([stage, "--config", str(MICRO), f"run.dir={run}", "distributed.cpu=true", *args])


def recorded(path):
    return yaml.safe_load(path.read_text())


def test_encode_then_train_with_other_settings_then_resume(micro_run, tmp_path, capsys):
    run = copy_run(micro_run, tmp_path / "run", ("data", "vae", "text"))
    assert cli("encode", run) == 0
    assert recorded(run / "stages" / "encode.yaml")["train"]["lr"] != 3e-4
    # the first train after encode: any training key (and the loader) may differ from encode's config
    fresh = ("train.lr=3e-4", "train.steps=2", "train.checkpoint_every=2", "latents.loader.num_workers=0")
    assert cli("train", run, *fresh) == 0
    assert recorded(run / "config.yaml")["train"]["lr"] == 3e-4  # the last stage's resolved config
    assert recorded(run / "stages" / "train.yaml")["train"]["lr"] == 3e-4
    capsys.readouterr()
    # checkpoints exist: changing train keys is a resume, RESUMABLE keys only
    assert cli("train", run, "train.lr=3e-4", "train.steps=4", "train.checkpoint_every=2") == 0
    assert cli("train", run, "train.lr=1e-3", "train.steps=6", "train.checkpoint_every=2") == 2
    assert "train.lr" in capsys.readouterr().err
    assert cli("train", run, "train.lr=3e-4", "train.steps=6", "model.channels_per_head=16") == 2
    err = capsys.readouterr().err
    assert "model.channels_per_head" in err and "stages/train.yaml" in err
    # eval/export keys pin nothing: a resume with another sampler setting is the same run
    assert cli("train", run, "train.lr=3e-4", "train.steps=6", "train.checkpoint_every=2", "eval.steps=5") == 0


def test_train_refuses_a_latent_cache_encoded_with_other_settings(micro_run, tmp_path, capsys):
    # a cache of this run, with the encode record: any data/autoencoder/text/latents key is named
    run = copy_run(micro_run, tmp_path / "run", ("data", "vae", "text"))
    assert cli("encode", run) == 0
    capsys.readouterr()
    for flags in ((), ("--overwrite",)):  # --overwrite replaces checkpoints, not the cache
        assert cli("train", run, "train.steps=2", "text.context_length=8", "autoencoder.train.lr=0.5", *flags) == 2
        err = capsys.readouterr().err
        assert "text.context_length" in err and "autoencoder.train" in err and "encode --overwrite" in err
    # a cache copied in without a record: its manifest and fingerprint say what it holds
    copied = copy_run(micro_run, tmp_path / "copied")
    with pytest.raises(LatentCacheMismatchError, match=r"data.resolution.*latents.store.*data.crop"):
        record_config(load_config(MICRO, [f"run.dir={copied}", "data.resolution=16", "latents.store=sample",
                                          "data.crop=random"]), True, write=False, stage="train")
    record_config(load_config(MICRO, [f"run.dir={copied}", "train.lr=0.5"]), False, write=False, stage="train")


def test_each_stage_compares_only_its_own_keys(tmp_path):
    def cfg(*o):
        return load_config(MICRO, [f"run.dir={tmp_path}", *o])

    record_config(cfg(), False, stage="encode")
    record_config(cfg("train.lr=0.5", "model.channels_per_head=16", "latents.loader.num_workers=0"), False, write=False, stage="encode")
    with pytest.raises(OutputExistsError, match="text.width"):
        record_config(cfg("text.width=64"), False, write=False, stage="encode")
    record_config(cfg("run.seed=3"), False, write=False, stage="encode")  # posterior store: no draw to seed
    record_config(cfg(), False, stage="encode")  # (re-record the default store)
    with pytest.raises(OutputExistsError, match="latents.store"):
        record_config(cfg("latents.store=sample"), False, write=False, stage="encode")
    record_config(cfg(), False, stage="train-vae")
    record_config(cfg("text.width=64", "train.lr=0.5"), False, write=False, stage="train-vae")
    with pytest.raises(OutputExistsError, match="autoencoder.block_out_channels"):
        record_config(cfg("autoencoder.block_out_channels=[8,8]"), False, write=False, stage="train-vae")


def test_a_run_folder_of_an_older_version_is_read_whole(tmp_path):
    """No ``stages/``: the old config.yaml, which every stage was compared with, is each stage's
    record (moved keys and keys it lacks compare equal, see tests/test_stages.py)."""
    def cfg(*o):
        return load_config(MICRO, [f"run.dir={tmp_path}", *o])

    record_config(cfg(), False)  # as an older version wrote it: config.yaml only
    record_config(cfg("eval.steps=5", "train.steps=9"), False, RESUMABLE_STEPS, write=False, stage="train")
    with pytest.raises(OutputExistsError, match="train.lr"):
        record_config(cfg("train.lr=0.5"), False, RESUMABLE_STEPS, write=False, stage="train")
    with pytest.raises(LatentCacheMismatchError, match="text.width"):
        record_config(cfg("text.width=64"), True, write=False, stage="train")


RESUMABLE_STEPS = ("train.steps",)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_ranks_encode_then_train_with_other_settings(micro_run, tmp_path):
    run = copy_run(micro_run, tmp_path / "run", ("data", "vae", "text"))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")

    def torchrun(stage, *overrides):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "ldm_train.cli", stage, "--config", str(MICRO), f"run.dir={run}", "distributed.cpu=true", *overrides]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)

    proc = torchrun("encode")
    assert proc.returncode == 0, proc.stderr[-4000:]
    proc = torchrun("train", "train.lr=3e-4", "train.steps=2", "train.checkpoint_every=2", "latents.loader.num_workers=0")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert recorded(run / "stages" / "train.yaml")["train"]["lr"] == 3e-4
    proc = torchrun("train", "train.lr=3e-4", "train.steps=4", "model.channels_per_head=16")
    assert proc.returncode != 0 and "model.channels_per_head" in proc.stderr


def test_config_yaml_keeps_the_trained_model_when_an_earlier_stage_reruns(tmp_path):
    """``sample``/``eval`` build the U-Net from ``{run}/config.yaml``: an encode rerun after
    training (another model key in its config) leaves the checkpoints' model and objective there."""
    from ldm_train.config import load_config as load

    record_config(load(MICRO, [f"run.dir={tmp_path}", "model.layers_per_block=2"]), False, stage="train")
    record_config(load(MICRO, [f"run.dir={tmp_path}", "text.width=64"]), True, stage="encode")
    written = load(tmp_path / "config.yaml")
    assert written.model.layers_per_block == 2 and written.text.width == 64
    assert load(tmp_path / "stages" / "encode.yaml").model.layers_per_block != 2
