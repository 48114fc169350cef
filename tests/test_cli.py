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

COMMANDS = {"data", "train-vae", "train-clip", "encode", "train", "sample", "eval", "export", "demo", "slurm", "convert", "config"}


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
        # a row per prompt: its label, then samples_per_prompt columns of 96 px (no real image given)
        assert im.format == "PNG" and im.size == (180 + 2 * 96, 16 + 2 * 96)
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

    cfg = ModelConfig(block_out_channels=[16, 32], attention_levels=[False, True], channels_per_head=8,
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


# --- conventions: --version, python -m, flags reported under their subcommand, presets by name ----


def test_version(capsys):
    from ldm_train import __version__

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"ldm-train {__version__}"


def test_python_dash_m_runs_the_command(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "ldm_train", "--version"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("ldm-train "), proc.stderr


def test_sampler_choices_are_the_registry(capsys):
    from ldm_train.cli import RegistryChoices
    from ldm_train.diffusion.samplers import SAMPLERS

    assert list(RegistryChoices()) == list(SAMPLERS)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "--checkpoint", "x", "--sampler", "eular"])
    assert "invalid choice: 'eular'" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["sample", "--checkpoint", "x", "--prompt", "p", "--out", "o.png", "--bogus"],
                                  ["data", "folder", "--src", "x", "--bogus"], ["train", "--bogus"]])
def test_unknown_flag_is_reported_under_its_subcommand(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    prog = " ".join(argv[:2] if argv[0] == "data" else argv[:1])
    err = capsys.readouterr().err
    assert f"ldm-train {prog}: error: unrecognized arguments: --bogus" in err
    assert f"usage: ldm-train {prog}" in err


@pytest.mark.parametrize("argv", HELP_ARGS, ids=[" ".join(a) for a in HELP_ARGS])
def test_help_names_no_moved_config_path(argv, capsys):
    with pytest.raises(SystemExit):
        main(argv)
    assert "configs/demo.yaml" not in capsys.readouterr().out


def test_config_accepts_a_preset_name(capsys):
    from ldm_train.config import config_yaml, load_config, preset_path

    assert preset_path("micro").samefile(MICRO)
    assert main(["config", "show", "--config", "micro"]) == 0
    assert capsys.readouterr().out == config_yaml(load_config(MICRO))
    assert main(["train", "--config", "no-such-preset"]) == 2
    err = capsys.readouterr().err
    assert "no-such-preset" in err and "micro" in err and "Traceback" not in err


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["train", "train.lr=fast"], ["export"]],
                         ids=["help", "train help", "config error", "export without checkpoint"])
def test_quick_commands_do_not_import_torch(argv, tmp_path):
    """What keeps these fast (launch/bench_cli.py times them): no torch, diffusers or accelerate."""
    code = ("import sys\nfrom ldm_train.cli import main\ntry:\n    rc = main(sys.argv[1:])\nexcept SystemExit as e:\n"
            "    rc = e.code\nheavy = sorted({'torch', 'diffusers', 'accelerate'} & set(sys.modules))\n"
            "print('HEAVY', heavy, 'RC', rc)")
    proc = subprocess.run([sys.executable, "-c", code, *argv, f"run.dir={tmp_path / 'run'}"] if "--help" not in argv
                          else [sys.executable, "-c", code, *argv], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert "HEAVY [] RC" in proc.stdout, proc.stdout + proc.stderr
    assert proc.stdout.strip().endswith("RC 0" if "--help" in argv else "RC 2")
    if argv == ["export"]:
        assert "no checkpoint under" in proc.stderr


# --- sample: the eval flags, a negative prompt and the image size ---------------------------------


def _sample_grid(micro_run, out, *flags):
    import numpy as np

    argv = ["sample", "--checkpoint", str(micro_run.export), "--prompt", "red circle 0", "--out", str(out),
            "--config", str(MICRO), "distributed.cpu=true", *flags]
    assert main(argv) == 0
    with Image.open(out) as im:
        return np.asarray(im.convert("RGB"))


@pytest.fixture(scope="module")
def baseline_grid(micro_run, tmp_path_factory):
    return _sample_grid(micro_run, tmp_path_factory.mktemp("sample") / "base.png")


SAMPLE_FLAGS = {
    "steps": ["--steps", "5"], "guidance": ["--guidance", "7.5"], "sampler": ["--sampler", "euler"],
    "seed": ["--seed", "7"], "negative-prompt": ["--negative-prompt", "blue square 2"],
    "height": ["--height", "24"], "width": ["--width", "40"],
}


@pytest.mark.parametrize("flag", list(SAMPLE_FLAGS))
def test_sample_flag_changes_the_output(micro_run, baseline_grid, tmp_path, flag):
    grid = _sample_grid(micro_run, tmp_path / "grid.png", *SAMPLE_FLAGS[flag])
    assert grid.shape != baseline_grid.shape or (grid != baseline_grid).any()


def test_sample_size_sets_the_image_size(micro_run, tmp_path, capsys):
    _sample_grid(micro_run, tmp_path / "grid.png", "--height", "24", "--width", "40")
    out = json.loads(capsys.readouterr().out)
    assert out["images"] == micro_run.cfg.eval.samples_per_prompt


def test_sample_flags_are_eval_overrides():
    from ldm_train.cli import eval_overrides, parse

    args = parse(["sample", "--checkpoint", "x", "--prompt", "p", "--out", "o.png", "--steps", "5",
                  "--guidance", "2", "--sampler", "heun", "--seed", "3"])
    assert eval_overrides(args) == ["eval.sampler=heun", "eval.steps=5", "eval.guidance_scale=2.0", "eval.seed=3"]
    args = parse(["eval", "--checkpoint", "x", "--seed", "4", "--steps", "2"])
    assert eval_overrides(args) == ["eval.steps=2", "eval.seed=4"]


@pytest.mark.parametrize("flag, value", [("--height", "33"), ("--width", "31")])
def test_sample_size_not_a_multiple_of_the_vae_factor_is_refused(micro_run, tmp_path, capsys, flag, value):
    rc = main(["sample", "--checkpoint", str(micro_run.export), "--prompt", "p", "--out", str(tmp_path / "g.png"),
               "--config", str(MICRO), "distributed.cpu=true", flag, value])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("ldm-train sample: error:") and f"{flag} {value}" in err and "multiple of 2" in err
    assert not (tmp_path / "g.png").exists()


@pytest.mark.parametrize("argv", [["--height", "0"], ["--width", "-8"], ["--sampler", "nope"]])
def test_sample_bad_flag_values_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(["sample", "--checkpoint", "x", "--prompt", "p", "--out", "o.png", *argv])
    assert info.value.code == 2
    assert "ldm-train sample: error: argument " + argv[0] in capsys.readouterr().err
