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
from qkhooks.models.base import AttentionSite, conv_output_size, recast, stacked_rows
from qkhooks.models.unsupported import MODELLED_FORMS, UNMODELLED_FORMS

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
    return stacked_rows(attn.q, attn.kv, k_rows=attn.q.out_features), ()


def _timm_site(family: str):
    def finish(site: AttentionSite, attn: nn.Module) -> AttentionSite:
        return dataclasses.replace(site, key_tokens=_timm_reduction(site.path, attn), family=family, rope_input=None,
                                   rope_apply=None)

    return finish


timm_adapter.EXTRA_FORMS["PvtV2Attention"] = timm_adapter.ExtraForm(
    "timm.models.pvt_v2.Attention", _q_kv_reader, _timm_site("timm-pvt-v2"))
timm_adapter.EXTRA_FORMS["GlobalSubSampleAttn"] = timm_adapter.ExtraForm(
    "timm.models.twins.GlobalSubSampleAttn", _q_kv_reader, _timm_site("timm-twins"))
MODELLED_FORMS.update({"timm.models.pvt_v2.Attention", "timm.models.twins.GlobalSubSampleAttn"})


# ------------------------------------------------------------------ keys from pooled / strided-conv tokens (timm)
@dataclasses.dataclass(eq=False)
class ReducedKeySite(AttentionSite):
    """A site whose keys come from reduced tokens laid out in a way the generic rule (query grid / one integer
    ratio, :func:`qkhooks.results.observe_geometry`) would misread.

    Attributes:
        key_grid_rule: ``query grid -> key grid`` (None where the keys form no grid): NextViT pools runs of r²
            consecutive tokens of the row-major sequence (a (h, w / r²) grid, not (h / r, w / r)); a strided conv
            with padding keeps ceil-like sizes.
    """

    key_grid_rule: Callable[[tuple[int, int]], tuple[int, int] | None] | None = None

    def reduced_key_grid(self, grid: tuple[int, int] | None, key_tokens: int) -> tuple[int, int] | None:
        """The key grid of a call whose query grid is ``grid`` and which had ``key_tokens`` keys (None: no grid)."""
        if grid is None or self.key_grid_rule is None:
            return None
        found = self.key_grid_rule(grid)
        return found if found is not None and found[0] * found[1] == key_tokens else None


def _with_key_grid(site: AttentionSite, rule: Callable[[tuple[int, int]], tuple[int, int] | None], **changes: Any
                   ) -> ReducedKeySite:
    return recast(site, ReducedKeySite, **changes, key_grid_rule=rule)


def _separate_q_k_reader(q: nn.Module, k: nn.Module, repeat_k: int = 1):
    """W_q, W_k from two projections (Linear, or 1x1 conv read as one); W_k's rows repeated ``repeat_k`` times
    where one key head serves every query head (multi-query: the content form of query head h is W_q,h^T W_k)."""

    def qk_linear() -> tuple[torch.Tensor, torch.Tensor | None]:
        w_k = k.weight.flatten(1).repeat(repeat_k, 1)
        w = torch.cat([q.weight.flatten(1), w_k])
        if q.bias is None and k.bias is None:
            return w, None
        b_q = q.weight.new_zeros(q.weight.shape[0]) if q.bias is None else q.bias
        b_k = k.weight.new_zeros(k.weight.shape[0]) if k.bias is None else k.bias
        return w, torch.cat([b_q, b_k.repeat(repeat_k)])

    return qk_linear, ()  # modes from the tokens: k's input is the reduced tokens, not the hooked ones


# NextViT ``EfficientAttention``: k from AvgPool1d over runs of sr² tokens of the row-major sequence, then BatchNorm1d
def _nextvit_reader(attn: nn.Module):
    return _separate_q_k_reader(attn.q, attn.k)


def _nextvit_site(site: AttentionSite, attn: nn.Module) -> AttentionSite:
    """Keys: the model's own ``sr`` (AvgPool1d, kernel = stride = sr²) then ``norm`` (BatchNorm1d, an affine map per
    channel in eval) on the (B, C, N) sequence. In training mode the norm uses the batch's statistics, refused."""
    # zoo12: the grid is the (B, C, H, W) map the block's norm1 is handed before it flattens it for the attention
    source = (site.block.norm1, lambda args, kwargs: tuple((args[0] if args else kwargs["input"]).shape[-2:]))
    if attn.sr is None:
        return dataclasses.replace(site, family="timm-nextvit", grid_source=source)
    ref, path = weakref.ref(attn), site.path
    run = int(attn.N_ratio)

    def reduce(x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        m = ref()
        if m.norm.training:
            raise QKHooksError(f"unsupported attention in {path!r} (EfficientAttention): its key BatchNorm is in training "
                               "mode (batch statistics, which the keys of one image then depend on); call model.eval().")
        return m.norm(m.sr(x.transpose(1, 2))).transpose(1, 2)

    def key_grid(grid: tuple[int, int]) -> tuple[int, int] | None:
        h, w = grid  # runs of `run` tokens along each row stay a grid only when they do not cross rows
        return (h, w // run) if w % run == 0 else None

    return _with_key_grid(site, key_grid, key_tokens=reduce, family="timm-nextvit", grid_source=source)


# timm ``MultiQueryAttention2d`` (MobileNetV4 hybrid / MobileNetV5): NCHW maps, one key head shared by every query
# head, keys from a strided depthwise conv and a norm (``key.down_conv``, ``key.norm``) where kv_stride > 1
_MQA_KEY_STEPS = ("down_conv", "norm")


def multi_query_unmodelled(attn: nn.Module) -> str | None:
    """Why one ``MultiQueryAttention2d`` is not modelled (None: it is): pooled queries, or a key path with steps
    besides the strided depthwise conv, the norm and a 1x1 projection."""
    if getattr(attn, "has_query_strides", False):
        return (f"its queries are average-pooled with stride {tuple(attn.query_strides)} and normalised before W_q, and "
                "its output upsampled back, so the maps are pooled queries x keys; qkhooks does not model pooled "
                "queries in this module yet")
    steps = [name for name, _ in attn.key.named_children()]
    proj = getattr(attn.key, "proj", None)
    if steps[:-1] != [s for s in _MQA_KEY_STEPS if s in steps[:-1]] or steps[-1:] != ["proj"] or not (
            isinstance(proj, nn.Conv2d) and proj.kernel_size == (1, 1) and proj.stride == (1, 1)
            and tuple(proj.padding) == (0, 0)) or not isinstance(attn.query.proj, nn.Conv2d) or attn.query.proj.kernel_size != (1, 1):
        return (f"its key path ({', '.join(steps)}) is not the strided depthwise conv, norm and 1x1 projection qkhooks "
                "models")
    if getattr(attn, "einsum", False):
        return "its einsum layout gives (B, N, H, M) maps, not the (B, H, N, M) layout qkhooks models"
    return None


def _mqa_reader(attn: nn.Module):
    return _separate_q_k_reader(attn.query.proj, attn.key.proj, int(attn.num_heads))


def _mqa_site(site: AttentionSite, attn: nn.Module) -> AttentionSite:
    """Queries: the NCHW map read row by row; keys: ``key.down_conv`` then ``key.norm`` (the model's own modules) on
    that map, where it has them. A module :func:`multi_query_unmodelled` refuses never gets here (the refusal table
    is checked before any adapter)."""
    site = dataclasses.replace(site, token_layout="channels_first", family="timm-mqa2d", grid=None, patch_size=None)
    steps = [getattr(attn.key, s) for s in _MQA_KEY_STEPS if hasattr(attn.key, s)]
    if not steps:
        return site
    refs, path = [weakref.ref(m) for m in steps], site.path
    conv = getattr(attn.key, "down_conv", None)

    def reduce(x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        image = args[0] if args else kwargs["x"]
        for ref in refs:
            step = ref()
            if step.training and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in step.modules()):
                raise QKHooksError(f"unsupported attention in {path!r} (MultiQueryAttention2d): its key BatchNorm is in "
                                   "training mode (batch statistics); call model.eval().")
            image = step(image)
        return _as_tokens(image)

    def key_grid(grid: tuple[int, int]) -> tuple[int, int] | None:
        if conv is None:
            return grid
        if not isinstance(conv, nn.Conv2d) or not all(isinstance(p, int) for p in conv.padding):
            return None
        return conv_output_size(grid[0], conv, 0), conv_output_size(grid[1], conv, 1)

    return _with_key_grid(site, key_grid, key_tokens=reduce)


timm_adapter.EXTRA_FORMS["NextViTEfficientAttention"] = timm_adapter.ExtraForm(
    "timm.models.nextvit.EfficientAttention", _nextvit_reader, _nextvit_site)
timm_adapter.EXTRA_FORMS["MultiQueryAttention2d"] = timm_adapter.ExtraForm(
    "timm.layers.attention2d.MultiQueryAttention2d", _mqa_reader, _mqa_site)
MODELLED_FORMS.update({"timm.models.nextvit.EfficientAttention", "timm.layers.attention2d.MultiQueryAttention2d"})
UNMODELLED_FORMS["timm.layers.attention2d.MultiQueryAttention2d"] = multi_query_unmodelled
