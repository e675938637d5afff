"""One vocabulary live and stored (qkhooks.access): the same calls on a Recording, its BatchCapture and the
RunReader of the same images give equal arrays; layers by module path; old spellings deprecated, not gone;
record()'s real signature; reading a run without torch."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import timm
import torch

import qkhooks
from qkhooks import QKHooksError
from qkhooks.capture import BatchCapture, LayerCapture, Recording
from qkhooks.data import collate, open_dataset
from qkhooks.stream import record_dataset

ROOT = Path(__file__).resolve().parents[1]
F16 = dict(rtol=1e-3, atol=1e-3)  # float16 storage: 11 significant bits


def tiny_vit() -> qkhooks.LoadedModel:
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, patch_size=32, embed_dim=32, depth=2,
                              num_heads=4).eval()
    return qkhooks.load_model(model)


def read_everything(results) -> dict[str, np.ndarray]:
    """The script a user writes once and runs on a Recording, a BatchCapture or a RunReader."""
    out: dict[str, np.ndarray] = {"n": np.asarray(results.n), "ids": np.asarray(results.ids)}
    for layer in results.mode_layers:
        path = results.module_paths[layer]
        out[f"query{layer}"] = np.asarray(results.query(layer)[:], dtype=np.float64)
        out[f"key{layer}"] = np.asarray(results.key(path)[:], dtype=np.float64)  # by module path
        spec = results.spectrum(layer)
        for name in ("U", "S", "V", "cos", "cosine_weighted"):
            out[f"spectrum{layer}.{name}"] = np.asarray(getattr(spec, name), dtype=np.float64)
    for kind in results.attention_kinds:
        for layer in results.attention_layers(kind):
            out[f"attention{layer}.{kind}"] = np.asarray(results.attention(layer, kind)[:], dtype=np.float64)
    out["layers"] = np.asarray(results.layers)
    return out


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """The same three images recorded live and into a run file (float16), plus the model's module paths."""
    loaded = tiny_vit()
    path = tmp_path_factory.mktemp("vocab") / "run.h5"
    record_dataset(loaded, "samples", path, modes=4, attention="rows+full:1", limit=3, batch_size=3, reducers=[],
                   progress=False)
    batch = collate([open_dataset("samples", loaded.image_config, limit=3)[i] for i in range(3)])
    with qkhooks.record(loaded, modes=4, attention="rows+full:1") as live, torch.no_grad():
        live(batch["pixel_values"], ids=list(batch["id"]))
    return live, path


def assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        if a[name].dtype.kind in "US":
            assert a[name].tolist() == b[name].tolist(), name
        else:
            np.testing.assert_allclose(a[name], b[name], err_msg=name, **F16)


def test_the_same_script_reads_a_recording_its_batch_and_the_run_file_alike(recorded):
    live, path = recorded
    from_live, from_batch = read_everything(live), read_everything(live.last)
    with qkhooks.open_run(path) as run:
        from_file = read_everything(run)
        assert run.module_paths == live.module_paths == live.last.module_paths == {0: "blocks.0.attn", 1: "blocks.1.attn"}
        assert run.attention_kinds == live.attention_kinds == ["full", "rows"]
        assert run.attention_layers("full") == live.attention_layers("full") == [1]
    assert from_live["layers"].tolist() == [0, 1] and int(from_live["n"]) == 3
    assert set(from_live) >= {"query0", "key1", "attention1.full", "attention0.rows", "spectrum1.U"}
    for name in from_live:  # live and batch are the very same tensors
        np.testing.assert_array_equal(from_live[name], from_batch[name], err_msg=name)
    assert_same(from_live, from_file)


def test_a_stored_spectrum_is_a_layer_spectrum_of_numpy_arrays_whose_statistics_match_the_live_one(recorded):
    live, path = recorded
    with qkhooks.open_run(path) as run:
        stored, raw = run.spectrum("blocks.1.attn"), run.spectrum_arrays(1)
        whole = run.qk_spectrum
    mine = live.spectrum(1)
    assert isinstance(stored, qkhooks.LayerSpectrum) and isinstance(stored.U, np.ndarray)
    assert (stored.layer, stored.num_heads, stored.num_modes, stored.dim) == (1, 4, 4, 32)
    np.testing.assert_allclose(stored.cos, raw["cos"], atol=1e-6)  # recomputed in numpy = written by torch
    np.testing.assert_allclose(stored.bilinear(), mine.bilinear().numpy(), atol=1e-5)
    np.testing.assert_allclose(stored.top(2).S, mine.S[:, :2].numpy(), rtol=1e-6)
    assert [s.layer for s in whole] == [0, 1] and whole.table().splitlines()[2:] == live.qk_spectrum.table().splitlines()[2:]


def test_layers_by_index_or_module_path_and_unknown_ones_refused_naming_the_known(recorded):
    live, path = recorded
    with qkhooks.open_run(path) as run:
        for results in (live, live.last, run):
            np.testing.assert_array_equal(np.asarray(results.query("blocks.1.attn")[:]), np.asarray(results.query(1)[:]))
            with pytest.raises(QKHooksError, match=r"did not record layer 7; its layers are \[0, 1\]"):
                results.query(7)
            with pytest.raises(QKHooksError, match=r"no layer at module path 'blocks.9.attn'.*'blocks.0.attn' \(layer 0\)"):
                results.attention("blocks.9.attn")
            with pytest.raises(QKHooksError, match=r"no 'full' attention for layer 0 \(layers with them: \[1\]\)"):
                results.attention(0, "full")


def test_a_run_without_stored_module_paths_refuses_a_path_and_still_takes_indices(recorded, tmp_path):
    _, path = recorded
    old = tmp_path / "old.h5"
    old.write_bytes(path.read_bytes())
    with h5py.File(old, "r+") as f:
        info = json.loads(f["model"].attrs["info"])
        del info["paths"]
        f["model"].attrs["info"] = json.dumps(info)
    with qkhooks.open_run(old) as run:
        assert run.module_paths == {} and run.query(1).shape[0] == 3
        with pytest.raises(QKHooksError, match=r"does not know its layers' module paths.*block index: \[0, 1\]"):
            run.query("blocks.1.attn")


def test_a_run_with_attention_but_no_modes_lists_every_recorded_layer(tmp_path):
    path = tmp_path / "att.h5"
    record_dataset(tiny_vit(), "samples", path, modes=None, attention="rows", limit=2, batch_size=2, reducers=[],
                   progress=False)
    with qkhooks.open_run(path) as run:
        assert run.layers == [0, 1] and run.mode_layers == [] and run.qk_spectrum is None
        assert run.attention(1).shape[:3] == (2, 4, 2)
        with pytest.raises(QKHooksError, match=r"no query/key maps for layer 0 \(layers with them: none\); record with modes="):
            run.query(0)
        with pytest.raises(QKHooksError, match=r"stores no modes for layer 1.*spectrum_arrays\(1\)"):
            run.spectrum(1)
        assert set(run.spectrum_arrays(1)) == {"S_all", "cos_all"}


def test_old_spellings_still_work_and_warn_naming_the_new_call(recorded):
    live, path = recorded
    with pytest.warns(DeprecationWarning, match=r"use query\(l\)"):
        assert live.query[1] is live.query(1)
    with pytest.warns(DeprecationWarning, match=r"use key\(l\)"):
        assert sorted(live.key) == [0, 1]
    with pytest.warns(DeprecationWarning, match=r"use spectrum\(l\) or recording.qk_spectrum"):
        assert live.spectrum[1] is live.spectrum(1) is live.qk_spectrum[1]
    with pytest.warns(DeprecationWarning, match=r"use Recording.attention\(l, kind\)"):
        maps = live.attention_maps("full")
    assert list(maps) == [1] and maps[1] is live.attention(1, "full")
    with pytest.warns(DeprecationWarning, match=r"use batch.captures"):
        assert dict(live.last.layers.items()) == live.last.captures
    with pytest.warns(DeprecationWarning, match=r"BatchCapture\(captures=...\)"):
        made = BatchCapture(ids=["a"], meta={}, layers={0: LayerCapture(0, 1)})
    assert made.layers == [0] and made.n == 1
    with qkhooks.open_run(path) as run, pytest.warns(DeprecationWarning, match=r"spectrum_arrays\(l\)"):
        old = run.spectrum(1)
        assert set(old.keys()) == set(old) == set(run.spectrum_arrays(1)) and np.array_equal(old["S"], run.spectrum_arrays(1)["S"])
    assert [s.kind for s in live.attention_specs] == ["rows", "full"] and live.attention_specs[1].layers == (1,)
    with pytest.raises(TypeError):  # the one change that cannot warn: attention is the method now (README says so)
        list(live.attention)


def test_the_library_itself_uses_no_deprecated_spelling(tmp_path):
    """A full record (default reducers, attention rows on odd-one-out displays) and read with deprecations as errors."""
    loaded = tiny_vit()
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        with qkhooks.record(loaded, modes=4, attention="rows", keep_inputs=True) as live, torch.no_grad():
            live(torch.randn(2, 3, 224, 224))
        read_everything(live)
        live.last.inputs(0)
        path = tmp_path / "o3.h5"
        record_dataset(loaded, "o3:4:3", path, modes=4, attention="rows", batch_size=2, progress=False)
        with qkhooks.open_run(path) as run:
            read_everything(run)
            assert run.states()


def test_record_shows_its_real_signature_and_documents_every_option():
    params = inspect.signature(qkhooks.record).parameters
    init = inspect.signature(Recording.__init__).parameters
    assert list(params) == [p for p in init if p != "self"]
    assert all(params[p].default == init[p].default for p in params)
    assert all(p.kind is p.KEYWORD_ONLY for name, p in params.items() if name != "model")
    doc = qkhooks.record.__doc__
    assert all(f"        {name}: " in doc for name in params)


def test_every_public_name_is_reachable_and_listed():
    assert set(qkhooks.__all__) <= set(dir(qkhooks))
    for name in qkhooks.__all__:
        assert getattr(qkhooks, name) is not None
    assert callable(qkhooks.spectrum) and qkhooks.record.__module__ == "qkhooks.capture"


HIDE_TORCH = """
import sys

class _HideTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "timm", "transformers"):
            raise ImportError(f"{name} is hidden in this test")
        return None

sys.meta_path.insert(0, _HideTorch())
"""

READ_WITHOUT_TORCH = """
import sys
import numpy as np
import qkhooks
from qkhooks import QKHooksError, RunReader, open_run

with qkhooks.open_run(sys.argv[1]) as run:
    assert isinstance(run, RunReader)
    out = {"n": np.asarray(run.n), "ids": np.asarray(run.ids), "layers": np.asarray(run.layers)}
    for layer in run.mode_layers:
        out[f"query{layer}"] = run.query(layer)[:]
        out[f"key{layer}"] = run.key(run.module_paths[layer])[:]
        out[f"S{layer}"] = run.spectrum(layer).S
        out[f"cosw{layer}"] = run.spectrum(layer).cosine_weighted
    for kind in run.attention_kinds:
        for layer in run.attention_layers(kind):
            out[f"attention{layer}.{kind}"] = run.attention(layer, kind)[:]
np.savez(sys.argv[2], **out)
try:
    qkhooks.record
except ImportError as exc:
    print("record needs torch:", exc)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "timm", "transformers", "argparse"))
print("loaded:", loaded)
"""


def test_a_run_is_read_where_torch_cannot_be_imported(recorded, tmp_path):
    live, path = recorded
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(HIDE_TORCH)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(ROOT)])}
    proof = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True)
    assert "hidden in this test" in proof.stderr  # the finder works: torch really cannot be imported
    got = subprocess.run([sys.executable, "-c", textwrap.dedent(READ_WITHOUT_TORCH), str(path), str(tmp_path / "out.npz")],
                         env=env, capture_output=True, text=True, timeout=120)
    assert got.returncode == 0, got.stderr[-3000:]
    assert "record needs torch: torch is hidden" in got.stdout and "loaded: []" in got.stdout
    stored = dict(np.load(tmp_path / "out.npz"))
    assert stored["ids"].tolist() == live.ids and stored["layers"].tolist() == live.layers and int(stored["n"]) == 3
    for layer in live.layers:
        np.testing.assert_allclose(stored[f"query{layer}"], live.query(layer).numpy(), **F16)
        np.testing.assert_allclose(stored[f"key{layer}"], live.key(layer).numpy(), **F16)
        np.testing.assert_allclose(stored[f"S{layer}"], live.spectrum(layer).S.numpy(), rtol=1e-6)
        np.testing.assert_allclose(stored[f"cosw{layer}"], live.spectrum(layer).cosine_weighted.numpy(), atol=1e-6)
    np.testing.assert_allclose(stored["attention1.full"], live.attention(1, "full").numpy(), **F16)
    np.testing.assert_allclose(stored["attention0.rows"], live.attention(0).numpy(), **F16)
