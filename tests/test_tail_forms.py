"""zoo-tail forms: grouped-query attention, the reasons table of known unmodelled attention classes."""

from __future__ import annotations

import importlib

import pytest
import torch

import qkhooks
from qkhooks import QKHooksError
from qkhooks.models.unsupported import KNOWN_FORMS

timm = pytest.importorskip("timm")


@pytest.mark.parametrize("qualified", sorted(KNOWN_FORMS))
def test_every_known_form_names_a_class_of_the_installed_library(qualified: str):
    """A reason keyed by a class that no longer exists would never be given: the table must not rot."""
    module, _, name = qualified.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except ImportError:
        pytest.skip(f"{module} is not in this timm")
    assert isinstance(cls, type) and issubclass(cls, torch.nn.Module)


def test_a_known_unmodelled_class_is_refused_with_its_reason_not_the_generic_words():
    model = timm.create_model("convit_tiny", pretrained=False, depth=2, img_size=32, embed_dim=48, num_heads=4)
    with pytest.raises(QKHooksError) as info:
        qkhooks.sites(model)
    msg = str(info.value)
    assert "'blocks.0.attn' (GPSA; children:" in msg and "sigmoid-gated mix" in msg
    assert "no registered adapter models this class" not in msg


def test_grouped_query_content_form_is_the_query_head_against_its_groups_key_head():
    """Site weights of a grouped-query AttentionRope: query head h pairs with key head h // (H / H_kv), read directly
    off the model's own q_proj / k_proj rows."""
    model = timm.create_model("vit_pe_core_tiny_patch16_384", pretrained=False, depth=1, img_size=32, num_kv_heads=1,
                              qkv_fused=False)
    attn = model.blocks[0].attn
    with torch.no_grad():
        for p in attn.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    (site,) = qkhooks.sites(model)
    w = site.weights()
    heads, kv, dk = attn.num_heads, attn.num_kv_heads, attn.head_dim
    assert w.w_q.shape == w.w_k.shape == (heads, dk, attn.q_proj.in_features)
    k_rows = attn.k_proj.weight.reshape(kv, dk, -1)
    for h in range(heads):
        assert torch.equal(w.w_q[h], attn.q_proj.weight[h * dk:(h + 1) * dk])
        assert torch.equal(w.w_k[h], k_rows[h // (heads // kv)])
        assert torch.equal(w.b_k[h], attn.k_proj.bias.reshape(kv, dk)[h // (heads // kv)])
