"""EMA: warm-up schedule, the update, several decays, and the sharded layout (ZeRO-3's)."""
from __future__ import annotations

import math

import pytest
import torch

from ldm_train.train.ema import EMA, Layout, consolidate, local_chunks, param_shapes


def test_warmup_decay_formula_and_cap():
    ema = EMA.of_model(torch.nn.Linear(2, 2), [0.999, 0.2])
    for t, expected in [(0, 1 / 10), (1, 2 / 11), (10, 11 / 20), (100, 101 / 110), (10_000, 0.999)]:
        ema.num_updates = t
        assert ema.current_decay(0.999) == pytest.approx(expected)
    ema.num_updates = 5
    assert ema.current_decay(0.2) == pytest.approx(0.2)  # 6/15 = 0.4 > 0.2
    no_warmup = EMA.of_model(torch.nn.Linear(2, 2), [0.999], warmup=False)
    assert no_warmup.current_decay(0.999) == 0.999


def test_update_is_the_weighted_average_for_each_decay():
    model = torch.nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = EMA.of_model(model, [0.99, 0.5], warmup=False)
    layout = ema.layout
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(local_chunks(model, layout, zero3=False))
    assert torch.allclose(ema.full_weights(0)["weight"], torch.full((1, 3), 0.01))
    assert torch.allclose(ema.full_weights(1)["weight"], torch.full((1, 3), 0.5))
    with torch.no_grad():
        model.weight.fill_(2.0)
    ema.update(local_chunks(model, layout, zero3=False))
    assert torch.allclose(ema.full_weights(1)["weight"], torch.full((1, 3), 0.5 * 0.5 + 0.5 * 2))
    assert ema.num_updates == 2


def test_copy_to_and_state_round_trip():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    ema = EMA.of_model(model, [0.9])
    for v in ema.shadows[0].values():
        v.normal_()
    target = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    ema.copy_to(target)
    for k, p in target.named_parameters():
        assert torch.equal(p.detach().flatten(), ema.shadows[0][k])
    state = ema.state_dict()
    other = EMA.of_model(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)), [0.9])
    other.load_state_dict(state, 7)
    assert other.num_updates == 7
    assert all(torch.equal(other.full_weights()[k], v) for k, v in ema.full_weights().items())
    state["0/0.weight"].add_(1.0)  # state_dict returns copies
    assert not torch.equal(ema.shadows[0]["0.weight"], state["0/0.weight"])


@pytest.mark.parametrize("world", [2, 3, 4, 7])
def test_sharded_chunks_partition_every_parameter_and_consolidate_exactly(world):
    """Rank r owns elements [r*ceil(n/W), (r+1)*ceil(n/W)) of each flattened parameter (DeepSpeed
    ZeRO-3's partitioning): the chunks cover each parameter once, memory is ~1/W per rank, and
    the sharded EMAs of all ranks consolidate to the unsharded EMA bit for bit."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 3))  # 35, 7, 21, 3 elements
    shapes = param_shapes(model, zero3=False)
    full_ema = EMA.of_model(model, [0.9, 0.99])
    shards = [EMA(local_chunks(model, Layout(r, world, shapes), False), Layout(r, world, shapes), [0.9, 0.99]) for r in range(world)]
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        full_ema.update(local_chunks(model, full_ema.layout, False))
        for e in shards:
            e.update(local_chunks(model, e.layout, False))
    for name, shape in shapes.items():
        sizes = [e.shadows[0][name].numel() for e in shards]
        assert sum(sizes) == math.prod(shape)
        assert max(sizes) == math.ceil(math.prod(shape) / world)
    total = sum(e.nbytes() for e in shards)
    assert total == full_ema.nbytes()
    assert max(e.nbytes() for e in shards) <= full_ema.nbytes() / world + 2 * 4 * 4 * world  # padding only
    for index in (0, 1):
        def pad(e, k):
            out = torch.zeros(e.layout.chunk_size(k))
            out[: e.shadows[index][k].numel()] = e.shadows[index][k]
            return out
        parts = {k: [pad(e, k) for e in shards] for k in shapes}
        rebuilt = consolidate(parts, shapes)
        want = full_ema.full_weights(index)
        assert all(torch.equal(rebuilt[k], want[k]) for k in want)


def test_sharded_ema_refuses_to_rebuild_without_a_gather():
    model = torch.nn.Linear(4, 4)
    layout = Layout(0, 2, param_shapes(model, False))
    ema = EMA(local_chunks(model, layout, False), layout, [0.9])
    with pytest.raises(ValueError, match="gather"):
        ema.full_weights()
