"""Figures for the papers' views. Every function takes plain results and a path, writes one PNG, returns the path.

Figures are :class:`matplotlib.figure.Figure` objects drawn straight to a file (no pyplot, no global backend
switch), so importing this module never changes how a notebook or an application shows its own figures.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import sys
from typing import Any, Mapping

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
import numpy as np

from qkhooks.readings import COSINE, layer_intervals
from qkhooks.spectrum import QKSpectrum, head_weighted_cosines, random_cosine_band

__all__ = ["save", "figure", "weighted_cosine_null_sd", "plot_cosine_by_layer", "plot_weighted_cosine",
           "plot_cosine_histograms", "plot_head_spectra", "plot_layer_curves", "plot_stacked_shares",
           "plot_anisotropy"]


def figure(figsize: tuple[float, float], nrows: int = 1, ncols: int = 1, **kw: Any) -> tuple[Figure, Any]:
    """A figure that belongs to no pyplot state, and its axes (``squeeze`` as in ``plt.subplots``)."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, **kw)


def save(fig: Any, path: str | os.PathLike) -> Path:
    """Save a figure (creating the folder); a pyplot figure (from a notebook) is closed as well."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    if "matplotlib.pyplot" in sys.modules:
        sys.modules["matplotlib.pyplot"].close(fig)
    return path


Z95 = 1.96
"""Two-sided 95% normal quantile of the random-direction bands (METHODS A.2, A.7)."""


def weighted_cosine_null_sd(S: np.ndarray, dim: int) -> tuple[np.ndarray, float]:
    """Standard deviations of the sigma-weighted cosines when every (u_n, v_n) is a pair of random directions.

    With weights w_hn = sigma_hn / sum_m sigma_hm (held fixed) and null cosines cos_hn of mean 0, variance 1/d,
    uncorrelated across modes and heads (exact for independent random directions; also for random orthonormal
    U, V, since flipping the sign of one column leaves the distribution unchanged), head h's weighted sum
    sum_n w_hn cos_hn has variance sum_n w_hn^2 / d, and the mean over the H heads has variance
    sum_{h,n} w_hn^2 / (H^2 d). For w uniform over d_k modes that is 1/(d_k d) per head: far narrower than a
    single mode's 1/d.

    Args:
        S: (H, K) singular values of one layer (the modes the weighted cosine runs over).
        dim: the embedding width d.

    Returns:
        (per-head standard deviations (H,), standard deviation of the head mean).
    """
    S = np.asarray(S, dtype=np.float64)
    w = S / np.maximum(S.sum(-1, keepdims=True), 1e-30)
    sq = (w**2).sum(-1)
    heads = max(int((S.sum(-1) > 0).sum()), 1)  # heads without weights (all sigma = 0) are not in the layer mean
    return np.sqrt(sq / dim), float(np.sqrt(sq.sum() / dim) / heads)


def plot_cosine_by_layer(spec: QKSpectrum, path: str | os.PathLike, relative_to: Sequence[float] | None = None,
                         others: Mapping[str, QKSpectrum] | None = None) -> Path:
    """Paper Fig. 3: sigma-weighted cosine per layer (mean over heads; heads as dots), random bands grey.

    The grey bar at each layer is the 95% interval of the plotted head mean when all modes are random
    direction pairs (+-1.96 x :func:`weighted_cosine_null_sd`, from that layer's actual sigma weights); the
    dotted lines are the single-mode interval +-1.96/sqrt(d) (the paper's reference band, METHODS A.2), which
    applies to one mode's cosine, not to a weighted average of many. The blue band is a 95% bootstrap interval
    over heads. ``others``: label -> spectrum of another model of the same depth (e.g. random weights), drawn as
    further curves. ``relative_to``: per-layer anisotropy baselines to subtract (paper Fig. S3), a second curve.
    """
    extra = {label: [float(v) for v in o.cosine_weighted_by_layer()] for label, o in (others or {}).items()}
    return plot_weighted_cosine({s.layer: s.all_modes_numpy() for s in spec}, {s.layer: s.dim for s in spec},
                                path, spec.model, relative_to, extra)


def stack_heads(per_layer: Sequence[Any]) -> np.ndarray:
    """Per-layer head values -> (heads, layers), NaN where a layer has fewer heads (stages of a Swin or PiT)."""
    heads = max(len(v) for v in per_layer)
    out = np.full((heads, len(per_layer)), np.nan)
    for i, v in enumerate(per_layer):
        out[: len(v), i] = np.asarray(v, dtype=np.float64)
    return out


def plot_weighted_cosine(spectra: dict[int, tuple[np.ndarray, np.ndarray]], dim: int | Mapping[int, int],
                         path: str | os.PathLike, model: str = "", relative_to: Sequence[float] | None = None,
                         others: Mapping[str, Sequence[float]] | None = None) -> Path:
    """:func:`plot_cosine_by_layer` from arrays: layer -> (S, cos), each (H, d_k) of every mode (the weighted cosine
    is a sum over all modes, METHODS A.2), in dimension ``dim`` (one for all layers, or per layer where the stages
    differ in width). Heads whose sigma are all zero have no weighted cosine (NaN) and are left out of the mean."""
    layers = sorted(spectra)
    dims = dict(dim) if isinstance(dim, Mapping) else {l: int(dim) for l in layers}
    per_head = [head_weighted_cosines(*spectra[layer]) for layer in layers]
    fig, ax = figure((5.5, 3.6))
    band = np.array([Z95 * weighted_cosine_null_sd(np.asarray(spectra[l][0], np.float64), dims[l])[1] for l in layers])
    low, high = f"{band.min():.3g}", f"{band.max():.3g}"
    span = low if low == high else f"{low}…{high}"  # one value where the range prints as one (review r40)
    ax.bar(layers, 2 * band, bottom=-band, width=0.8, color="0.8", zorder=0, label=f"random 95%, mean of heads (±{span})")
    if len({dims[l] for l in layers}) == 1:  # one width: one single-mode band (stages of other widths: bars only)
        single = random_cosine_band(dims[layers[0]], Z95)
        for y in (-single, single):
            ax.axhline(y, color="0.5", ls=":", lw=0.8, label=f"random 95%, single mode (±{single:.3f})" if y > 0 else None)
    for layer, heads in zip(layers, per_head):
        ax.scatter([layer] * len(heads), heads, s=8, color="tab:blue", alpha=0.35)
    mean, low, high = layer_intervals(stack_heads(per_head), limits=COSINE)
    ax.plot(layers, mean, "o-", color="tab:blue", label="σ-weighted cosine (mean of heads)")
    ax.fill_between(layers, low, high, color="tab:blue", alpha=0.2, label="95% CI over heads")
    for (label, values), colour in zip((others or {}).items(), ("tab:orange", "tab:green", "tab:purple")):
        ax.plot(layers, values, "^--", color=colour, label=label)
    if relative_to is not None:
        ax.plot(layers, mean - np.asarray(relative_to), "s--", color="tab:red", label="relative to anisotropy baseline")
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xlabel("layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("cosine(u_n, v_n), σ-weighted")
    ax.set_title(f"Grouping vs contextualisation — {model}", fontsize=9)
    ax.legend(fontsize=7)
    return save(fig, path)


def plot_cosine_histograms(spec: QKSpectrum, path: str | os.PathLike) -> Path:
    """Paper Fig. S1: per layer, the histogram of every mode's cos(u_n, v_n) over all heads, with the 95% band
    of a single mode's cosine between random directions (grey); the title gives the share of modes outside it.

    Numerically null modes (:func:`qkhooks.spectrum.null_modes`: sigma_n <= max sigma of the head x d x float32 eps)
    are left out: their u_n, v_n are not determined by the weights, so their cosines are arbitrary. A recording's
    truncated spectrum contributes every mode (its cos_all)."""
    layers = list(spec)
    cols = min(6, len(layers))
    rows = int(np.ceil(len(layers) / cols))
    fig, axes = figure((2.0 * cols, 1.6 * rows), rows, cols, squeeze=False, sharex=True)
    band = spec.random_baseline_cos95
    bins = np.linspace(-1, 1, 41)
    counts = []
    for ax, layer in zip(axes.flat, layers):
        cos = layer.non_null_cosines()
        counts.append(cos.size)
        ax.axvspan(-band, band, color="0.85", zorder=0)
        ax.hist(cos, bins=bins, color="tab:blue")
        ax.set_title(f"L{layer.layer}: {np.mean(np.abs(cos) > band) if cos.size else float('nan'):.0%} outside", fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(layers):]:
        ax.axis("off")
    total = layers[0].all_modes_numpy()[0].size
    shown = f"all {counts[0]}" if len(set(counts)) == 1 and counts[0] == total else f"the {min(counts)}-{max(counts)} non-null"
    fig.suptitle(f"cos(u_n, v_n) of {shown} modes per layer (numerically null modes left out); grey: random 95% "
                 f"(±{band:.3f}) — {spec.model}", fontsize=8)
    fig.tight_layout()
    return save(fig, path)


HEAD_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive",
                "tab:cyan", "tab:gray", "navy", "gold", "teal", "maroon", "lime", "indigo")


def plot_head_spectra(spec: QKSpectrum, path: str | os.PathLike, max_layers: int | None = None) -> Path:
    """Paper Fig. S2: per head, singular values (top row of each layer) and mode cosines (bottom), one colour per
    head with a legend, one column per layer, so each head can be followed.

    The grey band is the single-mode random interval +-1.96/sqrt(d): each dot is one mode's cosine.
    ``max_layers``: draw only the first this many layers (default all).
    """
    layers = list(spec)[:max_layers]
    cols = min(6, len(layers))
    blocks = int(np.ceil(len(layers) / cols))
    fig, axes = figure((2.1 * cols, 3.0 * blocks), 2 * blocks, cols, squeeze=False)
    band = spec.random_baseline_cos95
    for i, layer in enumerate(layers):
        top, bottom = axes[2 * (i // cols), i % cols], axes[2 * (i // cols) + 1, i % cols]
        s, cos = layer.S.numpy(), layer.cos.numpy()
        for h in range(layer.num_heads):
            colour = HEAD_COLOURS[h % len(HEAD_COLOURS)]
            top.plot(s[h] / s[h].max(), color=colour, lw=0.8, label=f"H{h}")
            bottom.plot(np.arange(len(cos[h])), cos[h], ".", ms=2, color=colour)
        bottom.axhspan(-band, band, color="0.88", zorder=0)
        bottom.set_ylim(-1, 1)
        top.set_title(f"L{layer.layer}", fontsize=8)
        for ax in (top, bottom):
            ax.tick_params(labelsize=6)
        if i % cols == 0:
            top.set_ylabel("σ / σ_max", fontsize=7)
            bottom.set_ylabel("cos(u_n, v_n)", fontsize=7)
    for j in range(len(layers), blocks * cols):
        axes[2 * (j // cols), j % cols].axis("off")
        axes[2 * (j // cols) + 1, j % cols].axis("off")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 16), fontsize=7, frameon=False)
    fig.suptitle(f"Per-head spectra (top) and mode cosines by mode index (bottom) — {spec.model}", fontsize=9)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return save(fig, path)


def plot_layer_curves(
    layers: Sequence[float] | Mapping[str, Sequence[float]],
    curves: dict[str, Sequence[float]],
    path: str | os.PathLike,
    ylabel: str,
    title: str,
    spread: dict[str, Sequence[float]] | None = None,
    *,
    bands: Mapping[str, tuple[Sequence[float], Sequence[float]]] | None = None,
    references: Mapping[str, float] | None = None,
    ylim: tuple[float | None, float | None] | None = None,
    xlabel: str = "layer",
) -> Path:
    """Several per-layer curves on one axis.

    ``layers``: one x for all curves, or curve name -> its own x (models of different depths on relative
    depth). ``spread``: a +-value band per curve; ``bands``: a (low, high) band per curve (a CI);
    ``references``: label -> a horizontal line (e.g. chance); ``ylim``: fixed limits (None keeps one side free).
    """
    fig, ax = figure((5.5, 3.6))
    for name, values in curves.items():
        x = np.asarray(layers[name] if isinstance(layers, Mapping) else layers, dtype=float)
        values = np.asarray(values, dtype=float)
        (line,) = ax.plot(x, values, "o-", ms=4, label=name)
        if spread and name in spread:
            s = np.asarray(spread[name], dtype=float)
            ax.fill_between(x, values - s, values + s, color=line.get_color(), alpha=0.15)
        if bands and name in bands:
            low, high = (np.asarray(b, dtype=float) for b in bands[name])
            ax.fill_between(x, low, high, color=line.get_color(), alpha=0.2)
    for (label, y), style in zip((references or {}).items(), ("--", ":", "-.")):
        ax.axhline(y, color="k", ls=style, lw=0.9, label=label)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_xlabel(xlabel)
    if not isinstance(layers, Mapping):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    return save(fig, path)


def plot_stacked_shares(
    labels: Sequence[str], shares: dict[str, Sequence[float]], path: str | os.PathLike, title: str, ylabel: str = "share",
    groups: Sequence[str] | None = None,
) -> Path:
    """Stacked bars (one per label) of parts that sum to 1, e.g. CC/CP/PC/PP energy per head.

    ``groups``: one group name per bar (e.g. its layer); a vertical line separates groups, named on top.
    """
    fig, ax = figure((max(5.0, 0.22 * len(labels) + 2), 3.6))
    bottom = np.zeros(len(labels))
    for name, values in shares.items():
        values = np.asarray(values, dtype=float)
        ax.bar(range(len(labels)), values, bottom=bottom, label=name, width=0.85)
        bottom += values
    if groups is not None:
        starts = [i for i in range(len(groups)) if i == 0 or groups[i] != groups[i - 1]]
        for i, start in enumerate(starts):
            if start:
                ax.axvline(start - 0.5, color="k", lw=1.0)
            end = starts[i + 1] if i + 1 < len(starts) else len(groups)
            ax.text((start + end - 1) / 2, 1.01, groups[start], ha="center", va="bottom", fontsize=7,
                    transform=ax.get_xaxis_transform())
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=90, fontsize=6)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9, pad=14 if groups is not None else 6)
    ax.legend(fontsize=7, ncol=len(shares), loc="upper center", bbox_to_anchor=(0.5, -0.18))
    return save(fig, path)


def plot_anisotropy(layers: Sequence[int], baseline: Sequence[float], low: Sequence[float] | None,
                    high: Sequence[float] | None, cos_weighted: Sequence[float], path: str | os.PathLike,
                    title: str) -> Path:
    """Paper Fig. S3: (A) the anisotropy baseline per layer with its 95% interval over images; (B) the
    sigma-weighted mode cosine minus that baseline (interval: the baseline's, mirrored)."""
    fig, (a, b) = figure((9.0, 3.4), 1, 2)
    base, cos = np.asarray(baseline, float), np.asarray(cos_weighted, float)
    a.plot(layers, base, "o-", color="tab:purple", label="mean cos between centre patches of different images")
    b.plot(layers, cos - base, "s-", color="tab:red", label="σ-weighted cosine − baseline")
    if low is not None and high is not None:
        lo, hi = np.asarray(low, float), np.asarray(high, float)
        a.fill_between(layers, lo, hi, color="tab:purple", alpha=0.2, label="95% CI over images")
        b.fill_between(layers, cos - hi, cos - lo, color="tab:red", alpha=0.2, label="95% CI (from the baseline)")
    for ax, label, name in ((a, "anisotropy baseline", "A"), (b, "relative cosine", "B")):
        ax.axhline(0, color="k", lw=0.6)
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(label)
        ax.set_title(f"S3{name}", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save(fig, path)
