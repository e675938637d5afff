"""LeViT-style attention (models/levit.py): BatchNorm folded into W_q/W_k, position-indexed biases, subsampled queries
and tokens the module prepares itself, each checked against q and k computed here with the model's own modules."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import qkhooks
from qkhooks import QKHooksError
from qkhooks.models.levit import fold_batchnorm
from conftest import forward_with_hooks


def _randomise(model: nn.Module) -> nn.Module:
    """Every parameter and BatchNorm running statistic away from its initial value, so a fold that ignored the mean,
    the variance, γ or β would show."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * (0.2 if bool((p == 0).all()) else 0.05))
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model.eval()


def _images(size: int) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))


def _record(model: nn.Module, images: torch.Tensor) -> tuple[Any, dict[int, torch.Tensor], torch.Tensor, dict]:
    """(recording, each site's module input, the model's output without hooks, the additive term of each layer)."""
    sites = qkhooks.sites(model)
    seen: dict[int, torch.Tensor] = {}
    handles = [s.module.register_forward_pre_hook(lambda m, a, i=s.layer: seen.__setitem__(i, a[0].detach()))
               for s in sites]
    ref = forward_with_hooks(model, handles, images)
    with qkhooks.record(model, modes="all", augmented=True, attention="full") as run:
        with torch.no_grad():
            out = model(images)
        bias = {s.layer: s.logit_bias() for s in run.sites}
    assert torch.equal(out, ref)
    return run, seen, ref, bias


def _levit(**kw: Any) -> nn.Module:
    import timm

    torch.manual_seed(0)
    return _randomise(timm.create_model("levit_128s", pretrained=False, img_size=64, embed_dim=(32, 48, 64), key_dim=8,
                                        num_heads=(2, 3, 4), depth=(1, 1, 1), **kw))


def _levit_qk(attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, H, N_q, d_k) and k (B, H, N_k, d_k) as LeViT's forward computes them, with its own Linear/conv + BN."""
    heads, kd = attn.num_heads, attn.key_dim
    if attn.use_conv:
        b = x.shape[0]
        if hasattr(attn, "qkv"):
            q, k, _ = attn.qkv(x).view(b, heads, -1, x.shape[2] * x.shape[3]).split([kd, kd, attn.val_dim], dim=2)
        else:
            k, _ = attn.kv(x).view(b, heads, -1, x.shape[2] * x.shape[3]).split([kd, attn.val_dim], dim=2)
            q = attn.q(x).view(b, heads, kd, -1)
        return q.transpose(-1, -2), k.transpose(-1, -2)
    b, n, _ = x.shape
    if hasattr(attn, "qkv"):
        q, k, _ = attn.qkv(x).view(b, n, heads, -1).split([kd, kd, attn.val_dim], dim=3)
    else:
        k, _ = attn.kv(x).view(b, n, heads, -1).split([kd, attn.val_dim], dim=3)
        q = attn.q(x).view(b, -1, heads, kd)
    return q.transpose(1, 2), k.transpose(1, 2)


def test_fold_batchnorm_is_the_module_in_eval_mode():
    linear, bn = nn.Linear(6, 5), nn.BatchNorm1d(5)
    _randomise(nn.Sequential(linear, bn))
    x = torch.randn(7, 6)
    w, b = fold_batchnorm(linear, bn)
    with torch.no_grad():
        assert torch.allclose(torch.nn.functional.linear(x, w, b), bn(linear(x)), atol=1e-6)


@pytest.mark.parametrize("variant", ["levit_128s", "levit_conv_128s"])
def test_levit_maps_modes_and_bias_against_its_own_q_k(variant: str):
    """Both LeViT attentions (Attention; AttentionDownsample, whose queries are the subsampled grid), linear and conv:
    maps = softmax(scale·q·k + the table read at the position index), q and k from the model's Linear/conv + BN here;
    the modes of the folded W_q^T W_k rebuild scale·q·k between the tokens that enter W_q and W_k."""
    import timm

    torch.manual_seed(0)
    model = _randomise(timm.create_model(variant, pretrained=False, img_size=64, embed_dim=(32, 48, 64), key_dim=8,
                                         num_heads=(2, 3, 4), depth=(1, 1, 1)))
    run, seen, _, bias = _record(model, _images(64))
    kinds = {type(model.get_submodule(s.path)).__name__ for s in run.sites}
    assert kinds == {"Attention", "AttentionDownsample"}
    for site in run.sites:
        attn = model.get_submodule(site.path)
        with torch.no_grad():
            q, k = _levit_qk(attn, seen[site.layer])
            table = attn.attention_biases[:, attn.attention_bias_idxs]  # (H, N_q, N_k), indexed here
            content = (q @ k.transpose(-1, -2)) * attn.scale
        maps = run.attention(site.layer, "full")
        assert maps.shape == content.shape  # (B, H, N_q, N_k): fewer queries than keys where it downsamples
        assert torch.allclose(maps, (content + table).softmax(-1), atol=1e-6)
        assert torch.allclose(run.bias(site.layer), table, atol=1e-7)
        assert torch.allclose(bias[site.layer][0], table, atol=1e-7)
        spectrum = run.spectrum(site.layer)
        rebuilt = torch.einsum("bhkn,hk,bhkm->bhnm", run.query(site.layer), spectrum.S, run.key(site.layer)) * site.scale
        assert float((rebuilt - content).abs().max()) < 1e-4 * float(content.abs().max())
    downsampling = [s for s in run.sites if type(model.get_submodule(s.path)).__name__ == "AttentionDownsample"]
    assert downsampling and all(run.query(s.layer).shape[-1] < run.key(s.layer).shape[-1] for s in downsampling)


def test_levit_refused_with_batchnorm_in_training_mode():
    model = _levit().train()
    with pytest.raises(QKHooksError, match="training mode"):
        with qkhooks.record(model, modes=4):
            model(_images(64))


def test_shvit_single_head_on_its_normalised_channel_slice():
    """SHSA: one head over the first pdim channels after the module's own pre_norm (a GroupNorm over the whole map),
    q/k from a 1x1 conv + BN: maps = softmax(scale·q·k), q and k computed here with the model's own modules."""
    import timm

    torch.manual_seed(0)
    model = _randomise(timm.create_model("shvit_s1", pretrained=False, embed_dim=(32, 48, 64), partial_dim=(8, 12, 16),
                                         qk_dim=(8, 8, 8), depth=(1, 1, 1), types=("s", "s", "s")))
    run, seen, _, _ = _record(model, _images(64))
    assert run.sites and all(s.num_heads == 1 for s in run.sites)
    for site in run.sites:
        attn = model.get_submodule(site.path)
        with torch.no_grad():
            x = attn.pre_norm(seen[site.layer][:, : attn.pdim])
            q, k, _ = attn.qkv(x).flatten(2).split([attn.qk_dim, attn.qk_dim, attn.pdim], dim=1)
            content = (q.transpose(-1, -2) @ k)[:, None] * attn.scale  # (B, 1, N, N)
        assert torch.allclose(run.attention(site.layer, "full"), content.softmax(-1), atol=1e-6)
        spectrum = run.spectrum(site.layer)
        rebuilt = torch.einsum("bhkn,hk,bhkm->bhnm", run.query(site.layer), spectrum.S, run.key(site.layer)) * site.scale
        assert float((rebuilt - content).abs().max()) < 1e-4 * float(content.abs().max())


def test_prepared_tokens_have_no_residual_counterpart():
    model = _levit()
    with pytest.raises(QKHooksError, match="input='normed'"):
        with qkhooks.record(model, modes=4, input="residual"):
            model(_images(64))


def test_efficientformer_v2_talking_heads_and_local_queries_against_its_own_convs():
    """Attention2d: maps = th2(softmax(th1(scale·q·k + table))) with the model's own 1x1 convs over heads, on the map its
    stride_conv makes; the mixed form's modes (mixed_spectrum) rebuild th1's mixed logits. Attention2dDownsample:
    queries from local(x) + pool(x), maps (B, H, N/4, N). q and k from the model's conv + BN, computed here."""
    import timm

    from qkhooks.models.class_attention import mixed_spectrum

    torch.manual_seed(0)
    model = _randomise(timm.create_model("efficientformerv2_s0", pretrained=False, img_size=64, depths=(1, 1, 2, 2),
                                         embed_dims=(16, 16, 32, 32), num_vit=2))
    live = qkhooks.sites(model)
    run, seen, _, _ = _record(model, _images(64))
    kinds = [(type(s.module).__name__, getattr(s.module, "stride_conv", None) is not None) for s in live]
    assert {("Attention2d", True), ("Attention2d", False), ("Attention2dDownsample", False)} <= set(kinds)
    for site in live:
        attn, x = site.module, seen[site.layer]
        with torch.no_grad():
            if hasattr(attn, "talking_head1"):
                x = x if attn.stride_conv is None else attn.stride_conv(x)
            q, k = (proj(x).flatten(2).unflatten(1, (attn.num_heads, -1)) for proj in (attn.q, attn.k))  # (B, H, d_k, N)
            content = (q.transpose(-1, -2) @ k) * attn.scale
            logits = content + attn.attention_biases[:, attn.attention_bias_idxs]
            if not hasattr(attn, "talking_head1"):
                assert torch.allclose(run.attention(site.layer, "full"), logits.softmax(-1), atol=1e-6)
                assert run.attention(site.layer, "full").shape[-2] * 4 == run.attention(site.layer, "full").shape[-1]
                continue
            want = attn.talking_head2(attn.talking_head1(logits).softmax(-1))
            assert torch.allclose(run.attention(site.layer, "full"), want, atol=1e-6)
            spectrum = mixed_spectrum(site)  # augmented: [x; 1], biases folded in
            tokens = torch.cat([x.flatten(2), x.new_ones(x.shape[0], 1, x.shape[2] * x.shape[3])], 1).double()  # (B, d+1, N)
            u = torch.einsum("hdk,bdn->bhkn", spectrum.U.double(), tokens)
            v = torch.einsum("hdk,bdn->bhkn", spectrum.V.double(), tokens)
            mixed = torch.einsum("bhkn,hk,bhkm->bhnm", u, spectrum.S.double(), v) * site.scale
            mix = attn.talking_head1.weight.flatten(1).double()
            ref = torch.einsum("gh,bhnm->bgnm", mix, content.double())
            assert float((mixed - ref).abs().max()) < 1e-6 * float(ref.abs().max())


@pytest.mark.parametrize("windows", [(4, 4, 4, 2), (3, 3, 3, 3)], ids=["tiled", "padded"])
def test_tiny_vit_windows_after_its_own_layernorm(windows: tuple[int, ...]):
    """TinyViT: the block cuts (and pads with zeros) the windows, the module's LayerNorm makes the tokens entering qkv
    (LN of a padding token is β, not zero). Maps (B, nW, H, Nw, Nw) = softmax(scale·q·k + table) with q, k from the
    module's own norm and qkv here; grid modes rebuild scale·q·k inside every window (padding positions excepted)."""
    import timm

    torch.manual_seed(0)
    model = _randomise(timm.create_model("tiny_vit_5m_224", pretrained=False, embed_dims=(16, 16, 32, 32),
                                         depths=(1, 2, 1, 1), num_heads=(1, 2, 2, 2), window_sizes=windows))
    grids: dict[str, tuple[int, int]] = {}
    handles = [b.register_forward_pre_hook(lambda m, a, p=p: grids.__setitem__(p, tuple(a[0].shape[1:3])))
               for p, b in model.named_modules() if type(b).__name__ == "TinyVitBlock"]
    run, seen, _, _ = _record(model, _images(64))
    for h in handles:
        h.remove()
    padded = 0
    for site in run.sites:
        attn = model.get_submodule(site.path)
        (gh, gw), ws = grids[site.block_path], model.get_submodule(site.block_path).window_size
        with torch.no_grad():
            xw = seen[site.layer]  # (B·nW, Nw, C) as the block hands them
            q, k, _ = attn.qkv(attn.norm(xw)).view(*xw.shape[:2], attn.num_heads, -1).split(
                [attn.key_dim, attn.key_dim, attn.val_dim], dim=3)
            content = (q.transpose(1, 2) @ k.permute(0, 2, 3, 1)) * attn.scale  # (B·nW, H, Nw, Nw)
            table = attn.attention_biases[:, attn.attention_bias_idxs]
        maps = run.attention(site.layer, "full")  # (B, nW, H, Nw, Nw)
        assert torch.allclose(maps.flatten(0, 1), (content + table).softmax(-1), atol=1e-6)
        # the grid index of every window position, cut here as the block does: pad bottom/right, windows row-major
        ph, pw = -(-gh // ws) * ws, -(-gw // ws) * ws
        index = torch.full((ph, pw), -1)
        index[:gh, :gw] = torch.arange(gh * gw).view(gh, gw)
        index = index.view(ph // ws, ws, pw // ws, ws).transpose(1, 2).reshape(-1, ws * ws)
        content = content.unflatten(0, (-1, index.shape[0]))
        spectrum = run.spectrum(site.layer)
        query, key = run.query(site.layer), run.key(site.layer)  # (B, H, K, gh·gw) on the image grid
        for w, cell in enumerate(index):
            if bool((cell < 0).any()):
                padded += 1
                continue
            rebuilt = torch.einsum("bhkn,hk,bhkm->bhnm", query[..., cell], spectrum.S, key[..., cell]) * site.scale
            assert float((rebuilt - content[:, w]).abs().max()) < 1e-4 * float(content.abs().max())
    assert (padded > 0) == (windows == (3, 3, 3, 3))


@pytest.mark.parametrize("variant", ["levit_128s", "efficientformerv2_s0"])
def test_rows_are_the_full_maps_rows(variant: str):
    """Rows of chosen queries (computed from the query tokens alone, keys never formed where that is cheaper) are the
    rows of the full maps: subsampled and local queries, biases, and talking heads included."""
    import timm

    kw = dict(embed_dim=(32, 48, 64), key_dim=8, num_heads=(2, 3, 4), depth=(1, 1, 1)) if variant.startswith("levit") \
        else dict(depths=(1, 1, 2, 2), embed_dims=(16, 16, 32, 32), num_vit=2)
    torch.manual_seed(0)
    model = _randomise(timm.create_model(variant, pretrained=False, img_size=64, **kw))
    for site in qkhooks.sites(model):
        with qkhooks.record(model, modes=None, layers=[site.layer], attention="rows+full") as run, torch.no_grad():
            run(_images(64))
            tokens = torch.as_tensor(run.last.meta["query_tokens"])
            full, rows = run.attention(site.layer, "full"), run.attention(site.layer, "rows")
        want = torch.stack([full[b][:, tokens[b]] for b in range(full.shape[0])])
        assert torch.allclose(rows, want, atol=1e-6), site.path


def test_a_q_k_conv_that_mixes_tokens_is_refused():
    """A projection conv wider than 1x1 is no per-token affine map: refused, not folded."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("levit_conv_128s", pretrained=False, img_size=64, embed_dim=(32, 48, 64), key_dim=8,
                              num_heads=(2, 3, 4), depth=(1, 1, 1)).eval()
    first = next(m for m in model.modules() if type(m).__name__ == "Attention")
    old = first.qkv.linear
    first.qkv.linear = nn.Conv2d(old.in_channels, old.out_channels, 3, padding=1, bias=False)
    with pytest.raises(QKHooksError, match="mixes neighbouring tokens"):
        qkhooks.sites(model)


def test_run_file_keeps_local_queries_and_every_key_of_a_downsampling_layer(tmp_path):
    """record_dataset on EfficientFormer-v2: the downsampling layer's stored query maps are its local queries
    (local(x) + pool(x), the map entering q.proj) on U and its key maps every token on V, projected here; its
    neighbours have as many queries but fewer keys, so per-layer states are kept apart (top-k included)."""
    import numpy as np
    import timm

    from qkhooks import load_model, open_run, record_dataset

    torch.manual_seed(0)
    model = _randomise(timm.create_model("efficientformerv2_s0", pretrained=False, depths=(1, 1, 2, 2),
                                         embed_dims=(16, 16, 32, 32), num_vit=2))
    attn = next(m for m in model.modules() if type(m).__name__ == "Attention2dDownsample")
    calls: list[torch.Tensor] = []
    handle = attn.register_forward_pre_hook(lambda m, a: calls.append(a[0].detach().clone()))
    try:
        path = tmp_path / "efv2.h5"
        record_dataset(load_model(model), "samples", path, limit=4, batch_size=2, progress=False, dtype="float32",
                       modes=4)
    finally:
        handle.remove()
    x = torch.cat(calls[1:]).double()  # the geometry probe's blank image first
    with torch.no_grad():
        x_q = (attn.q.local.double()(x) + attn.q.pool(x)).flatten(2)
    attn.q.local.float()
    with open_run(path) as run:
        layer = next(l for l in run.layers if run.geometry(l).query_tokens < run.geometry(l).key_tokens)
        spectrum = run.spectrum(layer)
        for side, tokens, vectors in (("query", x_q, spectrum.U), ("key", x.flatten(2), spectrum.V)):
            want = torch.einsum("ndm,hdk->nhkm", tokens, torch.as_tensor(np.asarray(vectors), dtype=torch.float64))
            got = torch.as_tensor(np.asarray(getattr(run, side)(layer)[:]), dtype=torch.float64)
            assert got.shape == want.shape
            assert float((got - want).abs().max()) < 1e-4 * max(1.0, float(want.abs().max()))
        assert run.geometry(layer).key_tokens == 4 * run.geometry(layer).query_tokens


def test_batchnorm_without_running_statistics_is_refused():
    """track_running_stats=False: BatchNorm uses each batch's statistics even in eval mode, so nothing folds."""
    model = _levit()
    first = next(m for m in model.modules() if type(m).__name__ == "Attention")
    first.qkv.bn = nn.BatchNorm1d(first.qkv.bn.num_features, track_running_stats=False)
    with pytest.raises(QKHooksError, match="running statistics"):
        qkhooks.sites(model)
