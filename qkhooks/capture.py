"""The recording context: hooks on an unmodified model that capture, project and rebuild on device.

``with qkhooks.record(model, modes=16) as run: model(images)`` installs forward pre-hooks (keyword inputs
included) on the attention module of every recorded layer (``layers=``; all by default). Each sees the exact tensor
entering W_q/W_k and rebuilds any requested attention from it; forward hooks on the model's own q/k Linear modules
turn their outputs into the maps on the layer's top modes (or, where those do not serve, the pre-hook projects the
tokens). All of it runs under
``torch.no_grad`` on the tokens' device. The hooks never touch the model's inputs or outputs, so results are
bit-identical with and without the context, and fused attention stays on.

A batch is complete when the recorded model's forward returns; only then is it handed to the sinks (the
run store, streaming reducers) and exposed as ``run.last``, which the recording frees as the next forward begins
(a batch you keep a reference to stays yours). A forward that raises hands nothing on, so a store never receives
half a batch, and its partial batch is dropped as it fails. Hooks are removed on exit, on exceptions and on
KeyboardInterrupt; each context removes only its own hooks, so contexts nest. The modes belong to the weights the
model had at entry: a forward after the weights changed inside the context (a checkpoint loaded, an optimiser step)
is refused.

Results are read in the vocabulary of :mod:`qkhooks.access` (``run.query(l)``, ``run.attention(l, kind)``,
``run.spectrum(l)``, ...), the same calls a stored run answers.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import gc
import inspect
import types
import warnings
import weakref
from typing import Any, Callable, Iterable, Literal, ParamSpec, Protocol, Sequence, TypeVar

import numpy as np
import torch
from torch import nn

from qkhooks._devices import detached
from qkhooks.attention import (
    AttentionSpec,
    OneAttention,
    attention_full,
    default_query_tokens,
    full_and_terms,
    map_terms,
    parse_attention,
    pool_rows,
    rows_from_qk,
    split_heads,
    tokens_per_image,
)
from qkhooks.access import Layer, LayerGeometry, require_layer, resolve_layer
from qkhooks.errors import QKHooksError, unknown_options
from qkhooks.models.base import (SOURCE_NOT_RUN, AttentionSite, LayerSelection, adapter_ids, find_sites,
                                 grid_source_hooks, select_layers)
from qkhooks.models.load import unwrap_loaded
from qkhooks.models.unsupported import (compiled_by_dynamo, hooked_paths, own_hook, refuse_altered_qk, refuse_compiled,
                                        remove_own_hooks, traced_refusal, unmodelled_parts)
from qkhooks.options import DEFAULT_MODES, DefaultModes
from qkhooks.projector import ModeProjector, QKPathProjector, QKPathSolution
from qkhooks.results import BatchCapture, CallOrOld, LayerCapture, deprecated, observe_geometry
from qkhooks.sdpa import OWN_WORK
from qkhooks.spectrum import (LayerSpectrum, QKSpectrum, WeightsState, cached_weights_checked, edit_stamps,
                              foreign_spectrum, is_cached_spectrum, layer_spectrum, live_qk_tensors, spectrum_copy,
                              unedited, weights_state, weights_unchanged)

__all__ = ["record", "Recording", "LayerCapture", "BatchCapture", "Sink", "parse_modes"]

InputKind = Literal["normed", "residual"]
OutputsKind = Literal["unchanged", "eager"]


class Sink(Protocol):
    """Anything that takes finished batches: the HDF5 writer, a streaming reducer, your own callback.

    A sink may also define ``take_inputs(batch, layer, tokens)``: the recording then hands it each layer's tokens
    (B, N, d) in the layer's hook, as they are captured (a layer that runs several times a forward: all its calls
    at once, when they are joined as the batch ends), so a sink that needs only part of them (the anisotropy
    baseline: one row per image) keeps that part, and the recording need not keep every layer's tokens until the
    batch ends (``keep_inputs``)."""

    def update(self, batch: BatchCapture) -> None: ...


def takes_inputs(sink: Any) -> bool:
    """Whether ``sink`` takes each layer's tokens in the layer's hook (``take_inputs``, :class:`Sink`), so that the
    recording need not keep them to the batch's end for it."""
    return callable(getattr(sink, "take_inputs", None))


def refuse_sinks_holding_images(sinks: Iterable[Any], seen: int) -> None:
    """Refuse a sink that already holds more images than the recording gave it (``images_held()``, which qkhooks'
    reducers define): a reducer of an earlier recording. This one numbers its images from its own start, so the
    reducer's image indices (top-k's) would name two images each, and a run file's reducer state would count images
    the file does not hold: a wrong number without a word."""
    for sink in sinks:
        held = getattr(sink, "images_held", None)
        count = held() if callable(held) else None
        if count is not None and count > seen:
            name = type(sink).__name__
            raise QKHooksError(
                f"this {name} already holds {count} images from an earlier recording, and this recording has given it "
                f"{seen}: its image indices start again here, so one index would name two images. Keep one recording "
                "open for all the batches (with qkhooks.record(model, sinks=[...]) as run: for x in loader: run(x)), "
                f"give each recording a fresh {name}(...), or continue a run file with resume=True.")


def parse_modes(modes: int | str | None) -> int | None | Literal["all"]:
    """``16``/``"16"`` -> 16, ``"all"`` -> "all", ``None``/``0``/``"0"``/``"none"`` -> None (capture only); the default
    stays :data:`qkhooks.options.DEFAULT_MODES`, so that :func:`modes_kept` knows nobody asked for its number."""
    text = str(modes).strip().lower() if modes is not None else "none"
    if text in ("none", "0"):
        return None
    if text == "all":
        return "all"
    if isinstance(modes, bool) or not text.isdigit():
        raise QKHooksError(f"modes must be a positive integer, 'all' or none (0); got {modes!r}.")
    return modes if isinstance(modes, DefaultModes) else int(text)


def _child_path(site: AttentionSite, module: nn.Module) -> str:
    """The path of ``module`` among the attention module's children (its own path where it is none of them)."""
    return next((f"{site.path}.{n}" for n, m in site.module.named_children() if m is module), site.path)


class Recording:
    """A set of hooks on one model and what they captured. Create it with :func:`record`.

    Results of the last batch are read in the vocabulary of :mod:`qkhooks.access`: ``query(l)``, ``key(l)``,
    ``attention(l, kind)``, ``spectrum(l)``, ``layers``, ``ids``, ``n``, ... (torch tensors on the model's device).

    Attributes:
        sites: the hooked attention layers.
        qk_spectrum: the (truncated) spectra used for projection (None without modes): the values the projectors
            were built from at entry, whatever a caller does to the spectrum object it gave or was given (an edited
            copy is replaced by a fresh one on the next read).
        attention_specs: the requested attention (:class:`AttentionSpec` s).
        last: the most recent complete :class:`BatchCapture` (None before the first forward).
        images_seen: number of images in complete batches so far.
        index_base: global index of this recording's first image (a resumed run or one shard of a
            distributed run starts past 0), so ``batch.offset`` names images globally.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        modes: int | str | None = DEFAULT_MODES,
        layers: LayerSelection = None,
        attention: None | str | AttentionSpec | Sequence[AttentionSpec | str] = None,
        input: InputKind = "normed",
        augmented: bool = False,
        keep_inputs: bool = False,
        keep_last: bool = True,
        sinks: Iterable[Sink] = (),
        spectrum: QKSpectrum | None = None,
        sites: Sequence[AttentionSite] | None = None,
        compute_dtype: torch.dtype | None = None,
        qk_path: bool = True,
        outputs: OutputsKind = "unchanged",
        skip_unmodelled: bool = False,
        spectrum_of_other_weights: bool = False,
    ):
        model = unwrap_loaded(model)
        if not isinstance(model, nn.Module):
            raise QKHooksError(f"record() needs a torch nn.Module, got {type(model).__name__}; load one with qkhooks.load_model.")
        if input not in ("normed", "residual"):
            raise QKHooksError(f"input must be 'normed' (the exact tensor entering W_q/W_k) or 'residual'; got {input!r}.")
        self._model_ref = weakref.ref(model)
        every = list(sites) if sites is not None else model_sites(model, skip_unmodelled)
        if sites is not None or _maybe_compiled(model):  # hooks there would run while the graph is traced, or never
            refuse_compiled(model, hooked_paths(model, every))
        self.sites: list[AttentionSite] = select_layers(every, layers)
        refuse_altered_qk(self.sites)  # the recorded layers only: a hook on another layer's q/k changes nothing here
        # partial recording: module path -> why it is left out (named, never silent; {} when none is), from every site
        # of the model (given sites may be a selection)
        self.left_out: dict[str, str] = unmodelled_parts(
            model, every if sites is None else model_sites(model, True)) if skip_unmodelled else {}
        self.modes = parse_modes(modes)
        self.attention_specs = parse_attention(attention, every)  # module paths resolved among all sites
        recorded = sorted(s.layer for s in self.sites)
        for spec in self.attention_specs:
            for site in self.sites:
                if spec.covers(site.layer):
                    site.check_attention_kind(spec.kind)
            missing = [layer for layer in spec.layers or () if layer not in recorded]
            if missing:
                raise QKHooksError(
                    f"attention {spec.kind!r} asks for layers {missing}, which this recording does not hook "
                    f"(recorded layers: {recorded}); pick block indices among them or add them to layers."
                )
        self.input: InputKind = input
        self.keep_inputs, self.keep_last = keep_inputs, keep_last
        self.sinks: list[Sink] = list(sinks)
        self._input_takers: list[Any] = []  # the sinks with take_inputs, as the batch began
        self.compute_dtype = _compute_dtype(compute_dtype)
        self._qk_path = qk_path
        # the spectra the projectors were built from, as they were at entry: the recording's own copies, never handed
        # out (the run file's statics and the x path built later read them); qk_spectrum hands out copies of them
        self._entry_spectrum: QKSpectrum | None = None
        self._entry_modes: dict[int, _EntryModes] = {}
        self._handed_spectrum: QKSpectrum | None = None
        self._projectors: dict[int, ModeProjector] = {}  # layers whose modes are projected from the tokens x
        # Layers whose modes come from the model's own q/k Linear outputs (a d_k x K product per head instead
        # of x's d x K): the same maps to float rounding, since u_n and v_n lie in the row spaces of W_q, W_k, where
        # q and k are float32 or float64 (a batch whose q/k come out in less takes x: _qk_path_serves).
        self._from_qk: dict[int, QKPathProjector] = {}
        self._qk_outputs: dict[int, dict[int, torch.Tensor]] = {}
        self._warned_no_prefix = False  # told once that a layer's default rows are its centre patch twice
        self._qk_tokens: dict[int, torch.Tensor] = {}  # q/k-path layer -> its tokens x in the open call (for x)
        # q/k-hooked layer -> the q/k Linear indices taken in its attention call now open (present only while it is):
        # a q/k Linear called outside its layer's own attention call (one shared by two blocks, a head calling it
        # after the blocks) hands that layer nothing
        self._qk_open: dict[int, set[int]] = {}
        self._x_fallback: dict[int, ModeProjector] = {}  # q/k-path layer -> its x path, built when first needed
        self._took_x: set[int] = set()  # q/k-path layers that took x in the last complete batch
        self._taking_x: set[int] = set()  # ... in the open batch
        self._pinned: dict[int, str] | None = None  # mode_source as a store states it (pin_mode_source)
        self._weights_at_entry: dict[int, WeightsState] = {}  # layer -> weights_state when its modes were computed
        self._live_weights: dict[int, tuple[torch.Tensor, ...] | None] = {}  # layer -> live_qk_tensors (views), or None
        # layer -> its attention module's parameters at entry (weak): read only to say why a weights check failed
        self._params_at_entry: dict[int, list[tuple[str, weakref.ref]]] = {}
        self._modes_kept: int | None | str = self.modes
        if self.modes is not None:
            k = None if self.modes == "all" else int(self.modes)
            by_layer = {s.layer: s for s in spectrum} if spectrum is not None else {}
            spectra = []
            given_tops = [int(g.num_modes) for g in by_layer.values() if g.truncated]  # spectrum=...top(k): k a head
            refuse_maps_only_modes(self.sites)
            # views of each layer's W_q/W_k, sliced once: compared here with the spectrum cache's copy, kept for the
            # check before each batch
            live = [live_qk_tensors(site) for site in self.sites]
            # on a GPU: one device read for every cached spectrum's weights check, not one per layer
            with cached_weights_checked(self.sites, live):
                for site, views in zip(self.sites, live):
                    from_qk = qk_path and input == "normed" and _full_precision_qk(site, compute_dtype)
                    given = by_layer.get(site.layer)
                    # the spectrum cache's copy is checked here once: by layer_spectrum when no spectrum was given,
                    # else for a given one that is the cache's own; any other given one is checked against the weights
                    vouched = given is None or is_cached_spectrum(site, given)
                    at_entry, projector = _layer_modes(site, given, k, augmented, from_qk,
                                                       vouched or spectrum_of_other_weights)
                    self._entry_modes[site.layer] = at_entry
                    spec = at_entry.own
                    self._weights_at_entry[site.layer] = weights_state(site, vouched)
                    self._live_weights[site.layer] = views  # compared each batch in place
                    self._params_at_entry[site.layer] = [(n, weakref.ref(p)) for n, p in site.module.named_parameters()]
                    spectra.append(spec)
                    if isinstance(projector, QKPathProjector):
                        self._from_qk[site.layer] = projector
                    else:
                        self._projectors[site.layer] = projector
            self._entry_spectrum = QKSpectrum(spectra, getattr(model, "qkhooks_spec", "") or type(model).__name__)
            self._modes_kept = modes_kept(self.modes, [s.num_modes for s in spectra], self.sites, stacklevel=5,
                                          given_tops=given_tops)
        self.outputs: OutputsKind = outputs
        self._once = self._layers_attended_once(outputs)
        self._qk_attention = {s.layer for s in self.sites if self._attention_from_qk(s)}
        self._qk_rows = {s.layer for s in self.sites if self._takes_rows_from_qk(s)}
        self._inside: dict[int, Any] = {}  # layer -> its InsideCall while attached (maps taken in the module's forward)
        self._calls: dict[int, list[LayerCapture]] = {}  # layer -> its earlier calls in this forward (joins_calls sites)
        self._attending: dict[int, OneAttention] = {}  # layer -> its OneAttention while attached
        self._handles: list[Any] = []
        self._current: BatchCapture | None = None
        self._outer = False  # whether the open batch is a call of ``model`` itself
        self._model_call = False  # whether it was begun by the model's own call, not by a layer called on its own
        self._rows_axis: tuple[AttentionSite, tuple[str, int, int], bool] | None = None
        self._pending_meta: dict[str, Any] = {}
        self._residual: dict[int, torch.Tensor] = {}
        self.last: BatchCapture | None = None
        self._unfinished = False  # a forward began after the last batch completed and has not completed
        self._left_open: tuple[int, ...] = ()  # the layers the open batch had run when detach dropped it
        self._begun_in_backward = False  # that forward began inside backward() (a checkpointed block recomputed)
        self._checked_training = False  # whether active dropout was looked for in training mode (attach, _begin_batch)
        self._bias: dict[int, torch.Tensor | str] = {}  # layer -> its position-only term, or why it has none
        self._token_geometries: dict[tuple, LayerGeometry] = {}  # (layer, tokens, call grids) -> its geometry
        # layer -> its own prefix tokens, in every batch's meta: a layer without geometry (TimeSformer's groups, a layer
        # of another kind recorded without modes) is never read with another layer's prefix (meta["num_prefix_tokens"],
        # the first layer's). One dict, shared by every batch (a batch stays picklable).
        self._prefix_tokens = {s.layer: int(s.num_prefix_tokens) for s in self.sites}
        self.images_seen = 0
        self.index_base = 0

    def _layers_attended_once(self, outputs: str) -> set[int]:
        """Layers whose attention runs once, from the recorded full maps (``outputs="eager"``). Talking-heads layers
        mix heads after the softmax and run no fused kernel: their maps are rebuilt as with ``"unchanged"``. Maps-only
        layers (q and k made inside the module) already hand over the maps the module computed, with nothing
        computed twice: they run as they are."""
        if outputs not in ("unchanged", "eager"):
            raise QKHooksError(f"outputs must be 'unchanged' (bit-identical to the model) or 'eager' (attention computed "
                               f"once from the recorded full maps); got {outputs!r}.")
        if outputs == "unchanged":
            return set()
        full = [s for s in self.sites if any(spec.kind == "full" and spec.covers(s.layer) for spec in self.attention_specs)]
        if not full:
            raise QKHooksError("outputs='eager' computes a layer's attention once from its recorded full maps, and this "
                               "recording asks for none; add attention='full' (or 'full:LAYERS'), or leave outputs="
                               "'unchanged'.")
        return {s.layer for s in full if s.head_mixing is None and not s.observes_maps()}

    @property
    def modes_kept(self) -> int | None | Literal["all"]:
        """The modes kept per head: ``modes`` as asked, or the most any recorded head has when it asked for more."""
        return self._modes_kept

    @property
    def qk_spectrum(self) -> QKSpectrum | None:
        """The (truncated) spectra the maps are projected on (None without modes), as they were at entry: copies of
        the recording's own, so that editing one in place (``S.div_(S.max())`` for a plot) or the spectrum given
        (``spectrum=``, ``qkhooks.spectrum(model)``, which shares the cache's arrays) changes nothing it projects with,
        reports or writes; an edited copy is replaced by a fresh one at the next read (a few us a layer to tell)."""
        if self._entry_spectrum is None:
            return None
        layers = [self._entry_modes[spec.layer].handed() for spec in self._entry_spectrum]
        handed = self._handed_spectrum
        if handed is None or len(handed.layers) != len(layers) or any(a is not b for a, b in zip(handed.layers, layers)):
            handed = self._handed_spectrum = QKSpectrum(layers, self._entry_spectrum.model)
        return handed

    def spectrum_statics(self) -> dict[str, Any]:
        """The run-file statics of the recorded modes (numpy arrays, copies): ``spectrum/L{l}/U``, ``S``, ``V``,
        ``cos`` and every mode's ``S_all``, ``cos_all``, from the values the projectors were built from at entry
        (empty without modes), so a file's spectrum is that of its maps whatever the caller edits meanwhile."""
        out: dict[str, Any] = {}
        for spec in self._entry_spectrum or ():
            s_all, cos_all = spec.all_modes()
            for name, value in (("U", spec.U), ("S", spec.S), ("V", spec.V), ("cos", spec.cos), ("S_all", s_all),
                                ("cos_all", cos_all)):
                value = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
                out[f"spectrum/L{spec.layer}/{name}"] = np.array(value, copy=True)
        return out

    @property
    def mode_source(self) -> dict[int, str]:
        """Layer -> where its maps came from in the last batch (before the first: where they will, as decided at
        entry): ``"qk"`` (the model's q/k Linear outputs) or ``"x"`` (the tokens entering W_q/W_k). A q/k-path layer
        whose q or k comes out in less than float32 in a batch (a bfloat16 or float16 model, autocast) takes x in
        that batch: from q's own rounding the q/k path would give maps up to kappa times less exact."""
        if self.modes is None:
            return {}
        took_x = self._took_x if self._pinned is None else {l for l, source in self._pinned.items() if source == "x"}
        return {s.layer: "qk" if s.layer in self._from_qk and s.layer not in took_x else "x" for s in self.sites}

    def pin_mode_source(self) -> dict[int, str]:
        """:attr:`mode_source`, fixed for the rest of this recording: what a run file states once, before its first
        batch. A later batch whose q/k would move a layer pinned ``"qk"`` to x (its q or k in less than float32) is
        refused before any sink sees it; a layer pinned ``"x"`` keeps taking x."""
        self._pinned = self.mode_source
        return dict(self._pinned)

    # ------------------------------------------------------------------ hooks
    @property
    def active(self) -> bool:
        return bool(self._handles)

    def attach(self) -> "Recording":
        """Install the hooks (``with`` does this for you)."""
        if self.active:
            raise QKHooksError("this recording is already attached; use a new qkhooks.record(...) to nest.")
        refuse_sinks_holding_images(self.sinks, self.images_seen)
        model = self._live_model()
        _warn_active_dropout(model)
        self._checked_training = model.training  # else checked at the first batch run in training mode
        # A batch is one call of ``model``: handed to the sinks only when that call returns, so a forward that
        # fails late hands over nothing. A full CLIPModel is used through get_image_features, which never calls
        # CLIPModel.forward; then the batch spans the recorded attention modules, first to last.
        first = min(self.sites, key=lambda s: s.layer)
        last = max(self.sites, key=lambda s: s.layer)
        self._forget_call_grids()  # sites are cached per model: a grid read in an earlier recording is not this one's
        try:
            hook = functools.partial(own_hook, model)  # every hook goes through own_hook: marked, and refusing to be traced
            self._handles.append(hook(model, self._begin_batch, with_kwargs=True))
            self._handles.append(hook(model, self._end_batch, pre=False, always_call=False))
            self._handles.append(hook(model, self._drop_failed, pre=False, always_call=True))
            self._handles.append(hook(first.module, self._begin_inner, with_kwargs=True))
            for module, context in grid_source_hooks(self.sites):  # the grid of each call, read once for all layers
                self._handles.append(hook(module, context, with_kwargs=True))
            for site in self.sites:
                if self.input == "residual":
                    self._handles.append(hook(site.block, self._residual_hook(site), with_kwargs=True))
                for module, context in site.context_hooks():  # e.g. a windowed site's block grid
                    self._handles.append(hook(module, context, with_kwargs=True))
                self._handles.append(hook(site.module, self._layer_hook(site), with_kwargs=True))
                if site.layer in self._once:
                    self._attending[site.layer] = OneAttention(site)
                    self._handles.append(hook(site.module, self._begin_attending(site)))
                    self._handles.append(hook(site.module, self._end_attending(site), pre=False, always_call=True))
                if site.layer in self._from_qk or site.layer in self._qk_attention:
                    for i, linear in enumerate(site.qk_modules):
                        self._handles.append(hook(linear, self._qk_hook(site, i), pre=False))
                    self._handles.append(hook(site.module, self._close_qk(site), pre=False, always_call=True))
                self._handles.extend(self._inside_hooks(model, site))
            self._handles.append(hook(last.module, self._end_inner, pre=False, always_call=False))
        except BaseException:
            self.detach()
            raise
        return self

    def detach(self) -> None:
        """Remove this recording's hooks (idempotent) and drop any half-finished batch."""
        handles, self._handles = self._handles, []
        remove_own_hooks(handles)
        if self._current is not None and self._unfinished:  # the layers a call left open ran, for _partial_call
            self._left_open = tuple(self._ran_layers(self._current))
        for mode in self._attending.values():  # a forward stopped by KeyboardInterrupt skips the hook that leaves it
            if mode.entered:
                mode.leave()
        self._attending.clear()
        for call in self._inside.values():
            if call.entered:
                call.leave()
        self._inside.clear()
        self._drop_open_batch()
        for site in self.sites:  # the last call's mask, bias and rotary tables: not kept past the recording
            site.forget_call()

    def _live_model(self) -> nn.Module:
        """The recorded model, or a clear error once it is gone or this recording has released it."""
        model = self._model_ref()
        if model is None:
            raise QKHooksError("the model of this recording no longer exists.")
        if self.sites and self.sites[0].module is None:
            _released()
        return model

    def __enter__(self) -> "Recording":
        return self.attach()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        model = self._model_ref()
        self.detach()
        self.sites_release()
        refusal = traced_refusal(exc, model, [s.path for s in self.sites])  # a hook traced with fullgraph=True
        if refusal is not None:
            raise refusal from exc

    def sites_release(self) -> None:
        """Forget the model's modules so a finished recording keeps no model alive."""
        self.sites = [dataclasses.replace(s, module=None, block=None, qk_linear=_released, qk_modules=(),  # type: ignore[arg-type]
                                          grid_source=None, qk_watch=(), pixel_route=(),
                                          qk_norm=None if s.qk_norm is None else _ReleasedNorm())
                      for s in self.sites]  # the grid its last call read stays
        self._live_weights.clear()  # views of the weights: they would keep the parameters' memory alive
        self._params_at_entry.clear()

    def __repr__(self) -> str:
        state = "attached" if self.active else "detached"
        att = ",".join(s.kind for s in self.attention_specs) or "none"
        return (
            f"Recording({state}, layers={[s.layer for s in self.sites]}, modes={self.modes}, attention={att}, "
            f"input={self.input}, sinks={len(self.sinks)}, images_seen={self.images_seen})"
        )

    # --------------------------------------------------------------- batches
    def set_batch(self, ids: Sequence[str] | None = None, **meta: Any) -> None:
        """Metadata for the next forward: image ids, ``query_tokens`` (B, T) for attention rows,
        ``pool_masks`` (B, M, tokens) for pooled attention, or anything your sinks read."""
        if ids is not None:
            meta["ids"] = list(ids)
        self._pending_meta = meta

    def __call__(self, *args: Any, ids: Sequence[str] | None = None, meta: dict[str, Any] | None = None, **kwargs: Any):
        """Run the model on ``args``/``kwargs`` with this batch's ids and metadata; returns the model's output.

        The images are the model's input: a float tensor (B, 3, H, W) preprocessed for it; photos become one with
        the loaded model's own preprocessing, ``torch.stack([loaded.image_config(img) for img in photos])``."""
        first = args[0] if args else kwargs.get("pixel_values", kwargs.get("x"))
        if _photos_not_input(first):
            one = first[0] if isinstance(first, (list, tuple)) else first
            what = (f"a {type(first).__name__} of " * isinstance(first, (list, tuple))
                    + f"a {type(one).__module__}.{type(one).__name__}")
            raise QKHooksError(f"the recording was handed {what}; {_MODEL_INPUT}")
        if isinstance(first, torch.Tensor) and first.dtype == torch.uint8:  # a wrapper may normalise it itself
            warnings.warn(f"the recording was handed a torch.uint8 tensor (raw 0-255 pixels?); unless the model "
                          f"normalises them itself, {_MODEL_INPUT}", stacklevel=2)
        self.set_batch(ids, **(meta or {}))
        model = self._live_model()
        return model(*args, **kwargs)

    def _forget_call_grids(self) -> None:
        """Forget the grids earlier calls' patch embeddings read (round 33): a call reads its own, or has none (its
        tokens were made outside the recording) and is not given an earlier one (``AttentionSite.grid_for``)."""
        for site in self.sites:
            site._grid_of_source = SOURCE_NOT_RUN if site.grid_source is not None else None

    def _begin_batch(self, module: nn.Module, args: tuple, kwargs: dict, outer: bool = True) -> None:
        first = args[0] if args else kwargs.get("pixel_values", kwargs.get("x", kwargs.get("hidden_states")))
        if isinstance(first, torch.Tensor) and first.dim() and not first.shape[0]:  # before anything is dropped
            _refuse_empty(tuple(first.shape))
        if outer and module is self._model_ref():  # the model's own call: its patch embeddings have not run yet
            self._forget_call_grids()
        refuse_altered_qk(self.sites)  # a hook, patch or weight put on inside the context (~70 us a ViT-B batch)
        self._check_weights()
        model = self._model_ref()
        if model is not None and model.training and not self._checked_training:  # model.train() inside the context
            self._checked_training = True
            _warn_active_dropout(model)
        meta, self._pending_meta = self._pending_meta, {}
        if "geometry" in meta:  # a copy: layers are added to it as they run, the caller's (a cached probe) is kept
            meta["geometry"] = dict(meta["geometry"] or {})
        for name in _BATCH_METADATA:  # the batch's own copy (small): a caller reusing its buffer for the next batch
            value = meta.get(name)  # in place changed the tokens or masks an earlier batch says it was recorded with
            if value is not None:
                meta[name] = value.detach().clone() if isinstance(value, torch.Tensor) else copy.deepcopy(value)
        meta.setdefault("prefix_tokens", self._prefix_tokens)
        # the last batch is freed as the next forward begins (a batch the caller holds stays theirs), so a recording
        # never holds two batches' maps at once: half the peak for full maps, and no heap grown and trimmed a batch
        self.last, self._unfinished, self._left_open = None, True, ()
        self._begun_in_backward = torch._C._current_graph_task_id() != -1  # a checkpointed block recomputed
        self._taking_x = set()
        self._current = BatchCapture(ids=list(meta.pop("ids", [])), meta=meta, module_paths=self.module_paths,
                                     qk_spectrum=self.qk_spectrum)
        self._calls.clear()
        self._outer = outer
        self._model_call = outer and module is self._model_ref()  # begun by the model's own call (its root pre-hook)
        self._input_takers = [s for s in self.sinks if takes_inputs(s)]
        self._rows_axis: tuple[AttentionSite, tuple[str, int, int], bool] | None = None  # the first rows layer, its
        # (stage, rows, tokens) and whether the query tokens were chosen (else the defaults of its grid)

    def _begin_inner(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """The first recorded layer starts: keep the batch ``model`` just opened, else open one here. Within one call
        of ``model`` the batch stays open when the first layer runs again: its layer hook then joins the calls or
        refuses them (a new batch here would drop the earlier call without a word)."""
        if self._current is None or not self._outer:
            self._begin_batch(module, args, kwargs, outer=False)

    def _check_weights(self) -> None:
        """Refuse a batch when a layer's W_q/W_k are not the weights its modes were computed from at entry: its
        spectrum, q/k path vectors and bias offsets belong to those (a checkpoint loaded or an optimiser step inside
        the context gave maps off by up to O(1) on the q/k path, and ``run.spectrum(l)`` of the old weights on
        both paths). Once per forward: a few us a layer, or for weights made in inference mode (no version counter)
        a bit-for-bit compare with the copy taken at entry (:func:`qkhooks.spectrum.weights_state`)."""
        checked = [(self._weights_at_entry[s.layer], s) for s in self.sites if s.layer in self._weights_at_entry]
        live = [self._live_weights.get(site.layer) for _, site in checked]
        for (_, site), same in zip(checked, weights_unchanged(checked, live)):  # a GPU: one device read for all layers
            if not same:
                at_entry = dict(self._params_at_entry.get(site.layer, ()))
                swapped = [n for n, p in site.module.named_parameters() if at_entry.get(n, lambda: None)() is not p]
                if swapped:
                    raise QKHooksError(
                        f"layer {site.layer} ({site.path}): its parameters are not the module's own in this call "
                        f"({', '.join(repr(f'{site.path}.{n}') for n in swapped[:3])}{' ...' * (len(swapped) > 3)} "
                        "substituted: torch.func.functional_call, torch.nn.utils.stateless or another "
                        "reparametrisation, or a new nn.Parameter assigned), and its modes were computed at entry "
                        f"from the module's own, so its maps and run.spectrum({site.layer}) would belong to those. "
                        "Load the weights into the model (model.load_state_dict(params)) before entering record(), "
                        "and call the model itself.")
                raise QKHooksError(
                    f"layer {site.layer} ({site.path}): its weights changed inside this record() context (a checkpoint "
                    "loaded, an optimiser step, .to() or another in-place edit) after its modes were computed at entry, "
                    f"so its maps and run.spectrum({site.layer}) would belong to the old weights. Enter record() per "
                    "batch (the spectrum cache recomputes only the layers whose weights changed, so that is cheap), or "
                    "change the weights outside the context.")

    def _end_inner(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._current is not None and not self._outer:
            self._end_batch(module, args, output)

    def _end_batch(self, module: nn.Module, args: tuple, kwargs: dict | Any, output: Any = None) -> None:
        batch, self._current = self._current, None
        self._qk_outputs.clear()
        self._qk_tokens.clear()
        if batch is None or not batch.captures:
            self._unfinished = False
            return
        self._join_calls(batch)
        for layer, cap in batch.captures.items():
            if ((layer in self._from_qk and cap.query is None) or (layer in self._qk_attention and "full" not in cap.attention)
                    or (layer in self._qk_rows and not cap.attention.keys() - {"full"})):
                raise QKHooksError(
                    f"layer {layer}'s attention did not call its q/k Linear modules, so its modes or full maps could "
                    "not be taken from their outputs; record with qk_path=False to use the tokens instead."
                )
        size = batch.n
        batch.offset = self.index_base + self.images_seen
        if not batch.ids:
            batch.ids = self.default_ids(size)
        elif len(batch.ids) != size:
            raise QKHooksError(f"{len(batch.ids)} ids were given for a batch of {size} images; give one id per image.")
        if batch.meta.get("query_tokens") is not None and self._rows_axis is None:  # read by no layer (full maps only):
            batch.meta["query_tokens"] = tokens_per_image(batch.meta["query_tokens"], size)  # (B, T), as rows keep them
        self.images_seen += size
        self._layer_geometry(batch)
        self.last = batch if self.keep_last else None  # else freed once the sinks are done
        self._unfinished = False
        self._took_x = self._taking_x
        for layer, bias in batch.position_bias.items():
            before = self._bias.setdefault(layer, bias.clone())  # the layer's own copy, whatever the model reuses
            if isinstance(before, torch.Tensor) and not (before.shape == bias.shape and torch.equal(before, bias)):
                self._bias[layer] = "it changed between batches (another input size, or a term computed from the image)"
        for layer in batch.masked:
            self._bias[layer] = "it is a mask (it masks keys out or differs between images), applied in the rebuilt maps"
        for sink in self.sinks:
            sink.update(batch)

    def default_ids(self, n: int) -> list[str]:
        """The ids the next batch of ``n`` images gets when none are given: each image's global index
        (``index_base + images_seen + i``) as a string. The one rule, for a caller that gives the ids up front too
        (the BFD tensor pass, so that its position probes split each layer's tokens in the layer's hook)."""
        return [str(self.index_base + self.images_seen + i) for i in range(n)]

    def _drop_failed(self, module: nn.Module, args: tuple, output: Any) -> None:
        """Forward hook on the model after :meth:`_end_batch`, which torch also calls when the forward raised (then with
        output None, ``always_call``). A batch still open here is a failed forward's (a complete one was taken by
        ``_end_batch``): dropped now, so that its maps and tokens are not held until the next forward. ``run.query(l)``
        then says that the last forward did not complete."""
        if self._current is not None:
            self._drop_open_batch()

    def _drop_open_batch(self) -> None:
        """Forget the batch being recorded: its captures, joined calls, half-taken q/k and kept tokens."""
        self._current = None
        self._calls.clear()
        self._qk_outputs.clear()
        self._qk_tokens.clear()
        self._qk_open.clear()
        self._residual.clear()

    def _layer_geometry(self, batch: BatchCapture) -> None:
        """Every layer's own geometry (prefix tokens, grids, token counts) for the sinks, read off this batch's maps as
        ``run.geometry(l)`` reads it, where the caller's metadata gives none (``record_dataset`` gives its probe's).
        Without it a sink takes the first layer's prefix for every layer: CaiT's class-attention layers (CLS + patches
        after patch-only layers) and VidEoMT's per-frame layers (object queries first) would have their prefix tokens
        ranked as patches without a word. Read each batch (~10 us a layer): a layer's grid is its call's (a
        dynamic-size ViT, windows), not its token count's. A layer whose queries and keys are its tokens has its
        geometry read in its hook already (:meth:`_layer_hook`); here the others', from their maps, into the batch's
        ``meta["geometry"]`` (a copy of the caller's, made as the batch began, or a new dict). A layer of another kind
        without maps (no modes), or with none to give (TimeSformer's groups), has none: the sinks that need a grid
        check it against the token count there."""
        for site in self.sites:
            cap = batch.captures.get(site.layer)
            if cap is None or cap.query is None or cap.key is None or site.layer in batch.meta.get("geometry", ()):
                continue
            with contextlib.suppress(QKHooksError):
                found = observe_geometry(site, int(cap.query.shape[-1]), int(cap.key.shape[-1]))
                batch.meta.setdefault("geometry", {})[site.layer] = found

    def _tokens_geometry(self, site: AttentionSite, tokens: int) -> LayerGeometry:
        """The geometry of a site whose queries and keys are its tokens, in a call of ``tokens`` tokens an image, kept
        for the next call of the same token count and grid: it depends on nothing else there (~9 us a layer to read,
        a lookup to keep; the grid is the call's, read as it began)."""
        key = (site.layer, tokens, site._grid_of_source, site._grid_of_input)
        found = self._token_geometries.get(key)
        if found is None:
            found = self._token_geometries[key] = observe_geometry(site, tokens, tokens)
        return found

    def _residual_hook(self, site: AttentionSite):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            self._residual[site.layer] = site.hidden_states(args, kwargs, block=True)

        return hook

    def _layer_hook(self, site: AttentionSite):
        projector = self._projectors.get(site.layer)
        specs = [s for s in self.attention_specs if s.covers(site.layer)]
        # full maps come from the model's own q and k in the q/k hook (or its own attention call, outputs="eager");
        # rows and pooled from x here (with a few query tokens the keys are never computed, cheaper than k), or
        # from q and k in the q/k hook where it runs anyway (modes or full maps from q/k)
        specs = [s for s in specs if not (s.kind == "full" and (site.layer in self._qk_attention or site.layer in self._once
                                                                or site.observes_maps()))
                 and not (s.kind != "full" and site.layer in self._qk_rows)]
        # Where a site's queries and keys are the tokens handed to it, one image a row, its geometry is read off them
        # here, before any sink takes them (live anisotropy on CaiT's class-attention layers took the first layer's
        # prefix, and refused), and with or without modes. Other kinds (windows, pooled queries, reduced keys, frames)
        # differ from their tokens: read off their maps as the batch ends (_layer_geometry).
        from_tokens = site.geometry_from_tokens()

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = site.hidden_states(args, kwargs)
            if not x.shape[0]:  # (the model's own call refused it already, unless the batch began elsewhere)
                _refuse_empty(tuple(x.shape), site)
            if self._current is None:  # a submodule was called directly: still record
                self._begin_batch(module, (), {})
            if "num_prefix_tokens" not in self._current.meta:  # sinks cannot tell a 4x6 grid + CLS from a 5x5 grid
                self._current.meta["num_prefix_tokens"] = site.num_prefix_tokens
                with contextlib.suppress(QKHooksError):  # a grid of its own; else the sinks ask for one
                    self._current.meta.setdefault("grid", site.grid_for(int(x.shape[1])))
            if from_tokens and site.layer not in self._current.meta.get("geometry", ()):
                self._current.meta.setdefault("geometry", {})[site.layer] = self._tokens_geometry(site, int(x.shape[1]))
            if site.logit_bias() is not None:  # an all-zero term (an unpadded batch's mask) is no term at all
                bias = site.position_bias()
                if bias is None:
                    self._current.masked.add(site.layer)
                elif bool(bias.any()):
                    self._current.position_bias[site.layer] = bias
            with torch.no_grad():
                cap = LayerCapture(site.layer, site.images_in_call(int(x.shape[0])))
                x_modes = self._residual.pop(site.layer, x) if self.input == "residual" else x
                if self.compute_dtype is not None:
                    x_modes = x_modes.to(self.compute_dtype)
                if projector is not None:
                    cap.query, cap.key = self._x_maps(site, projector, x, x_modes)
                elif site.layer in self._from_qk:  # kept for the q/k hook, should this call's q/k be below float32
                    self._qk_tokens[site.layer] = x
                joins = site.joins_calls()  # one call of several: its tokens are kept, and handed over once joined
                if self.keep_inputs or (joins and self._input_takers):
                    cap.inputs = detached(x_modes)
                for sink in [] if joins else self._input_takers:
                    sink.take_inputs(self._current, site.layer, detached(x_modes))
                for spec in specs:
                    cap.attention[spec.kind] = site.to_images(spec.kind, self._attention(site, spec, x.detach()))
                relative = site.relative_term() if "full" in cap.attention else None  # SAM/ViTDet: kept with its maps
                if relative is not None:
                    cap.relative = site.to_images("full", relative)
                if site.layer in self._current.captures:  # type: ignore[union-attr]
                    self._repeated_call(site)
                if site.layer in self._from_qk or site.layer in self._qk_attention:
                    self._qk_open[site.layer] = set()  # its q/k Linear outputs are taken until this call ends
                if "full" in cap.attention and hasattr(site, "map_terms"):  # zoo11-maps: two-softmax terms, with the maps
                    cap.terms = map_terms(site, *site.qk(x.detach()))
                self._current.captures[site.layer] = cap  # type: ignore[union-attr]

        return hook

    # ---- q/k made inside the module (zoo11-inside, qkhooks.models.inside): the maps observed in its own forward
    def _inside_hooks(self, model: nn.Module, site: AttentionSite) -> list[Any]:
        """Hooks that watch an :class:`InsideSite`'s module compute its attention and keep its maps as the layer's
        full maps (nothing when the site is not one, or no full maps are asked for it)."""
        if not site.observes_maps() or not any(s.kind == "full" and s.covers(site.layer) for s in self.attention_specs):
            return []
        from qkhooks.models.inside import InsideCall

        call = self._inside[site.layer] = InsideCall(site)  # type: ignore[arg-type]

        def enter(module: nn.Module, args: tuple) -> None:
            if self._current is not None and site.layer in self._current.captures:
                call.enter()

        def leave(module: nn.Module, args: tuple, output: Any) -> None:
            if not call.entered:
                return
            seen = call.leave()
            cap = self._current.captures.get(site.layer) if self._current is not None else None
            if output is not None and cap is not None:
                cap.attention["full"] = site.to_images("full", site.assemble(seen))  # type: ignore[attr-defined]

        return [own_hook(model, site.module, enter), own_hook(model, site.module, leave, pre=False, always_call=True)]

    # ---- several calls of one layer per forward (zoo11-inside): joined, or refused
    def _repeated_call(self, site: AttentionSite) -> None:
        """The layer runs again in the same forward: keep its finished call (a site that joins its calls, VidEoMT's
        per-frame layers), or refuse: one capture per layer would silently hold only the last call."""
        if not site.joins_calls():
            raise QKHooksError(f"layer {site.layer} ({site.path}, {type(site.module).__name__}) ran more than once in one "
                               "forward of the model, and a recording holds one call per layer and forward, so its "
                               "earlier calls would be lost; qkhooks does not model this module's repeated calls.")
        self._calls.setdefault(site.layer, []).append(self._current.captures[site.layer])  # type: ignore[union-attr]

    def _join_calls(self, batch: BatchCapture) -> None:
        """Each layer that ran several times: its calls as one capture, batch axis image-major (b·T + t for T calls).
        The sinks that take inputs get each joining layer's tokens here, all its calls at once (its hook saw one call
        only); they are kept in the capture only with ``keep_inputs``."""
        calls, self._calls = self._calls, {}
        for layer, earlier in calls.items():
            batch.captures[layer] = _joined_calls(earlier + [batch.captures[layer]])
        if not self._input_takers:
            return
        for site in self.sites:
            cap = batch.captures.get(site.layer)
            if cap is None or not site.joins_calls():
                continue
            for sink in self._input_takers:
                sink.take_inputs(batch, site.layer, cap.inputs)
            if not self.keep_inputs:
                cap.inputs = None

    def _x_maps(self, site: AttentionSite, projector: ModeProjector, x: torch.Tensor,
                x_modes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The x path's query and key maps of one call: ``x_modes`` (the tokens to project, in the compute dtype)
        projected, keys from the reduced tokens the model feeds to W_k where it has them (read off ``x``)."""
        query, key = projector(x_modes.detach())
        if site.key_tokens is not None:
            key = projector(_reduced_keys(site, x, self.input, self.compute_dtype))[1]
        return site.to_images("modes", query), site.to_images("modes", key)

    def _qk_path_serves(self, site: AttentionSite, *outputs: torch.Tensor) -> bool:
        """Whether this call's q and k (as the Linear returned them) give the maps: only in float32 or float64. The
        q/k path magnifies q's rounding by up to kappa < 32 (:data:`~qkhooks.projector.QK_PATH_MAX_AMPLIFICATION`,
        set for float32); in bfloat16 (rounding 2^-8) that is maps off by ~1e-1 where x gives ~4e-3, and no bound
        on kappa scaled by eps32/eps would let any mode through (kappa >= 1). Else the layer takes x in this batch,
        unless a store has stated it takes q/k (:meth:`pin_mode_source`): then the batch is refused."""
        full = all(t.dtype in _FULL_PRECISION for t in outputs)
        pinned = None if self._pinned is None else self._pinned.get(site.layer)
        if full and pinned != "x":
            return True
        if pinned == "qk":
            dtype = next(t.dtype for t in outputs if t.dtype not in _FULL_PRECISION)
            raise QKHooksError(
                f"layer {site.layer} ({site.path}): its q/k Linear returned {str(dtype).replace('torch.', '')} in this "
                "batch, where this recording's store states its maps come from the model's float32 q and k (decided "
                "before the first batch); from q and k below float32 they would be far less exact than from the "
                "tokens. Enter torch.autocast (or cast the model) before record() / record_dataset, so that each "
                "layer's source is decided at entry, or record with qk_path=False.")
        self._taking_x.add(site.layer)
        return False

    def _attention_from_qk(self, site: AttentionSite) -> bool:
        """Whether this layer's full maps are rebuilt from the q and k its own Linear modules return (no second
        q/k projection: the softmax of q·kᵀ is all the extra work) rather than from the tokens x."""
        return (self._qk_path and bool(site.qk_modules) and site.layer not in self._once
                and any(s.kind == "full" and s.covers(site.layer) for s in self.attention_specs))

    def _takes_rows_from_qk(self, site: AttentionSite) -> bool:
        """Whether this layer's rows (and pooled rows) are taken from the q and k its Linear modules return, where
        the q/k hook runs anyway: the model's own q and k, no second q projection (a few tenths of a ms per ViT-S
        layer). Not where the site reads rows its own way (windows, packed sequences), keys come from other tokens or
        maps are observed in the module's own forward, nor in a layer attended once (its softmax would be taken for
        the module's own) or run once per frame."""
        return ((site.layer in self._from_qk or site.layer in self._qk_attention) and site.key_tokens is None
                and site.layer not in self._once and not site.observes_maps() and not site.joins_calls()
                and type(site).attention_rows is AttentionSite.attention_rows
                and any(s.kind != "full" and s.covers(site.layer) for s in self.attention_specs))

    def _begin_attending(self, site: AttentionSite):
        """Forward pre-hook (after the layer's own): the module's attention is computed once, by OneAttention."""
        def hook(module: nn.Module, args: tuple) -> None:
            self._attending[site.layer].enter()

        return hook

    def _end_attending(self, site: AttentionSite):
        """Forward hook, also called when the forward raised (then with output None): leave OneAttention and keep
        the maps the module's output was computed from."""
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            mode = self._attending[site.layer]
            if not mode.entered:
                return
            mode.leave()
            maps = mode.take() if output is not None else None
            cap = self._current.captures.get(site.layer) if self._current is not None else None
            if maps is not None and cap is not None:
                cap.attention["full"] = site.to_images("full", maps.detach())

        return hook

    def _ran_outside_error(self, site: AttentionSite, module: nn.Module) -> QKHooksError:
        """Layer ``site``'s q/k projection ran while no forward of the recorded model was open (review r34: a
        torch.fx copy of the model called inside the context shares its Linear modules, whose hooks fire, but not the
        model's or the attention module's: nothing was recorded, and ``run.last`` still held the batch before)."""
        name = _child_path(site, module)
        return QKHooksError(
            f"{name} (layer {site.layer}'s q/k projection) ran outside any forward of the recorded model: a copy of "
            "the model that shares its modules (torch.fx.symbolic_trace, a wrapper calling the submodules itself) was "
            "called inside the record() context. Its attention is not recorded, and the recording still holds the "
            "batch before. Call the recorded model itself (a TorchScript copy runs no hooks at all and is not seen).")

    def _close_qk(self, site: AttentionSite):
        """Forward hook on a q/k-hooked layer's attention module, also called when its forward raised: its q/k
        Linear outputs are no longer this layer's (a bool check a layer and call)."""
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            self._qk_open.pop(site.layer, None)

        return hook

    def _qk_twice_error(self, site: AttentionSite, module: nn.Module) -> QKHooksError:
        """Layer ``site``'s q/k Linear returned a second output within one call of its attention module: which one
        is its q or k cannot be told, and a recording holds one per call."""
        name = _child_path(site, module)
        return QKHooksError(
            f"{name} (layer {site.layer}'s q/k projection) ran more than once within one call of {site.path}, so which "
            "output is the layer's q and k cannot be told and the maps would be of the last call; qkhooks does not "
            "model this attention. Record with qk_path=False (the tokens entering W_q/W_k) if its attention is "
            "softmax(q·kᵀ) of one projection of them, else leave the layer out (layers=...).")

    def _qk_hook(self, site: AttentionSite, index: int):
        """Forward hook on q/k Linear ``index`` of ``site``: once q and k are both out, project the modes and
        rebuild the full maps from them."""
        projector, width, fused = self._from_qk.get(site.layer), site.num_heads * site.head_dim, len(site.qk_modules) == 1
        full = site.layer in self._qk_attention
        tied = not fused and site.qk_modules[0] is site.qk_modules[1]  # k_proj = q_proj: q and k from its first call
        row_specs = [s for s in self.attention_specs if s.kind != "full" and s.covers(site.layer)] if site.layer in self._qk_rows else []

        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            taken = self._qk_open.get(site.layer)
            cap = self._current.captures.get(site.layer) if self._current is not None and taken is not None else None
            if cap is None:  # called outside this layer's recorded attention call (another block sharing the Linear,
                # a head calling it after the blocks): not this layer's q or k
                if self._current is None and OWN_WORK.depth == 1:  # and outside any: not the recorded forward
                    raise self._ran_outside_error(site, module)
                return
            if index in taken:
                if tied:  # its second call (as k) returns what the first did, taken as both
                    return
                raise self._qk_twice_error(site, module)
            taken.add(index)
            out = detached(output)
            if fused:  # q and k side by side in one block: sliced below only where the rows or maps need them apart
                outputs: tuple[torch.Tensor, ...] = (out,)
            else:
                seen = self._qk_outputs.setdefault(site.layer, {})
                seen[index] = out
                if len(seen) < 2:  # the other one is still to come (models call them in either order)
                    return
                del self._qk_outputs[site.layer]
                outputs = (seen[0], seen[1])
            with torch.no_grad():
                tokens = self._qk_tokens.pop(site.layer, None)  # this call's x, kept by the layer hook
                if projector is not None and not self._qk_path_serves(site, *outputs):
                    assert tokens is not None  # kept for every call of a q/k-path layer
                    cap.query, cap.key = self._x_maps(site, self._x_projector(site.layer), tokens, tokens if
                                                      self.compute_dtype is None else tokens.to(self.compute_dtype))
                elif projector is not None:
                    dt = self.compute_dtype
                    if fused:  # q and k side by side in one output: one product for both
                        cap.query, cap.key = projector.from_fused(out if dt is None else out[..., :2 * width].to(dt))
                    else:
                        cap.query, cap.key = projector.from_linear(*(t if dt is None else t.to(dt) for t in outputs))
                    cap.query, cap.key = site.to_images("modes", cap.query), site.to_images("modes", cap.key)
                if full or row_specs:
                    q, k = (out[..., :width], out[..., width:2 * width]) if fused else outputs
                    q, k = split_heads(site, q), split_heads(site, k)
                if full:  # two-softmax sites (zoo11-maps): the maps combined from the terms, both kept
                    maps, terms = full_and_terms(site, q, k)
                    cap.attention["full"] = site.to_images("full", maps)
                    if terms is not None:
                        cap.terms = terms
                for spec in row_specs:
                    cap.attention[spec.kind] = site.to_images(spec.kind, self._attention(site, spec, qk=(q, k)))

        return hook

    def _x_projector(self, layer: int) -> ModeProjector:
        """The x path of a q/k-path layer, built on its first call whose q/k are below float32 (none is built before:
        most recordings never need it)."""
        if layer not in self._x_fallback:
            self._x_fallback[layer] = ModeProjector(self._entry_spectrum[layer])  # type: ignore[index]
        return self._x_fallback[layer]

    def _check_rows_axis(self, site: AttentionSite, rows_in_call: int, n: int, chosen: bool) -> None:
        """One batch's query tokens name the same tokens in every layer whose rows are recorded: refuse a layer whose
        call holds another number of images (``rows_in_call``: windows counted as their images; a factorised video
        attention's other axis), or, for the default tokens (the class token and the centre patch of the first such
        layer's grid), another stage or another layout of the call's query positions (``site.rows_layout``: prefix
        tokens and the call's grid, a windowed layer's being its block's grid, not its window)."""
        layout = site.rows_layout(n)  # zoo13: the call's query positions, not a token count (a window's, for windows)
        if self._rows_axis is None:
            self._rows_axis = (site, (site.stage, rows_in_call, n, layout), chosen)
            return
        first, (stage, rows, tokens, first_layout), first_chosen = self._rows_axis  # later layers: the defaults in meta
        if rows_in_call == rows and (first_chosen or (site.stage, layout) == (stage, first_layout)):
            return  # chosen tokens index each layer's own tokens (e.g. the class token of every PiT stage)
        what = ("the default query tokens (the class token and the centre patch) are those of the first layer's grid"
                if not first_chosen else "one set of query tokens cannot name the same tokens in both")

        def _layout_text(layout: tuple[int, tuple[int, ...]]) -> str:
            prefix, grid = layout
            return f"{prefix} prefix + " + (f"{grid[0]}x{grid[1]} grid" if len(grid) == 2 else f"{grid[0] - prefix} tokens")

        raise QKHooksError(
            f"layer {site.layer} ({site.path}) attends over {rows_in_call} images of {n} tokens (stage {site.stage!r}; "
            f"query positions {_layout_text(layout)}) and layer {first.layer} ({first.path}) over {rows} images of "
            f"{tokens} (stage {stage!r}; query positions {_layout_text(first_layout)}): {what}. Record the rows of one "
            "stage at a time (layers=[...]) or record attention='full'.")

    def _attention(self, site: AttentionSite, spec: AttentionSpec, x: torch.Tensor | None = None,
                   qk: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """The layer's attention of ``spec.kind`` from the tokens x entering W_q, or from its q and k heads
        (B, H, N, d_k) as its Linear modules returned them (rows and pooled only)."""
        if spec.kind == "full":
            return attention_full(site, x)
        meta = self._current.meta if self._current is not None else {}
        tokens = meta.get("query_tokens")
        n, rows_in_call = (x.shape[1], x.shape[0]) if qk is None else (qk[0].shape[2], qk[0].shape[0])
        self._check_rows_axis(site, site.images_in_call(int(rows_in_call)), int(n), chosen=tokens is not None)
        if tokens is not None and torch.as_tensor(tokens).dim() == 1:  # the same tokens for every image: kept (B, T),
            tokens = tokens_per_image(tokens, site.images_in_call(int(rows_in_call)))  # as documented
            if self._current is not None:
                self._current.meta["query_tokens"] = tokens
        if tokens is None:  # no choice given: the first prefix token (CLS) and the centre patch, recorded as such
            tokens = default_query_tokens(site, n).expand(site.images_in_call(int(rows_in_call)), -1)
            if not site.num_prefix_tokens and not self._warned_no_prefix:  # once a recording
                self._warned_no_prefix = True
                warnings.warn(f"layer {site.layer} ({site.path}) has no prefix token (no CLS): the default query tokens "
                              "of such a layer are its centre patch twice, so row 0 is not a CLS row; pass query_tokens "
                              "(run.set_batch(query_tokens=...)) for other rows.", stacklevel=2)
            if self._current is not None:
                self._current.meta["query_tokens"] = tokens.cpu()
        tokens = torch.as_tensor(tokens)  # checked on the host (no device sync), then moved
        rows = site.attention_rows(x, tokens) if qk is None else rows_from_qk(site, *qk, tokens)
        if spec.kind == "rows":
            return rows
        masks = meta.get("pool_masks")
        if masks is None:
            raise QKHooksError("attention='pooled' needs pool_masks (B, M, tokens), the masks each row's mass is summed "
                               "on, with the batch; none came with this one. " + _per_batch_hint(["pool_masks"]))
        grid = site.rows_layout(int(n))[1] if rows.shape[-1] == n else None  # windowed rows lie on the image's grid
        return pool_rows(rows, torch.as_tensor(masks), site.num_prefix_tokens, grid)

    # ------------------------------------------------ the shared vocabulary (qkhooks.access), of the last batch
    @property
    def layers(self) -> list[int]:
        """The recorded layers (block indices), sorted."""
        return sorted(s.layer for s in self.sites)

    @property
    def module_paths(self) -> dict[int, str]:
        """Layer -> dotted path of its attention module."""
        return {s.layer: s.path for s in self.sites}

    @property
    def mode_layers(self) -> list[int]:
        """Layers with query/key maps (all of them with modes, none without)."""
        return self.layers if self.modes is not None else []

    @property
    def attention_kinds(self) -> list[str]:
        """Kinds of rebuilt attention (the ``attention=`` option)."""
        return sorted({spec.kind for spec in self.attention_specs})

    def attention_layers(self, kind: str = "rows") -> list[int]:
        """Layers with rebuilt attention of ``kind``."""
        return [l for l in self.layers if any(s.kind == kind and s.covers(l) for s in self.attention_specs)]

    @property
    def relative_layers(self) -> list[int]:
        """Layers with a query-dependent relative-position term (SAM/ViTDet) kept with their full maps."""
        full = self.attention_layers("full")
        return [s.layer for s in self.sites if getattr(s, "relative", None) is not None and s.layer in full]

    @property
    def ids(self) -> list[str]:
        """Ids of the last batch's images (empty before the first forward, or after one that raised); after a call
        that ran only some of the recorded layers, a refusal naming them (:meth:`_partial_call`)."""
        if self.last is None:
            self._refuse_partial_call()
        return list(self.last.ids) if self.last is not None else []

    @property
    def n(self) -> int:
        """Images in the last batch (0 before the first forward, or after one that raised); after a call that ran
        only some of the recorded layers, a refusal naming them (:meth:`_partial_call`), not 0."""
        if self.last is None:
            self._refuse_partial_call()
        return self.last.n if self.last is not None else 0

    def _ran_layers(self, batch: BatchCapture) -> list[int]:
        """The recorded layers an open batch's call has run so far (captured, or joined as repeated calls)."""
        return sorted(set(batch.captures) | set(self._calls))

    def _refuse_partial_call(self) -> None:
        """Raise :meth:`_partial_call`'s refusal where there is one."""
        refusal = self._partial_call()
        if refusal is not None:
            raise refusal

    def _partial_call(self) -> QKHooksError | None:
        """Why there is no batch after a call that ran some recorded layers and left its batch open (None otherwise):
        a call other than the model's own (``model.forward_intermediates(x, indices=[1], stop_early=True)``, a block
        called on its own) completes a batch when the last recorded layer returns, so one that stops before it completes
        none, while the batch before was freed as it began. Names the layers it ran and those it did not, and the
        ``layers=`` that records what it runs. (A call still running, read from inside it, has its batch open too: the
        text says so.) A model call that raised has its batch dropped (:meth:`_drop_failed`), and one stopped by
        Ctrl-C (no ``always_call`` hook runs for a KeyboardInterrupt) is the model's own: None for both."""
        if not self._unfinished or self._begun_in_backward or self._model_call:
            return None  # the model's own call completes at its end: one interrupted (Ctrl-C) is not this
        batch = self._current
        ran = self._ran_layers(batch) if batch is not None else list(self._left_open)
        missing = [layer for layer in self.layers if layer not in ran]
        if not ran or not missing:
            return None
        return QKHooksError(
            f"the last call ran the recorded layers {ran} but not {missing}, so it completed no batch: a call other "
            "than the model's own (model.forward_intermediates(..., stop_early=True), a block called on its own) "
            "completes one when the last recorded layer returns, and this one stopped before (or raised), while a "
            "recording frees its last batch as the next begins, so there is no batch to read. Record the layers such a "
            f"call runs: qkhooks.record(model, layers={ran}, ...) (or run the model's own forward); if the call is "
            "still running, read after it returns.")

    @property
    def config(self) -> dict[str, Any]:
        """The options that define what is recorded, encoded as in a run file's ``config``."""
        return {"modes": self.modes_kept, "layers": self.layers, "attention": [dataclasses.asdict(s) for s in self.attention_specs],
                "input": self.input,
                "augmented": bool(self._entry_spectrum is not None and self._entry_spectrum.layers[0].augmented)}

    def _last_batch(self, layer: Layer | None = None) -> BatchCapture:
        """The last complete batch, or a refusal that says why there is none (``layer``: checked first, by name)."""
        if layer is not None:
            resolve_layer(layer, self.layers, self.module_paths, "this recording")  # unknown layers first, named
        if self.last is None:
            if not self.keep_last:
                raise QKHooksError("this recording hands each batch to its sinks only (keep_last=False, as "
                                   "record_dataset's), so it keeps no last batch to read; record with keep_last=True.")
            if self._unfinished and self._begun_in_backward:  # round 33: the reason given was the one below
                raise QKHooksError("the recorded layers last ran inside backward(), recomputed by gradient "
                                   "checkpointing, which began a new batch that no forward completes; the recording "
                                   "frees its last batch as the next begins, so there is none to read. Read the "
                                   "batch before backward() (batch = run.last keeps it), or record with checkpointing "
                                   "off (model.set_grad_checkpointing(False)).")
            self._refuse_partial_call()  # a call that ran only some recorded layers: named, with the layers= it runs
            if self._unfinished:
                raise QKHooksError("the last forward did not complete (it raised, or it is still running), and a "
                                   "recording frees its last batch as the next forward begins, so there is no batch to "
                                   "read; run the model again (keep the batch you need: batch = run.last).")
            raise QKHooksError("nothing recorded yet: run the model inside the context first (a forward that runs "
                               "none of the recorded layers records nothing).")
        return self.last

    def _query(self, layer: Layer) -> torch.Tensor:
        """(B, H, K, N) query maps x·u_n of ``layer`` (block index or module path) for the last batch."""
        return self._last_batch(layer).query(layer)

    def _key(self, layer: Layer) -> torch.Tensor:
        """(B, H, K, N) key maps x·v_n of ``layer`` for the last batch."""
        return self._last_batch(layer).key(layer)

    def _inputs(self, layer: Layer) -> torch.Tensor:
        """(B, N, d) captured tokens of ``layer`` for the last batch (with ``keep_inputs=True``)."""
        return self._last_batch(layer).inputs(layer)

    def _spectrum(self, layer: Layer) -> LayerSpectrum:
        """The modes ``layer`` is projected on (its :class:`LayerSpectrum`, top ``modes`` of each head)."""
        index = resolve_layer(layer, self.layers, self.module_paths, "this recording")
        if self.qk_spectrum is None:
            raise QKHooksError("this recording has no modes (modes=None), so no spectrum; use qkhooks.spectrum(model).")
        return self.qk_spectrum[index]

    def attention(self, layer: Layer, kind: str = "rows") -> torch.Tensor:
        """Rebuilt attention of ``layer`` for the last batch: rows (B, H, T, N), pooled (B, H, T, M), full (B, H, N, N).

        (This name used to be the list of requested attention specs; that is :attr:`attention_specs` now.)
        """
        index = resolve_layer(layer, self.layers, self.module_paths, "this recording")
        self._check_kind(kind)
        require_layer(index, self.attention_layers(kind), f"{kind!r} attention", "this recording",
                      "choose its layers with the attention= option (e.g. 'full:5,11').")
        return self._last_batch(index).attention(index, kind)

    def _check_kind(self, kind: str) -> None:
        if kind not in self.attention_kinds:
            raise QKHooksError(f"this recording rebuilds no {kind!r} attention; it has {self.attention_kinds or 'none'} "
                               "(the attention= option of qkhooks.record).")

    # Each of these is a method now; the dict (QKSpectrum for spectrum) it used to be still answers ``[l]`` and the
    # dict methods, with a DeprecationWarning naming the call.
    query = property(lambda self: CallOrOld(self._query, lambda: self._old_dict("query"), "Recording.query[l]", "query(l)"),
                     doc=_query.__doc__)
    key = property(lambda self: CallOrOld(self._key, lambda: self._old_dict("key"), "Recording.key[l]", "key(l)"),
                   doc=_key.__doc__)
    inputs = property(lambda self: CallOrOld(self._inputs, lambda: self._old_dict("inputs"), "Recording.inputs[l]",
                                              "inputs(l)"), doc=_inputs.__doc__)
    spectrum = property(lambda self: CallOrOld(self._spectrum, lambda: self.qk_spectrum, "Recording.spectrum as a "
                                                "QKSpectrum", "spectrum(l) or recording.qk_spectrum"), doc=_spectrum.__doc__)

    def _old_dict(self, name: str) -> dict[int, torch.Tensor]:
        return {l: getattr(c, name) for l, c in self._last_batch().captures.items() if getattr(c, name) is not None}

    def bias(self, layer: int) -> torch.Tensor | None:
        """The additive position-only term (H, N, N) the model adds to layer ``layer``'s scaled logits (BEiT's
        relative-position table, shared or per layer), the same for every image: logits = scale · content + bias.
        None when the layer has none; a :class:`QKHooksError` when its additive term is a mask or image-dependent
        (that term enters the rebuilt maps, but is not a property of the layer). SAM/ViTDet's decomposed relative
        positions depend on the query, so they are no bias: :meth:`relative_term`."""
        if layer not in {s.layer for s in self.sites}:
            raise QKHooksError(f"layer {layer} is not recorded here; recorded layers: {[s.layer for s in self.sites]}.")
        value = self._bias.get(layer)
        if isinstance(value, str):
            raise QKHooksError(f"layer {layer} has no position-only additive term to give: {value}.")
        return value

    def geometry(self, layer: Layer) -> LayerGeometry:
        """``layer``'s grid, prefix tokens, query/key token counts, stage and windows in the last batch, read off
        its site (:func:`qkhooks.results.observe_geometry`) as the batch ran, the one its sinks read (or the
        caller's, ``meta["geometry"]``); a layer whose queries or keys are not the tokens handed to it (windows,
        pooled queries, reduced keys) needs modes (their maps give its token counts)."""
        index = resolve_layer(layer, self.layers, self.module_paths, "this recording")
        batch = self._last_batch(index)
        found = (batch.meta.get("geometry") or {}).get(index)
        if found is not None:
            return found
        cap = batch._capture(index)  # a recorded layer that did not run in that forward: refused, named
        if cap.query is None or cap.key is None:
            raise QKHooksError("this recording has no query/key maps to read the token counts off; record with modes=.")
        site = next(s for s in self.sites if s.layer == index)
        return observe_geometry(site, int(cap.query.shape[-1]), int(cap.key.shape[-1]))  # refuses, saying why

    def relative_term(self, layer: Layer) -> torch.Tensor:
        """The query-dependent relative-position term of ``layer`` for the last batch (SAM/ViTDet decomposed positions,
        q_i·R_h[h_i − h_j] + q_i·R_w[w_i − w_j]), shaped like its full maps: (B, H, N, N), or (B, nW, H, Nw, Nw) for a
        windowed block. logits = scale · content + relative term. It depends on the image (it is bilinear between the
        query and a relative-position table), so it is not a position-only :meth:`bias`; it is kept with the full maps
        (``attention="full"``), and run files store it as ``relative/L{l}`` (``run.relative_term(l)``)."""
        index = resolve_layer(layer, self.layers, self.module_paths, "this recording")
        site = next(s for s in self.sites if s.layer == index)
        if getattr(site, "relative", None) is None:
            raise QKHooksError(f"layer {index} ({site.path}) adds no query-dependent relative-position term; its "
                               "additive term, if any, is rec.bias(l).")
        require_layer(index, self.attention_layers("full"), "full attention", "this recording",
                      "the relative term is kept with the full maps: record the layer with attention='full'.")
        return self._last_batch(index).captures[index].relative  # type: ignore[return-value]

    def terms(self, layer: Layer) -> dict[str, torch.Tensor]:
        """The terms ``layer``'s maps combine, for the last batch, where a map is not one softmax
        (:mod:`qkhooks.models.two_softmax`): differential attention ``softmax1``, ``softmax2`` (B, H, N, N) and
        ``lambda`` (map = softmax1 − λ·softmax2); ConViT GPSA ``content`` (B, H, N, N), ``position`` (H, N, N) and
        ``gate`` (H,) (map = renormalised (1 − gate)·content + gate·position). Kept with the full maps."""
        index = resolve_layer(layer, self.layers, self.module_paths, "this recording")
        site = next(s for s in self.sites if s.layer == index)
        if not hasattr(site, "map_terms"):
            raise QKHooksError(f"layer {index} ({site.path}) has one softmax per map: it has no separate terms.")
        require_layer(index, self.attention_layers("full"), "full attention", "this recording",
                      "the terms are kept with the full maps: record the layer with attention='full'.")
        return dict(self._last_batch(index).captures[index].terms or {})

    def attention_maps(self, kind: str = "rows") -> dict[int, torch.Tensor]:
        """Deprecated: layer -> rebuilt attention of ``kind`` for the last batch; use ``attention(l, kind)``."""
        deprecated("Recording.attention_maps(kind)[l]", "Recording.attention(l, kind)")
        self._check_kind(kind)
        last = self._last_batch()
        return {l: last.attention(l, kind) for l in last.attention_layers(kind)}


@dataclasses.dataclass(eq=False)
class _LayerModes:
    """What one attention module's projectors were built from and the projectors themselves, kept while its
    weights are unchanged: ``spectrum`` (the full one), ``qk_solution`` (its q/k path's :class:`QKPathSolution`
    of every mode, solved once for all k; None until a k takes the q/k path) and ``built`` ((modes kept, q/k path
    allowed) -> (top spectrum, projector))."""

    spectrum: LayerSpectrum
    qk_solution: QKPathSolution | None = None
    built: dict[tuple[int | None, bool], tuple["_EntryModes", ModeProjector | QKPathProjector]] = dataclasses.field(
        default_factory=dict)


class _EntryModes:
    """One layer's top spectrum as its projectors were built from it: ``own``, a copy nobody is handed (what the
    recording projects with later and writes to a run file), and :meth:`handed`, a copy of it for the caller, made
    again once edited. Kept with the projectors (:class:`_LayerModes`), so record() entered per batch copies
    nothing."""

    __slots__ = ("own", "_handed", "_stamps")

    def __init__(self, own: LayerSpectrum):
        self.own = own
        self._handed: LayerSpectrum | None = None
        self._stamps: tuple = ()

    def handed(self) -> LayerSpectrum:
        """A copy of :attr:`own` for the caller: the one handed before, unless it was edited since."""
        if self._handed is None or not unedited(self._handed, self._stamps):
            self._handed = spectrum_copy(self.own)
            self._stamps = edit_stamps(self._handed)
        return self._handed


# The dtypes whose rounding QK_PATH_MAX_AMPLIFICATION was set for: the q/k path's input must be one of them.
_FULL_PRECISION = (torch.float32, torch.float64)


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast runs Linear layers in on ``device_type`` now, None when it is off (or this torch cannot
    say: before 2.4; each batch's q/k dtype still decides)."""
    try:
        return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    except (AttributeError, TypeError, RuntimeError):
        return None


def _compute_dtype(value: Any) -> torch.dtype | None:
    """``compute_dtype`` as one of torch's four float dtypes (a name such as ``"float32"`` read as torch's), or None.
    Others are refused: the tokens cast to int32 gave all-zero maps without a word (review r34); complex gave complex
    maps, float8 would round them to 3 bits."""
    if value is None:
        return None
    dtype = getattr(torch, value.removeprefix("torch."), None) if isinstance(value, str) else value
    if dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise QKHooksError(f"compute_dtype must be one of torch's float dtypes (torch.float32, torch.float64, "
                           f"torch.bfloat16, torch.float16) or its name, got {value!r}: the modes are projections of "
                           "the tokens, and another dtype would truncate or reinterpret them. Leave it out to project "
                           "in the tokens' own dtype.")
    return dtype


def _full_precision_qk(site: AttentionSite, compute_dtype: torch.dtype | None) -> bool:
    """Whether ``site``'s q/k Linear outputs will be float32 or float64 and the maps computed in such a dtype, as far
    as entering record() can tell (the weights' dtype, autocast where the weights are, ``compute_dtype``): only then
    does a layer plan the q/k path. Each batch checks the tensors themselves (``Recording._qk_path_serves``)."""
    if compute_dtype is not None and compute_dtype not in _FULL_PRECISION:
        return False
    params = [p for module in site.qk_modules for p in module.parameters()]
    if any(p.dtype not in _FULL_PRECISION for p in params):
        return False
    return not params or _autocast_dtype(params[0].device.type) in (None, *_FULL_PRECISION)


# Attention module -> its _LayerModes. layer_spectrum returns the very same spectrum object while the weights are
# unchanged (identity, version and a bit-for-bit copy checked), so that object's identity vouches for the weights the
# projectors were built from: record() entered per batch builds no projector again. Weak keys: a deleted model frees
# its entries.
_LAYER_MODES: "weakref.WeakKeyDictionary[nn.Module, _LayerModes]" = weakref.WeakKeyDictionary()


def _layer_modes(site: AttentionSite, given: LayerSpectrum | None, k: int | None, augmented: bool,
                 qk_path: bool, vouched: bool = False) -> tuple[_EntryModes, ModeProjector | QKPathProjector]:
    """The top-``k`` spectrum of ``site`` (a copy of its own, :class:`_EntryModes`: the spectrum given, or the
    cache's, is the caller's to edit) and the projector of its maps, built from that copy: from the model's own q/k Linear outputs
    where allowed and as accurate as from x (the adapter names them and :func:`qkhooks.projector.qk_path_check`: the
    bias-free spectrum, every kept mode's error amplification small), else from x.

    Reused from :data:`_LAYER_MODES` when the spectrum is the cached one of unchanged weights; a spectrum the
    caller gives (``spectrum=``) is not vouched for by the cache, so its projectors are built each time, and unless
    it is the cache's own of these weights (``vouched``) it is checked against them (:func:`foreign_spectrum`).
    """
    if given is not None and bool(given.augmented) != bool(augmented):  # round 33: the given one's form was used silently
        raise QKHooksError(
            f"layer {site.layer} ({site.path}): record(augmented={augmented}) asks for the "
            f"{'bias-augmented' if augmented else 'bias-free'} form, but the spectrum given (spectrum=) is of the "
            f"{'bias-augmented' if given.augmented else 'bias-free'} one, so its modes would not be the form asked for. "
            f"Pass qkhooks.spectrum(model, augmented={augmented}), or leave spectrum= out.")
    if given is not None and not vouched:
        foreign = foreign_spectrum(site, given)
        if foreign is not None:
            raise QKHooksError(
                f"layer {site.layer} ({site.path}): the spectrum given (spectrum=) is not that of this layer's weights: "
                f"{foreign}. It belongs to other weights (a checkpoint before a training step, another model), so its "
                "maps would be projections on another model's modes. Pass qkhooks.spectrum(model) of these weights, "
                "or leave spectrum= out: record() takes it from a cache that computes it once per set of weights; to "
                "project on other weights' modes on purpose, add spectrum_of_other_weights=True.")
    full = given if given is not None else layer_spectrum(site, augmented)
    cached = given is None and site.module is not None
    entry = _LAYER_MODES.get(site.module) if cached else None
    if entry is None or entry.spectrum is not full:
        entry = _LayerModes(full)
        if cached:
            _LAYER_MODES[site.module] = entry
    built = entry.built.get((k, qk_path))
    if built is None:
        spec = spectrum_copy(full.top(k))  # the cache's arrays are handed out too (qkhooks.spectrum(model))
        projector: ModeProjector | QKPathProjector | None = None
        if qk_path and site.qk_modules and not spec.augmented:
            # one solve of every mode per layer and weights, its leading k sliced for each k recorded
            if entry.qk_solution is None:
                entry.qk_solution = QKPathSolution(full, site.weights())
            check = entry.qk_solution.check(k)
            if check.fits:
                projector = QKPathProjector(spec, entry.qk_solution.weights, (check.a, check.c))
        built = entry.built[(k, qk_path)] = (_EntryModes(spec),
                                             projector if projector is not None else ModeProjector(spec))
    return built


# The sites of each recorded model (find_sites walks the module tree several times: ~9 of the ~12 ms that entering
# record() cost on ViT-S), kept while the model's structure is unchanged. Weak keys: a deleted model frees its entry.
# The third item: what else is a function of the key alone, found once (:func:`_maybe_compiled`).
_SITES: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple, list[tuple[AttentionSite, _CopyPlan]], dict[str, Any]]]" = (
    weakref.WeakKeyDictionary())
_SETTINGS = (bool, int, float, str, type(None))
# torch's own per-module registries (parameters, buffers, children, hooks: dicts, which the key does not read), skipped
# by name: about 14 of a module's ~30 attributes, and a third of the key's time
_TORCH_REGISTRIES = frozenset(name for name, value in vars(nn.Module()).items() if isinstance(value, dict))


def structure_key(model: nn.Module) -> tuple:
    """What the adapters read when they find the sites: every module (identity, class), each one's plain settings
    (``fused_attn``, ``num_heads``, ``training``, ...) and the identity of any other attribute (a replaced rotary
    table or norm), a Hugging Face config's plain settings (``_attn_implementation`` is changed in place), and the
    adapter registry. ~1 ms on ViT-S."""
    key: list[Any] = [adapter_ids()]
    append = key.append  # one pass over each module's attributes (items: no second lookup, no list of names)
    for module in model.modules():
        append((id(module), type(module)))
        for name, value in module.__dict__.items():
            if name in _TORCH_REGISTRIES:
                continue
            if isinstance(value, _SETTINGS):
                append((name, value))
            elif not isinstance(value, dict):  # torch's own registries (_modules, hooks, ...) are walked or not read
                append((name, id(value)))
                if type(value).__name__.endswith("Config"):
                    append(tuple((k, v) for k, v in vars(value).items() if isinstance(v, _SETTINGS)))
    return tuple(key)


def modes_kept(modes: int | None | str, counts: Sequence[int], sites: Sequence[AttentionSite],
               stacklevel: int = 2, given_tops: Sequence[int] = ()) -> int | None | str:
    """``modes`` (an int) when some recorded head has that many modes, else the most any has, with a warning: a
    head of dimension d_k has at most d_k modes, so ``--modes 65`` on 64-dim heads records 64, and says so (a
    run's config stores what was kept). The default (:data:`~qkhooks.options.DEFAULT_MODES`) is cut without a word:
    nobody asked for its number. None passes through, and ``"all"`` too unless a spectrum given (``spectrum=``) was
    truncated (``given_tops``: its modes a head, ``.top(k)``): then what it keeps is recorded, and said, as for an
    int, naming the spectrum given rather than the heads."""
    if modes == "all" and given_tops and counts:
        most = max(counts)
        warnings.warn(f"modes='all' with a spectrum given (spectrum=) truncated to the top {_tops(given_tops)} modes "
                      f"of each head (.top(k)): those are recorded, not all (the config of the recording or run file "
                      f"says modes={most}); pass the whole spectrum (qkhooks.spectrum(model)) for every mode.",
                      stacklevel=stacklevel)
        return most
    if not isinstance(modes, int) or not counts or modes <= max(counts):
        return modes
    most = max(counts)
    if isinstance(modes, DefaultModes):
        return most
    if given_tops:
        warnings.warn(f"modes={modes} is more than the spectrum given (spectrum=) keeps: it is truncated to the top "
                      f"{_tops(given_tops)} modes of each head (.top(k)), so {most} are recorded (the config of the "
                      f"recording or run file says modes={most}); ask for modes <= {most}, or pass a spectrum with more "
                      "modes (qkhooks.spectrum(model)).", stacklevel=stacklevel)
        return most
    dims = sorted({s.head_dim for s in sites if getattr(s, "head_dim", None)})
    heads = f"its {'/'.join(map(str, dims))}-dim heads have" if dims else "its heads have"
    warnings.warn(f"modes={modes} is more than this model has: {heads} at most {most} modes each, so all {most} are "
                  f"recorded (the config of the recording or run file says modes={most}); ask for modes <= {most}, or 'all' "
                  "(--modes all).",
                  stacklevel=stacklevel)
    return most


def _refuse_empty(shape: tuple[int, ...], site: AttentionSite | None = None) -> None:
    """Refuse a batch of no images (before any map is computed: the reshapes further on fail without a word on why)."""
    where = f"layer {site.layer} ({site.path}) was handed tokens of shape {shape}" if site else f"an input of shape {shape}"
    raise QKHooksError(f"the batch is empty ({where}: 0 images), so there is nothing to record; skip empty batches "
                       "before calling the model (a filter that left none, a slice past the end).")


def _tops(tops: Sequence[int]) -> str:
    return "/".join(map(str, sorted(set(tops))))


# Float attributes through which modules drop at random while training: DropPath's ``drop_prob``, Hugging Face
# attention's ``attention_dropout`` / ``dropout_prob`` (CLIP's ``dropout``), passed to the attention call as dropout_p.
_DROP_ATTRS = ("drop_prob", "dropout_prob", "attention_dropout", "attention_probs_dropout_prob", "dropout", "dropout_p",
               "attn_drop")


def active_dropout(model: nn.Module) -> list[str]:
    """``"path (Class p=0.3)"`` for every module of ``model`` that drops at random as it is set now: in training mode,
    with dropout, attention dropout or stochastic depth (drop-path) of probability > 0. Empty in eval mode."""
    found = []
    for name, module in model.named_modules():
        if not module.training:
            continue
        if isinstance(module, nn.modules.dropout._DropoutNd):
            p = module.p
        else:
            own = vars(module)
            # "prob": timm's PatchDropout, which keeps a random subset of the patches (round 33)
            names = _DROP_ATTRS + (("p", "prob") if any(w in type(module).__name__.lower() for w in ("drop", "stochastic"))
                                   else ())
            p = max((float(own[a]) for a in names if isinstance(own.get(a), float)), default=0.0)
        if p > 0:
            found.append(f"{name or '(model)'} ({type(module).__name__} p={p:g})")
    return found


def _warn_active_dropout(model: nn.Module) -> None:
    """Recording measures the model as it runs: in training mode with dropout or drop-path, that is a random model."""
    found = active_dropout(model)
    if found:
        more = f" and {len(found) - 4} more" if len(found) > 4 else ""
        warnings.warn(
            f"{type(model).__name__} is in training mode with dropout or stochastic depth active ({', '.join(found[:4])}"
            f"{more}): its attention and outputs are random, so identical images give different maps and "
            "attention. Call model.eval() before recording (and model.train() after, to go on training); "
            "record_dataset does both itself.", stacklevel=4)


def model_sites(model: nn.Module, skip_unmodelled: bool = False) -> list[AttentionSite]:
    """``find_sites(model, skip_unmodelled=skip_unmodelled)``, every site, searched once per model while
    :func:`structure_key` is unchanged; every recording gets its own copies of the sites (they hold the call being
    recorded)."""
    key = (structure_key(model), skip_unmodelled)
    hit = _SITES.get(model)
    if hit is None or hit[0] != key:
        found = find_sites(model, skip_unmodelled=skip_unmodelled)
        plans = [_copy_plan(site) for site in found]
        if any(plan is None for plan in plans):  # a site a copy cannot be cut loose from: never shared
            _SITES.pop(model, None)
            return found
        hit = _SITES[model] = (key, list(zip(found, plans)), {})
    return [plan.copy(site) for site, plan in hit[1]]


def _maybe_compiled(model: nn.Module) -> bool:
    """Whether some module of ``model`` may be compiled by TorchDynamo, so that :func:`refuse_compiled` must look
    where qkhooks hooks (a walk of the module tree, ~0.35 ms of a ViT-S entry). False only where the cached sites'
    entry, whose structure key :func:`model_sites` has just checked, found none: each module's class (a compiled
    wrapper) and ``_compiled_call_impl`` (``module.compile()``) are in that key, so a compile changes the key."""
    hit = _SITES.get(model)
    if hit is None:
        return True
    if "compiled" not in hit[2]:
        hit[2]["compiled"] = any(compiled_by_dynamo(module) is not None for module in model.modules())
    return hit[2]["compiled"]


@dataclasses.dataclass(frozen=True)
class _CopyPlan:
    """How to copy a cached site (which never records: it holds what the search found, so the plan made once from
    it holds for every copy): every attribute kept (adapters set some that are not dataclass fields), the methods
    of the original bound to the copy (a HaloNet site keeps its own ``haloed_keys`` as ``key_tokens``), the
    containers copied, anything else shared."""

    methods: frozenset[str]
    containers: frozenset[str]

    def copy(self, site: AttentionSite) -> AttentionSite:
        copy = dataclasses.replace(site)
        for name, value in vars(site).items():
            if name in self.methods:
                value = value.__func__.__get__(copy)
            elif name in self.containers:
                value = type(value)(value)
            setattr(copy, name, value)
        return copy


def _copy_plan(site: AttentionSite) -> _CopyPlan | None:
    """The :class:`_CopyPlan` of ``site``, for copies that share no call state with each other; None where anything
    the site holds, other than its own methods, leads back to it or its containers (a closure over it, a helper
    object keeping its bound method), which no copy can redirect."""
    containers = {name: value for name, value in vars(site).items() if isinstance(value, (dict, list, set))}
    originals = {id(site), *map(id, containers.values())}
    methods = set()
    for name, value in vars(site).items():
        if inspect.ismethod(value) and value.__self__ is site:
            methods.add(name)
        elif _links_back(gc.get_referents(value) if name in containers else [value], originals):
            return None
    return _CopyPlan(frozenset(methods), frozenset(containers))


# What a site's attributes may hold that never leads back to a site: values, tensors, the model's modules, classes.
_LEAVES = (str, bytes, int, float, complex, bool, type(None), torch.Tensor, nn.Module, type, types.ModuleType,
           types.CodeType, torch.dtype, torch.device, torch.Size)


def _links_back(values: Iterable[Any], originals: set[int]) -> bool:
    """Whether any of ``values`` reaches an object in ``originals`` (ids) through closures, defaults, bound methods,
    containers or object attributes (a function's module globals are not followed). A graph too large to walk
    (over 10,000 objects) counts as reaching them: such a site is searched afresh, never shared."""
    stack, seen = list(values), set()
    while stack:
        value = stack.pop()
        if id(value) in originals:
            return True
        if isinstance(value, _LEAVES) or id(value) in seen:
            continue
        seen.add(id(value))
        if len(seen) > 10_000:
            return True
        if isinstance(value, types.FunctionType):
            stack.extend(gc.get_referents(*(value.__closure__ or ())))
            stack.extend([*(value.__defaults__ or ()), *(value.__kwdefaults__ or {}).values()])
        else:
            stack.extend(gc.get_referents(value))
    return False


def _joined_calls(caps: list[LayerCapture]) -> LayerCapture:
    """One capture of T calls of a layer, each over the same B images: every tensor (B, ...) -> (B·T, ...), image b's
    calls together (b·T + t), the order in which a model that runs its frames as images lays them out."""
    def join(parts: list[Any]) -> Any:
        return None if parts[0] is None else torch.stack(parts, dim=1).flatten(0, 1)

    first = caps[0]
    return LayerCapture(first.layer, sum(c.batch_size for c in caps), inputs=join([c.inputs for c in caps]),
                        query=join([c.query for c in caps]), key=join([c.key for c in caps]),
                        attention={kind: join([c.attention.get(kind) for c in caps]) for kind in first.attention},
                        relative=join([c.relative for c in caps]))


def refuse_maps_only_modes(sites: Sequence[AttentionSite]) -> None:
    """Modes asked of a layer whose q or k is made inside the module (no W_q^T W_k of its tokens): refused, naming it."""
    for site in sites:
        why = site.modes_refusal()
        if why:
            raise QKHooksError(why)


def _reduced_keys(site: AttentionSite, x: torch.Tensor, input: str, dtype: torch.dtype | None) -> torch.Tensor:
    """The tokens a reduced-key layer feeds to W_k in this call (only the normed input has them)."""
    if input != "normed":
        raise QKHooksError(f"{site.path}: its keys are spatially reduced tokens, which have no residual-stream "
                           "counterpart; record it with input='normed'.")
    keys = site.keys_for(x).detach()
    return keys if dtype is None else keys.to(dtype)


P = ParamSpec("P")
R = TypeVar("R")


def _released() -> Any:
    raise QKHooksError("this recording has ended and released the model; start a new qkhooks.record(...).")


class _ReleasedNorm:
    """A released site's q/k normalisation: what asks whether the layer has one reads the same, but its norm modules
    (a :class:`qkhooks.models.qknorm.QKNorm` holds them) are forgotten, so a finished recording keeps no model alive."""

    def __call__(self, q: Any, k: Any) -> Any:
        return _released()

    def normalised_form(self, site: Any) -> Any:
        return _released()


_BATCH_METADATA = {"query_tokens": "tokens", "pool_masks": "masks"}
"""What a recording takes per batch, not per recording (name -> the variable the hint names it by)."""


def _per_batch_hint(names: Sequence[str]) -> str:
    """How to hand batch metadata (``query_tokens``, ``pool_masks``) to a live recording."""
    given = ", ".join(f"{name!r}: {_BATCH_METADATA[name]}" for name in names)
    keywords = ", ".join(f"{name}={_BATCH_METADATA[name]}" for name in names)
    return (f"{' and '.join(names)} belong{'s' * (len(names) == 1)} to each batch: inside the `with`, call "
            f"`run(images, meta={{{given}}})` or `run.set_batch({keywords})` before `model(images)` (README: "
            "\"Choosing query tokens and pooled masks\").")


_MODEL_INPUT = ("it takes the model's input, a float tensor (B, 3, H, W) preprocessed as the model expects. For photos "
                "(PIL images): torch.stack([loaded.image_config(img) for img in photos]), loaded = qkhooks.load_model("
                "...) (or qkhooks.data.ImageConfig.from_timm(model) / .from_hf(processor.to_dict())).")
"""What a recording takes, and how photos become it (the refusal of photos says it)."""


def _photos_not_input(value: Any) -> bool:
    """Whether a recording's first argument is photos rather than a model's input: PIL images or numpy arrays (or a
    list of either), which a model fails on deep inside. Other values (tensors of any dtype, integer token ids of a
    text tower, a list of tensors) are the model's business."""
    items = value[:1] if isinstance(value, (list, tuple)) else [value]
    return any(type(v).__module__.split(".")[0] in ("numpy", "PIL") for v in items)


def _options_of(cls: Callable[P, R]) -> Callable[[Callable[..., R]], Callable[P, R]]:
    """``cls``'s parameters for a function that hands its arguments on to ``cls``, so they are written once: ``help()``,
    ``inspect.signature`` and type checkers show them, and an unknown keyword is refused with a QKHooksError listing
    the options (Python's TypeError names only the bad one)."""
    signature = inspect.signature(cls)
    options = [name for name, p in signature.parameters.items() if p.kind is p.KEYWORD_ONLY]

    def wrap(fn: Callable[..., R]) -> Callable[P, R]:
        @functools.wraps(fn)
        def checked(*args: Any, **kwargs: Any) -> R:
            unknown = sorted(set(kwargs) - set(signature.parameters))
            if unknown:
                per_batch = [name for name in unknown if name in _BATCH_METADATA]
                raise unknown_options(fn.__name__, unknown, options, _per_batch_hint(per_batch) if per_batch else "")
            return fn(*args, **kwargs)

        checked.__signature__ = signature.replace(  # type: ignore[attr-defined]
            return_annotation=inspect.signature(fn).return_annotation)
        return checked

    return wrap


@_options_of(Recording)
def record(model: nn.Module, **options: Any) -> Recording:
    """Hook ``model`` for query-key analysis; use as a context manager.

    Args:
        model: an unmodified timm or Hugging Face ViT (or any model with a registered adapter), or the
            :class:`LoadedModel` that :func:`load_model` returns.
        modes: top modes per head to project onto (default 16), ``"all"``, or None for no projection.
        layers: which blocks to record (None or "all": every one): block indices, negative ones counting from the
            last block (``[-1]``), a string such as ``"0,3,5-7,-1"``, or the attention modules' paths
            (``["blocks.5.attn"]``).
        attention: ``"rows"``, ``"pooled"``, ``"full"``, an :class:`AttentionSpec`, or a list of them.
        input: ``"normed"`` (default, the exact tensor entering W_q/W_k: the modes then sum to the logits)
            or ``"residual"`` (the residual stream entering the block, as in Pan et al.'s figures).
        augmented: fold biases into the modes through x -> [x; 1].
        keep_inputs: keep the captured tokens (B, N, d) per layer for sinks that need them (a sink with
            ``take_inputs`` gets each layer's tokens in its hook without this: :class:`Sink`).
        keep_last: keep the last batch as ``run.last``, read by ``run.query(l)`` and the like, until the next forward
            begins (default). False hands each batch to the sinks only, so its arrays are freed as soon as the sinks
            are done (``record_dataset``).
        sinks: objects with ``update(batch)`` fed after each complete forward (a run writer, reducers).
        spectrum: a precomputed :class:`QKSpectrum` to reuse: checked to be the spectrum of the layers' weights as they
            are (``qkhooks.spectrum(model)``: no other check; a run file's: U^T W_q^T W_k V = diag(S), no SVD), else
            refused.
        spectrum_of_other_weights: take ``spectrum`` as it is although it is not that of these weights: the maps are
            then the tokens' projections on other weights' modes (a base model's, for a fine-tuned one), and
            ``run.spectrum(l)`` reports those modes.
        sites: the model's attention sites, when already found (:func:`qkhooks.sites`); ``layers`` selects among them.
        compute_dtype: dtype for projections, a floating torch dtype or its name (default: the tokens' own dtype).
        qk_path: take the modes from the model's own q/k Linear outputs where the adapter names them (default;
            the same maps to float rounding at a d_k/d of the cost: u_n, v_n lie in the row spaces of W_q, W_k).
            Not used for ``input="residual"``, augmented spectra, a layer where some kept mode's error
            amplification is large (an ill-conditioned W_q or W_k: :func:`qkhooks.projector.qk_path_check`), or a
            batch whose q or k comes out below float32 (a bfloat16/float16 model, autocast; or a ``compute_dtype``
            below float32), whose maps come from x; ``run.mode_source`` says which (for the last batch). The full maps are then rebuilt from those q and k too
            (no second projection). False: always use the tokens x.
        outputs: ``"unchanged"`` (default): the model's attention runs as it is (fused or not) and its outputs are
            bit-identical; full maps are rebuilt beside it, so q·kᵀ and the softmax run twice. ``"eager"`` (with
            full maps): each layer with full maps computes its attention once, eagerly: its call of
            ``scaled_dot_product_attention`` is replaced by the recorded maps @ v (the exact q, k, v, mask and scale
            the model passes), so the outputs equal the model's *eager* forward to float rounding, not the fused
            one bit for bit, and the maps cost about what timm's ``AttentionExtract`` pays. A layer that runs
            its own eager attention hands over the softmax it computes. Refused, naming the module, where this
            cannot be exact (attention dropout in training mode, a call that does not match the adapter).
        skip_unmodelled: record a model that also holds attention qkhooks does not model (DaViT's channel attention,
            a softmax over channels) on the sites it models exactly, leaving the others out, each named with its
            reason in ``Recording.left_out`` (and in a run file). Default False: such a model is refused, the error
            naming the module. Layer indices number the recorded sites in forward order.

    Returns:
        A :class:`Recording`; inside ``with``, run the model as usual (or call ``run(images, ids=...)``), then read
        ``run.query(l)``, ``run.attention(l, kind)``, ``run.spectrum(l)`` (the vocabulary of :mod:`qkhooks.access`).
    """
    return Recording(model, **options)
