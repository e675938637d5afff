"""Record one dataset with several processes (``torchrun``), one shard file per rank, merged into one run file.

``torchrun --nproc-per-node N -m qkhooks record MODEL DATA --out RUN.h5 ...`` (also across nodes) takes the same
flags as a single-process ``qkhooks record``. Each rank records a contiguous block of the dataset (the split of
:func:`qkhooks.stream.record_dataset`'s ``shard=(rank, world)``: rank r gets images [r*ceil(n/W), (r+1)*ceil(n/W)))
into its own complete, resumable run file ``RUN.rank{r}-of-{W}.h5`` next to ``RUN.h5``. When every rank is done,
rank 0 writes ``RUN.h5``, which reads exactly like the run file of one process over the same images:

- root attributes of the shards with ``config["shard"] = null`` (so the configuration equals a single-process
  run's), ``complete`` only when every shard is complete;
- ``/images/ids`` (and ``/images/skipped``) concatenated in rank order, ``committed`` their total, and the
  attribute ``shards`` (JSON list of the shard files, relative to ``RUN.h5``); with ``--checksum`` the ids'
  digests (``/images/id_digests``), each shard's ids checked against its own first;
- every per-image array (``per_image`` attribute) an HDF5 *virtual dataset* over the shards: no data is copied
  and source files are named relative to ``RUN.h5``, so the folder can be moved as a whole (``copy=True``
  writes a self-contained file instead);
- statics (spectrum, model info) copied from rank 0's shard;
- every streaming reducer (top-k images per mode, anisotropy, attention preference, ...) restored from each
  shard's last checkpoint and merged with its ``merge``; top-k image indices are renumbered to rows of the
  merged file, so the state equals one pass over the same images (top-k exactly, sums to rounding).

A rank that dies leaves the other shards intact (each is an ordinary SWMR run file); running the same command
again with ``--resume`` continues every shard from its own last checkpoint and merges again. Resume with the
same number of processes: the shard split depends on it.

:func:`merge_shards` does the merge without torchrun (e.g. after copying shards from nodes that share no file
system), and so does ``qkhooks merge RUN.h5``. :func:`record_dataset_distributed` is the Python entry inside
your own ``torch.distributed`` program.
"""

from __future__ import annotations

import contextlib
import copy as _copy
import datetime
import json
import os
import pickle
import re
import resource
import shutil
import socket
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import h5py
import numpy as np
import torch
import torch.distributed as dist

from qkhooks.data.datasets import STREAMED_PREFIXES
from qkhooks.data.sources import OBJECT_PREFIXES
from qkhooks.errors import QKHooksError
from qkhooks.reducers import Reducer, reducer_class
from qkhooks.store import format as fmt
from qkhooks.store._hdf5 import create_run_file, held_for_write, merged_meta_block_bytes, open_reader, other_program_file
from qkhooks.store.lock import WriterLock, short_of_room
from qkhooks.store.writer import checked_attrs, checked_differences
from qkhooks.store.reader import held_shards_text
from qkhooks.stream import RecordResult, record_dataset

__all__ = [
    "shard_path",
    "find_shards",
    "merge_shards",
    "record_dataset_distributed",
    "torchrun_process_group",
]

TIMEOUT_ENV = "QKHOOKS_DIST_TIMEOUT"
"""Seconds a rank waits for the others at the end of its shard (default one day: ranks finish at different times)."""

BACKEND_ENV = "QKHOOKS_DIST_BACKEND"
"""The torch.distributed backend ``qkhooks record`` initialises under torchrun (default ``gloo``). The ranks only
exchange a few small messages through the process group's store, never tensors, so gloo serves GPUs too and
needs no one-GPU-per-rank layout; set ``nccl`` if your cluster wants it."""

_SHARD_RE = re.compile(r"^(?P<stem>.*)\.rank(?P<rank>\d+)-of-(?P<world>\d+)(?P<suffix>\.[^.]*)?$")


# ------------------------------------------------------------------------------------------ reducers
def _reducer_for(name: str, state: Mapping[str, Any], templates: Mapping[str, Reducer]) -> Reducer:
    """The reducer a shard's saved state describes (a configured template of the same name first), loaded."""
    if name in templates:
        reducer = _copy.deepcopy(templates[name])
        reducer.load_saved(state)
        return reducer
    return Reducer.from_state(state, kind=name)


def _index_fields(name: str, templates: Mapping[str, Reducer]) -> tuple[str, ...]:
    """State arrays of reducer ``name`` that hold global image indices (see ``Reducer.image_index_fields``)."""
    return type(templates[name]).image_index_fields if name in templates else reducer_class(name).image_index_fields


# ------------------------------------------------------------------------------------------ shards
def shard_path(out: str | os.PathLike, rank: int, world: int) -> Path:
    """The shard file of ``rank`` out of ``world`` next to ``out``: ``RUN.rank{rank}-of-{world}.h5``."""
    out = Path(out)
    return out.with_name(f"{out.stem}.rank{int(rank)}-of-{int(world)}{out.suffix}")


def _shard_candidates(out: Path) -> dict[int, dict[int, Path]]:
    """The files named as shards of ``out`` in its folder: world size -> rank -> path."""
    folder = out.parent if str(out.parent) else Path(".")
    found: dict[int, dict[int, Path]] = {}
    for p in folder.glob(f"{glob_escape(out.stem)}.rank*-of-*{glob_escape(out.suffix)}"):
        m = _SHARD_RE.match(p.name)
        if m and m["stem"] == out.stem and (m["suffix"] or "") == out.suffix:
            found.setdefault(int(m["world"]), {})[int(m["rank"])] = p
    return found


def find_shards(out: str | os.PathLike) -> list[Path]:
    """The shard files of ``out`` in its folder, in rank order; all ranks of one world size must be there."""
    out = Path(out)
    folder = out.parent if str(out.parent) else Path(".")
    found = _shard_candidates(out)
    if not found:
        raise QKHooksError(
            f"no shard files {out.stem}.rank*-of-*{out.suffix} in {folder}; record them with torchrun, or copy them "
            "there from the nodes that wrote them."
        )
    if len(found) > 1:
        raise QKHooksError(
            f"shard files of several process counts ({', '.join(map(str, sorted(found)))}) sit next to {out}; "
            "remove the stale ones or name the shards explicitly."
        )
    world, ranks = next(iter(found.items()))
    missing = [r for r in range(world) if r not in ranks]
    if missing:
        raise QKHooksError(f"shards of ranks {missing} (of {world}) are missing next to {out}; copy them there first.")
    return [ranks[r] for r in range(world)]


def glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


class _Shard:
    """What the merge needs from one shard file (opened read-only; SWMR, so a live writer is no problem)."""

    def __init__(self, path: Path):
        self.path = path
        if not path.exists():
            raise QKHooksError(f"shard {path} does not exist.")
        if not path.is_file():  # opening a FIFO waits for a writer forever
            raise QKHooksError(f"shard {path} is not a regular file (a folder, a FIFO, a device or a socket); give the "
                               "shard files themselves.")
        self.file = open_reader(path)
        try:
            self._read()
        except BaseException:
            self.file.close()
            raise

    def _read(self) -> None:
        f, path = self.file, self.path
        fmt.refuse_newer_format(f.attrs, path, "merge")
        if fmt.committed(f) is None:
            raise QKHooksError(f"{path} is not a qkhooks run file (no /images/ids with `committed`).")
        if attrs_off := fmt.attr_digest_problems(f):  # merged, its config or geometry would pass as the run's
            raise QKHooksError(fmt.attr_damage_message(path, attrs_off, "merge"))
        self.sealed = fmt.ATTR_DIGESTS in f.attrs
        self.attrs = {k: (fmt.as_str(v) if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
        self.config = json.loads(fmt.as_str(self.attrs.get("config", "{}")))
        shard = self.config.get("shard")
        if not shard:
            raise QKHooksError(f"{path} is a single-process run, not a shard (its config has no shard).")
        self.rank, self.world = int(shard[0]), int(shard[1])
        block = json.loads(fmt.as_str(f["images"].attrs["shard"])) if "shard" in f["images"].attrs else {}
        self.start, self.stop = block.get("start"), block.get("stop")
        self.committed = fmt.committed(f) or 0
        self.complete = bool(f.attrs.get("complete", False))
        self.n, self.states = self._consistent()
        self.ids = fmt.read_ids(f, self.n)  # checked against their digests where the shard has them
        self.digest_rows = f[fmt.ID_DIGESTS].chunks[0] if fmt.ID_DIGESTS in f else None
        try:
            self.skipped, lost, total = fmt.read_skipped_rows(f)
        except ValueError as exc:  # not laid out as qkhooks writes it: damage
            raise QKHooksError(f"cannot merge {path}: {exc}; repair it (`qkhooks repair SHARD --out COPY`) and merge "
                               "the copy.") from None
        if lost:  # merged, the run would not list every image its recording skipped
            fix = ("it is damaged: repair it (`qkhooks repair SHARD --out COPY`, which keeps the rows that read) and "
                   "merge the copy" if self.complete else "its writer was killed while it added rows: resume that "
                   "shard (its command plus --resume), which writes the list again, then merge again")
            raise QKHooksError(f"cannot merge {path}: its list of skipped images /{fmt.SKIPPED} "
                               f"{fmt.skipped_loss_words(lost, total)}; {fix}.")
        self.per_image = fmt.per_image_datasets(f)

    def _consistent(self) -> tuple[int, dict[str, dict[str, Any] | None]]:
        """The images a resume of this shard would keep (:func:`qkhooks.store.format.resume_point`) and the
        reducer states that count exactly those (None for a reducer with no checkpoint yet)."""
        names = sorted(self.config.get("reducers") or [])
        images, states, problem = fmt.states_and_problem(self.file, self.path)
        done = fmt.resume_point(self.committed, images, states, names)
        if self.complete and done < self.committed:  # a finished shard's last checkpoint counts all its images
            sidecar = fmt.checkpoint_path(self.path)
            why = (f"its reducer checkpoint {sidecar.name} is missing (copied without it?)" if not sidecar.exists() else
                   f"its reducer checkpoint {sidecar.name} is damaged ({problem})" if problem else
                   f"its reducer checkpoint {sidecar.name} belongs to another run (its run id is not this shard's)"
                   if images is None else f"its reducer checkpoint {sidecar.name} counts {images} of them")
            raise QKHooksError(
                f"{self.path} is a finished shard of {self.committed} images, but {why}: merged, its images would be "
                f"left out (the reducers' states must count the images merged). Put the shard's own {sidecar.name} "
                f"next to it and merge again, or record that rank again (`--overwrite`)."
            )
        return done, {name: states[name] if done else None for name in names}

    def close(self) -> None:
        if self.file.id.valid:
            self.file.close()


def _check_shards(shards: list[_Shard]) -> None:
    world = shards[0].world
    if any(s.world != world for s in shards) or sorted(s.rank for s in shards) != list(range(world)) or len(shards) != world:
        listed = ", ".join(f"{s.path.name} (rank {s.rank} of {s.world})" for s in shards)
        raise QKHooksError(f"the shards must be ranks 0..W-1 of one world size W, each once; got {listed}.")

    def identity(s: _Shard) -> tuple[Any, ...]:
        config = {k: v for k, v in s.config.items() if k not in ("shard", fmt.UNCHECKED_RESUMES)}
        return s.attrs.get("model"), json.dumps(config, sort_keys=True), s.attrs.get("data")

    first = identity(shards[0])
    for s in shards[1:]:
        if identity(s) != first:
            raise QKHooksError(
                f"{s.path} was recorded with another model, dataset or options than {shards[0].path}; shards of "
                f"one run must share them.\n  {shards[0].path.name}: {first}\n  {s.path.name}: {identity(s)}"
            )
    for s in shards[1:]:  # what the model is beyond its spec, as a resume checks it (where both files say it)
        for _, what, a, b in checked_differences(checked_attrs(shards[0].attrs), checked_attrs(s.attrs))[:1]:
            raise QKHooksError(
                f"{what} differs between {shards[0].path} and {s.path} (under the same model spec); "
                f"shards of one run must share them, so these are not one run: record the odd shard again "
                f"(`--overwrite` on its rank) or merge the shards of one run.\n  {shards[0].path.name}: {a}\n  "
                f"{s.path.name}: {b}"
            )
    _check_blocks(shards)
    if any(set(s.states) != set(shards[0].states) for s in shards):
        raise QKHooksError("the shards hold different reducer states; they do not come from one run.")


def _check_blocks(shards: list[_Shard]) -> None:
    """Each rank's block of the dataset must start where the previous rank's ended (rank 0's at 0): shards cut from
    datasets of other lengths (a folder that changed between the ranks' runs, a shard left from an earlier run)
    would drop images between blocks, or hold some twice, in a merged file called complete."""
    blocks = [(s.start, s.stop) for s in shards]
    if any(start is None or stop is None for start, stop in blocks):
        return  # shards written before the block was stored: nothing to check
    expected = 0
    for s, (start, stop) in zip(shards, blocks):
        if int(start) != expected:
            previous = shards[s.rank - 1].path.name if s.rank else None
            where = (f"rank {s.rank - 1}'s block ({previous}) ends at image {expected}" if previous
                     else "rank 0's block must start at image 0")
            raise QKHooksError(
                f"{s.path} holds images {start}..{int(stop) - 1} of its dataset, but {where}: the shards were cut "
                f"from datasets of different lengths (the data changed between the ranks' runs, or a shard is left "
                f"from another run), so merging them would {'drop' if int(start) > expected else 'repeat'} images. "
                f"Record the shards of one run over the same data (`--overwrite`), then merge."
            )
        expected = int(stop)


# ------------------------------------------------------------------------------------------ merge
def merge_shards(
    out: str | os.PathLike,
    shard_paths: Sequence[str | os.PathLike] | None = None,
    *,
    reducers: Sequence[Reducer] | None = None,
    copy: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write ``out``, one run file over the shards of a distributed recording that reads like a single-process run.

    Args:
        out: the merged run file (replaced atomically if it exists).
        shard_paths: the shard files, any order (default: :func:`find_shards` next to ``out``).
        reducers: configured reducer instances, used as templates (each shard's state is loaded into a copy,
            then merged) instead of rebuilding each reducer from the kind and configuration saved with its
            state (:meth:`qkhooks.reducers.Reducer.from_state`); needed for states saved without them.
        copy: write the per-image arrays into ``out`` (a self-contained file) instead of virtual datasets
            that read the shards in place (the default: instant, no extra disk; keep the shards next to it).
        overwrite: replace an existing ``out`` (atomically; otherwise an existing file is an error).

    Returns:
        ``out`` as a Path. The merge reads each shard up to its last reducer checkpoint; a shard that is still
        incomplete (a rank died) contributes what it has and the merged file is marked incomplete. A view
        (``copy=False``) refuses a shard still open for writing (its writer runs, or was killed before closing it):
        HDF5 does not read such a file through a view, so copy it (``copy=True``) or finish it first.
    """
    return _merge(out, shard_paths, reducers, copy, overwrite)[0]


def _merge(out: str | os.PathLike, shard_paths: Sequence[str | os.PathLike] | None, reducers: Sequence[Reducer] | None,
           copy: bool, overwrite: bool) -> tuple[Path, list[Reducer], int, list[tuple[str, str]]]:
    out = Path(out)
    if out.exists() and not overwrite:
        if shard_paths is None and not _shard_candidates(out):  # a run of one process: nothing to merge, nothing to replace
            raise QKHooksError(f"{out} exists and no shard files {out.stem}.rank*-of-*{out.suffix} sit next to it: a run "
                               "recorded by one process is complete as it is and needs no merge (merge joins the "
                               "shards that torchrun's ranks write).")
        raise QKHooksError(f"{out} already exists; pass overwrite=True (--overwrite) to replace it.")
    other = other_program_file(out) if out.exists() else None
    if other is not None:  # as record --overwrite: only a run is replaced, never a photo or another program's file
        raise QKHooksError(f"{out} is not a qkhooks run ({other}): --overwrite (overwrite=True) replaces only a run. "
                           "Merge into another file, or remove that one yourself if it can go.")
    paths = [Path(p) for p in shard_paths] if shard_paths is not None else find_shards(out)
    if not paths:
        raise QKHooksError("merge_shards needs at least one shard file.")
    if any(p.resolve() == out.resolve() for p in paths):
        raise QKHooksError(f"{out} is one of the shards; give the merged file another name.")
    if not out.parent.is_dir():  # the lock beside it would fail first, blaming a lock file
        raise QKHooksError(f"the folder of the merged file, {out.parent}, does not exist: make it first (mkdir -p "
                           f"{out.parent}) or merge into a file in a folder that exists.")
    shards: list[_Shard] = []
    lock = WriterLock(out)  # one writer per run file: the merged file too
    try:
        for p in paths:
            shards.append(_Shard(p))
        shards.sort(key=lambda s: s.rank)
        _check_shards(shards)
        held = [str(s.path) for s in shards if not copy and held_for_write(s.path)]
        if held:  # a view could not read them (HDF5 opens such a file for no one through a view)
            raise QKHooksError(f"cannot merge into {out} as a view: {held_shards_text(held)}")
        tmp = out.with_name(out.name + ".merging")
        if tmp.exists():
            tmp.unlink()
        _refuse_no_room(out, shards, copy)
        try:
            with create_run_file(tmp, meta_block=_merged_meta_block(shards) if copy else None) as f:
                merged = _write_merged(f, out, shards, {r.name: r for r in reducers or []}, copy)
            os.replace(tmp, out)
            fmt.checkpoint_path(out).unlink(missing_ok=True)  # its states are inside; no older run's checkpoint
        except BaseException:
            if tmp.exists():
                tmp.unlink()
            raise
    finally:
        for s in shards:
            s.close()
        lock.release()
    return out, merged, sum(s.n for s in shards), [row for s in shards for row in s.skipped]


def _merged_meta_block(shards: list[_Shard]) -> int:
    """The metadata block of a merged copy (:func:`~qkhooks.store._hdf5.merged_meta_block_bytes`): one open before the
    rows are copied holds every array's chunk index. Before (HDF5's 2 KiB blocks), the index of the array copied last
    went into a block opened after its first chunk: a cut between them lost the images of that chunk (a merged
    ``--checksum`` copy of 24 images cut where each image's rows end: 2 of 48 cuts lost one image each)."""
    total = sum(s.n for s in shards)
    names = sorted({n for s in shards for n in s.per_image})
    chunks = []
    for name in names:
        ref = next(s.per_image[name] for s in shards if name in s.per_image)
        chunks.append(-(-total // ref.chunks[0]) if ref.chunks else 0)
    return merged_meta_block_bytes(chunks)


_SPARE_BYTES = 4 << 20
"""Room kept beyond the merged file's bound (HDF5's metadata and the file system's own)."""


def _refuse_no_room(out: Path, shards: list[_Shard], copy: bool) -> None:
    """Before anything is written: the merged file must fit on its disk and under the process's largest file
    (``ulimit -f``). Past either HDF5 fails while closing the file, where the process died with a segfault (review
    r39: ``merge --copy`` onto a full disk left ``RUN.h5.merging`` filling it, and under torchrun the other ranks
    waiting for rank 0). A copy holds at most the shards' data; a view only the ids and the merged reducer states."""
    states = max((fmt.checkpoint_path(s.path).stat().st_size for s in shards if fmt.checkpoint_path(s.path).exists()),
                 default=0)
    needed = _SPARE_BYTES + states + (sum(s.path.stat().st_size for s in shards) if copy else
                                      sum(64 * (len(s.ids) + len(s.skipped)) for s in shards))
    folder = out.parent if str(out.parent) else Path(".")
    free = shutil.disk_usage(folder).free
    if free < needed:
        what = "the shards' data, ids and reducer states" if copy else "the ids and reducer states"
        raise QKHooksError(f"merging into {out} needs up to {needed / 2**20:.1f} MiB ({what}), and {folder} has "
                           f"{free / 2**20:.1f} MiB free; free space there, or merge into a file on another disk. "
                           "Nothing was written.")
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY and needed > limit:
        raise QKHooksError(f"merging into {out} needs up to {needed / 2**20:.1f} MiB, more than the largest file this "
                           f"process may write ({limit / 2**20:.1f} MiB, `ulimit -f`); raise the limit on file size, "
                           "then merge again. Nothing was written.")


def _refuse_disk_filled(out: Path, name: str, nbytes: int) -> None:
    """Before each write of ``merge --copy`` (up to 64 MiB): a disk that filled since :func:`_refuse_no_room` (another
    program writing there) stops the merge here, before HDF5 meets it; the caller removes ``RUN.h5.merging``."""
    folder = out.parent if str(out.parent) else Path(".")
    free = short_of_room(folder, nbytes, _SPARE_BYTES)
    if free is not None:
        raise QKHooksError(f"merging into {out} stopped before copying more of {name}: {folder} has "
                           f"{free / 2**20:.1f} MiB free, and the next write needs {(nbytes + _SPARE_BYTES) / 2**20:.1f} "
                           "MiB with HDF5's spare (the disk filled since the merge began: something else writes there); "
                           "free space there, or merge into a file on another disk, then merge again. Nothing was "
                           f"written ({out.name}.merging removed; the shards are unchanged).")


def _write_merged(f: h5py.File, out: Path, shards: list[_Shard], templates: Mapping[str, Reducer],
                  copy: bool) -> list[Reducer]:
    first = shards[0]
    bases = np.cumsum([0] + [s.n for s in shards]).tolist()
    total = int(bases[-1])
    for key, value in first.file.attrs.items():
        if key not in (fmt.FORMAT_ATTR, fmt.ATTR_DIGESTS):  # the merged file's format and digests are its own
            f.attrs[key] = value
    oldest = min(fmt.format_number(s.attrs) for s in shards)
    if oldest < fmt.FORMAT:  # its rows are the shards' (a copy's too): it says the oldest rules any was written under
        f.attrs[fmt.FORMAT_ATTR] = np.int64(oldest)  # (format 4's: zero rows, format.zero_chunk_may_be_true)
    config = dict(first.config, shard=None)
    config.pop(fmt.UNCHECKED_RESUMES, None)
    unchecked = [entry for s in shards for entry in s.config.get(fmt.UNCHECKED_RESUMES, [])]
    if unchecked:  # each shard's resumes by ids alone (each names its shard): a reader of the merge can tell
        config[fmt.UNCHECKED_RESUMES] = unchecked
    f.attrs["config"] = json.dumps(config, sort_keys=True)
    f.attrs["complete"] = all(s.complete and s.n == s.committed for s in shards)

    images = f.create_group("images")
    folder = out.parent.resolve()  # provenance, and a mark that this file is a merge (resume the shards, not it)
    images.attrs["shards"] = json.dumps([Path(os.path.relpath(s.path.resolve(), folder)).as_posix() for s in shards])
    ids = [i for s in shards for i in s.ids]
    images.create_dataset("ids", data=np.array(ids, dtype=object), maxshape=(None,), chunks=(1024,),
                          dtype=h5py.string_dtype())
    digested = [s.digest_rows for s in shards if s.digest_rows is not None]
    if len(digested) == len(shards):  # every shard's ids were checked against theirs: the merged ids' digests
        fmt.create_id_digests(f, fmt.id_digests(ids), digested[0])
    fmt.set_committed(f, total)
    if any("images/skipped" in s.file for s in shards):
        skipped = [row for s in shards for row in s.skipped]
        images.create_dataset("skipped", data=np.array(skipped, dtype=object).reshape(-1, 2), dtype=h5py.string_dtype())

    fmt.copy_statics(first.file, f)  # everything of rank 0's shard that is not per-image, ids or states

    names = sorted({n for s in shards for n in s.per_image})
    # a streamed run's file sizes serve only a resume too (round 40: its data is not reopened to draw photos, which
    # is what a folder's sizes are also for), so a rank recorded before round 40 stored none of the three
    data = fmt.as_str(first.file.attrs.get("data", ""))
    streamed = data.startswith(STREAMED_PREFIXES + OBJECT_PREFIXES)
    for resume_only in (fmt.FILE_MTIMES, fmt.FILE_HASHES) + ((fmt.FILE_SIZES,) if streamed else ()):
        if any(resume_only not in s.per_image for s in shards if s.n):
            # a shard written before round 39 (format 1: a rank resumed with an older file beside one recorded anew)
            # has no file times or hashes; they serve only a resume of the shards (a merged file is never resumed),
            # so the merged file goes without them rather than calling the shards "not one run"
            names = [name for name in names if name != resume_only]
    # Every object of the merged file before any image's data: the per-image arrays' headers and attributes, the
    # reducer states, then (a copy) the arrays' rows. Before, each array took its attributes after its rows, and the
    # states came last: a cut before them left a state whose header was lost, the walk that lists the per-image
    # arrays failed on it, and repair recovered no image (a 12-image merge: 18 of 226 cuts, 161 images).
    fills = [fill for fill in (_merge_per_image(f, out, name, shards, bases, copy) for name in names) if fill]

    summed = bool(first.per_image) and all(ds.fletcher32 for ds in first.per_image.values())  # a --checksum run
    result = []
    for name in sorted(first.states):
        merged = None
        for s, base in zip(shards, bases):
            state = s.states[name]
            if state is None:
                continue
            state = _renumber(_index_fields(name, templates), state, s, base)
            part = _reducer_for(name, state, templates)
            if merged is None:
                merged = part
            else:
                merged.merge(part)
        if merged is None:
            continue
        fmt.write_states_into(f, {name: merged.saved_state()}, total, checksum=summed)
        result.append(merged)
    for fill in fills:
        fill()
    f.flush()  # the rows held in HDF5's chunk cache get their place now, before the attribute digests' strings
    if all(s.sealed for s in shards):  # every shard's attributes matched theirs: the merged file's, as written
        # but a user's own attribute, copied unsealed from a shard, stays unsealed (the digests vouch for qkhooks's)
        fmt.seal_attrs(f, {name: None for s in shards for name in fmt.unsealed_attrs(s.file)})
    return result


def _renumber(fields: Sequence[str], state: dict[str, Any], shard: _Shard, base: int) -> dict[str, Any]:
    """Global image indices of a shard (its block start + local row) -> rows of the merged file."""
    if not fields:
        return state
    start = shard.start if shard.start is not None else base  # files without the block start: assume no gaps
    state = dict(state)
    for key in fields:
        if key in state:
            index = np.asarray(state[key])
            state[key] = np.where(index >= 0, index - int(start) + int(base), index).astype(index.dtype)
    return state


def _fill(dtype: np.dtype) -> Any:
    """Fill value of a virtual dataset where a source is missing: NaN or -1, never a plausible 0."""
    if np.issubdtype(dtype, np.floating):
        return np.nan
    if np.issubdtype(dtype, np.signedinteger):
        return -1
    return None


def _merge_per_image(f: h5py.File, out: Path, name: str, shards: list[_Shard], bases: list[int],
                     copy: bool) -> Callable[[], None] | None:
    """Make the merged file's array ``name`` with its attributes: a view of the shards, or (``copy``) an empty array
    and, returned, what copies the shards' rows into it (called once every other object of the file is written)."""
    parts = [(s, base) for s, base in zip(shards, bases) if s.n]
    missing = [s.path.name for s, _ in parts if name not in s.per_image]
    if missing:
        raise QKHooksError(f"{name} is missing from shard(s) {', '.join(missing)} that hold images; they are not one run.")
    have = [s.per_image[name] for s in shards if name in s.per_image]
    ref = next((s.per_image[name] for s, _ in parts), have[0])
    for ds in have:
        if ds.shape[1:] != ref.shape[1:] or ds.dtype != ref.dtype:
            raise QKHooksError(f"{name} has per-image shape/dtype {ds.shape[1:]}/{ds.dtype} in {ds.file.filename} "
                               f"but {ref.shape[1:]}/{ref.dtype} elsewhere.")
    total = int(bases[-1])
    if not total:
        return None
    rest = tuple(ref.shape[1:])
    fill: Callable[[], None] | None = None
    if copy:
        ds = f.create_dataset(name, shape=(total,) + rest, maxshape=(None,) + rest, dtype=ref.dtype, chunks=ref.chunks,
                              compression=ref.compression, compression_opts=ref.compression_opts,
                              fletcher32=ref.fletcher32)

        def copy_rows() -> None:
            row = max(1, int(np.prod(rest, dtype=np.int64)) * ref.dtype.itemsize)
            step = max(1, (64 << 20) // row)
            for s, base in parts:
                src = s.per_image[name]
                for lo in range(0, s.n, step):
                    hi = min(lo + step, s.n)
                    _refuse_disk_filled(out, name, (hi - lo) * row)
                    ds[base + lo:base + hi] = src[lo:hi]
        fill = copy_rows
    else:
        layout = h5py.VirtualLayout(shape=(total,) + rest, dtype=ref.dtype)
        folder = out.parent.resolve()
        for s, base in parts:
            src = s.per_image[name]
            rel = Path(os.path.relpath(s.path.resolve(), folder)).as_posix()
            layout[base:base + s.n] = h5py.VirtualSource(rel, name, shape=src.shape, dtype=src.dtype)[: s.n]
        ds = f.create_virtual_dataset(name, layout, fillvalue=_fill(ref.dtype))
    for k, v in ref.attrs.items():
        ds.attrs[k] = v
    if not copy:  # which run each shard held when merged: a shard rewritten since (a rerun) is refused on reading
        ds.attrs[fmt.SHARD_RUNS] = json.dumps({Path(os.path.relpath(s.path.resolve(), out.parent.resolve())).as_posix():
                                           fmt.run_id_of(s.file) for s, _ in parts})
    return fill


# ------------------------------------------------------------------------------------------ recording
_ROUND = [0]  # exchanges so far in this process: every rank makes the same sequence of them


def _timeout() -> datetime.timedelta:
    return datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, 24 * 3600)))


def _exchange(obj: Any, decide: Callable[[list[Any]], Any]) -> Any:
    """Send ``obj`` to rank 0, which calls ``decide`` on all ranks' objects (rank order); every rank returns its answer.

    The messages go through the process group's key-value store, not through collectives: a gloo worker thread
    that releases a Python-made tensor after the program's last collective may need the GIL while the
    interpreter shuts down, which aborts the process ("terminate called without an active exception").
    """
    from torch.distributed import distributed_c10d  # here: builds without torch.distributed lack it (is_available)

    store = distributed_c10d._get_default_store()
    rank, world = dist.get_rank(), dist.get_world_size()
    _ROUND[0] += 1
    key = f"qkhooks/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{_ROUND[0]}"
    store.set(f"{key}/rank{rank}", pickle.dumps(obj))
    if rank == 0:
        keys = [f"{key}/rank{r}" for r in range(world)]
        store.wait(keys, _timeout())
        answer = decide([pickle.loads(store.get(k)) for k in keys])
        store.set(f"{key}/answer", pickle.dumps(answer))
        return answer
    store.wait([f"{key}/answer"], _timeout())
    return pickle.loads(store.get(f"{key}/answer"))


def _problem(path: Path, resume: bool, overwrite: bool) -> str | None:
    if path.exists() and not (resume or overwrite):
        return f"{path} already exists; pass --resume (resume=True) to continue it or --overwrite (overwrite=True)."
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        return f"the folder {parent} does not exist; create it first."
    return None


def record_dataset_distributed(model: Any, data: Any, out: str | os.PathLike, *, resume: bool = False,
                               overwrite: bool = False, progress: bool | None = None, **kwargs: Any) -> RecordResult:
    """:func:`qkhooks.stream.record_dataset` on this rank's shard of the data, then one merged ``out`` (rank 0).

    Call it on every rank of an initialised ``torch.distributed`` process group (``torchrun`` plus
    ``torch.distributed.init_process_group``) with the same arguments; ``device`` should be this rank's.
    Every rank writes :func:`shard_path` ``(out, rank, world)``; rank 0 merges them with :func:`merge_shards`
    (virtual datasets over the shards, reducers merged) once all ranks are done, and every rank returns after
    the merge. With ``resume`` each shard continues from its own last checkpoint.

    Returns:
        On rank 0 a :class:`qkhooks.stream.RecordResult` of the merged run (path ``out``, all images, merged
        reducers); on the other ranks the result of their own shard.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise QKHooksError(
            "record_dataset_distributed needs an initialised torch.distributed process group (run under torchrun "
            "and call torch.distributed.init_process_group first), or record shards yourself with "
            "record_dataset(..., shard=(rank, world), out=shard_path(out, rank, world)) and merge_shards()."
        )
    rank, world = dist.get_rank(), dist.get_world_size()
    out = Path(out)
    mine = shard_path(out, rank, world)
    problems = _exchange(_problem(mine, resume, overwrite) or (_problem(out, resume, overwrite) if rank == 0 else None),
                         lambda all_: all_)
    found = [f"rank {r}: {p}" for r, p in enumerate(problems) if p]
    if found:
        raise QKHooksError("cannot start the distributed recording:\n  " + "\n  ".join(found))

    status: dict[str, Any] = {"rank": rank, "host": socket.gethostname(), "error": None}
    result = None
    try:
        result = record_dataset(model, data, mine, shard=(rank, world), resume=resume, overwrite=overwrite,
                                progress=(rank == 0) if progress is None else progress, **kwargs)
        status.update(images=result.images, path=str(mine))
    except Exception as exc:  # reported to every rank; the shard stays resumable
        status["error"] = f"{type(exc).__name__}: {exc}"
        own: Exception | None = exc
    else:
        own = None
    statuses = _exchange(status, lambda all_: all_)
    failed = [s for s in statuses if s["error"]]
    if failed:
        lines = "\n  ".join(f"rank {s['rank']} ({s['host']}): {s['error']}" for s in failed)
        message = (f"{len(failed)} of {world} ranks failed, so {out} was not written:\n  {lines}\nThe other shards "
                   "are intact; fix the cause and run the same command with --resume.")
        raise QKHooksError(message) from own

    merged, error = None, None
    if rank == 0:
        try:
            _check_visible(out, statuses, world)
            path, reducers, n, skipped = _merge(out, [shard_path(out, r, world) for r in range(world)],
                                                list(result.reducers), copy=False, overwrite=True)
            merged = RecordResult(path, reducers, n, skipped)
        except Exception as exc:
            error = exc
    outcome = _exchange(None if error is None else f"{type(error).__name__}: {error}", lambda all_: all_[0])  # all wait for it
    if error is not None:
        raise error
    if outcome:
        raise QKHooksError(f"rank 0 could not merge the shards into {out}: {outcome}")
    return merged if rank == 0 else result


def _check_visible(out: Path, statuses: Sequence[Mapping[str, Any]], world: int) -> None:
    """Rank 0 must see every rank's shard (a shared file system); else say how to merge by hand."""
    hidden = []
    for s in statuses:
        path = shard_path(out, s["rank"], world)
        try:
            with open_reader(path, deadline_s=0) as f:
                ok = fmt.committed(f) == int(s["images"]) and bool(f.attrs.get("complete", False))
        except (OSError, KeyError, QKHooksError):
            ok = False
        if not ok:
            hidden.append(f"{path.name} (rank {s['rank']} on {s['host']})")
    if hidden:
        raise QKHooksError(
            f"the shards {', '.join(hidden)} are not visible from rank 0 on {socket.gethostname()}; the nodes share no "
            f"file system at {out.parent}. Every shard is complete: copy them next to {out} and run "
            f"`qkhooks merge {out}`."
        )


def _rank_device(device: str, local_rank: int) -> str:
    """``cuda`` means this rank's GPU (``cuda:LOCAL_RANK``); anything else is used as given."""
    return f"cuda:{local_rank}" if str(device) == "cuda" else str(device)


@contextlib.contextmanager
def torchrun_process_group(device: str) -> Iterator[str]:
    """Under torchrun (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` set): yields this rank's device (``cuda`` becomes
    ``cuda:LOCAL_RANK``, made current) inside a process group, initialised here with :data:`BACKEND_ENV`'s backend
    unless one already is (then it is left as found), and destroyed on the way out."""
    device = _rank_device(device, int(os.environ.get("LOCAL_RANK", "0")))
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.set_device(torch.device(device))
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group(backend=os.environ.get(BACKEND_ENV, "gloo"), timeout=_timeout())
    try:
        yield device
    finally:
        if owned and dist.is_initialized():
            dist.destroy_process_group()
