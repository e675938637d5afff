"""Run files: one HDF5 file per run, written in the background, read lazily (schema in README).

Reading needs h5py and numpy only; the writer (which takes torch tensors) is imported on first use.
"""

from __future__ import annotations

from typing import Any

from qkhooks.store.reader import RunArray, RunReader, open_run
from qkhooks.store.repair import RepairReport, VerifyReport, repair, verify_run

__all__ = ["RunWriter", "RunReader", "RunArray", "open_run", "repair", "RepairReport", "verify_run", "VerifyReport",
           "COMPRESSIONS"]

_FROM_WRITER = ("RunWriter", "COMPRESSIONS")


def __getattr__(name: str) -> Any:
    if name in _FROM_WRITER:
        from qkhooks.store import writer

        return getattr(writer, name)
    raise AttributeError(f"module 'qkhooks.store' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
