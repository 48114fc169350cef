"""Is the Hugging Face Hub usable? Answered in seconds: offline, huggingface_hub would retry
for about a minute before failing with a message about a missing file."""
from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

_TRUE = ("1", "on", "yes", "true")


def hub_unavailable(*flags: str) -> str | None:
    """None when the Hub may be used, else why not: an offline flag (``HF_HUB_OFFLINE`` and
    ``flags``, read now since the libraries read them at import) or no connection to the
    endpoint. Behind a proxy (``HTTPS_PROXY``) only the flags are checked."""
    from huggingface_hub import constants

    for name in ("HF_HUB_OFFLINE", *flags):
        if os.environ.get(name, "").strip().lower() in _TRUE:
            return f"{name} is set"
    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    if os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy"):
        return None
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=5).close()
    except OSError as e:
        return f"cannot reach {constants.ENDPOINT}: {e}"
    return None
