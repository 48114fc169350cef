"""The EMA re-cut and the per-rank seeds of an elastic resume (one process; the end-to-end
matrix over processes and strategies is test_elastic.py)."""
from __future__ import annotations

import pytest
import torch

from ldm_train.train import checkpoint as ck
from ldm_train.train.ema import EMA, Layout, local_chunks, param_shapes
from ldm_train.train.reshard import ReshardError, rank_seed, recut_ema


def model() -> torch.nn.Module:
    torch.manual_seed(0)  # 7 elements: uneven chunks over 2, 3 and 4 ranks; 2 elements: an empty chunk over 3
    return torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1, bias=False))


def save_sharded(folder, net, world: int, decays=(0.9, 0.99)) -> dict[str, torch.Tensor]:
    """Every rank's EMA files of ``world`` chunks, after two updates; returns the full EMA of decay 0."""
    shapes = param_shapes(net, zero3=False)
    emas = [EMA(local_chunks(net, Layout(r, world, shapes), False), Layout(r, world, shapes), list(decays))
            for r in range(world)]
    for step in range(2):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.5 * (step + 1))
        for ema in emas:
            ema.update(local_chunks(net, ema.layout, False))
    for r, ema in enumerate(emas):
        ck.save_ema(folder, ema, r)
    return ck.consolidated_ema(folder)


@pytest.mark.parametrize("before, after", [(1, 2), (2, 1), (2, 3), (3, 2), (3, 4)])
def test_ema_is_recut_to_the_new_layout(tmp_path, before, after):
    net = model()
    full = save_sharded(tmp_path, net, before)
    shapes = param_shapes(net, zero3=False)
    pieces = []
    for r in range(after):
        layout = Layout(r, after, shapes)
        chunk, updates = recut_ema(tmp_path, layout, decays=2)
        assert updates == 2
        for name, shape in shapes.items():
            start, end = layout.chunk(name)
            assert torch.equal(chunk[f"0/{name}"], full[name].reshape(-1)[start:end])
        pieces.append(chunk)
    for name in shapes:  # the new chunks put together are the old EMA, for every decay
        for i in range(2):
            joined = torch.cat([p[f"{i}/{name}"] for p in pieces])
            old = ck.consolidated_ema(tmp_path, decay=[0.9, 0.99][i])[name].reshape(-1)
            assert torch.equal(joined, old)


def test_ema_of_other_parameters_is_refused(tmp_path):
    save_sharded(tmp_path, model(), 2)
    other = torch.nn.Linear(4, 4)
    with pytest.raises(ReshardError, match="ema-00000-of-00002.safetensors"):
        recut_ema(tmp_path, Layout(0, 1, param_shapes(other, zero3=False)), decays=2)


def test_rank_seeds_are_distinct_and_deterministic():
    seeds = {rank_seed(0, step, world, rank, stream) for step in (2, 4) for world in (1, 2, 3)
             for rank in range(world) for stream in range(3)}
    assert len(seeds) == 2 * 6 * 3
    assert rank_seed(0, 2, 3, 1, 0) == rank_seed(0, 2, 3, 1, 0) != rank_seed(1, 2, 3, 1, 0)
    assert all(0 <= s < 2**63 for s in seeds)
