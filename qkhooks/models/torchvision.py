"""Adapter for torchvision's Vision Transformer (``torchvision.models.VisionTransformer``: ``vit_b_16``, ``vit_b_32``,
``vit_l_16``, ``vit_l_32``, ``vit_h_14``).

Each ``EncoderBlock`` calls ``self_attention(x, x, x, need_weights=False)`` on ``x = ln_1(input)``, where
``self_attention`` is an ``nn.MultiheadAttention(hidden_dim, num_heads, batch_first=True)``: q, k, v from one packed
``in_proj_weight`` (3d, d) = [W_q; W_k; W_v] and ``in_proj_bias``, softmax(q·kᵀ / sqrt(d_k)) with no mask, in eval
often through torch's fused native kernel. The site hooks the MultiheadAttention, whose ``query`` is the tokens
entering W_q/W_k, and reads W_q, W_k, b_q, b_k off the first 2d rows of the packed projection, live. The class token
comes first (one prefix token), then the patches of the (image_size / patch_size)² grid in raster order; each call's
grid is read off the image ``conv_proj`` is handed, as ``_process_input`` computes it.

Only that form is taken: a MultiheadAttention with separate q/k/v weights (kdim or vdim other than embed_dim),
learned key/value biases appended as a token (``add_bias_kv``), a zero token (``add_zero_attn``) or
``batch_first=False`` is refused at the search, and a call that hands it a mask (a causal one too: torch takes
``is_causal`` only with ``attn_mask``) or keys or values other than the query tensor is refused by the site. Other
models holding a MultiheadAttention (OpenAI CLIP, open_clip) are not matched: refused as before. The class is matched by name, so torchvision is imported lazily.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable

import torch
from torch import nn

from qkhooks.errors import QKHooksError
from qkhooks.models.base import AttentionSite, QKRows, register_adapter
from qkhooks.models.unsupported import moves_devices_only, refuse_uncovered

_VIT = "torchvision.models.vision_transformer.VisionTransformer"
_ENCODER_BLOCK = "torchvision.models.vision_transformer.EncoderBlock"
_MHA = "torch.nn.modules.activation.MultiheadAttention"
_FIX = ("torchvision's Vision Transformers build it as nn.MultiheadAttention(hidden_dim, num_heads, batch_first=True); "
        "record such a model, or teach qkhooks this form with qkhooks.register_adapter (README, 'Your own architecture')")


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _class_in_mro(obj: Any, name: str) -> type | None:
    """The class of ``obj``'s MRO named ``name`` (module and qualname), or None."""
    return next((c for c in type(obj).__mro__ if _qualified(c) == name), None)


def packed_qk_rows(mha: nn.Module) -> QKRows:
    """The first 2·embed_dim rows (W_q then W_k) of a MultiheadAttention's packed ``in_proj_weight`` and of its
    ``in_proj_bias`` (None where it has none), read at each call so that weight edits are seen."""
    rows = 2 * int(mha.embed_dim)

    def read() -> tuple[torch.Tensor, torch.Tensor | None]:
        bias = mha.in_proj_bias
        return mha.in_proj_weight[:rows], None if bias is None else bias[:rows]

    return read


def unmodelled_mha(mha: nn.Module) -> str | None:
    """Why qkhooks does not model this MultiheadAttention instance exactly, or None (the form torchvision builds)."""
    base = _class_in_mro(mha, _MHA)
    if base is None or type(mha).forward is not base.forward:
        return f"{type(mha).__name__} overrides nn.MultiheadAttention's forward, which is what qkhooks models"
    if mha.in_proj_weight is None:  # kdim or vdim other than embed_dim: no packed projection
        return (f"its keys and values have other widths than its queries (kdim={mha.kdim}, vdim={mha.vdim}, "
                f"embed_dim={mha.embed_dim}): separate q/k/v_proj_weight, so keys come from other tokens than the queries "
                "(cross-attention)")
    if mha.bias_k is not None:  # add_bias_kv=True makes bias_k and bias_v together
        return ("add_bias_kv=True appends a learned key and value to every sequence, a key that is no token's, which "
                "the maps and modes of W_q^T W_k over the tokens do not model")
    if mha.add_zero_attn:
        return ("add_zero_attn=True appends a zero key and value to every sequence, a key that is no token's, which "
                "the maps and modes over the tokens do not model")
    if not mha.batch_first:
        return ("batch_first=False: it takes (tokens, batch, width) sequences, while qkhooks reads the tokens entering it "
                "as (batch, tokens, width)")
    return None


@functools.lru_cache(maxsize=8)
def _signature(forward: Callable[..., Any]) -> inspect.Signature:
    """The signature of a forward, read once (a site's call is bound to it at every forward of every layer)."""
    return inspect.signature(forward)


@dataclasses.dataclass(eq=False)
class MultiheadAttentionSite(AttentionSite):
    """A torchvision ``EncoderBlock``'s ``nn.MultiheadAttention``, self-attention of the query tensor: its call must
    hand the very same tensor as query, key and value, and no mask (torch takes a causal flag only with one)."""

    def refuse_unmodelled_inputs(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        try:
            call = _signature(type(self.module).forward).bind(self.module, *args, **kwargs).arguments
        except TypeError as err:
            raise QKHooksError(f"{self.path}: its call does not fit nn.MultiheadAttention.forward ({err}).") from None
        head = f"unsupported attention in {self.path!r} ({type(self.module).__name__}): "
        query = call.get("query")
        others = [n for n in ("key", "value") if call.get(n) is not query]
        if others:
            raise QKHooksError(
                head + f"its {' and '.join(others)} {'is' if len(others) == 1 else 'are'} not the query tensor it is "
                "handed (cross-attention, or a copy), so the keys are not known to be the queries' tokens, which "
                "the maps and modes of W_q^T W_k here assume. Call it as torchvision's EncoderBlock does: "
                "self_attention(x, x, x).")
        for name in ("attn_mask", "key_padding_mask"):
            if call.get(name) is not None:
                raise QKHooksError(
                    head + f"the call hands it {name} (a {tuple(call[name].shape)} tensor), a term qkhooks does not "
                    "model for this family, so rebuilt maps and modes would not be the model's. Record a model or "
                    "input without it.")


def _grid_source(model: nn.Module) -> tuple[nn.Module, Callable[[tuple, dict], tuple[int, int]]]:
    """``conv_proj`` and the grid ``_process_input`` makes of the image it is handed: (h // p, w // p)."""
    patch = int(model.patch_size)

    def read(args: tuple, kwargs: dict) -> tuple[int, int]:
        # the class's own _process_input hands conv_proj the image by position (find refuses a replaced one)
        h, w = (int(v) for v in args[0].shape[-2:])
        return h // patch, w // patch

    return model.conv_proj, read


def _pixel_convs(model: nn.Module) -> tuple[tuple[int, int] | None, Callable[[], list] | None]:
    """(patch size, None) for the plain patch embedding (one conv, kernel = stride = patch size, no padding); for a
    convolutional stem (``conv_stem_configs``): (None, its convolutions from the image up, as called)."""
    conv, p = model.conv_proj, int(model.patch_size)
    if isinstance(conv, nn.Conv2d) and tuple(conv.kernel_size) == tuple(conv.stride) == (p, p) \
            and tuple(conv.padding) == (0, 0) and tuple(conv.dilation) == (1, 1):
        return (p, p), None
    convs = [m for m in conv.modules() if isinstance(m, nn.Conv2d)]

    def chain() -> list:
        for c in convs:
            how = (f"is dilated (dilation={tuple(c.dilation)})" if tuple(c.dilation) != (1, 1) else
                   f"pads by a rule (padding={c.padding!r})" if not isinstance(c.padding, tuple) else None)
            if how:
                raise QKHooksError(f"torchvision ViT's stem convolution {c} {how}; which pixels its tokens read is not "
                                   "modelled, so masks cannot be read onto them. Record this model without masks.")
        return [(tuple(c.kernel_size), tuple(c.stride), tuple(c.padding)) for c in convs]

    return None, chain


def find(model: nn.Module) -> list[AttentionSite]:
    """One site per encoder block's self-attention, in block order; anything else attention-like refuses the model."""
    vit = _class_in_mro(model, _VIT)
    for method in ("forward", "_process_input"):
        # a subclass's method, or one replaced on the instance (model.forward = ...: a patch, a tracer; accelerate's
        # wrapper that only moves tensors between devices around the class's own forward is taken)
        if method in vars(model) and not (method == "forward" and moves_devices_only(model)):
            how = f"replaces torchvision VisionTransformer.{method} on the instance (model.{method} = ...)"
        elif getattr(type(model), method) is not getattr(vit, method):
            how = f"overrides torchvision VisionTransformer.{method}"
        else:
            continue
        raise QKHooksError(
            f"{type(model).__name__} {how}, so where its tokens come from (one class token first, then the patch grid) "
            f"is not known to qkhooks; record a plain VisionTransformer (del model.{method} restores the class's own "
            "on an instance), or register your own adapter (README, 'Your own architecture').")
    image, patch = int(model.image_size), int(model.patch_size)
    grid = (image // patch, image // patch)
    patch_size, pixel_convs = _pixel_convs(model)
    grid_source = _grid_source(model)  # one for all sites: grid_source_hooks hooks each distinct one once
    sites: list[AttentionSite] = []
    for name, block in model.named_modules():
        attn = getattr(block, "self_attention", None)
        if _class_in_mro(attn, _MHA) is None:
            continue
        path = f"{name}.self_attention"
        if _qualified(type(block)) != _ENCODER_BLOCK:
            raise QKHooksError(f"unsupported attention in {path!r} ({type(attn).__name__}): its block is a "
                               f"{type(block).__name__}, not torchvision's EncoderBlock, so how it calls the attention "
                               f"(the tokens after ln_1, as query, key and value) is not known. {_FIX}.")
        why = unmodelled_mha(attn)
        if why:
            raise QKHooksError(f"unsupported attention in {path!r} ({type(attn).__name__}): {why}. {_FIX}.")
        heads, dim = int(attn.num_heads), int(attn.embed_dim)
        sites.append(MultiheadAttentionSite(
            layer=len(sites), path=path, module=attn, block_path=name, block=block, num_heads=heads,
            head_dim=int(attn.head_dim), dim=dim, scale=float(attn.head_dim) ** -0.5, num_prefix_tokens=1, grid=grid,
            family="torchvision-vit", input_name="query", block_input_name="input", qk_linear=packed_qk_rows(attn),
            patch_size=patch_size, pixel_convs=pixel_convs, grid_source=grid_source,
        ))
    refuse_uncovered(model, sites)
    return sites


def matches(model: nn.Module) -> bool:
    """A torchvision VisionTransformer (or a subclass: :func:`find` refuses one that changes its forward)."""
    return _class_in_mro(model, _VIT) is not None


register_adapter("torchvision-vit", matches, find, families="torchvision VisionTransformer (vit_b_16, vit_b_32, "
                 "vit_l_16, vit_l_32, vit_h_14): nn.MultiheadAttention with a packed in_proj, class token first",
                 first=False)
