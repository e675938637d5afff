"""Packed vision towers (Qwen2-VL and the towers that copy it): one map per attention segment of the packed
sequence, checked against softmax(q·k) written out here from the module's own parameters and the call's own
cu_seqlens and rotary tables, segment by segment."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import qkhooks
from qkhooks import QKHooksError

sys.path.insert(0, str(Path(__file__).parent))
from test_zoo import _packed_inputs, perturb  # noqa: E402
from conftest import forward_with_hooks

transformers = pytest.importorskip("transformers")


def _qwen2_vl():
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

    cfg = transformers.Qwen2VLVisionConfig(depth=2, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2, patch_size=8,
                                           temporal_patch_size=1, spatial_merge_size=2, in_channels=3)
    torch.manual_seed(0)
    return perturb(Qwen2VisionTransformerPretrainedModel._from_config(cfg, attn_implementation="sdpa"))


def _qwen2_5_vl():
    """Blocks 0 and 2 attend within windows of 2x2 merge units (4x4 patches), block 1 within each image."""
    cfg = transformers.Qwen2_5_VLVisionConfig(depth=3, hidden_size=32, num_heads=4, intermediate_size=64, out_hidden_size=32,
                                              patch_size=8, temporal_patch_size=1, spatial_merge_size=2, in_channels=3,
                                              window_size=32, fullatt_block_indexes=[1])
    torch.manual_seed(0)
    return perturb(transformers.Qwen2_5_VisionTransformerPretrainedModel._from_config(cfg, attn_implementation="sdpa"))


def _exaone_grouped():
    """Exaone 4.5's tower with 4 query heads sharing 2 key heads (one fused qkv of q_dim + 2·kv_dim rows)."""
    cfg = transformers.Exaone4_5_VisionConfig(depth=2, hidden_size=32, num_heads=4, num_key_value_heads=2, intermediate_size=64,
                                              out_hidden_size=32, patch_size=8, temporal_patch_size=1, spatial_merge_size=2,
                                              in_channels=3)
    torch.manual_seed(0)
    return perturb(transformers.Exaone4_5_VisionModel._from_config(cfg, attn_implementation="sdpa"))


def _calls(model, inputs):
    """Each attention module's call, as the model made it: (tokens entering qkv, cu_seqlens, cos, sin)."""
    seen = []
    attns = [m for m in model.modules() if type(m).__name__.endswith("VisionAttention") or type(m).__name__ == "VisionAttention"]
    hooks = [a.register_forward_pre_hook(lambda m, a, k: seen.append((m, a[0] if a else k["hidden_states"], k["cu_seqlens"],
                                                                      *(k.get("position_embeddings") or (None, None)))),
                                         with_kwargs=True) for a in attns]
    forward_with_hooks(model, hooks, **inputs)
    return seen


def _rotate(t, cos, sin):
    """RoPE by halves, written out: (t_1, t_2) -> (t_1 cos - t_2 sin, t_2 cos + t_1 sin) per token (N, H, d)."""
    half = t.shape[-1] // 2
    turned = torch.cat([-t[..., half:], t[..., :half]], -1)
    return t * cos[:, None, :] + turned * sin[:, None, :]


def _reference(module, x, cu, cos, sin, heads, kv_heads=None):
    """Per segment: softmax(scale · q_rot k_rotᵀ) (H, n, n), and the unrotated content logits q·kᵀ (H, n, n)."""
    kv_heads = kv_heads or heads
    with torch.no_grad():
        out = torch.nn.functional.linear(x.double(), module.qkv.weight.double(), module.qkv.bias.double())
        d = out.shape[-1] // (heads + 2 * kv_heads)
        q = out[:, : heads * d].unflatten(-1, (heads, d))
        k = out[:, heads * d: (heads + kv_heads) * d].unflatten(-1, (kv_heads, d)).repeat_interleave(heads // kv_heads, 1)
        qr, kr = (q, k) if cos is None else (_rotate(q, cos.double(), sin.double()), _rotate(k, cos.double(), sin.double()))
        maps, content = [], []
        bounds = cu.tolist()
        for a, b in zip(bounds, bounds[1:]):
            logits = torch.einsum("nhd,mhd->hnm", qr[a:b], kr[a:b]) * d**-0.5
            maps.append(torch.softmax(logits, -1))
            content.append(torch.einsum("nhd,mhd->hnm", q[a:b], k[a:b]))
    return maps, content


@pytest.mark.parametrize("build", [_qwen2_vl, _qwen2_5_vl, _exaone_grouped], ids=["qwen2_vl", "qwen2_5_vl-windows", "exaone-gqa"])
def test_packed_maps_are_each_segments_own_softmax_of_the_rotated_q_k(build):
    model = build()
    inputs = _packed_inputs(model.config, type(model))  # two images: 4x6 and 2x4 patches
    calls = _calls(model, inputs)
    kv_heads = getattr(model.config, "num_key_value_heads", None)
    with torch.no_grad():
        plain = model(**inputs).last_hidden_state
        with qkhooks.record(model, modes="all", augmented=True, attention="full") as run:
            out = model(**inputs).last_hidden_state
            lengths = {s.layer: s.segment_lengths() for s in run.sites}
    assert torch.equal(out, plain)
    assert len(calls) == len(run.sites)
    full = run.attention_maps("full")
    for layer, (module, x, cu, cos, sin) in enumerate(calls):
        want, content = _reference(module, x, cu, cos, sin, run.sites[layer].num_heads, kv_heads)
        got = full[layer]
        assert lengths[layer] == tuple(int(n) for n in (cu[1:] - cu[:-1]))
        assert got.shape[0] == len(want) and got.shape[-1] == max(m.shape[-1] for m in want)  # one map per segment
        spectrum = run.spectrum[layer]
        modes = torch.einsum("bhkn,hk,bhkm->bhnm", run.query[layer].double(), spectrum.S.double(), run.key[layer].double())
        for s, (w, c) in enumerate(zip(want, content)):
            n = w.shape[-1]
            assert float((got[s, :, :n, :n].double() - w).abs().max()) < 1e-5
            assert int(torch.count_nonzero(got[s, :, n:])) == 0 and int(torch.count_nonzero(got[s, :, :, n:])) == 0
            # modes of W_q^T W_k (augmented: biases folded in) rebuild the unrotated content logits of the segment
            assert float((modes[s, :, :n, :n] - c).abs().max() / c.abs().max()) < 1e-5
            assert int(torch.count_nonzero(modes[s, :, n:])) == 0  # padding is no token


def test_qwen2_5_window_layers_hold_one_map_per_window_of_the_models_own_windowing():
    model = _qwen2_5_vl()
    inputs = _packed_inputs(model.config, type(model))
    from transformers.vision_utils import get_vision_window_index

    _, cu_windows = get_vision_window_index(inputs["grid_thw"], spatial_merge_size=2, window_size=32, patch_size=8)
    windows = torch.unique_consecutive(torch.as_tensor(cu_windows))
    with torch.no_grad(), qkhooks.record(model, modes=None, attention="full") as run:
        model(**inputs)
        lengths = [s.segment_lengths() for s in run.sites]
    per_window = tuple(int(n) for n in windows[1:] - windows[:-1])
    assert len(per_window) == 3  # 4x6 patches: windows of 4x4 and 4x2; 2x4 patches: one window
    assert lengths == [per_window, (24, 8), per_window]
    assert [tuple(m.shape) for m in run.attention_maps("full").values()] == [(3, 4, 16, 16), (2, 4, 24, 24), (3, 4, 16, 16)]


def test_packed_refusals_name_the_module_and_the_reason():
    model = _qwen2_vl()
    inputs = _packed_inputs(model.config, type(model))
    with pytest.raises(QKHooksError, match=r"blocks\.0\.attn.*input='normed'"):
        with torch.no_grad(), qkhooks.record(model, modes=4, input="residual"):
            model(**inputs)
    with pytest.raises(QKHooksError, match=r"blocks\.0\.attn.*no single patch grid"):  # no centre patch to default to
        with torch.no_grad(), qkhooks.record(model, modes=None, attention="rows"):
            model(**inputs)
    with pytest.raises(QKHooksError, match=r"blocks\.0\.attn.*differ in length"):  # rows pick one token for all images
        with torch.no_grad(), qkhooks.record(model, modes=None, attention="rows") as run:
            run.set_batch(query_tokens=torch.tensor([[0], [1]]))
            model(**inputs)
    with pytest.raises(QKHooksError, match="more than once"):  # one SDPA call per segment
        with torch.no_grad(), qkhooks.record(model, modes=None, attention="full", outputs="eager"):
            model(**inputs)
    with pytest.raises(QKHooksError, match="no single patch grid"):
        qkhooks.sites(model)[0].grid_for(24)
    from qkhooks.stream import probe_geometry

    with pytest.raises(QKHooksError, match=r"run file: blocks\.0\.attn: a packed vision tower"):  # record_dataset's first step
        probe_geometry(model, qkhooks.sites(model), (32, 48))


def test_images_of_one_grid_are_a_batch_rows_included():
    """Equal segments need no padding: the rows of the centre token are the full maps' rows."""
    model = _qwen2_vl()
    inputs = _packed_inputs(model.config, type(model), grids=((1, 4, 4), (1, 4, 4)))
    tokens = torch.tensor([[0, 5], [3, 15]])
    with torch.no_grad(), qkhooks.record(model, modes=None, attention=["full", "rows"]) as run:
        run.set_batch(query_tokens=tokens)
        model(**inputs)
        bias = [s.logit_bias() for s in run.sites]
    assert bias == [None, None]  # no padding, no mask
    for layer in run.layers:
        full, rows = run.attention_maps("full")[layer], run.attention_maps("rows")[layer]
        assert full.shape == (2, 4, 16, 16)
        want = torch.gather(full, 2, tokens.long()[:, None, :, None].expand(-1, 4, -1, 16))
        assert float((rows - want).abs().max()) < 1e-6


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["heads", "grouped-query"])
def test_hf_gemma4_vision_maps_are_the_models_eager_weights_on_a_padded_batch(kv_heads):
    """transformers' Gemma4VisionModel: q/k RMSNorm, 2-D RoPE, scale 1, the second image padded (its keys masked)."""
    from test_zoo import _gemma4_padded

    cfg = transformers.Gemma4VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=kv_heads, head_dim=8, patch_size=8, position_embedding_size=64)
    torch.manual_seed(0)
    model = perturb(transformers.Gemma4VisionModel._from_config(cfg, attn_implementation="eager"))
    inputs = _gemma4_padded()
    with torch.no_grad():
        own = model(**inputs, output_attentions=True)
        with qkhooks.record(model, modes=None, attention="full") as run:
            out = model(**inputs)
    assert torch.equal(out.last_hidden_state, own.last_hidden_state)
    weights = own.attentions  # the model's own eager softmax per layer (B, H, N, N)
    assert len(weights) == 2 and [s.family for s in run.sites] == ["hf-gemma4-vision"] * 2
    for layer, want in enumerate(weights):
        got = run.attention_maps("full")[layer]
        assert got.shape == want.shape == (2, 4, 36, 36)
        assert float((got - want).abs().max()) < 1e-5
        assert int(torch.count_nonzero(got[1, :, :, 18:])) == 0  # the padded image's padding keys get no weight


def test_hf_gemma4_vision_clamping_q_k_projections_are_refused():
    cfg = transformers.Gemma4VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=4, head_dim=8, patch_size=8, position_embedding_size=64,
                                          use_clipped_linears=True)
    model = transformers.Gemma4VisionModel._from_config(cfg).eval()
    assert len(qkhooks.sites(model)) == 2  # infinite bounds clamp nothing
    model.encoder.layers[1].self_attn.k_proj.output_max.fill_(3.0)
    with pytest.raises(QKHooksError, match=r"encoder\.layers\.1\.self_attn.*clamp"):
        qkhooks.sites(model)
