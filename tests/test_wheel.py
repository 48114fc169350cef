"""The installed wheel works outside a checkout: presets and the Slurm template are package data.

The wheel is built from a copy of the checkout's sources (``configs/`` and ``slurm/job.sbatch`` are
links into the package there), installed with no dependencies into a fresh venv whose dependencies
come from the running environment, and run from a folder outside the checkout.
"""
from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _run(argv, cwd, env, timeout=300):
    proc = subprocess.run([str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{argv}: rc {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"  # a copy: the build writes build/ and *.egg-info next to the sources
    src.mkdir()
    shutil.copy(ROOT / "pyproject.toml", src)
    shutil.copy(ROOT / "README.md", src)
    shutil.copytree(ROOT / "ldm_train", src / "ldm_train", ignore=shutil.ignore_patterns("__pycache__"))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", tmp / "dist", src], tmp, env)
    (wheel,) = (tmp / "dist").glob("ldm_train-*.whl")
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], tmp, env)
    _run([sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "--no-deps", "--no-index", wheel],
         tmp, env)
    # torch & co. from the running environment, as a plain path: a path named in a .pth file is not a
    # site dir, so the editable install's own .pth there (which would put the checkout first) is not read
    (purelib,) = (venv / "lib").glob("python3*/site-packages")
    (purelib / "_host_env.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    outside = tmp / "elsewhere"
    outside.mkdir()
    return venv, purelib, outside, env


def test_the_wheel_holds_the_package_data(venv):
    _, purelib, _, _ = venv
    presets = sorted(p.name for p in (purelib / "ldm_train" / "presets").glob("*.yaml"))
    assert presets == sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))
    assert (purelib / "ldm_train" / "slurm" / "job.sbatch").read_text() == (ROOT / "slurm" / "job.sbatch").read_text()


def test_the_venv_imports_the_wheel_not_the_checkout(venv):
    path, purelib, outside, env = venv
    code = "import ldm_train, ldm_train.cli, torch; print(ldm_train.__file__); print(ldm_train.cli.__file__)"
    out = _run([path / "bin" / "python", "-c", code], outside, env).stdout.split()
    assert [Path(p) for p in out] == [purelib / "ldm_train" / "__init__.py", purelib / "ldm_train" / "cli.py"]


def test_slurm_dry_run_with_a_preset_name_outside_the_checkout(venv):
    path, purelib, outside, env = venv
    run = outside / "run"
    proc = _run([path / "bin" / "ldm-train", "slurm", "submit", "--config", "micro", f"run.dir={run}", "--dry-run",
                 "--gpus-per-node", "1"], outside, env)
    assert "#SBATCH" in proc.stdout and "srun" in proc.stdout and "torchrun" in proc.stdout, proc.stdout
    assert "ldm_train" in proc.stdout and str(ROOT) not in proc.stdout
    assert not run.exists()  # a dry run writes nothing


def test_train_help_and_version_from_the_installed_script(venv):
    path, _, outside, env = venv
    assert _run([path / "bin" / "ldm-train", "train", "--help"], outside, env).stdout.startswith("usage: ldm-train train")
    assert _run([path / "bin" / "ldm-train", "--version"], outside, env).stdout.strip() == "ldm-train 0.1.0"
    assert _run([path / "bin" / "python", "-m", "ldm_train", "--version"], outside, env).stdout.startswith("ldm-train ")
