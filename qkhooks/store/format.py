"""Where everything lives in a run file, and the rules the writer, the reader, resume and the shard merge share.

A run is ``RUN.h5`` (SWMR, per-image arrays, statics) plus, while and after it is written:

- ``RUN.h5.lock``: exists while a writer lives; it holds the writer's ``flock`` and its pid and host
  (:mod:`qkhooks.store.lock`);
- ``RUN.h5.reducers``: the last reducer checkpoint, all reducers at one image count, replaced atomically
  (``os.replace``), so it is always whole. Merged files keep their (final) states inside, under
  ``/reducers/<name>``; :func:`read_states` finds them in either place.

The resume rule (:func:`resume_point`): a checkpoint is written only after the images it counts are committed, so
a resume keeps the checkpoint's images and records the rest again (with no reducers, every committed image).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tokenize
import zipfile
from pathlib import Path
from typing import Any, Callable, Collection, Mapping, Sequence

import h5py
import numpy as np

from qkhooks.access import LayerGeometry
from qkhooks.errors import QKHooksError

__all__ = ["FORMAT", "FORMAT_ATTR", "refuse_newer_format", "format_number", "describe_format", "IDS", "ID_DIGESTS", "ID_DIGEST_BYTES", "id_digests", "mismatched_ids", "create_id_digests", "id_datasets", "SKIPPED", "FILE_SIZES", "FILE_MTIMES", "FILE_HASHES", "lock_path", "checkpoint_path", "remove_run", "committed", "set_committed", "CommittedCount",
           "datasets", "per_image_datasets", "layout_problems",
           "read_states", "states_and_problem", "id_problem", "LOST_STATICS", "lost_statics", "lost_spectrum",
           "write_checkpoint", "read_checkpoint", "checkpoint_problem",
           "write_states_into", "STATE_ATTRS", "resume_point", "config_differences", "INFO_SCHEMA_VERSION", "layer_geometry", "geometry_gap", "run_id_of",
           "identity_of", "rewritable", "as_str", "not_text", "NOT_TEXT", "read_ids", "read_skipped", "read_skipped_rows", "row_spans", "span_words", "skipped_loss_words", "readable_skipped_rows", "drop_stale_heap_references", "signed_zero_rows", "SIGNED_ZERO_ROWS_FORMAT", "zero_chunk_may_be_true", "MAY_BE_TRUE_ZEROS", "SIGNED_FROM_FORMAT_4", "view_sources", "view_source_at", "zeroed_chunks", "zeroed_chunk_words", "chunk_index_readable", "ARRAYS_ATTR", "IDENTITY",
           "SHARD_RUNS", "ATTR_DIGESTS", "UNSEALED_ATTRS", "attr_digests", "seal_attrs", "stored_attr_digests",
           "attr_digest_problems", "failing_attrs", "attr_damage_message", "attr_words", "attr_value_digest",
           "unsealed_attrs", "QKHOOKS_ATTR_NAMES", "digest_matches"]

FORMAT_ATTR = "qkhooks_format"
"""Root attribute: the run file's format number, an integer written when the file is created (the writer's layout, a
merge, a repair: :func:`qkhooks.store._hdf5.create_run_file`) and never changed after (a resume keeps the file's own
layout, and so its number). Files without it are of the formats before it (0)."""
FORMAT = 4
"""The format this qkhooks writes: 1 is the layout of round 24 (``/images/id_digests`` in checksummed runs), 2 that of
round 39 (:data:`FILE_MTIMES` and :data:`FILE_HASHES` in runs of data read from files: a resume by a qkhooks of format 1 would refuse its
first batch for lacking it, after cutting the file back to its checkpoint, where a newer format is refused before
anything is touched; and :data:`ATTR_DIGESTS` in checksummed runs, which a writer that does not know them would leave
stale, so that every reader refuses the file), 3 that of round 40 (:data:`FILE_SIZES`, :data:`FILE_MTIMES` and
:data:`FILE_HASHES` in every streamed run: a resume by a qkhooks of format 2 cut such a run back to its checkpoint,
then refused its first batch for lacking them, telling the user to start again with --overwrite), 4 that of round 51
(:data:`SIGNED_ZERO_ROWS_FORMAT`: a true all-zero mode projection row stored as -0.0, never as zero bytes, which a
writer of before round 50 still appended, and which every reader of a format-4 file refuses as a zeroed page). Raise it
when a writer of the format before would leave a file of the new one inconsistent (round 24's digests: an older
resume appends ids without them, which then read as damage). A writer (a resume, a merge, a repair) refuses a newer
format (:func:`refuse_newer_format`), as does ``verify_run``, whose verdict stands on the layout's rules. Readers read
any format: they find every part by name and ignore parts they do not know, so a change that an older reader would
misread (an existing dataset or attribute that comes to mean something else) takes a new name instead."""

IDS = "images/ids"
SHARD_RUNS = "shard_runs"
"""Attribute of a merged view's per-image dataset: JSON {shard file: its run_id when merged}, so a shard rewritten
since (a rerun with --overwrite) is refused, not read into the old view (round 33)."""
LOST_STATICS = "lost_statics"
"""Root attribute of a file written by ``qkhooks repair``: JSON list of the statics (spectra, position terms, ...)
that did not read in the damaged file, so are not in the copy. ``info --verify``, ``run.spectrum`` and ``analyze
modes`` name them; a resume is refused."""

ID_DIGESTS = "images/id_digests"
"""Runs recorded with ``--checksum`` (``checksum=True``): (n, :data:`ID_DIGEST_BYTES`) uint8, row i the BLAKE2b digest
of image i's id (its UTF-8 bytes, as :data:`IDS` stores them), with HDF5's Fletcher-32 checksum. HDF5 keeps the ids
(variable-length strings) in its global heap, which has no checksum; every reader of the ids checks them against
these (:func:`read_ids`), so a flipped bit in an id is refused like one in a per-image array. Written with the ids in
each batch, committed by the same count, one image a chunk (as the checksummed arrays: a chunk is written once).
Absent without ``--checksum`` and in runs written before it (their ids are not covered)."""
ID_DIGEST_BYTES = 16
SKIPPED = "images/skipped"
UNCHECKED_RESUMES = "resumes_ids_only"
"""A key of a run's ``config``, there only where a resume checked the images it kept by their ids alone
(``record_dataset(..., resume_ids_only=True)``: data that gives another image on each read, a random transform in a
Dataset's ``__getitem__``): one ``{"kept": images kept, "shard": [rank, world] or None}`` per such resume, so a
reader can tell which images were not checked to be those recorded: of the kept images, those read from files (a
file size >= 0 in :data:`FILE_SIZES`) were checked by their stamps even so (round 49), and a resume whose kept images
were all such files is not listed. A resume carries it on; a merge joins the shards' lists."""
FILE_SIZES = "images/file_sizes"
"""Per-image int64 array: the size in bytes of each image's file when it was recorded, -1 where the image is not read
from a file (runs of data read from files, and since round 40 every streamed run: a ``wds:`` image's is its tar
member's; a reopened dataset is checked against it before photos are drawn: :mod:`qkhooks.data_files`). Older runs
keep the sizes in a root attribute instead (``data_file_sizes``), the oldest none. The three file arrays are taken
where each image is read and decoded (:func:`qkhooks.data.items.stamps_read`)."""
FILE_MTIMES = "images/file_mtimes"
"""Per-image int64 array (format 2, round 39): each image file's modification time in nanoseconds (``st_mtime_ns``)
when it was recorded, -1 where the image is not read from a file; beside :data:`FILE_SIZES`, in runs of data read
from files. A resume compares both of every image it keeps (one ``stat`` each); a file whose time changed has its
bytes compared through :data:`FILE_HASHES`, so a file replaced by another of the same size (another photo of the same
pixel size, stored uncompressed) is refused, not mixed into the run, while a data set copied again (files with new
times, the same bytes) resumes. Absent in runs written before it, whose resume checks the sizes only (and says so)."""
FILE_HASHES = "images/file_hashes"
"""Per-image int64 array (format 2, round 39): the first 8 bytes of each image file's BLAKE2b digest when it was
recorded, of the very bytes decoded (read as a little-endian signed integer, -1 kept for "not read from a file": a
digest reading -1 is stored as -2; a ``wds:`` image's: its tar member's bytes; since round 46, an image a map-style
Hugging Face dataset holds as bytes: those bytes', and a list's or tuple's in-memory image (bytes, array, PIL image):
its content's, with -1 in :data:`FILE_SIZES` and :data:`FILE_MTIMES`, no file). A
resume hashes only the kept files whose modification time changed (:data:`FILE_MTIMES`), and every kept image held as
bytes (a recorded hash beside a -1 time): the same bytes continue, other bytes are refused. A qkhooks from before
round 46 reads such a row as "no file" and does not check it (as it did)."""
REDUCERS = "reducers"
STATE_ATTRS = ("current", "scalars")
"""The attributes of reducer states kept inside a file (a merge, older runs): ``/reducers/<name>.current`` names the
slot, ``/reducers/<name>/<slot>.scalars`` holds its JSON (:func:`write_states_into`)."""
IDENTITY = "identity"
"""Root attribute: JSON of ``run_id`` (ties ``RUN.h5.reducers`` to this file), and of ``compute_dtype`` and
``weights_sha256`` (the model's; a resume compares them) when the run was recorded by ``record_dataset``."""
ARRAYS_ATTR = "arrays"
"""``/images`` attribute: JSON list of the per-image arrays' names, written with the layout (a resume checks that
every one is still there with at least ``committed`` rows)."""
INFO_SCHEMA_VERSION = 2
"""Version of ``model/info``: 2 adds ``layer_geometry`` (each layer's grid, prefix, query/key tokens, stage, windows)
and ``schema_version``; a file without it is version 1 (one grid and prefix for every layer)."""

ATTR_DIGESTS = "attr_digests"
"""Root attribute of runs recorded with ``--checksum`` (``checksum=True``; round 39, format 2): JSON {attribute:
sha256 hex of its value} for every attribute of every object in the file but :data:`UNSEALED_ATTRS`, each named
``/GROUP@NAME`` (``/@config``, ``/model@info``). HDF5 checksums the object headers, but string attributes live in its
global heap, which has none, and an edit with h5py passes any checksum: a changed config, ``model/info`` (layer
geometry) or ``identity`` would have numbers read under the wrong layer or dtype without a word. Written with the
layout (the writer's :meth:`_publish`), by a merge and a repair, and updated where the writer changes an attribute
after that (a resume's statics); every reader checks it on opening (:func:`attr_digest_problems`). Absent in runs
without ``--checksum`` and in runs written before it (their attributes are not covered). Round 40: an attribute it
does not list is a user's own (:func:`unsealed_attrs`), accepted unless qkhooks reads an attribute of its name
(:data:`QKHOOKS_ATTR_NAMES`); an entry ``OLD|NEW`` accepts either digest (:func:`digest_matches`: a resume rewriting
that attribute, left so where it was killed between the two writes)."""
UNSEALED_ATTRS = frozenset({"complete", "committed", ATTR_DIGESTS, FORMAT_ATTR})
"""Attributes left out of :data:`ATTR_DIGESTS`: those a writer changes every batch or at its end, the digests, and
:data:`FORMAT_ATTR` (an integer in the root's header, which HDF5 checksums; every writer checks it first, and a copy
writes its own)."""

QKHOOKS_ATTR_NAMES = frozenset({
    "qkhooks_version", "model", "data", "config", "model_note", "complete", "committed", "image_config", IDENTITY,
    ATTR_DIGESTS, FORMAT_ATTR, ARRAYS_ATTR, "info", "per_image", "shard", "shards", SHARD_RUNS, LOST_STATICS,
    "data_file_sizes", "scalars", "current"})
"""Every attribute name qkhooks writes or reads, on any object. An attribute the digests do not list (one a user
added with h5py: ``f.attrs["note"] = "pilot"``) is accepted, and ``info --verify`` lists it as not sealed; one of
these names is refused even so, since qkhooks would read it (a ``per_image`` added to a spectrum, a ``shard`` added
to ``/images``) without any digest vouching for it."""

_IMAGES_KEY = "_images"  # the image count a checkpoint belongs to (also inside each state, for old readers)


def refuse_newer_format(attrs: Mapping[str, Any], path: str | os.PathLike, doing: str) -> None:
    """Raise QKHooksError when the root attributes ``attrs`` (of the run file at ``path``) say a format newer than
    :data:`FORMAT`, or one qkhooks never writes: ``doing`` it (``resume``, ``repair`` ...) with this qkhooks could leave
    the file inconsistent or misjudge it. Files without :data:`FORMAT_ATTR` (older formats) pass."""
    number = attrs.get(FORMAT_ATTR)
    if number is None:
        return
    if not _is_format_number(number):
        raise QKHooksError(f"cannot {doing} {path}: its root attribute {FORMAT_ATTR} is {number!r}, not a run-file "
                           "format number qkhooks writes (another tool wrote or changed the file).")
    if number > FORMAT:
        raise QKHooksError(f"cannot {doing} {path}: it is a run file of format {int(number)} (root attribute "
                           f"{FORMAT_ATTR}), newer than format {FORMAT}, the newest this qkhooks knows; reading it "
                           f"works, but to {doing} it takes the rules of its format. Upgrade qkhooks to a version that "
                           f"writes format {int(number)} or later (pip install -U qkhooks) and {doing} it with that.")


def _is_format_number(value: Any) -> bool:
    """Whether a :data:`FORMAT_ATTR` value is one qkhooks writes: a non-negative integer (not a bool)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)) and value >= 0


def format_number(attrs: Mapping[str, Any]) -> int:
    """The format of a file with root attributes ``attrs``: 0 without a number (or with one qkhooks never writes)."""
    number = attrs.get(FORMAT_ATTR)
    return int(number) if _is_format_number(number) else 0


def describe_format(attrs: Mapping[str, Any]) -> str:
    """What ``qkhooks info`` (``RunReader.summary``) says of the format of a run file with root attributes ``attrs``:
    its number; 0 for a file written before the numbers; for a newer one, that reading works and that the rest takes
    an upgrade (:func:`refuse_newer_format` refuses it then)."""
    number = attrs.get(FORMAT_ATTR)
    if number is None:
        return f"0 (written before format numbers: no root attribute {FORMAT_ATTR})"
    if not _is_format_number(number):
        return (f"unknown: root attribute {FORMAT_ATTR} is {number!r}, not a run-file format number qkhooks writes "
                "(another tool wrote or changed the file)")
    if number > FORMAT:
        return (f"{int(number)}, newer than format {FORMAT}, the newest this qkhooks knows: reading it works; to "
                "resume, merge, repair or verify it, upgrade qkhooks (pip install -U qkhooks)")
    return str(int(number))


def lock_path(run: str | os.PathLike) -> Path:
    run = Path(run)
    return run.with_name(run.name + ".lock")


def lost_statics(attrs: Mapping[str, Any]) -> list[str]:
    """The statics a repair could not copy (:data:`LOST_STATICS`), from a file's root attributes; empty for others."""
    try:
        return [str(name) for name in json.loads(as_str(attrs.get(LOST_STATICS)) or "[]")]
    except (TypeError, ValueError):
        return ["(the list itself does not parse)"]


def lost_spectrum(attrs: Mapping[str, Any], layer: int) -> list[str]:
    """The lost statics (:func:`lost_statics`) that may be ``layer``'s spectrum: its own arrays, and any note of a part
    of the tree that did not read (which may have held them)."""
    return [name for name in lost_statics(attrs) if name.startswith(f"spectrum/L{layer}/") or name.startswith("(")]


def id_problem(image_id: str) -> str | None:
    """Why ``image_id`` cannot be stored in a run file, which keeps ids as UTF-8 text, or None. A file name in
    another encoding reaches Python with its bytes escaped (``b'zz\\xff.png'`` as ``'zz\\udcff.png'``), which no
    UTF-8 writer takes."""
    try:
        str(image_id).encode("utf-8")
        return None
    except UnicodeEncodeError:
        try:
            raw = f" (its bytes: {os.fsencode(image_id)!r})"
        except UnicodeError:
            raw = ""
        return (f"the id {image_id!r}{raw} is not UTF-8 text, and a run file keeps ids as UTF-8: rename that file "
                "to a UTF-8 name (e.g. `convmv -f latin1 -t utf8 --notest NAME`) or move it out of the data")


def checkpoint_path(run: str | os.PathLike) -> Path:
    """``RUN.h5.reducers`` beside the run's real file: through a symlink, the target's (a resume or a read through
    the link would otherwise keep a second checkpoint beside the link, and leave the target's stale)."""
    run = Path(os.path.realpath(run))
    return run.with_name(run.name + ".reducers")


def remove_run(run: str | os.PathLike) -> None:
    """Delete a run file together with its reducer checkpoint (a sidecar left alone would be an orphan)."""
    for path in (Path(run), checkpoint_path(run)):
        path.unlink(missing_ok=True)


def committed(f: h5py.File) -> int | None:
    """The committed image count of an open run file, or None when ``f`` is not a qkhooks run.

    Read from ``/images/ids``'s copy of the count: an SWMR reader that stays open sees a dataset's
    attributes change after ``Dataset.refresh()``, while a group's attributes stay as first read.
    """
    # ``in`` (not ``get``, which answers None for any error): a damaged file raises here, it is not "not a run"
    if IDS not in f:
        return None
    ds = f[IDS]
    if not isinstance(ds, h5py.Dataset):
        return None
    for holder in (ds, f["images"]):
        if "committed" in holder.attrs:
            return int(holder.attrs["committed"])
    return None


def set_committed(f: h5py.File, n: int) -> None:
    """Record ``n`` committed images: on ``/images`` (the documented place) and on ``/images/ids``.

    Rewritten in place (``modify``), so the object headers never grow or move while a run is written.
    """
    for holder in (f["images"], f[IDS]):
        holder.attrs.modify("committed", np.int64(n))


class CommittedCount:
    """The ``committed`` attributes :func:`set_committed` writes, opened once for a writer that sets them every batch.

    The same bytes as ``set_committed``, without its two path lookups and h5py's ``modify`` checks: 0.015 ms a call
    against 0.12-0.19 ms (benchmarks/ANALYSIS.md, round 23). The attributes must exist (``set_committed`` made them
    with the layout or the resume's cut)."""

    __slots__ = ("_attrs",)

    def __init__(self, f: h5py.File):
        self._attrs = [h5py.h5a.open(holder.id, b"committed") for holder in (f["images"], f[IDS])]

    def set(self, n: int) -> None:
        for attr in self._attrs:
            attr.write(np.asarray(n, dtype=np.int64))  # HDF5 converts it to the attribute's own dtype


def datasets(f: h5py.File, read_every_attribute: bool = False,
             unreadable: list[str] | None = None, skip: Collection[str] = ()) -> dict[str, h5py.Dataset]:
    """Every dataset of a run file, by schema name. With ``read_every_attribute`` every object's attributes are read
    on the way (any damage raises), in the same walk. With ``unreadable`` a list, an object that does not open or
    whose attributes do not read is named there (with why) and the walk goes on (``verify_run`` collects them all).
    The root's groups named in ``skip`` are not walked."""
    found: dict[str, h5py.Dataset] = {}

    def attempt(name: str, read: Any) -> Any:
        try:
            return read()
        except (OSError, KeyError, RuntimeError, ValueError, TypeError) as exc:
            if unreadable is None:
                raise
            unreadable.append(f"/{name} unreadable ({exc})")
            return None

    _walk(f, "", found, read_every_attribute, attempt, frozenset(skip))
    return found


def _walk(group: h5py.Group, prefix: str, found: dict[str, h5py.Dataset], read_every_attribute: bool,
          attempt: Callable[[str, Any], Any], skip: frozenset[str] = frozenset()) -> None:
    """A walk by names, not ``visititems``: HDF5's visit also reads every dataset's chunk index (for its storage
    size), so one damaged index would hide every array, where a walk opens object headers only. A function of the
    module, not a closure calling itself: that is a reference cycle, which kept every handle it opened open until the
    garbage collector ran (an SWMR reader must not refresh a dataset another handle holds: RunReader._refresh).
    ``attempt(name, read)`` reads or, collecting what does not read, returns None."""
    if read_every_attribute:
        attempt(prefix, lambda: dict(group.attrs.items()))
    for key in attempt(prefix, lambda: list(group)) or ():
        if prefix + key in skip:
            continue
        obj = attempt(prefix + key, lambda: group[key])
        if isinstance(obj, h5py.Group):
            _walk(obj, f"{prefix}{key}/", found, read_every_attribute, attempt)
        elif isinstance(obj, h5py.Dataset):
            if not read_every_attribute or attempt(prefix + key, lambda: dict(obj.attrs.items())) is not None:
                found[f"{prefix}{key}"] = obj


def per_image_datasets(f: h5py.File, read_every_attribute: bool = False,
                       skip: Collection[str] = ()) -> dict[str, h5py.Dataset]:
    """The per-image arrays of a run file (datasets marked ``per_image``), by schema name (see :func:`datasets`)."""
    return {name: ds for name, ds in datasets(f, read_every_attribute, skip=skip).items()
            if ds.attrs.get("per_image", False)}


def layout_problems(f: h5py.File, arrays: Mapping[str, h5py.Dataset], n: int) -> list[str]:
    """What the layout lacks for ``n`` committed images: the ids (or their digests) or a per-image array (of
    ``arrays``) with fewer rows (h5py edits, a cut), an array the layout lists (:data:`ARRAYS_ATTR`) missing. A resume
    refuses such a file; ``verify_run`` reports it."""
    problems = [f"{ds.name[1:]} has {ds.shape[0]} rows" for ds in id_datasets(f) if ds.shape[0] < n]
    problems += [f"{name} has {ds.shape[0]} rows" for name, ds in sorted(arrays.items()) if ds.shape[0] < n]
    listed = f["images"].attrs.get(ARRAYS_ATTR)
    if listed is not None:
        problems += [f"{name} is missing" for name in sorted(set(json.loads(as_str(listed))) - set(arrays))]
    return problems


# ------------------------------------------------------------------------------------------ reducer states
def _split(state: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    arrays, scalars = {}, {}
    for key, value in state.items():
        if hasattr(value, "detach"):
            value = value.detach().cpu().numpy()
        if isinstance(value, np.ndarray):
            arrays[key] = value
        else:
            scalars[key] = value.item() if isinstance(value, np.generic) else value
    return arrays, scalars


def write_checkpoint(run: str | os.PathLike, images: int, states: Mapping[str, Mapping[str, Any]],
                     run_id: str | None = None) -> None:
    """Replace ``RUN.h5.reducers`` with ``states`` (reducer name -> state) at ``images`` images, atomically.

    A plain numpy archive written beside and renamed over the old one: a kill or a full disk at any moment
    leaves the previous checkpoint whole (and an error here touches no HDF5 state). ``run_id`` (the run file's
    ``run_id``) ties the checkpoint to its run: :func:`read_checkpoint` ignores it beside another run.
    """
    path = checkpoint_path(run)
    tmp = path.with_name(path.name + ".tmp")
    members: dict[str, np.ndarray] = {}
    meta: dict[str, Any] = {"images": int(images), "scalars": {}}
    if run_id is not None:
        meta["run_id"] = str(run_id)
    for name, state in states.items():
        arrays, scalars = _split(state)
        meta["scalars"][name] = scalars
        for key, value in arrays.items():
            members[f"{name}/{key}"] = value
    members["__meta__"] = np.array(json.dumps(meta))
    try:
        with open(tmp, "wb") as fh:
            np.savez(fh, **members)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# a damaged .npy header inside the archive is parsed before its member's CRC is checked: numpy's tokenizer and
# literal parser raise TokenError and SyntaxError (neither a ValueError) for a flipped byte there
_UNREADABLE = (OSError, EOFError, ValueError, KeyError, TypeError, zipfile.BadZipFile, SyntaxError,
               tokenize.TokenError)


def _load_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(meta, states) of a checkpoint file; raises one of :data:`_UNREADABLE` where it cannot be read (every
    member's CRC is checked as it is read)."""
    with np.load(path, allow_pickle=False) as archive:
        meta = json.loads(str(archive["__meta__"]))
        states = {name: dict(scalars) for name, scalars in meta["scalars"].items()}
        for member in archive.files:
            if member != "__meta__":
                name, _, key = member.rpartition("/")
                states[name][key] = archive[member]
    int(meta["images"])
    return meta, states


def _checkpoint(run: str | os.PathLike, run_id: Any) -> tuple[tuple[int, dict[str, dict[str, Any]]] | None, str | None]:
    """((images, states) or None, what is wrong with it or None) of ``RUN.h5.reducers``, loaded once (see
    :func:`read_checkpoint` and :func:`checkpoint_problem`, which each want one half)."""
    path = checkpoint_path(run)
    beside_link = Path(run).with_name(Path(run).name + ".reducers")
    if not path.exists() and beside_link != path and beside_link.exists():  # a run resumed through a link before
        path = beside_link  # round 36 kept its checkpoint beside the link
    if not path.exists():
        return None, None
    try:
        meta, states = _load_checkpoint(path)
    except _UNREADABLE as exc:
        return None, f"{type(exc).__name__}: {exc}"
    if "run_id" in meta and meta["run_id"] != as_str(run_id):
        return None, None  # another run's (an --overwrite killed between its two renames): never mixed into this one
    return (int(meta["images"]), states), None


def read_checkpoint(run: str | os.PathLike, run_id: Any = None) -> tuple[int, dict[str, dict[str, Any]]] | None:
    """(images, states) of ``RUN.h5.reducers``, or None when there is none (or it cannot be read:
    :func:`checkpoint_problem` says why), or when it belongs to another run: it names a ``run_id`` other than
    ``run_id`` (the run file's; None for files written before run ids, which have none). A checkpoint without an
    id (older versions, ``qkhooks repair``) is taken."""
    return _checkpoint(run, run_id)[0]


def checkpoint_problem(run: str | os.PathLike) -> str | None:
    """What is wrong with ``RUN.h5.reducers`` when it exists but cannot be read (None: absent or readable)."""
    return _checkpoint(run, None)[1]


def identity_of(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """The :data:`IDENTITY` JSON of root attributes (a file's ``attrs``, or the ones a run is given); empty where
    absent or not a JSON object (files written before it)."""
    value = attrs.get(IDENTITY)
    try:
        identity = json.loads(as_str(value)) if value is not None else {}
    except (TypeError, ValueError):
        return {}
    return identity if isinstance(identity, dict) else {}


def run_id_of(f: h5py.File) -> str | None:
    """The run file's ``run_id`` (in its ``identity`` attribute; None for files written before run ids)."""
    return as_str(identity_of(f.attrs).get("run_id"))


def rewritable(value: Any) -> Any:
    """An attribute's value as h5py read it, in a form that writes back the bytes stored: a string whose bytes are not
    UTF-8 (damage on the disk) is read with surrogate escapes, which h5py cannot write as a str, so it goes back as
    those bytes in the same variable-length string type. A copy (repair, merge) then carries the damage as it is,
    for the checks that name it, instead of failing or losing the attribute."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return np.array(value.encode("utf-8", "surrogateescape"), dtype=h5py.string_dtype())
    return value


def as_str(value: Any, errors: str = "strict") -> str | None:
    """A string attribute's value as ``str`` (h5py gives some as bytes); None stays None."""
    if value is None:
        return None
    return value.decode(errors=errors) if isinstance(value, bytes) else str(value)


def read_ids(f: h5py.File, n: int) -> list[str]:
    """The first ``n`` image ids of a run file (an id that is not UTF-8 raises DamagedRunError naming it). In a run
    with :data:`ID_DIGESTS` each id is checked against its digest first: a mismatch, or fewer digests than ids, raises
    :class:`~qkhooks.store._hdf5.DamagedRunError` naming the image (a digest chunk failing its own checksum raises
    HDF5's OSError). An id in a heap collection HDF5 cannot read (cut short, a zeroed page inside, a damaged header:
    :func:`~qkhooks.store._hdf5.unreadable_strings`) is never asked of it: an OSError naming the first."""
    from qkhooks.store._hdf5 import unreadable_strings  # it imports this module

    ds = f[IDS]
    # a writer's own handle (RunWriter.ids) may hold heap blocks not yet on disk: read off the disk by readers only
    why: dict[int, str] = {}
    lost = unreadable_strings(ds, n, f.filename, os.path.getsize(f.filename), why=why) if f.mode == "r" else set()
    if lost:
        raise OSError(f"image {min(lost)}'s id" + (f" and {len(lost) - 1} more lie" if len(lost) > 1 else " lies") +
                      f" in {why[min(lost)]}")
    raw = ds[:n]
    if ID_DIGESTS in f:  # ``in``, not ``get`` (None for any error): damaged digests raise, never skip the check
        stored = f[ID_DIGESTS][:n]
        bad = mismatched_ids(raw, stored)
        if len(stored) < len(raw) or len(bad):
            from qkhooks.store._hdf5 import DamagedRunError  # it imports this module

            what = (f"/{ID_DIGESTS} has {len(stored)} rows, fewer than the {len(raw)} image ids" if not len(bad) else
                    f"image {bad[0]}'s id, read as {as_str(raw[bad[0]], 'replace')!r}, does not match its digest in "
                    f"/{ID_DIGESTS}" + (f", nor do those of {len(bad) - 1} more" if len(bad) > 1 else "")
                    + ": it changed on disk, so that image is lost (repair leaves it out; recording the run again "
                    "restores it)")
            raise DamagedRunError(Path(f.filename), what)
    bad = not_text(raw)
    if bad:  # one id's changed byte, said as damage naming it, never a raw UnicodeDecodeError
        from qkhooks.store._hdf5 import DamagedRunError

        raise DamagedRunError(Path(f.filename), f"image {bad[0]}'s id is {NOT_TEXT}" + (
            f", and {len(bad) - 1} more" if len(bad) > 1 else "") + ", so that image is lost (repair leaves it out; "
            "recording the run again restores it)")
    return [as_str(s) for s in raw]


def id_digests(ids: Sequence[str | bytes]) -> np.ndarray:
    """(len(ids), :data:`ID_DIGEST_BYTES`) uint8: each id's BLAKE2b digest, of its UTF-8 bytes (:data:`ID_DIGESTS`)."""
    out = np.zeros((len(ids), ID_DIGEST_BYTES), dtype=np.uint8)
    for row, id_ in zip(out, ids):
        row[:] = np.frombuffer(hashlib.blake2b(id_.encode() if isinstance(id_, str) else bytes(id_),
                                               digest_size=ID_DIGEST_BYTES).digest(), dtype=np.uint8)
    return out


def not_text(raw: Sequence[str | bytes]) -> list[int]:
    """The indices of the strings read from a variable-length string dataset (the ids, as h5py gives them: bytes or
    str) that are not UTF-8: bytes changed on disk, in the heap, which carries no checksum."""
    bad = []
    for i, value in enumerate(raw):
        try:
            as_str(value)
        except UnicodeDecodeError:
            bad.append(i)
    return bad


NOT_TEXT = "not UTF-8 text (changed on disk)"
"""Why an id that :func:`not_text` finds is lost, in words."""


def mismatched_ids(raw: Sequence[str | bytes], stored: np.ndarray) -> np.ndarray:
    """The indices ``i`` (of the rows both have) where ``raw[i]``, an id as read from :data:`IDS`, does not match its
    digest ``stored[i]``."""
    rows = min(len(raw), len(stored))
    return np.flatnonzero((id_digests(raw[:rows]) != stored[:rows]).any(axis=1))


def create_id_digests(f: h5py.File, digests: np.ndarray, chunk_rows: int) -> h5py.Dataset:
    """:data:`ID_DIGESTS` holding ``digests``, growable, ``chunk_rows`` images a chunk, with Fletcher-32 (the writer,
    repair and the shard merge lay it out alike)."""
    return f.create_dataset(ID_DIGESTS, data=digests, maxshape=(None, ID_DIGEST_BYTES),
                            chunks=(chunk_rows, ID_DIGEST_BYTES), fletcher32=True)


def id_datasets(f: h5py.File) -> list[h5py.Dataset]:
    """The ids and, where the run stores them, their digests: the image lists a cut resizes with the arrays."""
    return [f[IDS]] + ([f[ID_DIGESTS]] if ID_DIGESTS in f else [])


def _skipped_dataset(f: h5py.File) -> h5py.Dataset | None:
    """``/images/skipped`` (None for files written before it), refused (ValueError) where it is not the (n, 2) strings
    every writer lays out: a damaged or hand-made list would otherwise read as other rows (a 1-D list as pairs of
    character codes) without a word."""
    if SKIPPED not in f:
        return None
    ds = f[SKIPPED]
    if not isinstance(ds, h5py.Dataset) or ds.ndim != 2 or ds.shape[1] != 2 or \
            h5py.check_string_dtype(ds.dtype) is None:
        what = "a group" if not isinstance(ds, h5py.Dataset) else f"a {ds.shape} dataset of {ds.dtype}"
        raise ValueError(f"its list of skipped images /{SKIPPED} is {what}, not the (n, 2) strings (image id, reason) "
                         "qkhooks writes")
    return ds


def read_skipped(f: h5py.File) -> list[tuple[str, ...]]:
    """The (id, reason) rows of ``/images/skipped`` (empty for files written before it); ValueError where the list is
    not laid out as qkhooks writes it."""
    ds = _skipped_dataset(f)
    if ds is None:
        return []
    return [tuple(as_str(x) for x in row) for row in ds[()]]


def read_skipped_rows(f: h5py.File, unasked: Collection[int] = ()) -> tuple[list[tuple[str, ...]], list[int], int]:
    """Every row of ``/images/skipped`` that reads, the indices of those that do not, and how many rows the list has:
    one row whose string is lost (damage in the middle of the list) costs that row, not every row after it.
    ``unasked``: rows not read, counted lost (``repair``: their strings lie past a cut file's end, where HDF5 would
    spin). ValueError where the list is not laid out as qkhooks writes it."""
    ds = _skipped_dataset(f)
    if ds is None:
        return [], [], 0
    total = ds.shape[0]
    skip = {row for row in unasked if 0 <= row < total}
    if not skip:
        try:
            return read_skipped(f), [], total
        except (OSError, UnicodeDecodeError):
            pass
    rows: list[tuple[str, ...]] = []
    lost: list[int] = []
    for row in range(total):
        if row in skip:
            lost.append(row)
            continue
        try:
            rows.append(tuple(as_str(x) for x in ds[row]))
        except (OSError, UnicodeDecodeError):
            lost.append(row)
    return rows, lost, total


def row_spans(rows: Sequence[int]) -> list[tuple[int, int]]:
    """Sorted rows as [start, stop) spans of consecutive rows (how readers and repair name the rows lost)."""
    spans: list[tuple[int, int]] = []
    for row in rows:
        if spans and spans[-1][1] == row:
            spans[-1] = (spans[-1][0], row + 1)
        else:
            spans.append((row, row + 1))
    return spans


def span_words(spans: Sequence[tuple[int, int]], noun: str = "row", limit: int | None = None) -> str:
    """[start, stop) spans of rows (:func:`row_spans`) as a message says them: "row 5" (one row), "rows 5-7",
    "rows 3, 5-7"; a one-row span is its row, never "5-5" (review r46). With ``limit``, the first ``limit`` spans and
    " ..." where there are more."""
    parts = [str(lo) if hi == lo + 1 else f"{lo}-{hi - 1}" for lo, hi in spans]
    many = len(parts) > 1 or any(hi - lo > 1 for lo, hi in spans)
    shown = parts if limit is None else parts[:limit]
    more = " ..." if limit is not None and len(parts) > limit else ""
    return f"{noun}{'s' if many else ''} {', '.join(shown)}{more}"


def skipped_loss_words(lost: Sequence[int], total: int) -> str:
    """How the rows ``lost`` of a skipped list of ``total`` rows are said: "reads up to row R of N" where they are the
    last ones (what a killed writer leaves), else the lost rows by index (damage), so no reader names fewer."""
    if list(lost) == list(range(total - len(lost), total)):
        return f"reads up to row {total - len(lost)} of {total}"
    return f"does not read at {span_words(row_spans(lost))} of {total} (the others read)"


def readable_skipped_rows(ds: h5py.Dataset, stop: int | None = None) -> int:
    """How many rows of ``/images/skipped`` (``ds``) read, from the first (all of them but in a damaged file), of
    its first ``stop`` (all: None): a writer killed while HDF5 flushed the rows it added at a checkpoint can leave
    them on disk without their strings."""
    for row in range(ds.shape[0] if stop is None else min(stop, ds.shape[0])):
        try:
            [as_str(x) for x in ds[row]]
        except (OSError, UnicodeDecodeError):
            return row
    return ds.shape[0] if stop is None else min(stop, ds.shape[0])


STALE_CHUNKS_WITHOUT_WALK = 64
"""Chunks past a resume's last row that :func:`drop_stale_heap_references` clears where HDF5 cannot list the chunks
(h5py or HDF5 without ``H5Dchunk_iter``): 65,536 ids, more than two batches of any size in use."""


def drop_stale_heap_references(ds: h5py.Dataset, n: int) -> None:
    """Keep the first ``n`` rows of the variable-length dataset ``ds`` (the ids, the skipped list), and leave no
    element past them on disk.

    A writer killed while HDF5 flushes can leave the chunk holding its uncommitted ids on disk without the heap
    objects they point to. HDF5 frees the heap object of every variable-length element it
    overwrites, so the resume's next write of those rows would fail ("bad heap index"), crash the process, or free an
    object a committed id uses, after which that id no longer reads. Growing ``ds`` over every chunk it holds and
    shrinking it back makes HDF5 drop the chunks past row ``n`` and fill the rest of the last one with the fill value,
    freeing nothing."""
    rows = ds.chunks[0]  # growable, so chunked
    if hasattr(ds.id, "chunk_iter"):
        offsets: list[int] = []
        ds.id.chunk_iter(lambda chunk: offsets.append(chunk.chunk_offset[0]))
        if not offsets:
            return  # never written: nothing on disk
        end = max(offsets) + rows
    else:  # h5py or HDF5 without chunk_iter: as far as a killed writer's last batches can reach
        end = (n // rows + STALE_CHUNKS_WITHOUT_WALK) * rows
    ds.resize(max(end, n), axis=0)
    ds.resize(n, axis=0)


NEVER_ZERO = re.compile(r"/?(modes/L\d+/(query|key)|attention/L\d+/(rows|pooled|full)|terms/L\d+/\w+|"
                        r"images/file_(sizes|hashes))$")
"""The per-image arrays whose rows are never stored as zero bytes alone: attention maps and two-softmax terms (softmax
rows sum to 1), mode projections (zero only where the layer's q/k input is, then stored as -0.0,
:func:`signed_zero_rows`), and an image's file size (-1 for an image not from a file; an empty file does not decode)
and hash (8 bytes of BLAKE2b, or -1: 0 once in 2**64). An image's file time is zero bytes only where it is a file's
(:func:`_zero_is_damage`), a relative term's only since format 4 (:data:`SIGNED_FROM_FORMAT_4`). Not query tokens
(token 0 is the CLS row, asked by default), masks or object labels (an image without the object): 0 is a recorded
value there, with no -0 to tell it by."""


SIGNED_ZERO_ROWS_FORMAT = 4
"""The first format whose every writer stores a true all-zero row of a :data:`NEVER_ZERO` array as -0.0
(:func:`signed_zero_rows`; round 50's writer did so still at format 3). In a file of an older format a chunk of mode
projections of zero bytes may be a true zero row, which nothing in the file tells from a zeroed page
(:func:`zero_chunk_may_be_true`)."""
_TRUE_ZERO_ROWS = re.compile(r"/?modes/L\d+/(query|key)$")
"""The :data:`NEVER_ZERO` arrays a recording can fill with zeros (a layer whose q/k input is zero); maps, terms and file
columns never are."""


def zero_chunk_may_be_true(ds: h5py.Dataset) -> bool:
    """Whether a chunk of ``ds`` that :func:`zeroed_chunks` finds may hold true zero rows: mode projections of a file
    of a format before :data:`SIGNED_ZERO_ROWS_FORMAT` (or whose number does not read), written as zero bytes."""
    return bool(_TRUE_ZERO_ROWS.match(ds.name)) and _may_hold_unsigned_zeros(ds)


def _may_hold_unsigned_zeros(ds: h5py.Dataset) -> bool:
    """Whether ``ds``'s file is of a format before :data:`SIGNED_ZERO_ROWS_FORMAT`, or its number does not read."""
    try:
        return format_number(ds.file.attrs) < SIGNED_ZERO_ROWS_FORMAT
    except (OSError, KeyError, RuntimeError, ValueError, TypeError):
        return True


SIGNED_FROM_FORMAT_4 = re.compile(r"/?relative/L\d+$")
"""Per-image arrays a recording can fill with zeros (a relative term, where the model's tables are zero) whose zero
rows are stored as -0.0 since format 4 (:func:`signed_zero_rows`): a chunk of zero bytes is damage in a file of that
format, and unchecked in older ones, whose writers stored +0.0."""


def _zero_is_damage(ds: h5py.Dataset, images: np.ndarray) -> np.ndarray:
    """Which of ``images`` (rows of ``ds`` that read all zero) no recording writes as zero bytes: every row of a
    :data:`NEVER_ZERO` array, and of a :data:`SIGNED_FROM_FORMAT_4` one in a file of format 4; of :data:`FILE_MTIMES` the images whose :data:`FILE_SIZES` is not a file's (-1, no file:
    its time is -1 too; 0: itself zeroed), as a file's time may be 0 (a tar member's often is). None of them where the
    file has no sizes or they do not read (their own read says so)."""
    if NEVER_ZERO.match(ds.name):
        return np.ones(len(images), dtype=bool)
    if SIGNED_FROM_FORMAT_4.match(ds.name):  # of format 4, not "may be true" (the format read as zero_chunk_may_be_true)
        return np.full(len(images), not _may_hold_unsigned_zeros(ds))
    if ds.name.strip("/") != FILE_MTIMES:
        return np.zeros(len(images), dtype=bool)
    try:
        sizes = ds.file[FILE_SIZES][np.asarray(images, dtype=np.int64)]
    except (OSError, KeyError, RuntimeError, ValueError, TypeError, IndexError):
        return np.zeros(len(images), dtype=bool)
    return np.asarray(sizes) <= 0


def signed_zero_rows(name: str, value: np.ndarray) -> np.ndarray:
    """``value`` (one row an image) as array ``name`` stores it: in a :data:`NEVER_ZERO` or
    :data:`SIGNED_FROM_FORMAT_4` array, each row that reads
    all zero as -0.0, which equals 0.0 in every comparison and sum but is not zero bytes, so :func:`zeroed_chunks`
    tells a recorded zero row (a layer whose q/k input is zero: its norm's weight and bias zero) from a zeroed disk
    page, which it refuses."""
    if value.dtype.kind != "f" or not value.size or not (NEVER_ZERO.match(name) or SIGNED_FROM_FORMAT_4.match(name)):
        return value
    zero = ~value.reshape(len(value), -1).any(axis=1)
    if not zero.any():
        return value
    value = value.copy()
    value[zero] = -0.0
    return value


def _zero_rows(values: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``values`` as ``n`` flat rows, and which of them read all zero (none of an empty row)."""
    flat = np.asarray(values).reshape(n, -1)
    return flat, ~np.any(flat != 0, axis=1) & (flat.shape[1] > 0)


def zeroed_chunks(ds: h5py.Dataset, images: Sequence[int], values: np.ndarray) -> list[int]:
    """The first image of each chunk among ``images`` (read as ``values``, one row each, any selection of the other
    axes) whose stored bytes are all zero, its checksum included, in a Fletcher-32 array where no recording stores a
    row as zero bytes (:func:`_zero_is_damage`: :data:`NEVER_ZERO`, the file time of an image not from a file, a
    relative term since format 4).
    Fletcher-32 of zero bytes is zero, so the checksum passes a chunk that a zeroed disk page covered, and it would read
    as zeros: such a chunk is damage. The one helper the reader, ``verify_run`` and ``repair`` ask; a merged view's
    images are looked up in their shards (:func:`_zeroed_in_shards`). Arrays where 0 is recorded (:data:`NEVER_ZERO`
    names them) and arrays of your own are not looked at. Only chunks whose rows read as zeros are looked at on the
    disk (a read of that chunk's stored bytes)."""
    if ds.is_virtual:  # a merged view: each image's chunk is its shard's (the view itself has no checksum)
        return _zeroed_in_shards(ds, images, values)
    if not (ds.fletcher32 and ds.chunks and ds.dtype.kind in "fi") or not len(images):
        return []
    flat, zero = _zero_rows(values, len(images))
    if not zero.any():
        return []
    zero[zero] = _zero_is_damage(ds, np.asarray(images)[zero])
    if not zero.any():
        return []
    rows = ds.chunks[0]
    found = []
    for first in sorted({int(image) // rows * rows for image in np.asarray(images)[zero]}):
        try:
            _, raw = ds.id.read_direct_chunk((first,) + (0,) * (ds.ndim - 1))
        except (OSError, KeyError, RuntimeError, ValueError):
            continue  # a chunk that is not there, or whose index does not read: the read itself says so
        if not np.frombuffer(raw, np.uint8).any():
            found.append(first)
    return found


def view_sources(ds: h5py.Dataset) -> list[tuple[str, str, int, int, int]]:
    """(shard file name, its dataset, first row, last row + 1, the shard's row of the first) of each source of a
    merged view (a virtual dataset) that lies in another file, the file named as the view stores it (relative to the
    view's folder); [] for any other dataset."""
    if not ds.is_virtual:
        return []
    sources = []
    for source in ds.virtual_sources():
        if source.file_name != ".":
            (lo, *_), (hi, *_) = source.vspace.get_select_bounds()
            space = source.src_space  # the shard's rows: all of them (a source given whole) or a hyperslab
            shard_lo = 0 if space.get_select_type() == h5py.h5s.SEL_ALL else int(space.get_select_bounds()[0][0])
            sources.append((source.file_name, source.dset_name, int(lo), int(hi) + 1, shard_lo))
    return sources


def view_source_at(ds: h5py.Dataset, row: int) -> tuple[str, str, int] | None:
    """(shard file name, its dataset, the shard's row) that row ``row`` of a merged view reads; None elsewhere."""
    return next(((file_name, name, row - lo + shard_lo) for file_name, name, lo, hi, shard_lo in view_sources(ds)
                 if lo <= row < hi), None)


def _zeroed_in_shards(ds: h5py.Dataset, images: Sequence[int], values: np.ndarray) -> list[int]:
    """:func:`zeroed_chunks` of a merged view (``merge_shards`` without ``copy``): its images' chunks lie in the
    shards, whose checksum passes a zeroed one as it does in a run (round 51: the view read such an image as zeros
    and verify called it intact, while the shard refused it). Each image reading as zeros is looked up in its shard
    (a shard that does not open is left to the view's own checks: missing, held by a writer)."""
    from qkhooks.store._hdf5 import open_read  # it imports this module

    if ds.dtype.kind not in "fi" or not len(images):  # the shard's own array says which zeros are damage
        return []
    flat, zero = _zero_rows(values, len(images))
    if not zero.any():
        return []
    rows, folder, found = np.asarray(images), Path(ds.file.filename).parent, []
    for file_name, name, lo, hi, shard_lo in view_sources(ds):
        picked = zero & (rows >= lo) & (rows < hi)
        if not picked.any():
            continue
        try:
            with open_read(folder / file_name, swmr=False) as shard:  # the view's own locking flags
                found += [first - shard_lo + lo for first in
                          zeroed_chunks(shard[name], rows[picked] - lo + shard_lo, flat[picked])]
        except (OSError, KeyError, RuntimeError, ValueError):
            continue
    return sorted(found)


MAY_BE_TRUE_ZEROS = "it may be true zero rows"
"""The words of :func:`zeroed_chunk_words` for a chunk that may be true zeros: ``verify_run`` lists such lines apart
from damage."""


def zeroed_chunk_words(ds: h5py.Dataset, first: int) -> str:
    """What :func:`zeroed_chunks` found, in words: damage, or where it may be true zeros
    (:func:`zero_chunk_may_be_true`) either, and how to tell; in a merged view, the shard that holds the chunk and its
    row too."""
    from qkhooks.store._hdf5 import open_read  # it imports this module

    source = view_source_at(ds, first)
    if source is not None:
        file_name, name, row = source
        with open_read(Path(ds.file.filename).parent / file_name, swmr=False) as shard:
            return (f"image {first} of this merged view is image {row} of shard {file_name}, where "
                    f"{zeroed_chunk_words(shard[name], row)}")
    rows = ds.chunks[0]
    which = f"image {first}'s chunk" if rows == 1 else f"the chunk of images {first}-{first + rows - 1}"
    if zero_chunk_may_be_true(ds):
        return (f"{which} of its array {ds.name} holds only zero bytes, its Fletcher-32 checksum too: {MAY_BE_TRUE_ZEROS}, which a run written before format {SIGNED_ZERO_ROWS_FORMAT} (qkhooks before round 51; this "
                f"file's format: {describe_format(ds.file.attrs)}) stored as zero bytes where a layer's q/k input is "
                "zero (its norm's weight and bias zero: then every image's rows of that layer are zero), or a disk "
                "page zeroed over it; the checksum cannot tell which. `qkhooks info --verify` lists every such chunk: "
                "where they are all the layer's images, they are most likely that layer's true zeros, which h5py "
                "reads; else record those images again")
    return (f"{which} of its array {ds.name} holds only zero bytes, its Fletcher-32 checksum too, which the checksum "
            "cannot tell from a disk page zeroed over it (a recorded row is never stored as zero bytes)")


def chunk_index_readable(ds: h5py.Dataset, rows: Sequence[int]) -> bool:
    """Whether the chunk index of a per-image array answers for these rows (reads metadata only, not the data;
    a damaged index makes every read of the array fail)."""
    if not ds.chunks:
        return True
    try:
        for row in set(rows):
            ds.id.get_chunk_info_by_coord((row,) + (0,) * (ds.ndim - 1))
    except (OSError, RuntimeError, ValueError, KeyError):
        return False
    return True


def write_states_into(f: h5py.File, states: Mapping[str, Mapping[str, Any]], images: int, checksum: bool = False) -> None:
    """Final reducer states inside a run file written in one go (a merge, a repair): ``/reducers/<name>/a``. In a
    checksummed run (``checksum``) each non-empty array is one Fletcher-32 chunk, as its statics are: a damaged state
    is refused by every reader, never read as other statistics."""
    for name, state in states.items():
        group = f.require_group(f"{REDUCERS}/{name}")
        slot = group.require_group("a")
        arrays, scalars = _split(state)
        scalars[_IMAGES_KEY] = int(images)
        for key, value in arrays.items():
            value = np.asarray(value)
            summed = dict(chunks=value.shape, fletcher32=True) if checksum and value.ndim and value.size else {}
            slot.create_dataset(key, data=value, **summed)
        slot.attrs["scalars"] = json.dumps(scalars)
        group.attrs["current"] = "a"


def _states_inside(f: h5py.File) -> tuple[int | None, dict[str, dict[str, Any]]]:
    """States kept inside the file (merged or repaired files, and runs written before the sidecar)."""
    states: dict[str, dict[str, Any]] = {}
    images = None
    for name, group in f.get(REDUCERS, {}).items():
        if group is None:  # a link whose object does not open (a cut took its header): h5py yields None
            raise OSError(f"/{REDUCERS}/{name} does not open")
        current, scalars = STATE_ATTRS
        slot_name = group.attrs.get(current, "")
        slot = group.get(slot_name) if slot_name else None
        if slot is None or not slot.attrs.get(scalars, ""):
            continue
        state: dict[str, Any] = json.loads(slot.attrs[scalars])
        for key, ds in slot.items():
            state[key] = ds[()]
        images = state.pop(_IMAGES_KEY, images)
        states[name] = state
    return images, states


def read_states(f: h5py.File, run: str | os.PathLike) -> tuple[int | None, dict[str, dict[str, Any]]]:
    """(images, states by reducer name) of a run: the file's own states, else its checkpoint sidecar."""
    images, states, _ = states_and_problem(f, run)
    return images, states


def states_and_problem(f: h5py.File, run: str | os.PathLike) -> tuple[int | None, dict[str, dict[str, Any]], str | None]:
    """:func:`read_states` plus what is wrong with the checkpoint sidecar when it cannot be read (None: nothing),
    from one load of it (each load reads and CRC-checks the whole archive)."""
    images, states = _states_inside(f)
    if states:
        return images, states, None
    found, problem = _checkpoint(run, run_id_of(f))
    return (*(found or (None, {})), problem)


def config_differences(theirs: Any, ours: Any) -> str:
    """`` (attention: file 'rows', now 'none')`` for two JSON configs; empty when they are not both JSON objects."""
    try:
        a, b = json.loads(theirs), json.loads(ours)
    except (TypeError, ValueError):
        return ""
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return ""
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return " (" + "; ".join(f"{k}: file {a.get(k)!r}, now {b.get(k)!r}" for k in keys) + ")" if keys else ""


def resume_point(n_committed: int, checkpoint_images: int | None, states: Mapping[str, Any],
                 reducers: Sequence[str]) -> int:
    """How many committed images a resume keeps: the checkpoint's (its reducers saw exactly those), all of them
    when no reducer runs, none when the checkpoint is missing, lacks one of ``reducers`` or claims more than is
    committed. The one resume rule: the single-process resume and the shard merge both ask it."""
    if not reducers:
        return n_committed
    if checkpoint_images is None or checkpoint_images > n_committed or any(r not in states for r in reducers):
        return 0
    return checkpoint_images


def geometry_gap(info: Mapping[str, Any], layers: Sequence[int]) -> str | None:
    """What is wrong when a version-2 ``model/info`` lacks the ``layer_geometry`` entry of a recorded layer (every
    recorded layer has one, so a key changed: attributes carry no checksum), or None. Such a layer is never read by
    the one-grid rule of version 1 files."""
    table = info.get("layer_geometry")
    missing = [int(l) for l in layers if isinstance(table, dict) and str(l) not in table]
    if not missing:
        return None
    return (f"model/info's layer_geometry has no entry for recorded layer{'s' if len(missing) > 1 else ''} "
            f"{', '.join(map(str, missing))} (its keys: {', '.join(sorted(map(str, table)))})")


def layer_geometry(info: Mapping[str, Any], layer: int) -> LayerGeometry | None:
    """Layer ``layer``'s :class:`qkhooks.access.LayerGeometry` from a run's ``model/info``. Version 1 files (no
    ``layer_geometry``) recorded only single-grid models, so their one grid and prefix hold for every layer;
    None when the file says neither."""
    table = info.get("layer_geometry")
    if isinstance(table, dict):  # version 2: every recorded layer has its entry (:func:`geometry_gap`)
        stored = table.get(str(layer))
        return None if stored is None else LayerGeometry.from_dict(stored)
    if "num_prefix_tokens" not in info:
        return None
    grid = info.get("grid")
    grid = None if grid is None else (int(grid[0]), int(grid[1]))
    prefix = int(info["num_prefix_tokens"])
    tokens = prefix + grid[0] * grid[1] if grid is not None else 0
    return LayerGeometry(int(layer), grid, prefix, tokens, tokens, grid, prefix, int(info.get("heads", 0)),
                         int(info.get("head_dim", 0)))


def copy_statics(src: h5py.File, dst: h5py.File,
                 unreadable: Callable[[str, bool, BaseException], None] | None = None,
                 errors: tuple[type[BaseException], ...] = (), outside: Collection[str] = (),
                 attr_outside: Callable[[str, str], None] | None = None,
                 storage_problem: Callable[[h5py.Dataset], str | None] | None = None) -> None:
    """Copy every group's attributes and every dataset that is not per-image, not under ``images`` and not a
    reducer state, each dataset with its attributes and, where it has one, its Fletcher-32 checksum (a merge and a
    repair copied these two ways, each dropping one of them). ``unreadable(name, is_dataset, error)``: called for
    what does not read as one of ``errors`` (a repair goes on); without them every error is raised (a merge of
    healthy shards). An attribute named in ``outside`` is never read (a repair: its string lies past a cut file's
    end, where HDF5 would spin): ``attr_outside(name, key)`` is told instead. A dataset for which
    ``storage_problem`` names a reason (a repair: its data lie past a cut file's end, which HDF5 reads as zeros) is
    not read: an OSError with that reason, one of ``errors``."""

    def copy_attrs(name: str, obj: Any, to: Any) -> None:
        for k in obj.attrs:  # the names only: a value is read below, one at a time
            if k in outside:
                assert attr_outside is not None, "attributes left unread need attr_outside() to name them"
                attr_outside(name, k)
            else:
                to.attrs[k] = rewritable(obj.attrs[k])

    def visit(name: str, obj: Any) -> None:
        if name.split("/", 1)[0] in ("images", REDUCERS):
            return
        try:
            if isinstance(obj, h5py.Group):
                copy_attrs(name, obj, dst.require_group(name))
            elif isinstance(obj, h5py.Dataset) and not obj.attrs.get("per_image", False):
                if storage_problem is not None and (why := storage_problem(obj)) is not None:
                    raise OSError(why)
                summed = dict(chunks=obj.chunks, fletcher32=True) if obj.fletcher32 else {}
                copy_attrs(name, obj, dst.create_dataset(name, data=obj[()], dtype=obj.dtype, **summed))
        except errors as exc:
            assert unreadable is not None, "errors caught need unreadable() to name them"
            unreadable(name, not isinstance(obj, h5py.Group), exc)

    src.visititems(visit)


# ------------------------------------------------------------------------------------------ attribute digests
def attr_value_digest(value: Any) -> str:
    """sha256 hex of an attribute's value as h5py reads it: text by its UTF-8 bytes, anything else by its numpy dtype,
    shape and bytes (variable-length strings in an array by their UTF-8 bytes, each with its length)."""
    h = hashlib.sha256()
    if isinstance(value, (str, bytes)):
        h.update(b"s:" + (value.encode("utf-8", "surrogatepass") if isinstance(value, str) else value))
        return h.hexdigest()
    array = np.asarray(value)
    h.update(f"a:{array.dtype.str}:{array.shape}:".encode())
    if array.dtype.kind == "O":
        for item in array.ravel():
            raw = item.encode("utf-8", "surrogatepass") if isinstance(item, str) else bytes(item)
            h.update(len(raw).to_bytes(8, "little") + raw)
    else:
        h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()


def _attr_key(obj_name: str, key: str) -> str:
    return f"{obj_name if obj_name else '/'}@{key}"


def attr_words(name: str) -> str:
    """``/model@info`` as a reader says it: ``attribute info of /model`` (``root attribute config``)."""
    obj, _, key = name.rpartition("@")
    return f"root attribute {key}" if obj == "/" else f"attribute {key} of {obj}"


_HEADER_ERRORS = (OSError, KeyError, RuntimeError, ValueError, TypeError)


def attr_digests(f: h5py.File, unreadable: list[str] | None = None) -> dict[str, str]:
    """{``/GROUP@NAME``: sha256} of every attribute of every group and dataset of ``f`` but :data:`UNSEALED_ATTRS`,
    walking by names (object headers only: no chunk index is read). With ``unreadable`` a list, an object whose header
    or attributes do not read (HDF5's own checksum failing: damage that every read of it reports) is named there and
    left out; without it, that raises."""
    out: dict[str, str] = {}

    def walk(group_or_file: Any, child: str | None) -> None:
        try:
            obj = group_or_file if child is None else group_or_file[child]
            found = {_attr_key(obj.name, key): attr_value_digest(value) for key, value in obj.attrs.items()
                     if key not in UNSEALED_ATTRS}
            children = list(obj) if isinstance(obj, h5py.Group) else []
        except _HEADER_ERRORS:
            if unreadable is None:
                raise
            unreadable.append(f"{group_or_file.name.rstrip('/')}/{child}" if child is not None else "/")
            return
        out.update(found)
        for name in children:
            walk(obj, name)

    walk(f["/"], None)
    return out


def digest_matches(value_digest: str, stored: str) -> bool:
    """Whether an attribute's digest matches its stored entry: one digest, or (a resume rewriting a static with
    another value, :meth:`~qkhooks.store.writer.RunWriter._reseal`) the old and the new joined by ``|``, so that a
    reader opening the file between the value's write and the digests' sees a run whose attribute is either."""
    return value_digest in stored.split("|")


def seal_attrs(f: h5py.File, carried: Mapping[str, str | None] | None = None) -> None:
    """Write :data:`ATTR_DIGESTS` of ``f`` as it is now (a file not in SWMR mode: it may add the attribute).
    ``carried``: entries that keep a digest other than the one computed (a repair carries the source's digest of an
    attribute that failed it, so the copy keeps failing it; None: no entry, the attribute stays uncovered)."""
    digests = attr_digests(f)
    for name, digest in (carried or {}).items():
        if digest is None:
            digests.pop(name, None)
        else:
            digests[name] = digest
    f.attrs[ATTR_DIGESTS] = json.dumps(digests, sort_keys=True)


def stored_attr_digests(f: h5py.File) -> dict[str, str] | None:
    """The file's :data:`ATTR_DIGESTS` (None where it has none); one that does not parse as a JSON object of strings
    raises ValueError."""
    if ATTR_DIGESTS not in f.attrs:
        return None
    stored = json.loads(as_str(f.attrs[ATTR_DIGESTS]))
    if not isinstance(stored, dict) or not all(isinstance(v, str) for v in stored.values()):
        raise ValueError(f"root attribute {ATTR_DIGESTS} is not a JSON object of digests")
    return stored


def _unsealed(now: Mapping[str, str], stored: Mapping[str, str]) -> list[str]:
    return sorted(set(now) - set(stored))


def unsealed_attrs(f: h5py.File) -> list[str]:
    """``/GROUP@NAME`` of each attribute the file's :data:`ATTR_DIGESTS` do not list and qkhooks does not read (not
    one of :data:`QKHOOKS_ATTR_NAMES`): a user's own, added with h5py after the run was written. They are accepted
    (nothing qkhooks reports depends on them), listed by ``info --verify``, and carried unsealed by a merge and a
    repair. Empty for a file without digests (no attribute is sealed there) or whose digests do not parse."""
    try:
        stored = stored_attr_digests(f)
    except (TypeError, ValueError):
        return []
    if stored is None:
        return []
    return [name for name in _unsealed(attr_digests(f, []), stored)
            if name.rpartition("@")[2] not in QKHOOKS_ATTR_NAMES]


def failing_attrs(f: h5py.File) -> dict[str, str] | None:
    """{``/GROUP@NAME``: why} of each attribute that does not match :data:`ATTR_DIGESTS` (changed, missing, or added
    since under a name qkhooks reads: :data:`QKHOOKS_ATTR_NAMES`); None for a file without the digests. A user's
    attribute of another name is not failing (:func:`unsealed_attrs`). A digest list that does not parse is one
    entry (``/@attr_digests``). An object whose header does not read (HDF5's own checksum of it failing) is left
    out: every read of it reports that damage."""
    try:
        stored = stored_attr_digests(f)
    except (TypeError, ValueError) as exc:
        return {_attr_key("/", ATTR_DIGESTS): f"does not parse ({exc})"}
    if stored is None:
        return None
    unreadable: list[str] = []
    now = attr_digests(f, unreadable)
    bad = {name: "changed since it was written" for name in sorted(set(now) & set(stored))
           if not digest_matches(now[name], stored[name])}
    # an object that does not read is HDF5's damage, which reading it reports: its attributes are not "missing"
    under = [u if u == "/" else u + "@" for u in unreadable] + [u + "/" for u in unreadable if u != "/"]
    bad.update({name: "missing" for name in sorted(set(stored) - set(now))
                if not any(name.startswith(u) for u in under)})
    bad.update({name: "not covered by the digests (added after they were written), and qkhooks reads an attribute "
                      "of that name" for name in _unsealed(now, stored) if name.rpartition("@")[2] in QKHOOKS_ATTR_NAMES})
    return bad


def attr_digest_problems(f: h5py.File) -> list[str]:
    """:func:`failing_attrs` as lines (``verify_run``'s problems, a refusal's reasons); empty where all match or the
    file has no digests."""
    return [f"{attr_words(name)} {why}" + ("" if name == _attr_key("/", ATTR_DIGESTS) else
                                            f" (its digest in root attribute {ATTR_DIGESTS})")
            for name, why in (failing_attrs(f) or {}).items()]


def attr_damage_message(path: str | os.PathLike, problems: Sequence[str], doing: str = "read") -> str:
    """Why a run whose attributes fail their digests is refused, and what can help (repair cannot: an attribute has
    no second copy in the file)."""
    return (f"cannot {doing} {path}: {'; '.join(problems)}. These attributes say how the file's numbers are read "
            "(layers, geometry, dtype, modes), so they are not read under a changed one. `qkhooks info --verify "
            f"{path}` lists every such attribute; `qkhooks repair` cannot restore one (the file keeps no other copy "
            "of it; its copy keeps failing the same check). Record the run again (--overwrite, or a new --out); if "
            "you changed, added or deleted the attribute yourself, set it back to how it was recorded.")
