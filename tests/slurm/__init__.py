"""Tests of ldm_train.slurm (a package so that its conftest does not shadow tests/conftest.py)."""
