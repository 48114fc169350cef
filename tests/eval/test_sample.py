"""Sampling and held-out loss from the micro run folder and from its export."""
from __future__ import annotations

import math

import pytest
import torch

from ldm_train.eval.pipeline import PipelineError, load_pipeline
from ldm_train.eval.sample import generate
from ldm_train.eval.validate import validation_loss
from ldm_train.latents.cache import load_latents

CPU = torch.device("cpu")
PROMPTS = ["red circle 0", "blue square 2", "a prompt never seen in training"]


@pytest.fixture(scope="module")
def pipes(micro_run):
    return {"run": load_pipeline(micro_run.run, CPU), "export": load_pipeline(micro_run.export, CPU)}


@pytest.fixture(scope="module")
def images(micro_run, pipes):
    return {name: generate(pipe, PROMPTS, micro_run.cfg.eval, CPU) for name, pipe in pipes.items()}


def test_pipeline_sources(micro_run, pipes):
    assert pipes["run"].source.startswith("run ") and "step-0000006" in pipes["run"].source
    assert pipes["export"].source.startswith("export ")
    for pipe in pipes.values():
        assert pipe.latent_shape == [4, 16, 16]
        assert pipe.diffusion.prediction_type == micro_run.cfg.diffusion.prediction_type
        assert torch.equal(pipe.schedule.betas, pipes["run"].schedule.betas)


@pytest.mark.parametrize("source", ["run", "export"])
def test_generate_shape_and_range(micro_run, images, source):
    out, captions = images[source]
    spp = micro_run.cfg.eval.samples_per_prompt
    assert out.shape == (len(PROMPTS) * spp, 3, 32, 32)
    assert out.dtype == torch.float32 and out.device.type == "cpu"
    assert torch.isfinite(out).all()
    assert out.min() >= -1.0 and out.max() <= 1.0
    assert captions == [p for p in PROMPTS for _ in range(spp)]
    # different noise per sample: the two samples of a prompt differ
    assert not torch.equal(out[0], out[1])


@pytest.mark.parametrize("source", ["run", "export"])
def test_same_seed_is_bitwise_identical(micro_run, pipes, images, source):
    again, _ = generate(pipes[source], PROMPTS, micro_run.cfg.eval, CPU)
    assert torch.equal(again, images[source][0])


@pytest.mark.parametrize("source", ["run", "export"])
def test_different_seed_differs(micro_run, pipes, images, source):
    other_cfg = micro_run.cfg.eval.model_copy(update={"seed": micro_run.cfg.eval.seed + 1})
    other, _ = generate(pipes[source], PROMPTS, other_cfg, CPU)
    assert other.shape == images[source][0].shape
    assert not torch.equal(other, images[source][0])


def test_run_folder_and_export_give_identical_images(micro_run, images):
    assert micro_run.cfg.export.dtype == "fp32"
    assert torch.equal(images["run"][0], images["export"][0])


def test_batching_does_not_change_images(micro_run, pipes, images):
    """The noise comes from one seeded generator in order, so the batch split is invisible."""
    small, _ = generate(pipes["export"], PROMPTS, micro_run.cfg.eval, CPU, batch_size=2)
    torch.testing.assert_close(small, images["export"][0], atol=1e-5, rtol=0)


def test_prompt_changes_the_image(micro_run, pipes):
    cfg = micro_run.cfg.eval.model_copy(update={"samples_per_prompt": 1})
    a, _ = generate(pipes["run"], ["red circle 0"], cfg, CPU)
    b, _ = generate(pipes["run"], ["blue square 2"], cfg, CPU)
    assert not torch.equal(a, b)


@pytest.mark.parametrize("source", ["run", "export"])
def test_validation_loss(micro_run, pipes, source):
    cfg = micro_run.cfg
    val = load_latents(cfg.path(cfg.latents.dir) / "val")
    pipe = pipes[source]
    metrics = validation_loss(pipe.unet, val, pipe.schedule, pipe.diffusion.prediction_type, CPU)
    assert set(metrics) == {"val_loss", "t50", "t250", "t500", "t750", "t950"}
    assert all(isinstance(v, float) and math.isfinite(v) and v > 0 for v in metrics.values())
    per_t = [metrics[k] for k in ("t50", "t250", "t500", "t750", "t950")]
    assert metrics["val_loss"] == pytest.approx(sum(per_t) / 5)
    # fixed timesteps and seeded noise: calling again gives exactly the same numbers
    assert validation_loss(pipe.unet, val, pipe.schedule, pipe.diffusion.prediction_type, CPU) == metrics
    other_seed = validation_loss(pipe.unet, val, pipe.schedule, pipe.diffusion.prediction_type, CPU, seed=1)
    assert other_seed != metrics


def test_validation_loss_same_from_run_and_export(micro_run, pipes):
    cfg = micro_run.cfg
    val = load_latents(cfg.path(cfg.latents.dir) / "val")
    got = [validation_loss(p.unet, val, p.schedule, p.diffusion.prediction_type, CPU) for p in pipes.values()]
    assert got[0] == got[1]


def test_validation_loss_custom_timesteps(micro_run, pipes):
    cfg = micro_run.cfg
    val = load_latents(cfg.path(cfg.latents.dir) / "val")
    pipe = pipes["run"]
    metrics = validation_loss(pipe.unet, val, pipe.schedule, "epsilon", CPU, timesteps=(10, 999))
    assert set(metrics) == {"val_loss", "t10", "t999"}


def test_load_pipeline_on_random_folder(tmp_path):
    (tmp_path / "something.txt").write_text("not a model")
    with pytest.raises(PipelineError) as info:
        load_pipeline(tmp_path, CPU)
    assert str(tmp_path) in str(info.value)
    with pytest.raises(PipelineError):
        load_pipeline(tmp_path / "does-not-exist", CPU)


def test_load_pipeline_run_without_checkpoint(micro_run, tmp_path):
    (tmp_path / "config.yaml").write_text((micro_run.run / "config.yaml").read_text())
    with pytest.raises(PipelineError, match="checkpoint"):
        load_pipeline(tmp_path, CPU)


def test_load_pipeline_bad_run_config(tmp_path):
    (tmp_path / "config.yaml").write_text("train:\n  stepz: 1\n")
    with pytest.raises(PipelineError, match="train.stepz"):
        load_pipeline(tmp_path, CPU)


def test_sampling_batch_is_halved_after_an_out_of_memory_error(micro_run):
    """A U-Net that 'runs out of memory' above 4 rows (cond + uncond of 2 images): generate starts
    at eval.batch_size 8, retries at 4 and 2, and gives the images of batch 2 (DDIM is seeded per image)."""
    import dataclasses

    from ldm_train.eval.pipeline import load_pipeline
    from ldm_train.eval.sample import generate

    cpu = torch.device("cpu")
    pipe = load_pipeline(micro_run.export, cpu)
    seen = []

    class Tight(torch.nn.Module):
        def __init__(self, unet):
            super().__init__()
            self.unet = unet

        def forward(self, x, t, context, *args, **kwargs):
            seen.append(x.shape[0])
            if x.shape[0] > 4:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return self.unet(x, t, context, *args, **kwargs)

    cfg = micro_run.cfg.eval.model_copy(update={"steps": 2, "samples_per_prompt": 3, "batch_size": 8})
    prompts = ["red circle 0", "blue square 1"]
    tight = dataclasses.replace(pipe, unet=Tight(pipe.unet))
    images, captions = generate(tight, prompts, cfg, cpu)
    assert seen[0] > 4 and max(seen[-4:]) <= 4  # failed big, finished small
    reference, ref_captions = generate(pipe, prompts, cfg.model_copy(update={"batch_size": 2}), cpu)
    assert captions == ref_captions and torch.equal(images, reference)


def test_eval_width_and_height_set_the_size_and_arguments_win(micro_run, pipes):
    """A run trained on buckets samples at any bucket's size: eval.width/height (grids, eval), or
    the arguments of sample (--width/--height), which win; both must be multiples of the factor."""
    from ldm_train.errors import UserError

    cfg = micro_run.cfg.eval.model_copy(update={"width": 48, "height": 32, "samples_per_prompt": 1, "steps": 2})
    out, _ = generate(pipes["run"], PROMPTS[:1], cfg, CPU)
    assert out.shape == (1, 3, 32, 48)
    out, _ = generate(pipes["run"], PROMPTS[:1], cfg, CPU, height=64, width=16)
    assert out.shape == (1, 3, 64, 16)
    with pytest.raises(UserError, match="must be a positive multiple of 2"):
        generate(pipes["run"], PROMPTS[:1], cfg.model_copy(update={"width": 33}), CPU)
