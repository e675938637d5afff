"""Attention with a position-indexed additive bias, taught to the timm adapter: timm EfficientFormer ``Attention``.

logit_h(i, j) = scale · q_h,i·k_h,j + B_h[idx(i, j)]: a learned table ``attention_biases`` (H, P) read at the index
of the two tokens' offset. The bias is position-only: the site takes the very (H, N, N) term the module adds (its
own ``get_attention_biases``, read from the call), so rebuilt maps add it and ``run.bias(l)`` returns it as its own
term; modes are those of W_q^T W_k, exact for the content term. The fused ``qkv`` is laid out per head
(q, k, v of head 0, then of head 1...), so the q and k rows are gathered head by head.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any, Callable

import torch
from torch import nn

from qkhooks._devices import to_device
from qkhooks.errors import QKHooksError
from qkhooks.models import timm as timm_adapter
from qkhooks.models.base import AttentionSite
from qkhooks.models.unsupported import MODELLED_FORMS


def per_head_rows(attn: nn.Module, linear: nn.Linear) -> tuple[Callable[[], tuple[torch.Tensor, torch.Tensor | None]], tuple]:
    """q then k rows of a qkv laid out per head ([q_h | k_h | v_h] for each head h, widths key_dim, key_dim, val_dim)."""
    heads, key_dim, val_dim = int(attn.num_heads), int(attn.key_dim), int(attn.val_dim)
    per_head = 2 * key_dim + val_dim
    start = torch.arange(heads)[:, None] * per_head
    q_rows = (start + torch.arange(key_dim)).flatten()
    rows = torch.cat([q_rows, q_rows + key_dim])

    def reader() -> tuple[torch.Tensor, torch.Tensor | None]:
        w = linear.weight
        at = to_device(rows, w.device)
        return w[at], None if linear.bias is None else linear.bias[at]

    return reader, ()  # the Linear's output interleaves heads: modes and maps from the tokens x


def bias_of_call(site: AttentionSite, attn: nn.Module, batchnorms: tuple[nn.Module, ...] = ()
                 ) -> Callable[[tuple, dict], torch.Tensor]:
    """The (1, H, N_q, N_k) term the module adds in this call, from its own ``get_attention_biases``; any argument
    besides the tokens is refused, and so is a call with any of ``batchnorms`` (the BatchNorm layers folded into its
    W_q/W_k, :mod:`qkhooks.models.levit`) in training mode, where they normalise with the batch's own statistics.
    It holds the module and the BatchNorms weakly and of the site only its path and input name: a finished recording
    keeps its sites' ``call_bias`` and must keep no model alive (the site as found holds the modules, its route's too)."""
    path, input_name, kind = site.path, site.input_name, type(attn).__name__
    attn_ref = weakref.ref(attn)
    batchnorm_refs = tuple(weakref.ref(bn) for bn in batchnorms)

    def bias(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
        extra = [f"argument {i}" for i in range(1, len(args))] + sorted(k for k in kwargs if k != input_name)
        if extra:
            raise QKHooksError(f"unsupported attention in {path!r} ({kind}): the model passes {extra}, which the "
                               "adapter does not model.")
        refuse_training_batchnorm(path, kind, tuple(ref() for ref in batchnorm_refs))
        x = args[0] if args else kwargs[input_name]
        return attn_ref().get_attention_biases(x.device).detach()[None]  # type: ignore[union-attr]

    return bias


def refuse_training_batchnorm(path: str, kind: str, batchnorms: tuple[nn.Module, ...]) -> None:
    """Refuse a call of the attention at ``path`` (class ``kind``) while a BatchNorm folded into its W_q/W_k is in
    training mode: no fixed W_q, W_k describe it then."""
    if any(bn.training for bn in batchnorms):
        raise QKHooksError(f"unsupported attention in {path!r} ({kind}): its q/k BatchNorm is in training mode, where "
                           "it normalises with each batch's own statistics, so no fixed W_q, W_k describe the logits; "
                           "call model.eval() (BatchNorm then folds into W_q, W_k exactly).")


def _efficientformer_site(site: AttentionSite, attn: nn.Module) -> AttentionSite:
    tokens = int(attn.attention_bias_idxs.shape[0])
    side = int(round(tokens**0.5))
    grid = (side, side) if side * side == tokens else None  # the only grid its table is built for
    site = dataclasses.replace(site, family="timm-efficientformer", grid=grid, patch_size=None)
    return dataclasses.replace(site, call_bias=bias_of_call(site, attn))


timm_adapter.EXTRA_FORMS["EfficientFormerAttention"] = timm_adapter.ExtraForm(
    "timm.models.efficientformer.Attention", lambda attn: per_head_rows(attn, attn.qkv), _efficientformer_site)
MODELLED_FORMS.add("timm.models.efficientformer.Attention")
