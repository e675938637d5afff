"""BoTNet's ``BottleneckAttn`` and HaloNet's ``HaloAttn``: q·k plus the query-dependent term of ``PosEmbedRel``.

timm's ``BottleneckAttn`` (``botnet*``, ``eca_botnext*``, ``sebotnet*``, ``botnet`` blocks of ``halo2botnet*``) takes an
NCHW map, projects it with a 1x1-conv ``qkv`` (q rows, then k rows, then v; heads along the channels) and computes::

    logit_h(i, j) = scale · q_i·k_j + q_i·R_h[h_j − h_i + H − 1] + q_i·R_w[w_j − w_i + W − 1]

(``scale_pos_embed``: scale · (q_i·k_j + the term)), R_h, R_w the module's ``pos_embed.height_rel`` / ``width_rel``
tables. The term is bilinear between the image's own query and a relative-position table: not a bias. As for SAM
(:mod:`qkhooks.models.relpos`), maps are rebuilt with it exactly, computed with the module's own ``pos_embed`` on the
call's q; the term is ``rec.relative_term(l)`` (B, H, N, N); the modes stay those of W_q^T W_k, exact for the content
term q·k (analyses of that one form say they are content-only). Tokens are the map's pixels, row by row, as the module
reads them; an avg-pool after the attention (stride 2) does not touch the maps.

timm's ``HaloAttn`` (``halonet*``, ``sehalonet*``, ``halo2botnet*``, ``haloregnetz*``) cuts the map into b x b query
blocks and gives each block the keys of its (b + 2·halo)² haloed window, zero-padded at the border *after* the kv
projection (a padded key is exactly 0). A strided block (``block_stride`` s > 1) takes its queries from a 1x1 conv with
stride s: the pixels (s·i, s·j), in blocks of b/s x b/s on the (H/s, W/s) query grid. Its own maps are
(B·H, nB, Q, M); a recording hands them out windows first, (B, nB, H, Q, M), as every windowed layer's. The relative
term is the module's own ``pos_embed`` on the call's blocked q (``rec.relative_term(l)``, same shape). Query maps are
on the query grid (H/s·W/s), key maps on the image grid (H·W): a key in several haloed windows has one projection.
Rows and pooled attention are refused (a query's keys are its window, not the grid). The modes stay those of
W_q^T W_k: the kv conv must have no bias, else its zero padding would be a key the form does not describe (refused).
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
from qkhooks.models.base import AttentionSite, QKRows, leading_rows, recast
from qkhooks.models.relpos import RelativeSite
from qkhooks.models.windows import WindowSite, window_index
from qkhooks.models.unsupported import MODELLED_FORMS

__all__ = ["ChannelsFirstRelativeSite", "HaloSite"]


@dataclasses.dataclass(eq=False)
class ChannelsFirstRelativeSite(RelativeSite):
    """A :class:`RelativeSite` whose module takes an NCHW map (read row by row as tokens): the call's grid is (H, W)."""

    def hidden_states(self, args: tuple[Any, ...], kwargs: dict[str, Any], block: bool = False) -> torch.Tensor:
        x = super().hidden_states(args, kwargs, block)
        raw = args[0] if args else kwargs.get(self.input_name)
        if not block and isinstance(raw, torch.Tensor) and raw.dim() == 4:
            self._call_hw = (int(raw.shape[2]), int(raw.shape[3]))
        return x

    def grid_for(self, num_tokens: int) -> tuple[int, int]:
        return self._call_hw if self._call_hw is not None else super().grid_for(num_tokens)


def _conv_qk_rows(attn: nn.Module) -> tuple[QKRows, tuple[nn.Module, ...]]:
    """q then k rows of the 1x1-conv ``qkv`` (a Linear at every pixel); modes are projected from the tokens x."""
    return leading_rows(attn.qkv, 2 * int(attn.dim_out_qk)), ()


def _bottleneck_site(site: AttentionSite, attn: nn.Module) -> AttentionSite:
    ref = weakref.ref(attn)  # a finished recording keeps no model alive

    def relative(q: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        m = ref()
        term = m.pos_embed(q)  # (B·H, N, N), the module's own PosEmbedRel on the call's q
        return term * m.scale if m.scale_pos_embed else term

    return recast(site, ChannelsFirstRelativeSite, family="timm-botnet", token_layout="channels_first", grid=None,
                  patch_size=None, qk_modules=(), bias_input=None, rope_input=None, rope_apply=None, relative=relative)


@dataclasses.dataclass(eq=False)
class HaloSite(WindowSite, RelativeSite):
    """HaloNet's blocked queries against haloed key windows, with the PosEmbedRel term (see the module docstring).

    Attributes:
        block, halo, stride: the query block b, the halo and the query stride s, read from the module.
    """

    halo_block: int = 8
    halo: int = 0
    query_stride: int = 1

    def context_hooks(self) -> list[tuple[nn.Module, Callable]]:
        return []  # the grid is the module's own input's, read in hidden_states

    def window_index(self) -> torch.Tensor:
        """(nB, Q) row-major index on the (H/s, W/s) query grid of every query block position."""
        if self._grid_of_call is None:
            raise QKHooksError(f"{self.path}: rebuild maps of this layer inside a recording of a model call.")
        if self._index is None:
            (h, w), s = self._grid_of_call, self.query_stride
            self._index = window_index((h // s, w // s), *self.geometry(), False)  # type: ignore[misc]
        return self._index

    def key_window_index(self) -> torch.Tensor:
        """(nB, M) row-major index on the (H, W) grid of every key of every haloed window (-1: zero padding)."""
        (h, w), b, halo = self._grid_of_call, self.halo_block, self.halo  # type: ignore[misc]
        grid = torch.nn.functional.pad(torch.arange(h * w).view(1, h, w), (halo, halo, halo, halo), value=-1)[0]
        win = b + 2 * halo
        return grid.unfold(0, win, b).unfold(1, win, b).reshape(-1, win * win)

    def hidden_states(self, args: tuple[Any, ...], kwargs: dict[str, Any], block: bool = False) -> torch.Tensor:
        if block:
            return WindowSite.hidden_states(self, args, kwargs, block)  # refused: windows have no residual stream
        raw = args[0] if args else kwargs[self.input_name]
        b = self.halo_block
        if raw.dim() != 4 or raw.shape[2] % b or raw.shape[3] % b:
            raise QKHooksError(f"{self.path}: expected an NCHW map whose sides are multiples of the block {b}, got "
                               f"{tuple(raw.shape)}.")
        self._grid_of_call, self._index = (int(raw.shape[2]), int(raw.shape[3])), None
        x = AttentionSite.hidden_states(self, args, kwargs)  # (B, H·W, d); its key windows by key_tokens
        (h, w), s = self._grid_of_call, self.query_stride
        queries = x.unflatten(1, (h, w))[:, ::s, ::s].flatten(1, 2)  # the pixels the strided q conv reads
        index = to_device(self.window_index(), x.device)
        queries = queries[:, index.flatten()].reshape(-1, index.shape[1], x.shape[-1])  # (B·nB, Q, d)
        self._call_images, self._call_tokens, self._term = int(x.shape[0]), queries, None
        return queries

    def haloed_keys(self, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        """The tokens of every haloed key window (B·nB, M, d), zero where the model pads (its padded keys are 0)."""
        index = to_device(self.key_window_index(), x.device)
        padded = torch.cat([x, x.new_zeros(x.shape[0], 1, x.shape[-1])], dim=1)  # token -1: a zero token
        return padded[:, index.flatten()].reshape(-1, index.shape[1], x.shape[-1])

    def relative_term(self) -> torch.Tensor | None:
        """(B·nB, H, Q, M): the module's own ``pos_embed`` on the call's q blocks, laid out as the module does."""
        if self._term is None:
            if self._call_tokens is None:
                raise QKHooksError(f"{self.path}: its relative-position term is computed from the attention call's "
                                   "queries; rebuild maps of this layer inside a recording of a model call.")
            x, heads = self._call_tokens, self.num_heads
            w, bias = self.qk_linear()
            rows = heads * self.head_dim
            with torch.no_grad():
                q = torch.nn.functional.linear(x, w[:rows].to(x.dtype), None if bias is None else bias[:rows].to(x.dtype))
                q = q.unflatten(-1, (heads, self.head_dim)).transpose(1, 2)  # (B·nB, H, Q, d_k)
                q = q.unflatten(0, (self._call_images, -1)).transpose(1, 2).flatten(0, 1)  # (B·H, nB, Q, d_k)
                term = self.relative(q, self._grid_of_call)  # type: ignore[misc]
            self._term = term.unflatten(0, (self._call_images, heads)).transpose(1, 2).flatten(0, 1).detach()
        return self._term

    def to_images(self, kind: str, t: torch.Tensor) -> torch.Tensor:
        if kind == "modes" and t.shape[-1] != self.window_index().shape[1]:  # key maps: haloed windows -> image grid
            index = self.key_window_index()
            flat = t.unflatten(0, (-1, index.shape[0])).permute(0, 2, 3, 1, 4).flatten(3)
            where = torch.empty(self._grid_of_call[0] * self._grid_of_call[1], dtype=torch.long)  # type: ignore[index]
            valid = index.flatten() >= 0
            where[index.flatten()[valid].flip(0)] = torch.arange(index.numel())[valid].flip(0)  # first occurrence
            return flat[..., to_device(where, flat.device)]
        if kind not in ("full", "modes"):
            self.check_attention_kind(kind)
        return super().to_images(kind, t)

    def check_attention_kind(self, kind: str) -> None:
        if kind != "full":
            raise QKHooksError(f"{self.path}: HaloNet's queries attend to their haloed window, not the grid, so it "
                               f"gives full maps per block (attention='full'); {kind!r} attention is not built for it.")

    def grid_for(self, num_tokens: int) -> tuple[int, int]:
        if self._grid_of_call is None:
            return super().grid_for(num_tokens)
        return self._grid_of_call[0] // self.query_stride, self._grid_of_call[1] // self.query_stride

    def reduced_key_grid(self, grid: tuple[int, int] | None, key_tokens: int) -> tuple[int, int] | None:
        """The key maps' grid (run-file geometry): the call's own (H, W) map, which a strided block's query grid
        (H/s, W/s) is not; None when the call's map does not have ``key_tokens`` pixels."""
        if self._grid_of_call is None or self._grid_of_call[0] * self._grid_of_call[1] != key_tokens:
            return None
        return self._grid_of_call

    def forget_call(self) -> None:
        super().forget_call()
        self._index = None


def _halo_qk_rows(attn: nn.Module) -> tuple[QKRows, tuple[nn.Module, ...]]:
    """q rows (the ``q`` 1x1 conv) then k rows: the ``kv`` conv's channels are per head, [k_h (d_k), v_h (d_v)]."""
    q, kv, heads, dk = attn.q, attn.kv, int(attn.num_heads), int(attn.dim_head_qk)

    def keys(t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(0, (heads, -1))[:, :dk].flatten(0, 1)

    def reader() -> tuple[torch.Tensor, torch.Tensor | None]:
        w = torch.cat([q.weight.flatten(1), keys(kv.weight.flatten(1))])
        return w, None if q.bias is None else torch.cat([q.bias, keys(kv.bias)])

    return reader, ()


def _halo_site(site: AttentionSite, attn: nn.Module) -> AttentionSite:
    if attn.kv.bias is not None:
        raise QKHooksError(f"unsupported attention in {site.path!r} ({type(attn).__name__}): its kv conv has a bias and "
                           "the module zero-pads the keys after it, so a padded key is 0, not W_k·0 + b_k: a key the "
                           "content form does not describe; not modelled.")
    ref = weakref.ref(attn)

    def relative(q: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        m = ref()
        term = m.pos_embed(q)  # (B·H, nB, Q, M), the module's own PosEmbedRel on the call's blocked q
        return term * m.scale if m.scale_pos_embed else term

    blocked = int(attn.block_size) // int(attn.block_stride)  # a query block's side on the query grid
    out = recast(site, HaloSite, family="timm-halo", token_layout="channels_first", grid=None, patch_size=None,
                 qk_modules=(), bias_input=None, rope_input=None, rope_apply=None, relative=relative,
                 relative_bias=None, halo_block=int(attn.block_size), halo=int(attn.halo_size),
                 query_stride=int(attn.block_stride), geometry=lambda: ((blocked, blocked), (0, 0)))
    out.key_tokens = out.haloed_keys
    return out


timm_adapter.EXTRA_FORMS["HaloAttn"] = timm_adapter.ExtraForm(
    "timm.layers.halo_attn.HaloAttn", _halo_qk_rows, _halo_site)
timm_adapter.EXTRA_FORMS["BottleneckAttn"] = timm_adapter.ExtraForm(
    "timm.layers.bottleneck_attn.BottleneckAttn", _conv_qk_rows, _bottleneck_site)
MODELLED_FORMS.update({"timm.layers.bottleneck_attn.BottleneckAttn", "timm.layers.bottleneck_attn.PosEmbedRel",
                       "timm.layers.halo_attn.HaloAttn", "timm.layers.halo_attn.PosEmbedRel"})
