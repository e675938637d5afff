"""zoo13: differential attention (timm ``DiffAttention``, ``vit_dwee_*``) in run files. Its maps have the model's H heads,
its modes and spectrum the 2H component heads, and the layer's geometry says which is which (``component_heads``).
The stored maps, terms and modes are checked with h5py against the live recording and against the component
softmaxes written out from the module's own parameters (test_map_forms' reference); a run stopped after a batch and
resumed equals an uninterrupted one; analyses that read mode head h as map head h refuse the layer, those that read
the modes alone name their heads as components."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from qkhooks import QKHooksError

from test_map_forms import _diff_reference, _dwee

LIMIT, BATCH = 6, 2


def _record(out, model: torch.nn.Module | None = None, **kw):
    """Differential ViT (2 layers, 4 map heads of 8 component heads), bundled photos, full maps and 3 modes."""
    from qkhooks.data.preprocess import ImageConfig
    from qkhooks.models.load import load_model
    from qkhooks.stream import record_dataset

    config = ImageConfig(size=(32, 32), mean=(0.5,) * 3, std=(0.5,) * 3)
    return record_dataset(load_model(_dwee() if model is None else model, image_config=config), "samples", out, limit=LIMIT, batch_size=BATCH,
                          progress=False, dtype="float32", modes=3, attention="full", reducers=[], checkpoint_every=1,
                          **kw)


def test_differential_run_file_equals_the_live_recording_and_the_component_softmaxes(tmp_path):
    from qkhooks.store import open_run

    live: dict[str, list[torch.Tensor]] = {}

    def keep(batch) -> None:
        for layer, cap in batch.captures.items():
            for name, value in {"full": cap.attention["full"], "query": cap.query, "key": cap.key, **cap.terms}.items():
                if name != "lambda":
                    live.setdefault(f"{name}{layer}", []).append(value.clone())
            live.setdefault(f"lambda{layer}", [cap.terms["lambda"].clone()])

    path = tmp_path / "diff.h5"
    _record(path, on_batch=keep)
    with h5py.File(path, "r") as f:
        for layer in (0, 1):
            for name, stored in (("full", f"attention/L{layer}/full"), ("query", f"modes/L{layer}/query"),
                                 ("key", f"modes/L{layer}/key"), ("softmax1", f"terms/L{layer}/softmax1"),
                                 ("softmax2", f"terms/L{layer}/softmax2")):
                np.testing.assert_array_equal(f[stored][:], torch.cat(live[f"{name}{layer}"]).numpy(), err_msg=stored)
            np.testing.assert_array_equal(f[f"terms/L{layer}/lambda"][()], live[f"lambda{layer}"][0].numpy())
            assert f[f"attention/L{layer}/full"].shape[1] == 4 and f[f"modes/L{layer}/query"].shape[1] == 8
            assert f[f"spectrum/L{layer}/S"].shape[0] == 8
    with open_run(path) as run:
        assert run.terms_layers == [0, 1]
        for layer in (0, 1):
            g = run.geometry(layer)
            assert (g.heads, g.component_heads, g.head_dim) == (4, 8, 4)
            assert "4 maps of 8 component heads" in g.describe()
            terms = run.terms(layer)
            s1, s2 = np.asarray(terms["softmax1"][:], np.float64), np.asarray(terms["softmax2"][:], np.float64)
            lam = float(np.asarray(terms["lambda"]))
            np.testing.assert_allclose(run.attention(layer, "full")[:], s1 - lam * s2, atol=1e-6, rtol=0)


def test_stored_differential_terms_are_the_component_softmaxes_of_the_models_own_tokens(tmp_path):
    """Independent of the recording: the component softmaxes written out from the module's parameters and the tokens
    it received in the run (a plain forward pre-hook of the model's own)."""
    from qkhooks.store import open_run

    model = _dwee()
    attn = model.blocks[1].attn
    seen: list[torch.Tensor] = []
    handle = attn.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    path = tmp_path / "diff.h5"
    try:
        _record(path, model=model)
    finally:
        handle.remove()
    tokens = torch.cat([t for t in seen if len(t) == BATCH])  # the run's batches (a blank probe forward may precede)
    assert len(tokens) == LIMIT
    with torch.no_grad():
        _, s1, s2, lam = _diff_reference(attn, tokens)
    with open_run(path) as run:
        np.testing.assert_allclose(run.terms(1)["softmax1"][:], s1.numpy(), atol=1e-5, rtol=0)
        np.testing.assert_allclose(run.terms(1)["softmax2"][:], s2.numpy(), atol=1e-5, rtol=0)
        np.testing.assert_allclose(run.terms(1)["lambda"], lam.numpy(), atol=1e-6, rtol=0)
        np.testing.assert_allclose(run.attention(1, "full")[:], (s1 - lam * s2).numpy(), atol=1e-5, rtol=0)


def test_a_differential_run_stopped_then_resumed_equals_an_uninterrupted_run(tmp_path):
    from qkhooks.store import open_run

    clean, stopped = tmp_path / "clean.h5", tmp_path / "stopped.h5"
    _record(clean)
    batches = []

    def stop(batch) -> None:
        batches.append(batch)
        if len(batches) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _record(stopped, on_batch=stop)
    with open_run(stopped) as run:
        assert not run.complete and 0 < run.n < LIMIT
    _record(stopped, resume=True)
    with open_run(stopped) as a, open_run(clean) as b:
        assert a.complete and a.ids == b.ids and a.n == LIMIT
        assert a.arrays() == b.arrays() and "terms/L1/softmax2" in a.arrays()
        for name in a.arrays():
            np.testing.assert_array_equal(a.array(name)[:], b.array(name)[:], err_msg=name)
        for layer in (0, 1):
            np.testing.assert_array_equal(a.terms(layer)["lambda"], b.terms(layer)["lambda"])
            assert a.geometry(layer) == b.geometry(layer)


def test_analyses_never_read_a_component_head_as_a_map_head(tmp_path):
    """An analysis of the maps as one form refuses the layer naming it and why; the modes analysis of a stored run
    and BFD compute the per-component variant (one entry per component head) and name it."""
    import qkhooks
    from qkhooks.analysis.bfd import run_bfd
    from qkhooks.analysis.modes import analyze_modes
    from qkhooks.models.class_attention import refuse_modes_of_mixed_maps

    site = qkhooks.sites(_dwee())[1]
    with pytest.raises(QKHooksError, match=r"layer 1 \(blocks\.1\.attn\) is differential attention.*4 maps.*8 "
                                           r"component heads.*not map head h"):
        refuse_modes_of_mixed_maps(site)
    path = tmp_path / "diff.h5"
    _record(path)
    summary = analyze_modes(path, tmp_path / "modes", images=False)
    assert "differential attention" in summary["component_heads_note"]
    for entry in summary["layers"]:
        assert [h["component_of"] for h in entry["heads"]] == [
            {"map_head": m, "term": t} for m in range(4) for t in ("softmax1", "softmax2")]
    bfd = run_bfd(_dwee(), torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0)), batch_size=3,
                  holdout_every=3)
    assert [len(layer["heads"]) for layer in bfd["layers"]] == [8, 8]  # the component heads, not the 4 maps
    assert "differential attention" in bfd["variant"] and "2H component content forms" in bfd["variant"]
