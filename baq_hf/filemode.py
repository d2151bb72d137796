"""Saved safetensors files get the mode of every other file of their folder (umask-respecting).

safetensors >= 0.8 writes through a temporary file that is always created 0600 and renamed into
place (safetensors/safetensors#782), so a ``model.safetensors`` just saved could be read by its owner
only, while ``config.json`` next to it is 0644: another user, a container or a web server sharing the
folder could not load the checkpoint. Files written here are given ``0o666 & ~umask``, what ``open()``
gives a new file.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def current_umask() -> int:
    """The process umask, read without changing it where Linux reports it (else set and restored)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def new_file_mode() -> int:
    """The permission bits ``open()`` gives a new file: 0o666 less the umask."""
    return 0o666 & ~current_umask()


def make_readable(paths: Iterable[str | os.PathLike]) -> None:
    """Give every file of ``paths`` the mode of a new file (no-op on platforms without modes)."""
    if os.name != "posix":
        return
    mode = new_file_mode()
    for path in paths:
        os.chmod(path, mode)


def fix_safetensors_modes(folder: str | os.PathLike) -> None:
    """Every ``*.safetensors`` file directly in ``folder`` gets the mode of a new file."""
    make_readable(p for p in Path(folder).glob("*.safetensors") if p.is_file())


def save_file(
    tensors: dict[str, Any], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> None:
    """``safetensors.torch.save_file`` whose file gets the mode of a new file, not 0600."""
    from safetensors.torch import save_file as _save_file

    _save_file(tensors, str(path), metadata=metadata)
    make_readable([path])
