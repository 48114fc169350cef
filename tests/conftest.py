"""Shared fixtures: a micro run (data -> train-vae -> encode -> train -> export) built once per
session through ``ldm_train.stages`` on small synthetic shards, plus small data helpers.

Everything is written below pytest's tmp folders; nothing is downloaded.
"""
from __future__ import annotations

import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

# The tiny models here are far faster on one thread, and on a shared 2-core machine two OpenMP
# thread pools spinning against each other make them ~50x slower. Subprocesses get the same.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing downloads

import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
MICRO = REPO / "configs" / "micro.yaml"
EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
CPU = torch.device("cpu")

COLORS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (240, 210, 20)}
SHAPES = ("circle", "square", "triangle")


def synthetic_samples(n: int, size: int = 32, seed: int = 0, prefix: str = "s") -> list[tuple[str, Image.Image, str, dict]]:
    """``n`` coloured shapes on white with captions such as ``"red circle 3"`` (all distinct)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        color_name = list(COLORS)[i % len(COLORS)]
        shape = SHAPES[(i // len(COLORS)) % len(SHAPES)]
        image = Image.new("RGB", (size, size), "white")
        draw = ImageDraw.Draw(image)
        lo, hi = rng.randrange(0, size // 4), rng.randrange(3 * size // 4, size)
        box = (lo, lo, hi, hi)
        if shape == "circle":
            draw.ellipse(box, fill=COLORS[color_name])
        elif shape == "square":
            draw.rectangle(box, fill=COLORS[color_name])
        else:
            draw.polygon([(lo, hi), (hi, hi), ((lo + hi) // 2, lo)], fill=COLORS[color_name])
        out.append((f"{prefix}{i:05d}", image, f"{color_name} {shape} {i}", {"index": i}))
    return out


@dataclass
class MicroRun:
    """A finished micro run: ``cfg`` (run.dir = ``run``), the folders each stage wrote, and the
    summaries the stages returned."""

    cfg: object
    run: Path
    export: Path
    results: dict
    n_train: int
    n_val: int


def micro_config(run_dir: Path, *overrides: str):
    from ldm_train.config import load_config

    return load_config(MICRO, [f"run.dir={run_dir}", "distributed.cpu=true", *overrides])


def copy_run(micro: MicroRun, root: Path, parts: tuple[str, ...] = ("latents",)) -> Path:
    """A fresh run folder holding copies of the micro run's ``parts`` (latents for training;
    add vae, text and data for evaluation)."""
    root.mkdir(parents=True)
    for part in parts:
        shutil.copytree(micro.run / part, root / part)
    return root


@pytest.fixture(scope="session")
def micro_run(tmp_path_factory) -> MicroRun:
    """Build the micro run once; tests must only read it (write into their own tmp_path)."""
    from ldm_train import stages
    from ldm_train.data.shards import write_shards

    run = tmp_path_factory.mktemp("micro") / "run"
    cfg = micro_config(run)
    n_train, n_val = 24, 6
    write_shards(synthetic_samples(n_train, seed=1, prefix="t"), cfg.path(cfg.data.train_shards), "train", 16)
    write_shards(synthetic_samples(n_val, seed=2, prefix="v"), cfg.path(cfg.data.val_shards), "val", 16)
    results = {
        "train-vae": stages.train_vae_stage(cfg, False),
        "encode": stages.encode_stage(cfg, False),
        "train": stages.train_stage(cfg, False),
    }
    export = cfg.path(cfg.export.dir)
    results["export"] = stages.export_stage(cfg, export, False)
    return MicroRun(cfg, run, export, results, n_train, n_val)


@pytest.fixture(scope="session")
def micro_latents(micro_run):
    from ldm_train.latents.cache import load_latents

    cfg = micro_run.cfg
    return load_latents(cfg.path(cfg.latents.dir) / "train")


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(config, items):
    """CI runs the suite on two pytest-xdist workers (``-n 2 --dist loadgroup``). Every test that
    starts several processes (``multiprocess``) or uses the local Slurm goes to one worker, one at
    a time, so at most one multi-rank job runs while the other worker takes the single-process
    tests: the machine is never asked for more than about three busy processes, and the one local
    Slurm cluster is started once."""
    for item in items:
        if item.get_closest_marker("multiprocess") or "slurm_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("processes"))


def pytest_collection_finish(session):
    """Refuse to run when the grouping above did not take: pytest-xdist's loadgroup tags each node
    id with its group, which pytest 9 no longer reads (hence ``pytest<9`` in the dev extra); the
    multi-process tests would then run two at a time without anyone noticing."""
    if not session.config.getoption("loadgroup", False):  # what pytest-xdist sets on its workers
        return
    lost = [i.nodeid for i in session.items if i.get_closest_marker("xdist_group") and "@" not in i.nodeid]
    if lost:
        raise pytest.UsageError(f"--dist loadgroup did not group {len(lost)} tests (e.g. {lost[0]}): "
                                f"pytest {pytest.__version__} and this pytest-xdist do not work together")
