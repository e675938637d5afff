"""Live results: what one forward pass produced (:class:`BatchCapture`, one :class:`LayerCapture` per layer), read
in the vocabulary of :mod:`qkhooks.access`, and the shims that keep the spellings it replaced working, with a
DeprecationWarning naming the new call.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import warnings
from typing import Any, Callable

import torch

from qkhooks._version import REMOVED_IN
from qkhooks.access import Layer, LayerGeometry, require_layer, resolve_layer
from qkhooks.errors import QKHooksError
from qkhooks.models.base import conv_output_size
from qkhooks.spectrum import LayerSpectrum, QKSpectrum

__all__ = ["LayerCapture", "BatchCapture", "CallOrOld", "deprecated", "observe_geometry"]


@dataclasses.dataclass
class LayerCapture:
    """What one layer produced for one batch. Tensors stay on the model's device.

    Attributes:
        inputs: (B, N, d) the tokens the modes were taken of (only kept when asked for).
        query, key: (B, H, K, N) query maps x·u_n and key maps x·v_n (None without modes).
        attention: kind -> tensor: ``rows`` (B, H, T, N), ``pooled`` (B, H, T, M), ``full`` (B, H, N, N).
        relative: the query-dependent relative-position term (SAM/ViTDet), shaped like the ``full`` maps, kept with
            them (None: no such term, or no full maps recorded).
        terms: name -> tensor, the softmax terms a two-softmax map combines (differential attention, ConViT GPSA),
            kept with the full maps (None: one softmax per map, or no full maps).
    """

    layer: int
    batch_size: int
    inputs: torch.Tensor | None = None
    query: torch.Tensor | None = None
    key: torch.Tensor | None = None
    attention: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    relative: torch.Tensor | None = None
    terms: dict[str, torch.Tensor] | None = None  # zoo11-maps: a two-softmax map's terms (Recording.terms)


def observe_geometry(site: Any, query_tokens: int, key_tokens: int,
                     image_size: tuple[int, int] | None = None) -> LayerGeometry:
    """The geometry of ``site``'s layer in the call just recorded (its maps had ``query_tokens`` queries and
    ``key_tokens`` keys, the input image ``image_size``), read from the site, never guessed: a grid the site cannot
    tell is None (the analyses then refuse the layer, naming it).

    Query grid: the site's patch size on this image when its tokens fill it, else the site's own grid for that many
    tokens (windowed sites: the grid their block was called with). Key grid of a spatially reduced layer: the
    query grid through the module's own reduction (PVT-v2-linear's adaptive pool, then the conv's kernel, stride,
    padding and dilation, as PVT, Twins, Segformer and GLPN reduce); None where the module has no such conv or its
    grid does not have ``key_tokens`` tokens.
    """
    prefix = int(site.num_prefix_tokens)
    grid = None
    if image_size is not None and site.patch_size is not None:
        g = site.grid_for_image(*image_size)
        grid = g if g[0] * g[1] == query_tokens - prefix else None
    if grid is None:
        try:
            grid = tuple(int(v) for v in site.grid_for(query_tokens))
        except QKHooksError:
            grid = None
        if grid is not None and grid[0] * grid[1] != query_tokens - prefix:
            grid = None
    key_grid, key_prefix = grid, prefix
    if site.key_tokens is not None and key_tokens != query_tokens:
        own_rule = getattr(site, "reduced_key_grid", None)  # sites whose keys are not a plain grid / ratio say theirs
        key_prefix, key_grid = 0, own_rule(grid, key_tokens) if own_rule else _reduced_grid(site.module, grid, key_tokens)
    window = None
    if hasattr(site, "window_index"):  # a windowed site (qkhooks.models.windows.WindowSite), in the call just made
        if getattr(site, "geometry", None) is None:
            raise QKHooksError(f"{site.path} ({type(site).__name__}) groups its tokens in its own way (TimeSformer's "
                               "time or space groups), not in windows of an image grid, so it has no layer geometry.")
        size, shift = site.geometry()
        window = {"size": [int(v) for v in size], "shift": [int(v) for v in shift],
                  "windows": int(site.window_index().shape[0]), "pad_first": bool(site.pad_first)}
    heads = int(site.map_heads()) if hasattr(site, "map_heads") else int(site.num_heads)  # zoo13: differential maps
    return LayerGeometry(int(site.layer), None if grid is None else (int(grid[0]), int(grid[1])), prefix,
                         int(query_tokens), int(key_tokens), key_grid, key_prefix, heads,
                         int(site.head_dim), str(site.stage), window, bool(site.class_attention),
                         0 if heads == int(site.num_heads) else int(site.num_heads))


# children that hold the spatial reduction of the keys (PVT / Twins / GLPN ``sr``, PVT-v2 ``spatial_reduction``,
# PVT ``sequence_reduction``, Segformer's ``sequence_reduction`` module around its conv)
_REDUCTIONS = ("sr", "spatial_reduction", "sequence_reduction")


def _reduced_grid(module: torch.nn.Module, grid: tuple[int, int] | None, tokens: int) -> tuple[int, int] | None:
    """The key grid the module's own reduction makes of the query grid, or None when it cannot be read off it."""
    if grid is None:
        return None
    h, w = grid
    pool = getattr(module, "pool", None)
    if isinstance(pool, torch.nn.AdaptiveAvgPool2d):
        size = pool.output_size
        h, w = (size, size) if isinstance(size, int) else (size[0] or h, size[1] or w)
    holder = next((getattr(module, n) for n in _REDUCTIONS if isinstance(getattr(module, n, None), torch.nn.Module)), None)
    conv = next((m for m in holder.modules() if isinstance(m, torch.nn.Conv2d)), None) if holder is not None else None
    if conv is None:
        return None
    h, w = conv_output_size(h, conv, 0), conv_output_size(w, conv, 1)
    return (h, w) if h * w == tokens else None


def deprecated(old: str, new: str, stacklevel: int = 3) -> None:
    """Warn that ``old`` is replaced by ``new`` and goes in ``_version.REMOVED_IN``, at the line of the caller's caller
    (``stacklevel``)."""
    warnings.warn(f"{old} is deprecated; use {new}. The old spelling is removed in qkhooks {REMOVED_IN}.",
                  DeprecationWarning, stacklevel=stacklevel)


class _LayerList(list):
    """``BatchCapture.layers``: the recorded layers. The dict it used to be (layer -> LayerCapture) still answers
    ``items``, ``values``, ``keys`` and ``get``, with a DeprecationWarning pointing at ``batch.captures``."""

    def __init__(self, captures: dict[int, LayerCapture]):
        super().__init__(sorted(captures))
        self._captures = captures

    def _old(self) -> dict[int, LayerCapture]:
        deprecated("batch.layers as a dict of LayerCapture", "batch.captures (batch.layers is the list of layers)", 4)
        return self._captures

    def __getitem__(self, index: Any) -> Any:
        """The list's item; an index past its end that is a recorded layer was the old dict's key: say so."""
        try:
            return super().__getitem__(index)
        except IndexError:
            if isinstance(index, int) and index in self._captures:
                raise IndexError(f"batch.layers is the list of recorded layers {list(self)} (position {index} is past "
                                 f"its end); the LayerCapture of layer {index} is batch.captures[{index}].") from None
            raise

    def items(self) -> Any:
        return self._old().items()

    def values(self) -> Any:
        return self._old().values()

    def keys(self) -> Any:
        return self._old().keys()

    def get(self, layer: int, default: Any = None) -> Any:
        return self._old().get(layer, default)


class BatchCapture:
    """One forward pass: the images' ids, the per-batch metadata you passed (with the model's
    ``num_prefix_tokens`` and patch ``grid`` added where you gave none), and each layer's capture.

    ``offset`` is the running index of the batch's first image (images in earlier complete batches), so
    streaming statistics can name images by a global index. ``captures`` maps layer -> :class:`LayerCapture`;
    the results are read in the vocabulary of :mod:`qkhooks.access` (``batch.query(l)``, ...), as tensors on the
    model's device. ``module_paths`` and ``qk_spectrum`` come from the recording (empty/None when built by hand).
    """

    def __init__(
        self,
        ids: list[str],
        meta: dict[str, Any],
        captures: dict[int, LayerCapture] | None = None,
        offset: int = 0,
        *,
        module_paths: dict[int, str] | None = None,
        qk_spectrum: QKSpectrum | None = None,
        position_bias: dict[int, Any] | None = None,
        masked: set[int] | None = None,
        layers: dict[int, LayerCapture] | None = None,
    ):
        if layers is not None:
            deprecated("BatchCapture(layers=...)", "BatchCapture(captures=...)")
            captures = layers if captures is None else captures
        self.ids = ids
        self.meta = meta
        self.captures: dict[int, LayerCapture] = {} if captures is None else captures
        self.offset = offset
        self.module_paths: dict[int, str] = dict(module_paths or {})
        self.qk_spectrum = qk_spectrum
        self.position_bias: dict[int, Any] = {} if position_bias is None else position_bias
        """Layer -> (H, N, N) position-only additive term of this batch (relative-position tables)."""
        self.masked: set[int] = set() if masked is None else masked
        """Layers whose additive term was a mask or image-dependent (never stored as a position term)."""

    def statics(self) -> dict[str, Any]:
        """Run-file datasets written once per run, not per image: ``bias/L3`` (H, N, N), each layer's position-only
        additive term (relative-position tables; the same for every image). Masks are never among them."""
        out: dict[str, Any] = {f"bias/L{layer}": bias.clone() for layer, bias in sorted(self.position_bias.items())}
        for layer, cap in sorted(self.captures.items()):  # zoo12: a two-softmax layer's terms that are not per image
            for name, term in (cap.terms or {}).items():
                if not _per_image_term(term):  # GPSA's position softmax (H, N, N) and gate (H,), differential λ
                    out[f"terms/L{layer}/{name}"] = term.detach().clone()
        return out

    def __repr__(self) -> str:
        more = "..." if len(self.ids) > 3 else ""
        return f"BatchCapture(n={self.n}, layers={list(self.layers)}, offset={self.offset}, ids={self.ids[:3]}{more})"

    @property
    def n(self) -> int:
        """Images in the batch."""
        return next(iter(self.captures.values())).batch_size if self.captures else 0

    @property
    def size(self) -> int:
        """Images in the batch (the same as :attr:`n`)."""
        return self.n

    # ------------------------------------------------------------ the shared vocabulary (qkhooks.access)
    @property
    def layers(self) -> list[int]:
        """The recorded layers (block indices), sorted."""
        return _LayerList(self.captures)

    @property
    def mode_layers(self) -> list[int]:
        """Layers with query/key maps."""
        return sorted(l for l, c in self.captures.items() if c.query is not None)

    @property
    def attention_kinds(self) -> list[str]:
        """Kinds of rebuilt attention in this batch."""
        return sorted({kind for c in self.captures.values() for kind in c.attention})

    def attention_layers(self, kind: str = "rows") -> list[int]:
        """Layers with rebuilt attention of ``kind``."""
        return sorted(l for l, c in self.captures.items() if kind in c.attention)

    def _capture(self, layer: Layer) -> LayerCapture:
        return self.captures[resolve_layer(layer, sorted(self.captures), self.module_paths, "this batch")]

    def query(self, layer: Layer) -> torch.Tensor:
        """(B, H, K, N) query maps x·u_n of ``layer`` (block index or module path)."""
        cap = self._capture(layer)
        require_layer(cap.layer, self.mode_layers, "query/key maps", "this batch", "record with modes= to get them.")
        return cap.query  # type: ignore[return-value]

    def key(self, layer: Layer) -> torch.Tensor:
        """(B, H, K, N) key maps x·v_n of ``layer``."""
        cap = self._capture(layer)
        require_layer(cap.layer, self.mode_layers, "query/key maps", "this batch", "record with modes= to get them.")
        return cap.key  # type: ignore[return-value]

    def attention(self, layer: Layer, kind: str = "rows") -> torch.Tensor:
        """Rebuilt attention of ``layer``: rows (B, H, T, N), pooled (B, H, T, M) or full (B, H, N, N)."""
        cap = self._capture(layer)
        require_layer(cap.layer, self.attention_layers(kind), f"{kind!r} attention", "this batch",
                      f"it has attention kinds {self.attention_kinds or 'none'} (the attention= option of qkhooks.record).")
        return cap.attention[kind]

    def inputs(self, layer: Layer) -> torch.Tensor:
        """(B, N, d) the tokens the modes were taken of (recorded with ``keep_inputs=True``)."""
        cap = self._capture(layer)
        if cap.inputs is None:
            raise QKHooksError(f"this batch kept no input tokens for layer {cap.layer}; record with keep_inputs=True.")
        return cap.inputs

    def spectrum(self, layer: Layer) -> LayerSpectrum:
        """The modes ``layer`` was projected on (from the recording)."""
        cap = self._capture(layer)
        if self.qk_spectrum is None:
            raise QKHooksError("this batch was recorded without modes, so it has no spectrum; record with modes=.")
        return self.qk_spectrum[cap.layer]

    def relative_term(self, layer: Layer) -> torch.Tensor:
        """``layer``'s query-dependent relative-position term (SAM/ViTDet), shaped like its full maps; see
        :meth:`qkhooks.Recording.relative_term`."""
        index = resolve_layer(layer, self.layers, {}, "this batch")
        require_layer(index, self.relative_layers, "query-dependent relative-position term", "this batch",
                      "only layers with one (SAM/ViTDet decomposed positions), recorded with attention='full', keep it.")
        return self.captures[index].relative  # type: ignore[return-value]

    @property
    def relative_layers(self) -> list[int]:
        """Layers with a query-dependent relative-position term kept with their full maps."""
        return sorted(l for l, c in self.captures.items() if c.relative is not None)

    def geometry(self, layer: Layer) -> LayerGeometry:
        """``layer``'s grid, prefix tokens, query/key token counts, stage and windows (``meta["geometry"]``, which
        :func:`qkhooks.record_dataset` puts into every batch, and a live recording for each layer with modes)."""
        cap = self._capture(layer)
        found = (self.meta.get("geometry") or {}).get(cap.layer)
        if found is None:
            raise QKHooksError(f"this batch carries no geometry for layer {cap.layer} (record_dataset puts every "
                               "layer's into meta['geometry'], a live recording each layer's with modes; "
                               "run.geometry(l) says why a layer has none).")
        return found

    def arrays(self) -> dict[str, torch.Tensor]:
        """Flat name -> (B, ...) tensors in the run-file schema (``modes/L3/query``, ``attention/L3/rows``)."""
        out: dict[str, torch.Tensor] = {}
        for layer, cap in sorted(self.captures.items()):
            if cap.query is not None:
                out[f"modes/L{layer}/query"] = cap.query
                out[f"modes/L{layer}/key"] = cap.key  # type: ignore[assignment]
            for kind, value in cap.attention.items():
                out[f"attention/L{layer}/{kind}"] = value
            if cap.relative is not None:  # SAM/ViTDet q·R term, laid out as the layer's full maps
                out[f"relative/L{layer}"] = cap.relative
            for name, term in (cap.terms or {}).items():  # zoo12: two-softmax terms shaped like the maps, per image
                if _per_image_term(term):
                    out[f"terms/L{layer}/{name}"] = term
        if "query_tokens" in self.meta and any(c.attention for c in self.captures.values()):
            out["attention/query_tokens"] = torch.as_tensor(self.meta["query_tokens"]).long()
        return out



def _per_image_term(term: torch.Tensor) -> bool:
    """A two-softmax term shaped like the layer's maps, (B, H, T, N), has one entry per image (softmax1, softmax2,
    GPSA's content softmax); any other shape is the layer's own, the same for every image (stored once)."""
    return term.dim() == 4


class CallOrOld:
    """A method that still answers the dict (or QKSpectrum) it replaces, with a DeprecationWarning naming the call."""

    def __init__(self, call: Callable[..., Any], old: Callable[[], Any], old_name: str, new_name: str):
        self._call, self._old_value, self._names = call, old, (old_name, new_name)
        functools.update_wrapper(self, call)
        self.__signature__ = inspect.signature(call)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._call(*args, **kwargs)

    def _old(self) -> Any:
        deprecated(*self._names, stacklevel=4)
        return self._old_value()

    def __getitem__(self, layer: Any) -> Any:
        return self._old()[layer]

    def __iter__(self) -> Any:
        return iter(self._old())

    def __len__(self) -> int:
        return len(self._old())

    def __contains__(self, layer: Any) -> bool:
        return layer in self._old()

    def __getattr__(self, name: str) -> Any:  # the old value's public methods: keys, items, values, get, table, top
        if name.startswith("_"):  # probes by copy, pickle, IPython's display see a plain method
            raise AttributeError(name)
        return getattr(self._old(), name)

    def __repr__(self) -> str:
        return f"<method {self._names[1]}>"
