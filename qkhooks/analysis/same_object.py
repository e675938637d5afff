"""Same object or not (Pan et al. Fig. 5; METHODS A.6, A.7): do a mode's query and key sides pick one object?

Pure functions on arrays: :func:`optimal_objects` and :func:`same_object_probability` per mode,
:func:`same_object_table` over a whole top-k state, :func:`chance_same_object` for the chance line.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

from qkhooks.errors import QKHooksError
from qkhooks.analysis.topk import layer_state, state_layers, top_images

__all__ = ["optimal_objects", "same_object_probability", "chance_same_object", "same_object_table",
           "UNINFORMATIVE_NOTE"]

UNINFORMATIVE_NOTE = (
    "every image its modes' p_same counts holds exactly one object, so the query and key sides can only pick that "
    "object: p_same = chance = 1 by construction, whatever the modes do (e.g. a run of one image), and the layer has "
    "no value; record images with two or more labelled objects (at least some) to test it")
"""Why a layer's same-object figures are left out where its chance is 1 (:func:`same_object_table`)."""


def optimal_objects(maps: Any, objects: Any) -> np.ndarray:
    """Per image, the object with the largest mean map value over its patches (METHODS A.6, A.7).

    Args:
        maps: (T, P) patch maps (prefix tokens already dropped) or (T, gh, gw).
        objects: (T, gh, gw) or (T, P) integer labels on the patch grid, 0 = background.

    Returns:
        (T,) int64 label of the optimal object (ties: the lowest label), 0 for an image with no object.
    """
    maps = np.asarray(maps, dtype=np.float64)
    objects = np.asarray(objects)
    t = maps.shape[0]
    maps, objects = maps.reshape(t, -1), objects.reshape(objects.shape[0], -1)
    if objects.shape != maps.shape:
        raise QKHooksError(f"maps {maps.shape} and object labels {objects.shape} must cover the same patches.")
    if objects.dtype.kind not in "iu" or (objects.size and objects.min() < 0):
        raise QKHooksError("object labels must be integers >= 0 (0 = background).")
    out = np.zeros(t, dtype=np.int64)
    for i in range(t):
        # the image's labels, sorted, and each patch's index among them: bins for the labels present, whatever their
        # values (ids up to 2**31 - 1 are valid; a bincount over the raw ids allocated 8 bytes per possible id)
        labels, lab = np.unique(objects[i].astype(np.int64), return_inverse=True)
        count = np.bincount(lab, minlength=labels.size)
        total = np.bincount(lab, weights=maps[i], minlength=labels.size)
        present = np.flatnonzero(labels > 0)
        if present.size:
            mean = total[present] / count[present]
            mean = np.where(np.isnan(mean), -np.inf, mean)
            out[i] = labels[present[int(np.argmax(mean))]]  # argmax: first (lowest label) on ties
    return out


def same_object_probability(
    query: Any, key: Any, objects: Any, num_prefix_tokens: int = 0
) -> tuple[float, int]:
    """Fraction of images where the query side and the key side pick the same object (Fig. 5).

    Args:
        query, key: (T, N) signed maps of one mode's top images over all tokens.
        objects: (T, gh, gw) labels on the patch grid (0 = background); gh * gw = N - num_prefix_tokens.
        num_prefix_tokens: tokens before the patches, dropped.

    Returns:
        (probability, images used); images with no object are not counted (NaN when none is left).
    """
    query, key, objects = np.asarray(query), np.asarray(key), np.asarray(objects)
    if query.shape != key.shape or query.ndim != 2:
        raise QKHooksError(f"query and key maps must both be (images, tokens), got {query.shape} and {key.shape}.")
    patches = query.shape[1] - int(num_prefix_tokens)
    if objects.shape[0] != query.shape[0] or int(np.prod(objects.shape[1:])) != patches:
        raise QKHooksError(
            f"object labels {objects.shape} do not fit {query.shape[0]} images x {patches} patch tokens "
            f"({query.shape[1]} tokens - {num_prefix_tokens} prefix)."
        )
    q_obj = optimal_objects(query[:, num_prefix_tokens:], objects)
    k_obj = optimal_objects(key[:, num_prefix_tokens:], objects)
    valid = (q_obj > 0) & (k_obj > 0)
    used = int(valid.sum())
    return (float(np.mean(q_obj[valid] == k_obj[valid])) if used else math.nan), used


def chance_same_object(objects: Any) -> float:
    """Same-object probability if the key side picked one of the image's objects at random: the mean over
    images with at least one object of 1 / (objects in the image). Fig. 5's chance line, over the whole data set
    (:func:`same_object_table` gives each layer's chance over the images its p_same rests on)."""
    counts = _object_counts(objects)
    counts = counts[counts > 0]
    return float(np.mean(1.0 / counts)) if counts.size else math.nan


def _object_counts(objects: Any) -> np.ndarray:
    """Objects (labels > 0) in each image of (T, ...) labels."""
    labels = np.asarray(objects)
    return np.array([np.count_nonzero(np.unique(lab) > 0) for lab in labels.reshape(len(labels), -1)], dtype=np.int64)


def _read_rows(array: Any, indices: np.ndarray) -> dict[int, np.ndarray]:
    """Rows of a (lazy) per-image array by index, reading each needed row once."""
    uniq = np.unique(indices[indices >= 0])
    if uniq.size == 0:
        return {}
    total = int(np.prod(array.shape))
    if total <= 50_000_000 or uniq.size > array.shape[0] // 4:
        full = np.asarray(array[:])
        return {int(i): full[i] for i in uniq}
    return {int(i): np.asarray(array[int(i)]) for i in uniq}


def same_object_table(
    topk: Mapping[str, Any],
    objects: Any,
    spectra: Mapping[int, Mapping[str, Any]],
    num_prefix_tokens: int | Mapping[int, int],
    top: int = 5,
    sign: str | int = "both",
) -> dict[str, Any]:
    """Same-object probability per mode and per layer from a stacked top-k state and per-image object labels.

    Per mode: its ``top`` best distinct images (:func:`top_images`; with the default ``sign="both"`` each image
    is scored for both signs and counted once, with the maps of its better sign; ``top`` at most the state's k,
    which ranks each sign's best k only); per layer:
    ``p_same`` = mean over heads of each head's sigma-weighted average over its modes (weights renormalised
    over the modes that have a value, like the cosine average of METHODS A.7), plus ``p_same_pooled``
    (sum sigma p / sum sigma over all modes of the layer) and ``p_same_unweighted``; and the chance the same way
    (``chance``, ``chance_per_head``: per mode the mean of 1 / objects over the images its p_same counts, which a
    key side picking one of the image's objects at random would score). The top images of a mode are a selection:
    an image with one object scores 1 whatever the mode does, so they need not share the data set's chance
    (:func:`chance_same_object`). Where every image the layer's modes count holds one object, p_same = chance = 1 by
    construction: the layer's p_same figures (and ``per_head``) are NaN and ``uninformative`` says why
    (:data:`UNINFORMATIVE_NOTE`; None elsewhere); the per-mode values stay, each beside its chance of 1.

    Args:
        topk: :meth:`TopKModes.state_dict` (numpy).
        objects: (n, gh, gw) integer labels per image (e.g. the run's ``masks/objects``), lazily indexable; or
            layer -> such labels on that layer's own grid (multi-stage models).
        spectra: layer -> {"S": (H, K)}, optionally "null" (H, K) bool: the numerically null modes
            (:func:`qkhooks.spectrum.null_modes`), whose vectors the weights do not fix; they get no value and are
            left out of every layer figure (``p_same_unweighted`` and ``modes_with_value`` included).
        num_prefix_tokens: one count for every layer, or layer -> its own.
    """
    kept = int(np.asarray(topk["k"]))
    if int(top) > kept:  # top_images would give k images while the result said top
        raise QKHooksError(f"the same-object statistic over the top {top} images per mode needs a top-k state that "
                           f"ranks at least {top}, and this one ranks {kept}; ask for top <= {kept}, or rank more: "
                           f"TopKModes(k={top}) when recording, or `qkhooks analyze modes --k {top}` on a run that "
                           "stores its maps.")
    layers = [l for l in state_layers(topk) if l in spectra and (not isinstance(objects, Mapping) or l in objects)]
    per_layer = objects if isinstance(objects, Mapping) else {l: objects for l in layers}
    prefixes = num_prefix_tokens if isinstance(num_prefix_tokens, Mapping) else {l: num_prefix_tokens for l in layers}
    rows_cache: dict[int, dict[int, np.ndarray]] = {}
    out_layers = []
    for layer in layers:
        st = layer_state(topk, layer)
        labels_of = per_layer[layer]
        if id(labels_of) not in rows_cache:
            needed = np.concatenate([layer_state(topk, l)["index"].reshape(-1) for l in layers if per_layer[l] is labels_of])
            rows_cache[id(labels_of)] = _read_rows(labels_of, needed)
        rows_by_index = rows_cache[id(labels_of)]
        S = np.asarray(spectra[layer]["S"], dtype=np.float64)
        heads, modes = st["score"].shape[:2]
        p = np.full((heads, modes), np.nan)
        chance = np.full((heads, modes), np.nan)
        used = np.zeros((heads, modes), dtype=np.int64)
        for h in range(heads):
            for m in range(modes):
                best = top_images(st, h, m, sign, top)
                if best["index"].size == 0:
                    continue
                labels = np.stack([rows_by_index[int(i)] for i in best["index"]])
                p[h, m], used[h, m] = same_object_probability(best["query"], best["key"], labels, prefixes[layer])
                counts = _object_counts(labels)
                if used[h, m]:  # the images counted: those with an object (each then has an optimal one)
                    chance[h, m] = float(np.mean(1.0 / counts[counts > 0]))
        null = spectra[layer].get("null")
        if null is not None:  # an arbitrary direction's top images say nothing of the model (sigma ~ 0: no weight)
            null = np.asarray(null, dtype=bool)[:heads, :modes]
            p[null], chance[null], used[null] = np.nan, np.nan, 0
        valued = np.isfinite(p)
        # every image counted holds one object: each side can only pick it, so p_same = chance = 1 whatever the modes
        # do (a one-image run's usual case): exact, and says nothing; flagged, with no layer value (review r38)
        forced = bool(valued.any()) and bool(np.all(chance[valued] == 1.0))
        w = np.where(np.isnan(p), 0.0, S[:, :modes])
        pz = np.nan_to_num(p)
        head_w = w.sum(1)
        per_head = np.where(head_w > 0, (w * pz).sum(1) / np.maximum(head_w, 1e-300), np.nan)
        chance_head = np.where(head_w > 0, (w * np.nan_to_num(chance)).sum(1) / np.maximum(head_w, 1e-300), np.nan)
        if forced:
            per_head = np.full_like(per_head, np.nan)
        out_layers.append({
            "layer": layer,
            "p_same": float(np.nanmean(per_head)) if np.isfinite(per_head).any() else math.nan,
            "p_same_pooled": float((w * pz).sum() / w.sum()) if w.sum() > 0 and not forced else math.nan,
            "p_same_unweighted": float(np.nanmean(p)) if np.isfinite(p).any() and not forced else math.nan,
            "uninformative": UNINFORMATIVE_NOTE if forced else None,
            "per_head": per_head.tolist(),
            "chance": float(np.nanmean(chance_head)) if np.isfinite(chance_head).any() else math.nan,
            "chance_per_head": chance_head.tolist(),
            "chance_per_mode": chance.tolist(),
            "per_mode": p.tolist(),
            "images_used": used.tolist(),
            "modes_with_value": int(np.isfinite(p).sum()),
        })
    return {"layers": [r["layer"] for r in out_layers], "rows": out_layers, "top": int(top), "sign": str(sign)}
