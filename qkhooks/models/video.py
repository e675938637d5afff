"""Video ViTs with joint space-time attention (HF VideoMAE, ViViT): one plain softmax(q·k) over every tubelet.

The model embeds a (B, T, C, H, W) clip with a Conv3d whose kernel equals its stride (a tubelet of
t_k frames x p x p pixels) and flattens its (t, h, w) output row-major, so token i of the encoder is tubelet
(i // (h·w), (i // w) % h, i % w). Every layer attends over all t·h·w tokens at once (plus ViViT's class token):
the logits are scale · q·k, the content form is W_q^T W_k, and maps and modes are exact as for an image ViT.

Grid: run files and token maps hold two axes, so a layer's grid is the frames stacked along the rows,
(t·h, w): row r of the grid is row r % h of tubelet frame r // h. That layout is exact (it is the model's
own token order); analyses that read distances on the grid see frame t's last row next to frame t+1's first.
The (t, h, w) of each call is read off the model's own Conv3d as it runs, never guessed from a token count:
a call whose tokens do not fill it (VideoMAE's ``bool_masked_pos`` drops the masked tubelets) has no grid and
grid analyses refuse the layer.

TimeSformer (divided space-time attention: a time attention over the frames of each patch, then a space
attention over the patches of each frame, with the tokens regrouped between them) is refused in
:mod:`qkhooks.models.unsupported` with that reason.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from torch import nn

from qkhooks.errors import QKHooksError
from qkhooks.models import hf
from qkhooks.models.base import AttentionSite


@dataclasses.dataclass(eq=False)
class SpaceTimeSite(AttentionSite):
    """A layer of joint space-time attention; ``tubelets`` is the model's Conv3d tubelet embedding."""

    tubelets: nn.Conv3d | None = None
    _thw_of_call: tuple[int, int, int] | None = dataclasses.field(default=None, repr=False)

    def context_hooks(self) -> list[tuple[nn.Module, Callable]]:
        def note_clip(module: nn.Module, args: tuple, kwargs: dict) -> None:
            clip = args[0] if args else kwargs["input"]  # (B, C, T, H, W) as the Conv3d takes it
            self._thw_of_call = tuple(  # type: ignore[assignment]
                (n + 2 * p - d * (k - 1) - 1) // s + 1 for n, k, s, p, d in zip(
                    clip.shape[2:], module.kernel_size, module.stride, module.padding, module.dilation))

        return [] if self.tubelets is None else [(self.tubelets, note_clip)]

    def frames(self) -> tuple[int, int, int]:
        """(t, h, w) tubelets of the call being recorded."""
        if self._thw_of_call is None:
            raise QKHooksError(f"{self.path}: the model's tubelet embedding was not seen running, so the clip's "
                               "(frames, rows, cols) are unknown; record the whole model.")
        return self._thw_of_call

    def grid_for(self, num_tokens: int) -> tuple[int, int]:
        t, h, w = self.frames()
        if t * h * w != num_tokens - self.num_prefix_tokens:
            raise QKHooksError(f"{self.path}: {num_tokens - self.num_prefix_tokens} tokens do not fill the clip's "
                               f"{t} x {h} x {w} tubelets (masked tubelets dropped?), so no token has a grid position.")
        return t * h, w

    def grid_for_image(self, height: int, width: int) -> tuple[int, int]:
        t, h, w = self.frames()
        return t * h, w

    def forget_call(self) -> None:
        super().forget_call()
        self._thw_of_call = None


def _space_time_site(site: AttentionSite, module: nn.Module, modules: dict[str, nn.Module]) -> AttentionSite:
    convs = [m for name, m in modules.items() if isinstance(m, nn.Conv3d) and ".embeddings." in f".{name}"]
    if len(convs) != 1:
        raise QKHooksError(f"unsupported attention in {site.path!r} ({type(module).__name__}): expected one Conv3d "
                           f"tubelet embedding, found {len(convs)}, so the clip's (frames, rows, cols) are unknown.")
    fields = {f.name: getattr(site, f.name) for f in dataclasses.fields(AttentionSite) if f.init}
    fields.update(grid=None, patch_size=None, family=site.family)
    return SpaceTimeSite(**fields, tubelets=convs[0])


for _cls in ("VideoMAESelfAttention", "VivitAttention"):
    hf.EXTRA_FORMS[_cls] = (frozenset(), _space_time_site)
