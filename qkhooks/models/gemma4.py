"""Adapter for timm's Gemma 4 vision encoder (``gemma4_vit_*``): 2-D RoPE on RMS-normalised q and k, scale 1.

Gemma4Attention normalises q and k per head (RMSNorm with a gain), rotates them with 2-D RoPE whose head
dimensions split into a row half and a column half, each rotated by halves (pairs (i, i + d_k/4) within each half:
layout ``"axes"`` in :mod:`qkhooks.models.rope`), repeats the key heads over the query heads when it has fewer
(grouped-query), and takes softmax(q·k) with scale 1. The block hands the rotary tables as positional arguments
``(x, rope_cos, rope_sin)``: the site reads them from the call (:class:`Gemma4Site`), so maps are rebuilt from the
model's own normalised, rotated q and k; modes are those of the content form W_q^T W_k (pre-norm, zero offset).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from qkhooks.errors import QKHooksError
from qkhooks.models.base import AttentionSite, register_adapter, stacked_rows
from qkhooks.models.qknorm import qk_norm_of
from qkhooks.models.timm import grouped_query_reader
from qkhooks.models.unsupported import MODELLED_FORMS, refuse_uncovered

_ATTENTION = "timm.models.gemma4_vit.Gemma4Attention"
MODELLED_FORMS.add(_ATTENTION)
_CALL = ("x", "rope_cos", "rope_sin", "attn_mask")


@dataclasses.dataclass(eq=False)
class Gemma4Site(AttentionSite):
    """A Gemma4Attention site: its rotary tables come as the call's 2nd and 3rd positional arguments."""

    def refuse_unmodelled_inputs(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        call = dict(zip(_CALL, args), **kwargs)
        unknown = sorted(set(call) - set(_CALL)) + [f"argument {i}" for i in range(len(_CALL), len(args))]
        if unknown:
            raise QKHooksError(f"unsupported attention in {self.path!r} (Gemma4Attention): the model passes {unknown}, "
                               "which the Gemma 4 adapter does not model.")
        self._call_rope = (call["rope_cos"], call["rope_sin"])
        self._call_bias = call.get("attn_mask")  # padding positions: an additive -inf column mask, or None


def _rotation(q: torch.Tensor, k: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's own ``apply_multidimensional_rope`` on (B, H, N, d_k) q and k (it takes (B, N, H, d_k))."""
    from timm.models.gemma4_vit import apply_multidimensional_rope

    cos, sin = tables
    return tuple(  # type: ignore[return-value]
        apply_multidimensional_rope(t.transpose(1, 2), cos, sin, ndim=2, unsqueeze_dim=2).transpose(1, 2) for t in (q, k)
    )


def _linear(path: str, clippable: nn.Module, owner: str = "Gemma4Attention") -> nn.Linear:
    """The Linear inside a Gemma4ClippableLinear (timm's, or transformers' with ``use_clipped_linears``); refused when
    it clamps its input or output (a non-linear map)."""
    clipped = getattr(clippable, "use_clipped", False) or getattr(clippable, "use_clipped_linears", False)
    if clipped and any(
        bool(torch.isfinite(getattr(clippable, b)).any()) for b in ("input_min", "input_max", "output_min", "output_max")
    ):
        raise QKHooksError(f"unsupported attention in {path!r} ({owner}): its q/k projections clamp their input "
                           "or output (clipping with finite bounds), so q and k are not linear in the tokens.")
    return clippable.linear


def _pixel_route(model: nn.Module, encoder: nn.Module) -> tuple[tuple[str, nn.Module], ...]:
    """The encoder's patch embedding (patchify, Linear, position table) by its path in the model: the route from the
    image to the tokens, checked when masks are read onto them (its tokens read the patches its patch size says)."""
    return tuple((name, module) for name, module in model.named_modules() if module is encoder.patch_embed)[:1]


def find(model: nn.Module) -> list[AttentionSite]:
    """One site per Gemma4Attention, in forward order; anything else attention-like refuses the model."""
    encoder = model.encoder if hasattr(model, "encoder") else model
    patch = tuple(int(p) for p in encoder.patch_size)
    pixel_route = _pixel_route(model, encoder)
    sites: list[AttentionSite] = []
    for name, attn in model.named_modules():
        if not _is_gemma4_attention(attn):
            continue
        if int(attn.head_dim) % 4:
            raise QKHooksError(f"unsupported attention in {name!r} (Gemma4Attention): head_dim {attn.head_dim} is not a "
                               "multiple of 4, so part of each head is left unrotated, which the adapter does not model.")
        q, k = _linear(name, attn.q_proj), _linear(name, attn.k_proj)

        qk_linear = stacked_rows(q, k)
        grouped = int(attn.num_kv_heads) != int(attn.num_heads)
        block_path = name.rpartition(".")[0]
        sites.append(Gemma4Site(
            layer=len(sites), path=name, module=attn, block_path=block_path, block=model.get_submodule(block_path),
            num_heads=int(attn.num_heads), head_dim=int(attn.head_dim), dim=q.in_features, scale=1.0,
            num_prefix_tokens=0, grid=None, family="timm-gemma4", input_name="x", block_input_name="x",
            qk_linear=grouped_query_reader(name, attn, qk_linear) if grouped else qk_linear,
            qk_modules=() if grouped else (q, k), patch_size=patch, stage=block_path.rpartition(".")[0],
            rope_apply=_rotation, rope_layout="axes", qk_norm=qk_norm_of(name, attn), pixel_route=pixel_route,
        ))
    refuse_uncovered(model, sites)
    return sites


def _is_gemma4_attention(module: nn.Module) -> bool:
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}" == _ATTENTION


def matches(model: nn.Module) -> bool:
    """A timm Gemma 4 vision model."""
    return type(model).__module__ == "timm.models.gemma4_vit" and any(_is_gemma4_attention(m) for m in model.modules())


register_adapter("timm-gemma4", matches, find, families="timm Gemma 4 vision (gemma4_vit_*: 2-D RoPE, RMS q/k-norm, "
                 "grouped-query)", first=False)


# ------------------------------------------------------------------ zoo-packed: transformers' Gemma4VisionModel
_HF_ATTENTION = "transformers.models.gemma4.modeling_gemma4.Gemma4VisionAttention"
MODELLED_FORMS.add(_HF_ATTENTION)
_HF_CALL = ("hidden_states", "position_embeddings", "attention_mask", "position_ids")


@dataclasses.dataclass(eq=False)
class HFGemma4Site(AttentionSite):
    """transformers' Gemma4VisionAttention: the call hands it (cos, sin), the padding mask and each token's 2-D
    position ids, by keyword; q and k are RMS-normalised per head, then rotated by their position ids. Tokens are
    placed by ``pixel_position_ids`` (padding at the end), so no grid is read off the token count."""

    def refuse_unmodelled_inputs(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        call = dict(zip(_HF_CALL, args), **kwargs)
        unknown = [k for k, v in call.items() if k not in _HF_CALL and isinstance(v, (torch.Tensor, tuple, list))]
        unknown += [f"argument {i}" for i in range(len(_HF_CALL), len(args))]
        if unknown or call.get("position_embeddings") is None or call.get("position_ids") is None:
            raise QKHooksError(f"unsupported attention in {self.path!r} (Gemma4VisionAttention): the model passes "
                               f"{unknown or 'no rotary tables or position ids'}, which the Gemma 4 adapter does not model.")
        if call["position_ids"].shape[-1] != 2:  # the model splits each head into one part per position axis
            raise QKHooksError(f"unsupported attention in {self.path!r} (Gemma4VisionAttention): position ids of "
                               f"{call['position_ids'].shape[-1]} axes; the adapter models 2-D positions.")
        self._call_rope = tuple(call["position_embeddings"])  # (cos, sin) per token, as the rope bands read them
        self._call_bias = call.get("attention_mask")  # padding: boolean (True = attend) or additive

    def grid_for(self, num_tokens: int) -> tuple[int, int]:
        raise QKHooksError(f"{self.path}: Gemma 4 places its tokens by pixel_position_ids (each image its own grid, "
                           "padding at the end), so no grid is read off the token count.")


def _hf_rotation(q: torch.Tensor, k: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's own ``apply_multidimensional_rope`` on (B, H, N, d_k) q and k (it takes (B, N, H, d_k)); of the
    position ids it reads only their number of axes (2, checked in the call): the tables are per token already."""
    from transformers.models.gemma4.modeling_gemma4 import apply_multidimensional_rope

    cos, sin = tables
    two_axes = cos.new_zeros(1, 2, dtype=torch.long)
    return tuple(apply_multidimensional_rope(t.transpose(1, 2), cos, sin, two_axes).transpose(1, 2) for t in (q, k))  # type: ignore[return-value]


def find_hf(model: nn.Module) -> list[AttentionSite]:
    """One site per Gemma4VisionAttention of a transformers Gemma 4 vision tower, in forward order."""
    import types

    config = model.config
    sites: list[AttentionSite] = []
    for name, attn in model.named_modules():
        if not _is_class(attn, _HF_ATTENTION):
            continue
        q, k = (_linear(name, proj, "Gemma4VisionAttention") for proj in (attn.q_proj, attn.k_proj))

        qk_linear = stacked_rows(q, k)
        heads, head_dim = int(config.num_attention_heads), int(attn.head_dim)
        kv_heads = k.out_features // head_dim
        counts = types.SimpleNamespace(num_heads=heads, num_kv_heads=kv_heads)  # what grouped_query_reader reads
        block_path = name.rpartition(".")[0]
        sites.append(HFGemma4Site(
            layer=len(sites), path=name, module=attn, block_path=block_path, block=model.get_submodule(block_path),
            num_heads=heads, head_dim=head_dim, dim=q.in_features, scale=float(attn.scaling), num_prefix_tokens=0,
            grid=None, family="hf-gemma4-vision", input_name="hidden_states", block_input_name="hidden_states",
            qk_linear=grouped_query_reader(name, counts, qk_linear) if kv_heads != heads else qk_linear,
            qk_modules=() if kv_heads != heads else (q, k), stage=block_path.rpartition(".")[0],
            rope_apply=_hf_rotation, rope_layout="axes", qk_norm=qk_norm_of(name, attn),
        ))
    refuse_uncovered(model, sites)
    return sites


def _is_class(module: nn.Module, name: str) -> bool:
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}" == name


def matches_hf(model: nn.Module) -> bool:
    """transformers' Gemma 4 vision tower."""
    return type(model).__module__ == "transformers.models.gemma4.modeling_gemma4" and type(model).__name__ == "Gemma4VisionModel"


register_adapter("hf-gemma4-vision", matches_hf, find_hf, families="Hugging Face Gemma 4 vision tower (2-D RoPE by "
                 "position ids, RMS q/k-norm, scale 1, grouped-query, padded batches)", first=False)
