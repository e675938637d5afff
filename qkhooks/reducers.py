"""Streaming statistics with one protocol (baukit's runningstats idea): update, merge, state_dict.

A reducer is a sink of the recording context: after every complete forward it receives the
:class:`~qkhooks.capture.BatchCapture` (tensors still on the model's device) and folds it into a small
state, so memory never grows with the dataset. ``merge`` combines partial reducers (resumed runs, several
processes) into the result of one pass; ``state_dict``/``load_state_dict`` move the state through the run
file as plain numpy arrays.

Reducers describe themselves: every subclass with its own ``name`` registers under it, and
:meth:`Reducer.saved_state` stores the kind and the configuration next to the state, so a run file's state
rebuilds its reducer (:meth:`Reducer.from_state`) without a table of analyses in the core. A
:class:`Recipe` (default: ``qkhooks.analysis.recipes``) says which reducers a recording keeps and which
per-batch metadata the dataset's extras (masks, objects) give them.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import weakref
from typing import Any, Callable, ClassVar, Mapping, Sequence

import numpy as np
import torch

from qkhooks.capture import BatchCapture
from qkhooks.errors import QKHooksError

__all__ = ["Reducer", "Recipe", "TakenParts", "to_numpy_state", "reducer_class", "register_recipe", "recipe",
           "refuse_mixed_batch_axes", "refuse_non_finite", "DESCRIPTION_KEY"]

DESCRIPTION_KEY = "_reducer"
"""State key of a saved reducer's description: the UTF-8 bytes (a uint8 array, stored like any other state
array) of the JSON ``{"kind": name, "config": configuration}``."""

BUILTIN_ANALYSES = "qkhooks.analysis"
"""The package whose modules register qkhooks' own reducers and the default recipe when imported. The core
imports it only by this name, lazily, when a name is asked for that nobody has registered yet: so ``import
qkhooks`` stays free of the analyses, and a run file's states still rebuild without the caller importing them."""

_REDUCERS: dict[str, type["Reducer"]] = {}
_RECIPES: dict[str, "Recipe"] = {}


class Reducer:
    """Base class of every streaming statistic.

    Class attributes:
        name: its kind: the key under ``/reducers/`` in the run file and in the registry (a subclass that
            sets its own ``name`` registers itself under it; :meth:`from_state` finds it there).
        needs_inputs: the reducer reads the captured tokens (B, N, d): the recording keeps them to the batch's end
            for it, unless it takes them in the layer hooks (``take_inputs``, :class:`TakenParts`).
        needs_modes: the reducer reads the query/key maps.
        image_index_fields: state arrays holding global image indices (-1: none); a merge of shards renumbers
            them to rows of the merged file.
    """

    name: str = "reducer"
    needs_inputs: bool = False
    needs_modes: bool = False
    image_index_fields: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" not in cls.__dict__:
            return  # a subclass that keeps its parent's kind does not take over its name
        known = _REDUCERS.get(cls.name)
        if known is not None and _qualified(known) != _qualified(cls):
            raise QKHooksError(
                f"two reducer classes are named {cls.name!r}: {_qualified(known)} and {_qualified(cls)}; a name is "
                "the reducer's key in the run file, so give each kind its own."
            )
        _REDUCERS[cls.name] = cls  # the same class defined again (a reload) replaces itself

    def update(self, batch: BatchCapture) -> None:
        """Fold one complete batch into the state."""
        raise NotImplementedError

    def merge(self, other: "Reducer") -> None:
        """Fold another reducer of the same kind and configuration (a disjoint set of images) into this one."""
        raise NotImplementedError

    def images_held(self) -> int | None:
        """How many images the state holds (folded, merged or loaded); None where a kind does not say. A recording
        refuses a reducer that holds images it did not give it (:func:`qkhooks.capture.refuse_sinks_holding_images`)."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """The state as numpy arrays and scalars, enough to continue or to finish."""
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state written by :meth:`state_dict`."""
        raise NotImplementedError

    def configuration(self) -> dict[str, Any]:
        """The settings two reducers must share to merge: by default the constructor's arguments that the
        reducer keeps under the same name as plain values (numbers, strings, dtypes, tuples of them).

        None stands for "not known yet" (e.g. a prefix count read off the first batch) and matches anything.
        Reducers whose configuration includes arrays compare those in their own ``merge``.
        """
        kept = [n for n in inspect.signature(type(self).__init__).parameters if hasattr(self, n)]
        plain = {n: _plain(getattr(self, n)) for n in kept}
        return {n: value for n, value in plain.items() if value is not _NOT_PLAIN}

    # ------------------------------------------------------------------------------ self-description
    def saved_state(self) -> dict[str, Any]:
        """What a run file keeps: :meth:`state_dict` in numpy plus the kind and configuration
        (:data:`DESCRIPTION_KEY`), enough for :meth:`from_state` to rebuild the reducer."""
        state = to_numpy_state(self.state_dict())
        text = json.dumps({"kind": self.name, "config": _encode(self.configuration())}, sort_keys=True)
        state[DESCRIPTION_KEY] = np.frombuffer(text.encode(), dtype=np.uint8).copy()
        return state

    @classmethod
    def from_state(cls, state: Mapping[str, Any], kind: str | None = None, **context: Any) -> "Reducer":
        """The reducer a saved state describes, with that state loaded.

        Args:
            state: a :meth:`saved_state` (e.g. ``run.state(name)``).
            kind: the reducer's name, for states saved before they described themselves (then built with the
                configuration :meth:`_legacy_configuration` reads off the state).
            context: what the state cannot hold and some kinds need to keep updating (e.g. ``spectra=`` for
                ``BFDEnergies``); see each kind's :meth:`_from_configuration`.
        """
        found, config = describe_state(state, kind)
        target = reducer_class(found)
        if not issubclass(target, cls):
            raise QKHooksError(f"the state is of a {target.__name__} ({found!r}), not a {cls.__name__}.")
        if config is None:
            config = target._legacy_configuration(state)
        reducer = target._from_configuration(config, state, **context)
        reducer.load_saved(state)
        return reducer

    def load_saved(self, state: Mapping[str, Any]) -> None:
        """Load a saved state into this reducer, refusing one of another kind or configuration (a resume checks
        the reducers it was given against the run's states this way)."""
        found, config = describe_state(state) if DESCRIPTION_KEY in state else (self.name, None)
        if found != self.name:
            raise QKHooksError(f"cannot load a saved {found!r} state into a {type(self).__name__} ({self.name!r}).")
        if config is not None:
            self._check_configuration(config, f"cannot load a {type(self).__name__} state saved with",
                                      "build the reducer with the saved settings (or start the run again).")
        self.load_state_dict({k: v for k, v in state.items() if k != DESCRIPTION_KEY})

    @classmethod
    def _from_configuration(cls, config: Mapping[str, Any], state: Mapping[str, Any], **context: Any) -> "Reducer":
        """An empty reducer with ``config`` (the constructor's keyword arguments by default), fit to load ``state``."""
        return cls(**config, **context)

    @classmethod
    def _legacy_configuration(cls, state: Mapping[str, Any]) -> dict[str, Any]:
        """The configuration of a state saved without its description: the constructor's defaults unless a
        kind can read it off its state."""
        return {}

    def _check_same_kind(self, other: "Reducer") -> None:
        """Refuse to merge a reducer of another kind or configuration: every ``merge`` starts with this check."""
        if type(other) is not type(self):
            raise QKHooksError(
                f"cannot merge a {type(other).__name__} into a {type(self).__name__}; merge only reducers of one kind."
            )
        self._check_configuration(other.configuration(), f"cannot merge a {type(self).__name__} configured with",
                                  "merge only parts recorded with the same settings.")

    def _check_configuration(self, theirs: Mapping[str, Any], what: str, fix: str) -> None:
        mine = self.configuration()
        differ = sorted(k for k in mine.keys() & theirs.keys()
                        if None not in (mine[k], theirs[k]) and mine[k] != theirs[k])
        if differ:
            settings = ", ".join(f"{k}={theirs[k]!r} (here {mine[k]!r})" for k in differ)
            raise QKHooksError(f"{what} {settings}; {fix}")


class TakenParts:
    """What a reducer computed from the tokens handed to it in the layer hooks of one batch (``take_inputs``,
    :class:`~qkhooks.capture.Sink`), held until that batch's ``update`` folds it, so that a batch is folded whole or
    not at all.

    Weakly keyed to the batch: parts of a batch whose forward failed (no ``update`` follows) are never folded into the
    next one, and do not keep it alive; the first part of a new batch drops them.
    """

    def __init__(self) -> None:
        self._batch: "weakref.ref[BatchCapture] | None" = None
        self._parts: dict[int, Any] = {}

    def put(self, batch: BatchCapture, layer: int, part: Any) -> None:
        if self._batch is None or self._batch() is not batch:
            self._batch, self._parts = weakref.ref(batch), {}
        self._parts[layer] = part

    def pop(self, batch: BatchCapture) -> dict[int, Any]:
        """Layer -> part of ``batch`` (nothing for another batch), and forget them all."""
        parts = self._parts if self._batch is not None and self._batch() is batch else {}
        self._batch, self._parts = None, {}
        return parts

    def __bool__(self) -> bool:
        return self._batch is not None and self._batch() is not None


def refuse_mixed_batch_axes(batch: BatchCapture, reducer: str) -> None:
    """Refuse a batch whose recorded layers have batch axes of different lengths: a model that runs some layers over
    crops, frames or patches along the batch axis (DepthPro's patch encoder, 35 crops an image; ViViT's factorised
    encoder). A live recording keeps each layer's own axis, but a reducer that folds one batch of images across layers
    would take one layer's crops for another's images (it failed in ``torch.stack``, or ranked crops as images)."""
    first: dict[int, int] = {}
    for layer, cap in sorted(batch.captures.items()):
        first.setdefault(cap.batch_size, layer)
    if len(first) > 1:
        (rows, layer), (other_rows, other) = list(first.items())[:2]
        raise QKHooksError(
            f"{reducer}: layer {layer} runs over {rows} rows along its batch axis and layer {other} over {other_rows} "
            "(the model runs some layers over crops, frames or patches along the batch axis), and it folds one batch "
            f"of images across layers; record the layers of one batch axis with it (layers=[...]).")


def refuse_non_finite(finite: torch.Tensor, layers: Sequence[int], batch: BatchCapture, reducer: str,
                      what: str) -> None:
    """Refuse a batch whose values a reducer would fold are not all finite, before anything is folded.

    A NaN or inf image folded into a sum, or silently never ranked, gives a wrong statistic without a word (and
    different layers may keep different images). Reducers call this on the small per-image tensors they already
    compute (scores, extremes, centre vectors: NaN and inf survive amax and sums), never on a second pass over
    the maps; one device synchronisation per batch.

    Args:
        finite: (L, B) bool: whether each image's values at each of ``layers`` are all finite.
        layers: the layers of ``finite``'s rows.
        batch: the batch (its ``ids`` and ``offset`` name the images).
        reducer, what: the reducer's and the values' names, for the message.
    """
    if bool(finite.all()):
        return
    which, at = _refused_images(~finite, layers, batch)
    raise QKHooksError(
        f"{reducer}: the {what} of {which} are not finite (NaN or inf) at layer(s) {at}. Folding them would give a "
        "wrong statistic, so the whole batch is refused and the reducer's state is unchanged (drop these images and "
        "go on). Likely causes: NaN or inf pixels in the input (check torch.isfinite(pixel_values)), or a model run in "
        "float16 whose activations overflow (compute in float32: model.float(), or bfloat16)."
    )


def overflows(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Where finite ``values`` turn into inf when cast to ``dtype`` (the cast's own rounding decides: float16 keeps
    |x| < 65520 as 65504 at most)."""
    return values.to(dtype).isinf() & values.isfinite()


def refuse_overflow(peaks: torch.Tensor, layers: Sequence[int], batch: BatchCapture, reducer: str, what: str,
                    dtype: torch.dtype, fix: str) -> None:
    """Refuse a batch with a finite value that a reducer's cast to its storage ``dtype`` would turn into inf
    (float16 ends at 65504), before anything is folded: kept as inf, it would be a wrong number without a word.

    Args:
        peaks: (L, B): the largest finite |value| of each image's values at each of ``layers``.
        layers, batch, reducer, what: as :func:`refuse_non_finite`.
        dtype: the storage dtype; ``fix``: how to keep a wider one.
    """
    over = overflows(peaks, dtype)
    if not bool(over.any()):
        return
    which, at = _refused_images(over, layers, batch)
    kind = str(dtype).replace("torch.", "")
    raise QKHooksError(
        f"{reducer}: the {what} of {which} reach |x| = {float(peaks[over].max()):.6g} at layer(s) {at}, beyond "
        f"{kind}'s range ({torch.finfo(dtype).max:g}), and would be kept as inf; the whole batch is refused and the "
        f"reducer's state is unchanged. {fix}")


def _refused_images(bad: torch.Tensor, layers: Sequence[int], batch: BatchCapture) -> tuple[str, list[int]]:
    """The images of a refusal's (L, B) flags, named by id and place, and the layers where they are flagged."""
    bad = bad.cpu()
    images = bad.any(0).nonzero().flatten().tolist()
    at = [layers[i] for i in bad.any(1).nonzero().flatten().tolist()]
    ids = list(getattr(batch, "ids", None) or [])
    named = [str(ids[i]) for i in images] if len(ids) == bad.shape[1] else None
    offset = int(getattr(batch, "offset", 0))
    which = (f"image(s) {named} " if named is not None else "image(s) ") + (
        f"at position(s) {images} of this batch (image index {[offset + i for i in images]})")
    return which, at


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def describe_state(state: Mapping[str, Any], kind: str | None = None) -> tuple[str, dict[str, Any] | None]:
    """(kind, configuration) of a saved state; the configuration is None for a state saved without it."""
    if not isinstance(state, Mapping):
        raise QKHooksError(f"a reducer state is a mapping of arrays, as run.state(name) returns it, not "
                           f"{type(state).__name__}; run.states() lists the names a run holds.")
    raw = state.get(DESCRIPTION_KEY)
    if raw is None:
        if kind is None:
            raise QKHooksError("this reducer state does not say which reducer wrote it (saved before reducers "
                               "described themselves); pass kind=NAME, the name it is saved under.")
        return kind, None
    described = json.loads(np.asarray(raw, dtype=np.uint8).tobytes().decode())
    if kind is not None and described["kind"] != kind:
        raise QKHooksError(f"the state saved as {kind!r} was written by a {described['kind']!r} reducer.")
    return described["kind"], _decode(described["config"])


def reducer_class(name: str) -> type[Reducer]:
    """The reducer class registered under ``name`` (qkhooks' own analyses are imported on first need)."""
    if name not in _REDUCERS:
        importlib.import_module(BUILTIN_ANALYSES)  # they register themselves when imported
    if name not in _REDUCERS:
        raise QKHooksError(
            f"no reducer is registered as {name!r}; import the module that defines it (a Reducer subclass with "
            f"name = {name!r} registers itself), or pass a configured instance (merge_shards(..., reducers=[...])). "
            f"Registered: {sorted(_REDUCERS)}."
        )
    return _REDUCERS[name]


# ---------------------------------------------------------------------------------------- recipes
def _no_reducers(modes: Any, attention: Sequence[Any], has_target: bool) -> list[Reducer]:
    return []


def _no_metadata(batch: Mapping[str, Any], meta: Mapping[str, Any]) -> dict[str, Any]:
    return {}


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A named way to record: which reducers to build, and the batch metadata they read (the core calls these).

    Args:
        name: registry name (:func:`recipe`).
        build: ``(modes, attention specs, has_target) -> reducers``, called once per recording (fresh reducers
            every time: they hold state); a build that takes a ``dtype`` keyword is also given the run's storage
            dtype (``"float16"`` or ``"float32"``), for the state it keeps.
        meta: ``(collated dataset batch, meta) -> metadata``: turns the batch's extras (masks, object labels)
            into batch metadata for the sinks; ``meta`` holds the model's ``num_prefix_tokens`` and the patch
            ``grid`` of this input size, from the attention sites (the one source of both). Arrays to store per
            image go under ``"arrays"``.

    qkhooks' default (``qkhooks.analysis.recipes.DEFAULT``) keeps top-k images per mode, the anisotropy baseline
    and attention preference, and reads odd-one-out and object masks.
    """

    name: str
    build: Callable[[Any, Sequence[Any], bool], list[Reducer]] = _no_reducers
    meta: Callable[[Mapping[str, Any], Mapping[str, Any]], dict[str, Any]] = _no_metadata

    def reducers(self, modes: Any, attention: Sequence[Any], has_target: bool, dtype: str = "float16") -> list[Reducer]:
        try:
            takes_dtype = "dtype" in inspect.signature(self.build).parameters
        except (TypeError, ValueError):  # a callable without a signature (a builtin) takes the three arguments
            takes_dtype = False
        return list(self.build(modes, attention, has_target, dtype=dtype) if takes_dtype else
                    self.build(modes, attention, has_target))

    def batch_meta(self, batch: Mapping[str, Any], meta: Mapping[str, Any]) -> dict[str, Any]:
        return self.meta(batch, meta)


def register_recipe(recipe: Recipe) -> Recipe:
    """Make ``recipe`` available by its name (``record_dataset`` uses ``"default"`` when given no reducers)."""
    _RECIPES[recipe.name] = recipe
    return recipe


def recipe(name: str = "default") -> Recipe:
    """The recipe registered as ``name`` (qkhooks' default one is imported on first need)."""
    if name not in _RECIPES:
        importlib.import_module(BUILTIN_ANALYSES)  # registers the default recipe; see BUILTIN_ANALYSES
    if name not in _RECIPES:
        raise QKHooksError(f"no recipe is registered as {name!r}; registered: {sorted(_RECIPES)}.")
    return _RECIPES[name]


# ------------------------------------------------------------------------------------ plain values
_NOT_PLAIN = object()


def _plain(value: Any) -> Any:
    """``value`` if it is a plain setting (compared by ==), lists as tuples; ``_NOT_PLAIN`` otherwise."""
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype)):
        return value
    if isinstance(value, (tuple, list)):
        items = tuple(_plain(v) for v in value)
        return _NOT_PLAIN if any(v is _NOT_PLAIN for v in items) else items
    return _NOT_PLAIN


def _encode(value: Any) -> Any:
    """A plain setting as JSON: tuples as lists, dtypes as ``{"dtype": "float16"}``."""
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, (tuple, list)):
        return [_encode(v) for v in value]
    return value


def _decode(value: Any, top: bool = True) -> Any:
    """The inverse of :func:`_encode` (lists back to tuples, so it compares equal to a configuration)."""
    if isinstance(value, dict) and not top and set(value) == {"dtype"}:
        return getattr(torch, value["dtype"])
    if isinstance(value, dict):
        return {k: _decode(v, top=False) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(_decode(v, top=False) for v in value)
    return value


def to_numpy_state(state: dict[str, Any]) -> dict[str, Any]:
    """Tensors -> numpy arrays (on the CPU), leaving scalars and strings alone."""
    out: dict[str, Any] = {}
    for key, value in state.items():
        if hasattr(value, "detach"):
            value = value.detach().cpu().numpy()
        out[key] = value
    return out
