"""The run writer: one HDF5 file per run, written by a background thread so the forward pass never waits on disk.

Commit protocol (what makes a killed run resumable with no image lost or written twice): for every batch
the writer thread grows each per-image dataset, writes the data, then the ids, flushes, and only then
raises the ``committed`` attribute of ``/images/ids``, which reaches the disk with the next flush (the next
batch's, or ``flush()``/``close()``): one flush per batch, and a reader watching the run sees a batch once the
next one is written. Everything past ``committed`` is garbage a reader ignores and a resume cuts off. The
file is written in SWMR mode, whose ordered metadata flushes keep it readable however the writer dies and
let other processes watch it grow.

Reducer states are saved in two alternating slots (``/reducers/<name>/a`` and ``/b``); the group's
``current`` attribute moves to the new slot only after it is flushed, so a state is never half-written.

SWMR mode allows writing, growing and flushing existing objects but not creating or deleting them (HDF5
crashes on a delete). Such structural changes (the first batch, the first two checkpoints of a reducer, a
state whose shapes changed) briefly leave SWMR mode: close, reopen, change, flush, re-enter. A writer killed
inside one leaves a file that ``store._hdf5.open_swmr_reader`` still opens and a resume repairs.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import h5py
import numpy as np
import torch

from qkhooks.errors import QKHooksError
from qkhooks.store._hdf5 import (
    clear_open_flags, committed, open_swmr_reader, per_image_datasets, salvage, set_committed, walk,
)

__all__ = ["RunWriter", "COMPRESSIONS", "IDENTITY_ATTRS"]

COMPRESSIONS = ("none", "gzip", "lzf")
"""Codecs for per-image arrays. The default is ``none``: float16 mode maps compress only 1.07-1.12x (gzip,
zstd) while writing 2-20x slower; see benchmarks/RESULTS.md."""

IDENTITY_ATTRS = ("model", "config")
"""Root attributes a resume must match: the same model and the same run configuration."""

_STOP = object()


def _to_host(value: Any, dtype: torch.dtype | None = None) -> Any:
    """Start a device->host copy without waiting for it: pinned, non-blocking on CUDA; returns (tensor, event).

    Floating tensors are first cast to the storage ``dtype`` where they are: on a GPU float16 storage then
    copies half the bytes; on the CPU torch's cast (~2 ms per ViT-S batch, on the caller) replaces numpy's
    ``astype`` in the writer thread (~8 ms) (benchmarks/RESULTS.md).
    """
    if isinstance(value, torch.Tensor):
        value = value.detach()
        if dtype is not None and value.is_floating_point() and value.dtype != dtype:
            value = value.to(dtype)
        if value.is_cuda:
            host = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
            host.copy_(value, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            return host, event
        return value, None
    return np.asarray(value), None


def _numpy(item: tuple[Any, Any]) -> np.ndarray:
    value, event = item
    if event is not None:
        event.synchronize()
    return value.numpy() if isinstance(value, torch.Tensor) else value


class RunWriter:
    """Writes one run file. Use as a context manager or call :meth:`close`.

    Args:
        path: the ``.h5`` file.
        mode: ``create`` (the file must not exist), ``overwrite`` (replace it), ``resume`` (continue it; its
            ``model`` and ``config`` attributes must equal ``attrs``'s, and images past ``committed`` are cut).
        attrs: root attributes (model spec, configuration JSON, versions); values that are not str/number are
            stored as JSON.
        dtype: storage dtype of per-image floating arrays.
        compression: ``none`` (default, by measurement), ``gzip`` or ``lzf``.
        chunk_images: images per chunk along the first axis (default: what makes ~1 MiB chunks; with compression,
            the first batch's size, so that every compressed chunk is written once).
        queue_size: batches that may wait for the writer thread before ``write_batch`` blocks.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        mode: str = "create",
        attrs: Mapping[str, Any] | None = None,
        dtype: str = "float16",
        compression: str = "none",
        chunk_images: int | None = None,
        queue_size: int = 4,
    ):
        self.path = Path(path)
        if mode not in ("create", "overwrite", "resume"):
            raise QKHooksError(f"mode must be 'create', 'overwrite' or 'resume', got {mode!r}.")
        if dtype not in ("float16", "float32"):
            raise QKHooksError(f"dtype must be 'float16' or 'float32', got {dtype!r}.")
        if compression not in COMPRESSIONS:
            raise QKHooksError(f"compression must be one of {', '.join(COMPRESSIONS)}; got {compression!r}.")
        self.dtype = np.dtype(dtype)
        self.compression = None if compression == "none" else compression
        self.chunk_images = chunk_images
        attrs = {k: _attr(v) for k, v in (attrs or {}).items()}
        self._check_path(mode)
        if mode == "resume":
            self._file = self._open_for_resume(attrs)
        else:
            if mode == "overwrite" and self.path.exists():
                self.path.unlink()
            self._file = h5py.File(self.path, "w", libver="latest")
            for key, value in attrs.items():
                self._file.attrs[key] = value
            self._file.attrs["complete"] = False
            images = self._file.create_group("images")
            images.create_dataset("ids", (0,), maxshape=(None,), chunks=(1024,), dtype=h5py.string_dtype())
            set_committed(self._file, 0)
            self._file.flush()
        self._file.swmr_mode = True
        self.committed = committed(self._file) or 0
        self._handles: dict[str, h5py.Dataset] = {}  # per-image datasets of the current file handle
        self._handles_of: h5py.File | None = None
        self._lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, queue_size))
        self._error: BaseException | None = None
        self._reported = False
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="qkhooks-writer", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ opening
    def _check_path(self, mode: str) -> None:
        if self.path.is_dir():
            raise QKHooksError(f"{self.path} is a directory; give a file name such as {self.path / 'run.h5'}.")
        parent = self.path.parent if str(self.path.parent) else Path(".")
        if not parent.is_dir():
            raise QKHooksError(f"cannot write {self.path}: the folder {parent} does not exist; create it first.")
        if not os.access(parent, os.W_OK) or (self.path.exists() and not os.access(self.path, os.W_OK)):
            raise QKHooksError(f"cannot write {self.path}: permission denied; choose a writable location.")
        if mode == "create" and self.path.exists():
            raise QKHooksError(
                f"{self.path} already exists; pass --resume (resume=True) to continue it or --overwrite "
                "(overwrite=True) to replace it."
            )
        if mode == "resume" and not self.path.exists():
            raise QKHooksError(f"cannot resume {self.path}: no such file; start a new run without --resume.")

    def _open_for_resume(self, attrs: Mapping[str, Any]) -> h5py.File:
        # read-only first: a refused resume changes nothing (but the open flags of a writer that died mid-change)
        with open_swmr_reader(self.path, warn=False) as f:
            damaged = [] if f.swmr_mode else walk(f)[1]  # not SWMR: its writer died mid-change
            theirs = {k: f.attrs.get(k) for k in IDENTITY_ATTRS}
            if committed(f) is None:
                raise QKHooksError(f"cannot resume {self.path}: it is not a qkhooks run file; use --overwrite.")
            if "shards" in f["images"].attrs:
                raise QKHooksError(
                    f"cannot resume {self.path}: it is a merge of shard files ({f['images'].attrs['shards']}); "
                    "resume the shards with the same torchrun command plus --resume, which merges again."
                )
        for key in IDENTITY_ATTRS:
            if key in attrs and _attr(theirs[key]) != attrs[key]:
                raise QKHooksError(
                    f"cannot resume {self.path}: its {key} differs from this run's{_differences(theirs[key], attrs[key])}"
                    f".\n  file: {theirs[key]}\n  now:  {attrs[key]}\nResume with the same model and options as the "
                    "first run, or --overwrite to start again."
                )
        if damaged:
            warnings.warn(f"{self.path}: its writer died while creating {', '.join(damaged)}; copying the rest into a "
                          "fresh file before resuming (HDF5 cannot drop them in place).", stacklevel=4)
            salvage(self.path, damaged)
        clear_open_flags(self.path)
        f = h5py.File(self.path, "r+", libver="latest")
        f.attrs["complete"] = False
        self._cut(f, committed(f) or 0)
        f.flush()
        return f

    def _cut(self, f: h5py.File, n: int) -> None:
        for ds in [*per_image_datasets(f).values(), f["images/ids"]]:
            if ds.shape[0] != n:
                ds.resize(n, axis=0)
        set_committed(f, n)

    # ------------------------------------------------------------------ public API (caller thread)
    @property
    def ids(self) -> list[str]:
        """Ids of the committed images (waits for queued batches first)."""
        self.flush()
        with self._lock:
            return [s.decode() if isinstance(s, bytes) else s for s in self._file["images/ids"][: self.committed]]

    def write_batch(self, ids: Sequence[str], arrays: Mapping[str, Any]) -> None:
        """Queue one batch: ``arrays`` maps schema names to (B, ...) tensors/arrays. Blocks only if the queue is full."""
        self._raise_if_failed()
        if self._closed:
            raise QKHooksError("this run writer is closed.")
        sizes = {name: len(v) for name, v in arrays.items()}
        if any(s != len(ids) for s in sizes.values()):
            raise QKHooksError(f"every array of a batch needs one row per id ({len(ids)}); got {sizes}.")
        dtype = getattr(torch, self.dtype.name)
        self._enqueue(("batch", [str(i) for i in ids], {name: _to_host(v, dtype) for name, v in arrays.items()}))

    def write_static(self, name: str, value: Any) -> None:
        """Queue a dataset written once (spectra, model info); a JSON string is stored as a string attribute."""
        self._enqueue(("static", name, value))

    def write_state(self, name: str, state: Mapping[str, Any]) -> None:
        """Queue a reducer state (numpy arrays and scalars) behind the batches already queued.

        Arrays are copied now: a reducer's state may be a view of buffers it keeps updating.
        """
        copied = {k: (v.detach().cpu().clone() if isinstance(v, torch.Tensor) else
                      np.array(v, copy=True) if isinstance(v, np.ndarray) else v) for k, v in state.items()}
        self._enqueue(("state", name, copied))

    def write_skipped(self, skipped: Sequence[tuple[str, str]]) -> None:
        """Queue the list of (id, reason) of images the dataset could not read."""
        self._enqueue(("skipped", list(skipped)))

    def truncate(self, n: int) -> None:
        """Cut the run back to its first ``n`` images (a resume whose reducer checkpoint is older)."""
        self._enqueue(("truncate", int(n)))
        self.flush()

    def read_state(self, name: str, previous: bool = False) -> dict[str, Any] | None:
        """The last saved state ``name`` (or the one before it, with ``previous``), or None."""
        self.flush()
        with self._lock:
            return _read_state(self._file, name, previous)

    def flush(self) -> None:
        """Wait until everything queued is on disk."""
        if self._thread.is_alive():
            self._queue.put(("sync",))
            self._queue.join()
        self._raise_if_failed()

    def close(self, complete: bool = True) -> None:
        """Finish the queue and close the file; ``complete`` marks a run that went through all its images."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._thread.is_alive():
                self._queue.put(("complete", bool(complete)))
                self._queue.put(_STOP)
                self._thread.join()
        finally:
            with self._lock:
                if self._file.id.valid:
                    self._file.close()
        if not self._reported:
            self._raise_if_failed()

    def __enter__(self) -> "RunWriter":
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self.close(complete=exc_type is None)

    # ------------------------------------------------------------------ writer thread
    def _enqueue(self, item: Any) -> None:
        while True:
            self._raise_if_failed()
            try:
                self._queue.put(item, timeout=0.5)
                return
            except queue.Full:
                if not self._thread.is_alive():
                    raise QKHooksError("the run writer thread stopped; see the error above.") from self._error

    def _raise_if_failed(self) -> None:
        """A failed writer stays failed: every later call raises, and the run is never marked complete."""
        if self._error is not None:
            self._reported = True
            raise QKHooksError(f"writing {self.path} failed: {self._error}") from self._error

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    return
                if self._error is None:
                    with self._lock:
                        getattr(self, f"_do_{item[0]}")(*item[1:])
            except BaseException as exc:  # surfaced on the caller's next call
                self._error = exc
            finally:
                self._queue.task_done()

    @contextlib.contextmanager
    def _structural(self) -> Any:
        """Leave SWMR mode for a change that creates or deletes objects, then re-enter it.

        Readers (:class:`RunReader`) take no file lock, so watching a run never blocks this reopen; one that
        opens during these few milliseconds waits them out, one already open that reads meanwhile gets an
        error and reopens.
        """
        if self._file.swmr_mode:
            self._file.close()
            self._file = _reopen(self.path)
        try:
            yield self._file
        finally:
            self._file.flush()
            self._file.swmr_mode = True

    def _put(self, group_name: str, key: str, value: np.ndarray) -> None:
        """Write ``value`` as dataset ``group_name/key``: in place when its shape and dtype are unchanged."""
        ds = self._file.get(f"{group_name}/{key}")
        if _fits(ds, value):
            ds[()] = value
            return
        with self._structural() as f:
            group = f.require_group(group_name)
            if key in group:
                del group[key]
            group.create_dataset(key, data=value)

    def _do_batch(self, ids: list[str], arrays: dict[str, tuple[Any, Any]]) -> None:
        n, b = self.committed, len(ids)
        values = {}
        for name, item in arrays.items():
            value = _numpy(item)
            values[name] = value.astype(self.dtype, copy=False) if np.issubdtype(value.dtype, np.floating) else value
        if self._handles_of is not self._file:  # handles die with each reopen (structural changes)
            self._handles, self._handles_of = {}, self._file
        missing = [name for name in values if name not in self._handles and name not in self._file]
        if missing:
            with self._structural():
                for name in missing:
                    self._create_per_image(name, values[name], n)
            self._handles, self._handles_of = {}, self._file
        for name, value in values.items():
            ds = self._handles.get(name)
            if ds is None:
                ds = self._handles[name] = self._file[name]
            if ds.shape[1:] != value.shape[1:]:
                raise QKHooksError(f"{name}: a batch has shape {value.shape[1:]} per image, the run has {ds.shape[1:]}.")
            _append(ds, n, value)
        f = self._file
        ids_ds = f["images/ids"]
        ids_ds.resize(n + b, axis=0)
        ids_ds[n:n + b] = ids
        f.flush()  # the images reach the disk before the count that commits them
        set_committed(f, n + b)  # on disk with the next batch's flush (or flush()/close()): one flush a batch
        self.committed = n + b

    def _create_per_image(self, name: str, value: np.ndarray, n: int) -> h5py.Dataset:
        if n:
            raise QKHooksError(f"{name} appears after {n} images were written without it; every batch needs the same arrays.")
        per = max(1, value[0].nbytes)
        if self.chunk_images:
            chunk = self.chunk_images
        elif self.compression:
            # A compressed chunk is re-encoded and rewritten elsewhere in the file at every append that touches it
            # (HDF5 does not reuse the old space), so chunks spanning several batches bloat the file 2-3x
            # (benchmarks/RESULTS.md). One chunk per batch writes each chunk exactly once.
            chunk = len(value)
        else:
            chunk = int(min(64, max(1, (1 << 20) // per)))
        ds = self._file.create_dataset(
            name, shape=(0,) + value.shape[1:], maxshape=(None,) + value.shape[1:], dtype=value.dtype,
            chunks=(chunk,) + value.shape[1:], compression=self.compression,
        )
        ds.attrs["per_image"] = True
        return ds

    def _set_attr(self, group_name: str, key: str, value: Any) -> None:
        group = self._file.get(group_name)
        if group is not None and key in group.attrs:
            group.attrs[key] = value
        else:
            with self._structural() as f:
                f.require_group(group_name).attrs[key] = value

    def _do_static(self, name: str, value: Any) -> None:
        group, _, key = name.rpartition("/")
        if isinstance(value, str):
            self._set_attr(group or "/", key, value)
        else:
            value = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
            self._put(group or "/", key, value)
        self._file.flush()

    def _do_state(self, name: str, state: dict[str, Any]) -> None:
        """Write ``state`` into the slot ``current`` does not point at, then point ``current`` at it.

        A kill at any moment leaves the previous checkpoint readable. New arrays are created in one layout
        change per checkpoint (each one leaves SWMR mode for a moment); later checkpoints write in place.
        """
        current = self._file[name].attrs.get("current", "") if name in self._file else ""
        slot = f"{name}/{'b' if current == 'a' else 'a'}"
        scalars: dict[str, Any] = {}
        arrays: dict[str, np.ndarray] = {}
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                value = value.detach().cpu().numpy()
            if isinstance(value, np.ndarray):
                arrays[key] = value
            else:
                scalars[key] = value.item() if isinstance(value, np.generic) else value
        group = self._file.get(slot)
        stale = [k for k in (group.keys() if group is not None else ()) if k not in arrays]
        fresh = [k for k, v in arrays.items() if not _fits(self._file.get(f"{slot}/{k}"), v)]
        if stale or fresh or group is None or "scalars" not in group.attrs or "current" not in self._file[name].attrs:
            with self._structural() as f:
                group = f.require_group(slot)
                for key in stale + [k for k in fresh if k in group]:
                    del group[key]
                for key in fresh:
                    group.create_dataset(key, data=arrays[key])
                group.attrs["scalars"] = ""
                f[name].attrs.setdefault("current", "")  # "": no checkpoint yet
        else:
            self._file[slot].attrs["scalars"] = ""  # "": this slot is being rewritten; a reader skips it
            self._file.flush()
        for key, value in arrays.items():
            if key not in fresh:
                self._file[f"{slot}/{key}"][()] = value
        self._file[slot].attrs["scalars"] = json.dumps(scalars)
        self._file.flush()
        self._file[name].attrs["current"] = slot.rpartition("/")[2]
        self._file.flush()

    def _do_skipped(self, skipped: list[tuple[str, str]]) -> None:
        data = np.array([[str(a), str(b)] for a, b in skipped], dtype=object).reshape(-1, 2)
        with self._structural() as f:
            if "images/skipped" in f:
                del f["images/skipped"]
            f.create_dataset("images/skipped", data=data, dtype=h5py.string_dtype())

    def _do_truncate(self, n: int) -> None:
        if n > self.committed:
            raise QKHooksError(f"cannot truncate to {n} images: only {self.committed} are committed.")
        with self._structural() as f:  # shrinking is not an SWMR operation
            self._cut(f, n)
        self.committed = n

    def _do_sync(self) -> None:
        self._file.flush()

    def _do_complete(self, complete: bool) -> None:
        self._file.attrs["complete"] = complete
        self._file.flush()


def _reopen(path: Path, wait_s: float = 5.0) -> h5py.File:
    """Reopen for writing, retrying while another process holds a lock for a moment (an ``h5clear``, a
    reader opening with HDF5's default locking): HDF5 tries its lock once and fails at once."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return h5py.File(path, "r+", libver="latest")
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.005)


def _append(ds: h5py.Dataset, n: int, value: np.ndarray) -> None:
    """``ds.resize(n + b); ds[n:n + b] = value`` through h5py's low-level calls, which skip the per-call
    selection machinery of ``Dataset.__setitem__`` (a third of the writer thread's time at 36 arrays a batch)."""
    value = np.ascontiguousarray(value)
    ds.id.set_extent((n + len(value),) + value.shape[1:])
    space = ds.id.get_space()
    space.select_hyperslab((n,) + (0,) * (value.ndim - 1), value.shape)
    ds.id.write(h5py.h5s.create_simple(value.shape), space, value)


def _fits(ds: Any, value: np.ndarray) -> bool:
    """Whether ``value`` can overwrite dataset ``ds`` in place (SWMR mode allows no new objects)."""
    return isinstance(ds, h5py.Dataset) and ds.shape == value.shape and ds.dtype == value.dtype


def _differences(theirs: Any, ours: Any) -> str:
    """`` (attention: file 'rows', now 'none')`` for two JSON configs; empty when they are not both JSON objects."""
    try:
        a, b = json.loads(_attr(theirs)), json.loads(ours)
    except (TypeError, ValueError):
        return ""
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return ""
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return " (" + "; ".join(f"{k}: file {a.get(k)!r}, now {b.get(k)!r}" for k in keys) + ")" if keys else ""


def _attr(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool, np.number)):
        return value
    if value is None:
        return "null"
    return json.dumps(value, sort_keys=True)


def _read_state(f: h5py.File, name: str, previous: bool = False) -> dict[str, Any] | None:
    group = f.get(name)
    slot_name = group.attrs.get("current", "") if group is not None else ""
    if not slot_name:
        return None
    if previous:
        slot_name = "b" if slot_name == "a" else "a"
        if slot_name not in group:
            return None
    slot = group[slot_name]
    if not slot.attrs.get("scalars", ""):
        return None  # created or being rewritten when its writer stopped
    state: dict[str, Any] = json.loads(slot.attrs["scalars"])
    for key, ds in slot.items():
        state[key] = ds[()]
    return state
