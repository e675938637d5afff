"""LeViT-style attention: q/k from a Linear or 1x1 conv followed by BatchNorm, position-indexed biases, and tokens the
module prepares itself before W_q/W_k (METHODS.md C: additive biases, different key tokens), taught to the timm adapter:

- timm LeViT ``Attention`` (``LinearNorm`` / ``ConvNorm`` qkv) and ``AttentionDownsample``, whose queries come from
  the subsampled grid (``q.down``: every ``stride``-th token, or a 3x3 average pool) while the keys are every token;
- timm SHViT ``SHSA``: one head on the first ``pdim`` channels of an NCHW map after the module's own ``pre_norm``;
- timm EfficientFormer-v2 ``Attention2d`` (talking heads: a 1x1 conv over heads before the softmax, after the bias,
  and one after it, rebuilt with the model's own convs; :func:`qkhooks.models.class_attention.mixed_spectrum` gives
  the exact modes of the mixed logits) and ``Attention2dDownsample`` (queries from a strided depthwise conv plus a
  strided pool);
- timm TinyViT ``Attention``: windows cut by its block (:class:`qkhooks.models.windows.WindowSite`: maps per window
  in the model's order, modes on the image grid), the module's own LayerNorm before qkv, a bias per window offset.

In eval mode BatchNorm is one affine map per channel, so Linear + BN is the Linear with W' = diag(γ/√(σ²+ε)) W and
b' = β − μ γ/√(σ²+ε) (:func:`fold_batchnorm`, as timm's own ``fuse`` does): W_q, W_k, b_q, b_k are the folded ones,
read live. In training mode BN uses each batch's own statistics, which no fixed W_q, W_k describe: the recording is
refused then. The bias B_h[idx(i, j)] (the module's ``get_attention_biases``) is position-only: rebuilt maps add it and
``run.bias(l)`` returns it, as for EfficientFormer (:mod:`qkhooks.models.biased`).

Where the module prepares its tokens (a subsampled query grid, SHViT's normalised channel slice), the site hooks the
module's call and computes, with the model's own modules, the tokens that enter W_q (the site's ``x``: query maps,
rows) and W_k (:attr:`AttentionSite.key_tokens`): maps are (B, H, N_q, N_k), the model's shape, and the modes of
W_q^T W_k rebuild the content logits exactly between those tokens.
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
from qkhooks.models.base import AttentionSite, recast
from qkhooks.models.biased import bias_of_call, per_head_rows, refuse_training_batchnorm
from qkhooks.models.windows import WindowSite
from qkhooks.models.unsupported import MODELLED_FORMS

__all__ = ["fold_batchnorm", "PreparedSite"]

Reader = Callable[[], tuple[torch.Tensor, torch.Tensor]]


def class_label(attn: nn.Module) -> str:
    """The attention class, fully named: the q/k readers see the module, not its path in the model."""
    return f"{type(attn).__module__}.{type(attn).__qualname__}"


def _projection(path: str, norm: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(the Linear or conv, its BatchNorm) of a LeViT ``LinearNorm`` / ``ConvNorm`` or SHViT ``Conv2dNorm``; a conv
    that is not a plain 1x1 (one weight applied to every token alone) is refused."""
    linear = getattr(norm, "linear", None) or getattr(norm, "c", None) or getattr(norm, "conv", None)
    bn = getattr(norm, "bn", None) or getattr(norm, "batch_norm", None)  # transformers' MLPLayerWithBN: batch_norm
    if not isinstance(linear, (nn.Linear, nn.Conv2d)) or not isinstance(bn, nn.modules.batchnorm._BatchNorm):
        raise QKHooksError(f"unsupported attention in {path!r}: its q/k projection {type(norm).__name__} is not a "
                           "Linear or 1x1 conv followed by BatchNorm, the form qkhooks folds.")
    if bn.running_mean is None or bn.running_var is None:
        raise QKHooksError(f"unsupported attention in {path!r}: its q/k BatchNorm keeps no running statistics "
                           "(track_running_stats=False), so it normalises with each batch's own statistics even in eval "
                           "mode and no fixed W_q, W_k describe the logits.")
    if isinstance(linear, nn.Conv2d) and (linear.kernel_size != (1, 1) or linear.stride != (1, 1) or linear.groups != 1
                                          or linear.padding not in ((0, 0), "valid")):
        raise QKHooksError(f"unsupported attention in {path!r}: its q/k conv (kernel {linear.kernel_size}, stride "
                           f"{linear.stride}, groups {linear.groups}) mixes neighbouring tokens, so q and k are not a "
                           "per-token affine map of the tokens.")
    return linear, bn


def fold_batchnorm(linear: nn.Module, bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(W (out, in), b (out)) of Linear/1x1 conv + BatchNorm in eval mode: BN(Wx + b0) = diag(g) W x + β + g (b0 − μ),
    g = γ/√(σ² + ε), from the running statistics (what the model uses in eval mode)."""
    gain = bn.weight / torch.sqrt(bn.running_var + bn.eps) if bn.affine else torch.rsqrt(bn.running_var + bn.eps)
    shift = bn.bias if bn.affine else torch.zeros_like(gain)
    w = linear.weight.flatten(1) * gain[:, None]
    b0 = linear.bias if linear.bias is not None else torch.zeros_like(gain)
    return w, shift + gain * (b0 - bn.running_mean)


def folded_rows(path: str, norm: nn.Module, rows: torch.Tensor) -> Reader:
    """The folded (W, b) rows ``rows`` of a projection + BatchNorm, read live."""
    linear, bn = _projection(path, norm)

    def reader() -> tuple[torch.Tensor, torch.Tensor]:
        w, b = fold_batchnorm(linear, bn)
        index = to_device(rows, w.device)
        return w[index], b[index]

    return reader


def joined_rows(q: Reader, k: Reader) -> Reader:
    def reader() -> tuple[torch.Tensor, torch.Tensor]:
        (w_q, b_q), (w_k, b_k) = q(), k()
        return torch.cat([w_q, w_k]), torch.cat([b_q, b_k])

    return reader


def head_channels(heads: int, key_dim: int, per_head: int, offset: int = 0) -> torch.Tensor:
    """Output channels ``offset .. offset + key_dim`` of each head, where head h owns channels h·per_head onwards."""
    return ((torch.arange(heads)[:, None] * per_head) + offset + torch.arange(key_dim)).flatten()


def batchnorm_layers(*modules: nn.Module) -> tuple[nn.Module, ...]:
    return tuple(m for module in modules for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))


@dataclasses.dataclass(eq=False)
class PreparedSite(AttentionSite):
    """A site whose module prepares the tokens entering W_q and W_k itself from what it is handed.

    Attributes:
        prepare: ``(module input) -> (tokens entering W_q, tokens entering W_k or None: the same tokens)``, computed
            with the model's own modules from the call being recorded, each (B, N, d) tokens or a (B, d, h, w) map read
            row by row; a query map's (h, w) is the call's grid (zoo12: never a square read off N_q).
    """

    prepare: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]] | None = None

    def hidden_states(self, args: tuple[Any, ...], kwargs: dict[str, Any], block: bool = False) -> torch.Tensor:
        if block:
            raise QKHooksError(f"{self.path}: input='residual' is not modelled here: the module prepares the tokens "
                               "entering W_q/W_k itself (a subsampled query grid, a normalised channel slice), which have "
                               "no residual-stream counterpart; use input='normed'.")
        self.refuse_unmodelled_inputs(args, kwargs)
        given = args[0] if args else kwargs.get(self.input_name)
        if not isinstance(given, torch.Tensor):
            raise QKHooksError(f"{self.path}: could not find the tokens in the call (no positional argument and no "
                               f"keyword {self.input_name!r}).")
        with torch.no_grad():
            x, keys = self.prepare(given)  # type: ignore[misc]
        self._grid_of_input = (int(x.shape[2]), int(x.shape[3])) if x.dim() == 4 else None
        x, self._call_keys = _as_tokens(x), None if keys is None else _as_tokens(keys)
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise QKHooksError(f"{self.path}: expected (batch, tokens, {self.dim}) tokens entering W_q, prepared "
                               f"{tuple(x.shape)}; the adapter does not match this module.")
        return x


def _as_tokens(t: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H·W, C) row by row; tokens as they are."""
    return t.flatten(2).transpose(1, 2) if t.dim() == 4 else t


def prepared_site(site: AttentionSite, prepare: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]],
              other_keys: bool, **fields: Any) -> PreparedSite:
    """``other_keys``: the keys are other tokens than the queries (read by ``keys_for`` from the prepared call; the
    ``key_tokens`` function itself is never called, :meth:`PreparedSite.hidden_states` sets them)."""
    return recast(site, PreparedSite, **fields | dict(key_tokens=_prepared_keys if other_keys else None), prepare=prepare)


def _prepared_keys(x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    raise AssertionError("a prepared site's key tokens are set by its hidden_states")  # pragma: no cover


# ------------------------------------------------------------------------------------------------------- LeViT
def _levit_rows(attn: nn.Module) -> tuple[Reader, tuple]:
    """LeViT ``Attention``: qkv channels per head [q_h | k_h | v_h]; ``AttentionDownsample``: q from ``q.ln`` (heads
    contiguous), k from ``kv`` per head [k_h | v_h]. Modes from the tokens (the outputs interleave heads)."""
    heads, kd, vd = int(attn.num_heads), int(attn.key_dim), int(attn.val_dim)
    path = class_label(attn)
    if hasattr(attn, "qkv"):
        q = folded_rows(path, attn.qkv, head_channels(heads, kd, 2 * kd + vd))
        k = folded_rows(path, attn.qkv, head_channels(heads, kd, 2 * kd + vd, kd))
    else:
        q = folded_rows(path, attn.q.ln, torch.arange(heads * kd))
        k = folded_rows(path, attn.kv, head_channels(heads, kd, kd + vd))
    return joined_rows(q, k), ()


def _levit_site(site: AttentionSite, attn: nn.Module) -> AttentionSite:
    """zoo12: the grid is the module's own ``resolution`` (its bias table is built on it, so the model runs on no
    other), the queries of ``AttentionDownsample`` on every ``stride``-th row and column of it."""
    conv = bool(attn.use_conv)
    resolution = tuple(int(r) for r in attn.resolution)
    grid = resolution if hasattr(attn, "qkv") else tuple(-(-r // int(attn.stride)) for r in resolution)
    fields: dict[str, Any] = dict(family="timm-levit", grid=grid, patch_size=None,
                                  token_layout="channels_first" if conv else "tokens")
    if hasattr(attn, "qkv"):
        site = dataclasses.replace(site, **fields)
        return dataclasses.replace(site, call_bias=bias_of_call(site, attn, batchnorm_layers(attn.qkv)))
    ref = weakref.ref(attn)

    def prepare(given: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries: the tokens ``q.down`` keeps (the model's own subsampling or pooling); keys: every token."""
        return ref().q.down(given), given

    site = prepared_site(site, prepare, True, **fields)
    return dataclasses.replace(site, call_bias=bias_of_call(site, attn, batchnorm_layers(attn.q, attn.kv)))


# ------------------------------------------------------------------------------------------------------- SHViT
def _shvit_rows(attn: nn.Module) -> tuple[Reader, tuple]:
    """SHSA: one head, qkv channels [q (qk_dim) | k (qk_dim) | v (pdim)] of a 1x1 conv + BatchNorm."""
    qk = int(attn.qk_dim)
    return folded_rows(class_label(attn), attn.qkv, torch.arange(2 * qk)), ()


def _shvit_site(site: AttentionSite, attn: nn.Module) -> AttentionSite:
    ref, path = weakref.ref(attn), site.path  # held weakly, not the site as found: a finished recording keeps no model
    batchnorm_refs = tuple(weakref.ref(bn) for bn in batchnorm_layers(attn.qkv))

    def prepare(given: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The module's own ``pre_norm`` of its first ``pdim`` channels: the tokens entering its qkv conv."""
        m = ref()
        refuse_training_batchnorm(path, type(m).__name__, tuple(r() for r in batchnorm_refs))
        return m.pre_norm(given[:, : m.pdim]), None

    return prepared_site(site, prepare, False, family="timm-shvit", grid=None, patch_size=None, num_heads=1,
                     token_layout="channels_first")


# ------------------------------------------------------------------------------------------- EfficientFormer-v2
class _HeadConv:
    """A 1x1 conv over the head axis of (B, H, N, M) logits (EfficientFormer-v2's ``talking_head1/2``) read as the
    H x H Linear over heads that :class:`qkhooks.models.class_attention.TalkingHeads` applies: weight and bias live.
    The conv is held weakly, so a finished recording keeps no model alive."""

    def __init__(self, conv: nn.Conv2d):
        self._conv = weakref.ref(conv)

    @property
    def conv(self) -> nn.Conv2d:
        from qkhooks.models.class_attention import held_mixer

        return held_mixer(self._conv)

    @property
    def weight(self) -> torch.Tensor:
        return self.conv.weight.flatten(1)

    @property
    def bias(self) -> torch.Tensor | None:
        return self.conv.bias


def _efficientformer_v2_rows(attn: nn.Module) -> tuple[Reader, tuple]:
    """q from ``q`` (``Attention2d``: a 1x1 conv + BN; ``Attention2dDownsample``: the 1x1 conv + BN ``q.proj`` of its
    local query), k from ``k``; heads contiguous in both (reshape(B, H, d_k, N))."""
    rows = torch.arange(int(attn.num_heads) * int(attn.key_dim))
    path = class_label(attn)
    q = attn.q.proj if hasattr(attn.q, "proj") else attn.q
    return joined_rows(folded_rows(path, q, rows), folded_rows(path, attn.k, rows)), ()


def _efficientformer_v2_site(site: AttentionSite, attn: nn.Module) -> AttentionSite:
    """``Attention2d``: talking heads (a 1x1 conv over heads before the softmax, after the bias, and one after it), on
    the map its optional depthwise ``stride_conv`` makes; ``Attention2dDownsample``: queries from its
    ``LocalGlobalQuery`` (a strided depthwise conv plus a strided pool, summed) before ``q.proj``, keys every token."""
    from qkhooks.models.class_attention import TalkingHeads

    ref = weakref.ref(attn)
    # zoo12: the module's own resolution (its bias table's grid; the queries' ``resolution2`` when it downsamples)
    grid = tuple(int(r) for r in getattr(attn, "resolution2", attn.resolution))
    fields: dict[str, Any] = dict(family="timm-efficientformerv2", grid=grid, patch_size=None,
                                  token_layout="channels_first")
    if hasattr(attn, "talking_head1"):
        fields["head_mixing"] = TalkingHeads(_HeadConv(attn.talking_head1), _HeadConv(attn.talking_head2))  # type: ignore[arg-type]
        batchnorms = batchnorm_layers(attn.q, attn.k) + (() if attn.stride_conv is None else batchnorm_layers(attn.stride_conv))

        def prepare(given: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
            """The tokens entering q and k: the map as handed, or after the module's own stride_conv."""
            m = ref()
            return given if m.stride_conv is None else m.stride_conv(given), None

        site = prepared_site(site, prepare, False, **fields)
    else:
        batchnorms = batchnorm_layers(attn.q, attn.k)

        def prepare(given: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
            """Queries: local(x) + pool(x), the map entering ``q.proj``; keys: every token."""
            q = ref().q
            return q.local(given) + q.pool(given), given

        site = prepared_site(site, prepare, True, **fields)
    return dataclasses.replace(site, call_bias=bias_of_call(site, attn, batchnorms))


# ------------------------------------------------------------------------------------------------------ TinyViT
@dataclasses.dataclass(eq=False)
class _NormedWindowSite(WindowSite):
    """TinyViT's windows (cut by its block: padded at the bottom and right with zero tokens, no shift) entering the
    module, whose own LayerNorm then makes the tokens entering W_q/W_k (padding tokens included: LN(0) = β)."""

    def hidden_states(self, args: tuple[Any, ...], kwargs: dict[str, Any], block: bool = False) -> torch.Tensor:
        x = super().hidden_states(args, kwargs, block)
        with torch.no_grad():
            return self.module.norm(x)


def _tiny_vit_site(site: AttentionSite, attn: nn.Module) -> AttentionSite:
    """TinyViT ``Attention`` in its ``TinyVitBlock``: windows in the block's order (window_index), the module's
    LayerNorm before qkv, and its position-indexed ``attention_biases`` per window offset."""
    block_ref, attn_ref = weakref.ref(site.block), weakref.ref(attn)

    def call_grid(args: tuple, kwargs: dict) -> tuple[int, int]:
        x = args[0] if args else kwargs["x"]
        return int(x.shape[1]), int(x.shape[2])  # (B, H, W, C)

    def relative_bias() -> torch.Tensor:
        m = attn_ref()
        return m.get_attention_biases(m.attention_biases.device)[None]

    size = lambda: block_ref().window_size  # noqa: E731
    return recast(site, _NormedWindowSite, family="timm-tinyvit", grid=None, patch_size=None, qk_modules=(),
                  geometry=lambda: ((size(), size()), (0, 0)), call_grid=call_grid, relative_bias=relative_bias,
                  pad_first=False)


_FORMS = {
    "LevitAttention": ("timm.models.levit", "Attention", _levit_rows, _levit_site),
    "LevitAttentionDownsample": ("timm.models.levit", "AttentionDownsample", _levit_rows, _levit_site),
    "ShvitSHSA": ("timm.models.shvit", "SHSA", _shvit_rows, _shvit_site),
    "EfficientFormerV2Attention2d": ("timm.models.efficientformer_v2", "Attention2d", _efficientformer_v2_rows,
                                     _efficientformer_v2_site),
    "TinyVitAttention": ("timm.models.tiny_vit", "Attention", lambda attn: per_head_rows(attn, attn.qkv), _tiny_vit_site),
    "EfficientFormerV2Attention2dDownsample": ("timm.models.efficientformer_v2", "Attention2dDownsample",
                                               _efficientformer_v2_rows, _efficientformer_v2_site),
}
for _kind, (_module, _name, _rows, _finish) in _FORMS.items():
    timm_adapter.EXTRA_FORMS[_kind] = timm_adapter.ExtraForm(f"{_module}.{_name}", _rows, _finish)
    MODELLED_FORMS.add(f"{_module}.{_name}")
