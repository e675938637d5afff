"""Attention whose keys come from spatially reduced tokens: HF ``PvtModel``, ``PvtV2Model``, ``SegformerModel``
(transformers 5 class names), ``GLPNModel`` (Segformer's encoder), timm ``pvt_v2_*`` and the global attention of ``twins_*`` (METHODS.md C, "different
key tokens").

The queries are the N tokens entering W_q; the keys are the M tokens the model feeds to W_k after its own
reduction (a strided conv and a LayerNorm; PVT-v2's linear variant pools to 7x7 first and adds a GELU). The
content form is still W_q^T W_k, now between the query tokens and the reduced tokens: query maps are (B, H, K, N),
key maps (B, H, K, M), full maps (B, H, N, M), the model's own shape. The reduced tokens are computed in the hook
with the model's own reduction modules from the very call being recorded (``AttentionSite.key_tokens``); a
module whose reduction is not one of these is refused by the adapter (its unmodelled children are named).
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any, Callable

import torch
from torch import nn

from qkhooks.errors import QKHooksError
from qkhooks.models import hf
from qkhooks.models import timm as timm_adapter
from qkhooks.models.base import AttentionSite
from qkhooks.models.unsupported import MODELLED_FORMS

__all__ = ["REDUCED_KEY_CLASSES"]


def _grid_args(path: str, args: tuple, kwargs: dict) -> tuple[int, int]:
    """(height, width) of the token grid, as the model hands them to its attention (by position or keyword)."""
    height = args[1] if len(args) > 1 else kwargs.get("height")
    width = args[2] if len(args) > 2 else kwargs.get("width")
    if not isinstance(height, int) or not isinstance(width, int):
        raise QKHooksError(f"{path}: the call does not give the token grid (height, width) the spatial reduction needs.")
    return height, width


def _as_image(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, N, C) tokens -> (B, C, height, width), as the models reshape them before the reduction conv."""
    return x.permute(0, 2, 1).reshape(x.shape[0], x.shape[2], height, width)


def _as_tokens(image: torch.Tensor) -> torch.Tensor:
    return image.reshape(image.shape[0], image.shape[1], -1).permute(0, 2, 1)


Reduction = Callable[[torch.Tensor, tuple, dict], torch.Tensor]


def _conv_reduction(path: str, owner: nn.Module, conv: str, norm: str, grid: Callable[[str, tuple, dict], tuple[int, int]],
                    pool: str | None = None, act: str | None = None) -> Reduction:
    """The models' own reduction, in their order: tokens -> image -> [pool] -> conv -> tokens -> norm [-> act], with
    ``owner``'s children of those names (held weakly: a finished recording keeps no model alive)."""
    ref = weakref.ref(owner)

    def reduce(x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        m = ref()
        image = _as_image(x, *grid(path, args, kwargs))
        tokens = getattr(m, norm)(_as_tokens(getattr(m, conv)(image if pool is None else getattr(m, pool)(image))))
        return tokens if act is None else getattr(m, act)(tokens)

    return reduce


def _pvt_v2(path: str, module: nn.Module) -> Reduction | None:
    """PvtV2SelfAttention: conv (kernel = stride = ratio) + LayerNorm, or pool 7x7 + 1x1 conv + LayerNorm + GELU."""
    if module.linear_attention:
        return _conv_reduction(path, module, "spatial_reduction", "layer_norm", _grid_args, "pool", "act")
    if module.spatial_reduction_ratio <= 1:
        return None
    return _conv_reduction(path, module, "spatial_reduction", "layer_norm", _grid_args)


def _pvt(path: str, module: nn.Module) -> Reduction | None:
    """PvtEfficientSelfAttention: conv (kernel = stride = ratio) + LayerNorm."""
    if module.sequences_reduction_ratio <= 1:
        return None
    return _conv_reduction(path, module, "sequence_reduction", "layer_norm", _grid_args)


def _segformer(path: str, module: nn.Module) -> Reduction | None:
    """SegformerAttention (transformers 5): its own ``SegformerSequenceReduction(x, height, width)`` module."""
    if module.sequence_reduction_ratio <= 1:
        return None
    if type(module.sequence_reduction).__name__ != "SegformerSequenceReduction":
        raise QKHooksError(f"unsupported attention in {path!r} ({type(module).__name__}): its sequence reduction is a "
                           f"{type(module.sequence_reduction).__name__}, not the SegformerSequenceReduction qkhooks models.")

    ref = weakref.ref(module)

    def reduce(x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        return ref().sequence_reduction(x, *_grid_args(path, args, kwargs))

    return reduce


def _glpn(path: str, module: nn.Module) -> Reduction | None:
    """GLPNEfficientSelfAttention (GLPN's Segformer-style encoder): conv ``sr`` (kernel = stride = ratio) + LayerNorm."""
    if module.sr_ratio <= 1:
        return None
    return _conv_reduction(path, module, "sr", "layer_norm", _grid_args)


# class -> (the children its reduction uses, the reduction)
REDUCED_KEY_CLASSES: dict[str, tuple[frozenset[str], Callable[[str, nn.Module], Any]]] = {
    "PvtV2SelfAttention": (frozenset({"spatial_reduction", "layer_norm", "pool", "act", "attn_drop", "proj_drop"}), _pvt_v2),
    "PvtEfficientSelfAttention": (frozenset({"sequence_reduction", "layer_norm"}), _pvt),
    "SegformerAttention": (frozenset({"sequence_reduction"}), _segformer),
    "GLPNEfficientSelfAttention": (frozenset({"sr", "layer_norm"}), _glpn),
}


def _hf_site(reduction: Callable[[str, nn.Module], Any]):
    def finish(site: AttentionSite, module: nn.Module, modules: dict[str, nn.Module]) -> AttentionSite:
        # the grid arguments are plain ints, so they are not refused as unmodelled terms; the reduction reads them
        return dataclasses.replace(site, key_tokens=reduction(site.path, module), bias_input=None)

    return finish


for _cls, (_children, _reduction) in REDUCED_KEY_CLASSES.items():
    hf.EXTRA_FORMS[_cls] = (_children, _hf_site(_reduction))
    MODELLED_FORMS.add(_cls)


# ---------------------------------------------------------------------------------------------------- timm
def _timm_grid(path: str, args: tuple, kwargs: dict) -> tuple[int, int]:
    """(height, width) timm hands its pvt_v2 / twins attention as ``feat_size`` / ``size``."""
    size = args[1] if len(args) > 1 else kwargs.get("feat_size", kwargs.get("size"))
    if not isinstance(size, (tuple, list)) or len(size) != 2:
        raise QKHooksError(f"{path}: the call does not give the token grid (height, width) the spatial reduction needs.")
    return int(size[0]), int(size[1])


def _timm_reduction(path: str, attn: nn.Module) -> Reduction | None:
    """timm pvt_v2 ``Attention`` (conv + norm, or pool 7x7 + 1x1 conv + norm + GELU) and twins
    ``GlobalSubSampleAttn`` (conv + norm); None where the layer does not reduce (sr_ratio 1)."""
    if attn.sr is None:
        return None
    pooled = getattr(attn, "pool", None) is not None
    return _conv_reduction(path, attn, "sr", "norm", _timm_grid, "pool" if pooled else None, "act" if pooled else None)


def _q_kv_reader(attn: nn.Module):
    """W_q from ``q``, W_k the first half of ``kv`` (k then v along its outputs); modes from the tokens (the
    ``kv`` output is not k alone)."""
    q, kv = attn.q, attn.kv

    def qk_linear() -> tuple[torch.Tensor, torch.Tensor | None]:
        w = torch.cat([q.weight, kv.weight[: q.out_features]])
        if q.bias is None and kv.bias is None:
            return w, None
        zeros = q.weight.new_zeros(q.out_features)
        return w, torch.cat([zeros if q.bias is None else q.bias, zeros if kv.bias is None else kv.bias[: q.out_features]])

    return qk_linear, ()


def _timm_site(family: str):
    def finish(site: AttentionSite, attn: nn.Module) -> AttentionSite:
        return dataclasses.replace(site, key_tokens=_timm_reduction(site.path, attn), family=family, rope_input=None,
                                   rope_apply=None)

    return finish


def _pvt_v2_attention() -> type:
    from timm.models.pvt_v2 import Attention

    return Attention


def _twins_global() -> type:
    from timm.models.twins import GlobalSubSampleAttn

    return GlobalSubSampleAttn


timm_adapter.EXTRA_FORMS["PvtV2Attention"] = timm_adapter.ExtraForm(_pvt_v2_attention, _q_kv_reader, _timm_site("timm-pvt-v2"))
timm_adapter.EXTRA_FORMS["GlobalSubSampleAttn"] = timm_adapter.ExtraForm(_twins_global, _q_kv_reader, _timm_site("timm-twins"))
MODELLED_FORMS.update({"timm.models.pvt_v2.Attention", "timm.models.twins.GlobalSubSampleAttn"})
