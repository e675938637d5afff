"""Run files: one HDF5 file per run, written in the background, read lazily (schema in README)."""

from qkhooks.store.reader import RunArray, RunReader, open_run
from qkhooks.store.repair import RepairReport, repair
from qkhooks.store.writer import COMPRESSIONS, RunWriter

__all__ = ["RunWriter", "RunReader", "RunArray", "open_run", "repair", "RepairReport", "COMPRESSIONS"]
