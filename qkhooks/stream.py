"""Stream a dataset through a model into one run file (what ``qkhooks record`` runs).

:func:`record_dataset` opens the dataset with the model's own preprocessing, wraps the model in
:func:`qkhooks.record` with the run writer and any streaming reducers as sinks, and walks the images in a
fixed order. The writer commits whole batches (data, then ids, then the ``committed`` counter), and reducer
states are checkpointed through the same ordered queue, so a run killed at any moment resumes from the last
checkpoint with no image lost or written twice.

Per-image extras stored next to the maps (when the dataset has masks):

- ``masks/target``, ``masks/distractor`` (n, gh, gw): odd-one-out masks on the patch grid (area fraction);
- ``masks/objects`` (n, gh, gw) int32: per-patch majority instance label, the data's own ids (0 = background).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import json
import os
import sys
import warnings
import weakref
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from PIL import Image
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from qkhooks._version import __version__
from qkhooks.attention import parse_attention
from qkhooks.capture import (BatchCapture, model_sites, modes_kept, parse_modes, record, refuse_maps_only_modes,
                              refuse_sinks_holding_images, structure_key, takes_inputs)
from qkhooks.data import ImageDataset, collate
from qkhooks.data.masks import TokenCells, receptive_cells, token_cells
from qkhooks.data.items import set_pil_limit
from qkhooks.data.datasets import check_limit, is_whole
from qkhooks.data.readers import check_bar
from qkhooks.data.sources import ItemStream, open_source, refuse_batching
from qkhooks import data_files
from qkhooks.data.items import NO_STAMP, read_stamped, stamps_read
from qkhooks.data_files import absolute_spec, file_hash_column, file_mtime_column, file_size_column
from qkhooks.errors import DataRefusal, MissingReducer, QKHooksError, RunInterrupted, refuse_unknown_keywords
from qkhooks.models.base import AttentionSite, select_layers
from qkhooks.models.unsupported import (hooked_paths, left_out_by_design, refuse_altered_qk, refuse_compiled,
                                        refuse_moved_pixels, refuse_moved_tokens, unmodelled_parts)
from qkhooks.models.load import LoadedModel, check_device, load_model
from qkhooks.options import DEFAULT_MODES, RecordOptions
from qkhooks.reducers import Recipe, Reducer, recipe, to_numpy_state
from qkhooks.results import LayerGeometry, observe_geometry
from qkhooks.spectrum import layer_spectrum
from qkhooks.store.format import (FILE_HASHES, FILE_MTIMES, FILE_SIZES, INFO_SCHEMA_VERSION, UNCHECKED_RESUMES,
                                  committed, id_problem, resume_point)
from qkhooks.store.writer import RunWriter

__all__ = ["record_dataset", "RecordResult", "WriterSink", "probe_geometry", "same_layout_layers", "rows_layers"]


@dataclasses.dataclass
class RecordResult:
    """What a recording produced: the run file (if any), the reducers, and how many images went through."""

    path: Path | None
    reducers: list[Reducer]
    images: int
    skipped: list[tuple[str, str]]
    resumed_from: int | None = None  # a resume: the images it kept from the run file (the resume point), else None

    def reducer(self, name: str) -> Reducer:
        """The reducer called ``name``; a :class:`MissingReducer` (a QKHooksError and a KeyError) lists the others."""
        for r in self.reducers:
            if r.name == name:
                return r
        raise MissingReducer(name, [r.name for r in self.reducers])


class WriterSink:
    """Feeds complete batches to a :class:`qkhooks.store.RunWriter` (maps, attention, per-image extras, and each
    image file's size, modification time and content hash).

    The file columns come from the batch where ``stamped`` names them (:data:`~qkhooks.store.format.FILE_SIZES`,
    :data:`~qkhooks.store.format.FILE_MTIMES`, :data:`~qkhooks.store.format.FILE_HASHES`): ``batch.meta
    ["file_stamps"]``, one (size, mtime ns, hash) per image, taken where the image was read and decoded
    (:func:`qkhooks.data.items.stamps_read`; what :func:`record_dataset` does, so no file is read again here); else
    from ``file_sizes``, ``file_mtimes`` and ``file_hashes`` of the batch's ids
    (:func:`qkhooks.data_files.file_size_column`, :func:`~qkhooks.data_files.file_mtime_column`,
    :func:`~qkhooks.data_files.file_hash_column`: a stat and a read of each file in this process)."""

    def __init__(self, writer: Any, store_modes: bool = True,
                 file_sizes: Callable[[Sequence[str]], Any] | None = None,
                 file_mtimes: Callable[[Sequence[str]], Any] | None = None,
                 file_hashes: Callable[[Sequence[str]], Any] | None = None,
                 stamped: Sequence[str] = ()):
        self.writer = writer
        self.store_modes = store_modes
        self.file_sizes = file_sizes
        self.file_mtimes = file_mtimes
        self.file_hashes = file_hashes
        self.stamped = tuple(stamped)
        self._statics_written = False

    def update(self, batch: BatchCapture) -> None:
        if not self._statics_written:  # once per run, before the first batch fixes the layout
            for name, value in batch.statics().items():
                self.writer.write_static(name, value)
            self._statics_written = True
        arrays = batch.arrays()
        if not self.store_modes:
            arrays = {k: v for k, v in arrays.items() if not k.startswith("modes/")}
        arrays.update(batch.meta.get("arrays", {}))
        layout = self.writer.layout_arrays
        stamps = batch.meta.get("file_stamps")
        for index, (name, column) in enumerate(((FILE_SIZES, self.file_sizes), (FILE_MTIMES, self.file_mtimes),
                                                (FILE_HASHES, self.file_hashes))):
            if layout is not None and name not in layout:  # not in a resumed run from before it
                continue
            if name in self.stamped:
                if stamps is None or len(stamps) != len(batch.ids):
                    raise QKHooksError(
                        f"WriterSink was asked to store {name} from the batches' file stamps, but a batch of "
                        f"{len(batch.ids)} images carries {'none' if stamps is None else len(stamps)}; read the images "
                        "inside qkhooks.data.items.stamps_read() and pass each one's stamp as meta['file_stamps'], or "
                        "give WriterSink file_sizes= / file_mtimes= / file_hashes= instead.")
                arrays[name] = np.array([int(stamp[index]) for stamp in stamps], np.int64)
            elif column is not None:
                arrays[name] = column(batch.ids)
        self.writer.write_batch(batch.ids, arrays)


def mask_cells(sites: Sequence[AttentionSite], geometry: dict[int, LayerGeometry], image_size: tuple[int, int],
               grids: str, model: nn.Module | None = None) -> dict[tuple[int, int], TokenCells]:
    """The input pixels each token shows on the grids the dataset's masks are read onto (``grids``: ``"first"``, the
    first layer's, for odd-one-out masks; ``"all"`` for object labels, every stage's; ``"none"``), from the patch
    size of the layers on that grid (:func:`~qkhooks.data.masks.token_cells`). Refused, before any file is
    written, for a grid whose tokens are not cells of the input, and where a module on the way from the image to
    the tokens may move them (someone else's hook on the patch embedding, :attr:`AttentionSite.pixel_route`, or a
    pre-hook on ``model``, the model the sites were found on, or a module of it holding the patch embedding), or a
    module the tokens pass through on their way to the attention may (someone else's hook on a block, a norm)."""
    if grids == "none":
        return {}
    first = min(geometry)
    on_grid: dict[tuple[int, int], list[AttentionSite]] = {}
    for site in sites:
        g = geometry.get(site.layer)
        if g is not None and g.grid is not None and (grids == "all" or site.layer == first):
            on_grid.setdefault(tuple(int(v) for v in g.grid), []).append(site)
    cells = {}
    for grid, here in sorted(on_grid.items(), reverse=True):
        for site in here:
            refuse_moved_pixels(site.family, site.pixel_route, model)
            if model is not None:
                refuse_moved_tokens(site.family, site.path, site.block_path, model)
        made = {receptive_cells(image_size, s.pixel_convs()) for s in here if s.pixel_convs is not None}
        made = made or {token_cells(image_size, grid, s.patch_size) for s in here if s.patch_size is not None}
        made = made or {token_cells(image_size, grid)}
        if len(made) > 1:
            raise QKHooksError(f"the layers on the {grid[0]}x{grid[1]} grid ({', '.join(s.path for s in here)}) put "
                               "their tokens on other pixels (their patch sizes or convolutions differ), so masks "
                               "cannot be read onto that grid; record the layers of one patch embedding (--layers).")
        found = made.pop()
        if found.grid != grid:
            raise QKHooksError(f"the pixels of the {grid[0]}x{grid[1]} grid's tokens were read as a "
                               f"{found.grid[0]}x{found.grid[1]} grid from the model's convolutions, so masks cannot be "
                               "read onto them; record this model on images without masks.")
        cells[grid] = found
    return cells


def _batch_meta(batch: dict[str, Any], geometry: dict[int, LayerGeometry], image_size: tuple[int, int],
                cells: dict[tuple[int, int], TokenCells], plan: Recipe) -> dict[str, Any]:
    """Every recorded layer's geometry (``meta["geometry"]``, from :func:`probe_geometry`), the first layer's prefix
    tokens and patch grid (``num_prefix_tokens``, ``grid``), the pixels each grid's tokens show (``cells``,
    :func:`mask_cells`), plus the metadata the recipe makes of the dataset's extras (masks, objects; arrays to
    store under "arrays")."""
    size = tuple(int(v) for v in batch["pixel_values"].shape[-2:])
    if size != tuple(image_size):
        raise QKHooksError(f"a batch of {size[0]}x{size[1]} images reached a recording laid out for "
                           f"{image_size[0]}x{image_size[1]} (every layer's grid depends on it); preprocess every "
                           "image to the model's input size.")
    first = geometry[min(geometry)]
    meta: dict[str, Any] = {"num_prefix_tokens": first.num_prefix_tokens, "geometry": geometry, "cells": cells}
    if "file_stamp" in batch:  # each image file's (size, mtime, hash), taken where it was read: WriterSink stores them
        meta["file_stamps"] = list(batch["file_stamp"])
    if first.grid is not None:
        meta["grid"] = first.grid
    meta.update(plan.batch_meta(batch, meta))
    return meta


# Model -> (its structure key, {(input size, device, dtype): {(layer, module path): geometry}}). The geometry is the
# model's structure at one input shape, so one probe forward (of every site) serves every caller and layer selection
# (the demo asks five times: rows, BFD and each run's record_dataset) while the structure is the one probed (the key
# of the site cache, capture.structure_key: a module replaced or a setting changed probes again); weak keys: a
# deleted model frees its entry.
_PROBED: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple, dict[tuple, dict[tuple[int, str], LayerGeometry]]]]" = (
    weakref.WeakKeyDictionary())
# Model classes whose every layer sees the prefix tokens plus the patch embedding's whole grid, one global attention
# over one grid: their geometry is known without a forward. Others (windows, stages, reduced keys, class attention,
# ViTMAE's random masking, NaFlex packing) are probed.
_STATIC_GEOMETRY = {
    "timm.models.vision_transformer.VisionTransformer", "timm.models.deit.VisionTransformerDistilled",
    "transformers.models.vit.modeling_vit.ViTModel", "transformers.models.vit.modeling_vit.ViTForImageClassification",
    "transformers.models.dinov2.modeling_dinov2.Dinov2Model",
    "transformers.models.dinov2.modeling_dinov2.Dinov2ForImageClassification",
}


def refuse_run_file_sites(sites: Sequence[AttentionSite]) -> None:
    """Refuse a model whose layers cannot be streamed into a run file (:meth:`AttentionSite.run_file_refusal`: a
    packed vision tower, ImageGPT, a text model), naming the first such layer and what works instead."""
    refused = [f"{s.path}: {why}" for s in sites if (why := s.run_file_refusal())]  # zoo-packed: packed vision towers
    if refused:
        raise QKHooksError("this model cannot be recorded into a run file: " + refused[0])


def probe_geometry(net: nn.Module, sites: Sequence[AttentionSite], image_size: tuple[int, int],
                   device: str | torch.device = "cpu") -> dict[int, LayerGeometry]:
    """Every site's geometry at this input size: from one forward of a blank image before the recording starts, once
    per model and input shape, or without a forward where the model's class fixes it (plain ViTs).

    Windowed and multi-stage models only show their per-layer grids, windows and key counts in a call (a Swin
    stage's grid is the block's input), and the run file's layout, the reducers and the dataset's masks need them
    before the first batch. The probe's outputs go nowhere (no sink, no file)."""
    refuse_run_file_sites(sites)
    dtype = next(net.parameters()).dtype
    static = _static_geometry(net, sites, image_size)
    if static is not None:
        return static
    structure = structure_key(net)
    if net not in _PROBED or _PROBED[net][0] != structure:
        _PROBED[net] = (structure, {})
    known = _PROBED[net][1].setdefault((tuple(int(v) for v in image_size), str(torch.device(device)), dtype), {})
    wanted = [(s.layer, s.path) for s in sites]
    if any(w not in known for w in wanted):
        every = _every_site(net, sites)
        found = _probe_forward(net, every, image_size, device, dtype)
        known.update({(s.layer, s.path): found[s.layer] for s in every})
    return {layer: known[(layer, path)] for layer, path in wanted}


def _every_site(net: nn.Module, sites: Sequence[AttentionSite]) -> Sequence[AttentionSite]:
    """All the model's sites when the adapter finds the given ones among them (one probe then serves any selection;
    a partial recording's among the sites ``skip_unmodelled`` finds), else the given ones (sites a caller made by
    hand). From the site cache: the search is not repeated."""
    given = {(s.layer, s.path) for s in sites}
    for skip_unmodelled in (False, True):
        try:
            every = model_sites(net, skip_unmodelled)
        except QKHooksError:
            continue
        if given <= {(s.layer, s.path) for s in every}:
            return every
    return sites


def _static_geometry(net: nn.Module, sites: Sequence[AttentionSite], image_size: tuple[int, int]) -> dict[int, LayerGeometry] | None:
    """The geometry of a plain ViT (:data:`_STATIC_GEOMETRY`): the grid from its patch embedding (timm's own
    ``dynamic_feat_size``, padding included) or the site's patch size, every layer prefix + grid tokens; else None."""
    cls = type(net)
    if f"{cls.__module__}.{cls.__qualname__}" not in _STATIC_GEOMETRY or any(type(s) is not AttentionSite for s in sites):
        return None
    if any(s.patch_size is None or s.key_tokens is not None or s.class_attention for s in sites):
        return None
    embed = getattr(net, "patch_embed", None)
    found = {}
    for site in sites:
        grid = embed.dynamic_feat_size(tuple(image_size)) if hasattr(embed, "dynamic_feat_size") else site.grid_for_image(*image_size)
        if tuple(grid) != tuple(site.grid or ()) and not getattr(embed, "dynamic_img_size", False):
            return None  # not the size it was built for: the probe runs it (and refuses it with the fix if it fails)
        tokens = site.num_prefix_tokens + int(grid[0]) * int(grid[1])
        found[site.layer] = observe_geometry(site, tokens, tokens, tuple(image_size))
    return found


@contextlib.contextmanager
def refusing_a_failing_size(net: nn.Module, run: Any, image_size: Sequence[int]) -> Iterator[None]:
    """Around a recording's first forward at this input size: where it fails and the model alone (``run``'s hooks
    and sinks taken off) fails on a blank image of the size too, the model's own error (a window that does not divide
    a stage, a position table it reads as a square) becomes a refusal naming the size and the fix; any other error
    (a sink's, memory) passes as it is. The geometry probe makes that forward for most models, but a plain ViT's
    geometry needs none, so the recording's first batch or BFD's blank image meets the error first."""
    try:
        yield
    except QKHooksError:
        raise
    except Exception as err:
        run.detach()
        weight = next(net.parameters())
        try:
            with torch.no_grad():
                net(torch.zeros(1, 3, *image_size, device=weight.device, dtype=weight.dtype))
        except Exception as own:
            raise QKHooksError(
                f"the model fails on a {image_size[0]}x{image_size[1]} image, the size its image config gives, with "
                f"no qkhooks hook on it ({type(own).__name__}: {own}); nothing was written. If it takes another input "
                "size, load it with that size (load_model(module, image_config=...), or the model's own pretrained "
                f"config); if it fails at the size it was built for too, its own forward is at fault: run it alone on "
                f"torch.zeros(1, 3, {image_size[0]}, {image_size[1]}) to see why."
            ) from err
        raise


def _probe_forward(net: nn.Module, sites: Sequence[AttentionSite], image_size: tuple[int, int],
                   device: str | torch.device, dtype: torch.dtype) -> dict[int, LayerGeometry]:
    """The sites' geometry read off one forward of a blank image."""
    found: dict[int, LayerGeometry] = {}

    def note(batch: BatchCapture) -> None:
        for site in sites:
            cap = batch.captures[site.layer]
            found[site.layer] = observe_geometry(site, int(cap.query.shape[-1]), int(cap.key.shape[-1]),
                                                 tuple(image_size))

    with record(net, modes=1, sites=sites, sinks=[_Callback(note)]) as run, torch.no_grad(), \
            refusing_a_failing_size(net, run, image_size):
        run(torch.zeros(1, 3, *image_size, device=device, dtype=dtype))
    return found


def _check_rows_geometry(specs: Sequence[Any], geometry: dict[int, LayerGeometry]) -> None:
    """Refuse attention rows or pooled rows on layers whose token layout differs from the first recorded layer's:
    the query tokens of a batch (odd-one-out targets, the centre patch) index one layout."""
    first = geometry[min(geometry)]
    for spec in specs:
        if spec.kind not in ("rows", "pooled"):
            continue
        other = [l for l, g in sorted(geometry.items()) if spec.covers(l)
                 and (g.grid, g.num_prefix_tokens, g.query_tokens) != (first.grid, first.num_prefix_tokens, first.query_tokens)]
        if other:
            raise QKHooksError(
                f"attention {spec.kind!r} picks query tokens by their index in layer {first.layer}'s tokens "
                f"({first.describe()}), but layers {other} have other tokens ({geometry[other[0]].describe()}); "
                f"record {spec.kind!r} on the layers that share layer {first.layer}'s grid (e.g. "
                f"--attention {spec.kind}:{','.join(str(l) for l in same_layout_layers(geometry))}), or full maps.")


def rows_layers(net: nn.Module, sites: Sequence[AttentionSite], image_size: tuple[int, int],
                device: str | torch.device = "cpu") -> tuple[list[int], dict[int, str]]:
    """The layers whose attention rows one batch's query tokens can be recorded on (odd-one-out targets, the centre
    patch), and why each other layer cannot: windowed (a row lives in its window), class attention (only the class
    token queries), or tokens laid out otherwise than the first such layer's (another stage's grid)."""
    geometry = probe_geometry(net, sites, image_size, device)
    left_out: dict[int, str] = {}
    candidates = []
    for site in sites:
        try:
            site.check_attention_kind("rows")
        except QKHooksError as exc:
            left_out[site.layer] = str(exc)
            continue
        if site.class_attention:
            left_out[site.layer] = f"{site.path}: only the class token queries (class attention), not the image's tokens"
            continue
        candidates.append(site.layer)
    if not candidates:
        return [], left_out
    kept = same_layout_layers({l: geometry[l] for l in candidates})
    for l in candidates:
        if l not in kept:
            left_out[l] = (f"its tokens ({geometry[l].describe()}) are not layer {kept[0]}'s ({geometry[kept[0]].describe()}), "
                           "and one batch's query tokens index one layout")
    return kept, left_out


def same_layout_layers(geometry: dict[int, LayerGeometry]) -> list[int]:
    """The layers whose query tokens are laid out as the first layer's (one index names the same token in each)."""
    first = geometry[min(geometry)]
    key = (first.grid, first.num_prefix_tokens, first.query_tokens)
    return [l for l, g in sorted(geometry.items()) if (g.grid, g.num_prefix_tokens, g.query_tokens) == key]


def _kept_on_resume(writer: Any, reducers: Sequence[Reducer]) -> int | None:
    """How many committed images a resume of ``writer``'s closed file keeps (None: its checkpoint cannot be read)."""
    try:
        images, states = writer.checkpoint() or (None, {})
    except Exception:  # a run interrupted while its checkpoint was written: the message says no number
        return None
    return resume_point(writer.committed, images, states, [r.name for r in reducers])


def _resume(writer: Any, reducers: Sequence[Reducer], ids: Sequence[str],
            decodes: Callable[[int], bool] | None = None,
            file_sizes: Callable[[Sequence[str]], Any] | None = None,
            skipped_now: Sequence[tuple[str, str]] = (),
            file_mtimes: Callable[[Sequence[str]], Any] | None = None,
            file_hashes: Callable[[Sequence[str]], Any] | None = None, progress: bool = False) -> tuple[int, int]:
    """Restore the reducers and return how many images are done (the caller cuts the file back to that).

    Reducer states are checkpointed every few batches, so the file may hold images past the checkpoint;
    those are cut and recorded again, which keeps maps and statistics of the same images
    (:func:`qkhooks.store.format.resume_point`), but only after every check of the resume has passed, so that a
    refused resume leaves the file as it found it. Returns (images kept, dataset index to continue from).

    The images kept must be the dataset's, in its order, up to the resume point: a dataset image before it that
    is not in the file is allowed only when it still fails to decode (``decodes(index)`` False: it was skipped);
    one that decodes was added, or renamed, since the run started, and the resume is refused (it could never be
    recorded in order). With ``file_sizes`` (a folder's), a kept image whose file has another size than the run
    recorded is refused too: it was changed since, and the run would keep maps of a file no longer there; with
    ``file_mtimes``, so is one whose modification time differs and, where ``file_hashes`` and the run's hashes are
    there, whose bytes differ too (a file replaced by another of the same size: another photo of the same pixel size
    stored uncompressed; a data set copied again has new times and the same bytes, and resumes). Sizes and times are
    one ``stat`` a kept image, so every one is checked (only files whose time changed are read and hashed); a run
    from before the times were stored (no :data:`FILE_MTIMES`) is checked by size only, with a warning. Everything
    is checked before the file is cut. A kept image that the dataset now skips as it opens (``skipped_now``: id,
    reason) is named with that reason: it is there, and the fix is the reason's. With ``progress``, hashing the kept
    files whose time changed shows a bar where it takes a while.
    """
    images, states = writer.checkpoint() or (None, {})
    now_skipped = dict(skipped_now)
    done = resume_point(writer.committed, images, states, [r.name for r in reducers])
    kept = writer.ids[:done]
    position = {id_: i for i, id_ in enumerate(ids)}
    last = -1
    fix = ("Put the dataset back as it was when the run started, record it into a new --out, or --overwrite to "
           "start again.")
    for id_ in kept:  # committed ids must be the dataset's images in order (unreadable ones missing)
        i = position.get(id_, -1)
        if i < 0 and id_ in now_skipped:
            raise QKHooksError(
                f"cannot resume {writer.path}: image {id_!r} of the run file is skipped now as the dataset is opened "
                f"({now_skipped[id_]}), although it was recorded. Fix that (a photo over PIL's pixel limit, which "
                "qkhooks now holds exactly where earlier versions let photos under twice it through: raise "
                "PIL.Image.MAX_IMAGE_PIXELS before recording), or record into a new --out, or --overwrite to start "
                "again.")
        if i <= last:
            where = "is no longer in the dataset" if i < 0 else "is not where the dataset has it"
            raise QKHooksError(
                f"cannot resume {writer.path}: image {id_!r} of the run file {where}; the dataset changed since "
                f"the run started (files removed, renamed or reordered). {fix}"
            )
        last = i
    _refuse_changed_files(writer, kept, file_sizes, file_mtimes, file_hashes, fix, progress=progress)
    if decodes is not None:
        recorded = set(kept)
        for i in range(last + 1):
            if ids[i] not in recorded and decodes(i):
                raise QKHooksError(
                    f"cannot resume {writer.path}: the dataset's image {ids[i]!r} (number {i}) comes before the run's "
                    f"resume point ({ids[last]!r}, number {last}) but is not in the run file, and it decodes; it was "
                    f"added (or renamed) since the run started, and a resume records only after that point. {fix}"
                )
    if done:
        for r in reducers:  # a Reducer refuses a state of another kind or configuration; the stream position loads
            if isinstance(r, Reducer):
                r.load_saved(states[r.name])
            else:
                r.load_state_dict(states[r.name])
    return done, last + 1


def _refuse_changed_files(writer: Any, kept: Sequence[str], file_sizes: Callable[[Sequence[str]], Any] | None,
                          file_mtimes: Callable[[Sequence[str]], Any] | None,
                          file_hashes: Callable[[Sequence[str]], Any] | None, fix: str, stacklevel: int = 5,
                          held_hint: str = "", progress: bool = False, held: bool = True) -> None:
    """Refuse a resume whose kept images' files (``kept``: the run's first ids) changed since they were recorded:
    each one's size and modification time now (``file_sizes``, ``file_mtimes`` of the ids: one ``stat`` a file, or a
    tar member's header) against the run's, and, for those whose time changed, its bytes' hash (``file_hashes``, of
    those ids only, with ``progress`` under a bar where that takes a while: :func:`~qkhooks.data.readers.check_bar`;
    round 48: none was shown). See :func:`_resume`; a stream's resume checks its kept files so too
    (:func:`_refuse_changed_stream_files`). ``held``: whether the images held in the data (no file) are checked by
    their hashes too (not in a resume by ids alone)."""
    done = len(kept)
    sizes_then = writer.rows(FILE_SIZES, done) if file_sizes is not None and done else None
    if sizes_then is not None:
        changed = [(id_, int(was), int(now)) for id_, was, now in zip(kept, sizes_then, file_sizes(kept))
                   if was >= 0 and was != now]
        if changed:
            id_, was, now = changed[0]
            raise QKHooksError(
                f"cannot resume {writer.path}: {len(changed)} of the {done} images it keeps have another file size than "
                f"when it recorded them (first: {id_!r}, {was} bytes then, {now if now >= 0 else 'unreadable'} now), "
                "so they were changed since, and the run would keep maps of files that are no longer there (if only "
                f"their metadata changed, their maps would be the same: record again with --overwrite to be sure). {fix}")
    times_then = writer.rows(FILE_MTIMES, done) if file_mtimes is not None and done else None
    if times_then is not None:
        # -1 alone is "no file" (file_mtime_column): a time before 1970 is negative too (an archive's, a tool's
        # os.utime), and is compared as any other
        changed = [(id_, int(was), int(now)) for id_, was, now in zip(kept, times_then, file_mtimes(kept))
                   if was != -1 and was != now]
        hashes_then = writer.rows(FILE_HASHES, done) if changed and file_hashes is not None else None
        if hashes_then is not None:  # a time changed: the bytes decide (a data set copied again keeps them)
            row = {id_: i for i, id_ in enumerate(kept)}
            now_hashes = [int(file_hashes([id_])[0]) for id_, _, _ in check_bar(changed, len(changed), progress)]
            changed = [c for c, h in zip(changed, now_hashes) if h == -1 or h != hashes_then[row[c[0]]]]
        if changed:
            id_, was, now = changed[0]
            checked = ("and their bytes differ from those it recorded (BLAKE2b), so they hold other pictures"
                       if hashes_then is not None else
                       "so they may hold other pictures")
            raise QKHooksError(
                f"cannot resume {writer.path}: {len(changed)} of the {done} images it keeps were modified since it "
                f"recorded them (first: {id_!r}, its file's modification time {_when(was)} then, "
                f"{_when(now) if now != -1 else 'unreadable'} now), {checked} (one of the same file size: another "
                "photo of the same pixel size, stored uncompressed), and the run would mix maps of two datasets. "
                + ("" if hashes_then is not None else "If the files were only touched or copied without their times "
                   "(cp without -p), their maps are the same: record again with --overwrite to be sure. ") + fix)
        if held and file_hashes is not None:  # images held in the dataset as bytes (no file, no time): their hashes
            _refuse_changed_held(writer, kept, times_then, file_hashes, fix, held_hint)
    elif file_mtimes is not None and done:
        warnings.warn(f"{writer.path} was recorded before qkhooks stored each image file's modification time "
                      f"({FILE_MTIMES}), so this resume checks the {done} images it keeps by "
                      f"{'their file sizes' if sizes_then is not None else 'their names'} only: a file replaced since "
                      "by another of the same size is not noticed. Record into a new --out (or --overwrite) to have "
                      "every file checked on a later resume.", stacklevel=stacklevel)


def _refuse_changed_held(writer: Any, kept: Sequence[str], times_then: Any,
                         file_hashes: Callable[[Sequence[str]], Any], fix: str, hint: str = "") -> None:
    """Refuse a resume whose kept images held in the dataset as bytes (no file: recorded time -1, a hash recorded;
    a map-style Hugging Face dataset's ``Image`` cells) hold other bytes now (``file_hashes`` of their ids: the
    dataset's bytes hashed again, -1 where the item is no longer bytes; a list's, tuple's or torch Dataset's
    in-memory images alike: their content hashed again; ``hint``: another cause the message names, for a Dataset
    read again). Review r46: only the dataset's length was compared, so images replaced since resumed into one run of
    two data sets without a word."""
    rows = [r for r, t in enumerate(times_then) if int(t) == -1]
    hashes_then = writer.rows(FILE_HASHES, len(kept)) if rows else None
    rows = [r for r in rows if hashes_then is not None and int(hashes_then[r]) != -1]
    if not rows:
        return
    now = file_hashes([kept[r] for r in rows])
    changed = [kept[r] for r, h in zip(rows, now) if int(h) != int(hashes_then[r])]
    if changed:
        raise QKHooksError(
            f"cannot resume {writer.path}: {len(changed)} of the {len(kept)} images it keeps hold other bytes in the "
            "dataset (encoded, or an in-memory array's or PIL image's pixels) than when it recorded them (first: "
            f"{changed[0]!r}; their BLAKE2b differs from the one the run recorded), so the dataset's images were "
            f"replaced or reordered since{hint}, and the run would mix maps of two datasets. {fix}")


def _duration(seconds: float) -> str:
    """A time to come, said roughly (``"4.7 h"``, ``"12 min"``, ``"40 s"``)."""
    if seconds >= 5400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def _when(ns: int) -> str:
    """A file's modification time (nanoseconds since the epoch) as UTC, to the nanosecond."""
    stamp = datetime.datetime.fromtimestamp(ns // 10**9, datetime.timezone.utc)
    return f"{stamp:%Y-%m-%d %H:%M:%S}.{ns % 10**9:09d} UTC"


def _decodes(dataset: Any, offset: int) -> Callable[[int], bool]:
    """Whether dataset image ``offset + i`` decodes now (an unreadable one returns None; its warning is hushed,
    and it is not added to the dataset's skipped list twice)."""
    def decodes(i: int) -> bool:
        before = list(getattr(dataset, "skipped", []))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                ok = dataset[offset + i] is not None
            except Exception:  # noqa: BLE001 - a failure to read is what this asks about
                ok = False
        if hasattr(dataset, "skipped"):
            dataset.skipped[:] = before
        return ok
    return decodes


def _keeps_train_modes(fn: Callable[..., "RecordResult"]) -> Callable[..., "RecordResult"]:
    """Record in eval mode and hand the caller's module back as it came: a model recorded in the middle of training
    goes on training with its dropout and drop-path on. Every submodule's own flag is put back (a frozen BatchNorm
    kept in eval stays so), also when the recording fails."""

    @functools.wraps(fn)
    def keeping(*args: Any, **kwargs: Any) -> "RecordResult":
        refuse_unknown_keywords(fn, kwargs)  # a QKHooksError listing the options, not Python's bare TypeError
        model = args[0] if args else kwargs.get("model")
        module = model.model if isinstance(model, LoadedModel) else model
        saved = [(m, m.training) for m in module.modules()] if isinstance(module, nn.Module) else []
        try:
            return fn(*args, **kwargs)
        finally:
            for m, training in saved:
                m.training = training

    return keeping


def check_options(opts: RecordOptions) -> None:
    """Refuse the options whose values are wrong whatever the model and the data (dtype, modes, limit, batch size,
    workers, checkpoint interval): :func:`record_dataset` checks them first, and the command line before it makes
    the run file's folder, so that such a refusal leaves nothing behind."""
    if opts.dtype not in ("float16", "float32"):
        raise QKHooksError(f"dtype must be float16 or float32, got {opts.dtype!r}.")
    if not is_whole(opts.checkpoint_every, 1):
        raise QKHooksError(f"checkpoint_every must be a whole number >= 1 (batches between checkpoints), got "
                           f"{opts.checkpoint_every!r}.")
    parse_modes(opts.modes)
    check_limit(opts.limit)
    refuse_batching(opts.batch_size, 0 if opts.num_workers is None else opts.num_workers)


@_keeps_train_modes
def record_dataset(
    model: LoadedModel | str | nn.Module,
    data: Any,
    out: str | os.PathLike | None = None,
    *,
    options: RecordOptions | None = None,
    reducers: Sequence[Reducer] | Recipe | None = None,
    device: str | torch.device = "cpu",
    resume: bool = False,
    overwrite: bool = False,
    resume_ids_only: bool = False,
    progress: bool = True,
    shard: tuple[int, int] | None = None,
    random_init: bool = False,
    on_batch: Callable[[BatchCapture], None] | None = None,
    # the fields of RecordOptions, as keywords (tests/test_options.py keeps them equal)
    modes: int | str | None = DEFAULT_MODES,
    layers: Sequence[int] | str | None = None,
    attention: Any = None,
    outputs: str = "unchanged",
    input: str = "normed",
    skip_unmodelled: bool = False,
    augmented: bool = False,
    dtype: str = "float16",
    compression: str = "none",
    checksum: bool = False,
    batch_size: int = 16,
    limit: int | None = None,
    num_workers: int | None = None,
    image_column: str | None = None,
    masks: dict[str, str] | None = None,
    store_modes: bool = True,
    keep_inputs: bool = False,
    checkpoint_every: int = 8,
    extra_config: dict[str, Any] | None = None,
) -> RecordResult:
    """Record a whole dataset, streaming to ``out`` (an HDF5 run file) and/or into reducers.

    Args:
        model: a :class:`LoadedModel`, a model spec string, or a timm / Hugging Face module (other modules:
            ``load_model(module, image_config=...)`` first).
        data: a dataset spec (folder, ``samples``, ``voc``, ``arc2017``, ``ade20k:DIR``, ``o3:N[:seed]``,
            ``o3dir:DIR``, ``hfds:DIR_OR_NAME[:SPLIT]``, ``wds:PATTERN``), an opened
            :class:`qkhooks.data.ImageDataset`, or the user's own data: a torch ``Dataset`` / ``IterableDataset`` /
            DataLoader, a Hugging Face ``Dataset`` / ``IterableDataset``, a sequence or iterable of images (see
            :func:`qkhooks.data.open_source`). Those are streamed in order; a resume continues at the position
            reached without decoding the images before it.
        out: the run file; None keeps results in the reducers only.
        options: how to record (:class:`qkhooks.options.RecordOptions`: modes, layers, attention, input,
            augmented, dtype, compression, checksum, batch_size, limit, num_workers, ...), or give the same names as
            keywords (documented there), not both.
        reducers: streaming statistics to keep, or a recipe that builds them and the per-batch metadata they
            read (:mod:`qkhooks.analysis.recipes`). Default: the registry's ``"default"`` recipe: top-k images
            per mode, anisotropy, and attention preference for odd-one-out data. A list of reducers gets the
            default recipe's metadata (odd-one-out query tokens and masks, object labels). Their states are saved,
            with their kind and configuration, in the checkpoint ``OUT.reducers`` beside the run file (a merged file
            holds them inside, under ``/reducers/<name>``); ``open_run(out).state(name)`` reads them.
        device: where the model runs.
        resume, overwrite: what to do when ``out`` exists (neither: an error, the file untouched).
        resume_ids_only: with ``resume``, for data that gives another image on each read (a random transform in a
            torch Dataset's ``__getitem__``, which a resume otherwise refuses): check the kept images by their ids
            (in order) and not their content; warned, and recorded in the run's config
            (:data:`~qkhooks.store.format.UNCHECKED_RESUMES`).
        progress: show a progress bar.
        shard: (rank, world_size) — record only this rank's contiguous block of the dataset.
        random_init: with a spec string, build the model without pretrained weights.
        on_batch: called with every complete batch (after the writer and the reducers).

    The model records in eval mode (no dropout or drop-path, whatever mode it came in); a module you pass (or the
    one inside your LoadedModel) is handed back in the train/eval mode it had, also when the recording fails.
    """
    opts = RecordOptions.from_keywords(options, **{k: v for k, v in locals().items() if k in RecordOptions.names()})
    check_options(opts)
    if opts.limit is not None:  # numpy's integers too, stored as the JSON number a resume's limit is compared with
        opts = dataclasses.replace(opts, limit=int(opts.limit))
    check_device(device)
    loaded = model if isinstance(model, LoadedModel) else load_model(model, random_init=random_init, device=device)
    # Recording measures the model as it runs for inference: dropout and drop-path off (a LoadedModel or a module
    # the caller put in training mode too; _keeps_train_modes gives the caller's modes back afterwards).
    net = loaded.model.to(device).eval()
    every = model_sites(net, opts.skip_unmodelled)
    refuse_compiled(net, hooked_paths(net, every))  # before any file is made: a compiled model's run would hold no image
    sites = select_layers(every, opts.layers)
    refuse_run_file_sites(sites)  # before the data is opened or any file made (review r40: a text model)
    refuse_altered_qk(sites)  # before any file is made (record() checks again at entry)
    unmodelled = unmodelled_parts(net, every) if opts.skip_unmodelled else {}
    attention_specs = parse_attention(opts.attention, every)
    modes_value = parse_modes(opts.modes)
    if isinstance(modes_value, int):  # more modes than the heads have: record all, and say so in the config
        refuse_maps_only_modes(sites)
        modes_value = modes_kept(modes_value, [layer_spectrum(s, opts.augmented).num_modes for s in sites], sites,
                                 stacklevel=4)
    if resume and overwrite:
        raise QKHooksError("--resume and --overwrite exclude each other: pick one.")
    if resume_ids_only and not resume:
        raise QKHooksError("resume_ids_only=True goes with resume=True: it says how a resume checks the images it "
                           "keeps; pass both, or neither.")
    if resume and out is not None and not os.path.lexists(out):  # a typo in --out would start over without a word
        warnings.warn(f"--resume (resume=True): there is no run at {out} to continue, so a new run starts there; if "
                      "the interrupted run is elsewhere, stop and give its path as --out.", stacklevel=3)
    shard = _checked_shard(shard)

    if loaded.image_config is None:  # load_model(..., for_images=False): for the weights alone
        raise QKHooksError(
            f"{loaded.spec} was loaded without its image preprocessing (load_model(..., for_images=False), for a "
            "spectrum), so its images cannot be preprocessed; load it with load_model(spec) (which reads its image "
            "processor config) or pass load_model(..., image_config=qkhooks.data.ImageConfig(...)).")
    dataset = open_source(data, loaded.image_config, limit=opts.limit, image_column=opts.image_column,
                          masks=opts.masks)
    streamed = isinstance(dataset, ItemStream)
    if resume_ids_only and not (streamed and dataset.reads_again):
        raise QKHooksError(
            f"resume_ids_only=True is for data read through your own code, which may give another image on each read "
            f"(a torch Dataset's __getitem__ with a random transform, an iterable); {getattr(dataset, 'name', data)} "
            "is read by qkhooks (files, a list or tuple in memory, a Hugging Face dataset, tar shards), the same "
            "on each read, so a resume checks the content of the images it keeps. Resume without it.")
    at_open = list(getattr(dataset, "skipped", []))
    # paths made absolute, so the run names the same files from any folder (analyses reopen them to draw photos)
    data_spec = absolute_spec(getattr(dataset, "name", str(data)))
    # the run's own config and image count, read once for the data spec and for a changed --limit
    stored, held = _stored_config(out) if resume and out is not None else ({}, None)
    if stored:
        data_spec = _resumed_data_spec(stored, data_spec)
    ids = [] if streamed else list(dataset.ids)
    if opts.limit is not None and isinstance(data, ImageDataset):  # a spec string got its limit from open_dataset
        ids = ids[:opts.limit]
    if not ids and not streamed:  # an empty stream was refused when opened
        raise QKHooksError(f"the dataset {data_spec!r} has no images.")
    _refuse_duplicate_ids(ids, data_spec)
    total = dataset.length if streamed else len(ids)
    lo, hi = 0, total
    if shard is not None:
        if total is None:
            raise QKHooksError(f"{data_spec!r} has no length, so it cannot be cut into shards; record it in one "
                               "process (workers still decode in parallel), or pass a sized dataset.")
        rank, world = shard
        per = -(-total // world)
        lo, hi = min(rank * per, total), min((rank + 1) * per, total)
    has_target = dataset.has_targets
    if any(s.kind == "pooled" for s in attention_specs) and not has_target:
        raise QKHooksError(
            f"attention 'pooled' sums attention onto target, distractor and background masks, which {data_spec!r} "
            "does not have; record odd-one-out data (o3:N or o3dir:DIR), or use rows or full."
        )
    if opts.num_workers is None:
        opts = dataclasses.replace(opts, num_workers=default_workers(device))
    refuse_batching(opts.batch_size, opts.num_workers)
    # The analyses' default recipe comes from the registry by name (qkhooks.analysis is imported on first need),
    # so the core imports no analysis and a caller's own recipe replaces it whole.
    plan = reducers if isinstance(reducers, Recipe) else recipe("default")
    if reducers is None or isinstance(reducers, Recipe):
        reducers = plan.reducers(modes_value, attention_specs, has_target, opts.dtype)
    reducers = list(reducers)
    if not (resume and out is not None and Path(out).exists()):  # a resume replaces their state with the run's
        refuse_sinks_holding_images(reducers, 0)
    keep_inputs = opts.keep_inputs or any(r.needs_inputs and not takes_inputs(r) for r in reducers)

    resolved = dataclasses.replace(opts, modes=modes_value, layers=tuple(s.layer for s in sites),
                                   attention=tuple(attention_specs))
    config = resolved.run_config(model=loaded.spec, data=data_spec, reducers=[r.name for r in reducers],
                                 random_init=loaded.random_init, weights=loaded.weights,
                                 shard=list(shard) if shard else None)
    if UNCHECKED_RESUMES in stored:  # the run's earlier resumes by ids alone: carried on, never compared
        config[UNCHECKED_RESUMES] = stored[UNCHECKED_RESUMES]
    image_size = tuple(int(v) for v in loaded.image_config.size)
    geometry = probe_geometry(net, sites, image_size, device)
    _check_rows_geometry(attention_specs, geometry)
    cells = mask_cells(sites, geometry, image_size,
                       "all" if dataset.has_masks else "first" if has_target else "none", net)
    recording = record(  # built (and so checked) before any file is touched; hooks go on below
        net, modes=modes_value, layers=[s.layer for s in sites], attention=attention_specs, input=opts.input,
        augmented=opts.augmented, keep_inputs=keep_inputs, sites=sites, outputs=opts.outputs,  # type: ignore[arg-type]
        keep_last=False,  # the sinks take each batch; held as run.last, its arrays would live until the next forward
    )
    writer, mode = None, None
    start, done = lo, 0
    position = _StreamPosition(lo, dataset.source_length) if streamed else None
    checkpointed = list(reducers) + ([position] if position is not None else [])
    # each file's size (stored, and checked on resume), modification time (same-size changes) and bytes' hash (for
    # the times that changed): the resume of a folder stats them here (file_*_column); the recording stores each
    # image's stamp as taken where it was read and decoded (in the loader's workers), which the batch carries
    file_sizes = None if streamed else file_size_column(dataset)
    file_mtimes = None if streamed else file_mtime_column(dataset)
    file_hashes = None if streamed else file_hash_column(dataset)
    stamped = ((FILE_SIZES, FILE_MTIMES, FILE_HASHES) if streamed else  # a stream's items may be files (-1 if not)
               tuple(name for name, column in ((FILE_SIZES, file_sizes), (FILE_MTIMES, file_mtimes),
                                               (FILE_HASHES, file_hashes)) if column is not None))
    if out is not None:
        mode = "resume" if resume and Path(out).exists() else ("overwrite" if overwrite else "create")
        attrs = {
            "qkhooks_version": __version__, "model": loaded.spec, "config": json.dumps(config, sort_keys=True),
            "model_note": loaded.note, "data": data_spec,
            "image_config": json.dumps(dataclasses.asdict(loaded.image_config)),
            # what the model is beyond its name (a resume compares them: writer.CHECKED_ATTRS)
            "identity": {"compute_dtype": str(next(net.parameters()).dtype).replace("torch.", ""),
                         "weights_sha256": weights_fingerprint(net)},
        }
        expected = {f"spectrum/L{site.layer}/S_all": layer_spectrum(site, opts.augmented).S.cpu().numpy()
                    for site in sites} if mode == "resume" else None  # for files from before weights_sha256
        relimited = _relimited_config(out, stored, config, held) if mode == "resume" else None
        if relimited is not None:  # compared as the run's; rewritten below, once the resume's checks have passed
            attrs["config"] = json.dumps(relimited, sort_keys=True)
        writer = RunWriter(out, mode=mode, attrs=attrs, dtype=opts.dtype, compression=opts.compression,
                           checksum=opts.checksum, expected_statics=expected)
        if mode == "resume":
            try:
                if relimited is not None:  # before any check that reads the kept ids against the limited data
                    _refuse_limit_below_kept(out, stored["limit"], opts.limit, writer.committed,
                                             _kept_on_resume(writer, checkpointed))
                if streamed:
                    done, _ = _resume(writer, checkpointed, writer.ids)
                    if relimited is not None and done:  # before "resuming the stream at item N" is said
                        _refuse_stream_past_limit(out, stored["limit"], opts.limit, position.position, done)
                    start = position.resumed_at(done, lo, progress)
                    _refuse_changed_stream(out, dataset, writer.ids[:done], lo, start, position.skipped)
                    _refuse_changed_length(out, dataset, position, done, start)
                    unchecked = _refuse_changed_stream_files(writer, dataset, done, start, progress=progress, lo=lo,
                                                             skipped=position.skipped, ids_only=resume_ids_only)
                    if unchecked:  # the file says so: those kept images were not checked by content
                        config[UNCHECKED_RESUMES] = [*config.get(UNCHECKED_RESUMES, []),
                                                     {"kept": done, "shard": list(shard) if shard else None}]
                else:
                    done, next_index = _resume(writer, reducers, ids[lo:hi], _decodes(dataset, lo), file_sizes,
                                               at_open, file_mtimes, file_hashes, progress=progress)
                    start = lo + next_index
                refuse_sinks_holding_images(reducers, done)  # one the run's checkpoint did not replace
                if relimited is not None or config.get(UNCHECKED_RESUMES) != stored.get(UNCHECKED_RESUMES):
                    # another --limit: the run goes on to it, and says so from now on; a resume by ids alone, named
                    writer.write_static("config", json.dumps(config, sort_keys=True))
                if done < writer.committed:  # cut only once every check has passed: a refusal keeps every image
                    writer.truncate(done)
            except BaseException:
                writer.close(complete=writer.was_complete)  # a refused resume leaves the file as it found it
                raise

    try:
        with recording as run:
            run.index_base, run.images_seen = lo, done
            seen = _SeenIds(writer.ids if writer is not None and done else [])
            run.sinks.append(seen)
            if writer is not None:
                _write_statics(writer, run, sites, image_size, opts.augmented, geometry, left_out_by_design(net), unmodelled,
                               [s.layer for s in every])
                if shard is not None:  # where this block starts in the dataset: qkhooks.distributed.merge_shards reads it
                    writer.write_static("images/shard", json.dumps({"rank": shard[0], "world": shard[1], "start": lo, "stop": hi}))
                # each file's size goes with its batch, so a reopened folder can be checked to hold the files recorded
                run.sinks.append(WriterSink(writer, opts.store_modes, stamped=stamped))
            run.sinks.extend(reducers)
            if on_batch is not None:
                run.sinks.append(_Callback(on_batch))
            if streamed:
                batches = position.track(dataset.batches(opts.batch_size, start, hi, opts.num_workers,
                                                         stamps=bool(stamped)), seen.ids)
            else:
                batches = _loader_batches(_Stamped(dataset) if stamped else dataset, range(start, hi), opts.batch_size,
                                          opts.num_workers, collate)
            if streamed:
                def skipped_at(step: int) -> list[tuple[str, str]]:
                    return list(position.skipped)
            else:
                so_far = _SkippedSoFar(at_open, dataset, ids, lo, seen.ids, first_shard=lo == 0)

                def skipped_at(step: int) -> list[tuple[str, str]]:  # the items the loader has reached by this step
                    return so_far(min(hi, start + (step + 1) * opts.batch_size))
            _loop(run, batches, net, hi - start if hi is not None else None, device, (geometry, image_size, cells), plan,
                  progress, writer, checkpointed, opts.checkpoint_every, skipped_at)
        if streamed:
            skipped = position.skipped
        else:
            skipped = so_far(hi)
        if writer is not None:
            _checkpoint(writer, checkpointed)
            writer.write_skipped(skipped)
            writer.close(complete=True)
    except DataRefusal as exc:  # comes back on every try: say where the run file stands and what to do
        if writer is None:
            raise
        what_now = writer.refusal_help(resumable=True)
        writer.close(complete=False)
        raise QKHooksError(f"{exc} {what_now}") from None
    except BaseException as exc:
        if writer is not None:
            writer.close(complete=False)  # a new run with nothing committed leaves no file that blocks a rerun
            if isinstance(exc, KeyboardInterrupt) and not isinstance(exc, RunInterrupted):
                raise RunInterrupted(writer.interruption_help(_kept_on_resume(writer, reducers))) from exc
            if writer.stopped_for_room and (room := writer.room_help(_kept_on_resume(writer, reducers))):
                raise QKHooksError(room) from exc  # a full disk: where the file stands counted by its checkpoint
        raise
    return RecordResult(Path(out) if out is not None else None, reducers, run.images_seen, skipped,
                        done if mode == "resume" else None)


def _stored_config(out: str | os.PathLike) -> tuple[dict[str, Any], int | None]:
    """The run config stored in the run file at ``out`` and the images it holds; ({}, None) where there is no readable
    run (the writer says why)."""
    from qkhooks.store._hdf5 import open_reader

    try:
        with open_reader(out, deadline_s=0) as f:
            stored, held = json.loads(f.attrs.get("config", "{}")), committed(f)
    except (QKHooksError, OSError, RuntimeError, KeyError, ValueError):
        return {}, None
    return (stored, held) if isinstance(stored, dict) else ({}, None)


def _relimited_config(out: str | os.PathLike, stored: Mapping[str, Any], config: Mapping[str, Any],
                     held: int | None) -> Mapping[str, Any] | None:
    """The run's own config where this resume's differs from it only by its ``limit``: the resume takes the run to the
    new limit, whose images so far are the first of the new ones (the resume checks they are), and the run's config is
    rewritten once every check has passed. None where the two differ otherwise (the writer refuses and names what
    differs) or are the same. A larger limit (or none) grows the run; a smaller one is taken only where a resume keeps
    no more images than it (an extension stopped midway goes back to a limit it has not passed), which
    :func:`_refuse_limit_below_kept` checks once the run's checkpoint is open; any other limit for a shard is refused
    (its block of the data would move). ``held``: the run's committed images (None: no run, the writer says)."""
    config = json.loads(json.dumps(config))  # as ``stored`` (:func:`_stored_config`) reads: tuples as lists
    if set(stored) != set(config) or any(stored[k] != config[k] for k in config if k != "limit"):
        return None
    was, now = stored["limit"], config["limit"]
    if was == now or held is None or not (was is None or isinstance(was, int)):  # held None: no run (the writer says)
        return None
    if config.get("shard") is not None:  # a shard's block is its rank's part of the limited data: it moves with it
        rank, world = config["shard"]
        raise QKHooksError(
            f"cannot resume {out} with --limit {now}: it is shard {rank} of {world} of a run recorded with "
            f"{_limit_words(was)}, and a sharded run's limit cannot change (each shard's block of the data moves with "
            f"the limit, so the shards would no longer join up). Resume it with {_limit_words(was)}, or "
            "record the larger run into a new --out.")
    return stored


def _refuse_limit_below_kept(out: Any, was: int | None, now: int | None, committed: int, kept: int | None) -> None:
    """Refuse a resume with a lower ``--limit`` than the images it keeps: ``kept``, those its last checkpoint counts
    (None: the checkpoint does not read, which the resume's own check names). The images committed past the
    checkpoint are recorded again by any resume, so they are not held against the limit (before, a run holding 6 of
    which its checkpoint counts 4 was refused --limit 5); the checkpoint's are, as its reducer states fold them and
    cannot drop one."""
    if kept is None or now is None or (was is not None and now >= was) or kept <= now:
        return
    which = (f"holds {committed} images" if kept == committed else f"holds {committed} images, of which a resume "
             f"keeps {kept} (those its last checkpoint counts; the rest are recorded again)")
    raise QKHooksError(
        f"cannot resume {out} with --limit {now}: it was recorded with {_limit_words(was)} and {which}, more than "
        f"{now}. A resume may raise the limit (the run grows to the new one), or lower it to no fewer images than it "
        f"keeps, never drop images its statistics count. Read the first {now} images of the run "
        f"(open_run(...).ids[:{now}]), resume with --limit {kept} or more, or record into a new --out.")


def _limit_words(limit: int | None) -> str:
    """How a message names a run's ``--limit`` (None: all the data)."""
    return f"--limit {limit}" if limit is not None else "no --limit (all the data)"


def _refuse_stream_past_limit(out: Any, was: int | None, now: int | None, read: int, done: int) -> None:
    """Refuse a resume of a stream with a lower ``--limit`` that its checkpoint has read past (``read`` items: its
    ``done`` images and the unreadable ones skipped among them). A stream's limit counts items, not images, so a run
    holding no more images than the new limit may still hold an item past it (review rev42 r42: a run of --limit 6
    with one unreadable item, resumed with --limit 5, finished as a --limit 5 run holding the 6th item)."""
    if now is None or (was is not None and now >= was) or read <= now:
        return
    raise QKHooksError(
        f"cannot resume {out} with --limit {now}: it was recorded with {_limit_words(was)} and has read {read} items "
        f"of the data ({done} images and {read - done} unreadable item{'s' if read - done != 1 else ''} skipped), "
        f"more than {now}; a lower limit would keep items past it. Resume with --limit {read} or more, or record into "
        "a new --out.")


def _resumed_data_spec(stored: Mapping[str, Any], data_spec: str) -> str:
    """The data spec a resume compares: the run's own (``stored``: its config) when it names the same data as typed
    before specs were made absolute (a relative folder, resumed from the folder it was recorded in), else
    ``data_spec``."""
    was = stored.get("data")
    return was if isinstance(was, str) and was != data_spec and absolute_spec(was) == data_spec else data_spec


def _refuse_duplicate_ids(ids: Sequence[str], data_spec: str) -> None:
    """An indexable dataset's ids are checked whole before anything is written (a run file finds images by id, and
    keeps them as UTF-8: a file name in another encoding stopped the run at its batch, and every resume there)."""
    for i, id_ in enumerate(ids):
        if (problem := id_problem(id_)) is not None:
            raise QKHooksError(f"item {i} of {data_spec!r}: {problem}. Nothing was written.")
    if len(set(ids)) == len(ids):
        return
    seen: dict[str, int] = {}
    for i, id_ in enumerate(ids):
        if id_ in seen:
            raise QKHooksError(f"items {seen[id_]} and {i} of {data_spec!r} have the same id {id_!r}; a run file finds "
                               "images by id, so each needs its own. Nothing was written.")
        seen[id_] = i


_FINGERPRINTS: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple, str]]" = weakref.WeakKeyDictionary()


def weights_fingerprint(net: nn.Module) -> str:
    """sha256 of the model's state dict (every tensor's name, shape, dtype and bytes): what a resume compares to
    know the model is the one the run was recorded with (a class name or a checkpoint's path says nothing of the
    weights). Tensors are hashed in parallel threads (hashlib releases the GIL); ViT-B 0.8 s and ViT-L 3.0 s on one
    core (sha256, 330 / 1160 MiB). Kept per model while no tensor changes (version counters, storage pointers).
    Entries that are not plain tensors (a quantised head's packed weights, its dtype: :func:`_state_entries`) are
    hashed by their content too."""
    import hashlib
    from concurrent.futures import ThreadPoolExecutor

    state = _state_entries(net.state_dict(keep_vars=False))
    key = tuple((name, t) if isinstance(t, bytes) else (name, t.data_ptr(), t._version, tuple(t.shape), str(t.dtype),
                                                        str(t.device)) for name, t in state)
    known = _FINGERPRINTS.get(net)
    if known is not None and known[0] == key:
        return known[1]

    def one(item: tuple[str, torch.Tensor | bytes]) -> bytes:
        name, t = item
        if isinstance(t, bytes):
            return hashlib.sha256(f"{name}|".encode() + t).digest()
        h = hashlib.sha256(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        if t.is_quantized:  # the integers and the scale(s) and zero point(s) that give them their values
            h.update(_quantisation(t))
            t = t.int_repr()
        flat = t.detach().contiguous().reshape(-1).cpu()
        if flat.numel():
            h.update(memoryview(flat.view(torch.uint8).numpy()))
        return h.digest()

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=max(1, min(8, cores))) as pool:
        digests = list(pool.map(one, sorted(state, key=lambda kv: kv[0])))
    total = hashlib.sha256(b"".join(digests)).hexdigest()
    _FINGERPRINTS[net] = (key, total)
    return total


_PLAIN_STATE = (torch.dtype, torch.Size, int, float, bool, str, bytes, type(None))


def _state_entries(state: Mapping[str, Any]) -> list[tuple[str, torch.Tensor | bytes]]:
    """(name, tensor or bytes) of every entry of a state dict, tuples and lists opened (``name.i``): torch's
    dynamically quantised Linear keeps ``_packed_params._packed_params`` as a (weight, bias) tuple and
    ``_packed_params.dtype`` as a dtype. Other values are stood for by their ``repr`` (plain values) or pickle; one
    that has neither is refused, since a resume could not tell whether it changed."""
    import pickle

    entries: list[tuple[str, torch.Tensor | bytes]] = []
    for name, value in state.items():
        if isinstance(value, torch.Tensor):
            entries.append((name, value))
        elif isinstance(value, (tuple, list)):
            entries += _state_entries({f"{name}.{i}": v for i, v in enumerate(value)})
        elif isinstance(value, _PLAIN_STATE):
            entries.append((name, f"{type(value).__name__}:{value!r}".encode()))
        else:
            try:
                entries.append((name, pickle.dumps(value, protocol=4)))
            except Exception as exc:
                raise QKHooksError(
                    f"the model's state dict holds {name!r}, a {type(value).__qualname__} that can be neither hashed as "
                    f"a tensor nor pickled ({exc}), so a run file cannot record which weights it was made with (a "
                    "resume compares them). Record the model without that state (it comes from the module's "
                    "get_extra_state).") from None
    return entries


def _quantisation(t: torch.Tensor) -> bytes:
    """What turns a quantised tensor's integers into its values: its scheme, scale(s), zero point(s) and axis."""
    scheme = t.qscheme()
    if scheme in (torch.per_tensor_affine, torch.per_tensor_symmetric):
        return repr((str(scheme), t.q_scale(), t.q_zero_point())).encode()
    scales, zeros = t.q_per_channel_scales().double().cpu(), t.q_per_channel_zero_points().cpu()
    return repr((str(scheme), t.q_per_channel_axis())).encode() + scales.numpy().tobytes() + zeros.numpy().tobytes()


class _SeenIds:
    """Remembers which images made it through, so images that failed to decode late are listed as skipped."""

    def __init__(self, ids: Sequence[str]):
        self.ids = set(ids)

    def update(self, batch: BatchCapture) -> None:
        self.ids.update(batch.ids)


def _skipped(at_open: Sequence[tuple[str, str]], dataset: Any, wanted: Sequence[str], seen: set[str],
             first_shard: bool, start: int = 0) -> list[tuple[str, str]]:
    """Files left out when the dataset was opened (listed once, by the first shard) plus images that failed later.

    Late failures are found by their absence from the run rather than from ``dataset.skipped``, which
    DataLoader worker processes cannot update. A failure this process did not see (in a worker, or before a
    resume) is decoded once more here for its reason, so the list does not depend on workers or interruptions.
    """
    def known(id_: str) -> str | None:
        return next((why for skipped_id, why in getattr(dataset, "skipped", [])[len(at_open):] if skipped_id == id_), None)

    def reason(index: int, id_: str) -> str:
        if known(id_) is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # warned about when it first failed
                try:
                    dataset[index]
                except Exception as exc:  # noqa: BLE001 - its reason is what is asked for
                    return f"{type(exc).__name__}: {exc}"
        # never a made-up decode failure: one that decodes now says so
        return known(id_) or "not recorded, although it decodes now (unreadable, or not in the dataset, when the run reached it)"

    late = [(i, reason(start + n, i)) for n, i in enumerate(wanted) if i not in seen]
    return (list(at_open) if first_shard else []) + late


class _SkippedSoFar:
    """:func:`_skipped` up to where the loader has got (``so_far(reached)``: dataset items ``lo .. reached``), found a
    stretch at a time, so that the list written with every checkpoint looks at each id once and decodes each late
    failure once (the whole list at every checkpoint was quadratic in the run's length)."""

    def __init__(self, at_open: Sequence[tuple[str, str]], dataset: Any, ids: Sequence[str], lo: int, seen: set[str],
                 first_shard: bool):
        self.at_open, self.dataset, self.ids, self.seen = at_open, dataset, ids, seen
        self.head = list(at_open) if first_shard else []
        self.late: list[tuple[str, str]] = []
        self.upto = lo

    def __call__(self, reached: int) -> list[tuple[str, str]]:
        if reached > self.upto:  # every item before ``reached`` went through the recording (or failed)
            self.late += _skipped(self.at_open, self.dataset, self.ids[self.upto:reached], self.seen, first_shard=False,
                                  start=self.upto)
            self.upto = reached
        return self.head + self.late


class _Callback:
    def __init__(self, fn: Callable[[BatchCapture], None]):
        self.fn = fn

    def update(self, batch: BatchCapture) -> None:
        self.fn(batch)


class _StreamPosition:
    """Where a streamed source has got to, checkpointed like a reducer: a resume continues at the position of
    its checkpoint (without decoding the items before it), and the items it could not decode are kept listed."""

    name = "source_position"

    def __init__(self, start: int, length: int | None = None):
        self.position = start  # moved by track(), which also sees batches that decoded to nothing
        self.skipped: list[tuple[str, str]] = []
        self.length = length  # the source's whole length (-1 stored for none); a resume compares it
        self.recorded_length: int | None = None  # the checkpoint's, once loaded (None: none, or a run from before)

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position, "skipped": json.dumps(self.skipped),
                "length": -1 if self.length is None else self.length}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = int(state["position"])
        self.skipped = [tuple(pair) for pair in json.loads(str(state["skipped"]))]
        recorded = int(state["length"]) if "length" in state else -1
        self.recorded_length = recorded if recorded >= 0 else None

    def resumed_at(self, done: int, lo: int, progress: bool) -> int:
        """The position to continue from, said out loud; a run with no checkpoint yet starts again."""
        if not done:
            self.position, self.skipped = lo, []
        if progress or done:
            print(f"resuming the stream at item {self.position}: {done} images are in the file; the "
                  f"{self.position - lo} items before are skipped without decoding", file=sys.stderr)
        return self.position

    def track(self, batches: Any, seen: set[str]) -> Any:
        """The stream's batches as the loop's ``(batch or None, items read)``, moving the position after each;
        an id already recorded is refused (the run file and its resume find images by id)."""
        in_file = set(seen)  # the ids the run file held when this stream began (a resume's)
        for part in batches:
            ids = [item["id"] for item in part.items]
            twice = next((i for n, i in enumerate(ids) if i in seen or i in ids[:n]), None)
            if twice is not None and twice in in_file:
                raise DataRefusal(
                    f"item id {twice!r} is already in the run file: two items of the data have it (give each its own "
                    "'id'; an item given as a file path has that path as its id), or the data changed since the run "
                    "started (an item added, removed or reordered before the resume point). Fix the data, record into "
                    "a new --out, or --overwrite to start again.")
            if twice is not None:
                raise DataRefusal(f"two items of the data have the id {twice!r}; give each item its own 'id', or "
                                   "none at all (then the position is the id; an item given as a file path has that "
                                   "path as its id).")
            unstorable = next(filter(None, map(id_problem, ids)), None)
            if unstorable is not None:
                raise DataRefusal(f"{unstorable}.")
            for id_, reason in part.failures:
                warnings.warn(f"skipping unreadable image {id_} ({reason})", stacklevel=2)
            self.skipped.extend(part.failures)
            read = part.end - self.position
            self.position = part.end  # read by the checkpoint that follows this batch in the loop
            yield (collate(part.items) if part.items else None), read


def default_workers(device: str | torch.device) -> int:
    """DataLoader workers when none are asked for. On the CPU, 0: torch's threads already use every core for the
    forward, and a worker only competes with them (ViT-Ti, 240 JPEGs, batch 16, 1 thread, 2 loaded cores: 1
    worker 1.186x the plain loop's wall time, as without workers; 2 workers 1.30x; benchmarks/ANALYSIS.md, round
    9). Beside an accelerator the CPU decodes while the device computes: one worker per core but one (the main
    process feeds the device), at most 4."""
    if torch.device(device).type == "cpu":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(4, cores - 1))


def _loader(dataset, indices, batch_size, num_workers, collate) -> DataLoader:
    """A DataLoader of an ImageDataset's items; its workers take the main process's PIL decompression-bomb limit."""
    return DataLoader(Subset(dataset, list(indices)), batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      collate_fn=collate, worker_init_fn=functools.partial(set_pil_limit, Image.MAX_IMAGE_PIXELS))


def _loader_batches(dataset, indices, batch_size, num_workers, collate):
    """An ImageDataset's batches through a DataLoader, as the loop's ``(batch or None, items read)``."""
    loader = _loader(dataset, indices, batch_size, num_workers, collate)
    for batch in loader:
        yield batch, len(batch.get("id", [])) if batch is not None else 0


def _refuse_changed_stream(out: Any, dataset: Any, recorded: Sequence[str], lo: int, start: int,
                           skipped: Sequence[tuple[str, str]]) -> None:
    """Refuse a resume whose source names other items before the resume point than the run recorded, where it names
    them without decoding (:meth:`~qkhooks.data.sources.ItemStream.ids_before`): the stream continues at a position,
    so an item added or removed before it would shift every image after it onto another's id, and a run of an earlier
    qkhooks, which named items given as file paths by their position, would go on under path ids."""
    found = dataset.ids_before(start) if recorded else None
    if found is None:
        return
    _refuse_other_items(out, recorded, _recorded_order(found[lo:], skipped))


def _recorded_order(ids: Sequence[str], skipped: Sequence[tuple[str, str]]) -> list[str]:
    """The ids of a shard's items from its first, in order, less those the recording skipped (unreadable): the ids the
    run recorded, if the data is as it was."""
    lost = {item_id for item_id, _ in skipped}
    return [item_id for item_id in ids if item_id not in lost]


def _refuse_other_items(out: Any, recorded: Sequence[str], source: Sequence[str]) -> None:
    """Refuse a resume whose data names its items before the resume point (``source``, in order, the skipped left
    out) otherwise than the run recorded them."""
    if list(source) == list(recorded):
        return
    at = next((k for k, (a, b) in enumerate(zip(recorded, source)) if a != b), min(len(recorded), len(source)))
    now = repr(source[at]) if at < len(source) else "nothing"
    was = repr(recorded[at]) if at < len(recorded) else "nothing"
    raise QKHooksError(
        f"cannot resume {out}: the data's items before the resume point are not those the run recorded (image {at} "
        f"of the file is {was}, the data's is {now}): the data changed since the run started, or the run was "
        "recorded by an earlier qkhooks, which named items given as file paths by their position. Put the data back "
        "as it was, record into a new --out, or --overwrite to start again.")


def _refuse_changed_length(out: Any, dataset: Any, position: _StreamPosition, done: int, start: int) -> None:
    """Refuse the resume of a stream whose source has another length than the run was recorded from, where its items
    before the resume point cannot be named again without decoding (a torch Dataset, a streamed Hugging Face dataset):
    items added or removed before that point would shift every later image onto another's id, and nothing else tells
    (review r45: a Dataset of 8 photos resumed over one of 6 finished a run of two data sets, without a word). A source
    whose ids are checked (a list, a map-style Hugging Face dataset, a folder) may grow: those checks decide."""
    was, now = position.recorded_length, dataset.source_length
    if not done or was is None or now is None or was == now or dataset.ids_before(start) is not None:
        return
    raise QKHooksError(
        f"cannot resume {out}: {dataset.name} has {now} items now, and the run was recorded from {was}; items were "
        f"added or removed since the run started, and a resume continues at a position (item {start}), so if any "
        f"were before it every later image would be recorded under another's id, which cannot be checked here "
        "(its items before that point are not read again). Put the data back as it was, record into a new --out, "
        "or --overwrite to start again.")


class _Stamped(torch.utils.data.Dataset):
    """An :class:`~qkhooks.data.ImageDataset` whose items carry ``"file_stamp"``: the (size, modification time in ns,
    hash) of the image file as it was read and decoded, in the process that read it (a DataLoader worker, or this
    one): :func:`qkhooks.data.items.stamps_read`. No file is read twice, and the hash is of the bytes decoded."""

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        with stamps_read() as seen:
            item = self.dataset[index]
        if item is not None:
            path = self.dataset.file_of(index)
            item["file_stamp"] = NO_STAMP if not path else seen.get(os.fspath(path)) or _stamp_again(path)
        return item


def _stamp_again(path: str) -> tuple[int, int, int]:
    """The stamp of a file its record's loader read otherwise than through ``read_oriented`` (none of qkhooks' own
    do): from one more read here; a file gone since it was read cannot be checked later (-1s)."""
    try:
        return read_stamped(path)[1]
    except OSError:
        return NO_STAMP


def _refuse_changed_stream_files(writer: Any, dataset: Any, done: int, start: int, stacklevel: int = 4,
                                 progress: bool = False, lo: int = 0,
                                 skipped: Sequence[tuple[str, str]] = (), ids_only: bool = False) -> int:
    """Refuse the resume of a stream whose kept images' files changed since they were recorded, as a folder's
    (:func:`_refuse_changed_files`): where the source names its items' files without decoding (a list or tuple of
    paths or of dicts whose ``"image"`` is a path; a map-style Hugging Face dataset of path strings or of
    ``Image(decode=False)`` cells read from files), each kept file is stat'ed and those whose time changed are
    hashed; for ``wds:`` shards, each kept sample's image member is read again up to the resume point (its header's
    size and time, its bytes' hash: no image is decoded); a torch map-style Dataset's kept items are read again
    through its ``__getitem__``, an iterable's and a streamed Hugging Face dataset's where the resume skips them (round
    47; round 51), their files checked alike.
    Images held in memory (a map-style Hugging Face dataset's bytes; a list's, tuple's, torch Dataset's or
    iterable's bytes, arrays, PIL images) are checked by the hash of their content (:func:`_refuse_changed_held`);
    other images not read from a file (stored -1) are not checked. With ``progress``, reading and hashing them again
    shows a bar where it takes a while. A run from before the stamps (no :data:`FILE_SIZES`) has only its ids to
    compare: where :func:`_refuse_changed_stream` checked them (a list, a map-style Hugging Face dataset named by its
    ids), or checked here against the items read again, in order (a torch Dataset, an iterable: round 49; ``wds:``
    shards, by their samples' stamps: round 50, before which they went unchecked without a word; a streamed Hugging
    Face dataset: round 51), it resumes with a
    warning that their content is not (round 50: a list's and a map-style dataset's said nothing); where some kept
    images of a list, a map-style dataset, a torch Dataset or an iterable (round 51: these two warned) are named by
    their position alone, or the items before the resume point
    are not read again (a reader with neither ``file_paths`` nor ``file_stamps``: none of qkhooks' since round 51,
    when a streamed Hugging Face dataset's are read in passing), nothing can check them, and the resume is refused
    (round 50: both went on without a word). A newer run of such a source resumes with a warning that its kept files
    are not checked. ``ids_only``
    (``resume_ids_only=True``, for data that gives another image on each read): the kept images held in the data are
    checked by their ids alone, with a warning, and those read from files by their files' stamps still (qkhooks reads
    those, the same on each read; round 49: they went unchecked too); on a run from before the stamps, every kept
    image by its id (round 49: not even that, and no warning). Returns how many kept images were not checked by
    their content (0 but with ``ids_only``)."""
    if not done:
        return 0
    recorded, kept = writer.rows(FILE_SIZES, done), writer.ids[:done]
    by_position = (set(dataset.ids_by_position(start, progress=progress, first=lo)).intersection(kept)
                   if recorded is None else ())
    if by_position:  # round 50: two images of a list or a dataset's bytes swapped resumed without a word
        _refuse_before_the_stamps(
            writer, done, f"{len(by_position)} of them are named by their position in {dataset.name} alone (no id "
            "of their own: a dict's 'id', a file path, a Hugging Face id column), which says nothing of the image at "
            "it")
    if recorded is None and dataset.ids_before(start) is not None:  # ids _refuse_changed_stream checked in order
        return _warn_kept_ids_alone(writer, dataset, done, done, ids_only, stacklevel + 1)
    fix = ("Put the data back as it was when the run started, record it into a new --out, or --overwrite to start "
           "again.")
    paths = dataset.file_paths(start, progress=progress, first=lo)  # the shard's items: its kept images among them
    stamps = dataset.file_stamps(start, progress=progress, first=lo) if paths is None else None
    if paths is None and stamps is None:
        if recorded is None:  # no stamps, and no ids read again: nothing tells the kept images from others
            _refuse_before_the_stamps(writer, done, f"{dataset.name}'s items before the resume point are not read "
                                                    "again (a streamed Hugging Face dataset has no index)")
        files = int((recorded >= 0).sum())
        if not files:  # review r45: in-memory items named by position changed without a word
            warnings.warn(
                f"{writer.path}: this resume does not check that the {done} images it keeps are {dataset.name}'s "
                "first items: they are not read again before the resume point (a streamed Hugging Face dataset has "
                "no index) and hold no files whose stamps could be compared, so data changed since (items reordered "
                "or replaced) would go on under the kept images' ids. Load it as a map-style dataset (not streamed), "
                "or pass the items as a list or another iterable, to have them checked.", stacklevel=stacklevel)
        if files:
            warnings.warn(
                f"{writer.path}: this resume does not check the {files} files of the {done} images it keeps against "
                f"their recorded sizes, times and hashes: {dataset.name}'s items before the resume point are not read "
                "again (a streamed Hugging Face dataset has no index), so a file replaced since is not noticed. Load "
                "it as a map-style dataset (not streamed), or pass the items as a list or another iterable, to have "
                "every kept file checked.", stacklevel=stacklevel)
        return 0
    cut = getattr(dataset, "read_again_cut", lambda stop: None)(start) if paths is not None else None
    # the kept images among the items named (the shard's from ``lo``, the skipped left out), in the order recorded,
    # whether all were read again or a torch Dataset slow to read again was cut by the budget (then those read):
    # review r47: counted by the kept ids found among them, data whose ids all changed checked none and went on;
    # round 48: read whole, they were checked by membership alone, and kept items reordered went on; round 49: so
    # were wds: samples (their stamps), and kept samples swapped with their ids, or shards reordered, went on
    source = _recorded_order([item_id for item_id, _ in (paths if paths is not None else stamps)], skipped)
    checked = min(len(source), done) if cut is not None else done
    _refuse_other_items(writer.path, kept[:checked], source[:checked])
    if cut is not None:  # the kept items read within the budget are checked, the rest said not to be
        read, total, seconds = cut
        warnings.warn(
            f"{writer.path}: this resume checks only the first {checked} of the {done} images it keeps: reading "
            f"{dataset.name}'s items again through its __getitem__ took {seconds:.0f} s for {read} of them "
            f"({1000 * seconds / read:.0f} ms each; all {total} would take about {_duration(seconds / read * total)}), "
            f"so the other {done - checked} are not checked, and data changed since among them would go on under the "
            "kept images' ids. Pass the images as a list (in memory), or give the Dataset's items as file paths, to "
            "have every kept image checked quickly.", stacklevel=stacklevel)
        kept = kept[:checked]
    if recorded is None:  # a run from before the stamps: its kept ids are all a resume can check
        return _warn_kept_ids_alone(writer, dataset, len(kept), done, ids_only, stacklevel + 1)
    if paths is not None:
        _refuse_files_now_in_memory(writer, dataset, kept, recorded, dict(paths))
    if ids_only:  # the kept images held in the data may differ on each read; those read from files may not
        _refuse_changed_files(writer, kept, *data_files.stamp_columns(dict(paths)), fix, stacklevel=stacklevel + 1,
                              held=False, progress=progress)
        files = int((recorded[:len(kept)] >= 0).sum())  # checked by their stamps (those past a budget's cut: not)
        return _warn_ids_only(writer, dataset, done - files, done, stacklevel + 1)
    if paths is not None:
        where = dict(paths)
        columns = list(data_files.stamp_columns(where))
        held = dict(dataset.held_hashes(start, progress=progress, first=lo) or ())  # images held in the data: hashes now
        if held:
            hashes = writer.rows(FILE_HASHES, done)
            unchecked = [i for i, h in zip(kept, hashes) if h == -1 and i in held and where.get(i) is None]
            if unchecked:
                warnings.warn(
                    f"{writer.path}: this resume does not check {len(unchecked)} of the {done} images it keeps "
                    f"(first: {unchecked[0]!r}): they are held in {dataset.name} (not files) and the run holds no "
                    "hash of their bytes (recorded by a qkhooks from before it hashed them, or a Hugging Face "
                    "dataset's array cells, which are not hashed), so images replaced since would go on under the "
                    "kept images' ids. Record into a new --out (or --overwrite) to have every kept image checked on "
                    "a later resume.",
                    stacklevel=stacklevel)
            columns[2] = functools.partial(_held_or_file_hashes, held, where, columns[2])
    else:
        where = dict(stamps)
        columns = [lambda ids, k=k: np.array([where.get(i, NO_STAMP)[k] for i in ids], np.int64) for k in range(3)]
    hint = (" (or the data gives another image each time it is read: a random transform in a Dataset's __getitem__, "
            "an iterable that shuffles; record it without that, or, where the kept images' ids are enough, resume "
            "with resume_ids_only=True, which checks those alone)" if getattr(dataset, "reads_again", False) else "")
    _refuse_changed_files(writer, kept, *columns, fix, stacklevel=stacklevel + 1, held_hint=hint, progress=progress)
    return 0


def _refuse_before_the_stamps(writer: Any, done: int, why: str) -> None:
    """Refuse the resume of a run recorded before the file stamps (no :data:`FILE_SIZES`) where nothing can check
    its kept images (``why``): their content never can be on such a run, and here not their ids either."""
    raise QKHooksError(
        f"cannot resume {writer.path}: it keeps {done} images, was recorded before qkhooks stored each image's stamps "
        f"({FILE_SIZES}), and {why}, so this resume cannot check that they are still the data's first items, in "
        "that order: resumed, data changed since (items reordered, added, removed or replaced) would go on under the "
        "kept images' ids. Record it afresh into a new --out, or --overwrite to start again.")


def _warn_kept_ids_alone(writer: Any, dataset: Any, checked: int, done: int, ids_only: bool, stacklevel: int) -> int:
    """Warn that the resume of a run recorded before the file stamps (no :data:`FILE_SIZES`) checked ``checked`` of
    the ``done`` images it keeps by their ids alone, in order: such a run holds nothing of their content (round 50: a
    list's or a map-style Hugging Face dataset's resumed without a word). Returns how many kept images were not
    checked by their content, as the run file records them: ``done`` with ``ids_only``, else 0."""
    if ids_only:  # resumed by ids alone: the run file records it
        return _warn_ids_only(writer, dataset, done, done, stacklevel + 1)
    warnings.warn(
        f"{writer.path} was recorded before qkhooks stored each image's stamps ({FILE_SIZES}), so this resume "
        f"checks {'the' if checked == done else f'{checked} of the'} {done} images it keeps by their ids alone, in "
        f"order: an image of {dataset.name} replaced since is not noticed (their content is not checked). To be "
        "sure, record it afresh into a new --out (or --overwrite), which also has every kept image checked on a "
        "later resume.",
        stacklevel=stacklevel)
    return 0


def _refuse_files_now_in_memory(writer: Any, dataset: Any, kept: Sequence[str], sizes_then: Any,
                                where: Mapping[str, str | None]) -> None:
    """Refuse a resume whose data now gives in memory (no file path: a PIL image, an array, a tensor its
    ``__getitem__`` loaded) a kept image the run read from a file (a size recorded): that file's stamps are all the
    run holds of it, and they cannot be compared with an image in memory, so a file replaced since would go on under
    its id. Round 50: refused as a file of another size, "unreadable now", which named no cause."""
    moved = [id_ for id_, size in zip(kept, sizes_then) if int(size) >= 0 and id_ in where and where[id_] is None]
    if moved:
        raise QKHooksError(
            f"cannot resume {writer.path}: {len(moved)} of the {len(kept)} images it keeps were read from files when "
            f"it recorded them, and {dataset.name} now gives them in memory, not as their files' paths (first: "
            f"{moved[0]!r}: a PIL image, an array or a tensor, e.g. the image its __getitem__ loads), so the files "
            "they were recorded from cannot be checked again against their stamps (size, time, BLAKE2b), and a file "
            "replaced since would go on under its id. Give those items as their file paths again, as when the run "
            "recorded them, or record afresh into a new --out (or --overwrite to start again).")


def _warn_ids_only(writer: Any, dataset: Any, unchecked: int, done: int, stacklevel: int) -> int:
    """Warn that a resume by ids alone (``resume_ids_only=True``) did not check the content of ``unchecked`` of the
    ``done`` images it keeps (the others, read from files, were checked by their stamps); returns ``unchecked``."""
    if unchecked:
        which = (f"the {done} images it keeps" if unchecked == done else
                 f"{unchecked} of the {done} images it keeps (those held in the data; the {done - unchecked} read "
                 "from files are checked by their stamps)")
        warnings.warn(
            f"{writer.path}: this resume checks {which} by their ids alone (resume_ids_only=True): not their content, "
            f"so images of {dataset.name} replaced since would go on under the kept ones' ids. The run file records "
            f"it: its config's {UNCHECKED_RESUMES!r} lists this resume.", stacklevel=stacklevel)
    return unchecked


def _held_or_file_hashes(held: Mapping[str, int | None], where: Mapping[str, str | None],
                         file_hashes: Callable[[Sequence[str]], Any], ids: Sequence[str]) -> np.ndarray:
    """The hash now of each of ``ids``: its file's (``file_hashes``) where ``where`` names one, else that of the
    bytes the dataset holds for it (``held``), -1 for neither (an array, an item no longer there)."""
    files = [i for i in ids if where.get(i) is not None]
    of_files = dict(zip(files, (int(h) for h in file_hashes(files)))) if files else {}
    return np.array([of_files[i] if i in of_files else -1 if held.get(i) is None else int(held[i]) for i in ids],
                    np.int64)


def _checked_shard(shard: Any) -> tuple[int, int] | None:
    """``shard`` as (rank, world) Python ints; a :class:`QKHooksError` unless it is None or two whole numbers with
    0 <= rank < world: a rank past the last would record no image and end as a complete, empty run."""
    if shard is None:
        return None
    try:
        rank, world = shard
    except (TypeError, ValueError):
        rank = world = None
    if not (is_whole(rank, 0) and is_whole(world, 1) and rank < world):
        raise QKHooksError(f"shard must be (rank, world), whole numbers with 0 <= rank < world, got {shard!r}; the "
                           "ranks of a world of N are 0 .. N-1.")
    return int(rank), int(world)


def _loop(run, batches, net, total, device, layout, plan, progress, writer, checkpointed, checkpoint_every,
          skipped_at=None) -> None:
    """Record every batch; every ``checkpoint_every`` batches, the images skipped so far (``skipped_at(step)``:
    ``/images/skipped``, rewritten where it grew, so a killed run's file names them) and the reducers' checkpoint."""
    dtype = next(net.parameters()).dtype
    written: list[tuple[str, str]] | None = None
    first = True  # the first forward at the run's size: where a model that fails on it fails
    bar = tqdm(total=total, unit="img", disable=not progress, desc="record")
    try:
        for step, (batch, read) in enumerate(batches):
            if batch is None or not batch.get("id"):
                bar.update(read)
                continue
            pixels = batch["pixel_values"].to(device=device, dtype=dtype, non_blocking=True)
            meta = _batch_meta(batch, *layout, plan)
            refusal = refusing_a_failing_size(net, run, tuple(pixels.shape[-2:])) if first else contextlib.nullcontext()
            with torch.no_grad(), refusal:
                run(pixels, ids=list(batch["id"]), meta=meta)
            first = False
            if writer is not None and (step + 1) % checkpoint_every == 0:
                skipped = skipped_at(step) if skipped_at is not None else None
                if skipped is not None and (written is None or len(skipped) != len(written)):  # it only grows
                    writer.write_skipped(skipped)  # before the checkpoint: the file names every image it passed
                    written = skipped
                _checkpoint(writer, checkpointed)
            bar.update(read)
    finally:
        bar.close()


def _write_statics(writer: Any, run: Any, sites: Sequence[AttentionSite], image_size: tuple[int, int],
                   augmented: bool, geometry: dict[int, LayerGeometry], left_out: dict[str, str],
                   unmodelled: dict[str, str], model_layers: Sequence[int] | None = None) -> None:
    # the modes the maps are projected on, as the recording took them at entry (its own copy: a caller editing
    # qkhooks.spectrum(model)'s shared arrays meanwhile changes nothing stored), with every mode's sigma and cosine
    statics = run.spectrum_statics()
    for site in sites:  # every mode's sigma and cosine (tiny): layer statistics must not depend on how many are kept
        if f"spectrum/L{site.layer}/S_all" not in statics:  # recorded without modes
            full = layer_spectrum(site, augmented)
            statics[f"spectrum/L{site.layer}/S_all"] = full.S.cpu().numpy()
            statics[f"spectrum/L{site.layer}/cos_all"] = full.cos.cpu().numpy()
    for name, value in statics.items():
        writer.write_static(name, value)
    site = sites[0]
    height, width = image_size
    first = geometry[site.layer]
    info = {"schema_version": INFO_SCHEMA_VERSION, "num_prefix_tokens": site.num_prefix_tokens,
            "heads": site.num_heads, "head_dim": site.head_dim, "dim": site.dim, "layers": [s.layer for s in sites],
            "paths": [s.path for s in sites], "family": site.family, "image_size": [height, width],
            "grid": None if first.grid is None else list(first.grid),
            "layer_geometry": {str(layer): g.to_dict() for layer, g in sorted(geometry.items())},
            "left_out_by_design": left_out,  # parts that are not self-attention of the image tokens (decoders), named
            "left_out_unmodelled": unmodelled,  # skip_unmodelled: modules qkhooks does not model, left out and named
            # "qk" or "x" per layer, stated once: pinned, so no later batch takes another source
            "mode_source": {str(layer): source for layer, source in run.pin_mode_source().items()}}
    if model_layers is not None:  # every block the layer selection counts over: analyses resolve -1 as record does
        info["model_layers"] = [int(l) for l in model_layers]
    writer.write_static("model/info", json.dumps(info))


def _checkpoint(writer: Any, reducers: Sequence[Any]) -> None:
    """Queue one checkpoint of every reducer's state (with its kind and configuration) behind the batches
    already queued; the stream position is checkpointed alongside."""
    if reducers:
        writer.write_checkpoint({r.name: r.saved_state() if isinstance(r, Reducer) else to_numpy_state(r.state_dict())
                                 for r in reducers})
