"""Attention whose q or k is made inside the module (qkhooks.models.inside): maps taken in the module's own forward,
modes refused naming the layer. References are written out here from the model's parameters and the tensors its
modules receive (plain forward hooks), never from qkhooks' own capture."""

from __future__ import annotations

import pytest
import torch

import qkhooks
from qkhooks.errors import QKHooksError
from test_zoo import perturb
from conftest import forward_with_hooks


def _images(size: int = 64, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def _calls(model: torch.nn.Module, cls: str, *args, **kwargs) -> tuple[torch.Tensor, dict[str, list[list]]]:
    """The model's first output tensor and, per module of class ``cls`` in forward order, the tensors of each of its
    calls (positional, then keyword; cloned), taken with plain hooks."""
    seen: dict[str, list[list]] = {}

    def keep(m: torch.nn.Module, a: tuple, k: dict, name: str) -> None:
        seen.setdefault(name, []).append([t.detach().clone() for t in (*a, *k.values()) if isinstance(t, torch.Tensor)])

    handles = [m.register_forward_pre_hook(lambda m, a, k, n=n: keep(m, a, k, n), with_kwargs=True)
               for n, m in model.named_modules() if type(m).__name__ == cls]
    out = forward_with_hooks(model, handles, *args, **kwargs)
    return (out if isinstance(out, torch.Tensor) else out.last_hidden_state), seen


# --------------------------------------------------------------------------------------------------- GCViT
def _gcvit() -> torch.nn.Module:
    import timm

    torch.manual_seed(0)
    return perturb(timm.create_model("gcvit_xxtiny", pretrained=False, img_size=64)).eval()


def test_gcvit_global_query_maps_are_softmax_of_the_stage_queries_against_the_window_keys():
    """Global blocks: maps (B, nW, H, Nw, Nw) equal softmax(scale·q_global·W_k x + RelPosBias) written out from the
    q_global and window tokens the module receives and its own qkv; outputs bit-identical; every block is a site, in
    forward order."""
    model, images = _gcvit(), _images()
    plain, calls = _calls(model, "WindowAttentionGlobal", images)
    with torch.no_grad(), qkhooks.record(model, modes=0, attention="full") as rec:
        out = model(images)
    assert torch.equal(out, plain)
    assert [rec.module_paths[l] for l in rec.layers] == list(calls)
    glob = [l for l in rec.layers if model.get_submodule(rec.module_paths[l]).use_global]
    assert glob and len(glob) < len(rec.layers)
    for layer in glob:
        module = model.get_submodule(rec.module_paths[layer])
        (x, q_global), = calls[rec.module_paths[layer]]
        b, n, c = x.shape
        heads = module.num_heads
        with torch.no_grad():
            k = torch.nn.functional.linear(x, module.qkv.weight[:c], module.qkv.bias[:c])
            k = k.view(b, n, heads, -1).transpose(1, 2)
            q = q_global.repeat_interleave(b // q_global.shape[0], dim=0).reshape(b, n, heads, -1).transpose(1, 2)
            bias = module.rel_pos.relative_position_bias_table[module.rel_pos.relative_position_index.view(-1)]
            bias = bias.view(n, n, heads).permute(2, 0, 1)
            want = torch.softmax(q @ k.transpose(-1, -2) * module.scale + bias, dim=-1)
        got = rec.attention(layer, "full")
        assert got.shape[:2] == (2, b // 2) and got.shape[2:] == want.shape[1:]
        torch.testing.assert_close(got.flatten(0, 1), want, atol=1e-6, rtol=0)


def test_modes_of_a_global_query_block_are_refused_naming_the_layer_the_reason_and_modes_0():
    model = _gcvit()
    with pytest.raises(QKHooksError, match=r"layer 1 \(stages\.0\.blocks\.1\.attn, WindowAttentionGlobal\) is recorded as "
                                           r"maps only: its queries are the stage's global query tokens.*no W_q.*modes=0"):
        qkhooks.record(model, modes=4, attention="full")
    local = qkhooks.record(model, modes=4, layers=[0], attention="full")  # the local block keeps its modes
    assert local.qk_spectrum is not None
    with pytest.raises(QKHooksError, match=r"maps only.*'rows' attention is not rebuilt for it: record attention='full'"):
        qkhooks.record(model, modes=0, attention="rows")
    with pytest.raises(QKHooksError, match=r"maps only.*no W_q\^T W_k of its tokens to analyse"):
        qkhooks.spectrum(model)


# ------------------------------------------------------------------------------------------ EfficientViT-MSRA
def _cascade_written_out(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B', H, N, N): each head's softmax(scale·dws(q)ᵀk + bias) with head h fed its split plus head h-1's output."""
    b, _, h, w = x.shape
    splits, maps, feat = x.chunk(module.num_heads, dim=1), [], None
    bias = module.attention_biases[:, module.attention_bias_idxs]
    for head in range(module.num_heads):
        feat = splits[0] if head == 0 else feat + splits[head]
        q, k, v = module.qkvs[head](feat).view(b, -1, h, w).split([module.key_dim, module.key_dim, module.val_dim], dim=1)
        q, k, v = module.dws[head](q).flatten(2), k.flatten(2), v.flatten(2)
        attn = torch.softmax(q.transpose(-2, -1) @ k * module.scale + bias[head], dim=-1)
        maps.append(attn)
        feat = (v @ attn.transpose(-2, -1)).view(b, module.val_dim, h, w)
    return torch.stack(maps, dim=1)


@pytest.mark.parametrize("size, windows", [(64, 1), (96, 4)], ids=["one-window", "padded-windows"])
def test_efficientvit_msra_maps_are_its_cascaded_heads_written_out_per_window(size, windows):
    """Maps (B, nW, H, N, N) equal the cascade written out here from each module's own convs, BatchNorms and bias
    table, on the windows its block cuts (at 96 px the first stage's 6x6 map pads to 2x2 windows of 4x4)."""
    import timm

    torch.manual_seed(0)
    model = perturb(timm.create_model("efficientvit_m0", pretrained=False, img_size=size, window_size=(4, 4, 4))).eval()
    images = _images(size)
    plain, calls = _calls(model, "CascadedGroupAttention", images)
    with torch.no_grad(), qkhooks.record(model, modes=None, attention="full") as rec:
        out = model(images)
    assert torch.equal(out, plain)
    assert [rec.module_paths[l] for l in rec.layers] == list(calls)
    assert rec.attention(0, "full").shape[1] == windows
    for layer in rec.layers:
        module = model.get_submodule(rec.module_paths[layer])
        with torch.no_grad():
            want = _cascade_written_out(module, calls[rec.module_paths[layer]][0][0])
        got = rec.attention(layer, "full")
        assert got.shape[0] == 2 and got.shape[2:] == want.shape[1:]
        torch.testing.assert_close(got.flatten(0, 1), want, atol=1e-6, rtol=0)
    with pytest.raises(QKHooksError, match=r"layer 0 .*maps only: its heads run in cascade.*modes=0"):
        qkhooks.record(model, modes="all")


def test_maps_only_layers_run_as_they_are_under_outputs_eager():
    """outputs='eager' computes a layer's attention once from the maps qkhooks rebuilds; a maps-only layer's maps are
    the ones the module computes, so it runs untouched: outputs bit-identical to the plain forward, maps equal to a
    default recording's (before, EfficientViT-MSRA's 3-D per-head softmaxes were refused as 'no softmax')."""
    import timm

    torch.manual_seed(0)
    model = perturb(timm.create_model("efficientvit_m0", pretrained=False, img_size=64, window_size=(4, 4, 4))).eval()
    images = _images(64)
    with torch.no_grad():
        plain = model(images)
    with torch.no_grad(), qkhooks.record(model, modes=None, attention="full") as unchanged:
        model(images)
    with torch.no_grad(), qkhooks.record(model, modes=None, attention="full", outputs="eager") as eager:
        out = model(images)
    assert torch.equal(out, plain)
    for layer in unchanged.layers:
        assert torch.equal(eager.attention(layer, "full"), unchanged.attention(layer, "full"))


# ------------------------------------------------------------------------------------------------ TimeSformer
def _timesformer():
    import transformers

    torch.manual_seed(0)
    config = transformers.TimesformerConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                            intermediate_size=64, image_size=32, patch_size=8, num_frames=4)
    return perturb(transformers.TimesformerModel(config)).eval()


def test_timesformer_time_and_space_attention_are_their_own_sites_exact_per_group():
    """Divided space-time: per block a time site (P groups of T frames) then a space site (T groups of the class
    token's copy + P patches), numbered in the order the block runs them; maps (B, G, H, n, n) equal softmax(scale·q·k)
    written out from each call's group tokens and the module's qkv; the modes on the clip's token axis rebuild
    the content logits of every group (the token of group g, position i is window_index()[g, i])."""
    model = _timesformer()
    clip = torch.randn(2, 4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    plain, seen = _calls(model, "TimesformerSelfAttention", pixel_values=clip)
    calls = [(name, seen[name][0][0]) for name in seen]
    with torch.no_grad(), qkhooks.record(model, modes="all", augmented=True, attention="full") as rec:
        out = model(pixel_values=clip).last_hidden_state
        index = {s.layer: s.window_index().clone() for s in rec.sites}
    assert torch.equal(out, plain)
    assert [rec.module_paths[l] for l in rec.layers] == [n for n, _ in calls] == [
        "encoder.layer.0.temporal_attention.attention", "encoder.layer.0.attention.attention",
        "encoder.layer.1.temporal_attention.attention", "encoder.layer.1.attention.attention"]
    patches, frames = 16, 4
    for layer, (name, x) in enumerate(calls):
        module = model.get_submodule(name)
        with torch.no_grad():
            q, k, _ = module.qkv(x).view(x.shape[0], x.shape[1], 3, 4, 8).permute(2, 0, 3, 1, 4)
            logits = q @ k.transpose(-1, -2) * module.scale
        got = rec.attention(layer, "full")
        groups = patches if "temporal" in name else frames
        assert got.shape == (2, groups, 4, x.shape[1], x.shape[1])
        torch.testing.assert_close(got.flatten(0, 1), torch.softmax(logits, -1), atol=1e-6, rtol=0)
        query, key, spectrum = rec.query(layer), rec.key(layer), rec.spectrum(layer)
        assert query.shape[-1] == (patches * frames if "temporal" in name else 1 + patches * frames)
        pos = index[layer]  # (G, n) clip tokens
        qg, kg = query[..., pos].permute(0, 3, 1, 2, 4), key[..., pos].permute(0, 3, 1, 2, 4)  # (B, G, H, K, n)
        content = torch.einsum("bghkn,hk,bghkm->bghnm", qg, spectrum.S, kg) * module.scale
        # the augmented modes (biases folded in) rebuild the logits
        want = logits.unflatten(0, (2, groups))
        torch.testing.assert_close(content, want, atol=1e-4, rtol=0)
    with pytest.raises(QKHooksError, match=r"time attention runs within its groups.*record attention='full'"):
        qkhooks.record(model, modes=0, attention="rows")


# ---------------------------------------------------------------------------------------------------- VidEoMT
def test_videomt_per_frame_layers_keep_every_frames_call_frames_as_images():
    """VidEoMT's last num_blocks layers run once per frame: each is one site whose T calls are joined, image-major
    (b·T + t, the order of its first layers' frames-as-images axis); the maps of every call equal softmax(scale·q·k)
    written out from that call's tokens and the module's q_proj / k_proj, and the augmented modes rebuild them."""
    import transformers

    torch.manual_seed(0)
    config = transformers.VideomtConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                                        image_size=32, patch_size=8, num_queries=5, num_blocks=2)
    model = perturb(transformers.VideomtForUniversalSegmentation(config)).eval()
    clip = torch.randn(2, 3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    plain, seen = _calls(model, "VideomtAttention", pixel_values_videos=clip)
    calls = {name: [call[0] for call in each] for name, each in seen.items()}
    assert [len(c) for c in calls.values()] == [1, 3, 3]  # the last two layers: once per frame
    with torch.no_grad(), qkhooks.record(model, modes="all", augmented=True, attention="full") as rec:
        out = model(pixel_values_videos=clip).last_hidden_state
    assert torch.equal(out, plain)
    assert [rec.module_paths[l] for l in rec.layers] == list(calls) and rec.n == 6
    for layer, (name, xs) in enumerate(calls.items()):
        module = model.get_submodule(name)
        x = torch.stack(xs, dim=1).flatten(0, 1) if len(xs) > 1 else xs[0]  # (B·T, N, d): b·T + t
        with torch.no_grad():
            q, k = (proj(x).unflatten(-1, (4, 8)).transpose(1, 2) for proj in (module.q_proj, module.k_proj))
            logits = q @ k.transpose(-1, -2) * module.scale
        torch.testing.assert_close(rec.attention(layer, "full"), torch.softmax(logits, -1), atol=1e-6, rtol=0)
        content = torch.einsum("bhkn,hk,bhkm->bhnm", rec.query(layer), rec.spectrum(layer).S, rec.key(layer)) * module.scale
        torch.testing.assert_close(content, logits, atol=1e-4, rtol=0)
    assert rec.sites[1].num_prefix_tokens == rec.sites[0].num_prefix_tokens + 5  # the object queries
    with torch.no_grad(), qkhooks.record(model, modes=0, layers=[1, 2], attention="full") as frames_only:
        model(pixel_values_videos=clip)  # the first recorded layer runs once per frame: still one batch of 6 frames
    assert frames_only.n == 6 and frames_only.images_seen == 6
    for layer in (1, 2):
        assert torch.equal(frames_only.attention(layer, "full"), rec.attention(layer, "full"))
    with pytest.raises(QKHooksError, match=r"runs it once per frame.*record attention='full'"):
        qkhooks.record(model, modes=0, attention="rows")


def test_a_layer_run_twice_in_one_forward_is_refused_not_recorded_once():
    """A module the forward calls twice (here a ViT's second block used twice) would keep only its last call: refused,
    named."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, embed_dim=32, num_heads=2, img_size=32,
                              patch_size=8).eval()
    model.blocks = torch.nn.Sequential(model.blocks[0], model.blocks[1], model.blocks[1])
    with pytest.raises(QKHooksError, match=r"layer 1 \(blocks\.1\.attn, Attention\) ran more than once in one forward"):
        with torch.no_grad(), qkhooks.record(model, modes=4) as rec:
            rec(_images(32))


def test_the_first_recorded_layer_run_twice_in_one_forward_is_refused_not_split_into_two_batches():
    """The first layer used twice: its second call must not open a new batch (which dropped the first call and every
    layer between without a word); refused, named, and nothing handed to the sinks."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, embed_dim=32, num_heads=2, img_size=32,
                              patch_size=8).eval()
    model.blocks = torch.nn.Sequential(model.blocks[0], model.blocks[0], model.blocks[1])
    handed: list = []
    with pytest.raises(QKHooksError, match=r"layer 0 \(blocks\.0\.attn, Attention\) ran more than once in one forward"):
        with torch.no_grad(), qkhooks.record(model, modes=4) as rec:
            rec.sinks.append(type("Sink", (), {"update": lambda self, batch: handed.append(batch)})())
            rec(_images(32))
    assert handed == [] and rec.images_seen == 0


# ------------------------------------------------------------------------------- the mechanism on its own
def test_maps_taken_from_a_fused_sdpa_call_equal_the_models_eager_softmax():
    """InsideCall's SDPA path: a timm ViT attention running fused SDPA, described as a maps-only site, gives maps equal
    to the same module's eager softmax (fused_attn=False, taken at its attn_drop), outputs bit-identical."""
    import dataclasses

    import timm

    from qkhooks.models.base import AttentionSite
    from qkhooks.models.inside import InsideSite

    torch.manual_seed(0)
    model = perturb(timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, embed_dim=32, num_heads=2,
                                      img_size=32, patch_size=8)).eval()
    for block in model.blocks:
        block.attn.fused_attn = True
    images = _images(32)
    sites = [InsideSite(**{f.name: getattr(s, f.name) for f in dataclasses.fields(AttentionSite)}, inside="test: q, k "
                        "read from the SDPA call") for s in qkhooks.sites(model)]
    with torch.no_grad(), qkhooks.record(model, modes=0, attention="full", sites=sites) as rec:
        out = model(images)
    eager: dict[int, torch.Tensor] = {}
    handles = [b.attn.attn_drop.register_forward_hook(lambda m, a, o, i=i: eager.__setitem__(i, o.detach().clone()))
               for i, b in enumerate(model.blocks)]
    try:
        for block in model.blocks:
            block.attn.fused_attn = False
        with torch.no_grad():
            plain = model(images)
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(out, plain, atol=1e-5, rtol=0)  # fused vs eager: rounding only
    for layer in rec.layers:
        torch.testing.assert_close(rec.attention(layer, "full"), eager[layer], atol=1e-6, rtol=0)


def test_a_maps_only_layer_is_refused_by_run_files_naming_it(tmp_path):
    from qkhooks.models.load import load_model
    from qkhooks.stream import record_dataset

    loaded = load_model(_gcvit())
    with pytest.raises(QKHooksError, match=r"run file: stages\.0\.blocks\.1\.attn: layer 1 .*maps only.*record it live"):
        record_dataset(loaded, "samples", tmp_path / "gcvit.h5", limit=2, progress=False, reducers=[], modes=0,
                       attention="full")
    assert not (tmp_path / "gcvit.h5").exists()
