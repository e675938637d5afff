"""GCViT (timm ``gcvit_*``): local window blocks exact; global-query blocks maps only (METHODS.md C, windows).

Each stage alternates a local block (``WindowAttentionGlobal`` with ``use_global=False``: qkv of the window's tokens,
softmax(scale·q·k + RelPosBias) per window, no shift, no padding) and a global block, whose queries are the stage's
``GlobalContext`` tokens (a function of the whole feature map, made once per stage, repeated over the windows) and
whose qkv makes only keys and values. The local blocks are windowed sites of :mod:`qkhooks.models.windows` with the
module's own relative-position table; the block hands every block the global query tokens, which a local block
ignores (timm: ``if self.use_global and q_global is not None``), so the site accepts that argument there only.

The global blocks have no W_q: their logits are q_global·W_k x, so W_q^T W_k does not exist and no mode of the
layer's tokens describes the query side. They are maps-only sites (:mod:`qkhooks.models.inside`): full maps
(B, nW, H, Nw, Nw), windows in the model's order, are the module's own softmax(scale·q_global·k + RelPosBias) taken
in its forward; ``record(modes=...)`` on them is refused naming the layer (``modes=0`` records them).
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any

from torch import nn

from qkhooks.models import timm as timm_adapter
from qkhooks.models.base import AttentionSite, as_pair, recast
from qkhooks.models.inside import InsideSite
from qkhooks.models.unsupported import MODELLED_FORMS
from qkhooks.models.windows import WindowSite, maxxvit_relative_bias, timm_qkv_rows


@dataclasses.dataclass(eq=False)
class LocalWindowSite(WindowSite):
    """A GCViT local block: the call's ``q_global`` (argument 1 or keyword) is handed to every block of the stage and
    ignored by a module built with ``use_global=False``, so it is no term of these logits; anything else is refused."""

    def refuse_unmodelled_inputs(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        super().refuse_unmodelled_inputs(args[:1] + args[2:], {k: v for k, v in kwargs.items() if k != "q_global"})


@dataclasses.dataclass(eq=False)
class GlobalQueryWindowSite(InsideSite, LocalWindowSite):
    """A GCViT global block: the stage's global query tokens (``q_global``) against the keys of each window; maps
    observed in the module's forward, per image and window as for the local blocks; no modes (no W_q)."""


_GLOBAL_QUERIES = ("its queries are the stage's global query tokens (q_global, made by the stage's GlobalContext "
                   "generator from the whole feature map and repeated over the windows), not a projection of the "
                   "layer's tokens, so the logits q_global·W_k x have no W_q and the content form W_q^T W_k does not exist")


def _gcvit_site(site: AttentionSite, attn: nn.Module) -> AttentionSite | None:
    """Local blocks: windows of ``block.window_size`` over the block's (B, H, W, C) input; global blocks: the same
    windows, maps only (:class:`GlobalQueryWindowSite`)."""
    block_ref = weakref.ref(site.block)  # a finished recording keeps no model alive

    def call_grid(args: tuple, kwargs: dict) -> tuple[int, int]:
        x = args[0] if args else kwargs["x"]
        return int(x.shape[1]), int(x.shape[2])

    window = dict(family="timm-gcvit", grid=None, patch_size=None, num_prefix_tokens=0,
                  geometry=lambda: (as_pair(block_ref().window_size), (0, 0)), call_grid=call_grid,
                  relative_bias=maxxvit_relative_bias(site, attn), pad_first=False)
    if not attn.use_global:
        return recast(site, LocalWindowSite, **window)
    return recast(site, GlobalQueryWindowSite, **window | dict(qk_modules=(), head_dim=int(attn.head_dim),
                                                                family="timm-gcvit-global"), inside=_GLOBAL_QUERIES)


timm_adapter.EXTRA_FORMS["GcvitWindowAttentionGlobal"] = timm_adapter.ExtraForm(
    "timm.models.gcvit.WindowAttentionGlobal", timm_qkv_rows, _gcvit_site)
MODELLED_FORMS.update({"timm.models.gcvit.WindowAttentionGlobal", "timm.models.gcvit.GlobalContextVitBlock"})
