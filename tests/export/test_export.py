"""The export folder: diffusers can read its scheduler and VAE, the U-Net holds the EMA weights."""
from __future__ import annotations

import json

import diffusers
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ldm_train import stages
from ldm_train.autoencoder.vae import decode_latents, load_vae
from ldm_train.config import DiffusionConfig
from ldm_train.eval.pipeline import PipelineError
from ldm_train.model.convert import model_config_from_diffusers
from ldm_train.diffusion import build_schedule
from ldm_train.eval.pipeline import diffusion_config_from_scheduler, load_pipeline
from ldm_train.eval.sample import generate
from ldm_train.pretrained.scheduler import ddim_scheduler
from ldm_train.train.checkpoint import latest_checkpoint, load_weights
from ldm_train.utils.runs import OutputExistsError

CPU = torch.device("cpu")


def test_layout(micro_run):
    out = micro_run.export
    index = json.loads((out / "model_index.json").read_text())
    assert {k: index[k] for k in ("unet", "vae", "text_encoder", "scheduler")} == {
        "unet": "unet",
        "vae": "vae",
        "text_encoder": "text_encoder",
        "scheduler": "scheduler",
    }
    for rel in [
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/open_clip_config.json",
        "text_encoder/open_clip_model.safetensors",
        "scheduler/scheduler_config.json",
    ]:
        assert (out / rel).is_file(), rel
    assert not out.with_name(out.name + ".partial").exists()
    unet_cfg = json.loads((out / "unet" / "config.json").read_text())
    assert unet_cfg["_class_name"] == "UNet2DConditionModel"
    assert unet_cfg["sample_size"] == 16
    assert model_config_from_diffusers(unet_cfg, "export") == micro_run.cfg.model
    assert index["latent_shape"] == [4, 16, 16]
    # nothing pickled: every tensor file is safetensors
    assert not [p for p in out.rglob("*") if p.suffix in (".pt", ".pth", ".bin", ".ckpt")]


def test_scheduler_loads_in_diffusers_with_our_betas(micro_run):
    sched = diffusers.DDIMScheduler.from_pretrained(micro_run.export / "scheduler")
    ours = build_schedule(micro_run.cfg.diffusion)
    assert sched.config.num_train_timesteps == ours.num_train_timesteps
    assert sched.config.prediction_type == micro_run.cfg.diffusion.prediction_type
    assert sched.config.clip_sample is False
    torch.testing.assert_close(sched.betas.double(), ours.betas, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(sched.alphas_cumprod.double(), ours.alphas_cumprod, rtol=1e-5, atol=1e-7)
    assert diffusion_config_from_scheduler(micro_run.export / "scheduler").model_dump(
        exclude={"cond_drop_prob"}
    ) == micro_run.cfg.diffusion.model_dump(exclude={"cond_drop_prob"})


@pytest.mark.parametrize("kind", ["linear", "scaled_linear", "cosine"])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_scheduler_for_matches_every_schedule(tmp_path, kind, prediction):
    cfg = DiffusionConfig(beta_schedule=kind, prediction_type=prediction, beta_start=1e-4, beta_end=0.02)
    ddim_scheduler(cfg).save_config(tmp_path)
    sched = diffusers.DDIMScheduler.from_pretrained(tmp_path)
    torch.testing.assert_close(sched.betas.double(), build_schedule(cfg).betas, rtol=1e-5, atol=1e-8)
    back = diffusion_config_from_scheduler(tmp_path)
    assert back.beta_schedule == kind and back.prediction_type == prediction
    assert back.num_train_timesteps == cfg.num_train_timesteps


def test_vae_loads_in_diffusers(micro_run):
    cfg = micro_run.cfg
    vae = diffusers.AutoencoderKL.from_pretrained(micro_run.export / "vae")
    ours = load_vae(cfg.path(cfg.autoencoder.path))
    assert vae.config.scaling_factor == pytest.approx(ours.config.scaling_factor)
    assert vae.config.scaling_factor == pytest.approx(micro_run.results["train-vae"]["scaling_factor"])
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(decode_latents(vae.eval(), z), decode_latents(ours, z))


def test_unet_weights_are_the_checkpoint_ema(micro_run):
    cfg = micro_run.cfg
    ckpt = latest_checkpoint(cfg.path("{run}") / "checkpoints")
    assert ckpt.name == "step-0000006"
    ema = load_weights(ckpt, "ema")
    raw = load_weights(ckpt, "model")
    exported = load_file(str(micro_run.export / "unet" / "diffusion_pytorch_model.safetensors"))
    assert exported.keys() == ema.keys()
    for k, v in ema.items():
        assert exported[k].dtype == torch.float32
        assert torch.equal(exported[k], v), k
    assert any(not torch.equal(exported[k], raw[k]) for k in exported)  # EMA, not the raw weights


def test_export_again_without_overwrite_refuses(micro_run):
    out = micro_run.export
    before = {p.relative_to(out): p.stat().st_mtime_ns for p in out.rglob("*")}
    with pytest.raises(OutputExistsError, match="overwrite"):
        stages.export_stage(micro_run.cfg, out, False)
    assert {p.relative_to(out): p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_export_with_overwrite_replaces(micro_run, tmp_path):
    out = tmp_path / "exp"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    stages.export_stage(micro_run.cfg, out, True)
    assert not (out / "stale.txt").exists()
    assert (out / "model_index.json").is_file()


def test_export_without_checkpoint(micro_run, tmp_path):
    from conftest import micro_config

    cfg = micro_config(tmp_path / "empty_run")
    with pytest.raises(PipelineError, match="train"):
        stages.export_stage(cfg, tmp_path / "exp", False)
    assert not (tmp_path / "exp").exists()


def test_fp16_export(micro_run, tmp_path):
    cfg = micro_run.cfg.model_copy(update={"export": micro_run.cfg.export.model_copy(update={"dtype": "fp16"})})
    out = tmp_path / "exp16"
    stages.export_stage(cfg, out, False)
    weights = out / "unet" / "diffusion_pytorch_model.safetensors"
    with safe_open(str(weights), framework="pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}
    assert dtypes == {torch.float16}
    ema = load_weights(latest_checkpoint(micro_run.run / "checkpoints"), "ema")
    for k, v in load_file(str(weights)).items():
        assert torch.equal(v, ema[k].half()), k
    assert weights.stat().st_size < 0.6 * (micro_run.export / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size
    # and it still samples
    pipe = load_pipeline(out, CPU)
    eval_cfg = cfg.eval.model_copy(update={"samples_per_prompt": 1})
    images, _ = generate(pipe, ["red circle 0"], eval_cfg, CPU)
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()


def test_unet_loads_in_diffusers_and_matches_ours(micro_run):
    """The export's unet/ is a real diffusers UNet2DConditionModel folder computing what ours does."""
    theirs = diffusers.UNet2DConditionModel.from_pretrained(micro_run.export / "unet").eval()
    pipe = load_pipeline(micro_run.export, CPU)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([10, 700])
    ctx = torch.randn(2, micro_run.cfg.text.context_length, micro_run.cfg.model.cross_attention_dim, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(x, t, ctx), theirs(x, t, ctx).sample, rtol=1e-5, atol=1e-5)
