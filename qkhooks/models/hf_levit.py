"""Adapter for transformers' LeViT (``LevitModel`` and its classifiers): the same attention as timm's LeViT, whose
folding lives in :mod:`qkhooks.models.levit` and is reused here.

``LevitAttention``: q, k, v from one Linear + BatchNorm1d (``queries_keys_values``), channels per head
[q_h | k_h | v_h]; ``LevitAttentionSubsample``: k, v from ``keys_values`` (per head [k_h | v_h]), q from ``queries``
on the tokens its ``queries_subsample`` keeps (every ``stride``-th token of each row and column). Both add the
position-indexed ``attention_biases`` table (read with the module's own ``get_attention_biases``, ``run.bias(l)``).
In eval mode each BatchNorm folds into W_q / W_k exactly; in training mode the recording is refused.
"""

from __future__ import annotations

import dataclasses
import math
import weakref

import torch
from torch import nn

from qkhooks.models.base import AttentionSite, register_adapter
from qkhooks.models.biased import bias_of_call
from qkhooks.models.levit import batchnorm_layers, folded_rows, joined_rows, class_label, head_channels, prepared_site
from qkhooks.models.unsupported import MODELLED_FORMS, refuse_uncovered

_CLASSES = ("LevitAttention", "LevitAttentionSubsample")
_MODULE = "transformers.models.levit.modeling_levit"
MODELLED_FORMS.update(f"{_MODULE}.{c}" for c in _CLASSES)


def _attention(model: nn.Module):
    for name, module in model.named_modules():
        if type(module).__module__ == _MODULE and type(module).__name__ in _CLASSES:
            yield name, module


def matches(model: nn.Module) -> bool:
    return type(model).__module__.startswith("transformers.") and any(True for _ in _attention(model))


def _pixel_route(model: nn.Module) -> tuple[tuple[str, nn.Module], ...]:
    """The convolutional stem (``LevitPatchEmbeddings``) by its path in the model: the route from the image to the
    tokens, checked when masks are read onto them (read as the stem's stride blocks)."""
    return tuple((name, module) for name, module in model.named_modules()
                 if type(module).__module__ == _MODULE and type(module).__name__ == "LevitPatchEmbeddings")


def find(model: nn.Module) -> list[AttentionSite]:
    modules = dict(model.named_modules())
    pixel_route = _pixel_route(model)
    sites = []
    for name, attn in _attention(model):
        heads, kd = int(attn.num_attention_heads), int(attn.key_dim)
        vd = int(attn.attention_ratio) * kd
        label = class_label(attn)
        subsample = type(attn).__name__ == "LevitAttentionSubsample"
        if subsample:
            projections = (attn.queries, attn.keys_values)
            qk = joined_rows(folded_rows(label, attn.queries, torch.arange(heads * kd)),
                         folded_rows(label, attn.keys_values, head_channels(heads, kd, kd + vd)))
        else:
            projections = (attn.queries_keys_values,)
            qk = joined_rows(folded_rows(label, attn.queries_keys_values, head_channels(heads, kd, 2 * kd + vd)),
                         folded_rows(label, attn.queries_keys_values, head_channels(heads, kd, 2 * kd + vd, kd)))
        # zoo12: the grid its bias table is built on (itertools.product(range(r), range(r)): r x r, queries r_out x r_out)
        side = int(attn.resolution_out) if subsample else math.isqrt(int(attn.attention_bias_idxs.shape[0]))
        parent = name.rpartition(".")[0]
        block_path = name if subsample else parent  # LevitResidualLayer: x + module(x), no norm before it
        site = AttentionSite(
            layer=len(sites), path=name, module=attn, block_path=block_path, block=modules[block_path],
            num_heads=heads, head_dim=kd, dim=int(projections[0].linear.in_features), scale=float(attn.scale),
            num_prefix_tokens=0, grid=(side, side), family="hf-levit", input_name="hidden_state", block_input_name="hidden_state",
            qk_linear=qk, patch_size=None, stage=block_path.rpartition(".")[0], pixel_route=pixel_route)
        if subsample:
            ref = weakref.ref(attn)

            def prepare(given: torch.Tensor, ref=ref) -> tuple[torch.Tensor, torch.Tensor]:
                """Queries: the tokens the module's own ``queries_subsample`` keeps; keys: every token."""
                return ref().queries_subsample(given), given

            site = prepared_site(site, prepare, True)
        sites.append(dataclasses.replace(site, call_bias=bias_of_call(site, attn, batchnorm_layers(*projections))))
    refuse_uncovered(model, sites)
    return sites


register_adapter("hf-levit", matches, find, families="Hugging Face LeViT (BatchNorm folded into W_q/W_k, attention "
                 "biases, subsampled queries)", first=False)
