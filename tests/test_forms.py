"""Attention forms beyond the plain bilinear one, each against the model's own computation: q/k normalisation
(the exact normalised form), CaiT's class attention and talking heads, the additive term as its own
position-only term, per-call state released after a recording."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

import qkhooks
from qkhooks import QKHooksError
from test_zoo import SMALL_VIT, check, perturb
from conftest import forward_with_hooks


def _timm(name: str, **kw):
    import timm

    torch.manual_seed(0)
    return perturb(timm.create_model(name, pretrained=False, **kw))


def _images(size: int = 32, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def _normed_qk(model, sites, inputs) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per site: the tokens entering W_q/W_k and the model's own normalised q, k (its q_norm/k_norm outputs)."""
    seen: dict[int, list] = {s.layer: [None, None, None] for s in sites}
    handles = []
    for s in sites:
        handles.append(s.module.register_forward_pre_hook(
            lambda m, a, kw, s=s: seen[s.layer].__setitem__(0, (a[0] if a else kw[s.input_name]).detach()), with_kwargs=True))
        handles.append(s.qk_norm.q_norm.register_forward_hook(lambda m, a, o, s=s: seen[s.layer].__setitem__(1, o.detach())))
        handles.append(s.qk_norm.k_norm.register_forward_hook(lambda m, a, o, s=s: seen[s.layer].__setitem__(2, o.detach())))
    forward_with_hooks(model, handles, **inputs)
    return {l: tuple(v) for l, v in seen.items()}


def _internvl():
    import transformers

    torch.manual_seed(0)
    config = transformers.InternVLVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                               intermediate_size=64, image_size=32, patch_size=8, use_qk_norm=True,
                                               attention_bias=True)
    return perturb(transformers.InternVLVisionModel._from_config(config, attn_implementation="sdpa"))


def _qk_norm_models():
    from timm.layers import RmsNorm

    return {
        "timm-layernorm": (lambda: _timm("vit_small_patch16_224", qk_norm=True, **SMALL_VIT), "x"),
        "timm-rmsnorm": (lambda: _timm("vit_small_patch16_224", qk_norm=True, norm_layer=RmsNorm, **SMALL_VIT), "x"),
        "timm-eva02-rope-layernorm": (lambda: _timm("eva02_tiny_patch14_224", qk_norm=True, depth=2, img_size=32,
                                                    patch_size=8), "x"),  # normalised, then rotated
        "hf-internvl-rmsnorm-whole-width": (_internvl, "pixel_values"),
    }


@pytest.mark.parametrize("name", list(_qk_norm_models()))
def test_qk_normalised_maps_equal_the_models_own_and_the_normalised_form_rebuilds_its_logits(name):
    from qkhooks.models.qknorm import normalised_form

    build, key = _qk_norm_models()[name]
    model = build()
    inputs = {key: _images()}
    outcome = check(model, inputs, "timm" if key == "x" else "hf")  # maps vs eager to 1e-5, pre-norm modes vs q·k
    assert outcome.status == "exact", outcome.detail
    assert "q/k-norm" in outcome.form
    sites = qkhooks.sites(model)
    for layer, (x, q_hat, k_hat) in _normed_qk(model, sites, inputs).items():
        site = sites[layer]
        if q_hat.dim() == 3:  # InternVL normalises the whole width, then splits the heads
            q_hat, k_hat = (t.unflatten(-1, (site.num_heads, -1)).transpose(1, 2) for t in (q_hat, k_hat))
        want = (q_hat.double() @ k_hat.double().transpose(-1, -2))
        form = normalised_form(site)
        got = form.logits(x)
        err = float((got - want).abs().max() / want.abs().max())
        assert err < 1e-5, f"{name} layer {layer}: the normalised form misses the model's q̂·k̂ by {err:.1e}"
        # the middle form is the one of the module docstring, W̃_q^T C diag(γ_q γ_k) C W̃_k, read off the weights here
        if form.group == site.head_dim:
            w = site.weights()
            wq = torch.cat([w.w_q, w.b_q[..., None]], -1).double()
            wk = torch.cat([w.w_k, w.b_k[..., None]], -1).double()
            centre = torch.eye(site.head_dim, dtype=torch.float64) - (form.kind == "layer") / site.head_dim
            gq, gk = site.qk_norm.q_norm.weight.detach().double(), site.qk_norm.k_norm.weight.detach().double()
            middle = wq.transpose(1, 2) @ centre @ torch.diag(gq * gk) @ centre @ wk
            dense = torch.einsum("hdr,hr,her->hde", form.U, form.S, form.V)
            assert torch.allclose(dense, middle, atol=1e-10 * float(middle.abs().max()))


def test_qk_norm_rows_are_the_full_maps_rows_and_pre_norm_modes_are_named_as_such():
    model = _timm("vit_small_patch16_224", qk_norm=True, **SMALL_VIT)
    tokens = torch.tensor([[0, 5], [3, 8]])
    with qkhooks.record(model, modes=4, attention=["rows", "full"]) as run, torch.no_grad():
        run(_images(), meta={"query_tokens": tokens})
        assert not run.sites[0].modes_rebuild_logits()
    for layer, full in run.attention_maps("full").items():
        want = torch.stack([full[b][:, tokens[b]] for b in range(2)])
        assert torch.allclose(run.attention_maps("rows")[layer], want, atol=1e-6)


def test_an_unknown_qk_norm_is_refused_naming_the_module():
    import timm

    class Scale(torch.nn.Module):
        def forward(self, t):
            return t * 2

    model = timm.create_model("vit_small_patch16_224", pretrained=False, qk_norm=True, **SMALL_VIT)
    model.blocks[1].attn.k_norm = Scale()
    with pytest.raises(QKHooksError, match=r"'blocks.1.attn'.*Scale on k"):
        qkhooks.sites(model)


# ------------------------------------------------------------------------------------------------ per-call state
def test_a_finished_recording_holds_none_of_the_last_batchs_call_tensors():
    """RoPE tables and additive terms handed to the modules are dropped on exit (read inside the block only)."""
    import transformers

    torch.manual_seed(0)
    config = transformers.BeitConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                     image_size=32, patch_size=8, use_shared_relative_position_bias=True)
    model = perturb(transformers.BeitModel._from_config(config, attn_implementation="sdpa"))
    rope_model = _timm("vit_small_patch16_dinov3", embed_dim=32, depth=2, num_heads=4, img_size=32)
    for m, kw, attribute in ((model, "pixel_values", "_call_bias"), (rope_model, "x", "_call_rope")):
        with qkhooks.record(m, modes=None, attention="full") as run, torch.no_grad():
            m(**{kw: _images()})
            held = [getattr(s, attribute) for s in run.sites]
            assert all(isinstance(t, (torch.Tensor, tuple)) for t in held)  # set during the call
            refs = [weakref.ref(t if isinstance(t, torch.Tensor) else t[0]) for t in held]
            live = list(run.sites)
        del held
        gc.collect()
        assert all(getattr(s, attribute) is None for s in run.sites + live)
        assert all(r() is None for r in refs), "a finished recording still holds the last call's tensors"


# ------------------------------------------------------------------------------------------------------- CaiT
def _cait():
    return _timm("cait_xxs24_224", depth_token_only=2, **SMALL_VIT)


def test_cait_talking_heads_mixed_spectrum_rebuilds_the_models_mixed_logits_before_the_softmax():
    """Σ_n σ_n (x̃·u_n)(x̃·v_n) of output head h, times the scale, plus proj_l's bias, is the model's own proj_l
    output (read off the module); the per-input-head forms mixed by hand give the same dense M_h."""
    from qkhooks.models.class_attention import mixed_spectrum

    model = _cait()
    sites = [s for s in qkhooks.sites(model) if s.head_mixing is not None]
    assert [s.path for s in sites] == ["blocks.0.attn", "blocks.1.attn"]
    seen: dict[int, list] = {}
    handles = []
    for s in sites:
        handles.append(s.module.register_forward_pre_hook(lambda m, a, s=s: seen.__setitem__(s.layer, [a[0]])))
        handles.append(s.module.proj_l.register_forward_hook(lambda m, a, o, s=s: seen[s.layer].append(o.permute(0, 3, 1, 2))))
    with torch.no_grad():
        model(_images())
    for h in handles:
        h.remove()
    for site in sites:
        x, want = seen[site.layer]
        spec = mixed_spectrum(site)
        assert spec.S.shape == (site.num_heads, site.num_heads * site.head_dim)  # rank up to H·d_k per output head
        x1 = torch.cat([x, torch.ones_like(x[..., :1])], -1).double()
        got = torch.einsum("bnd,hdr,hr,bme,her->bhnm", x1, spec.U, spec.S, x1, spec.V) * site.scale
        got = got + site.module.proj_l.bias.detach().double()[None, :, None, None]
        err = float((got - want.double()).abs().max() / want.abs().max())
        assert err < 1e-5, f"{site.path}: mixed modes miss the model's mixed logits by {err:.1e}"
        w = site.weights()
        wq = torch.cat([w.w_q, w.b_q[..., None]], -1).double()
        wk = torch.cat([w.w_k, w.b_k[..., None]], -1).double()
        mix = site.module.proj_l.weight.detach().double()
        dense = torch.stack([sum(mix[g, h] * wq[h].T @ wk[h] for h in range(site.num_heads)) for g in range(site.num_heads)])
        assert torch.allclose(spec.bilinear(), dense, atol=1e-10 * float(dense.abs().max()))


def test_cait_class_attention_maps_have_the_models_shape_and_rows_exist_only_for_the_class_token():
    model = _cait()
    with qkhooks.record(model, modes=4, layers=[2, 3], attention=["rows", "full"]) as run, torch.no_grad():
        run(_images(), meta={"query_tokens": torch.zeros(2, 1, dtype=torch.long)})
    for layer, full in run.attention_maps("full").items():
        assert full.shape == (2, 4, 1, 17)  # only the class token queries [class; 16 patches]
        assert torch.allclose(run.attention_maps("rows")[layer], full, atol=1e-6)
    with qkhooks.record(model, modes=None, layers=[0, 1], attention=["rows", "full"]) as run, torch.no_grad():
        run(_images(), meta={"query_tokens": torch.tensor([[0, 5], [3, 8]])})  # talking heads: rows = full maps' rows
    for layer, full in run.attention_maps("full").items():
        want = torch.stack([full[b][:, t] for b, t in enumerate(([0, 5], [3, 8]))])
        assert torch.allclose(run.attention_maps("rows")[layer], want, atol=1e-6)
    with qkhooks.record(model, modes=None, layers=[2], attention="rows") as run, torch.no_grad():
        with pytest.raises(QKHooksError, match=r"layer 2 .*class attention.*tokens \[5\] do not exist"):
            run(_images(), meta={"query_tokens": torch.tensor([[0, 5], [0, 5]])})
    with pytest.raises(QKHooksError, match="input='normed'"):
        with qkhooks.record(model, modes=4, layers=[2], input="residual"), torch.no_grad():
            model(_images())


def test_an_analysis_of_talking_heads_maps_as_one_form_is_refused_with_the_reason():
    from qkhooks.models.class_attention import refuse_modes_of_mixed_maps

    site = qkhooks.sites(_cait())[0]
    with pytest.raises(QKHooksError, match="weighted sum of several softmaxes"):
        refuse_modes_of_mixed_maps(site)


# ------------------------------------------------------------------------------------ the additive term, stored
def _hf_small(model_cls: str, config_cls: str, **kw):
    import transformers

    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                               intermediate_size=64, **kw)
    return perturb(getattr(transformers, model_cls)._from_config(config, attn_implementation="sdpa"))


def _eager_log_maps(model, inputs) -> list[torch.Tensor]:
    """log A (B, H, N, N) of every layer from the model's own eager attention (logits up to a row constant)."""
    before = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(**inputs, output_attentions=True)
    finally:
        model.set_attn_implementation(before)
    return [a.double().log() for a in out.attentions]


def _same_up_to_row_constants(got: torch.Tensor, want: torch.Tensor) -> float:
    diff = (got - got[..., :1]) - (want - want[..., :1])
    return float(diff.abs().max() / (1 + want.abs().max()))


@pytest.mark.parametrize("shared", [True, False], ids=["shared-table", "per-layer-table"])
def test_beit_position_bias_is_stored_once_and_scale_content_plus_bias_is_the_models_logits(tmp_path, shared):
    from qkhooks.store.reader import open_run
    from qkhooks.store.writer import RunWriter
    from qkhooks.stream import WriterSink

    option = "use_shared_relative_position_bias" if shared else "use_relative_position_bias"
    model = _hf_small("BeitModel", "BeitConfig", image_size=32, patch_size=8, **{option: True})
    images = _images()
    path = tmp_path / "run.h5"
    with RunWriter(path, attrs={"model": "beit", "config": "{}"}, dtype="float32") as writer:
        with qkhooks.record(model, modes="all", augmented=True, sinks=[WriterSink(writer)]) as rec, torch.no_grad():
            for half in (images[:1], images[1:]):  # two batches: the term is stored once
                rec(pixel_values=half)
    want = _eager_log_maps(model, {"pixel_values": images})
    tables = [rec.bias(site.layer) for site in rec.sites]
    if shared:
        assert torch.equal(tables[0], tables[1])
    with open_run(path) as run:
        assert run.array("modes/L0/query").shape[0] == 2
        for site, table in zip(rec.sites, tables):
            stored = torch.from_numpy(run.bias(site.layer)).double()
            assert stored.shape == (4, 17, 17) and torch.equal(stored, table.double())
            q, k = (torch.from_numpy(run.array(f"modes/L{site.layer}/{s}")[:]).double() for s in ("query", "key"))
            sigma = rec.spectrum[site.layer].S.double()  # the run file's spectrum statics are record_dataset's
            logits = site.scale * torch.einsum("bhkn,hk,bhkm->bhnm", q, sigma, k) + stored
            err = _same_up_to_row_constants(logits, want[site.layer])
            assert err < 1e-5, f"layer {site.layer}: scale·content + stored bias misses the model's logits by {err:.1e}"
            content_only = _same_up_to_row_constants(logits - stored, want[site.layer])
            assert content_only > 1e-3  # the table really matters (perturbed, not zero)


def test_masks_are_not_stored_as_position_terms_and_a_plain_layer_has_none(tmp_path):
    from qkhooks.store.reader import open_run
    from qkhooks.store.writer import RunWriter
    from qkhooks.stream import WriterSink

    from test_zoo import _siglip2_padded

    model = _hf_small("Siglip2VisionModel", "Siglip2VisionConfig", patch_size=8, num_patches=16)
    path = tmp_path / "run.h5"
    with RunWriter(path, attrs={"model": "siglip2", "config": "{}"}, dtype="float32") as writer:
        with qkhooks.record(model, modes=2, sinks=[WriterSink(writer)]) as rec, torch.no_grad():
            rec(**_siglip2_padded())
    with pytest.raises(QKHooksError, match="layer 0 has no position-only additive term.*mask"):
        rec.bias(0)
    with open_run(path) as run:
        assert run.bias(0) is None and not any(name.startswith("bias/") for name in run.file)
    plain = _timm("vit_tiny_patch16_224", **SMALL_VIT)
    with qkhooks.record(plain, modes=2) as rec, torch.no_grad():
        rec(_images())
    assert rec.bias(0) is None


@pytest.mark.parametrize("option", ["use_relative_position_bias", "use_shared_relative_position_bias"])
def test_data2vec_in_module_relative_bias_under_sdpa_gives_the_eager_models_maps(option):
    """Data2Vec builds its relative-position table inside the attention module: recorded on the fused (SDPA) model,
    the maps equal the eager attention of the same weights, and the table is the layer's position-only term."""
    import transformers

    config = transformers.Data2VecVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                               intermediate_size=64, image_size=32, patch_size=8, **{option: True})
    torch.manual_seed(0)
    fused = perturb(transformers.Data2VecVisionModel._from_config(config, attn_implementation="sdpa"))
    eager = transformers.Data2VecVisionModel._from_config(config, attn_implementation="eager").eval()
    eager.load_state_dict(fused.state_dict())
    images = _images()
    with torch.no_grad():
        want = eager(pixel_values=images, output_attentions=True).attentions
    with qkhooks.record(fused, modes=None, attention="full") as rec, torch.no_grad():
        rec(pixel_values=images)
    for layer, got in rec.attention_maps("full").items():
        assert float((got - want[layer]).abs().max()) < 1e-5
        assert rec.bias(layer).shape == (4, 17, 17)


# --------------------------------------------------------------------------------------- a RoPE model end to end
@pytest.mark.slow
def test_demo_runs_every_section_on_a_rope_model_and_names_bfds_content_only_variant(tmp_path):
    """`qkhooks demo` on DINOv3 (timm, random weights) with the demo's smallest settings: every section, and BFD (one
    bilinear form) says it splits the content form only, since RoPE turns q and k by position."""
    import json
    import subprocess
    import sys

    out = tmp_path / "demo"
    subprocess.run([sys.executable, "-m", "qkhooks", "demo", "--model", "timm:vit_small_patch16_dinov3", "--random-init",
                    "--images", "4", "--o3", "6", "--objects", "3", "--batch-size", "4", "--out", str(out)],
                   check=True, capture_output=True)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["sections"]) == {"modes", "same_object", "anisotropy", "spectrum", "preference", "bfd"}
    bfd = json.loads((out / "bfd" / "bfd.json").read_text())
    assert bfd["variant"].startswith("content-only") and "RoPE" in bfd["variant"]
    assert sorted(map(int, bfd["content_only_layers"])) == list(range(12))
    assert "Variant: content-only" in (out / "index.html").read_text()


def test_a_form_whose_class_this_timm_version_lacks_is_skipped_not_an_import_error(monkeypatch):
    """The oldest supported timm has no ``timm.layers.diff_attention``: a form taught for a class the installed timm does
    not have can match no module, so finding the sites of any other model must not fail on importing it."""
    import timm

    from qkhooks.models import timm as timm_adapter

    for where in ("timm.layers.not_in_this_version.Attention", "timm.layers.NotInThisVersion"):  # no module; no class
        form = timm_adapter.ExtraForm(where, lambda attn: (None, ()), lambda site, attn: site)
        assert form.load() is None
        monkeypatch.setitem(timm_adapter.EXTRA_FORMS, "NotInThisVersion", form)
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2)
        assert [s.path for s in qkhooks.sites(model)] == ["blocks.0.attn", "blocks.1.attn"]
