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

``l`` is a block index or the attention module's path (``"blocks.5.attn"``, as nnsight and TransformerLens
name sites). Arrays are torch tensors live and lazily read :class:`~qkhooks.store.reader.RunArray` s stored
(numpy on slicing); ``np.asarray`` turns either into equal numpy arrays (to the storage dtype's rounding).

Importing this module needs no torch: the reader uses it.
"""

from __future__ import annotations

from typing import Any, Mapping, Protocol, Sequence, Union

from qkhooks.errors import QKHooksError

__all__ = ["Layer", "Results", "resolve_layer", "require_layer"]

Layer = Union[int, str]
"""A block index (``5``) or the attention module's dotted path (``"blocks.5.attn"``)."""


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


def resolve_layer(layer: Layer, layers: Sequence[int], paths: Mapping[int, str], where: str) -> int:
    """The block index ``layer`` names (an index or a module path), refused with the known ones if unknown."""
    if isinstance(layer, str):
        if layer.lstrip("-").isdigit():
            layer = int(layer)
        else:
            found = [l for l, path in paths.items() if path == layer]
            if found:
                return found[0]
            if not paths:
                raise QKHooksError(f"{where} does not know its layers' module paths (a run file written before "
                                   f"qkhooks stored them); address the layer by block index: {list(layers)}.")
            known = ", ".join(f"{path!r} (layer {l})" for l, path in sorted(paths.items()))
            raise QKHooksError(f"{where} has no layer at module path {layer!r}; its layers are {known}.")
    if isinstance(layer, bool) or not hasattr(layer, "__index__"):
        raise QKHooksError(f"a layer is a block index or a module path such as 'blocks.5.attn'; got {layer!r}.")
    index = int(layer)
    if index not in layers:
        raise QKHooksError(f"{where} did not record layer {index}; its layers are {list(layers)}.")
    return index


def require_layer(layer: int, available: Sequence[int], what: str, where: str, fix: str) -> None:
    """Refuse a recorded layer that lacks ``what`` (query/key maps, an attention kind), naming those that have it."""
    if layer not in available:
        raise QKHooksError(f"{where} has no {what} for layer {layer} (layers with them: {list(available) or 'none'}); "
                           f"{fix}")
