"""timm's parallel blocks (ViT-22B style, ``vit_pwee_*``, ``vit_*_xp_*``): attention and MLP side by side in one
block, q, k and v made by one ``in_proj`` after the MLP's rows, from the block's own ``in_norm`` of its input.

The block itself is the attention module qkhooks hooks. Its tokens entering W_q / W_k are ``in_norm(x)``, computed
inside the block, so :class:`ParallelBlockSite` reads them from the block's input; the q/k rows of ``in_proj`` sit
behind the MLP's, so modes come from those normed tokens (no q/k Linear of their own to read). q/k-norm
(``qk_norm=True``: a LayerNorm per head) is modelled as in timm's ``Attention``. The differential variant
(``DiffParallelScalingBlock``) is in :mod:`qkhooks.models.two_softmax`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch
from torch import nn

from qkhooks.models import timm as timm_adapter
from qkhooks.models.base import AttentionSite, recast
from qkhooks.models.unsupported import MODELLED_FORMS


@dataclasses.dataclass(eq=False)
class ParallelBlockSite(AttentionSite):
    """A parallel block: the block is the hooked module, and the tokens entering W_q / W_k are its ``in_norm`` of the
    block's input."""

    def hidden_states(self, args: tuple[Any, ...], kwargs: dict[str, Any], block: bool = False) -> torch.Tensor:
        x = super().hidden_states(args, kwargs, block)
        if block:
            return x
        with torch.no_grad():
            return self.module.in_norm(x)


def parallel_block_qk(block: nn.Module) -> tuple[Callable[[], tuple[torch.Tensor, torch.Tensor | None]], tuple]:
    """q then k rows of the fused ``in_proj`` (MLP rows first, then q, k, v)."""
    proj, start = block.in_proj, int(block.in_split[0])
    width = int(block.in_split[1])

    def reader() -> tuple[torch.Tensor, torch.Tensor | None]:
        bias = None if proj.bias is None else proj.bias[start: start + 2 * width]
        return proj.weight[start: start + 2 * width], bias

    return reader, ()  # the q/k outputs sit behind the MLP's in one Linear: modes from the normed tokens


def parallel_block_site(site: AttentionSite, block: nn.Module, cls: type = ParallelBlockSite) -> AttentionSite:
    """The site of a parallel block: the block is both the attention module and its own block."""
    return recast(site, cls, block_path=site.path, block=block, stage=site.path.rpartition(".")[0])


timm_adapter.EXTRA_FORMS["ParallelScalingBlock"] = timm_adapter.ExtraForm(
    "timm.models.vision_transformer.ParallelScalingBlock", parallel_block_qk, parallel_block_site)
MODELLED_FORMS.add("timm.models.vision_transformer.ParallelScalingBlock")
