"""Attention preference on odd-one-out displays (Pan et al., Fig. 2; METHODS A.4, A.7).

Per image one *target* query token and one *distractor* query token are picked at the maximum of the
target / distractor mask downscaled to the patch grid (area fractions). For every (layer, head) the
post-softmax rows of those two tokens are restricted to patch tokens (prefix tokens dropped), renormalised to
sum 1, and their inner products with the downscaled target, distractor and background masks are taken:

    T->T, T->D, T->B, D->D, D->T, D->B        (query -> key region)

Background is 1 - target - distractor (clipped at 0), so a query's three numbers sum to 1 whenever the two
masks do not overlap. Grouped: same object (TT, DD), different object (TD, DT), background (TB, DB), each the
mean of its two members. Per layer we report the mean over images and heads, and the spread across images
of the head-averaged group value (population std, ddof=0).

Three ways in, one table out:

- :func:`odd_one_out_meta` builds the batch metadata the recording needs (query tokens, pool masks) and
  the downscaled masks the statistics need;
- :class:`PreferenceReducer` is a streaming sink (memory independent of the dataset);
- :func:`analyze_preference` reads a stored run and writes ``preference.csv/.json/.png``.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from qkhooks._devices import to_device
from qkhooks._json import write_json
from qkhooks.errors import QKHooksError
from qkhooks.data.masks import TokenCells, first_argmax, refuse_outside_fractions, refuse_overlap
from qkhooks.reducers import Reducer, refuse_non_finite

__all__ = [
    "PAIRS",
    "GROUPS",
    "odd_one_out_meta",
    "preference_from_rows",
    "refuse_rows_without_mass",
    "group_preference",
    "PreferenceReducer",
    "preference_from_reducer",
    "preference_table",
    "preference_values",
    "per_image_groups",
    "analyze_preference",
    "write_preference",
    "format_table",
    "spread_legend",
]

PAIRS: tuple[str, ...] = ("TT", "TD", "TB", "DD", "DT", "DB")
"""Order of the six values: query object then key region (T target, D distractor, B background)."""

GROUPS: dict[str, tuple[int, int]] = {
    "same_object": (0, 3),  # T->T, D->D
    "different_object": (1, 4),  # T->D, D->T
    "background": (2, 5),  # T->B, D->B
}
"""Group name -> the indices into :data:`PAIRS` that are averaged."""

_GROUP_INDEX = torch.tensor([list(v) for v in GROUPS.values()])  # (3, 2)
_CHUNK = 256  # images read from a run file at a time


# ------------------------------------------------------------------------------------------ meta
def _as_masks(mask: Any, name: str) -> torch.Tensor:
    mask = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask)
    if mask.dim() == 2:
        mask = mask[None]
    if mask.dim() != 3:
        raise QKHooksError(f"{name} masks must be (batch, H, W), got shape {tuple(mask.shape)}.")
    mask = mask if mask.is_floating_point() else mask.float()
    refuse_outside_fractions(mask, f"{name} mask", "pixel")
    return mask


def _image_names(ids: Sequence[Any] | None, n: int) -> list[str]:
    """How refusals name a batch's n images: their ids, else their positions in the batch."""
    if ids is not None and len(ids) == n:
        return [f"image {str(i)!r}" for i in ids]
    return [f"the image at position {i} of this batch" for i in range(n)]


def odd_one_out_meta(
    target: torch.Tensor, distractor: torch.Tensor, grid: tuple[int, int], num_prefix_tokens: int,
    ids: Sequence[Any] | None = None, cells: TokenCells | None = None,
) -> dict[str, torch.Tensor]:
    """Query tokens, pool masks and patch-grid masks for a batch of odd-one-out images.

    The recording needs the query tokens *before* the forward (attention rows are rebuilt only for them), so
    the choice is made here from the pixel masks, once, and the same downscaled masks feed the statistics.

    Args:
        target: (B, H, W) target masks in model-input geometry (fractions or booleans).
        distractor: (B, H, W) distractor masks (all distractors together).
        grid: the patch grid (gh, gw) of this input size.
        num_prefix_tokens: tokens before the patches (1 for CLS, 2 for DeiT-distilled, 5 with 4 registers).
        ids: the batch's image ids (a dataset's ``id``), named in the error for an empty mask; None names the
            images by their position in the batch.
        cells: the input pixels each token shows (:func:`~qkhooks.data.masks.token_cells`), for a grid that does
            not divide the input; None: blocks, or the refusal.

    Returns:
        ``query_tokens`` LongTensor (B, 2): (target, distractor) token in model order (prefix + patch index
        of the mask's maximum, first on ties); ``pool_masks`` FloatTensor (B, 3, gh*gw): target, distractor,
        background on the patch grid; ``target_grid`` and ``distractor_grid`` (B, gh, gw).

    Raises:
        QKHooksError: mismatched shapes, an image whose target or distractor mask is empty, or one whose masks
        overlap (:func:`~qkhooks.data.masks.refuse_overlap`).
    """
    from qkhooks.data.masks import downscale_mask

    t, d = _as_masks(target, "target"), _as_masks(distractor, "distractor")
    if t.shape != d.shape:
        raise QKHooksError(
            f"target and distractor masks must have the same shape, got {tuple(t.shape)} and {tuple(d.shape)}."
        )
    if int(num_prefix_tokens) < 0:
        raise QKHooksError(f"num_prefix_tokens must be >= 0, got {num_prefix_tokens}.")
    gh, gw = int(grid[0]), int(grid[1])
    t_grid = downscale_mask(t.float(), (gh, gw), cells).float()
    d_grid = downscale_mask(d.float(), (gh, gw), cells).float()
    for name, g in (("target", t_grid), ("distractor", d_grid)):
        empty = (g.flatten(1).amax(1) <= 0).nonzero().flatten().tolist()
        if empty:
            which = (f"image(s) {[str(ids[i]) for i in empty]}" if ids is not None and len(ids) == g.shape[0]
                     else f"image(s) at position(s) {empty} of this batch")
            raise QKHooksError(
                f"the {name} mask of {which} is empty at the model's input size "
                f"{tuple(t.shape[-2:])}, so there is no {name} token to query (METHODS A.4). Either the mask file is "
                f"blank or the preprocessing cut the {name} away (e.g. it lies in the border the centre crop removes). "
                "Drop those images from the dataset, fix their masks, or preprocess without cropping them away "
                "(an image config whose resize keeps the whole display)."
            )
    refuse_overlap(t, d, _image_names(ids, t.shape[0]), f"pixels at the model's input size {tuple(t.shape[-2:])}")
    tokens = torch.stack([first_argmax(t_grid.flatten(1)), first_argmax(d_grid.flatten(1))], dim=1)
    background = (1.0 - t_grid - d_grid).clamp_min(0.0)
    pool = torch.stack([t_grid, d_grid, background], dim=1).flatten(2)
    return {
        "query_tokens": (tokens + int(num_prefix_tokens)).long(),
        "pool_masks": pool,
        "target_grid": t_grid,
        "distractor_grid": d_grid,
    }


# ---------------------------------------------------------------------------------------- values
def preference_from_rows(
    rows: torch.Tensor, target_grid: torch.Tensor, distractor_grid: torch.Tensor, num_prefix_tokens: int,
    names: Sequence[str] | None = None, check_overlap: bool = True, check_mass: bool = True, layer: Any = None,
) -> torch.Tensor:
    """The six preference values (B, H, 6), ordered as :data:`PAIRS`, from two attention rows per image.

    Args:
        rows: (B, H, 2, N) post-softmax rows of the target (index 0) and distractor (index 1) query tokens.
        target_grid, distractor_grid: (B, gh, gw) fractional masks on the patch grid; grids that overlap (target +
            distractor above 1 in a patch: the masks the values are computed from) are refused.
        num_prefix_tokens: tokens before the patches; they are dropped before renormalising.
        names: how a refusal names each image (default: its position in the batch).
        check_overlap: False where the caller has refused overlapping grids and grids outside [0, 1]
            (:func:`refuse_outside_fractions`) already (a reducer, once per batch
            rather than once per layer).
        check_mass: refuse rows that are no distribution over the patch tokens (:func:`refuse_rows_without_mass`); False
            where the caller checks it itself (the reducer, once per batch with its other checks, before it keeps any
            value). Unchecked, such a row's values mean nothing: NaN where its patch mass is 0, any size where a signed
            row's mass rounds to a tiny positive number (2e7 for [0.1 | 0.3, -0.1, -0.1, -0.1] in float32).
        layer: the layer the rows belong to, for that refusal's message.

    Returns:
        float tensor (B, H, 6) (at least float32, on the rows' device).
    """
    rows = torch.as_tensor(rows)
    if rows.dim() != 4 or rows.shape[2] != 2:
        raise QKHooksError(
            f"attention rows must be (batch, heads, 2, tokens) for the target and distractor queries, got "
            f"{tuple(rows.shape)}; record odd-one-out data with attention='rows' and odd_one_out_meta()."
        )
    dtype = torch.promote_types(rows.dtype, torch.float32)
    t = torch.as_tensor(target_grid).to(dtype)  # checked where they are (the host), then moved: no device sync
    d = torch.as_tensor(distractor_grid).to(dtype)
    if t.shape != d.shape or t.dim() != 3 or t.shape[0] != rows.shape[0]:
        raise QKHooksError(
            f"target/distractor grids must both be (batch={rows.shape[0]}, gh, gw), got {tuple(t.shape)} and "
            f"{tuple(d.shape)}."
        )
    p = int(num_prefix_tokens)
    patches = t.shape[1] * t.shape[2]
    if rows.shape[-1] - p != patches:
        raise QKHooksError(
            f"the rows have {rows.shape[-1]} tokens but {p} prefix tokens + a {tuple(t.shape[1:])} grid make "
            f"{p + patches}; pass the model's num_prefix_tokens and the grid of this input size."
        )
    if check_overlap:  # the reducer checks both once per batch
        for name, grid in (("target grid", t), ("distractor grid", d)):
            refuse_outside_fractions(grid, name, "patch")
        refuse_overlap(t, d, names if names is not None else _image_names(None, t.shape[0]),
                       f"patches of the {t.shape[1]} x {t.shape[2]} grid")
    t, d = to_device(t, rows.device), to_device(d, rows.device)
    attn = rows[..., p:].to(dtype)
    # review r40: a row whose patch mass is not positive has no normalisation. The old clamp_min(tiny) turned a
    # negative mass (CaiT talking heads' proj_w-mixed maps, differential attention with lambda > 1) into values of
    # ~1e37 or inf, folded or refused as "NaN pixels"; NaN here, refused with the reason where checked.
    mass = attn.sum(-1, keepdim=True)
    if check_mass:
        refuse_rows_without_mass(_distributions(attn, mass[..., 0]).flatten(1).all(1)[None].cpu(), [layer], names)
    attn = attn / mass.where(mass > 0, torch.full_like(mass, float("nan")))
    t, d = t.flatten(1), d.flatten(1)
    masks = torch.stack([t, d, (1.0 - t - d).clamp_min(0.0)], dim=1)  # (B, 3, P)
    vals = torch.einsum("bhqp,bmp->bhqm", attn, masks)  # (B, H, 2, 3): query x (T, D, B)
    return torch.cat([vals[:, :, 0], vals[:, :, 1][..., [1, 0, 2]]], dim=-1)


def rows_with_mass(rows: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """(B,) bool: whether every row of each image (B, H, 2, N) is a distribution over the patch tokens up to scale:
    no negative entry and a positive sum (finite rows; NaN and inf are left to the non-finite check)."""
    patches = rows[..., int(num_prefix_tokens):]
    mass = patches.sum(-1, dtype=torch.promote_types(rows.dtype, torch.float32))
    return _distributions(patches, mass).flatten(1).all(1)


def _distributions(patches: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """False where a row (``patches``, its sum ``mass``) is finite and has a negative entry or a sum of 0 or below: a
    softmax has neither (its entries are exp(...) >= 0 in any float), so such a row is no attention distribution. A
    NaN or infinite mass (NaN or inf in the rows) is left to the non-finite check, which names that cause."""
    return ~(((mass <= 0) | (patches.amin(-1) < 0)) & mass.isfinite())


def refuse_rows_without_mass(ok: torch.Tensor, layers: Sequence[Any], names: Sequence[str] | None) -> None:
    """Refuse attention rows that are no distribution over the patch tokens (a negative entry, or no positive mass):
    ``ok`` (L, B) bool on the host, per layer of ``layers`` (None: not known) and image (``names``, else its position
    in the batch).

    Preference is the share of a row's patch attention on each region (METHODS A.4): the row normalised over the
    patch tokens to sum 1, which is undefined for a mass of 0 or below, and is no share where an entry is negative
    (shares of a signed row can leave [0, 1]). A softmax row has neither but where all its mass sits on prefix
    tokens (or underflows); a map that is no softmax can have both: differential attention's rows are softmax1 -
    lambda softmax2 (negative entries; a sum of 1 - lambda), and CaiT's talking heads mix the heads' softmaxes with
    ``proj_w``, whose weights may be negative."""
    if bool(ok.all()):
        return
    bad = ~ok
    images = bad.any(0).nonzero().flatten().tolist()
    named = [str(names[i]) for i in images] if names is not None and len(names) == bad.shape[1] else None
    which = ", ".join(named) if named is not None else f"image(s) at position(s) {images} of this batch"
    at = [layers[i] for i in bad.any(1).nonzero().flatten().tolist()]
    where = "" if at == [None] else f" at layer(s) {at}"
    raise QKHooksError(
        f"attention preference: the rows of {which}{where} are no attention distribution over the patch tokens (an "
        "entry below 0, or no positive sum over the patches), so they have no shares to take (METHODS A.4) and no "
        "preference value exists. Maps that are not one softmax give such rows: differential attention (softmax1 - "
        "lambda softmax2: negative entries, a sum of 1 - lambda) and CaiT's talking heads (proj_w mixes the "
        "softmaxes, with weights that may be negative); a softmax row gives it only when all its mass sits on prefix "
        "tokens, or when each of its patch entries was below ~3e-8 and float16 (a run file's default storage, or a "
        "float16 model) rounded them all to 0: then record with --dtype float32 (dtype='float32', the model in "
        "float32). Leave the layers whose maps are no softmax out of the rows (record layers=[...] without them), "
        "or drop those images."
    )


def group_preference(values: torch.Tensor | np.ndarray) -> dict[str, torch.Tensor | np.ndarray]:
    """Same object (TT+DD)/2, different object (TD+DT)/2, background (TB+DB)/2 from (..., 6) values."""
    if values.shape[-1] != len(PAIRS):
        raise QKHooksError(f"preference values must end in the {len(PAIRS)} pairs {PAIRS}, got {tuple(values.shape)}.")
    return {name: (values[..., i] + values[..., j]) / 2 for name, (i, j) in GROUPS.items()}


def _groups(values: torch.Tensor) -> torch.Tensor:
    """(..., 6) -> (..., 3) group values in :data:`GROUPS` order."""
    return values[..., to_device(_GROUP_INDEX, values.device)].mean(-1)


# -------------------------------------------------------------------------------------- reducer
class PreferenceReducer(Reducer):
    """Streaming attention preference: per (layer, head) moments of the six values and the groups.

    Kept on the model's device, per layer: the image count; sums and sums of squares of the six values and
    of the three group values per head; and sums and sums of squares of the head-averaged group values
    (the per-image spread of Fig. 2). Memory is O(layers x heads), whatever the dataset size.

    Reads ``batch.captures[l].attention["rows"]`` (B, H, 2, N) and ``batch.meta["target_grid"]`` /
    ``["distractor_grid"]`` (B, gh, gw), as filled by :func:`odd_one_out_meta`; the prefix-token count is
    N - gh*gw.
    """

    name = "preference"

    _KEYS = ("sum", "sumsq", "group_sum", "group_sumsq", "mean_group_sum", "mean_group_sumsq")

    def __init__(self) -> None:
        self.count: dict[int, int] = {}
        self.stats: dict[int, dict[str, torch.Tensor]] = {}
        self.num_prefix_tokens: int | None = None

    def __repr__(self) -> str:
        return f"PreferenceReducer(layers={sorted(self.stats)}, images={self.images_held()})"

    def images_held(self) -> int:
        return max(self.count.values(), default=0)

    @staticmethod
    def _acc_dtype(device: torch.device) -> torch.dtype:
        return torch.float32 if device.type == "mps" else torch.float64

    def _fold(self, layer: int, values: torch.Tensor) -> None:
        """Add (B, H, 6) values of one layer."""
        dtype = self._acc_dtype(values.device)
        v = values.to(dtype)
        g = _groups(v)  # (B, H, 3)
        gm = g.mean(1)  # (B, 3): each image's head average
        parts = {
            "sum": v.sum(0), "sumsq": (v * v).sum(0), "group_sum": g.sum(0), "group_sumsq": (g * g).sum(0),
            "mean_group_sum": gm.sum(0), "mean_group_sumsq": (gm * gm).sum(0),
        }
        state = self.stats.get(layer)
        if state is None:
            self.stats[layer] = parts
            self.count[layer] = int(v.shape[0])
            return
        if state["sum"].shape != parts["sum"].shape:
            raise QKHooksError(
                f"layer {layer}: {parts['sum'].shape[0]} heads in this batch but {state['sum'].shape[0]} before."
            )
        for key in self._KEYS:
            state[key] = state[key].to(values.device, dtype) + parts[key]
        self.count[layer] += int(v.shape[0])

    def update(self, batch: Any) -> None:
        """Fold one batch: every layer that has attention rows."""
        layers = {l: c.attention["rows"] for l, c in batch.captures.items() if "rows" in c.attention}
        if not layers:
            raise QKHooksError(
                "PreferenceReducer needs attention rows: record with attention='rows' (and odd-one-out data)."
            )
        missing = [k for k in ("target_grid", "distractor_grid") if k not in batch.meta]
        if missing:
            raise QKHooksError(
                f"PreferenceReducer needs batch meta {missing}: build the batch meta with "
                "qkhooks.analysis.preference.odd_one_out_meta(target, distractor, grid, num_prefix_tokens) "
                "(qkhooks record does this for o3:/o3dir: data)."
            )
        t_grid, d_grid = batch.meta["target_grid"], batch.meta["distractor_grid"]
        patches = int(t_grid.shape[-2] * t_grid.shape[-1])
        given = batch.meta.get("num_prefix_tokens")  # from the sites, when a recording made the batch
        names = _image_names(getattr(batch, "ids", None), int(t_grid.shape[0]))
        batch_rows = int(next(iter(layers.values())).shape[0])
        # once for every layer, where the grids have the shape preference_from_rows takes (others: refused there)
        if tuple(t_grid.shape) == tuple(d_grid.shape) and len(t_grid.shape) == 3 and int(t_grid.shape[0]) == batch_rows:
            for name, grid in (("target grid", t_grid), ("distractor grid", d_grid)):
                refuse_outside_fractions(torch.as_tensor(grid), name, "patch")
            refuse_overlap(torch.as_tensor(t_grid), torch.as_tensor(d_grid), names,
                           f"patches of the {t_grid.shape[-2]} x {t_grid.shape[-1]} grid")
        values: dict[int, torch.Tensor] = {}  # every layer's values first: a refused batch leaves the state as it was
        masses: dict[int, torch.Tensor] = {}
        for layer, rows in sorted(layers.items()):
            prefix = int(rows.shape[-1]) - patches
            if prefix < 0:
                raise QKHooksError(f"layer {layer}: {rows.shape[-1]} tokens cannot hold a {tuple(t_grid.shape[-2:])} grid.")
            if given is not None and int(given) != prefix:
                raise QKHooksError(
                    f"layer {layer}: {rows.shape[-1]} tokens with a {tuple(t_grid.shape[-2:])} mask grid leave {prefix} "
                    f"prefix tokens, but the model has {int(given)}; build the masks on the model's patch grid."
                )
            values[layer] = preference_from_rows(rows, t_grid, d_grid, prefix, names, check_overlap=False,
                                                 check_mass=False)
            masses[layer] = rows_with_mass(rows, prefix)
        finite = torch.stack([torch.isfinite(v).flatten(1).all(1) for v in values.values()])
        # one host transfer for both checks; rows without patch mass first: their values are NaN for that reason
        flags = torch.stack([torch.stack([masses[l] for l in values]).to(finite.device), finite]).cpu()
        refuse_rows_without_mass(flags[0], list(values), names)
        refuse_non_finite(flags[1], list(values), batch, "PreferenceReducer", "preference values (attention rows)")
        if self.num_prefix_tokens is None:
            self.num_prefix_tokens = int(layers[min(layers)].shape[-1]) - patches
        for layer, v in values.items():
            self._fold(layer, v)

    def merge(self, other: Reducer) -> None:
        """Fold a reducer that saw a disjoint set of images."""
        self._check_same_kind(other)
        assert isinstance(other, PreferenceReducer)
        for layer, state in other.stats.items():
            mine = self.stats.get(layer)
            if mine is None:
                self.stats[layer] = {k: v.clone() for k, v in state.items()}
                self.count[layer] = other.count[layer]
                continue
            if mine["sum"].shape != state["sum"].shape:
                raise QKHooksError(f"cannot merge preference reducers with different head counts at layer {layer}.")
            for key in self._KEYS:
                mine[key] = mine[key] + state[key].to(mine[key].device, mine[key].dtype)
            self.count[layer] += other.count[layer]
        if self.num_prefix_tokens is None:
            self.num_prefix_tokens = other.num_prefix_tokens

    def state_dict(self) -> dict[str, Any]:
        """Per-layer arrays stacked along a leading layer axis (``layers`` names them)."""
        layers = sorted(self.stats)
        heads = self.stats[layers[0]]["sum"].shape[0] if layers else 0
        if any(self.stats[l]["sum"].shape[0] != heads for l in layers):
            raise QKHooksError("PreferenceReducer.state_dict needs the same number of heads in every layer.")
        shapes = {"sum": (heads, 6), "sumsq": (heads, 6), "group_sum": (heads, 3), "group_sumsq": (heads, 3),
                  "mean_group_sum": (3,), "mean_group_sumsq": (3,)}
        out: dict[str, Any] = {
            "layers": np.asarray(layers, dtype=np.int64),
            "count": np.asarray([self.count[l] for l in layers], dtype=np.int64),
            "num_prefix_tokens": -1 if self.num_prefix_tokens is None else int(self.num_prefix_tokens),
        }
        for key, shape in shapes.items():
            stacked = [self.stats[l][key].detach().double().cpu().numpy() for l in layers]
            out[key] = np.stack(stacked) if stacked else np.zeros((0, *shape))
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (tensors on the CPU; they move to the device on the next update)."""
        missing = [k for k in ("layers", "count", *self._KEYS) if k not in state]
        if missing:
            raise QKHooksError(f"not a PreferenceReducer state: missing {missing}.")
        layers = [int(l) for l in np.asarray(state["layers"]).reshape(-1)]
        counts = np.asarray(state["count"]).reshape(-1)
        self.count = {l: int(c) for l, c in zip(layers, counts)}
        self.stats = {
            l: {k: torch.as_tensor(np.asarray(state[k])[i], dtype=torch.float64) for k in self._KEYS}
            for i, l in enumerate(layers)
        }
        prefix = int(np.asarray(state.get("num_prefix_tokens", -1)))
        self.num_prefix_tokens = None if prefix < 0 else prefix


# ---------------------------------------------------------------------------------------- tables
def _std(sum_: np.ndarray, sumsq: np.ndarray, n: int) -> np.ndarray:
    mean = sum_ / n
    return np.sqrt(np.maximum(sumsq / n - mean * mean, 0.0))


def preference_from_reducer(reducer: PreferenceReducer) -> dict[str, Any]:
    """The preference table (as :func:`preference_table`) from a streaming reducer's moments."""
    if not reducer.stats:
        raise QKHooksError("the PreferenceReducer has seen no images: feed it odd-one-out batches with attention rows.")
    layers = sorted(reducer.stats)
    per_layer = []
    for l in layers:
        s = {k: v.detach().double().cpu().numpy() for k, v in reducer.stats[l].items()}
        n = reducer.count[l]
        per_layer.append({
            "n": n,
            "pair_mean": s["sum"] / n, "pair_std": _std(s["sum"], s["sumsq"], n),
            "group_mean": s["group_sum"] / n, "group_std": _std(s["group_sum"], s["group_sumsq"], n),
            "mean_group_mean": s["mean_group_sum"] / n,
            "mean_group_std": _std(s["mean_group_sum"], s["mean_group_sumsq"], n),
        })
    return _table(layers, per_layer, reducer.num_prefix_tokens)


def preference_table(values: dict[int, np.ndarray | torch.Tensor], num_prefix_tokens: int | None = None) -> dict[str, Any]:
    """The preference table from per-image values: layer -> (n, H, 6) as :func:`preference_from_rows` gives.

    Returns:
        A JSON-ready dict: ``layers``, ``num_images``, ``num_heads``, ``pairs``, ``groups``, per group
        ``{"mean": [per layer], "std": [per layer]}`` (mean over images and heads; std across images of the
        head-averaged value), and ``per_head``: per pair and group, ``mean``/``std`` lists (layer x head).
    """
    layers = sorted(values)
    per_layer = []
    for l in layers:
        v = np.asarray(values[l].detach().cpu() if isinstance(values[l], torch.Tensor) else values[l], dtype=np.float64)
        if v.ndim != 3 or v.shape[-1] != len(PAIRS) or v.shape[0] == 0:
            raise QKHooksError(f"layer {l}: expected (images > 0, heads, 6) preference values, got {v.shape}.")
        g = np.stack([(v[..., i] + v[..., j]) / 2 for i, j in GROUPS.values()], axis=-1)  # (n, H, 3)
        gm = g.mean(1)
        per_layer.append({
            "n": v.shape[0], "pair_mean": v.mean(0), "pair_std": v.std(0), "group_mean": g.mean(0),
            "group_std": g.std(0), "mean_group_mean": gm.mean(0), "mean_group_std": gm.std(0),
        })
    return _table(layers, per_layer, num_prefix_tokens)


def _table(layers: list[int], per_layer: list[dict[str, Any]], num_prefix_tokens: int | None) -> dict[str, Any]:
    counts = {p["n"] for p in per_layer}
    heads = {p["pair_mean"].shape[0] for p in per_layer}
    table: dict[str, Any] = {
        "analysis": "attention preference on odd-one-out images (Pan et al. Fig. 2)",
        "layers": [int(l) for l in layers],
        "num_images": int(max(counts)),
        "num_heads": int(max(heads)),
        "num_prefix_tokens": num_prefix_tokens,
        "pairs": list(PAIRS),
        "groups": list(GROUPS),
        "spread": "std across images of the head-averaged group value (ddof=0)",
    }
    for gi, name in enumerate(GROUPS):
        table[name] = {
            "mean": [float(p["mean_group_mean"][gi]) for p in per_layer],
            "std": [float(p["mean_group_std"][gi]) for p in per_layer],
        }
    per_head: dict[str, Any] = {}
    for pi, name in enumerate(PAIRS):
        per_head[name] = {"mean": [p["pair_mean"][:, pi].tolist() for p in per_layer],
                          "std": [p["pair_std"][:, pi].tolist() for p in per_layer]}
    for gi, name in enumerate(GROUPS):
        per_head[name] = {"mean": [p["group_mean"][:, gi].tolist() for p in per_layer],
                          "std": [p["group_std"][:, gi].tolist() for p in per_layer]}
    table["per_head"] = per_head
    return table


# ----------------------------------------------------------------------------------- run files
_NEEDS = ("masks/target", "masks/distractor", "attention/query_tokens")


def _chunks(n: int, size: int = _CHUNK) -> Iterator[slice]:
    for lo in range(0, n, size):
        yield slice(lo, min(lo + size, n))


def preference_values(run_path: str | os.PathLike) -> tuple[dict[int, np.ndarray], int]:
    """Per-image values layer -> (n, H, 6) from a run file's committed images, and the prefix-token count."""
    from qkhooks.store import open_run

    with open_run(run_path) as run:
        return _run_values(run)


def _run_values(run: Any) -> tuple[dict[int, np.ndarray], int]:
    """:func:`preference_values` on an open :class:`qkhooks.store.RunReader`.

    Checks that the stored query tokens sit at the maximum of the stored masks (the rows were taken at the
    target and distractor tokens), reading the file in chunks of images.
    """
    missing = [name for name in _NEEDS if not run.has(name)]
    if missing:
        raise QKHooksError(
            f"{run.path} has no {', '.join(missing)}: attention preference needs odd-one-out data recorded with "
            "attention rows, e.g. `qkhooks record MODEL o3:256 --attention rows --out RUN.h5` (or o3dir:DIR)."
        )
    layers = run.attention_layers("rows")
    if not layers:
        raise QKHooksError(f"{run.path} has no attention/L*/rows: record it again with `--attention rows`.")
    if run.n == 0:
        raise QKHooksError(f"{run.path} holds no committed images yet.")
    t_arr, d_arr, q_arr = (run.array(name) for name in _NEEDS)
    rows = {l: run.array(f"attention/L{l}/rows") for l in layers}
    if len(t_arr.shape) != 3 or t_arr.shape != d_arr.shape:
        raise QKHooksError(f"{run.path}: masks/target and masks/distractor must both be (n, gh, gw); got "
                           f"{t_arr.shape} and {d_arr.shape}.")
    n_tokens = rows[layers[0]].shape[-1]
    prefix = n_tokens - t_arr.shape[1] * t_arr.shape[2]
    info_prefix = run.info.get("num_prefix_tokens")
    if prefix < 0 or (info_prefix is not None and int(info_prefix) != prefix):
        raise QKHooksError(
            f"{run.path}: rows have {n_tokens} tokens, masks a {t_arr.shape[1:]} grid, model/info says "
            f"{info_prefix} prefix tokens; the file is inconsistent."
        )
    values: dict[int, list[np.ndarray]] = {l: [] for l in layers}
    for sl in _chunks(run.n):
        t = torch.from_numpy(t_arr[sl].astype(np.float64))
        d = torch.from_numpy(d_arr[sl].astype(np.float64))
        _check_query_tokens(q_arr[sl].astype(np.int64), t, d, prefix, sl.start, run.path)
        names = [f"image {i} of {run.path}" for i in range(sl.start, sl.stop)]
        for l in layers:
            r = torch.from_numpy(rows[l][sl].astype(np.float64))
            values[l].append(preference_from_rows(r, t, d, prefix, names, layer=l).numpy())
    return {l: np.concatenate(v) for l, v in values.items()}, prefix


def _check_query_tokens(q: np.ndarray, t: torch.Tensor, d: torch.Tensor, prefix: int, start: int, path: Path) -> None:
    if q.ndim != 2 or q.shape[1] != 2:
        raise QKHooksError(f"{path}: attention/query_tokens must be (n, 2) target and distractor tokens, got {q.shape}.")
    for col, (name, grid) in enumerate((("target", t), ("distractor", d))):
        flat = grid.flatten(1).numpy()
        patch = q[:, col] - prefix
        ok = (patch >= 0) & (patch < flat.shape[1])
        at = flat[np.arange(len(flat)), np.clip(patch, 0, flat.shape[1] - 1)]
        ok &= at >= flat.max(1) - 2e-3  # masks may be stored in float16
        if not ok.all():
            bad = int(np.flatnonzero(~ok)[0]) + start
            raise QKHooksError(
                f"{path}: the {name} query token of image {bad} is not at the maximum of its {name} mask, so these "
                "rows are not odd-one-out rows; record the run with odd-one-out data (o3:/o3dir:) and --attention rows."
            )


def write_preference(table: dict[str, Any], out_dir: str | os.PathLike, title: str = "") -> dict[str, Path]:
    """Write ``preference.csv``, ``preference.json`` and ``preference.png`` (Fig. 2B-D style) into ``out_dir``.

    The figure's bands are the 95% CI of the mean over images where the table has them (``ci_low``/``ci_high``
    per group, from :func:`analyze_preference`) where they are finite at some layer, else +-1 std across images (fewer than
    readings.MIN_UNITS images have no CI).
    """
    from qkhooks.plots import plot_layer_curves

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "preference.csv", "json": out / "preference.json", "png": out / "preference.png"}
    groups = list(GROUPS)
    with open(paths["csv"], "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["layer", "head", "images", *PAIRS, *groups, *(f"{g}_std" for g in groups)])
        for i, layer in enumerate(table["layers"]):
            ph = table["per_head"]
            pair_means = [float(np.mean(ph[p]["mean"][i])) for p in PAIRS]
            w.writerow([layer, "mean", table["num_images"], *_fmt(pair_means),
                        *_fmt(table[g]["mean"][i] for g in groups), *_fmt(table[g]["std"][i] for g in groups)])
            for h in range(len(ph[PAIRS[0]]["mean"][i])):
                w.writerow([layer, h, table["num_images"], *_fmt(ph[p]["mean"][i][h] for p in PAIRS),
                            *_fmt(ph[g]["mean"][i][h] for g in groups), *_fmt(ph[g]["std"][i][h] for g in groups)])
    write_json(paths["json"], table)
    labels = {"same_object": "same object", "different_object": "different object", "background": "background"}
    ci = _has_ci(table)
    plot_layer_curves(
        table["layers"],
        {labels[g]: table[g]["mean"] for g in groups},
        paths["png"],
        ylabel="attention share (mean over heads)",
        title=title or f"Attention preference on odd-one-out images ({table['num_images']} images; "
                       f"{'95% CI' if ci else '±1 std'})",
        spread=None if ci else {labels[g]: table[g]["std"] for g in groups},
        bands={labels[g]: (table[g]["ci_low"], table[g]["ci_high"]) for g in groups} if ci else None,
        ylim=(0, None),
    )
    return paths


def _has_ci(table: dict[str, Any]) -> bool:
    """Whether the table's groups have a 95% CI at some layer: with fewer than readings.MIN_UNITS images every one is
    NaN (review r45: the figure was titled "95% CI" and drew no band, the ±1 std spread left out for the bands)."""
    return all("ci_low" in table.get(g, {}) for g in GROUPS) and any(
        bool(np.isfinite(np.asarray(table[g]["ci_low"], dtype=np.float64)).any()) for g in GROUPS)


def per_image_groups(values: dict[int, np.ndarray]) -> dict[str, np.ndarray]:
    """Group name -> (images, layers) head-averaged group values, layers in sorted order: the units that the
    figure's intervals and the report's readings resample."""
    layers = sorted(values)
    return {name: np.stack([(np.asarray(values[l])[..., i] + np.asarray(values[l])[..., j]).mean(1) / 2
                            for l in layers], 1) for name, (i, j) in GROUPS.items()}


def _fmt(values: Any) -> list[str]:
    return [f"{float(v):.6g}" for v in values]


def analyze_preference(run_path: str | os.PathLike, out_dir: str | os.PathLike) -> dict[str, Any]:
    """Attention preference table of a run file, written as CSV, JSON and a figure.

    The run must hold ``attention/L{l}/rows`` (n, H, 2, N), ``attention/query_tokens`` (n, 2) and
    ``masks/target``, ``masks/distractor`` (n, gh, gw), as ``qkhooks record`` writes for odd-one-out data.

    Returns:
        The table (see :func:`preference_table`) plus ``run``, ``model``, ``data``, ``complete`` (False for a
        recording that stopped early: the table covers its committed images) and ``files``: the paths written.
    """
    from qkhooks.store import open_run

    with open_run(run_path) as run:
        values, prefix = _run_values(run)
        source = {"run": str(run_path), "model": run.model, "data": run.attrs.get("data", ""), "complete": run.complete}
    from qkhooks.readings import PROBABILITY, layer_intervals

    table = {**preference_table(values, prefix), **source}
    for name, per_image in per_image_groups(values).items():  # 95% CI over images of the head-averaged value
        _, low, high = layer_intervals(per_image, limits=PROBABILITY)  # shares
        table[name]["ci_low"], table[name]["ci_high"] = low.tolist(), high.tolist()
    note = "" if source["complete"] else "; run incomplete"
    band = "95% CI over images" if _has_ci(table) else "±1 std across images: too few images for a CI"
    files = write_preference(table, out_dir, title=f"Attention preference — {Path(run_path).name} "
                                                   f"({table['num_images']} images{note}; {band})")
    return {**table, "files": {k: str(v) for k, v in files.items()}}


def spread_legend(table: dict[str, Any]) -> str:
    """What a table's "mean ± spread" cells are, for every place that shows them: the mean over images and heads, ±
    the std across images (population, ddof=0) of the head-averaged share; not an interval of the mean."""
    n = table.get("num_images")
    images = f"the {n} images" if n is not None else "images"
    ci = ("; the 95% CI of the mean is preference.png's bands and preference.json's ci_low/ci_high"
          if _has_ci(table) else "")
    return (f"mean ± std: the share averaged over {images} and the heads ± its standard deviation across {images} "
            f"(of each image's head-averaged share, ddof=0): how much images differ, not the uncertainty of the mean"
            f"{ci}.")


def format_table(table: dict[str, Any]) -> str:
    """Per-layer group means ± stds as aligned text, with a line under it saying what ± is."""
    lines = [f"{'layer':>5}  " + "  ".join(f"{g + ' (mean ± std)':>30}" for g in GROUPS)]
    for i, layer in enumerate(table["layers"]):
        cells = [f"{table[g]['mean'][i]:.3f} ± {table[g]['std'][i]:.3f}" for g in GROUPS]
        lines.append(f"{layer:>5}  " + "  ".join(f"{c:>30}" for c in cells))
    lines.append(spread_legend(table))
    return "\n".join(lines)
