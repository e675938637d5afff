"""Masks and modules of the user's own class on the tokens' way (``unsupported._own_class_code``): code of such a
class that runs as the model runs (its ``forward``, or a method of the library's that the library's own forward calls,
overridden) may move the tokens, so masks are refused. Round 50 counted every method beside ``__init__``, so a timm
``Block`` subclass adding only an ``extra_repr`` or a helper of the user's (which timm's code never calls) had masks
refused though its tokens are the plain ViT's, which the gradient reference below shows."""

from __future__ import annotations

import pytest
import timm
import torch

import qkhooks
from qkhooks import QKHooksError
from test_token_cells import _token_spans_seen_by_the_first_attention
from timm.models.vision_transformer import Block

_SMALL_VIT = dict(img_size=32, patch_size=8, depth=2, embed_dim=16, num_heads=2)


class _DescribedBlock(Block):
    """A block of the user's own class that adds what timm's code never calls as the model runs."""

    def extra_repr(self) -> str:
        return "described"

    def attention_entropy(self) -> float:  # a helper of the user's own, called by the user's analysis only
        return 0.0


class _RolledBlock(Block):
    """A block whose forward rolls the patch tokens before its attention."""

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        return super().forward(torch.cat([x[:, :1], torch.roll(x[:, 1:], 1, dims=1)], dim=1), **kwargs)


class _DescribedRolledBlock(_RolledBlock):
    """The rolling block, subclassed again with a harmless helper alone: the roll it inherits still runs."""

    def attention_entropy(self) -> float:
        return 0.0


def _cells(model: torch.nn.Module):
    from qkhooks.stream import mask_cells, probe_geometry

    sites = qkhooks.sites(model)
    return mask_cells(sites, probe_geometry(model, sites, (32, 32)), (32, 32), "all", model)[(4, 4)]


def _vit(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **_SMALL_VIT, **kw).eval()


def test_a_block_class_adding_only_what_timm_never_calls_has_masks_read_as_the_plain_vits():
    plain, described = _vit(), _vit(block_fn=_DescribedBlock)
    assert _token_spans_seen_by_the_first_attention(described) == _token_spans_seen_by_the_first_attention(plain)
    assert _cells(described) == _cells(plain)
    assert (_cells(plain).rows, _cells(plain).cols) == _token_spans_seen_by_the_first_attention(plain)


@pytest.mark.parametrize("build, where, name", [
    (lambda: _vit(block_fn=_RolledBlock), "blocks.0", "_RolledBlock"),
    (lambda: _vit(block_fn=_DescribedRolledBlock), "blocks.0", "_RolledBlock"),
], ids=["forward", "forward-inherited"])
def test_code_of_the_users_own_class_that_runs_as_the_model_runs_is_refused_for_masks(build, where, name):
    torch.manual_seed(0)
    model = build()
    assert (_cells(_vit()).rows, _cells(_vit()).cols) != _token_spans_seen_by_the_first_attention(model)  # tokens moved
    with pytest.raises(QKHooksError) as err:
        _cells(model)
    message = str(err.value)
    assert where in message and name in message and "without masks" in message, message


def test_an_overridden_library_method_counts_and_a_new_one_does_not():
    """Which methods of a class of the user's own count: one overriding a library method the library's own forward
    may call (timm's ``PatchEmbed.dynamic_feat_size``, called for ``dynamic_img_size``) or a property; not an
    ``extra_repr`` or a method of a new name."""
    from timm.layers import PatchEmbed

    from qkhooks.models.unsupported import _own_class_code

    class Sized(PatchEmbed):
        def dynamic_feat_size(self, img_size):
            return super().dynamic_feat_size(img_size)

    class Shown(PatchEmbed):
        def extra_repr(self) -> str:
            return "shown"

        def describe(self) -> str:
            return "mine"

    class Propertied(PatchEmbed):
        @property
        def cells(self) -> int:
            return 16

    kw = dict(img_size=32, patch_size=8, in_chans=3, embed_dim=16)
    assert "Sized (dynamic_feat_size)" in _own_class_code(Sized(**kw))
    assert _own_class_code(Shown(**kw)) is None
    assert "Propertied (cells)" in _own_class_code(Propertied(**kw))
