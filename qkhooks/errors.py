"""The single error type qkhooks raises for bad input (einops style: one type, a message that says the fix)."""

from __future__ import annotations

import difflib
import inspect
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence


class QKHooksError(Exception):
    """Raised for anything the user can fix: unsupported models, bad arguments, mismatched run files.

    The message always names the problem and what to do about it.
    """


def unknown_options(function: str, unknown: Iterable[str], options: Sequence[str], hint: str = "") -> QKHooksError:
    """The refusal of keywords ``function`` does not take: each named with the closest option where one is close, and
    every option listed (Python's TypeError names the first bad one alone). ``record()`` and ``record_dataset()``
    both refuse so (review r40: record_dataset raised a bare TypeError)."""
    unknown = list(unknown)
    close = [f"{match[0]} for {name}" for name in unknown if (match := difflib.get_close_matches(name, options, 1))]
    return QKHooksError(f"{function}() got unknown option(s) {', '.join(unknown)}; the options are {', '.join(options)}."
                        + (f" Did you mean {', '.join(close)}?" if close else "") + (" " + hint if hint else ""))


def refuse_unknown_keywords(fn: Callable[..., Any], kwargs: Mapping[str, Any]) -> None:
    """Refuse, by :func:`unknown_options`, keywords in ``kwargs`` that ``fn`` does not take, listing its keyword-only
    parameters. Called by a wrapper that is already there (``record_dataset``'s), not as a wrapper of its own: one
    more frame would move every warning's ``stacklevel`` off the caller's line."""
    parameters = inspect.signature(fn).parameters
    unknown = sorted(set(kwargs) - set(parameters))
    if unknown:
        raise unknown_options(fn.__name__, unknown, [name for name, p in parameters.items() if p.kind is p.KEYWORD_ONLY])


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C (KeyboardInterrupt) while ``record_dataset`` wrote a run file, with where the file stands and how to go
    on as its message (the CLI printed only "interrupted"). Still a KeyboardInterrupt, so code that catches one
    catches it."""


class DataRefusal(QKHooksError):
    """A refusal of the data found while a run is recorded (it comes back on every try, so a resume alone cannot get
    past it); ``record_dataset`` adds where the run file stands and what to do. A class of its own, importable by the
    data readers and picklable, so that it keeps its kind when raised in a decoding worker process."""


class MissingReducer(QKHooksError, KeyError):
    """:meth:`qkhooks.stream.RecordResult.reducer` of a name the run has no reducer of: a KeyError (a lookup by name), and a
    QKHooksError whose message names the reducers there are."""

    def __init__(self, name: str, present: list[str] | None = None):
        super().__init__(name)
        self.present = list(present or [])

    def __str__(self) -> str:
        there = ", ".join(self.present) if self.present else "none (the run kept no reducer)"
        return (f"this run has no reducer {self.args[0]!r}; its reducers: {there}. Pass reducers=[...] to "
                "record_dataset to keep one.")


def writable_dir(path: str | os.PathLike, what: str, create: bool = False) -> Path:
    """Refuse, before any work, an output folder that cannot be created or written, naming the fix.

    Without ``create`` nothing is left behind: the folder, or the nearest existing folder above it, must take
    a probe file (the only test that also holds for root, who ignores permission bits but not a read-only
    mount). With ``create`` the folder is made (for a run file's folder, which the writer does not make).
    For an output file, pass its parent folder.

    Args:
        path: the folder outputs go to.
        what: how the user named it, e.g. ``"--out folder"``, for the message.
        create: make the folder (and its parents) now.

    Raises:
        QKHooksError: the folder cannot be created or written, with the reason and the fix.
    """
    folder = Path(path).expanduser()
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        if existing.exists() and not existing.is_dir():
            raise NotADirectoryError(20, f"{str(existing)!r} is a file")
        if create:
            folder.mkdir(parents=True, exist_ok=True)
            existing = folder
        with tempfile.TemporaryFile(dir=existing, prefix=".qkhooks-probe-"):
            pass
    except OSError as exc:
        reason = exc.strerror or exc.__class__.__name__
        verb = "write to" if folder.is_dir() else "create"
        raise QKHooksError(
            f"cannot {verb} the {what} {str(folder)!r} ({reason}); choose a folder you can write to."
        ) from None
    return folder
