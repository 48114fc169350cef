"""Caption retrieval, FD-CLIP and shuffled-caption CLIP score on known inputs."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import linalg

from ldm_train.eval.clip_metrics import (caption_retrieval, frechet_distance, noise_images, pair_score, shifted,
                                         text_features)


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def test_identical_sets_have_distance_zero_and_a_shift_is_measured():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(64, 8, generator=g, dtype=torch.float64)
    assert frechet_distance(a, a.clone()) == pytest.approx(0.0, abs=1e-3)
    shift = torch.zeros(8, dtype=torch.float64)
    shift[0] = 2.0
    # same covariance, means 2 apart: the distance is |mu1 - mu2|^2 = 4
    assert frechet_distance(a, a + shift) == pytest.approx(4.0, rel=1e-3)


def test_frechet_distance_matches_the_formula():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(50, 4, generator=g, dtype=torch.float64)
    b = 0.5 * torch.randn(40, 4, generator=g, dtype=torch.float64) + 1.0
    mu1, mu2 = a.mean(0).numpy(), b.mean(0).numpy()
    s1, s2 = np.cov(a.numpy(), rowvar=False), np.cov(b.numpy(), rowvar=False)
    expected = float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real))
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-4)
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(a[:1], b)


def test_retrieval_of_perfectly_matched_features_is_complete():
    prompts = unit(torch.eye(5)[:, :5] + 0.1)
    targets = [0, 1, 2, 3, 4, 0, 1]
    out = caption_retrieval(prompts[targets], prompts, targets)
    assert out == {"top1": 1.0, "mean_rank": 1.0, "chance_top1": 0.2, "images": 7, "prompts": 5}
    # every image's features are its neighbour prompt's: its own prompt is never first
    wrong = caption_retrieval(prompts[shifted(targets, 5)], prompts, targets)
    assert wrong["top1"] == 0.0 and wrong["mean_rank"] > 1


def test_shuffled_captions_score_lower():
    g = torch.Generator().manual_seed(2)
    prompts = unit(torch.randn(8, 16, generator=g))
    targets = [i for i in range(8) for _ in range(3)]
    images = unit(prompts[targets] + 0.3 * torch.randn(24, 16, generator=g))
    matched, shuffled = pair_score(images, prompts, targets), pair_score(images, prompts, shifted(targets, 8))
    assert 0 <= shuffled < matched <= 100
    assert matched == pytest.approx(100 * float((images * prompts[targets]).sum(-1).clamp(min=0).mean()), rel=1e-6)
    assert all(s != t for s, t in zip(shifted(targets, 8), targets))


def test_noise_images_are_seeded_uint8():
    a, b = noise_images(4, (16, 16), seed=3), noise_images(4, (16, 16), seed=3)
    assert a.dtype == torch.uint8 and a.shape == (4, 3, 16, 16) and torch.equal(a, b)
    assert not torch.equal(a, noise_images(4, (16, 16), seed=4))


def test_text_features_are_unit_and_batch_independent():
    import open_clip

    from ldm_train.config import ClipConfig
    from ldm_train.text.clip_train import build_clip

    cfg = ClipConfig(embed_dim=16, vision={"image_size": 16, "patch_size": 8, "width": 16, "layers": 1, "head_width": 8},
                     text={"width": 16, "layers": 1, "heads": 2, "context_length": 8})
    model, preprocess, tokenizer, _ = build_clip(cfg, seed=0)
    bundle = (model.eval(), preprocess, tokenizer)
    prompts = ["red heart", "green apple", "finland"]
    feats = text_features(bundle, prompts)
    assert torch.allclose(feats.norm(dim=-1), torch.ones(3), atol=1e-6)
    assert torch.allclose(feats, text_features(bundle, prompts, batch_size=1), atol=1e-6)
