"""Vision towers of vision-language models that take one packed sequence instead of an image batch.

Qwen2-VL's vision tower and the many that copy it (Qwen3-VL, Qwen3.5, GLM-4V, Kimi, VideoLlama3, ...) get every
image's patches concatenated into one (N_total, d) sequence and ``cu_seqlens`` (the cumulative token counts of the
attention segments: one per image, or per frame of a video). Their attention module projects q and k for the whole
sequence (a fused ``qkv`` or ``q_proj``/``k_proj``), turns them with the 2-D vision RoPE tables the tower hands it
(``position_embeddings`` = (cos, sin), one row per packed token, rotated by halves with the module's own
``apply_rotary_pos_emb_vision``) and attends within each segment only (SDPA/eager per segment, or flash attention
over ``cu_seqlens``: a block-diagonal attention).

:class:`PackedSite` reads the call's own ``cu_seqlens`` and cuts the packed tokens (and their rotary rows) into
one row per segment, zero-padded to the longest: (S, n_max, d). Every segment is then an image of the batch, so
maps are per segment ((S, H, n_max, n_max), never one map across segments), the padded keys masked out with an
additive -inf term, and the padded query rows and padded tokens' modes set to 0 (segment s is ``[:n_s, :n_s]``,
:meth:`PackedSite.segment_lengths`). Tokens stay in the model's packed order (Qwen2-VL: merge-block order), so no
image grid is claimed. Modes are those of the content form W_q^T W_k (RoPE: the zero-offset term).
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import torch
from torch import nn

from qkhooks._devices import to_device
from qkhooks.errors import QKHooksError
from qkhooks.models.base import AttentionSite, recast
from qkhooks.models.hf import EXTRA_FORMS
from qkhooks.models.unsupported import MODELLED_FORMS

__all__ = ["PackedSite", "PACKED_ATTENTION"]

# HF attention classes whose forward is Qwen2-VL's packed form: (hidden_states, cu_seqlens, position_embeddings,
# max_seqlen), q/k from qkv or q_proj/k_proj, optional q/k RMSNorm before the rotation, one attention per segment.
# The zoo test checks each against the model's own eager attention per segment.
PACKED_ATTENTION = {
    "VisionAttention": True,  # Qwen2-VL
    "Qwen2_5_VLVisionAttention": True,  # window layers get their windows as the segments (cu_window_seqlens)
    "Qwen3VLVisionAttention": True,
    "Qwen3VLMoeVisionAttention": True,
    "Qwen3_5VisionAttention": True,
    "Qwen3_5MoeVisionAttention": True,
    "Qwen4ExpVisionAttention": True,
    "CohereCompassVisionAttention": True,
    "Glm4vVisionAttention": True,
    "Glm4vMoeVisionAttention": True,
    "GlmOcrVisionAttention": True,  # q/k RMSNorm per head before the rotation
    "Glm5NextVisionAttention": True,  # q/k RMSNorm per head before the rotation
    "GlmImageVisionAttention": False,  # no rotation in the attention (positions added to the patches)
    "Kimi_K25VisionAttention": True,
    "MuseGlimmerVisionAttention": True,  # Kimi's attention
    "MuseSparkVisionAttention": True,
    "Exaone4_5_VisionAttention": True,  # grouped-query heads (one fused qkv of q_dim + 2·kv_dim rows)
    "HYV4VLVisionAttention": False,  # (1, tokens, d) packed batch of one, no rotation in the attention
    "Cosmos3EdgeVisionAttention": False,  # packed SigLIP2 attention, positions added to the patches
    "VideoLlama3VisionAttention": True,
    "Inkling2VisionAttention": True,  # a class token in front of each image, rotated by angle 0 (position (0, 0))
    # zoo11-build: MiniCPM-V 4.7 / MiniCPM-OCR: no rotation (positions added to the patches); the encoder layers attend
    # per image, the window-attention merger (vit_merger.self_attn) per 2x2-token window of its window_index order
    "MiniCPMV4_7VisionAttention": False,
    "MiniCPMOcrVisionAttention": False,
    # zoo11-build: LFM3-VL: grouped-query q_proj / k_proj (the HF adapter repeats each key head), per-head q/k RMSNorm
    # before the rotation; its gated short-convolution layers mix tokens without attention (no site, as a CNN block)
    "Lfm3VlVisionAttention": True,
}
_CALL = ("hidden_states", "cu_seqlens", "position_embeddings", "max_seqlen")


@dataclasses.dataclass(eq=False)
class PackedSite(AttentionSite):
    """An attention over a packed sequence, segment by segment (``cu_seqlens``); segments become the batch."""

    _call_lengths: tuple[int, ...] | None = dataclasses.field(default=None, repr=False)
    # zoo11-build: the attention module this one runs right after, where that is not the registration order (MiniCPM-V's
    # merger runs after encoder layer insert_layer_id); read by number_in_forward_order
    runs_after: nn.Module | None = dataclasses.field(default=None, repr=False)

    def refuse_unmodelled_inputs(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        call = dict(zip(_CALL, args), **kwargs)
        unknown = [k for k, v in call.items() if k not in _CALL and (isinstance(v, torch.Tensor) or
                   (isinstance(v, (tuple, list)) and any(isinstance(t, torch.Tensor) for t in v)))]
        unknown += [f"argument {i}" for i in range(len(_CALL), len(args))]
        if unknown:
            raise self._refusal(f"the model passes {unknown}, which the packed-sequence adapter does not model")
        x, cu = call.get("hidden_states"), call.get("cu_seqlens")
        x = x[0] if isinstance(x, torch.Tensor) and x.dim() == 3 and x.shape[0] == 1 else x  # HYV4VL: a batch of one
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or not isinstance(cu, torch.Tensor):
            raise self._refusal("it was not called with a packed (tokens, dim) sequence and its cu_seqlens")
        bounds = [int(b) for b in cu.tolist()]
        lengths = tuple(b - a for a, b in zip(bounds, bounds[1:]))
        if bounds[0] != 0 or bounds[-1] != x.shape[0] or any(n <= 0 for n in lengths):
            raise self._refusal(f"its cu_seqlens {bounds} do not cut the {x.shape[0]} packed tokens into non-empty "
                                "segments")
        self._call_lengths = lengths
        rope = call.get("position_embeddings")
        if (rope is None) != (self.rope_apply is None):
            raise self._refusal("it was handed rotary tables the adapter does not expect, or none where it expects them")
        self._call_rope = None if rope is None else tuple(self._segments(t, fill=fill) for t, fill in zip(rope, (1.0, 0.0)))
        padded = len(set(lengths)) > 1
        if padded:  # keys past a segment's end are not its tokens: -inf, as the model never attends to them
            self._call_bias = torch.zeros(len(lengths), 1, 1, max(lengths), dtype=torch.float32, device=x.device)
            self._call_bias.masked_fill_(~self._valid()[:, None, None, :], torch.finfo(torch.float32).min)
        else:
            self._call_bias = None

    def hidden_states(self, args: tuple[Any, ...], kwargs: dict[str, Any], block: bool = False) -> torch.Tensor:
        """The packed tokens of the call as (segments, n_max, d), zero-padded."""
        if block:
            raise self._refusal("input='residual' reads the block's input, whose segments are only known from the "
                                "attention call; record with input='normed' (the tokens entering W_q/W_k)")
        self.refuse_unmodelled_inputs(args, kwargs)
        x = args[0] if args else kwargs["hidden_states"]
        x = x[0] if x.dim() == 3 else x  # (1, tokens, d): checked above
        if x.shape[-1] != self.dim:
            raise self._refusal(f"its tokens are {x.shape[-1]} wide, not {self.dim}")
        return self._segments(x)

    def segment_lengths(self) -> tuple[int, ...]:
        """Tokens per segment (image, or frame of a video) of the call being recorded: segment s of every map
        is ``[s, :, :n_s, :n_s]``."""
        if self._call_lengths is None:
            raise QKHooksError(f"{self.path}: its segments are known only inside a recording of a model call.")
        return self._call_lengths

    def to_images(self, kind: str, t: torch.Tensor) -> torch.Tensor:
        """Padded query rows of the maps, and padded tokens' modes, set to 0 (they are no token of the model)."""
        lengths = self.segment_lengths()
        if t.shape[0] != len(lengths) or t.shape[-1] != max(lengths):
            raise self._refusal(f"a {kind!r} capture of shape {tuple(t.shape)} is not one map per segment of "
                                f"{len(lengths)} segments")
        if len(set(lengths)) == 1:
            return t
        valid = to_device(self._valid(), t.device)
        if kind == "modes":  # (S, H, K, n_max)
            return t * valid[:, None, None, :].to(t.dtype)
        return t * valid[:, None, :, None].to(t.dtype)  # (S, H, n_max, n_max): padded query rows

    def attention_rows(self, x: torch.Tensor, query_tokens: torch.Tensor) -> torch.Tensor:
        if len(set(self.segment_lengths())) > 1:
            raise self._refusal("attention rows pick the same query tokens in every image, and the packed images "
                                f"differ in length {self.segment_lengths()}; record attention='full' (one map per image)")
        return super().attention_rows(x, query_tokens)

    def grid_for(self, num_tokens: int) -> tuple[int, int]:
        raise QKHooksError(f"{self.path}: {self.run_file_refusal()}")

    def run_file_refusal(self) -> str:
        return ("a packed vision tower takes every image's patches as one sequence with per-image grids, not an image "
                "batch, and holds images of their own grids in the model's packed token order (merge blocks), so no "
                "single patch grid describes a layer; run files and grid analyses need one. Record it live with "
                "qkhooks.record() (one map per image).")

    def forget_call(self) -> None:
        super().forget_call()
        self._call_lengths = None

    def _valid(self) -> torch.Tensor:
        lengths = self.segment_lengths()
        return torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]

    def _segments(self, t: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """(N_total, ...) packed rows -> (S, n_max, ...) per segment, padded with ``fill``."""
        lengths = self.segment_lengths()
        if len(set(lengths)) == 1:
            return t.reshape(len(lengths), lengths[0], *t.shape[1:])
        return torch.nn.utils.rnn.pad_sequence(list(t.split(list(lengths))), batch_first=True, padding_value=fill)

    def _refusal(self, why: str) -> QKHooksError:
        return QKHooksError(f"unsupported attention in {self.path!r} ({type(self.module).__name__}): {why}.")


def _rotation(module: nn.Module):
    """The module's own ``apply_rotary_pos_emb_vision`` on (S, H, n, d_k) q and k (it takes (tokens, H, d_k))."""
    apply = getattr(sys.modules[type(module).__module__], "apply_rotary_pos_emb_vision")

    def rotate(q: torch.Tensor, k: torch.Tensor, tables: Any) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = tables
        q, k = apply(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        return q.transpose(1, 2), k.transpose(1, 2)

    return rotate


def _grouped_fields(site: AttentionSite, module: nn.Module, groups: int) -> dict[str, Any]:
    """Head sizes and a q/k reader for a fused qkv of q_dim + 2·kv_dim rows whose key head g serves query heads
    g·G..g·G+G-1 (the eager path's repeat_kv): each query head's own key rows, repeated."""
    qkv, heads, head_dim = getattr(module, "qkv", None), int(module.num_heads), int(module.head_dim)
    q_dim, kv_dim = heads * head_dim, int(getattr(module, "kv_dim", -1))
    if not isinstance(qkv, nn.Linear) or kv_dim * groups != q_dim or qkv.out_features != q_dim + 2 * kv_dim:
        raise QKHooksError(f"unsupported attention in {site.path!r} ({type(module).__name__}): grouped-query heads "
                           f"({groups} query heads per key head) laid out otherwise than one fused qkv of q_dim + "
                           "2·kv_dim rows, which the packed adapter does not model.")

    def qk_linear() -> tuple[torch.Tensor, torch.Tensor | None]:
        w, b = qkv.weight, qkv.bias
        w_k = w[q_dim: q_dim + kv_dim].unflatten(0, (-1, head_dim)).repeat_interleave(groups, 0).flatten(0, 1)
        if b is None:
            return torch.cat([w[:q_dim], w_k]), None
        b_k = b[q_dim: q_dim + kv_dim].unflatten(0, (-1, head_dim)).repeat_interleave(groups, 0).flatten(0, 1)
        return torch.cat([w[:q_dim], w_k]), torch.cat([b[:q_dim], b_k])

    return dict(num_heads=heads, head_dim=head_dim, qk_linear=qk_linear, scale=float(module.scaling))


def _packed_site(site: AttentionSite, module: nn.Module, modules: dict[str, nn.Module]) -> AttentionSite:
    """The HF adapter's site of a packed attention module, as a :class:`PackedSite`."""
    if type(module).__name__ == "VisionAttention" and not type(module).__module__.endswith(".modeling_qwen2_vl"):
        return site  # another family's class of that name: not this form
    groups = int(getattr(module, "num_key_value_groups", 1))
    grouped: dict[str, Any] = {}
    if hasattr(module, "qkv") and (groups != 1 or hasattr(module, "kv_dim")):  # Exaone 4.5: q_dim + 2·kv_dim rows
        # (separate grouped q_proj / k_proj, LFM3-VL: the HF adapter's site already repeats each key head)
        grouped = _grouped_fields(site, module, groups)
    rotates = PACKED_ATTENTION[type(module).__name__]
    return recast(site, PackedSite, **grouped | dict(
        qk_modules=(), num_prefix_tokens=0, grid=None, patch_size=None, bias_input=None,
        rope_input="position_embeddings" if rotates else None, rope_apply=_rotation(module) if rotates else None,
        rope_layout="half"), runs_after=_merger_runs_after(site, modules))


def _merger_runs_after(site: AttentionSite, modules: dict[str, nn.Module]) -> nn.Module | None:
    """zoo11-build: MiniCPM-V's window-attention merger (``vit_merger.self_attn``) runs after encoder layer
    ``insert_layer_id``: that layer's attention module (None for every other site)."""
    tower, _, rest = site.path.rpartition("vit_merger.")
    if rest != "self_attn":
        return None
    insert = getattr(getattr(modules[tower.rstrip(".")], "config", None), "insert_layer_id", None)
    after = modules.get(f"{tower}encoder.layers.{insert}.self_attn")
    if not isinstance(insert, int) or insert < 0 or after is None:
        raise QKHooksError(f"unsupported attention in {site.path!r} ({type(site.module).__name__}): MiniCPM-V's merger "
                           f"runs after encoder layer insert_layer_id={insert!r}, which this tower does not have.")
    return after


for _name in PACKED_ATTENTION:
    EXTRA_FORMS[_name] = (frozenset({"q_norm", "k_norm"}), _packed_site)
MODELLED_FORMS.update(PACKED_ATTENTION)  # q/k RMSNorm of GlmOcr / Glm5Next: applied with the model's own modules
