"""``pretrained:`` an SDXL pipeline folder end to end on a tiny random SDXL (``make_tiny_sd(.., "sdxl")``)
with the sdxl-finetune preset: encode stores both towers' context, the pooled embedding and each
sample's size/crop ids (from the original size and crop box it read); training feeds them packed
into the context (memory and stream sources, size dropout); sampling conditions as diffusers'
``StableDiffusionXLPipeline`` does."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import synthetic_samples
from ldm_train.cli import main
from ldm_train.config import LoaderConfig, load_config
from ldm_train.data.shards import DataError, write_shards
from ldm_train.eval.conditioning import null_context, prompt_context
from ldm_train.eval.pipeline import load_pipeline
from ldm_train.eval.sample import generate
from ldm_train.latents.cache import load_latents
from ldm_train.model import build_unet
from ldm_train.model.addition import ContextLayout
from ldm_train.train.batches import MemoryBatches, StreamBatches, check_conditioning
from pretrained.tiny_sd import BIGG_WIDTH, POOLED_WIDTH, TEXT_WIDTH, make_tiny_sd

diffusers = pytest.importorskip("diffusers")
CPU = torch.device("cpu")
SIZES = [(48, 32), (32, 40), (32, 32), (64, 40), (40, 48), (32, 56)]  # (w, h): landscape, portrait, square


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    return make_tiny_sd(tmp_path_factory.mktemp("sdxl") / "pipe", "sdxl")


def _samples(n, seed, prefix):
    out = []
    for i, (key, image, caption, meta) in enumerate(synthetic_samples(n, seed=seed, prefix=prefix)):
        out.append((key, image.resize(SIZES[i % len(SIZES)]), caption, meta))
    return out


# The preset's buckets scaled down to the tiny stand-ins: a 16 x 16 grid (one square bucket).
TINY_BUCKETS = ("data.buckets.area=256", "data.buckets.step=16")


def _args(sdxl, run, *extra, buckets=TINY_BUCKETS):
    return ["--config", "sdxl-finetune", f"pretrained={sdxl}", f"run.dir={run}", "data.resolution=16", *buckets,
            "data.min_size=0", "train.steps=2", "train.batch_size=4", "train.checkpoint_every=2", "train.eval_every=0",
            "train.lr=1e-3", "train.lr_schedule.warmup_steps=0", "distributed.mixed_precision=no",
            "distributed.cpu=true", "latents.batch_size=4", "latents.dtype=fp16", "model.gradient_checkpointing=false",
            "train.tensorboard=false", "eval.steps=2", "eval.samples_per_prompt=1", *extra]


@pytest.fixture(scope="module")
def sdxl_run(tmp_path_factory, sdxl):
    run = tmp_path_factory.mktemp("sdxl-run") / "run"
    args = _args(sdxl, run)
    cfg = load_config("sdxl-finetune", args[2:])
    write_shards(_samples(6, 1, "t"), cfg.path(cfg.data.train_shards), "train", 8)
    write_shards(_samples(4, 2, "v"), cfg.path(cfg.data.val_shards), "val", 8)
    assert main(["encode", *args]) == 0
    assert main(["train", *args]) == 0
    return run


def test_preset_takes_both_towers_from_the_pipeline(sdxl_run, sdxl):
    cfg = load_config(sdxl_run / "config.yaml")
    assert (cfg.text.encoder, cfg.text.sdxl.path, cfg.text.layer) == ("sdxl", str(sdxl), "penultimate")
    assert cfg.model.addition_embed_type == "text_time" and cfg.model.cross_attention_dim == (TEXT_WIDTH + BIGG_WIDTH)
    assert cfg.model.init_from == str(sdxl / "unet")
    assert (sdxl_run / "checkpoints" / "step-0000002").is_dir()
    preset = (load_config("sdxl-finetune"))
    assert preset.data.resolution == 1024 and preset.train.lr == 1e-5


def test_encode_stores_pooled_and_size_crop_ids(sdxl_run, sdxl):
    from ldm_train.text.sdxl import load_sdxl_folders
    data = load_latents(sdxl_run / "latents" / "train")
    assert data.manifest["pooled_width"] == POOLED_WIDTH and data.manifest["time_ids"] is True
    assert data.pooled.shape == (6, POOLED_WIDTH) and data.time_ids.shape == (6, 6)
    import webdataset as wds
    from ldm_train.data.shards import expand_shards
    metas = {s["__key__"]: json.loads(s["json"]) for s in wds.WebDataset(
        expand_shards(str(sdxl_run / "latents" / "train")), shardshuffle=False, empty_check=False)}
    for key, ids in zip(data.keys, data.time_ids.tolist()):
        (w, h), (left, top, right, bottom) = metas[key]["original_size"], metas[key]["crop_box"]
        side = right - left
        assert ids == [h, w, round(top * 16 / side), round(left * 16 / side), 16.0, 16.0]
    assert any(ids[2] or ids[3] for ids in data.time_ids.tolist())  # random crops of non-square images
    context, pooled = load_sdxl_folders(sdxl).encode_with_pooled(data.captions)
    torch.testing.assert_close(data.pooled.float(), pooled, atol=2e-3, rtol=2e-3)  # stored in fp16
    torch.testing.assert_close(data.context.float(), context, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("source", ["memory", "stream"])
def test_training_batches_pack_what_the_cache_holds(sdxl_run, source):
    folder = sdxl_run / "latents" / "train"
    if source == "memory":
        batches = MemoryBatches(load_latents(folder), 4, seed=0, rank=0)
    else:
        batches = StreamBatches(folder, LoaderConfig(num_workers=0, shuffle_buffer=8), 4, seed=0, rank=0, world_size=1)
    _, packed = batches.next(CPU)
    layout = ContextLayout((TEXT_WIDTH + BIGG_WIDTH), POOLED_WIDTH)
    context, pooled, ids = layout.unpack(packed)
    assert context.shape == (4, 77, (TEXT_WIDTH + BIGG_WIDTH)) and batches.context_shape == [77 + layout.extra_rows, (TEXT_WIDTH + BIGG_WIDTH)]
    stored = load_latents(folder)
    rows = [stored.time_ids.tolist().index(r) for r in ids.tolist()]
    torch.testing.assert_close(pooled, stored.pooled[rows].float())
    assert batches.null_context.shape == (77 + layout.pooled_rows, (TEXT_WIDTH + BIGG_WIDTH))  # no time-id row: CFG keeps it


def test_size_dropout_zeroes_the_ids(sdxl_run):
    data = load_latents(sdxl_run / "latents" / "train")
    _, packed = MemoryBatches(data, 64, seed=0, rank=0, size_drop=0.5).next(CPU)
    ids = ContextLayout((TEXT_WIDTH + BIGG_WIDTH), POOLED_WIDTH).unpack(packed)[2]
    dropped = (ids == 0).all(dim=1)
    assert 0 < dropped.sum() < 64 and (ids[~dropped] > 0).any()


def test_an_sdxl_cache_needs_an_sdxl_unet(sdxl_run):
    batches = MemoryBatches(load_latents(sdxl_run / "latents" / "train"), 4, seed=0, rank=0)
    cfg = load_config(sdxl_run / "config.yaml")
    check_conditioning(build_unet(cfg.model).layout, batches)
    with pytest.raises(DataError, match="addition_embed_type"):
        check_conditioning(None, batches)
    with pytest.raises(DataError, match="pooled width 32"):
        check_conditioning(ContextLayout((TEXT_WIDTH + BIGG_WIDTH), 16), batches)


def test_sampling_conditions_as_diffusers_sdxl(sdxl_run, sdxl):
    pipe = load_pipeline(sdxl_run, CPU)
    theirs = diffusers.StableDiffusionXLPipeline.from_pretrained(sdxl, local_files_only=True)
    prompt = ["green triangle"]
    embeds, _, pooled, _ = theirs.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
    add_time_ids = theirs._get_add_time_ids((16, 24), (0, 0), (16, 24), dtype=torch.float32,
                                            text_encoder_projection_dim=POOLED_WIDTH)
    context, our_pooled, ids = pipe.unet.layout.unpack(prompt_context(pipe.unet, pipe.text, prompt, (16, 24)))
    err = max((context - embeds).abs().max().item(), (our_pooled - pooled).abs().max().item())
    print(f"sampling conditioning vs StableDiffusionXLPipeline: max abs {err:.2e}")
    assert err <= 1e-6 and torch.equal(ids, add_time_ids)
    assert null_context(pipe.unet, pipe.text, None).shape[0] == 77 + pipe.unet.layout.pooled_rows
    cfg = load_config(sdxl_run / "config.yaml")
    images, captions = generate(pipe, prompt, cfg.eval, CPU, height=16, width=24)
    assert images.shape == (1, 3, 16, 24) and torch.isfinite(images).all() and captions == prompt


def test_export_is_a_diffusers_sdxl_pipeline_and_a_single_file(sdxl_run, sdxl, tmp_path):
    args = _args(sdxl, sdxl_run)
    out = tmp_path / "export"
    assert main(["export", *args, "--out", str(out), "--single-file", str(tmp_path / "mine.safetensors")]) == 0
    theirs = diffusers.StableDiffusionXLPipeline.from_pretrained(out, local_files_only=True)
    ours = load_pipeline(sdxl_run, CPU)
    state = theirs.unet.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in ours.unet.state_dict().items())
    embeds, _, pooled, _ = theirs.encode_prompt(["red circle"], device="cpu", do_classifier_free_guidance=False)
    context, our_pooled = ours.text.encode_with_pooled(["red circle"])
    assert torch.equal(embeds, context) and torch.equal(pooled, our_pooled)
    from ldm_train.pretrained.single_file import inspect_single_file
    assert inspect_single_file(tmp_path / "mine.safetensors")[0] == "sdxl"


def test_bucketed_sdxl_cache_conditions_each_batch_on_its_bucket(sdxl, tmp_path):
    """With data.buckets the target size of the ids is each bucket's (latent x VAE factor), per batch."""
    run = tmp_path / "run"
    args = _args(sdxl, run, "data.buckets.sizes=[[32, 16], [16, 16], [16, 32]]", "train.data_source=stream",
                 "train.batch_size=2", buckets=("data.buckets.area=null",))
    cfg = load_config("sdxl-finetune", args[2:])
    write_shards(_samples(6, 1, "t"), cfg.path(cfg.data.train_shards), "train", 8)
    write_shards(_samples(2, 2, "v"), cfg.path(cfg.data.val_shards), "val", 8)
    assert main(["encode", *args]) == 0
    batches = StreamBatches(run / "latents" / "train", LoaderConfig(num_workers=0, shuffle_buffer=8), 2, seed=0,
                            rank=0, world_size=1)
    layout, seen = ContextLayout(TEXT_WIDTH + BIGG_WIDTH, POOLED_WIDTH), set()
    for _ in range(3):
        z, packed = batches.next(CPU)
        ids = layout.unpack(packed)[2]
        target = [z.shape[-2] * 2.0, z.shape[-1] * 2.0]  # the tiny VAE downsamples by 2
        assert ids[:, 4:].tolist() == [target] * z.shape[0]
        seen.add(tuple(z.shape[-2:]))
    assert len(seen) > 1  # several buckets, each with its own target size
    assert main(["train", *args]) == 0
