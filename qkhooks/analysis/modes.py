"""Semantic modes: top-k images per mode, same-object probability, anisotropy (Pan et al. Fig. 4, 5, S3).

METHODS A.3, A.5, A.6, A.7. The run-file driver behind ``qkhooks analyze modes`` (:func:`analyze_modes`); the
pieces live in their own modules and are re-exported here, each usable alone:

- :mod:`qkhooks.analysis.topk` — :class:`TopKModes`, the streaming reducer keeping, per (layer, head, mode,
  sign), the k best images with their (signed) maps, and :func:`top_images`;
- :mod:`qkhooks.analysis.anisotropy` — :class:`AnisotropyReducer` (the Fig. S3 baseline) and
  :func:`relative_cosine`;
- :mod:`qkhooks.analysis.same_object` — the same-object statistic of Fig. 5 as pure functions on arrays;
- :mod:`qkhooks.analysis.mode_figures` — :func:`overlay` / :func:`plot_overlay_grid`: query map in red, key
  map in cyan over the dimmed image.

Names follow the paper's "L{l} H{h} M{m}", all 0-based (l is the block index used everywhere in qkhooks).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import re
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from qkhooks.analysis.anisotropy import (
    AnisotropyReducer,
    CentreEmbeddings,
    anisotropy_from_state,
    anisotropy_table,
    baseline_pivots,
    relative_cosine,
)
from qkhooks.analysis.geometry import MAX_INFERRED_PREFIX, infer_prefix_tokens
from qkhooks.analysis.mode_figures import (
    Panel,
    grid_layout,
    map_to_grid,
    mode_name,
    overlay,
    plot_layer_overview,
    plot_mode,
    plot_overlay_grid,
)
from qkhooks.analysis.same_object import (
    chance_same_object,
    optimal_objects,
    same_object_probability,
    same_object_table,
)
from qkhooks.analysis.recipes import objects_array
from qkhooks.analysis.topk import (SIGNS, TopKModes, layer_prefix, layer_state, select_layers, signed_scores,
                                   top_images)
from qkhooks.capture import BatchCapture, LayerCapture
from qkhooks._json import write_json
from qkhooks.data_files import recorded_sizes
from qkhooks.errors import QKHooksError
from qkhooks.readings import COSINE, PROBABILITY, layer_intervals
from qkhooks.spectrum import NULL_MODE_NOTE, null_modes
from qkhooks.store.format import lost_spectrum
from qkhooks.store.reader import open_run

__all__ = [
    "TopKModes",
    "AnisotropyReducer",
    "CentreEmbeddings",
    "baseline_pivots",
    "signed_scores",
    "infer_prefix_tokens",
    "layer_state",
    "top_images",
    "anisotropy_from_state",
    "relative_cosine",
    "anisotropy_table",
    "optimal_objects",
    "same_object_probability",
    "chance_same_object",
    "same_object_table",
    "map_to_grid",
    "overlay",
    "plot_overlay_grid",
    "plot_mode",
    "plot_layer_overview",
    "analyze_modes",
    "format_summary",
    "load_images",
    "Panel",
    "grid_layout",
    "mode_name",
    "SIGNS",
    "MAX_INFERRED_PREFIX",
]

_CHUNK = 256  # images read from a run file at a time


def _topk_from_maps(run: Any, layers: Sequence[int], k: int, prefix: int) -> TopKModes:
    """Stream a run's stored maps through a fresh :class:`TopKModes` (when its saved state does not fit)."""
    reducer = TopKModes(k=k, num_prefix_tokens=prefix)
    # each layer's own prefix, as the recording's reducer scored it (CaiT's blocks have none, its class-attention one)
    geometry = {l: run.geometry(l) for l in layers}
    n = int(run.n)
    for lo in range(0, n, _CHUNK):
        hi = min(lo + _CHUNK, n)
        caps = {}
        for l in layers:
            q = torch.from_numpy(np.asarray(run.query(l)[lo:hi], dtype=np.float32))
            key = torch.from_numpy(np.asarray(run.key(l)[lo:hi], dtype=np.float32))
            caps[l] = LayerCapture(l, hi - lo, query=q, key=key)
        reducer.update(BatchCapture(ids=[], meta={"num_prefix_tokens": prefix, "geometry": geometry}, captures=caps,
                                    offset=lo))
    return reducer


def _topk_state(run: Any, layers: Sequence[int] | None, k: int | None, prefix: int) -> tuple[dict[str, Any], str]:
    """The top-k state to analyse and where it came from: the saved reducer when it fits, else the maps."""
    saved = run.state(TopKModes.name, default=None)
    stored = [int(l) for l in run.mode_layers]
    reasons = []
    if saved is not None:
        saved_layers = [int(l) for l in np.asarray(saved["layers"]).reshape(-1)]
        want = saved_layers if layers is None else list(layers)
        problems = []
        if k is not None and int(np.asarray(saved["k"])) < k:
            problems.append(f"it keeps k={int(np.asarray(saved['k']))} < {k}")
        saved_prefix = int(np.asarray(saved.get("num_prefix_tokens", -1)))
        if "layer_prefix" in saved:  # each layer's own (a model whose layers differ: CaiT)
            scored = {l: layer_prefix(saved, l, -1) for l in want if l in saved_layers}
            differ = {l: p for l, p in scored.items() if p != -1 and p != run.geometry(l).num_prefix_tokens}
            if differ:
                problems.append(f"it was scored with other prefix-token counts than the run's layers have ({differ})")
        elif saved_prefix not in (-1, prefix):
            problems.append(f"it was scored with {saved_prefix} prefix tokens, the model has {prefix}")
        if "images" in saved and int(np.asarray(saved["images"])) != int(run.n):
            problems.append(f"it covers {int(np.asarray(saved['images']))} of {run.n} images")
        missing = [l for l in want if l not in saved_layers]
        if missing:
            problems.append(f"it lacks layers {missing}")
        # an image index past the run's images means the state's indices are not this file's rows (a merge that
        # placed a shard's images wrongly): none of them can be trusted, so the state does not fit at all
        past = max((int(layer_state(saved, l)["index"].max(initial=-1)) for l in want if l in saved_layers), default=-1)
        if past >= int(run.n):
            problems.append(f"it names image row {past}, past the run's {run.n} images: its indices are not this file's rows")
        if not problems:
            return dict(saved), "reducer state saved with the run"
        reasons.append("the saved top-k state does not fit (" + "; ".join(problems) + ")")
    want = stored if layers is None else list(layers)
    if not stored or any(l not in stored for l in want):
        raise QKHooksError(
            f"{'; '.join(reasons) or 'the run has no saved top-k state'} and its stored maps cover layers {stored}, "
            f"not {want}; record the run with modes (the default --modes 16) and the TopKModes reducer."
        )
    reducer = _topk_from_maps(run, want, k or 8, prefix)
    return reducer.state_dict(), ("; ".join(reasons) + "; " if reasons else "") + "recomputed from the stored maps"


def _image_config_for(attrs: Mapping[str, Any], given: Any) -> tuple[Any, str]:
    """The preprocessing to redraw the run's images: given, stored in the run, or from the model spec."""
    from qkhooks.data.preprocess import ImageConfig

    if given is not None:
        return given, "given"
    raw = attrs.get("image_config")
    if raw:
        try:
            cfg = json.loads(raw) if isinstance(raw, (str, bytes)) else dict(raw)
            return ImageConfig(**cfg), "stored in the run"
        except (TypeError, ValueError, QKHooksError):
            pass
    spec = attrs.get("model")
    if not spec:
        return None, "the run names no model"
    try:  # only the preprocessing is needed: a random-init build reads the architecture's config, no weights
        from qkhooks.models.load import load_model

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return load_model(str(spec), random_init=True).image_config, f"from {spec}"
    except Exception as exc:  # no network, an unknown or unloadable spec
        return None, f"cannot rebuild the preprocessing of {spec!r} ({type(exc).__name__}: {exc})"


def load_images(attrs: Mapping[str, Any], ids: Sequence[str], wanted: Sequence[int], image_config: Any = None,
                sizes: Mapping[str, int] | None = None) -> tuple[dict[int, np.ndarray | None], str]:
    """Photos (H, W, 3) in [0, 1] in model-input geometry for the image indices ``wanted``, and a note.

    A run stores no pixels: the dataset is reopened from its spec (root attr ``data``) with the model's
    preprocessing and un-normalised. Anything missing gives no photos (maps on black) and says why. ``sizes``: the
    file sizes the run recorded of the images wanted (:func:`qkhooks.data_files.recorded_sizes`; None: a run
    without them, or one that keeps them in ``attrs``).
    """
    cfg, how = _image_config_for(attrs, image_config)
    if cfg is None:
        return {}, f"no photos: {how}"
    spec = attrs.get("data")
    if not spec:
        return {}, "no photos: the run names no dataset"
    from qkhooks.data import open_dataset
    from qkhooks.data.datasets import bundled

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dataset = open_dataset(bundled(str(spec)), cfg)  # a run's plain NAME is the installed photos
    except Exception as exc:
        from qkhooks.data.datasets import STREAMED_PREFIXES
        from qkhooks.data.sources import OBJECT_PREFIXES

        draw = ("To draw maps over the photos, record the images from a folder (or a spec such as ade20k:DIR) and "
                "analyse that run.")
        if str(spec).startswith(OBJECT_PREFIXES):  # expected: said plainly, not as a failure to parse a spec
            return {}, (f"no photos: the run's images came from a Python object ({spec}) given to record_dataset, "
                        f"which a run file cannot reopen, so no photos are drawn (the maps are). {draw}")
        if str(spec).startswith(STREAMED_PREFIXES):
            return {}, (f"no photos: the run's images were streamed from {spec}, which is not reopened to draw "
                        f"photos, so none are drawn (the maps are). {draw}")
        return {}, f"no photos: cannot reopen dataset {spec!r} ({type(exc).__name__}: {exc})"
    from qkhooks.data_files import changed_files  # the images drawn must be the files recorded, or none is drawn

    changed = changed_files(attrs, dataset, [ids[i] for i in sorted(set(int(i) for i in wanted)) if 0 <= i < len(ids)],
                            sizes)
    if changed:
        return {}, f"no photos: {changed}"
    position = {id_: i for i, id_ in enumerate(dataset.ids)}
    mean = np.asarray(cfg.mean, np.float32)[:, None, None]
    std = np.asarray(cfg.std, np.float32)[:, None, None]
    out: dict[int, np.ndarray | None] = {}
    missing = 0
    for i in sorted(set(int(i) for i in wanted)):
        pos = position.get(ids[i]) if 0 <= i < len(ids) else None
        item = dataset[pos] if pos is not None else None
        if item is None:
            missing += 1
            out[i] = None
            continue
        pixels = item["pixel_values"].numpy() * std + mean
        out[i] = np.clip(pixels.transpose(1, 2, 0), 0.0, 1.0)
    note = f"photos from {spec!r}, preprocessing {how}"
    return out, note + (f"; {missing} image(s) not found in the dataset" if missing else "")


def _fmt(value: Any) -> str:
    return "nan" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{float(value):.6g}"


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def _drawn_images(topk: Mapping[str, Any], layers: Sequence[int], figure_modes: int | None, overview: bool) -> set[int]:
    """The images the figures draw: the top-k of each head's first ``figure_modes`` modes (None: all), and of its
    leading mode for the overview."""
    wanted: set[int] = set()
    for l in layers:
        idx = np.asarray(layer_state(topk, l)["index"])  # (heads, modes, ...)
        drawn = idx.shape[1] if figure_modes is None else min(int(figure_modes), idx.shape[1])
        drawn = max(drawn, 1) if overview else drawn
        wanted.update(int(v) for v in idx[:, :drawn].reshape(-1) if v >= 0)
    return wanted


def check_modes_options(same_object_top: Any, figure_modes: Any) -> None:
    """Refuse counts :func:`analyze_modes` cannot take, before any file is written: a same-object top of 0 or less
    gave an all-NaN ``same_object.csv``, a negative figure count drew none without a word (review r35 B)."""
    def whole(value: Any) -> bool:
        return isinstance(value, (int, np.integer)) and not isinstance(value, bool)

    if not whole(same_object_top) or same_object_top < 1:
        raise QKHooksError(f"same_object_top (--same-object-top) must be a whole number of images >= 1, got "
                           f"{same_object_top!r}; the paper takes 5.")
    if figure_modes is not None and (not whole(figure_modes) or figure_modes < 0):
        raise QKHooksError(f"figure_modes (--figure-modes) must be a whole number >= 0 (0: no figures) or None "
                           f"('all'), got {figure_modes!r}.")


def analyze_modes(
    run_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    k: int | None = None,
    layers: Sequence[int] | str | None = None,
    figure_modes: int | None = 2,
    overview: bool = True,
    images: bool = True,
    image_config: Any = None,
    same_object_top: int = 5,
    normalize: str = "max",
) -> dict[str, Any]:
    """Top-k images per mode, same-object probability and anisotropy of a run file, as figures and tables.

    Args:
        run_path: a run written by :func:`qkhooks.stream.record_dataset` (``qkhooks record``).
        out_dir: where ``modes.json``, ``same_object.csv/.png``, ``anisotropy.csv/.png`` and ``figures/`` go.
        k: images per mode and sign (default: what the saved reducer kept, 8). A larger k than saved, a state
            that does not cover the run (or names rows past it), or no state at all is recomputed from the stored maps.
        layers: block indices (``"0,3,5-7"``, a list, or None for all recorded); negative indices count from the
            model's last block, as in ``qkhooks record`` (-1 = the model's last block, which the run must have
            recorded; refused for a run file of a qkhooks from before round 38, which does not store the model's
            depth; see :func:`_choose_layers`).
        figure_modes: per head, draw a figure for its first this-many modes (None: all; 0: none).
        overview: draw one sheet per layer with the leading mode of every head.
        images: redraw the photos under the maps (reopens the dataset; off: maps on black).
        image_config: preprocessing to redraw the photos (default: stored in the run or from its model spec).
        same_object_top: images per mode for the same-object statistic (paper: 5).
        normalize: map display, ``"max"`` or ``"percentile"`` (see :func:`overlay`).

    Returns:
        The JSON summary (also written to ``modes.json``), with ``files``; ``complete`` is False for a recording that
        stopped early (every number covers its committed images, ``images``).
    """
    check_modes_options(same_object_top, figure_modes)
    out = Path(out_dir)
    run = _read_run(run_path, k, layers, figure_modes, overview, images, same_object_top)
    out.mkdir(parents=True, exist_ok=True)  # only once the run is known to hold what the analysis needs
    files: dict[str, str] = {}
    aniso, baselines = _anisotropy_section(run, out, files)
    same = _same_object_section(run, out, files, same_object_top)
    figures, figure_left_out, photo_note = _figure_section(run, out, figure_modes, overview, images, image_config,
                                                           normalize, baselines)
    summary = _modes_summary(run, aniso, baselines, same, same_object_top, figure_left_out, photo_note)
    files["figures"] = str(out / "figures") if figures else ""
    summary["files"] = {**files, "json": str(out / "modes.json"), "figure_count": len(figures)}
    write_json(out / "modes.json", summary)
    return summary


@dataclasses.dataclass
class _ModesRun:
    """What :func:`analyze_modes` reads of a run, in one opening of the file: the sections that follow work from it."""

    path: str | os.PathLike
    attrs: dict[str, Any]
    ids: list[str]
    n: int
    complete: bool  # False for a run stopped early: every number covers its committed images only
    prefix: int
    chosen: list[int]
    topk: dict[str, Any]  # the ranking drawn and listed (k images per mode)
    source: str  # where that ranking came from (the saved reducer, or recomputed from the stored maps)
    geometry: dict[int, Any]
    spectra: dict[int, dict[str, np.ndarray]]
    aniso_state: Mapping[str, Any] | None
    centre_state: Mapping[str, Any] | None
    objects: np.ndarray | None  # masks/objects of the whole run, where it has them
    layer_objects: dict[int, np.ndarray]  # each layer's object labels on its own grid
    object_left_out: dict[int, str]  # layers without a same-object value, and why
    same_state: dict[str, Any] | None  # the ranking the same-object statistic takes (maybe more than k images)
    wanted: set[int]  # rows of the images the figures draw
    sizes: dict[str, int] | None  # their files' recorded sizes (to check the reopened photos)

    @property
    def model(self) -> str:
        return str(self.attrs.get("model", ""))

    @property
    def data(self) -> str:
        return str(self.attrs.get("data", ""))


def _read_run(run_path: str | os.PathLike, k: int | None, layers: Sequence[int] | str | None, figure_modes: int | None,
              overview: bool, images: bool, same_object_top: int) -> _ModesRun:
    """Everything the analysis needs of the run, refused (before any output is written) where the run lacks it."""
    from qkhooks.models.base import parse_layers

    with open_run(run_path) as run:
        info = dict(run.info)
        prefix = int(info["num_prefix_tokens"])
        grid = info.get("grid")
        attrs = dict(run.attrs)
        ids = list(run.ids)
        n = int(run.n)
        if n == 0:
            raise QKHooksError(f"{run_path} holds no committed images yet.")
        available = sorted(set(int(l) for l in run.mode_layers) | set(_state_layers(run.state(TopKModes.name, default=None))))
        if not available:
            _no_modes(run, run_path)
        chosen = _choose_layers(parse_layers(layers) if isinstance(layers, str) or layers is None else list(layers), available,
                                info.get("model_layers"), run_path)
        topk, source = _topk_state(run, chosen, k, prefix)
        chosen = chosen or [int(l) for l in np.asarray(topk["layers"]).reshape(-1)]
        ranked, topk = topk, select_layers(topk, chosen, k)  # the same-object statistic may take more than k images
        geometry = {l: run.geometry(l) for l in chosen}
        lost = sorted({name for l in chosen for name in lost_spectrum(attrs, l)})
        if lost:  # a repaired file: which modes are null, and their cosines, are not known there
            raise QKHooksError(f"{run_path} lost {', '.join(lost)} to damage (the repair that wrote it could not copy "
                               f"them), so {_lost_spectrum_words(lost)}; analyze the other layers (--layers), "
                               "or record the data again.")
        spectra = {l: {name: np.asarray(v) for name, v in run.spectrum_arrays(l).items()} for l in chosen}
        for l, arrays in spectra.items():  # a file without every mode's sigma/cosine: say whether it kept them all
            if "S_all" not in arrays:
                arrays["truncated"] = np.asarray(run.spectrum(l).truncated)
            arrays["null"] = _null_kept_modes(arrays)
        objects = None
        layer_objects: dict[int, np.ndarray] = {}
        object_left_out: dict[int, str] = {}
        if run.has("masks/objects"):
            objects = np.asarray(run.array("masks/objects")[:n])
            for l in chosen:
                name = objects_array(geometry[l].grid, grid) if geometry[l].grid is not None else None
                if geometry[l].reduced_keys:
                    object_left_out[l] = ("its keys are spatially reduced tokens, whose grid has no object labels "
                                          "(the same-object test compares the query and key maps' objects)")
                elif name is None or not run.has(name):
                    object_left_out[l] = f"the run has no object labels on its grid ({geometry[l].describe()})"
                else:
                    layer_objects[l] = objects if name == "masks/objects" else np.asarray(run.array(name)[:n])
        if layer_objects and int(np.asarray(ranked["k"])) < same_object_top:  # more images per mode than ranked
            ranked, _ = _topk_state(run, chosen, same_object_top, prefix)  # from the stored maps, or refused
        wanted = _drawn_images(topk, chosen, figure_modes, overview)
        return _ModesRun(
            path=run_path, attrs=attrs, ids=ids, n=n, complete=bool(run.complete), prefix=prefix, chosen=chosen,
            topk=topk, source=source, geometry=geometry, spectra=spectra,
            aniso_state=run.state(AnisotropyReducer.name, default=None),
            centre_state=run.state(CentreEmbeddings.name, default=None), objects=objects, layer_objects=layer_objects,
            object_left_out=object_left_out, same_state=select_layers(ranked, chosen, None) if layer_objects else None,
            wanted=wanted, sizes=recorded_sizes(run, ids, wanted) if images and wanted else None)


def _anisotropy_section(run: _ModesRun, out: Path, files: dict[str, str]) -> tuple[dict[str, Any], dict[int, float]]:
    """``anisotropy.csv`` / ``.png``: each mode's cosine against the layer's baseline (the anisotropy table and the
    baselines, per layer). Without the anisotropy state the table keeps each layer's cos_weighted (from the spectrum
    alone), its baseline cells ``nan``, and no ``.png`` is drawn (it plots the baseline)."""
    from qkhooks.plots import plot_anisotropy

    spectra = run.spectra
    baselines = anisotropy_from_state(run.aniso_state) if run.aniso_state is not None else {}
    aniso = anisotropy_table(spectra, baselines)
    if not aniso["layers"]:
        return aniso, baselines
    rows = []
    for r in aniso["rows"]:
        base = r.get("baseline")
        rows.append([r["layer"], "mean", "weighted", "", _fmt(r["cos_weighted"]), _fmt(base), _fmt(r.get("relative_cos_weighted"))])
        null = spectra[r["layer"]]["null"]
        for h, (s_h, c_h) in enumerate(zip(r["S"], r["cos"])):
            for m, (s, c) in enumerate(zip(s_h, c_h)):
                c = math.nan if null[h, m] else c  # an arbitrary cosine (NULL_MODE_NOTE)
                rows.append([r["layer"], h, m, _fmt(s), _fmt(c), _fmt(base), _fmt(None if base is None else c - base)])
    files["anisotropy_csv"] = str(_write_csv(out / "anisotropy.csv", ["layer", "head", "mode", "sigma", "cos", "baseline", "relative_cos"], rows))
    if run.centre_state is not None:
        kept_layers = set(_state_layers(run.centre_state))
        kept = [r for r in aniso["rows"] if r["layer"] in kept_layers]
        if kept:
            pivots = baseline_pivots(run.centre_state, [r["layer"] for r in kept])
            _, low, high = layer_intervals(pivots, limits=COSINE)
            for r, lo, hi, images in zip(kept, low, high, pivots.count):
                r["baseline_low"], r["baseline_high"] = float(lo), float(hi)
                r["baseline_images"] = int(images)  # zero rows skipped
    drawn = [r for r in aniso["rows"] if "baseline" in r]
    if not drawn:
        return aniso, baselines
    ci = all("baseline_low" in r for r in drawn)
    files["anisotropy_png"] = str(plot_anisotropy(
        [r["layer"] for r in drawn], [r["baseline"] for r in drawn],
        [r["baseline_low"] for r in drawn] if ci else None,
        [r["baseline_high"] for r in drawn] if ci else None,
        [r["cos_weighted"] for r in drawn], out / "anisotropy.png",
        f"Anisotropy baseline: centre patches of {run.n} images of {run.data or 'the run'} — {run.model}"))
    return aniso, baselines


def _same_object_section(run: _ModesRun, out: Path, files: dict[str, str], same_object_top: int) -> dict[str, Any] | None:
    """``same_object.csv`` / ``.png``: how often a mode's query and key maps pick the same object (None for a run
    without object masks)."""
    from qkhooks.plots import plot_layer_curves, stack_heads

    if run.objects is None:
        return None
    spectra, object_left_out = run.spectra, dict(run.object_left_out)
    same = same_object_table(run.same_state, run.layer_objects,
                             {l: s for l, s in spectra.items() if l in run.layer_objects},
                             {l: g.num_prefix_tokens for l, g in run.geometry.items()}, top=same_object_top)
    for r in same["rows"]:
        if not r["modes_with_value"]:
            object_left_out.setdefault(r["layer"], (
                f"no mode has a value: none of its modes' top-{same_object_top} images has a labelled object "
                "(their masks are background only)" if not np.asarray(spectra[r["layer"]]["null"]).all()
                else "every mode is numerically null (sigma = 0: W_q^T W_k is zero)"))
        elif r["uninformative"]:  # p_same = chance = 1 by construction (review r38): named, no layer value
            object_left_out.setdefault(r["layer"], r["uninformative"])
    same["left_out"] = {int(l): why for l, why in sorted(object_left_out.items())}
    rows = []
    for r in same["rows"]:
        rows.append([r["layer"], "mean", "weighted", "", "", _fmt(r["p_same"]), _fmt(r["p_same_pooled"]),
                     _fmt(r["p_same_unweighted"]), r["modes_with_value"], _fmt(r["chance"])])
        S, cos, null = (spectra[r["layer"]][k_] for k_ in ("S", "cos", "null"))
        for h, ph in enumerate(r["per_mode"]):
            for m, p in enumerate(ph):
                c = math.nan if null[h, m] else cos[h, m]
                rows.append([r["layer"], h, m, _fmt(S[h, m]), _fmt(c), _fmt(p), "", "", r["images_used"][h][m],
                             _fmt(r["chance_per_mode"][h][m])])
    files["same_object_csv"] = str(_write_csv(
        out / "same_object.csv",
        ["layer", "head", "mode", "sigma", "cos", "p_same", "p_same_pooled", "p_same_unweighted", "images",
         "chance"], rows))
    if same["rows"]:
        per_head = stack_heads([r["per_head"] for r in same["rows"]])  # (heads, layers)
        _, low, high = layer_intervals(per_head, limits=PROBABILITY)
        same["chance"] = chance_same_object(run.objects)
        weighted = "σ-weighted (per head, mean of heads)"
        files["same_object_png"] = str(plot_layer_curves(
            same["layers"],
            {weighted: [r["p_same"] for r in same["rows"]],
             "unweighted": [r["p_same_unweighted"] for r in same["rows"]],
             "chance over the same images (σ-weighted)": [r["chance"] for r in same["rows"]]},
            out / "same_object.png", ylabel="P(query and key pick the same object)",
            title=f"Same object or not: top-{same_object_top} of {run.n} images per mode — {Path(run.path).name}",
            bands={weighted: (low, high)}, references={f"chance ({same['chance']:.2f})": same["chance"]},
            ylim=(0, 1)))
    return same


def _figure_section(run: _ModesRun, out: Path, figure_modes: int | None, overview: bool, images: bool,
                    image_config: Any, normalize: str, baselines: Mapping[int, float]
                    ) -> tuple[list[str], dict[int, str], str]:
    """``figures/``: each layer's overview sheet and each drawn mode's maps over its top images (the files, the
    layers left out and why, and what the photos under the maps are)."""
    spectra, ids = run.spectra, run.ids
    photos, photo_note = (load_images(run.attrs, ids, sorted(run.wanted), image_config, run.sizes) if images and run.wanted
                          else ({}, "no photos (images=False)" if not images else "no figures"))
    figures: list[str] = []
    figure_left_out: dict[int, str] = {}
    for l in run.chosen:
        st = layer_state(run.topk, l)
        cos = spectra[l]["cos"]
        g = run.geometry[l]
        heads, modes = st["score"].shape[:2]
        n_fig = modes if figure_modes is None else min(int(figure_modes), modes)
        if g.grid is None or g.reduced_keys:  # the key map has no image grid of the query's to overlay on
            if overview or n_fig:
                figure_left_out[l] = ("its keys are spatially reduced tokens (the key map is on the reduced grid)"
                                      if g.reduced_keys else f"its token grid is unknown ({g.describe()})")
            continue
        if overview:
            figures.append(str(plot_layer_overview(st, l, out / "figures" / f"L{l}_overview.png", g.num_prefix_tokens,
                                                   photos, ids, g.grid, cos=np.where(spectra[l]["null"], np.nan, cos),
                                                   normalize=normalize)))
        for h in range(heads):
            for m in range(n_fig):
                if spectra[l]["null"][h, m]:  # an arbitrary direction's images: not drawn (NULL_MODE_NOTE)
                    continue
                rel = float(cos[h, m] - baselines[l]) if l in baselines and np.isfinite(baselines[l]) else None
                figures.append(str(plot_mode(st, l, h, m, out / "figures" / f"L{l}" / f"L{l}_H{h}_M{m}.png",
                                             g.num_prefix_tokens, photos, ids, g.grid, cos=float(cos[h, m]),
                                             relative=rel, sigma=float(spectra[l]["S"][h, m]), normalize=normalize)))
    return figures, figure_left_out, photo_note


def _modes_summary(run: _ModesRun, aniso: Mapping[str, Any], baselines: Mapping[int, float],
                   same: dict[str, Any] | None, same_object_top: int, figure_left_out: dict[int, str],
                   photo_note: str) -> dict[str, Any]:
    """``modes.json``'s content but its files: the run, the notes, and each mode's sigma, cosine and top images."""
    spectra, chosen, geometry = run.spectra, run.chosen, run.geometry
    kk = int(run.topk["k"])
    shapes = {l: layer_state(run.topk, l)["score"].shape[:2] for l in chosen}  # (heads, modes): stages differ
    summary: dict[str, Any] = {
        "run": str(run.path), "model": run.model, "data": run.data, "images": run.n, "complete": run.complete, "k": kk,
        "num_prefix_tokens": run.prefix,
        "topk_source": run.source, "photos": photo_note, "naming": "L{layer} H{head} M{mode}, all 0-based",
        "score": "max(0, max_t q) * max(0, max_t k) over patch tokens; sign -1 ranks (-q, -k)",
        "top_note": "per mode, the best k distinct images, each with its better-scoring sign (never listed twice)",
        "layers": [],
        "geometry": {l: g.to_dict() for l, g in geometry.items()},
        "figures_left_out": figure_left_out,
        "anisotropy": None if not aniso["layers"] else {r["layer"]: {k_: r[k_] for k_ in ("baseline", "baseline_low", "baseline_high", "baseline_images", "cos_weighted", "relative_cos_weighted", "cos_weighted_note") if k_ in r} for r in aniso["rows"]},
        "baseline_images": _baseline_count(run.aniso_state),
        "anisotropy_note": _anisotropy_note(spectra, shapes, run.aniso_state, run.n),
        "same_object": None if same is None else {
            "top": same_object_top, "sign": same["sign"],
            "chance": same.get("chance"),
            "layers": {r["layer"]: {k_: r[k_] for k_ in ("p_same", "p_same_pooled", "p_same_unweighted", "modes_with_value",
                                                         "per_head", "chance", "chance_per_head")} for r in same["rows"]},
            "left_out": same["left_out"]},
        "same_object_note": None if run.objects is not None else "the run has no masks/objects (record a dataset with object masks)",
    }
    nulls = {l: int(np.asarray(spectra[l]["null"]).sum()) for l in chosen if np.asarray(spectra[l]["null"]).any()}
    if nulls:
        summary["null_modes_note"] = (f"{NULL_MODE_NOTE} (labelled null, with no cosine, top images, p_same or "
                                      f"figure; per layer: {nulls})")
    components = [l for l in chosen if geometry[l].component_heads]
    if components:  # zoo13: heads of differential layers are component heads, never map heads
        summary["component_heads_note"] = (
            f"layers {components} are differential attention: their heads here are the {geometry[components[0]].component_heads} "
            "component heads (head 2h + c is term softmax{c+1} of map head h, 'component_of'), each mode exact for "
            "its component's logits; no head here is a map head")
    same_rows = {r["layer"]: r for r in same["rows"]} if same is not None else {}
    for l in chosen:
        st = layer_state(run.topk, l)
        heads, modes = shapes[l]
        entry: dict[str, Any] = {"layer": l, "heads": []}
        for h in range(heads):
            head_modes = []
            for m in range(modes):
                best = top_images(st, h, m, "both", kk)
                rec: dict[str, Any] = {
                    "mode": m, "name": mode_name(l, h, m), "sigma": float(spectra[l]["S"][h, m]), "cos": float(spectra[l]["cos"][h, m]),
                    "top": [{"index": int(ix), "id": run.ids[int(ix)], "score": float(sc), "sign": int(sg)}
                            for ix, sc, sg in zip(best["index"], best["score"], best["sign"])],
                }
                if l in baselines:
                    rec["relative_cos"] = rec["cos"] - baselines[l]
                if spectra[l]["null"][h, m]:  # labelled, its cosine and images left out (NULL_MODE_NOTE)
                    rec.update({"null": True, "cos": None, "top": []}, **({"relative_cos": None} if l in baselines else {}))
                if same is not None and l in same_rows:
                    p = same_rows[l]["per_mode"][h][m]
                    rec["p_same"] = None if p is None or (isinstance(p, float) and math.isnan(p)) else p
                head_modes.append(rec)
            head_entry: dict[str, Any] = {"head": h, "modes": head_modes}
            if geometry[l].component_heads:  # zoo13: differential attention, the per-component variant, named
                head_entry["component_of"] = {"map_head": h // 2, "term": f"softmax{h % 2 + 1}"}
            entry["heads"].append(head_entry)
        summary["layers"].append(entry)
    return summary


def _baseline_count(state: Mapping[str, Any] | None) -> int | None:
    """The images the anisotropy baseline covers (its reducer state's count; None without one)."""
    counts = np.asarray((state or {}).get("count", [])).reshape(-1)
    return int(counts.min()) if counts.size else None


def _baseline_images_note(state: Mapping[str, Any], n: int) -> str:
    """A sentence where the anisotropy baseline covers fewer images than the run holds (round 33: a stopped run's
    checkpoint covers the images before it; its baseline was reported beside the run's count without a word)."""
    counts = np.asarray(state.get("count", [])).reshape(-1)
    if not counts.size or int(counts.min()) >= n:
        return ""
    return (f"; the baseline covers {int(counts.min())} of the run's {n} images: the reducer checkpoint was written "
            "before the run stopped; resume the run (--resume) to fold in the rest.")


_EVERY_MODE = re.compile(r"spectrum/L\d+/(S_all|cos_all)$")


def _lost_spectrum_words(lost: Sequence[str]) -> str:
    """What the analysis cannot know of layers whose ``lost`` statics a repair could not copy. Every mode's sigma and
    cosine alone (S_all, cos_all) leave the kept modes in the copy, but not the sigma-weighted cosine over all modes
    (anisotropy's cos_weighted) nor whether the last kept mode ties with the next (:func:`null_modes`)."""
    if not all(_EVERY_MODE.match(name) for name in lost):
        return "the modes of those layers are not known"
    return ("the sigma-weighted cosine over all modes (the anisotropy table's cos_weighted) and whether a kept mode "
            "ties with one after it (then its cosine and top images depend on the factorisation) are not known, though "
            "the kept modes are in the file; `qkhooks spectrum MODEL` gives every mode from the weights")


def _null_kept_modes(arrays: Mapping[str, Any]) -> np.ndarray:
    """(H, K) bool: which stored modes are numerically null (:func:`~qkhooks.spectrum.null_modes`, against each
    head's largest sigma of every mode where the run keeps them); none flagged where the run stores no U."""
    S = np.asarray(arrays["S"])
    if "U" not in arrays:
        return np.zeros(S.shape, dtype=bool)
    every = np.asarray(arrays["S_all"]) if "S_all" in arrays else S
    return null_modes(every, int(np.asarray(arrays["U"]).shape[1]))[:, : S.shape[-1]]


_NO_ANISOTROPY_STATE = ("the run has no anisotropy reducer state (recorded without the anisotropy reducer, or stopped "
                        "before its first reducer checkpoint)")


def _anisotropy_note(spectra: dict[int, dict[str, Any]], shapes: dict[int, tuple[int, int]],
                     state: Mapping[str, Any] | None, n: int) -> str:
    """What summary['anisotropy'] holds, true to how cos_weighted was computed for these layers and to whether the
    run has the baseline's state."""
    kept = max((m for _, m in shapes.values()), default=0)
    every = [l for l in sorted(spectra) if "S_all" in spectra[l] and "cos_all" in spectra[l]]
    total = max((int(np.asarray(spectra[l]["S_all"]).shape[-1]) for l in every), default=kept)
    if len(every) == len(spectra):
        what = (f"cos_weighted is the sigma-weighted sum over all {total} modes of each head (METHODS A.2, from the "
                f"run's every-mode S_all/cos_all; the run keeps the top {kept} per head for maps, and anisotropy.csv's "
                "per-mode rows are those)")
    else:
        what = (f"cos_weighted is the sigma-weighted sum over all modes of each head (METHODS A.2); the run keeps the "
                f"top {kept} per head and, for layers {[l for l in sorted(spectra) if l not in every]}, not the others' "
                "sigma and cosine: there it is NaN if the run kept fewer than every mode")
    what += "; mean over heads (a head whose sigma are all zero has none and is left out)"
    if state is None:
        return (f"{_NO_ANISOTROPY_STATE}, so no baseline, relative_cos_weighted, relative_cos or anisotropy.png (they "
                f"need the images' centre patches); cos_weighted needs only the stored spectrum: {what}")
    return (what + "; baseline = mean cosine between centre-patch embeddings of different images (zero embeddings "
            "skipped); baseline_low/high (where the run kept the centre embeddings: of its first baseline_images "
            "images) its 95% bootstrap-t interval over them at that layer (jackknife standard error; null with fewer "
            "than 6), within [-1, 1]" + _baseline_images_note(state, n))


def _no_modes(run: Any, run_path: str | os.PathLike) -> None:
    """Raise the error for a run with neither stored query/key maps nor a saved top-k state."""
    config = run.config
    if "bfd" in (config.get("extra") or {}) and list(config.get("reducers") or []) == ["bfd_position_means"]:
        given = Path(run_path)
        pass2 = given.with_name(given.name.replace(".pass1", "", 1))
        raise QKHooksError(
            f"{run_path} is pass 1 of a BFD run (the position means), written by `qkhooks bfd`: it keeps no modes. "
            f"Read the BFD result from its pass-2 file with `qkhooks analyze bfd {pass2}`; for modes, record the "
            "model with `qkhooks record` (modes are its default).")
    if "bfd" in (config.get("extra") or {}):
        raise QKHooksError(
            f"{run_path} is a BFD run, written by `qkhooks bfd`: it keeps the BFD energies, not modes. Read it with "
            f"`qkhooks analyze bfd {run_path}`; for modes, record the model with `qkhooks record` (modes are its default)."
        )
    if "modes" not in config or config.get("modes") is None:
        raise QKHooksError(
            f"{run_path}: this run stored no modes (it was recorded with --modes 0/none); record with --modes K "
            "(e.g. --modes 16, the default) to analyse modes."
        )
    raise QKHooksError(
        f"{run_path}: this run stored no modes (recorded with --modes {config.get('modes')} but without per-image "
        "maps and without the topk_modes reducer); record with --modes K, the default reducers and the maps stored."
    )


def _state_layers(state: Mapping[str, Any] | None) -> list[int]:
    return [] if state is None else [int(l) for l in np.asarray(state["layers"]).reshape(-1)]


def _choose_layers(requested: Sequence[int] | None, available: Sequence[int],
                   model_layers: Sequence[int] | None = None, run_path: Any = "this run") -> list[int]:
    """Resolve a layer selection against the run's recorded layers.

    A negative index counts from the model's last block, as in ``record(layers=...)`` / ``qkhooks record``
    (:func:`qkhooks.models.base.select_layers`): -1 is the model's last block, from ``model_layers``, every block the
    recording's selection counted over (``model/info``'s ``model_layers``, stored since round 38); it must have been
    recorded. A run file without it (an earlier qkhooks) does not say how deep the model is, so a negative index is
    refused there (it counted from the last *recorded* layer, another block where the last was not recorded).
    """
    if requested is None:
        return list(available)
    out = []
    for l in requested:
        if l < 0:
            if model_layers is None:
                raise QKHooksError(
                    f"layer {l}: a negative layer counts from the model's last block (as in `qkhooks record`), and "
                    f"{run_path} does not store how many blocks the model has (it was written by a qkhooks from before "
                    f"round 38); give the block index itself: the run has layers {list(available)}.")
            blocks = [int(b) for b in model_layers]
            if l + len(blocks) not in blocks:
                raise QKHooksError(f"layer {l} does not exist: the model has blocks 0..{len(blocks) - 1} (the run "
                                   f"recorded layers {list(available)}).")
            block = l + len(blocks)
            if block not in available:
                raise QKHooksError(
                    f"layer {l} is the model's block {block} (negative layers count from the model's last block, as in "
                    f"`qkhooks record`), which this run did not record; it has layers {list(available)}.")
            l = block
        if l not in available:
            raise QKHooksError(f"layer {l} is not in this run; it has layers {list(available)}.")
        out.append(l)
    return out


def format_summary(summary: Mapping[str, Any]) -> str:
    """Per-layer anisotropy and same-object numbers as aligned text; ``chance`` beside ``p_same`` is the layer's
    chance level over the same images (σ-weighted as p_same is; review r40: p_same was printed without it)."""
    lines = [f"{'layer':>5}  {'cos_w':>8}  {'baseline':>8}  {'rel_cos_w':>9}  {'p_same':>7}  {'chance':>7}"]
    aniso = summary.get("anisotropy") or {}
    same = (summary.get("same_object") or {}).get("layers", {})
    for entry in summary["layers"]:
        l = entry["layer"]
        a, s = aniso.get(l, {}), same.get(l, {})
        cells = [a.get("cos_weighted"), a.get("baseline"), a.get("relative_cos_weighted"), s.get("p_same"),
                 s.get("chance")]
        text = ["—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:+.3f}" for v in cells]
        lines.append(f"{l:>5}  {text[0]:>8}  {text[1]:>8}  {text[2]:>9}  {text[3]:>7}  {text[4]:>7}")
    if aniso and not any("baseline" in a for a in aniso.values()):  # a column of dashes says why, as modes.json does
        lines.append(f"baseline, rel_cos_w —: {_NO_ANISOTROPY_STATE}.")
    if summary.get("same_object_note"):  # a column of dashes says why, as modes.json does
        lines.append(f"p_same —: {str(summary['same_object_note']).rstrip('.')}.")
    for l, why in ((summary.get("same_object") or {}).get("left_out") or {}).items():
        lines.append(f"p_same of layer {l} —: {str(why).rstrip('.')}.")
    return "\n".join(lines)
