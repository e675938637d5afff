"""MobileViT (v1, timm and HF): plain attention over unfolded patches, reported per image.

A ``MobileVitBlock`` (HF: ``MobileViTLayer``) resizes its (B, C, H, W) map up to a multiple of its patch (p_h, p_w) if needed, then unfolds
it: pixel offset (a, b) inside every patch becomes one sequence of the n_h·n_w patches, so the transformer's batch
axis is images x P (P = p_h·p_w offsets, row b·P + a·p_w + b of image b) and its tokens are the n_h x n_w patches.
The attention inside is timm's plain ``Attention``; this module makes its site say what an "image" of the attention
is (:class:`UnfoldedSite`): ``full`` maps keep the model's own maps, (B·P, H, N, N) split per image into
(B, P, H, N, N), offsets in the model's order; query and key maps go back onto the block's (resized) pixel grid,
(B, H, K, n_h·p_h · n_w·p_w) row-major, as if the map had not been unfolded. ``rows`` / ``pooled`` are refused
(a row lives in one offset's sequence).

HF's ``MobileViTLayer`` unfolds exactly as timm does (``unfolding``: the same reshapes, bilinear resize up to a multiple
of the patch), after an optional strided downsampling inside the layer, so the map size is read where it enters its
``conv_1x1`` (the last module before the unfolding, which keeps the size); its ``MobileViTSelfAttention`` is plain
softmax(q·k / sqrt(d_k)) with separate query/key Linear layers.
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from typing import Callable

import torch
from torch import nn

from qkhooks.errors import QKHooksError
from qkhooks.models import hf
from qkhooks.models import timm as timm_adapter
from qkhooks.models.base import AttentionSite, recast


@dataclasses.dataclass(eq=False)
class UnfoldedSite(AttentionSite):
    """A site whose module sees images unfolded into P = p_h·p_w sequences of patches (MobileViT).

    Attributes:
        patch: (p_h, p_w), the unfolding block's patch.
        unfold_block: the module whose input map has the size the block unfolds (timm: the block itself, HF: its
            ``conv_1x1``), held weakly so a finished recording keeps no model alive.
    """

    patch: tuple[int, int] = (1, 1)
    unfold_block: Callable[[], nn.Module | None] = lambda: None
    _patches_of_call: tuple[int, int] | None = dataclasses.field(default=None, repr=False)

    @property
    def pixels(self) -> int:
        return self.patch[0] * self.patch[1]

    def context_hooks(self) -> list[tuple[nn.Module, Callable]]:
        def note(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else next(iter(kwargs.values()))
            height, width = x.shape[-2:]
            self._patches_of_call = (math.ceil(height / self.patch[0]), math.ceil(width / self.patch[1]))

        block = self.unfold_block()
        return [(block, note)] if block is not None else []

    def patches_of_call(self) -> tuple[int, int]:
        """(n_h, n_w) of the call being recorded."""
        if self._patches_of_call is None:
            raise QKHooksError(f"{self.path}: its MobileViT block was not seen running, so the patch grid is unknown; "
                               "record the whole model, not the attention module alone.")
        return self._patches_of_call

    def images_in_call(self, rows: int) -> int:
        if rows % self.pixels:
            raise QKHooksError(f"{self.path}: {rows} sequences in the call do not split into images of {self.pixels} "
                               "pixel offsets.")
        return rows // self.pixels

    def to_images(self, kind: str, t: torch.Tensor) -> torch.Tensor:
        if kind == "full":  # (B·P, H, N, N) -> (B, P, H, N, N)
            return t.unflatten(0, (-1, self.pixels))
        if kind == "modes":  # (B·P, H, K, N) -> (B, H, K, n_h·p_h·n_w·p_w) on the block's pixel grid
            (ph, pw), (nh, nw) = self.patch, self.patches_of_call()
            grid = t.reshape(-1, ph, pw, t.shape[1], t.shape[2], nh, nw)
            return grid.permute(0, 3, 4, 5, 1, 6, 2).reshape(grid.shape[0], t.shape[1], t.shape[2], -1)
        self.check_attention_kind(kind)
        return t

    def check_attention_kind(self, kind: str) -> None:
        if kind != "full":
            raise QKHooksError(f"{self.path}: MobileViT's attention runs per pixel offset of its patches, so it gives "
                               f"full maps per (image, offset) (attention='full') and modes on the pixel grid; {kind!r} "
                               "attention on the image grid is not built for it (a row lives in one offset's sequence).")

    def grid_for(self, num_tokens: int) -> tuple[int, int]:
        if self._patches_of_call is not None:
            (ph, pw), (nh, nw) = self.patch, self._patches_of_call
            return nh * ph, nw * pw
        return super().grid_for(num_tokens)


def unfold_site(model: nn.Module, site: AttentionSite) -> AttentionSite:
    """The site as an :class:`UnfoldedSite` when its module sits inside a timm ``MobileVitBlock``, else as is."""
    parts = site.path.split(".")
    for end in range(len(parts) - 1, 0, -1):
        block = model.get_submodule(".".join(parts[:end]))
        if type(block).__module__ == "timm.models.mobilevit" and type(block).__name__ == "MobileVitBlock":
            return recast(site, UnfoldedSite, family="timm-mobilevit", grid=None, patch_size=None,
                          patch=tuple(int(p) for p in block.patch_size), unfold_block=weakref.ref(block))
    return site


def _hf_unfold_site(site: AttentionSite, attn: nn.Module, modules: dict[str, nn.Module]) -> AttentionSite:
    """HF ``MobileViTSelfAttention`` inside its ``MobileViTLayer`` (the ``transformer`` container's owner)."""
    layer_path = site.path.partition(".transformer.")[0]
    layer = modules.get(layer_path)
    if type(layer).__name__ != "MobileViTLayer" or not hasattr(layer, "unfolding"):
        raise QKHooksError(f"unsupported attention in {site.path!r} ({type(attn).__name__}): it does not sit in a "
                           "MobileViTLayer, so how its images are unfolded into patch sequences is unknown.")
    return recast(site, UnfoldedSite, family="hf-mobilevit", grid=None, patch_size=None, num_prefix_tokens=0,
                  patch=(int(layer.patch_height), int(layer.patch_width)), unfold_block=weakref.ref(layer.conv_1x1))


timm_adapter.SITE_FINISHERS.append(unfold_site)
hf.EXTRA_FORMS["MobileViTSelfAttention"] = (frozenset(), _hf_unfold_site)
