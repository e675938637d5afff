"""Windowed attention: timm Swin (v1, ``swin_*``) and HF ``SwinModel`` (METHODS.md C, "windows").

The block rolls its (H, W) token grid by the shift, pads it to whole windows and calls the attention once on
all windows, stacked along the batch axis: (B·nW, Nw, d). Within a window the content form is the plain
W_q^T W_k; the model's own relative-position table (per window offset) and its shift mask (per window) are the
additive term, rebuilt here from the module's own table and the very mask the block hands the attention.

What a recording gives for such a layer:

- ``full`` maps: the model's own (B·nW, H, Nw, Nw) attention, its batch axis split per image: (B, nW, H, Nw, Nw),
  windows in the model's order (row-major over the shifted, padded grid), shift masks applied;
- query and key maps: on the image grid, (B, H, K, H·W) in row-major grid order, as if the tokens had not been
  windowed (a token's map is x·u_n wherever the model put it);
- ``rows`` / ``pooled``: on the image grid, (B, H, T, H·W): a token's row is the model's own row in its window,
  placed at its keys' grid positions (zero elsewhere); refused for a call whose grid is padded to whole windows (the
  padding tokens take a share of each row that has no grid position).

Swin-v2 (cosine attention: L2-normalised q and k, a learned logit scale, a log-CPB MLP) uses these windows with
its own normalisation and bias (:mod:`qkhooks.models.cosine`). The block's grid is read from the block's own call (``AttentionSite.context_hooks``).
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any, Callable

import torch
from torch import nn

from qkhooks._devices import to_device
from qkhooks.errors import QKHooksError
from qkhooks.models import hf
from qkhooks.models import timm as timm_adapter
from qkhooks.models.base import AttentionSite, QKRows, additive_mask, as_pair, leading_rows, recast
from qkhooks.models.unsupported import MODELLED_FORMS

__all__ = ["WindowSite", "window_index"]


def window_index(grid: tuple[int, int], window: tuple[int, int], shift: tuple[int, int], pad_first: bool,
                 partition: str = "window") -> torch.Tensor:
    """(nW, Nw) row-major grid index of the token the model puts at each window position (-1: padding).

    ``partition="window"``: the same roll (by -shift) and padding (bottom and right, to whole windows) the block
    applies, in its order (timm rolls then pads, transformers pads then rolls), then the windows read row-major.
    ``partition="grid"`` (MaxViT's grid attention): ``window`` is the (g_h, g_w) grid of one partition, whose tokens
    are H/g_h rows and W/g_w columns apart; partition (a, b) holds the tokens (a + i·H/g_h, b + j·W/g_w)."""
    (h, w), (wh, ww) = grid, window
    if partition == "grid":
        if h % wh or w % ww or any(shift):
            raise QKHooksError(f"a {h}x{w} grid does not split into grid partitions of {wh}x{ww} without a shift.")
        return torch.arange(h * w).view(wh, h // wh, ww, w // ww).permute(1, 3, 0, 2).reshape(-1, wh * ww)
    hp, wp = -(-h // wh) * wh, -(-w // ww) * ww
    index = torch.arange(h * w).view(h, w)

    def pad(t: torch.Tensor) -> torch.Tensor:
        out = torch.full((hp, wp), -1, dtype=torch.long)
        out[: t.shape[0], : t.shape[1]] = t
        return out

    def roll(t: torch.Tensor) -> torch.Tensor:
        return torch.roll(t, shifts=(-shift[0], -shift[1]), dims=(0, 1)) if any(shift) else t

    index = roll(pad(index)) if pad_first else pad(roll(index))
    return index.view(hp // wh, wh, wp // ww, ww).permute(0, 2, 1, 3).reshape(-1, wh * ww)


@dataclasses.dataclass(eq=False)
class WindowSite(AttentionSite):
    """An attention site whose module sees windows: its block's grid and window geometry make the maps per image.

    Attributes:
        geometry: ``() -> (window, shift)`` read live from the block (transformers shrinks them for small inputs).
        call_grid: ``(block args, block kwargs) -> (H, W)``: the token grid of the block's call.
        relative_bias: ``() -> (1, H, Nw, Nw)``: the module's own relative-position term (None: it has none).
        pad_first: the block pads before rolling (transformers) rather than after (timm).
        mask_repeats: how many times the module adds the shift mask it is handed (transformers' Swin-v2: twice).
        partition: ``"window"`` (contiguous windows) or ``"grid"`` (MaxViT's dilated grid), see :func:`window_index`.
        windows_inside: the module takes the image-grid tokens (B, H·W, d) and cuts the windows itself (Twins'
            ``LocallyGroupedAttn``, zero padding to whole windows): the site cuts the same windows from its input.
    """

    geometry: Callable[[], tuple[tuple[int, int], tuple[int, int]]] | None = None
    call_grid: Callable[[tuple, dict], tuple[int, int]] | None = None
    relative_bias: Callable[[], torch.Tensor] | None = None
    pad_first: bool = False
    mask_repeats: int = 1
    partition: str = "window"
    windows_inside: bool = False
    _grid_of_call: tuple[int, int] | None = dataclasses.field(default=None, repr=False)
    _index: torch.Tensor | None = dataclasses.field(default=None, repr=False)
    _call_images: int = dataclasses.field(default=0, repr=False)

    def context_hooks(self) -> list[tuple[nn.Module, Callable]]:
        def note_grid(module: nn.Module, args: tuple, kwargs: dict) -> None:
            self._grid_of_call = self.call_grid(args, kwargs)  # type: ignore[misc]
            self._index = None

        return [(self.block, note_grid)]

    def window_index(self) -> torch.Tensor:
        """(nW, Nw) grid index of every window position in the call being recorded (-1: padding)."""
        if self._grid_of_call is None:
            raise QKHooksError(f"{self.path}: its block was not seen running, so the window layout is unknown; "
                               "record the whole model (or the block), not the attention module alone.")
        if self._index is None:
            window, shift = self.geometry()  # type: ignore[misc]
            self._index = window_index(self._grid_of_call, window, shift, self.pad_first, self.partition)
        return self._index

    def images_in_call(self, rows: int) -> int:
        windows = self.window_index().shape[0]
        if rows % windows:
            raise QKHooksError(f"{self.path}: {rows} windows in the call do not split into images of {windows} windows.")
        return rows // windows

    def to_images(self, kind: str, t: torch.Tensor) -> torch.Tensor:
        index = self.window_index()
        if kind == "full":  # (B·nW, H, Nw, Nw) -> (B, nW, H, Nw, Nw)
            return t.unflatten(0, (-1, index.shape[0]))
        if kind == "modes":  # (B·nW, H, K, Nw) -> (B, H, K, H·W) in grid order
            flat = t.unflatten(0, (-1, index.shape[0])).permute(0, 2, 3, 1, 4).flatten(3)
            valid = index.flatten() >= 0
            where = torch.empty(int(valid.sum()), dtype=torch.long)
            where[index.flatten()[valid]] = torch.arange(index.numel())[valid]
            return flat[..., to_device(where, flat.device)]
        return t

    def attention_rows(self, x: torch.Tensor, query_tokens: torch.Tensor) -> torch.Tensor:
        """Rows (B, H, T, H·W) on the image grid of the query tokens (B, T) (row-major grid indices): each the model's
        own row in the token's window, placed at its keys' grid positions, zero outside the window. Refused where the
        windows are padded: the zero tokens the model pads with take a share of the rows, with no grid position."""
        from qkhooks.attention import attention_full, refuse_non_index_tokens

        host_index = self.window_index()
        if bool((host_index < 0).any()):  # checked on the host: no device sync
            raise QKHooksError(f"{self.path}: this call's {self._grid_of_call} grid is padded to whole windows, and the "
                               "padding tokens take a share of each row that has no place on the image grid, so rows and "
                               "pooled attention are not exact here; record attention='full' (per window), or use an input "
                               "whose grid the windows tile.")
        refuse_non_index_tokens(query_tokens)
        tokens = query_tokens.long()  # checked where it is (the host, unless the caller put it on the device)
        if tokens.dim() == 1:
            tokens = tokens[None].expand(self.images_in_call(int(x.shape[0])), -1)
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= host_index.numel()):
            raise QKHooksError(f"query_tokens must index the {host_index.numel()} grid tokens of {self.path}, got "
                               f"{tokens.tolist()}.")
        index, tokens = to_device(host_index, x.device), to_device(tokens, x.device)
        cells, per_window = index.shape
        full = attention_full(self, x).unflatten(0, (-1, cells))  # (B, nW, H, Nw, Nw)
        where = torch.empty(index.numel(), dtype=torch.long, device=x.device)
        where[index.flatten()] = torch.arange(index.numel(), device=x.device)
        at = where[tokens]  # (B, T): flat window position of each query token
        window, position = at // per_window, at % per_window
        rows = full[torch.arange(full.shape[0], device=x.device)[:, None], window, :, position, :]  # (B, T, H, Nw)
        out = rows.new_zeros(*rows.shape[:3], index.numel())
        out.scatter_(-1, index[window][:, :, None, :].expand(-1, -1, rows.shape[2], -1), rows)
        return out.transpose(1, 2)

    def grid_for(self, num_tokens: int) -> tuple[int, int]:
        return self._grid_of_call if self._grid_of_call is not None else super().grid_for(num_tokens)

    def rows_layout(self, num_tokens: int) -> tuple[int, tuple[int, ...]]:
        """Rows index the block's grid of the call (no prefix token), whatever a window's token count ``num_tokens``."""
        self.window_index()  # refuses when the block was not seen running
        return 0, tuple(int(v) for v in self._grid_of_call)  # type: ignore[union-attr]

    def logit_bias(self) -> torch.Tensor | None:
        """(B·nW or 1, H, Nw, Nw): the module's relative-position table plus the call's shift mask, if any."""
        bias = None if self.relative_bias is None else self.relative_bias().detach()
        mask = additive_mask(self._call_bias)
        if mask is None:
            return bias
        windows = mask.shape[0]
        mask = self.mask_repeats * mask.to(torch.float32 if bias is None else bias.dtype).reshape(windows, 1, *mask.shape[-2:])
        bias = mask if bias is None else bias + mask
        images = self._call_images if self._call_images else 1
        return bias.repeat(images, 1, 1, 1)

    def refuse_unmodelled_inputs(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        # every modelled class takes the shift mask as its second parameter (timm ``mask``, transformers
        # ``attention_mask``), which transformers passes by position (Swin-v2 with ``output_attentions`` after it)
        if len(args) >= 2 and self.bias_input is not None and self.bias_input not in kwargs:
            args, kwargs = args[:1] + args[2:], {**kwargs, self.bias_input: args[1]}
        super().refuse_unmodelled_inputs(args, kwargs)

    def hidden_states(self, args: tuple[Any, ...], kwargs: dict[str, Any], block: bool = False) -> torch.Tensor:
        if block:
            raise QKHooksError(f"{self.path}: input='residual' is not modelled for windowed attention (the residual "
                               "stream is on the image grid, the attention's tokens are windows); use input='normed'.")
        x = super().hidden_states(args, kwargs, block)
        if self.windows_inside:  # (B, H·W, d) -> (B·nW, Nw, d), zeros where the model pads
            index = to_device(self.window_index(), x.device)
            padded = torch.cat([x, x.new_zeros(x.shape[0], 1, x.shape[-1])], dim=1)  # token -1: a zero token
            x = padded[:, index.flatten()].reshape(-1, index.shape[1], x.shape[-1])
        self._call_images = self.images_in_call(int(x.shape[0]))
        return x


# ---------------------------------------------------------------------------------------------------- timm


def timm_qkv_rows(attn: nn.Module) -> tuple[QKRows, tuple[nn.Module, ...]]:
    """(qk_linear, qk_modules) of a timm module with a fused ``qkv`` Linear whose output is q, k, v (a third each)."""
    rows = int(attn.num_heads) * (int(attn.qkv.out_features) // 3 // int(attn.num_heads))
    return leading_rows(attn.qkv, 2 * rows), (attn.qkv,)


def timm_qk_rows(attn: nn.Module) -> tuple[QKRows, tuple[nn.Module, ...]]:
    """The whole ``qk`` Linear of a module that makes q and k in one and v apart (TNT, ConViT's GPSA): q rows, then k."""
    return leading_rows(attn.qk, attn.qk.out_features), (attn.qk,)


def _timm_swin_site(site: AttentionSite, attn: nn.Module) -> AttentionSite:
    block = site.block
    if getattr(block, "dynamic_mask", False):
        raise QKHooksError(f"unsupported attention in {site.path!r} ({type(attn).__name__}): its block builds the shift "
                           "mask per call (dynamic_mask), a window layout qkhooks does not model.")

    def call_grid(args: tuple, kwargs: dict) -> tuple[int, int]:
        x = args[0] if args else kwargs["x"]
        return int(x.shape[1]), int(x.shape[2])  # (B, H, W, C)

    block_ref, attn_ref = weakref.ref(block), weakref.ref(attn)  # a finished recording keeps no model alive
    return recast(
        site, WindowSite, family="timm-swin", bias_input="mask", rope_input=None, rope_apply=None, grid=None,
        patch_size=None, geometry=lambda: (as_pair(block_ref().window_size), as_pair(block_ref().shift_size)),
        call_grid=call_grid, relative_bias=lambda: attn_ref()._get_rel_pos_bias(), pad_first=False)


timm_adapter.EXTRA_FORMS["SwinWindowAttention"] = timm_adapter.ExtraForm(
    "timm.models.swin_transformer.WindowAttention", timm_qkv_rows, _timm_swin_site)
MODELLED_FORMS.update({"timm.models.swin_transformer.WindowAttention", "timm.models.swin_transformer.SwinTransformerBlock"})


# ------------------------------------------------------------------------------------------- transformers
def _hf_swin_site(site: AttentionSite, module: nn.Module, modules: dict[str, nn.Module]) -> AttentionSite:
    """transformers 5 ``SwinAttention`` (q/k/v projections and a ``SwinRelativePositionBias`` child)."""
    block = site.block
    if type(module.relative_position_bias).__name__ != "SwinRelativePositionBias":
        raise QKHooksError(f"unsupported attention in {site.path!r} ({type(module).__name__}): its relative position term "
                           f"is a {type(module.relative_position_bias).__name__}, not the table qkhooks models.")

    def call_grid(args: tuple, kwargs: dict) -> tuple[int, int]:
        dims = args[1] if len(args) > 1 else kwargs["input_dimensions"]
        return int(dims[0]), int(dims[1])

    block_ref, module_ref = weakref.ref(block), weakref.ref(module)  # a finished recording keeps no model alive
    return recast(
        site, WindowSite, family="hf-swin", bias_input="attention_mask", grid=None, patch_size=None, geometry=lambda: (as_pair(block_ref().window_size), as_pair(block_ref().shift_size)),
        call_grid=call_grid, relative_bias=lambda: module_ref().relative_position_bias(), pad_first=True)


hf.EXTRA_FORMS["SwinAttention"] = (frozenset({"relative_position_bias"}), _hf_swin_site)
MODELLED_FORMS.add("SwinAttention")


def _hf_maskformer_swin_site(site: AttentionSite, module: nn.Module, modules: dict[str, nn.Module]) -> AttentionSite:
    """transformers ``MaskFormerSwinSelfAttention`` (MaskFormer's Swin v1 backbone): query/key/value and its own
    ``relative_position_bias_table`` read at ``relative_position_index``; padded, then rolled, like ``SwinModel``."""
    block_ref, module_ref = weakref.ref(site.block), weakref.ref(module)
    heads = site.num_heads

    def relative_bias() -> torch.Tensor:
        m = module_ref()
        area = m.window_size[0] * m.window_size[1]
        return m.relative_position_bias_table[m.relative_position_index.view(-1)].view(area, area, heads).permute(2, 0, 1)[None]

    def call_grid(args: tuple, kwargs: dict) -> tuple[int, int]:
        dims = args[1] if len(args) > 1 else kwargs["input_dimensions"]
        return int(dims[0]), int(dims[1])

    return recast(
        site, WindowSite, family="hf-maskformer-swin", bias_input="attention_mask", grid=None, patch_size=None,
        geometry=lambda: (as_pair(block_ref().window_size), as_pair(block_ref().shift_size)),
        call_grid=call_grid, relative_bias=relative_bias, pad_first=True)


hf.EXTRA_FORMS["MaskFormerSwinSelfAttention"] = (frozenset({"relative_position_bias_table"}), _hf_maskformer_swin_site)
MODELLED_FORMS.update({"MaskFormerSwinSelfAttention", "MaskFormerSwinAttention", "MaskFormerSwinLayer"})


# ---------------------------------------------------------------------------------- timm MaxViT / CoAtNet
def _maxxvit_qkv(attn: nn.Module):
    """q then k rows of MaxViT's ``qkv`` (Linear, or 1x1 Conv2d in the NCHW variants). ``head_first`` lays the
    outputs out per head as [q_h, k_h, v_h], else as [q, k, v]; the rows are picked in q-then-k order, so the q/k
    output of the module itself is not used (modes are projected from the tokens)."""
    heads, dh = int(attn.num_heads), int(attn.dim_head)
    blocks = torch.arange(3 * heads * dh).view(heads, 3, dh) if attn.head_first else torch.arange(3 * heads * dh).view(3, heads, dh).transpose(0, 1)
    rows = torch.cat([blocks[:, 0].flatten(), blocks[:, 1].flatten()])
    qkv = attn.qkv

    def qk_linear() -> tuple[torch.Tensor, torch.Tensor | None]:
        at = to_device(rows, qkv.weight.device)
        return qkv.weight.flatten(1)[at], None if qkv.bias is None else qkv.bias[at]

    return qk_linear, ()


def maxxvit_relative_bias(site: AttentionSite, attn: nn.Module) -> Callable[[], torch.Tensor] | None:
    """The module's own ``rel_pos.get_bias()`` (RelPosBias, RelPosBiasTf, RelPosMlp: each adds exactly that)."""
    from timm.layers.pos_embed_rel import RelPosBias, RelPosBiasTf, RelPosMlp

    rel_pos = attn.rel_pos
    if rel_pos is None:
        return None
    if type(rel_pos).forward not in (RelPosBias.forward, RelPosBiasTf.forward, RelPosMlp.forward):
        raise QKHooksError(f"unsupported attention in {site.path!r} ({type(attn).__name__}): its relative position term "
                           f"is a {type(rel_pos).__name__}, not one qkhooks models (RelPosBias, RelPosBiasTf, RelPosMlp).")
    rel_ref = weakref.ref(rel_pos)

    def bias() -> torch.Tensor:  # (1, H, N, N): RelPosBiasTf returns it without the leading axis
        term = rel_ref().get_bias()
        return term if term.dim() == 4 else term[None]

    return bias


@dataclasses.dataclass(eq=False)
class _WholeMapSite(AttentionSite):
    """CoAtNet's attention over the whole (B, C, H, W) map: its block's ``norm1`` may downsample (stride 2), so the
    block's input is not on the attention's grid and ``input='residual'`` is refused."""

    def hidden_states(self, args: tuple[Any, ...], kwargs: dict[str, Any], block: bool = False) -> torch.Tensor:
        if block:
            raise QKHooksError(f"{self.path}: input='residual' is not modelled for CoAtNet's attention (its block's norm "
                               "may downsample, so the residual stream is not on the attention's token grid); use "
                               "input='normed'.")
        return super().hidden_states(args, kwargs, block)


def _maxxvit_site(site: AttentionSite, attn: nn.Module) -> AttentionSite:
    """MaxViT's block (window) and grid partition attention, and CoAtNet's whole-map attention (TransformerBlock2d)."""
    from timm.models import maxxvit

    block = site.block
    channels_first = type(attn).forward is maxxvit.Attention2d.forward
    relative_bias = maxxvit_relative_bias(site, attn)
    fields = dict(family="timm-maxxvit", grid=None, patch_size=None, qk_modules=(),
                  token_layout="channels_first" if channels_first else "grid")
    if isinstance(block, maxxvit.TransformerBlock2d):  # one attention over the whole (B, C, H, W) map
        def call_bias(args: tuple, kwargs: dict) -> torch.Tensor | None:
            if (len(args) > 1 and args[1] is not None) or kwargs.get("shared_rel_pos") is not None:
                raise QKHooksError(f"unsupported attention in {site.path!r} ({type(attn).__name__}): the model passes "
                                   "it a shared relative position table, which the MaxViT adapter does not model.")
            return None if relative_bias is None else relative_bias().detach()

        return recast(site, _WholeMapSite, **fields, call_bias=call_bias)
    if isinstance(block, (maxxvit.PartitionAttentionCl, maxxvit.PartitionAttention2d)):
        partition = "window" if block.partition_block else "grid"
    elif isinstance(block, maxxvit.ParallelPartitionAttention):
        partition = "window" if attn is block.attn_block else "grid"
    else:
        raise QKHooksError(f"unsupported attention in {site.path!r} ({type(attn).__name__}): it sits in a "
                           f"{type(block).__name__}, a partition layout qkhooks does not model.")
    block_ref = weakref.ref(block)

    def call_grid(args: tuple, kwargs: dict) -> tuple[int, int]:
        x = args[0] if args else kwargs["x"]
        return (int(x.shape[2]), int(x.shape[3])) if channels_first else (int(x.shape[1]), int(x.shape[2]))

    return recast(
        site, WindowSite, **fields, geometry=lambda: (as_pair(block_ref().partition_size), (0, 0)), call_grid=call_grid,
        relative_bias=relative_bias, partition=partition)


for _name in ("AttentionCl", "Attention2d"):
    timm_adapter.EXTRA_FORMS[f"Maxxvit{_name}"] = timm_adapter.ExtraForm(
        f"timm.models.maxxvit.{_name}", _maxxvit_qkv, _maxxvit_site)
MODELLED_FORMS.update({"timm.models.maxxvit.AttentionCl", "timm.models.maxxvit.Attention2d"})


# -------------------------------------------------------------------------- timm Twins locally grouped attention


def _twins_lsa_site(site: AttentionSite, attn: nn.Module) -> AttentionSite:
    """``LocallyGroupedAttn``: (B, H·W, d) tokens and their ``size`` in, windows of ``ws`` cut inside (zero padding at
    the bottom and right, no shift, no mask, no bias): its qkv runs on the windowed tensor, so modes come from the
    tokens the site windows the same way."""
    attn_ref = weakref.ref(attn)

    def call_grid(args: tuple, kwargs: dict) -> tuple[int, int]:
        size = args[1] if len(args) > 1 else kwargs["size"]
        return int(size[0]), int(size[1])

    return recast(site, WindowSite, family="timm-twins", grid=None, patch_size=None, qk_modules=(),
                  geometry=lambda: (as_pair(attn_ref().ws), (0, 0)), call_grid=call_grid, windows_inside=True)


timm_adapter.EXTRA_FORMS["LocallyGroupedAttn"] = timm_adapter.ExtraForm(
    "timm.models.twins.LocallyGroupedAttn", timm_qkv_rows, _twins_lsa_site)
MODELLED_FORMS.add("timm.models.twins.LocallyGroupedAttn")
