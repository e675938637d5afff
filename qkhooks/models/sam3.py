"""SAM3's image encoder (HF ``Sam3VisionModel``): refused with its precise reason until modelled.

Its ViT rotates q and k by 2-D axial RoPE in interleaved pairs (``rotate_pairwise``: dims (2i, 2i+1)), on NHWC tokens
that its windowed blocks have folded into the batch axis (one call per window of the zero-padded grid) and its global
blocks pass whole. The HF adapter's rotations pair halves (i, i + d_k/2) and its windows are ViTDet's relative-position
windows, so neither reading would be the model's.
"""

from __future__ import annotations

from qkhooks.models.unsupported import UNMODELLED_FORMS

UNMODELLED_FORMS.update({
    "transformers.models.sam3.modeling_sam3.Sam3ViTRoPEAttention": "SAM3's ViT attention: 2-D axial RoPE on interleaved "
    "pairs (rotate_pairwise) of NHWC tokens, windows of the padded grid folded into the batch axis in its windowed "
    "blocks; the HF adapter rotates halves and does not read these windows, so it is not modelled yet",
})
