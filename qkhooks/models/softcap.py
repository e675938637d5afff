"""VideoPrism (HF ``VideoPrismVisionModel``): soft-capped logits and a factorised video encoder, exactly (METHODS.md C).

**Soft-cap.** Each attention squashes its scaled logits before the softmax, ``c · tanh(scale · q·k / c)`` with
c = ``attn_logit_softcapping`` (the module's own setting; None: no cap), then adds the mask. Maps are rebuilt
with that very cap. The cap is a monotone squash of each logit, so it keeps each row's order of keys but not the
differences between logits: the **modes describe the logits before the cap** (Σ σ_n (x·u_n)(x·v_n) = scale · q·k,
biases folded in with ``augmented=True``), exact for those, and say so (``content_only()``); no mode rebuilds the
capped logits. Rows compute every key (no "constant per row" shortcut survives the cap).

**Factorised encoder** (ViViT's "model 2"): the spatial layers (``spatial_layers.i``) run a ViT over each frame's
patches, the frames along the batch axis (B·T rows, frame t of clip b at row b·T + t; tokens: the h x w patches of
the frame, no class token, grid (h, w)); then the temporal layers (``temporal_layers.i``) run over the frames of each
patch, the patches along the batch axis (B·P rows, patch p of clip b at row b·P + p; tokens: the T frames in time
order, grid (1, T): one row of frames). Layers are numbered in forward order, spatial first. Maps, rows and modes
keep the model's own batch axis of each layer (as DepthPro's patch encoder), so run files, which hold one batch axis
of images, are refused for this model; record it live.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from qkhooks.errors import QKHooksError
from qkhooks.models.base import AttentionSite, register_adapter, stacked_rows
from qkhooks.models.unsupported import MODELLED_FORMS, refuse_uncovered

__all__ = ["SoftCapSite", "find"]


@dataclasses.dataclass(eq=False)
class SoftCapSite(AttentionSite):
    """An attention whose scaled logits pass the module's own soft-cap c·tanh(·/c) before the mask and the softmax.

    Attributes:
        temporal: a temporal layer (tokens: one patch's frames, grid (1, T)), else spatial (a frame's patches).
        cap: the module's ``attn_logit_softcapping`` c (None: the logits are not capped), read when the sites are found
            (a changed setting is a changed model structure: its sites are found again).
    """

    temporal: bool = False
    cap: float | None = None

    def softcap(self) -> float | None:
        """The cap c (None: the logits are not capped)."""
        return self.cap

    def add_logit_bias(self, logits: torch.Tensor, query_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Scaled logits -> capped (c·tanh(logits / c)), then the model's additive term, in the model's order."""
        cap = self.softcap()
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return super().add_logit_bias(logits, query_tokens)

    def keys_shape_logits(self) -> bool:
        """Under the cap a term shared by a row's keys (q·b_k) no longer cancels: rows compute every key."""
        return self.softcap() is not None or super().keys_shape_logits()

    def content_only(self) -> str:
        reasons = [super().content_only()]
        if self.softcap() is not None:
            reasons.append(f"the logits are soft-capped, {self.softcap():g}·tanh(logit / {self.softcap():g}), before the "
                           "softmax (the modes describe the logits before the cap)")
        return "; ".join(r for r in reasons if r)

    def grid_for(self, num_tokens: int) -> tuple[int, int]:
        """Temporal layers: the T frames as one row, (1, T); spatial layers: the frame's patch grid."""
        if self.temporal:
            return 1, num_tokens
        return super().grid_for(num_tokens)

    def grid_for_image(self, height: int, width: int) -> tuple[int, int]:
        if self.temporal:
            raise QKHooksError(f"{self.path}: a temporal layer's tokens are a patch's frames, not an image's patches; "
                               "its grid is (1, frames), read from the call.")
        return super().grid_for_image(height, width)

    def run_file_refusal(self) -> str | None:
        return ("VideoPrism's spatial layers hold clips x frames and its temporal layers clips x patches along the "
                "batch axis, and a run file holds one batch axis of images, one row per id (its schema has no per-layer "
                "batch axis, and record_dataset feeds images, not clips); record it live (qkhooks.record)")


def _vision_models(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from transformers.models.videoprism.modeling_videoprism import VideoPrismVisionModel

    return [(name, m) for name, m in model.named_modules() if isinstance(m, VideoPrismVisionModel)]


def matches(model: nn.Module) -> bool:
    """A transformers model holding a VideoPrism vision encoder."""
    if not type(model).__module__.startswith("transformers.models.videoprism"):
        return False
    return bool(_vision_models(model))


def find(model: nn.Module) -> list[AttentionSite]:
    """Spatial then temporal layers of every VideoPrism vision encoder in the model, in forward order."""
    sites: list[AttentionSite] = []
    for prefix, vision in _vision_models(model):
        config = vision.config
        tubelet = tuple(int(v) for v in config.tubelet_size)
        size = config.image_size if isinstance(config.image_size, (tuple, list)) else (config.image_size,) * 2
        grid = (int(size[0]) // tubelet[1], int(size[1]) // tubelet[2])
        for stage in ("spatial_layers", "temporal_layers"):
            for index, layer in enumerate(getattr(vision, stage)):
                attn = layer.attention
                if getattr(attn, "is_causal", False) or float(getattr(attn, "num_key_value_groups", 1)) != 1:
                    raise QKHooksError(f"unsupported attention in {prefix + '.' if prefix else ''}{stage}.{index}.attention "
                                       "(VideoPrismAttention): a causal or grouped-query setting this adapter has not checked.")
                block = f"{prefix + '.' if prefix else ''}{stage}.{index}"
                heads = int(config.num_attention_heads)
                temporal = stage == "temporal_layers"
                sites.append(SoftCapSite(
                    layer=len(sites), path=f"{block}.attention", module=attn, block_path=block, block=layer,
                    num_heads=heads, head_dim=int(attn.head_dim), dim=int(attn.q_proj.in_features),
                    scale=float(attn.scaling), num_prefix_tokens=0, grid=None if temporal else grid,
                    family="hf-videoprism", input_name="hidden_states", qk_linear=stacked_rows(attn.q_proj, attn.k_proj),
                    patch_size=None if temporal else tubelet[1:], qk_modules=(attn.q_proj, attn.k_proj),
                    stage=block.rpartition(".")[0], bias_input="attention_mask", temporal=temporal,
                    cap=None if attn.attn_logit_softcapping is None else float(attn.attn_logit_softcapping)))
    refuse_uncovered(model, sites)
    return sites


register_adapter("hf-videoprism", matches, find, families="Hugging Face VideoPrism vision encoder (soft-capped logits, "
                 "factorised spatial / temporal layers)", first=False)
MODELLED_FORMS.add("transformers.models.videoprism.modeling_videoprism.VideoPrismAttention")
