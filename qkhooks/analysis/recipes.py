"""Recipes: which streaming statistics a recording keeps, and what they need from each batch of the dataset.

The recording core (:func:`qkhooks.stream.record_dataset`, the distributed merge) knows no analysis: it takes
a recipe (``record_dataset(..., reducers=recipe)``) or a list of reducers, and asks the registry for the
recipe named ``"default"`` (this module's :data:`DEFAULT`) when given neither. A recipe
(:class:`qkhooks.reducers.Recipe`, re-exported here)

- builds the reducers for the recording's options (:meth:`Recipe.reducers`), and
- turns a dataset batch's extras into batch metadata (:meth:`Recipe.batch_meta`): odd-one-out masks become
  the query tokens, pool masks and patch-grid masks the attention capture and :class:`PreferenceReducer`
  read; instance masks become per-patch object labels. The model's prefix-token count and patch grid arrive
  in ``meta``, from the attention sites (their one source), and are never guessed here.

Arrays returned under ``"arrays"`` are stored per image in the run file (``masks/target``,
``masks/distractor``, ``masks/objects``).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from qkhooks.analysis.anisotropy import AnisotropyReducer
from qkhooks.analysis.preference import PreferenceReducer, odd_one_out_meta
from qkhooks.analysis.topk import TopKModes
from qkhooks.errors import QKHooksError
from qkhooks.reducers import Recipe, Reducer, register_recipe

__all__ = ["Recipe", "DEFAULT", "default_reducers", "dataset_meta", "object_grids", "objects_array"]


def default_reducers(modes: Any, attention: Sequence[Any], has_target: bool, dtype: str = "float16") -> list[Reducer]:
    """The streaming statistics a plain ``qkhooks record`` keeps: top-k images per mode (when modes are
    recorded; their maps kept in the run's storage ``dtype``), the anisotropy baseline, and attention preference
    (odd-one-out data with attention rows)."""
    reducers: list[Reducer] = []
    if modes is not None:
        reducers.append(TopKModes(map_dtype=dtype))
    reducers.append(AnisotropyReducer())
    if has_target and any(s.kind == "rows" for s in attention):
        reducers.append(PreferenceReducer())
    return reducers


def dataset_meta(batch: Mapping[str, Any], meta: Mapping[str, Any]) -> dict[str, Any]:
    """Batch metadata from a collated dataset batch's masks (see the module docstring); ``meta`` holds the
    model's ``num_prefix_tokens`` and the ``grid`` of this input size."""
    from qkhooks.data.masks import majority_labels

    grid, prefix = meta.get("grid"), meta["num_prefix_tokens"]
    cells = meta.get("cells") or {}  # the pixels each grid's tokens show, where a grid does not divide the input
    if grid is None and any(name in batch for name in ("target", "distractor", "objects")):  # Hiera's unrolled tokens
        raise QKHooksError("the first recorded layer's tokens are not on an image grid, so the dataset's masks "
                           "(target, distractor, objects) cannot be read onto them; record the dataset without masks.")
    out: dict[str, Any] = {}
    arrays: dict[str, torch.Tensor] = {}
    if "target" in batch and "distractor" in batch:
        odd = odd_one_out_meta(batch["target"], batch["distractor"], grid, prefix, ids=batch.get("id"),
                               cells=cells.get(tuple(grid)))
        out.update(odd)
        arrays["masks/target"] = odd["target_grid"]
        arrays["masks/distractor"] = odd["distractor_grid"]
    if "objects" in batch:
        for each in [tuple(grid)] + object_grids(meta):  # the layers' other grids (stages), each under its own name
            arrays[objects_array(each, grid)] = torch.stack([majority_labels(obj, each, cells.get(each))
                                                             for obj in batch["objects"]])
    if arrays:
        out["arrays"] = arrays
    return out


def object_grids(meta: Mapping[str, Any]) -> list[tuple[int, int]]:
    """The query-side grids of the recorded layers other than the first layer's (``meta["grid"]``)."""
    grids = {tuple(g.grid) for g in (meta.get("geometry") or {}).values() if g.grid is not None}
    return sorted(grids - {tuple(meta["grid"])}, reverse=True)


def objects_array(grid: Any, first: Any) -> str:
    """The run-file name of the per-image object labels on ``grid``: ``masks/objects`` on the first layer's grid,
    ``masks/objects_{rows}x{cols}`` on another stage's."""
    grid = tuple(int(v) for v in grid)
    return "masks/objects" if first is None or grid == tuple(int(v) for v in first) else f"masks/objects_{grid[0]}x{grid[1]}"


DEFAULT = register_recipe(Recipe("default", build=default_reducers, meta=dataset_meta))
"""What ``record_dataset(model, data, out)`` and ``qkhooks record`` keep when given no reducers."""
