"""Plain softmax(q·k) inside image blocks: timm NesT and TNT's inner attention, read as windows (METHODS.md C).

Both cut the patch grid into non-overlapping square blocks, no shift, no padding, blocks row-major and tokens
row-major inside each block, which is :func:`qkhooks.models.windows.window_index` of their grid (window = block,
shift 0), so their sites are :class:`~qkhooks.models.windows.WindowSite`\\ s: ``full`` maps (B, nW, H, Nw, Nw), one map
per block in the model's block order; query and key maps on the image grid (B, H, K, h·w); rows / pooled on the grid.

- **NesT** (``nest_*``, ``jx_nest_*``): ``nest.Attention`` takes (B, T, N, C), T blocks of N = b² tokens each (the
  level's ``blockify``); its own maps are (B, H, T, N, N), handed out blocks first, (B, T, H, N, N), as every windowed
  layer's. The grid of a call is the level's own rule (``deblockify``: sqrt(T) blocks per side of b tokens).
- **TNT** (``tnt_*``): the inner ``attn_in`` runs on ``pixel_embed`` (B·N_p, P, C_in): the batch axis is images x
  patches, the tokens the P = p_h·p_w "pixels" of one patch (``pixel_embed.new_patch_size``), i.e. windows of p_h x p_w
  on the (g_h·p_h, g_w·p_w) pixel grid; the outer ``attn_out`` is plain attention over the patches with the class token
  (B, 1 + g_h·g_w, C). Both have their q and k in one ``qk`` Linear. The outer attention's residual stream is the
  patch tokens after the inner update inside the block, not an input of the block: ``input="residual"`` is refused
  there (use ``"normed"``).
"""

from __future__ import annotations

import dataclasses
import math

from typing import Any

import torch
from torch import nn

from qkhooks.errors import QKHooksError
from qkhooks.models import timm as timm_adapter
from qkhooks.models.base import AttentionSite, SiteT, recast
from qkhooks.models.unsupported import MODELLED_FORMS
from qkhooks.models.windows import WindowSite, timm_qk_rows, timm_qkv_rows

__all__ = ["BlockedSite"]


@dataclasses.dataclass(eq=False)
class BlockedSite(WindowSite):
    """A window site whose module takes its blocks on their own axis, (B, T, N, C) (NesT), read as (B·T, N, C)."""

    def _as_tokens(self, x: Any) -> Any:
        if isinstance(x, torch.Tensor) and x.dim() == 4:
            return x.flatten(0, 1)
        return super()._as_tokens(x)


def _as(cls: type[SiteT], site: AttentionSite, **fields: Any) -> SiteT:
    """``site`` as a block form ``cls``: no mask, rotation, native grid or q/k Linear path unless ``fields`` set one."""
    return recast(site, cls, **dict(bias_input=None, rope_input=None, rope_apply=None, grid=None, patch_size=None,
                                    qk_modules=()) | fields)


# ---------------------------------------------------------------------------------------------------- NesT


@dataclasses.dataclass(eq=False)
class _NestSite(BlockedSite):
    """NesT: blocks of b x b tokens (N = b²) on a square grid of sqrt(T) blocks per side, the level's ``deblockify``
    rule, read off the call of the layer (its block), never guessed otherwise."""

    _block_side: int = dataclasses.field(default=0, repr=False)

    def __post_init__(self) -> None:
        self.geometry = lambda: ((self._block_side, self._block_side), (0, 0))
        self.call_grid = self._nest_grid

    def _nest_grid(self, args: tuple, kwargs: dict) -> tuple[int, int]:
        x = args[0] if args else kwargs["x"]
        blocks, tokens = int(x.shape[1]), int(x.shape[2])
        side, b = math.isqrt(blocks), math.isqrt(tokens)
        if x.dim() != 4 or side * side != blocks or b * b != tokens:
            raise QKHooksError(f"{self.path}: {blocks} blocks of {tokens} tokens are not the square grid of square "
                               "blocks NesT's deblockify assumes; qkhooks does not guess another layout.")
        self._block_side = b
        return side * b, side * b


def _nest_site(site: AttentionSite, attn: nn.Module) -> AttentionSite:
    return _as(_NestSite, site, family="timm-nest", relative_bias=None)


# ---------------------------------------------------------------------------------------------------- TNT


@dataclasses.dataclass(eq=False)
class _TntOuterSite(AttentionSite):
    def hidden_states(self, args: tuple[Any, ...], kwargs: dict[str, Any], block: bool = False) -> torch.Tensor:
        if block:
            raise QKHooksError(f"{self.path}: TNT's outer attention reads the patch tokens after the block's inner "
                               "update (inside the block), not an input of the block, so input='residual' is not "
                               "modelled there; use input='normed' (the tokens entering W_q/W_k).")
        return super().hidden_states(args, kwargs, block)


def _tnt_site(model: nn.Module, site: AttentionSite) -> AttentionSite:
    """TNT's attention with the model's pixel-embedding geometry: inner = windows of one patch's pixels, outer = the
    patches and the class token."""
    if site.family != "timm-tnt":
        return site
    embed = model.pixel_embed
    (gh, gw), (ph, pw) = (int(g) for g in embed.grid_size), (int(p) for p in embed.new_patch_size)
    if site.path.rpartition(".")[2] == "attn_out":
        return recast(site, _TntOuterSite, grid=(gh, gw), patch_size=tuple(int(p) for p in embed.patch_size),
                      num_prefix_tokens=1)
    return _as(WindowSite, site, num_prefix_tokens=0, geometry=lambda: ((ph, pw), (0, 0)),
               call_grid=lambda args, kwargs: (gh * ph, gw * pw), relative_bias=None)


def _tnt_family(site: AttentionSite, attn: nn.Module) -> AttentionSite:
    return dataclasses.replace(site, family="timm-tnt")


timm_adapter.EXTRA_FORMS["NestAttention"] = timm_adapter.ExtraForm("timm.models.nest.Attention", timm_qkv_rows, _nest_site)
timm_adapter.EXTRA_FORMS["TntAttention"] = timm_adapter.ExtraForm("timm.models.tnt.Attention", timm_qk_rows, _tnt_family)
timm_adapter.SITE_FINISHERS.append(_tnt_site)
MODELLED_FORMS.update({"timm.models.nest.Attention", "timm.models.tnt.Attention"})
