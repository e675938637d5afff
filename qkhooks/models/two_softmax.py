"""Two-softmax attention (METHODS.md C): ConViT's GPSA and differential attention refused with the reason; ConViT's
plain MHSA blocks recorded.

ConViT runs gated positional self-attention (``GPSA``) in its first blocks and plain multi-head attention (``MHSA``:
softmax(scale·q·k) of one fused qkv, the class token joined before the first of them) after. A GPSA map is
(1−σ(g_h))·softmax(scale·q·k) + σ(g_h)·softmax(pos_proj(r)) renormalised, a mix of a content softmax and a
position-only softmax: its content term has a W_q^T W_k form, but the map is not the softmax of it plus a bias, and
qkhooks does not record such mixed maps yet. With ``skip_unmodelled=True`` the MHSA blocks are recorded exactly and
every GPSA block is named as left out. Differential attention (timm ``DiffAttention``) is refused: its map is the
difference of two softmax(q·k) maps weighted by a learned λ.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from qkhooks.models import timm as timm_adapter
from qkhooks.models.base import AttentionSite
from qkhooks.models.unsupported import MODELLED_FORMS, UNMODELLED_FORMS
from qkhooks.models.windows import _timm_qkv


def _convit_mhsa() -> type:
    from timm.models.convit import MHSA

    return MHSA


def _convit_mhsa_site(site: AttentionSite, attn: nn.Module) -> AttentionSite:
    """Plain softmax(scale·q·k) on the block's tokens (class token first: ConViT joins it before its MHSA blocks)."""
    return dataclasses.replace(site, family="timm-convit")


timm_adapter.EXTRA_FORMS["ConvitMHSA"] = timm_adapter.ExtraForm(_convit_mhsa, _timm_qkv, _convit_mhsa_site)
MODELLED_FORMS.add("timm.models.convit.MHSA")
UNMODELLED_FORMS.update({
    "timm.models.convit.GPSA": "gated positional self-attention: each head's map is a sigmoid-gated mix of a content "
    "softmax and a position-only softmax, (1−σ(g_h))·softmax(scale·q·k) + σ(g_h)·softmax(pos_proj(relative positions)) "
    "renormalised, not one softmax of q·k plus a bias, and qkhooks does not record mixed maps yet. ConViT's MHSA "
    "blocks (after its GPSA blocks) are plain attention, modelled exactly",
    "timm.layers.diff_attention.DiffAttention": "differential attention: the map is softmax(q1·k1) − λ·softmax(q2·k2) "
    "(two halves of each head's q and k, λ learned), not one softmax of q·k plus a bias, so neither q·k form alone "
    "gives the model's maps, and qkhooks does not record differences of maps yet",
})
