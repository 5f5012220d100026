"""Checks of the folders a script will write to, made before any slow work.

A trainer that finds out at its first checkpoint (or at the export, hours later) that its
``--working_directory`` cannot be created would lose the run; these checks fail at start-up
with one line naming the flag, the path and why. They only look (``stat`` and ``os.access``):
nothing is created, so a refused run leaves no trace.

``os.access`` does not stop root from writing into a folder without write permission (root
bypasses permission bits), but it does see a read-only file system; what root cannot do at all,
such as creating a folder under a regular file, is checked by walking the path itself.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

from modules.errors import UserError


def _unwritable_because(folder: Path) -> Optional[str]:
    """Why ``folder`` cannot be written (or created and written), or None when it can."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.exists():  # not even the root of the path exists
        return "cannot be created: no part of the path exists"
    if not existing.is_dir():
        if existing == folder:
            return f"{folder} is a file, not a folder"
        return f"cannot be created: {existing} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"no permission to write in {existing}"
    return None


def check_writable_folder(path: Union[str, Path], flag: str) -> Path:
    """``path`` is, or can be created as, a folder this process may write to; returns it.

    The first part of ``path`` that exists must be a folder (not a regular file) and be
    writable; otherwise a :class:`UserError` names ``flag``, ``path`` and the culprit.
    """
    path = Path(path)
    reason = _unwritable_because(path)
    if reason is not None:
        raise UserError(f"{flag} {path}: {reason}")
    return path


def check_writable_file(path: Union[str, Path], flag: str) -> Path:
    """``path`` is a file that can be written (created or replaced): not a folder, and its folder
    passes :func:`check_writable_folder`; returns it."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder, expected a file")
    reason = _unwritable_because(path.parent)
    if reason is not None:
        raise UserError(f"{flag} {path}: {reason}")
    return path
