"""LoRA (Hu et al. 2021, "Low-Rank Adaptation") on the frozen U-Net (and, with ``train.lora.text_encoder``,
the CLIPTextModel: :class:`TextConditioned`), through PEFT, from outside the model.

``W x`` becomes ``W x + (alpha / r) B A x`` for every module named in ``train.lora.target_modules``
(PEFT's ``inject_adapter_in_model`` replaces each by a ``lora.Linear``/``lora.Conv2d`` holding the
original as ``base_layer``). The base weights are frozen (``requires_grad=False``); only ``lora_A`` and
``lora_B`` are trainable, so they alone reach the optimizer, the EMA (ema.param_shapes takes the
trainable parameters) and, under ZeRO, DeepSpeed's partitioned optimizer state.

Key naming (what checkpoints, the sampler and the LoRA file formats exchange): PEFT's, with the
adapter name dropped, ``<module path>.lora_A.weight`` / ``<module path>.lora_B.weight``, the module path
being our (= diffusers' UNet2DConditionModel) name, e.g.
``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight``. This is also what
diffusers' ``save_lora_weights`` writes, behind a ``unet.`` prefix.

``model/`` and ``diffusion/`` never see PEFT: the adapter is added here, after ``model.init_from`` is
loaded and before ``accelerator.prepare``.
"""
from __future__ import annotations

import difflib
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ..config import LoraConfig, ModelConfig
from ..errors import UserError
from ..model import build_unet, load_unet_weights

ADAPTER = "default"  # PEFT's adapter name; dropped from the exchanged key names
_INTERNAL = re.compile(rf"\.(lora_[AB])\.{ADAPTER}\.")


class LoraError(UserError):
    """A LoRA target or file that does not fit this U-Net."""


def is_adapter_key(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def has_adapter(module: torch.nn.Module) -> bool:
    return any(is_adapter_key(n) for n, _ in module.named_parameters())


def peft_key(name: str) -> str:
    """``x.to_q.lora_A.default.weight`` (the parameter) -> ``x.to_q.lora_A.weight`` (exchanged)."""
    return _INTERNAL.sub(r".\1.", name)


def base_unet(model_cfg: ModelConfig, seed: int, fork: bool = True) -> torch.nn.Module:
    """The frozen base as training built it: seeded random init, then ``model.init_from`` (a pretrained
    U-Net) where given. ``fork``: leave the caller's torch RNG untouched (evaluation mid-training)."""
    with torch.random.fork_rng(devices=[], enabled=fork):
        torch.manual_seed(seed)
        model = build_unet(model_cfg)
        if model_cfg.init_from is not None:
            load_unet_weights(model, model_cfg.init_from)
    return model


def _suffixes(module: torch.nn.Module) -> set[str]:
    """Every name a target may use: the module paths' last one, two and three components."""
    out = set()
    for path, _ in module.named_modules():
        parts = path.split(".")
        out.update(".".join(parts[-k:]) for k in (1, 2, 3) if len(parts) >= k and path)
    return {s for s in out if not s.split(".")[0].isdigit()}  # "to_out.0", not "0.attn1"


def check_targets(module: torch.nn.Module, targets: list[str]) -> None:
    """Refuse a target name that matches no module (PEFT itself only refuses when *none* matches),
    or one that names a layer PEFT cannot adapt (it adapts Linear and Conv layers)."""
    modules = [(p, m) for p, m in module.named_modules() if p]
    for target in targets:
        matched = [(p, m) for p, m in modules if p == target or p.endswith("." + target)]
        if not matched:
            close = difflib.get_close_matches(target, sorted(_suffixes(module)), n=5, cutoff=0.5)
            raise LoraError(f"train.lora.target_modules: {target!r} matches no U-Net module; closest names: "
                            f"{', '.join(close) or 'none'}")
        if bad := [(p, m) for p, m in matched if not isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]:
            raise LoraError(f"train.lora.target_modules: {target!r} names {type(bad[0][1]).__name__} layers "
                            f"(e.g. {bad[0][0]}); LoRA adapts Linear and Conv2d layers only")


def peft_config(cfg: LoraConfig, rank_pattern: dict | None = None, alpha_pattern: dict | None = None):
    import peft

    init = True if cfg.init == "default" else cfg.init
    return peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha if cfg.alpha is not None else cfg.rank,
                           lora_dropout=cfg.dropout, target_modules=list(cfg.target_modules),
                           init_lora_weights=init, rank_pattern=rank_pattern or {},
                           alpha_pattern=alpha_pattern or {})


def add_adapter(unet: torch.nn.Module, cfg: LoraConfig, config=None) -> torch.nn.Module:
    """Inject the adapter in place (PEFT), freeze everything else; returns ``unet``. Draws the adapter's
    initial values from torch's global RNG (kaiming A, zero B by default)."""
    import peft

    check_targets(unet, list(cfg.target_modules))
    try:
        peft.inject_adapter_in_model(config or peft_config(cfg), unet, adapter_name=ADAPTER)
    except ValueError as e:  # e.g. a target that is a GroupNorm: PEFT adapts Linear/Conv layers only
        raise LoraError(f"train.lora.target_modules: {e}".splitlines()[0]) from None
    for name, p in unet.named_parameters():
        p.requires_grad_(is_adapter_key(name))
    return unet


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors in PEFT's exchanged naming (detached copies, on the CPU)."""
    return select_adapter(model.state_dict())


def select_adapter(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter entries of a full state dict (e.g. ``accelerator.get_state_dict``), renamed."""
    return {peft_key(k): v.detach().cpu().clone() for k, v in state.items() if is_adapter_key(k)}


def rank_alpha(model: torch.nn.Module) -> tuple[int, float]:
    """(rank, alpha) of the adapter (every adapted module has the same when built from train.lora)."""
    from peft.tuners.lora import LoraLayer

    for m in model.modules():
        if isinstance(m, LoraLayer) and ADAPTER in m.r:
            return int(m.r[ADAPTER]), float(m.lora_alpha[ADAPTER])
    raise LoraError("the model has no LoRA adapter")


@torch.no_grad()
def load_adapter(unet: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` (exchanged naming) into the injected adapter; every adapter tensor must be given
    with its shape, and nothing else (a key of another architecture is refused by name)."""
    params = {peft_key(n): p for n, p in unet.named_parameters() if is_adapter_key(n)}
    if unknown := sorted(set(state) - set(params)):
        close = difflib.get_close_matches(unknown[0], list(params), n=1)
        raise LoraError(f"LoRA key {unknown[0]!r} is not an adapter of this U-Net "
                        f"({len(unknown)} such keys{'; closest: ' + close[0] if close else ''})")
    if missing := sorted(set(params) - set(state)):
        raise LoraError(f"the LoRA state has no {missing[0]!r} ({len(missing)} adapter tensors missing)")
    for k, p in params.items():
        if tuple(state[k].shape) != tuple(p.shape):
            raise LoraError(f"LoRA key {k!r} has shape {tuple(state[k].shape)}, this adapter {tuple(p.shape)}")
        p.copy_(state[k].to(p.device, p.dtype))


def _module_of(key: str) -> str:
    return key.rsplit(".lora_", 1)[0]


def config_of_state(state: dict[str, torch.Tensor], alphas: dict[str, float] | float | None = None):
    """A PEFT config that recreates the adapter ``state`` describes (a LoRA file's): its modules exactly
    (full paths), each with its own rank (from ``lora_A``) and alpha (``alphas``: one value, per module
    path, or None = the rank)."""
    import peft

    ranks = {_module_of(k): int(v.shape[0]) for k, v in state.items() if ".lora_A." in k}
    if not ranks:
        raise LoraError("the LoRA state has no lora_A tensors")

    def alpha(m):
        return float(alphas.get(m, ranks[m]) if isinstance(alphas, dict) else (alphas or ranks[m]))

    first = next(iter(ranks))
    return peft.LoraConfig(r=ranks[first], lora_alpha=alpha(first), target_modules=sorted(ranks),
                           rank_pattern={re.escape(m): r for m, r in ranks.items()},
                           alpha_pattern={re.escape(m): alpha(m) for m in ranks})


def apply_adapter(unet: torch.nn.Module, state: dict[str, torch.Tensor], cfg: LoraConfig | None = None,
                  alphas: dict[str, float] | float | None = None) -> torch.nn.Module:
    """Put an adapter (a checkpoint's, or a LoRA file's in exchanged naming) onto a plain U-Net for
    sampling: with ``cfg`` (the run's ``train.lora``; pissa/olora re-derive the same residual base
    from the same base weights) or, without it, shaped from ``state`` itself (``alphas`` as in
    :func:`config_of_state`). Returns ``unet`` in eval mode, frozen."""
    with torch.random.fork_rng(devices=[]):  # the init values are overwritten: do not consume the caller's RNG
        if cfg is not None:
            add_adapter(unet, cfg)
        else:
            add_adapter(unet, LoraConfig(target_modules=sorted({_module_of(k) for k in state})),
                        config_of_state(state, alphas))
    load_adapter(unet, state)
    return unet.eval().requires_grad_(False)


def read_adapter_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A U-Net LoRA in PEFT naming from a ``.safetensors`` file, or a folder holding
    ``pytorch_lora_weights.safetensors`` (diffusers' ``save_lora_weights``: keys behind ``unet.``).
    Kohya files (``lora_unet_*``) are the export layer's to convert (``ldm_train.export.lora``)."""
    path = Path(path)
    if path.is_dir():
        path = path / "pytorch_lora_weights.safetensors"
    if not path.is_file():
        raise LoraError(f"train.lora.init_from: no such LoRA file {path}")
    state = load_file(str(path))
    if any(k.startswith(("lora_unet_", "lora_te")) for k in state):
        raise LoraError(f"train.lora.init_from: {path} is a kohya LoRA; convert it with ldm_train.export.lora "
                        "(the train stage passes it as adapter_init)")
    out = {k.removeprefix("unet."): v for k, v in state.items() if not k.startswith("text_encoder")}
    if other := [k for k in out if not is_adapter_key(k)]:
        raise LoraError(f"train.lora.init_from: {path}: key {other[0]!r} is not a PEFT LoRA key (…lora_A/lora_B.weight)")
    return out


def file_alpha(path: str | Path) -> float | None:
    """The ``lora_alpha`` our checkpoints record in their metadata (None where absent)."""
    with safe_open(str(path), "pt") as f:
        value = (f.metadata() or {}).get("lora_alpha")
    return float(value) if value is not None else None


def checkpoint_adapter(ckpt: Path, which: str = "ema") -> dict[str, torch.Tensor]:
    """A LoRA run's adapter from checkpoint ``ckpt`` in exchanged naming: ``which`` is ``ema`` (the
    first decay), ``ema@DECAY`` or ``model`` (the raw adapter), as :func:`checkpoint.load_weights`."""
    from .checkpoint import load_weights

    state = {peft_key(k): v for k, v in load_weights(ckpt, which).items()}
    if not state or not all(is_adapter_key(k) for k in state):
        raise LoraError(f"checkpoint {ckpt} holds full U-Net weights, not a LoRA adapter")
    return state


def check_continued(cfg: LoraConfig, rank: int, alpha: float, source: str) -> None:
    """A LoRA to continue (``train.lora.init_from``) must have this run's rank and alpha: the shapes
    would not fit, and another alpha would silently rescale what it learnt."""
    mine = cfg.alpha if cfg.alpha is not None else cfg.rank
    if rank != cfg.rank or float(alpha) != float(mine):
        raise LoraError(f"train.lora.init_from {source} has rank {rank}, alpha {alpha:g}; this run has "
                        f"train.lora.rank={cfg.rank}, train.lora.alpha={mine:g}: set them to the file's")


# ---- the text encoder's adapter (train.lora.text_encoder) ----------------------------------------

UNET_PREFIX, TEXT_PREFIX = "unet.", "text."  # a TextConditioned model's parameter names


class TextConditioned(torch.nn.Module):
    """The U-Net and the CLIPTextModel it is conditioned on, as ONE trained module (both with their
    adapter): ``forward(x_t, t, tokens)`` encodes the caption tokens (int, ``[B, L]``) as
    :meth:`HFTextEncoder.encode_tokens <ldm_train.text.hf.HFTextEncoder.encode_tokens>` does, with
    gradients, and calls the U-Net on them. Accelerate/DeepSpeed, the optimizer, the EMA and the
    checkpoints see one model whose trainable parameters are both adapters (names ``unet.*`` and
    ``text.*``)."""

    def __init__(self, unet: torch.nn.Module, text: torch.nn.Module):
        super().__init__()
        self.unet = unet
        self.text = text

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.text(input_ids=tokens.to(torch.long)).last_hidden_state

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.unet(x_t, t, self.encode(tokens))


def text_lora(cfg: LoraConfig) -> LoraConfig:
    """``train.lora`` with the text encoder's targets (same rank, alpha, dropout and init)."""
    return cfg.model_copy(update={"target_modules": list(cfg.text_target_modules)})


def add_text_adapter(text_model: torch.nn.Module, cfg: LoraConfig) -> torch.nn.Module:
    """PEFT LoRA on a (copy of the) transformers CLIPTextModel: ``train.lora.text_target_modules``."""
    try:
        return add_adapter(text_model, text_lora(cfg))
    except LoraError as e:
        raise LoraError(str(e).replace("train.lora.target_modules", "train.lora.text_target_modules")
                        .replace("no U-Net module", "no text-encoder module")) from None


def text_base(text) -> torch.nn.Module:
    """A fresh copy of the frozen tower's CLIPTextModel (the base the text adapter goes on); refuses
    an open_clip tower (its attention is one fused MultiheadAttention, not q/k/v projections)."""
    import copy

    if getattr(text, "kind", None) != "transformers":
        raise LoraError("train.lora.text_encoder: true needs text.encoder: transformers (a CLIPTextModel, e.g. "
                        f"from pretrained=); this run's text tower is {getattr(text, 'kind', type(text).__name__)}")
    return copy.deepcopy(text.weights_module).train()


def conditioned(unet: torch.nn.Module, text, cfg: LoraConfig) -> TextConditioned:
    """The U-Net (its adapter already added) + a copy of ``text``'s CLIPTextModel with its adapter."""
    return TextConditioned(unet, add_text_adapter(text_base(text), cfg))


def split_parts(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A TextConditioned adapter (``unet.*``, ``text.*``) -> (U-Net adapter, text adapter); a U-Net-only
    adapter -> (itself, {})."""
    if not any(k.startswith((UNET_PREFIX, TEXT_PREFIX)) for k in state):  # U-Net paths never start so
        return dict(state), {}
    unet = {k.removeprefix(UNET_PREFIX): v for k, v in state.items() if k.startswith(UNET_PREFIX)}
    text = {k.removeprefix(TEXT_PREFIX): v for k, v in state.items() if k.startswith(TEXT_PREFIX)}
    return unet, text


def text_with_adapter(text, state: dict[str, torch.Tensor], cfg: LoraConfig):
    """The frozen tower ``text`` (HFTextEncoder) with its CLIPTextModel replaced by a copy carrying the
    adapter ``state`` (a checkpoint's, exchanged naming): what sampling uses for prompts and the null caption."""
    from ..text.hf import HFTextEncoder

    with torch.random.fork_rng(devices=[]):
        model = add_text_adapter(text_base(text), cfg)
    load_adapter(model, state)
    return HFTextEncoder(model.eval().requires_grad_(False), text.tokenizer, text.layer, text.source_layers)


def read_text_adapter_file(path: str | Path, text) -> dict[str, torch.Tensor]:
    """The text-encoder part (``text_encoder.*``) of a diffusers/PEFT LoRA file or folder, named as
    ``text``'s CLIPTextModel names its modules (exchanged naming); {} when the file has none."""
    path = Path(path)
    if path.is_dir():
        path = path / "pytorch_lora_weights.safetensors"
    state = {k.removeprefix("text_encoder."): v for k, v in load_file(str(path)).items()
             if k.startswith("text_encoder.")}
    return text_adapter_for(text.weights_module, state)


TEXT_ROOT = "text_model."  # checkpoints and LoRA files name CLIP's modules under it; transformers 5 does not in memory


def text_adapter_for(text_encoder: torch.nn.Module, adapter: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``adapter``'s keys as this CLIPTextModel's modules are named (``set_peft_model_state_dict``)."""
    if hasattr(text_encoder, "text_model"):  # transformers < 5
        return dict(adapter)
    return {k.removeprefix(TEXT_ROOT): v for k, v in adapter.items()}
