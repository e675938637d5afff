"""Whole vision-language models whose vision tower is a ViT the HF adapter records (AyaVision, Cohere2Vision and
Granite4Vision on SigLIP / CLIP towers): the tower's attention is recorded, the language model is left out by design.

The language model runs causal attention over text and image tokens together, not self-attention of the image
tokens; Granite4Vision's Q-Former runs learned queries over the image features. Both are named as left out (never
silently), as the decoders of segmentation models are (:mod:`qkhooks.models.detr`).
"""

from __future__ import annotations

from qkhooks.models.unsupported import LEFT_OUT_BY_DESIGN

_LANGUAGE_MODEL = (r"(^|\.)language_model$", "the language model: causal attention over the text and image tokens "
                   "together, not self-attention of the image tokens: left out by design (the vision tower is recorded)")
_QFORMER = (r"(^|\.)(qformer|query_former)s?$", "the Q-Former: learned queries attending over the image features, not "
            "self-attention of the image tokens: left out by design")

LEFT_OUT_BY_DESIGN.update({
    "transformers.models.aya_vision.modeling_aya_vision": [_LANGUAGE_MODEL],
    "transformers.models.cohere2_vision.modeling_cohere2_vision": [_LANGUAGE_MODEL],
    "transformers.models.granite4_vision.modeling_granite4_vision": [_LANGUAGE_MODEL, _QFORMER],
})
