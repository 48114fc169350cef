"""Imports flow one way through the stages (see ``ldm_train/__init__.py``):

    data(0) -> autoencoder / text(1) -> latents(2) -> model(3) -> diffusion(4) -> train(5)
    -> eval(6) -> export(7)

A subpackage may import its own layer or earlier ones, never a later one. ``config`` and
``utils`` are the base everyone may import (so they import no layer themselves); ``stages``,
``demo`` and ``cli`` orchestrate and may import anything. ``model`` and ``diffusion`` never
import accelerate, deepspeed or torch.distributed: distribution enters only in ``train``.
The scan is static (ast), so it also sees imports inside functions.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "ldm_train"
LAYERS = {
    "data": 0,
    "autoencoder": 1,
    "text": 1,
    "latents": 2,
    "model": 3,
    "pretrained": 4,  # after diffusion. Stable Diffusion checkpoints in: U-Net, VAE, text tower and schedule
    "diffusion": 4,
    "train": 5,
    "eval": 6,
    "export": 7,
}
BASE = {"config", "errors", "utils"}  # importable from anywhere
ORCHESTRATION = {"stages", "demo", "cli", "__main__", "config_doc", "slurm"}  # may import anything
TOP_LEVEL_OK = {"__init__"}
DISTRIBUTED = ("accelerate", "deepspeed", "torch.distributed")
NO_DISTRIBUTED = ("model", "diffusion")


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imported_modules(source: str, module: str, is_package: bool) -> set[str]:
    """Absolute dotted names imported by ``module`` (relative imports resolved). For
    ``from X import a`` both ``X`` and ``X.a`` are returned, since ``a`` may be a submodule."""
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                if node.level > 1:
                    base_parts = base_parts[: -(node.level - 1)]
                base = ".".join(base_parts)
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names if alias.name != "*")
    return found


def subpackage_of(name: str) -> str | None:
    """``ldm_train.latents.cache`` -> ``latents``; None for modules outside ldm_train."""
    parts = name.split(".")
    if parts[0] != "ldm_train" or len(parts) < 2:
        return None
    return parts[1]


def violations(module: str, imports: set[str]) -> list[str]:
    own = subpackage_of(module)
    if own in ORCHESTRATION or own is None:
        return []
    bad = []
    for name in sorted(imports):
        target = subpackage_of(name)
        if target is None or target == own or target in BASE:
            continue
        if own in BASE:
            if target in LAYERS or target in ORCHESTRATION:
                bad.append(f"{module} (base module) imports {name}")
            continue
        if target in ORCHESTRATION:
            bad.append(f"{module} imports orchestration module {name}")
        elif target in LAYERS and own in LAYERS and LAYERS[target] > LAYERS[own]:
            bad.append(f"{module} (layer {own}={LAYERS[own]}) imports later layer {name} ({target}={LAYERS[target]})")
    return bad


def distributed_imports(imports: set[str]) -> list[str]:
    bad = set()
    for name in imports:
        for forbidden in DISTRIBUTED:
            if name == forbidden or name.startswith(forbidden + "."):
                bad.add(name)
    return sorted(bad)


def all_modules() -> list[tuple[str, Path]]:
    return sorted((module_name(p), p) for p in PKG.rglob("*.py"))


def scan(path: Path) -> set[str]:
    name = module_name(path)
    return imported_modules(path.read_text(encoding="utf-8"), name, path.name == "__init__.py")


# --- the scanner itself (so the real checks below can fail) ------------------------------------


def test_scanner_resolves_relative_and_absolute_imports():
    src = (
        "from ..eval.pipeline import load_pipeline\n"
        "from . import ema\n"
        "from .. import export\n"
        "import ldm_train.model.unet as u\n"
        "def f():\n"
        "    from ldm_train.diffusion import build_schedule\n"
    )
    found = imported_modules(src, "ldm_train.train.loop", is_package=False)
    assert "ldm_train.eval.pipeline" in found
    assert "ldm_train.train.ema" in found
    assert "ldm_train.export" in found
    assert "ldm_train.model.unet" in found
    assert "ldm_train.diffusion" in found  # inside a function
    pkg = imported_modules("from .vae import build_vae\n", "ldm_train.autoencoder", is_package=True)
    assert pkg == {"ldm_train.autoencoder.vae", "ldm_train.autoencoder.vae.build_vae"}


def test_scanner_flags_backward_imports():
    assert violations("ldm_train.model.unet", {"ldm_train.diffusion.schedule"})
    assert violations("ldm_train.data.shards", {"ldm_train.autoencoder.vae"})
    assert violations("ldm_train.train.loop", {"ldm_train.eval"})
    assert violations("ldm_train.eval.sample", {"ldm_train.stages"})
    assert violations("ldm_train.utils.runs", {"ldm_train.data.shards"})
    assert violations("ldm_train.config", {"ldm_train.model"})
    assert not violations("ldm_train.diffusion.schedule", {"ldm_train.config", "ldm_train.model", "torch"})
    assert not violations("ldm_train.text.encoder", {"ldm_train.autoencoder.vae", "ldm_train.utils.runs"})
    assert not violations("ldm_train.stages", {"ldm_train.export.export", "ldm_train.data"})


def test_scanner_flags_distributed_imports():
    src = "import torch.distributed as dist\nfrom accelerate import Accelerator\nfrom torch import distributed\nimport deepspeed\n"
    found = imported_modules(src, "ldm_train.model.unet", is_package=False)
    assert distributed_imports(found) == ["accelerate", "accelerate.Accelerator", "deepspeed", "torch.distributed"]
    assert distributed_imports({"torch", "torch.nn", "accelerated_thing"}) == []


# --- the package ------------------------------------------------------------------------------


def test_every_subpackage_and_module_is_classified():
    known = set(LAYERS) | BASE | ORCHESTRATION | TOP_LEVEL_OK
    for name, path in all_modules():
        parts = name.split(".")
        if len(parts) == 1:
            continue  # ldm_train/__init__.py
        assert parts[1] in known, f"{path}: add {parts[1]!r} to the layer table in this test"
    found = {p.name for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert found - ORCHESTRATION == set(LAYERS) | {"utils"}


MODULES = all_modules()


@pytest.mark.parametrize("name,path", MODULES, ids=[m for m, _ in MODULES])
def test_imports_flow_one_way(name, path):
    assert violations(name, scan(path)) == []


@pytest.mark.parametrize(
    "name,path",
    [(m, p) for m, p in MODULES if subpackage_of(m) in NO_DISTRIBUTED],
    ids=[m for m, _ in MODULES if subpackage_of(m) in NO_DISTRIBUTED],
)
def test_model_and_diffusion_do_not_import_distributed(name, path):
    assert distributed_imports(scan(path)) == []


def test_model_and_diffusion_have_modules():
    subs = {subpackage_of(m) for m, _ in MODULES}
    assert set(NO_DISTRIBUTED) <= subs
