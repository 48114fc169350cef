"""The ``ldm-train`` command: help, exit codes, and clean one-message errors for user mistakes."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest
from conftest import EMOJI_FONT, MICRO
from PIL import Image

from ldm_train.cli import build_parser, main

COMMANDS = {"data", "train-vae", "encode", "train", "sample", "eval", "export", "demo", "slurm", "convert"}


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def run_cli(*args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, "-m", "ldm_train.cli", *map(str, args)],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=120,
    )


def test_subcommands_are_the_documented_ones():
    assert set(subcommands(build_parser())) == COMMANDS
    assert set(subcommands(subcommands(build_parser())["data"])) == {"emoji", "folder", "hf"}


HELP_ARGS = [["--help"], ["data", "emoji", "--help"], ["data", "folder", "--help"], ["data", "hf", "--help"]]
HELP_ARGS += [[c, "--help"] for c in sorted(COMMANDS)]


@pytest.mark.parametrize("argv", HELP_ARGS, ids=[" ".join(a) for a in HELP_ARGS])
def test_help_exits_zero(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: ldm-train")


def test_top_level_help_lists_commands_and_examples(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in COMMANDS - {"slurm"}:
        assert command in out
    assert "examples:" in out


def test_help_via_subprocess(tmp_path):
    proc = run_cli("--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "usage: ldm-train" in proc.stdout and "train-vae" in proc.stdout


def test_no_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_bad_config_key_exits_2_with_one_clean_message(tmp_path):
    proc = run_cli("train", "--config", MICRO, f"run.dir={tmp_path / 'run'}", "train.stepz=1", cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith("ldm-train train: error:")
    # one error message: the header line plus one line naming the key
    assert len(lines) <= 2, proc.stderr
    assert "train.stepz" in proc.stderr and "command-line override" in proc.stderr
    assert proc.stdout == ""
    assert not (tmp_path / "run").exists()  # validated before any work


def test_bad_config_file_key_in_process(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("model:\n  widht: 3\n")
    assert main(["encode", "--config", str(cfg), f"run.dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert "model.widht" in err and str(cfg) in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_missing_config_file(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err


def test_slurm_without_action_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["slurm"])
    assert info.value.code == 2
    assert "submit" in capsys.readouterr().err


@pytest.mark.skipif(not EMOJI_FONT.is_file(), reason=f"emoji font not installed at {EMOJI_FONT}")
def test_data_emoji_into_non_empty_folder_needs_overwrite(tmp_path, capsys):
    out = tmp_path / "data"
    (out / "train").mkdir(parents=True)
    (out / "train" / "old-000000.tar").write_bytes(b"old shard")
    argv = ["data", "emoji", "--out", str(out), "--config", str(MICRO), f"run.dir={tmp_path / 'run'}", "data.emoji.limit=6"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and "error:" in err and "Traceback" not in err
    assert (out / "train" / "old-000000.tar").read_bytes() == b"old shard"

    assert main([*argv, "--overwrite"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rendered"] == 6 and report["train"] + report["val"] == 6
    assert not (out / "train" / "old-000000.tar").exists()
    assert sorted(p.name for p in (out / "train").glob("*.tar")) == ["train-000000.tar"]


def test_sample_missing_checkpoint_exits_2(tmp_path, capsys):
    missing = tmp_path / "no-such-run"
    grid = tmp_path / "grid.png"
    rc = main(["sample", "--checkpoint", str(missing), "--prompt", "red heart", "--out", str(grid),
               "--config", str(MICRO), "distributed.cpu=true"])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("ldm-train sample: error:") and str(missing) in err and "Traceback" not in err
    assert not grid.exists()


def test_sample_requires_prompt_and_out(capsys):
    with pytest.raises(SystemExit) as info:
        main(["sample", "--checkpoint", "x"])
    assert info.value.code == 2


def test_sample_from_export_writes_grid(micro_run, tmp_path, capsys):
    grid = tmp_path / "grid.png"
    argv = ["sample", "--checkpoint", str(micro_run.export), "--prompt", "red circle 0", "--prompt", "blue square 2",
            "--out", str(grid), "--config", str(MICRO), "distributed.cpu=true"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == 2 * micro_run.cfg.eval.samples_per_prompt
    assert result["source"].startswith("export")
    with Image.open(grid) as im:
        im.verify()
    with Image.open(grid) as im:
        assert im.format == "PNG" and im.width == 2 * 128  # samples_per_prompt columns of 128 px
    # the same output again needs --overwrite
    assert main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0


def test_eval_on_run_folder(micro_run, tmp_path, capsys):
    out = tmp_path / "eval"
    argv = ["eval", "--checkpoint", str(micro_run.run), "--out", str(out), "--num-samples", "3",
            "--steps", "2", "--sampler", "heun", "--shards",
            "--config", str(MICRO), f"run.dir={micro_run.run}", "distributed.cpu=true"]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    report = json.loads((out / "report.json").read_text())
    assert printed == report
    assert report["val_samples"] == micro_run.n_val
    assert {"val_loss", "t50", "t950"} <= set(report)
    assert (out / "val_samples.png").is_file()
    assert report["num_samples"] == 3 and report["eval"]["sampler"] == "heun" and report["eval"]["steps"] == 2
    # offline, without local weights: reported plainly, naming the key, and the rest still runs
    assert report["fid"] is None and "eval.metrics.inception_weights" in report["fid_error"]
    assert report["clip_score"] is None and "eval.metrics.clip_weights" in report["clip_error"]
    assert sorted(p.name for p in (out / "images").glob("*.png")) == [f"sample_{i:06d}.png" for i in range(3)]
    from ldm_train.data.shards import SkipReport, iter_samples

    rescored = list(iter_samples(str(out / "shards"), 32, SkipReport()))
    assert [s["caption"] for s in rescored] == list(json.loads((out / "images" / "index.json").read_text()).values())
    assert main(argv) == 2  # report folder exists now
    assert "--overwrite" in capsys.readouterr().err


def test_convert_round_trip_through_the_cli(tmp_path):
    """A diffusers U-Net folder -> project format -> diffusers: bit-identical tensors, same config;
    an existing output is refused without --overwrite."""
    import diffusers
    import torch
    from safetensors.torch import load_file

    from ldm_train.config import ModelConfig
    from ldm_train.model.convert import diffusers_config_from_model

    cfg = ModelConfig(block_out_channels=[16, 32], attention_levels=[False, True], attention_head_dim=8,
                      cross_attention_dim=16, norm_num_groups=8)
    torch.manual_seed(0)
    theirs = diffusers.UNet2DConditionModel.from_config(diffusers_config_from_model(cfg, sample_size=8))
    theirs.save_pretrained(tmp_path / "hf")
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "proj"), "--to", "project"]) == 0
    assert main(["convert", str(tmp_path / "proj"), str(tmp_path / "back"), "--to", "diffusers"]) == 0
    a = load_file(str(tmp_path / "hf" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(tmp_path / "back" / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert list(diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "back").config.block_out_channels) == [16, 32]
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "proj"), "--to", "project"]) == 2
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "proj"), "--to", "project", "--overwrite"]) == 0
