"""``ldm-train convert`` on whole SD checkpoints: a single file <-> a diffusers pipeline folder."""
from __future__ import annotations

import json

import torch
from diffusers import StableDiffusionPipeline

from ldm_train.cli import main
from ldm_train.pretrained.single_file import read_single_file
from pretrained.tiny_sd import make_tiny_sd


def test_single_file_to_folder_and_back(tmp_path, capsys):
    sd1 = make_tiny_sd(tmp_path / "sd1", "sd1")
    single, folder, again = tmp_path / "sd1.safetensors", tmp_path / "folder", tmp_path / "again.safetensors"
    assert main(["convert", str(sd1), str(single), "--to", "single-file"]) == 0
    assert main(["convert", str(single), str(folder), "--to", "diffusers"]) == 0
    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None)
    theirs = StableDiffusionPipeline.from_pretrained(sd1, local_files_only=True, safety_checker=None)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ctx = torch.randn(1, 77, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(x, 10, ctx).sample, theirs.unet(x, 10, ctx).sample, atol=1e-6, rtol=0)
    assert pipe.scheduler.config.prediction_type == "epsilon"
    assert main(["convert", str(folder), str(again), "--to", "single-file"]) == 0
    a, b = read_single_file(single), read_single_file(again)
    for part in ("unet", "vae", "text", "extras"):
        x, y = getattr(a, part), getattr(b, part)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), part


def test_refusals(tmp_path, capsys):
    sd2 = make_tiny_sd(tmp_path / "sd2", "sd2")
    single = tmp_path / "sd2.safetensors"
    assert main(["convert", str(sd2), str(single), "--to", "single-file"]) == 0
    assert main(["convert", str(single), str(tmp_path / "out"), "--to", "diffusers"]) == 2
    assert "--prediction-type" in capsys.readouterr().err and not (tmp_path / "out").exists()
    assert main(["convert", str(single), str(tmp_path / "out"), "--to", "diffusers", "--prediction-type", "v_prediction"]) == 0
    assert main(["convert", str(single), str(tmp_path / "out"), "--to", "diffusers"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["convert", str(single), str(tmp_path / "u"), "--to", "project"]) == 2
    assert "use --to diffusers" in capsys.readouterr().err
