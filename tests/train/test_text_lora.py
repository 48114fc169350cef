"""train.lora.text_encoder on a tiny SD 1.x pipeline (transformers CLIP tower): encode caches caption
tokens, the loop trains one TextConditioned module (U-Net + CLIPTextModel, each with its adapter);
the text adapter learns while the base text weights stay bit-identical; resume is bitwise exact with
both adapters; the run folder samples with both EMA adapters, and the export's diffusers LoRA (U-Net
and text encoder) on the base pipeline gives the same images (1e-4); --merge merges the text adapter
into the exported text encoder. Refusals: text_encoder LoRA with cached embeddings, a bad text target."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from ldm_train.cli import main
from ldm_train.config import ConfigError, load_config
from ldm_train.eval.pipeline import load_pipeline
from ldm_train.eval.sample import generate
from ldm_train.train.lora import TextConditioned, is_adapter_key

CPU = torch.device("cpu")
TEXT_LORA = ["train.lora.enabled=true", "train.lora.rank=4", "train.lora.alpha=8", "train.lora.text_encoder=true",
             "latents.text=tokens", "diffusion.cond_drop_prob=0.3", "train.lora.dropout=0.1"]


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    from pretrained.tiny_sd import make_tiny_sd

    return make_tiny_sd(tmp_path_factory.mktemp("sd") / "sd1", "sd1")


@pytest.fixture(scope="module")
def text_run(tmp_path_factory, sd1):
    from pretrained.test_sd_finetune import finetune

    run = tmp_path_factory.mktemp("textlora") / "run"
    args = finetune("sd15-lora", sd1, run, *TEXT_LORA, "train.steps=4", "train.checkpoint_every=2",
                    "train.keep_checkpoints=5", "train.eval_every=2", "eval.steps=2", "eval.samples_per_prompt=1",
                    "eval.prompts=[red circle 1,a blue square]")
    return run, args


def flat(state: dict) -> dict:
    """CLIPTextModel weights without the ``text_model.`` that some transformers versions put on them."""
    return {k.removeprefix("text_model."): v for k, v in state.items()}


def test_refusals(sd1, tmp_path, capsys):
    with pytest.raises(ConfigError) as e:  # both keys named, one line
        load_config(None, ["train.lora.enabled=true", "train.lora.text_encoder=true"])
    line = str(e.value).splitlines()[1]
    assert "train.lora.text_encoder" in line and "latents.text" in line
    assert main(["train", "--config", "sd15-lora", f"pretrained={sd1}", f"run.dir={tmp_path}",
                 "train.lora.text_encoder=true"]) == 2
    assert "latents.text: tokens" in capsys.readouterr().err
    from ldm_train.config import LoraConfig
    from ldm_train.text.hf import load_hf_folders
    from ldm_train.train.lora import LoraError, add_text_adapter, text_base

    text = load_hf_folders(sd1 / "text_encoder", sd1 / "tokenizer")
    with pytest.raises(LoraError, match=r"text_target_modules: 'q_projj' matches no text-encoder module; closest "
                                        r"names: q_proj"):
        add_text_adapter(text_base(text), LoraConfig(enabled=True, text_target_modules=["q_projj"]))


def test_tokens_cache_and_the_text_adapter_learns(text_run, sd1):
    run, _ = text_run
    assert (run / "samples" / "step-0000004.png").is_file()  # periodic eval sampled with both EMA adapters
    manifest = json.loads((run / "latents" / "train" / "manifest.json").read_text())
    assert manifest["text"] == "tokens" and manifest["context_shape"] == [77]
    from ldm_train.train.batches import StreamBatches

    cfg = load_config(run / "config.yaml")
    stream = StreamBatches(run / "latents" / "train", cfg.latents.loader, 2, 0, 0, 1, tokens=True)
    z, tokens = stream.next(CPU)  # train.data_source: stream hands the tokens on too
    assert tokens.dtype == torch.long and tokens.shape == (2, 77) and stream.null_context.shape == (77,)
    ckpt = run / "checkpoints" / "step-0000004"
    model = load_file(str(ckpt / "model.safetensors"))
    assert model and all(is_adapter_key(k) for k in model)
    text_keys = [k for k in model if k.startswith("text.")]
    assert text_keys and any(".q_proj." in k for k in text_keys) and any(k.startswith("unet.") for k in model)
    # the text adapter's B started at zero: it learnt; the base text weights are the pipeline's
    assert any(v.abs().max() > 0 for k, v in model.items() if k.startswith("text.") and ".lora_B." in k)
    pipe = load_pipeline(run, CPU)
    base = load_file(str(sd1 / "text_encoder" / "model.safetensors"))
    state = flat({k.replace(".base_layer.", "."): v for k, v in pipe.text.model.state_dict().items() if ".lora_" not in k})
    base = flat(base)
    assert base.keys() <= state.keys() and all(torch.equal(state[k], v) for k, v in base.items())
    from ldm_train.train.checkpoint import load_weights
    from ldm_train.train.lora import peft_key

    assert sorted(map(peft_key, load_weights(ckpt, "ema"))) == sorted(model)  # the EMA holds both adapters, nothing else


def test_resume_is_bitwise_exact_with_both_adapters(text_run, tmp_path):
    run, args = text_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "checkpoints" / "step-0000004")
    resumed = [a if not a.startswith("run.dir=") else f"run.dir={copy}" for a in args]
    assert main(["train", *resumed]) == 0
    for name in ("model.safetensors", "ema-00000-of-00001.safetensors", "rank-00000.safetensors"):
        a = load_file(str(run / "checkpoints" / "step-0000004" / name))
        b = load_file(str(copy / "checkpoints" / "step-0000004" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_export_round_trip_in_diffusers_and_merge(text_run, sd1, tmp_path):
    from diffusers import StableDiffusionPipeline

    from ldm_train.export.lora import load_lora

    run, args = text_run
    cfg = load_config("sd15-lora", ["eval.steps=3", "eval.guidance_scale=3.0", "eval.seed=5",
                                     "eval.samples_per_prompt=1"])
    prompts = ["red circle 1", "a blue square"]
    pipe = load_pipeline(run, CPU)
    ours, _ = generate(pipe, prompts, cfg.eval, CPU)
    noise = torch.randn((2, *pipe.latent_shape), generator=torch.Generator().manual_seed(5))
    out = tmp_path / "export"
    assert main(["export", *args, "--out", str(out)]) == 0
    lora = load_lora(out / "lora" / "kohya_lora.safetensors")
    assert lora.text and lora.unet
    # the export is the base pipeline (its U-Net and text encoder bit-identical to sd1's, DDIM as our sampler)
    for part, file in (("unet", "diffusion_pytorch_model.safetensors"), ("text_encoder", "model.safetensors")):
        a, b = (flat(load_file(str(f / part / file))) for f in (sd1, out))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    theirs = StableDiffusionPipeline.from_pretrained(out, local_files_only=True, safety_checker=None)
    plain = theirs(prompts, latents=noise, num_inference_steps=3, guidance_scale=3.0, output_type="pt").images
    theirs.load_lora_weights(out / "lora")
    images = theirs(prompts, latents=noise, num_inference_steps=3, guidance_scale=3.0, output_type="pt").images
    torch.testing.assert_close(images, (ours + 1) / 2, atol=1e-4, rtol=0)
    assert (plain - images).abs().max() > 1e-4  # the adapters change the images
    merged = tmp_path / "merged"
    assert main(["export", *args, "--out", str(merged), "--merge"]) == 0
    full = StableDiffusionPipeline.from_pretrained(merged, local_files_only=True, safety_checker=None)
    images_m = full(prompts, latents=noise, num_inference_steps=3, guidance_scale=3.0, output_type="pt").images
    torch.testing.assert_close(images_m, (ours + 1) / 2, atol=1e-4, rtol=0)
    base = load_file(str(sd1 / "text_encoder" / "model.safetensors"))
    exported = load_file(str(merged / "text_encoder" / "model.safetensors"))
    base, exported = flat(base), flat(exported)
    assert any(not torch.equal(base[k], exported[k]) for k in base if "q_proj.weight" in k)
    assert all(torch.equal(base[k], exported[k]) for k in base if "mlp" in k)


def test_eval_stage_and_continuing_the_exported_lora(text_run, tmp_path):
    """``eval`` on a tokens cache (the held-out loss encodes the tokens with the EMA text adapter);
    ``train.lora.init_from`` an exported diffusers LoRA continues both adapters (its tensors loaded)."""
    from ldm_train.text.hf import load_hf_folders
    from ldm_train.train.lora import (TEXT_PREFIX, UNET_PREFIX, add_adapter, base_unet, conditioned, load_adapter,
                                      read_adapter_file, read_text_adapter_file, trainable_parameters)

    run, args = text_run
    assert main(["eval", *args, "--checkpoint", str(run), "--num-samples", "2", "--out", str(tmp_path / "eval")]) == 0
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["val_loss"] is not None
    out = tmp_path / "export"
    assert main(["export", *args, "--out", str(out), "--lora-format", "diffusers"]) == 0
    cfg = load_config(run / "config.yaml")
    text = load_hf_folders(out / "text_encoder", out / "tokenizer")
    text_state = read_text_adapter_file(out / "lora", text)
    model = conditioned(add_adapter(base_unet(cfg.model, cfg.run.seed), cfg.train.lora), text, cfg.train.lora)
    assert all(is_adapter_key(n) for n, p in model.named_parameters() if p.requires_grad)
    assert len(trainable_parameters(model.text)) == len(text_state) > 0  # only the text adapter of the tower trains
    load_adapter(model, {**{UNET_PREFIX + k: v for k, v in read_adapter_file(out / "lora").items()},
                         **{TEXT_PREFIX + k: v for k, v in text_state.items()}})  # every adapter tensor, right shapes
    pipe = load_pipeline(run, CPU)
    ema = {n: p for n, p in pipe.text.model.named_parameters() if ".lora_" in n}
    assert all(torch.equal(p, ema[n]) for n, p in model.text.named_parameters() if ".lora_" in n)
    from pretrained.test_sd_finetune import finetune

    sd1 = cfg.pretrained
    again = tmp_path / "again"  # through the loop: init_from's text part lands in the text adapter
    finetune("sd15-lora", sd1, again, *TEXT_LORA, f"train.lora.init_from={out / 'lora'}", "train.steps=1",
             "train.lr=1e-30")
    first = load_file(str(again / "checkpoints" / "step-0000001" / "model.safetensors"))
    for k, v in {**{UNET_PREFIX + k: v for k, v in read_adapter_file(out / "lora").items()},
                 **{TEXT_PREFIX + k: v for k, v in text_state.items()}}.items():
        torch.testing.assert_close(first[k], v, atol=1e-6, rtol=0)


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "zero2"])
def test_two_processes_train_both_adapters_and_resume_exactly(text_run, tmp_path, strategy):
    """2 ranks (gloo) on the tokens cache: 4 steps; the last checkpoint removed, the same command resumes
    from step 2 and writes step 4 again bit for bit (both adapters, EMA, optimizer state)."""
    import sys

    from train.test_lora import ckpt_tensors, run_ok, same_files

    run, args = text_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("checkpoints", "samples", "eval", "export*"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "ldm_train.cli", "train", *[a if not a.startswith("run.dir=") else f"run.dir={copy}" for a in args],
           "train.eval_every=0", "train.batch_size=2", f"distributed.strategy={strategy}"]
    run_ok(cmd, tmp_path)
    ckpt = copy / "checkpoints" / "step-0000004"
    first = ckpt_tensors(ckpt)
    assert any(".text." in k or "/text." in k for k in first)
    shutil.move(ckpt, tmp_path / "first")
    out = run_ok(cmd, tmp_path)
    assert '"resumed_from": "' + str(copy / "checkpoints" / "step-0000002") in out.stdout
    same_files(first, ckpt_tensors(ckpt))


def test_continuing_a_kohya_lora(text_run, tmp_path):
    """``train.lora.init_from`` a kohya file (read by the export layer's formats in the train stage):
    both of its adapters land in the first checkpoint, as from the diffusers file."""
    from ldm_train.export.lora import load_lora
    from ldm_train.text.hf import load_hf_folders
    from ldm_train.train.lora import TEXT_PREFIX, UNET_PREFIX, text_adapter_for
    from pretrained.test_sd_finetune import finetune

    run, args = text_run
    out = tmp_path / "export"
    assert main(["export", *args, "--out", str(out), "--lora-format", "kohya"]) == 0
    kohya = out / "lora" / "kohya_lora.safetensors"
    lora = load_lora(kohya)
    assert lora.format == "kohya" and lora.unet and lora.text
    cfg = load_config(run / "config.yaml")
    again = tmp_path / "again"
    finetune("sd15-lora", cfg.pretrained, again, *TEXT_LORA, f"train.lora.init_from={kohya}", "train.steps=1",
             "train.lr=1e-30")
    first = load_file(str(again / "checkpoints" / "step-0000001" / "model.safetensors"))
    text = load_hf_folders(out / "text_encoder", out / "tokenizer")
    expected = {**{UNET_PREFIX + k: v for k, v in lora.unet.items()},
                **{TEXT_PREFIX + k: v for k, v in text_adapter_for(text.weights_module, lora.text).items()}}
    assert expected.keys() <= first.keys()
    for k, v in expected.items():
        torch.testing.assert_close(first[k], v.float(), atol=1e-6, rtol=0)
