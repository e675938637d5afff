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
``batch_first=False`` is refused at the search (with ``skip_unmodelled=True`` that block's attention is left out,
named with its reason, as other families' unmodelled forms are), and a call that hands it a mask (a causal one too:
torch takes ``is_causal`` only with ``attn_mask``) or keys or values other than the query tensor is refused by the
site. Where the tokens come from and in what order (the class token first, then the grid) is what the forwards from
the model down to each block say: ``VisionTransformer`` (``forward``, ``_process_input``), its ``Encoder``, the
``encoder.layers`` Sequential and each ``EncoderBlock`` must run their classes' own forwards, neither overridden by a
subclass nor replaced on the instance (``module.forward = ...``; ``conv_proj``'s neither, nor the model's own
``forward`` / ``_process_input``), ``conv_proj`` being the ``nn.Conv2d`` (or ``nn.Sequential`` stem) torchvision builds, checked at the search and again at every call of
each attention (a patch or a ``conv_proj`` replaced inside ``record()``); a block elsewhere, or any of those changed, refuses the model, with
``skip_unmodelled`` too (later blocks' token layout rests on it). A part of the model handed in instead of the model
(``record(model.encoder)``, one block) is refused saying to pass the whole model. Other models holding a
MultiheadAttention (OpenAI CLIP, open_clip) are not matched: refused as before. The class is matched by name, so
torchvision is imported lazily.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import weakref
from typing import Any, Callable

import torch
from torch import nn

from qkhooks.errors import QKHooksError
from qkhooks.models.base import PART_HINTS, AttentionSite, QKRows, register_adapter
from qkhooks.models.unsupported import (SKIP_HINT, UNMODELLED_FORMS, compiled_by_dynamo, moves_devices_only,
                                        refuse_moved_pixels, refuse_uncovered, skipping_now)

_VIT = "torchvision.models.vision_transformer.VisionTransformer"
_ENCODER = "torchvision.models.vision_transformer.Encoder"
_ENCODER_BLOCK = "torchvision.models.vision_transformer.EncoderBlock"
_SEQUENTIAL = "torch.nn.modules.container.Sequential"
_MHA = "torch.nn.modules.activation.MultiheadAttention"
_BUILT = ("torchvision's Vision Transformers build it as nn.MultiheadAttention(hidden_dim, num_heads, batch_first=True); "
          "another form needs an adapter of its own, qkhooks.register_adapter (README, 'Your own architecture')")
_FIX = ("record a plain torchvision VisionTransformer, or register your own adapter (README, 'Your own architecture')")
# The nn.MultiheadAttention instances the search found in a torchvision EncoderBlock: UNMODELLED_FORMS gives the reason
# of those only, so that skip_unmodelled leaves them out named with it, while a MultiheadAttention of another model
# (OpenAI CLIP's batch_first=False) keeps its refusal as before ("no registered adapter models this class").
_IN_ENCODER_BLOCKS: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


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
    """Why qkhooks does not model this MultiheadAttention instance exactly, or None (the form torchvision builds). A
    subclass that overrides the forward is not asked here: :func:`find` refuses it whatever ``skip_unmodelled`` says."""
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


def _encoder_block_mha_reason(mha: nn.Module) -> str | None:
    """:data:`UNMODELLED_FORMS`' entry for nn.MultiheadAttention: why one that a torchvision EncoderBlock holds (as the
    search found) is not modelled, with the form torchvision builds, so that ``skip_unmodelled`` leaves it out named
    with the reason, as other families' forms are; None for any other MultiheadAttention (another model's)."""
    why = unmodelled_mha(mha) if mha in _IN_ENCODER_BLOCKS else None
    return f"{why} ({_BUILT})" if why else None


UNMODELLED_FORMS[_MHA] = _encoder_block_mha_reason


def _name(obj: Any) -> str:
    named = obj if hasattr(obj, "__qualname__") else type(obj)
    return f"{getattr(named, '__module__', None)}.{named.__qualname__}"


def _unknown_forward(module: Any, base_name: str, label: str, code: str) -> str | None:
    """How ``module`` (``label`` in prose, ``code`` the way the model reaches it: ``model.encoder``) does not run the
    forward torchvision's class ``base_name`` defines, or None: it is another class, a subclass overriding the forward,
    or the forward is replaced on the instance (``module.forward = ...``: a patch, a tracer; accelerate's wrapper that
    only moves tensors between devices around the class's own forward is taken)."""
    short = base_name.rpartition(".")[2]
    base = _class_in_mro(module, base_name)
    if base is None:
        kind = "torch's nn.Sequential" if base_name == _SEQUENTIAL else f"torchvision's {short}"
        return f"{label} is a {type(module).__name__}, not {kind}"
    if type(module).forward is not base.forward:
        return f"{label} ({type(module).__name__}) overrides {short}.forward"
    return _replaced_forward(module, label, code)


def _replaced_forward(module: nn.Module, label: str, code: str) -> str | None:
    """How ``module`` has its forward replaced on the instance (not by accelerate's device placement only), or None."""
    forward = module.__dict__.get("forward")
    if forward is None or moves_devices_only(module) or compiled_by_dynamo(module) == "a compiled wrapper":
        return None  # a torch.compile wrapper's own forward: refuse_compiled names it where qkhooks hooks it
    return f"{label} has its forward replaced on the instance ({code}.forward = {_name(forward)})"


def _code(path: str) -> str:
    """``model.encoder.layers.encoder_layer_1`` for a module path (an index as ``[3]``): what a user types."""
    return "model" + "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in path.split(".") if p)


def _how_to_restore(how: str, code: str, method: str = "forward") -> str:
    """The fix of :func:`_unknown_forward`'s finding: undo an instance patch, or record a plain model."""
    if "replaced on the instance" in how:
        return (f"restore the class's own {method} while recording (del {code}.{method}, or the patching tool's own "
                f"way to undo it), or {_FIX}")
    return _FIX


def _replaced_on_model(model: nn.Module, method: str) -> bool:
    """Whether the VisionTransformer's ``method`` (``forward``, ``_process_input``) is replaced on the instance (a
    patch, a tracer; accelerate's wrapper that only moves tensors between devices around the class's own forward is
    taken)."""
    return method in model.__dict__ and not (method == "forward" and moves_devices_only(model))


def _replaced_model_method(model: nn.Module) -> str | None:
    """Which of the VisionTransformer's ``forward`` / ``_process_input`` is replaced on the instance, as :func:`find`
    refuses at the search, or None."""
    return next((method for method in ("forward", "_process_input") if _replaced_on_model(model, method)), None)


@functools.lru_cache(maxsize=8)
def _signature(forward: Callable[..., Any]) -> inspect.Signature:
    """The signature of a forward, read once (a site's call is bound to it at every forward of every layer)."""
    return inspect.signature(forward)


@dataclasses.dataclass(eq=False)
class MultiheadAttentionSite(AttentionSite):
    """A torchvision ``EncoderBlock``'s ``nn.MultiheadAttention``, self-attention of the query tensor: its call must
    hand the very same tensor as query, key and value, and no mask (torch takes a causal flag only with one).
    ``route``: (label, code, module) of the patch embedding, the encoder, its layers and this block, whose forwards
    must stay their classes' own at every call (the search checked them; a patch inside ``record()`` is seen here)."""

    route: tuple[tuple[str, str, nn.Module], ...] = ()
    model_ref: Callable[[], nn.Module | None] | None = None
    """A weak reference to the VisionTransformer (the cached sites must not keep it alive): its own ``forward`` and
    ``_process_input`` (the class token, then the grid) replaced on the instance inside ``record()`` are seen here."""

    def refuse_unmodelled_inputs(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        model = self.model_ref() if self.model_ref is not None else None
        if model is not None and ("forward" in model.__dict__ or "_process_input" in model.__dict__):
            method = _replaced_model_method(model)
            if method:
                how = (f"model has its {method} replaced on the instance (model.{method} = "
                       f"{_name(model.__dict__[method])})")
                raise QKHooksError(_route_refusal(self.path, self.module, how, "model", since=True, method=method))
        if model is not None and self.route and model._modules.get("conv_proj") is not self.route[0][2]:
            now = model._modules.get("conv_proj")
            how = (f"model.conv_proj is no longer the module qkhooks found ({type(self.route[0][2]).__name__} then, "
                   f"{type(now).__name__} now): it was replaced")
            raise QKHooksError(_route_refusal(self.path, self.module, how, "model.conv_proj", since=True))
        for label, code, module in self.route:  # a dict read each: this runs at every call of every layer
            if "forward" in module.__dict__:
                how = _replaced_forward(module, label, code)
                if how:
                    raise QKHooksError(_route_refusal(self.path, self.module, how, code, since=True))
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
        _refuse_stem_moving_pixels(conv)
        for c in convs:
            how = (f"is dilated (dilation={tuple(c.dilation)})" if tuple(c.dilation) != (1, 1) else
                   f"pads by a rule (padding={c.padding!r})" if not isinstance(c.padding, tuple) else None)
            if how:
                raise QKHooksError(f"torchvision ViT's stem convolution {c} {how}; which pixels its tokens read is not "
                                   "modelled, so masks cannot be read onto them. Record this model without masks.")
        return [(tuple(c.kernel_size), tuple(c.stride), tuple(c.padding)) for c in convs]

    return None, chain


# modules of a conv stem that act on each pixel alone (torchvision's Conv2dNormActivation: a Sequential of a conv, a norm
# and an activation), so the convolutions alone say which pixels each token reads
_PER_PIXEL_STEM_MODULES = (nn.Sequential, nn.BatchNorm2d, nn.Identity, nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish,
                           nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.ELU, nn.Mish)


def _refuse_stem_moving_pixels(stem: nn.Sequential) -> None:
    """Refuse a convolutional stem whose tokens read other pixels than its convolutions' kernels, strides and zero
    padding say (checked when masks are read onto the tokens, :func:`_pixel_convs`): what any patch embedding is
    refused for (:func:`refuse_moved_pixels`: a hook someone else put on one of its modules, a forward replaced on one,
    a convolution padding other than with zeros), or a module that is none of a conv, a BatchNorm or an activation
    running its class's own forward (a pool mixes neighbouring pixels)."""
    for path, module in stem.named_modules():  # first: a class of the user's own is named as not one of these
        if not (isinstance(module, (nn.Conv2d, *_PER_PIXEL_STEM_MODULES)) and type(module).forward is _base_forward(module)):
            raise QKHooksError(
                f"torchvision ViT's stem module 'conv_proj{'.' + path if path else ''}' ({type(module).__name__}) is not "
                "a convolution, a BatchNorm or an activation acting on each pixel alone, so which pixels each token "
                "reads is not what the stem's convolutions say, and masks read onto the tokens would be wrong. Record "
                "this model without masks, or restore the stem while recording masks.")
    refuse_moved_pixels("torchvision ViT", [("conv_proj", stem)])


def _base_forward(module: nn.Module) -> Any:
    """The forward of the first of nn.Conv2d and ``_PER_PIXEL_STEM_MODULES`` that ``module`` is (a subclass must add
    none of its own, as torchvision's Conv2dNormActivation adds none to nn.Sequential)."""
    return next(c.forward for c in (nn.Conv2d, *_PER_PIXEL_STEM_MODULES) if isinstance(module, c))


def _route_refusal(path: str, attn: nn.Module, how: str, code: str, since: bool = False, method: str = "forward") -> str:
    """The refusal of an attention whose route from the image (its encoder's, their layers' or its block's forward, or
    its own) is not torchvision's: which tokens it is handed, in what order, is then not known."""
    when = " inside this record() context (or since its sites were found)" if since else ""
    return (f"unsupported attention in {path!r} ({type(attn).__name__}): {how}{when}, so how the tokens reach this "
            "attention (the class token first, then the patch grid in raster order, after ln_1 as query, key and "
            "value) and what it computes with them is not known to qkhooks: the maps, modes and grid recorded could "
            f"describe other tokens than those it runs on; {_how_to_restore(how, code, method)}.")


def _stem_problem(conv: nn.Module, label: str, code: str) -> str | None:
    """How the patch embedding ``conv`` is not one torchvision builds (an ``nn.Conv2d``, or the ``nn.Sequential`` of a
    convolutional stem, each running its class's own forward), or None: another module (a wrapper that flips or crops
    the image first) would make other tokens of the pixels than the convolutions read off it say. A torch.compile
    wrapper is left to refuse_compiled (qkhooks hooks the patch embedding), which names it."""
    if compiled_by_dynamo(conv) == "a compiled wrapper":
        return None
    base = nn.Conv2d if isinstance(conv, nn.Conv2d) else nn.Sequential if isinstance(conv, nn.Sequential) else None
    if base is None:
        return f"{label} is a {type(conv).__name__}, not the nn.Conv2d (or nn.Sequential stem) torchvision builds"
    if type(conv).forward is not base.forward:
        return f"{label} ({type(conv).__name__}) overrides {base.__name__}.forward"
    return _replaced_forward(conv, label, code)


def _encoder_route(model: nn.Module) -> tuple[tuple[str, str, nn.Module], ...]:
    """(label, code, module) of the model's patch embedding ``conv_proj`` (a forward replaced on the instance: its
    class varies with the stem), its ``Encoder`` and the encoder's ``layers`` Sequential, each running its class's own
    forward (torchvision's ``Encoder`` adds the position embedding and runs the blocks in order); refused otherwise,
    naming the first that does not, whatever ``skip_unmodelled`` says: every block's tokens pass through them."""
    encoder = model._modules.get("encoder")
    layers = encoder._modules.get("layers") if isinstance(encoder, nn.Module) else None
    route = (("model.conv_proj", "model.conv_proj", model.conv_proj), ("model.encoder", "model.encoder", encoder),
             ("model.encoder.layers", "model.encoder.layers", layers))
    for (label, code, module), base in zip(route, (None, _ENCODER, _SEQUENTIAL)):
        how = _unknown_forward(module, base, label, code) if base else _stem_problem(module, label, code)
        if how:
            raise QKHooksError(
                f"{type(model).__name__}: {how}, so how the tokens reach the encoder blocks (the class token first, then "
                "the patch grid in raster order, through the blocks in order) and which pixels each token shows is not "
                "known to qkhooks: the maps, modes "
                f"and grid recorded could describe other tokens than the model's; {_how_to_restore(how, code)}.")
    return route


def find(model: nn.Module) -> list[AttentionSite]:
    """One site per encoder block's self-attention, in block order; anything else attention-like refuses the model.
    With ``skip_unmodelled``, a block's attention of a form not modelled (:func:`unmodelled_mha`) is left out, named;
    anything that makes the tokens' route unknown (a forward changed on the way, a block elsewhere) is refused."""
    vit = _class_in_mro(model, _VIT)
    for method in ("forward", "_process_input"):  # a subclass's method, or one replaced on the instance
        if _replaced_on_model(model, method):
            how = f"replaces torchvision VisionTransformer.{method} on the instance (model.{method} = ...)"
        elif getattr(type(model), method) is not getattr(vit, method):
            how = f"overrides torchvision VisionTransformer.{method}"
        else:
            continue
        raise QKHooksError(
            f"{type(model).__name__} {how}, so where its tokens come from (one class token first, then the patch grid) "
            f"is not known to qkhooks; record a plain VisionTransformer (del model.{method} restores the class's own "
            "on an instance), or register your own adapter (README, 'Your own architecture').")
    route = _encoder_route(model)
    image, patch = int(model.image_size), int(model.patch_size)
    grid = (image // patch, image // patch)
    patch_size, pixel_convs = _pixel_convs(model)
    grid_source = _grid_source(model)  # one for all sites: grid_source_hooks hooks each distinct one once
    sites: list[AttentionSite] = []
    for name, block in model.named_modules():
        attn = getattr(block, "self_attention", None)
        base = _class_in_mro(attn, _MHA)
        if base is None:
            continue
        path, code = f"{name}.self_attention", _code(name)
        how = _unknown_forward(block, _ENCODER_BLOCK, f"its block {name!r}", code)
        if how is None and name.rpartition(".")[0] != "encoder.layers":
            how = f"its block {name!r} is not one of model.encoder.layers, the blocks VisionTransformer's forward runs"
        if how is None and type(attn).forward is not base.forward:  # replaced on the instance: refuse_altered_qk's
            how = f"{type(attn).__name__} overrides nn.MultiheadAttention.forward, which is what qkhooks models"
        if how:
            raise QKHooksError(_route_refusal(path, attn, how, code))
        _IN_ENCODER_BLOCKS.add(attn)
        why = unmodelled_mha(attn)
        # with skip_unmodelled the search leaves it out, named (UNMODELLED_FORMS, keyed by the exact class: a subclass
        # would not be left out there, so it is refused whatever the flag says)
        if why and (not skipping_now() or type(attn) is not base):
            raise QKHooksError(f"unsupported attention in {path!r} ({type(attn).__name__}): {why} ({_BUILT})."
                               + (" " + SKIP_HINT if type(attn) is base else ""))
        heads, dim = int(attn.num_heads), int(attn.embed_dim)
        sites.append(MultiheadAttentionSite(
            layer=len(sites), path=path, module=attn, block_path=name, block=block, num_heads=heads,
            head_dim=int(attn.head_dim), dim=dim, scale=float(attn.head_dim) ** -0.5, num_prefix_tokens=1, grid=grid,
            family="torchvision-vit", input_name="query", block_input_name="input", qk_linear=packed_qk_rows(attn),
            patch_size=patch_size, pixel_convs=pixel_convs, pixel_route=(("conv_proj", model.conv_proj),),
            grid_source=grid_source,
            route=route + ((f"its block {name!r}", code, block),), model_ref=weakref.ref(model),
        ))
    refuse_uncovered(model, sites)
    return sites


def part_of_vit(module: nn.Module) -> str | None:
    """The refusal of a part of a torchvision ViT handed in instead of the model (``record(model.encoder)``, one block,
    ``model.encoder.layers``): the tokens' origin and order are the whole model's forward's, so say to pass it; None
    for anything else."""
    if _class_in_mro(module, _ENCODER) is not None:
        what, example = "its Encoder, model.encoder", "record(model), not record(model.encoder)"
    elif _class_in_mro(module, _ENCODER_BLOCK) is not None:
        what = "one of its encoder blocks, model.encoder.layers[i]"
        example = "record(model), not record(model.encoder.layers[i])"
    elif isinstance(module, (nn.Sequential, nn.ModuleList)) and len(module) and all(
            _class_in_mro(m, _ENCODER_BLOCK) is not None for m in module):
        what, example = "its encoder's blocks, model.encoder.layers", "record(model), not record(model.encoder.layers)"
    else:
        return None
    return (f"{type(module).__name__} is part of a torchvision VisionTransformer ({what}): qkhooks finds the attention "
            "layers through the whole model, whose forward says where each token comes from (the class token first, "
            "then the patch grid of the image conv_proj is handed), which a part alone does not. Pass the whole model: "
            f"{example}; for some blocks only, record(model, layers=[0, 5]) (block indices, or module paths such as "
            "'encoder.layers.encoder_layer_5.self_attention'). qkhooks.load_model('torchvision:vit_b_16') builds the "
            "model with its preprocessing.")


PART_HINTS.append(part_of_vit)


def matches(model: nn.Module) -> bool:
    """A torchvision VisionTransformer (or a subclass: :func:`find` refuses one that changes its forward)."""
    return _class_in_mro(model, _VIT) is not None


register_adapter("torchvision-vit", matches, find, families="torchvision VisionTransformer (vit_b_16, vit_b_32, "
                 "vit_l_16, vit_l_32, vit_h_14): nn.MultiheadAttention with a packed in_proj, class token first",
                 first=False)
