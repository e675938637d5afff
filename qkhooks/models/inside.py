"""Attention whose q or k is made inside the module (METHODS.md C): maps observed in the module's own forward.

Some attentions are built on softmax(q·k) but their q (or k) is not a per-token linear map of the tokens the module
is handed: GCViT's global blocks take the stage's global query tokens as q, EfficientViT-MSRA passes each head's q
through a depthwise conv + BatchNorm (and feeds head h the output of head h-1), MViTv2 pool-first pools and normalises
the tokens before W_q and W_k. No W_q^T W_k of the hooked tokens describes those logits, so no mode can be projected
from them; the maps, though, are what the module computes.

An :class:`InsideSite` takes the maps from the module's own forward: while the module runs, :class:`InsideCall`
watches the tensors entering its attention:

- a ``scaled_dot_product_attention`` call: the maps are softmax(q·kᵀ·scale + mask) of the very q, k, mask and scale
  the module hands the kernel (:func:`qkhooks.sdpa.sdpa_maps`), the kernel itself still runs (outputs
  bit-identical);
- a softmax over the last axis of the module's own logits (its eager path): those are the maps.

Such a site is **maps only**: ``record(modes=...)`` on it raises a :class:`QKHooksError` naming the site and why (the
fix: ``modes=0``, or ``layers=`` without it); rows / pooled attention, run files and every analysis of W_q^T W_k
(spectrum, BFD) refuse it the same way. Full maps have the model's shape (windowed sites: per image and window).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch

from qkhooks.errors import QKHooksError
from qkhooks.models.base import AttentionSite
from qkhooks.sdpa import AttentionCallMode, SdpaCall

__all__ = ["InsideSite", "InsideCall"]


@dataclasses.dataclass(eq=False)
class InsideSite(AttentionSite):
    """An attention site whose q or k is made inside the module: full maps observed in its forward, no modes.

    Attributes:
        inside: what the module computes inside, i.e. why no mode of W_q^T W_k describes its logits (said in every
            refusal of a modes-based analysis of this site).
        softmaxes_per_call: how many attention computations one call of the module makes; several (EfficientViT-MSRA:
            one per head, each (B, N, N)) are stacked along the head axis, in the order the module runs them.
    """

    inside: str = ""
    softmaxes_per_call: int = 1

    def observes_maps(self) -> bool:
        return True

    def maps_only(self) -> str:
        return (f"layer {self.layer} ({self.path}, {type(self.module).__name__}) is recorded as maps only: {self.inside}. "
                "Its full maps are the module's own (taken in its forward)")

    def modes_refusal(self) -> str | None:
        return self.maps_only() + "; record it with modes=0 (maps only), or leave it out with layers=."

    def run_file_refusal(self) -> str | None:
        return self.maps_only() + "; run files store modes per layer: record it live with qkhooks.record(..., modes=0, attention='full')."

    def check_attention_kind(self, kind: str) -> None:
        if kind != "full":
            raise QKHooksError(self.maps_only() + f"; '{kind}' attention is not rebuilt for it: record attention='full'.")

    def __post_init__(self) -> None:
        self.qk_linear = self._no_qk_form  # every reader of W_q, W_k (spectrum, BFD, modes) meets the reason
        self.qk_modules = ()  # no maps rebuilt from q/k Linear outputs (their hooks would run inside the watched forward)

    def _no_qk_form(self) -> Any:
        raise QKHooksError(self.maps_only() + "; it has no W_q^T W_k of its tokens to analyse (spectrum, BFD, modes).")

    def qk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise QKHooksError(self.maps_only() + "; q and k are made inside the module, not from the hooked tokens.")

    def attention_rows(self, x: torch.Tensor, query_tokens: torch.Tensor) -> torch.Tensor:
        self.check_attention_kind("rows")
        raise AssertionError("unreachable")  # pragma: no cover

    def content_only(self) -> str:
        return self.inside

    def modes_rebuild_logits(self) -> bool:
        return False

    def assemble(self, observed: list[torch.Tensor]) -> torch.Tensor:
        """The maps (B, H, N_q, N_k) of one call from the attention computations observed in it."""
        if len(observed) != self.softmaxes_per_call:
            raise QKHooksError(f"{self.path} ({type(self.module).__name__}): {len(observed)} attention computations were "
                               f"seen in one call of the module, the adapter expects {self.softmaxes_per_call}; its "
                               "maps cannot be told apart, so none are recorded.")
        if self.softmaxes_per_call > 1:
            if any(m.shape != observed[0].shape or m.dim() != 3 for m in observed):
                raise QKHooksError(f"{self.path}: its per-head attention computations are not (B, N, N) maps of one "
                                   f"shape: {[tuple(m.shape) for m in observed]}.")
            return torch.stack(observed, dim=1)
        maps = observed[0]
        if maps.dim() != 4 or maps.shape[1] != self.num_heads:
            raise QKHooksError(f"{self.path}: the attention computed inside the module is {tuple(maps.shape)}, not the "
                               f"(batch, {self.num_heads} heads, queries, keys) the adapter describes.")
        return maps


class InsideCall(AttentionCallMode):
    """Active while one :class:`InsideSite`'s module runs: keeps the maps of every attention computation it makes
    (from its ``scaled_dot_product_attention`` call's own q, k, mask and scale, or its eager softmax), changing none."""

    def __init__(self, site: InsideSite):
        super().__init__(site)
        self.seen: list[torch.Tensor] = []

    def begin(self) -> None:
        self.seen = []

    def leave(self) -> list[torch.Tensor]:  # type: ignore[override]
        """Stop watching; the maps seen in this call, in the order the module computed them."""
        super().leave()
        seen, self.seen = self.seen, []
        return seen

    def on_sdpa(self, call: SdpaCall, kernel: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The module's own kernel output, untouched; its maps kept beside it."""
        out = kernel()
        with torch.no_grad():
            self.seen.append(call.maps())
        return out

    def on_softmax(self, maps: torch.Tensor) -> None:
        if maps.dim() >= 3:
            self.seen.append(maps.detach())

    def dropout_refusal(self, dropout_p: float) -> QKHooksError:
        return QKHooksError(f"{self.site.path}: its attention drops weights at random (dropout_p={dropout_p}, training "
                            "mode), so no map is the one its output used; call model.eval().")
