"""The single error type qkhooks raises for bad input (einops style: one type, a message that says the fix)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


class QKHooksError(Exception):
    """Raised for anything the user can fix: unsupported models, bad arguments, mismatched run files.

    The message always names the problem and what to do about it.
    """


def writable_dir(path: str | os.PathLike, what: str) -> Path:
    """Create the folder ``path`` if needed and prove it writable, so a command refuses before any work.

    Writing a probe file is the only test that also holds for root (who ignores permission bits but not a
    read-only mount). For an output file, pass its parent folder.

    Args:
        path: the folder outputs go to.
        what: how the user named it, e.g. ``"--out folder"``, for the message.

    Raises:
        QKHooksError: the folder cannot be created or written, with the reason and the fix.
    """
    folder = Path(path).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder, prefix=".qkhooks-probe-"):
            pass
    except OSError as exc:
        reason = exc.strerror or exc.__class__.__name__
        verb = "write to" if folder.is_dir() else "create"
        raise QKHooksError(
            f"cannot {verb} the {what} {str(folder)!r} ({reason}); choose a folder you can write to."
        ) from None
    return folder
