"""Figures for the papers' views. Every function takes plain results and a path, writes one PNG, returns the path.

matplotlib runs headless (Agg); figures are closed after saving so long runs do not leak.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402

from qkhooks.spectrum import QKSpectrum, head_weighted_cosines, random_cosine_band  # noqa: E402

__all__ = ["save", "weighted_cosine_null_sd", "plot_cosine_by_layer", "plot_head_spectra", "plot_layer_curves", "plot_stacked_shares"]


def save(fig, path: str | os.PathLike) -> Path:
    """Save and close a figure (creating the folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
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
    return np.sqrt(sq / dim), float(np.sqrt(sq.sum() / dim) / S.shape[0])


def plot_cosine_by_layer(spec: QKSpectrum, path: str | os.PathLike, relative_to: Sequence[float] | None = None) -> Path:
    """Paper Fig. 3: sigma-weighted cosine per layer (mean over heads; heads as dots), random bands grey.

    The grey bar at each layer is the 95% interval of the plotted head mean when all modes are random
    direction pairs (+-1.96 x :func:`weighted_cosine_null_sd`, from that layer's actual sigma weights); the
    dotted lines are the single-mode interval +-1.96/sqrt(d) (the paper's reference band, METHODS A.2), which
    applies to one mode's cosine, not to a weighted average of many.
    ``relative_to``: per-layer anisotropy baselines to subtract (paper Fig. S3), drawn as a second curve.
    """
    return plot_weighted_cosine({s.layer: (s.S.numpy(), s.cos.numpy()) for s in spec}, spec.layers[0].dim, path,
                                spec.model, relative_to)


def plot_weighted_cosine(spectra: dict[int, tuple[np.ndarray, np.ndarray]], dim: int, path: str | os.PathLike,
                         model: str = "", relative_to: Sequence[float] | None = None) -> Path:
    """:func:`plot_cosine_by_layer` from arrays: layer -> (S, cos), each (H, K), in dimension ``dim``."""
    layers = sorted(spectra)
    per_head = [head_weighted_cosines(*spectra[layer]) for layer in layers]
    mean = np.array([h.mean() for h in per_head])
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    single = random_cosine_band(dim, Z95)
    band = np.array([Z95 * weighted_cosine_null_sd(np.asarray(spectra[l][0], np.float64), dim)[1] for l in layers])
    span = f"{band.min():.3g}" if np.isclose(band.min(), band.max()) else f"{band.min():.3g}…{band.max():.3g}"
    ax.bar(layers, 2 * band, bottom=-band, width=0.8, color="0.8", zorder=0, label=f"random 95%, mean of heads (±{span})")
    for y in (-single, single):
        ax.axhline(y, color="0.5", ls=":", lw=0.8, label=f"random 95%, single mode (±{single:.3f})" if y > 0 else None)
    for layer, heads in zip(layers, per_head):
        ax.scatter([layer] * len(heads), heads, s=8, color="tab:blue", alpha=0.35)
    ax.plot(layers, mean, "o-", color="tab:blue", label="σ-weighted cosine (mean of heads)")
    if relative_to is not None:
        ax.plot(layers, mean - np.asarray(relative_to), "s--", color="tab:red", label="relative to anisotropy baseline")
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xlabel("layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("cosine(u_n, v_n), σ-weighted")
    ax.set_title(f"Grouping vs contextualisation — {model}", fontsize=9)
    ax.legend(fontsize=7)
    return save(fig, path)


def plot_head_spectra(spec: QKSpectrum, path: str | os.PathLike, max_layers: int | None = None) -> Path:
    """Paper Fig. S2: per head, singular values (line) and mode cosines (dots), one panel per layer.

    The grey band is the single-mode random interval +-1.96/sqrt(d): each dot is one mode's cosine.
    ``max_layers``: draw only the first this many layers (default all; a ViT-L's 24 make a 6 x 4 sheet).
    """
    layers = list(spec)[:max_layers]
    cols = min(4, len(layers))
    rows = int(np.ceil(len(layers) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
    band = spec.random_baseline_cos95
    for ax, layer in zip(axes.flat, layers):
        s, cos = layer.S.numpy(), layer.cos.numpy()
        twin = ax.twinx()
        for h in range(layer.num_heads):
            ax.plot(s[h] / s[h].max(), color="0.4", lw=0.7)
            twin.scatter(np.arange(len(cos[h])), cos[h], s=3, alpha=0.5)
        twin.axhspan(-band, band, color="0.9", zorder=0)
        twin.set_ylim(-1, 1)
        ax.set_title(f"L{layer.layer}", fontsize=8)
        ax.set_ylabel("σ / σ_max", fontsize=7)
        twin.set_ylabel("cos", fontsize=7)
    for ax in list(axes.flat)[len(layers):]:
        ax.axis("off")
    fig.suptitle(f"Per-head spectra (lines) and mode cosines (dots) — {spec.model}", fontsize=9)
    fig.tight_layout()
    return save(fig, path)


def plot_layer_curves(
    layers: Sequence[int],
    curves: dict[str, Sequence[float]],
    path: str | os.PathLike,
    ylabel: str,
    title: str,
    spread: dict[str, Sequence[float]] | None = None,
) -> Path:
    """Several per-layer curves on one axis, with an optional +-spread band per curve."""
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for name, values in curves.items():
        values = np.asarray(values, dtype=float)
        (line,) = ax.plot(layers, values, "o-", label=name)
        if spread and name in spread:
            s = np.asarray(spread[name], dtype=float)
            ax.fill_between(layers, values - s, values + s, color=line.get_color(), alpha=0.15)
    ax.set_xlabel("layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    return save(fig, path)


def plot_stacked_shares(
    labels: Sequence[str], shares: dict[str, Sequence[float]], path: str | os.PathLike, title: str, ylabel: str = "share"
) -> Path:
    """Stacked bars (one per label) of parts that sum to 1, e.g. CC/CP/PC/PP energy per head."""
    fig, ax = plt.subplots(figsize=(max(5.0, 0.22 * len(labels) + 2), 3.6))
    bottom = np.zeros(len(labels))
    for name, values in shares.items():
        values = np.asarray(values, dtype=float)
        ax.bar(range(len(labels)), values, bottom=bottom, label=name, width=0.85)
        bottom += values
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=90, fontsize=6)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=len(shares), loc="upper center", bbox_to_anchor=(0.5, -0.18))
    return save(fig, path)
