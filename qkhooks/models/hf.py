"""Adapter for Hugging Face vision transformers: ViT, DeiT (incl. distilled), CLIP and SigLIP vision, DINOv2
(incl. registers), BLIP / BLIP-2 / InstructBLIP vision (fused ``qkv``), plain VitDet, multi-stage encoders
(GroupViT), under transformers 4.x module names (``query``/``key``) and 5.x (``q_proj``/``k_proj``).

A module is taken only when its children are the q/k/v projections, dropout and output projection: any
other child (a relative-position table, a spatial-reduction conv, a norm) is an extra term the maps would
miss, so the model is refused naming it. Masks, biases and rotary tables handed to the module at run time
are refused by the site (:meth:`AttentionSite.refuse_unmodelled_inputs`).

The hooked module is the one that owns the q and k Linear layers; its ``hidden_states`` argument is the
tensor entering W_q/W_k (after ``layernorm_before`` / ``layer_norm1``). Prefix tokens are read off the
embeddings module (a CLS token, a distillation token, register tokens), so new variants need no table.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from typing import Callable

import torch
from torch import nn

from qkhooks.errors import QKHooksError
from qkhooks.models.base import AttentionSite, as_pair, conv_output_size, leading_rows, recast, register_adapter, stacked_rows
from qkhooks.models.qknorm import qk_norm_modelled, qk_norm_of
from qkhooks.models.timm import grouped_query_reader
from qkhooks.models.unsupported import left_out_by_design, refuse_uncovered

_LAYER = re.compile(r"^(?P<block>(?:.*\.)?(?:layers?|blocks?)\.(?P<idx>\d+))\.")
# zoo11-build: attention that runs outside the numbered layers: MiniCPM-V's window-attention merger (its packed
# attention on 2x2-token windows, between two encoder layers); its index comes from the forward order like every site's
_OUTSIDE_LAYERS = re.compile(r"^(?P<block>(?:.*\.)?vit_merger)(?P<idx>)\.self_attn$")
_QK_NAMES = (("q_proj", "k_proj"), ("query", "key"))
# Children an attention module may own besides its q/k/v projections without changing the logits.
_HARMLESS_CHILDREN = {"q_proj", "k_proj", "v_proj", "query", "key", "value", "qkv", "dropout", "attn_dropout",
                      "attention_dropout", "out_proj", "o_proj", "proj", "projection", "dense", "output",
                      "projection_layer", "projection_dropout"}
# Attention classes handed (cos, sin) as position_embeddings -> (their module's rotation function, how the class
# calls it on (B, H, N, d_k) q and k). All rotate halves (pairs (i, i + d_k/2)); the zoo test checks each against
# the model's eager attention.
_ROPE_FUNCTIONS: dict[str, tuple[str, Callable]] = {
    "DINOv3ViTAttention": ("apply_rotary_pos_emb", lambda apply, q, k, cos, sin: apply(q, k, cos, sin)),
    # Pixtral: (N, d_k) tables of the packed sequence of every image's patches (2-D axial, per-image grids)
    "PixtralAttention": ("apply_rotary_pos_emb", lambda apply, q, k, cos, sin: apply(q, k, cos, sin, unsqueeze_dim=0)),
    # MLCD: (N, d_k) tables, the class token turned by its own learned angle; the function takes (B, N, H, d_k)
    "MLCDAttention": ("apply_rotary_pos_emb_vision", lambda apply, q, k, cos, sin: tuple(
        t.transpose(1, 2) for t in apply(q.transpose(1, 2), k.transpose(1, 2), cos[None].float(), sin[None].float()))),
    # zoo-hfsmall: EoMT on DINOv3 (DINOv3's rotation of the patch tokens only; the object queries and the prefix
    # tokens before them stay unrotated, the mask of the last blocks enters as attention_mask)
    "EomtDinov3Attention": ("apply_rotary_pos_emb", lambda apply, q, k, cos, sin: apply(q, k, cos, sin)),
    # zoo11-build: Sapiens2 (DINOv3's rotation of the patch tokens, after its per-head q/k RMSNorm; grouped-query keys)
    "Sapiens2Attention": ("apply_rotary_pos_emb", lambda apply, q, k, cos, sin: apply(q, k, cos, sin)),
}
# Attention classes whose token layout qkhooks does not model although their logits are plain.
_FOLDED_TOKENS = {
}
_TEXT = re.compile(r"(^|\.)text_(model|encoder)(\.|$)")
# Attention forms beyond plain q·k that their own modules teach this adapter (reduced_keys.py, windows.py):
# class name -> (the children that form models, ``(site, module, modules) -> the site for that form``).
EXTRA_FORMS: dict[str, tuple[frozenset[str], Callable[[AttentionSite, nn.Module, dict[str, nn.Module]], AttentionSite]]] = {}


def _linear_like(module: object) -> bool:
    """An nn.Linear, or a module standing in for one: a 2-D ``weight`` of (out_features, in_features), as peft's LoRA
    layer exposes its base layer's. Taken as a q/k projection so that the check of what it computes
    (:func:`qkhooks.models.unsupported.refuse_unplain_qk`) names it, rather than the model being refused as unknown."""
    if isinstance(module, nn.Linear):
        return True
    weight = getattr(module, "weight", None) if isinstance(module, nn.Module) else None
    return isinstance(weight, torch.Tensor) and tuple(weight.shape) == (getattr(module, "out_features", None),
                                                                        getattr(module, "in_features", None))


def _qk_children(module: nn.Module) -> tuple[nn.Linear, ...] | None:
    """(q, k) Linear children, or (qkv,) for a fused projection (q, then k, then v along the outputs)."""
    for q_name, k_name in _QK_NAMES:
        q, k = getattr(module, q_name, None), getattr(module, k_name, None)
        if _linear_like(q) and _linear_like(k):
            return q, k
    qkv = getattr(module, "qkv", None)
    # zoo-packed: a grouped-query qkv of q_dim + 2·kv_dim rows (Exaone 4.5), which its EXTRA_FORMS entry reads
    grouped = type(module).__name__ in EXTRA_FORMS and hasattr(module, "kv_dim")
    if _linear_like(qkv) and (qkv.out_features % 3 == 0 or grouped):
        return (qkv,)
    return None


def _refuse_unmodelled(name: str, module: nn.Module) -> None:
    """Refuse an attention module that owns something besides projections and dropout."""
    cls = type(module).__name__
    if cls in _FOLDED_TOKENS:
        raise QKHooksError(f"unsupported attention in {name!r} ({cls}): {_FOLDED_TOKENS[cls]}.")
    modelled = set(_HARMLESS_CHILDREN | EXTRA_FORMS.get(cls, (frozenset(),))[0])
    modelled |= {"q_norm", "k_norm"} if qk_norm_modelled(module) else set()  # applied with the model's own modules
    modelled |= {"relative_position_bias"} if _builds_own_bias(module) else set()
    extra = [n for n, child in module.named_children() if n not in modelled and not isinstance(child, nn.Identity)]
    extra += [n for n, _ in module.named_parameters(recurse=False) if n not in modelled]  # a table or scale in the logits
    if extra:
        raise QKHooksError(
            f"unsupported attention in {name!r} ({cls}): it owns {', '.join(repr(e) for e in extra)} besides its "
            "q/k/v projections (a position table, a spatial reduction, a norm...), a term qkhooks does not model "
            "for this family, so maps and modes taken from q and k alone would not be the model's."
        )


def _is_transformers_model(model: nn.Module) -> bool:
    return type(model).__module__.startswith("transformers.")


def _attention_modules(model: nn.Module):
    aside = tuple(p + "." for p in left_out_by_design(model))  # zoo-runs: decoders of object queries, left out by design
    for name, module in model.named_modules():
        if _TEXT.search(name) or _qk_children(module) is None or name.startswith(aside):
            continue
        match = _LAYER.match(name) or _OUTSIDE_LAYERS.match(name)
        if match and name != match["block"]:
            yield name, module, match


def matches(model: nn.Module) -> bool:
    """A transformers model with per-layer attention modules owning q/k Linear layers."""
    return _is_transformers_model(model) and any(True for _ in _attention_modules(model))


def _vision_config(model: nn.Module):
    config = getattr(model, "config", None)
    return getattr(config, "vision_config", None) or config


def _embeddings(model: nn.Module) -> nn.Module | None:
    for name, module in model.named_modules():
        if not _TEXT.search(name) and name.split(".")[-1] == "embeddings":
            return module
    return None


def _pixel_route(model: nn.Module) -> tuple[tuple[str, nn.Module], ...]:
    """The embeddings module (patch projection, class token, position embeddings) by its path in the model: the route
    from the image to the first layer's tokens, checked when masks are read onto them. Empty where there is none."""
    emb = _embeddings(model)
    found = next(((name, module) for name, module in model.named_modules() if emb is not None and module is emb), None)
    return () if found is None else (found,)


def _patch_grid_source(model: nn.Module) -> tuple[nn.Module, Callable[[tuple, dict], tuple[int, int]]] | None:
    """zoo18: (the patch projection, the grid it makes of the call's image). A 2x8 image has the native 4x4 grid's
    token count, and only the call tells them apart (ViT, DeiT, DINOv2, CLIP, SigLIP, BEiT take other sizes). The
    embeddings' one Conv2d lays its output out row by row as the tokens; its own kernel, stride, padding and
    dilation give the grid. None where the embeddings hold no Conv2d or several (a hybrid's CNN stem)."""
    emb = _embeddings(model)
    convs = [m for m in emb.modules() if isinstance(m, nn.Conv2d)] if emb is not None else []
    if len(convs) != 1:
        return None
    conv = convs[0]

    def read(args: tuple, kwargs: dict) -> tuple[int, int]:
        image = args[0] if args else kwargs["input"]
        return tuple(conv_output_size(int(size), conv, axis) for axis, size in enumerate(image.shape[-2:]))  # type: ignore[return-value]

    return conv, read


def num_prefix_tokens(model: nn.Module) -> int:
    """CLS + distillation + register tokens, read off the embeddings module's parameters."""
    emb = _embeddings(model)
    if emb is None:
        return 0
    count = 0
    cls = getattr(emb, "cls_token", None)
    if cls is None:
        cls = getattr(emb, "class_embedding", None)
    for token in (cls, getattr(emb, "distillation_token", None)):
        if token is not None:  # (1, n, D): n tokens (Pixio has 8 CLS tokens); CLIP's (D,) class embedding: one
            count += int(token.shape[-2]) if isinstance(token, torch.Tensor) and token.dim() >= 2 else 1
    registers = getattr(emb, "register_tokens", None)
    if registers is not None:
        count += int(registers.shape[1])
    return count


def config_grid(config) -> tuple[int, int] | None:
    """The patch grid a config's ``image_size`` and ``patch_size`` make (None where either is missing)."""
    size, patch = getattr(config, "image_size", None), getattr(config, "patch_size", None)
    if size is None or patch is None:
        return None
    (rows, cols), (patch_rows, patch_cols) = as_pair(size), as_pair(patch)
    return rows // patch_rows, cols // patch_cols


# (block class, attention attribute) of attention over other tokens than an image's: X-CLIP's message attention
# attends across one video's frames (one message token a frame), so it has no prefix token, grid or patch (review
# r34: 17 frames were read as CLS + a 4x4 grid without a word): FrameTokenSite
_FRAME_ATTENTION = {("XCLIPVisionEncoderLayer", "message_attn")}

# Embeddings that put every image's patch tokens in a random order of their own (random_masking, even keeping all)
_SHUFFLING_EMBEDDINGS = {"transformers.models.vit_mae.modeling_vit_mae.ViTMAEEmbeddings"}


def find(model: nn.Module) -> list[AttentionSite]:
    """Sites for every encoder layer of an HF vision transformer, in layer order."""
    config = _vision_config(model)
    modules = dict(model.named_modules())
    prefix = num_prefix_tokens(model)
    grid = config_grid(config)
    config_patch = getattr(config, "patch_size", None)
    family = f"hf-{getattr(config, 'model_type', 'vit')}"
    patch_grid = _patch_grid_source(model)
    pixel_route = _pixel_route(model)
    embeddings = type(_embeddings(model))
    shuffled = f"{embeddings.__module__}.{embeddings.__qualname__}" in _SHUFFLING_EMBEDDINGS
    text = text_model_type(model)
    sites = []
    for name, module, match in _attention_modules(model):
        if type(module).__module__.startswith("timm."):  # zoo-hfsmall: TimmBackbone wraps a whole timm model
            raise QKHooksError(
                f"unsupported attention in {name!r} ({type(module).__name__}): a timm attention inside a transformers "
                "wrapper (TimmBackbone), whose forms this adapter does not read; record the timm model itself "
                f"(qkhooks.record(model.{name.split('.blocks.')[0]}) or timm.create_model(...)), which the timm adapter takes."
            )
        _refuse_unmodelled(name, module)
        if getattr(modules[match["block"]], "window_size", 0) and type(module).__name__ not in EXTRA_FORMS:
            raise QKHooksError(
                f"unsupported attention in {name!r} ({type(module).__name__}): its block partitions the tokens into "
                f"windows of {modules[match['block']].window_size} (one attention call per window, windows along the "
                "batch axis), which qkhooks does not model for this family yet."
            )
        # zoo12: an encoder nested in another model (DepthPro's DINOv2s) has its own config with its own native grid
        own = getattr(module, "config", None) if grid is None else None
        site_grid, site_patch = (config_grid(own), getattr(own, "patch_size", config_patch)) if own is not None else (grid, config_patch)
        frames = (type(modules[match["block"]]).__name__, name.rpartition(".")[2]) in _FRAME_ATTENTION
        grid_layout = type(module).__name__ == "VitDetAttention"  # takes (B, h, w, d) grids
        qk = _qk_children(module)
        heads = int(
            getattr(module, "num_attention_heads", None)
            or getattr(module, "num_heads", None)
            or getattr(config, "num_attention_heads")
        )
        width = qk[0].out_features // (3 if len(qk) == 1 else 1)
        head_dim = width // heads
        scale = getattr(module, "scaling", None) or getattr(module, "scale", None) or head_dim**-0.5
        qk_linear = leading_rows(qk[0], 2 * width) if len(qk) == 1 else stacked_rows(*qk)
        grouped = len(qk) == 2 and qk[1].out_features != qk[0].out_features  # zoo11-build: grouped-query keys (Sapiens2)
        if grouped:
            qk_linear = grouped_query_reader(name, module, qk_linear, counts=(heads, qk[1].out_features // head_dim))

        sites.append(
            AttentionSite(
                layer=int(match["idx"] or 0),  # numbered in forward order by find_sites
                path=name,
                module=module,
                block_path=match["block"],
                block=modules[match["block"]],
                num_heads=heads,
                head_dim=head_dim,
                dim=qk[0].in_features,
                scale=float(scale),
                num_prefix_tokens=prefix,
                grid=site_grid,
                family=family,
                input_name="hidden_states",
                block_input_name="hidden_states",
                qk_linear=qk_linear,
                patch_size=None if site_patch is None else as_pair(site_patch),
                qk_modules=() if grid_layout or grouped else qk,  # its q/k outputs are grids too: project the tokens
                stage=match["block"].rpartition(".")[0],
                token_layout="grid" if grid_layout else "tokens",
                bias_input=None if grid_layout else "attention_mask",
                rope_input="position_embeddings" if type(module).__name__ in _ROPE_FUNCTIONS else None,
                rope_apply=_rope_reader(module),
                rope_layout="half",  # rotate_half: pairs (i, i + d_k/2)
                qk_norm=qk_norm_of(name, module, per_head=_norm_width(module) == head_dim),
                call_bias=_data2vec_bias(name, module) if _builds_own_bias(module) else None,
                pixel_route=pixel_route,
            )
        )
        if type(module).__name__ in EXTRA_FORMS:
            sites[-1] = EXTRA_FORMS[type(module).__name__][1](sites[-1], module, modules)
        elif frames:
            sites[-1] = recast(sites[-1], FrameTokenSite, grid=None, patch_size=None, num_prefix_tokens=0)
        elif shuffled:
            sites[-1] = recast(sites[-1], ShuffledTokenSite, grid=None, patch_size=None)
        elif text is not None:  # review r40: a text model's tokens are a sentence's, no image grid
            sites[-1] = recast(sites[-1], TextTokenSite, grid=None, patch_size=None)
        elif _after_grouping(modules, match["block"]):
            sites[-1] = recast(sites[-1], SegmentTokenSite, grid=None, patch_size=None)
        elif own is None and patch_grid is not None:  # one global attention over the patch embedding's grid
            sites[-1].grid_source = patch_grid
    _object_queries_are_prefix(model, sites)
    refuse_uncovered(model, sites)
    return sites


@dataclasses.dataclass(eq=False)
class _UngriddedSite(AttentionSite):
    """A layer whose tokens are no positions of the patch grid: every grid asked of it is refused, saying why
    (:meth:`_why`); its maps and modes are exact token by token."""

    def _why(self) -> str:
        raise NotImplementedError

    def grid_for(self, num_tokens: int) -> tuple[int, int]:
        raise QKHooksError(f"layer {self.layer} ({self.path}): {self._why()}")

    def grid_for_image(self, height: int, width: int) -> tuple[int, int]:
        raise QKHooksError(f"layer {self.layer} ({self.path}): {self._why()}")


# transformers models that take token ids but are image models all the same (their own adapter reads them)
_IMAGE_TOKEN_MODELS = frozenset({"imagegpt"})


def text_model_type(model: nn.Module) -> str | None:
    """The ``model_type`` (e.g. ``"bert"``) of a transformers model that reads a sequence of token ids
    (``input_ids``) and no image (no ``pixel_values``), else None: its q/k spectra are exact, but it takes no image, so
    no image run can be recorded of it (review r40: a BertModel given to ``qkhooks record`` was told to load itself
    "with the input size it was built for", or asked for an image processor config)."""
    if not type(model).__module__.startswith("transformers."):
        return None
    try:
        takes = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return None
    model_type = str(getattr(getattr(model, "config", None), "model_type", "") or type(model).__name__)
    if "input_ids" not in takes or any(name.startswith("pixel_values") for name in takes) \
            or model_type in _IMAGE_TOKEN_MODELS:
        return None
    return model_type


def text_model_refusal(model_type: str, what: str = "this model") -> str:
    """Why a text-sequence model (:func:`text_model_type`) cannot be recorded over images, and what works instead."""
    return (f"{what} is a text model ({model_type}): it reads token ids (input_ids), not images, so qkhooks cannot "
            "feed it a dataset's images (no image run file, no image size or preprocessing applies). Its query-key "
            "spectrum needs only the weights: qkhooks.spectrum(model), or `qkhooks spectrum MODEL`; its maps and modes "
            "on your own token ids are recorded live: `with qkhooks.record(model) as run: model(input_ids=ids)`.")


@dataclasses.dataclass(eq=False)
class TextTokenSite(_UngriddedSite):
    """A text model's attention layer (:func:`text_model_type`): exact over its token sequence, live, but no image
    is fed to it, so no run file is made (:meth:`run_file_refusal`) and no grid is read."""

    def _why(self) -> str:
        return f"the tokens are a {self.family.removeprefix('hf-')} text sequence, not an image's patches, so they have no grid"

    def run_file_refusal(self) -> str | None:
        return text_model_refusal(self.family.removeprefix("hf-"))


@dataclasses.dataclass(eq=False)
class ShuffledTokenSite(_UngriddedSite):
    """A ViTMAE encoder layer: its embeddings shuffle every image's patch tokens (``random_masking``, which keeps them
    all at ``mask_ratio=0``, in a random order of its own), so token n is no fixed patch of the grid. Its maps and
    modes are exact in the model's token order; nothing here reads a token as a grid position."""

    TOKENS_ARE_QUERIES_AND_KEYS = True  # shuffled, but every token, one image a row: its geometry (no grid) at once

    def _why(self) -> str:
        return ("ViTMAE shuffles each image's patch tokens (random_masking, even "
                "at mask_ratio=0), so its tokens are in no grid order and no token is a fixed patch; its maps and modes "
                "are exact in the model's own token order. To read tokens as grid patches (rows of the centre patch, "
                "run files, masks), load the same encoder weights into ViTModel (ViTModel.from_pretrained on the MAE "
                "checkpoint), which keeps the patches in raster order.")

    def run_file_refusal(self) -> str | None:
        return self._why()


def _after_grouping(modules: dict[str, nn.Module], block_path: str) -> bool:
    """GroupViT: whether the block's stage comes after a stage that groups the tokens into segments (its
    ``downsample``, a GroupViTTokenAssign): from there on the tokens are segments, not patches."""
    stage_path = block_path.rpartition(".layers.")[0]
    container, _, index = stage_path.rpartition(".")
    if type(modules.get(stage_path)).__name__ != "GroupViTStage" or not index.isdigit():
        return False
    return any(getattr(modules.get(f"{container}.{i}"), "downsample", None) is not None for i in range(int(index)))


@dataclasses.dataclass(eq=False)
class SegmentTokenSite(_UngriddedSite):
    """A GroupViT layer after a grouping stage: its tokens are segments (each a soft group of patches the grouping
    block assigned, then the next stage's group tokens), not patches, so no token is a position of the patch grid, even
    where their count equals the grid's. Its maps and modes are exact, token by token."""

    TOKENS_ARE_QUERIES_AND_KEYS = True  # segments, one image a row: its geometry (no grid) is read as the call begins

    def _why(self) -> str:
        return ("GroupViT's tokens after a grouping stage are segments (soft groups of patches), not patches, so no "
                "token is a position of the patch grid; its maps and modes are exact token by token.")


@dataclasses.dataclass(eq=False)
class FrameTokenSite(_UngriddedSite):
    """X-CLIP's message attention: one message token per frame of a video, attending across the video's frames (a
    call's batch axis holds videos, not images). No token is a CLS token or a patch, even where the frame count equals
    CLS + the grid's (review r34: 17 frames were read as CLS + a 4x4 grid). Its maps and modes are exact, frame by
    frame."""

    def _why(self) -> str:
        return ("X-CLIP's message attention attends across a video's frames (one message token a frame), so its tokens "
                "are frames, not an image's CLS and patches; its maps and modes are exact frame by frame (rows: give "
                "query_tokens as frame indices).")

    def run_file_refusal(self) -> str | None:
        return (f"{self._why()} A run file holds one row per image, and this layer's batch axis holds videos; record "
                "the other layers (--layers) into the file, and this one live.")


def _object_queries_are_prefix(model: nn.Module, sites: list[AttentionSite]) -> None:
    """zoo-hfsmall: EoMT (ViT and DINOv3) prepends its num_queries object queries to the tokens of its last num_blocks
    layers: there they are prefix tokens too, so no query is ever read as a patch of the grid."""
    config = getattr(model, "config", None)
    queries, blocks = getattr(config, "num_queries", None), getattr(config, "num_blocks", None)
    if not (type(model).__name__.startswith("Eomt") and isinstance(queries, int) and isinstance(blocks, int)):
        return
    layers = int(config.num_hidden_layers)
    for site in sites:
        if int(_LAYER.match(site.path)["idx"]) >= layers - blocks:
            site.num_prefix_tokens += queries


_DATA2VEC_ARGUMENTS = ("hidden_states", "output_attentions", "relative_position_bias", "interpolate_pos_encoding", "resolution")


def _data2vec_bias(path: str, module: nn.Module):
    """Data2Vec vision's self-attention adds its own relative-position table (built from the call's resolution) and
    the shared table the layer hands it as its third argument: rebuild that sum from the call, with the module's
    own table module, so the maps add the very term the model adds."""
    def bias(args: tuple, kwargs: dict) -> torch.Tensor | None:
        call = dict(zip(_DATA2VEC_ARGUMENTS, args), **kwargs)
        unknown = sorted(set(call) - set(_DATA2VEC_ARGUMENTS)) + [f"argument {i}" for i in range(len(_DATA2VEC_ARGUMENTS), len(args))]
        if unknown:
            raise QKHooksError(f"unsupported attention in {path!r} ({type(module).__name__}): the model passes {unknown}, "
                               "which the Data2Vec adapter does not model.")
        total = None
        if module.has_relative_position_bias:
            patch = as_pair(module.config.patch_size)
            height, width = call["resolution"]
            total = module.relative_position_bias((height // patch[0], width // patch[1]),
                                                  bool(call.get("interpolate_pos_encoding", False)),
                                                  dim_size=call["hidden_states"].shape[1])
        shared = call.get("relative_position_bias")
        if shared is not None:
            total = shared if total is None else total + shared
        return None if total is None else total.detach()

    return bias


def _builds_own_bias(module: nn.Module) -> bool:
    """Data2Vec vision's eager and SDPA self-attention, whose in-module relative-position table qkhooks rebuilds."""
    try:
        from transformers.models.data2vec import modeling_data2vec_vision as d2v
    except ImportError:  # pragma: no cover - a transformers without Data2Vec
        return False
    return type(module).forward in (d2v.Data2VecVisionSelfAttention.forward, d2v.Data2VecVisionSdpaSelfAttention.forward)


def _norm_width(module: nn.Module) -> int | None:
    """How many dimensions the q norm acts on: one head's d_k, or the whole width (InternVL)."""
    weight = getattr(getattr(module, "q_norm", None), "weight", None)
    return None if weight is None else int(weight.shape[-1])


def _rope_reader(module: nn.Module):
    """The model's own rotation for attention classes whose rotary convention qkhooks has checked (the zoo
    test compares the maps with the model's eager attention); other rotary models are refused at run time."""
    entry = _ROPE_FUNCTIONS.get(type(module).__name__)
    if entry is None:
        return None
    import sys

    name, call = entry
    apply = getattr(sys.modules[type(module).__module__], name)

    def rotate(q: torch.Tensor, k: torch.Tensor, tables):
        cos, sin = tables
        return call(apply, q, k, cos, sin)

    return rotate


register_adapter(
    "hf-vit",
    matches,
    find,
    families="Hugging Face ViT, DeiT (incl. distilled), CLIP vision, SigLIP vision, DINOv2 (incl. registers), "
    "BLIP / BLIP-2 / InstructBLIP vision, GroupViT; transformers 4.x and 5.x module names",
    first=False,
)
