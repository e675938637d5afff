"""``scaled_dot_product_attention`` computed eagerly, and a module's attention call intercepted while it runs.

Two recorders take a module's own attention computation instead of rebuilding it from the hooked tokens:
:class:`qkhooks.attention.OneAttention` (``record(..., outputs="eager")``: computes the call once and hands the maps
back as the layer's) and :class:`qkhooks.models.inside.InsideCall` (maps-only sites whose q or k is made inside the
module: observes, changes nothing). Both are an :class:`AttentionCallMode`: the same interception (the SDPA call's
own arguments, an eager softmax over the last axis, the dropout refusal), each saying what to do with a call.

This module sits below :mod:`qkhooks.attention` and :mod:`qkhooks.models` (it imports neither), so both import it at
module level: :mod:`qkhooks.attention` imports the models package, which imports :mod:`qkhooks.models.inside`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import threading
from typing import Any, Callable, cast

import torch

from qkhooks.errors import QKHooksError

__all__ = ["HALF", "scaled_logits", "softmax_maps", "softmax_attention", "maps_times_values", "sdpa_maps",
           "sdpa_probabilities", "SdpaCall", "AttentionCallMode"]

# ------------------------------------------------------------------ the two products, read in place on the CPU
# Below this many query and key tokens an image's products are too small for per-image calls to pay off (windows of 49).
_IN_PLACE_MIN_TOKENS = 128


def _in_place(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the per-head products below apply: two (B, H, ·, ·) CPU tensors of the same B, H and dtype, many
    query or key tokens, no autograd (``out=`` does not record a graph)."""
    return (a.device.type == "cpu" and a.dim() == 4 and b.dim() == 4 and a.shape[:2] == b.shape[:2]
            and max(a.shape[-2], b.shape[-2]) >= _IN_PLACE_MIN_TOKENS and a.dtype == b.dtype
            and not (torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)))


HALF = (torch.float16, torch.bfloat16)


def scaled_logits(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """scale · q kᵀ over the last two axes: (..., L, d) and (..., S, d) -> (..., L, S).

    Half-precision q and k (float16, bfloat16) are multiplied in float32, autocast off, and the logits are float32:
    the fused kernels a model runs accumulate q·kᵀ in float32, and logits rounded to half precision (a logit of 16
    moves by up to 1/16 in bfloat16) made maps differ from the softmax of the model's own q, k by 1e-2.

    q and k are usually strided views of one Linear's output (heads split off a fused qkv), which ``matmul`` first
    copies into contiguous tensors (q once more to scale it). On the CPU one ``baddbmm`` per image reads them in
    place, all heads at once, and folds the scale into the product. Per image, not per head: an image's q and k
    rows lie together in memory, and its call's H products split evenly over the threads; with 2 threads the
    per-head loop of round 11 was slower than ``matmul`` on copies (benchmarks/round12_ab.py). The value is
    scale·(q·k) rounded once, where ``(q·scale) @ kᵀ`` rounds q·scale first: equal for a power-of-two scale
    (d_k = 64), within a float ulp otherwise.
    """
    if q.dtype in HALF or k.dtype in HALF:
        with autocast_off(q.device):
            return _scaled_logits(q.float(), k.float(), scale)
    return _scaled_logits(q, k, scale)


def _scaled_logits(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    if not (isinstance(scale, (int, float)) and _in_place(q, k)):  # a tensor scale: a learned temperature
        return (q * scale) @ k.transpose(-1, -2)
    logits = q.new_empty(*q.shape[:-1], k.shape[-2])
    for b in range(q.shape[0]):
        torch.baddbmm(logits[b], q[b], k[b].transpose(-1, -2), beta=0, alpha=scale, out=logits[b])
    return logits


def autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast disabled on ``device`` (it would run a float32 product in half precision again)."""
    return torch.autocast(device.type, enabled=False) if device.type in ("cpu", "cuda") else contextlib.nullcontext()


def softmax_maps(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(scale · q kᵀ) over the keys, in the logits' dtype (:func:`scaled_logits`): the same values as
    ``torch.softmax(scaled_logits(q, k, scale), -1)``, bit for bit, in one pass per image on the CPU
    (:func:`_per_image`)."""
    return _per_image(q, k, scale, None)[0]


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(:func:`softmax_maps`, maps @ v in :func:`maps_times_values`' layout), bit for bit those two calls' values, in
    one pass per image on the CPU (:func:`_per_image`)."""
    maps, out = _per_image(q, k, scale, v)
    return maps, cast(torch.Tensor, out)  # v given: never None


def _per_image(q: torch.Tensor, k: torch.Tensor, scale: float,
               v: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The maps (and maps @ v when v is given). On the CPU (float32 or float64, no autograd, many tokens) one image at
    a time: its logits go to one scratch buffer that stays in cache, their softmax straight into the kept maps, and
    its product with v reads the maps while they are still in cache. Three whole-batch passes (logits, softmax,
    product) each streamed B·H·N·N floats through memory, and the logits of every image were allocated as well: the
    per-image order takes 0.66-0.92x their time with v, 0.46-1.01x without (ViT-S and ViT-B layers, batch 8, two
    runs: benchmarks/round35_fused.py). Each step is per row or
    per image, so the values do not change. Elsewhere the whole-batch products."""
    if not (isinstance(scale, (int, float)) and q.dtype not in HALF and _in_place(q, k)
            and (v is None or _in_place(q, v))):
        maps = torch.softmax(scaled_logits(q, k, scale), dim=-1)
        return maps, None if v is None else maps_times_values(maps, v)
    maps = q.new_empty(*q.shape[:-1], k.shape[-2])
    logits = q.new_empty(maps.shape[1:])  # one image's: (H, L, S)
    out = None if v is None else v.new_empty(v.shape[0], q.shape[-2], v.shape[1], v.shape[-1])
    for b in range(q.shape[0]):
        torch.baddbmm(logits, q[b], k[b].transpose(-1, -2), beta=0, alpha=scale, out=logits)
        torch.softmax(logits, -1, out=maps[b])  # maps[b] is contiguous: torch writes it in place
        if out is not None:
            torch.bmm(maps[b], v[b], out=out[b].transpose(0, 1))
    return maps, None if out is None else out.transpose(1, 2)


def maps_times_values(maps: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """maps @ v, (B, H, L, S) @ (B, H, S, d) -> (B, H, L, d); on the CPU one ``bmm`` per image that reads v in place
    and writes a (B, L, H, d) buffer, the layout the model's next ``transpose(1, 2).reshape`` reads without a copy
    (the layout torch's own CPU flash kernel returns)."""
    if not _in_place(maps, v):
        return maps @ v
    out = v.new_empty(v.shape[0], maps.shape[-2], v.shape[1], v.shape[-1])
    for b in range(v.shape[0]):
        torch.bmm(maps[b], v[b], out=out[b].transpose(0, 1))
    return out.transpose(1, 2)


# ------------------------------------------------------------------ the SDPA call, eagerly
_SDPA = torch.nn.functional.scaled_dot_product_attention
# nn.MultiheadAttention's attention (torchvision's ViT): under a torch function mode its forward leaves the fused native
# kernel for this function, whose inner calls the mode does not see (a mode is off while it handles a call)
MHA_FORWARD = torch.nn.functional.multi_head_attention_forward
_SOFTMAXES = (torch.softmax, torch.nn.functional.softmax, torch.Tensor.softmax)


def _per_query_head(t: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Grouped-query attention's keys or values (B, H_kv, S, d) with each head repeated for the group of query heads
    it serves, as ``enable_gqa`` reads them: (B, H_q, S, d)."""
    return t if t.shape[-3] == q.shape[-3] else t.repeat_interleave(q.shape[-3] // t.shape[-3], dim=-3)


def sdpa_maps(q: torch.Tensor, k: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False,
              scale: float | None = None, enable_gqa: bool = False) -> torch.Tensor:
    """softmax(q kᵀ·scale + mask) as ``scaled_dot_product_attention`` defines it, in q's dtype: (..., L, S)
    (:func:`sdpa_probabilities` rounded to q's dtype once, at the end)."""
    return sdpa_probabilities(q, k, attn_mask, is_causal, scale, enable_gqa).to(q.dtype)


def sdpa_probabilities(q: torch.Tensor, k: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                       scale: float | None = None, enable_gqa: bool = False) -> torch.Tensor:
    """softmax(q kᵀ·scale + mask) as ``scaled_dot_product_attention`` defines it, in the logits' dtype: q's, float32
    for half-precision q, k (whose logits and softmax are float32, as the fused kernels keep them).

    The scale enters the product (:func:`scaled_logits`), never the N·N logits; a boolean mask keeps
    the True entries, a float mask is added, ``is_causal`` keeps the lower triangle; rows with every key masked
    are zero (not NaN), as the fused kernels return them.
    """
    if enable_gqa:
        k = _per_query_head(k, q)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if attn_mask is None and not is_causal:
        return softmax_maps(q, k, scale)
    logits = scaled_logits(q, k, scale)
    keep = None
    if is_causal:
        keep = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        keep = attn_mask if keep is None else keep & attn_mask
    elif attn_mask is not None:
        logits = logits + attn_mask
    if keep is not None:
        logits = logits.masked_fill(~keep, float("-inf"))
    maps = torch.softmax(logits, dim=-1)
    # a row whose every key is masked (boolean or -inf float mask) is 0, as torch's own sdpa returns, not NaN
    return maps if keep is None and attn_mask is None else maps.nan_to_num_(0.0)


@dataclasses.dataclass
class SdpaCall:
    """The arguments of one ``scaled_dot_product_attention`` call, bound as torch binds them (same names, defaults
    and keyword-only ``scale`` / ``enable_gqa``, so a model's positional or keyword call reads the same)."""

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    attn_mask: torch.Tensor | None = None
    dropout_p: float = 0.0
    is_causal: bool = False
    _: dataclasses.KW_ONLY
    scale: float | None = None
    enable_gqa: bool = False

    def maps(self) -> torch.Tensor:
        """The call's maps, softmax(q kᵀ·scale + mask) (:func:`sdpa_maps`), before dropout."""
        return sdpa_maps(self.query, self.key, self.attn_mask, self.is_causal, self.scale, self.enable_gqa)

    def attend(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The call computed once, eagerly: (its maps in q's dtype, maps @ v as the call returns it).

        For half-precision q, k the maps are float32 (:func:`sdpa_probabilities`) and multiplied with v in float32, the
        output rounded once to v's dtype, as the fused kernels accumulate; the kept maps are rounded to q's dtype.
        Without a mask, q, k and v of one float32 or float64 dtype: one pass per image (:func:`softmax_attention`).
        """
        q, k, v = self.query, self.key, self.value
        if self.enable_gqa:
            k, v = _per_query_head(k, q), _per_query_head(v, q)
        scale = q.shape[-1] ** -0.5 if self.scale is None else self.scale
        if self.attn_mask is None and not self.is_causal and q.dtype == k.dtype == v.dtype and q.dtype not in HALF:
            return softmax_attention(q, k, v, scale)
        maps = sdpa_probabilities(q, k, self.attn_mask, self.is_causal, scale)  # float32 for half-precision q, k
        if maps.dtype == v.dtype:
            return maps.to(q.dtype), maps_times_values(maps, v)
        with autocast_off(v.device):  # the fused kernels accumulate in float32 and round the output once
            return maps.to(q.dtype), maps_times_values(maps, v.to(maps.dtype)).to(v.dtype)


def _softmax_over_last_axis(out: Any, args: tuple, kwargs: dict) -> bool:
    """Whether a softmax call returned a tensor normalised over its last axis (keys), as attention maps are."""
    dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
    return isinstance(out, torch.Tensor) and dim in (-1, out.dim() - 1)


@functools.lru_cache(maxsize=1)
def _mha_signature() -> inspect.Signature:
    return inspect.signature(MHA_FORWARD)


class _OwnWork(threading.local):
    """How deep this thread is in qkhooks' own hooks (``models.unsupported.own_hook`` counts them)."""

    depth = 0


OWN_WORK = _OwnWork()
"""While a hook of qkhooks runs, its computations (a rebuilt map, rows from the Linear's q and k, a second
recording's) are not the module's: :class:`AttentionCallMode` lets them by."""


class AttentionCallMode(torch.overrides.TorchFunctionMode):
    """Entered while one attention module runs (from its forward pre-hook to its forward hook): hands each of the
    module's ``scaled_dot_product_attention`` calls to :meth:`on_sdpa` and each softmax over the last axis (its eager
    path) to :meth:`on_softmax`; not those of qkhooks' hooks running meanwhile (:data:`OWN_WORK`). A call that drops attention weights at random (training mode) is refused: no map is
    the one its output used."""

    def __init__(self, site: Any):
        super().__init__()
        self.site = site
        self.entered = False

    def enter(self) -> None:
        """The module starts: intercept its calls."""
        self.begin()
        self.entered = True
        self.__enter__()

    def leave(self) -> None:
        """The module finished (or raised): stop intercepting."""
        self.entered = False
        self.__exit__(None, None, None)

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if OWN_WORK.depth:  # a hook's work, not the module's (a nested recording's rebuilt maps, say)
            return func(*args, **kwargs)
        if func is _SDPA:
            call = SdpaCall(*args, **kwargs)
            if call.dropout_p > 0:
                raise self.dropout_refusal(call.dropout_p)
            return self.on_sdpa(call, lambda: func(*args, **kwargs))
        if func is MHA_FORWARD:
            bound = _mha_signature().bind(*args, **kwargs)
            bound.apply_defaults()
            return self.on_multihead(dict(bound.arguments), lambda: func(*args, **kwargs))
        out = func(*args, **kwargs)
        if func in _SOFTMAXES and _softmax_over_last_axis(out, args, kwargs):
            self.on_softmax(out)
        return out

    def begin(self) -> None:
        """Forget the previous call's maps (the module is about to run)."""
        raise NotImplementedError

    def on_sdpa(self, call: SdpaCall, kernel: Callable[[], torch.Tensor]) -> torch.Tensor:
        """What the module's SDPA call returns; ``kernel()`` runs torch's own."""
        raise NotImplementedError

    def on_softmax(self, maps: torch.Tensor) -> None:
        """A softmax over the last axis the module computed (its eager attention, or something else it normalises)."""
        raise NotImplementedError

    def on_multihead(self, call: dict[str, Any], kernel: Callable[[], Any]) -> Any:
        """What the module's ``multi_head_attention_forward`` call (its arguments bound by name) returns; ``kernel()``
        runs it as called. Here: as called (its inner calls are not seen)."""
        return kernel()

    def dropout_refusal(self, dropout_p: float) -> QKHooksError:
        raise NotImplementedError
