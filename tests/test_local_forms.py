"""zoo-local forms: HF MobileViT (unfolded patches), HaloNet / BoTNet (PosEmbedRel), NesT, TNT, GCViT.

Every reference here is computed independently of qkhooks: q·k from the module's own Linear layers applied to the
tokens the module was handed (read with a plain forward hook), or the model's own eager softmax.
"""

from __future__ import annotations

import math

import pytest
import torch

import qkhooks
from qkhooks import QKHooksError
from conftest import forward_with_hooks

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


def _recorded(model: torch.nn.Module, inputs: dict[str, torch.Tensor], **options) -> tuple:
    """(recording, sites, what each site's module was handed) of one recorded call."""
    sites = qkhooks.sites(model)
    seen, handles = _inputs_of([s.module for s in sites])
    try:
        with qkhooks.record(model, **options) as rec, torch.no_grad():
            rec(**inputs)
    finally:
        for h in handles:
            h.remove()
    return rec, sites, seen


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
    run, sites, seen = _recorded(_hf_mobilevit(), {"pixel_values": _images(size)}, modes="all", attention="full")
    assert [s.family for s in sites] == ["hf-mobilevit"] * len(sites) and len({s.stage for s in sites}) > 1
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


# ------------------------------------------------------------------------------------------ BoTNet PosEmbedRel
def _botnet(scale_pos_embed: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    model = _perturbed(timm.create_model("eca_botnext26ts_256", pretrained=False, img_size=64))
    for m in model.modules():
        if type(m).__name__ == "BottleneckAttn":
            m.scale_pos_embed = scale_pos_embed  # read at every call: (q·k + term) · scale instead of scale · q·k + term
    return model


def _eager_softmax(model: torch.nn.Module, sites: list, x: torch.Tensor) -> dict[int, torch.Tensor]:
    from test_zoo import _softmax_hooks

    maps: dict[int, torch.Tensor] = {}
    handles = [h for s in sites for h in _softmax_hooks(s.module, lambda t, i=s.layer: maps.__setitem__(i, t.detach()))]
    forward_with_hooks(model, handles, x)
    return maps


def _row_centred_error(logits: torch.Tensor, maps: torch.Tensor) -> float:
    own = maps.double().clamp_min(1e-300).log()
    got = logits.double()
    return float(((got - got.mean(-1, keepdim=True)) - (own - own.mean(-1, keepdim=True))).abs().max())


@pytest.mark.parametrize("scale_pos_embed", [False, True])
def test_botnet_scale_content_plus_the_relative_term_is_the_models_eager_logits(scale_pos_embed: bool):
    """The modes of W_q^T W_k (augmented) rebuild the content q·k; scale·content + rec.relative_term(l) is the log of
    the model's own softmax (up to a row constant) to 1e-5, the content alone is not (the term is real)."""
    model = _botnet(scale_pos_embed)
    x = _images(64)
    sites = qkhooks.sites(model)
    want = _eager_softmax(model, sites, x)
    with qkhooks.record(model, modes="all", augmented=True, attention="full") as rec, torch.no_grad():
        rec(x)
    assert len(rec.sites) == 3
    for site in rec.sites:
        spec = rec.spectrum(site.layer)
        content = torch.einsum("bhkn,hk,bhkm->bhnm", rec.query(site.layer).double(), spec.S.double(),
                               rec.key(site.layer).double())
        term = rec.relative_term(site.layer).double()
        maps = want[site.layer].unflatten(0, (2, site.num_heads))  # the module's (B·H, N, N)
        assert term.shape == maps.shape == rec.attention(site.layer, "full").shape
        assert _row_centred_error(site.scale * content + term, maps) < 1e-5
        assert _row_centred_error(site.scale * content, maps) > 1e-3, "the relative term does not matter here"
        assert torch.allclose(rec.attention(site.layer, "full"), maps, atol=1e-6)
        assert not site.modes_rebuild_logits() and "relative-position term" in site.content_only()
        assert rec.bias(site.layer) is None  # no position-only term


def test_botnet_relative_term_is_q_dot_the_tables_at_the_offsets():
    """Independent of PosEmbedRel's shift trick: term[i, j] = q_i·R_h[h_j − h_i + H − 1] + q_i·R_w[w_j − w_i + W − 1], q
    from the module's own 1x1-conv qkv on the NCHW map it was handed (pixels row by row), R its tables indexed directly."""
    rec, sites, seen = _recorded(_botnet(False), {"x": _images(64)}, modes=None, attention="full")
    for site in sites:
        attn, fmap = site.module, seen[site.layer].double()
        b, _, h, w = fmap.shape
        rows = attn.dim_out_qk
        q = torch.einsum("bchw,oc->bhwo", fmap, attn.qkv.weight[:rows, :, 0, 0].double())
        q = q.unflatten(-1, (site.num_heads, -1))  # (B, h, w, H, d_k)
        r_h, r_w = attn.pos_embed.height_rel.double(), attn.pos_embed.width_rel.double()
        ii, jj = torch.arange(h), torch.arange(w)
        by_h = torch.einsum("byxnc,yzc->bnyxz", q, r_h[ii[None, :] - ii[:, None] + h - 1])  # (B, H, h, w, h_k)
        by_w = torch.einsum("byxnc,xzc->bnyxz", q, r_w[jj[None, :] - jj[:, None] + w - 1])  # (B, H, h, w, w_k)
        want = (by_h[..., :, None] + by_w[..., None, :]).flatten(2, 3).flatten(-2)
        assert torch.allclose(rec.relative_term(site.layer).double(), want, atol=1e-5), site.path


# ------------------------------------------------------------------------------------------ NesT and TNT blocks
def _qk_softmax(attn: torch.nn.Module, x: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(scale · q·k) of tokens (..., N, d) from the module's own fused qkv (NesT) or qk (TNT) Linear."""
    proj = attn.qkv if hasattr(attn, "qkv") else attn.qk
    rows = proj.weight.shape[0] // (3 if hasattr(attn, "qkv") else 2)
    q = torch.nn.functional.linear(x, proj.weight[:rows], None if proj.bias is None else proj.bias[:rows])
    k = torch.nn.functional.linear(x, proj.weight[rows: 2 * rows], None if proj.bias is None else proj.bias[rows: 2 * rows])
    q, k = (t.unflatten(-1, (heads, -1)).movedim(-2, -3) for t in (q, k))  # (..., H, N, d_k)
    return torch.softmax(q @ k.transpose(-1, -2) * attn.scale, -1)


def test_nest_maps_are_per_block_and_query_maps_are_the_levels_own_tokens_on_the_grid():
    """Reference: the module's (B, T, N, C) input, q·k per block from its own qkv: the model's (B, H, T, N, N) maps,
    handed out blocks first; and the level's (B, C, h, w) map after its pool, plus the position embedding as blockify
    adds it, normalised by the layer's norm1 and projected on u_n pixel by pixel (row-major grid)."""
    from test_zoo import _small_nest

    torch.manual_seed(0)
    model = _perturbed(_small_nest())
    sites = qkhooks.sites(model)
    seen, handles = _inputs_of([s.module for s in sites])
    level = model.levels[0]
    pooled = {}
    handles.append(level.pool.register_forward_hook(lambda m, a, o: pooled.setdefault("x", o.detach())))
    try:
        with qkhooks.record(model, modes=4, attention="full") as run, torch.no_grad():
            run(_images(32))
    finally:
        for h in handles:
            h.remove()
    for site in sites:
        x = seen[site.layer]  # (B, T, N, C)
        want = _qk_softmax(site.module, x, site.num_heads)  # (B, T, H, N, N): the model's (B, H, T, N, N), blocks first
        got = run.attention_maps("full")[site.layer]
        assert got.shape == (2, x.shape[1], site.num_heads, x.shape[2], x.shape[2])
        assert x.shape[1] == 4 ** (len(sites) - 1 - site.layer)  # 16, 4, 1 blocks: the first levels have several
        assert torch.allclose(got, want, atol=1e-6)
    first = sites[0]
    fmap = pooled["x"]  # (B, C, h, w) entering blockify
    b = math.isqrt(seen[0].shape[2])
    pos = level.pos_embed.detach()  # (1, T, N, C): block-major, as blockify lays the tokens out
    side = fmap.shape[2] // b
    pos_grid = pos.reshape(1, side, side, b, b, -1).transpose(2, 3).reshape(1, fmap.shape[2] * fmap.shape[3], -1)
    with torch.no_grad():
        tokens = model.levels[0].transformer_encoder[0].norm1(fmap.flatten(2).transpose(1, 2) + pos_grid)
    want = torch.einsum("bnd,hdk->bhkn", tokens, run.spectrum[first.layer].U)
    assert torch.allclose(run.query[first.layer], want, atol=1e-4 * float(want.abs().max()))


def test_tnt_inner_maps_are_per_patch_and_outer_maps_over_the_patches_and_class_token():
    """Reference: q·k from the module's own qk Linear on what each attention was handed: inner (B·N_p, P, C_in) split per
    image into (B, N_p, H, P, P); outer (B, 1 + N_p, C) as it is. The inner query maps sit on the (g·p)² pixel grid: the
    token of pixel (u, v) of patch (a, b) at row a·p + u, column b·p + v."""
    torch.manual_seed(0)
    model = _perturbed(timm.create_model("tnt_s_legacy_patch16_224", pretrained=False, img_size=64, depth=2))
    run, sites, seen = _recorded(model, {"x": _images(64)}, modes=4, attention="full")
    assert [s.path for s in sites] == ["blocks.0.attn_in", "blocks.0.attn_out", "blocks.1.attn_in", "blocks.1.attn_out"]
    (gh, gw), (ph, pw) = model.pixel_embed.grid_size, model.pixel_embed.new_patch_size
    for site in sites:
        x, got = seen[site.layer], run.attention_maps("full")[site.layer]
        want = _qk_softmax(site.module, x, site.num_heads)
        if site.path.endswith("attn_in"):
            want = want.unflatten(0, (2, gh * gw))
            tokens = x.reshape(2, gh, gw, ph, pw, -1).permute(0, 1, 3, 2, 4, 5).reshape(2, gh * ph * gw * pw, -1)
        else:
            tokens = x
        assert got.shape == want.shape and torch.allclose(got, want, atol=1e-6), site.path
        proj = torch.einsum("bnd,hdk->bhkn", tokens, run.spectrum[site.layer].U)
        assert torch.allclose(run.query[site.layer], proj, atol=1e-4 * float(proj.abs().max())), site.path
    with pytest.raises(QKHooksError, match="input='residual' is not modelled"):
        with qkhooks.record(model, modes=4, input="residual", layers=[1]) as run, torch.no_grad():
            run(_images(64))


# ------------------------------------------------------------------------------------------ HaloNet
def _halonet(scale_pos_embed: bool = False) -> torch.nn.Module:
    from test_zoo import _small_halonet

    torch.manual_seed(0)
    model = _perturbed(_small_halonet())
    for m in model.modules():
        if type(m).__name__ == "HaloAttn":
            m.scale_pos_embed = scale_pos_embed
    return model


def _per_window(maps: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Grid maps (B, H, K, N) read at the window positions (B, nW, H, K, Nw); a padding position (-1) reads 0 (the model
    pads its keys with zeros after the projection, and this kv conv has no bias)."""
    out = maps[..., index.clamp_min(0)].permute(0, 3, 1, 2, 4)
    return out.where(index[:, None, None, :] >= 0, 0.0)


@pytest.mark.parametrize("scale_pos_embed", [False, True])
def test_halonet_scale_content_plus_the_relative_term_is_the_models_eager_logits(scale_pos_embed: bool):
    """Per block (strided block included): the modes of W_q^T W_k rebuild the content q·k between each query block and
    its haloed key window, and scale·content + rec.relative_term(l) is the log of the model's own softmax (up to a row
    constant) to 1e-5; the content alone is not. Maps: the model's (B·H, nB, Q, M), per image blocks first."""
    model = _halonet(scale_pos_embed)
    x = _images(64)
    sites = qkhooks.sites(model)
    assert sorted(s.query_stride for s in sites) == [1, 1, 2]
    want = _eager_softmax(model, sites, x)
    with qkhooks.record(model, modes="all", attention="full") as rec, torch.no_grad():
        rec(x)
        index = {s.layer: (s.window_index(), s.key_window_index()) for s in rec.sites}
    for site in rec.sites:
        spec = rec.spectrum(site.layer)
        q_index, k_index = index[site.layer]
        q = _per_window(rec.query(site.layer).double(), q_index)
        k = _per_window(rec.key(site.layer).double(), k_index)
        content = torch.einsum("bwhkn,hk,bwhkm->bwhnm", q, spec.S.double(), k)
        maps = want[site.layer].unflatten(0, (2, site.num_heads)).transpose(1, 2)  # (B, nB, H, Q, M)
        term = rec.relative_term(site.layer).double()  # per image, blocks first, like the maps
        assert term.shape == maps.shape == rec.attention(site.layer, "full").shape
        assert _row_centred_error(site.scale * content + term, maps) < 1e-5
        assert _row_centred_error(site.scale * content, maps) > 1e-3, "the relative term does not matter here"
        assert torch.allclose(rec.attention(site.layer, "full"), maps, atol=1e-6)
    with pytest.raises(QKHooksError, match="haloed window"):
        qkhooks.record(model, modes=None, attention="rows")


def test_halonet_relative_term_is_q_dot_the_tables_at_the_offsets():
    """Independent of PosEmbedRel's shift trick, for the unstrided blocks: term[i, j] = q_i·R_h[y_j − y_i + W − 1] +
    q_i·R_w[x_j − x_i + W − 1], (y_i, x_i) the query's place in its b x b block, (y_j, x_j) the key's in its W x W
    haloed window, q from the module's own q conv on the map it was handed."""
    rec, sites, seen = _recorded(_halonet(), {"x": _images(64)}, modes=None, attention="full")
    checked = 0
    for site in sites:
        attn = site.module
        if attn.block_stride != 1:
            continue
        b, win = attn.block_size, attn.win_size
        q = attn.q(seen[site.layer]).double()  # (B, H·d_k, h, w)
        _, _, h, w = q.shape
        q = q.unflatten(1, (site.num_heads, -1)).unflatten(3, (h // b, b)).unflatten(5, (w // b, b))
        q = q.permute(0, 3, 5, 1, 4, 6, 2)  # (B, n_h, n_w, H, b, b, d_k)
        r_h, r_w = attn.pos_embed.height_rel.double(), attn.pos_embed.width_rel.double()
        off = torch.arange(win)[None, :] - torch.arange(b)[:, None] + win - 1  # (b, W)
        by_h = torch.einsum("bpqnyxc,yzc->bpqnyxz", q, r_h[off])
        by_w = torch.einsum("bpqnyxc,xzc->bpqnyxz", q, r_w[off])
        want = (by_h[..., :, None] + by_w[..., None, :]).flatten(-2).flatten(4, 5).flatten(1, 2)  # (B, nB, H, Q, M)
        got = rec.relative_term(site.layer).double()
        assert torch.allclose(got, want, atol=1e-6), site.path
        checked += 1
    assert checked == 2


def test_halonet_run_file_keeps_each_layers_query_grid_and_blocks(tmp_path):
    """record_dataset's geometry probe reads each HaloNet layer off the model: the query grid is the map the module was
    handed divided by its query stride, the blocks those of its q conv (b / s per side)."""
    from qkhooks.data.preprocess import ImageConfig
    from qkhooks.models.load import load_model
    from qkhooks.store import open_run
    from qkhooks.stream import record_dataset

    model = _halonet()
    sites = qkhooks.sites(model)
    seen, handles = _inputs_of([s.module for s in sites])
    forward_with_hooks(model, handles, _images(64, batch=1))
    path = tmp_path / "halo.h5"
    config = ImageConfig(size=(64, 64), mean=(0.5,) * 3, std=(0.5,) * 3)
    record_dataset(load_model(model, image_config=config), "samples", path, limit=2, batch_size=2, progress=False,
                   dtype="float32", modes=4)
    run = open_run(path)
    for site in sites:
        attn, fmap = site.module, seen[site.layer]
        geometry = run.geometry(site.layer)
        stride = attn.block_stride
        assert tuple(geometry.grid) == (fmap.shape[2] // stride, fmap.shape[3] // stride)
        assert geometry.window["size"] == [attn.block_size // stride] * 2 and geometry.window["shift"] == [0, 0]
