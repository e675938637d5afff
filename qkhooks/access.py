"""The one vocabulary in which results are read, live (``BatchCapture``, ``Recording``) or stored (``RunReader``).

The three types answer the same calls with the same arguments, so one script reads either::

    x.layers                    # every recorded layer (0-based block indices), sorted
    x.module_paths              # layer -> dotted path of its attention module, e.g. {5: "blocks.5.attn"}
    x.mode_layers               # the layers with query/key maps
    x.attention_kinds           # the kinds of rebuilt attention: "rows", "pooled", "full"
    x.attention_layers(kind)    # the layers with attention of that kind
    x.ids, x.n                  # the images' ids and their number
    x.query(l), x.key(l)        # (n, H, K, N) maps x·u_n, x·v_n
    x.attention(l, kind="rows") # rows (n, H, T, N), pooled (n, H, T, M) or full (n, H, N, N)
    x.spectrum(l)               # the layer's LayerSpectrum (U, S, V, cos)
    x.geometry(l)               # the layer's LayerGeometry: grid, prefix, query/key tokens, stage, windows
    x.relative_layers           # the layers with a query-dependent relative-position term (SAM/ViTDet)
    x.relative_term(l)          # that term (n, H, N, N), laid out as the full maps: logits = scale·q·k + term

``l`` is a block index or the attention module's path (``"blocks.5.attn"``, as nnsight and TransformerLens
name sites). Arrays are torch tensors live and lazily read :class:`~qkhooks.store.reader.RunArray` s stored
(numpy on slicing); ``np.asarray`` turns either into equal numpy arrays (to the storage dtype's rounding).

Importing this module needs no torch: the reader uses it.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Mapping, Protocol, Sequence, Union

from qkhooks.errors import QKHooksError

__all__ = ["Layer", "Results", "LayerGeometry", "resolve_layer", "layer_at_path", "require_layer"]

Layer = Union[int, str]
"""A block index (``5``) or the attention module's dotted path (``"blocks.5.attn"``)."""


@dataclasses.dataclass(frozen=True)
class LayerGeometry:
    """Where one layer's tokens are, as its stored maps have them (multi-stage models differ layer by layer).

    Attributes:
        layer: the layer (0-based, forward order over all stages); stage: the container its block sits in.
        grid: (rows, cols) of the query-side patch tokens, row-major after ``num_prefix_tokens`` prefix tokens;
            None where the recording could not tell it (analyses that need it then refuse the layer).
        query_tokens, key_tokens: tokens of the stored query and key maps (N and M; M < N for reduced keys).
        key_grid, key_prefix_tokens: the same for the key side (reduced keys: the reduced grid).
        heads, head_dim: this layer's heads and per-head width.
        window: windowed layers (Swin): ``{"size": [wh, ww], "shift": [sh, sw], "windows": nW, "pad_first": bool}``
            in the model's own window order; None for global attention. Maps are stored on the image grid.
        class_attention: only the class token queries (CaiT): attention rows exist for it alone.
        component_heads: 0, or (differential attention, zoo13) the heads of the layer's modes and spectrum when they
            are not its maps' ``heads``: component head 2h + c is softmax term c + 1 of map head h, so mode head h
            is never map head h on such a layer.
    """

    layer: int
    grid: tuple[int, int] | None
    num_prefix_tokens: int
    query_tokens: int
    key_tokens: int
    key_grid: tuple[int, int] | None
    key_prefix_tokens: int
    heads: int = 0
    head_dim: int = 0
    stage: str = ""
    window: dict[str, Any] | None = None
    class_attention: bool = False
    component_heads: int = 0

    @property
    def windowed(self) -> bool:
        return self.window is not None

    @property
    def reduced_keys(self) -> bool:
        """Whether the keys are other tokens than the queries (spatial reduction)."""
        return (self.key_tokens, self.key_grid) != (self.query_tokens, self.grid)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if not d["component_heads"]:  # zoo13: written for differential layers only, so other layers' JSON is unchanged
            del d["component_heads"]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LayerGeometry":
        pair = lambda g: None if g is None else (int(g[0]), int(g[1]))  # noqa: E731
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        return cls(**{**d, "grid": pair(d.get("grid")), "key_grid": pair(d.get("key_grid"))})

    def describe(self) -> str:
        """One line for ``qkhooks info``."""
        grid = "?" if self.grid is None else f"{self.grid[0]}x{self.grid[1]}"
        text = f"grid {grid} + {self.num_prefix_tokens} prefix, {self.query_tokens} queries"
        if self.reduced_keys:
            kg = "?" if self.key_grid is None else f"{self.key_grid[0]}x{self.key_grid[1]}"
            text += f", {self.key_tokens} keys (reduced grid {kg})"
        if self.window is not None:
            w, s = self.window["size"], self.window["shift"]
            count = self.window['windows']
            text += f", {count} window{'s' if count != 1 else ''} of {w[0]}x{w[1]} shifted by ({s[0]}, {s[1]})"
        if self.class_attention:
            text += ", class attention"
        if self.component_heads:
            text += f", {self.heads} maps of {self.component_heads} component heads x {self.head_dim}"
        elif self.heads:
            text += f", {self.heads} heads x {self.head_dim}"
        return text + (f", stage {self.stage}" if self.stage else "")


class Results(Protocol):
    """What ``BatchCapture``, ``Recording`` and ``RunReader`` all answer (see the module docstring)."""

    @property
    def layers(self) -> list[int]: ...

    @property
    def module_paths(self) -> dict[int, str]: ...

    @property
    def mode_layers(self) -> list[int]: ...

    @property
    def attention_kinds(self) -> list[str]: ...

    def attention_layers(self, kind: str = "rows") -> list[int]: ...

    @property
    def ids(self) -> list[str]: ...

    @property
    def n(self) -> int: ...

    def query(self, layer: Layer) -> Any: ...

    def key(self, layer: Layer) -> Any: ...

    def attention(self, layer: Layer, kind: str = "rows") -> Any: ...

    def spectrum(self, layer: Layer) -> Any: ...

    def geometry(self, layer: Layer) -> LayerGeometry: ...

    @property
    def relative_layers(self) -> list[int]: ...

    def relative_term(self, layer: Layer) -> Any: ...


def resolve_layer(layer: Layer, layers: Sequence[int], paths: Mapping[int, str], where: str) -> int:
    """The block index ``layer`` names (an index or a module path), refused with the known ones if unknown."""
    if isinstance(layer, str):
        if layer.lstrip("-").isdigit():
            layer = int(layer)
        else:
            if not paths:
                raise QKHooksError(f"{where} does not know its layers' module paths (a run file written before "
                                   f"qkhooks stored them); address the layer by block index: {list(layers)}.")
            return layer_at_path(layer, paths, where)
    if isinstance(layer, bool) or not hasattr(layer, "__index__"):
        raise QKHooksError(f"a layer is a block index or a module path such as 'blocks.5.attn'; got {layer!r}.")
    index = int(layer)
    if index < 0 and layers:  # record(layers=[-1]) counts from the model's end; what it recorded is named by index
        raise QKHooksError(f"layer {index}: recorded layers are read by their block index (or module path), not from "
                           f"the end; {where}'s layers are {list(layers)} (the last: {max(layers)}).")
    if index not in layers:
        raise QKHooksError(f"{where} did not record layer {index}; its layers are {list(layers)}.")
    return index


LISTED_PATHS, CLOSEST_PATHS = 12, 5
"""A refusal of an unknown module path lists every known one up to LISTED_PATHS (a ViT-B's twelve), else the
CLOSEST_PATHS closest."""


def layer_at_path(path: str, paths: Mapping[int, str], where: str,
                  listing: str = "`.module_paths` (layer -> path)") -> int:
    """The block index of the attention module at dotted ``path`` among ``paths`` (layer -> path): the one place a
    layer given as a module path becomes an index (reading API and layer selections). An unknown path is refused
    naming the closest known ones (all of a deep model's would bury them), their count, and ``listing``: how to
    list them all."""
    for layer, known in paths.items():
        if known == path:
            return layer
    if len(paths) <= LISTED_PATHS:
        listed = ", ".join(f"{known!r} (layer {layer})" for layer, known in sorted(paths.items()))
        raise QKHooksError(f"{where} has no layer at module path {path!r}; its layers are the attention modules "
                           f"{listed} (give one of those paths or a block index).")
    layer_of = {known: layer for layer, known in paths.items()}
    closest = difflib.get_close_matches(path, list(layer_of), n=CLOSEST_PATHS, cutoff=0.0)
    listed = ", ".join(f"{known!r} (layer {layer_of[known]})" for known in closest)
    raise QKHooksError(f"{where} has no layer at module path {path!r}; the closest of its {len(paths)} attention "
                       f"modules are {listed} (give one of their paths or a block index; {listing} lists all "
                       f"{len(paths)}).")


def require_layer(layer: int, available: Sequence[int], what: str, where: str, fix: str) -> None:
    """Refuse a recorded layer that lacks ``what`` (query/key maps, an attention kind), naming those that have it."""
    if layer not in available:
        raise QKHooksError(f"{where} has no {what} for layer {layer} (layers with them: {list(available) or 'none'}); "
                           f"{fix}")
