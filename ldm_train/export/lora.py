"""LoRA adapters in the two formats people load, read back to continue training, and merged.

In memory an adapter is PEFT's state dict (``peft.get_peft_model_state_dict``), one pair per
adapted module: ``<module>.lora_A.weight`` [r, in] (convs [r, in, kh, kw]) and
``<module>.lora_B.weight`` [out, r] ([out, r, 1, 1]), where ``<module>`` is the U-Net's module path
(ours are diffusers' ``UNet2DConditionModel``'s) or the text encoder's (transformers'
``CLIPTextModel``); one ``rank`` and ``alpha`` (W' = W + alpha / rank * B @ A). Text-encoder
modules are named as CLIPTextModel checkpoints name them, ``text_model.encoder.layers.0.self_attn.q_proj``,
in files and in :class:`LoraFile`: transformers 5 drops the ``text_model.`` in memory (PEFT's keys on
it lack it), older versions and the LoRAs in the wild keep it; diffusers 0.42 strips it when loading
into a flat model, and :func:`text_adapter_for` does the same for ours.

- diffusers: ``<folder>/pytorch_lora_weights.safetensors``, the PEFT keys prefixed ``unet.`` /
  ``text_encoder.``; the safetensors metadata ``lora_adapter_metadata`` holds the ``LoraConfig``
  kwargs (``unet.r``, ``unet.lora_alpha``...) as ``save_lora_weights(unet_lora_adapter_metadata=)``
  writes them. Without it diffusers assumes alpha = rank, so it is always written.
- kohya (sd-scripts ``networks/lora.py``): one file, ``lora_unet_<module, "." -> "_">`` and
  ``lora_te_<module>`` with ``.lora_down.weight`` (= A), ``.lora_up.weight`` (= B) and ``.alpha``
  (0-dim, in the weights' dtype: ``save_weights`` casts every tensor to the save dtype), and the
  ``ss_*`` metadata ``train_network.py`` writes that loaders read (dim, alpha, module, model version)
  plus the ``sshs_*`` hashes A1111's additional-networks indexes by.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save, save_file

from ..errors import UserError
from ..train.lora import TEXT_ROOT, text_adapter_for

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
PARTS = {"unet": ("unet.", "lora_unet_"), "text": ("text_encoder.", "lora_te_")}  # diffusers, kohya prefixes
PEFT_SUFFIXES = (".lora_A.weight", ".lora_B.weight")
KOHYA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")
FAMILIES = {"sd1": ("False", "sd_v1"), "sd2": ("True", "sd_v2"), "sd2-v": ("True", "sd_v2_v")}  # ss_v2, version
# Module-name parts with "_" in diffusers' UNet2DConditionModel and transformers' CLIPTextModel:
# kohya's names lose the dots, and these say which "_" were not dots (longest first).
JOINED = {
    3: {"time_emb_proj", "conv_norm_out", "final_layer_norm"},
    2: {"down_blocks", "up_blocks", "mid_block", "transformer_blocks", "proj_in", "proj_out", "to_q", "to_k",
        "to_v", "to_out", "conv_in", "conv_out", "conv_shortcut", "time_embedding", "linear_1", "linear_2",
        "add_embedding", "class_embedding", "text_model", "self_attn", "q_proj", "k_proj", "v_proj",
        "out_proj", "token_embedding", "position_embedding", "layer_norm1", "layer_norm2", "text_projection"},
}


class LoraFormatError(UserError):
    """A LoRA file or adapter that cannot be read or written; the message names the file and key."""


class LoraMismatchError(UserError):
    """A LoRA that does not fit the model (another architecture); the message names the key."""


@dataclass
class LoraFile:
    unet: dict[str, torch.Tensor]  # PEFT keys: <module>.lora_A.weight / .lora_B.weight
    text: dict[str, torch.Tensor]  # the same for the text encoder; {} when it has no adapter
    rank: int
    alpha: float
    format: str  # "diffusers" | "kohya" | "peft" (in memory)
    path: Path | None = None
    metadata: dict[str, str] = field(default_factory=dict)  # the file's safetensors metadata

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


# ------------------------------------------------------------------------------ PEFT keys
def peft_adapter(state: dict[str, torch.Tensor], adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """The one normalisation of PEFT adapter keys to ``<module>.lora_A.weight``: strips the
    ``base_model.model.`` that ``get_peft_model_state_dict`` leaves on a ``PeftModel`` (a model
    injected with ``inject_adapter_in_model``/``add_adapter`` has none), and the adapter name that a
    plain ``state_dict()`` keeps (``lora_A.default.weight``); base weights are dropped."""
    out = {}
    for key, value in state.items():
        key = key.removeprefix("base_model.model.")
        if adapter_name is not None:
            key = key.replace(f".lora_A.{adapter_name}.", ".lora_A.").replace(f".lora_B.{adapter_name}.", ".lora_B.")
        if key.endswith(PEFT_SUFFIXES):
            out[key] = value
        elif "lora_" in key:  # DoRA magnitudes, LoRA biases, embedding LoRA: no kohya/SD-loader form here
            raise LoraFormatError(f"adapter key {key!r}: only plain LoRA (lora_A/lora_B weights) is exported")
    return out


def _modules(adapter: dict[str, torch.Tensor], where: str) -> list[str]:
    modules = sorted({k.rsplit(".", 2)[0] for k in adapter})
    for m in modules:
        for suffix in PEFT_SUFFIXES:
            if m + suffix not in adapter:
                raise LoraFormatError(f"{where}: {m}{PEFT_SUFFIXES[0]} has no {m}{suffix}: half a LoRA pair")
    return modules


def _check_pairs(adapter: dict[str, torch.Tensor], rank: int, where: str) -> list[str]:
    """The adapter's modules; each pair has ``rank`` (one rank for all modules, as ``train.lora``)."""
    modules = _modules(adapter, where)
    for m in modules:
        a, b = adapter[m + ".lora_A.weight"], adapter[m + ".lora_B.weight"]
        if a.shape[0] != rank or b.shape[1] != rank or b.shape[2:] not in ((), (1, 1)):
            raise LoraFormatError(f"{where}: {m}.lora_A.weight {tuple(a.shape)} / .lora_B.weight {tuple(b.shape)} "
                                  f"is not a rank-{rank} pair (one rank for every module is supported)")
    return modules


def _check_rank_alpha(rank, alpha, where: str) -> None:
    if not (isinstance(rank, int) and rank > 0) or not alpha > 0:
        raise LoraFormatError(f"{where}: rank must be a positive integer and alpha positive, not {rank!r}, {alpha!r}")


def adapter_lora(unet_adapter: dict, text_adapter: dict | None = None, *, rank: int, alpha: float) -> LoraFile:
    """PEFT adapter state dicts (see :func:`peft_adapter`) as a :class:`LoraFile` (format "peft"),
    text-encoder modules under their checkpoint names (``text_model.``)."""
    _check_rank_alpha(rank, alpha, "the adapter")
    unet = peft_adapter(unet_adapter)
    text = {k if k.startswith(TEXT_ROOT) else TEXT_ROOT + k: v for k, v in peft_adapter(text_adapter or {}).items()}
    # copies: safetensors refuses tensors that share storage, and the caller's may change under training
    cpu = {p: {k: v.detach().to("cpu", copy=True).contiguous() for k, v in a.items()}
           for p, a in (("unet", unet), ("text", text))}
    return LoraFile(cpu["unet"], cpu["text"], rank, float(alpha), "peft")


def _parts(lora: LoraFile) -> dict[str, dict[str, torch.Tensor]]:
    return {p: a for p, a in (("unet", lora.unet), ("text", lora.text)) if a}


def _write(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    if not tensors:
        raise LoraFormatError(f"{path}: the adapter has no LoRA keys to write")
    partial = path.with_name(path.name + ".partial")
    save_file(tensors, str(partial), metadata=metadata)
    os.replace(partial, path)  # a reader never sees half a file
    return path


# ------------------------------------------------------------------------------ diffusers
def _lora_config(modules: list[str], rank: int, alpha: float) -> dict:
    """``peft.LoraConfig`` kwargs, as diffusers' ``get_peft_kwargs`` would infer them."""
    return {"r": rank, "lora_alpha": alpha, "target_modules": modules, "rank_pattern": {}, "alpha_pattern": {},
            "use_dora": False, "lora_bias": False}


def save_diffusers_lora(folder: Path, unet_adapter: dict, text_adapter: dict | None = None, *,
                        rank: int, alpha: float) -> Path:
    """``folder/pytorch_lora_weights.safetensors``, which ``StableDiffusionPipeline.load_lora_weights(folder)``
    loads; returns the file."""
    folder = Path(folder)
    _check_rank_alpha(rank, alpha, str(folder))
    tensors, config = {}, {}
    for part, adapter in _parts(adapter_lora(unet_adapter, text_adapter, rank=rank, alpha=alpha)).items():
        prefix = PARTS[part][0]
        modules = _check_pairs(adapter, rank, f"{folder} ({part} adapter)")
        # PEFT matches a target as the module's name or its dotted tail: without text_model. they
        # match the CLIPTextModel of every transformers version (diffusers strips no metadata)
        modules = [m.removeprefix(TEXT_ROOT) for m in modules]
        tensors.update({prefix + k: v for k, v in adapter.items()})
        config.update({prefix + k: v for k, v in _lora_config(modules, rank, float(alpha)).items()})
    folder.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", METADATA_KEY: json.dumps(config, indent=2, sort_keys=True)}
    return _write(folder / LORA_WEIGHT_NAME, tensors, metadata)


# ------------------------------------------------------------------------------ kohya
def kohya_name(part: str, module: str) -> str:
    """``lora_unet_down_blocks_0_attentions_0_proj_in`` for ``down_blocks.0.attentions.0.proj_in``."""
    return PARTS[part][1] + module.replace(".", "_")


def module_from_kohya(name: str) -> tuple[str, str]:
    """(part, module path) for a kohya LoRA name: the inverse of :func:`kohya_name` for every
    Linear/Conv2d of diffusers' SD U-Nets and CLIP text encoders (tested on the real sizes)."""
    part = next((p for p, (_, k) in PARTS.items() if name.startswith(k)), None)
    if part is None:
        raise ValueError(name)
    words, out, i = name[len(PARTS[part][1]):].split("_"), [], 0
    while i < len(words):
        n = next((n for n in (3, 2) if "_".join(words[i:i + n]) in JOINED[n]), 1)
        out.append("_".join(words[i:i + n]))
        i += n
    return part, ".".join(out)


def _kohya_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, str]:
    """sd-scripts' ``precalculate_safetensors_hashes``: sha256 of the data after the header of the
    file with the ``ss_*`` metadata only, and the legacy hash of 64 KiB at 1 MiB."""
    data = save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    offset = 8 + int.from_bytes(data[:8], "little")
    return {"sshs_model_hash": hashlib.sha256(data[offset:]).hexdigest(),
            "sshs_legacy_hash": hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]}


def save_kohya_lora(path: Path, unet_adapter: dict, text_adapter: dict | None = None, *, rank: int,
                    alpha: float, family: str = "sd1", metadata: dict[str, str] | None = None) -> Path:
    """One kohya sd-scripts LoRA ``.safetensors`` (A1111, ComfyUI, diffusers' ``load_lora_weights``).
    ``family``: sd1, sd2 or sd2-v (v-prediction), for ``ss_v2``/``ss_base_model_version``;
    ``metadata``: more entries (e.g. a loaded file's), ours win for what we write."""
    path = Path(path)
    _check_rank_alpha(rank, alpha, str(path))
    if path.suffix != ".safetensors":
        raise LoraFormatError(f"{path}: name a .safetensors file (nothing pickled is written)")
    if family not in FAMILIES:
        raise LoraFormatError(f"{path}: family must be one of {', '.join(FAMILIES)}, not {family!r}")
    tensors = {}
    for part, adapter in _parts(adapter_lora(unet_adapter, text_adapter, rank=rank, alpha=alpha)).items():
        for m in _check_pairs(adapter, rank, f"{path} ({part} adapter)"):
            name, a = kohya_name(part, m), adapter[m + ".lora_A.weight"]
            tensors[name + ".lora_down.weight"] = a
            tensors[name + ".lora_up.weight"] = adapter[m + ".lora_B.weight"]
            tensors[name + ".alpha"] = torch.tensor(float(alpha), dtype=a.dtype)
    v2, version = FAMILIES[family]
    ours = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(float(alpha)),
            "ss_v2": v2, "ss_base_model_version": version}
    merged = {**(metadata or {}), **ours}
    merged = {k: v for k, v in merged.items() if not k.startswith("sshs_")}
    if tensors:
        merged.update(_kohya_hashes(tensors, merged))
    path.parent.mkdir(parents=True, exist_ok=True)
    return _write(path, tensors, merged)


# ------------------------------------------------------------------------------ reading
def _lora_file(path: Path) -> Path:
    if path.is_dir():
        if not (path / LORA_WEIGHT_NAME).is_file():
            raise LoraFormatError(f"{path}: no {LORA_WEIGHT_NAME} in this folder (not a diffusers LoRA folder)")
        return path / LORA_WEIGHT_NAME
    if not path.is_file():
        raise LoraFormatError(f"{path}: no such LoRA file or folder")
    if path.suffix != ".safetensors":
        raise LoraFormatError(f"{path}: only .safetensors LoRA files are read (unpickling a {path.suffix} can run code)")
    return path


def _read(file: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:  # safetensors checks that the header's offsets cover the file exactly
        with safe_open(str(file), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise LoraFormatError(f"{file}: truncated or corrupt safetensors file ({e})") from None


def _uniform(file: Path, key: str, rank_alpha: tuple[int, float], seen: tuple | None) -> tuple[int, float]:
    if seen is not None and seen != rank_alpha:
        raise LoraFormatError(f"{file}: {key} has rank {rank_alpha[0]}, alpha {rank_alpha[1]:g} where the others have "
                              f"{seen[0]}, {seen[1]:g} (one rank and alpha for all modules is supported)")
    return rank_alpha


def _from_kohya(file: Path, tensors: dict[str, torch.Tensor]) -> tuple[dict, int, float]:
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, _, suffix = key.partition(".")
        if not name.startswith((PARTS["unet"][1], PARTS["text"][1])):
            raise LoraFormatError(f"{file}: key {key!r} is not a kohya LoRA key (lora_unet_*, lora_te_*)")
        if "." + suffix not in KOHYA_SUFFIXES:  # dora_scale, hada_*, lokr_*: other LyCORIS networks
            raise LoraFormatError(f"{file}: key {key!r}: only plain LoRA (lora_down, lora_up, alpha) is read")
        groups.setdefault(name, {})[suffix] = value
    parts, seen = {"unet": {}, "text": {}}, None
    for name in sorted(groups):
        g = groups[name]
        if "lora_down.weight" not in g or "lora_up.weight" not in g:
            raise LoraFormatError(f"{file}: {name} lacks its lora_down or lora_up weight")
        rank = g["lora_down.weight"].shape[0]
        alpha = float(g["alpha"].item()) if "alpha" in g else float(rank)  # sd-scripts: no alpha = dim
        seen = _uniform(file, name, (rank, alpha), seen)
        part, module = module_from_kohya(name)
        parts[part][module + ".lora_A.weight"] = g["lora_down.weight"]
        parts[part][module + ".lora_B.weight"] = g["lora_up.weight"]
    return parts, *seen


def _from_diffusers(file: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[dict, int, float]:
    parts = {"unet": {}, "text": {}}
    for key, value in tensors.items():
        part = next((p for p, (prefix, _) in PARTS.items() if key.startswith(prefix)), None)
        if part is None or not key.endswith(PEFT_SUFFIXES):  # the pre-PEFT .lora.down / DoRA forms
            raise LoraFormatError(f"{file}: key {key!r} is not a diffusers PEFT LoRA key "
                                  "(unet.*/text_encoder.* ending .lora_A.weight or .lora_B.weight)")
        key = key.removeprefix(PARTS[part][0])
        if part == "text" and not key.startswith(TEXT_ROOT):  # saved from a flat (transformers 5) model
            key = TEXT_ROOT + key
        parts[part][key] = value
    config = json.loads(metadata.get(METADATA_KEY) or "{}")
    seen = None
    for part, adapter in parts.items():
        prefix = PARTS[part][0]
        for m in _modules(adapter, str(file)):
            rank = adapter[m + ".lora_A.weight"].shape[0]
            # diffusers without metadata: alpha = rank (scale 1); patterns would mean several ranks
            alpha = float(config.get(prefix + "lora_alpha", config.get(prefix + "r", rank)))
            if config.get(prefix + "rank_pattern") or config.get(prefix + "alpha_pattern"):
                raise LoraFormatError(f"{file}: {METADATA_KEY} has a {prefix}rank/alpha pattern "
                                      "(one rank and alpha for all modules is supported)")
            seen = _uniform(file, prefix + m, (rank, alpha), seen)
    return parts, *seen


def load_lora(path: Path) -> LoraFile:
    """A diffusers LoRA folder (or its ``.safetensors``) or a kohya file, told apart by its keys."""
    path = Path(path)
    file = _lora_file(path)
    tensors, metadata = _read(file)
    keys = list(tensors)
    if any(k.startswith(("lora_te1_", "lora_te2_")) for k in keys):
        raise LoraFormatError(f"{file}: an SDXL LoRA (lora_te1_/lora_te2_ keys); SDXL is not supported yet")
    if any(k.startswith((PARTS["unet"][1], PARTS["text"][1])) for k in keys):
        fmt, (parts, rank, alpha) = "kohya", _from_kohya(file, tensors)
    elif any(k.startswith(("unet.", "text_encoder.")) and "lora" in k for k in keys):
        fmt, (parts, rank, alpha) = "diffusers", _from_diffusers(file, tensors, metadata)
    else:
        first = f" (its first key is {keys[0]!r})" if keys else ""
        raise LoraFormatError(f"{file}: no LoRA keys (kohya lora_unet_*/lora_te_*, diffusers unet.*.lora_A.weight){first}")
    return LoraFile(parts["unet"], parts["text"], rank, alpha, fmt, path, metadata)


def save_lora(path: Path, lora: LoraFile, family: str = "sd1") -> Path:
    """``lora`` written back in its own format (a kohya file keeps its metadata)."""
    if lora.format == "kohya":
        return save_kohya_lora(path, lora.unet, lora.text, rank=lora.rank, alpha=lora.alpha, family=family,
                               metadata=lora.metadata)
    return save_diffusers_lora(path, lora.unet, lora.text, rank=lora.rank, alpha=lora.alpha)


# ------------------------------------------------------------------------------ checking, merging
def module_shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """``{module path: weight shape}`` of a model's state dict (what :func:`check_lora` takes)."""
    return {k.removesuffix(".weight"): tuple(v.shape) for k, v in state.items() if k.endswith(".weight")}


def _file_key(lora: LoraFile, part: str, module: str, which: str) -> str:
    """A key as the LoRA's own file spells it, for messages."""
    if lora.format == "kohya":
        return kohya_name(part, module) + (".lora_down.weight" if which == "A" else ".lora_up.weight")
    prefix = PARTS[part][0] if lora.format == "diffusers" else ""
    return f"{prefix}{module}.lora_{which}.weight"


def _check_part(shapes: dict[str, tuple[int, ...]], lora: LoraFile, part: str) -> list[str]:
    where, adapter = lora.path or "the adapter", getattr(lora, part)
    modules = _modules(adapter, str(where))
    model = "U-Net" if part == "unet" else "text encoder"
    for m in modules:
        if m not in shapes:
            raise LoraMismatchError(f"{where}: {_file_key(lora, part, m, 'A')} names no module of this {model} "
                                    "(a LoRA for another architecture?)")
        w = shapes[m]
        want = {"A": (lora.rank, w[1], *w[2:]), "B": (w[0], lora.rank, *((1, 1) if len(w) == 4 else ()))}
        for which, shape in want.items():
            got = tuple(adapter[f"{m}.lora_{which}.weight"].shape)
            if got != shape:
                raise LoraMismatchError(f"{where}: {_file_key(lora, part, m, which)} has shape {got}, this {model}'s "
                                        f"{m}.weight {w} needs {shape} (a LoRA for another architecture?)")
    return modules


def _file_names(state: dict, part: str) -> dict[str, str]:
    """{key as LoRA files name it: key of ``state``}: a flat (transformers 5) CLIPTextModel gains ``text_model.``."""
    flat = part == "text" and not any(k.startswith(TEXT_ROOT) for k in state)
    return {(TEXT_ROOT + k if flat else k): k for k in state}


def check_lora(unet_module_shapes: dict, lora: LoraFile, text_module_shapes: dict | None = None) -> None:
    """Refuses (naming the first mismatched key) a LoRA whose modules are not the model's or whose
    shapes disagree (:func:`module_shapes` gives the shapes); the text part is checked when
    ``text_module_shapes`` is given."""
    _check_part(unet_module_shapes, lora, "unet")
    if text_module_shapes is not None:
        names = _file_names(text_module_shapes, "text")
        _check_part({f: text_module_shapes[k] for f, k in names.items()}, lora, "text")


def merge_lora(base_state: dict[str, torch.Tensor], lora: LoraFile, part: str = "unet") -> dict[str, torch.Tensor]:
    """W + alpha / rank * B @ A for every adapted module of ``part`` (unet or text), computed in fp32
    and returned in the base weight's dtype; the other tensors are passed through."""
    adapter, out, names = getattr(lora, part), dict(base_state), _file_names(base_state, part)
    for m in _check_part(module_shapes({f: base_state[k] for f, k in names.items()}), lora, part):
        key = names[m + ".weight"]
        w = base_state[key]
        a, b = adapter[m + ".lora_A.weight"].float(), adapter[m + ".lora_B.weight"].float()
        # convs: B is [out, r, 1, 1] and A [r, in, kh, kw], so B @ A is one matrix product over r
        delta = (b.flatten(1) @ a.flatten(1)).view(w.shape)
        out[key] = (w.float() + lora.scale * delta).to(w.dtype)
    return out


# ------------------------------------------------------------------------------ export of a LoRA run
KOHYA_FILE = "kohya_lora.safetensors"  # next to diffusers' file in {export}/lora/: diffusers picks its own by name
FORMATS = ("diffusers", "kohya", "both")
RESIDUAL_INITS = ("pissa", "olora")  # these move part of W into the adapter: the base is not the original


def split_adapter(model: torch.nn.Module, adapter_name: str = "default") -> tuple[dict, LoraFile | None]:
    """A PEFT-injected model -> (its base weights under the plain model's names, its adapter), or
    (its state dict, None) when it has no adapter."""
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer) and adapter_name in m.r]
    state = model.state_dict()
    if not layers:
        return state, None
    found = sorted({(int(m.r[adapter_name]), float(m.lora_alpha[adapter_name])) for m in layers})
    if len(found) > 1:
        raise LoraFormatError(f"the adapter has several (rank, alpha): {found}; the LoRA formats here take one")
    base = {k.replace(".base_layer.", "."): v for k, v in state.items() if ".lora_" not in k}
    adapter = peft_adapter({k: v for k, v in state.items() if ".lora_" in k}, adapter_name)
    rank, alpha = found[0]
    return base, adapter_lora(adapter, rank=rank, alpha=alpha)


def with_text(lora: LoraFile, text_lora: LoraFile | None) -> LoraFile:
    """The U-Net adapter ``lora`` with the text encoder's (``split_adapter`` of the CLIPTextModel) added
    as its text part; one (rank, alpha) for both, as the formats take one."""
    if text_lora is None:
        return lora
    if (text_lora.rank, text_lora.alpha) != (lora.rank, lora.alpha):
        raise LoraFormatError(f"the text adapter has rank {text_lora.rank}, alpha {text_lora.alpha:g}, the U-Net's "
                              f"rank {lora.rank}, alpha {lora.alpha:g}; the LoRA formats here take one")
    return adapter_lora(lora.unet, text_lora.unet, rank=lora.rank, alpha=lora.alpha)


def plain_text(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A CLIPTextModel of ``model``'s config (without PEFT layers) holding ``state``."""
    text = type(model)(model.config)
    text.load_state_dict(state)
    return text.eval().requires_grad_(False)


def residual_init(model: torch.nn.Module, adapter_name: str = "default") -> str | None:
    """``pissa``/``olora`` when the adapter was initialised from the base weights (which it changed)."""
    config = getattr(model, "peft_config", {}).get(adapter_name)
    init = str(getattr(config, "init_lora_weights", ""))
    return next((r for r in RESIDUAL_INITS if init.startswith(r)), None)


def plain_model(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A U-Net of ``model``'s architecture (ours, without PEFT layers) holding ``state``."""
    from ..config import ModelConfig
    from ..model import build_unet

    unet = build_unet(ModelConfig.model_validate(model.config))
    unet.load_state_dict(state)
    return unet.eval().requires_grad_(False)


def sd_family(cross_attention_dim: int, prediction_type: str) -> str:
    """kohya's model version for ``ss_*`` metadata: SD 2.x conditions on 1024-wide OpenCLIP states."""
    if cross_attention_dim != 1024:
        return "sd1"
    return "sd2-v" if prediction_type in ("v", "v_prediction") else "sd2"


def write_lora_export(folder: Path, lora: LoraFile, formats: str = "both", family: str = "sd1") -> list[Path]:
    """``folder`` (``{export}/lora``): diffusers' ``pytorch_lora_weights.safetensors`` and/or
    :data:`KOHYA_FILE`; returns the files."""
    if formats not in FORMATS:
        raise LoraFormatError(f"--lora-format must be one of {', '.join(FORMATS)}, not {formats!r}")
    folder = Path(folder)
    files = []
    if formats in ("diffusers", "both"):
        files.append(save_diffusers_lora(folder, lora.unet, lora.text, rank=lora.rank, alpha=lora.alpha))
    if formats in ("kohya", "both"):
        files.append(save_kohya_lora(folder / KOHYA_FILE, lora.unet, lora.text, rank=lora.rank, alpha=lora.alpha,
                                     family=family))
    return files
