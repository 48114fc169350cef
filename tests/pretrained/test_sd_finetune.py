"""``pretrained: DIR`` end to end on tiny SD-shaped pipelines, with diffusers as the judge:
encode -> train -> export with the sd15-finetune preset, then ``StableDiffusionPipeline.from_pretrained``
on the export gives our sampler's images; one training loss equals train_text_to_image.py's."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from conftest import synthetic_samples
from ldm_train.cli import main
from ldm_train.config import load_config
from ldm_train.data.shards import write_shards
from ldm_train.diffusion import build_objective, build_schedule
from ldm_train.eval.pipeline import load_pipeline
from ldm_train.eval.sample import generate
from ldm_train.model import build_unet
from ldm_train.model.load import load_unet_weights
from ldm_train.pretrained.resolve import apply_pretrained
from ldm_train.text import load_text
from pretrained.tiny_sd import make_tiny_sd

CPU = torch.device("cpu")
CAPTIONS = ["red circle 1", "a blue square", "green triangle"]


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    return make_tiny_sd(tmp_path_factory.mktemp("sd") / "sd1", "sd1")


@pytest.fixture(scope="module")
def sd2(tmp_path_factory):
    return make_tiny_sd(tmp_path_factory.mktemp("sd") / "sd2", "sd2")


def overrides(pretrained, run, *extra: str) -> list[str]:
    return [f"pretrained={pretrained}", f"run.dir={run}", "data.resolution=16", "train.steps=2",
            "train.batch_size=4", "train.checkpoint_every=1", "train.eval_every=0", "train.lr=1e-3",
            "train.lr_schedule.warmup_steps=0", "distributed.mixed_precision=no", "distributed.cpu=true",
            "latents.batch_size=8", "model.gradient_checkpointing=false", "train.tensorboard=false", *extra]


def write_data(cfg, n_train: int = 8, n_val: int = 4) -> None:
    write_shards(synthetic_samples(n_train, seed=1, prefix="t"), cfg.path(cfg.data.train_shards), "train", 16)
    write_shards(synthetic_samples(n_val, seed=2, prefix="v"), cfg.path(cfg.data.val_shards), "val", 16)


def finetune(preset: str, pretrained, run, *extra: str) -> list[str]:
    """encode + train with ``preset`` on ``pretrained``; returns the CLI arguments used."""
    args = ["--config", preset, *overrides(pretrained, run, *extra)]
    write_data(load_config(preset, overrides(pretrained, run, *extra)))
    assert main(["encode", *args]) == 0
    assert main(["train", *args]) == 0
    return args


@pytest.fixture(scope="module")
def sd15_run(tmp_path_factory, sd1):
    run = tmp_path_factory.mktemp("sd15") / "run"
    args = finetune("sd15-finetune", sd1, run)
    assert main(["export", *args, "--out", str(run / "export")]) == 0
    return run


def test_the_preset_takes_everything_from_the_pipeline(sd15_run, sd1):
    cfg = load_config(sd15_run / "config.yaml")
    unet = json.loads((sd1 / "unet" / "config.json").read_text())
    assert cfg.model.block_out_channels == unet["block_out_channels"]
    assert cfg.model.cross_attention_dim == unet["cross_attention_dim"] == 64
    assert cfg.model.init_from == str(sd1 / "unet")
    assert cfg.text.encoder == "transformers" and cfg.text.transformers.path == str(sd1)
    assert cfg.autoencoder.path == str(sd1)
    assert (cfg.diffusion.prediction_type, cfg.diffusion.beta_schedule) == ("epsilon", "scaled_linear")
    assert cfg.train.lr == 1e-3  # the explicit override wins over the preset's 1e-5
    manifest = json.loads((sd15_run / "latents" / "train" / "manifest.json").read_text())
    assert manifest["latent_shape"] == [4, 8, 8] and manifest["context_shape"] == [77, 64]


def test_export_is_a_diffusers_pipeline_that_samples_as_we_do(sd15_run):
    export = sd15_run / "export"
    index = json.loads((export / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    theirs = StableDiffusionPipeline.from_pretrained(export, local_files_only=True, safety_checker=None)
    assert type(theirs.scheduler).__name__ == "DDIMScheduler"
    cfg = load_config("sd15-finetune", ["eval.steps=4", "eval.guidance_scale=3.0", "eval.seed=5",
                                         "eval.samples_per_prompt=1"])
    for source in (sd15_run, export):  # the run folder and the export sample alike
        pipe = load_pipeline(source, CPU)
        ours, _ = generate(pipe, CAPTIONS[:2], cfg.eval, CPU)
        noise = torch.randn((2, *pipe.latent_shape), generator=torch.Generator().manual_seed(5))
        out = theirs(CAPTIONS[:2], latents=noise, num_inference_steps=4, guidance_scale=3.0,
                     output_type="pt").images
        torch.testing.assert_close(out, (ours + 1) / 2, atol=1e-4, rtol=0)


def test_export_weights_are_the_trained_ema_not_the_pretrained(sd15_run, sd1):
    from safetensors.torch import load_file

    before = load_file(str(sd1 / "unet" / "diffusion_pytorch_model.safetensors"))
    after = load_file(str(sd15_run / "export" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_one_step_loss_equals_train_text_to_image(family, sd1, sd2, tmp_path):
    """Our objective on the resolved config = diffusers' train_text_to_image.py's loss (add_noise,
    epsilon or get_velocity target, MSE in fp32) on the same latents, noise and timesteps."""
    folder = {"sd1": sd1, "sd2": sd2}[family]
    cfg = apply_pretrained(load_config(None, [f"pretrained={folder}", f"run.dir={tmp_path}", "diffusion.cond_drop_prob=0"]))
    unet = build_unet(cfg.model)
    load_unet_weights(unet, cfg.model.init_from)
    text = load_text(cfg.text, cfg.path(cfg.text.dir))
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 8, 8, generator=gen)
    context, null = text(CAPTIONS), text([""])[0]
    loss, _ = build_objective(cfg.diffusion)(unet, x0, context, null, build_schedule(cfg.diffusion),
                                              torch.Generator().manual_seed(1))
    draws = torch.Generator().manual_seed(1)  # diffusion_loss draws t, then ε, from its generator
    timesteps = torch.randint(0, 1000, (3,), generator=draws)
    noise = torch.randn(x0.shape, generator=draws)

    scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    their_unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval()
    tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder").eval()
    ids = tokenizer(CAPTIONS, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = encoder(ids, return_dict=False)[0]
        noisy = scheduler.add_noise(x0, noise, timesteps)
        target = noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(x0, noise, timesteps)
        pred = their_unet(noisy, timesteps, hidden, return_dict=False)[0]
        expected = F.mse_loss(pred.float(), target.float(), reduction="mean")
    assert cfg.diffusion.prediction_type == scheduler.config.prediction_type
    assert abs(loss.item() - expected.item()) < 1e-6, (loss.item(), expected.item())


def test_sd21_preset_on_a_tiny_sd2(sd2, tmp_path):
    run = tmp_path / "run"
    finetune("sd21-finetune", sd2, run, "train.steps=1")
    cfg = load_config(run / "config.yaml")
    assert cfg.diffusion.prediction_type == "v_prediction" and cfg.model.use_linear_projection
    assert cfg.text.layer == "last"  # diffusers' SD 2 text_encoder/ ends at the penultimate layer already
    assert (run / "checkpoints" / "step-0000001").is_dir()


def test_step_picks_a_checkpoint_for_sample_and_export(sd15_run, tmp_path, capsys):
    from safetensors.torch import load_file

    from ldm_train.pretrained.single_file import read_single_file

    cfg = load_config("sd15-finetune", ["eval.steps=2", "eval.samples_per_prompt=1"])
    first, last = load_pipeline(sd15_run, CPU, step=1), load_pipeline(sd15_run, CPU)
    named = load_pipeline(sd15_run / "checkpoints" / "step-0000001", CPU)
    assert "step-0000001" in first.source and "step-0000002" in last.source
    one, _ = generate(first, CAPTIONS[:1], cfg.eval, CPU)
    assert torch.equal(one, generate(named, CAPTIONS[:1], cfg.eval, CPU)[0])
    assert not torch.equal(one, generate(last, CAPTIONS[:1], cfg.eval, CPU)[0])
    assert main(["sample", "--checkpoint", str(sd15_run), "--step", "7", "--prompt", "x",
                 "--out", str(tmp_path / "x.png")]) == 2
    assert "no complete checkpoint of step 7" in capsys.readouterr().err and not (tmp_path / "x.png").exists()

    out, single = tmp_path / "export1", tmp_path / "sd15-step1.safetensors"
    assert main(["export", "--config", "sd15-finetune", "--checkpoint", str(sd15_run), "--step", "1",
                 "--out", str(out), "--single-file", str(single), "export.dtype=fp16"]) == 0
    unet = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(v.dtype == torch.float16 for v in unet.values())
    back = read_single_file(single)
    assert back.family == "sd1" and back.unet.keys() == unet.keys()
    assert all(torch.equal(back.unet[k], v) for k, v in unet.items())
    assert main(["export", "--config", "sd15-finetune", "--checkpoint", str(sd15_run), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
