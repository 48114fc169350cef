"""Typed configuration: one pydantic section per component, YAML files, dotted overrides.

Every section refuses unknown keys and wrong types (``extra="forbid"``, ``strict=True``).
Builders take their own section only (``build_unet(cfg.model)``), never the whole config.
"""
from __future__ import annotations

import difflib
import typing
from pathlib import Path
from typing import Annotated, Any, Iterator, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import UserError


class ConfigError(UserError):
    """A user mistake in a config file or override; the message names the key and the source."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True)


class RunConfig(Section):
    """Where outputs go. Every stage writes below ``dir``; see README "Where outputs go"."""

    dir: str = Field("runs/demo", description="the run folder every stage writes below; `{run}` in paths expands to it")
    seed: int = Field(0, description="seed of data order, noise and initialisation")


class EmojiDataConfig(Section):
    """The built-in dataset: Noto Color Emoji glyphs captioned with their English names."""

    font: str = Field(
        "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf",
        description="the Noto Color Emoji font file the glyphs are rendered from")
    resolution: int = Field(64, gt=0, description="rendered image size in pixels (square)")
    val_fraction: float = Field(
        0.05, ge=0.0, lt=1.0, description="fraction of glyphs put in the validation split (by key hash)")
    shard_size: int = Field(1000, gt=0, description="samples per output shard")
    limit: int | None = Field(None, description="keep the first N emoji only (tests, micro demo); null = all")


class ConvertDataConfig(Section):
    """``ldm-train data folder|hf``: the shards they write (train/ and val/, split by key hash)."""

    shard_size: int = Field(1000, gt=0, description="samples per output shard")
    val_fraction: float = Field(0.05, ge=0.0, lt=1.0, description="fraction of samples put in val/ (by key hash)")
    allow_empty_captions: bool = Field(
        False, description="folder: an image without NAME.txt gets \"\" instead of a skip")


class BucketsConfig(Section):
    """``data.buckets``: aspect-ratio buckets instead of square crops (``ldm_train.data.buckets``).
    Off by default (neither key set: square crops at ``data.resolution``). Either ``sizes``, an
    explicit list of ``[width, height]`` at about one area, or ``area`` with
    ``step`` and ``max_ratio``: every ``width`` a multiple of ``step``, its ``height`` the largest
    multiple of ``step`` with ``width * height <= area``, kept (with its transpose) when the longer
    side is at most ``max_ratio`` times the shorter. Each image goes to the bucket of nearest log aspect ratio and
    is resized to cover it and cropped (``data.crop``); an image that covers no bucket is skipped
    as ``too_small``. Sizes must be multiples of 8 x the autoencoder's downsampling factor
    (checked by ``encode``, which knows the autoencoder)."""

    sizes: list[list[int]] | None = Field(
        None, description="explicit buckets: [[width, height], ...] in pixels, at about one area; null = the grid (area), "
                    "or no buckets when area is null too")
    area: int | None = Field(
        None, gt=0, description="grid: the target area in pixels (e.g. 262144 = 512 x 512); null (and no sizes) = square crops")
    step: int = Field(64, gt=0, description="grid: widths and heights are multiples of this")
    max_ratio: float = Field(2.0, ge=1.0, description="grid: the longest side / the shortest side at most")

    @model_validator(mode="after")
    def _one_choice(self) -> "BucketsConfig":
        if self.sizes is not None and self.area is not None:
            raise ValueError("data.buckets: give either sizes (an explicit list) or area (the grid), not both")
        if self.sizes is None and self.area is None:
            return self
        if self.sizes is not None:
            grid_keys = sorted({"step", "max_ratio"} & self.model_fields_set)
            if grid_keys:
                raise ValueError(f"data.buckets.{grid_keys[0]} belongs to the grid (area); with an explicit sizes list, remove it")
            _check_bucket_list(self.sizes)
        elif not self.grid():
            raise ValueError(f"data.buckets: no bucket of area <= {self.area} with sides multiples of {self.step}")
        return self

    @property
    def enabled(self) -> bool:
        return self.sizes is not None or self.area is not None

    def grid(self) -> list[tuple[int, int]]:
        """The generated buckets (``area``, ``step``, ``max_ratio``), sorted by aspect ratio."""
        out = set()
        for w in range(self.step, self.area // self.step + 1, self.step):
            h = self.area // w // self.step * self.step
            if h >= self.step and max(w, h) <= self.max_ratio * min(w, h):
                out.update({(w, h), (h, w)})  # both orientations, as kohya's sd-scripts make them
        return sorted(out, key=lambda s: (s[0] / s[1], s[0]))

    def resolved(self) -> list[tuple[int, int]]:
        """The buckets as ``(width, height)``: ``sizes`` as given, or the grid."""
        return [(w, h) for w, h in self.sizes] if self.sizes is not None else self.grid()


def _check_bucket_list(sizes: list[list[int]]) -> None:
    """Each entry a pair of positive ints; no entry twice, and no two of one aspect ratio (the
    second would never be chosen). Names the entry."""
    seen: dict[tuple[int, int], int] = {}
    for i, entry in enumerate(sizes):
        if len(entry) != 2 or min(entry) <= 0:
            raise ValueError(f"data.buckets.sizes[{i}] = {entry}: a bucket is [width, height], both positive")
        w, h = entry
        for (ow, oh), j in seen.items():
            if (ow, oh) == (w, h):
                raise ValueError(f"data.buckets.sizes[{i}] = {entry} repeats data.buckets.sizes[{j}]")
            if ow * h == oh * w:
                raise ValueError(f"data.buckets.sizes[{i}] = {entry} has the aspect ratio of data.buckets.sizes[{j}] = "
                                 f"{[ow, oh]}: it would never be chosen")
        seen[(w, h)] = i


class DataConfig(Section):
    """Image-caption WebDataset shards (img2dataset layout: KEY.png|jpg|webp, KEY.txt, KEY.json).

    ``*_shards`` is a folder (every ``*.tar`` in it), a brace pattern (``data/{00000..00099}.tar``)
    or a ``pipe:`` URL. Reading: the shorter side becomes ``resolution`` and a square is cropped
    (``crop``: centre, or random seeded by ``crop_seed`` and the key); images whose shorter side
    is below ``min_size`` are skipped as ``too_small``. A shard that cannot be read is named and
    the rest is read; the command then fails unless ``tolerate_failed_shards``."""

    train_shards: str = Field(
        "{run}/data/train", description="training image shards: a folder, a brace pattern or a pipe: URL")
    val_shards: str = Field(
        "{run}/data/val", description="validation image shards: a folder, a brace pattern or a pipe: URL")
    resolution: int = Field(64, gt=0, description="the shorter side is resized to this, then a square is cropped")
    crop: Literal["center", "random"] = Field(
        "center", description="which square is cropped: the centre, or a random one seeded by crop_seed and the key")
    crop_seed: int = Field(0, description="seed of random crops")
    min_size: int = Field(0, ge=0, description="images whose shorter side is below this are skipped as too_small")
    tolerate_failed_shards: bool = Field(
        False, description="exit 0 although some shards could not be read (they are named)")
    buckets: BucketsConfig = BucketsConfig()
    emoji: EmojiDataConfig = EmojiDataConfig()
    convert: ConvertDataConfig = ConvertDataConfig()

    def read_options(self, buckets: bool = True) -> dict:
        """Keyword arguments of ``ldm_train.data.shards.iter_samples`` / ``load_images``; with
        ``data.buckets`` (and ``buckets``), the resolved ``buckets`` list too."""
        options = {"min_size": self.min_size, "crop": self.crop, "seed": self.crop_seed}
        if buckets and self.buckets.enabled:
            options["buckets"] = self.buckets.resolved()
        return options


class VAETrainConfig(Section):
    """``ldm-train train-vae``: how the autoencoder is trained."""

    steps: int = Field(700, ge=0, description="optimizer steps of train-vae")
    batch_size: int = Field(32, gt=0, description="images per step")
    crop: int | None = Field(
        32, description="train on random crops of this size (fully convolutional); null = whole images")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate")
    kl_weight: float = Field(1e-6, ge=0, description="weight of the KL term against the reconstruction loss")
    log_every: int = Field(50, gt=0, description="log the losses every N steps")


class AutoencoderConfig(Section):
    """Stage 1. ``path`` is a diffusers ``AutoencoderKL`` folder: pretrained, or written by train-vae."""

    path: str = Field("{run}/vae", description="diffusers AutoencoderKL folder: pretrained, or written by train-vae")
    block_out_channels: list[int] = Field([16, 32, 64], description="channels of each encoder/decoder level")
    layers_per_block: int = Field(1, gt=0, description="resnet blocks per level")
    latent_channels: int = Field(4, gt=0, description="channels of the latent")
    norm_num_groups: int = Field(8, gt=0, description="GroupNorm groups")
    dtype: Literal["fp32", "fp16", "bf16"] = Field("fp32", description="dtype the VAE runs in when encoding/decoding")
    train: VAETrainConfig = VAETrainConfig()


class TransformersTextConfig(Section):
    """``text.encoder: transformers``: a Hugging Face ``CLIPTextModel`` and its ``CLIPTokenizer``, as
    Stable Diffusion 1.x (and 2.x in diffusers' layout) ship them. Read from ``path`` by every stage;
    nothing is copied into the run folder."""

    path: str | None = Field(
        None, description="a CLIPTextModel folder (config.json + weights), or a folder holding text_encoder/ and tokenizer/ (an SD pipeline)")
    tokenizer: str | None = Field(
        None, description="its CLIPTokenizer folder; null = tokenizer/ beside text_encoder/ (or inside path)")


class SDXLTextConfig(Section):
    """``text.encoder: sdxl``: SDXL's two towers (CLIP ViT-L + OpenCLIP ViT-bigG with projection) in a
    diffusers ``StableDiffusionXLPipeline`` folder; read from ``path`` by every stage. Set ``text.layer:
    penultimate`` (SDXL's choice)."""

    path: str | None = Field(
        None, description="an SDXL pipeline folder holding text_encoder/, tokenizer/, text_encoder_2/, tokenizer_2/")


class TextConfig(Section):
    """Frozen text tower. ``encoder: open_clip`` (the default): ``dir`` holds ``open_clip_config.json`` and
    ``open_clip_model.safetensors``. When it is empty the tower is built from ``model_name`` (an
    open_clip architecture such as ``ViT-H-14``) or, when that is null, from the tiny
    ``width/layers/heads`` config; weights come from ``pretrained`` (a local open_clip checkpoint
    file, or a folder in open_clip's layout such as ``train-clip``'s ``{run}/clip``, the demo's choice: then
    the architecture is the folder's and width/layers/heads/context_length are unused) or, when null,
    random init from ``seed`` (see README). It is then saved
    to ``dir`` so every later stage reloads exactly the same tower."""

    dir: str = Field("{run}/text", description="folder of the saved text tower (open_clip_config.json + weights)")
    model_name: str | None = Field(
        None, description="an open_clip architecture (e.g. ViT-H-14); null = the tiny width/layers/heads tower")
    width: int = Field(128, gt=0, description="tiny tower: transformer width")
    layers: int = Field(2, gt=0, description="tiny tower: transformer layers")
    heads: int = Field(4, gt=0, description="tiny tower: attention heads")
    context_length: int = Field(32, gt=0, description="tokens per caption (tiny tower)")
    pretrained: str | None = Field(
        "{run}/clip", description="a local open_clip checkpoint file (of model_name), or an open_clip folder "
                                  "(open_clip_config.json + weights, e.g. train-clip's clip.dir); null = random init from seed")
    seed: int = Field(1234, description="seed of the random init when pretrained is null")
    encoder: Literal["open_clip", "transformers", "sdxl"] = Field(
        "open_clip", description="open_clip: the tower in dir (above keys); transformers: a CLIPTextModel (text.transformers); "
                                 "sdxl: SDXL's two towers (text.sdxl)")
    layer: Literal["last", "penultimate"] | Annotated[int, Field(ge=1)] = Field(
        "last", description="hidden states the U-Net attends to, then the final LayerNorm: last, penultimate (SD 2.x), "
                            "or kohya's clip skip N (1 = last, 2 = penultimate)")
    transformers: TransformersTextConfig = TransformersTextConfig()
    sdxl: SDXLTextConfig = SDXLTextConfig()


class ClipVisionConfig(Section):
    """``clip.vision``: open_clip's ViT image tower of the CLIP ``train-clip`` trains (open_clip ``vision_cfg``)."""

    image_size: int = Field(32, gt=0, description="pixels the images are resized to (open_clip's eval transform)")
    patch_size: int = Field(8, gt=0, description="ViT patch size in pixels")
    width: int = Field(128, gt=0, description="ViT width")
    layers: int = Field(3, gt=0, description="ViT layers")
    head_width: int = Field(32, gt=0, description="channels per attention head")


class ClipTextConfig(Section):
    """``clip.text``: the CLIP's text tower (open_clip ``text_cfg``); the demo's frozen text encoder."""

    width: int = Field(128, gt=0, description="transformer width (= model.cross_attention_dim when it conditions the U-Net)")
    layers: int = Field(2, gt=0, description="transformer layers")
    heads: int = Field(4, gt=0, description="attention heads")
    context_length: int = Field(24, gt=0, description="tokens per caption (the emoji names need at most 17)")


class ClipTrainConfig(Section):
    """``clip.train``: contrastive training as open_clip trains (InfoNCE both ways, learned temperature)."""

    steps: int = Field(200, ge=0, description="optimizer steps of train-clip")
    batch_size: int = Field(256, gt=1, description="image-caption pairs per step (the negatives of each other)")
    lr: float = Field(2e-3, gt=0, description="AdamW peak learning rate (then cosine to 0)")
    warmup_steps: int = Field(20, ge=0, description="linear warm-up steps")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay (not on gains, biases, logit_scale)")
    log_every: int = Field(20, gt=0, description="log the loss every N steps")


class ClipConfig(Section):
    """``ldm-train train-clip``: a small open_clip CLIP trained on the image-caption shards, saved in
    open_clip's folder layout (``open_clip_config.json`` + ``open_clip_model.safetensors``, what
    ``open_clip.create_model('local-dir:DIR')`` loads). ``text.pretrained`` and
    ``eval.metrics.clip_weights`` can name the folder like any open_clip checkpoint."""

    dir: str = Field("{run}/clip", description="the folder train-clip writes")
    embed_dim: int = Field(128, gt=0, description="width of the joint image-text embedding")
    vision: ClipVisionConfig = ClipVisionConfig()
    text: ClipTextConfig = ClipTextConfig()
    train: ClipTrainConfig = ClipTrainConfig()


class LoaderConfig(Section):
    """The streaming latent loader (:class:`ldm_train.latents.loader.LatentLoader`). The sample
    order depends on the seed, epoch, rank and world size only, never on ``num_workers``, so a
    resumed run may use another worker count. ``shuffle_buffer``: samples shuffled together (a
    seeded shuffle of consecutive blocks of this size of the rank's stream; shard order is
    permuted every epoch); also the unit of work of one worker. A cache encoded with ``data.buckets``
    gives batches of one bucket at a time (:mod:`ldm_train.latents.buckets`: a batch is then the
    unit of work, the last batch of each bucket in an epoch holds its remainder, and a resume
    keeps ``train.batch_size``)."""

    num_workers: int = Field(2, ge=0, description="DataLoader workers (the sample order does not depend on it)")
    shuffle_buffer: int = Field(1024, gt=0, description="samples shuffled together; also one worker's unit of work")
    prefetch_factor: int = Field(2, gt=0, description="batches each worker loads ahead")


class LatentsConfig(Section):
    """The latent cache written by ``encode``; training reads only these shards.

    ``shard_size``: samples per output part (each input shard gives one or more parts).
    ``dtype``: of the stored posterior and text embedding. ``store``: ``posterior`` (mean and std,
    a fresh latent each epoch) or ``sample`` (one fixed draw per image, seeded by run.seed and the
    key). ``text``: store the text tower's ``embedding`` or only the ``tokens``. Input shards that
    fail are retried by the next run; ``data.tolerate_failed_shards`` accepts them instead."""

    dir: str = Field("{run}/latents", description="folder of the latent shards written by encode")
    shard_size: int = Field(1000, gt=0, description="samples per output part")
    batch_size: int = Field(64, gt=0, description="images encoded together")
    dtype: Literal["fp16", "bf16"] = Field("fp16", description="dtype of the stored posterior and text embedding")
    store: Literal["posterior", "sample"] = Field(
        "posterior", description="posterior (mean and std: a fresh latent each epoch) or sample (one fixed draw)")
    text: Literal["embedding", "tokens"] = Field(
        "embedding", description="store the text tower's embedding, or only the tokens")
    loader: LoaderConfig = LoaderConfig()


class ModelConfig(Section):
    """Cross-attention U-Net (:class:`ldm_train.model.UNet`; the SD U-Net family). Keys are the
    constructor's; ``attention_levels[i]`` puts transformer blocks at level i.

    ``channels_per_head`` is channels per head (called ``attention_head_dim`` before: diffusers'
    ``attention_head_dim`` is the head *count*, SD 1.x: 8, SD 2.x: [5, 10, 20, 20];
    ``ldm_train.model.convert`` translates). ``num_attention_heads`` (one count per level)
    overrides ``channels_per_head`` when set.
    ``init_from`` is not an architecture key: a diffusers U-Net folder or a project U-Net folder
    whose weights the training loop loads (``load_unet_weights``) before the first step.
    """

    in_channels: int = Field(4, gt=0, description="latent channels in (autoencoder.latent_channels)")
    out_channels: int = Field(4, gt=0, description="channels out; 2 * in_channels when a learned variance is predicted")
    block_out_channels: list[int] = Field([32, 64, 128], description="channels of each U-Net level")
    attention_levels: list[bool] = Field(
        [False, True, True], description="per level: whether it has transformer (self + cross-attention) blocks")
    layers_per_block: int = Field(1, gt=0, description="resnet blocks per level")
    channels_per_head: int = Field(
        32, gt=0, description="channels per attention head (diffusers' attention_head_dim is the head count)")
    cross_attention_dim: int = Field(128, gt=0, description="width of the text embedding attended to")
    norm_num_groups: int = Field(32, gt=0, description="GroupNorm groups")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout in resnet blocks")
    num_attention_heads: list[int] | None = Field(
        None, description="heads per level; overrides channels_per_head when set")
    transformer_layers_per_block: int | list[int] = Field(
        1, description="transformer layers in each attention block (one, or one per level)")
    use_linear_projection: bool = Field(False, description="SD 2.x: nn.Linear proj_in/out; SD 1.x: 1x1 conv")
    flip_sin_to_cos: bool = Field(True, description="timestep embedding as cos, sin (SD) rather than sin, cos")
    freq_shift: int = Field(0, ge=0, description="timestep embedding frequency shift (SD: 0)")
    norm_eps: float = Field(1e-5, gt=0, description="GroupNorm epsilon")
    num_class_embeds: int | None = Field(None, gt=0, description="class-conditional: number of classes; null = none")
    upcast_attention: bool = Field(False, description="attention in fp32 under fp16/bf16 autocast (SD 2.1-v)")
    addition_embed_type: Literal["text_time"] | None = Field(
        None, description="text_time: SDXL's pooled-text + size/crop conditioning added to the time embedding; null = none")
    addition_time_embed_dim: int = Field(256, gt=0, description="text_time: sinusoid channels per size/crop id (SDXL: 256)")
    projection_class_embeddings_input_dim: int | None = Field(
        None, gt=0, description="text_time: pooled text width + 6 x addition_time_embed_dim (SDXL: 2816)")
    gradient_checkpointing: bool = Field(
        False, description="recompute activations in the backward pass (less memory, slower)")
    init_from: str | None = Field(
        None, description="a diffusers or project U-Net folder whose weights are loaded before the first step")


class LossConfig(Section):
    """L_simple's options (``ldm_train.diffusion.losses.simple``; formulation ``ddpm``).

    ``weighting``: ``uniform`` (DDPM), ``min_snr`` (Hang et al. 2023, ``min_snr_gamma``) or ``edm``
    (Karras et al. 2022, ``sigma_data``). ``offset_noise``: Guttenberg 2023. ``timestep_sampling``:
    ``uniform`` or ``logit_normal`` (SD3, ``logit_mean``/``logit_std``)."""

    weighting: Literal["uniform", "min_snr", "edm"] = Field(
        "uniform", description="uniform (DDPM), min_snr (Hang et al. 2023) or edm (Karras et al. 2022)")
    min_snr_gamma: float = Field(5.0, gt=0, description="weighting min_snr: the SNR clamp gamma")
    sigma_data: float = Field(0.5, gt=0, description="weighting edm: the data standard deviation")
    offset_noise: float = Field(0.0, ge=0, description="offset noise strength (Guttenberg 2023); 0 = off")
    timestep_sampling: Literal["uniform", "logit_normal"] = Field(
        "uniform", description="uniform, or logit_normal (SD3)")
    logit_mean: float = Field(0.0, description="logit_normal timestep sampling: mean")
    logit_std: float = Field(1.0, gt=0, description="logit_normal timestep sampling: standard deviation")


class IDDPMConfig(Section):
    """Improved DDPM (Nichol & Dhariwal 2021, sec. 3.1): the U-Net also outputs the interpolation v
    of its reverse variance (so ``model.out_channels = 2 * in_channels``) and trains with
    L_simple + ``vlb_weight`` * L_vlb; the ``ddpm`` sampler then uses that variance."""

    learned_variance: bool = Field(
        False, description="the U-Net also outputs its reverse variance (needs out_channels = 2 * in_channels)")
    vlb_weight: float = Field(0.001, ge=0, description="weight of L_vlb in the hybrid loss")


class SDEConfig(Section):
    """The SDE formulations of Song et al. 2021: ``vp_sde``/``subvp_sde`` use β(t) from
    ``beta_min`` to ``beta_max``; ``ve_sde`` uses σ(t) from ``sigma_min`` to ``sigma_max``.
    ``t_eps``: the smallest time trained on and integrated to."""

    beta_min: float = Field(0.1, gt=0, description="vp_sde/subvp_sde: beta(0)")
    beta_max: float = Field(20.0, gt=0, description="vp_sde/subvp_sde: beta(1)")
    sigma_min: float = Field(0.01, gt=0, description="ve_sde: sigma(0)")
    sigma_max: float = Field(50.0, gt=0, description="ve_sde: sigma(1)")
    t_eps: float = Field(1e-5, gt=0, lt=1, description="the smallest time trained on and integrated to")


class NCSNConfig(Section):
    """NCSN (Song & Ermon 2019/2020): ``num_scales`` geometric noise levels from ``sigma_max`` down
    to ``sigma_min``."""

    sigma_min: float = Field(0.01, gt=0, description="the smallest noise level")
    sigma_max: float = Field(50.0, gt=0, description="the largest noise level")
    num_scales: int = Field(232, gt=1, description="number of geometric noise levels")


class ScoreMatchingConfig(Section):
    """The objective of the score-based formulations: denoising (``dsm``) or sliced score matching
    (``ssm``, variance-reduced ``ssm_vr``; Song et al. 2019) with ``n_projections`` directions."""

    objective: Literal["dsm", "ssm", "ssm_vr"] = Field(
        "dsm", description="dsm (denoising), ssm or ssm_vr (sliced, Song et al. 2019)")
    n_projections: int = Field(1, gt=0, description="ssm/ssm_vr: random projection directions")


class DiffusionConfig(Section):
    """The forward process, its parameterisation and the training objective.

    ``formulation``: ``ddpm`` (Ho et al. 2020: the discrete schedule below, ``loss``, ``iddpm``), an
    SDE (``vp_sde``, ``subvp_sde``, ``ve_sde``: section ``sde``) or ``ncsn`` (section ``ncsn``); the
    score-based ones train with ``score_matching``. Each formulation reads only its own sections;
    ``ldm_train.diffusion.checks`` refuses combinations that do not fit together.
    ``prediction_type``: ``epsilon``, ``v_prediction`` (Salimans & Ho 2022) or ``sample`` (x0).
    ``rescale_betas_zero_snr``: Lin et al. 2024 (needs v or x0 prediction).
    """

    formulation: Literal["ddpm", "vp_sde", "subvp_sde", "ve_sde", "ncsn"] = Field(
        "ddpm", description="ddpm, an SDE (vp_sde, subvp_sde, ve_sde) or ncsn")
    # v (Salimans & Ho 2022) rather than eps: with eps, x0 = (x_t - sqrt(1-abar) eps) / sqrt(abar)
    # amplifies eps errors ~15x at the noisiest steps, which a small, briefly trained model shows.
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = Field(
        "v_prediction", description="what the U-Net predicts: epsilon, v_prediction or sample (x0)")
    cond_drop_prob: float = Field(
        0.1, ge=0.0, le=1.0, description="probability a caption is dropped in training (for classifier-free guidance)")
    num_train_timesteps: int = Field(1000, gt=0, description="ddpm: steps of the discrete schedule")
    beta_schedule: Literal["linear", "scaled_linear", "cosine"] = Field(
        "scaled_linear", description="ddpm: linear, scaled_linear (SD) or cosine (Nichol & Dhariwal)")
    beta_start: float = Field(0.00085, gt=0, description="ddpm: the first beta (linear/scaled_linear)")
    beta_end: float = Field(0.012, gt=0, description="ddpm: the last beta (linear/scaled_linear)")
    rescale_betas_zero_snr: bool = Field(
        False, description="zero terminal SNR (Lin et al. 2024; needs v or x0 prediction)")
    change_pretrained_schedule: bool = Field(
        False, description="with `pretrained`: train with this section's prediction_type/schedule although the "
                           "pretrained model was trained with another (e.g. fine-tuning epsilon -> v_prediction)")
    loss: LossConfig = LossConfig()
    iddpm: IDDPMConfig = IDDPMConfig()
    sde: SDEConfig = SDEConfig()
    ncsn: NCSNConfig = NCSNConfig()
    score_matching: ScoreMatchingConfig = ScoreMatchingConfig()


class OptimizerConfig(Section):
    """``train.optimizer``: which optimizer, and its keys (ldm_train.train.optim; the keys each one
    reads are ``optim.READS``, another key at a non-default value is refused)."""

    name: Literal["adamw", "adamw8bit", "adafactor", "prodigy", "lion"] = Field(
        "adamw", description="adamw, adamw8bit (bitsandbytes), adafactor, prodigy (prodigyopt; set train.lr=1.0), lion")
    betas: list[float] = Field(
        [0.9, 0.999], description="adamw, adamw8bit, prodigy, lion: the moment decays (Lion's paper: [0.9, 0.99])")
    weight_decay: float = Field(0.0, ge=0, description="decoupled weight decay (every optimizer)")
    eps: float = Field(1e-8, gt=0, description="adamw, adamw8bit, prodigy: the denominator's epsilon")
    fused: bool = Field(True, description="adamw: torch's fused kernel (not under DeepSpeed)")
    d_coef: float = Field(1.0, gt=0, description="prodigy: scales its estimated step size d")


class LRScheduleConfig(Section):
    """``train.lr_schedule``: a linear warm-up over ``warmup_steps``, then ``name`` from ``train.lr``
    down to ``min_lr_ratio * train.lr`` at ``train.steps`` (ldm_train.utils.lr)."""

    name: Literal["constant", "linear", "cosine", "cosine_restarts"] = Field(
        "cosine", description="after the warm-up: constant, linear, cosine or cosine_restarts")
    warmup_steps: int = Field(100, ge=0, description="linear learning-rate warm-up steps")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="linear, cosine, cosine_restarts: the final LR / train.lr")
    num_cycles: int = Field(1, gt=0, description="cosine_restarts: cosines, each restarting at train.lr")


class LoraConfig(Section):
    """``train.lora``: train a low-rank adapter (LoRA, Hu et al. 2021, through PEFT) on the frozen U-Net
    instead of its full weights (ldm_train.train.lora). ``target_modules`` are module names as in
    diffusers' UNet2DConditionModel, matched by PEFT as a suffix of the module path: the default is the
    attention projections (as diffusers' train_text_to_image_lora.py); add ``proj_in``, ``proj_out``,
    ``ff.net.0.proj``, ``ff.net.2`` (the transformer's feed-forward), ``conv1``, ``conv2``,
    ``conv_shortcut`` (resnets), ... for more capacity. Checkpoints then hold the adapter only. With
    ``text_encoder`` the CLIPTextModel gets its own adapter (``text_target_modules``; the same rank, alpha,
    dropout and init) and trains with the U-Net's on cached caption tokens (``latents.text: tokens``)."""

    enabled: bool = Field(False, description="train a LoRA adapter on the frozen U-Net instead of its full weights")
    rank: int = Field(4, gt=0, description="rank r of each adapter (lora_A: r x in, lora_B: out x r)")
    alpha: float | None = Field(
        None, gt=0, description="lora_alpha; the update is scaled by alpha / rank; null = rank (scale 1)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter's input (PEFT lora_dropout)")
    target_modules: list[str] = Field(
        ["to_q", "to_k", "to_v", "to_out.0"], min_length=1,
        description="module names (suffixes of U-Net module paths) that get an adapter; e.g. add proj_in, proj_out, "
                    "ff.net.0.proj, ff.net.2, conv1, conv2")
    init: Literal["default", "gaussian", "orthogonal", "pissa", "olora"] = Field(
        "default", description="PEFT init_lora_weights: default (kaiming A, zero B), gaussian, orthogonal (even rank, "
                               "linear only), pissa or olora (these two move the principal part out of the base weights)")
    text_encoder: bool = Field(
        False, description="also a LoRA on the text encoder (text.encoder: transformers; needs latents.text: tokens, "
                           "the tower then runs per batch)")
    text_target_modules: list[str] = Field(
        ["q_proj", "k_proj", "v_proj", "out_proj"], min_length=1,
        description="with text_encoder: module names (suffixes of CLIPTextModel module paths) that get an adapter")
    init_from: str | None = Field(
        None, description="an existing LoRA (PEFT/diffusers or kohya .safetensors) to continue training")


class TrainConfig(Section):
    """Optimisation of the denoiser."""

    steps: int = Field(1500, ge=0, description="optimizer steps")
    batch_size: int = Field(
        32, gt=0, description="samples per optimizer step on each rank (before gradient accumulation)")
    lr: float = Field(1e-3, gt=0, description="peak learning rate (after the warm-up; then train.lr_schedule)")
    optimizer: OptimizerConfig = OptimizerConfig()
    lr_schedule: LRScheduleConfig = LRScheduleConfig()
    grad_clip: float = Field(1.0, ge=0, description="clip the gradient norm to this; 0 = off")
    size_cond_drop_prob: float = Field(
        0.0, ge=0.0, le=1.0, description="SDXL: probability of zeroing a sample's size/crop ids (micro-conditioning dropout)")
    # One EMA per decay (the first is the one sampling and export use; the others are kept in
    # checkpoints as ``ema@DECAY``). Updated every ``ema_every`` optimizer steps; the decay applies
    # per update. Warm-up: decay_t = min(decay, (1 + t) / (10 + t)) for update t.
    ema_decays: list[Annotated[float, Field(ge=0.0, lt=1.0)]] = Field(
        [0.999], min_length=1, description="one EMA per decay; the first is the one sampling and export use")
    ema_every: int = Field(1, gt=0, description="update the EMAs every N optimizer steps")
    ema_warmup: bool = Field(True, description="decay_t = min(decay, (1 + t) / (10 + t)) for update t")
    log_every: int = Field(50, gt=0, description="log the loss every N steps")
    checkpoint_every: int = Field(1000, gt=0, description="save a checkpoint every N steps")
    # memory: random batches from the split held in memory (small sets). stream: the latent
    # shards streamed by latents.loader, each rank its share, resumable exactly (any size).
    data_source: Literal["memory", "stream"] = Field(
        "memory", description="memory (random batches of the split held in memory) or stream (the latent shards)")
    keep_checkpoints: int = Field(3, gt=0, description="keep the last K checkpoints; milestones are kept on top")
    milestones: list[int] = Field([], description="steps whose checkpoints are never deleted")
    # The loop copies a checkpoint to host memory and a writer thread writes it while training goes
    # on (DeepSpeed's own partitioned files stay synchronous); see ldm_train/train/async_save.py.
    # Opt-in: on 2 CPU cores the demo's steps ran ~1.5x slower after the first background save
    # (the OpenMP worker of the training thread did less work; cause not yet found).
    async_save: bool = Field(False, description="write checkpoints on a background thread from a host copy")
    verify_checkpoints: bool = Field(
        True, description="check every checkpoint file's sha256 before resuming; false = sizes only")
    max_nonfinite_steps: int = Field(5, gt=0, description="K non-finite losses/gradients in a row stop the run")
    watchdog_seconds: float = Field(600.0, ge=0, description="report a rank whose step takes longer; 0 = off")
    # The ranks agree on a preemption signal by one all-reduce, which makes the host wait for the
    # device; every 10 steps keeps that off the steady state and still stops within seconds at
    # typical GPU step times (0.05-0.5 s). A single process checks its own flag every step (free).
    signal_check_every: int = Field(
        10, gt=0, description="multi-process runs agree on SIGUSR1/SIGTERM every N steps (one all-reduce)")
    tensorboard: bool = Field(True, description="scalars to {run}/tensorboard (rank 0)")
    wandb_project: str | None = Field(None, description="also log to Weights & Biases (needs `pip install wandb`)")
    peak_tflops: float | None = Field(None, gt=0, description="per device, for MFU; null = known GPUs only")
    eval_every: int = Field(
        0, ge=0, description="sample grids on the EMA weights every N steps and at the end; 0 = off")
    # Speed: torch.compile of the model, channels_last memory format (the fused AdamW kernel: train.optimizer.fused).
    compile: bool = Field(False, description="torch.compile the model")
    channels_last: bool = Field(False, description="channels_last memory format")
    lora: LoraConfig = LoraConfig()


class DistributedConfig(Section):
    """How the loop is distributed (see ldm_train.train.strategy). The launcher (torchrun,
    ``accelerate launch``, srun) sets the processes; this section says what they do."""

    # ddp: every rank holds everything (also a single process). zero1/zero2/zero3: DeepSpeed ZeRO
    # partitions optimizer states / + gradients / + parameters across ranks, through Accelerate.
    strategy: Literal["ddp", "zero1", "zero2", "zero3"] = Field(
        "ddp", description="ddp (every rank holds everything) or DeepSpeed ZeRO stage 1/2/3")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field("no", description="no, bf16 or fp16 autocast")
    gradient_accumulation_steps: int = Field(1, gt=0, description="micro-batches per optimizer step")
    offload_optimizer: bool = Field(False, description="ZeRO: optimizer states in CPU memory (DeepSpeedCPUAdam)")
    offload_params: bool = Field(False, description="ZeRO-3: parameters in CPU memory")
    # Each rank keeps the EMA of 1/world of the weights. Always so under zero3 (a rank only holds
    # its partition); optional for ddp/zero1/zero2, where it saves memory at no extra traffic.
    ema_sharded: bool = Field(
        False, description="each rank keeps the EMA of 1/world of the weights (always so under zero3)")
    deepspeed_config: str | None = Field(None, description="a DeepSpeed JSON to start from (launch/deepspeed/*.json)")
    cpu: bool = Field(False, description="force CPU even where a GPU is present")


class MetricsConfig(Section):
    """FID/KID/CLIP score (``ldm_train.eval.metrics``; the pinned FID protocol is in its docstring).
    Weights are local files only: without them the metric is reported as unavailable, naming the key."""

    inception_weights: str | None = Field(
        None, description="torch-fidelity's pt_inception-2015-12-05-6726825d.pth; null = FID/KID unavailable")
    fid_feature: Literal[64, 192, 768, 2048] = Field(2048, description="Inception feature layer of FID/KID")
    fid_resize: Literal["tf1_bilinear", "bilinear_antialias"] = Field(
        "tf1_bilinear", description="how images are resized to 299: TF1 bilinear (the reference) or antialiased")
    fid_reference_dir: str = Field("{run}/eval/fid_reference", description="cache of the reference images' statistics")
    kid_subset_size: int = Field(1000, gt=0, description="samples per KID subset")
    kid_subsets: int = Field(100, gt=0, description="KID subsets averaged")
    clip_model: str | None = Field("ViT-B-32", description="open_clip architecture of the CLIP score; null = off")
    clip_weights: str | None = Field(
        "{run}/clip", description="a local open_clip checkpoint of clip_model, or an open_clip folder (its own "
                                  "architecture; e.g. train-clip's clip.dir); null = CLIP metrics unavailable")


class EvalConfig(Section):
    """Sampling for grids and metrics.

    ``sampler`` names an entry of ``ldm_train.diffusion.samplers.SAMPLERS`` (ddim, ddpm, euler, heun,
    dpmpp_2m for formulation ddpm; pf_ode, pc for the SDEs; annealed_langevin for ncsn).
    ``samplers.NAME`` holds that sampler's own settings (its keyword-only parameters, e.g.
    ``samplers.ddim.eta``); the ones not given keep the sampler's defaults. Checked against the
    registry when the config is validated."""

    sampler: str = Field("ddim", description="a sampler of ldm_train.diffusion.samplers.SAMPLERS")
    steps: int = Field(50, gt=0, description="sampling steps")
    samplers: dict[str, dict[str, Any]] = Field(
        {}, description="samplers.NAME: that sampler's own settings (the ones not given keep its defaults)")
    guidance_scale: float = Field(3.0, ge=0.0, description="classifier-free guidance scale; 1 = none")
    guidance_sweep: list[float] = Field([], description="evaluation during training: one grid + metrics per scale")
    seed: int = Field(0, description="seed of the start noise")
    samples_per_prompt: int = Field(4, gt=0, description="images per prompt in grids")
    width: int | None = Field(
        None, gt=0, description="sampled image width in pixels (grids, eval, sample); null = the trained size "
                                "(with data.buckets: the bucket nearest to square)")
    height: int | None = Field(
        None, gt=0, description="sampled image height in pixels; null = the trained size; `sample --height` wins")
    # Images sampled together; halved and retried when the GPU runs out of memory (so the
    # batch ends up sized to memory), which changes images only for the stochastic samplers.
    batch_size: int = Field(
        64, gt=0, description="images sampled together; halved and retried when the GPU runs out of memory")
    # Held-out captions of the emoji set's validation split (checked by the demo): colours, faces,
    # objects, a flag, a skin tone, each made only of words that training captions use in other
    # combinations ("north korea": "south korea"). A word no training caption has (tomato, cactus,
    # finland, pensive) has an untrained token embedding: no model trained on this data can follow
    # it (the demo CLIP's own retrieval of the real emoji of the earlier list was 4/8; of this one 7/8).
    # Empty = the first validation captions.
    prompts: list[str] = Field([
        "slightly smiling face",
        "smiling face with heart-eyes",
        "brown heart",
        "green apple",
        "small blue diamond",
        "waxing crescent moon",
        "north korea",
        "santa claus medium skin tone",
    ], description="captions of the grids; empty = the first validation captions")
    metrics: MetricsConfig = MetricsConfig()

    def sampler_settings(self) -> dict[str, Any]:
        """The configured settings of the chosen sampler (the others' are kept, unused)."""
        return dict(self.samplers.get(self.sampler, {}))


class ExportConfig(Section):
    """``ldm-train export``: the inference folder (EMA U-Net, VAE, text tower, scheduler)."""

    dir: str = Field("{run}/export", description="the inference folder export writes")
    dtype: Literal["fp32", "fp16", "bf16"] = Field("fp32", description="dtype of the exported weights")


class SlurmConfig(Section):
    """``ldm-train slurm submit``: what the job script (rendered from ``slurm/job.sbatch``) asks
    Slurm for and runs on each node. The flags of ``submit`` (--partition, --time, ...) override
    the keys of the same name. See README "Slurm"."""

    partition: str | None = Field(None, description="#SBATCH --partition; null = the cluster default")
    account: str | None = Field(None, description="#SBATCH --account")
    qos: str | None = Field(None, description="#SBATCH --qos")
    constraint: str | None = Field(None, description="#SBATCH --constraint (node features)")
    time: str | None = Field(None, description="time limit, e.g. \"24:00:00\"; null = the partition's default limit")
    exclusive: bool = Field(False, description="#SBATCH --exclusive")
    cpus_per_task: int | None = Field(None, gt=0, description="CPUs for each node's launcher (all its ranks)")
    sbatch_args: list[str] = Field([], description="further #SBATCH options, e.g. [\"--mem=0\", \"--mail-type=FAIL\"]")
    # USR1 this long before the time limit: the ranks save, the job requeues itself. Also how long
    # torchrun lets the ranks save before it kills them (TORCH_ELASTIC_SHUTDOWN_TIMEOUT).
    signal_seconds: int = Field(
        300, gt=0, description="USR1 this long before the time limit: the ranks save, the job requeues itself")
    max_requeues: int = Field(10, ge=0, description="a preempted job comes back at most this many times")
    port: int = Field(29500, gt=1023, lt=64536, description="rendezvous port = port + job id % 1000")
    launcher: Literal["torchrun", "accelerate"] = Field("torchrun", description="what starts the ranks on each node")
    accelerate_config: str | None = Field(None, description="accelerate launcher: its --config_file")
    cpu_processes_per_node: int = Field(1, gt=0, description="processes per node when --gpus-per-node is 0")
    python: str | None = Field(None, description="the interpreter on the nodes; null = the one running submit")
    modules: list[str] = Field([], description="`module load` each first, e.g. [\"cuda/12.4\", \"nccl/2.21\"]")
    setup: list[str] = Field([], description="shell lines run before the launch, e.g. [\"source ~/venv/bin/activate\"]")
    env: dict[str, str] = Field({}, description="exported in the job, e.g. {\"NCCL_SOCKET_IFNAME\": \"ib0\"}")
    entry_module: str = Field("ldm_train.cli", description="what each rank runs (python -m); change only to wrap it")
    template: str | None = Field(None, description="a job template of your own; null = slurm/job.sbatch")


class Config(Section):
    pretrained: str | None = Field(
        None, description="start from Stable Diffusion: a diffusers pipeline folder or a single-file checkpoint "
                          "(.safetensors/.ckpt, SD 1.x/2.x layout); sets the U-Net, VAE, text tower and schedule "
                          "(keys set explicitly win; a contradicting prediction type or schedule is refused)")
    run: RunConfig = RunConfig()
    data: DataConfig = DataConfig()
    autoencoder: AutoencoderConfig = AutoencoderConfig()
    clip: ClipConfig = ClipConfig()
    text: TextConfig = TextConfig()
    latents: LatentsConfig = LatentsConfig()
    model: ModelConfig = ModelConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    train: TrainConfig = TrainConfig()
    distributed: DistributedConfig = DistributedConfig()
    eval: EvalConfig = EvalConfig()
    export: ExportConfig = ExportConfig()
    slurm: SlurmConfig = SlurmConfig()

    @model_validator(mode="after")
    def _text_lora_needs_tokens(self) -> "Config":
        lora = self.train.lora
        if lora.text_encoder and self.latents.text != "tokens":
            raise ValueError("train.lora.text_encoder: true trains the text encoder, so its embeddings cannot be "
                             f"cached: set latents.text: tokens (not {self.latents.text}) and encode again")
        return self

    def path(self, template: str) -> Path:
        """Expand ``{run}`` in a path template; every ``*.dir``/``*.path`` key goes through here."""
        return Path(template.replace("{run}", self.run.dir))

    def shards(self, template: str) -> str:
        """Like :meth:`path` for shard specs, which may be brace patterns or ``pipe:`` URLs."""
        return template.replace("{run}", self.run.dir)


# Keys that moved into nested sections (issue 12) or were renamed, old -> new places. A config naming an old key is
# refused with its new place; a run folder's config.yaml written before the move is read with
# ``migrate=True``, which moves each old key (to every new place, where one key served several).
MOVED: dict[str, tuple[str, ...]] = {
    **{f"diffusion.{k}": (f"diffusion.loss.{k}",) for k in (
        "min_snr_gamma", "sigma_data", "offset_noise", "timestep_sampling", "logit_mean", "logit_std")},
    "diffusion.loss_weighting": ("diffusion.loss.weighting",),
    "diffusion.learned_variance": ("diffusion.iddpm.learned_variance",),
    "diffusion.vlb_weight": ("diffusion.iddpm.vlb_weight",),
    "diffusion.objective": ("diffusion.score_matching.objective",),
    "diffusion.n_projections": ("diffusion.score_matching.n_projections",),
    "diffusion.sde_beta_min": ("diffusion.sde.beta_min",),
    "diffusion.sde_beta_max": ("diffusion.sde.beta_max",),
    "diffusion.sigma_min": ("diffusion.sde.sigma_min", "diffusion.ncsn.sigma_min"),
    "diffusion.sigma_max": ("diffusion.sde.sigma_max", "diffusion.ncsn.sigma_max"),
    "diffusion.num_scales": ("diffusion.ncsn.num_scales",),
    "diffusion.t_eps": ("diffusion.sde.t_eps",),
    "eval.eta": ("eval.samplers.ddim.eta",),
    "eval.spacing": ("eval.samplers.ddim.spacing", "eval.samplers.ddpm.spacing"),
    "eval.s_churn": ("eval.samplers.euler.s_churn", "eval.samplers.heun.s_churn"),
    "eval.pc_predictor": ("eval.samplers.pc.predictor",),
    "eval.pc_corrector": ("eval.samplers.pc.corrector",),
    "eval.snr": ("eval.samplers.pc.snr",),
    "eval.n_corrector": ("eval.samplers.pc.n_corrector",),
    "eval.langevin_steps_per_sigma": ("eval.samplers.annealed_langevin.steps_per_sigma",),
    "eval.langevin_step_lr": ("eval.samplers.annealed_langevin.step_lr",),
    **{f"eval.{k}": (f"eval.metrics.{k}",) for k in (
        "inception_weights", "fid_feature", "fid_resize", "fid_reference_dir", "kid_subset_size", "kid_subsets",
        "clip_model", "clip_weights")},
    "model.attention_head_dim": ("model.channels_per_head",),  # diffusers' name for the head count
    "train.betas": ("train.optimizer.betas",),
    "train.weight_decay": ("train.optimizer.weight_decay",),
    "train.fused_optimizer": ("train.optimizer.fused",),
    "train.warmup_steps": ("train.lr_schedule.warmup_steps",),
}
# Old sampler settings at these values were the defaults every config.yaml spelled out; they stay
# defaults (not copied into eval.samplers) so an old run compares equal to a new one.
_OLD_SAMPLER_DEFAULTS = {"eval.eta": 0.0, "eval.spacing": "leading", "eval.s_churn": 0.0,
                         "eval.pc_predictor": "reverse_diffusion", "eval.pc_corrector": "langevin",
                         "eval.snr": 0.16, "eval.n_corrector": 1, "eval.langevin_steps_per_sigma": 5,
                         "eval.langevin_step_lr": 2e-5}
RENAMED_SAMPLERS = {"iddpm": "ddpm"}  # iddpm was an exact alias of ddpm
_WHY = {"model.attention_head_dim": " (channels per head; diffusers' attention_head_dim is the head count:"
                                    " model.num_attention_heads)"}

# What users of diffusers' train_text_to_image.py / kohya sd-scripts / SimpleTuner type, -> our key.
# An unknown key of one of these names is answered with ours (a key in MOVED: its new place).
ALIASES: dict[str, str] = {
    "learning_rate": "train.lr", "max_train_steps": "train.steps", "train_batch_size": "train.batch_size",
    "lr_warmup_steps": "train.warmup_steps", "max_grad_norm": "train.grad_clip", "use_ema": "train.ema_decays",
    "ema_decay": "train.ema_decays", "checkpointing_steps": "train.checkpoint_every",
    "save_every_n_steps": "train.checkpoint_every", "checkpoints_total_limit": "train.keep_checkpoints",
    "validation_steps": "train.eval_every", "sample_every_n_steps": "train.eval_every",
    "tracker_project_name": "train.wandb_project", "adam_beta1": "train.betas", "adam_beta2": "train.betas",
    "adam_weight_decay": "train.weight_decay", "adam_epsilon": "train.optimizer.eps",
    "optimizer_type": "train.optimizer.name", "use_8bit_adam": "train.optimizer.name",
    "lr_scheduler": "train.lr_schedule.name", "lr_num_cycles": "train.lr_schedule.num_cycles",
    "gradient_accumulation_steps": "distributed.gradient_accumulation_steps",
    "mixed_precision": "distributed.mixed_precision", "output_dir": "run.dir", "seed": "run.seed",
    "resolution": "data.resolution", "center_crop": "data.crop", "train_data_dir": "data.train_shards",
    "dataloader_num_workers": "latents.loader.num_workers", "max_data_loader_n_workers": "latents.loader.num_workers",
    "noise_offset": "diffusion.loss.offset_noise", "snr_gamma": "diffusion.loss.min_snr_gamma",
    "prediction_type": "diffusion.prediction_type", "v_parameterization": "diffusion.prediction_type",
    "zero_terminal_snr": "diffusion.rescale_betas_zero_snr", "pretrained_model_name_or_path": "model.init_from",
    "validation_prompts": "eval.prompts", "validation_prompt": "eval.prompts", "sample_sampler": "eval.sampler",
    "validation_guidance": "eval.guidance_scale", "validation_num_inference_steps": "eval.steps",
    "num_inference_steps": "eval.steps",
}


def _is_section(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def dotted_fields(model: type[BaseModel] | None = None, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, pydantic field) of every leaf key of ``model`` (default :class:`Config`), nested
    sections included, in schema order."""
    for name, field in (Config if model is None else model).model_fields.items():
        if _is_section(field.annotation):
            yield from dotted_fields(field.annotation, f"{prefix}{name}.")
        else:
            yield prefix + name, field


def _section_model(path: list[str]) -> type[BaseModel] | None:
    model: type[BaseModel] = Config
    for key in path:
        field = model.model_fields.get(key)
        if field is None or not _is_section(field.annotation):
            return None
        model = field.annotation
    return model


def _live(key: str) -> str | None:
    """``key`` where it is now (following MOVED), or None when the schema has no such key."""
    key = MOVED.get(key, (key,))[0]
    *parents, name = key.split(".")
    section = _section_model(parents)
    return key if section is not None and name in section.model_fields else None


def suggest(dotted: str) -> str:
    """``; did you mean ...?`` for an unknown key (empty when nothing is close): an alias of the
    diffusers/kohya name, the closest names of its section, or the key's name in another section."""
    *parents, name = dotted.split(".")
    if name in ALIASES and (target := _live(ALIASES[name])) and target != dotted:
        return f"; did you mean {target}? (diffusers/kohya: {name})"
    section = _section_model(parents)
    if section is not None:
        close = difflib.get_close_matches(name, list(section.model_fields), n=3, cutoff=0.6)
        if close:
            return "; did you mean " + " or ".join(".".join([*parents, c]) for c in close) + "?"
    everywhere = [key for key, _ in dotted_fields()]
    misplaced = [key for key in everywhere if key.rsplit(".", 1)[-1] == name]
    leaves = {key.rsplit(".", 1)[-1]: key for key in reversed(everywhere)}
    close = misplaced or [leaves[n] for n in difflib.get_close_matches(name, list(leaves), n=3, cutoff=0.75)]
    close = close or difflib.get_close_matches(dotted, everywhere, n=3, cutoff=0.6)
    return ("; did you mean " + " or ".join(close[:3]) + "?") if close else ""


def _pop_dotted(tree: dict, dotted: str) -> tuple[bool, Any]:
    *parents, last = dotted.split(".")
    node = tree
    for key in parents:
        node = node.get(key)
        if not isinstance(node, dict):
            return False, None
    return (True, node.pop(last)) if last in node else (False, None)


def _has_dotted(tree: dict, dotted: str) -> bool:
    node: Any = tree
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return False
        node = node[key]
    return True


def moved_keys(tree: dict) -> dict[str, str]:
    """{old key in ``tree``: where it is now} (empty when the tree has none)."""
    found = {old: f"moved to {' and '.join(new)}{_WHY.get(old, '')}" for old, new in MOVED.items()
             if _has_dotted(tree, old)}
    sampler = tree.get("eval", {}).get("sampler") if isinstance(tree.get("eval"), dict) else None
    if isinstance(sampler, str) and sampler in RENAMED_SAMPLERS:
        new = RENAMED_SAMPLERS[sampler]
        found["eval.sampler"] = f"{sampler!r} was an alias of {new!r}; use eval.sampler={new}"
    return found


def is_resolved(tree: dict) -> bool:
    """Whether ``tree`` is a resolved config as :func:`dump_config` writes it (every section spelled
    out), rather than a hand-written file: those written by an older version are migrated."""
    sections = [k for k, f in Config.model_fields.items() if _is_section(f.annotation)]
    return set(tree) == set(Config.model_fields) and all(isinstance(tree[k], dict) for k in sections)


def migrate(tree: dict) -> dict:
    """A config tree written before the keys moved, in today's layout (a deep copy; new keys given
    explicitly win over old ones)."""
    tree = yaml.safe_load(yaml.safe_dump(tree))  # deep copy of plain data
    for old, new in MOVED.items():
        found, value = _pop_dotted(tree, old)
        if not found or _OLD_SAMPLER_DEFAULTS.get(old, object()) == value:
            continue
        for dotted in new:
            if not _has_dotted(tree, dotted):
                _set_dotted(tree, dotted, value)
    ev = tree.get("eval")
    if isinstance(ev, dict) and ev.get("sampler") in RENAMED_SAMPLERS:
        ev["sampler"] = RENAMED_SAMPLERS[ev["sampler"]]
    return tree


def with_defaults(tree: dict, defaults: dict | None = None) -> dict:
    """``tree`` (e.g. an old run's config.yaml, after :func:`migrate`) completed with the defaults
    of every key it lacks, at every depth: a key added after the file was written counts as its
    default."""
    defaults = Config().model_dump() if defaults is None else defaults
    out = dict(defaults)
    for key, value in tree.items():
        known = defaults.get(key)
        out[key] = with_defaults(value, known) if isinstance(value, dict) and isinstance(known, dict) and known else value
    return out


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {key!r} is not a section")
        node = child
    node[keys[-1]] = value


BOOL_TAG = "tag:yaml.org,2002:bool"


def bool_words(text: str) -> dict[tuple, str]:
    """{path: word} of each YAML 1.1 boolean written as a word (``no``, ``Off``, ``yes``, ``on``,
    ``true``, ``false``) in a YAML document; paths are tuples of mapping keys and list indices."""
    words: dict[tuple, str] = {}

    def walk(node: Any, path: tuple) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                walk(v, path + (k.value,))
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                walk(v, path + (i,))
        elif isinstance(node, yaml.ScalarNode) and node.tag == BOOL_TAG:
            words[path] = node.value

    try:
        walk(yaml.compose(text, Loader=yaml.SafeLoader), ())
    except yaml.YAMLError:
        pass  # the caller's safe_load reports it
    return words


def _meant(word: str, value: bool, ann: Any) -> str | bool:
    """The string a YAML boolean ``word`` stood for where ``ann`` expects a string (any, or one of
    a Literal's), else ``value`` (also where ``ann`` accepts a bool)."""
    args = typing.get_args(ann) if typing.get_origin(ann) in (typing.Union, type(int | str)) else (ann,)
    if bool in args:
        return value
    if str in args:
        return word
    allowed = {v for a in args if typing.get_origin(a) is Literal for v in typing.get_args(a)}
    return next((w for w in (word, word.lower()) if w in allowed), value)


def _unbool(tree: dict, model: type[BaseModel], words: dict[tuple, str], path: tuple = ()) -> dict:
    """YAML 1.1 reads ``mixed_precision: no`` as false: where a field (or a list item or mapping
    value of one) expects a string and got a boolean written as a word, the word is what was meant
    when the field allows it. Other booleans stay, and the error message says how YAML read them."""
    out = dict(tree)
    for name, field in model.model_fields.items():
        here, ann, value = path + (name,), field.annotation, out.get(name)
        origin, args = typing.get_origin(ann), typing.get_args(ann)
        if _is_section(ann) and isinstance(value, dict):
            out[name] = _unbool(value, ann, words, here)
        elif isinstance(value, bool) and here in words:
            out[name] = _meant(words[here], value, ann)
        elif origin is list and isinstance(value, list):
            out[name] = [_meant(words[here + (i,)], v, args[0]) if isinstance(v, bool) and here + (i,) in words
                         else v for i, v in enumerate(value)]
        elif origin is dict and isinstance(value, dict):
            out[name] = {k: _meant(words[here + (k,)], v, args[1]) if isinstance(v, bool) and here + (k,) in words
                         else v for k, v in value.items()}
    return out


def _yaml_read(loc: tuple, value: Any, words: dict[tuple, str]) -> str:
    """``; YAML reads `no` as false; quote it`` where the bad value was a YAML boolean word."""
    word = next((words[loc[:n]] for n in range(len(loc), 0, -1) if loc[:n] in words), None)
    if word is None or not isinstance(value, bool):
        return ""
    return f"; YAML reads `{word}` as {str(value).lower()}; quote it ('{word}') if you meant the string"


def parse_override(text: str) -> tuple[str, Any]:
    """``train.lr=1e-4`` -> ("train.lr", 1e-4). Values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({e})") from None
    return key.strip(), value


def _looks_like_float(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return s.strip().lower() not in ("nan", "inf", "-inf", "+inf", "infinity")


def _as_float(value: Any) -> Any:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) or (isinstance(value, str) and _looks_like_float(value)):
        return float(value)
    return value


def _coerce_floats(tree: dict, model: type[BaseModel]) -> dict:
    """For float fields only: strict mode refuses ``lr: 1`` and PyYAML reads ``1e-4`` (no dot)
    as a string; both are obviously floats. Other fields keep their YAML type."""
    out = dict(tree)
    for name, field in model.model_fields.items():
        if name not in out:
            continue
        ann, value = field.annotation, out[name]
        if isinstance(ann, type) and issubclass(ann, BaseModel) and isinstance(value, dict):
            out[name] = _coerce_floats(value, ann)
        elif ann in (float, float | None):
            out[name] = _as_float(value)
        elif ann == list[float] and isinstance(value, list):
            out[name] = [_as_float(v) for v in value]
    return out


def _origin(key: str, overridden: set[str], source: str) -> str:
    """An error under (or above) an overridden key came from the command line."""
    for o in overridden:
        if key == o or key.startswith(o + ".") or o.startswith(key + "."):
            return "command-line override"
    return source


PRESETS = Path(__file__).resolve().parent / "presets"  # package data; ``configs/`` in a checkout links here


def preset_path(name: str) -> Path:
    """The packaged preset ``name`` (``micro`` -> ``ldm_train/presets/micro.yaml``)."""
    path = PRESETS / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PRESETS.glob("*.yaml")))
        raise ConfigError(f"config file not found: {name} (not a file, nor a preset: {known})")
    return path


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                migrate_old: bool = False) -> Config:
    """Read a YAML file (or defaults when ``path`` is None), apply dotted overrides, validate.

    Raises :class:`ConfigError` naming each bad key and where it came from. A key that moved
    (:data:`MOVED`) is refused with its new place, except in a file ldm_train wrote itself (a
    resolved config, :func:`is_resolved`: a run's ``config.yaml``, a Slurm job's config, which
    every requeue reads again) or with ``migrate_old``: there it is moved to its new place.
    """
    source = str(path) if path is not None else "<defaults>"
    tree: dict = {}
    words: dict[tuple, str] = {}  # where a YAML boolean was written as a word (no, off, yes, on)
    if path is not None:
        p = Path(path)
        p = preset_path(str(p)) if not p.suffix and not p.exists() and p.parent == Path(".") else p
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            text = p.read_text(encoding="utf-8")
            loaded = yaml.safe_load(text)
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{p}: top level must be a mapping of sections, got {type(loaded).__name__}")
        tree = loaded or {}
        words = bool_words(text)
        if migrate_old or is_resolved(tree):
            tree = migrate(tree)
    from_override: set[str] = set()
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(tree, key, value)
        from_override.add(key)
        at = tuple(key.split("."))
        words = {w: v for w, v in words.items() if w[:len(at)] != at}
        words.update({at + w: v for w, v in bool_words(item.split("=", 1)[1]).items()})
    if moved := moved_keys(tree):
        lines = [f"  {key}: {where}  [in {_origin(key, from_override, source)}]" for key, where in moved.items()]
        raise ConfigError("invalid configuration (keys that have moved):\n" + "\n".join(lines))
    try:
        return Config.model_validate(_coerce_floats(_unbool(tree, Config, words), Config))
    except ValidationError as e:
        lines = []
        for err in e.errors():
            key = ".".join(str(x) for x in err["loc"])
            origin = _origin(key, from_override, source)
            if err["type"] == "extra_forbidden":
                msg = "unknown key" + suggest(key)
            elif not err["loc"]:  # a check across sections (Config's model validator): its message names the keys
                lines.append(f"  {err['msg'].removeprefix('Value error, ')}  [in {source}]")
                continue
            else:
                msg = f"{err['msg']} (got {err.get('input')!r}){_yaml_read(tuple(err['loc']), err.get('input'), words)}"
            lines.append(f"  {key}: {msg}  [in {origin}]")
        raise ConfigError("invalid configuration:\n" + "\n".join(lines)) from None


def dump_config(cfg: Config, path: Path) -> None:
    """Write the resolved config (after overrides) so a run folder says how it was made."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config_yaml(cfg), encoding="utf-8")


def config_yaml(cfg: Config) -> str:
    """The resolved config as YAML: what :func:`dump_config` writes and ``ldm-train config show`` prints."""
    return yaml.safe_dump(cfg.model_dump(), sort_keys=False)
