"""What qkhooks needs to know about one attention layer, and the registry that finds those layers.

An :class:`AttentionSite` is the single description every other part of qkhooks works from: which module
to hook, which argument carries the tokens entering W_q/W_k, the per-head W_q, W_k, b_q, b_k read live
from the model's own parameters, the scale, the prefix tokens and the patch grid. Adapters (one file per
model family) turn a model into a list of sites; users add their own with :func:`register_adapter`.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import operator
from typing import Any, Callable, Iterable, NoReturn, Sequence, TypeVar, Union

import torch
from torch import nn

from qkhooks._devices import to_device
from qkhooks.access import layer_at_path
from qkhooks.errors import QKHooksError
from qkhooks.models.unsupported import (PEFT_FIX, SKIP_HINT, attention_like, describe_attention_like, diagnose, refuse_opaque, refuse_quantised,
                                        refuse_unplain_qk, skipping_unmodelled, unmodelled_parts, unmodelled_reason,
                                        watch_qk_path)

__all__ = ["AttentionSite", "QKWeights", "QKRows", "register_adapter", "find_sites", "adapters", "as_pair", "leading_rows",
           "stacked_rows"]


@dataclasses.dataclass(frozen=True)
class QKWeights:
    """Per-head query/key weights of one layer: W (H, d_k, d), b (H, d_k) or None (no bias)."""

    w_q: torch.Tensor
    w_k: torch.Tensor
    b_q: torch.Tensor | None
    b_k: torch.Tensor | None


@dataclasses.dataclass(eq=False)
class AttentionSite:
    """One attention layer of a real model, described well enough to hook and analyse it exactly.

    Attributes:
        layer: 0-based index of this attention in the order the forward runs them, over all stages
            (``find_sites`` numbers them; an adapter's own numbers are replaced).
        path: dotted module path of the hooked attention module (its input is what enters W_q/W_k).
        module: the attention module itself.
        block_path: dotted path of the enclosing block, whose input is the residual stream (before the
            block's LayerNorm); used by ``input="residual"``.
        block: the block module.
        num_heads, head_dim, dim: heads, per-head width d_k and embedding width d.
        scale: the factor the model multiplies q·k by before the softmax.
        num_prefix_tokens: tokens before the patches (CLS, distillation, registers).
        grid: the native patch grid (rows, cols); a different input size changes it at run time.
        patch_size: pixels per patch (rows, cols), so the grid of any input size is known before a forward.
        family: short adapter name, e.g. ``"timm-vit"`` or ``"hf-dinov2"``.
        input_name: keyword under which the module receives the hidden states when passed by keyword.
        qk_linear: returns (W (2·H·d_k, d), b (2·H·d_k) or None): the rows of the model's own parameters
            that produce q then k, read live so that weight edits are seen.
        bias_input: keyword under which the model hands the module an additive term it adds to the scaled
            logits before the softmax (HF ``attention_mask``: padding and segmentation masks, BEiT
            relative-position tables). Rebuilt maps add the very tensor the model passed (:meth:`add_logit_bias`).
        rope_input, rope_apply: keyword under which the model hands the module its rotary tables, and the
            model's own function ``(q, k, tables) -> (q, k)`` that rotates (B, H, N, d_k) q and k with them
            (prefix tokens unrotated, as the model does). Rebuilt maps use the rotated q, k; modes stay those
            of the content form W_q^T W_k (the zero-offset term). ``rope_layout``: how dimensions pair up,
            ``"interleaved"`` (0,1), (2,3)..., ``"half"`` (i, i + d_k/2) or ``"axes"`` (two halves, each by its
            halves: (i, i + d_k/4) and (d_k/2 + i, 3d_k/4 + i), Gemma 4); see :mod:`qkhooks.models.rope`.
        qk_norm: the model's own q/k normalisation (a :class:`qkhooks.models.qknorm.QKNorm`), applied to q and k
            before any rotation as the model does; rebuilt maps use the normalised q, k, modes stay those of the
            pre-norm form W_q^T W_k, and :func:`qkhooks.models.qknorm.normalised_form` gives the exact one.
        call_bias: for modules that build their additive term themselves (Data2Vec vision's relative-position
            table, from the call's resolution, plus the shared table handed as an argument): the adapter's function
            ``(args, kwargs) -> term`` that rebuilds the very term the module adds, reading every argument of the
            call (it refuses one it does not know), instead of ``bias_input``.
        class_attention: only the first (class) token queries, keys are every token handed in (CaiT's
            ``ClassAttn``): maps are (B, H, 1, N), the model's shape.
        head_mixing: the model's own mixing of heads around the softmax (CaiT talking heads, a
            :class:`qkhooks.models.class_attention.TalkingHeads`): maps = mix_post(softmax(mix_pre(logits))).
        token_layout: ``"tokens"`` (B, N, d), ``"grid"``: the module takes (B, h, w, d) patch grids (VitDet), or
            ``"channels_first"``: (B, d, h, w) maps (MaxViT's NCHW attention, FastViT, Visformer); both read row by
            row as N = h·w tokens.
        stage: dotted path of the container the block sits in (``blocks``, ``transformers.1.blocks``,
            ``encoder.stages.2.layers``): sites of one stage share a token grid.
        qk_modules: the Linear modules whose outputs are q and k, as the model computes them from the hooked
            tokens: ``(qkv,)`` (fused; q then k then v along the last axis) or ``(query, key)``. The recording
            projects modes from these outputs (a d_k x K product per head instead of d x K). Empty: from x.
        key_tokens: where the keys come from other tokens than the queries (spatial reduction in PVT/Segformer):
            ``(x, args, kwargs) -> x_k`` (B, M, d), the tokens the model feeds to W_k, computed with the model's
            own reduction modules from the hooked call; None: the keys' tokens are the queries' (M = N).
        grid_source: ``(module, (args, kwargs) -> (rows, cols))``: a module the forward calls before this layer, and the
            token grid read off its call (timm's dynamic-size patch embed: the grid it makes of the image; NextViT's
            block norm: the NCHW map it is handed). A recording hooks it, so :meth:`grid_for` reads each call's own
            grid rather than the native one or a square.
        qk_scope: set by the search (:func:`qkhooks.models.unsupported.refuse_unplain_qk`): (path under ``module``,
            whether it owns what ``qk_linear`` reads) of the modules W_q/W_k are read off and those between, which
            every ``record()`` entry checks on its recorded layers for hooks, patched forwards and tensor subclasses
            (``refuse_altered_qk``).
        pixel_convs: the convolutions between the image and this layer's tokens, read off the model's modules:
            ``() -> [((kernel), (stride), (padding)), ...]`` (rows, cols each), so the pixels each token reads follow
            (:func:`qkhooks.data.masks.receptive_cells`) where its grid is no cells of the input (PiT's overlapping
            patch embedding and its pooling). None: its patch size (:attr:`patch_size`) or blocks say it.
        pixel_route: ``(path in the model, module)`` of the modules between the image and the tokens the patch size or
            :attr:`pixel_convs` describe (timm's ``patch_embed``, Hugging Face's ``embeddings``, torchvision's
            ``conv_proj``), checked with their submodules when masks are read onto the tokens
            (:func:`qkhooks.models.unsupported.refuse_moved_pixels`: a hook someone else put there may move the
            tokens). Empty: the adapter names none, and nothing is checked.
        scale_attribute: the module's attribute ``scale`` was read from (timm's ``attn.scale``, Hugging Face's
            ``scaling`` or ``scale``; the search names it for any adapter that left it unset,
            :func:`qkhooks.models.unsupported.watch_qk_path`), which every entry and batch checks is unchanged, and
            which a fused path that ignores it (timm's SDPA call passes no ``scale``: the kernel's 1/sqrt(d_k)) must
            equal 1/sqrt(d_k) for (``refuse_altered_qk``).
        qk_watch: set by the search (:func:`qkhooks.models.unsupported.watch_qk_path`): what the layer's q/k path was
            made of when it was found (the modules from the model's first level down to the attention module, its
            q/k projections and q/k norms, and its head-count and head-width attributes), which every entry and batch
            checks by identity (``refuse_altered_qk``): a module replaced or a head count changed inside the context
            is refused, not recorded with the old ones.
    """

    layer: int
    path: str
    module: nn.Module
    block_path: str
    block: nn.Module
    num_heads: int
    head_dim: int
    dim: int
    scale: float
    num_prefix_tokens: int
    grid: tuple[int, int] | None
    family: str
    input_name: str
    qk_linear: Callable[[], tuple[torch.Tensor, torch.Tensor | None]]
    block_input_name: str = "hidden_states"
    patch_size: tuple[int, int] | None = None
    qk_modules: tuple[nn.Module, ...] = ()
    stage: str = ""
    token_layout: str = "tokens"
    bias_input: str | None = None
    rope_input: str | None = None
    rope_apply: Callable[[torch.Tensor, torch.Tensor, Any], tuple[torch.Tensor, torch.Tensor]] | None = None
    rope_layout: str = "interleaved"
    qk_norm: Any = None
    call_bias: Callable[[tuple[Any, ...], dict[str, Any]], torch.Tensor | None] | None = None
    class_attention: bool = False
    head_mixing: Any = None
    key_tokens: Callable[[torch.Tensor, tuple, dict], torch.Tensor] | None = None
    grid_source: tuple[nn.Module, Callable[[tuple, dict], tuple[int, int]]] | None = None
    qk_scope: tuple[tuple[str, bool], ...] = ()
    scale_attribute: str | None = None
    qk_watch: tuple[tuple[Any, ...], ...] = dataclasses.field(default=(), repr=False)
    pixel_convs: Callable[[], list[tuple[tuple[int, int], tuple[int, int], tuple[int, int]]]] | None = None
    pixel_route: tuple[tuple[str, nn.Module], ...] = dataclasses.field(default=(), repr=False)
    _grid_of_source: tuple[int, int] | None = dataclasses.field(default=None, repr=False)
    _grid_of_input: tuple[int, int] | None = dataclasses.field(default=None, repr=False)  # the grid the call hands it
    _call_bias: torch.Tensor | None = dataclasses.field(default=None, repr=False)
    _call_rope: Any = dataclasses.field(default=None, repr=False)
    _call_keys: torch.Tensor | None = dataclasses.field(default=None, repr=False)

    # Whether a call's queries and keys are the tokens handed to it, one image a row, so that the layer's geometry is
    # read off them as the call begins (:meth:`geometry_from_tokens`). Read off a class's own body only: a subclass
    # that windows, pools, joins or reorders its tokens must not inherit it; one that does none of that says it again.
    TOKENS_ARE_QUERIES_AND_KEYS = True

    def geometry_from_tokens(self) -> bool:
        """Whether this layer's geometry (prefix, grid, token counts) is that of the tokens handed to its call: its
        class says so in its own body (:attr:`TOKENS_ARE_QUERIES_AND_KEYS`) and its keys are not reduced."""
        return bool(vars(type(self)).get("TOKENS_ARE_QUERIES_AND_KEYS")) and self.key_tokens is None

    def __repr__(self) -> str:
        return (
            f"AttentionSite(layer={self.layer}, path={self.path!r}, heads={self.num_heads}, "
            f"head_dim={self.head_dim}, dim={self.dim}, prefix={self.num_prefix_tokens}, grid={self.grid}, "
            f"stage={self.stage!r}, family={self.family!r})"
        )

    def weights(self) -> QKWeights:
        """Per-head W_q, W_k (H, d_k, d) and biases (H, d_k), detached from autograd."""
        w, b = self.qk_linear()
        h, dk = self.num_heads, self.head_dim
        w = w.detach()
        w_q, w_k = w[: h * dk].reshape(h, dk, -1), w[h * dk :].reshape(h, dk, -1)
        if b is None:
            return QKWeights(w_q, w_k, None, None)
        b = b.detach()
        return QKWeights(w_q, w_k, b[: h * dk].reshape(h, dk), b[h * dk :].reshape(h, dk))

    def qk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q and k (B, H, N, d_k) and (B, H, M, d_k), biases included, from the tokens entering W_q (and the
        call's key tokens, :meth:`keys_for`), in one matmul when they are the same tokens."""
        w, b = self.qk_linear()
        w, b = w.to(x.dtype), None if b is None else b.to(x.dtype)
        x_k = self.keys_for(x)
        if x_k is not x:
            rows = self.num_heads * self.head_dim
            q = torch.nn.functional.linear(x, w[:rows], None if b is None else b[:rows])
            k = torch.nn.functional.linear(x_k, w[rows:], None if b is None else b[rows:])
            return tuple(t.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2) for t in (q, k))  # type: ignore[return-value]
        out = torch.nn.functional.linear(x, w, b)
        bsz, n = x.shape[:2]
        out = out.view(bsz, n, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return out[0], out[1]

    def keys_for(self, x: torch.Tensor) -> torch.Tensor:
        """The tokens the model feeds to W_k in the call being recorded, whose query-side tokens are ``x``: x
        itself, or the spatially reduced tokens :attr:`key_tokens` computed from that call."""
        if self.key_tokens is None:
            return x
        if self._call_keys is None or self._call_keys.shape[0] != x.shape[0]:
            raise QKHooksError(f"{self.path}: its keys come from reduced tokens computed from the attention call; "
                               "rebuild maps of this layer inside a recording of a model call.")
        return self._call_keys

    def hidden_states(self, args: tuple[Any, ...], kwargs: dict[str, Any], block: bool = False) -> torch.Tensor:
        """Pick the token tensor out of a module call, whether passed by position or by keyword."""
        name = self.block_input_name if block else self.input_name
        if block and self.class_attention:
            raise QKHooksError(
                f"{self.block_path}: a class-attention block takes the patches and the class token as two arguments "
                "and joins them itself, so its residual stream is not one tensor qkhooks can read; record it with "
                "input='normed' (the tokens entering W_q/W_k)."
            )
        if not block:
            self.refuse_unmodelled_inputs(args, kwargs)
            # zoo11-build: the grid the module is handed (PVT's feat_size, HF's height, width); none from an earlier call
            self._grid_of_input = _grid_in_call(self.module, args, kwargs) if len(args) > 1 or kwargs else None
        if args:
            x = args[0]
        elif name in kwargs:
            x = kwargs[name]
        else:
            raise QKHooksError(
                f"{self.block_path if block else self.path}: could not find the hidden states in the call "
                f"(no positional argument and no keyword {name!r}); fix the adapter's input_name."
            )
        x = self._as_tokens(x)
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.dim:
            raise QKHooksError(
                f"{self.path}: expected a (batch, tokens, {self.dim}) tensor entering the layer, got "
                f"{type(x).__name__} {tuple(getattr(x, 'shape', ()))}; the adapter points at the wrong argument."
            )
        if not block and self.key_tokens is not None:
            with torch.no_grad():
                self._call_keys = self.key_tokens(x, args, kwargs)
        return x

    def refuse_unmodelled_inputs(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Refuse a call that hands the attention anything besides the tokens (a mask, a position bias, rotary
        tables, a causal flag): the maps rebuilt from q and k alone would silently differ from the model's."""
        if self.call_bias is not None:  # the adapter reads every argument of the call itself
            self._call_bias = self.call_bias(args, kwargs)
            return
        # zoo18: an argument is what the forward names it, by position or by keyword (HF ViT passes its mask by
        # position, DINOv2 by keyword); one past the named positions stays "argument i"
        names = _positional_names(self.module)  # names[i] names args[i]
        call = {names[i] if i < len(names) else f"argument {i}": v for i, v in enumerate(args[1:], 1)} | kwargs
        extra = [(k if k.startswith("argument ") else repr(k), v) for k, v in call.items()
                 if k not in (self.input_name, self.bias_input, self.rope_input)]
        if self.bias_input is not None:
            self._call_bias = call.get(self.bias_input)  # made additive only where a map is rebuilt
        if self.rope_input is not None:
            self._call_rope = call.get(self.rope_input)
        for label, value in extra:
            if _carries_tensor(value) or (label in ("'is_causal'", "'causal'") and value is True):
                raise QKHooksError(
                    f"unsupported attention in {self.path!r} ({type(self.module).__name__}): the model passes "
                    f"{label} ({_describe(value)}) to it, an extra term (mask, position bias, rotary tables) that "
                    "qkhooks does not model for this family, so rebuilt maps and modes would not be the model's. "
                    "Record a model or input without it, or teach the adapter that term (see README, "
                    "'Supported models')."
                )

    def forget_call(self) -> None:
        """Drop what the last recorded call handed the module (its mask, bias, rotary tables), so a finished
        recording keeps no batch's tensors alive and nothing reads them as if a call were under way."""
        self._call_bias = None
        self._call_rope = None
        self._call_keys = None

    def context_hooks(self) -> list[tuple[nn.Module, Callable[[nn.Module, tuple, dict], None]]]:
        """(module, forward pre-hook with kwargs) pairs a recording installs besides the site's own: where a site
        needs to see a call around its module (a windowed site reads its block's token grid). A :attr:`grid_source`
        is hooked once for all the sites that share it (:func:`grid_source_hooks`)."""
        return []

    def attention_rows(self, x: torch.Tensor, query_tokens: torch.Tensor) -> torch.Tensor:
        """Post-softmax rows (B, H, T, N) of the query tokens (B, T) in the call whose tokens entering W_q are ``x``
        (:func:`qkhooks.attention.attention_rows`; a windowed site reads them off its windows' maps)."""
        from qkhooks.attention import attention_rows

        return attention_rows(self, x, query_tokens)

    def check_attention_kind(self, kind: str) -> None:
        """Refuse, when the recording starts, an attention kind this site cannot rebuild exactly (none here)."""

    def map_heads(self) -> int:
        """Heads of this layer's maps: ``num_heads`` (the modes' heads), except where a map combines several
        component heads (differential attention: 2H component heads, H maps)."""
        return self.num_heads

    def run_file_refusal(self) -> str | None:
        """Why this layer cannot be streamed into a run file (one image batch, one geometry per layer), or None
        (zoo-packed: a packed vision tower takes no image batch and has no one grid per layer)."""
        return None

    # ---- q/k made inside the module (zoo11-inside, :mod:`qkhooks.models.inside`): maps observed, modes refused
    def observes_maps(self) -> bool:
        """Whether this layer's full maps are taken in the module's own forward (its q or k is made inside the module)
        instead of rebuilt from the hooked tokens (:class:`qkhooks.models.inside.InsideSite`)."""
        return False

    def modes_refusal(self) -> str | None:
        """Why no mode of W_q^T W_k describes this layer's logits (a maps-only site), or None: modes are projected."""
        return None

    def joins_calls(self) -> bool:
        """Whether the forward runs this module several times (VidEoMT's per-frame layers: once per frame), each call one
        more image of the layer's batch axis; a recording joins the calls (image-major). Elsewhere a second call of a
        layer in one forward is refused: a recording holds one call per layer and forward."""
        return False

    def forward_anchor(self) -> nn.Module:
        """The module whose place in the model's registration order is this site's place in the forward: its module,
        unless its block calls its attentions in another order than it registers them (TimeSformer registers the space
        attention first and runs the time attention first: the time site's anchor is its block)."""
        return self.module

    def images_in_call(self, rows: int) -> int:
        """Images in a call of the module whose batch axis has ``rows`` entries (windowed sites: rows / windows)."""
        return rows

    def to_images(self, kind: str, t: torch.Tensor) -> torch.Tensor:
        """A capture of ``kind`` (``"modes"``: (B, H, K, N) maps, or an attention kind) as stored per image: as is
        here; a windowed site returns its windows' maps per image and its modes on the image grid."""
        return t

    def rotates(self) -> bool:
        """Whether the call being recorded rotates q and k (RoPE tables were handed to the module)."""
        return self._call_rope is not None

    def rotate_qk(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q, k (B, H, N, d_k) rotated as the model rotates them in the call being recorded (as is without RoPE)."""
        if self._call_rope is None or self.rope_apply is None:
            return q, k
        return self.rope_apply(q, k, self._call_rope)

    def model_qk(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q, k (B, H, N, d_k) as the Linear layers return them -> as the model multiplies them: normalised
        (q/k-norm), then rotated (RoPE), each only where the model does it."""
        if self.qk_norm is not None:
            q, k = self.qk_norm(q, k)
        return self.rotate_qk(q, k)

    def keys_shape_logits(self) -> bool:
        """Whether each key's own q/k transformation (rotation by its position, normalisation by its scale) enters
        the logits, so a row of logits cannot be taken from W_k^T q_t · x_j without computing every key."""
        return self.rotates() or self.qk_norm is not None

    def content_only(self) -> str:
        """Why this layer's logits are more than scale · x^T W_q^T W_k x + bias ('' when they are not): analyses of
        that one bilinear form (the modes, BFD) then describe the content term only, and must say so."""
        reasons = []
        if self.rope_apply is not None:
            reasons.append("RoPE turns q and k by their positions (the form is the zero-offset content term)")
        if self.qk_norm is not None:
            reasons.append("q and k are normalised per token (the form is the pre-norm one)")
        if self.class_attention:
            reasons.append("only the class token queries (class attention)")
        if self.head_mixing is not None:
            reasons.append("the heads are mixed around the softmax (talking heads)")
        return "; ".join(reasons)

    def modes_rebuild_logits(self) -> bool:
        """Whether the modes of W_q^T W_k (plus the additive term) rebuild the logits of the call being recorded;
        False under RoPE, q/k-norm, class attention or head mixing, where they rebuild the content term q·k
        before the model's rotation, normalisation, query selection or mixing (those have their own exact forms)."""
        return not (self.keys_shape_logits() or self.class_attention or self.head_mixing is not None)

    def logit_bias(self) -> torch.Tensor | None:
        """The additive term (B or 1, H or 1, N, N) the model added to this layer's logits in the call being
        recorded (None: none): a position-only table, a mask, or both."""
        return additive_mask(self._call_bias)

    def position_bias(self) -> torch.Tensor | None:
        """The call's additive term as a position-only term (H, N_q, N_k), or None: the call had none, or it is
        (or holds) a mask, i.e. it masks some keys out or differs between the images of the batch. A mask stays a
        mask: it enters the rebuilt maps, but it is not a property of the layer to store once."""
        bias = self.logit_bias()
        if bias is None or bias.dim() != 4:
            return None
        if not bool(torch.isfinite(bias).all()) or bool((bias <= torch.finfo(bias.dtype).min / 2).any()):
            return None
        if bias.shape[0] > 1 and not torch.equal(bias, bias[:1].expand_as(bias)):
            return None
        return bias[0].expand(self.num_heads, -1, -1)

    def relative_term(self) -> torch.Tensor | None:
        """The query-dependent relative-position term (B, H, N, N) of the call being recorded (SAM/ViTDet decomposed
        positions, :mod:`qkhooks.models.relpos`), added by :meth:`add_logit_bias`; None for forms without one."""
        return None

    def add_logit_bias(self, logits: torch.Tensor, query_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Scaled logits (B, H, T, N) plus the model's own additive term, rows picked by ``query_tokens`` (B, T)
        when given (all N rows otherwise)."""
        bias = self.logit_bias()
        if bias is None:
            return logits
        bias = bias[..., : logits.shape[-1]].to(logits.device, logits.dtype)
        if query_tokens is not None:
            bias = bias.expand(logits.shape[0], -1, -1, -1)
            index = to_device(query_tokens.long(), bias.device)[:, None, :, None]
            bias = torch.gather(bias, 2, index.expand(-1, bias.shape[1], -1, bias.shape[-1]))
        return logits + bias

    def rows_layout(self, num_tokens: int) -> tuple[int, tuple[int, ...]]:
        """What a query-token index names in the call being recorded, ``num_tokens`` tokens: (prefix tokens, the grid
        (rows, cols) after them), or (prefix tokens, (num_tokens,)) where no grid is read. Two calls with one layout
        give an index the same token (zoo13: the rows-axis check compares these, not token counts)."""
        try:
            grid = tuple(int(v) for v in self.grid_for(num_tokens))
        except QKHooksError:
            return int(self.num_prefix_tokens), (int(num_tokens),)
        if int(self.num_prefix_tokens) + grid[0] * grid[1] != num_tokens:
            return int(self.num_prefix_tokens), (int(num_tokens),)
        return int(self.num_prefix_tokens), grid

    def grid_for_image(self, height: int, width: int) -> tuple[int, int]:
        """Patch grid of an input image of the given size."""
        if self.patch_size is None:
            if self.grid is None:
                raise QKHooksError(f"{self.path}: the adapter gives neither a patch size nor a grid.")
            return self.grid
        return height // self.patch_size[0], width // self.patch_size[1]

    def grid_for(self, num_tokens: int) -> tuple[int, int]:
        """Patch grid for a sequence of ``num_tokens``: the grid of the call being recorded (read off its
        :attr:`grid_source`, or handed to the module: NHWC / NCHW tokens, ``feat_size``, ``height, width``), else the
        native grid. Refused: a token count that fits none (a square is never assumed, zoo12); a call whose own grid
        is known and holds another count (detection tokens after the patches, dropped patches: the native grid of
        the same count would be a guess, round 33); a layer whose grid source did not run for this call (tokens
        made outside the recording)."""
        patches = num_tokens - self.num_prefix_tokens
        called = [g for g in (self._grid_of_source, self._grid_of_input) if g is not None and g is not SOURCE_NOT_RUN]
        for grid in called:
            if grid[0] * grid[1] == patches:
                return grid
        if called:
            raise QKHooksError(
                f"layer {self.layer} ({self.path}): this call's grid is {called[0][0]}x{called[0][1]} "
                f"({called[0][0] * called[0][1]} patches), but {patches} tokens follow the {self.num_prefix_tokens} "
                "prefix tokens (tokens added after the patches, or patches dropped), so which token is which patch is "
                "not known here (another grid of that count is never assumed). What needs no grid still works: the "
                "modes' maps and full attention maps (attention='full'), token by token."
            )
        if self._grid_of_source is SOURCE_NOT_RUN and self.grid is not None and self.grid[0] * self.grid[1] == patches:
            raise QKHooksError(
                f"layer {self.layer} ({self.path}): its patch embedding did not run in this recorded call (tokens made "
                "outside the recording), and the model takes other image sizes, so the native grid "
                f"{self.grid} is not known to be theirs; record the model's whole forward. What needs no grid still "
                "works: the modes' maps and full attention maps (attention='full'), token by token."
            )
        if self.grid is not None and self.grid[0] * self.grid[1] == patches:
            return self.grid
        raise QKHooksError(
            f"layer {self.layer} ({self.path}): {patches} patch tokens are not its native grid {self.grid}, and the "
            "module was not handed them as a grid, so their grid is not known here (a square is never assumed). What "
            "needs no grid still works: the modes' maps and full attention maps (attention='full'), token by token."
        )

    def _as_tokens(self, x: Any) -> Any:
        if self.token_layout == "grid" and isinstance(x, torch.Tensor) and x.dim() == 4:
            self._grid_of_input = (int(x.shape[1]), int(x.shape[2]))  # the call's own grid, for grid_for
            return x.flatten(1, 2)
        if self.token_layout == "channels_first" and isinstance(x, torch.Tensor) and x.dim() == 4:  # NCHW, row by row
            self._grid_of_input = (int(x.shape[2]), int(x.shape[3]))
            return x.flatten(2).transpose(1, 2)
        return x


SOURCE_NOT_RUN: Any = ("the grid source has not run in this call",)
"""``AttentionSite._grid_of_source`` as a recorded model call begins: its grid source (the patch embedding) has not run
yet, so a layer reached without it was handed tokens made outside the recording, and the native grid of their count
is not assumed (round 33). Outside a recording it is None: the native grid answers, as before."""


def grid_source_hooks(sites: Sequence[AttentionSite]) -> list[tuple[nn.Module, Callable[[nn.Module, tuple, dict], None]]]:
    """One forward pre-hook per distinct :attr:`AttentionSite.grid_source` of ``sites``: the call's grid is read once
    and noted on every site that reads it (all layers of a ViT share their patch embedding's)."""
    readers: dict[int, tuple[tuple, list[AttentionSite]]] = {}
    for site in sites:
        if site.grid_source is not None:
            readers.setdefault(id(site.grid_source), (site.grid_source, []))[1].append(site)
    hooks = []
    for (module, read), sharing in readers.values():
        def note_grid(_: nn.Module, args: tuple, kwargs: dict, read=read, sharing=sharing) -> None:
            grid = tuple(int(v) for v in read(args, kwargs))
            for site in sharing:
                site._grid_of_source = grid  # type: ignore[assignment]

        hooks.append((module, note_grid))
    return hooks


SiteT = TypeVar("SiteT", bound=AttentionSite)


def recast(site: AttentionSite, cls: type[SiteT], **changes: Any) -> SiteT:
    """``site``'s fields as a ``cls`` (a subclass that adds its form's own rules), with ``changes`` applied."""
    return cls(**{f.name: getattr(site, f.name) for f in dataclasses.fields(AttentionSite)} | changes)


def as_pair(value: Any) -> tuple[int, int]:
    """(rows, cols) of a size, window or shift given as one number (transformers) or a pair (timm)."""
    return (int(value[0]), int(value[1])) if isinstance(value, (tuple, list)) else (int(value), int(value))


QKRows = Callable[[], tuple[torch.Tensor, "torch.Tensor | None"]]
"""An :attr:`AttentionSite.qk_linear`: reads (W (2·H·d_k, d), b or None), the q rows then the k rows, from the model's
own parameters at each call, so an edit of the weights is seen."""


def leading_rows(proj: nn.Module, rows: int, biases: nn.Module | None = None) -> QKRows:
    """The first ``rows`` output rows of ``proj`` (a fused qkv Linear, or a 1x1 conv read as one: its weight
    flattened to (rows, d)) and of its bias. ``biases``: the module holding separate ``q_bias`` / ``k_bias`` added
    around ``proj`` (EVA, BEiT, Swin v2), read in place of ``proj.bias`` whenever it has them."""

    def read() -> tuple[torch.Tensor, torch.Tensor | None]:
        w = proj.weight[:rows].flatten(1)
        if biases is not None and getattr(biases, "q_bias", None) is not None:
            return w, torch.cat([biases.q_bias, biases.k_bias])
        return w, None if proj.bias is None else proj.bias[:rows]

    return read


def stacked_rows(q: nn.Module, k: nn.Module, k_rows: int | None = None) -> QKRows:
    """``q``'s rows then the first ``k_rows`` of ``k`` (all of them for None; the k half of a fused kv), weights of
    1x1 convs flattened; a missing bias reads as zeros beside the other's, and as None where both are missing."""

    def read() -> tuple[torch.Tensor, torch.Tensor | None]:
        w_k = k.weight[:k_rows].flatten(1)
        w = torch.cat([q.weight.flatten(1), w_k])
        if q.bias is None and k.bias is None:
            return w, None
        b_q = q.weight.new_zeros(q.weight.shape[0]) if q.bias is None else q.bias
        b_k = w_k.new_zeros(w_k.shape[0]) if k.bias is None else k.bias[:k_rows]
        return w, torch.cat([b_q, b_k])

    return read


_GRID_ARGUMENTS = (("feat_size",), ("hw_shape",), ("size",), ("height", "width"), ("H", "W"))


@functools.lru_cache(maxsize=None)
def _parameter_names(forward: Callable) -> tuple[str, ...]:
    return tuple(inspect.signature(forward).parameters)


def _positional_names(module: nn.Module) -> tuple[str, ...]:
    """The names of ``module.forward``'s positional parameters after ``self``: the i-th names a call's ``args[i]``."""
    try:
        return _positional_parameters(type(module).forward)[1:]
    except (TypeError, ValueError):  # pragma: no cover - a forward without a signature
        return ()


@functools.lru_cache(maxsize=None)
def _positional_parameters(forward: Callable) -> tuple[str, ...]:
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return tuple(n for n, p in inspect.signature(forward).parameters.items() if p.kind in kinds)


def _grid_in_call(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, int] | None:
    """zoo11-build: the (rows, cols) token grid an attention module is handed with its tokens, by the argument names
    models use for it (timm PVT-v2 / MViTv2 ``feat_size``, Twins ``size``, HF Segformer / GLPN / PVT ``height, width``),
    else None."""
    try:
        names = _parameter_names(type(module).forward)
    except (TypeError, ValueError):  # pragma: no cover - a forward without a signature
        return None
    call = dict(zip(names[1:], args), **kwargs)  # names[0] is self
    for keys in _GRID_ARGUMENTS:
        values = call.get(keys[0]) if len(keys) == 1 else tuple(call.get(k) for k in keys)
        if isinstance(values, (list, tuple, torch.Size)) and len(values) == 2 and all(
                isinstance(v, int) and not isinstance(v, bool) for v in values):
            return int(values[0]), int(values[1])
    return None


def _carries_tensor(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (tuple, list)):
        return any(_carries_tensor(v) for v in value)
    return False


def additive_mask(mask: Any) -> torch.Tensor | None:
    """An attention mask as the additive term the eager path adds: float as is, boolean True = attend."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):  # flex_attention's BlockMask (round 33: it crashed in .dtype)
        raise QKHooksError(
            f"the attention mask handed to the module is a {type(mask).__name__}, not a tensor (flex_attention's block "
            "mask), so the term the model adds to its logits cannot be read; record with attn_implementation 'sdpa' "
            "or 'eager' (model.set_attn_implementation('sdpa')).")
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, torch.finfo(torch.float32).min)
    return mask.detach()


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {tuple(value.shape)} tensor"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)} holding tensors"
    return repr(value)


@dataclasses.dataclass(frozen=True)
class _Adapter:
    name: str
    matches: Callable[[nn.Module], bool]
    find: Callable[[nn.Module], list[AttentionSite]]
    families: str


_ADAPTERS: list[_Adapter] = []


# A part of a model an adapter knows, handed in instead of the whole model (a torchvision ViT's encoder or one of its
# blocks): functions of the module handed in -> the refusal saying what to pass, or None; asked where no adapter
# matched, before the generic refusal, so that the error names the fix rather than "no registered adapter".
PART_HINTS: list[Callable[[nn.Module], str | None]] = []


def _part_of_a_library_model(module: nn.Module) -> str | None:
    """The refusal of a block, stage or attention of a timm or Hugging Face model handed in instead of the model
    (``record(model.blocks[3])``, ``record(model.blocks)``), else None. Before, a timm part was refused with advice
    for an unknown architecture (teach qkhooks its form with register_adapter) about an attention qkhooks models in
    the whole model, and a Sequential of blocks was told to record its first block, which was refused in turn."""
    if isinstance(module, (nn.Sequential, nn.ModuleList)) and len(module) and all(
            _library_part(child) for child in module):
        return _part_words(f"{type(module).__name__} of {type(module[0]).__name__}", _library_part(module[0]) or "")
    library = _library_part(module)
    return _part_words(f"{type(module).__name__} ({type(module).__module__})", library) if library else None


def _library_part(module: nn.Module) -> str | None:
    """"timm" or "Hugging Face transformers" where ``module`` is a part of such a model holding an attention, else
    None. A timm model has ``forward_features`` (every class timm builds a model from has it; its backbones have
    ``feature_info``); a transformers part is recorded where an adapter takes it (a CLIP vision tower is no
    PreTrainedModel), so only one that none takes is a part."""
    library = type(module).__module__.split(".")[0]
    if library == "timm":
        if any(hasattr(module, a) for a in ("forward_features", "pretrained_cfg", "feature_info")):
            return None
    elif library == "transformers":
        from transformers import PreTrainedModel

        if isinstance(module, PreTrainedModel):
            return None
    else:
        return None
    # an attention by name, or one that owns q/k projections under another (CaiT's TalkingHeadAttn / ClassAttn,
    # ConViT's GPSA): the whole model models them
    if not any("attention" in type(m).__name__.lower() for m in module.modules()) and not attention_like(module):
        return None
    if library == "transformers" and any(adapter.matches(module) for adapter in _ADAPTERS):
        return None
    return "timm" if library == "timm" else "Hugging Face transformers"


def _part_words(what: str, library: str) -> str:
    return (f"{what} is a part of a {library} model, not the model: qkhooks finds the attention layers through the "
            "whole model, whose forward says where each token comes from (its prefix tokens, then the patch grid), "
            "which a part alone does not. Pass the whole model: record(model); for some layers only, "
            "record(model, layers=[0, 5]) (layer indices, or module paths: qkhooks.sites(model) lists each layer's).")


PART_HINTS.append(_part_of_a_library_model)


def register_adapter(
    name: str,
    matches: Callable[[nn.Module], bool],
    find: Callable[[nn.Module], list[AttentionSite]],
    families: str = "",
    first: bool = True,
) -> None:
    """Teach qkhooks a new architecture.

    Args:
        name: short name shown in error messages and on each site (``site.family``).
        matches: returns True when this adapter handles the model.
        find: returns the model's :class:`AttentionSite` list in block order.
        families: human description for the "supported families" listing.
        first: try this adapter before the built-in ones (so users can override them).
    """
    _ADAPTERS[:] = [a for a in _ADAPTERS if a.name != name]
    adapter = _Adapter(name, matches, find, families)
    _ADAPTERS.insert(0, adapter) if first else _ADAPTERS.append(adapter)


def adapter_ids() -> tuple[int, ...]:
    """The identities of the registered adapters, in order: part of a cache key that a new registration changes."""
    return tuple(map(id, _ADAPTERS))


def adapters() -> list[tuple[str, str]]:
    """(name, families) of every registered adapter, in the order they are tried."""
    return [(a.name, a.families) for a in _ADAPTERS]


def find_sites(model: nn.Module, layers: "LayerSelection" = None, skip_unmodelled: bool = False) -> list[AttentionSite]:
    """All attention sites of ``model`` (or the chosen block indices), found by the first matching adapter.

    ``skip_unmodelled``: take the sites an adapter models exactly and leave out the modules qkhooks does not model
    (a channel softmax, an unknown attention) instead of refusing the model; :func:`qkhooks.models.unsupported.unmodelled_parts` names them.
    Layer indices number the sites taken, in forward order; a module left out has none. ``model`` may be a
    :class:`~qkhooks.models.load.LoadedModel`, as everywhere else; a model on the meta device is searched too (the
    zoo finds forms that way), so only the LoadedModel is unwrapped here, not checked for weights."""
    from qkhooks.models.load import LoadedModel

    model = model.model if isinstance(model, LoadedModel) else model
    if not isinstance(model, nn.Module):
        raise QKHooksError(f"finding attention sites needs a torch nn.Module or a LoadedModel, got "
                           f"{type(model).__name__}; load one with qkhooks.load_model (it takes the CLI's specs, "
                           "e.g. 'timm:vit_small_patch16_224').")
    try:
        return _find_sites(model, layers, skip_unmodelled)
    except QKHooksError as err:  # the refusal offers skip_unmodelled only where it would record something
        if skip_unmodelled or SKIP_HINT not in str(err):
            raise
        try:
            _find_sites(model, None, True)
        except QKHooksError:
            raise QKHooksError(str(err).replace(" " + SKIP_HINT, "")) from None
        raise


def _find_sites(model: nn.Module, layers: "LayerSelection", skip_unmodelled: bool) -> list[AttentionSite]:
    refuse_opaque(model)  # TorchScript, fx; quantised or compiled attention: no attention module to read, or no float weights
    part = next(filter(None, (hint(model) for hint in PART_HINTS)), None)
    if part:  # a part of a model handed in instead of the model (record(model.encoder)): before diagnose blames it
        raise QKHooksError(part)
    with skipping_unmodelled(skip_unmodelled):
        diagnose(model)
        for adapter in _ADAPTERS:
            if adapter.matches(model):
                found = adapter.find(model)
                if not found:
                    raise QKHooksError(f"adapter {adapter.name!r} matched {type(model).__name__} but found no attention layers.")
                if skip_unmodelled:  # an adapter may take every attention of its family, the unmodelled ones too
                    found = [s for s in found if unmodelled_reason(s.module) is None]
                if found:
                    refuse_quantised(model, [s.path for s in found])  # an adapter's site the candidates did not hold
                    refuse_unplain_qk(found)
                    watch_qk_path(model, found)  # after refuse_unplain_qk: it watches the qk_scope found there
                    return select_layers(number_in_forward_order(model, found), layers)
                break
    left = unmodelled_parts(model, []) if skip_unmodelled else {}
    if left:  # each entry reads "Class: reason"
        (first, why), others = next(iter(left.items())), list(left)[1:]
        cls, _, reason = why.partition(": ")
        raise QKHooksError(f"unsupported attention in {first!r} ({cls}): {reason}. skip_unmodelled=True leaves nothing "
                           f"to record: no attention of {type(model).__name__} is one qkhooks models exactly"
                           + (f" (left out with it: {', '.join(map(repr, others[:3]))}" + (" ..." if len(others) > 3 else "")
                              + ")" if others else "") + ".")
    if callable(getattr(model, "merge_and_unload", None)):  # a peft model: its q/k layers compute W x + B·A x
        raise QKHooksError(f"{type(model).__name__} holds adapter layers (peft) whose forward adds a term its weights "
                           f"do not say: {PEFT_FIX}.")
    wrapped = _wrapped_model(model)
    if wrapped:
        raise QKHooksError(f"{type(model).__name__} wraps a model qkhooks knows: record {wrapped} itself (qkhooks "
                           "finds the attention layers by the model's own class, which the wrapper hides).")
    listing = "\n".join(f"  - {name}: {fam}" for name, fam in adapters())
    raise QKHooksError(
        f"qkhooks does not know how to find the attention layers of {type(model).__name__}.\n"
        f"{describe_attention_like(model)}\n"
        f"Supported families:\n{listing}\n"
        "Add your own in a few lines with qkhooks.register_adapter(name, matches, find) (see README, "
        "'Your own architecture')."
    )


def _wrapped_model(model: nn.Module) -> str | None:
    """How to reach the model inside a wrapper (torch.compile's ``_orig_mod``, DataParallel's ``module``, a
    Sequential's item) when an adapter knows it, else None."""
    for name, child in model.named_children():
        if any(adapter.matches(child) for adapter in _ADAPTERS):
            how = f"model[{name}]" if name.isdigit() else f"model.{name}"
            return f"{how} ({type(child).__name__})"
    return None


def number_in_forward_order(model: nn.Module, found: list[AttentionSite]) -> list[AttentionSite]:
    """Give the sites layer indices 0..L-1 in the order the forward runs them, over all stages.

    Modules run in the order they are registered in every family qkhooks knows (stages, then blocks; the zoo
    test checks it against the order the hooks fire), so that order is used, not an index read off a path:
    ``blocks.0`` repeats in every stage of PiT, MobileViT and GroupViT.
    """
    order = {id(m): i for i, m in enumerate(model.modules())}
    missing = [s.path for s in found if id(s.module) not in order]
    if missing:
        raise QKHooksError(f"the adapter returned attention modules that are not part of the model: {missing}.")
    paths = [s.path for s in found]
    if len(set(paths)) != len(paths):
        raise QKHooksError(f"the adapter returned an attention module twice: {sorted(p for p in paths if paths.count(p) > 1)}.")
    # zoo11-build: a site may run inside another's stretch of the forward (MiniCPM-V's merger, called after encoder layer
    # insert_layer_id although registered after the encoder): ``runs_after`` names the site module it follows
    found = sorted(found, key=lambda s: (order[id(s.runs_after)], 1) if getattr(s, "runs_after", None) is not None
                   else (order[id(s.forward_anchor())], 0))
    for index, site in enumerate(found):
        site.layer = index
        if not site.stage:
            site.stage = site.block_path.rpartition(".")[0]
    return found


def select_layers(found: list[AttentionSite], layers: LayerSelection) -> list[AttentionSite]:
    """Keep the requested layers, in block order: block indices (negative ones count from the end), strings as in
    :func:`parse_layers`, or the attention modules' dotted paths (``"blocks.5.attn"``, as the reading API takes)."""
    layers = parse_layers(_paths_as_indices(found, layers))
    if layers is None:
        return found
    if not layers:
        raise QKHooksError("the layer selection is empty: give at least one block index, or 'all'.")
    by_layer = {s.layer: s for s in found}
    n = len(found)
    chosen = []
    for layer in layers:
        idx = layer + n if layer < 0 else layer
        if idx not in by_layer:
            raise QKHooksError(f"layer {layer} does not exist: this model has blocks 0..{n - 1}.")
        chosen.append(idx)
    return [by_layer[i] for i in sorted(set(chosen))]


LayerSelection = Union[str, int, Sequence[Union[int, str]], None]
"""Which layers: None/"all", a block index, a list of indices or module paths, or "0,3,5-7,-1" / "blocks.5.attn"."""


def _is_path(part: Any) -> bool:
    """A module path among layer indices: a string with a letter (``"blocks.5.attn"``; ``"-1"``, ``"5-7"`` are not)."""
    return isinstance(part, str) and any(c.isalpha() for c in part) and part.strip().lower() != "all"


def _paths_as_indices(found: Sequence[AttentionSite], layers: LayerSelection) -> LayerSelection:
    """``layers`` with each module path replaced by its block index (an unknown path refused, listing the paths)."""
    parts = layers.split(",") if isinstance(layers, str) else layers
    if not isinstance(parts, (list, tuple)) or not any(_is_path(p) for p in parts):
        return layers
    paths = {s.layer: s.path for s in found}
    listing = "`{s.layer: s.path for s in qkhooks.sites(model)}`"
    out = [layer_at_path(part.strip(), paths, "this model", listing) if _is_path(part)
           else part.strip() if isinstance(part, str) else part for part in parts]
    return ",".join(map(str, out)) if isinstance(layers, str) else out


def parse_layers(spec: str | int | Sequence[int | str] | None) -> list[int] | None:
    """Parse a layer selection such as ``"0,3,5-7,-1"`` (ranges inclusive), a block index or a list of them; None or
    "all" means every layer. (Module paths are resolved against a model by :func:`select_layers`.) An empty string
    is refused, not read as "all": it is what an unset shell variable (``--layers "$LAYERS"``) gives."""
    if isinstance(spec, str) and not spec.strip():
        raise QKHooksError(f"the layer selection {spec!r} is empty: give block indices ('0,3,5-7,-1'), or 'all' (or "
                           "leave the option out) for every layer.")
    if spec is None or (isinstance(spec, str) and spec.strip().lower() == "all"):
        return None
    if not isinstance(spec, str):
        try:
            one = not isinstance(spec, Iterable) or getattr(spec, "ndim", None) == 0  # an int, a 0-d array/tensor
            return [_block_index(v) for v in ([spec] if one else list(spec))]
        except (TypeError, ValueError):
            _bad_layers(spec)
    out: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        try:
            if "-" in part[1:]:
                lo, hi = part[0] + part[1:].split("-", 1)[0], part[1:].split("-", 1)[1]
                if int(hi) < int(lo):
                    raise QKHooksError(f"bad layer range {part!r} in {spec!r}: write it low to high, e.g. '3-5'.")
                out.extend(range(int(lo), int(hi) + 1))
            else:
                out.append(int(part))
        except ValueError:
            _bad_layers(spec)
    return out


def _block_index(value: Any) -> int:
    """One block index: an integer (Python, numpy or torch) or its digits; not a bool or a float."""
    if isinstance(value, bool):
        raise TypeError("a bool is not a block index")
    return int(value.strip()) if isinstance(value, str) else operator.index(value)


def _bad_layers(spec: Any) -> NoReturn:
    raise QKHooksError(f"bad layer selection {spec!r}: use block indices ('0,3,5-7,-1', 2, [0, 5]), the attention "
                       "modules' paths (['blocks.5.attn']) with a model, or 'all'.") from None


def conv_output_size(size: int, conv: nn.Conv1d | nn.Conv2d | nn.Conv3d, axis: int) -> int:
    """The output length of ``conv`` along its spatial ``axis`` (a Conv2d's 0: rows, 1: cols; a Conv3d's 0: frames)
    for an input of ``size``: torch's formula, with its string paddings (``"same"`` keeps the size; ``"valid"`` pads
    nothing). The one copy the adapters, the results' reduced grids and the video tubelets share."""
    if conv.padding == "same":
        return size
    pad = 0 if conv.padding == "valid" else int(conv.padding[axis])  # type: ignore[index]
    kernel, stride, dilation = int(conv.kernel_size[axis]), int(conv.stride[axis]), int(conv.dilation[axis])
    return (size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1
