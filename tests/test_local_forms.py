"""zoo-local forms: HF MobileViT (unfolded patches), HaloNet / BoTNet (PosEmbedRel), NesT, TNT, GCViT.

Every reference here is computed independently of qkhooks: q·k from the module's own Linear layers applied to the
tokens the module was handed (read with a plain forward hook), or the model's own eager softmax.
"""

from __future__ import annotations

import pytest
import torch

import qkhooks
from qkhooks import QKHooksError

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")


def _perturbed(model: torch.nn.Module) -> torch.nn.Module:
    from test_zoo import perturb

    return perturb(model)


def _images(size: int | tuple[int, int], batch: int = 2, seed: int = 3) -> torch.Tensor:
    h, w = (size, size) if isinstance(size, int) else size
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _inputs_of(modules: list[torch.nn.Module]) -> tuple[dict[int, torch.Tensor], list]:
    seen: dict[int, torch.Tensor] = {}
    handles = [m.register_forward_pre_hook(lambda mod, a, i=i: seen.setdefault(i, a[0].detach())) for i, m in enumerate(modules)]
    return seen, handles


# ------------------------------------------------------------------------------------------ HF MobileViT
def _hf_mobilevit() -> torch.nn.Module:
    config = transformers.MobileViTConfig(hidden_sizes=[16, 16, 16], neck_hidden_sizes=[8, 8, 8, 8, 8, 8, 16],
                                          image_size=64, num_attention_heads=2)
    torch.manual_seed(0)
    return _perturbed(transformers.MobileViTModel(config))


@pytest.mark.parametrize("size", [64, 72])  # 72: the stages' maps are no multiple of the patch, the model resizes them
def test_hf_mobilevit_full_maps_are_softmax_of_q_dot_k_per_image_and_pixel_offset(size: int):
    """Reference: softmax(q·k / sqrt(d_k)) from the module's own query/key Linear layers on the (B·P, N, C) tokens it
    was handed; qkhooks splits the model's B·P axis into (B, P)."""
    model = _hf_mobilevit()
    sites = qkhooks.sites(model)
    assert [s.family for s in sites] == ["hf-mobilevit"] * len(sites) and len({s.stage for s in sites}) > 1
    seen, handles = _inputs_of([s.module for s in sites])
    try:
        with qkhooks.record(model, modes="all", attention="full") as run, torch.no_grad():
            run(pixel_values=_images(size))
    finally:
        for h in handles:
            h.remove()
    full = run.attention_maps("full")
    for site in sites:
        attn, x = site.module, seen[site.layer]
        q = attn.query(x).unflatten(-1, (site.num_heads, -1)).transpose(1, 2)
        k = attn.key(x).unflatten(-1, (site.num_heads, -1)).transpose(1, 2)
        want = torch.softmax(q @ k.transpose(-1, -2) / attn.attention_head_size**0.5, -1)
        got = full[site.layer]
        assert got.shape == (2, site.pixels, site.num_heads, x.shape[1], x.shape[1])
        assert torch.allclose(got.flatten(0, 1), want, atol=1e-6)


def test_hf_mobilevit_query_maps_are_the_layers_own_pixels_projected_on_the_pixel_grid():
    """Reference: the MobileViTLayer's own (B, C, H, W) map entering its unfolding (its conv_1x1 output), normalised per
    pixel by the first transformer layer's layernorm_before and projected on u_n directly, row-major."""
    model = _hf_mobilevit()
    layer = next(m for m in model.modules() if type(m).__name__ == "MobileViTLayer")
    maps = {}
    handle = layer.conv_1x1.register_forward_hook(lambda m, a, o: maps.setdefault("x", o.detach()))
    path = next(n for n, m in model.named_modules() if m is layer.transformer.layer[0].attention.attention)
    try:
        with qkhooks.record(model, modes=4, attention="full") as run, torch.no_grad():
            run(pixel_values=_images(64))
    finally:
        handle.remove()
    site = next(s for s in run.sites if s.path == path)
    fmap = maps["x"]
    with torch.no_grad():
        tokens = layer.transformer.layer[0].layernorm_before(fmap.permute(0, 2, 3, 1)).flatten(1, 2)
    want = torch.einsum("bnd,hdk->bhkn", tokens, run.spectrum[site.layer].U)
    assert run.query[site.layer].shape == want.shape == (2, site.num_heads, 4, fmap.shape[2] * fmap.shape[3])
    assert torch.allclose(run.query[site.layer], want, atol=1e-4 * float(want.abs().max()))
    with pytest.raises(QKHooksError, match="per pixel offset"):
        qkhooks.record(model, modes=None, attention="rows")
