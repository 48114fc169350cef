"""SDXL single files (``conditioner.embedders.*`` layout) and SDXL pipeline folders, both ways, with
diffusers as the judge: ``StableDiffusionXLPipeline.from_single_file`` loads the file we write from
a tiny SDXL folder into the folder's exact tensors, its file reads back through us bit-identically,
and the folder we write from the file is the one ``from_pretrained`` loads."""
from __future__ import annotations

import json

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from safetensors.torch import load_file, save_file

from ldm_train.pretrained.pipeline_folder import read_pipeline_folder, write_pipeline_folder
from ldm_train.pretrained.single_file import SingleFileError, inspect_single_file, read_single_file, write_single_file
from ldm_train.pretrained.sdxl_keys import SDXL_OPEN_CLIP
from pretrained.tiny_sd import make_tiny_sd

PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl-file")
    folder = make_tiny_sd(root / "pipe", "sdxl")
    write_single_file(root / "sdxl.safetensors", read_pipeline_folder(folder))
    return folder, root / "sdxl.safetensors"


def _same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b), set(a) ^ set(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def test_file_layout(tiny):
    _, file = tiny
    family, shapes = inspect_single_file(file)
    assert family == "sdxl"
    prefixes = {k.split(".")[0] + "." + k.split(".")[1] if k.startswith("conditioner") else k.split(".")[0] for k in shapes}
    assert {"model", "first_stage_model", "conditioner.embedders"} <= prefixes
    assert any(k.startswith("model.diffusion_model.label_emb.0.0.") for k in shapes)
    assert SDXL_OPEN_CLIP + "text_projection" in shapes


def test_diffusers_from_single_file_loads_ours(tiny):
    folder, file = tiny
    ours = StableDiffusionXLPipeline.from_single_file(str(file), config=str(folder), local_files_only=True)
    ref = StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)
    for name in PARTS:
        _same(getattr(ours, name).state_dict(), getattr(ref, name).state_dict())
    embeds, _, pooled, _ = ours.encode_prompt("a red square", device="cpu", do_classifier_free_guidance=False)
    ref_embeds, _, ref_pooled, _ = ref.encode_prompt("a red square", device="cpu", do_classifier_free_guidance=False)
    err = max((embeds - ref_embeds).abs().max().item(), (pooled - ref_pooled).abs().max().item())
    print(f"from_single_file(ours) vs from_pretrained(folder) encode_prompt: max abs {err:.2e}")
    assert err <= 1e-6  # equal weights; diffusers keeps its transposed projection a strided view (another matmul path)


def test_file_to_folder_to_file_is_bit_identical(tiny, tmp_path):
    folder, file = tiny
    ckpt = read_single_file(file)
    assert ckpt.family == "sdxl" and ckpt.unet_config["addition_time_embed_dim"] == 8
    out = write_pipeline_folder(ckpt, tmp_path / "pipe")
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    loaded = StableDiffusionXLPipeline.from_pretrained(out, local_files_only=True)
    ref = StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)
    for name in PARTS:
        _same(getattr(loaded, name).state_dict(), getattr(ref, name).state_dict())
    assert loaded.vae.config.scaling_factor == 0.13025
    write_single_file(tmp_path / "again.safetensors", read_pipeline_folder(out))
    _same(load_file(str(tmp_path / "again.safetensors")), load_file(str(file)))


def test_a_refiner_like_file_is_refused_by_name(tiny, tmp_path):
    _, file = tiny
    state = {k: v for k, v in load_file(str(file)).items() if not k.startswith("conditioner.embedders.0.")}
    save_file(state, str(tmp_path / "refiner.safetensors"))
    with pytest.raises(SingleFileError, match="refiner"):
        inspect_single_file(tmp_path / "refiner.safetensors")


def test_pretrained_single_file_converts_once_into_an_sdxl_folder(tiny, tmp_path):
    from ldm_train.config import load_config
    from ldm_train.pretrained.resolve import apply_pretrained

    _, file = tiny
    cfg = apply_pretrained(load_config("sdxl-finetune", [f"pretrained={file}", f"run.dir={tmp_path / 'run'}"]))
    folder = tmp_path / "run" / "pretrained"
    (converted,) = list(folder.iterdir())
    assert (cfg.text.encoder, cfg.text.sdxl.path, cfg.text.layer) == ("sdxl", str(converted), "penultimate")
    assert cfg.model.addition_embed_type == "text_time" and cfg.model.init_from == str(converted / "unet")
    assert json.loads((converted / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
