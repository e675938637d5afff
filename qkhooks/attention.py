"""Attention maps rebuilt from the model's own q and k, so they exist even when the model runs fused SDPA.

Fused kernels never materialise softmax(q k^T * scale); HF returns None or raises, timm's extractor
returns nothing. We recompute only what is asked for, from the exact tokens entering W_q/W_k, with the
model's own weights, biases and scale; q·kᵀ of half-precision q, k accumulated in float32 as the fused kernels do
(:func:`qkhooks.sdpa.scaled_logits`), the softmax in float32 like HF's eager path:

- ``rows``: the post-softmax rows of chosen query tokens per image, (B, H, T, N);
- ``pooled``: the mass those rows put on each of M token masks, (B, H, T, M), reduced on device so no
  N x N tensor ever leaves it;
- ``full``: every row, (B, H, N, N), for the layers you choose.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Literal, Sequence

import torch

from qkhooks._devices import to_device
from qkhooks.errors import QKHooksError
from qkhooks.models.base import AttentionSite, parse_layers, select_layers
from qkhooks.sdpa import HALF, MHA_FORWARD, AttentionCallMode, SdpaCall, scaled_logits, sdpa_maps, softmax_maps

__all__ = [
    "AttentionSpec", "attention_rows", "attention_full", "rows_from_qk", "full_from_qk", "split_heads", "pool_rows",
    "parse_attention", "default_query_tokens", "sdpa_maps", "OneAttention", "map_terms",
]

Kind = Literal["rows", "pooled", "full"]
KINDS: tuple[str, ...] = ("rows", "pooled", "full")


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """Which attention to rebuild.

    Attributes:
        kind: ``"rows"``, ``"pooled"`` or ``"full"``.
        layers: block indices (None: every recorded layer), or attention module paths, resolved by the recording.
            Choose a few for ``full``: it is N x N per head.
    """

    kind: Kind
    layers: tuple[int | str, ...] | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise QKHooksError(f"attention kind {self.kind!r} is unknown; use one of {', '.join(KINDS)} (no attention: "
                               "attention=None).")

    def covers(self, layer: int) -> bool:
        return self.layers is None or layer in self.layers


def _from_string(text: str, sites: Sequence[AttentionSite] | None) -> AttentionSpec:
    """``rows`` -> every layer; ``full:5,11``, ``full:9-11`` or ``full:blocks.5.attn`` -> those blocks."""
    kind, colon, layers = text.partition(":")
    if kind not in KINDS:
        raise QKHooksError(f"unknown attention kind {kind!r}; use one of {', '.join(KINDS)} (optionally KIND:LAYERS, e.g. full:5,11).")
    if colon and not layers.strip():
        raise QKHooksError(f"{text!r} names no layers after the colon: write {kind}:LAYERS (e.g. {kind}:5,11), or "
                           f"{kind} alone for every layer.")
    if layers and sites is None:
        return AttentionSpec(kind, tuple(parse_layers(layers)))  # type: ignore[arg-type]
    return _resolved(kind, layers or None, sites)


def _resolved(kind: str, layers: Any, sites: Sequence[AttentionSite] | None) -> AttentionSpec:
    """The spec of ``kind`` on ``layers``, each module path and negative index (from the last block) replaced by its
    block index among ``sites``, as ``layers=`` reads them (:func:`select_layers`: an unknown path is refused, listing
    the paths); other block indices stay as given (``sites`` may be a selection), so one the recording does not hook is
    refused naming the recorded layers. As given without sites."""
    if layers is None or sites is None:
        return AttentionSpec(kind, layers)  # type: ignore[arg-type]
    parts = [p.strip() for p in layers.split(",")] if isinstance(layers, str) else list(layers)
    paths = [p for p in parts if isinstance(p, str) and any(c.isalpha() for c in p) and p.lower() != "all"]
    indices = parse_layers(",".join(str(p) for p in parts if p not in paths)) if len(paths) < len(parts) else []
    if indices is None:  # "all"
        return AttentionSpec(kind)  # type: ignore[arg-type]
    named = paths + [i for i in indices if i < 0]
    found = [s.layer for s in select_layers(list(sites), named)] if named else []
    given = [i for i in indices if i >= 0]
    return AttentionSpec(kind, tuple(given) + tuple(l for l in found if l not in given))  # type: ignore[arg-type]


def parse_attention(spec: None | str | AttentionSpec | Sequence[AttentionSpec | str],
                    sites: Sequence[AttentionSite] | None = None) -> list[AttentionSpec]:
    """Normalise the ``attention=`` argument into a list of specs (``None``/``"none"``: nothing).

    Strings may name several kinds with layers: ``"rows+full:5,11"``. Given the model's ``sites``, layers may also be
    the attention modules' paths (``"full:blocks.5.attn"``), as in ``layers=``.
    """
    if spec is None or (isinstance(spec, str) and spec == "none"):
        return []
    if isinstance(spec, str):
        spec = [part for part in spec.split("+") if part]
    elif isinstance(spec, AttentionSpec):
        spec = [spec]
    out = [_from_string(s, sites) if isinstance(s, str) else _resolved(s.kind, s.layers, sites) for s in spec]
    kinds = [s.kind for s in out]
    if len(set(kinds)) != len(kinds):
        raise QKHooksError(f"attention kinds repeat in {kinds}; give each kind once with the layers it needs.")
    return out


def default_query_tokens(site: AttentionSite, num_tokens: int) -> torch.Tensor:
    """(1, 2) token indices used when no query tokens are given: the first prefix token (CLS) and the centre
    patch; a model without prefix tokens gets the centre patch twice."""
    gh, gw = site.grid_for(num_tokens)
    centre = site.num_prefix_tokens + (gh // 2) * gw + gw // 2
    return torch.tensor([[0 if site.num_prefix_tokens else centre, centre]])


def split_heads(site: AttentionSite, t: torch.Tensor) -> torch.Tensor:
    """(B, N, H·d_k) as a Linear returns it -> (B, H, N, d_k) (a view)."""
    return t.unflatten(-1, (site.num_heads, site.head_dim)).transpose(1, 2)


def _softmax_dtype(logits: torch.Tensor) -> torch.Tensor:
    """Logits in the dtype their softmax runs in: float32 (half precision's is, as HF's eager path and the fused
    kernels do), float64 kept for a float64 model, as its own eager softmax keeps it."""
    return logits if logits.dtype == torch.float64 else logits.float()


def _softmax(site: AttentionSite, logits: torch.Tensor, query_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax over keys (in :func:`_softmax_dtype`) after the model's own additive term (position bias, mask) for
    the rows of ``query_tokens`` (all rows when None)."""
    logits = site.add_logit_bias(_softmax_dtype(logits), query_tokens)
    if site.head_mixing is not None:  # talking heads: heads mixed before and after the softmax, as the model does
        return site.head_mixing.maps(logits)
    return torch.softmax(logits, dim=-1)


def full_from_qk(site: AttentionSite, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """All post-softmax maps (B, H, N, N) from q, k (B, H, N, d_k), biases included, as the model computed them.

    q and k are as the Linear layers return them; the model's own normalisation and rotation (q/k-norm, RoPE)
    are applied here; the scale enters the product (:func:`scaled_logits`). Class attention (CaiT): only the
    first token queries, so the maps are (B, H, 1, N), the model's shape.
    """
    q, k = site.model_qk(q, k)
    if site.class_attention:
        q = q[:, :, :1]
    if _softmax_alone(site):  # in one pass per image
        return softmax_maps(q, k, site.scale)
    return _softmax(site, scaled_logits(q, k, site.scale))


def _softmax_alone(site: AttentionSite) -> bool:
    """Whether the site's maps are the softmax of its scaled logits alone: no additive term, cap or head mixing
    (what :func:`_softmax` adds is then nothing)."""
    return (site.head_mixing is None and type(site).add_logit_bias is AttentionSite.add_logit_bias
            and site.logit_bias() is None)


def map_terms(site: AttentionSite, q: torch.Tensor, k: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """The softmax terms a two-softmax site's maps combine (differential attention, ConViT GPSA:
    :mod:`qkhooks.models.two_softmax`), from q, k (B, H, N, d_k) as the Linear layers return them; None for a site
    whose map is one softmax."""
    terms = getattr(site, "map_terms", None)
    if terms is None:
        return None
    q, k = site.model_qk(q, k)
    return terms(site.add_logit_bias(_softmax_dtype(scaled_logits(q, k, site.scale))))


def full_and_terms(site: AttentionSite, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
    """:func:`full_from_qk` and :func:`map_terms` together: a two-softmax site's maps combined from its terms, so
    q·kᵀ and the softmaxes run once; (maps, None) for a site whose map is one softmax."""
    terms = map_terms(site, q, k)
    if terms is None:
        return full_from_qk(site, q, k), None
    return site.head_mixing.combine(terms), terms  # type: ignore[union-attr]


def rows_from_qk(site: AttentionSite, q: torch.Tensor, k: torch.Tensor, query_tokens: torch.Tensor) -> torch.Tensor:
    """Post-softmax rows (B, H, T, N) of the query tokens (B, T) from q, k (B, H, N, d_k) as the Linear layers
    return them (rotated here first, as the model rotates them)."""
    idx = check_tokens(query_tokens, q.shape[0], q.shape[2], q.device)
    _refuse_non_querying_tokens(site, query_tokens)
    q, k = site.model_qk(q, k)
    q_t = torch.gather(q, 2, idx[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[-1]))
    return _softmax(site, scaled_logits(q_t, k, site.scale), idx)


def _logits(site: AttentionSite, x_q: torch.Tensor, x_k: torch.Tensor) -> torch.Tensor:
    """Scaled logits (B, H, Tq, N) between tokens x_q (B, Tq, d) and x_k (B, N, d), biases included (every key
    computed: the reference the benchmarks compare the faster paths with)."""
    w, b = site.qk_linear()
    rows = site.num_heads * site.head_dim
    w, b = w.to(x_q.dtype), None if b is None else b.to(x_q.dtype)
    q = split_heads(site, torch.nn.functional.linear(x_q, w[:rows], None if b is None else b[:rows]))
    k = split_heads(site, torch.nn.functional.linear(x_k, w[rows:], None if b is None else b[rows:]))
    if site.rotates() and x_q.shape[1] != x_k.shape[1]:
        raise QKHooksError(f"{site.path}: RoPE rotates each token by its own position, so q cannot come from a subset of "
                           "the tokens; use rows_from_qk(site, *site.qk(x), query_tokens).")
    q, k = site.model_qk(q, k)  # the model's own q/k normalisation and rotation, where it has them
    return (q @ k.transpose(-1, -2)) * site.scale


def _row_logits(site: AttentionSite, x_q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Scaled logits (B, H, T, N) of T query tokens against all N tokens, up to a constant per row.

    q_t·k_j = q_t·(W_k x_j + b_k) = (W_k^T q_t)·x_j + q_t·b_k. The last term is the same for every key j and
    cancels in the softmax, so no key is ever computed: B·H·T·d·N work instead of the B·N·d² of a k for every
    token. Worth it while H·T < d (T < d_k query tokens); beyond that computing k is cheaper.
    """
    w, b = site.qk_linear()
    h, dk = site.num_heads, site.head_dim
    rows = h * dk
    w = w.to(x_q.dtype)
    q = torch.nn.functional.linear(x_q, w[:rows], None if b is None else b[:rows].to(x_q.dtype))
    q = q.unflatten(-1, (h, dk)).transpose(1, 2)  # (B, H, T, dk)
    qk = torch.einsum("bhtk,hkd->bhtd", q, w[rows:].view(h, dk, -1))  # (B, H, T, d): W_k^T q_t per head
    return (qk.flatten(1, 2) @ x.transpose(1, 2)).unflatten(1, (h, -1)) * site.scale


def refuse_non_index_tokens(query_tokens: torch.Tensor) -> None:
    """Query tokens must be integer indices (B, T) or (T,): ``.long()`` would truncate 1.5 to token 1, and a bool
    mask would index tokens 0 and 1."""
    if query_tokens.is_floating_point() or query_tokens.is_complex() or query_tokens.dtype == torch.bool:
        raise QKHooksError(
            f"query_tokens must be integer token indices (B, T), got dtype {query_tokens.dtype}; pass e.g. "
            "torch.tensor([[0, 105]]) (a boolean mask of tokens: mask.nonzero())."
        )
    if query_tokens.dim() not in (1, 2):
        raise QKHooksError(f"query_tokens must be (batch, T) token indices (or (T,) for every image), got shape "
                           f"{tuple(query_tokens.shape)}.")


def tokens_per_image(query_tokens: Any, batch: int) -> torch.Tensor:
    """Query token indices as (B, T), the form every reader and the run file take: given as (T,), the same row for
    each of the ``batch`` images; refused with a reason when they are no indices or not one row per image."""
    query_tokens = torch.as_tensor(query_tokens)
    refuse_non_index_tokens(query_tokens)
    if query_tokens.dim() == 1:
        query_tokens = query_tokens[None].expand(batch, -1)
    if query_tokens.shape[0] != batch:
        raise QKHooksError(
            f"query_tokens has {query_tokens.shape[0]} rows for a batch of {batch} images; give one row per image."
        )
    return query_tokens


def check_tokens(query_tokens: torch.Tensor, batch: int, n: int, device: torch.device) -> torch.Tensor:
    """Query token indices as (B, T) long on ``device``, refused with a reason when they do not fit."""
    query_tokens = tokens_per_image(query_tokens, batch)
    if query_tokens.numel() and (int(query_tokens.max()) >= n or int(query_tokens.min()) < 0):
        raise QKHooksError(f"query_tokens must index tokens 0..{n - 1} (prefix tokens first), got {query_tokens.tolist()}.")
    return to_device(query_tokens.long(), device)


def _refuse_non_querying_tokens(site: AttentionSite, query_tokens: torch.Tensor) -> None:
    """Class attention has one query, the class token: a row of any other token does not exist in the model."""
    if site.class_attention and query_tokens.numel() and bool((torch.as_tensor(query_tokens) != 0).any()):
        raise QKHooksError(
            f"layer {site.layer} ({site.path}) is class attention: only the class token (index 0) queries there, so "
            f"the rows of tokens {sorted(set(torch.as_tensor(query_tokens).flatten().tolist()) - {0})} do not exist in "
            "the model. Ask its rows with query_tokens 0, record its full maps (B, H, 1, N), or leave the layer out "
            "with layers=."
        )


def attention_rows(site: AttentionSite, x: torch.Tensor, query_tokens: torch.Tensor) -> torch.Tensor:
    """Post-softmax attention rows (B, H, T, N) of the query tokens (B, T) (indices into all N tokens)."""
    idx = check_tokens(query_tokens, x.shape[0], x.shape[1], x.device)
    _refuse_non_querying_tokens(site, query_tokens)
    # few query tokens: never compute the keys (not under RoPE or q/k-norm, where each key's own rotation or
    # scale enters its logit; nor in half precision, where the model's logits are those of its rounded keys)
    if not site.keys_shape_logits() and x.dtype not in HALF and site.num_heads * idx.shape[1] < x.shape[-1]:
        x_q = torch.gather(x, 1, idx[..., None].expand(-1, -1, x.shape[-1]))
        return _softmax(site, _row_logits(site, x_q, site.keys_for(x)), idx)
    return rows_from_qk(site, *site.qk(x), idx)


def attention_full(site: AttentionSite, x: torch.Tensor) -> torch.Tensor:
    """All post-softmax maps (B, H, N, M) from the tokens x (B, N, d) entering W_q (M = N unless the keys are
    spatially reduced tokens, :meth:`AttentionSite.keys_for`)."""
    return full_from_qk(site, *site.qk(x))


def pool_rows(rows: torch.Tensor, masks: torch.Tensor, num_prefix_tokens: int,
              grid: tuple[int, ...] | None = None) -> torch.Tensor:
    """Mass of each row on each mask: (B, H, T, N) x (B, M, N or N - prefix) -> (B, H, T, M).

    Masks given on patch tokens only are padded with zeros for the prefix tokens. ``grid``: the (rows, cols) patch
    grid of the rows' tokens, where the caller knows it; masks given on a grid (B, M, gh, gw) must be on that one (a
    (28, 7) mask has the 196 cells of a 14 x 14 grid in another order: its mass would be summed on other tokens).
    """
    n, patches, given = rows.shape[-1], rows.shape[-1] - num_prefix_tokens, tuple(masks.shape)
    if masks.dim() == 4:  # (B, M, gh, gw) on the patch grid
        masks = masks.flatten(2)
    if masks.dim() != 3 or masks.shape[0] != rows.shape[0] or masks.shape[-1] not in (n, patches):
        on_grid = len(given) == 4 and masks.shape[-1] != patches
        cells = f" (a patch grid of {masks.shape[-1]} cells, not {patches})" if on_grid else ""
        raise QKHooksError(  # the shape as given: the flattened or padded one would name a tensor the caller never had
            f"pool_masks must be (batch, masks, tokens) with {n} tokens or {patches} patch tokens; got {given}{cells} "
            f"for a batch of {rows.shape[0]}."
        )
    if len(given) == 4 and grid is not None and len(grid) == 2 and tuple(given[2:]) != tuple(grid):
        raise QKHooksError(
            f"pool_masks on a patch grid must be on this layer's {grid[0]}x{grid[1]} grid; got {given}, whose "
            f"{given[2]}x{given[3]} cells would be read as other patches. Give them as (batch, masks, {grid[0]}, "
            f"{grid[1]}), or flattened as (batch, masks, {patches}) in the model's token order.")
    if masks.shape[-1] == patches:
        masks = torch.nn.functional.pad(masks, (num_prefix_tokens, 0))
    return torch.einsum("bhtn,bmn->bhtm", rows, to_device(masks, rows.device).to(rows.dtype))


# ------------------------------------------------------------------ one attention computation (outputs="eager")
class OneAttention(AttentionCallMode):
    """Active while one attention module runs (``record(..., outputs="eager")``): its call of
    ``scaled_dot_product_attention`` is computed once, eagerly, the maps kept for the recording and maps @ v
    returned to the model, so q·kᵀ and the softmax are not paid twice. A module that runs its own eager attention
    keeps doing so; its softmax over (B, H, N, M) is then the map it hands over.

    It takes the exact q, k, v, mask, scale and causal flag the model passes (after its norms, RoPE and biases),
    so no family needs code of its own; a call it cannot match is refused, naming the module. For half-precision
    q, k the maps are computed in float32 (:func:`~qkhooks.sdpa.sdpa_probabilities`) and kept rounded to q's dtype;
    the output is the float32 maps @ v rounded once to v's dtype, as the fused kernels accumulate.
    """

    def __init__(self, site: AttentionSite):
        super().__init__(site)
        self.maps: torch.Tensor | None = None

    def begin(self) -> None:
        self.maps = None

    def on_sdpa(self, call: SdpaCall, kernel: Any) -> torch.Tensor:
        """maps @ v of the call's maps, computed once (torch's kernel does not run)."""
        q = call.query
        if not self._is_map(q) or q.shape[-1] != self.site.head_dim:
            raise self._refusal(f"its attention call has q of shape {tuple(q.shape)}, not the (batch, "
                                f"{self.site.num_heads} heads, tokens, {self.site.head_dim}) the adapter describes")
        maps, out = call.attend()
        self._keep(maps)
        return out

    def on_softmax(self, maps: torch.Tensor) -> None:
        if self._is_map(maps):
            self._keep(maps)

    def on_multihead(self, call: dict[str, Any], kernel: Callable[[], Any]) -> Any:
        """nn.MultiheadAttention's eager path, run once: ``multi_head_attention_forward`` asked for its per-head weights
        (``need_weights=True, average_attn_weights=False``: its own q·kᵀ·scale, softmax and maps @ v), the weights kept
        as the maps, and its output handed back with the weights the module asked for."""
        if call["training"] and call["dropout_p"] > 0:
            raise self.dropout_refusal(call["dropout_p"])
        out, maps = MHA_FORWARD(**{**call, "need_weights": True, "average_attn_weights": False})
        if not self._is_map(maps):
            raise self._refusal(f"its attention weights have shape {tuple(maps.shape)}, not the (batch, "
                                f"{self.site.num_heads} heads, tokens, keys) the adapter describes")
        self._keep(maps)
        if not call["need_weights"]:
            return out, None
        return out, maps.mean(dim=1) if call["average_attn_weights"] else maps

    def dropout_refusal(self, dropout_p: float) -> QKHooksError:
        return self._refusal(f"it drops attention weights at random (dropout_p={dropout_p}, the module is in "
                             "training mode), so its outputs cannot be the recorded maps @ v; call model.eval()")

    def _is_map(self, t: Any) -> bool:
        """(batch, this site's heads, tokens, keys or d_k)."""
        return isinstance(t, torch.Tensor) and t.dim() == 4 and t.shape[1] == self.site.num_heads

    def _keep(self, maps: torch.Tensor) -> None:
        if self.maps is not None:
            raise self._refusal("it computes attention more than once in one call, so which maps its output uses "
                                "is not known")
        self.maps = maps

    def _refusal(self, why: str) -> QKHooksError:
        return QKHooksError(f"{self.site.path} ({type(self.site.module).__name__}): outputs='eager' cannot compute this "
                            f"layer's attention once: {why}. Record with outputs='unchanged' (the default: the maps are "
                            "rebuilt beside the model's own attention).")

    def take(self) -> torch.Tensor:
        """The maps of the finished call (refused when the module computed none that can be matched)."""
        maps, self.maps = self.maps, None
        if maps is None:
            raise self._refusal("it made no scaled_dot_product_attention call and no softmax over (batch, heads, "
                                "tokens, keys) while it ran")
        return maps
