"""The run writer: one HDF5 file per run, written by a background thread so the forward pass never waits on disk.

The file is in SWMR mode from the moment it has its name, so it is consistent on disk however its writer
dies, and other processes can watch it grow:

1. **Layout.** A new run is laid out in ``RUN.h5.creating`` (attributes, statics, and at the first batch every
   per-image array), then reopened in SWMR mode and renamed to ``RUN.h5``; from then on objects are only
   written, grown and flushed. A resume checks the file (identity, then that every per-image array is there with
   its committed rows), reopens it in SWMR mode, cuts what is past the committed rows and drops the heap references
   a killed writer's uncommitted ids may have left there (:func:`~qkhooks.store.format.drop_stale_heap_references`).
   An ``--overwrite`` keeps the old run whole until the new one can replace it: the new run is written (SWMR)
   under ``RUN.h5.creating`` and renamed over ``RUN.h5`` (its checkpoint over ``RUN.h5.reducers`` first) at its
   first reducer checkpoint, or when it is closed complete. Stopped before that (an error, a kill), the old run
   is what ``RUN.h5`` holds and the unfinished new one is dropped.
2. **Commit.** Per batch: the ids (and, with a checksum, their digests), sent to the file first so that a file cut
   short that holds an image's rows holds its id (:meth:`RunWriter._write_ids`), then each per-image array, flush,
   and only then ``committed`` (on disk with the next flush). Readers ignore, and a resume cuts, everything past it.
3. **Checkpoints.** Reducer states go to ``RUN.h5.reducers`` after a flush (:mod:`qkhooks.store.format`).

One writer per run (:class:`~qkhooks.store.lock.WriterLock`). A write error (a full disk included) stops the
writer thread, which closes the file deliberately (after giving back the lock file's reserved space); every
later call raises.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import math
import os
import queue
import resource
import shutil
import threading
import uuid
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import h5py
import numpy as np
import torch

from qkhooks._devices import detached
from qkhooks.errors import QKHooksError
from qkhooks.reducers import overflows
from qkhooks.store import format as fmt
from qkhooks.store._hdf5 import (DamagedRunError, clear_open_flags, create_run_file, damage, open_reader, other_program_file,
                                 meta_block_bytes, open_swmr_writer)
from qkhooks.store.lock import RESERVE_BYTES, ROOM, WriterLock, out_of_room, forget_in_forked_children, keep_out_of_forked_children

__all__ = ["RunWriter", "COMPRESSIONS", "IDENTITY_ATTRS"]

COMPRESSIONS = ("none", "gzip", "lzf")
"""Codecs for per-image arrays. The default is ``none``: float16 mode maps compress only 1.07-1.12x (gzip,
zstd) while writing 2-20x slower; see benchmarks/RESULTS.md."""

IDENTITY_ATTRS = ("model", "config")
"""Root attributes a resume must match: the same model and the same run configuration."""

CHECKED_ATTRS = {
    "compute_dtype": "the model's compute dtype",
    "image_config": "the preprocessing (image_config: size, mean, std, interpolation, crop)",
    "weights_sha256": "the model's weights (sha256 of its state dict)",
}
"""What a resume must match when the file has it (files from before it lack it): what the model computes in, how
images are preprocessed, and the weights' content. ``image_config`` is a root attribute; the others are keys of the
root attribute ``identity`` (JSON, with the ``run_id``): one attribute, so the root keeps its attributes in its
(checksummed) object header, which holds at most :data:`~qkhooks.store._hdf5.ROOT_COMPACT_ATTRIBUTES`."""

CHUNK_CACHE_BYTES = (1 << 20) + (1 << 16)
"""HDF5's chunk cache per array: the one chunk being filled (HDF5 2.0's 8 MiB a dataset made RSS grow with the
images written; benchmarks/RESULTS.md)."""

MIN_CHUNK_BYTES = 1 << 16
"""Uncompressed, unchecksummed per-image arrays smaller than this per batch share a chunk across batches (see
_create_per_image)."""

FREE_MARGIN_BYTES = 1 << 20
"""Free disk space a batch must leave (beyond its own bytes) before the writer starts writing it."""

_STOP = object()


def _to_host(value: Any, dtype: torch.dtype | None = None) -> Any:
    """Start a device->host copy without waiting for it (pinned, non-blocking on CUDA); returns (tensor, event).

    Floats are cast to the storage ``dtype`` first, where they are (half the bytes to copy from a GPU; on the
    CPU torch's cast, ~2 ms a ViT-S batch, replaces numpy's ``astype`` in the writer thread, ~8 ms).
    """
    if isinstance(value, torch.Tensor):
        value = detached(value)
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


def _to_host_all(arrays: Mapping[str, Any], dtype: torch.dtype | None) -> dict[str, tuple[Any, Any]]:
    """:func:`_to_host` of every array of a batch, where a GPU's arrays leave each device in **one** copy
    (:func:`_packed`): one pinned block, one copy and one event a batch instead of a cast, a pinned block, a copy and
    an event an array (24 arrays a ViT batch of top-16 modes; next to a fast GPU the host's Python and launches set
    the pace of a recording)."""
    items: dict[str, tuple[Any, Any]] = {}
    on_gpu: dict[torch.device, dict[str, torch.Tensor]] = {}
    for name, value in arrays.items():
        if isinstance(value, torch.Tensor) and value.is_cuda:
            on_gpu.setdefault(value.device, {})[name] = detached(value)
        else:
            items[name] = _to_host(value, dtype)
    for device, tensors in on_gpu.items():
        staging, layout = _packed(tensors, dtype)
        host = torch.empty(staging.shape, dtype=torch.uint8, pin_memory=True)
        host.copy_(staging, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(device))
        items.update({name: (part, event) for name, part in _unpacked(host, layout).items()})
    return {name: items[name] for name in arrays}


_PACK_ALIGN = 16
"""Bytes each array's place in a packed buffer is aligned to (any element size divides it)."""

PackLayout = list  # [(name, byte offset, storage dtype, shape)]: see _packed


def _packed(tensors: Mapping[str, torch.Tensor], dtype: torch.dtype | None) -> tuple[torch.Tensor, PackLayout]:
    """The tensors (all on one device), floats cast to the storage ``dtype``, laid end to end in one byte buffer on
    their device, each at an offset aligned to :data:`_PACK_ALIGN`; and where each lies (:func:`_unpacked` reads
    them back from the buffer or a copy of it). The casts are the copies into the buffer (one call for all)."""
    layout: PackLayout = []
    total = 0
    for name, t in tensors.items():
        target = dtype if dtype is not None and t.is_floating_point() else t.dtype
        layout.append((name, total, target, t.shape))
        nbytes = t.numel() * _element_size(target)
        total += -(-nbytes // _PACK_ALIGN) * _PACK_ALIGN
    staging = torch.empty(total, dtype=torch.uint8, device=next(iter(tensors.values())).device)
    parts, sources = list(_unpacked(staging, layout).values()), list(tensors.values())
    if hasattr(torch, "_foreach_copy_"):
        torch._foreach_copy_(parts, sources)
    else:  # a torch without it
        for part, source in zip(parts, sources):
            part.copy_(source)
    return staging, layout


def _unpacked(buffer: torch.Tensor, layout: PackLayout) -> dict[str, torch.Tensor]:
    """The arrays of a :func:`_packed` byte buffer (or of a copy of it), as views of it."""
    return {name: buffer[offset:offset + math.prod(shape) * _element_size(target)].view(target).view(shape)
            for name, offset, target, shape in layout}


@functools.cache
def _element_size(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def _numpy(item: tuple[Any, Any]) -> np.ndarray:
    value, event = item
    if event is not None:
        event.synchronize()
    return value.numpy() if isinstance(value, torch.Tensor) else value


def _overflow(ids: Sequence[str], arrays: Mapping[str, Any], dtype: torch.dtype) -> str | None:
    """Why a batch cannot be stored, where a finite value would turn into inf in the cast to the storage ``dtype``
    (float16's range ends at 65504: a massive activation of a class or register token, maps of a float32 model),
    naming the arrays, the images and the fix; None where every value fits. The model's own inf or NaN is stored as
    it is.

    Costs one min-max pass over each wider float array (~1.5 ms a ViT-S batch of top-16 maps on one CPU thread; one
    fused launch and one small copy on a GPU), a small part of the cast it guards."""
    wide = {}  # the float arrays of a wider range than the storage dtype's
    for name, value in arrays.items():
        if not isinstance(value, torch.Tensor):
            value = np.asarray(value)
            if value.dtype.kind != "f":
                continue
            value = torch.from_numpy(value)
        if value.is_floating_point() and value.numel() and torch.finfo(value.dtype).max > torch.finfo(dtype).max:
            wide[name] = detached(value)
    if not wide:
        return None
    values = list(wide.values())
    if all(v.is_cuda for v in values) and hasattr(torch, "_foreach_norm"):
        peaks = torch.stack(torch._foreach_norm(values, float("inf")))  # one fused launch for all arrays
    else:  # aminmax is vectorised on the CPU, where abs().amax() and the inf-norm are not
        peaks = torch.stack([end for v in values for end in torch.aminmax(v)]).abs().view(-1, 2).amax(1)
    # each array's largest |x| (NaN where it holds one), in the widest source dtype (exact for the narrower ones):
    # flagged where its cast is not finite and it is not the model's own inf, i.e. it overflows or hides behind NaN
    over = (~(peaks.to(dtype) < math.inf) & (peaks != math.inf)).tolist()
    bad = {}
    for (name, value), flagged in zip(wide.items(), over):
        if flagged:  # an array that overflows, or one holding NaN (which hides its extremes): exact, per image (rare)
            flat = value.flatten(1) if value.dim() > 1 else value.view(-1, 1)
            images = overflows(flat, dtype).any(1).cpu()
            if bool(images.any()):
                largest = float(flat.masked_fill(~flat.isfinite(), 0).abs().amax())
                bad[name] = (images.nonzero().flatten().tolist(), largest)
    if not bad:
        return None
    named = [str(ids[i]) for i in sorted({i for images, _ in bad.values() for i in images})]
    kind = str(dtype).replace("torch.", "")
    fix = ("Record in float32: --dtype float32 (dtype='float32')." if dtype == torch.float16 else
           "No run file's dtype holds them: they are an overflow upstream of the recording; check the model's inputs.")
    return (f"{', '.join(sorted(bad))} of image(s) {named} hold values beyond {kind}'s range (largest |x| = "
            f"{max(p for _, p in bad.values()):.6g}; {kind} ends at {torch.finfo(dtype).max:g}), which a {kind} run "
            f"file would store as inf without a word; the batch is refused. {fix}")


def _layout_words(compression: str, checksum: bool) -> str:
    return f"compression {compression}, " + ("a Fletcher-32 checksum" if checksum else "no checksum")


class RunWriter:
    """Writes one run file. Use as a context manager or call :meth:`close`.

    Args:
        path: the ``.h5`` file.
        mode: ``create`` (the file must not exist), ``overwrite`` (replace it once the new run has its first
            batch), ``resume`` (continue it; its ``model`` and ``config`` attributes must equal ``attrs``'s, and
            so must :data:`CHECKED_ATTRS` where the file has them; images past ``committed`` are cut).
        attrs: root attributes (model spec, configuration JSON, versions); values that are not str/number are
            stored as JSON.
        dtype: storage dtype of per-image floating arrays.
        compression: ``none`` (default, by measurement), ``gzip`` or ``lzf``.
        checksum: give every per-image array HDF5's Fletcher-32 checksum, and store a checksummed digest of every image
            id (:data:`~qkhooks.store.format.ID_DIGESTS`), so a damaged chunk or id is reported when read, never
            returned (off by default: it costs the writer thread about 2.5x its CPU, see README.md).
            A resume keeps the file's own layout (compression and checksum) and warns where they differ.
        chunk_images: images per chunk along the first axis (default: the first batch's size, so that every chunk
            is written once; uncompressed, unchecksummed arrays of under 64 KiB a batch group several batches;
            compressed or checksummed arrays one image, so that no chunk holding a committed image is written again).
        queue_size: batches that may wait for the writer thread before ``write_batch`` blocks.
        expected_statics: for a resume of a file without ``weights_sha256`` (written before it): statics the
            file must hold with these values (e.g. every layer's ``spectrum/L*/S_all``), else the resume is
            refused as another model's.

    A second writer of the same path (in any process) is refused while this one lives. A new run that is
    closed unfinished with no committed image leaves no file behind.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        mode: str = "create",
        attrs: Mapping[str, Any] | None = None,
        dtype: str = "float16",
        compression: str = "none",
        checksum: bool = False,
        chunk_images: int | None = None,
        queue_size: int = 4,
        expected_statics: Mapping[str, Any] | None = None,
    ):
        self.path = Path(path)
        if mode not in ("create", "overwrite", "resume"):
            raise QKHooksError(f"mode must be 'create', 'overwrite' or 'resume', got {mode!r}.")
        if dtype not in ("float16", "float32"):
            raise QKHooksError(f"dtype must be 'float16' or 'float32', got {dtype!r}.")
        if compression not in COMPRESSIONS:
            raise QKHooksError(f"compression must be one of {', '.join(COMPRESSIONS)}; got {compression!r}.")
        self.mode = mode
        self.dtype = np.dtype(dtype)
        self.compression = None if compression == "none" else compression
        self.checksum = bool(checksum)
        self.chunk_images = chunk_images
        attrs = {k: _attr(v) for k, v in (attrs or {}).items()}
        self._check_folder()
        self._writer_lock = WriterLock(self.path, reserve=RESERVE_BYTES)  # before anything is read or replaced
        if self.path.is_symlink():  # (one to a missing file is refused by the lock) written at its target: an
            self.path = Path(os.path.realpath(self.path))  # overwrite would replace the link, not the run it names
        if mode == "overwrite" and not self.path.exists():
            mode = self.mode = "create"  # nothing to keep: written under its own name from the first batch
        self._child_fds: list[int] = []  # descriptors kept out of forked workers while this writer has them
        self._creating = self.path.with_name(self.path.name + ".creating")
        self._published = mode == "resume"
        self._in_place = mode == "resume"  # the file lives under self.path (an overwrite: once it replaced the old run)
        self._completed = False
        self.was_complete = False  # a resumed file's flag as found (a refused resume puts it back)
        self.run_id: str | None = None
        self._layout_names: set[str] | None = None  # per-image array names, fixed by the first batch
        self._created: list[str] = []  # the per-image arrays this writer made (a new run's layout), by schema name
        self._groups: dict[str, h5py.Group] = {}  # the layout's groups by name (_layout_group), until _publish
        try:
            self._check_path(mode)
            if mode == "resume":
                self._file = self._open_for_resume(attrs, expected_statics or {})
            else:
                self._file = self._lay_out(attrs)
        except BaseException:
            self._writer_lock.release()
            raise
        self.committed = fmt.committed(self._file) or 0
        # a resumed run that ended with no image has no per-image arrays, and a run in place cannot gain them: fixed
        # here, in the caller's thread, not read later off ``committed`` (which the writer thread updates)
        self._statics_only = mode == "resume" and self.committed == 0 and self._layout_names is None
        self._handles: dict[str, Any] = {}  # per-image datasets (and the ids, their digests) of the SWMR file handle
        self._committed_count: fmt.CommittedCount | None = None  # the count's attributes, opened with the handles
        self._lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, queue_size))
        self._error: BaseException | None = None
        self._reported = False
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="qkhooks-writer", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ opening
    def _check_folder(self) -> None:  # before the lock file is made beside the run
        if self.path.is_dir():
            raise QKHooksError(f"{self.path} is a directory; give a file name such as {self.path / 'run.h5'}.")
        parent = self.path.parent if str(self.path.parent) else Path(".")
        if not parent.is_dir():
            raise QKHooksError(f"cannot write {self.path}: the folder {parent} does not exist; create it first.")
        if not os.access(parent, os.W_OK) or (self.path.exists() and not os.access(self.path, os.W_OK)):
            why = ("its file system is read-only" if os.statvfs(parent).f_flag & os.ST_RDONLY else "permission denied")
            if self.mode == "resume":  # the run itself is fine and readable: it is continued elsewhere
                raise QKHooksError(f"cannot resume {self.path}: {why} (reading it works). Copy it with "
                                   f"{fmt.checkpoint_path(self.path).name} to a writable folder and resume the copy.")
            raise QKHooksError(f"cannot write {self.path}: {why}; choose a writable location.")

    def _check_path(self, mode: str) -> None:
        if mode == "create" and self.path.exists():
            raise QKHooksError(
                f"{self.path} already exists; pass --resume (resume=True) to continue it or --overwrite "
                "(overwrite=True) to replace it."
            )
        if mode == "resume" and not self.path.exists():
            raise QKHooksError(f"cannot resume {self.path}: no such file; start a new run without --resume.")
        other = other_program_file(self.path) if mode in ("resume", "overwrite") else None
        if other is not None and mode == "resume":
            raise QKHooksError(f"cannot resume {self.path}: it is not a qkhooks run ({other}); give the run file "
                               "to resume, or record into a new --out.")
        if other is not None:
            raise QKHooksError(f"{self.path} is not a qkhooks run ({other}): --overwrite (overwrite=True) replaces "
                               "only a run. Record into another --out, or remove the file yourself if it can go.")

    @property
    def laid_out(self) -> bool:
        """Whether the file has its final layout and lives, in SWMR mode, under its own name."""
        return self._published

    @property
    def layout_arrays(self) -> frozenset[str] | None:
        """The per-image arrays every batch must have: a resumed run's, or those of a new run's first batch; None
        before that batch (a sink leaves out an array that a resumed run from before it lacks)."""
        return None if self._layout_names is None else frozenset(self._layout_names)

    def _keep_from_children(self, f: h5py.File) -> h5py.File:
        """Keep the run file's descriptor out of forked workers while this writer has it (see lock.py)."""
        fd = f.id.get_vfd_handle()
        keep_out_of_forked_children(fd)
        self._child_fds.append(fd)
        return f

    def _lay_out(self, attrs: Mapping[str, Any]) -> h5py.File:
        """A new run, laid out under ``RUN.h5.creating`` until its first batch (see the module docstring)."""
        fmt.checkpoint_path(self._creating).unlink(missing_ok=True)  # a dead writer's (we hold the lock)
        f = create_run_file(self._creating, CHUNK_CACHE_BYTES)
        self._keep_from_children(f)
        self.run_id = uuid.uuid4().hex  # ties the reducer checkpoints to this run (format.read_checkpoint)
        self._identity = json.dumps({**json.loads(attrs.get(fmt.IDENTITY, "{}")), "run_id": self.run_id}, sort_keys=True)
        for key, value in attrs.items():
            if key != fmt.IDENTITY:  # written with the layout's end (_publish)
                f.attrs[key] = value
        f.attrs["complete"] = False
        images = f.create_group("images")
        images.create_dataset("ids", (0,), maxshape=(None,), chunks=(1024,), dtype=h5py.string_dtype())
        images.create_dataset("skipped", (0, 2), maxshape=(None, 2), chunks=(64, 2), dtype=h5py.string_dtype())
        if self.checksum:  # one image a chunk unless told otherwise, as the checksummed arrays (_create_per_image)
            fmt.create_id_digests(f, fmt.id_digests([]), self.chunk_images or 1)
        fmt.set_committed(f, 0)
        return f

    def _publish(self, reopen: bool = True) -> None:
        """Give the laid-out file its name; reopen it in SWMR mode for the batches. An overwrite keeps the
        ``.creating`` name (and the old run) until :meth:`_replace_old`."""
        names = sorted(self._created)  # every per-image array of a new run is made here (walking the file: ~20 ms)
        self._groups.clear()  # handles of the file closed below
        self._drop_handles()
        # Written last, so the metadata laid out first (root, ids) stays where it was before these two existed
        self._file["images"].attrs[fmt.ARRAYS_ATTR] = json.dumps(names)
        self._file.attrs[fmt.IDENTITY] = self._identity
        if self.checksum:  # the attributes' digests, of the layout as it is now (later changes: _reseal)
            fmt.seal_attrs(self._file)
        self._file.flush()
        self._file.close()
        block = meta_block_bytes(len(names))  # every array's chunk index in the block opened before the first chunk
        if self.mode == "overwrite":
            self._published = True
            if reopen:
                self._file = self._keep_from_children(open_swmr_writer(self._creating, CHUNK_CACHE_BYTES, block))
            return
        fmt.checkpoint_path(self.path).unlink(missing_ok=True)  # a stale checkpoint is not ours (gone first)
        if reopen:  # in SWMR mode before it has the run's name: a reader opening it then reads it as SWMR, following
            # the writer (a file found closed is read plainly, and the writer's reopening changed it under the reader)
            self._file = self._keep_from_children(open_swmr_writer(self._creating, CHUNK_CACHE_BYTES, block))
        os.replace(self._creating, self.path)
        self._writer_lock.hold_run()  # the new file under the run's name is this writer's (hard links: lock.py)
        self._published = self._in_place = True

    def _replace_old(self) -> None:
        """An overwrite's new run takes the old run's place: the file first, then its checkpoint. A kill between the
        two leaves the new run beside the old run's checkpoint, whose other run id is never read as its own (the new
        run resumes from its start); the old run is never left with a checkpoint it cannot use (a resume of it would
        start again and cut its images)."""
        os.replace(self._creating, self.path)
        self._writer_lock.hold_run()  # the new file under the run's name is this writer's (hard links: lock.py)
        new_states = fmt.checkpoint_path(self._creating)
        if new_states.exists():
            os.replace(new_states, fmt.checkpoint_path(self.path))
        else:
            fmt.checkpoint_path(self.path).unlink(missing_ok=True)
        self._in_place = True

    def _open_for_resume(self, attrs: Mapping[str, Any], expected_statics: Mapping[str, Any]) -> h5py.File:
        self._refuse_if_open_here()
        # read-only first, every part of the file that the resume uses: a refused resume changes nothing
        with self._refused_if_damaged(), open_reader(self.path) as f:
            root = dict(f.attrs.items())  # all at once: a damaged attribute raises here (attrs.get would say None)
            fmt.refuse_newer_format(root, self.path, "resume")  # first: a newer layout may hold its parts elsewhere
            theirs = {**{k: root.get(k) for k in IDENTITY_ATTRS}, **checked_attrs(root)}
            if fmt.committed(f) is None:
                raise QKHooksError(f"cannot resume {self.path}: it is not a qkhooks run file; use --overwrite.")
            if attrs_off := fmt.attr_digest_problems(f):  # before comparing them: a changed one is not "another run's"
                raise QKHooksError(fmt.attr_damage_message(self.path, attrs_off, "resume"))
            if lost := fmt.lost_statics(root):
                raise QKHooksError(f"cannot resume {self.path}: the repair that wrote it could not copy {', '.join(lost)} "
                                   "from the damaged file, and a run resumed in place cannot write statics again; "
                                   "record the data again into a new --out (this file still reads).")
            if "shards" in f["images"].attrs:
                raise QKHooksError(
                    f"cannot resume {self.path}: it is a merge of shard files ({f['images'].attrs['shards']}); "
                    "resume the shards with the same torchrun command plus --resume, which merges again."
                )
            mine = {**attrs, **{k: v for k, v in checked_attrs(attrs).items() if v is not None}}
            self._check_identity(theirs, mine)
            if theirs["weights_sha256"] is None and "weights_sha256" in mine:
                self._check_statics(f, expected_statics)
            self._check_whole(f)
            self.run_id = fmt.run_id_of(f)
            self.was_complete = bool(root.get("complete", False))
        try:
            clear_open_flags(self.path)  # a dead writer's; we hold the run's lock, so no live one's
            f = self._keep_from_children(open_swmr_writer(self.path, CHUNK_CACHE_BYTES))
        except OSError as exc:
            if "already open" in str(exc):
                raise self._open_here_error() from None
            raise
        for leftover in (self._creating, fmt.checkpoint_path(self._creating)):  # an --overwrite killed before it
            leftover.unlink(missing_ok=True)  # replaced this run (we hold the lock: no live writer's)
        with self._refused_if_damaged():
            try:
                f.attrs.modify("complete", False)
                n = fmt.committed(f) or 0
                self._cut(f, n)
                fmt.drop_stale_heap_references(f[fmt.IDS], n)
                if fmt.SKIPPED in f:
                    self._keep_readable_skipped(f[fmt.SKIPPED])
                f.flush()
                arrays = fmt.per_image_datasets(f)
                self._layout_names = set(arrays) or None
                self._follow_file_layout(arrays)
            except BaseException:
                f.close()
                raise
        return f

    def _keep_readable_skipped(self, skipped: h5py.Dataset) -> None:
        """Cut ``/images/skipped`` after the rows that read (a dead writer's last rows may not): a resumed run writes
        the list again, whole, at its first checkpoint and at its end; until then the file names those it read."""
        readable = fmt.readable_skipped_rows(skipped)  # read here, not by _check_whole: such a list is cut, not refused
        if readable < skipped.shape[0]:
            warnings.warn(f"resuming {self.path}: its list of skipped images reads up to row {readable} of "
                          f"{skipped.shape[0]} (as a writer killed while writing the rows it added leaves them); the rest "
                          "is dropped, and this run writes the list again at its next checkpoint.", stacklevel=4)
        fmt.drop_stale_heap_references(skipped, readable)

    def _follow_file_layout(self, arrays: Mapping[str, h5py.Dataset]) -> None:
        """A resume appends to the arrays as they were made: HDF5 fixes a dataset's compression and checksum when it
        is created. Every file qkhooks writes has one layout (repair and merge copy each array's own): it becomes
        the writer's, and options given that differ are named. Arrays that differ among themselves (a file other
        tools made or changed) each keep their own; the writer keeps the options given, for arrays made now (a
        resume makes none: a batch has the run's arrays), and the warning names which arrays have which layout."""
        layouts: dict[tuple[str, bool], list[str]] = {}
        for name, ds in arrays.items():
            layouts.setdefault((ds.compression or "none", bool(ds.fletcher32)), []).append(name)
        if len(layouts) > 1:
            which = "; ".join(f"{_layout_words(*layout)}: {', '.join(sorted(names))}"
                              for layout, names in sorted(layouts.items()))
            warnings.warn(f"resuming {self.path}: its per-image arrays differ in layout ({which}), which qkhooks "
                          "never writes (another tool made or changed the file). Each array keeps its own, so the "
                          "images added now are stored as its earlier ones, whatever the options given now "
                          f"({_layout_words(self.compression or 'none', self.checksum)}); to give every array one "
                          "layout, record the run again with --overwrite.", stacklevel=4)
            return
        if not layouts:
            return
        [(compression, checksum)] = layouts
        differ = []
        if compression != (self.compression or "none"):
            differ.append(f"compression {compression}, not {self.compression or 'none'} as given now")
        if checksum != self.checksum:
            differ.append("a Fletcher-32 checksum, though none is asked for now" if checksum else
                          "no checksum, though checksum=True (--checksum) is given now")
        if differ:
            warnings.warn(f"resuming {self.path}: its per-image arrays keep the layout their first batch gave them "
                          f"({'; '.join(differ)}), and the images added now are stored that way too; to change the "
                          "layout, record the run again with --overwrite.", stacklevel=4)
        self.compression, self.checksum = (None if compression == "none" else compression), checksum

    def _damaged(self, problem: str) -> QKHooksError:
        return QKHooksError(
            f"cannot resume {self.path}: it is damaged ({problem}). Recover its intact images with `qkhooks repair "
            f"{self.path} --out FIXED.h5` and resume that (the same command with --out FIXED.h5 --resume), or start "
            "again with --overwrite.")

    @contextlib.contextmanager
    def _refused_if_damaged(self) -> Iterator[None]:
        """Any failure to read the run file while a resume checks or opens it is damage (a checksum that fails, an
        object or attribute the resume needs that is missing, an id that is not UTF-8): one error that says what to do."""
        try:
            yield
        except DamagedRunError as exc:
            raise self._damaged(exc.problem) from None
        except QKHooksError:
            raise
        except (OSError, RuntimeError, KeyError, ValueError) as exc:
            raise self._damaged(f"reading it failed: {type(exc).__name__}: {exc}") from None

    def _open_here_error(self) -> QKHooksError:
        return QKHooksError(
            f"cannot resume {self.path}: this process still has it open for reading (open_run); close it first "
            "(run.close(), or leave its `with` block), then resume.")

    def _refuse_if_open_here(self) -> None:
        """HDF5 refuses to open a file for writing that this process has open for reading: say so, with the fix."""
        try:
            target = os.path.realpath(self.path)
            for fid in h5py.h5f.get_obj_ids(types=h5py.h5f.OBJ_FILE):
                name = fid.name.decode() if isinstance(fid.name, bytes) else str(fid.name)
                if os.path.realpath(name) == target:
                    raise self._open_here_error()
        except QKHooksError:
            raise
        except Exception:  # noqa: BLE001 - only a better message; HDF5's own refusal is caught below
            pass

    def _resume_fix(self) -> str:
        return "Resume with the same model and options as the first run, record into a new --out, or --overwrite to start again."

    def _check_identity(self, theirs: Mapping[str, Any], attrs: Mapping[str, Any]) -> None:
        for key in IDENTITY_ATTRS:
            if key in attrs and theirs[key] is None:  # every run file has them
                raise self._damaged(f"its root attribute {key!r} is missing")
            if key in attrs and _attr(theirs[key]) != attrs[key]:
                why = fmt.config_differences(_attr(theirs[key]), attrs[key])
                raise QKHooksError(
                    f"cannot resume {self.path}: its {key} differs from this run's{why}"
                    f".\n  file: {theirs[key]}\n  now:  {attrs[key]}\n{self._resume_fix()}"
                )
        # a file from before an attribute is not compared on it (the spectra stand in for the weights: _check_statics)
        for key, what, mine, stored in checked_differences(attrs, theirs):
            if key == "image_config":
                why = fmt.config_differences(stored, mine)
            else:
                # a hash is shown by its first 12 digits where those tell the two apart (a damaged one may not)
                cut = key == "weights_sha256" and stored[:12] != mine[:12]
                short = (lambda v: v[:12] + "...") if cut else (lambda v: v)
                why = f" (file {short(stored)}, now {short(mine)})"
            raise QKHooksError(f"cannot resume {self.path}: {what} differs between the run file and this run{why}; "
                               "its images so far were recorded otherwise, and one run file never mixes the two. "
                               + self._resume_fix())

    def _check_statics(self, f: h5py.File, expected: Mapping[str, Any]) -> None:
        """A file from before ``weights_sha256``: the model's own spectra must equal the stored ones."""
        for name, value in expected.items():
            stored = f.get(name)
            value = np.asarray(value)
            if not isinstance(stored, h5py.Dataset):
                continue  # not recorded in that version; nothing to compare
            stored = stored[()]
            if stored.shape != value.shape or not np.allclose(stored, value, rtol=1e-3, atol=1e-6 * float(np.abs(value).max(initial=0))):
                raise QKHooksError(
                    f"cannot resume {self.path}: the model's weights differ from those of the run (its {name} differs "
                    "from this model's); its images so far come from the other weights, and one run file never "
                    f"mixes two models. {self._resume_fix()}")

    def _check_whole(self, f: h5py.File) -> None:
        """Every per-image array the layout lists is there with at least the committed rows (h5py edits, a cut), and
        everything a resume reads or rewrites reads (any failure raises): every object's header and attributes, the
        statics, the committed ids and each per-image array's chunk index where the resume cuts or appends."""
        n = fmt.committed(f) or 0
        arrays = fmt.per_image_datasets(f, read_every_attribute=True)
        fmt.read_ids(f, n)
        problems = fmt.layout_problems(f, arrays, n)
        problems += [f"{name}'s chunk index is unreadable" for name, ds in sorted(arrays.items())
                     if ds.shape[0] and not fmt.chunk_index_readable(ds, (0, max(n, 1) - 1, ds.shape[0] - 1))]
        if problems:
            raise self._damaged(f"{'; '.join(problems)}, with {n} images committed")

    def _cut(self, f: h5py.File, n: int) -> None:
        if (fmt.committed(f) or 0) > n:
            fmt.set_committed(f, n)  # the count first: a partial flush never leaves committed above the rows
        for ds in [*fmt.per_image_datasets(f).values(), *fmt.id_datasets(f)]:
            if ds.shape[0] != n:
                ds.resize(n, axis=0)  # shrinking an existing dataset is allowed in SWMR mode
        fmt.set_committed(f, n)

    # ------------------------------------------------------------------ public API (caller thread)
    @property
    def ids(self) -> list[str]:
        """Ids of the committed images (waits for queued batches first)."""
        self.flush()
        with self._lock:
            return fmt.read_ids(self._file, self.committed)

    def rows(self, name: str, n: int) -> np.ndarray | None:
        """The first ``n`` committed rows of the per-image array ``name`` (None where the run has none): what a resume
        compares with the data before it continues."""
        self.flush()
        with self._lock:
            ds = self._file.get(name)
            return None if ds is None else ds[:n]

    def write_batch(self, ids: Sequence[str], arrays: Mapping[str, Any]) -> None:
        """Queue one batch: ``arrays`` maps schema names to (B, ...) tensors/arrays. Blocks only if the queue is full."""
        self._raise_if_failed()
        if self._closed:
            raise QKHooksError("this run writer is closed.")
        sizes = {name: len(v) for name, v in arrays.items()}
        if any(s != len(ids) for s in sizes.values()):
            raise QKHooksError(f"every array of a batch needs one row per id ({len(ids)}); got {sizes}.")
        self._check_names(ids, arrays)
        unstorable = next(filter(None, map(fmt.id_problem, ids)), None)  # in the writer thread it would end the run
        if unstorable is not None:
            raise QKHooksError(f"{unstorable}. {self.refusal_help(resumable=True)}")
        dtype = getattr(torch, self.dtype.name)
        problem = _overflow(ids, arrays, dtype)
        if problem is not None:
            raise QKHooksError(f"{problem} {self.refusal_help(resumable=False)}")
        self._enqueue(("batch", [str(i) for i in ids], _to_host_all(arrays, dtype)))

    def _check_names(self, ids: Sequence[str], arrays: Mapping[str, Any]) -> None:
        """Every batch has the arrays of the run's first batch (checked here, before anything of it is written)."""
        names = {name.lstrip("/") for name in arrays}
        if self._statics_only and names:
            raise QKHooksError(
                f"{self.path} is a run that ended with no image (its statics only), so it has no arrays for a batch "
                "to go into, and a run in place cannot gain them; record it again with --overwrite "
                "(mode='overwrite'). Nothing was written.")
        if self._layout_names is None:
            self._layout_names = names
            return
        if names == self._layout_names:
            return
        extra, missing = sorted(names - self._layout_names), sorted(self._layout_names - names)
        what = "; ".join(([f"it has {', '.join(extra)}, which the run's first batch did not have"] if extra else [])
                         + ([f"it lacks {', '.join(missing)}, which the run has"] if missing else []))
        damaged = (" (or the run file lost an array: then recover it with `qkhooks repair`)"
                   if self.mode == "resume" and extra else "")
        raise QKHooksError(
            f"a batch (first image {str(ids[0])!r}) does not have the run's arrays: {what}{damaged}. Every batch needs "
            "the same arrays: give every item the same annotations (masks on all items or on none). "
            + self.refusal_help(resumable=False))

    def refusal_help(self, resumable: bool) -> str:
        """What the user can do after a batch is refused mid-run (a data error that would come back every time):
        said from where the run file stands."""
        try:
            self.flush()
        except QKHooksError:
            pass
        fix = "fix the data and run the same command" if resumable else "apply the fix above and run"
        if self.mode == "overwrite" and not self._in_place:
            return f"{self.path} still holds the old run, unchanged (the new one is dropped); {fix} again."
        if self.committed == 0 and self.mode != "resume":
            return f"Nothing was written; {fix} again."
        if resumable:
            return (f"The {self.committed} images before it stay committed in {self.path}: fix the data and run the "
                    "same command with --resume to continue after them, or start again with --overwrite.")
        return (f"{self.path} keeps the {self.committed} images before it, but its arrays (names, shapes, storage "
                "dtype) were fixed by its first batch, so a --resume meets the same refusal: apply the fix above and "
                "start again with --overwrite.")

    def interruption_help(self, kept: int | None) -> str:
        """Where the run file stands after an interrupt closed it unfinished, and how to go on. ``kept``: the images
        a resume keeps (its reducers' last checkpoint, :func:`~qkhooks.store.format.resume_point`; None: not known).
        """
        if self.mode == "overwrite" and not self._in_place:
            return f"{self.path} still holds the old run, unchanged (the new one is dropped); run the command again."
        if self.committed == 0 and self.mode != "resume":
            return (f"nothing was recorded (no image was committed), so no file is left at {self.path}; run the same "
                    "command again.")
        again = ("the same command with --resume in place of --overwrite" if self.mode == "overwrite"
                 else "the same command with --resume")
        if kept is None:
            return (f"{self.path} keeps {self.committed} committed images; {again} continues from its reducers' last "
                    "checkpoint.")
        if kept == self.committed:
            return f"{self.path} keeps {self.committed} committed images; {again} continues after them."
        return (f"{self.path} keeps {self.committed} committed images, {kept} of them in its reducers' last checkpoint: "
                f"{again} continues after those {kept} and records the {self.committed - kept} after them again "
                "(the reducers are checkpointed every 8 batches by default: --checkpoint-every N, or "
                "checkpoint_every=N in Python).")

    def write_static(self, name: str, value: Any) -> None:
        """Queue a dataset written once (spectra, model info); a JSON string is stored as a string attribute.

        A new static belongs to the layout: write it before the first batch (later, or in a resume, only in
        place, with the same shape and dtype). Arrays are copied now, as the checkpoint's are: the writer thread reaches
        the static later, and the caller's array (a spectrum shared with qkhooks' cache) may be edited meanwhile.
        """
        if isinstance(value, torch.Tensor):
            value = value.detach().to("cpu", copy=True)
        elif isinstance(value, np.ndarray):
            value = np.array(value, copy=True)
        self._enqueue(("static", name, value))

    def write_checkpoint(self, states: Mapping[str, Mapping[str, Any]]) -> None:
        """Queue a checkpoint of every reducer's state (name -> numpy arrays and scalars) behind the batches queued.

        Arrays are copied now: a reducer's state may be a view of buffers it keeps updating. The checkpoint
        counts the images committed when the writer thread reaches it.
        """
        copied = {name: {k: (v.detach().cpu().clone() if isinstance(v, torch.Tensor) else
                             np.array(v, copy=True) if isinstance(v, np.ndarray) else v) for k, v in state.items()}
                  for name, state in states.items()}
        self._enqueue(("checkpoint", copied))

    def checkpoint(self) -> tuple[int, dict[str, dict[str, Any]]] | None:
        """(images, states) of the last checkpoint, or None (waits for queued work first; a failed writer has none
        that will run, and its checkpoint is what a resume of it keeps)."""
        if self._error is None:
            self.flush()
        return fmt.read_checkpoint(self.path if self._in_place else self._creating, self.run_id)

    def write_skipped(self, skipped: Sequence[tuple[str, str]]) -> None:
        """Queue the list of (id, reason) of images the dataset could not read."""
        self._enqueue(("skipped", list(skipped)))

    def truncate(self, n: int) -> None:
        """Cut the run back to its first ``n`` images (a resume whose reducer checkpoint is older)."""
        self._enqueue(("truncate", int(n)))
        self.flush()

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
                self._queue.put(("complete", bool(complete) and self._error is None))
                self._queue.put(_STOP)
                self._thread.join()
        finally:
            with self._lock:
                try:
                    self._close_file()
                finally:
                    for fd in self._child_fds:
                        forget_in_forked_children(fd)
                    self._writer_lock.release()
        if not self._reported:
            self._raise_if_failed()

    def _drop_handles(self) -> None:
        """Let go of the datasets and the count taken from the file (before it is closed; taken again from the next
        batch on)."""
        self._handles.clear()
        self._committed_count = None

    def _close_file(self) -> None:
        """Close the HDF5 file deliberately (handles first), also after a failed write; a new run that ends
        with no committed image (and not complete) leaves no file."""
        self._drop_handles()
        keep = self.mode == "resume" or self.committed > 0 or (self._completed and self._error is None)
        if self.mode == "overwrite" and not self._in_place:  # the old run stays unless the new one is complete
            keep = self._completed and self._error is None
        try:
            if self._file.id.valid:
                if keep and not self.laid_out:
                    self._publish(reopen=False)  # a complete run without batches (statics only)
                else:
                    self._file.close()
            if keep and not self._in_place:
                self._replace_old()
        except Exception:
            if self._error is None:
                raise  # after a failed write the first error is the one to report
        finally:
            if not keep:
                self._creating.unlink(missing_ok=True)
                fmt.checkpoint_path(self._creating).unlink(missing_ok=True)
                if self._in_place:
                    fmt.remove_run(self.path)

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
        if self._error is None:
            return
        self._reported = True
        room = out_of_room(self._error)
        if room is None:
            raise QKHooksError(f"writing {self.path} failed: {self._error}") from self._error
        what, fix = ROOM[room]
        name = self.path.name
        if self.mode == "overwrite" and not self._in_place:
            raise QKHooksError(f"{what} while writing the new run beside {name}, before its first checkpoint: {name} "
                               f"keeps the old run, unchanged; {fix} and run the same command (with --overwrite) "
                               "again") from self._error
        if not self.laid_out:  # no run file yet: nothing to resume
            raise QKHooksError(f"{what} while laying out {name}: no image was committed and no run file was written; "
                               f"{fix} and run the same command again") from self._error
        problem = damage(self.path)  # HDF5 met the limit (not the check before it) and could not close the file whole
        if problem is not None:
            raise QKHooksError(f"{what} while writing {name}, and closing it left it {problem}: its {self.committed} "
                               f"committed images are recoverable: {fix}, run `qkhooks repair {self.path} --out "
                               "FIXED.h5` and resume that (the same command with --out FIXED.h5 --resume)"
                               ) from self._error
        raise QKHooksError(f"{what} while writing {name}: {self.committed} images are committed and safe; {fix} and "
                           "run the same command with --resume") from self._error

    @property
    def stopped_for_room(self) -> bool:
        """Whether the writer stopped on a full disk, a quota or a file size limit (:meth:`room_help` says more)."""
        return self._error is not None and out_of_room(self._error) is not None

    def room_help(self, kept: int | None) -> str | None:
        """After the run stopped on a full disk, a quota or a file size limit (None for any other stop): where its
        file stands, counted by its checkpoint, and how to go on. ``kept``: the images a resume keeps (its reducers'
        last checkpoint, :func:`~qkhooks.store.format.resume_point`; None: not known). Said by ``record`` in place
        of the writer's own message, which knows the committed images only."""
        room = out_of_room(self._error) if self._error is not None else None
        if room is None or (self.mode == "overwrite" and not self._in_place) or not self.laid_out:
            return None  # the writer's own message says it: the old run kept, or no run file
        what, fix = ROOM[room]
        name, n = self.path.name, self.committed
        if kept is None:
            held = (f"{name} has {n} committed images, but its reducers' last checkpoint does not read, so none is "
                    "complete: a resume records them all again")
        elif kept == 0:
            held = (f"{name} has {n} committed images and no reducer checkpoint yet (one is written every "
                    "--checkpoint-every (checkpoint_every) batches, 8 by default), so none is complete: a resume "
                    "records them all again")
        elif kept == n:
            held = (f"{name} holds {n} images complete (all in its reducers' last checkpoint); no image after them is in "
                    "the file, and a resume records every image after those")
        else:
            held = (f"{name} holds {kept} images complete (its reducers' last checkpoint); the {n - kept} committed "
                    "after them are not in that checkpoint and no later image is in the file, so a resume keeps those "
                    f"{kept} and records every image after them ({n - kept} of them again)")
        fix = fix[0].upper() + fix[1:]
        problem = damage(self.path)
        if problem is not None:
            return (f"{what} while writing {name}, and closing it left it {problem}; {held}. {fix}, run `qkhooks "
                    f"repair {self.path} --out FIXED.h5` and resume that (the same command with --out FIXED.h5 --resume)")
        return f"{what} while writing {name}: {held}. {fix} and run the same command with --resume"

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
                if out_of_room(exc) in ("disk", "quota"):  # the lock file's reserve counts against both
                    self._writer_lock.free_reserve()  # room for the flush that closing the file needs
                with self._lock:
                    self._drop_handles()
                    try:
                        self._file.close()
                    except Exception:  # noqa: BLE001 - the first error is the one reported
                        pass
            finally:
                self._queue.task_done()

    def _do_batch(self, ids: list[str], arrays: dict[str, tuple[Any, Any]]) -> None:
        n, b = self.committed, len(ids)
        values = {}
        for name, item in arrays.items():
            value = _numpy(item)
            values[name] = value.astype(self.dtype, copy=False) if np.issubdtype(value.dtype, np.floating) else value
        if not self.laid_out:
            for name in values:
                self._create_per_image(name, values[name], n)
        self._check_space(values, n)
        if not self.laid_out:
            self._publish()
        targets = {}
        for name, value in values.items():
            target = self._handles.get(name)
            if target is None:
                if not isinstance(self._file.get(name), h5py.Dataset):
                    raise QKHooksError(f"{name} appears after the run's first batch, which did not have it; every "
                                       "batch needs the same arrays.")
                target = self._handles[name] = _PerImage(self._file[name])
            if target.shape != value.shape[1:]:
                raise QKHooksError(f"{name}: a batch has shape {value.shape[1:]} per image, the run has {target.shape}.")
            targets[name] = target
        f = self._file
        self._write_ids(n, ids)
        for name, value in values.items():
            targets[name].append(n, fmt.signed_zero_rows(name, value))
        f.flush()  # the images reach the disk before the count that commits them
        self._committed_count.set(n + b)  # on disk with the next batch's flush (or flush()/close()): one a batch
        self.committed = n + b

    def _write_ids(self, n: int, ids: list[str]) -> None:
        """A batch's ids (and their digests), written before its arrays and sent to the file at once, so that their
        chunk and heap block are placed before the chunks the batch's arrays start: a file cut short (a copy stopped,
        a size limit) that holds an image's rows holds its id. Left to the file's flush, the ids' chunk and heap block
        were placed after the batch's chunks, and a cut between lost images for their ids alone (round 44, a default
        300-image run cut at 141 points: 4 and 6 images at two of them; none since). HDF5 still places each array's
        chunk index after its first chunk, so in a run whose chunks span many batches a cut there loses those images
        to the last array's index instead."""
        f = self._file
        ids_ds = self._handles.get(fmt.IDS)
        if ids_ds is None:
            ids_ds = self._handles[fmt.IDS] = f[fmt.IDS]
            if fmt.ID_DIGESTS in f:  # a checksummed run's (a resume keeps the file's own: none in older runs)
                self._handles[fmt.ID_DIGESTS] = _PerImage(f[fmt.ID_DIGESTS])
            self._committed_count = fmt.CommittedCount(f)
        b = len(ids)
        ids_ds.resize(n + b, axis=0)
        ids_ds[n:n + b] = ids
        ids_ds.flush()
        digests = self._handles.get(fmt.ID_DIGESTS)
        if digests is not None:
            digests.append(n, fmt.id_digests(ids))
            digests.ds.flush()

    def _check_space(self, values: Mapping[str, np.ndarray], n: int) -> None:
        """Refuse a batch the disk has no room for before HDF5 writes any of it (HDF5 allocates whole chunks)."""
        needed = FREE_MARGIN_BYTES
        for name, value in values.items():
            # No handle yet in a run's first batch: they are taken after _publish, which reopens the file
            target = self._handles.get(name)
            if target is not None:
                rows = target.rows or 1
            else:
                ds = self._file.get(name)
                rows = ds.chunks[0] if isinstance(ds, h5py.Dataset) and ds.chunks else 1
            chunks = -(-(n + len(value)) // rows) - -(-n // rows)
            needed += chunks * rows * (value[0].nbytes if len(value) else 0)
        free = shutil.disk_usage(self.path.parent).free  # a bare name's parent is "."
        if free < needed:
            raise OSError(errno.ENOSPC, f"{free} bytes free, the next batch needs {needed}")
        # A write past the process's largest file (``ulimit -f``) fails with EFBIG inside HDF5, which then closes the
        # file with an end of file it could not write: refused here, the file closes whole
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if limit != resource.RLIM_INFINITY and self._file.id.get_filesize() + needed > limit:
            raise OSError(errno.EFBIG, f"files may have at most {limit} bytes (ulimit -f), the next batch needs "
                          f"{needed} past the file's {self._file.id.get_filesize()}")

    def _create_per_image(self, name: str, value: np.ndarray, n: int) -> h5py.Dataset:
        assert n == 0, "per-image arrays are created with the layout, before the first image"
        per, batch = max(1, value[0].nbytes), max(1, len(value))
        if self.chunk_images:
            chunk = self.chunk_images
        elif self.compression or self.checksum:
            # A filtered chunk that a later append touches is re-encoded and rewritten: a checksummed one in place, so
            # a kill inside that write (the kernel may stop a write between pages) leaves committed images beside a
            # stale checksum (lost), a compressed one elsewhere, bloating the file 2-3x (benchmarks/RESULTS.md). A
            # chunk of one batch is not enough: a later batch of another size (a photo that fails to decode late, a
            # resume with another batch size) shifts every later chunk across two batches. One image per chunk
            # writes each chunk exactly once, whole, before its image is committed, whatever the batches. Against one
            # batch a chunk (36 float16 arrays of (6, 16, 394), random, batch 8 and 16, tmpfs, 2-core VM at load 4-7,
            # paired medians of 24-30 interleaved batches): writer thread CPU +2-7 % with the checksum alone
            # (48 -> 50 ms a 43 MB batch), +15-20 % lzf, -8-10 % gzip; file size +0.04-0.08 %.
            chunk = 1
        else:
            # Whole batches per chunk: a chunk that a batch fills only in part goes to disk again at every flush
            # (one a batch), ~3x the bytes of the data for ~1 MiB chunks; a batch-sized chunk is written once
            # (writer thread -25% CPU, benchmarks/ANALYSIS.md "speed-e2e"). Small arrays group several
            # batches up to MIN_CHUNK_BYTES, so they do not end up in thousands of tiny chunks. A chunk that a
            # later batch fills is rewritten with its committed rows' bytes unchanged (no filter recodes them): a
            # write cut by a kill leaves those bytes as they were.
            chunk = batch * max(1, MIN_CHUNK_BYTES // (batch * per))
        ds = self._file.create_dataset(
            name, shape=(0,) + value.shape[1:], maxshape=(None,) + value.shape[1:], dtype=value.dtype,
            chunks=(chunk,) + value.shape[1:], compression=self.compression, fletcher32=self.checksum,
        )
        ds.attrs["per_image"] = True
        self._created.append(ds.name[1:])  # the schema name fmt.per_image_datasets gives it (no leading "/")
        return ds

    def _layout_group(self, name: str) -> h5py.Group:
        """A group of the file being laid out, made on first use and kept: a run's ~70 statics go to a few groups,
        and h5py's ``require_group`` costs ~0.07-0.16 ms a call (benchmarks/ANALYSIS.md, round 23)."""
        group = self._groups.get(name)
        if group is None:
            group = self._groups[name] = self._file.require_group(name)
        return group

    def _layout_is_fixed(self, what: str) -> QKHooksError:
        return QKHooksError(f"cannot add {what} to {self.path}: its layout is fixed by its first batch (a run file "
                            "never leaves SWMR mode); write statics before the first batch.")

    def _do_static(self, name: str, value: Any) -> None:
        group_name, _, key = name.rpartition("/")
        group_name = group_name or "/"
        if isinstance(value, str):
            group = self._file.get(group_name)
            if group is not None and key in group.attrs:
                if self.laid_out:  # its digests accept the new value before it is written, and only it after
                    with self._resealing(group.name, key, value):
                        group.attrs.modify(key, value)
                else:
                    group.attrs.modify(key, value)
            elif self.laid_out:
                raise self._layout_is_fixed(f"the attribute {name}")
            else:
                self._layout_group(group_name).attrs[key] = value
        else:
            value = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
            ds = self._file.get(name)
            if isinstance(ds, h5py.Dataset) and ds.shape == value.shape and ds.dtype == value.dtype:
                ds[()] = value
            elif self.laid_out:
                raise self._layout_is_fixed(f"{name} {value.shape} {value.dtype}")
            else:
                if ds is not None:
                    del self._file[name]
                    self._groups.clear()  # it may have been a group, or held one
                # a checksummed run's statics carry Fletcher-32 too (round 33: a flipped bit in a spectrum read as a
                # number, and verify called the run intact): one chunk, the whole array
                summed = dict(chunks=value.shape, fletcher32=True) if self.checksum and value.ndim and value.size else {}
                self._layout_group(group_name).create_dataset(key, data=value, **summed)
        if self.laid_out:  # a laid-out file's statics are on disk now; a new run's go with the layout (_publish)
            self._file.flush()

    @contextlib.contextmanager
    def _resealing(self, group: str, key: str, value: Any) -> Iterator[None]:
        """Around the write of a laid-out file's attribute (a resume writes its statics again): its entry in the
        file's attribute digests (:data:`~qkhooks.store.format.ATTR_DIGESTS`), where it has them. A changed value is
        written between two states of the digests, each flushed: first they accept the old digest or the new
        (``OLD|NEW``, :func:`~qkhooks.store.format.digest_matches`), then, the value on disk, the new one alone. A
        reader opening the file at any moment (HDF5 may write the value out before the digests, and a flush writes
        its entries one by one) sees an attribute its digests accept, never a refusal; a kill in between leaves the
        pair, which accepts either value qkhooks wrote, and the next resume's statics seal it again. An unchanged
        value leaves the digests as they are."""
        if fmt.ATTR_DIGESTS not in self._file.attrs:
            yield
            return
        stored = fmt.stored_attr_digests(self._file) or {}
        name = f"{group}@{key}"
        digest = fmt.attr_value_digest(value)
        was = stored.get(name)
        if was == digest:
            yield
            return
        if was is not None:
            stored[name] = f"{was.split('|')[0]}|{digest}" if digest not in was.split("|") else was
            self._file.attrs.modify(fmt.ATTR_DIGESTS, json.dumps(stored, sort_keys=True))
            self._file.flush()
        yield
        self._file.flush()
        stored[name] = digest
        self._file.attrs.modify(fmt.ATTR_DIGESTS, json.dumps(stored, sort_keys=True))

    def _do_checkpoint(self, states: dict[str, dict[str, Any]]) -> None:
        if not self.laid_out:
            return  # no image yet, nothing to resume from (and an overwritten run's checkpoint stays its own)
        self._file.flush()  # the count the checkpoint claims is on disk first
        fmt.write_checkpoint(self.path if self._in_place else self._creating, self.committed, states, self.run_id)
        if not self._in_place:
            self._replace_old()  # an overwrite: the new run has something to resume from, so it replaces the old

    def _do_skipped(self, skipped: list[tuple[str, str]]) -> None:
        ds = self._file.get(fmt.SKIPPED)
        if ds is None:  # a run file from before /images/skipped was laid out
            if skipped:
                raise self._layout_is_fixed(fmt.SKIPPED)
            return
        rows = np.array([[str(a), str(b)] for a, b in skipped], dtype=object).reshape(-1, 2)
        # Never a row rewritten: HDF5 frees and rewrites the string of every row it writes, so a kill in the flush
        # could leave a rewritten row pointing at a string not on disk. The list only grows; past where the file's
        # and this one part (a resume from an older checkpoint), the file's rows are dropped (HDF5 frees nothing
        # then), and the rest written as new rows
        held = fmt.read_skipped(self._file)
        same = next((i for i, (a, b) in enumerate(zip(held, rows.tolist())) if a != tuple(b)), min(len(held), len(rows)))
        fmt.drop_stale_heap_references(ds, same)
        ds.resize(len(rows), axis=0)
        if len(rows) > same:
            ds[same:] = rows[same:]
        self._file.flush()

    def _do_truncate(self, n: int) -> None:
        if n > self.committed:
            raise QKHooksError(f"cannot truncate to {n} images: only {self.committed} are committed.")
        self._cut(self._file, n)
        self._file.flush()
        self.committed = n

    def _do_sync(self) -> None:  # noqa: D102
        self._file.flush()

    def _do_complete(self, complete: bool) -> None:
        self._file.attrs.modify("complete", complete)
        self._file.flush()
        self._completed = complete


class _PerImage:
    """A per-image dataset of the open run file and how a batch is appended to it (read from the file once)."""

    __slots__ = ("ds", "shape", "rows", "direct")

    def __init__(self, ds: h5py.Dataset):
        self.ds = ds
        self.shape = ds.shape[1:]
        chunks = ds.chunks
        self.rows = chunks[0] if chunks else 0
        # Whole chunks of an unfiltered array whose chunk spans whole images can go to the file as they are
        self.direct = bool(chunks) and chunks[1:] == self.shape and ds.id.get_create_plist().get_nfilters() == 0

    def append(self, n: int, value: np.ndarray) -> None:
        """``ds.resize(n + b); ds[n:n + b] = value``, without h5py's per-call selection machinery (a third of the
        writer thread's time at 36 arrays a batch). A batch that starts a chunk, of the array's own dtype, is
        written chunk by chunk with ``write_direct_chunk`` (HDF5's H5Dwrite_chunk): no copy into the chunk cache,
        no type conversion, and no dirty chunk left for the flush (the last chunk padded with zeros past the
        extent, as HDF5 fills it). Anything else goes through a hyperslab write."""
        value = np.ascontiguousarray(value)
        b = len(value)
        ds = self.ds
        ds.id.set_extent((n + b,) + self.shape)
        if self.direct and n % self.rows == 0 and value.dtype == ds.dtype and value.dtype.kind in "fiu":
            self._write_chunks(n, value)
            return
        space = ds.id.get_space()
        space.select_hyperslab((n,) + (0,) * (value.ndim - 1), value.shape)
        ds.id.write(h5py.h5s.create_simple(value.shape), space, value)

    def _write_chunks(self, n: int, value: np.ndarray) -> None:
        """Rows ``n``, ``n + 1``, ... (``n`` on a chunk boundary) as whole chunks, the last one padded with zeros.

        Every buffer is exactly one chunk: the run file's chunk index (``libver="latest"``, unfiltered) records no
        chunk sizes, so a longer buffer would be written past the chunk's space in the file."""
        origin = (0,) * len(self.shape)
        for start in range(0, len(value), self.rows):
            part = value[start:start + self.rows]
            if len(part) < self.rows:
                padded = np.zeros((self.rows,) + self.shape, value.dtype)
                padded[:len(part)] = part
                part = padded
            self.ds.id.write_direct_chunk((n + start,) + origin, part)


def checked_attrs(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """The :data:`CHECKED_ATTRS` of root attributes (a file's, or the ones a run is given); None where absent."""
    identity = fmt.identity_of(attrs)
    return {key: attrs.get(key) if key == "image_config" else identity.get(key) for key in CHECKED_ATTRS}


def checked_differences(ours: Mapping[str, Any], theirs: Mapping[str, Any]) -> list[tuple[str, str, str, str]]:
    """Where two runs' :data:`CHECKED_ATTRS` (as :func:`checked_attrs` reads them) differ: (key, what it is, ours,
    theirs) as stored text. A value either run lacks (a file from before it) is not compared; the preprocessing is
    compared as JSON. What a resume checks against its file, and a merge across its shards."""
    out = []
    for key, what in CHECKED_ATTRS.items():
        if ours.get(key) is None or theirs.get(key) is None:
            continue
        a, b = fmt.as_str(ours[key]), fmt.as_str(theirs[key])
        if (json.loads(a) != json.loads(b)) if key == "image_config" else a != b:
            out.append((key, what, a, b))
    return out


def _attr(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool, np.number)):
        return value
    if value is None:
        return "null"
    return json.dumps(value, sort_keys=True)
