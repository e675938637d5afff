"""Adapter for the encoders of DETR-family detectors (HF ``DetrModel``, ``ConditionalDetrModel``, ``DabDetrModel``,
``TableTransformerModel`` and their detection heads).

Their encoder self-attention adds a position embedding to the tokens entering W_q and W_k, not to those entering
W_v: q = W_q (x + p) + b_q, k = W_k (x + p) + b_k. So the tokens the bilinear form acts on are x + p, and the site
takes exactly those (:class:`PositionedSite`): modes project x + p, maps are rebuilt from them and equal the model's.
The site's ``tokens_entering_qk`` says so. The decoder (object queries attending to each other and to the image
tokens) is not self-attention of the image tokens and is left out by design, like pooling heads; everything
attention-like in the encoder must be a modelled site, else the model is refused naming it.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from torch import nn

from qkhooks.errors import QKHooksError
from qkhooks.models.base import AttentionSite, register_adapter, stacked_rows
from qkhooks.models.unsupported import LEFT_OUT_BY_DESIGN, MODELLED_FORMS, attention_like

# encoder attention class (module.Class) -> the keyword under which its layer hands it the position embedding
_POSITIONED = {
    "transformers.models.detr.modeling_detr.DetrSelfAttention": "position_embeddings",
    "transformers.models.conditional_detr.modeling_conditional_detr.ConditionalDetrSelfAttention": "position_embeddings",
    "transformers.models.dab_detr.modeling_dab_detr.DetrAttention": "object_queries",
    "transformers.models.table_transformer.modeling_table_transformer.TableTransformerAttention": "object_queries",
}
MODELLED_FORMS.update(_POSITIONED)
# Segmentation models whose image encoder is a supported ViT (HF Swin / MaskFormerSwin, taken by the HF adapter):
# their decoders run attention of learned object queries (self-attention among the queries, cross-attention to the
# pixel features) and, in Mask2Former, multi-scale deformable attention (sampled offsets, no q·k) in the pixel
# decoder: not self-attention of the image tokens, so left out by design and named.
_OBJECT_QUERIES = ("attention of learned object queries (among themselves and over the pixel features), not "
                   "self-attention of the image tokens: left out by design")
_DEFORMABLE_PIXEL_DECODER = ("the pixel decoder's multi-scale deformable attention (weights from a linear layer of the "
                             "query at sampled offsets, no softmax of q·k over the tokens): left out by design")
LEFT_OUT_BY_DESIGN.update({
    "transformers.models.mask2former.modeling_mask2former": [
        (r"(^|\.)transformer_module$", _OBJECT_QUERIES),
        (r"(^|\.)pixel_level_module\.decoder$", _DEFORMABLE_PIXEL_DECODER),
    ],
    "transformers.models.maskformer.modeling_maskformer": [(r"(^|\.)transformer_module$", _OBJECT_QUERIES)],
    # zoo-hfsmall: OneFormer, as Mask2Former, plus its text mapper (task text tokens, built for training only)
    "transformers.models.oneformer.modeling_oneformer": [
        (r"(^|\.)transformer_module$", _OBJECT_QUERIES),
        (r"(^|\.)pixel_level_module\.decoder$", _DEFORMABLE_PIXEL_DECODER),
        (r"(^|\.)text_mapper$", "attention over the task text's tokens (the text mapper), not the vision stack: left out "
         "by design"),
    ],
})
_ENCODER_LAYER = re.compile(r"^(?P<block>(?:.*\.)?encoder\.layers\.\d+)\.self_attn$")
_ENCODER = re.compile(r"(^|\.)encoder$")


@dataclasses.dataclass(eq=False)
class PositionedSite(AttentionSite):
    """A site whose module adds a position embedding (keyword ``position_input``) to its tokens before W_q and W_k
    (not W_v): the tokens it hands on as entering W_q/W_k are x + p, those the bilinear form acts on."""

    position_input: str = "position_embeddings"
    tokens_entering_qk: str = "the layer's tokens plus its position embedding (x + p), as the model feeds W_q and W_k"

    def refuse_unmodelled_inputs(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        super().refuse_unmodelled_inputs(args, {k: v for k, v in kwargs.items() if k != self.position_input})

    def hidden_states(self, args: tuple[Any, ...], kwargs: dict[str, Any], block: bool = False) -> Any:
        if block:
            raise QKHooksError(f"{self.path}: the position embedding is added inside the attention, so the block's "
                               "input is not what enters W_q/W_k; record it with input='normed' (x + p).")
        x = super().hidden_states(args, kwargs)
        position = kwargs.get(self.position_input)
        return x if position is None else x + position


def _qualified(module: nn.Module) -> str:
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


def find(model: nn.Module) -> list[AttentionSite]:
    """One site per encoder self-attention, in layer order; the decoder is left out by design."""
    config = getattr(model, "config", None)
    sites: list[AttentionSite] = []
    encoders = [name for name, _ in model.named_modules() if _ENCODER.search(name)]
    projection = next((m for n, m in model.named_modules() if n.rpartition(".")[2] == "input_projection"), None)
    # zoo12: the encoder's tokens are the backbone map entering the 1x1 input_projection, flattened row by row
    source = None if projection is None else (projection, lambda args, kwargs: tuple(args[0].shape[-2:]))
    for name, module in model.named_modules():
        match = _ENCODER_LAYER.match(name)
        if match is None:
            continue
        position = _POSITIONED.get(_qualified(module))
        if position is None:
            raise QKHooksError(f"unsupported attention in {name!r} ({type(module).__name__}): an encoder attention of a "
                               "DETR-family model whose class the adapter has not checked.")
        q, k = module.q_proj, module.k_proj
        heads = int(getattr(module, "num_heads", 0) or config.encoder_attention_heads)
        sites.append(PositionedSite(
            layer=len(sites), path=name, module=module, block_path=match["block"],
            block=model.get_submodule(match["block"]), num_heads=heads, head_dim=q.out_features // heads,
            dim=q.in_features, scale=float(module.scaling), num_prefix_tokens=0, grid=None,
            family=f"hf-{getattr(config, 'model_type', 'detr')}-encoder", input_name="hidden_states",
            qk_linear=stacked_rows(q, k), qk_modules=(q, k), stage=match["block"].rpartition(".")[0],
            bias_input="attention_mask", position_input=position, grid_source=source,
        ))
    taken = {s.path for s in sites}
    for encoder in encoders:  # anything else attention-like in an encoder refuses the model
        for inner, module in attention_like(model.get_submodule(encoder)):
            path = f"{encoder}.{inner}" if inner else encoder
            if path not in taken and not any(path.startswith(t + ".") for t in taken):
                raise QKHooksError(f"unsupported attention in {path!r} ({type(module).__name__}): an attention of a "
                                   "DETR-family encoder the adapter does not model.")
    return sites


def matches(model: nn.Module) -> bool:
    """A transformers DETR-family model with a modelled encoder self-attention."""
    return type(model).__module__.startswith("transformers.") and any(
        _ENCODER_LAYER.match(name) and _qualified(m) in _POSITIONED for name, m in model.named_modules())


register_adapter("hf-detr-encoder", matches, find, families="Hugging Face DETR, Conditional DETR, DAB-DETR, Table "
                 "Transformer: the encoder's self-attention over image tokens + position embedding (decoder left out)")
