"""qkhooks: query-key SVD modes, attention maps and position/content factors of unmodified ViTs.

The public surface is small on purpose:

- :func:`load_model` / :func:`sites` — a model from a spec string, and its attention layers;
- :func:`spectrum` — the singular modes of every head's W_q^T W_k;
- :func:`record` — the context manager that captures, projects and rebuilds attention during a forward;
- :func:`record_dataset` / :func:`open_run` — stream a dataset into an HDF5 run file, and read it back;
- :class:`Reducer` — the streaming-statistics protocol (``update``, ``merge``, ``state_dict``) for your own sinks;
- :class:`QKHooksError` — the error of every refusal (bad input, a model not modelled exactly), whose message says
  the fix.

The types those calls hand back or take: :class:`LoadedModel` (``load_model``'s model with its preprocessing),
:class:`RecordResult` (``record_dataset``'s file, reducers and skipped images), :class:`AttentionSpec` (a parsed
``attention=`` option), :class:`LayerSpectrum` / :class:`QKSpectrum`, :class:`AttentionSite`, and
:class:`RunWriter` (a run file written from your own loop: ``record(...).sinks.append(WriterSink(writer))``, with
:class:`qkhooks.stream.WriterSink`).

Live results (:class:`Recording`, :class:`BatchCapture`) and stored ones (:class:`RunReader`) are read with the
same calls (:mod:`qkhooks.access`). Reading a run needs h5py and numpy only: the names that need torch are
imported on first use (PEP 562), so ``import qkhooks; qkhooks.open_run(path)`` works where torch is not installed.
"""

from __future__ import annotations

import importlib
from typing import Any

from qkhooks._version import __version__

from qkhooks.errors import QKHooksError
from qkhooks.spectrum import LayerSpectrum, QKSpectrum, spectrum  # binds qkhooks.spectrum to the function
from qkhooks.store.reader import RunReader, open_run

_LAZY = {  # name -> module that defines it; imported (with torch) on first access
    "AttentionSite": "qkhooks.models",
    "register_adapter": "qkhooks.models",
    "sites": "qkhooks.models",
    "LoadedModel": "qkhooks.models.load",
    "load_model": "qkhooks.models.load",
    "AttentionSpec": "qkhooks.attention",
    "record": "qkhooks.capture",
    "Recording": "qkhooks.capture",
    "BatchCapture": "qkhooks.results",
    "LayerCapture": "qkhooks.results",
    "record_dataset": "qkhooks.stream",
    "RecordResult": "qkhooks.stream",
    "Reducer": "qkhooks.reducers",
    "RunWriter": "qkhooks.store.writer",
}

_SUBMODULES = {"data", "options", "distributed", "models", "analysis", "store", "attention", "capture",
               "stream", "reducers", "readings", "report", "compare", "plots", "access", "projector", "sdpa", "results",
               "errors", "data_files"}
"""Submodules reachable as ``qkhooks.NAME`` after a plain ``import qkhooks`` (imported on first use)."""

__all__ = [
    "__version__",
    "QKHooksError",
    "AttentionSite",
    "register_adapter",
    "sites",
    "LoadedModel",
    "load_model",
    "LayerSpectrum",
    "QKSpectrum",
    "spectrum",
    "AttentionSpec",
    "record",
    "Recording",
    "BatchCapture",
    "LayerCapture",
    "record_dataset",
    "RecordResult",
    "Reducer",
    "open_run",
    "RunReader",
    "RunWriter",
    "data",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    elif name in _SUBMODULES:  # qkhooks.data.ImageConfig, qkhooks.options.RecordOptions, ...: named in error
        value = importlib.import_module(f"qkhooks.{name}")  # messages and the README, usable after `import qkhooks`
    else:
        raise AttributeError(f"module 'qkhooks' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
