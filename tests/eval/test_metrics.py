"""FID/KID/CLIP score with small local models: nothing is downloaded (network access fails the test)."""
from __future__ import annotations

import json
import math
import urllib.request

import pytest
import torch
from torch import nn

from ldm_train.eval import metrics
from ldm_train.eval.metrics import MetricsUnavailable, clip_score, compute_fid_kid, evaluate_images, load_inception


class TinyFeatures(nn.Module):
    """Fixed random conv net + pooling: uint8 [N,3,H,W] -> [N, 64]."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv1 = nn.Conv2d(3, 32, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, stride=2, padding=1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def forward(self, x):
        x = x.float() / 127.5 - 1
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return x.mean(dim=(2, 3))


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def boom(*a, **k):
        raise AssertionError(f"network access attempted: {a[:1]}")

    monkeypatch.setattr(urllib.request, "urlopen", boom)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", boom)
    monkeypatch.setattr(torch.hub, "download_url_to_file", boom)
    try:
        import torch_fidelity.feature_extractor_inceptionv3 as tfi

        monkeypatch.setattr(tfi, "load_state_dict_from_url", boom)
    except ImportError:
        pass


def images(n, size=32, seed=0):
    """Smooth random images (low-frequency blobs) as uint8."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g)
    return (nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False) * 255).round().to(torch.uint8)


def noisy(x, sigma, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (x.float() + sigma * torch.randn(x.shape, generator=g)).clamp(0, 255).round().to(torch.uint8)


@pytest.fixture(scope="module")
def feat():
    return TinyFeatures().eval()


def test_fid_kid_zero_on_self_and_grow_with_noise(feat):
    real = images(96)
    fake = images(96, seed=5)  # a second draw of the same distribution
    kw = dict(reference_cache=None, reference_key={"dataset": "blobs"}, kid_subset_size=48, kid_subsets=10)
    same = compute_fid_kid(real, real, feat, **kw)
    levels = [compute_fid_kid(real, noisy(fake, s), feat, **kw) for s in (10.0, 40.0, 100.0)]
    noise = compute_fid_kid(real, torch.randint(0, 256, real.shape, dtype=torch.uint8), feat, **kw)
    assert abs(same["fid"]) < 1e-3 * noise["fid"]
    # KID is an unbiased MMD estimate over random subsets: about 0 on the same set, not exactly 0
    assert abs(same["kid_mean"]) < 1e-2 * noise["kid_mean"]
    fids = [r["fid"] for r in levels]
    kids = [r["kid_mean"] for r in levels]
    assert fids[0] < fids[1] < fids[2], fids
    assert kids[0] < kids[1] < kids[2], kids
    p = same["protocol"]
    assert p["feature_dim"] == 64 and p["num_real"] == 96 and p["num_fake"] == 96
    assert p["feature_extractor"].startswith("custom:") and p["kid_subset_size"] == 48
    assert p["reference_key"] == {"dataset": "blobs"}
    json.dumps(same)  # the whole result, protocol included, is JSON-serialisable
    assert same["reference_cache"] == "off"


def test_reference_cache_hit_and_invalidation(feat, tmp_path):
    real, fake = images(40), noisy(images(40, seed=3), 20.0)
    key = {"dataset": "val-shards", "resolution": 32}
    kw = dict(reference_cache=tmp_path, kid_subset_size=20, kid_subsets=5)
    first = compute_fid_kid(real, fake, feat, reference_key=key, **kw)
    second = compute_fid_kid(real, fake, feat, reference_key=key, **kw)
    assert first["reference_cache"] == "miss" and second["reference_cache"] == "hit"
    assert second["fid"] == first["fid"] and second["kid_mean"] == first["kid_mean"]
    assert len(list(tmp_path.glob("*.safetensors"))) == 1 and len(list(tmp_path.glob("*.json"))) == 1
    # the cached features are what is used: a hit ignores the real images' pixels
    assert compute_fid_kid(real.flip(0), fake, feat, reference_key=key, **kw)["reference_cache"] == "hit"
    # changing the count, the resolution, the key or the feature extractor is a miss
    assert compute_fid_kid(real[:30], fake, feat, reference_key=key, **kw)["reference_cache"] == "miss"
    real64 = nn.functional.interpolate(real.float(), size=(48, 48)).round().to(torch.uint8)
    assert compute_fid_kid(real64, fake, feat, reference_key=key, **kw)["reference_cache"] == "miss"
    assert compute_fid_kid(real, fake, feat, reference_key={**key, "resolution": 64}, **kw)["reference_cache"] == "miss"
    other = TinyFeatures()
    with torch.no_grad():
        other.conv1.bias.add_(1.0)
    assert compute_fid_kid(real, fake, other, reference_key=key, **kw)["reference_cache"] == "miss"
    assert compute_fid_kid(real, fake, feat, reference_key=key, **kw)["reference_cache"] == "hit"


def test_inception_offline_reports_cleanly(tmp_path):
    for path in (None, tmp_path / "missing.pth"):
        with pytest.raises(MetricsUnavailable) as e:
            load_inception(path)
        assert "eval.metrics.inception_weights" in str(e.value) and "pt_inception-2015-12-05-6726825d.pth" in str(e.value)
    with pytest.raises(MetricsUnavailable, match="eval.metrics.inception_weights"):
        compute_fid_kid(images(4), images(4), 2048, None, {}, 2)
    out = evaluate_images(images(4), images(4, seed=1), ["a", "b", "c", "d"], inception_weights=None,
                          clip_model="ViT-B-32", clip_weights=None)
    assert out["fid"] is None and out["kid_mean"] is None and "eval.metrics.inception_weights" in out["fid_error"]
    assert out["clip_score"] is None and "eval.metrics.clip_weights" in out["clip_error"]
    assert out["fid_seconds"] < 2 and out["clip_seconds"] < 2  # no download attempt timing out
    json.dumps(out)


def test_bad_inception_file_is_unavailable(tmp_path):
    pytest.importorskip("torch_fidelity")
    bad = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save({"not": torch.zeros(1)}, bad)
    with pytest.raises(MetricsUnavailable, match="eval.metrics.inception_weights"):
        load_inception(bad)


# ----------------------------------------------------------------------------------------- CLIP

TINY_CLIP = "ldm-test-tiny-clip-metrics"


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    import open_clip
    from safetensors.torch import save_file

    from ldm_train.text.encoder import _register

    _register(TINY_CLIP, {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    })
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_CLIP)
    path = tmp_path_factory.mktemp("clip") / "tiny_clip.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def test_clip_score_matches_hand_computation(tiny_clip):
    import open_clip
    from PIL import Image

    imgs = images(6, size=40)
    prompts = ["red circle", "blue square", "green apple", "tomato", "cactus", "brown heart"]
    a = clip_score(imgs, prompts, TINY_CLIP, tiny_clip)
    b = clip_score(imgs, prompts, TINY_CLIP, tiny_clip, batch_size=4)
    assert 0.0 <= a["clip_score"] <= 100.0
    assert a["clip_score"] == pytest.approx(b["clip_score"], abs=1e-4)  # deterministic, batch-independent
    assert a["clip_score"] >= a["clip_score_clamp_after_mean"] - 1e-9

    model, _, preprocess = open_clip.create_model_and_transforms(TINY_CLIP, pretrained=str(tiny_clip))
    model.eval()
    with torch.no_grad():
        pix = torch.stack([preprocess(Image.fromarray(im.permute(1, 2, 0).numpy())) for im in imgs])
        assert pix.shape[-2:] == (32, 32)
        fi = model.encode_image(pix)
        ft = model.encode_text(open_clip.get_tokenizer(TINY_CLIP)(prompts))
    cos = torch.nn.functional.cosine_similarity(fi, ft, dim=-1).double()
    expected = float(100 * cos.clamp(min=0).mean())
    assert a["clip_score"] == pytest.approx(expected, abs=1e-3)
    assert not math.isnan(a["clip_score"]) and a["clip_protocol"]["num_pairs"] == 6


def test_clip_offline_and_evaluate_images_runs_what_is_available(tiny_clip, feat, tmp_path):
    with pytest.raises(MetricsUnavailable) as e:
        clip_score(images(2), ["a", "b"], TINY_CLIP, tmp_path / "none.safetensors")
    assert "eval.metrics.clip_weights" in str(e.value) and "eval.metrics.clip_model" in str(e.value)
    with pytest.raises(MetricsUnavailable, match="eval.metrics.clip_model"):
        clip_score(images(2), ["a", "b"], "no-such-clip-arch", tiny_clip)
    out = evaluate_images(images(8, seed=2), images(8), ["x"] * 8, feature=feat, reference_cache=tmp_path,
                          reference_key={"d": 1}, kid_subset_size=4, kid_subsets=3,
                          clip_model=TINY_CLIP, clip_weights=tiny_clip)
    assert out["fid"] is not None and out["fid"] > 0 and out["reference_cache"] == "miss"
    assert 0 <= out["clip_score"] <= 100 and "fid_error" not in out and "clip_error" not in out
    assert out["fid_seconds"] >= 0 and out["clip_seconds"] >= 0
    with pytest.raises(metrics.UserError, match="JSON"):
        compute_fid_kid(images(4), images(4), feat, tmp_path, {"bad": object()}, 2)
    json.dumps(out)


def test_load_inception_from_local_file(tmp_path, monkeypatch):
    """The real loading path on a random-weights state dict of the right architecture (no download)."""
    import hashlib

    pytest.importorskip("torch_fidelity")  # a project dependency (torchmetrics' Inception needs it)
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    from torchmetrics.image.fid import NoTrainInceptionV3

    empty = tmp_path / "empty.pth"
    torch.save({}, empty)
    with monkeypatch.context() as m:  # build the architecture once without any weights file
        m.setattr(FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
        torch.manual_seed(0)
        state = NoTrainInceptionV3("inception-v3-compat", ["2048"], str(empty)).state_dict()
    path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(state, path)

    net = load_inception(path)
    assert isinstance(net, NoTrainInceptionV3) and net.use_antialias is False  # TF1 bilinear, like torch-fidelity
    assert load_inception(path, feature=64, resize="bilinear_antialias").use_antialias is True
    real, fake = images(3, size=32), images(3, size=32, seed=9)
    out = compute_fid_kid(real, fake, net, None, {"dataset": "x"}, 2, kid_subsets=2)
    assert math.isfinite(out["fid"]) and out["protocol"]["feature_dim"] == 2048
    p = out["protocol"]
    assert p["feature_extractor"].startswith("inception-v3-compat") and "tensorflow1x" in p["resize"]
    assert p["weights_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_to_uint8_matches_png_quantisation():
    x = torch.tensor([-1.5, -1.0, 0.0, 0.999, 1.0, 2.0]).view(1, 1, 1, 6).expand(1, 3, 1, 6)
    assert metrics.to_uint8(x)[0, 0, 0].tolist() == [0, 0, 128, 255, 255, 255]
