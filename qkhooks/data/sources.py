"""The user's own data as a stream of model inputs: torch Datasets, sequences, iterables, DataLoaders,
Hugging Face ``datasets`` (map-style or streaming) and webdataset tar shards.

:func:`open_source` turns any of them into an :class:`ItemStream`; qkhooks' own spec strings and
:class:`~qkhooks.data.ImageDataset` pass through as they are. A stream is read in order, in the calling
process and cheaply (indices, undecoded Hugging Face rows, the bytes of tar members), while decoding and the
model's preprocessing run in :meth:`ItemStream.batches`, in worker processes when asked. So every source
splits across workers with no image twice and none missing, the ids keep the source's order whatever the
number of workers, and a resume continues from a position without decoding what comes before it.

Items of a torch Dataset, a sequence or an iterable may be: a PIL image; an ``(H, W)`` or ``(H, W, 3|4)``
uint8 array; encoded image bytes or a file path; an ``(image, label)`` pair (torchvision style; the label is
not used); or a dict with ``"image"`` (any of the above) and optional ``"id"``, ``"objects"`` (instance
labels, 0 = background), ``"target"`` and ``"distractor"`` (odd-one-out masks), each ``(H, W)`` like the
image. A dict without ``"image"`` may hold the image under a file extension (``"jpg"``, ``"png"``, ...), as a
``webdataset.WebDataset`` yields it, and is then read as ``wds:`` reads the same members (the ``json`` field's
``"id"``, the ``objects.png`` / ``target.png`` / ``distractor.png`` masks, the image member's own letter case where
its shard is a local file; two images in one sample are skipped with the reason). Tensors are refused: they are some other preprocessing's output, and
qkhooks applies the model's own. Every image goes through the same RGB conversion as a folder's files, so
the same image gives the bit-identical array whatever container it came in. An item's id is its dict's ``"id"``,
else the file path it was given as (alone, as a pair's image or as a dict's ``"image"``, as given; in a Hugging Face
dataset, an id-like column, else a path in its image column), else its position; a dict's other fields are not read, and are named in one warning per stream (a mask under another name
would otherwise be left out without a word). A DataLoader is read through its dataset, in index order: one whose
sampler or batch sampler chooses items is refused (pass ``torch.utils.data.Subset(dataset, indices)``).

The readers of each kind of source, and the conversion of one item, are in :mod:`qkhooks.data.readers`; here
are the ordered stream, its worker processes and :func:`open_source`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import multiprocessing
import os
import warnings
from collections import deque
from dataclasses import dataclass
from multiprocessing.reduction import ForkingPickler
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
import torch
from PIL import Image

from qkhooks.data.datasets import STREAMED_PREFIXES, check_limit, is_whole, open_dataset
from qkhooks.data.items import NO_STAMP, ImageDataset, preprocess_raw, set_pil_limit, stamps_read
from qkhooks.data.preprocess import ImageConfig
from qkhooks.data.readers import (
    DATASETS_INSTALL,
    hf_reader,
    is_hf,
    IterReader,
    MapReader,
    folder_reader,
    open_hfds,
    open_wds,
    RawItem,
    ReadInPassing,
    Unreadable,
    expand_braces,
)
from qkhooks.errors import DataRefusal, QKHooksError

__all__ = ["DATASETS_INSTALL", "OBJECT_PREFIXES", "ItemStream", "StreamBatch", "expand_braces", "open_source"]

OBJECT_PREFIXES: tuple[str, ...] = ("torch:", "sequence:", "iterable:", "datasets:")
"""How a run names data given as a Python object (a torch Dataset, a sequence, an iterable, a Hugging Face dataset
object): ``PREFIX + the object's type`` (or the Hugging Face dataset's name). Not a spec: such a run's images cannot
be reopened from the run file (e.g. to draw photos)."""

_SPECS = "hfds:DIR_OR_NAME[:SPLIT] (a Hugging Face dataset) or wds:PATTERN (webdataset tar shards, {000..009} expanded)"


def refuse_batching(batch_size: int, workers: int) -> None:
    """A :class:`QKHooksError` naming each of ``batch_size`` (an integer >= 1) and ``workers`` (an integer >= 0)
    that is out of range."""
    wrong = ([f"the batch size must be a whole number >= 1 (batch_size, --batch-size), got {batch_size!r}"]
             if not is_whole(batch_size, 1) else []) + (
        [f"the loader workers must be a whole number >= 0 (num_workers, --workers; 0 decodes in this process), got "
         f"{workers!r}"] if not is_whole(workers, 0) else [])
    if wrong:
        raise QKHooksError("; ".join(wrong) + ".")


# ---------------------------------------------------------------------------------------------- the stream


@dataclass
class StreamBatch:
    """Up to ``batch_size`` consecutive positions: the items that decoded, and (id, reason) of those that did not.

    ``end`` is the position after the batch, where a resume continues.
    """

    items: list[dict[str, Any]]
    failures: list[tuple[str, str]]
    end: int


class ItemStream:
    """An ordered stream of preprocessed items from a user's source (build it with :func:`open_source`).

    Attributes:
        name: What the run file records as its data (e.g. ``"hfds:/data/coco:val"``, ``"torch:MyDataset"``).
        length: The number of items, or None for an iterable without one.
        source_length: The source's own number of items (``length`` before the limit), or None.
        has_masks, has_targets: Whether items carry ``objects`` / odd-one-out masks (from the first item).
    """

    def __init__(self, name: str, reader: Any, image_config: ImageConfig, limit: int | None = None):
        self.name, self._reader, self.image_config = name, reader, image_config
        self.limit = limit
        self.length = reader.length if reader.length is None or limit is None else min(limit, reader.length)
        self.source_length: int | None = reader.length  # the whole source's, whatever the limit: a resume compares it
        self._first: tuple[int, str] = (0, "0")  # the item _peek learns the masks from: (position, id)
        self._unread_named: set[str] = set()  # fields of the items not read, once warned of
        self.has_masks, self.has_targets = self._peek()
        self._check_layouts()

    def __repr__(self) -> str:
        return f"ItemStream(name={self.name!r}, length={self.length}, has_masks={self.has_masks})"

    def _peek(self) -> tuple[bool, bool]:
        """Decode the first readable item to learn which masks items carry (a generator is kept, not consumed)."""
        rows = self._reader.rows(0)
        seen: list[Any] = []
        for position, row in enumerate(rows):
            seen.append(row)
            try:
                own_id, raw = self._reader.decode(row, position)
            except Unreadable:
                continue
            self._first = (position, own_id if own_id is not None else str(position))
            self._name_unread(raw.unread)
            break
        else:
            raise QKHooksError(f"{self.name} is empty: it gave no items (a generator gives its items only once)."
                               if not seen else
                               f"none of the {len(seen)} items of {self.name} could be decoded.")
        if getattr(self._reader, "one_shot", False):  # put the peeked items back in front
            self._reader = _Replay(self._reader, seen, rows)
        return raw.objects is not None, raw.target is not None

    def _name_unread(self, keys: tuple[str, ...]) -> None:
        """Warn, once per stream for each, of the fields of the items that qkhooks does not read: a mask under another
        name (``"mask"``, ``"segmentation"``) would otherwise be left out without a word (found by review); a Hugging
        Face dataset's unread columns alike (review r38). Not refused: items may carry labels and other fields that
        are not for qkhooks."""
        new = [k for k in keys if k not in self._unread_named]
        if not new:
            return
        self._unread_named.update(new)
        tar = self.name.startswith("wds:")
        hf = getattr(self._reader, "unread_columns", None) is not None  # a Hugging Face dataset: its columns
        if tar:
            reads = ("each sample's image member, NAME.json's 'id', and the masks NAME.objects.png (instance labels, "
                     "0 = background), NAME.target.png and NAME.distractor.png; if one of them is a mask, name its "
                     "member so.")
        elif hf:
            reader = self._reader
            masks = ", ".join(f"{column!r} as {key!r}" for key, column in reader.masks.items()) or "none"
            reads = (f"the image column {reader.image_column!r}, "
                     + (f"the id column {reader.id_column!r}" if reader.id_column is not None else "no id column")
                     + f", and the mask columns (here: {masks}), which are the columns named 'objects' (instance "
                     "labels, 0 = background), 'target' and 'distractor' unless masks= names others; if one of them "
                     "is a mask, pass it so (e.g. record_dataset(..., masks={'objects': 'mask'})).")
        else:
            reads = ("an item's 'image' (or, in a webdataset sample, the image under its file extension), 'id', and "
                     "the masks 'objects' (instance labels, 0 = background), 'target' and 'distractor'; if one of "
                     "them is a mask, give it under one of those names (e.g. item['objects'] = item.pop('mask')).")
        what = "dataset's column" if hf else "items' member" if tar else "items' field"
        warnings.warn(
            f"{self.name}: the {what}{'s' if len(new) > 1 else ''} "
            f"{', '.join(map(repr, new))} {'are' if len(new) > 1 else 'is'} not read, so nothing of "
            f"{'them' if len(new) > 1 else 'it'} is recorded. qkhooks reads " + reads
            + " Labels and other fields may stay: this only says that they are not used.", stacklevel=3)

    def ids_before(self, stop: int) -> list[str] | None:
        """The ids of the items at positions ``< stop`` where the reader names them without decoding (a list or
        tuple: the items are in memory; a map-style Hugging Face dataset's columns); None elsewhere. A resume checks
        them against the run file's."""
        layouts = getattr(self._reader, "mask_layouts", None)
        found = layouts(stop) if layouts is not None else None
        return None if found is None else [item_id for position, item_id, _ in found if position < stop]

    def ids_by_position(self, stop: int, progress: bool = False, first: int = 0) -> list[str]:
        """The ids of the items from ``first`` (a shard's first) to ``stop`` named by their position alone (no id of
        their own), where the reader names them without decoding (as :meth:`ids_before`) or reads them again for a
        resume (as :meth:`file_paths`, which then reuses that reading; with ``progress``, a bar where it takes a
        while); empty elsewhere. A resume of a run from before the file stamps has nothing to check those by."""
        named = getattr(self._reader, "ids_by_position", None)
        return (named(stop, progress=progress, first=first) if named is not None else None) or []

    def _check_layouts(self) -> None:
        """Refuse, before anything is recorded, a source whose items do not all carry the first item's masks, or
        two of whose items have the same id, where the reader can tell without decoding (a list or tuple of items,
        a map-style Hugging Face dataset's columns); other sources are checked item by item as they are decoded
        (:meth:`_decode`, and the recording's check of ids)."""
        layouts = getattr(self._reader, "mask_layouts", None)
        found = layouts(self.length) if layouts is not None and self.length is not None else None
        seen: dict[str, int] = {}
        for position, item_id, layout in found or ():
            if layout != (self.has_masks, self.has_targets):
                raise QKHooksError(self._mask_gap(position, item_id, layout) + " Nothing was recorded.")
            if item_id in seen:
                raise QKHooksError(
                    f"{self.name}: items {seen[item_id]} and {position} have the same id {item_id!r}; a run file finds "
                    "images by id, so each needs its own (a dict's 'id', or a Hugging Face dataset's id column; an image "
                    "given as a file path, alone, as a dict's 'image' or in a Hugging Face image column of paths, has "
                    "that path as its id: list each file once). Nothing was recorded.")
            seen[item_id] = position

    def _mask_gap(self, position: int, item_id: str, layout: tuple[bool, bool]) -> str:
        """Why an item whose masks (``layout``: has objects, has target/distractor) differ from the first's is
        refused, naming the first item without them and the fix."""
        what = "'target' / 'distractor' masks" if self.has_targets or layout[1] else "'objects' mask"
        first = f"item {self._first[0]} (id {self._first[1]!r})"
        this = f"item {position} (id {item_id!r})"
        lacking, having = (this, first) if (self.has_masks, self.has_targets) > layout else (first, this)
        return (
            f"{self.name}: {lacking} has no {what}, but {having} has; every item of a run needs the same masks (an "
            f"item without them would be stored as 'annotated, no objects'). Give {lacking} its masks (an all-zero "
            f"'objects' mask if the image has no objects), or record the items without masks in a run of their own."
        )

    def file_paths(self, stop: int, progress: bool = False, first: int = 0) -> list[tuple[str, str | None]] | None:
        """Each item's (id, the file its image is read from, or None) before position ``stop``, where the reader names
        them without decoding (a list or tuple; a map-style Hugging Face dataset's columns) or by reading them again
        (a torch map-style Dataset's items, through its ``__getitem__``: one call an item; an iterable's or a streamed
        Hugging Face dataset's, as the resume skips them anyway: :class:`~qkhooks.data.readers.ReadInPassing`), with
        a progress bar where
        ``progress`` and it takes a while; None elsewhere. A resume checks the kept files against the stamps the run
        recorded. From position ``first`` (a shard's first), where the reader reads them again, on from there."""
        paths = getattr(self._reader, "file_paths", None)
        return None if paths is None else paths(stop, progress=progress, first=first)

    def held_hashes(self, stop: int, progress: bool = False, first: int = 0) -> list[tuple[str, int | None]] | None:
        """Each item's (id, BLAKE2b of its image's bytes or in-memory content, or None where it holds neither a file
        nor an image qkhooks hashes) from position ``first`` (a shard's first) to ``stop``, for the items whose image
        is held in a Hugging Face dataset, a list or tuple, a torch map-style Dataset or an iterable rather
        than read from a file (files are in :meth:`file_paths`); None for other sources. With ``progress``, a bar
        where the hashing takes a while. A resume checks them against the hashes the run recorded."""
        held = getattr(self._reader, "held_hashes", None)
        return None if held is None else held(stop, progress=progress, first=first)

    def read_again_cut(self, stop: int) -> tuple[int, int, float] | None:
        """Where reading a torch Dataset's items before ``stop`` again for a resume stopped for its time budget: (items
        read, the shard's items before ``stop``, seconds taken); None where all were read, or none needed reading."""
        cut = getattr(self._reader, "read_again_cut", None)
        return None if cut is None else cut(stop)

    @property
    def reads_again(self) -> bool:
        """Whether a resume reads the items before its point again through the user's own code (a torch map-style
        Dataset's ``__getitem__``, an iterable's ``__iter__``), whose images may differ from one read to the next (a
        random transform, a shuffling iterable)."""
        return bool(getattr(self._reader, "reads_again", False))

    def file_stamps(self, stop: int, progress: bool = False,
                    first: int = 0) -> list[tuple[str, tuple[int, int, int]]] | None:
        """Each item's (id, stamp) from position ``first`` (a shard's first) to ``stop``, in order, where the reader's
        items are not files of their own but members of one (``wds:``: the tar member's header size and time, its
        bytes' hash), read again without decoding (with ``progress``, a bar where that takes a while); None
        elsewhere."""
        stamps = getattr(self._reader, "file_stamps", None)
        return None if stamps is None else stamps(stop, progress=progress, first=first)

    def _decode(self, position: int, row: Any) -> dict[str, Any] | tuple[str, str]:
        """One position to its preprocessed item, or (id, reason) if its bytes do not decode."""
        return self._decode_unread(position, row)[0]

    def _decode_unread(self, position: int, row: Any, stamps: bool = False
                       ) -> tuple[dict[str, Any] | tuple[str, str], tuple[str, ...]]:
        """:meth:`_decode`, and the item's fields that were not read. With ``stamps``, the item carries
        ``"file_stamp"``: (size, modification time in ns, hash of the bytes decoded) of the file its image was read
        from (:func:`qkhooks.data.items.stamps_read`), or of its tar member (``wds:``), taken here as it is read;
        :data:`~qkhooks.data.items.NO_STAMP` (-1s) for an image not read from a file (in memory, bytes given)."""
        try:
            with stamps_read() if stamps else contextlib.nullcontext({}) as seen:
                own_id, raw = self._reader.decode(row, position)
        except Unreadable as exc:
            return (self._reader.row_id(row, position), str(exc)), ()
        except DataRefusal:
            raise
        except QKHooksError as exc:  # a refusal of this item's data: record_dataset says where the run file stands
            raise DataRefusal(str(exc)) from exc
        except Exception as exc:  # the user's own code failed: stop, saying where
            exc.add_note(f"(while qkhooks read item {position} of {self.name}{self._len_lies(exc, position)})")
            raise
        item_id = own_id if own_id is not None else str(position)
        layout = (raw.objects is not None, raw.target is not None)
        if layout != (self.has_masks, self.has_targets):
            raise DataRefusal(self._mask_gap(position, item_id, layout))  # record_dataset adds where the run file is
        item = preprocess_raw(self.name, self.image_config, item_id, raw)
        if stamps:  # one image file is read an item (masks are not stamped): its stamp, if any
            item["file_stamp"] = raw.stamp or (next(iter(seen.values())) if len(seen) == 1 else NO_STAMP)
        return item, raw.unread

    def _len_lies(self, exc: Exception, position: int) -> str:
        """Where an IndexError comes from an index under the length a map-style source gave: its ``__len__`` counts
        items its ``__getitem__`` does not hold (review r45: the note named the item only)."""
        length = self.source_length
        if not isinstance(exc, IndexError) or length is None or position >= length:
            return ""
        return (f"; its __len__ says {length}, so an IndexError here means __len__ counts more items than "
                f"__getitem__ holds: fix __len__, or pass torch.utils.data.Subset(dataset, range({position})) to "
                "record the items it holds")

    @staticmethod
    def _noted(rows: Iterator[Any], name: str, start: int) -> Iterator[tuple[int, Any]]:
        """``rows`` (the source's, from position ``start``) numbered, an error the source raises while it is read (a
        generator failing midway) noted with the item it stopped at (review r45: the user's error came alone, naming
        neither the source nor the item)."""
        iterator = iter(rows)
        for position in itertools.count(start):
            try:
                row = next(iterator)
            except StopIteration:
                return
            except Exception as exc:
                if not isinstance(exc, QKHooksError):
                    exc.add_note(f"(while qkhooks read item {position} of {name} from the source itself)")
                raise
            yield position, row

    def _decode_batch(self, rows: list[tuple[int, Any]]) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
        return self._decode_rows(rows)[:2]

    def _decode_rows(self, rows: list[tuple[int, Any]], stamps: bool = False
                     ) -> tuple[list[dict[str, Any]], list[tuple[str, str]], tuple[str, ...]]:
        """The items that decoded, (id, reason) of those that did not, and the fields of the items not read."""
        items: list[dict[str, Any]] = []
        failures: list[tuple[str, str]] = []
        unread: set[str] = set()
        for position, row in rows:
            out, keys = self._decode_unread(position, row, stamps)
            (failures if isinstance(out, tuple) else items).append(out)
            unread.update(keys)
        return items, failures, tuple(sorted(unread))

    def batches(self, batch_size: int, start: int = 0, stop: int | None = None,
                workers: int = 0, stamps: bool = False) -> Iterator[StreamBatch]:
        """Preprocessed batches of positions ``start..stop`` in order; decoding spread over ``workers`` processes.

        The source is read here, in order, and whole batches go to the workers, so no item is decoded twice
        or missed, and the order does not depend on ``workers``. Positions before ``start`` are skipped without
        decoding (a plain iterable still yields them, so whatever it does per item it does). With ``stamps`` each
        item carries its file's stamp, taken where it is decoded (:meth:`_decode_unread`).
        """
        bounds = [b for b in (stop, self.length, self.limit) if b is not None]
        stop = min(bounds) if bounds else None
        refuse_batching(batch_size, workers)
        rows = self._noted(self._reader.rows(start), self.name, start)
        if stop is not None:
            rows = itertools.islice(rows, max(stop - start, 0))
        chunks = iter(lambda: list(itertools.islice(rows, batch_size)), [])
        if workers == 0:
            for chunk in chunks:
                items, failures, unread = self._decode_rows(chunk, stamps)
                self._name_unread(unread)
                yield StreamBatch(items, failures, end=chunk[-1][0] + 1)
            return
        context = multiprocessing.get_context()
        self._refuse_unpicklable(workers, context.get_start_method())
        pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=context,
                                                      initializer=_set_worker_stream,
                                                      initargs=(self, Image.MAX_IMAGE_PIXELS))
        held = [start, start]  # the positions handed to the workers and not given back yet
        try:
            pending: deque[tuple[int, concurrent.futures.Future]] = deque()  # at most 2 batches per worker ahead
            for chunk in itertools.chain(chunks, [None]):
                if chunk is not None:
                    held[1] = chunk[-1][0] + 1
                    pending.append((chunk[-1][0] + 1, pool.submit(_worker_decode, chunk, stamps)))
                while pending and (chunk is None or len(pending) > 2 * workers):
                    end, future = pending.popleft()
                    items, failures, unread = future.result()
                    held[0] = end
                    self._name_unread(unread)
                    yield StreamBatch(items, failures, end=end)
        except concurrent.futures.process.BrokenProcessPool as exc:
            raise QKHooksError(self._worker_died(held, context.get_start_method())) from exc
        finally:
            pool.shutdown(cancel_futures=True)

    def _refuse_unpicklable(self, workers: int, method: str) -> None:
        """Workers started by spawn (macOS, Windows) or forkserver (Linux from Python 3.14) get the stream pickled:
        a dataset that cannot be (a lambda or an open file in it) stopped the run with a bare pickling error from
        inside multiprocessing (review r45), so it is tried here and refused naming the fix. Fork copies it."""
        if method == "fork":
            return
        try:
            ForkingPickler.dumps(self)
        except Exception as exc:  # noqa: BLE001 - whatever pickling raises (AttributeError, TypeError, ...)
            raise QKHooksError(
                f"num_workers={workers} decodes in worker processes started by '{method}', which get the data "
                f"pickled, and {self.name} cannot be pickled ({type(exc).__name__}: {exc}). Pass num_workers=0 "
                "(--workers 0) to decode in this process, or make the dataset picklable (its class defined in a "
                "module, holding no lambda, local function, open file or lock).") from None

    def _worker_died(self, held: list[int], method: str) -> str:
        """Why the run stopped when a decoding worker ended abruptly (concurrent.futures' BrokenProcessPool names
        neither the data, nor where, nor what to do: review r45)."""
        imports = (f"; or, started by '{method}', unable to import the dataset's class, e.g. one defined in a "
                   "notebook" if method != "fork" else "")
        return (
            f"a decoding worker process of {self.name} ended abruptly while it held items {held[0]}..{held[1] - 1} "
            "(killed by the system, e.g. for memory; a crash inside an image decoder or the dataset's own code"
            f"{imports}), so nothing says which item or why. Rerun with num_workers=0 (--workers 0), which decodes "
            "in this process and names an item's error (or with fewer workers if memory ran out); resume=True "
            "(--resume) continues the run file from its last checkpoint.")


class _Replay(ReadInPassing):
    """A one-shot reader whose first items were already read: gives them back before the rest (a resume's check reads
    those before its point in passing, as :class:`~qkhooks.data.readers.IterReader` does)."""

    def __init__(self, reader: Any, seen: list[Any], rest: Iterator[Any]):
        self.reader, self.length = reader, reader.length
        self._rows: Iterator[Any] | None = itertools.chain(seen, rest)

    def rows(self, start: int) -> Iterator[Any]:
        checked = self._rows_after_check(start)
        if checked is not None:
            return checked
        if self._rows is None:
            return self.reader.rows(start)  # read once already: the reader says so
        rows, self._rows = self._rows, None
        return itertools.islice(rows, start, None)

    def decode(self, row: Any, position: int) -> tuple[str | None, RawItem]:
        return self.reader.decode(row, position)

    def row_id(self, row: Any, position: int) -> str:
        return self.reader.row_id(row, position)

    def __getstate__(self) -> dict[str, Any]:  # as IterReader's: the rows stay in the main process
        return {**self.__dict__, "_rows": None, "_again": None}


_WORKER_STREAM: ItemStream | None = None


def _set_worker_stream(stream: ItemStream, pil_limit: int | None) -> None:
    global _WORKER_STREAM
    _WORKER_STREAM = stream
    torch.set_num_threads(1)  # decoding workers: the model's threads stay with the main process
    set_pil_limit(pil_limit)  # the main process's, where the worker was spawned with PIL's default


def _worker_decode(rows: list[tuple[int, Any]], stamps: bool = False
                   ) -> tuple[list[dict[str, Any]], list[tuple[str, str]], tuple[str, ...]]:
    assert _WORKER_STREAM is not None
    return _WORKER_STREAM._decode_rows(rows, stamps)


# ---------------------------------------------------------------------------------------------- opening


def _unwrap_loader(loader: torch.utils.data.DataLoader) -> Any:
    """A DataLoader's dataset, read in its own order: qkhooks batches and preprocesses the items itself. A sampler
    or batch sampler that reads other items than all of them is refused (found by review: its subset was ignored and
    the whole dataset recorded); ``shuffle=True`` (every item, in another order) and ``drop_last`` are warned of."""
    from torch.utils.data import BatchSampler, RandomSampler, SequentialSampler

    dataset = loader.dataset
    if isinstance(dataset, torch.utils.data.IterableDataset):  # a DataLoader takes no sampler for one
        return dataset
    batches = loader.batch_sampler
    custom_batches = batches is not None and type(batches) is not BatchSampler
    sampler = loader.sampler if batches is None or custom_batches else batches.sampler
    whole = getattr(sampler, "data_source", None) is dataset
    in_order = type(sampler) is SequentialSampler and whole
    shuffled = (type(sampler) is RandomSampler and whole and not sampler.replacement
                and getattr(sampler, "_num_samples", None) is None)
    if custom_batches or not (in_order or shuffled):
        what = (f"batch_sampler ({type(batches).__name__})" if custom_batches else
                f"sampler ({type(sampler).__name__})" if batches is None or batches.sampler is loader.sampler else
                f"batch_sampler's sampler ({type(sampler).__name__})")
        split = ("; to split the data over processes, pass the dataset with shard=(rank, world) (each rank records "
                 "a contiguous block; qkhooks.distributed.merge_shards joins them)"
                 if "Distributed" in type(sampler).__name__ else "")
        raise QKHooksError(
            f"the DataLoader's {what} chooses which items of its dataset are read, but qkhooks does not use a "
            "DataLoader's sampler: it reads the DataLoader's dataset itself, every item in index order, and batches "
            "it itself (so that ids and resumes are reproducible), so the whole dataset would be recorded, not what "
            "the sampler chooses. To record a subset, pass torch.utils.data.Subset(dataset, indices) instead of the "
            f"DataLoader (or the dataset itself to record all of it){split}.")
    if shuffled:
        warnings.warn("the DataLoader's shuffle=True (RandomSampler) is not used: qkhooks reads every item of its "
                      "dataset once, in index order, so that ids and resumes are reproducible.", stacklevel=4)
    if batches is not None and batches.drop_last and len(dataset) % batches.batch_size:
        warnings.warn(f"the DataLoader's drop_last=True is not used: qkhooks batches the dataset itself and records "
                      f"all {len(dataset)} items, the last {len(dataset) % batches.batch_size} (which the DataLoader "
                      "drops) too; pass torch.utils.data.Subset(dataset, range(n)) to record only the first n.",
                      stacklevel=4)
    return dataset


def open_source(
    data: Any,
    image_config: ImageConfig,
    limit: int | None = None,
    *,
    image_column: str | None = None,
    masks: Mapping[str, str] | None = None,
) -> ImageDataset | ItemStream:
    """Open any data ``record_dataset`` accepts, preprocessed for one model.

    Args:
        data: a qkhooks spec string (a folder, ``samples``, ``voc``, ``o3:N``, ...; see
            :func:`qkhooks.data.open_dataset`) or an :class:`ImageDataset` (returned as they are);
            ``hfds:DIR_OR_NAME[:SPLIT]`` (a ``save_to_disk`` folder, an image folder, a .parquet file, or a hub
            name, streamed); ``wds:PATTERN`` (tar shards, e.g. ``wds:shards/part-{000..009}.tar``); a Hugging
            Face ``Dataset`` / ``IterableDataset``; a torch ``Dataset``, ``IterableDataset`` or DataLoader; a
            sequence or any iterable of items (see the module docstring).
        image_config: the model's preprocessing.
        limit: only the first ``limit`` items.
        image_column: the Hugging Face column holding the images (default: the one ``Image`` feature).
        masks: Hugging Face columns of the masks, e.g. ``{"objects": "instance_mask"}`` (default: columns named
            ``objects``, ``target``, ``distractor``).

    Raises:
        QKHooksError: an unknown spec, a missing extra (with the pip command), an empty source, an item without
            an image, an unknown column.
    """
    if isinstance(data, ImageDataset):
        if data.image_config != image_config:  # its pixels follow its own config; the run would state the model's
            raise QKHooksError(
                f"the dataset {data.name!r} was opened with another preprocessing ({data.image_config}) than the "
                f"model's ({image_config}), so the model would be fed pixels it does not expect while the run file "
                "stated the model's; open it with the model's: qkhooks.data.open_dataset(spec, "
                "load_model(...).image_config), or give the spec itself to record_dataset.")
        return data
    if isinstance(data, (str, os.PathLike)) and not str(data).startswith(STREAMED_PREFIXES):
        return open_dataset(data, image_config, limit=limit)
    check_limit(limit)
    name, root = type(data).__name__, None
    if isinstance(data, str) and data.startswith("hfds:"):
        name, (data, root) = data, open_hfds(data[len("hfds:") :])
    elif isinstance(data, str):
        name, reader = data, open_wds(data[len("wds:") :])
        return ItemStream(name, reader, image_config, limit)
    if isinstance(data, torch.utils.data.DataLoader):
        name, data = f"{type(data.dataset).__name__} of a DataLoader", _unwrap_loader(data)
    if is_hf(data):
        if not str(name).startswith("hfds:"):
            name = f"datasets:{getattr(data, 'info', None) and data.info.dataset_name or type(data).__name__}"
        return ItemStream(name, hf_reader(data, image_column, masks, root), image_config, limit)
    if image_column is not None or masks is not None:
        raise QKHooksError("image_column= and masks= apply to Hugging Face datasets; for other sources give items as "
                           "dicts with 'image', 'objects', 'target', 'distractor'.")
    if type(data).__name__ in ("DatasetDict", "IterableDatasetDict"):
        raise QKHooksError(f"a Hugging Face {type(data).__name__} holds the splits {sorted(data)}; pass one, e.g. "
                           "data['validation'].")
    if isinstance(data, torch.Tensor):
        raise QKHooksError(
            f"the data is one tensor {tuple(data.shape)} {data.dtype}, the output of some transform; qkhooks applies "
            "the model's own preprocessing, so give the images as loaded (a list of PIL images or uint8 HWC arrays, a "
            "folder, a dataset). Model inputs you prepared yourself are recorded by `with qkhooks.record(model) as "
            "run: model(x)`.")
    if isinstance(data, (dict, bytes, Image.Image)) or (isinstance(data, np.ndarray) and data.ndim != 4):
        raise QKHooksError(f"cannot record a single {type(data).__name__}; pass a dataset, a list or an iterable of "
                           f"images, or a spec ({_SPECS}, a folder, ...).")
    if isinstance(data, torch.utils.data.IterableDataset) or not hasattr(data, "__getitem__") or not hasattr(data, "__len__"):
        if not isinstance(data, Iterable):
            raise QKHooksError(f"cannot read images from a {type(data).__name__}: pass a torch Dataset, a sequence or "
                               f"an iterable of images, a Hugging Face dataset, or a spec ({_SPECS}, a folder, ...).")
        return ItemStream(f"iterable:{name}", IterReader(data), image_config, limit)
    return ItemStream(f"torch:{name}" if isinstance(data, torch.utils.data.Dataset) else f"sequence:{name}",
                      folder_reader(data) or MapReader(data), image_config, limit)
