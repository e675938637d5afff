"""Adapter for timm models whose attention is plain softmax(scale · q·k): ViT and its variants (DeiT incl.
distilled, DINO, CLIP, DINOv2 incl. registers, parallel blocks), PiT's pooled stages, and EVA / EVA-02 /
DINOv3 / ``vit_*_rope_*`` (``EvaAttention``: maps from the model's own rotated q, k; modes of the content form).
Also inside timm's own feature nets (``features_only``): the sites of the network they keep, under its path there.

The hooked module receives exactly the tokens entering W_q/W_k (after the block's norm). An attention module
is taken only when its class's own ``forward`` is one qkhooks models (``timm.layers.Attention``,
``EvaAttention``); a subclass that overrides it, or any other attention-like module in the model, makes the
whole model refused with the module named (see :mod:`qkhooks.models.unsupported`), never half-recorded.
A rotary table, mask or causal flag handed to an accepted module at run time is refused by the site itself.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import re
import weakref
from typing import Callable

import torch
from torch import nn

from qkhooks.errors import QKHooksError
from qkhooks.models.base import AttentionSite, QKRows, leading_rows, register_adapter, stacked_rows
from qkhooks.models.class_attention import cait_site_fields
from qkhooks.models.qknorm import qk_norm_of
from qkhooks.models.unsupported import refuse_uncovered


def _classes() -> dict[str, type]:
    from timm.layers import Attention, AttentionRope
    from timm.models.cait import ClassAttn, TalkingHeadAttn
    from timm.models.eva import EvaAttention

    return {"Attention": Attention, "EvaAttention": EvaAttention, "AttentionRope": AttentionRope, "ClassAttn": ClassAttn,
            "TalkingHeadAttn": TalkingHeadAttn}


@dataclasses.dataclass(frozen=True)
class ExtraForm:
    """An attention class another module teaches this adapter (reduced_keys.py, windows.py): its class as the dotted
    path timm defines it at (imported when first needed: a timm without it has no module of that form), its q/k
    reader ``attn -> (qk_linear, qk_modules)`` and ``(site, attn) -> the site for that form``."""

    cls: str
    qk_reader: Callable[[nn.Module], tuple[QKRows, tuple[nn.Module, ...]]]
    finish: Callable[[AttentionSite, nn.Module], AttentionSite | None]

    def load(self) -> type | None:
        """The class, or None where this timm has no such module or class."""
        module, _, name = self.cls.rpartition(".")
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            return None


EXTRA_FORMS: dict[str, ExtraForm] = {}
# ``(model, site) -> site`` steps every site goes through last, for forms set by where a module sits rather than by its
# class (mobilevit.py: timm's plain Attention inside a MobileViT block, which unfolds images into pixel offsets).
SITE_FINISHERS: list[Callable[[nn.Module, AttentionSite], AttentionSite]] = []


def _kind(module: nn.Module) -> str | None:
    """Which modelled attention this module is (its class's forward must be the modelled one), else None."""
    for kind, cls in _classes().items():
        if type(module).forward is cls.forward:
            return kind
    for kind, form in EXTRA_FORMS.items():
        cls = form.load()
        if cls is not None and type(module).forward is cls.forward:
            return kind
    return None


def _is_timm_model(model: nn.Module) -> bool:
    return type(model).__module__.startswith("timm.")


def _qk_reader(attn: nn.Module, kind: str) -> tuple[QKRows, tuple[nn.Module, ...]]:
    """(qk_linear, qk_modules) for a modelled attention: q then k rows of the model's own parameters."""
    rows = int(attn.num_heads) * int(attn.head_dim)
    qkv = getattr(attn, "qkv", None)
    if qkv is not None and getattr(attn, "q_bias", None) is None:
        return leading_rows(qkv, 2 * rows), (qkv,)
    if qkv is not None:  # EVA: separate q/k biases added through F.linear, so the qkv module is never called
        return leading_rows(qkv, 2 * rows, biases=attn), ()
    return stacked_rows(attn.q_proj, attn.k_proj), (attn.q_proj, attn.k_proj)


def grouped_query_reader(path: str, attn: nn.Module, qk_linear: Callable[[], tuple[torch.Tensor, torch.Tensor | None]],
                         counts: tuple[int, int] | None = None) -> Callable[[], tuple[torch.Tensor, torch.Tensor | None]]:
    """Grouped-query attention (``num_kv_heads`` < ``num_heads``): key head g serves query heads g·G .. g·G + G − 1
    (the model's ``repeat_interleave``), so the content form of query head h is W_q,h^T W_k,h//G. Returns the q rows
    and the key rows repeated per query head, the (2·H·d_k, d) layout every site reads. ``counts``: (query heads, key
    heads) where the module does not hold them as ``num_heads`` / ``num_kv_heads`` (HF: read off its Linear layers)."""
    heads, kv_heads = counts if counts is not None else (int(attn.num_heads), int(attn.num_kv_heads))
    if heads % kv_heads:
        raise QKHooksError(f"unsupported attention in {path!r} ({type(attn).__name__}): {heads} query heads do not "
                           f"split evenly over {kv_heads} key heads.")
    groups = heads // kv_heads

    def expanded() -> tuple[torch.Tensor, torch.Tensor | None]:
        w, b = qk_linear()
        dk = w.shape[0] // (heads + kv_heads)
        rows = heads * dk

        def repeat(t: torch.Tensor) -> torch.Tensor:
            return t.unflatten(0, (kv_heads, dk)).repeat_interleave(groups, 0).flatten(0, 1)

        return torch.cat([w[:rows], repeat(w[rows:])]), None if b is None else torch.cat([b[:rows], repeat(b[rows:])])

    return expanded


def _eva_rotation(attn: nn.Module) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """EvaAttention's and AttentionRope's own rotation: timm's ``apply_rot_embed_cat`` on the patch tokens, prefix tokens as they are."""
    from timm.layers import apply_rot_embed_cat

    def rotate(q: torch.Tensor, k: torch.Tensor, rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        npt, half = int(attn.num_prefix_tokens), bool(getattr(attn, "rotate_half", False))
        return tuple(  # type: ignore[return-value]
            torch.cat([t[:, :, :npt], apply_rot_embed_cat(t[:, :, npt:], rope, half=half)], dim=2).type_as(t) for t in (q, k)
        )

    return rotate


def _geometry(model: nn.Module) -> tuple[int, tuple[int, int] | None, tuple[int, int] | None]:
    """(prefix tokens, native patch grid, patch size) of the token sequence entering the first stage."""
    num_prefix = getattr(model, "num_prefix_tokens", None)
    if num_prefix is None:
        num_prefix = getattr(model, "num_tokens", None)  # PiT: 1, or 2 when distilled
    if num_prefix is None:  # a class token, or one per branch (CrossViT's cls_token_0, cls_token_1)
        num_prefix = int(getattr(model, "cls_token", None) is not None or any(
            re.fullmatch(r"cls_token_\d+", n) for n, _ in model.named_parameters(recurse=False)))
    patch_embed = getattr(model, "patch_embed", None)
    grid = None
    if getattr(patch_embed, "grid_size", None) is not None:
        grid = tuple(int(g) for g in patch_embed.grid_size)
    elif getattr(patch_embed, "height", None) is not None:  # PiT's ConvEmbedding
        grid = (int(patch_embed.height), int(patch_embed.width))
    patch = getattr(patch_embed, "patch_size", None)
    patch = (patch, patch) if isinstance(patch, int) else (tuple(int(p) for p in patch) if patch is not None else None)
    if getattr(patch_embed, "height", None) is not None:
        patch = None  # PiT's overlapping conv embedding: the grid is not image size / patch size
    return int(num_prefix), grid, patch  # type: ignore[return-value]


def _pit_stage_grid(stage: str, grid: tuple[int, int] | None) -> tuple[int, int] | None:
    """PiT halves the grid between stages (conv, kernel 3, stride 2, padding 1: ceil(n / 2))."""
    if grid is None or not stage.startswith("transformers."):
        return grid
    for _ in range(int(stage.split(".")[1])):
        grid = (math.ceil(grid[0] / 2), math.ceil(grid[1] / 2))
    return grid


def _is_pit(model: nn.Module) -> bool:
    """PiT: an overlapping convolutional patch embedding (``patch_embed.conv``, its output map's ``height`` kept)."""
    patch_embed = getattr(model, "patch_embed", None)
    return getattr(patch_embed, "height", None) is not None and isinstance(getattr(patch_embed, "conv", None), nn.Conv2d)


def _pit_stage(stage: str) -> int:
    return int(stage.split(".")[1]) if stage.startswith("transformers.") else 0


def _pit_poolings(model: nn.Module, stage: str) -> tuple[tuple[str, nn.Module], ...]:
    """(path, pooling) of each PiT stage's pooling up to ``stage``'s: on the route from the image to its tokens,
    after the patch embedding (:func:`_pixel_route`), so each is checked when masks are read onto them
    (:func:`~qkhooks.models.unsupported.refuse_moved_pixels`, with the stage holding it), by a path a wrapper
    prefixes. Empty for other models."""
    if not _is_pit(model):
        return ()
    return tuple((f"transformers.{i}.pool", model.transformers[i].pool) for i in range(1, _pit_stage(stage) + 1))


def _pit_pixel_convs(model: nn.Module, stage: str) -> Callable[[], list] | None:
    """PiT's convolutions from the image to a stage's tokens, read as called: the overlapping patch embedding, then
    each stage's pooling before its blocks (kernel 3, stride 2, padding 1), so masks are read from the pixels each
    token's patch covers. What may make them read others (a hook someone else put on one, a forward replaced, circular
    padding) is refused before, on the site's pixel_route (:func:`_pit_poolings`)."""
    if not _is_pit(model):
        return None
    embed, index = model.patch_embed.conv, _pit_stage(stage)
    owner = weakref.ref(model)  # the model's sites are cached weakly keyed by it (capture._SITES): no strong reference

    def convs() -> list:
        pools = [owner().transformers[i].pool for i in range(1, index + 1)]  # type: ignore[union-attr]
        chain = [embed] + [pool.conv for pool in pools]
        for conv in chain:
            if tuple(conv.dilation) != (1, 1) or not isinstance(conv.padding, tuple):
                raise QKHooksError(f"PiT's convolution {conv} is dilated or pads by a rule ({conv.padding!r}); "
                                   "which pixels its tokens read is not modelled, so masks cannot be read onto them.")
        return [(tuple(c.kernel_size), tuple(c.stride), tuple(c.padding)) for c in chain]

    return convs


def _patch_grid_source(model: nn.Module) -> tuple[nn.Module, Callable[[tuple, dict], tuple[int, int]]] | None:
    """zoo12: (patch embed, the grid it makes of the call's image) where the patch embed takes other sizes than its
    own (``strict_img_size=False``, e.g. ``dynamic_img_size``): an 8x2 grid then has the native 4x4 grid's token count,
    and only the call tells them apart. Read with the patch embed's own ``dynamic_feat_size`` (its padding rule)."""
    patch_embed = getattr(model, "patch_embed", None)
    if getattr(patch_embed, "strict_img_size", True) or not callable(getattr(patch_embed, "dynamic_feat_size", None)):
        return None

    def read(args: tuple, kwargs: dict) -> tuple[int, int]:
        image = args[0] if args else kwargs["x"]
        return patch_embed.dynamic_feat_size(tuple(int(v) for v in image.shape[-2:]))

    return patch_embed, read


# timm's modules from the image to the first block's tokens, by name at the model's top level (ViT's patch embedding
# and what it runs on the tokens before its blocks; the convolutional stem of LeViT-like models)
_PIXEL_ROUTE = ("stem", "patch_embed", "pos_drop", "patch_drop", "norm_pre")


def _pixel_route(model: nn.Module) -> tuple[tuple[str, nn.Module], ...]:
    """The modules of ``_PIXEL_ROUTE`` the model has, checked when masks are read onto its tokens."""
    return tuple((name, getattr(model, name)) for name in _PIXEL_ROUTE if isinstance(getattr(model, name, None), nn.Module))


def _stage_of(modules: dict[str, nn.Module], block_path: str) -> str:
    """The container the block sits in (its sites share a token grid). A branch of timm's ``ParallelThingsBlock``
    (``blocks.3.attns.0``: the 18x2 ViTs run each block's attentions side by side on the block's input) sits in that
    block, so its stage is the block's container (``blocks``), not the block's branch list (``blocks.3.attns``, one
    per block, which made every block its own stage and refused rows across them)."""
    container = block_path.rpartition(".")[0]
    block = container.rpartition(".")[0]
    if type(modules.get(block)).__name__ == "ParallelThingsBlock":
        return block.rpartition(".")[0]
    return container


# timm's feature nets (``features_only``) that keep the whole network as one child, by class: the child's name
_FEATURE_NET_CHILD = {"FeatureGetterNet": "model", "FeatureHookNet": "body"}


def feature_net_network(model: nn.Module) -> tuple[str, nn.Module] | None:
    """(path, network) where ``model`` is a timm feature net keeping the whole network as one child (the getter net;
    the hook net unless it rewrote the network). The network's class token and patch embedding give the sites'
    prefix count and grid: the feature net around it has neither, and read as the model it said 0 and none.
    Refused where what the tokens are read off counts no prefix token but holds a network that counts some
    (:func:`_refuse_hidden_network`)."""
    child = _FEATURE_NET_CHILD.get(type(model).__name__)
    if not child or not _is_timm_model(model):
        return None
    network = getattr(model, child, None)
    if not isinstance(network, nn.Module) or list(model.children()) != [network]:
        _refuse_hidden_network(model, type(model).__name__, "")
        return None  # a rewritten network (``flatten_sequential``): its modules are the feature net's own children
    _refuse_hidden_network(network, type(model).__name__, f"{child}.")
    return child, network


def _refuse_hidden_network(source: nn.Module, feature_net: str, prefix: str) -> None:
    """Refuse a timm feature net whose sites' prefix count would be read off ``source`` (the network it keeps whole,
    or the feature net itself where it rewrote the model), which counts no prefix token, while a module inside it
    counts some (:func:`_geometry`: a class token, register tokens, PiT's tokens; a timm network inside the user's
    model the feature net was built on, beside a head): they would be taken for patches. (A patch embedding inside a
    block, NextViT's, is no network; round 50 looked for a class token alone, and took a ViT of register tokens.)"""
    if _geometry(source)[0]:
        return
    for path, module in source.named_modules():
        if path and _geometry(module)[0]:
            raise QKHooksError(
                f"{feature_net} (timm's feature net) holds {prefix + path!r} ({type(module).__name__}), a network with "
                f"{_geometry(module)[0]} prefix token(s) of its own (class or register tokens), inside "
                f"{type(source).__name__}, which counts no prefix token: qkhooks reads a feature net's tokens off the "
                "network it keeps as its only child, so here those tokens would be taken for patches. Record "
                f"model.{prefix + path} itself, or build the feature net on that timm network alone "
                "(timm.create_model(..., features_only=True)).")


def with_path_prefix(sites: list[AttentionSite], prefix: str) -> list[AttentionSite]:
    """Sites found on a network, their paths prefixed with where it sits in the model the user holds, so layer names
    are the ones ``model.named_modules()`` shows."""
    return [dataclasses.replace(site, path=f"{prefix}.{site.path}", block_path=f"{prefix}.{site.block_path}",
                                stage=f"{prefix}.{site.stage}" if site.stage else prefix,
                                pixel_route=tuple((f"{prefix}.{path}", module) for path, module in site.pixel_route))
            for site in sites]


def find(model: nn.Module) -> list[AttentionSite]:
    """Sites for every modelled attention of a timm model, in forward order; refuses anything unmodelled."""
    wrapped = feature_net_network(model)
    if wrapped is not None:
        return with_path_prefix(find(wrapped[1]), wrapped[0])
    modules = dict(model.named_modules())
    num_prefix, grid, patch = _geometry(model)
    patch_grid = _patch_grid_source(model) if patch is not None else None
    pixel_route = _pixel_route(model)
    sites = []
    for name, attn in modules.items():
        kind = _kind(attn)
        if kind is None or "." not in name:
            continue
        block_path = name.rpartition(".")[0]
        stage = _stage_of(modules, block_path)
        extra = EXTRA_FORMS.get(kind)
        site_grid = _pit_stage_grid(stage, grid)
        heads = int(getattr(attn, "num_heads", 1))  # single-head modules (SHViT's SHSA) have no num_heads
        grouped = int(getattr(attn, "num_kv_heads", heads)) != heads
        rotary = kind in ("EvaAttention", "AttentionRope")
        if kind in ("ClassAttn", "TalkingHeadAttn"):  # CaiT: its own query tokens, prefix and head mixing
            fields = cait_site_fields(attn, kind)
        else:
            qk_linear, qk_modules = extra.qk_reader(attn) if extra else _qk_reader(attn, kind)
            if grouped:  # each query head against its group's key head: modes and maps from the tokens x
                qk_linear, qk_modules = grouped_query_reader(name, attn, qk_linear), ()
            fields = dict(qk_linear=qk_linear, qk_modules=qk_modules, num_prefix_tokens=num_prefix,
                          head_dim=int(qk_linear()[0].shape[0]) // 2 // heads)
        sites.append(
            AttentionSite(
                layer=len(sites),
                path=name,
                module=attn,
                block_path=block_path,
                block=modules[block_path],
                num_heads=heads,
                dim=int(fields["qk_linear"]()[0].shape[1]),
                scale=float(attn.scale) if hasattr(attn, "scale") else 1.0,  # cosine attention: set by its form
                scale_attribute="scale" if hasattr(attn, "scale") else None,
                grid=site_grid,
                family={"Attention": "timm-vit", "EvaAttention": "timm-eva", "AttentionRope": "timm-eva"}.get(kind, "timm-cait"),
                input_name="x",
                block_input_name="x",
                patch_size=patch if site_grid == grid else None,
                grid_source=patch_grid if site_grid == grid else None,
                stage=stage,
                pixel_convs=_pit_pixel_convs(model, stage),
                pixel_route=pixel_route + _pit_poolings(model, stage),
                rope_input="rope" if rotary else None,
                rope_apply=_eva_rotation(attn) if rotary else None,
                rope_layout="half" if getattr(attn, "rotate_half", False) else "interleaved",
                qk_norm=qk_norm_of(name, attn),
                **fields,
            )
        )
        if extra:
            sites[-1] = extra.finish(sites[-1], attn)
            if sites[-1] is None:  # zoo-davit: an instance its form leaves to unsupported.py (GCViT's global blocks)
                sites.pop()
    for finish in SITE_FINISHERS:
        sites = [finish(model, site) for site in sites]
    refuse_uncovered(model, sites)
    return sites


def matches(model: nn.Module) -> bool:
    """A timm model with at least one attention module whose forward qkhooks models."""
    return _is_timm_model(model) and any(_kind(m) is not None for m in model.modules())


register_adapter(
    "timm-vit",
    matches,
    find,
    families="timm VisionTransformer and variants: ViT, DeiT (incl. distilled), DINO, CLIP, DINOv2 (incl. registers), "
    "parallel blocks, PiT, q/k-norm, EVA / EVA-02 / DINOv3 / vit_*_rope_* / PE (RoPE), CaiT (class attention, talking heads)",
    first=False,
)
