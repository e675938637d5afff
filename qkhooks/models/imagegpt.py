"""ImageGPT (HF ``ImageGPTModel`` and its heads): causal attention over colour-cluster tokens, exactly (METHODS.md C).

ImageGPT does not take image patches: its input is token ids, one per pixel of an s x s image at the model's own
resolution (s² = ``n_positions``), each the index of the pixel's colour cluster, in raster order. Each layer's q and k
come from a fused ``Conv1D`` ``c_attn`` (weight (d, 3d): q, k, v columns), the logits are scaled by 1/√d_k (when
``scale_attn_weights``) and by 1/(layer + 1) (when ``scale_attn_by_inverse_layer_idx``), and token i sees tokens j ≤ i
only: the model sets the logits above the diagonal to the float minimum, an additive mask here (its entries become 0
after the softmax either way), plus the padding mask it may hand the module. Maps are the model's (B, H, N, N), lower
triangular; modes are those of W_q^T W_k, whose logits the mask then restricts (``rec.bias(l)`` says the layer's term
is a mask). The grid is the s x s pixel grid, claimed only when the call holds the whole image (N = n_positions): a
shorter sequence is a prefix of an image (as in generation), whose tokens are no grid. Run files are refused (they
record image batches; ImageGPT takes token ids). A call that continues a cache (earlier tokens as keys) or attends to
encoder states is refused, naming the argument.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from qkhooks.errors import QKHooksError
from qkhooks.models.base import AttentionSite, register_adapter
from qkhooks.models.unsupported import MODELLED_FORMS, refuse_uncovered

__all__ = ["CausalTokenSite", "find"]


@dataclasses.dataclass(eq=False)
class CausalTokenSite(AttentionSite):
    """An ImageGPT attention layer: causal over pixel tokens in raster order, grid only for a whole image."""

    def grid_for(self, num_tokens: int) -> tuple[int, int]:
        if self.grid is not None and self.grid[0] * self.grid[1] == num_tokens:
            return self.grid
        raise QKHooksError(f"{self.path}: ImageGPT's tokens are the pixels of a {self.grid} image in raster order, and "
                           f"{num_tokens} tokens are not the whole image (a prefix, as in generation): no grid.")

    def grid_for_image(self, height: int, width: int) -> tuple[int, int]:
        raise QKHooksError(f"{self.path}: ImageGPT takes colour-cluster token ids, not an image.")

    def run_file_refusal(self) -> str | None:
        return ("ImageGPT takes colour-cluster token ids (each pixel's nearest colour cluster, made by its image "
                "processor), not images, and record_dataset feeds pixel_values; a run file would need that data path "
                "(its causal maps themselves are exact); record it live (qkhooks.record) on the model's input_ids")


def _causal_term(path: str, module: nn.Module):
    """The call's additive term: the model's causal mask (float minimum above the diagonal) plus any padding mask;
    every other argument of the call is checked and refused where it changes the keys."""

    def term(args: tuple, kwargs: dict) -> torch.Tensor:
        x = args[0] if args else kwargs["hidden_states"]
        if kwargs.get("encoder_hidden_states") is not None:
            raise QKHooksError(f"unsupported attention in {path!r} ({type(module).__name__}): it is handed "
                               "encoder_hidden_states (cross-attention: its keys are the encoder's states, not the tokens), "
                               "which qkhooks does not model.")
        if len(args) > 1:  # by position, ImageGPTAttention takes layer_past (a cache), then attention_mask, ...
            raise QKHooksError(f"unsupported attention in {path!r} ({type(module).__name__}): it is handed {len(args) - 1} "
                               "positional argument(s) after the tokens (by position: layer_past, the cache of earlier "
                               "tokens, then attention_mask, ...), and qkhooks reads these arguments by name only, so it "
                               "cannot check what they change; call the module with keywords, as ImageGPTBlock does.")
        cache = kwargs.get("layer_past")
        if cache is not None and int(cache.get_seq_length(module.layer_idx)) > 0:
            raise QKHooksError(f"unsupported attention in {path!r} ({type(module).__name__}): the call continues a cache "
                               "of earlier tokens (generation), so its keys are not the tokens handed in; record a whole "
                               "sequence in one call (use_cache=False).")
        n = int(x.shape[1])
        low = torch.finfo(torch.float32).min
        causal = torch.zeros(n, n, device=x.device).masked_fill(~module.bias[0, 0, :n, :n].to(x.device), low)
        mask = kwargs.get("attention_mask")
        causal = causal[None, None]
        if mask is None:
            return causal
        if mask.dtype == torch.bool:  # True = attend
            mask = torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, low)
        return causal + mask.detach().float()

    return term


def _c_attn_reader(c_attn: nn.Module, width: int):
    """Conv1D's weight is (d, 3d), x @ W: the q then k rows of W^T, read live."""

    def qk_linear() -> tuple[torch.Tensor, torch.Tensor]:
        return c_attn.weight[:, : 2 * width].T, c_attn.bias[: 2 * width]

    return qk_linear


def matches(model: nn.Module) -> bool:
    return type(model).__module__.startswith("transformers.models.imagegpt") and any(
        type(m).__name__ == "ImageGPTAttention" for m in model.modules())


def find(model: nn.Module) -> list[AttentionSite]:
    """Every ImageGPT attention layer, in forward order."""
    config = model.config
    side = math.isqrt(int(config.n_positions))
    grid = (side, side) if side * side == int(config.n_positions) else None
    sites: list[AttentionSite] = []
    modules = dict(model.named_modules())
    for name, attn in modules.items():
        if type(attn).__name__ != "ImageGPTAttention":
            continue
        if attn.is_cross_attention:
            raise QKHooksError(f"unsupported attention in {name!r} (ImageGPTAttention): cross-attention, not modelled.")
        width = int(attn.embed_dim)
        scale = (attn.head_dim ** -0.5 if attn.scale_attn_weights else 1.0) / (
            attn.layer_idx + 1 if attn.scale_attn_by_inverse_layer_idx else 1)
        block = name.rpartition(".")[0]
        sites.append(CausalTokenSite(
            layer=len(sites), path=name, module=attn, block_path=block, block=modules[block], num_heads=int(attn.num_heads),
            head_dim=int(attn.head_dim), dim=width, scale=float(scale), num_prefix_tokens=0, grid=grid,
            family="hf-imagegpt", input_name="hidden_states", qk_linear=_c_attn_reader(attn.c_attn, width),
            qk_modules=(attn.c_attn,), stage=block.rpartition(".")[0], call_bias=_causal_term(name, attn)))
    refuse_uncovered(model, sites)
    return sites


register_adapter("hf-imagegpt", matches, find, families="Hugging Face ImageGPT (causal attention over colour-cluster "
                 "tokens)", first=False)
MODELLED_FORMS.add("transformers.models.imagegpt.modeling_imagegpt.ImageGPTAttention")
