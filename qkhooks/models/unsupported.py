"""Refuse, with a reason, attention that qkhooks does not model exactly, naming the module.

q/k normalisation makes the logit a non-linear function of x; rotary embeddings make the form depend on
the relative position; windowed attention splits tokens into windows; relative-position bias adds a
position-only term. qkhooks says which module is the problem instead of producing wrong numbers. Beyond
those named forms, any attention-like module an adapter does not take (see :func:`refuse_uncovered`) makes
the model refused: a model is recorded whole, or, only when asked (``skip_unmodelled=True``), on the sites qkhooks
models with every module left out named and its reason (:func:`unmodelled_parts`), never silently.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import itertools
import math
import re
import threading
import weakref
from typing import TYPE_CHECKING, Any, Callable, Iterator, NoReturn, Sequence

import torch
from torch import nn
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from qkhooks.errors import QKHooksError
from qkhooks.sdpa import OWN_WORK

if TYPE_CHECKING:
    from qkhooks.models.base import AttentionSite

_RELATIVE_BIAS = ("relative_position_bias", "relpos", "rel_pos")
_ROTARY = ("rope", "rotary")
_ROPE_MODELLED = ("EvaAttention", "AttentionRope", "DINOv3ViTAttention", "PixtralAttention", "MLCDAttention",
                  "Gemma4Attention", "Llama4VisionAttention")  # zoo11-maps: Llama 4 vision (models/llama4.py)
_REASONS = (
    (_ROTARY, "rotary position embeddings make the query-key form depend on the relative position"),
    (("window", "swin"), "windowed attention splits the tokens into windows with their own masks and shifts"),
    (_RELATIVE_BIAS, "a relative-position bias adds a position-only term to the logits"),
    (("spatial_reduction", ".sr", "sr_ratio"), "keys and values come from spatially reduced tokens, not the queries' tokens"),
)
_QK_CHILDREN = ("qkv", "q_proj", "k_proj", "query", "key", "q", "k", "in_proj", "to_qkv", "qk")
_ATTENTION_NAME = re.compile(r"attention|attn", re.IGNORECASE)
# Left out by design (README says so): cross-attention of learned queries over the tokens (pooling heads,
# GroupViT's grouping) is not self-attention of the image tokens; text towers of dual-tower models are not
# the vision stack.
# Attention classes whose windows, reductions or tables an adapter models (windows.py, reduced_keys.py), by name
# or, where the name is generic, by module and name (``timm.models.pvt_v2.Attention``): the named parts inside
# them are not refused by name.
MODELLED_FORMS: set[str] = set()
# Attention classes qkhooks knows and does not model, by module and name (names like ``Attention`` repeat across
# families) -> the precise reason, or ``module -> reason | None`` where it depends on the instance (None: this one
# is fine). A model holding one is refused naming it, before any guess from names; the forms' files add theirs
# (davit.py, gcvit.py, cascaded.py, two_softmax.py; pooled.py: MViTv2, SAM2's Hiera-det), the table below holds the rest.
UNMODELLED_FORMS: dict[str, str | Callable[[nn.Module], str | None]] = {}


def _modelled(module: nn.Module) -> bool:
    cls = type(module)
    return cls.__name__ in MODELLED_FORMS or f"{cls.__module__}.{cls.__qualname__}" in MODELLED_FORMS
_NO_TOKEN_SOFTMAX = "there is no softmax of q·k over the image tokens, so no W_q^T W_k form governs its maps"
UNMODELLED_FORMS.update({
    "timm.models.crossvit.CrossAttention": "CrossViT's cross-attention between branches: one branch's class token "
    "(projected to the other branch's width) queries the other branch's patch tokens, a query-key form between two "
    "token sets of different scales; not modelled yet",
    "timm.models.xcit.XCA": "cross-covariance attention: the softmax runs over channels (a d_k x d_k map per head from "
    "L2-normalised q and k with a learned temperature), not over tokens; " + _NO_TOKEN_SOFTMAX,
    "timm.models.edgenext.CrossCovarianceAttn": "cross-covariance attention (as XCiT): the softmax runs over channels, "
    "not over tokens; " + _NO_TOKEN_SOFTMAX,
    "timm.models.coat.FactorAttnConvRelPosEnc": "factorised attention: a softmax of k alone over the tokens, then "
    "q (k^T v), plus a convolutional position term; " + _NO_TOKEN_SOFTMAX,
    "timm.layers.attention2d.MultiQueryAttentionV2": "multi-query attention on NCHW maps (one shared key head, reduced "
    "keys); not modelled yet",
    "timm.models.efficientvit_mit.LiteMLA": "linear attention: a ReLU kernel normalised by its sum, no softmax; "
    + _NO_TOKEN_SOFTMAX,
    "timm.models.swiftformer.EfficientAdditiveAttention": "additive attention: one learned global query vector scores "
    "each token; " + _NO_TOKEN_SOFTMAX,
    "timm.models.volo.OutlookAttention": "outlook attention: the weights of each local window come from a linear layer "
    "of the centre token, not from q·k; " + _NO_TOKEN_SOFTMAX,
    "timm.layers.lambda_layer.LambdaLayer": "lambda layer: the keys are softmaxed over the tokens on their own and "
    "summarised with the values into a content lambda, plus a position lambda from a conv; " + _NO_TOKEN_SOFTMAX,
    "timm.models.csatv2.SpatialTransformerBlock": "one-channel attention inside a spatial gate (q, k of width 1 over a "
    "pooled grid); not an image-token attention qkhooks records",
    "timm.models.mobilevit.LinearSelfAttention": "MobileViT-v2 separable (linear) attention: one score per token "
    "from a 1-channel projection, softmaxed over tokens and pooled into a single context vector; " + _NO_TOKEN_SOFTMAX,
    "transformers.models.mobilevitv2.modeling_mobilevitv2.MobileViTV2LinearSelfAttention": "MobileViT-v2 separable "
    "(linear) attention: one score per token, pooled into a single context vector; " + _NO_TOKEN_SOFTMAX,
    "transformers.models.swiftformer.modeling_swiftformer.SwiftFormerEfficientAdditiveAttention": "additive attention: "
    "one learned global query vector scores each token; " + _NO_TOKEN_SOFTMAX,
    # zoo-hfsmall: video and detection forms (models/video.py models VideoMAE / ViViT joint space-time attention and,
    # since zoo11-inside, TimeSformer's divided space-time attention)
    "transformers.models.deformable_detr.modeling_deformable_detr.DeformableDetrMultiscaleDeformableAttention":
    "multi-scale deformable attention: each query samples a few points around its reference point at learned offsets "
    "and weights them with a softmax of a linear layer of the query alone, with no key projection; " + _NO_TOKEN_SOFTMAX,
})


def unmodelled_reason(module: nn.Module) -> str | None:
    """Why qkhooks does not model this attention module, when it knows its class (:data:`UNMODELLED_FORMS`)."""
    cls = type(module)
    why = UNMODELLED_FORMS.get(f"{cls.__module__}.{cls.__qualname__}")
    return why(module) if callable(why) else why


_NOT_RECORDED_PATHS = re.compile(r"(^|\.)(head|attn_pool|pooler|assign|pre_assign_attn|text_model|text_encoder)(\.|$)")
# Parts of a model that are not self-attention of its image tokens, left out by design and named, never silently:
# the modelling module of the model's class -> [(path pattern, why)]. Adapters take no site under them and
# :func:`refuse_uncovered` does not count them; :func:`left_out_by_design` names them (run files store it).
LEFT_OUT_BY_DESIGN: dict[str, list[tuple[str, str]]] = {}


def left_out_by_design(model: nn.Module) -> dict[str, str]:
    """The model's parts left out by design (the outermost module of each matching path) -> why."""
    rules = LEFT_OUT_BY_DESIGN.get(type(model).__module__, [])
    found: dict[str, str] = {}
    for name, _ in model.named_modules():
        for pattern, why in rules:
            if re.search(pattern, name) and not any(name.startswith(p + ".") for p in found):
                found[name] = why
    return found


# Partial recording (``record(..., skip_unmodelled=True)``): while set, a module qkhooks does not model is left out and
# named (:func:`unmodelled_parts`) instead of refusing the model. Set only by :func:`skipping_unmodelled`.
_SKIP_UNMODELLED: contextvars.ContextVar[bool] = contextvars.ContextVar("qkhooks_skip_unmodelled", default=False)
# Offered in a refusal only where a partial recording would record something (:func:`qkhooks.models.base.find_sites`).
SKIP_HINT = ("To record the layers qkhooks does model and leave this one out, named with its reason in the recording "
             "and the run file, pass skip_unmodelled=True (qkhooks record --skip-unmodelled).")


@contextlib.contextmanager
def skipping_unmodelled(skip: bool = True) -> Iterator[None]:
    """Within this block :func:`diagnose` and :func:`refuse_uncovered` leave unmodelled modules out instead of refusing."""
    token = _SKIP_UNMODELLED.set(skip)
    try:
        yield
    finally:
        _SKIP_UNMODELLED.reset(token)


def skipping_now() -> bool:
    """Whether the search under way is a partial one (``skip_unmodelled=True``): an adapter that refuses an unmodelled
    instance itself (``models/torchvision.py``) hands it on instead, for the search to leave out and name."""
    return _SKIP_UNMODELLED.get()


def unmodelled_parts(model: nn.Module, sites: Sequence["AttentionSite"]) -> dict[str, str]:
    """The modules a partial recording leaves out (every site of the model found, ``sites``), outermost first, in
    the order of the model's modules -> why: each module with a known unmodelled form (:data:`UNMODELLED_FORMS`)
    or computing attention logits (:func:`attention_like`) that no site covers. Parts left out by design are not
    listed here (:func:`left_out_by_design` names them)."""
    taken = [s.path for s in sites]
    aside = left_out_by_design(model)
    found: dict[str, str] = {}
    for name, module in model.named_modules():
        if not name or _NOT_RECORDED_PATHS.search(name) or _under(name, aside) or _under(name, found):
            continue
        if any(name == p or name.startswith(p + ".") or p.startswith(name + ".") for p in taken):
            continue
        known = unmodelled_reason(module)
        if known or _owns_qk(module):
            found[name] = f"{type(module).__name__}: " + (known or _why(module)).rstrip(".")
    return found


def _under(name: str, roots: dict[str, str] | Sequence[str]) -> bool:
    return any(name == r or name.startswith(r + ".") for r in roots)


def _has_qk_norm(module: nn.Module) -> bool:
    for name in ("q_norm", "k_norm", "q_layernorm", "k_layernorm"):
        child = getattr(module, name, None)
        if isinstance(child, nn.Module) and not isinstance(child, nn.Identity):
            return True
    return False


def diagnose(model: nn.Module) -> None:
    """Raise :class:`QKHooksError` naming the first module whose attention breaks the bilinear form."""
    # transformers hands relative-position tables to the attention as its attention_mask, which the sites add
    # back exactly (AttentionSite.bias_input); elsewhere a table is an unmodelled term
    hf = type(model).__module__.startswith("transformers.")
    # attention classes whose rotary tables the adapters take from the call (AttentionSite.rope_input)
    from qkhooks.models.qknorm import qk_norm_modelled

    rope_modelled = any(type(m).__name__ in _ROPE_MODELLED for m in model.modules())
    aside = dict(left_out_by_design(model))
    for name, module in model.named_modules():
        reason = None if _NOT_RECORDED_PATHS.search(name) or _under(name, aside) else unmodelled_reason(module)
        if reason and _SKIP_UNMODELLED.get():  # partial recording: left out, named by unmodelled_parts
            aside[name] = reason
        elif reason:
            raise QKHooksError(f"unsupported attention in {name!r} ({type(module).__name__}): {reason.rstrip('.')}. "
                               + SKIP_HINT)
    modelled = [n + "." for n, m in model.named_modules() if _modelled(m)]
    for name, module in model.named_modules():
        if any(name.startswith(p) for p in modelled) or _under(name, aside):
            continue
        if _has_qk_norm(module) and not qk_norm_modelled(module) and not _modelled(module):
            raise QKHooksError(  # round 33: worded as if q/k-norm were never modelled, which it is (qknorm.py)
                f"unsupported attention in {name!r} ({type(module).__name__}): it normalises q and k (q_norm, k_norm) "
                "in a form qkhooks does not model (q/k-norm is modelled in the attention modules README lists, where "
                "the exact normalised form is rebuilt); its logits are a non-linear function of the tokens, so "
                "W_q^T W_k alone would not describe them."
            )
        if _modelled(module):
            continue
        if not _owns_qk(module):  # a guess from names only for a module that computes logits (a patch-embedding conv
            continue               # under an encoder named "swin" does not)
        label = f"{name} {type(module).__name__}".lower()
        for keys, reason in _REASONS:
            if (hf and keys is _RELATIVE_BIAS) or (rope_modelled and keys is _ROTARY):
                continue
            if any(key in label for key in keys):
                raise QKHooksError(f"unsupported attention in {name!r} ({type(module).__name__}): {reason}.")


# zoo11-build: token mixers whose children are named like q/k projections but that compute no attention (module and
# class -> what they compute): not attention, so neither a site nor a module left out, as a CNN block of a hybrid
NOT_ATTENTION: dict[str, str] = {
    "transformers.models.lfm3_vl.modeling_lfm3_vl.Lfm3VlVisionShortConv": "LFM3-VL's gated short convolution: in_proj "
    "splits the tokens into gates and values for a depthwise conv over the patch grid; no softmax over tokens",
}


def _owns_qk(module: nn.Module) -> bool:
    """Whether the module computes attention logits itself: it owns a q/k (or fused qkv) projection (a Linear/Conv
    child so named, or any child so named of an attention-named module, beside a ``qkv`` or in a q/k pair), or an attention-named
    module owns a fused projection weight directly."""
    if f"{type(module).__module__}.{type(module).__qualname__}" in NOT_ATTENTION:
        return False
    children = dict(module.named_children())
    projections = [children[c] for c in _QK_CHILDREN if c in children]
    attention_named = _ATTENTION_NAME.search(type(module).__name__) is not None
    # a q and a k beside each other are a query/key pair whatever their type (round 33: iFormer's SHMA makes them
    # with conv + norm blocks, and was neither found nor named)
    pair = any(a in children and b in children for a, b in (("q", "k"), ("query", "key"), ("q_proj", "k_proj")))
    owns_qk = any(isinstance(p, nn.Linear | nn.Conv2d | nn.Conv1d) for p in projections) or (
        bool(projections) and (attention_named or "qkv" in children or pair))
    return owns_qk or attention_named and any(
        "proj_weight" in n or n == "qkv_weight" for n, _ in module.named_parameters(recurse=False))


def attention_like(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules that compute attention logits themselves: they own a q/k (or fused qkv) projection, or an
    attention-named module owns parameters directly (e.g. a fused ``in_proj_weight``)."""
    found = []
    for name, module in model.named_modules():
        if _NOT_RECORDED_PATHS.search(name):
            continue
        # a q/k projection may be a conv + norm block (MobileNetV5's multi-query attention, EfficientViT's qkv)
        if _owns_qk(module):
            found.append((name, module))
    return found


def refuse_uncovered(model: nn.Module, sites: Sequence["AttentionSite"]) -> None:
    """Refuse the model when it computes attention anywhere an adapter did not take a site.

    Recording the taken sites and leaving the others out would give a model with silently missing layers
    (or a site whose neighbour changes what it sees); the error names every module left out.
    """
    taken = [s.path for s in sites]
    aside = left_out_by_design(model)
    left = [
        (name, module)
        for name, module in attention_like(model)
        if not any(name == p or name.startswith(p + ".") or p.startswith(name + ".") for p in taken) and not _under(name, aside)
    ]
    if not left or _SKIP_UNMODELLED.get():  # partial recording: unmodelled_parts names what is left out
        return
    listed = ", ".join(f"{name!r} ({type(module).__name__})" for name, module in left[:6]) + (
        f" and {len(left) - 6} more" if len(left) > 6 else "")
    known = unmodelled_reason(left[0][1])
    if known:  # the reason first, then every module it leaves out
        raise QKHooksError(f"unsupported attention in {left[0][0]!r} ({type(left[0][1]).__name__}): {known}. Left out "
                           f"with it: {listed}; recording the other layers alone would leave these out without a word. " + SKIP_HINT)
    raise QKHooksError(
        f"unsupported attention in {listed}: qkhooks does not model this attention form (its forward is not one the "
        "adapter knows), and recording the other layers alone would leave these out without a word. " + _why(left[0][1])
        + " " + SKIP_HINT)


def _why(module: nn.Module) -> str:
    """The best reason we can give for one unmodelled attention module."""
    known = unmodelled_reason(module)
    if known:
        return f"{type(module).__name__}: {known}."
    label = f"{type(module).__name__} " + " ".join(n for n, _ in module.named_children())
    for keys, reason in _REASONS:
        if any(key.strip(".") in label.lower() for key in keys):
            return f"Its structure suggests: {reason}."
    return "Teach qkhooks its form with qkhooks.register_adapter (README, 'Your own architecture')."


def describe_attention_like(model: nn.Module, limit: int = 12) -> str:
    """Lines naming the attention-like modules of a model no adapter took, and why (for the generic error)."""
    seen: dict[str, str] = {}
    for name, module in attention_like(model):
        cls = type(module).__name__
        if cls not in seen:
            children = ", ".join(n for n, _ in module.named_children()) or "no child modules"
            known = unmodelled_reason(module)
            seen[cls] = (f"  - {name!r} ({cls}; children: {children}): {known}." if known else
                         f"  - {name!r} ({cls}; children: {children}): no registered adapter models this class. {_why(module)}")
    if not seen:  # name the attention-named modules it did see, and why none was taken
        for name, module in model.named_modules():
            cls = type(module).__name__
            if _ATTENTION_NAME.search(cls) and cls not in seen and not _NOT_RECORDED_PATHS.search(name):
                children = ", ".join(n for n, _ in module.named_children()) or "no child modules"
                seen[cls] = (f"  - {name!r} ({cls}; children: {children}): " + (f"{unmodelled_reason(module)}." if unmodelled_reason(
                    module) else "attention-named, but it owns no q/k or fused qkv projection, so its logits are not a "
                    "q·k form qkhooks can take."))
    if not seen:
        return "It saw no attention-like module (none owns a q/k or fused qkv projection)."
    lines = list(seen.values())[:limit]
    return "Attention-like modules it saw (one per class):\n" + "\n".join(lines)


# ------------------------------------------------------------------ models tooling turned into something else
# torch's quantised layers (torch.ao.quantization.quantize_dynamic / convert): packed integer weights, no float W_q/W_k
_QUANTISED_MODULES = ("torch.ao.nn.quantized.", "torch.nn.quantized.", "torch.ao.nn.intrinsic.quantized.")
_COMPILED_WRAPPER = "torch._dynamo.eval_frame.OptimizedModule"
_COMPILED_HARM = ("the compiled graph runs the hooks qkhooks reads q, k and the tokens with only while it is traced, or "
                  "not at all, so the recording would be empty or stale without a word")
_TRACED_FIX = ("To record it, record the model uncompiled and compile outside qkhooks: inside record() run the model "
               "itself, not a torch.compile wrapper of it, and compile only after leaving record() (a module compiled "
               "with .compile() stays compiled: load or build it again without it).")


def _where(model: nn.Module, path: str, module: nn.Module) -> str:
    return f"{path!r} ({type(module).__name__})" if path else f"the model ({type(model).__name__})"


def _at(model: nn.Module, roots: Sequence[str]) -> Iterator[tuple[str, nn.Module]]:
    """(path, module) of every module of ``model`` that is one of ``roots`` (module paths: the attention modules),
    contains one (the model itself, a block) or lies inside one (a q/k layer), in the order of the model's modules."""
    at = set(roots)
    around = {".".join(parts[:i]) for parts in (root.split(".") for root in at) for i in range(len(parts))}
    for path, module in model.named_modules():
        above = path
        while above not in at and "." in above:  # the path itself, then each module above it
            above = above.rpartition(".")[0]
        if path in around or above in at:
            yield path, module


def refuse_opaque(model: nn.Module) -> None:
    """Refuse, before the search, a model that tooling turned into something whose attention cannot be found or read:
    TorchScript (``torch.jit.script`` / ``trace``: a compiled graph, no Python forward to hook) and a ``torch.fx``
    GraphModule (tracing inlines the attention modules' forwards into one graph: no attention module is left) anywhere,
    as there is no Python module structure to trust; and, at the modules that compute attention logits
    (:func:`attention_like`: the search's candidates), torch's quantised layers (integer weights: the search read
    W_q/W_k off a quantised qkv, whose ``weight`` is a method, and crashed; an adapter took no site where q_proj is
    not a Linear, a misleading refusal) and a ``torch.compile`` wrapper put in place (it hides the attention's class
    from the adapters). Elsewhere (a quantised or compiled head or MLP) the attention stays float and runs qkhooks'
    hooks eagerly: taken, and the sites found are checked again (:func:`refuse_quantised`, :func:`refuse_compiled`)."""
    for path, module in model.named_modules():
        where = _where(model, path, module)
        if isinstance(module, torch.jit.ScriptModule):
            raise QKHooksError(f"{where} is TorchScript (made by torch.jit.script or torch.jit.trace): it runs a compiled "
                               "graph, not the Python forward qkhooks hooks and models, so q and k cannot be read. Record "
                               "the nn.Module you scripted or traced instead (it has the same weights).")
        if isinstance(module, torch.fx.GraphModule):
            raise QKHooksError(f"{where} is a torch.fx GraphModule (symbolic_trace, or a feature extractor built with "
                               "it): tracing inlined the attention modules' forwards into one graph, so there is no "
                               "attention module left to hook. Record the nn.Module you traced instead.")
    attention = [name for name, _ in attention_like(model)]
    refuse_quantised(model, attention)
    refuse_compiled(model, attention)


def refuse_quantised(model: nn.Module, roots: Sequence[str]) -> None:
    """Refuse torch's quantised layers that are one of ``roots`` (the attention modules' paths), contain one or lie
    inside one: they compute with integer weights, so there are no float W_q/W_k whose products the model computes.
    A quantised layer elsewhere (the head, an MLP) changes no attention map: taken."""
    for path, module in _at(model, roots):
        cls = type(module)
        if cls.__module__.startswith(_QUANTISED_MODULES):
            raise QKHooksError(f"{_where(model, path, module)} is a quantised layer ({cls.__module__}.{cls.__qualname__}, "
                               "from torch.ao.quantization.quantize_dynamic or convert) in an attention layer: it computes "
                               "with integer weights, so there are no float W_q/W_k whose products the model computes. "
                               "Record the float model (before quantising it), or quantise only layers outside the "
                               "attention (the head, the MLPs: those are taken).")


def compiled_by_dynamo(module: nn.Module) -> str | None:
    """How ``module`` is compiled by TorchDynamo (a ``torch.compile`` wrapper, or ``module.compile()``), or None."""
    if getattr(module, "_compiled_call_impl", None) is not None:
        return "module.compile()"
    wrapper = type(module).__name__ == "OptimizedModule" and _name(type(module)) == _COMPILED_WRAPPER
    return "a compiled wrapper" if wrapper else None


def hooked_paths(model: nn.Module, sites: Sequence["AttentionSite"]) -> list[str]:
    """The paths of the modules a recording of ``sites`` hooks, besides those inside or around them: the sites, the
    modules whose call the sites read their grid from (:func:`qkhooks.models.base.grid_source_hooks`) and those a
    site watches besides its own (``context_hooks``: a video model's tubelet embedding, a block around windows)."""
    sources = {id(s.grid_source[0]) for s in sites if s.grid_source is not None}
    sources |= {id(module) for s in sites for module, _ in s.context_hooks()}
    return [s.path for s in sites] + ([path for path, m in model.named_modules() if id(m) in sources] if sources else [])


def refuse_compiled(model: nn.Module, roots: Sequence[str]) -> None:
    """Refuse a model compiled by TorchDynamo where qkhooks hooks it (``module.compile()``, or a ``torch.compile``
    wrapper handed over or put in place of a module): a compiled module that is one of ``roots`` (the modules hooked:
    :func:`hooked_paths`), contains one (the model itself, a block) or lies inside one (a q/k layer), as there the
    compiled graph runs the hooks qkhooks reads q, k and the tokens with while tracing, or not at all (a compiled timm
    ViT recorded nothing; ``record_dataset`` wrote a run of 0 images without a word). A compiled head or MLP runs no
    qkhooks hook: taken. Checked at every ``record()`` and ``record_dataset`` entry (the search is cached); a model
    compiled inside the context is refused by the hooks themselves (:func:`own_hook`)."""
    for path, module in _at(model, roots):
        how = compiled_by_dynamo(module)
        if how is None:
            continue
        inner = f"{'model.' + path if path else 'model'}._orig_mod"
        fix = (f"record {inner} and run that module itself (the wrapper runs the compiled graph around it)"
               if how == "a compiled wrapper" else "record the model uncompiled (load or build it again without "
               ".compile(); compile only what runs without qkhooks, such as the head)")
        raise QKHooksError(f"{_where(model, path, module)} is compiled by torch.compile ({how}) where qkhooks hooks the "
                           f"attention: {_COMPILED_HARM}. To record it, {fix}.")


# ------------------------------------------------------------------ q/k layers that compute more than their weights
PEFT_FIX = ("merge the adapter into the weights first (peft: model = model.merge_and_unload(), then record that "
            "model), or record the model without the wrapper")
HOOK_FIX = ("remove it while recording (handle.remove() on the handle its registration returned) and put it back "
            "after, or record first and steer after")
# The forwards whose arithmetic the adapters model, by ``module.qualname``: torch's own layers (a container with no
# forward of its own, ModuleList / ModuleDict, cannot compute anything; a parametrization computes the weight as it is
# read, so the reader reads the weight the layer uses), and the library layers W_q/W_k are read off in
# the zoo (``tests/test_zoo.py``): timm's LeViT / EfficientFormer-v2 conv + BatchNorm and Gemma 4's clippable Linear
# (models/levit.py, models/gemma4.py), transformers' LeViT Linear + BatchNorm, GPT-2-style Conv1D (ImageGPT) and
# Gemma 4's clippable Linear. An adapter that reads W_q/W_k off another layer adds its forward here.
QK_FORWARDS: set[str] = {
    "torch.nn.modules.linear.Linear.forward", "torch.nn.modules.conv.Conv1d.forward", "torch.nn.modules.conv.Conv2d.forward",
    "torch.nn.modules.conv.Conv3d.forward", "torch.nn.modules.batchnorm._BatchNorm.forward",
    "torch.nn.modules.container.Sequential.forward", "torch.nn.modules.linear.Identity.forward",
    "torch.nn.modules.module._forward_unimplemented", "torch.nn.utils.parametrize.ParametrizationList.forward",
    "timm.models.levit.ConvNorm.forward", "timm.models.levit.LinearNorm.forward",
    "timm.models.efficientformer_v2.ConvNorm.forward", "timm.models.efficientformer_v2.LocalGlobalQuery.forward",
    "timm.models.gemma4_vit.Gemma4ClippableLinear.forward",
    "transformers.models.levit.modeling_levit.MLPLayerWithBN.forward", "transformers.pytorch_utils.Conv1D.forward",
    "transformers.models.gemma4.modeling_gemma4.Gemma4ClippableLinear.forward",
}
# accelerate's wrapper (``add_hook_to_module``: models loaded with ``device_map=...``) around a hook that only moves
# the call's tensors to the execution device and the output back: the arithmetic is the module's own.
_ACCELERATE_FORWARD = "accelerate.hooks.add_hook_to_module.<locals>.new_forward"
_ACCELERATE_DEVICE_HOOK = "accelerate.hooks.AlignDevicesHook"
_ACCELERATE_SEQUENTIAL = "accelerate.hooks.SequentialHook"
_PLAIN_TENSORS = (torch.Tensor, nn.Parameter)  # a Parameter of a tensor subclass has the subclass's type
# ids (``RemovableHandle.id``, never reused) of the hooks qkhooks itself has on the model: a recording's own, a nested
# or attached one's, the rotary-table probe's; every other hook on a q/k module is someone else's.
_OWN_HOOKS: dict[int, "_OwnHook"] = {}


class _TensorsHanded(TorchFunctionMode):
    """Notes every tensor a torch function is handed while active: which parameters and buffers a reader reads."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: set[int] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        self.ids.update(map(id, _tensors((args, kwargs))))
        return func(*args, **kwargs)


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    """The tensors in ``value``, looking into tuples, lists and dicts."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


def tensors_read(read: Callable[[], Any]) -> set[int]:
    """The ids of the tensors ``read()`` hands to torch functions or returns (a site's ``qk_linear``: the parameters
    W_q, W_k, b_q, b_k are read from, through slices, concatenations, BatchNorm folding or a property)."""
    with _TensorsHanded() as seen:
        out = read()
    return seen.ids | set(map(id, _tensors(out)))


def own_hook(model: nn.Module, module: nn.Module, hook: Callable[..., Any], *, pre: bool = True,
             **options: Any) -> RemovableHandle:
    """Register one of qkhooks' hooks on ``module`` (a module of ``model``; ``pre``: a forward pre-hook, else a forward
    hook; ``options``: torch's, ``with_kwargs`` / ``always_call``). Every hook qkhooks puts on a model goes through here:
    it is marked as qkhooks' own, so :func:`refuse_altered_qk` passes it by (two recordings nested on one model), it
    refuses to be traced by TorchDynamo, and it runs only on the module it was registered on (:class:`_OwnHook`)."""
    register = module.register_forward_pre_hook if pre else module.register_forward_hook
    own = _OwnHook(hook, weakref.ref(model), module, pre)
    handle = register(own, **options)
    _OWN_HOOKS[handle.id] = own
    return handle


class _OwnHook:
    """One of qkhooks' hooks as registered: ``hook``, run only on the module it was registered on (a weak reference),
    and refusing to be traced by TorchDynamo (:func:`untraced_hook`). A module-level class, not a closure, so that a
    model carrying it can be copied and pickled: ``copy.deepcopy`` of the model copies it as a :class:`_CopiedHook`
    (the copy is not recorded: calling it while the recording is open is refused, after it does nothing), pickling
    (``torch.save(model)``) as a :class:`_SpentHook` (nothing)."""

    __slots__ = ("hook", "model", "module", "pre", "live", "thread", "__weakref__")

    def __init__(self, hook: Callable[..., Any], model: "weakref.ref[nn.Module]", module: nn.Module, pre: bool) -> None:
        self.hook, self.model, self.module, self.pre, self.live = hook, model, weakref.ref(module), pre, True
        self.thread = threading.get_ident()  # the thread that entered record(): the only one whose calls it records

    def __call__(self, module: nn.Module, *args: Any) -> Any:
        return untraced_hook(self, module, args)

    def __deepcopy__(self, memo: dict) -> "_CopiedHook":
        return _CopiedHook(self)

    def __reduce__(self) -> tuple:
        return _SpentHook, ()


def untraced_hook(own: _OwnHook, module: nn.Module, args: tuple) -> Any:
    """Run ``own``'s hook, refusing to run while TorchDynamo traces it (the model, or a part around the hooked module,
    compiled inside the record() context: ``model.compile()``, a ``torch.compile`` wrapper called there; a compiled
    graph runs what a hook reads only while it is traced, or not at all), on another module than its own (a shallow
    copy sharing the module's hook dicts), or in another thread than the one that registered it (one recording fed by
    two threads mixed their batches): refused in a pre-hook, nothing in a forward hook (an always-called one would
    raise a second error). The checks cost about 1 us a hook call (a ViT-B batch calls about 30)."""
    if torch.compiler.is_compiling():  # a constant True while traced: the refusal is called, eagerly (below)
        torch.compiler.disable(_refuse_traced)(own.model, module)
    if module is not own.module():  # refused as the copy's call begins; its forward hooks (after) do nothing
        if own.pre:
            raise QKHooksError(_DATA_PARALLEL if getattr(module, "_is_replica", False) else _COPY_INSIDE)
        return None
    if threading.get_ident() != own.thread and torch._C._current_graph_task_id() == -1:  # not autograd's own thread
        if own.pre:  # (a checkpointed block recomputed in backward on a device thread)
            raise QKHooksError(_OTHER_THREAD)
        return None
    OWN_WORK.depth += 1  # what the hook computes is not the module's attention (AttentionCallMode)
    try:
        return own.hook(module, *args)
    finally:
        OWN_WORK.depth -= 1


_COPY_INSIDE = (
    "a copy of the recorded model made inside record() (copy.deepcopy, copy.copy) was called while the recording is "
    "open: it carries copies of qkhooks' hooks, which do not record it (its batches would be taken for the model's, "
    "with the model's modes). Copy the model before entering record(), and record the copy with its own "
    "qkhooks.record() if you want its maps.")


_DATA_PARALLEL = (
    "a replica of the recorded model made by torch.nn.DataParallel (torch.nn.parallel.replicate) was called while the "
    "recording is open: DataParallel copies the model onto each GPU at every forward and runs the copies in threads of "
    "their own, and the copies share qkhooks' hooks without being the modules they were put on, so their maps cannot "
    "be recorded as the model's batch. Record the module itself, one device per recording (qkhooks.record(dp.module) "
    "and call dp.module(x), or record_dataset(dp.module, ...)), or record on several GPUs with one process each: "
    "torchrun -m qkhooks record ... --device cuda, or qkhooks.distributed.record_dataset_distributed inside your own "
    "torch.distributed (DistributedDataParallel) program (README: \"Several processes or GPUs\").")


_OTHER_THREAD = (
    "the recorded model was called from another thread than the one that entered record(): qkhooks' hooks belong to "
    "the model's modules, not to a thread, so calls from two threads would be recorded as one mixed batch (one "
    "recording) or handed to the other thread's recording (two). Make one copy of the model per thread before "
    "record() (copy.deepcopy(model)) and record each copy in its own thread.")


class _SpentHook:
    """A copy of one of qkhooks' hooks that does nothing (a pickled model's; a deep copy's once its recording is over),
    and takes itself off the module it runs on."""

    __slots__ = ()

    def __call__(self, module: nn.Module, *args: Any) -> None:
        _unregister(module, self)

    def __deepcopy__(self, memo: dict) -> "_SpentHook":
        return _SpentHook()

    def __reduce__(self) -> tuple:
        return _SpentHook, ()


class _CopiedHook(_SpentHook):
    """One of qkhooks' hooks as ``copy.deepcopy`` of its model copied it: while the recording is open, a call (of the
    copy) is refused, as its batches are not recorded; once the recording is over it does nothing, and takes itself
    off the module."""

    __slots__ = ("original",)

    def __init__(self, original: _OwnHook) -> None:
        self.original = weakref.ref(original)

    def __call__(self, module: nn.Module, *args: Any) -> None:
        original = self.original()
        if original is None or not original.live:
            _unregister(module, self)
        elif original.pre:  # refused as the copy's call begins; its forward hooks (after) do nothing
            raise QKHooksError(_COPY_INSIDE)

    def __deepcopy__(self, memo: dict) -> _SpentHook:
        original = self.original()
        return _CopiedHook(original) if original is not None and original.live else _SpentHook()


def _unregister(module: nn.Module, hook: Any) -> None:
    """Take ``hook`` off ``module``'s forward hooks and pre-hooks (torch iterates over a copy of them: safe in a call)."""
    for hooks in (module._forward_pre_hooks, module._forward_hooks):
        for i in [i for i, h in hooks.items() if h is hook]:
            del hooks[i]
            for extra in (module._forward_pre_hooks_with_kwargs, module._forward_hooks_with_kwargs,
                          module._forward_hooks_always_called):
                extra.pop(i, None)


def _own(i: int, hook: Any) -> bool:
    """Whether the hook ``hook`` of id ``i`` is qkhooks' own: registered by :func:`own_hook` and not yet removed, or a
    copy of one (it does nothing once its recording is over; while it is open, a call of the copy is refused)."""
    return i in _OWN_HOOKS or isinstance(hook, _SpentHook)


def _refuse_traced(model_ref: "weakref.ref[nn.Module]", module: nn.Module) -> NoReturn:
    """The refusal of a traced hook. Called through ``torch.compiler.disable``: Dynamo breaks the graph there and runs
    it as plain Python, so the QKHooksError reaches the caller as it is, not as an exception seen while tracing (which
    Dynamo takes as a reason to run the hook uncompiled, or wraps); ``fullgraph=True`` cannot break the graph:
    :func:`traced_refusal` turns Dynamo's error into this one."""
    model = model_ref()
    path = next((p for p, m in model.named_modules() if m is module), None) if model is not None else None
    where = _where(model, path, module) if path is not None else f"a {type(module).__name__} of the recorded model"
    raise QKHooksError(f"{where} runs under torch.compile: TorchDynamo is tracing qkhooks' hook on it (the model, or a "
                       f"part around this module, was compiled, or a torch.compile wrapper of it called, inside the "
                       f"record() context), and {_COMPILED_HARM}. {_TRACED_FIX}")


def traced_refusal(exc: BaseException | None, model: nn.Module | None, roots: Sequence[str]) -> QKHooksError | None:
    """The QKHooksError for Dynamo's own error (``torch._dynamo.exc``) when it came from tracing one of qkhooks' hooks
    with ``fullgraph=True``, where no graph break can call :func:`_refuse_traced`; None for any other exception.
    Dynamo names where it stopped (``innermost_user_frame_summary``): a hook's check (:func:`untraced_hook`). Names the
    module compiled at or around ``roots`` (the recorded sites' paths), if one is; else a wrapper was called."""
    frame = getattr(exc, "innermost_user_frame_summary", None)
    dynamo = type(exc).__module__.startswith("torch._dynamo")
    if not dynamo or frame is None or (frame.name, frame.filename) != ("untraced_hook", __file__):
        return None
    compiled = next(((p, m) for p, m in _at(model, roots) if compiled_by_dynamo(m)), None) if model is not None else None
    where = (f"{_where(model, *compiled)} is compiled by torch.compile ({compiled_by_dynamo(compiled[1])}) and" if compiled else
             "the recorded model, through a torch.compile wrapper,")
    return QKHooksError(f"{where} ran under torch.compile(fullgraph=True) inside the record() context: qkhooks' hooks "
                        f"were traced by TorchDynamo, which cannot break the graph to run them, and {_COMPILED_HARM}. "
                        f"{_TRACED_FIX}")


def remove_own_hooks(handles: Sequence[RemovableHandle]) -> None:
    """Remove hooks registered by :func:`own_hook`, and their marks."""
    for handle in handles:
        handle.remove()
        own = _OWN_HOOKS.pop(handle.id, None)
        if own is not None:  # its copies (a deepcopy of the model) do nothing from now on
            own.live = False


def _name(obj: Any) -> str:
    """``module.qualname`` of a function, class or callable object (a partial: of its function)."""
    obj = obj.func if isinstance(obj, functools.partial) else obj
    named = obj if hasattr(obj, "__qualname__") else type(obj)
    return f"{getattr(named, '__module__', None)}.{named.__qualname__}"


def _known_forward(module: nn.Module) -> bool:
    """Whether qkhooks knows what ``module`` computes from its weights: its class's forward is one of
    :data:`QK_FORWARDS`. Anything else (peft's LoRA layer, a quantised or user-written wrapper, even one defined beside
    the attention class) may add a term the weights do not say."""
    return _name(type(module).forward) in QK_FORWARDS


def qk_scope(attention: nn.Module, read: set[int]) -> tuple[tuple[str, bool], ...]:
    """(path under ``attention``, whether it owns a tensor of ``read``) of the modules W_q/W_k are read off (``read``:
    :func:`tensors_read` of a site's ``qk_linear``) and of every module between them and ``attention``, outermost
    first."""
    scope: dict[str, bool] = {}
    for path, module in attention.named_modules():
        owned = itertools.chain(module._parameters.values(), module._buffers.values())
        if not path or not any(t is not None and id(t) in read for t in owned):
            continue  # the attention module's own parameters (EVA's q_bias) are read as its forward uses them
        parts = path.split(".")
        for inner in (".".join(parts[:i]) for i in range(1, len(parts))):
            scope.setdefault(inner, False)
        scope[path] = True
    return tuple(scope.items())


def refuse_unplain_qk(sites: Sequence["AttentionSite"]) -> None:
    """Refuse a site whose W_q/W_k come from a module that computes more than those weights say.

    Every site reads W_q, W_k (and b_q, b_k) off the model's modules (``qk_linear``). A peft LoRA layer wrapped
    around ``qkv`` or ``query`` exposes its base layer's ``weight`` while its forward adds B·A·x, so spectra, modes
    and maps would describe W, not W + BA. Checked on the modules that own what ``qk_linear`` reads and the modules
    between them and the attention module (:func:`qk_scope`, kept as the site's ``qk_scope``): each must have a forward
    qkhooks knows (:func:`_known_forward`), and a module that owns what is read must have every one of its parameters
    read (a LoRA A/B pair, a DoRA magnitude or a quantisation scale beside the weight is a term the reader would
    miss). What can change after the search (hooks, patched forwards, swapped weights) is :func:`refuse_altered_qk`'s,
    checked on the layers a recording or a spectrum takes. Sites whose maps are taken in the module's own forward
    (:meth:`~qkhooks.models.base.AttentionSite.observes_maps`) read no weights and are not checked.
    """
    for site in sites:
        if site.observes_maps():
            continue
        read = tensors_read(site.qk_linear)
        site.qk_scope = qk_scope(site.module, read)
        for path, owns in site.qk_scope:
            module = site.module.get_submodule(path)
            fix = _reparametrization_fix(site, path, module)
            if not _known_forward(module):
                _refuse_qk_module(site, path, module, "whose forward is not one qkhooks knows to compute exactly what "
                                  "the weights read say (a LoRA layer adds B·A·x)", fix)
            unread = [n for n, p in module.named_parameters() if id(p) not in read] if owns else []
            if unread:
                _refuse_qk_module(site, path, module, f"which also computes with {', '.join(map(repr, unread[:4]))}, "
                                  "parameters W_q/W_k are not read from", fix)


# torch.nn.utils' old-style reparametrisations (a forward pre-hook recomputing the weight) -> how to fold them in
_TORCH_REPARAMETRISATIONS = {
    "torch.nn.utils.weight_norm.WeightNorm": "torch.nn.utils.remove_weight_norm({module})",
    "torch.nn.utils.spectral_norm.SpectralNorm": "torch.nn.utils.remove_spectral_norm({module})",
    "torch.nn.utils.prune.": "torch.nn.utils.prune.remove({module}, {name!r})",
}


def _reparametrization_fix(site: "AttentionSite", path: str, module: nn.Module) -> str:
    """The fix for a q/k weight torch.nn.utils reparametrises (prune, weight_norm, spectral_norm, a parametrization
    qkhooks does not take): fold it into a plain weight first; else the adapter's (:data:`PEFT_FIX`)."""
    owner, _, rest = path.partition(".parametrizations.")
    if rest:
        return (f"fold the parametrization into a plain weight first: torch.nn.utils.parametrize.remove_parametrizations("
                f"model.{site.path}.{owner}, {rest.split('.')[0]!r})")
    for hook in module._forward_pre_hooks.values():
        for prefix, call in _TORCH_REPARAMETRISATIONS.items():
            if _name(type(hook)).startswith(prefix):
                name = getattr(hook, "name", None) or getattr(hook, "_tensor_name", "weight")
                return f"fold it into a plain weight first: {call.format(module=f'model.{site.path}.{path}', name=name)}"
    return PEFT_FIX


# The q/k normalisations an attention module may own (timm, EVA, HF InternVL / Sapiens2): on the q/k path like W_q/W_k
_QK_NORMS = ("q_norm", "k_norm", "q_layernorm", "k_layernorm")
# Attributes a forward splits q and k into heads with (timm, transformers 4.x and 5.x names): watched per batch
_HEAD_ATTRIBUTES = ("num_heads", "head_dim", "num_attention_heads", "attention_head_size", "all_head_size",
                    "num_kv_heads", "num_key_value_heads", "num_key_value_groups", "attn_dim", "embed_dim", "head_size",
                    "key_dim", "kv_dim")
_SCALE_ATTRIBUTES = ("scaling", "scale")  # Hugging Face ViT / DINOv2 / BEiT: scaling; CLIP / SigLIP, timm: scale
_GONE = object()


def watch_qk_path(model: nn.Module, sites: Sequence["AttentionSite"]) -> None:
    """Called by the search, after :func:`refuse_unplain_qk`: note on each site what its q/k path is made of now
    (``site.qk_watch``), for :func:`refuse_altered_qk` to check by identity at every entry and batch, and name the
    attribute its scale was read from (``site.scale_attribute``) where the adapter did not.

    Watched: each module from the model's first level down to the attention module (the root is not held: the sites
    are cached per model, weakly), the attention module's q/k children (``qkv``, ``q_proj``, ``query``..., the q/k
    norms, the first module of every ``qk_scope`` path) and the modules of its ``qk_scope``, and the head-count and
    head-width attributes its forward splits q and k with. The scale: the first of ``scaling``, ``scale`` that holds
    a number equal to the site's scale, so Hugging Face's attention scale is checked per batch as timm's is
    (:func:`_refuse_unread_scale`, the one rule). Sites whose maps are taken in the module's own forward read no
    weights and are not watched (as :func:`refuse_altered_qk` does not check them)."""
    for site in sites:
        if site.module is None or site.observes_maps():
            continue
        if site.scale_attribute is None:
            site.scale_attribute = next((name for name in _SCALE_ATTRIBUTES if _number(getattr(site.module, name, None))
                                         and float(getattr(site.module, name)) == site.scale), None)
        watch: list[tuple[Any, ...]] = []
        node, chain = model, []
        for i, name in enumerate(site.path.split(".") if site.path else ()):
            child = node._modules.get(name)
            if child is None:
                break
            if node is not model:
                chain.append((node, name, child, True, ".".join(site.path.split(".")[: i + 1])))
            node = child
        if node is site.module:  # a path that leads elsewhere (an adapter's own naming) is not walked
            watch.extend(chain)
        scope = {path.split(".")[0] for path, _ in site.qk_scope}
        qk_children = {id(m) for m in site.qk_modules}
        for name, child in site.module._modules.items():
            if name in _QK_CHILDREN or name in _QK_NORMS or name in scope or id(child) in qk_children:
                watch.append((site.module, name, child, True, f"{site.path}.{name}"))
        for path, _ in site.qk_scope:
            owner, _, name = path.rpartition(".")
            if owner:
                parent = site.module.get_submodule(owner)
                watch.append((parent, name, parent._modules.get(name), True, f"{site.path}.{path}"))
        for name in _HEAD_ATTRIBUTES:
            value = site.module.__dict__.get(name)
            if type(value) is int:
                watch.append((site.module, name, value, False, name))
        site.qk_watch = tuple(watch)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _refuse_replaced(site: "AttentionSite") -> None:
    """Refuse a site whose q/k path is no longer what the search found (:func:`watch_qk_path`): a module on it replaced
    (the attention module, a block above it, ``qkv`` / ``q_proj``, ``q_norm``...) or a head count changed, inside the
    context (or since the sites handed in were found). The site reads the old modules (its weights, its q/k hooks, its
    norm), so the maps, modes and spectrum would be the old modules' while the model runs the new ones. A few dict
    reads a layer: run before every batch."""
    for owner, name, expected, is_module, where in site.qk_watch:
        now = (owner._modules if is_module else owner.__dict__).get(name, _GONE)
        if now is expected or (not is_module and now == expected):
            continue
        head = f"unsupported attention in {site.path!r} ({type(site.module).__name__}): "
        since = "inside this record() context (or since the sites handed to it were found)"
        fix = ("Make the change before entering record() (each entry finds the model as it is then), or undo it "
               "while recording.")
        if not is_module:
            raise QKHooksError(
                f"{head}its {name} changed from {expected!r} to {'(deleted)' if now is _GONE else repr(now)} {since}, "
                "so the maps and modes would split q and k into the heads found at entry while the model splits them "
                f"into others. {fix}")
        what = lambda m: "removed" if m is _GONE else type(m).__name__  # noqa: E731
        role = "the attention module" if where == site.path else (
            "a module above the attention module" if not where.startswith(site.path + ".") else "a module on its q/k path")
        raise QKHooksError(
            f"{head}{where!r}, {role}, is no longer the module qkhooks found ({what(expected)} then, {what(now)} now): "
            f"it was replaced {since}, so the maps, modes and spectrum would be taken with the old module (its weights, "
            f"its norm, its hooks) while the model runs the new one; recording with qk_path=False would not help. {fix}")


def refuse_altered_qk(sites: Sequence["AttentionSite"]) -> None:
    """Refuse what makes a q/k module or the attention module compute other than the weights qkhooks reads say,
    while its class and weights look plain: checked at every ``record()`` entry (the search is cached per structure).

    On every module of a site's ``qk_scope``: a forward replaced on the instance (``module.forward = ...``: baukit,
    nnsight-style tracers, a patch; accelerate's wrapper around hooks that only move tensors between devices, as a
    ``device_map=...`` load leaves, is taken unless it offloads the weights), a forward hook or pre-hook (any kind,
    ``with_kwargs`` and ``always_call`` too) someone else registered (a steering hook changes q or k; whether a hook
    changes anything cannot be seen, so any hook is refused; qkhooks' own, :func:`own_hook`, are passed by), and a
    weight or buffer that is a ``torch.Tensor`` subclass (torchao's quantised tensors: the forward computes with the
    subclass's arithmetic). Torch's global forward hooks and pre-hooks run on every module, these too: refused as
    well. On the attention module itself only a replaced forward (qkhooks models its class's forward): hooks there
    are taken, as qkhooks reads the tokens in its own pre-hook, after those already registered (torch calls global
    pre-hooks first, then a module's in the order registered), so it sees the very tokens they hand the forward.
    A pre-hook someone else put on the attention module or the block after qkhooks' own runs after qkhooks read the
    tokens: refused. A recording checks again before every batch (the model's call), so what is put on inside the
    context is refused too; what a hook puts on during a forward is seen at the next batch.

    The q/k norms (``q_norm``, ``k_norm``, an ``Identity`` too) are on the q/k path as W_q/W_k are: a hook or a
    replaced forward on one is refused as on ``qkv`` (it changes q or k after the weights, so neither the modes nor
    maps rebuilt without it would be the model's). And first, what the search found is still there
    (:func:`_refuse_replaced`): a module on the q/k path (or the attention module, or a block above it) replaced, or a
    head count changed, inside the context is refused naming it, as the sites read the old ones.
    """
    checked = [s for s in sites if s.module is not None and not s.observes_maps()]
    if not checked:
        return
    site = checked[0]
    for kind, hooks in (("forward hook", _global_forward_hooks), ("forward pre-hook", _global_forward_pre_hooks)):
        hook = _foreign(hooks)
        if hook is not None:
            what = f"'{site.path}.{site.qk_scope[0][0]}'" if site.qk_scope else "the q/k layers"
            raise QKHooksError(
                f"unsupported attention in {site.path!r} ({type(site.module).__name__}): a global {kind} ({_name(hook)}, "
                f"registered with torch.nn.modules.module.register_module_{kind.replace(' ', '_').replace('-', '_')}) runs "
                f"on every module, {what} among them, and can change q or k while the weights read stay the same, so the "
                f"spectrum, modes and maps would describe the bare weights, not what the model computes. To record it, "
                f"{HOOK_FIX}.")
    for site in checked:
        _refuse_replaced(site)  # first: what follows reads the modules found, or the new ones, as they are now
        _refuse_patched_forward(site, "", site.module)
        _refuse_unknown_attention_function(site)
        _refuse_unread_scale(site)
        for module in dict.fromkeys(m for m in (site.module, site.block) if m is not None):
            late = next((h for i, h in _after_own(module._forward_pre_hooks)), None)
            if late is not None:
                path = site.path if module is site.module else site.block_path
                raise QKHooksError(
                    f"unsupported attention in {site.path!r} ({type(site.module).__name__}): {path!r} carries a forward "
                    f"pre-hook ({_name(late)}) registered after qkhooks' own: it runs after qkhooks reads the tokens, so "
                    "the maps, modes and inputs recorded would be of tokens the forward does not receive. Register it "
                    "before entering record() (qkhooks reads what the hooks already there hand on), or remove it "
                    "while recording (handle.remove()).")
        for path, owns in site.qk_scope:
            try:
                module = site.module.get_submodule(path)
            except AttributeError:  # sites handed in from before a module was replaced: nothing left to check there
                continue
            _refuse_patched_forward(site, path, module)
            for kind, hooks in (("forward hook", module._forward_hooks), ("forward pre-hook", module._forward_pre_hooks)):
                hook = _foreign(hooks)
                if hook is not None:
                    _refuse_qk_module(site, path, module, f"which carries a {kind} someone else registered ({_name(hook)}): "
                                      "it can change what the layer hands on as q or k (a steering hook) while the weights "
                                      "read stay the same", HOOK_FIX)
            for name, t in itertools.chain(module._parameters.items(), module._buffers.items()) if owns else ():
                if t is not None and type(t) not in _PLAIN_TENSORS:
                    _refuse_qk_module(site, path, module, f"whose {name!r} is a {_name(type(t))} (a torch.Tensor subclass, "
                                      "as quantised weights are): its forward computes with the subclass's arithmetic, "
                                      "not with the values read", "record the float model (load it unquantised, or "
                                      "turn the weight into a plain tensor first)")
        for name in _QK_NORMS:  # q/k norms (an Identity too): they change q or k after W_q/W_k, as a hook there would
            module = site.module._modules.get(name)
            if module is None or not (module._forward_hooks or module._forward_pre_hooks or "forward" in module.__dict__):
                continue  # the usual case, in three reads (this runs before every batch)
            _refuse_patched_forward(site, name, module, _NORM_ROLE)
            for kind, hooks in (("forward hook", module._forward_hooks), ("forward pre-hook", module._forward_pre_hooks)):
                hook = _foreign(hooks)
                if hook is not None:
                    _refuse_qk_module(site, name, module, f"which carries a {kind} someone else registered ({_name(hook)}): "
                                      "it can change q or k after W_q/W_k (a steering hook) while the weights and the norm "
                                      "read stay the same", HOOK_FIX, _NORM_ROLE)


HF_ATTENTION_FUNCTIONS = frozenset({"eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention"})
"""Hugging Face's ``config._attn_implementation`` names whose function computes softmax(scaling·q·kᵀ + mask) as the
adapters rebuild it; a module dispatches through ``ALL_ATTENTION_FUNCTIONS`` by this name."""


def _refuse_unknown_attention_function(site: "AttentionSite") -> None:
    """Refuse a Hugging Face attention module whose config names an attention function qkhooks does not know (one
    registered with ``AttentionInterface.register``, a hub kernel): it may compute anything from q and k (another
    scale, a temperature, a sparse pattern), while the maps are rebuilt as softmax(scaling·q·kᵀ + mask)."""
    name = getattr(getattr(site.module, "config", None), "_attn_implementation", None)
    if not isinstance(name, str) or name in HF_ATTENTION_FUNCTIONS:  # None: unset; a composite config's map per part
        return
    raise QKHooksError(
        f"unsupported attention in {site.path!r} ({type(site.module).__name__}): its config's _attn_implementation is "
        f"{name!r}, an attention function qkhooks does not know (registered with AttentionInterface, or a hub "
        "kernel): it may compute other than softmax(scaling·q·kᵀ + mask), which the recorded maps rebuild. Record "
        "with one of " + ", ".join(sorted(HF_ATTENTION_FUNCTIONS)) + " (model.set_attn_implementation('sdpa')).")


def _refuse_unread_scale(site: "AttentionSite") -> None:
    """Refuse a site whose logit scale is not the one the model computes with: its ``scale`` attribute changed since
    the site was found (the maps would be rebuilt with the old one), or a fused path that ignores it (timm calls SDPA
    without ``scale``, so it computes with 1/sqrt(d_k) whatever ``attn.scale`` says)."""
    if site.scale_attribute is None:
        return
    live = getattr(site.module, site.scale_attribute, None)
    if isinstance(live, (int, float)) and float(live) != site.scale:
        raise QKHooksError(
            f"unsupported attention in {site.path!r} ({type(site.module).__name__}): its {site.scale_attribute} changed "
            f"from {site.scale:g} to {float(live):g} inside this record() context, so the maps would be rebuilt with "
            "the old one; set it before entering record().")
    if getattr(site.module, "fused_attn", False) and not math.isclose(site.scale, site.head_dim ** -0.5, rel_tol=1e-6):
        raise QKHooksError(
            f"unsupported attention in {site.path!r} ({type(site.module).__name__}): its {site.scale_attribute} is "
            f"{site.scale:g}, but its fused path (fused_attn=True) calls scaled_dot_product_attention without it, so "
            f"the model computes with 1/sqrt(d_k) = {site.head_dim ** -0.5:g}: set {site.path}.fused_attn = False for "
            f"the model to use its {site.scale_attribute}, or leave it at 1/sqrt(d_k).")


def _foreign(hooks: dict[int, Any]) -> Any | None:
    """The first hook of ``hooks`` (a module's or torch's global hook dict) someone else registered, or None."""
    return next((h for i, h in hooks.items() if not _own(i, h)), None)


def _foreign_moving(hooks: dict[int, Any]) -> Any | None:
    """The first hook of ``hooks`` someone else registered that may move what passes, or None: timm's feature hook
    net's own (:func:`_collects_features`) is skipped, and every hook after it is still looked at."""
    return next((h for i, h in hooks.items() if not _own(i, h) and not _collects_features(h)), None)


def _foreign_hook(module: nn.Module) -> tuple[str, Any] | None:
    """(``"forward hook"`` or ``"forward pre-hook"``, the hook) of the first hook on ``module`` someone else registered
    that may move what passes (:func:`_foreign_moving`), or None: for checks of modules whose geometry qkhooks reads."""
    for kind, hooks in (("forward pre-hook", module._forward_pre_hooks), ("forward hook", module._forward_hooks)):
        hook = _foreign_moving(hooks)
        if hook is not None:
            return kind, hook
    return None


# the libraries whose module classes the adapters model (their code is what qkhooks reads the geometry of)
_MODELLED_LIBRARIES = ("torch.", "timm.", "transformers.", "torchvision.")


_NOT_CALLED_AS_IT_RUNS = frozenset({"__init__", "extra_repr", "__repr__", "_get_name", "__dir__", "init_weights",
                                    "_init_weights", "reset_parameters"})
"""Methods a class of the user's own may override that no library calls as the model runs (printing, initialising
weights, which qkhooks reads as they are)."""


def _runs_as_called(name: str, bases: Sequence[type]) -> bool:
    """Whether a method ``name`` of a class of the user's own may run as the module is called: it overrides a method
    of a class after it in its MRO (``forward``, ``__call__``, or a library method the library's own forward calls,
    timm's ``_pos_embed``), or is ``__getattribute__``. A method of a new name is called by the user's code only (or by
    an override above, which counts itself)."""
    if name in _NOT_CALLED_AS_IT_RUNS:
        return False
    return name == "__getattribute__" or any(name in vars(base) for base in bases if base is not object)


def _own_class_code(module: nn.Module) -> str | None:
    """How ``module``'s class runs code of its own, not a modelled library's, as it runs, or None: the first class of
    its MRO outside those libraries that defines methods :func:`_runs_as_called` or properties (timm's
    ``embed_layer=`` / ``block_fn=`` take the user's classes), named with them. A class that only configures a
    library's (an ``__init__`` alone) or adds methods no library calls (an ``extra_repr``, a helper of the user's;
    round 50 refused those too) runs that library's code."""
    mro = type(module).__mro__
    for at, cls in enumerate(mro):
        if cls is object or cls.__module__.startswith(_MODELLED_LIBRARIES):
            return None
        methods = sorted(name for name, value in vars(cls).items() if isinstance(value, property) or (
            (inspect.isfunction(value) or isinstance(value, (staticmethod, classmethod)))
            and _runs_as_called(name, mro[at + 1:])))
        if methods:
            return (f"runs code of its own class {cls.__module__}.{cls.__qualname__} ({', '.join(methods)}), "
                    "which can move or mix pixels or tokens and which qkhooks cannot read (build the model with "
                    "the library's own class to record masks)")
    return None


def moves_pixels(module: nn.Module) -> str | None:
    """How ``module``, on the way from the image to the tokens, may make them read other pixels than the convolutions'
    kernels, strides and zero padding say (for masks read onto the tokens), or None: a hook someone else registered (a
    flip, a roll), a forward replaced on the instance (but accelerate's device placement, :func:`moves_devices_only`,
    which moves no pixel), code of a class of the user's own (:func:`_own_class_code`), a convolution padding with
    ``padding_mode`` other than zeros (circular padding reads the far edge)."""
    found = _foreign_hook(module)
    if found is not None:
        return f"carries a {found[0]} someone else registered ({_name(found[1])}), which can move or mix pixels"
    if "forward" in module.__dict__ and not moves_devices_only(module):
        return "has its forward replaced on the instance"
    own = _own_class_code(module)
    if own is not None:
        return own
    if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
        return f"pads with padding_mode={module.padding_mode!r}, which reads pixels where zero padding reads none"
    return None


def refuse_moved_pixels(owner: str, route: Sequence[tuple[str, nn.Module]], model: nn.Module | None = None) -> None:
    """Refuse, when masks are read onto the tokens, a module on the image-to-token route (each of ``route``'s
    ``(path in the model, module)`` and its submodules) that may make the tokens read other pixels than the patch
    size or convolutions say (:func:`moves_pixels`), or ``model`` or a module of it holding the route carrying a
    forward pre-hook someone else registered (:func:`_changes_image`): masks would land on the wrong tokens without a
    word. ``owner`` names the model's family in the message."""
    for path, top in route:
        holders = [] if model is None else ["", *(path.rsplit(".", k)[0] for k in range(path.count("."), 0, -1))]
        checks = [(holder, model.get_submodule(holder), _changes_image) for holder in holders] + [
            (f"{path}.{sub}" if sub else path, module, moves_pixels) for sub, module in top.named_modules()]
        found = _first_moving(checks)
        if found is not None:
            where, module, how = found
            raise QKHooksError(
                f"{owner}'s {repr(where) if where else 'the model itself'} ({type(module).__name__}) {how}, so which "
                "pixels each token reads is not what its patch embedding's patch size or convolutions say, and "
                "masks read onto the tokens would be wrong. Record this model without masks, or remove the hook "
                "(handle.remove()) / restore the module while recording masks.")


def _first_moving(checks: Sequence[tuple[str, nn.Module, Callable[[nn.Module], str | None]]]
                  ) -> tuple[str, nn.Module, str] | None:
    """The first ``(where, module, how)`` among ``(where, module, check)`` whose check says how the module may move
    the pixels or tokens (:func:`moves_pixels`, :func:`_changes_image`, :func:`_moves_input`), or None."""
    for where, module, check in checks:
        how = check(module)
        if how is not None:
            return where, module, how
    return None


def _collects_features(hook: Any) -> bool:
    """timm's feature hook net's own hook (``FeatureHooks._collect_output_hook``): it stores a stage's output for
    the features and returns None, so it moves no token."""
    owner = getattr(getattr(hook, "func", None), "__self__", None)
    return type(owner).__name__ == "FeatureHooks" and type(owner).__module__.startswith("timm.")


def refuse_moved_tokens(owner: str, path: str, block_path: str | None, model: nn.Module) -> None:
    """Refuse, when masks are read onto the tokens of the attention at ``path``, a module the tokens pass through on
    their way there that may move them (:func:`moves_pixels`: someone else's hook, a replaced forward): a pre-hook on
    a module holding the attention (the blocks, the block, the attention itself), anything in its block (HF
    registers ``layernorm_before`` after the attention), or anything in a module registered before one holding it
    (earlier blocks, the patch embedding's neighbours). A roll there makes each token show its neighbour's pixels
    while the maps stay the model's own, so masks would land on the wrong tokens without a word."""
    chain = [path.rsplit(".", k)[0] for k in range(path.count("."), 0, -1)] + [path]
    checks: list[tuple[str, nn.Module, Callable[[nn.Module], str | None]]] = []
    parent, parent_path = model, ""
    for holder in chain:
        child = holder.rsplit(".", 1)[-1]
        for name, sibling in parent.named_children():
            if name == child:
                break
            where = f"{parent_path}.{name}" if parent_path else name
            checks += [(f"{where}.{sub}" if sub else where, m, moves_pixels) for sub, m in sibling.named_modules()]
        parent, parent_path = parent.get_submodule(child), holder
        checks.append((holder, parent, _moves_input))
    if block_path:
        block = model.get_submodule(block_path)
        checks += [(f"{block_path}.{sub}", m, moves_pixels) for sub, m in block.named_modules()
                   if sub and f"{block_path}.{sub}" != path and not f"{block_path}.{sub}".startswith(f"{path}.")]
    found = _first_moving(checks)
    if found is not None:
        where, module, how = found
        raise QKHooksError(
            f"{owner}'s {where!r} ({type(module).__name__}) {how}, on the tokens' way to the attention {path!r}, "
            "so a token may not show the pixels of its cell, and masks read onto the tokens would be wrong. "
            "Record this model without masks, or remove the hook (handle.remove()) / restore the module while "
            "recording masks.")


def _moves_input(module: nn.Module) -> str | None:
    """How a module holding an attention may move the tokens before they reach it (someone else's forward pre-hook,
    a replaced forward, code of a class of the user's own: :func:`_own_class_code`), or None; its forward hooks run
    after the attention."""
    hook = _foreign(module._forward_pre_hooks)
    if hook is not None:
        return f"carries a forward pre-hook someone else registered ({_name(hook)}), which can move or mix tokens"
    if "forward" in module.__dict__ and not moves_devices_only(module):
        return "has its forward replaced on the instance"
    return _own_class_code(module)


def _changes_image(module: nn.Module) -> str | None:
    """How a module holding the patch embedding may change the image before it is embedded (a forward pre-hook someone
    else registered: a flip, a crop; code of a class of the user's own, :func:`_own_class_code`), or None; its
    forward hooks run after the tokens are made."""
    hook = _foreign(module._forward_pre_hooks)
    if hook is not None:
        return (f"carries a forward pre-hook someone else registered ({_name(hook)}), which can change the image "
                "before its patch embedding sees it")
    return _own_class_code(module)


def _after_own(hooks: dict[int, Any]) -> Iterator[tuple[int, Any]]:
    """The hooks of ``hooks`` (in the order torch runs them) someone else registered after one of qkhooks' own."""
    seen_own = False
    for i, hook in hooks.items():
        own = _own(i, hook)
        seen_own = seen_own or own
        if seen_own and not own:
            yield i, hook


def _refuse_patched_forward(site: "AttentionSite", path: str, module: nn.Module, role: str | None = None) -> None:
    """Refuse ``module`` whose forward is replaced on the instance, unless by accelerate's device placement only."""
    forward = module.__dict__.get("forward")
    if forward is None or moves_devices_only(module):
        return
    how = f"its forward is replaced on the instance (module.forward = {_name(forward)}"
    hook = module.__dict__.get("_hf_hook")
    how += (f": accelerate's wrapper around {hook!r}, taken only where its hooks merely move tensors between devices "
            "around the class's own forward" if hook is not None else ": baukit, an nnsight-style tracer or a patch") + ")"
    fix = ("restore the class's forward while recording (accelerate: remove_hook_from_module, or load without offloading "
           "the weights; otherwise del module.forward or the tool's own way to undo its patch)")
    if path:
        _refuse_qk_module(site, path, module, f"where {how}: it may compute other than what the weights read say", fix,
                          role or _READ_ROLE)
    raise QKHooksError(
        f"unsupported attention in {site.path!r} ({type(module).__name__}): {how}, while qkhooks rebuilds the maps as "
        f"{_name(type(module).forward)} computes them, so the maps, modes and spectrum would describe the class's "
        f"forward, not what the model runs. To record it, {fix}.")


def moves_devices_only(module: nn.Module) -> bool:
    """Whether ``module.forward`` is accelerate's wrapper around the class's own forward with hooks that only move the
    call's tensors to their execution device and back (``AlignDevicesHook`` without offloading, alone or in a
    ``SequentialHook``), as a model loaded with ``device_map=...`` carries. Recognised by name: accelerate is not a
    dependency. An offloading hook leaves the weights on the meta device between calls: not taken."""
    forward, old = module.__dict__.get("forward"), module.__dict__.get("_old_forward")
    if _name(forward) != _ACCELERATE_FORWARD or getattr(old, "__self__", None) is not module \
            or getattr(old, "__func__", None) is not type(module).forward:
        return False
    hooks = accelerate_hooks(module)
    return bool(hooks) and all(_name(type(h)) == _ACCELERATE_DEVICE_HOOK and not getattr(h, "offload", True) for h in hooks)


def accelerate_hooks(module: nn.Module) -> tuple[Any, ...]:
    """The accelerate hooks ``add_hook_to_module`` left on ``module`` (a ``SequentialHook``'s parts), by name."""
    hook = module.__dict__.get("_hf_hook")
    if hook is None:
        return ()
    return tuple(getattr(hook, "hooks", ())) if _name(type(hook)) == _ACCELERATE_SEQUENTIAL else (hook,)


def accelerate_offloading(model: nn.Module) -> str | None:
    """The path of a module of ``model`` whose accelerate hook offloads weights (between calls they sit on the meta
    device), or None."""
    return next((path for path, m in model.named_modules() if any(getattr(h, "offload", False) is True
                                                                   for h in accelerate_hooks(m))), None)


_READ_ROLE = "W_q/W_k are read off"
_NORM_ROLE = "q or k is normalised by"


def _refuse_qk_module(site: "AttentionSite", path: str, module: nn.Module, why: str, fix: str = PEFT_FIX,
                      role: str = _READ_ROLE) -> NoReturn:
    cls = type(module)
    bare = "the bare weights" if role == _READ_ROLE else "the q/k path as its modules' classes compute it"
    raise QKHooksError(
        f"unsupported attention in {site.path!r} ({type(site.module).__name__}): {role} "
        f"'{site.path}.{path}' ({cls.__module__}.{cls.__qualname__}), {why}, so the spectrum, modes and maps would "
        f"describe {bare}, not what the model computes. To record it, {fix}.")
