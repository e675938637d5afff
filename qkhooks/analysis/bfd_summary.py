"""From streamed BFD states to the JSON-shaped result: energies, shares, labels, probes (numpy, float64).

Everything here is a pure function of the reducer states, so ``qkhooks analyze bfd`` redoes it from a run
file, with the other definition or another ridge strength, without touching the model.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from typing import Any, Mapping

import numpy as np

from qkhooks.analysis.bfd_reducers import layer_state, patch_targets
from qkhooks.errors import QKHooksError
from qkhooks.spectrum import null_modes, tied_modes

__all__ = ["summarize", "energy_tables", "decoding_r2", "paper_claims", "refuse_one_image", "refuse_no_content",
           "refuse_other_images", "PASS_TOLERANCE",
           "DEFINITIONS", "TERMS", "CELLS"]

TERMS = ("CC", "CP", "PC", "PP")  # query factor first: CP = query content, key position
CELLS = ("GG", "GP", "GC", "PG", "PP", "PC", "CG", "CP", "CC")  # three-way: G = grand mean, P = P - mu, C
KINDS = ("frobenius", "additive")
CLAIMS = ("cc_dominant", "cp_second", "heads_specialise", "modes_specialise", "split_isolates_position")

MIN_HOLDOUT = 8
"""Held-out images below which the BFD position probes from X and C are not read (their R² is noise)."""

HOLDOUT_HOW = ("about one image in --holdout-every (holdout_every=, default 5) is held out, chosen by a hash of its "
               "id: record more images")
"""How the held-out images are chosen and what brings more, for the sentences that say the probes are not read."""

DEFINITIONS = {
    "factors": "X[i, p] = token entering W_q/W_k of image i at position p; P[p] = mean_i X[i, p] (grand mean mu "
    "included); C[i, p] = X[i, p] - P[p]. Prefix tokens are positions unless dropped.",
    "frobenius": "Head level (METHODS B.2): X_i M X_i^T = P M P^T + P M C_i^T + C_i M P^T + C_i M C_i^T, "
    "M = W_q^T W_k bias-free, query factor first (PC = query position, key content); energy of a term = its "
    "squared Frobenius norm averaged over images; shares are of the sum of the four terms; interference = "
    "(mean_i ||X_i M X_i^T||^2 - sum of the four) / mean_i ||X_i M X_i^T||^2. Mode level (B.3): term AB of mode "
    "n has energy sigma_n^2 mean_i(||A u_n||^2 ||B v_n||^2); the mode's energy is sigma_n^2 mean_i(||X_i u_n||^2 "
    "||X_i v_n||^2) (modes do not add up to the head: cross-mode terms).",
    "additive": "Per mode and side (METHODS B.3): q_P = mean_p ((P[p] - mu).u_n)^2, q_C = mean_{i,p} "
    "(C[i,p].u_n)^2, k_P, k_C likewise with v_n; CC = sigma_n^2 q_C k_C, CP = sigma_n^2 q_C k_P, PC = "
    "sigma_n^2 q_P k_C, PP = sigma_n^2 q_P k_P add up exactly to the mode energy sigma_n^2 (q_P + q_C)(k_P + "
    "k_C); head values are sums over modes (interference 0). The grand mean is left out: global_mean_share = 1 - "
    "that energy / sigma_n^2 (q_G + q_P + q_C)(k_G + k_P + k_C), q_G = (mu.u_n)^2.",
    "three_way": "Frobenius energies of the nine terms A M B^T, A, B in {G = 1 mu^T, P = P - mu, C_i}, query "
    "first, as shares of their sum; global_mean_share = share of the five cells with G on a side (which the "
    "two-way view counts as PP, PC or CP).",
    "coupling": "content-position coupling = CP + PC (either side), from the same definition as the shares.",
    "label": "CC, CP, PC or PP: the largest of the four shares (query side first); a numerically null mode "
    "(qkhooks.spectrum.null_modes: its vectors are not fixed by the weights) is labelled null and left out of the "
    "claims.",
    "participation_ratio": "(sum_n e_n)^2 / sum_n e_n^2 over the per-mode energies e_n of the same definition.",
    "mode_ranking": "mode indices by decreasing per-mode energy of the same definition; rank 0 = largest.",
    "share_of_head": "a mode's energy / the sum of its head's per-mode energies (same definition). Under additive "
    "that sum is the head's energy; under frobenius it is not (cross-mode terms: it reads 0.1-1.1 of the head's "
    "energy on DINOv2-S), so there it is a share among the modes, not of the head.",
    "layer_averages": "energy = plain mean over heads of the head shares (energy_std their spread); "
    "energy_pooled = sum over heads of each term's energy / sum over heads of the four.",
    "position_variance_share": "||P - mu||^2 / ||X - mu||^2 summed over images and positions (METHODS B.5); "
    "content_variance_share = 1 - position_variance_share.",
    "second_moment_shares": "mean_i ||X_i||^2 = N ||mu||^2 + ||P - mu||^2 + mean_i ||C_i||^2, as shares.",
    "decoding": "Held-out R^2 of ridge probes (closed form, unpenalised intercept, lambda = alpha * "
    "trace(S_xx) / d) decoding the patch row and column from X, P and C of the patch tokens; an image is held "
    "out when the first 8 bytes of sha256 of its id, big-endian, are 0 modulo holdout_every (X and C; one in "
    "holdout_every on average, whatever the batching, sharding or resume). P is one vector per position, so its probe "
    "holds out positions instead: P of all images, 5 folds (position p in fold p % 5), each fold predicted by a "
    "ridge probe fitted on the other positions; R^2 over all positions. A P that only labels positions without "
    "encoding where they are (or is noise) scores low; None with fewer than 10 patch positions. C = X - P uses "
    "P of all images.",
    "checks": "content_mean = max |mean_i C_i| / max |P|: rounding level when pass 2 saw the tokens pass 1 did.",
}


# --------------------------------------------------------------------------------------------- helpers
def _f(value: Any) -> float | None:
    """A JSON-safe float: NaN and infinities become None."""
    value = float(value)
    return value if math.isfinite(value) else None


def _div(a: Any, b: Any) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b != 0, a / np.where(b != 0, b, 1.0), np.nan)


def _energy(ss: np.ndarray, ga: np.ndarray, gb: np.ndarray) -> np.ndarray:
    """(H,) Frobenius energies sum_{n,m} s_n s_m ga[n,m] gb[n,m] of a diag(s) b^T, from the Gram matrices."""
    return (ss * ga * gb).sum((-1, -2))


def _diag(g: np.ndarray) -> np.ndarray:
    return np.diagonal(g, axis1=-2, axis2=-1)


def _label(shares: Mapping[str, float | None]) -> str:
    values = [-np.inf if shares[t] is None else shares[t] for t in TERMS]
    return TERMS[int(np.argmax(values))] if max(values) > -np.inf else "none"


def _participation(e: np.ndarray) -> float | None:
    return _f(_div(e.sum() ** 2, (e**2).sum()))


def _nanmean(values: list[float | None]) -> float | None:
    """Mean of the defined values (None where none is)."""
    kept = [v for v in values if v is not None]
    return _f(np.mean(kept)) if kept else None


def _column_stats(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """nan-mean and nan-std per column; an all-undefined column gives NaN quietly (reported as None)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(values, 0), np.nanstd(values, 0)


def _ranking(e: np.ndarray) -> list[int]:
    return [int(i) for i in np.argsort(-np.nan_to_num(e, nan=-np.inf), kind="stable")]


# -------------------------------------------------------------------------------------------- energies
def refuse_one_image(images: int) -> None:
    """BFD's position/content split is an ANOVA over images: refuse fewer than 2 (METHODS B.1)."""
    if 0 < images < 2:
        raise QKHooksError(
            f"BFD's position/content split needs at least 2 images; it got {images}. With one image the position "
            "factor P (the per-position mean over images) is that image itself, so the content factor C = X - P is "
            "zero by construction: every head would be 100% position-position and the content claims untestable. "
            "Run it over a dataset of several images (raise limit, or pass more image tensors).")


PASS_TOLERANCE = 1e-5
"""The largest ``content_mean`` (max |mean_i C_i| / max |P|) of a run whose second pass saw the tokens its first did.
The same tokens leave float64 rounding (~1e-16); tokens that differ between passes only by the model's float32
kernels (a GPU's non-deterministic sums) leave a few 1.2e-7 |X| / |P|. Another image among n moves it by about
|ΔX| / (n |P|): a random crop or a replaced photo reads 1e-2 to 1 (round 33's review)."""


def _unvalued(shares: np.ndarray) -> str:
    """" (N heads with no value left out)" where some head has no share at all (a head whose W_q or W_k is 0)."""
    none = int(np.isnan(shares).all(1).sum())
    return f" ({none} head{'s' if none != 1 else ''} with no value left out)" if none else ""


def refuse_other_images(layer: int, content_mean: float) -> None:
    """Refuse a BFD run whose second pass did not see the images its first did: P is the mean over the first pass's
    tokens, so the content factor C = X - P of other images is not zero-mean and every energy is of a mixed split."""
    if not content_mean <= PASS_TOLERANCE:
        raise QKHooksError(
            f"BFD layer {layer}: the second pass did not see the tokens the first did (mean content factor "
            f"{content_mean:.3g} of the position factor, where the same tokens give float rounding, <= {PASS_TOLERANCE:g}), "
            "so the position factor is the mean of other images and every energy would mix two splits. The data changed "
            "between the passes: a random augmentation (use deterministic preprocessing), a folder whose photos were "
            "added, removed or replaced, or a --resume over changed files. Fix the data and run again with --overwrite.")


def refuse_no_content(content_ss: float, second_moment: float, images: int, dtype: np.dtype,
                      layer: int | None = None) -> None:
    """Refuse a dataset whose content factor is zero up to float rounding: all images give the same tokens (at
    ``layer``, where given: one layer can lose its content alone, e.g. behind a norm whose weight is zero).

    ``content_ss`` = mean_i ||C_i||^2 and ``second_moment`` = mean_i ||X_i||^2 of one layer; ``dtype`` is the one
    the reducers accumulated in. Why this threshold: P = (sum of n tokens) / n, summed in ``dtype``, errs by at
    most (n - 1) eps |X| per element (recursive summation), the division and C = X - P by one eps each, so n
    identical images leave |C| <= (n + 1) eps |X| from rounding alone; content at or below that is no content.
    """
    if not (np.isfinite(content_ss) and np.isfinite(second_moment)):
        raise QKHooksError(
            f"BFD's energies are not finite (content {content_ss}, second moment {second_moment}): some image gives "
            "NaN or inf tokens entering W_q/W_k (NaN/inf pixels, or a float16 model that overflows). Find the image "
            "with qkhooks.record and its reducers (they name it), drop it, or compute in float32.")
    eps = float(np.finfo(dtype if np.issubdtype(dtype, np.floating) else np.float64).eps)
    if content_ss <= ((images + 1) * eps) ** 2 * second_moment:
        where = "" if layer is None else f" at layer {layer}"
        raise QKHooksError(
            f"BFD's content factor is zero{where}: all {images} images give the same tokens entering W_q/W_k"
            f"{where} (content energy {content_ss:.3g} of {second_moment:.3g}, within {np.dtype(dtype).name} "
            "rounding), so every head would be 100% position-position and the content claims untestable. Run it over "
            "more, different images" + ("." if layer is None else "; if other layers vary, this layer's own input does "
                                        "not (a norm whose weight is zero, say): leave it out with --layers."))


def energy_tables(state: Mapping[str, np.ndarray], layer: int | None = None) -> dict[str, Any]:
    """All energies of one layer as arrays (absolute values, not shares) from its :class:`BFDEnergies` state.

    Returns per definition (``frobenius``, ``additive``): ``terms`` (term -> (H,)), ``total`` (H,),
    ``mode_terms`` (term -> (H, K)), ``mode_energy`` (H, K); plus ``cells`` (three-way, cell -> (H,)),
    ``mode_add_full`` (H, K) additive energy with the grand mean, ``q``/``k`` side scores (H, K), and layer
    scalars ``pos_ss`` = ||P - mu||^2, ``content_ss`` = mean_i ||C_i||^2, ``mean_ss`` = N ||mu||^2.

    Raises QKHooksError for fewer than 2 images or a content factor at float rounding (:func:`refuse_no_content`).
    """
    s = {key: np.asarray(value, dtype=np.float64) for key, value in state.items()}
    n = float(s["images"])
    if n <= 0:
        raise QKHooksError("the BFD energies saw no images: run pass 2 over the dataset.")
    refuse_one_image(int(n))
    p = s["P"]
    tokens = p.shape[0]
    mu = p.mean(0)
    sig = s["sigma"]
    ss, s2 = sig[:, :, None] * sig[:, None, :], sig**2
    a, b = s["q_mean"], s["k_mean"]
    gq = {"G": tokens * a[:, :, None] * a[:, None, :], "P": s["gq_pos"], "C": s["gq_c"] / n}
    gk = {"G": tokens * b[:, :, None] * b[:, None, :], "P": s["gk_pos"], "C": s["gk_c"] / n}
    cc = s["cc"] / n
    cells = {c: cc if c == "CC" else _energy(ss, gq[c[0]], gk[c[1]]) for c in CELLS}
    # Two-way view: P (uncentred) = G + (P - mu); its Gram is the sum because sum_p (P[p] - mu) = 0.
    gq2, gk2 = {"P": gq["G"] + gq["P"], "C": gq["C"]}, {"P": gk["G"] + gk["P"], "C": gk["C"]}
    frob = {t: cc if t == "CC" else _energy(ss, gq2[t[0]], gk2[t[1]]) for t in TERMS}
    mode_frob = {t: s2 * (s["mode_cc"] / n if t == "CC" else _diag(gq2[t[0]]) * _diag(gk2[t[1]])) for t in TERMS}
    q = {"G": a**2, "P": _diag(gq["P"]) / tokens, "C": _diag(gq["C"]) / tokens}
    k = {"G": b**2, "P": _diag(gk["P"]) / tokens, "C": _diag(gk["C"]) / tokens}
    mode_add = {t: s2 * q[t[0]] * k[t[1]] for t in TERMS}
    add_terms = {t: v.sum(-1) for t, v in mode_add.items()}
    pos_ss, content_ss, mean_ss = float(((p - mu) ** 2).sum()), float(s["content_ss"]) / n, tokens * float(mu @ mu)
    refuse_no_content(content_ss, mean_ss + pos_ss + content_ss, int(round(n)), np.asarray(state["content_ss"]).dtype,
                      layer)
    return {
        "images": int(round(n)),
        "num_tokens": tokens,
        "sigma": sig,
        "frobenius": {"terms": frob, "total": s["total"] / n, "mode_terms": mode_frob,
                      "mode_energy": s2 * s["mode_total"] / n},
        "additive": {"terms": add_terms, "total": sum(add_terms.values()), "mode_terms": mode_add,
                     "mode_energy": sum(mode_add.values())},
        "cells": cells,
        "mode_add_full": s2 * (q["G"] + q["P"] + q["C"]) * (k["G"] + k["P"] + k["C"]),
        "q": q,
        "k": k,
        "pos_ss": pos_ss,
        "content_ss": content_ss,
        "mean_ss": mean_ss,
        "content_mean": float(np.abs(s["content_sum"] / n).max() / max(np.abs(p).max(), 1e-300)),
        "dim": int(np.asarray(p).shape[-1]),  # d: the form W_q^T W_k is d x d (the null-mode rule's size)
    }


def _part(t: Mapping[str, Any], h: int) -> dict[str, Any]:
    """One head under one definition: shares, absolute energies, interference, label, spread over modes."""
    terms = {k: float(t["terms"][k][h]) for k in TERMS}
    total, summed = float(t["total"][h]), sum(terms.values())
    shares = {k: _f(_div(terms[k], summed)) for k in TERMS}
    coupling = None if shares["CP"] is None or shares["PC"] is None else shares["CP"] + shares["PC"]
    return {
        "energy": shares,
        "energy_abs": {**{k: _f(v) for k, v in terms.items()}, "sum": _f(summed), "total": _f(total)},
        "interference": _f(_div(total - summed, total)),
        "coupling": coupling,
        "label": _label(shares),
        "participation_ratio": _participation(t["mode_energy"][h]),
        "mode_ranking": _ranking(t["mode_energy"][h]),
    }


def _mode_part(t: Mapping[str, Any], h: int, n: int) -> dict[str, Any]:
    terms = {k: t["mode_terms"][k][h, n] for k in TERMS}
    summed, energy = sum(terms.values()), t["mode_energy"][h]
    shares = {k: _f(_div(terms[k], summed)) for k in TERMS}
    return {"energy": shares, "label": _label(shares), "share_of_head": _f(_div(energy[n], energy.sum())),
            "interference": _f(_div(energy[n] - summed, energy[n]))}


TIED_NOTE = ("tied singular values (qkhooks.spectrum.tied_modes): any rotation of the tied block is an SVD of the same "
             "W_q^T W_k, and the mode-level numbers (additive shares, participation ratios) change with it, so they are "
             "left undetermined; the Frobenius shares are the logits' own terms and stay")


def _head_entry(tables: Mapping[str, Any], h: int, definition: str, per_mode: bool) -> dict[str, Any]:
    parts = {kind: _part(tables[kind], h) for kind in KINDS}
    tied = bool(tied_modes(np.asarray(tables["sigma"][h], np.float32), tables["dim"]).any())
    if tied:  # review r45: one W_q^T W_k, two factorisations gave CP shares 0.082 and 0.107
        add = parts["additive"]
        add.update(energy={t: None for t in TERMS}, coupling=None, label="undetermined", interference=None)
        for kind in KINDS:
            parts[kind]["participation_ratio"] = None
    full = tables["mode_add_full"][h]
    parts["additive"]["global_mean_share"] = (None if tied else  # a sum over modes of products, as above
                                              _f(_div(full.sum() - tables["additive"]["total"][h], full.sum())))
    cells = {c: float(tables["cells"][c][h]) for c in CELLS}
    cell_sum, total = sum(cells.values()), float(tables["frobenius"]["total"][h])
    chosen = parts[definition]
    entry: dict[str, Any] = {
        "head": h,
        **({"undetermined": TIED_NOTE} if tied else {}),
        **{key: chosen[key] for key in ("energy", "interference", "coupling", "label", "participation_ratio")},
        **parts,
        "three_way": {
            "cells": {c: _f(_div(v, cell_sum)) for c, v in cells.items()},
            "global_mean_share": _f(_div(sum(v for c, v in cells.items() if "G" in c), cell_sum)),
            "interference": _f(_div(total - cell_sum, total)),
        },
    }
    if per_mode:
        ranks = {kind: np.argsort(parts[kind]["mode_ranking"], kind="stable") for kind in KINDS}
        # round 33: a numerically null mode's vectors are any basis of the null spaces (its energy ~1e-10 of the
        # head's), so it gets no label and the claims leave it out (qkhooks.spectrum.null_modes, the float32 rule)
        null = null_modes(np.asarray(tables["sigma"][h], np.float32), tables["dim"])
        modes = []
        for n in range(tables["sigma"].shape[1]):
            mparts = {kind: {**_mode_part(tables[kind], h, n), "rank": int(ranks[kind][n])} for kind in KINDS}
            fm = full[n]
            mparts["additive"]["global_mean_share"] = _f(_div(fm - tables["additive"]["mode_energy"][h, n], fm))
            mparts["additive"]["sides"] = {f"{side}_{f}": _f(tables[side][f][h, n]) for side in "qk" for f in "GPC"}
            if null[n]:
                for kind in KINDS:
                    mparts[kind]["label"] = "null"
            pick = mparts[definition]
            modes.append({"mode": n, "sigma": _f(tables["sigma"][h, n]), "rank": pick["rank"], "energy": pick["energy"],
                          "label": pick["label"], "share_of_head": pick["share_of_head"], "null": bool(null[n]),
                          **mparts})
        entry["modes"] = modes
    return entry


def _layer_averages(tables: Mapping[str, Any], heads: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    shares = np.array([[np.nan if h[kind]["energy"][t] is None else h[kind]["energy"][t] for t in TERMS] for h in heads])
    # heads whose shares are undetermined (tied sigma under the additive definition) are left out of the pool too
    defined = np.array([any(h[kind]["energy"][t] is not None for t in TERMS) for h in heads], dtype=bool)
    pooled = np.array([np.asarray(tables[kind]["terms"][t])[defined].sum() for t in TERMS])
    mean, std = _column_stats(shares)
    return {
        "energy": {t: _f(v) for t, v in zip(TERMS, mean)},
        "energy_std": {t: _f(v) for t, v in zip(TERMS, std)},
        "energy_pooled": {t: _f(v) for t, v in zip(TERMS, _div(pooled, pooled.sum()))},
        "coupling": _f(mean[1] + mean[2]),
        "interference": _nanmean([h[kind]["interference"] for h in heads]),
        "labels": {t: sum(h[kind]["label"] == t for h in heads) for t in TERMS},
    }


# -------------------------------------------------------------------------------------------- decoding
def check_alpha(alpha: Any) -> float:
    """``alpha`` as a float, or QKHooksError unless it is a finite number > 0: the probes' ridge strength is
    lambda = alpha * trace(S_xx) / d, and with alpha <= 0 (or nan) no probe is fitted (round 38: a fake R^2)."""
    try:
        value = float(alpha)
    except (TypeError, ValueError):
        value = math.nan
    if isinstance(alpha, bool) or not math.isfinite(value) or value <= 0:
        raise QKHooksError(f"alpha (--alpha) must be a finite number > 0, the relative ridge strength of the position "
                           f"probes (lambda = alpha * trace(S_xx) / d), got {alpha!r}; use e.g. 1e-3 (the default).")
    return value


CONSTANT_FEATURES = ("constant features (trace(S_xx) = 0 up to rounding, e.g. a single training image for C): no "
                     "probe can be fitted, so there is no R^2; use more images")
"""The note of a probe left without an R^2 because its features do not vary."""

ROUNDING = 1e-10
"""Features whose centred trace is at most this share of their uncentred one vary by rounding only (a mean of equal
floats need not equal them): they are constant, and a probe fitted on them would report an R^2 of noise."""


def _varies(centred: float, uncentred: float) -> bool:
    """Whether features vary beyond rounding: trace(S_xx) above :data:`ROUNDING` of trace(X^T X)."""
    return centred > ROUNDING * uncentred


def _ridge_r2(train: tuple[np.ndarray, np.ndarray, float], test: tuple[np.ndarray, np.ndarray, float],
              y: np.ndarray, alpha: float) -> np.ndarray | None:
    """Held-out R^2 (per target column) of a ridge probe, from (sum F^T F, per-token feature sums, images); None
    when the training features are constant (no probe to fit)."""
    (xtx, sums, n), (txtx, tsums, tn) = train, test
    tokens = len(y)
    m, tm = n * tokens, tn * tokens
    xs, ys, xty = sums.sum(0), n * y.sum(0), sums.T @ y
    sxx, sxy = xtx - np.outer(xs, xs) / m, xty - np.outer(xs, ys) / m
    d = sxx.shape[0]
    if not _varies(float(np.trace(sxx)), float(np.trace(xtx))):  # constant (e.g. C of one image): no probe
        return None
    lam = alpha * float(np.trace(sxx)) / d
    w = np.linalg.solve(sxx + lam * np.eye(d), sxy)  # (d, 2)
    bias = (ys - w.T @ xs) / m
    txs, tys, tyty, txty = tsums.sum(0), tn * y.sum(0), tn * (y**2).sum(0), tsums.T @ y
    sse = (tyty - 2 * np.einsum("dj,dj->j", w, txty) - 2 * bias * tys + np.einsum("dj,de,ej->j", w, txtx, w)
           + 2 * bias * (w.T @ txs) + tm * bias**2)
    return 1 - _div(sse, tyty - tys**2 / tm)


POSITION_FOLDS = 5
"""Folds over patch positions for the P probe (position p is held out in fold p % POSITION_FOLDS)."""


def _position_folds_r2(p: np.ndarray, y: np.ndarray, alpha: float, folds: int = POSITION_FOLDS) -> np.ndarray | None:
    """R^2 (per target column) of ridge probes from P's rows to the patch coordinates, k-fold over positions; None
    with too few positions, nan when a fold's training rows of P are constant (no probe to fit)."""
    if len(y) < 2 * folds:
        return None
    fold = np.arange(len(y)) % folds
    sse = np.zeros(y.shape[1])
    for f in range(folds):
        train, test = fold != f, fold == f
        fm, ym = p[train].mean(0), y[train].mean(0)
        fc = p[train] - fm
        sxx = fc.T @ fc
        if not _varies(float(np.trace(sxx)), float((p[train] ** 2).sum())):  # P is constant: no probe to fit
            return np.full(y.shape[1], np.nan)
        lam = alpha * float(np.trace(sxx)) / p.shape[1]
        w = np.linalg.solve(sxx + lam * np.eye(p.shape[1]), fc.T @ (y[train] - ym))
        sse += ((y[test] - (p[test] - fm) @ w - ym) ** 2).sum(0)
    return 1 - _div(sse, ((y - y.mean(0)) ** 2).sum(0))


def decoding_r2(state: Mapping[str, np.ndarray], grid: tuple[int, int], alpha: float = 1e-3) -> dict[str, Any]:
    """Held-out R^2 of ridge probes for the patch row and column from X, P and C of one layer.

    ``state`` is one layer of a :class:`PositionDecoding` state. The probes are fitted in closed form from
    the streamed statistics (C and P statistics follow from those of X and the fixed P), so no token is kept.
    """
    alpha = check_alpha(alpha)
    s = {key: np.asarray(value, dtype=np.float64) for key, value in state.items()}
    p, n = s["P"], s["images"]
    y = patch_targets(grid)
    out: dict[str, Any] = {"train_images": int(n[0]), "holdout_images": int(n[1]), "alpha": alpha,
                           "position_folds": POSITION_FOLDS}
    none = {"row": None, "col": None, "mean": None}
    r2p = _position_folds_r2(p, y, alpha)
    out["P"] = none if r2p is None else {"row": _f(r2p[0]), "col": _f(r2p[1]), "mean": _f(np.mean(r2p))}
    constant = []
    if r2p is not None and np.isnan(r2p).any():
        out["P"] = dict(none)
        constant.append("P")
    if n[0] < 1 or n[1] < 1:
        out.update({f: dict(none) for f in "XC"})
        out["note"] = f"no held-out or no training images: use more images ({HOLDOUT_HOW})."
        return out
    feats: dict[str, list[tuple[np.ndarray, np.ndarray, float]]] = {f: [] for f in "XC"}
    for j in (0, 1):
        xtx, sums = s["xtx"][j], s["sums"][j]
        feats["X"].append((xtx, sums, n[j]))
        feats["C"].append((xtx - sums.T @ p - p.T @ sums + n[j] * p.T @ p, sums - n[j] * p, n[j]))
    for f, (train, test) in feats.items():
        r2 = _ridge_r2(train, test, y, alpha)
        if r2 is None:
            out[f] = dict(none)
            constant.append(f)
        else:
            out[f] = {"row": _f(r2[0]), "col": _f(r2[1]), "mean": _f(np.mean(r2))}
    if constant:
        out["note"] = f"{', '.join(constant)}: {CONSTANT_FEATURES}."
    return out


# ------------------------------------------------------------------------------------------- summarize
def summarize(
    energies: Mapping[str, Any],
    decoding: Mapping[str, Any] | None = None,
    *,
    model: str = "",
    definition: str = "frobenius",
    alpha: float = 1e-3,
    per_mode: bool = True,
) -> dict[str, Any]:
    """The JSON-shaped BFD result from the states of :class:`BFDEnergies` (and :class:`PositionDecoding`).

    Args:
        energies: ``BFDEnergies.state_dict()`` (or as read back from a run file).
        decoding: ``PositionDecoding.state_dict()``, or None to skip the probes.
        model: a label for the report.
        definition: which definition fills the top-level ``energy``/``label``/``interference``/``coupling``/
            ``participation_ratio``/``rank`` of heads, modes and layers: ``"frobenius"`` (B.2, default) or
            ``"additive"`` (B.3). Both are always present under their own names.
        alpha: relative ridge strength of the position probes.
        per_mode: include the per-mode entries (the bulk of the JSON).
    """
    if definition not in KINDS:
        raise QKHooksError(f"definition must be 'frobenius' or 'additive', got {definition!r}.")
    alpha = check_alpha(alpha)
    dec_layers = set() if decoding is None else set(int(l) for l in np.asarray(decoding["layers"]).reshape(-1))
    layers_out = []
    images = num_tokens = 0
    for layer in (int(l) for l in np.asarray(energies["layers"]).reshape(-1)):
        t = energy_tables(layer_state(energies, layer), layer)
        images, num_tokens = t["images"], t["num_tokens"]
        refuse_other_images(layer, t["content_mean"])
        heads = [_head_entry(t, h, definition, per_mode) for h in range(t["sigma"].shape[0])]
        variance = t["pos_ss"] + t["content_ss"]
        moment = t["mean_ss"] + variance
        averages = {kind: _layer_averages(t, heads, kind) for kind in KINDS}
        entry: dict[str, Any] = {
            "layer": layer,
            "position_variance_share": _f(_div(t["pos_ss"], variance)),
            "content_variance_share": _f(_div(t["content_ss"], variance)),
            "second_moment_shares": {"global_mean": _f(_div(t["mean_ss"], moment)),
                                     "position": _f(_div(t["pos_ss"], moment)),
                                     "content": _f(_div(t["content_ss"], moment))},
            **{key: averages[definition][key] for key in ("energy", "energy_std", "energy_pooled", "coupling",
                                                          "interference", "labels")},
            "global_mean_share": _nanmean([h["three_way"]["global_mean_share"] for h in heads]),
            **averages,
            "checks": {"content_mean": _f(t["content_mean"])},
        }
        if layer in dec_layers:
            grid = tuple(int(g) for g in np.asarray(decoding["grid"]).reshape(-1))  # type: ignore[index]
            entry["decoding"] = decoding_r2(layer_state(decoding, layer), grid, alpha)  # type: ignore[arg-type]
        entry["heads"] = heads
        layers_out.append(entry)
    drop = bool(np.asarray(energies.get("drop_prefix", 0)))
    return {
        "model": model,
        "definition": definition,
        "images": images,
        "num_tokens": num_tokens,
        "num_prefix_tokens": int(np.asarray(energies.get("num_prefix_tokens", 0))),
        "prefix_tokens": "dropped" if drop else "included as positions",
        "biases": "excluded (bias-free M = W_q^T W_k)",
        "definitions": DEFINITIONS,
        "layers": layers_out,
    }


# ----------------------------------------------------------------------------------------- paper claims
def holdout_images(result: Mapping[str, Any]) -> int:
    """The held-out images the X and C position probes of a BFD result are tested on (0 without probes)."""
    return max((int(l.get("decoding", {}).get("holdout_images", 0)) for l in result["layers"]), default=0)


def paper_claims(
    result: Mapping[str, Any],
    *,
    definition: str | None = None,
    r2_position: float = 0.9,
    r2_content: float = 0.1,
) -> dict[str, Any]:
    """Whether the paper's headline claims hold on a BFD result, as booleans and one-line sentences.

    Claims (shares are plain means over every head of every layer, of ``definition``, default the result's):
    ``cc_dominant`` CC is the largest share; ``cp_second`` the largest of CP, PC, PP is a content-position
    term (either side, the paper's wording allows both); ``heads_specialise`` heads carry at least two
    different labels; ``modes_specialise`` modes include CC, content-position (CP or PC) and PP operators
    (None without per-mode entries); ``split_isolates_position`` every probed layer has R^2(P) >=
    ``r2_position`` and R^2(C) <= ``r2_content`` (None without probes, or with probes tested on fewer than
    :data:`MIN_HOLDOUT` held-out images, whose R² is noise).

    Returns:
        ``{claim: bool | None, ..., "sentences": [one line per claim, in the order above]}``.

    Raises QKHooksError for a result of one image (its content factor is zero by construction).
    """
    kind = definition or result.get("definition", "frobenius")
    if result.get("images") is not None:
        refuse_one_image(int(result["images"]))
    if kind not in KINDS:
        raise QKHooksError(f"definition must be 'frobenius' or 'additive', got {kind!r}.")
    heads = [h for layer in result["layers"] for h in layer["heads"]]
    if not heads:
        raise QKHooksError("the BFD result has no heads: run it over at least one layer.")
    shares = np.array([[np.nan if h[kind]["energy"][t] is None else h[kind]["energy"][t] for t in TERMS] for h in heads])
    mean = dict(zip(TERMS, _column_stats(shares)[0]))
    text = ", ".join(f"{t} {mean[t]:.2f}" for t in TERMS)
    top = max(TERMS, key=lambda t: -np.inf if np.isnan(mean[t]) else mean[t])
    second = max(("CP", "PC", "PP"), key=lambda t: -np.inf if np.isnan(mean[t]) else mean[t])
    head_labels = Counter(h[kind]["label"] for h in heads)
    label_text = ", ".join(f"{t} {head_labels.get(t, 0)}" for t in TERMS)
    out: dict[str, Any] = {
        "cc_dominant": top == "CC",
        "cp_second": second in ("CP", "PC"),
        "heads_specialise": len([t for t in TERMS if head_labels.get(t)]) >= 2,
    }
    sentences = {
        "cc_dominant": f"Content-content {'dominates' if out['cc_dominant'] else f'does not dominate ({top} does)'}: "
        f"mean {kind} shares over {int((~np.isnan(shares).all(1)).sum())} heads{_unvalued(shares)} are {text}.",
        "cp_second": f"Of CP, PC and PP the largest is {second} ({mean[second]:.2f}; coupling CP+PC "
        f"{mean['CP'] + mean['PC']:.2f} vs PP {mean['PP']:.2f}).",
        "heads_specialise": f"Head labels (each head's largest share; point estimates, not tested): {label_text}.",
    }
    every = [m for h in heads for m in h.get("modes", [])]
    modes = [m for m in every if not m.get("null")]
    if modes:
        mode_labels = Counter(m[kind]["label"] for m in modes)
        out["modes_specialise"] = bool(mode_labels.get("CC") and mode_labels.get("PP")
                                       and (mode_labels.get("CP") or mode_labels.get("PC")))
        left = len(every) - len(modes)
        sentences["modes_specialise"] = (f"Mode labels over {len(modes)} modes: "
                                         + ", ".join(f"{t} {mode_labels.get(t, 0)}" for t in TERMS)
                                         + (f" ({left} numerically null modes left out: the weights do not fix their "
                                            "vectors)" if left else "") + ".")
    else:
        out["modes_specialise"] = None
        sentences["modes_specialise"] = "No per-mode entries in this result (run with per-mode output)."
    probed = [(l["layer"], l["decoding"]) for l in result["layers"]
              if all(l.get("decoding", {}).get(f, {}).get("mean") is not None for f in "PC")]
    held = holdout_images(result)
    if probed and any("holdout_images" in d for _, d in probed) and held < MIN_HOLDOUT:
        out["split_isolates_position"] = None  # an R² from C on a few images is noise: no verdict from it
        sentences["split_isolates_position"] = (
            f"The position probes from C are tested on {held} held-out image{'s' * (held != 1)}, fewer than "
            f"{MIN_HOLDOUT}: not read ({HOLDOUT_HOW}).")
    elif probed:
        worst_p = min(d["P"]["mean"] for _, d in probed)
        worst_c = max(d["C"]["mean"] for _, d in probed)
        out["split_isolates_position"] = worst_p >= r2_position and worst_c <= r2_content
        sentences["split_isolates_position"] = (
            f"Held-out position decoding over {len(probed)} layers: lowest R2 from P {worst_p:.2f} (needs >= "
            f"{r2_position}), highest R2 from C {worst_c:.2f} (needs <= {r2_content})."
            + ("" if worst_p >= r2_position else " P's probe predicts held-out positions from the others, so a P "
               "that labels positions without encoding where they are (random position embeddings) reads low "
               "however much of X it carries."))
    else:
        out["split_isolates_position"] = None
        sentences["split_isolates_position"] = ("Not enough data for the position probes (or none in this result): "
                                                f"{HOLDOUT_HOW}.")
    out["sentences"] = [sentences[key] for key in CLAIMS]
    return out
