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

TimeSformer (HF ``TimesformerModel``, divided space-time attention, its default): each block runs a time attention
over the T frames of each of its P patches, then a space attention over each frame's P patches plus a copy of the
class token, the tokens regrouped between the two (the clip's tokens are the class token, then patch-major,
frame-minor: token 1 + p·T + t). Each is a plain softmax(scale·q·k) within its groups, so each is its own site
(:class:`DividedSite`), the time site numbered first, as the block runs them:

- ``full`` maps: the model's own (B·G, H, n, n) per group, split per image: (B, G, H, n, n), time: G = P groups of
  n = T frames; space: G = T groups of n = 1 + P (the class token's copy first);
- modes: those of W_q^T W_k, exact for every group, on the clip's token axis (B, H, K, N): time N = P·T (patch-major,
  the class token takes no part), space N = 1 + P·T (the class token's copies are the same token, one map);
- :meth:`DividedSite.window_index` gives the (G, n) clip token of every group position; no image grid is claimed
  (a token is a (patch, frame) pair), and rows / pooled attention are refused (record ``full``).
- The block groups by ``config.num_frames`` whatever the clip's length; the clip's own frame count is read off the
  embeddings' call (zoo13), so :meth:`DividedSite.group_positions` gives the (patch, frame) each group position
  really holds: with a clip of another length a group mixes patches and frames, exactly as the model computes it.
The space-only and joint layouts of the same class are refused naming the layout.

VidEoMT (HF ``VideomtForUniversalSegmentation``) runs its first layers on the clip's frames as images (B·T, N, d),
then its last ``num_blocks`` layers once per frame, on (B, Q + N, d): the frame's tokens after its Q object queries
(propagated from frame to frame). Each such layer is one site whose T calls of one forward are joined
(:meth:`FrameCallSite.joins_calls`): every capture's batch axis is B·T frames, image-major (b·T + t), the order of the
first layers' own frames-as-images axis, so layer indices stay the forward order and each frame's maps are kept;
the object queries are prefix tokens there. Rows / pooled attention and run files are refused for those layers.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Callable

import torch
from torch import nn

from qkhooks._devices import to_device
from qkhooks.errors import QKHooksError
from qkhooks.models import hf
from qkhooks.models.base import AttentionSite, conv_output_size, recast
from qkhooks.models.unsupported import MODELLED_FORMS
from qkhooks.models.windows import WindowSite


@dataclasses.dataclass(eq=False)
class SpaceTimeSite(AttentionSite):
    """A layer of joint space-time attention; ``tubelets`` is the model's Conv3d tubelet embedding."""

    tubelets: nn.Conv3d | None = None
    _thw_of_call: tuple[int, int, int] | None = dataclasses.field(default=None, repr=False)

    def context_hooks(self) -> list[tuple[nn.Module, Callable]]:
        def note_clip(module: nn.Module, args: tuple, kwargs: dict) -> None:
            clip = args[0] if args else kwargs["input"]  # (B, C, T, H, W) as the Conv3d takes it
            self._thw_of_call = tuple(  # type: ignore[assignment]
                conv_output_size(int(n), module, axis) for axis, n in enumerate(clip.shape[2:]))

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
    return recast(site, SpaceTimeSite, grid=None, patch_size=None, tubelets=convs[0])


for _cls in ("VideoMAESelfAttention", "VivitAttention"):
    hf.EXTRA_FORMS[_cls] = (frozenset(), _space_time_site)


# ------------------------------------------------------------------------------ TimeSformer: divided space-time
@dataclasses.dataclass(eq=False)
class DividedSite(WindowSite):
    """One of the two attentions of a TimeSformer block (``axis``: ``"time"`` or ``"space"``), its groups read as
    windows over the clip's tokens: the block's call gives the batch B and the frames T (its config), so the P
    patches and every group's clip tokens are known before the attention runs."""

    axis: str = "time"
    # zoo13: the model's TimesformerEmbeddings, whose call holds the clip (a weak reference: a finished recording
    # forgets the model's modules, capture.sites_release)
    embeddings: "weakref.ref[nn.Module] | None" = None
    _clip: tuple[int, int, int] | None = dataclasses.field(default=None, repr=False)  # (B, groups, T_c) the block makes
    _frames: int | None = dataclasses.field(default=None, repr=False)  # T of the clip the embeddings were handed

    def context_hooks(self) -> list[tuple[nn.Module, Callable]]:
        def note_clip(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else kwargs["hidden_states"]  # (B, 1 + P·T, d)
            frames = int(module.config.num_frames)  # the block groups by its config, whatever the clip's length
            self._clip, self._index = (int(x.shape[0]), (int(x.shape[1]) - 1) // frames, frames), None

        def note_frames(module: nn.Module, args: tuple, kwargs: dict) -> None:
            pixels = args[0] if args else kwargs["pixel_values"]  # (B, T, C, H, W): one token per patch and frame
            self._frames = int(pixels.shape[1])

        embeddings = None if self.embeddings is None else self.embeddings()
        return [(self.block, note_clip)] + ([(embeddings, note_frames)] if embeddings is not None else [])

    def group_positions(self) -> torch.Tensor:
        """(G, n, 2) (patch, frame) of the token at each group position of the call being recorded ((-1, -1): the
        class token's copy), from the frame count T the embeddings produced, not the config.

        The block groups its tokens by ``config.num_frames`` (T_c) whatever the clip: time groups are runs of T_c
        consecutive tokens, space groups the tokens whose index is the same modulo T_c. With T = T_c a time group is
        one patch's frames and a space group one frame's patches; with another T they are not (a group then mixes
        patches and frames, as the model computes it), and this says what each group holds."""
        if self._frames is None:
            raise QKHooksError(f"{self.path}: the model's embeddings were not seen running, so the clip's frame count "
                               "is unknown (the block's config.num_frames is how it groups, not the clip's length); "
                               "record the whole model.")
        index = self.window_index()
        token = index if self.axis == "time" else index - 1  # patch tokens 0.., token 1 + p·T + t; -1: the class token
        where = torch.stack([token.div(self._frames, rounding_mode="floor"), token.remainder(self._frames)], dim=-1)
        return torch.where((token < 0)[..., None], torch.full_like(where, -1), where)

    def groups_are_patches_and_frames(self) -> bool:
        """Whether each time group is one patch's frames and each space group one frame's patches (the clip has the
        config's ``num_frames``); otherwise :meth:`group_positions` says what each group mixes."""
        self.group_positions()  # refuses when the clip was not seen
        return self._frames == self._clip[2]  # type: ignore[index]

    def forward_anchor(self) -> nn.Module:
        return self.block if self.axis == "time" else self.module  # the block runs its time attention first

    def window_index(self) -> torch.Tensor:
        """(G, n) clip token of each group position: time (P, T): p·T + t over the patch tokens; space (T, 1 + P): the
        class token (0), then 1 + p·T + t."""
        if self._clip is None:
            raise QKHooksError(f"{self.path}: its block was not seen running, so the clip's frames and patches are "
                               "unknown; record the whole model.")
        if self._index is None:
            _, patches, frames = self._clip
            grid = torch.arange(patches * frames).view(patches, frames)
            if self.axis == "time":
                self._index = grid
            else:
                self._index = torch.cat([torch.zeros(frames, 1, dtype=torch.long), 1 + grid.T], dim=1)
        return self._index

    def images_in_call(self, rows: int) -> int:
        if self._clip is None or rows != self._clip[0] * self.window_index().shape[0]:
            raise QKHooksError(f"{self.path}: {rows} groups in the call are not the {self.axis} groups of the block's clip "
                               f"(batch, groups of config.num_frames, config.num_frames) = {self._clip}.")
        return self._clip[0]

    def to_images(self, kind: str, t: torch.Tensor) -> torch.Tensor:
        """Maps per image (B, G, H, n, n); modes (B·G, H, K, n) on the clip's token axis (B, H, K, N), each token's map
        taken from its first group position (the class token's copies in the space groups are one token)."""
        if kind != "modes":
            return super().to_images(kind, t)
        index = self.window_index().flatten()
        flat = t.unflatten(0, (-1, self.window_index().shape[0])).permute(0, 2, 3, 1, 4).flatten(3)
        first = torch.full((int(index.max()) + 1,), index.numel(), dtype=torch.long)
        first.scatter_reduce_(0, index, torch.arange(index.numel()), reduce="amin")
        return flat[..., to_device(first, flat.device)]

    def hidden_states(self, args: tuple, kwargs: dict, block: bool = False) -> torch.Tensor:
        if block:
            held = ("the config's num_frames consecutive tokens (one patch's frames for a clip of that length)"
                    if self.axis == "time" else "every config.num_frames-th token (one frame's patches for a clip of "
                    "that length) after a copy of the class token")
            raise QKHooksError(f"{self.path}: input='residual' is not modelled for TimeSformer's divided attention (the "
                               f"block's residual stream holds the clip's tokens, patch-major over the frames, while its "
                               f"{self.axis} attention sees them regrouped, each group {held}); use input='normed'.")
        return super().hidden_states(args, kwargs, block)

    def grid_for(self, num_tokens: int) -> tuple[int, int]:
        raise QKHooksError(f"{self.path}: a token of TimeSformer's divided attention is a (patch, frame) pair in the "
                           "clip's patch-major order, not a position on one image grid; no grid is read off it.")

    def check_attention_kind(self, kind: str) -> None:
        if kind != "full":
            raise QKHooksError(f"layer {self.layer} ({self.path}): TimeSformer's {self.axis} attention runs within its "
                               f"groups of the clip's tokens, so '{kind}' attention (rows on an image grid) is not rebuilt "
                               "for it; record attention='full' (the model's own (B, G, H, n, n) maps).")

    def forget_call(self) -> None:
        super().forget_call()
        self._clip = self._frames = None


def _timesformer_site(site: AttentionSite, module: nn.Module, modules: dict[str, nn.Module]) -> AttentionSite:
    layout = getattr(getattr(modules[site.block_path], "config", None), "attention_type", "divided_space_time")
    if layout != "divided_space_time":
        raise QKHooksError(f"unsupported attention in {site.path!r} ({type(module).__name__}): TimeSformer's "
                           f"{layout!r} layout, which qkhooks does not model (its divided space-time layout is).")
    axis = "time" if ".temporal_attention." in f".{site.path}." else "space"
    holder = site.block_path.split(".encoder.")[0] if ".encoder." in site.block_path else ""
    embeddings = modules.get(f"{holder}.embeddings" if holder else "embeddings")
    return recast(site, DividedSite, grid=None, patch_size=None, num_prefix_tokens=0 if axis == "time" else 1,
                  bias_input=None, stage=f"{site.stage} ({axis})", axis=axis, geometry=None, call_grid=None,
                  relative_bias=None, embeddings=None if embeddings is None else weakref.ref(embeddings))


hf.EXTRA_FORMS["TimesformerSelfAttention"] = (frozenset({"attn_drop"}), _timesformer_site)
MODELLED_FORMS.add("transformers.models.timesformer.modeling_timesformer.TimesformerSelfAttention")


# ------------------------------------------------------------------------------ VidEoMT: per-frame query layers
@dataclasses.dataclass(eq=False)
class FrameCallSite(AttentionSite):
    """A VidEoMT layer the forward runs once per frame (object queries joined to the frame's tokens): its calls are
    joined, frames as images (b·T + t)."""

    def joins_calls(self) -> bool:
        return True

    def check_attention_kind(self, kind: str) -> None:
        if kind != "full":
            raise QKHooksError(f"layer {self.layer} ({self.path}): VidEoMT runs it once per frame, and '{kind}' attention "
                               "takes its query tokens per image of one call; record attention='full' (every frame's "
                               "maps, (B·T, H, N, N)).")

    def run_file_refusal(self) -> str | None:
        return (f"layer {self.layer} ({self.path}) runs once per frame of each clip (VidEoMT's query layers), so its "
                "images are frames, not the clips a run file is given ids for; record it live with qkhooks.record")


def _videomt_site(site: AttentionSite, module: nn.Module, modules: dict[str, nn.Module]) -> AttentionSite:
    config = modules[""].config
    index = int(site.block_path.rpartition(".")[2])
    if index < int(config.num_hidden_layers) - int(config.num_blocks):
        return site  # frames as images, once per forward
    return recast(site, FrameCallSite, num_prefix_tokens=site.num_prefix_tokens + int(config.num_queries))


hf.EXTRA_FORMS["VideomtAttention"] = (frozenset(), _videomt_site)
MODELLED_FORMS.add("transformers.models.videomt.modeling_videomt.VideomtAttention")
