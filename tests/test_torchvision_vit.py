"""torchvision's VisionTransformer (nn.MultiheadAttention, packed in_proj, class token first): recorded exactly against
references taken here, never qkhooks' own rebuild: the MultiheadAttention's own per-head weights (need_weights=True,
average_attn_weights=False) on the tokens a plain pre-hook saw, a dense numpy SVD of W_q^T W_k per head, q·k from the
packed in_proj written out here; the unmodelled forms and calls refused with their reasons; ``torchvision:`` specs."""

from __future__ import annotations

import hashlib
import http.server
import os
import socket
import threading
import types

import numpy as np
import pytest
import torch
from torch import nn

import qkhooks
from qkhooks import QKHooksError
from qkhooks.models import load
from test_zoo import perturb
from conftest import forward_with_hooks, pixel_spans_read

torchvision = pytest.importorskip("torchvision")
from torchvision.models.vision_transformer import VisionTransformer  # noqa: E402

HEADS, DIM, SIZE, PATCH = 4, 32, 32, 8


def tiny(**kw) -> VisionTransformer:
    torch.manual_seed(0)
    model = VisionTransformer(image_size=kw.pop("image_size", SIZE), patch_size=PATCH, num_layers=2, num_heads=HEADS,
                              hidden_dim=DIM, mlp_dim=64, **kw)
    return perturb(model)


def images(n: int = 2, size: int = SIZE, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def attentions(model: VisionTransformer) -> list[nn.MultiheadAttention]:
    return [block.self_attention for block in model.encoder.layers]


def tokens_seen(model: VisionTransformer, x: torch.Tensor) -> list[torch.Tensor]:
    """The query tensor each MultiheadAttention is handed in a plain forward (plain pre-hooks)."""
    seen: dict[int, torch.Tensor] = {}
    handles = [m.register_forward_pre_hook(lambda mod, args, i=i: seen.__setitem__(i, args[0].detach().clone()))
               for i, m in enumerate(attentions(model))]
    forward_with_hooks(model, handles, x)
    return [seen[i] for i in range(len(seen))]


def own_weights(model: VisionTransformer, x: torch.Tensor) -> list[torch.Tensor]:
    """Each MultiheadAttention's own per-head weights (B, H, N, N) on the tokens it was handed."""
    with torch.no_grad():
        return [m(t, t, t, need_weights=True, average_attn_weights=False)[1]
                for m, t in zip(attentions(model), tokens_seen(model, x))]


def packed_qk(mha: nn.MultiheadAttention) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(W_q, W_k) (H, d_k, d) and (b_q, b_k) (H, d_k) from the packed in_proj, in float64 numpy."""
    w = mha.in_proj_weight.detach().double().numpy()
    b = mha.in_proj_bias.detach().double().numpy()
    d, dk = w.shape[1], w.shape[1] // mha.num_heads
    return (w[:d].reshape(mha.num_heads, dk, d), w[d:2 * d].reshape(mha.num_heads, dk, d),
            b[:d].reshape(mha.num_heads, dk), b[d:2 * d].reshape(mha.num_heads, dk))


# ------------------------------------------------------------------------------------------ what is found
def test_sites_read_the_packed_in_proj_heads_class_token_and_grid():
    model = tiny()
    sites = qkhooks.sites(model)
    assert [s.path for s in sites] == [f"encoder.layers.encoder_layer_{i}.self_attention" for i in range(2)]
    assert [(s.layer, s.block_path, s.stage) for s in sites] == [(i, f"encoder.layers.encoder_layer_{i}", "encoder.layers")
                                                                for i in range(2)]
    assert [s.block for s in sites] == list(model.encoder.layers)
    for site, mha in zip(sites, attentions(model)):
        assert (site.num_heads, site.head_dim, site.dim, site.num_prefix_tokens) == (HEADS, DIM // HEADS, DIM, 1)
        assert site.grid == (SIZE // PATCH,) * 2 and site.patch_size == (PATCH, PATCH) and site.family == "torchvision-vit"
        assert site.scale == pytest.approx((DIM // HEADS) ** -0.5)
        w_q, w_k, b_q, b_k = packed_qk(mha)
        got = site.weights()
        np.testing.assert_array_equal(got.w_q.double().numpy(), w_q)
        np.testing.assert_array_equal(got.w_k.double().numpy(), w_k)
        np.testing.assert_array_equal(got.b_q.double().numpy(), b_q)
        np.testing.assert_array_equal(got.b_k.double().numpy(), b_k)
        with torch.no_grad():
            mha.in_proj_weight[0, 0] += 1.0  # read live: an edit of the weights is seen
        assert float(site.weights().w_q[0, 0, 0]) == pytest.approx(w_q[0, 0, 0] + 1.0)


# ------------------------------------------------------------------------------------------ maps, modes, outputs
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad-fused", "grad"])
def test_full_maps_are_the_attentions_own_weights_and_outputs_bit_identical(grad, monkeypatch):
    model, x = tiny(), images()
    want = own_weights(model, x)
    fused, native = [], torch._native_multi_head_attention
    monkeypatch.setattr(torch, "_native_multi_head_attention", lambda *a, **k: fused.append(1) or native(*a, **k))
    with torch.set_grad_enabled(grad):
        ref = model(x)  # no_grad in eval: torch's fused native MultiheadAttention kernel
        with qkhooks.record(model, attention="full", modes=4) as run:
            out = model(x)
    assert torch.equal(out, ref) and len(fused) == (0 if grad else 4)  # the fused kernel still runs while recorded
    for layer, w in enumerate(want):
        got = run.attention(layer, "full")
        assert got.shape == w.shape == (2, HEADS, 17, 17)
        assert float((got - w).abs().max()) < 1e-5
        assert run.geometry(layer).grid == (4, 4) and run.geometry(layer).num_prefix_tokens == 1


def test_modes_are_the_dense_svd_of_wq_t_wk_and_rebuild_q_dot_k():
    model, x = tiny(), images()
    spectrum = qkhooks.spectrum(model)
    with qkhooks.record(model, modes="all", augmented=True) as run, torch.no_grad():
        model(x)
    for layer, (mha, tokens) in enumerate(zip(attentions(model), tokens_seen(model, x))):
        w_q, w_k, b_q, b_k = packed_qk(mha)
        spec = spectrum.layers[layer]
        U, S, V = (np.asarray(t, np.float64) for t in (spec.U, spec.S, spec.V))
        for h in range(HEADS):
            dense = w_q[h].T @ w_k[h]
            np.testing.assert_allclose(S[h], np.linalg.svd(dense, compute_uv=False)[: S.shape[1]], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(U[h] @ np.diag(S[h]) @ V[h].T, dense, atol=1e-5)
        # the recorded modes (augmented: biases folded in) rebuild scale · q·k, with q, k written out from in_proj
        t = tokens.double().numpy()
        q = np.einsum("bnd,hkd->bhnk", t, w_q) + b_q[None, :, None]
        k = np.einsum("bnd,hkd->bhnk", t, w_k) + b_k[None, :, None]
        logits_ref = np.einsum("bhnk,bhmk->bhnm", q, k)
        query, key, s = run.query(layer), run.key(layer), run.spectrum(layer).S
        logits = torch.einsum("bhkn,hk,bhkm->bhnm", query.double(), s.double(), key.double()).numpy()
        np.testing.assert_allclose(logits, logits_ref, atol=1e-4 * np.abs(logits_ref).max())


def test_rows_are_the_full_maps_rows_at_the_class_token_and_centre_patch():
    model, x = tiny(), images()
    want = own_weights(model, x)
    with qkhooks.record(model, attention="rows") as run, torch.no_grad():
        model(x)
    centre = 1 + 2 * 4 + 2  # (rows // 2, cols // 2) of the 4x4 grid, after the class token
    for layer, w in enumerate(want):
        rows = run.attention(layer, "rows")
        assert float((rows - w[:, :, [0, centre]]).abs().max()) < 1e-5


def test_residual_input_is_the_blocks_input_before_ln_1():
    model, x = tiny(), images()
    seen: dict[int, torch.Tensor] = {}
    handles = [b.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, a[0].detach().clone()))
               for i, b in enumerate(model.encoder.layers)]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    with qkhooks.record(model, modes=2, input="residual", keep_inputs=True) as run, torch.no_grad():
        model(x)
    for layer in (0, 1):
        assert torch.equal(run.inputs(layer), seen[layer])


def test_outputs_eager_takes_the_attentions_own_weights_once():
    model, x = tiny(), images()
    want = own_weights(model, x)
    with torch.no_grad():
        ref = model(x)
        with qkhooks.record(model, attention="full", outputs="eager") as run:
            out = model(x)
    assert float((out - ref).abs().max()) < 1e-5
    for layer, w in enumerate(want):
        assert float((run.attention(layer, "full") - w).abs().max()) < 1e-5


def test_outputs_eager_refuses_attention_dropout_in_training_mode():
    model, x = tiny(attention_dropout=0.1), images()
    model.train()
    with pytest.warns(UserWarning), pytest.raises(QKHooksError, match="dropout_p=0.1"):
        with qkhooks.record(model, attention="full", outputs="eager"):
            model(x)


def test_the_grid_is_read_off_the_image_conv_proj_is_handed():
    """A model resized after it was built (image_size and a longer pos_embedding, as fine-tuning code does): the
    call's grid is its own, not the one found first."""
    model = tiny()
    qkhooks.sites(model)
    model.image_size = 48
    model.encoder.pos_embedding = nn.Parameter(torch.randn(1, 1 + 36, DIM))
    with qkhooks.record(model, attention="rows") as run, torch.no_grad():
        model(images(size=48))
    assert run.geometry(0).grid == (6, 6) and run.attention(0, "rows").shape[-1] == 37


def test_a_conv_stem_vit_is_exact_and_its_tokens_read_the_stems_pixels():
    from torchvision.models.vision_transformer import ConvStemConfig

    from qkhooks.data.masks import receptive_cells

    stem = [ConvStemConfig(out_channels=8, kernel_size=3, stride=2), ConvStemConfig(out_channels=8, kernel_size=3, stride=4)]
    model, x = tiny(conv_stem_configs=stem), images()
    want = own_weights(model, x)
    with qkhooks.record(model, attention="full") as run, torch.no_grad():
        model(x)
    site = run.sites[0]
    assert site.patch_size is None
    cells = receptive_cells((SIZE, SIZE), site.pixel_convs())
    assert (len(cells.rows), len(cells.cols)) == (4, 4)
    for layer, w in enumerate(want):
        assert float((run.attention(layer, "full") - w).abs().max()) < 1e-5


def _stem_vit() -> VisionTransformer:
    from torchvision.models.vision_transformer import ConvStemConfig

    stem = [ConvStemConfig(out_channels=8, kernel_size=3, stride=2), ConvStemConfig(out_channels=8, kernel_size=3, stride=4)]
    return tiny(conv_stem_configs=stem)


def _pixels_each_token_reads(model: VisionTransformer) -> tuple[tuple[tuple[int, int], ...], ...]:
    """The reference: per grid row (and column) of conv_proj's output, the span of input pixels its value depends on
    (nonzero gradient), with whatever hooks the stem carries."""
    x = torch.randn(1, 3, SIZE, SIZE, requires_grad=True)
    out = model.conv_proj(x)
    return pixel_spans_read(x, out)


def _flip_output(module, args, output):
    return output.flip(-1)


def _roll_input(module, args):
    return (torch.roll(args[0], 8, dims=-1),)


def _circular(model):
    model.conv_proj[0][0].padding_mode = "circular"


STEM_CHANGES = {  # how the stem is changed -> (do it, the module the refusal must name)
    "forward hook": (lambda m: m.conv_proj[0].register_forward_hook(_flip_output), "conv_proj.conv_bn_relu_0"),
    "forward pre-hook": (lambda m: m.conv_proj[1][0].register_forward_pre_hook(_roll_input), "conv_proj.conv_bn_relu_1.0"),
    "circular padding": (_circular, "conv_proj.conv_bn_relu_0.0"),
    "forward replaced": (lambda m: setattr(m.conv_proj[0][2], "forward", lambda t: t.flip(-2)), "conv_proj.conv_bn_relu_0.2"),
    "a pooling module": (lambda m: m.conv_proj[0].append(nn.AvgPool2d(3, stride=1, padding=1)), "conv_proj.conv_bn_relu_0.3"),
}


def test_a_conv_stems_cells_are_the_pixels_its_tokens_read():
    """The reference is the stem's own gradient: the plain stem's tokens read the cells receptive_cells gives."""
    from qkhooks.data.masks import receptive_cells

    model = _stem_vit()
    cells = receptive_cells((SIZE, SIZE), qkhooks.sites(model)[0].pixel_convs())
    assert (cells.rows, cells.cols) == _pixels_each_token_reads(model)


@pytest.mark.parametrize("change", list(STEM_CHANGES))
def test_a_conv_stem_that_reads_other_pixels_than_its_convolutions_say_is_refused_for_masks(change):
    """r48 fuzz: a hook on a module of the conv stem (a flip, a roll), a convolution padding circularly, a forward
    replaced on one, or a module that mixes neighbouring pixels added to the Sequential: the tokens read other pixels
    than the convolutions' kernels, strides and zero padding say, so masks read onto them would be wrong. Refused,
    naming the module; before, the cells of the plain stem were handed on."""
    from qkhooks.data.masks import receptive_cells

    model = _stem_vit()
    alter, path = STEM_CHANGES[change]
    alter(model)
    site = qkhooks.sites(model)[0]
    with pytest.raises(QKHooksError) as err:
        cells = receptive_cells((SIZE, SIZE), site.pixel_convs())
        assert (cells.rows, cells.cols) != _pixels_each_token_reads(model)  # what went through silently before
    assert f"'{path}'" in str(err.value) and "masks" in str(err.value), str(err.value)


# ------------------------------------------------------------------------------------------ spectrum CLI, BFD, run files
def test_bfd_equals_the_direct_numpy_computation():
    from qkhooks.analysis.bfd import run_bfd
    from test_bfd import assert_matches_reference, numpy_bfd

    model, x = tiny(), images(10, seed=2)
    result = run_bfd(model, x, batch_size=3, holdout_every=4)
    assert result["num_prefix_tokens"] == 1 and result["images"] == 10
    xs = [[], []]
    for chunk in x.split(3):
        for layer, t in enumerate(tokens_seen(model, chunk)):
            xs[layer].append(t)
    for layer, mha in enumerate(attentions(model)):
        w_q, w_k, _, _ = packed_qk(mha)
        ref = numpy_bfd(torch.cat(xs[layer]).double().numpy(), w_q, w_k, grid=(4, 4), prefix=1, holdout_every=4)
        assert_matches_reference(result, ref, layer)


def test_a_run_file_stores_the_recorded_modes_and_geometry(tmp_path):
    from qkhooks.data import ImageConfig
    from qkhooks.stream import record_dataset

    model = tiny()
    photos = [np.random.default_rng(i).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8) for i in range(3)]
    x = torch.stack([torch.from_numpy((p / 255.0 - 0.5) / 0.25).permute(2, 0, 1) for p in photos]).float()
    loaded = qkhooks.load_model(model, image_config=ImageConfig(size=(SIZE, SIZE), mean=(0.5,) * 3, std=(0.25,) * 3))
    record_dataset(loaded, photos, tmp_path / "r.h5", modes=2, attention="full:1", batch_size=2, reducers=[],
                   progress=False)
    with qkhooks.record(model, modes=2, attention="full:1") as live, torch.no_grad():
        model(x)
    with qkhooks.open_run(tmp_path / "r.h5") as stored:
        assert stored.layers == [0, 1] and stored.info["family"] == "torchvision-vit"
        geometry = stored.geometry(1)
        assert geometry.grid == (4, 4) and geometry.num_prefix_tokens == 1 and geometry.heads == HEADS
        for layer in (0, 1):
            query = torch.as_tensor(np.asarray(stored.query(layer)[:]))
            assert query.shape == (3, HEADS, 2, 17)
            assert float((query - live.query(layer).to(query.dtype)).abs().max()) < 1e-5
        full = torch.as_tensor(np.asarray(stored.attention(1, "full")[:]))
    assert full.dtype == torch.float16  # stored maps are half precision: equal to the model's to its rounding
    assert torch.allclose(full.float(), own_weights(model, x)[1], rtol=2 ** -10, atol=1e-7)


def test_spectrum_cli_takes_a_torchvision_spec(tmp_path):
    import json

    from qkhooks.cli import main

    out = tmp_path / "s.json"
    assert main(["spectrum", "torchvision:vit_b_32@random", "--layers", "0,-1", "--json", str(out)]) == 0
    layers = json.loads(out.read_text())["layers"]
    assert [l["layer"] for l in layers] == [0, 11] and len(layers[0]["heads"]) == 12


# ------------------------------------------------------------------------------------------ refusals
def _replaced(**mha) -> VisionTransformer:
    model = tiny()
    model.encoder.layers[1].self_attention = nn.MultiheadAttention(DIM, HEADS, **{"batch_first": True, **mha})
    return model


@pytest.mark.parametrize("mha, words", [
    (dict(add_bias_kv=True), "add_bias_kv=True appends a learned key"),
    (dict(add_zero_attn=True), "add_zero_attn=True appends a zero key"),
    (dict(kdim=16, vdim=16), "kdim=16, vdim=16"),
    (dict(batch_first=False), "batch_first=False"),
], ids=["add_bias_kv", "add_zero_attn", "kdim", "batch_first"])
def test_unmodelled_multihead_attention_forms_are_refused_naming_the_module(mha, words):
    with pytest.raises(QKHooksError) as err:
        qkhooks.sites(_replaced(**mha))
    assert "unsupported attention in 'encoder.layers.encoder_layer_1.self_attention' (MultiheadAttention)" in str(err.value)
    assert words in str(err.value)


def _calling(model: VisionTransformer, call) -> VisionTransformer:
    """Block 1's attention is called as ``call(x)`` says: ``(args, kwargs)`` from the tokens x, handed on by a forward
    pre-hook registered before record() (one qkhooks takes: it reads the call the hooks already there hand on). An
    instance-patched block forward is refused before any call (the block tests below)."""
    def rewrite(module, args, kwargs):
        args, more = call(args[0])
        return args, {**kwargs, **more}

    model.encoder.layers[1].self_attention.register_forward_pre_hook(rewrite, with_kwargs=True)
    return model


@pytest.mark.parametrize("call, words", [
    (lambda x: ((x, x, x), dict(need_weights=False, attn_mask=torch.zeros(x.shape[1], x.shape[1]))), "attn_mask"),
    (lambda x: ((x, x, x), dict(key_padding_mask=torch.zeros(x.shape[:2], dtype=torch.bool))), "key_padding_mask"),
    (lambda x: ((x, x.clone(), x.clone()), {}), "key and value are not the query tensor"),
    (lambda x: ((x, x, x), dict(need_weights=False, is_causal=True,
                                attn_mask=torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).triu(1))), "attn_mask"),
], ids=["attn_mask", "key_padding_mask", "cross", "causal"])
def test_a_call_with_a_mask_or_other_keys_is_refused(call, words):
    model = _calling(tiny(), call)
    with pytest.raises(QKHooksError) as err, torch.no_grad():
        with qkhooks.record(model, attention="full"):
            model(images())
    assert "unsupported attention in 'encoder.layers.encoder_layer_1.self_attention'" in str(err.value)
    assert words in str(err.value)


def test_the_unpatched_call_records_again_after_a_refused_one():
    model = _calling(tiny(), lambda x: ((x, x, x), dict(need_weights=True)))  # need_weights alone changes nothing
    want = own_weights(model, images())
    with qkhooks.record(model, attention="full") as run, torch.no_grad():
        model(images())
    assert float((run.attention(1, "full") - want[1]).abs().max()) < 1e-5


def test_a_subclass_that_changes_the_forward_is_refused():
    class Features(VisionTransformer):
        def forward(self, x):
            return self.encoder(self._process_input(x))  # no class token

    model = Features(image_size=SIZE, patch_size=PATCH, num_layers=2, num_heads=HEADS, hidden_dim=DIM, mlp_dim=64)
    with pytest.raises(QKHooksError, match="overrides torchvision VisionTransformer.forward"):
        qkhooks.sites(model)


def test_a_block_other_than_torchvisions_encoder_block_is_refused_naming_both():
    class MyBlock(nn.Module):  # holds the attention as EncoderBlock does, but may call it otherwise
        def __init__(self, block: nn.Module):
            super().__init__()
            self.ln_1, self.self_attention, self.rest = block.ln_1, block.self_attention, block.mlp

        def forward(self, x):
            y = self.ln_1(x)
            return x + self.rest(self.self_attention(y, y, y, need_weights=False)[0])

    model = tiny()
    model.encoder.layers[1] = MyBlock(model.encoder.layers[1])
    with pytest.raises(QKHooksError) as refused:
        qkhooks.sites(model)
    assert ("unsupported attention in 'encoder.layers.encoder_layer_1.self_attention' (MultiheadAttention): its block "
            "'encoder.layers.encoder_layer_1' is a MyBlock, not torchvision's EncoderBlock") in str(refused.value)
    with pytest.raises(QKHooksError, match="is a MyBlock"):  # not left out: later blocks' tokens pass through it
        qkhooks.sites(model, skip_unmodelled=True)


@pytest.mark.parametrize("mha", [dict(batch_first=True), dict(batch_first=False), dict(batch_first=True, add_bias_kv=True)],
                         ids=["plain", "batch_first=False", "add_bias_kv"])
def test_another_model_holding_multihead_attention_is_still_refused(mha):
    """The reasons the torchvision adapter gives a MultiheadAttention (UNMODELLED_FORMS) are for those in its blocks:
    another model's (OpenAI CLIP's batch_first=False) keeps the refusal that no adapter knows the model."""
    class Tower(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(DIM, HEADS, **mha)

        def forward(self, x):
            return self.attn(x, x, x)[0]

    with pytest.raises(QKHooksError, match="does not know how to find the attention layers of Tower") as err:
        qkhooks.sites(Tower())
    assert "'attn' (MultiheadAttention; children: out_proj): no registered adapter models this class" in str(err.value)
    with pytest.raises(QKHooksError) as err:
        qkhooks.sites(Tower(), skip_unmodelled=True)
    assert str(err.value).startswith("unsupported attention in 'attn' (MultiheadAttention): Teach qkhooks its form")


# ------------------------------------------------------------------------------------------ the tokens' route
def _flipping(module: nn.Module) -> None:
    """``module``'s forward replaced on the instance by one that reverses the token order before the class's own (the
    class token last; the patch embedding: the image's rows): what a patch can do that the attention's own call does
    not show."""
    own = type(module).forward
    axis = 2 if isinstance(module, nn.Conv2d) else 1
    module.forward = types.MethodType(lambda self, x: own(self, x.flip(axis)), module)


@pytest.mark.parametrize("where", ["model.conv_proj", "model.encoder", "model.encoder.layers",
                                   "model.encoder.layers.encoder_layer_1"])
def test_a_forward_replaced_on_the_tokens_route_is_refused_naming_the_module_and_the_fix(where):
    """Before: the encoder's, its layers' or a block's forward replaced on the instance was recorded without a word,
    the maps labelled class token first while the model ran the tokens reversed."""
    model = tiny()
    module = eval(where, {"model": model})
    _flipping(module)
    for skip in (False, True):  # never left out: every later block's tokens pass through it
        with pytest.raises(QKHooksError) as err:
            qkhooks.sites(model, skip_unmodelled=skip)
        msg = str(err.value)
        assert f"has its forward replaced on the instance ({where}.forward = " in msg
        assert f"del {where}.forward" in msg and "class token first" in msg
    del module.forward  # the fix the refusal names
    assert len(qkhooks.sites(model)) == 2


def test_a_forward_replaced_inside_the_record_context_is_refused_at_the_next_call():
    model = tiny()
    with qkhooks.record(model, attention="full") as run, torch.no_grad():
        model(images())
        _flipping(model.encoder)
        with pytest.raises(QKHooksError) as err:
            model(images())
    assert run.layers == [0, 1]
    assert ("unsupported attention in 'encoder.layers.encoder_layer_0.self_attention' (MultiheadAttention): model.encoder "
            "has its forward replaced on the instance (model.encoder.forward = ") in str(err.value)
    assert "inside this record() context" in str(err.value) and "del model.encoder.forward" in str(err.value)


@pytest.mark.parametrize("method", ["forward", "_process_input"])
def test_the_models_own_forward_replaced_inside_the_record_context_is_refused_at_the_next_call(method):
    """Before: refused at the search only, so model._process_input (or model.forward) replaced inside record() ran
    the image flipped (other tokens in every grid position) and the recording went on without a word."""
    model = tiny()
    own = getattr(type(model), method)
    with qkhooks.record(model, attention="full") as run, torch.no_grad():
        model(images())
        setattr(model, method, types.MethodType(lambda self, x: own(self, x.flip(-1)), model))
        with pytest.raises(QKHooksError) as err:
            model(images())
    assert run.layers == [0, 1]
    assert (f"unsupported attention in 'encoder.layers.encoder_layer_0.self_attention' (MultiheadAttention): model has "
            f"its {method} replaced on the instance (model.{method} = ") in str(err.value)
    assert "inside this record() context" in str(err.value) and f"del model.{method}" in str(err.value)
    delattr(model, method)  # the fix the refusal names
    with qkhooks.record(model) as run, torch.no_grad():
        model(images())
    assert run.layers == [0, 1]


def test_a_compiled_patch_embedding_is_refused_as_compiled_not_as_a_replaced_forward():
    """Before: torch.compile(model.conv_proj) (a wrapper whose forward is dynamo's) was refused as 'its forward
    replaced on the instance' with the fix 'del model.conv_proj.forward', which breaks the wrapper; the refusal is
    refuse_compiled's, which names torch.compile (qkhooks hooks conv_proj for the grid)."""
    model = tiny()
    model.conv_proj = torch.compile(model.conv_proj, backend="eager")
    with pytest.raises(QKHooksError) as err:
        with qkhooks.record(model):
            pass
    assert "'conv_proj' (OptimizedModule) is compiled by torch.compile (a compiled wrapper)" in str(err.value)
    assert "replaced on the instance" not in str(err.value) and "del model.conv_proj.forward" not in str(err.value)


class _FlippedStem(nn.Module):
    """A patch embedding that mirrors the image before torchvision's conv: every token shows other pixels."""

    def __init__(self, conv: nn.Module):
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x.flip(-1))


class _FlippingConv(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.flip(-1))


@pytest.mark.parametrize("stem", ["wrapper", "subclass"])
def test_a_patch_embedding_of_another_module_is_refused_at_the_search(stem):
    """Before: a conv_proj of another class (a wrapper, a Conv2d subclass with its own forward) was taken, the
    convolutions inside read as the pixels each token shows, while it mirrored the image first."""
    model = tiny()
    if stem == "wrapper":
        model.conv_proj = _FlippedStem(model.conv_proj)
    else:
        conv = model.conv_proj
        model.conv_proj = _FlippingConv(3, DIM, PATCH, PATCH)
        model.conv_proj.load_state_dict(conv.state_dict())
    for skip in (False, True):
        with pytest.raises(QKHooksError, match="model.conv_proj (is a _FlippedStem, not the nn.Conv2d|"
                                               r"\(_FlippingConv\) overrides Conv2d.forward).*which pixels each token shows"):
            qkhooks.sites(model, skip_unmodelled=skip)


def test_a_patch_embedding_replaced_inside_the_record_context_is_refused_at_the_next_call():
    """Before: model.conv_proj = wrapper(...) inside record() was recorded without a word (the module is not above the
    attention, so the replaced-module check did not see it; the grid and pixels were the old conv's)."""
    model = tiny()
    with qkhooks.record(model, attention="full") as run, torch.no_grad():
        model(images())
        model.conv_proj = _FlippedStem(model.conv_proj)
        with pytest.raises(QKHooksError) as err:
            model(images())
    assert run.layers == [0, 1]
    assert ("model.conv_proj is no longer the module qkhooks found (Conv2d then, _FlippedStem now): it was replaced "
            "inside this record() context") in str(err.value)


def test_an_encoder_of_another_class_or_forward_is_refused():
    from torchvision.models.vision_transformer import Encoder

    class Reversed(Encoder):
        def forward(self, input):
            return super().forward(input.flip(1))

    model = tiny()
    model.encoder.__class__ = Reversed
    with pytest.raises(QKHooksError, match=r"VisionTransformer: model\.encoder \(Reversed\) overrides Encoder\.forward"):
        qkhooks.sites(model)
    model = tiny()
    model.encoder.layers = nn.ModuleList(model.encoder.layers)  # (its forward would not run): refused by what it is
    with pytest.raises(QKHooksError, match="model.encoder.layers is a ModuleList, not torch's nn.Sequential"):
        qkhooks.sites(model)


def test_a_block_outside_the_encoders_layers_is_refused():
    model = tiny()
    model.encoder.extra = tiny().encoder.layers[0]
    with pytest.raises(QKHooksError, match="its block 'encoder.extra' is not one of model.encoder.layers"):
        qkhooks.sites(model)


def test_a_multihead_attention_forward_replaced_or_overridden_is_refused():
    """Replaced on the instance: the shared check at every record() entry (unsupported.refuse_altered_qk); a subclass
    overriding it: the search, with skip_unmodelled too."""
    model = tiny()
    attn = model.encoder.layers[0].self_attention
    attn.forward = types.MethodType(lambda self, *a, **k: nn.MultiheadAttention.forward(self, *a, **k), attn)
    with pytest.raises(QKHooksError, match=r"'encoder.layers.encoder_layer_0.self_attention' \(MultiheadAttention\): "
                       "its forward is replaced on the instance"), torch.no_grad():
        with qkhooks.record(model):
            model(images())

    class Scaled(nn.MultiheadAttention):
        def forward(self, query, key, value, **kwargs):
            return super().forward(query * 2, key, value, **kwargs)

    model = _replaced()
    model.encoder.layers[1].self_attention.__class__ = Scaled
    for skip in (False, True):
        with pytest.raises(QKHooksError, match="Scaled overrides nn.MultiheadAttention.forward"):
            qkhooks.sites(model, skip_unmodelled=skip)


# ------------------------------------------------------------------------------------------ skip_unmodelled
@pytest.mark.parametrize("mha, words", [
    (dict(add_bias_kv=True), "add_bias_kv=True appends a learned key"),
    (dict(add_zero_attn=True), "add_zero_attn=True appends a zero key"),
    (dict(batch_first=False), "batch_first=False"),
], ids=["add_bias_kv", "add_zero_attn", "batch_first"])
def test_skip_unmodelled_records_the_other_blocks_and_names_the_one_left_out(mha, words):
    """Before: an unmodelled MultiheadAttention form refused the model with skip_unmodelled=True too (other families'
    unmodelled forms are left out, named); the refusal did not offer it."""
    model = perturb(_replaced(**mha))
    with pytest.raises(QKHooksError, match="pass skip_unmodelled=True"):
        qkhooks.sites(model)
    want = own_weights(model, images())[0]
    with qkhooks.record(model, attention="full", skip_unmodelled=True) as run, torch.no_grad():
        model(images())
    assert run.layers == [0] and [s.path for s in run.sites] == ["encoder.layers.encoder_layer_0.self_attention"]
    assert float((run.attention(0, "full") - want).abs().max()) < 1e-5
    (path, why), = run.left_out.items()
    assert path == "encoder.layers.encoder_layer_1.self_attention" and why.startswith("MultiheadAttention: " + words)
    assert "torchvision's Vision Transformers build it as nn.MultiheadAttention(hidden_dim, num_heads" in why


def test_skip_unmodelled_with_no_modelled_block_left_is_refused_naming_why():
    model = tiny()
    for block in model.encoder.layers:
        block.self_attention = nn.MultiheadAttention(DIM, HEADS, batch_first=True, add_zero_attn=True)
    with pytest.raises(QKHooksError) as err:
        qkhooks.sites(model, skip_unmodelled=True)
    assert "add_zero_attn=True" in str(err.value) and "skip_unmodelled=True leaves nothing to record" in str(err.value)
    with pytest.raises(QKHooksError) as err:
        qkhooks.sites(model)
    assert "add_zero_attn=True" in str(err.value) and "pass skip_unmodelled" not in str(err.value)  # nothing to offer


def test_attention_dropout_in_training_mode_is_said():
    """MultiheadAttention's dropout (VisionTransformer(attention_dropout=...)) is found as other families' is: the maps
    rebuilt are the softmax before it, so a recording in training mode warns naming it."""
    model = tiny(attention_dropout=0.1).train()
    with pytest.warns(UserWarning, match=r"training mode .*encoder\.layers\.encoder_layer_0\.self_attention "
                      r"\(MultiheadAttention p=0\.1\)"), torch.no_grad():
        with qkhooks.record(model):
            model(images())


# ------------------------------------------------------------------------------------------ a part handed in
@pytest.mark.parametrize("part, words", [
    (lambda m: m.encoder, "(its Encoder, model.encoder)"),
    (lambda m: m.encoder.layers, "(its encoder's blocks, model.encoder.layers)"),
    (lambda m: m.encoder.layers[1], "(one of its encoder blocks, model.encoder.layers[i])"),
], ids=["encoder", "layers", "block"])
def test_a_part_of_the_model_handed_in_is_refused_saying_to_pass_the_whole_model(part, words):
    """Before: "qkhooks does not know how to find the attention layers of Encoder", listing the adapters."""
    model = tiny()
    for call in (lambda: qkhooks.sites(part(model)), lambda: qkhooks.record(part(model)).__enter__()):
        with pytest.raises(QKHooksError) as err:
            call()
        msg = str(err.value)
        assert f"is part of a torchvision VisionTransformer {words}" in msg
        assert "Pass the whole model: record(model)" in msg and "record(model, layers=[0, 5])" in msg
        assert "Supported families" not in msg


# ------------------------------------------------------------------------------------------ torchvision: specs
def test_random_init_spec_builds_the_weights_architecture_with_their_preprocessing():
    a = qkhooks.load_model("torchvision:vit_b_16.IMAGENET1K_SWAG_E2E_V1@random")
    assert a.weights == "random" and a.random_init and a.spec.endswith("@random") and not a.model.training
    assert a.model.image_size == 384 and "IMAGENET1K_SWAG_E2E_V1" in a.note
    cfg = a.image_config
    assert (cfg.size, cfg.resize, cfg.interpolation) == ((384, 384), 384, "bicubic")
    assert (cfg.mean, cfg.std) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    sites = qkhooks.sites(a)
    assert len(sites) == 12 and sites[0].grid == (24, 24) and sites[0].num_heads == 12
    weights = torchvision.models.ViT_B_16_Weights.IMAGENET1K_SWAG_E2E_V1
    assert torch.equal(cfg(photo((500, 403))), weights.transforms()(photo((500, 403))))  # pixel for pixel torchvision's
    b = qkhooks.load_model("torchvision:vit_b_16.IMAGENET1K_SWAG_E2E_V1", random_init=True)  # seeded: the same weights
    w = "encoder.layers.encoder_layer_0.self_attention.in_proj_weight"
    assert torch.equal(a.model.state_dict()[w], b.model.state_dict()[w])


def test_default_weights_preprocessing_is_torchvisions():
    loaded = qkhooks.load_model("torchvision:vit_b_32@random")
    cfg = loaded.image_config
    assert (cfg.size, cfg.resize, cfg.interpolation, loaded.model.image_size) == ((224, 224), 256, "bilinear", 224)
    weights = torchvision.models.ViT_B_32_Weights.DEFAULT
    assert torch.equal(cfg(photo((300, 451))), weights.transforms()(photo((300, 451))))


def photo(shape: tuple[int, int]):
    from PIL import Image

    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8))


@pytest.mark.parametrize("spec, words", [
    ("torchvision:resnet50", "qkhooks loads torchvision's Vision Transformers (vit_b_16"),
    ("torchvision:vit_b_16.FOO", "has no weights 'FOO'; it has IMAGENET1K_V1"),
    ("torchvision:vit_b_16.", "has no weights ''; it has IMAGENET1K_V1"),  # not read as the DEFAULT weights
])
def test_unknown_torchvision_specs_are_refused(spec, words):
    with pytest.raises(QKHooksError, match=words.replace("(", r"\(")):
        qkhooks.load_model(spec)


def test_a_module_without_an_image_config_is_pointed_at_torchvision_specs():
    with pytest.raises(QKHooksError, match=r"load_model\('torchvision:NAME\[.WEIGHTS\]'\) reads their preprocessing"):
        qkhooks.load_model(tiny())


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty torch hub cache, no DNS, and no download."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)

    def no_dns(host, *args, **kwargs):
        raise socket.gaierror(f"no such host {host}")

    def no_download(*args, **kwargs):
        raise AssertionError("a download was tried")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    monkeypatch.setattr(load, "_download", no_download)
    return tmp_path / "torch" / "hub" / "checkpoints"


def test_missing_weights_offline_are_refused_at_once_naming_the_cache_path(hub):
    with pytest.raises(QKHooksError) as err:
        qkhooks.load_model("torchvision:vit_b_16")
    msg = str(err.value)
    assert str(hub / "vit_b_16-c867db91.pth") in msg and "does not resolve" in msg
    assert "https://download.pytorch.org/models/vit_b_16-c867db91.pth" in msg and "torchvision:vit_b_16@random" in msg
    assert not hub.exists() or not any(hub.iterdir())


def _tiny_builder(monkeypatch):
    """torchvision's vit_b_16 builder replaced by the tiny model's (the cached file then holds tiny weights)."""
    import torchvision.models as models

    built = []

    def builder(weights=None, image_size=224, num_classes=1000):
        assert weights is None
        built.append((image_size, num_classes))
        return VisionTransformer(image_size=SIZE, patch_size=PATCH, num_layers=2, num_heads=HEADS, hidden_dim=DIM,
                                 mlp_dim=64, num_classes=num_classes)

    real = models.get_model_builder
    monkeypatch.setattr(models, "get_model_builder", lambda name: builder if name == "vit_b_16" else real(name))
    return built


def test_cached_weights_are_loaded_weights_only_from_the_hub_cache(hub, monkeypatch):
    built = _tiny_builder(monkeypatch)
    saved = tiny(num_classes=1000).state_dict()
    hub.mkdir(parents=True)
    torch.save(saved, hub / "vit_b_16-c867db91.pth")
    loaded = qkhooks.load_model("torchvision:vit_b_16")
    assert built == [(224, 1000)] and loaded.weights == "pretrained" and "ViT_B_16_Weights.IMAGENET1K_V1" in loaded.note
    assert all(torch.equal(v, saved[k]) for k, v in loaded.model.state_dict().items())
    torch.save({"state": saved, "why": types.SimpleNamespace(a=1)}, hub / "vit_b_16-c867db91.pth")
    with pytest.raises(QKHooksError, match="refused to unpickle"):
        qkhooks.load_model("torchvision:vit_b_16")


# ------------------------------------------------------------------------------------------ a download that stalls
PROXIES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy")


@pytest.fixture
def silent_proxy(tmp_path, monkeypatch):
    """An empty torch hub cache behind a proxy on this machine that takes the connection and never answers (the
    kernel completes the handshake on the listening socket; nothing reads or writes), with a download timeout of
    0.3 s. Yields the cache folder."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for name in PROXIES:
        monkeypatch.delenv(name, raising=False)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{listener.getsockname()[1]}")
    monkeypatch.setenv(load.DOWNLOAD_TIMEOUT_ENV, "0.3")
    yield tmp_path / "torch" / "hub" / "checkpoints"
    listener.close()


def _in_a_thread(call) -> BaseException | None:
    """``call()``'s exception, run in a thread given a minute (a hang guard, not a timing: the download's limit is 0.3
    s), so that a download that never gives up fails this test instead of hanging the suite."""
    raised: list[BaseException] = []
    worker = threading.Thread(target=lambda: raised.append(_raises(call)), daemon=True)
    worker.start()
    worker.join(60)
    assert not worker.is_alive(), "the download did not give up on a proxy that never answers"
    return raised[0]


def _raises(call) -> BaseException | None:
    try:
        call()
    except BaseException as err:  # noqa: BLE001 - handed back to the test's thread
        return err
    return None


def test_a_download_through_a_proxy_that_never_answers_gives_up_naming_url_cache_path_and_fix(silent_proxy):
    """Before: behind a proxy the host probe is skipped and torch's download has no socket timeout, so a proxy that
    took the connection and never answered hung load_model for ever."""
    err = _in_a_thread(lambda: qkhooks.load_model("torchvision:vit_b_16"))
    assert isinstance(err, QKHooksError), repr(err)
    msg = str(err)
    assert "https://download.pytorch.org/models/vit_b_16-c867db91.pth through the proxy HTTPS_PROXY=http://127.0.0.1:" in msg
    assert "stalled: nothing came for 0.3 s" in msg and str(silent_proxy / "vit_b_16-c867db91.pth") in msg
    assert "torchvision:vit_b_16@random" in msg and "QKHOOKS_DOWNLOAD_TIMEOUT=<seconds>" in msg
    assert not any(silent_proxy.iterdir())  # no cut or partial file left for the next load to trip on


@pytest.mark.parametrize("value", ["soon", "0", "-1", "nan", "inf"])
def test_a_download_timeout_that_is_not_a_positive_number_is_refused(silent_proxy, monkeypatch, value):
    monkeypatch.setenv(load.DOWNLOAD_TIMEOUT_ENV, value)
    with pytest.raises(QKHooksError, match=f"QKHOOKS_DOWNLOAD_TIMEOUT='{value}' is not a number of seconds > 0"):
        qkhooks.load_model("torchvision:vit_b_16")


@pytest.fixture
def server(monkeypatch):
    """A local HTTP server (no proxy) answering GET with ``served["body"]``, cut after ``served["send"]`` bytes, then
    holding the connection until the test ends. Yields (base URL, served)."""
    for name in PROXIES:
        monkeypatch.delenv(name, raising=False)
    served: dict = {"body": b"", "send": None}
    done = threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = served["body"]
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[:served["send"]])
            self.wfile.flush()
            if served["send"] is not None and served.get("hold", True):
                done.wait(30)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", served
    done.set()
    httpd.shutdown()
    httpd.server_close()


def test_the_download_stores_the_whole_checked_file_and_a_stall_or_bad_hash_leaves_nothing(server, tmp_path):
    url, served = server
    body = os.urandom(3 << 20)  # three reads of 1 MiB
    digest = hashlib.sha256(body).hexdigest()
    served["body"] = body
    good = tmp_path / f"w-{digest[:8]}.pth"
    load._download(f"{url}/{good.name}", good, 5.0)
    assert good.read_bytes() == body
    plain = tmp_path / "plain.pth"  # no hash in the name: none checked, the length still is
    load._download(f"{url}/{plain.name}", plain, 5.0)
    assert plain.read_bytes() == body
    bad = tmp_path / f"w-{'0' * 8}.pth"  # the name's hash prefix is not the content's
    with pytest.raises(RuntimeError, match="invalid hash value"):
        load._download(f"{url}/{bad.name}", bad, 5.0)
    served["send"] = 1000  # headers and 1000 bytes, then nothing
    cut = tmp_path / "cut.pth"
    err = _in_a_thread(lambda: load._download(f"{url}/cut.pth", cut, 0.3))
    assert isinstance(err, TimeoutError) and load._timed_out(err), repr(err)
    served["hold"] = False  # headers and 1000 bytes, then the connection closed
    with pytest.raises(RuntimeError, match=f"the connection closed after 1000 of the {len(body)} bytes"):
        load._download(f"{url}/cut.pth", cut, 5.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([good.name, plain.name])  # no partial or cut file


def test_every_layer_shares_one_grid_read_off_conv_proj_so_one_hook_serves_them():
    """Before: each site had its own grid source, so conv_proj carried one pre-hook per layer, each reading the grid."""
    from qkhooks.models.base import grid_source_hooks

    sites = qkhooks.sites(tiny())
    hooks = grid_source_hooks(sites)
    assert len(sites) == 2 and len(hooks) == 1 and hooks[0][0] is sites[0].grid_source[0]


def test_the_attentions_signature_is_read_once_not_at_every_call(monkeypatch):
    """Each call of each layer is bound to MultiheadAttention.forward's signature; reading it costs ~15 us, so it is
    read once (before: at every call of every layer)."""
    from qkhooks.models import torchvision as adapter

    reads = []
    signature = adapter.inspect.signature
    monkeypatch.setattr(adapter.inspect, "signature", lambda f: reads.append(f) or signature(f))
    adapter._signature.cache_clear()
    model = tiny()
    with qkhooks.record(model, modes=2) as run, torch.no_grad():
        model(images())
        first = reads.count(nn.MultiheadAttention.forward)
        for _ in range(2):
            model(images())
    assert first >= 1 and reads.count(nn.MultiheadAttention.forward) == first  # none more for later forwards
    assert run.query(1).shape[:3] == (2, HEADS, 2)


def test_an_unmodelled_form_of_a_multihead_attention_subclass_is_refused_with_skip_unmodelled_too():
    """The search leaves out what UNMODELLED_FORMS names, keyed by the exact class: a subclass (its forward the same)
    of an unmodelled form would be recorded, so it is refused."""
    class Mine(nn.MultiheadAttention):
        pass

    model = tiny()
    model.encoder.layers[1].self_attention = Mine(DIM, HEADS, batch_first=True, add_zero_attn=True)
    for skip in (False, True):
        with pytest.raises(QKHooksError, match=r"'encoder.layers.encoder_layer_1.self_attention' \(Mine\): add_zero_attn"):
            qkhooks.sites(model, skip_unmodelled=skip)


def test_a_downloaded_file_has_the_permissions_of_any_file_made_here(server, tmp_path):
    """The cache may be shared: the file is made as torch's download makes it (the umask's mode), not 0600 as a
    NamedTemporaryFile would leave it."""
    url, served = server
    served["body"] = b"weights"
    old = os.umask(0o022)
    try:
        load._download(f"{url}/w.pth", tmp_path / "w.pth", 5.0)
    finally:
        os.umask(old)
    assert (tmp_path / "w.pth").stat().st_mode & 0o777 == 0o644
