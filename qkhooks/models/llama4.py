"""Llama 4 vision (HF ``Llama4VisionModel``): 2-D RoPE as complex multiplication, exactly (METHODS.md C).

Each attention call is handed ``freqs_ci``, an (N, d_k / 2) complex table, and the module turns q and k with
transformers' own ``vision_apply_rotary_emb``: the dimensions taken as complex numbers (q_{2i} + i·q_{2i+1}) times
freqs_ci[n, i]. A complex product by e^{iφ} is the rotation of the pair (2i, 2i + 1) by φ, so this is RoPE on
**interleaved pairs**: the first d_k / 4 pairs turn with the token's column (x + 1), the last d_k / 4 with its row
(y + 1). Maps are rebuilt from q and k turned by that very function on the call's own table (every token, the class
token too: its table row is the model's, angle 0 in the released code); modes are those of the content form
W_q^T W_k, the zero-offset term (Σ σ_n (x·u_n)(x·v_n) = (q − b_q)·(k − b_k) before the rotation), as for the other
RoPE models.

Token order: the patches in raster order, then the **class token last** (the model appends it). qkhooks' grids put
prefix tokens first, so it claims no grid for these layers (grid analyses refuse them, naming the reason) rather than
read the class token as a patch, and run files are refused (their geometry has no suffix tokens, zoo13); maps, rows with explicit query tokens and modes are exact.
RoPE bands (``qkhooks spectrum --rope-bands``) carry over: pair f is dimensions (2f, 2f + 1), its angle read off
freqs_ci, the frequency measured on the patches (the class token is left out of it).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from qkhooks.errors import QKHooksError
from qkhooks.models import hf
from qkhooks.models.base import AttentionSite, recast
from qkhooks.models.unsupported import MODELLED_FORMS

__all__ = ["Llama4VisionSite"]

_CLASS_LAST = ("Llama 4 vision appends its class token after the patches (tokens: patches in raster order, then the "
               "class token), and qkhooks' grids put prefix tokens first, so it claims no grid for this layer")


@dataclasses.dataclass(eq=False)
class Llama4VisionSite(AttentionSite):
    """A Llama 4 vision attention layer: complex 2-D RoPE on interleaved pairs from the call's ``freqs_ci``.

    ``grid`` and ``patch_size`` are the model's native ones, read by the RoPE bands only (with the class token as the one
    suffix token, ``num_suffix_tokens``); :meth:`grid_for` refuses, so no analysis places tokens on a grid."""

    num_suffix_tokens: int = 1

    def grid_for(self, num_tokens: int) -> tuple[int, int]:
        raise QKHooksError(f"{self.path}: {_CLASS_LAST}; give query tokens by index (the class token is the last).")

    def grid_for_image(self, height: int, width: int) -> tuple[int, int]:
        raise QKHooksError(f"{self.path}: {_CLASS_LAST}.")

    def run_file_refusal(self) -> str | None:
        return (f"{_CLASS_LAST}; a run file's layer geometry and the analyses that read it (top-k modes over patch "
                "tokens, the centre token, masks and objects on the grid) know prefix tokens before the patches only, "
                "and have no field for a class token after them, so its class token would be read as a patch; record "
                "it live (qkhooks.record), where maps, rows of chosen tokens and modes are exact")


def _rotation(module: nn.Module):
    """The module's own ``vision_apply_rotary_emb`` on (B, H, N, d_k) q and k (it takes (B, N, H, d_k))."""
    apply = vars(__import__(type(module).__module__, fromlist=["vision_apply_rotary_emb"]))["vision_apply_rotary_emb"]

    def rotate(q: torch.Tensor, k: torch.Tensor, freqs_ci: Any) -> tuple[torch.Tensor, torch.Tensor]:
        q, k = apply(q.transpose(1, 2), k.transpose(1, 2), freqs_ci=freqs_ci)
        return q.transpose(1, 2), k.transpose(1, 2)

    return rotate


def _llama4_site(site: AttentionSite, module: nn.Module, modules: dict[str, nn.Module]) -> AttentionSite:
    if int(getattr(module, "num_key_value_groups", 1)) != 1:
        raise QKHooksError(f"unsupported attention in {site.path!r} ({type(module).__name__}): "
                           f"{module.num_key_value_groups} query heads per key head, which this adapter has not checked.")
    return recast(
        site, Llama4VisionSite, num_prefix_tokens=0, family="hf-llama4-vision", scale=float(module.head_dim) ** -0.5,
        rope_input="freqs_ci", rope_apply=_rotation(module), rope_layout="interleaved",
        # its forward takes attention_mask but hands its attention function None: a mask it is given is not what it
        # applies, so one is refused by name (refuse_unmodelled_inputs) instead of being added to the rebuilt maps
        bias_input=None)


hf.EXTRA_FORMS["Llama4VisionAttention"] = (frozenset(), _llama4_site)
MODELLED_FORMS.add("transformers.models.llama4.modeling_llama4.Llama4VisionAttention")
