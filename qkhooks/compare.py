"""``qkhooks compare``: the per-layer curves of several models on one figure each (cosine, preference,
same object, BFD shares), from their reports or, for a bare model spec, from the weights alone.

An argument is a report folder (``qkhooks demo --out DIR``: its ``summary.json`` holds the curves) or a model
spec (``offline:dinov2-s14``, ``timm:NAME@random``), whose Fig. 3 cosine curve needs no images. When the models
differ in depth, layers are placed on relative depth (layer / (depth - 1)), so their ends line up.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

from qkhooks._json import write_json
from qkhooks.errors import QKHooksError
from qkhooks.models.load import load_model
from qkhooks.plots import plot_layer_curves
from qkhooks.report import data_uri, render_template
from qkhooks.spectrum import spectrum

__all__ = ["compare", "model_curves", "CURVES"]

CURVES: dict[str, tuple[str, str]] = {
    "cosine": ("Fig. 3 across models: σ-weighted query-key cosine (mean of heads)", "cosine(u_n, v_n), σ-weighted"),
    "preference_same_object": ("Fig. 2 across models: attention share on the same object", "attention share"),
    "preference_different_object": ("Fig. 2 across models: attention share on the other object", "attention share"),
    "same_object": ("Fig. 5 across models: P(query and key pick the same object)", "P(same object)"),
    "bfd_CC": ("BFD across models: content-content energy share", "share of energy"),
    "bfd_CP": ("BFD across models: content(query)-position(key) energy share", "share of energy"),
    "bfd_PC": ("BFD across models: position(query)-content(key) energy share", "share of energy"),
    "bfd_PP": ("BFD across models: position-position energy share", "share of energy"),
}
"""Curve name (as a report's summary.json keeps it) -> (figure title, y label), in the page's order."""


def _summary_path(item: str) -> Path | None:
    """The summary.json an argument names (a report folder or the file itself), or None for a model spec."""
    path = Path(item)
    return path / "summary.json" if path.is_dir() else path if path.name == "summary.json" else None


def _refuse_repeated(items: Sequence[str]) -> None:
    """Refuse two arguments that name one report (the same folder, spelt as its summary.json, through another
    relative path or a symbolic link) or one model spec: its curves would be drawn twice, as if two models agreed."""
    seen: dict[Any, int] = {}
    for i, item in enumerate(items):
        summary = _summary_path(item)
        key = ("spec", item) if summary is None else ("file", os.path.realpath(summary))
        if summary is not None and summary.exists():
            st = summary.stat()  # the same file under another name (a hard link) too
            key = ("file", st.st_dev, st.st_ino)
        if key in seen:
            j = seen[key]
            what = "one model spec" if key[0] == "spec" else f"one report ({summary})"
            raise QKHooksError(f"arguments {j + 1} and {i + 1} ({items[j]!r} and {item!r}) name {what}: compare "
                               "overlays different models, and this one's curves would be drawn twice. Pass each "
                               "report folder or model spec once, and another report (`qkhooks demo --model SPEC "
                               "--out DIR`) or model spec to compare it with.")
        seen[key] = i


def model_curves(item: str) -> tuple[str, dict[str, Any]]:
    """(label, curves) of one argument: a report folder (or its summary.json) or a model spec."""
    path = Path(item)
    summary = _summary_path(item)
    if summary is not None:
        if not summary.exists():
            raise QKHooksError(f"{path} has no summary.json: give a folder written by `qkhooks demo --out DIR`.")
        data = json.loads(summary.read_text())
        if "curves" not in data:
            raise QKHooksError(f"{summary} predates per-layer curves in reports: run `qkhooks demo` on it again.")
        return str(data["model"]), data["curves"]
    if ":" not in item:
        run = (" It is a file, not a report folder: compare reads the folders `qkhooks demo --model SPEC --data DATA "
               "--out DIR` writes (their summary.json), not run files (.h5) of `qkhooks record`."
               if path.is_file() else "")
        raise QKHooksError(f"{item!r} is neither a report folder nor a model spec (timm:NAME, hf:ID, offline:NAME, "
                           f"with @random for random weights).{run}")
    loaded = load_model(item, for_images=False)  # weight-only curves: no image processor config needed
    spec = spectrum(loaded.model)
    layers = [l.layer for l in spec.layers]
    return loaded.spec, {"cosine": {"layers": layers, "values": [float(v) for v in spec.cosine_weighted_by_layer()],
                                    "images": 0, "few": None}}


def _counts(curves: dict[str, dict[str, Any]]) -> str:
    """What each model's curve rests on, for a caption: its image count, or "from the weights (no images)"."""
    if all(c.get("images") == 0 for c in curves.values()):
        return "from the weights (no images)"
    return "over " + ", ".join(f"{c['images']} images ({label})" if "images" in c else
                               f"an unrecorded number of images ({label}: a report from before counts were kept)"
                               for label, c in curves.items())


def _depth(curves: dict[str, Any]) -> int:
    return 1 + max(max(c["layers"]) for c in curves.values())


def compare(items: Sequence[str], out: str | os.PathLike) -> Path:
    """Overlay the per-layer curves of several models; writes ``out/index.html``, ``out/compare.json`` (its
    ``"figures"``: the PNGs' names) and one PNG per curve that at least one model has. Returns the page's path."""
    if len(items) < 2:
        raise QKHooksError("compare needs at least two reports or model specs.")
    _refuse_repeated(items)
    out = Path(out)
    models: dict[str, dict[str, Any]] = {}
    for item in items:  # every input read before the folder is made: a refused one leaves nothing behind
        label, curves = model_curves(item)
        while label in models:
            label += "'"
        models[label] = curves
    out.mkdir(parents=True, exist_ok=True)
    depths = {label: _depth(c) for label, c in models.items()}
    relative = len(set(depths.values())) > 1
    xlabel = "relative depth (layer / (depth − 1))" if relative else "layer"
    figures = []
    for name, (title, ylabel) in CURVES.items():
        have = {label: c[name] for label, c in models.items() if name in c}
        if not have:
            continue
        xs = {label: [l / max(depths[label] - 1, 1) if relative else l for l in c["layers"]] for label, c in have.items()}
        path = plot_layer_curves(xs, {label: c["values"] for label, c in have.items()}, out / f"{name}.png", ylabel,
                                 title, xlabel=xlabel)
        missing = [label for label in models if label not in have]
        caption = (f"{title}: {len(have)} models, {_counts(have)}; x: {xlabel}."
                   + (f" Not in: {', '.join(missing)} (a bare model spec gives the weight-only cosine; run "
                      "`qkhooks demo --model SPEC` for the rest)." if missing else ""))
        warnings = [f"{label}: {c['few']}" for label, c in have.items() if c.get("few")]
        figures.append((path, caption, warnings))
    write_json(out / "compare.json", {"models": models, "depths": depths, "relative_depth": relative,
                                      "figures": [p.name for p, _, _ in figures]})
    page = out / "index.html"
    page.write_text(render_template("compare.html", models=list(models), figures=[
        {"src": data_uri(p), "rel": p.name, "caption": c, "warnings": w} for p, c, w in figures]))
    return page
