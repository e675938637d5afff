"""BoTNet's ``BottleneckAttn``: plain q·k plus the query-dependent relative term of ``PosEmbedRel`` (METHODS.md C).

timm's ``BottleneckAttn`` (``botnet*``, ``eca_botnext*``, ``sebotnet*``, ``botnet`` blocks of ``halo2botnet*``) takes an
NCHW map, projects it with a 1x1-conv ``qkv`` (q rows, then k rows, then v; heads along the channels) and computes::

    logit_h(i, j) = scale · q_i·k_j + q_i·R_h[h_j − h_i + H − 1] + q_i·R_w[w_j − w_i + W − 1]

(``scale_pos_embed``: scale · (q_i·k_j + the term)), R_h, R_w the module's ``pos_embed.height_rel`` / ``width_rel``
tables. The term is bilinear between the image's own query and a relative-position table: not a bias. As for SAM
(:mod:`qkhooks.models.relpos`), maps are rebuilt with it exactly, computed with the module's own ``pos_embed`` on the
call's q; the term is ``rec.relative_term(l)`` (B, H, N, N); the modes stay those of W_q^T W_k, exact for the content
term q·k (analyses of that one form say they are content-only). Tokens are the map's pixels, row by row, as the module
reads them; an avg-pool after the attention (stride 2) does not touch the maps.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any, Callable

import torch
from torch import nn

from qkhooks.models import timm as timm_adapter
from qkhooks.models.base import AttentionSite
from qkhooks.models.relpos import RelativeSite
from qkhooks.models.unsupported import MODELLED_FORMS

__all__ = ["ChannelsFirstRelativeSite"]


@dataclasses.dataclass(eq=False)
class ChannelsFirstRelativeSite(RelativeSite):
    """A :class:`RelativeSite` whose module takes an NCHW map (read row by row as tokens): the call's grid is (H, W)."""

    def hidden_states(self, args: tuple[Any, ...], kwargs: dict[str, Any], block: bool = False) -> torch.Tensor:
        x = super().hidden_states(args, kwargs, block)
        raw = args[0] if args else kwargs.get(self.input_name)
        if not block and isinstance(raw, torch.Tensor) and raw.dim() == 4:
            self._call_hw = (int(raw.shape[2]), int(raw.shape[3]))
        return x

    def grid_for(self, num_tokens: int) -> tuple[int, int]:
        return self._call_hw if self._call_hw is not None else super().grid_for(num_tokens)


def _bottleneck_attention() -> type:
    from timm.layers.bottleneck_attn import BottleneckAttn

    return BottleneckAttn


def _conv_qk_rows(attn: nn.Module) -> tuple[Callable[[], tuple[torch.Tensor, torch.Tensor | None]], tuple[nn.Module, ...]]:
    """q then k rows of the 1x1-conv ``qkv`` (a Linear at every pixel); modes are projected from the tokens x."""
    qkv, rows = attn.qkv, 2 * int(attn.dim_out_qk)

    def reader() -> tuple[torch.Tensor, torch.Tensor | None]:
        return qkv.weight[:rows].flatten(1), None if qkv.bias is None else qkv.bias[:rows]

    return reader, ()


def _bottleneck_site(site: AttentionSite, attn: nn.Module) -> AttentionSite:
    ref = weakref.ref(attn)  # a finished recording keeps no model alive

    def relative(q: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        m = ref()
        term = m.pos_embed(q)  # (B·H, N, N), the module's own PosEmbedRel on the call's q
        return term * m.scale if m.scale_pos_embed else term

    fields = {f.name: getattr(site, f.name) for f in dataclasses.fields(AttentionSite)}
    fields.update(family="timm-botnet", token_layout="channels_first", grid=None, patch_size=None, qk_modules=(),
                  bias_input=None, rope_input=None, rope_apply=None)
    return ChannelsFirstRelativeSite(**fields, relative=relative)


timm_adapter.EXTRA_FORMS["BottleneckAttn"] = timm_adapter.ExtraForm(_bottleneck_attention, _conv_qk_rows, _bottleneck_site)
MODELLED_FORMS.update({"timm.layers.bottleneck_attn.BottleneckAttn", "timm.layers.bottleneck_attn.PosEmbedRel"})
