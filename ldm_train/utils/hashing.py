"""Content hashes of model weights, for fingerprints that must not depend on where a file lives."""
from __future__ import annotations

import hashlib

import torch


def tensor_hash(module: torch.nn.Module) -> str:
    """SHA-256 of the state dict (names, dtypes, shapes, bytes): identifies weights wherever they live.

    The byte layout is persisted: ``encode`` stores it in ``encode_progress/fingerprint.json`` and
    refuses to resume a folder whose hash differs, so changing it would orphan every partial cache."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
