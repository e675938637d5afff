"""A timm feature net built on a user's model that holds a timm ViT beside a head reads its sites' prefix count off
a module that counts none (the user's model, or the rewritten hook net): refused where the ViT inside has prefix
tokens (``_refuse_hidden_network``). Round 50 looked for a ``cls_token`` tensor only, so a ViT of register tokens
and no class token (timm's ``*_reg4_gap_*`` models: ``class_token=False, reg_tokens=4``) was taken with 0 prefix
tokens while its attention ran on its registers and patches: the registers taken for patches without a word."""

from __future__ import annotations

import pytest
import timm
import torch

import qkhooks
from qkhooks import QKHooksError
from test_token_cells import _NetworkWithHead


def _registers_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                             embed_dim=16, num_heads=2, class_token=False, reg_tokens=2, global_pool="avg").eval()


@pytest.mark.parametrize("name, rewrite, path", [("body", True, "body"), ("backbone", True, "backbone"),
                                                 ("backbone", False, "body.backbone")],
                         ids=["rewritten-beside-head", "rewritten-other-name", "kept-whole-inside-a-users-model"])
def test_a_feature_net_around_a_vit_of_register_tokens_inside_a_users_model_is_refused(name, rewrite, path):
    from timm.models._features import FeatureHookNet

    vit = _registers_vit()
    bare = qkhooks.sites(vit)
    assert [s.num_prefix_tokens for s in bare] == [2, 2] and vit.cls_token is None  # registers, no class token
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():  # the attention runs on 2 registers + 16 patches
        tokens = vit._pos_embed(vit.patch_embed(x))
    assert tokens.shape[1] == 2 + 16
    net = FeatureHookNet(_NetworkWithHead(vit, name, (f"{name}.blocks.1", "head")), out_indices=(0, 1),
                         no_rewrite=not rewrite).eval()
    with pytest.raises(QKHooksError) as err:
        qkhooks.sites(net)
    message = str(err.value)
    assert f"'{path}'" in message and "VisionTransformer" in message and f"model.{path} itself" in message, message
    assert "prefix token" in message and "register" in message, message


def test_a_feature_net_of_a_vit_of_register_tokens_alone_counts_them():
    """timm's own feature nets of such a ViT keep it whole: its sites count its registers as the bare ViT's do."""
    bare = [(s.num_prefix_tokens, s.grid) for s in qkhooks.sites(_registers_vit())]
    for feature_cls in ("getter", "hook"):
        torch.manual_seed(0)
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                                  embed_dim=16, num_heads=2, class_token=False, reg_tokens=2, global_pool="avg",
                                  features_only=True, feature_cls=feature_cls, out_indices=(1,))
        assert [(s.num_prefix_tokens, s.grid) for s in qkhooks.sites(model)] == bare, feature_cls
