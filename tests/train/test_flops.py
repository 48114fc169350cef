"""The FLOP count behind MFU: one transformer block against a hand count, and the meta-device
count of the whole U-Net against torch.utils.flop_counter on real tensors (forward and backward)."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from ldm_train.config import load_config
from ldm_train.model import build_unet
from ldm_train.model.layers import BasicTransformerBlock
from ldm_train.train.telemetry import forward_flops

from conftest import REPO


def block_flops_by_hand(b: int, n: int, c: int, l: int, d: int) -> int:
    """Matmul FLOPs (2 per multiply-add) of a self-attention + cross-attention + GEGLU block on
    ``n`` tokens of ``c`` channels, ``l`` context tokens of ``d`` channels, batch ``b``."""
    self_attn = 4 * 2 * n * c * c + 2 * (2 * n * n * c)  # q, k, v, out; QK^T and AV
    cross = 2 * (2 * n * c * c) + 2 * (2 * l * d * c) + 2 * (2 * n * l * c)  # q, out; k, v; QK^T, AV
    ff = 2 * n * c * (8 * c) + 2 * n * (4 * c) * c  # GEGLU in (2 x 4c), out
    return b * (self_attn + cross + ff)


def count(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_one_transformer_block_matches_the_hand_count():
    b, n, c, l, d = 2, 64, 64, 8, 32
    with torch.device("meta"):
        block = BasicTransformerBlock(c, heads=2, dim_head=32, context_dim=d)
        x, ctx = torch.empty(b, n, c), torch.empty(b, l, d)
    assert count(lambda: block(x, ctx)) == block_flops_by_hand(b, n, c, l, d)


def test_unet_forward_flops_agree_with_the_counter_on_real_tensors():
    """The meta count (what MFU uses) vs the counter on real CPU tensors, forward and forward +
    backward (x3, the convention). On CPU the counter has no formula for the attention core
    (``_scaled_dot_product_flash_attention_for_cpu``), so the real count is a little lower."""
    cfg = load_config(REPO / "configs" / "demo.yaml").model
    torch.manual_seed(0)
    model = build_unet(cfg)
    z, t = torch.randn(2, 4, 16, 16), torch.zeros(2, dtype=torch.long)
    ctx = torch.randn(2, 8, cfg.cross_attention_dim)
    meta = forward_flops(cfg, [4, 16, 16], [8, cfg.cross_attention_dim], batch=2)
    real = count(lambda: model(z, t, ctx))
    assert real == pytest.approx(meta, rel=0.03)
    train_step = count(lambda: model(z, t, ctx).pow(2).mean().backward())
    assert train_step == pytest.approx(3 * meta, rel=0.03)
