"""zoo13: TimeSformer with a clip whose length is not ``config.num_frames``. The block groups its tokens by the config
whatever the clip (time groups: runs of num_frames consecutive tokens; space groups: the tokens equal modulo
num_frames), so the maps stay the model's own, but a group is then not one patch's frames. The clip's frame count is
read off the embeddings' call, and ``DividedSite.group_positions()`` says which (patch, frame) each group position
holds: checked against the grouping worked out by hand from the model's reshapes, and against the model's own tensors
(the tokens its temporal attention receives are the embeddings' tokens at those (patch, frame) pairs)."""

from __future__ import annotations

import pytest
import torch

import qkhooks
from qkhooks import QKHooksError

from test_inside_forms import _calls, _timesformer

PATCHES = 16  # a 32x32 frame in 8x8 patches; the config's num_frames is 4


def _record(model: torch.nn.Module, frames: int):
    clip = torch.randn(2, frames, 3, 32, 32, generator=torch.Generator().manual_seed(frames))
    plain, seen = _calls(model, "TimesformerSelfAttention", pixel_values=clip)
    with torch.no_grad(), qkhooks.record(model, modes=0, attention="full") as rec:
        out = model(pixel_values=clip).last_hidden_state
        positions = {s.layer: s.group_positions().clone() for s in rec.sites}
        whole = {s.layer: s.groups_are_patches_and_frames() for s in rec.sites}
    assert torch.equal(out, plain)
    return clip, seen, rec, positions, whole


def test_a_two_frame_clip_is_grouped_as_the_model_groups_it_and_each_group_says_which_patch_and_frame_it_holds():
    model = _timesformer()
    clip, seen, rec, positions, whole = _record(model, frames=2)
    # by hand: 16 patches x 2 frames = 32 tokens, token 1 + 2p + t; the block groups by num_frames = 4
    time = [[(2 * g, 0), (2 * g, 1), (2 * g + 1, 0), (2 * g + 1, 1)] for g in range(8)]  # runs of 4 tokens
    space = [[(-1, -1)] + [(2 * j + f // 2, f % 2) for j in range(8)] for f in range(4)]  # tokens 4j + f
    assert positions[0].tolist() == [[list(p) for p in g] for g in time]
    assert positions[1].tolist() == [[list(p) for p in g] for g in space]
    assert not whole[0] and not whole[1]  # a group mixes patches (time) or frames (space)
    # the model's own tensors: its temporal attention receives the normed embeddings' tokens at those pairs
    tokens = model.encoder.layer[0].temporal_layernorm(model.embeddings(clip))  # (B, 1 + P·T, d)
    got = seen["encoder.layer.0.temporal_attention.attention"][0][0].unflatten(0, (2, 8))  # (B, G, 4, d)
    pairs = positions[0]
    want = tokens[:, 1 + 2 * pairs[..., 0] + pairs[..., 1]]
    torch.testing.assert_close(got, want.detach(), atol=1e-6, rtol=0)
    # the maps are still the model's own groups: softmax(scale·q·k) of each call's group tokens
    for layer, name in enumerate(seen):
        module, x = model.get_submodule(name), seen[name][0][0]
        with torch.no_grad():
            q, k, _ = module.qkv(x).view(x.shape[0], x.shape[1], 3, 4, 8).permute(2, 0, 3, 1, 4)
            maps = torch.softmax(q @ k.transpose(-1, -2) * module.scale, -1)
        torch.testing.assert_close(rec.attention(layer, "full").flatten(0, 1), maps, atol=1e-6, rtol=0)


def test_a_clip_of_the_configs_length_groups_one_patchs_frames_and_one_frames_patches():
    _, _, _, positions, whole = _record(_timesformer(), frames=4)
    assert whole[0] and whole[1]
    assert positions[0].tolist() == [[[p, t] for t in range(4)] for p in range(PATCHES)]
    assert positions[1].tolist() == [[[-1, -1]] + [[p, t] for p in range(PATCHES)] for t in range(4)]


def test_group_positions_outside_a_forward_are_refused_naming_the_missing_frame_count():
    model = _timesformer()
    with torch.no_grad(), qkhooks.record(model, modes=0, attention="full") as rec:
        model(pixel_values=torch.randn(1, 4, 3, 32, 32))
    with pytest.raises(QKHooksError, match=r"embeddings were not seen running.*config.num_frames is how it groups"):
        rec.sites[0].group_positions()
