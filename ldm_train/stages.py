"""One function per CLI subcommand. Each takes the validated config, does its stage, writes its
outputs below the run folder and returns a summary dict (printed by the CLI, collected by the demo).

Where things go (``{run}`` = ``run.dir``)::

    {run}/config.yaml          resolved config of the last stage run here
    {run}/data/{train,val}/    image-caption shards (``data emoji``)
    {run}/vae/                 diffusers AutoencoderKL (``train-vae``); {run}/recon.png
    {run}/clip/                small open_clip CLIP, both towers (``train-clip``)
    {run}/text/                frozen open_clip text tower (``encode``)
    {run}/latents/{train,val}/ latent shards (``encode``)
    {run}/checkpoints/         U-Net checkpoints (``train``); {run}/loss.png, {run}/metrics.jsonl
    {run}/export/              inference folder (``export``)
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

# Every stage imports what it needs when it runs, so `ldm-train --help`, a config error or a
# refusal never pays for torch, accelerate or diffusers.
from .config import Config
from .errors import Preempted, UserError

NO_CHECKPOINT = "no checkpoint under {}; run `ldm-train train` first"




def data_emoji(cfg: Config, out: Path | None, overwrite: bool) -> dict:
    from .data.emoji import build_emoji_shards

    root = out if out is not None else cfg.path(cfg.data.train_shards).parent
    return build_emoji_shards(cfg.data.emoji, root / "train", root / "val", overwrite=overwrite)


def data_folder(cfg: Config, src: Path, out: Path | None, overwrite: bool) -> dict:
    from .data.convert import convert_folder

    root = out if out is not None else cfg.path(cfg.data.train_shards).parent
    return convert_folder(src, root, cfg.data.convert, cfg.data.tolerate_failed_shards, overwrite)


def data_hf(cfg: Config, dataset: str, split: str | None, image_column: str, caption_column: str,
            out: Path | None, overwrite: bool) -> dict:
    from .data.convert import convert_hf

    root = out if out is not None else cfg.path(cfg.data.train_shards).parent
    return convert_hf(dataset, root, cfg.data.convert, image_column, caption_column, split,
                      cfg.data.tolerate_failed_shards, overwrite)


def train_clip_stage(cfg: Config, overwrite: bool) -> dict:
    """A small open_clip CLIP on the image-caption shards -> ``clip.dir`` (open_clip's folder layout),
    trained on the CPU (a model this small gains little from a GPU)."""
    from .data.shards import SkipReport, check_failed_shards, load_images
    from .text.clip_train import train_clip
    from .utils.runs import MetricsLog, prepare_output, record_config

    record_config(cfg, overwrite, stage="train-clip")
    out = prepare_output(cfg.path(cfg.clip.dir), overwrite, "train-clip")
    report = SkipReport()
    images, captions, _ = load_images(cfg.shards(cfg.data.train_shards), cfg.data.resolution, report,
                                      **cfg.data.read_options())
    check_failed_shards(report.failed_shards, cfg.data.tolerate_failed_shards, "train-clip")
    val_images, val_captions, _ = load_images(cfg.shards(cfg.data.val_shards), cfg.data.resolution, SkipReport())
    log = MetricsLog(cfg.path("{run}") / "metrics.jsonl")
    summary = train_clip(cfg.clip, (images, captions), (val_images, val_captions), out, cfg.run.seed, log)
    summary["data"] = report.summary()
    return summary


def text_config(cfg: Config):
    """``text`` with ``{run}`` expanded in ``text.pretrained`` (a file or an open_clip folder)."""
    if cfg.text.pretrained is None:
        return cfg.text
    return cfg.text.model_copy(update={"pretrained": str(cfg.path(cfg.text.pretrained))})


def train_vae_stage(cfg: Config, overwrite: bool) -> dict:
    import torch

    from .autoencoder.train_vae import reconstruct, train_vae
    from .data.shards import SkipReport, check_failed_shards, load_images
    from .utils.images import save_grid
    from .utils.runs import MetricsLog, pick_device, prepare_output, record_config

    if cfg.pretrained is not None and "path" not in cfg.autoencoder.model_fields_set:
        raise UserError(f"train-vae: the VAE comes from pretrained {cfg.pretrained}; to train your own, set "
                        "autoencoder.path to a new folder (train-vae writes there)")
    record_config(cfg, overwrite, stage="train-vae")
    out = prepare_output(cfg.path(cfg.autoencoder.path), overwrite, "train-vae")
    device = pick_device(cfg.distributed.cpu)
    report = SkipReport()
    # squares at data.resolution also with data.buckets: the autoencoder is convolutional, it encodes any bucket
    images, _, _ = load_images(cfg.shards(cfg.data.train_shards), cfg.data.resolution, report,
                               **cfg.data.read_options(buckets=False))
    check_failed_shards(report.failed_shards, cfg.data.tolerate_failed_shards, "train-vae")
    log = MetricsLog(cfg.path("{run}") / "metrics.jsonl")
    vae, summary = train_vae(cfg.autoencoder, images, out, device, cfg.run.seed, log)
    val, val_captions, _ = load_images(cfg.shards(cfg.data.val_shards), cfg.data.resolution, SkipReport(), limit=8)
    originals, recon = reconstruct(vae, val, device)
    grid = torch.stack([originals, recon], 1).flatten(0, 1)  # original, reconstruction pairs
    captions = [c for c in val_captions for c in (c, "(reconstruction)")]
    summary["recon_grid"] = str(save_grid(cfg.path("{run}") / "recon.png", grid, ncols=4, captions=captions))
    summary["val_rec_l1"] = float((originals - recon).abs().mean())
    summary["data"] = report.summary()
    return summary


def encode_stage(cfg: Config, overwrite: bool) -> dict:
    """Every launcher rank encodes its share of the input shards (see ldm_train.latents.encode);
    rerunning after a crash resumes. Failed input shards of either split are reported at the end."""
    from .autoencoder.vae import load_vae
    from .data.shards import FailedShardsError
    from .latents.encode import Encoders, encode_split
    from .latents.ranks import RankGroup, Ranks
    from .text import prepare_text
    from .utils.runs import pick_device, record_config

    ranks = Ranks.from_env()
    device = ranks.device(pick_device(cfg.distributed.cpu))
    root = cfg.path(cfg.latents.dir)
    summary, failures = {}, []
    with RankGroup(ranks) as group:
        # rank 0 records the config and builds the text tower once; the others then load it
        text_cfg = text_config(cfg)
        group.rank0_first(lambda: (record_config(cfg, overwrite, stage="encode"), prepare_text(text_cfg, cfg.path(cfg.text.dir))))
        vae = load_vae(cfg.path(cfg.autoencoder.path), cfg.autoencoder.dtype).to(device)
        text = prepare_text(text_cfg, cfg.path(cfg.text.dir)).to(device)
        enc = Encoders(vae, text, cfg.latents, cfg.data.resolution, device, cfg.run.seed,
                       cfg.data.read_options(), cfg.data.tolerate_failed_shards)
        for split, spec in (("train", cfg.data.train_shards), ("val", cfg.data.val_shards)):
            try:
                result = encode_split(cfg.shards(spec), root / split, enc, overwrite, group=group,
                                      vae_path=str(cfg.path(cfg.autoencoder.path)))
            except FailedShardsError as e:  # finish the other split first
                failures.append(str(e))
                continue
            summary[split] = {"samples": result["samples_written"], "skipped": result["report"],
                              "complete": result["complete"], "dir": str(root / split),
                              **({"buckets": result["bucket_samples"]} if result.get("bucket_samples") else {})}
    if failures:
        raise FailedShardsError(" | ".join(failures))
    return summary


def train_stage(cfg: Config, overwrite: bool) -> dict:
    """Train, or resume from the latest complete checkpoint when one exists (``--overwrite``
    starts over). Every rank runs this; rank 0 writes the config and ``status.json``."""
    from .eval.periodic import periodic_eval
    from .train.batches import training_batches
    from .train.checkpoint import checkpoint_step, latest_step, resume_checkpoint
    from .train.control import write_status
    from .train.loop import make_accelerator, train_denoiser
    from .utils.images import plot_losses
    from .utils.runs import RESUMABLE, MetricsLog, check_output, prepare_output, record_config

    run = cfg.path("{run}")
    ckpts = run / "checkpoints"
    resume = None if overwrite else resume_checkpoint(ckpts, cfg.train.verify_checkpoints)  # damaged: the one before
    # every rank checks: the latent cache against the config; a resume, the training keys but RESUMABLE ones
    # (a first train, with nothing to resume, may set any training key)
    record_config(cfg, resume is None, RESUMABLE, write=False, stage="train")
    if resume is None:
        check_output(ckpts, overwrite, "train", note="no complete checkpoint in it to resume from")
    accelerator = make_accelerator(cfg.distributed, cfg.train)
    batches = training_batches(cfg.path(cfg.latents.dir) / "train", train=cfg.train, loader=cfg.latents.loader,
                               seed=cfg.run.seed, rank=accelerator.process_index, world_size=accelerator.num_processes)
    if accelerator.is_main_process:
        record_config(cfg, True, stage="train")
        if resume is None:
            prepare_output(ckpts, overwrite, "train")
        write_status(run, "running", checkpoint_step(resume) if resume else 0, processes=accelerator.num_processes)
    accelerator.wait_for_everyone()
    log = MetricsLog(run / "metrics.jsonl")
    eval_fn = periodic_eval(cfg, accelerator, log) if cfg.train.eval_every > 0 else None
    text = None
    if cfg.train.lora.enabled and cfg.train.lora.text_encoder:  # the tower trains with its adapter: run per batch
        from .text import load_text

        text = load_text(cfg.text, cfg.path(cfg.text.dir)).to(accelerator.device)
    adapter_init = _lora_to_continue(cfg, text) if resume is None else None
    try:
        model, ema, result = train_denoiser(
            model=cfg.model, diffusion=cfg.diffusion, train=cfg.train, distributed=cfg.distributed,
            accelerator=accelerator, batches=batches, run_dir=run, seed=cfg.run.seed, log=log, eval_fn=eval_fn,
            resume_from=resume, text=text, adapter_init=adapter_init,
        )
    except Preempted as e:
        if accelerator.is_main_process:
            write_status(run, "preempted", latest_step(ckpts), reason=str(e))
        raise
    except BaseException as e:
        if accelerator.is_main_process:
            try:
                write_status(run, "failed", latest_step(ckpts), reason=f"{type(e).__name__}: {e}"[:500])
            except OSError as status_error:  # a full disk: the run's own error is the one to see
                print(f"train: could not record the failure in {run / 'status.json'}: {status_error}", file=sys.stderr)
        raise
    finally:
        accelerator.end_training()  # destroys the process group: DeepSpeed's CPU comm aborts at exit otherwise
    if not accelerator.is_main_process:
        return {}  # one summary per run, from rank 0
    write_status(run, "finished", result.steps)
    curves = {"denoiser loss": log.curve("train", "loss")}
    earlier = {"autoencoder L1": log.curve("vae", "rec_l1"), "CLIP contrastive loss": log.curve("clip", "loss")}
    curves = {**{k: v for k, v in earlier.items() if v}, **curves}
    return {
        "steps": result.steps,
        "final_loss": result.final_loss,
        "seconds": result.seconds,
        "checkpoint": str(result.checkpoint),
        "resumed_from": str(result.resumed_from) if result.resumed_from else None,
        "nonfinite_skipped": result.nonfinite_skipped,
        "strategy": cfg.distributed.strategy,
        "processes": accelerator.num_processes,
        "loss_plot": str(plot_losses(run / "loss.png", curves)),
        "device": str(accelerator.device),
    }


def _lora_to_continue(cfg: Config, text) -> dict | None:
    """``train.lora.init_from``, a diffusers or kohya LoRA file (read by the export layer, which owns
    the formats), as the loop's adapter to continue: its rank and alpha must be the run's."""
    lora = cfg.train.lora
    if not (lora.enabled and lora.init_from):
        return None
    from .export.lora import load_lora
    from .train.lora import TEXT_PREFIX, UNET_PREFIX, check_continued, text_adapter_for

    found = load_lora(Path(lora.init_from))
    check_continued(lora, found.rank, found.alpha, lora.init_from)
    if not lora.text_encoder:
        return {k: v for k, v in found.unet.items()}
    text_part = text_adapter_for(text.weights_module, found.text) if found.text else {}
    return {**{UNET_PREFIX + k: v for k, v in found.unet.items()}, **{TEXT_PREFIX + k: v for k, v in text_part.items()}}


def sample_stage(checkpoint: Path, prompts: list[str], out: Path, cfg: Config, overwrite: bool,
                 negative_prompt: str | None = None, height: int | None = None, width: int | None = None,
                 step: int | None = None, references: dict | None = None, keep_images: bool = False) -> dict:
    """Samples for ``prompts`` (``eval.*``: sampler, steps, guidance, seed) as a PNG grid, a row
    per prompt (after its real image, where ``references`` has one); see
    :func:`~ldm_train.eval.sample.generate` for ``negative_prompt`` and the pixel size.
    ``keep_images``: the images and their captions come back too (the demo scores them)."""
    from .eval.pipeline import load_pipeline
    from .eval.sample import generate, latent_shape, sample_size
    from .utils.images import prompt_grid
    from .utils.runs import check_output, pick_device

    check_output(out, overwrite, "sample")
    device = pick_device(cfg.distributed.cpu)
    pipe = load_pipeline(checkpoint, device, step)
    latent_shape(pipe, *sample_size(cfg.eval, height, width))  # a size that does not fit is refused before any sampling
    images, captions = generate(pipe, prompts, cfg.eval, device, progress=True,
                                negative_prompt=negative_prompt, height=height, width=width)
    out.parent.mkdir(parents=True, exist_ok=True)
    prompt_grid(images, captions, cfg.eval.samples_per_prompt, references).save(out)
    summary = {"grid": str(out), "images": len(captions), "source": pipe.source, "guidance": cfg.eval.guidance_scale}
    return {**summary, "samples": (images, captions)} if keep_images else summary


def score_stage(cfg: Config, images, captions: list[str], prompts: list[str]) -> dict:
    """The demo's scores of sampled ``images`` with the CLIP of ``eval.metrics.clip_weights``:
    CLIP score, caption retrieval among ``prompts`` and FD-CLIP, each beside its baselines
    (:func:`ldm_train.eval.clip_metrics.scores_with_baselines`)."""
    import torch

    from .data.shards import SkipReport, load_images
    from .eval.clip_metrics import scores_with_baselines
    from .eval.metrics import load_clip
    from .utils.images import to_uint8

    weights = cfg.eval.metrics.clip_weights
    bundle = load_clip(cfg.eval.metrics.clip_model, cfg.path(weights) if weights is not None else None)
    val, val_captions, _ = load_images(cfg.shards(cfg.data.val_shards), cfg.data.resolution, SkipReport())
    real = [val_captions.index(p) for p in prompts if p in val_captions]
    train, _, _ = load_images(cfg.shards(cfg.data.train_shards), cfg.data.resolution, SkipReport())
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.eval.seed))[:len(captions)]
    scores = scores_with_baselines(bundle, (to_uint8(images), captions), prompts,
                                   (val[real], [val_captions[i] for i in real]), val, train[pick], cfg.eval.seed)
    scores["clip"] = str(cfg.path(weights))
    return scores


def reference_images(cfg: Config, prompts: list[str]) -> dict:
    """``{prompt: image in [-1, 1]}`` for the prompts that are validation captions (the grid's "real" column)."""
    from .data.shards import SkipReport, load_images

    val, captions, _ = load_images(cfg.shards(cfg.data.val_shards), cfg.data.resolution, SkipReport())
    return {c: val[i].float() / 127.5 - 1 for i, c in enumerate(captions) if c in prompts}


def eval_stage(checkpoint: Path, cfg: Config, out_dir: Path, num_samples: int, overwrite: bool, shards: bool = False,
               step: int | None = None) -> dict:
    """``num_samples`` images, one per validation caption (sorted, cycled), with the configured
    sampler and seed; the images (PNG, optionally WebDataset shards), a grid, the held-out
    denoising loss and the protocol go to ``out_dir``."""
    from accelerate import Accelerator

    from .eval.distributed import generate_across_ranks
    from .eval.pipeline import load_pipeline
    from .eval.report import ImageMetrics, write_eval_images
    from .eval.validate import validation_loss_buckets
    from .latents.cache import load_latent_buckets
    from .utils.images import save_grid
    from .utils.runs import check_output, prepare_output

    check_output(out_dir, overwrite, "eval")  # every rank, before any writes
    accelerator = Accelerator(cpu=cfg.distributed.cpu)
    device = accelerator.device
    pipe = load_pipeline(checkpoint, device, step)
    val = [_with_context(part, pipe) for part in load_latent_buckets(cfg.path(cfg.latents.dir) / "val")]  # per bucket
    t0 = time.time()
    captions = sorted({c for part in val for c in part.captions})
    prompts = [captions[i % len(captions)] for i in range(num_samples)]
    one_each = cfg.eval.model_copy(update={"samples_per_prompt": 1})
    images, prompts = generate_across_ranks(pipe, prompts, one_each, accelerator, progress=accelerator.is_main_process)
    sample_seconds = round(time.time() - t0, 2)
    if not accelerator.is_main_process:
        return {}
    prepare_output(out_dir, True, "eval")
    if pipe.diffusion.formulation == "ddpm":
        metrics = validation_loss_buckets(pipe.unet, val, pipe.schedule, pipe.diffusion.prediction_type, device)
    else:  # the fixed-timestep loss is defined for the discrete process only
        metrics = {"val_loss": None, "val_loss_note": f"not defined for formulation {pipe.diffusion.formulation}"}
    files = write_eval_images(out_dir, images, prompts, shards)
    metrics.update(ImageMetrics.from_config(cfg)(images, prompts))
    grid = save_grid(out_dir / "val_samples.png", images[:32], ncols=8, captions=prompts[:32])
    report = {
        "source": pipe.source,
        "val_samples": sum(len(part) for part in val),
        **metrics,
        "num_samples": len(prompts),
        "processes": accelerator.num_processes,
        "sampling_seconds": sample_seconds,
        "seconds": round(time.time() - t0, 2),
        "grid": str(grid),
        "images": files,
        "eval": cfg.eval.model_dump(),
    }
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    return report


def _with_context(val, pipe):
    """A validation split with text embeddings: a tokens cache (train.lora.text_encoder) gets the
    pipeline's, which the loss needs."""
    if val.context is not None:
        return val
    import dataclasses

    import torch

    with torch.no_grad():
        context = torch.cat([pipe.text.encode_tokens(val.tokens[i:i + 64]).cpu() for i in range(0, len(val), 64)])
    return dataclasses.replace(val, context=context)


def export_stage(cfg: Config, out: Path, overwrite: bool, checkpoint: Path | None = None, step: int | None = None,
                 single_file: Path | None = None, lora_format: str | None = None, merge: bool = False) -> dict:
    """The EMA weights of ``checkpoint`` (a run folder, default ``{run}``; ``step``: which
    checkpoint, default the latest) -> an inference folder, and optionally one single file.
    A LoRA run's EMA adapter goes to ``{out}/lora/`` (``lora_format``: diffusers, kohya or both, the
    default); the folder holds the base U-Net, or with ``merge`` the merged one (single file too)."""
    import dataclasses

    import torch

    from .eval.pipeline import PipelineError, load_pipeline
    from .export.export import export_pipeline, export_single_file, is_diffusers_pipeline
    from .export.lora import (merge_lora, plain_model, plain_text, residual_init, sd_family, split_adapter, with_text,
                              write_lora_export)
    from .text.hf import HFTextEncoder
    from .train.checkpoint import latest_checkpoint, split_step_folder
    from .utils.runs import check_output

    check_output(out, overwrite, "export")
    if single_file is not None:
        if single_file.suffix != ".safetensors":
            raise UserError(f"export --single-file {single_file}: name a .safetensors file (nothing pickled is written)")
        check_output(single_file, overwrite, "export --single-file")
    source, _ = split_step_folder(checkpoint if checkpoint is not None else cfg.path("{run}"))
    if not (source / "model_index.json").is_file() and latest_checkpoint(source / "checkpoints") is None:
        raise PipelineError(NO_CHECKPOINT.format(source / "checkpoints"))
    pipe = load_pipeline(checkpoint if checkpoint is not None else source, torch.device("cpu"), step)
    base, lora = split_adapter(pipe.unet)
    if lora is None and (merge or lora_format is not None):
        raise UserError(f"export --merge/--lora-format: {pipe.source} is not a LoRA run (train.lora.enabled)")
    residual = lora is not None and residual_init(pipe.unet)
    if residual and not merge:  # its adapter only fits the residual base that init changed
        raise UserError(f"export: a train.lora.init {residual} adapter is relative to the base it changed; "
                        "export it with --merge (full weights)")
    if lora is not None:
        pipe = dataclasses.replace(pipe, unet=plain_model(pipe.unet, merge_lora(base, lora) if merge else base))
    text_base, text_lora = split_adapter(pipe.text.model) if isinstance(pipe.text, HFTextEncoder) else (None, None)
    if lora is not None and text_lora is not None:  # train.lora.text_encoder: the text adapter too
        lora = with_text(lora, text_lora)
        model = plain_text(pipe.text.model, merge_lora(text_base, lora, "text") if merge else text_base)
        text = pipe.text
        pipe = dataclasses.replace(pipe, text=HFTextEncoder(model, text.tokenizer, text.layer, text.source_layers))
    export_pipeline(out, pipe, cfg.export.dtype)
    diffusers = is_diffusers_pipeline(out)
    summary = {"export": str(out), "from": pipe.source,
               "format": "diffusers StableDiffusionPipeline" if diffusers else
                         "ldm_train (open_clip text tower; --diffusers-pipeline DIR converts it for diffusers)"}
    if lora is not None and not residual:
        family = sd_family(pipe.unet.config["cross_attention_dim"], pipe.diffusion.prediction_type)
        summary["lora"] = [str(p) for p in write_lora_export(out / "lora", lora, lora_format or "both", family)]
        summary["merged"] = merge
    if single_file is not None:
        summary["single_file"] = str(export_single_file(out, single_file, cfg.export.dtype))
    return summary


def export_precheck(cfg: Config, checkpoint: Path | None = None) -> None:
    """``export``'s refusal when there is no checkpoint folder at all, before anything heavy is
    imported (the CLI runs it before the config's full check); :func:`export_stage` decides the rest."""
    run = checkpoint if checkpoint is not None else cfg.path("{run}")
    ckpts = run.parent if run.name.startswith("step-") else run / "checkpoints"
    if (run / "model_index.json").is_file():
        return  # an export or diffusers pipeline: re-exported as it is
    if not ckpts.is_dir() or not any(p.name.startswith("step-") for p in ckpts.iterdir()):
        raise UserError(NO_CHECKPOINT.format(ckpts))


def convert_stage(src: Path, dst: Path, to: str, overwrite: bool, prediction_type: str | None = None) -> dict:
    """A U-Net folder in either format -> ``to`` format (``project`` or ``diffusers``); an SD single
    file -> a diffusers pipeline folder (``diffusers``); a pipeline folder -> a single file (``single-file``)."""
    from .utils.runs import check_output, prepare_output

    check_output(dst, overwrite, "convert")  # before reading: a refusal costs nothing
    if src.is_file() or to == "single-file":
        return _convert_sd(src, dst, to, overwrite, prediction_type)
    from .model.convert import write_diffusers_unet, write_project_unet
    from .model.load import read_unet

    cfg, state = read_unet(src)
    prepare_output(dst, overwrite, "convert")
    write = write_project_unet if to == "project" else write_diffusers_unet
    write(dst, cfg, state)
    params = sum(v.numel() for v in state.values())
    return {"input": str(src), "output": str(dst), "format": to, "parameters": params, "tensors": len(state)}


def _convert_sd(src: Path, dst: Path, to: str, overwrite: bool, prediction_type: str | None) -> dict:
    """Whole Stable Diffusion checkpoints: single file <-> diffusers pipeline folder."""
    import shutil

    from .config import DiffusionConfig
    from .pretrained.resolve import read_pipeline_configs
    from .pretrained.scheduler import ddim_scheduler
    from .pretrained.pipeline_folder import read_pipeline_folder, write_pipeline_folder
    from .pretrained.single_file import inspect_single_file, read_single_file, write_single_file

    if to == "single-file":
        if src.is_file():
            raise UserError(f"convert: {src} is a file already; --to single-file converts a diffusers pipeline folder")
        read_pipeline_configs(src)  # refusals first (not a pipeline, SDXL, missing parts)
        ckpt = read_pipeline_folder(src)
        partial = dst.with_name(f"{dst.stem}.partial{dst.suffix}")  # the writer checks the suffix
        write_single_file(partial, ckpt)
        partial.replace(dst)
    elif to == "diffusers":
        family, _ = inspect_single_file(src)
        if family == "sd2" and prediction_type is None:
            raise UserError(f"convert: {src} is an SD 2.x single file: 768-v and 512-base have the same layout; "
                            "pass --prediction-type v_prediction (768-v) or epsilon (512-base)")
        schedule = DiffusionConfig(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                   prediction_type=prediction_type or "epsilon")
        ckpt = read_single_file(src)
        partial = dst.with_name(dst.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        write_pipeline_folder(ckpt, partial, dict(ddim_scheduler(schedule).config))
        shutil.rmtree(dst, ignore_errors=True)
        partial.rename(dst)
    else:
        raise UserError(f"convert: {src} is a single-file checkpoint; use --to diffusers (a pipeline folder)")
    return {"input": str(src), "output": str(dst), "format": to, "family": ckpt.family, "ema": ckpt.ema,
            "tensors": len(ckpt.unet) + len(ckpt.vae) + len(ckpt.text) + len(ckpt.extras)}


def sd_pipeline_stage(export_dir: Path, out: Path, overwrite: bool) -> dict:
    """An export (CLIP text tower) -> a diffusers ``StableDiffusionPipeline`` folder."""
    from .export.sd_pipeline import write_sd_pipeline

    write_sd_pipeline(export_dir, out, overwrite=overwrite)
    return {"diffusers_pipeline": str(out)}
