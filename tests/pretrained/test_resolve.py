"""``pretrained:`` and ``model.init_from`` resolution: what the pretrained folder sets, what the user
keeps, and every refusal as one message naming the file and the values, before any work."""
from __future__ import annotations

import json
import shutil

import pytest

from ldm_train.cli import main
from ldm_train.config import load_config
from ldm_train.pretrained.resolve import PretrainedError, apply_pretrained
from pretrained.tiny_sd import make_tiny_sd


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    return make_tiny_sd(tmp_path_factory.mktemp("sd") / "sd1", "sd1")


def resolve(*overrides: str):
    return apply_pretrained(load_config(None, list(overrides)))


def refused(capsys, *argv: str) -> str:
    assert main(list(argv)) == 2
    return capsys.readouterr().err


def test_unset_keys_come_from_the_pipeline_and_set_ones_stay(sd1, tmp_path):
    cfg = resolve(f"pretrained={sd1}", f"run.dir={tmp_path}", "model.dropout=0.1", "train.lr=1e-5",
                  "data.resolution=32", "text.layer=2")
    assert cfg.model.dropout == 0.1 and cfg.train.lr == 1e-5 and cfg.data.resolution == 32
    assert cfg.text.layer == 2  # kohya's clip skip on SD 1.x: the user's choice
    assert cfg.model.layers_per_block == 2 and cfg.model.attention_levels == [True, True, False]
    assert cfg.diffusion.beta_schedule == "scaled_linear" and cfg.diffusion.beta_end == 0.012
    assert resolve(f"pretrained={sd1}").data.resolution == 16  # unet sample_size 8 x the VAE's factor 2


def test_resolving_twice_changes_nothing(sd1, tmp_path):
    once = resolve(f"pretrained={sd1}", f"run.dir={tmp_path}")
    assert apply_pretrained(once).model_dump() == once.model_dump()


def test_a_contradicting_prediction_type_is_refused_unless_opted_in(sd1, tmp_path, capsys):
    err = refused(capsys, "encode", f"pretrained={sd1}", f"run.dir={tmp_path}", "diffusion.prediction_type=v_prediction")
    assert "diffusion.prediction_type: 'v_prediction' in the config, 'epsilon' in" in err
    assert str(sd1 / "scheduler" / "scheduler_config.json") in err and "change_pretrained_schedule" in err
    assert not (tmp_path / "latents").exists()  # refused before any work
    cfg = resolve(f"pretrained={sd1}", "diffusion.prediction_type=v_prediction", "diffusion.change_pretrained_schedule=true")
    assert cfg.diffusion.prediction_type == "v_prediction" and cfg.diffusion.beta_schedule == "scaled_linear"


def test_an_architecture_the_weights_contradict_is_refused(sd1, capsys):
    err = refused(capsys, "train", f"pretrained={sd1}", "model.block_out_channels=[32,64,64]")
    assert "model.block_out_channels: [32, 64, 64] in the config, [32, 32, 64] in" in err
    assert str(sd1 / "unet" / "config.json") in err


def test_not_a_pipeline_missing_parts_sdxl_and_hub_ids(sd1, tmp_path, capsys):
    assert "has no model_index.json" in refused(capsys, "encode", f"pretrained={tmp_path}")
    broken = tmp_path / "no_tokenizer"
    shutil.copytree(sd1, broken)
    shutil.rmtree(broken / "tokenizer")
    assert f"{broken} lacks tokenizer" in refused(capsys, "encode", f"pretrained={broken}")
    xl = tmp_path / "xl"
    shutil.copytree(sd1, xl)
    (xl / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    assert f"{xl} lacks text_encoder_2/config.json, tokenizer_2" in refused(capsys, "encode", f"pretrained={xl}")
    (xl / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLImg2ImgPipeline"}))
    assert "the SDXL refiner models are not supported yet" in refused(capsys, "encode", f"pretrained={xl}")
    err = refused(capsys, "encode", "pretrained=runwayml/stable-diffusion-v1-5")
    assert "not found" in err and "Nothing is downloaded" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "notes.txt").write_text("hi")
    assert "not a checkpoint" in refused(capsys, "encode", f"pretrained={tmp_path / 'notes.txt'}")


def test_a_text_encoder_of_another_width_than_the_unet_is_refused(sd1, tmp_path, capsys):
    odd = tmp_path / "odd"
    shutil.copytree(sd1, odd)
    config = json.loads((odd / "text_encoder" / "config.json").read_text())
    (odd / "text_encoder" / "config.json").write_text(json.dumps({**config, "hidden_size": 128}))
    err = refused(capsys, "encode", f"pretrained={odd}")
    assert "is 128 wide but the U-Net" in err and "cross_attention_dim 64" in err


def test_train_vae_would_write_into_the_pretrained_model_so_it_is_refused(sd1, tmp_path, capsys):
    err = refused(capsys, "train-vae", f"pretrained={sd1}", f"run.dir={tmp_path}")
    assert "set autoencoder.path to a new folder" in err
    assert (sd1 / "vae" / "config.json").is_file()


def test_init_from_a_pipeline_unet_is_checked_against_its_scheduler(sd1, capsys):
    err = refused(capsys, "train", f"model.init_from={sd1 / 'unet'}", "diffusion.prediction_type=v_prediction")
    assert "diffusion.prediction_type: 'v_prediction' in the config, 'epsilon' in" in err
    assert "diffusion.beta_schedule" not in err  # the default schedule is SD's


def test_a_sd2_single_file_needs_the_prediction_type(tmp_path, capsys):
    from ldm_train.pretrained.pipeline_folder import read_pipeline_folder
    from ldm_train.pretrained.single_file import write_single_file

    sd2 = make_tiny_sd(tmp_path / "sd2", "sd2")
    path = tmp_path / "sd2.safetensors"
    write_single_file(path, read_pipeline_folder(sd2))
    err = refused(capsys, "encode", f"pretrained={path}", f"run.dir={tmp_path / 'run'}")
    assert "SD 2.x checkpoint" in err and "diffusion.prediction_type" in err
    cfg = resolve(f"pretrained={path}", f"run.dir={tmp_path / 'run'}", "diffusion.prediction_type=v_prediction")
    folder = next((tmp_path / "run" / "pretrained").iterdir())
    assert cfg.model.init_from == str(folder / "unet") and cfg.model.use_linear_projection
    assert json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "v_prediction"
    again = resolve(f"pretrained={path}", f"run.dir={tmp_path / 'run'}", "diffusion.prediction_type=v_prediction")
    assert again.model.init_from == cfg.model.init_from  # converted once
    assert len(list((tmp_path / "run" / "pretrained").iterdir())) == 1


def test_no_pretrained_changes_nothing():
    cfg = load_config(None)
    assert apply_pretrained(cfg) is cfg
    with pytest.raises(PretrainedError):
        apply_pretrained(load_config(None, ["pretrained=/nonexistent/sd"]))
