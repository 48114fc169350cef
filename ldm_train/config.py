"""Typed configuration: one pydantic section per component, YAML files, dotted overrides.

Every section refuses unknown keys and wrong types (``extra="forbid"``, ``strict=True``).
Builders take their own section only (``build_unet(cfg.model)``), never the whole config.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import UserError


class ConfigError(UserError):
    """A user mistake in a config file or override; the message names the key and the source."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True)


class RunConfig(Section):
    """Where outputs go. Every stage writes below ``dir``; see README "Where outputs go"."""

    dir: str = "runs/demo"
    seed: int = 0


class EmojiDataConfig(Section):
    """The built-in dataset: Noto Color Emoji glyphs captioned with their English names."""

    font: str = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
    resolution: int = Field(64, gt=0)
    val_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    shard_size: int = Field(1000, gt=0)
    limit: int | None = None  # keep the first N emoji only (tests, micro demo)


class ConvertDataConfig(Section):
    """``ldm-train data folder|hf``: the shards they write (train/ and val/, split by key hash)."""

    shard_size: int = Field(1000, gt=0)
    val_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    allow_empty_captions: bool = False  # folder: an image without NAME.txt gets "" instead of a skip


class DataConfig(Section):
    """Image-caption WebDataset shards (img2dataset layout: KEY.png|jpg|webp, KEY.txt, KEY.json).

    ``*_shards`` is a folder (every ``*.tar`` in it), a brace pattern (``data/{00000..00099}.tar``)
    or a ``pipe:`` URL. Reading: the shorter side becomes ``resolution`` and a square is cropped
    (``crop``: centre, or random seeded by ``crop_seed`` and the key); images whose shorter side
    is below ``min_size`` are skipped as ``too_small``. A shard that cannot be read is named and
    the rest is read; the command then fails unless ``tolerate_failed_shards``."""

    train_shards: str = "{run}/data/train"
    val_shards: str = "{run}/data/val"
    resolution: int = Field(64, gt=0)
    crop: Literal["center", "random"] = "center"
    crop_seed: int = 0
    min_size: int = Field(0, ge=0)
    tolerate_failed_shards: bool = False
    emoji: EmojiDataConfig = EmojiDataConfig()
    convert: ConvertDataConfig = ConvertDataConfig()

    def read_options(self) -> dict:
        """Keyword arguments of ``ldm_train.data.shards.iter_samples`` / ``load_images``."""
        return {"min_size": self.min_size, "crop": self.crop, "seed": self.crop_seed}


class VAETrainConfig(Section):
    steps: int = Field(1000, ge=0)
    batch_size: int = Field(32, gt=0)
    crop: int | None = 32  # train on random crops (fully convolutional); null = whole images
    lr: float = Field(1e-3, gt=0)
    kl_weight: float = Field(1e-6, ge=0)
    log_every: int = Field(50, gt=0)


class AutoencoderConfig(Section):
    """Stage 1. ``path`` is a diffusers ``AutoencoderKL`` folder: pretrained, or written by train-vae."""

    path: str = "{run}/vae"
    block_out_channels: list[int] = [16, 32, 64]
    layers_per_block: int = Field(1, gt=0)
    latent_channels: int = Field(4, gt=0)
    norm_num_groups: int = Field(8, gt=0)
    dtype: Literal["fp32", "fp16", "bf16"] = "fp32"
    train: VAETrainConfig = VAETrainConfig()


class TextConfig(Section):
    """open_clip text tower, frozen. ``dir`` holds ``open_clip_config.json`` and
    ``open_clip_model.safetensors``. When it is empty the tower is built from ``model_name`` (an
    open_clip architecture such as ``ViT-H-14``) or, when that is null, from the tiny
    ``width/layers/heads`` config; weights come from ``pretrained`` (a local open_clip checkpoint
    file) or, when null, random init from ``seed`` (the demo's choice, see README). It is then saved
    to ``dir`` so every later stage reloads exactly the same tower."""

    dir: str = "{run}/text"
    model_name: str | None = None
    width: int = Field(128, gt=0)
    layers: int = Field(2, gt=0)
    heads: int = Field(4, gt=0)
    context_length: int = Field(32, gt=0)
    pretrained: str | None = None
    seed: int = 1234


class LoaderConfig(Section):
    """The streaming latent loader (:class:`ldm_train.latents.loader.LatentLoader`). The sample
    order depends on the seed, epoch, rank and world size only, never on ``num_workers``, so a
    resumed run may use another worker count. ``shuffle_buffer``: samples shuffled together (a
    seeded shuffle of consecutive blocks of this size of the rank's stream; shard order is
    permuted every epoch); also the unit of work of one worker."""

    num_workers: int = Field(2, ge=0)
    shuffle_buffer: int = Field(1024, gt=0)
    prefetch_factor: int = Field(2, gt=0)


class LatentsConfig(Section):
    """The latent cache written by ``encode``; training reads only these shards.

    ``shard_size``: samples per output part (each input shard gives one or more parts).
    ``dtype``: of the stored posterior and text embedding. ``store``: ``posterior`` (mean and std,
    a fresh latent each epoch) or ``sample`` (one fixed draw per image, seeded by run.seed and the
    key). ``text``: store the text tower's ``embedding`` or only the ``tokens``. Input shards that
    fail are retried by the next run; ``data.tolerate_failed_shards`` accepts them instead."""

    dir: str = "{run}/latents"
    shard_size: int = Field(1000, gt=0)
    batch_size: int = Field(64, gt=0)
    dtype: Literal["fp16", "bf16"] = "fp16"
    store: Literal["posterior", "sample"] = "posterior"
    text: Literal["embedding", "tokens"] = "embedding"
    loader: LoaderConfig = LoaderConfig()


class ModelConfig(Section):
    """Cross-attention U-Net (:class:`ldm_train.model.UNet`; the SD U-Net family). Keys are the
    constructor's; ``attention_levels[i]`` puts transformer blocks at level i.

    ``attention_head_dim`` is channels per head here. diffusers' ``attention_head_dim`` is the
    head *count* (SD 1.x: 8, SD 2.x: [5, 10, 20, 20]); ``ldm_train.model.convert`` translates.
    ``num_attention_heads`` (one count per level) overrides ``attention_head_dim`` when set.
    ``init_from`` is not an architecture key: a diffusers U-Net folder or a project U-Net folder
    whose weights the training loop loads (``load_unet_weights``) before the first step.
    """

    in_channels: int = Field(4, gt=0)
    out_channels: int = Field(4, gt=0)  # 2 * in_channels when a learned variance is predicted
    block_out_channels: list[int] = [32, 64, 128]
    attention_levels: list[bool] = [False, True, True]
    layers_per_block: int = Field(1, gt=0)
    attention_head_dim: int = Field(32, gt=0)
    cross_attention_dim: int = Field(128, gt=0)
    norm_num_groups: int = Field(32, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    num_attention_heads: list[int] | None = None
    transformer_layers_per_block: int | list[int] = 1
    use_linear_projection: bool = False  # SD 2.x: nn.Linear proj_in/out; SD 1.x: 1x1 conv
    flip_sin_to_cos: bool = True
    freq_shift: int = Field(0, ge=0)
    norm_eps: float = Field(1e-5, gt=0)
    num_class_embeds: int | None = Field(None, gt=0)
    upcast_attention: bool = False  # attention in fp32 under fp16/bf16 autocast (SD 2.1-v)
    gradient_checkpointing: bool = False
    init_from: str | None = None


class LossConfig(Section):
    """L_simple's options (``ldm_train.diffusion.losses.simple``; formulation ``ddpm``).

    ``weighting``: ``uniform`` (DDPM), ``min_snr`` (Hang et al. 2023, ``min_snr_gamma``) or ``edm``
    (Karras et al. 2022, ``sigma_data``). ``offset_noise``: Guttenberg 2023. ``timestep_sampling``:
    ``uniform`` or ``logit_normal`` (SD3, ``logit_mean``/``logit_std``)."""

    weighting: Literal["uniform", "min_snr", "edm"] = "uniform"
    min_snr_gamma: float = Field(5.0, gt=0)
    sigma_data: float = Field(0.5, gt=0)
    offset_noise: float = Field(0.0, ge=0)
    timestep_sampling: Literal["uniform", "logit_normal"] = "uniform"
    logit_mean: float = 0.0
    logit_std: float = Field(1.0, gt=0)


class IDDPMConfig(Section):
    """Improved DDPM (Nichol & Dhariwal 2021, sec. 3.1): the U-Net also outputs the interpolation v
    of its reverse variance (so ``model.out_channels = 2 * in_channels``) and trains with
    L_simple + ``vlb_weight`` * L_vlb; the ``ddpm`` sampler then uses that variance."""

    learned_variance: bool = False
    vlb_weight: float = Field(0.001, ge=0)


class SDEConfig(Section):
    """The SDE formulations of Song et al. 2021: ``vp_sde``/``subvp_sde`` use β(t) from
    ``beta_min`` to ``beta_max``; ``ve_sde`` uses σ(t) from ``sigma_min`` to ``sigma_max``.
    ``t_eps``: the smallest time trained on and integrated to."""

    beta_min: float = Field(0.1, gt=0)
    beta_max: float = Field(20.0, gt=0)
    sigma_min: float = Field(0.01, gt=0)
    sigma_max: float = Field(50.0, gt=0)
    t_eps: float = Field(1e-5, gt=0, lt=1)


class NCSNConfig(Section):
    """NCSN (Song & Ermon 2019/2020): ``num_scales`` geometric noise levels from ``sigma_max`` down
    to ``sigma_min``."""

    sigma_min: float = Field(0.01, gt=0)
    sigma_max: float = Field(50.0, gt=0)
    num_scales: int = Field(232, gt=1)


class ScoreMatchingConfig(Section):
    """The objective of the score-based formulations: denoising (``dsm``) or sliced score matching
    (``ssm``, variance-reduced ``ssm_vr``; Song et al. 2019) with ``n_projections`` directions."""

    objective: Literal["dsm", "ssm", "ssm_vr"] = "dsm"
    n_projections: int = Field(1, gt=0)


class DiffusionConfig(Section):
    """The forward process, its parameterisation and the training objective.

    ``formulation``: ``ddpm`` (Ho et al. 2020: the discrete schedule below, ``loss``, ``iddpm``), an
    SDE (``vp_sde``, ``subvp_sde``, ``ve_sde``: section ``sde``) or ``ncsn`` (section ``ncsn``); the
    score-based ones train with ``score_matching``. Each formulation reads only its own sections;
    ``ldm_train.diffusion.checks`` refuses combinations that do not fit together.
    ``prediction_type``: ``epsilon``, ``v_prediction`` (Salimans & Ho 2022) or ``sample`` (x0).
    ``rescale_betas_zero_snr``: Lin et al. 2024 (needs v or x0 prediction).
    """

    formulation: Literal["ddpm", "vp_sde", "subvp_sde", "ve_sde", "ncsn"] = "ddpm"
    # v (Salimans & Ho 2022) rather than eps: with eps, x0 = (x_t - sqrt(1-abar) eps) / sqrt(abar)
    # amplifies eps errors ~15x at the noisiest steps, which a small, briefly trained model shows.
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = "v_prediction"
    cond_drop_prob: float = Field(0.1, ge=0.0, le=1.0)
    num_train_timesteps: int = Field(1000, gt=0)
    beta_schedule: Literal["linear", "scaled_linear", "cosine"] = "scaled_linear"
    beta_start: float = Field(0.00085, gt=0)
    beta_end: float = Field(0.012, gt=0)
    rescale_betas_zero_snr: bool = False
    loss: LossConfig = LossConfig()
    iddpm: IDDPMConfig = IDDPMConfig()
    sde: SDEConfig = SDEConfig()
    ncsn: NCSNConfig = NCSNConfig()
    score_matching: ScoreMatchingConfig = ScoreMatchingConfig()


class TrainConfig(Section):
    """Optimisation of the denoiser."""

    steps: int = Field(2000, ge=0)
    batch_size: int = Field(32, gt=0)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: list[float] = [0.9, 0.999]
    warmup_steps: int = Field(100, ge=0)
    grad_clip: float = Field(1.0, ge=0)
    # One EMA per decay (the first is the one sampling and export use; the others are kept in
    # checkpoints as ``ema@DECAY``). Updated every ``ema_every`` optimizer steps; the decay applies
    # per update. Warm-up: decay_t = min(decay, (1 + t) / (10 + t)) for update t.
    ema_decays: list[Annotated[float, Field(ge=0.0, lt=1.0)]] = Field([0.999], min_length=1)
    ema_every: int = Field(1, gt=0)
    ema_warmup: bool = True
    log_every: int = Field(50, gt=0)
    checkpoint_every: int = Field(1000, gt=0)
    # memory: random batches from the split held in memory (small sets). stream: the latent
    # shards streamed by latents.loader, each rank its share, resumable exactly (any size).
    data_source: Literal["memory", "stream"] = "memory"
    keep_checkpoints: int = Field(3, gt=0)  # the last K; milestones are kept on top
    milestones: list[int] = []  # steps whose checkpoints are never deleted
    max_nonfinite_steps: int = Field(5, gt=0)  # K non-finite losses/gradients in a row stop the run
    watchdog_seconds: float = Field(600.0, ge=0)  # report a rank whose step takes longer; 0 = off
    tensorboard: bool = True  # scalars to {run}/tensorboard (rank 0)
    wandb_project: str | None = None  # also log to Weights & Biases (needs `pip install wandb`)
    peak_tflops: float | None = Field(None, gt=0)  # per device, for MFU; null = known GPUs only
    eval_every: int = Field(0, ge=0)  # sample grids on the EMA weights every N steps and at the end; 0 = off
    # Speed: torch.compile of the model, channels_last memory format, fused AdamW kernel.
    compile: bool = False
    channels_last: bool = False
    fused_optimizer: bool = True


class DistributedConfig(Section):
    """How the loop is distributed (see ldm_train.train.strategy). The launcher (torchrun,
    ``accelerate launch``, srun) sets the processes; this section says what they do."""

    # ddp: every rank holds everything (also a single process). zero1/zero2/zero3: DeepSpeed ZeRO
    # partitions optimizer states / + gradients / + parameters across ranks, through Accelerate.
    strategy: Literal["ddp", "zero1", "zero2", "zero3"] = "ddp"
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    gradient_accumulation_steps: int = Field(1, gt=0)
    offload_optimizer: bool = False  # ZeRO: optimizer states in CPU memory (DeepSpeedCPUAdam)
    offload_params: bool = False  # ZeRO-3: parameters in CPU memory
    # Each rank keeps the EMA of 1/world of the weights. Always so under zero3 (a rank only holds
    # its partition); optional for ddp/zero1/zero2, where it saves memory at no extra traffic.
    ema_sharded: bool = False
    deepspeed_config: str | None = None  # a DeepSpeed JSON to start from (launch/deepspeed/*.json)
    cpu: bool = False  # force CPU even where a GPU is present


class MetricsConfig(Section):
    """FID/KID/CLIP score (``ldm_train.eval.metrics``; the pinned FID protocol is in its docstring).
    Weights are local files only: without them the metric is reported as unavailable, naming the key."""

    inception_weights: str | None = None  # torch-fidelity's pt_inception-2015-12-05-6726825d.pth
    fid_feature: Literal[64, 192, 768, 2048] = 2048
    fid_resize: Literal["tf1_bilinear", "bilinear_antialias"] = "tf1_bilinear"
    fid_reference_dir: str = "{run}/eval/fid_reference"
    kid_subset_size: int = Field(1000, gt=0)
    kid_subsets: int = Field(100, gt=0)
    clip_model: str | None = "ViT-B-32"
    clip_weights: str | None = None  # a local open_clip checkpoint of clip_model


class EvalConfig(Section):
    """Sampling for grids and metrics.

    ``sampler`` names an entry of ``ldm_train.diffusion.samplers.SAMPLERS`` (ddim, ddpm, euler, heun,
    dpmpp_2m for formulation ddpm; pf_ode, pc for the SDEs; annealed_langevin for ncsn).
    ``samplers.NAME`` holds that sampler's own settings (its keyword-only parameters, e.g.
    ``samplers.ddim.eta``); the ones not given keep the sampler's defaults. Checked against the
    registry when the config is validated."""

    sampler: str = "ddim"
    steps: int = Field(50, gt=0)
    samplers: dict[str, dict[str, Any]] = {}
    guidance_scale: float = Field(3.0, ge=0.0)
    guidance_sweep: list[float] = []  # evaluation during training: one grid + metrics per scale
    seed: int = 0
    samples_per_prompt: int = Field(4, gt=0)
    # Images sampled together; halved and retried when the GPU runs out of memory (so the
    # batch ends up sized to memory), which changes images only for the stochastic samplers.
    batch_size: int = Field(64, gt=0)
    # Held-out captions of the emoji set's validation split (checked by the demo); empty = the
    # first validation captions.
    prompts: list[str] = [
        "slightly smiling face",
        "pensive face",
        "brown heart",
        "green apple",
        "tomato",
        "cactus",
        "finland",
        "santa claus medium skin tone",
    ]
    metrics: MetricsConfig = MetricsConfig()

    def sampler_settings(self) -> dict[str, Any]:
        """The configured settings of the chosen sampler (the others' are kept, unused)."""
        return dict(self.samplers.get(self.sampler, {}))


class ExportConfig(Section):
    dir: str = "{run}/export"
    dtype: Literal["fp32", "fp16", "bf16"] = "fp32"


class SlurmConfig(Section):
    """``ldm-train slurm submit``: what the job script (rendered from ``slurm/job.sbatch``) asks
    Slurm for and runs on each node. The flags of ``submit`` (--partition, --time, ...) override
    the keys of the same name. See README "Slurm"."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    time: str | None = None  # e.g. "24:00:00"; null = the partition's default limit
    exclusive: bool = False
    cpus_per_task: int | None = Field(None, gt=0)  # CPUs for each node's launcher (all its ranks)
    sbatch_args: list[str] = []  # further #SBATCH options, e.g. ["--mem=0", "--mail-type=FAIL"]
    # USR1 this long before the time limit: the ranks save, the job requeues itself. Also how long
    # torchrun lets the ranks save before it kills them (TORCH_ELASTIC_SHUTDOWN_TIMEOUT).
    signal_seconds: int = Field(300, gt=0)
    max_requeues: int = Field(10, ge=0)  # a preempted job comes back at most this many times
    port: int = Field(29500, gt=1023, lt=64536)  # rendezvous port = port + job id % 1000
    launcher: Literal["torchrun", "accelerate"] = "torchrun"
    accelerate_config: str | None = None  # accelerate launcher: its --config_file
    cpu_processes_per_node: int = Field(1, gt=0)  # processes per node when --gpus-per-node is 0
    python: str | None = None  # the interpreter on the nodes; null = the one running submit
    modules: list[str] = []  # `module load` each first, e.g. ["cuda/12.4", "nccl/2.21"]
    setup: list[str] = []  # shell lines run before the launch, e.g. ["source ~/venv/bin/activate"]
    env: dict[str, str] = {}  # exported in the job, e.g. {"NCCL_SOCKET_IFNAME": "ib0"}
    entry_module: str = "ldm_train.cli"  # what each rank runs (python -m); change only to wrap it
    template: str | None = None  # a job template of your own; null = slurm/job.sbatch


class Config(Section):
    run: RunConfig = RunConfig()
    data: DataConfig = DataConfig()
    autoencoder: AutoencoderConfig = AutoencoderConfig()
    text: TextConfig = TextConfig()
    latents: LatentsConfig = LatentsConfig()
    model: ModelConfig = ModelConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    train: TrainConfig = TrainConfig()
    distributed: DistributedConfig = DistributedConfig()
    eval: EvalConfig = EvalConfig()
    export: ExportConfig = ExportConfig()
    slurm: SlurmConfig = SlurmConfig()

    def path(self, template: str) -> Path:
        """Expand ``{run}`` in a path template; every ``*.dir``/``*.path`` key goes through here."""
        return Path(template.replace("{run}", self.run.dir))

    def shards(self, template: str) -> str:
        """Like :meth:`path` for shard specs, which may be brace patterns or ``pipe:`` URLs."""
        return template.replace("{run}", self.run.dir)


# Keys that moved into nested sections (issue 12), old -> new places. A config naming an old key is
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
}
# Old sampler settings at these values were the defaults every config.yaml spelled out; they stay
# defaults (not copied into eval.samplers) so an old run compares equal to a new one.
_OLD_SAMPLER_DEFAULTS = {"eval.eta": 0.0, "eval.spacing": "leading", "eval.s_churn": 0.0,
                         "eval.pc_predictor": "reverse_diffusion", "eval.pc_corrector": "langevin",
                         "eval.snr": 0.16, "eval.n_corrector": 1, "eval.langevin_steps_per_sigma": 5,
                         "eval.langevin_step_lr": 2e-5}
RENAMED_SAMPLERS = {"iddpm": "ddpm"}  # iddpm was an exact alias of ddpm


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
    found = {old: f"moved to {' and '.join(new)}" for old, new in MOVED.items() if _has_dotted(tree, old)}
    sampler = tree.get("eval", {}).get("sampler") if isinstance(tree.get("eval"), dict) else None
    if isinstance(sampler, str) and sampler in RENAMED_SAMPLERS:
        new = RENAMED_SAMPLERS[sampler]
        found["eval.sampler"] = f"{sampler!r} was an alias of {new!r}; use eval.sampler={new}"
    return found


def is_resolved(tree: dict) -> bool:
    """Whether ``tree`` is a resolved config as :func:`dump_config` writes it (every section spelled
    out), rather than a hand-written file: those written by an older version are migrated."""
    return set(tree) == set(Config.model_fields) and all(isinstance(v, dict) for v in tree.values())


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
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{p}: top level must be a mapping of sections, got {type(loaded).__name__}")
        tree = loaded or {}
        if migrate_old or is_resolved(tree):
            tree = migrate(tree)
    from_override: set[str] = set()
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(tree, key, value)
        from_override.add(key)
    if moved := moved_keys(tree):
        lines = [f"  {key}: {where}  [in {_origin(key, from_override, source)}]" for key, where in moved.items()]
        raise ConfigError("invalid configuration (keys that have moved):\n" + "\n".join(lines))
    try:
        return Config.model_validate(_coerce_floats(tree, Config))
    except ValidationError as e:
        lines = []
        for err in e.errors():
            key = ".".join(str(x) for x in err["loc"])
            origin = _origin(key, from_override, source)
            if err["type"] == "extra_forbidden":
                msg = "unknown key"
            else:
                msg = f"{err['msg']} (got {err.get('input')!r})"
            lines.append(f"  {key}: {msg}  [in {origin}]")
        raise ConfigError("invalid configuration:\n" + "\n".join(lines)) from None


def dump_config(cfg: Config, path: Path) -> None:
    """Write the resolved config (after overrides) so a run folder says how it was made."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config_yaml(cfg), encoding="utf-8")


def config_yaml(cfg: Config) -> str:
    """The resolved config as YAML: what :func:`dump_config` writes and ``ldm-train config show`` prints."""
    return yaml.safe_dump(cfg.model_dump(), sort_keys=False)
