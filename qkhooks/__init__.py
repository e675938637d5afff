"""qkhooks: query-key SVD modes, attention maps and position/content factors of unmodified ViTs.

The public surface is small on purpose:

- :func:`load_model` / :func:`sites` — a model from a spec string, and its attention layers;
- :func:`spectrum` — the singular modes of every head's W_q^T W_k;
- :func:`record` — the context manager that captures, projects and rebuilds attention during a forward;
- :func:`record_dataset` / :func:`open_run` — stream a dataset into an HDF5 run file, and read it back;
- :class:`Reducer` — the streaming-statistics protocol (``update``, ``merge``, ``state_dict``) for your own sinks;
- :class:`QKHooksError` — the one error type, whose message says the fix.
"""

from qkhooks._version import __version__

from qkhooks.errors import QKHooksError
from qkhooks.models import AttentionSite, register_adapter, sites
from qkhooks.models.load import LoadedModel, load_model
from qkhooks.spectrum import LayerSpectrum, QKSpectrum, spectrum
from qkhooks.attention import AttentionSpec
from qkhooks.capture import BatchCapture, LayerCapture, Recording, record
from qkhooks.store import RunReader, RunWriter, open_run
from qkhooks.reducers import Reducer
from qkhooks.stream import RecordResult, record_dataset
from qkhooks import data  # qkhooks.data.ImageConfig, open_dataset: named in error messages and the README

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
