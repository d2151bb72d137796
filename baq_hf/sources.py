"""Where a model comes from, checked before anything loads: a typo or an unreachable Hub fails at once.

Without this check a path that does not exist reaches huggingface_hub as a malformed repo id ("Repo id
must be in the form ..."), and a Hub id on a machine without network retries for about 25 s per file
(1.5 minutes for a tokenizer and a model) before transformers' generic connection message.
"""

from __future__ import annotations

import os
import re
import socket
import threading
from pathlib import Path
from urllib.parse import urlparse

# user/name as the Hub spells repo ids; "./x/y", "/abs" or "a/b/c" are paths, never ids
HUB_MODEL_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
PROBE_SECONDS = 3.0


def model_source(name: str, probe_seconds: float = PROBE_SECONDS) -> str:
    """What ``from_pretrained`` should load for ``name``, or an error that says what is wrong.

    ``name`` is the embedded model's name, a local folder, or a Hub id. A Hub id is returned as it is
    when the Hub answers; when it does not (offline, ``HF_HUB_OFFLINE``), the cached snapshot folder
    is returned if there is one, else the error names the fix.
    """
    from .models import DEFAULT_MODEL, resolve_model

    if name.strip().lower() == DEFAULT_MODEL:
        return resolve_model(name)
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path)
    if path.exists():
        raise NotADirectoryError(
            f"{name!r} is a file; give the model's folder (with config.json) or a Hub id"
        )
    if not HUB_MODEL_ID.fullmatch(name):
        raise FileNotFoundError(
            f"{name!r} is neither a folder nor a Hub id (user/name); check the path, or give "
            f"{DEFAULT_MODEL!r} for the embedded SmolLM2-135M"
        )
    return _hub_source(name, probe_seconds)


def _hub_source(repo_id: str, probe_seconds: float) -> str:
    from huggingface_hub import constants, try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, "config.json")
    snapshot = str(Path(cached).parent) if isinstance(cached, str) else None
    if constants.HF_HUB_OFFLINE:
        why = "HF_HUB_OFFLINE is set"
    else:
        why = hub_unreachable(constants.ENDPOINT, probe_seconds)
        if why is None:
            return repo_id
    if snapshot is not None:
        return snapshot
    fix = "unset HF_HUB_OFFLINE, or download" if constants.HF_HUB_OFFLINE else "download"
    raise ConnectionError(
        f"{repo_id!r} is not in the local Hub cache ({constants.HF_HUB_CACHE}) and cannot be downloaded: "
        f"{why}; {fix} it where there is network (`hf download {repo_id}`) and give its folder"
    )


def hub_unreachable(endpoint: str, seconds: float) -> str | None:
    """Why a TCP connection to the Hub (or the HTTPS proxy) fails within ``seconds``; None if it opens.

    Runs in a thread so that a hanging name lookup, which socket timeouts do not cover, cannot wait longer.
    """
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    url = urlparse(proxy or endpoint)
    host = url.hostname or ""
    port = url.port or (443 if url.scheme == "https" else 80)
    outcome: list[str | None] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=seconds).close()
            outcome.append(None)
        except OSError as exc:
            outcome.append(f"{host}:{port} cannot be reached ({exc})")

    probe = threading.Thread(target=connect, daemon=True)
    probe.start()
    probe.join(seconds)
    return outcome[0] if outcome else f"{host}:{port} did not answer within {seconds:g} s"
