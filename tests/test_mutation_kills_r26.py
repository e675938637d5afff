"""Kill tests for the mutants of round 25's code that its own tests let survive (module "round26" of
tests/mutation.py, ``--only ROUND25``; tests/MUTATION.md's round-26 section names each); each checks a behaviour a
user relies on against an independent reference (numpy's pairwise cosines, h5py's own error for a read, HDF5's own
property lists, a dense SVD, hashlib's digests). The last test keeps the harness's round26 module consistent."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch

import qkhooks
from conftest import TINY_MODELS
from qkhooks.analysis.anisotropy import AnisotropyReducer
from qkhooks.capture import BatchCapture, LayerCapture
from qkhooks.distributed import merge_shards, shard_path
from qkhooks.store import RunWriter, repair, verify_run
from qkhooks.store import format as fmt

from test_ids_checksum import blake2b_rows, write
from test_mutation_kills_r25 import _harness
from test_modes import numpy_mean_pairwise_cosine
from test_windows_forms import TWINS_LSA
from test_windows_forms import test_windowed_modes_are_the_image_grid_tokens_projected as windowed_modes_projected

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------ analysis/anisotropy.py
def test_the_anisotropy_baseline_ignores_the_embeddings_scale_and_skips_zero_vectors_layer_by_layer():
    """The baseline is a mean cosine: embeddings of any norm (here far below 1) count, and only zero vectors are left
    out, each layer's own (one read gives every layer's count: the counts must stay with their layers)."""
    g = torch.Generator().manual_seed(3)
    n, prefix, d = 7, 1, 5
    centre = prefix + 2 * 4 + 2  # the 4x4 grid's centre token
    layers = {}
    for layer, (scale, zeros) in {2: (1e-3, [1]), 5: (0.2, [0, 4, 6])}.items():
        x = (torch.randn(n, prefix + 16, d, generator=g, dtype=torch.float64) + 1.5) * scale
        x[zeros, centre] = 0.0
        layers[layer] = x
    reducer = AnisotropyReducer()
    reducer.update(BatchCapture(ids=[], meta={"num_prefix_tokens": prefix, "grid": (4, 4)},
                                layers={l: LayerCapture(l, n, inputs=x) for l, x in layers.items()}))
    for layer, x in layers.items():
        z = x[:, centre].numpy()
        kept = z[np.linalg.norm(z, axis=1) > 0]
        assert reducer.count[layer] == len(kept)
        assert reducer.baselines()[layer] == pytest.approx(numpy_mean_pairwise_cosine(kept), abs=1e-12)


# ------------------------------------------------------------------------------------ store/repair.py
def test_repair_notes_a_root_attribute_it_cannot_read_and_copies_every_other(tmp_path):
    """A root attribute that h5py cannot read (an HDF5 time type, as another tool may write): the repaired copy notes
    it by name and carries every other attribute as h5py reads it, with this qkhooks' format number."""
    path = tmp_path / "run.h5"
    written = write(path)
    with h5py.File(path, "r+") as f:
        h5py.h5a.create(f.id, b"written_elsewhere", h5py.h5t.UNIX_D32LE, h5py.h5s.create(h5py.h5s.SCALAR))
        with pytest.raises(TypeError):
            f.attrs["written_elsewhere"]
        readable = {k: f.attrs[k] for k in f.attrs if k not in ("written_elsewhere", fmt.FORMAT_ATTR)}
    report = repair(path, tmp_path / "fixed.h5")
    assert report.problems == ["root attribute written_elsewhere unreadable"]
    assert report.recovered == written
    with h5py.File(tmp_path / "fixed.h5", "r") as f:
        assert set(f.attrs) == set(readable) | {fmt.FORMAT_ATTR}
        assert all(np.array_equal(f.attrs[k], v) for k, v in readable.items())
        assert int(f.attrs[fmt.FORMAT_ATTR]) == fmt.FORMAT


def _flip_in_chunk(path: Path, name: str, row: int, at: int = 4) -> None:
    """Flip one bit of the stored bytes of ``name``'s chunk holding ``row`` (its place as h5py reports it)."""
    with h5py.File(path, "r") as f:
        info = f[name].id.get_chunk_info_by_coord((row,) + (0,) * (f[name].ndim - 1))
    with open(path, "r+b") as fh:
        fh.seek(info.byte_offset + at)
        byte = fh.read(1)[0]
        fh.seek(info.byte_offset + at)
        fh.write(bytes([byte ^ 0x10]))


def _h5py_error(path: Path, name: str, lo: int, hi: int) -> str:
    with h5py.File(path, "r") as f, pytest.raises(OSError) as raised:
        f[name][lo:hi]
    return str(raised.value)


@pytest.mark.parametrize("layout", [{"checksum": True}, {"checksum": False, "compression": "gzip"}],
                         ids=["fletcher32", "gzip-only"])
def test_a_chunk_that_does_not_read_is_named_with_hdf5s_own_error_and_the_checksum_only_where_there_is_one(
        tmp_path, layout):
    """Verify's and repair's line for an array chunk that does not read: h5py's own error for reading those rows,
    followed by the note on the checksum only when the array carries one (a compressed chunk without a checksum fails
    to decompress; nothing is said of a checksum it does not have)."""
    path = tmp_path / "run.h5"
    write(path, chunk_images=4, **layout)
    _flip_in_chunk(path, "maps/a", 4, at=8)
    error = _h5py_error(path, "maps/a", 4, 8)
    note = "; the array carries a Fletcher-32 checksum" if layout["checksum"] else ""
    line = f"/maps/a: rows 4-7 do not read ({error}{note})"
    assert line in verify_run(path).problems
    assert line in repair(path, tmp_path / "fixed.h5").problems


def test_verify_of_a_run_whose_ids_chunk_fails_names_the_ids_rows_and_leaves_their_digests_alone(tmp_path):
    """The ids' chunk does not read whole (a flipped bit in its first id's heap address; the ids carry no Fletcher-32,
    their digests are their checksum): verify names the one row whose string does not read (round 50: each id's heap
    reference is checked from the file's bytes, so the other 11 rows, which h5py reads one by one, are no longer lost
    with it), and does not compare its digest with an id it could not read (nor report the digests, which read and
    are intact)."""
    path = tmp_path / "run.h5"
    write(path)  # 12 images, the ids in one chunk of 1024
    with h5py.File(path, "r") as f:
        intact = [v.decode() for v in f[fmt.IDS][:12]]
    _flip_in_chunk(path, fmt.IDS, 0)
    _h5py_error(path, fmt.IDS, 0, 12)  # h5py cannot read the chunk whole
    with h5py.File(path, "r") as f:
        assert f[fmt.ID_DIGESTS].shape == (12, fmt.ID_DIGEST_BYTES)  # the digests still read
        assert [f[fmt.IDS][i].decode() for i in range(1, 12)] == intact[1:]  # the other rows, one by one
    report = verify_run(path)
    assert report.damaged == {fmt.IDS: [(0, 1)]}
    assert [p for p in report.problems if p.startswith("/")] == [
        f"/{fmt.IDS}: row 0 does not read (their strings lie in a heap block of the file whose header is damaged (or "
        "the reference to it), which HDF5 refuses to read, so they are not read)"]


def test_digests_in_two_chunks_one_damaged_lose_only_that_chunks_images(tmp_path):
    """Digests of eight images in two chunks of four, read in one block: a bit flipped in the second chunk fails only
    it; the first chunk's images are kept (their digests against hashlib) and only the second's are lost."""
    path = tmp_path / "run.h5"
    written = write(path, batches=2, chunk_images=4)
    _flip_in_chunk(path, fmt.ID_DIGESTS, 4, at=21)
    assert verify_run(path).damaged == {fmt.ID_DIGESTS: [(4, 8)]}
    fixed = repair(path, tmp_path / "fixed.h5")
    assert fixed.lost == [4, 5, 6, 7] and fixed.recovered == written[:4]
    with h5py.File(tmp_path / "fixed.h5", "r") as f:
        assert np.array_equal(f[fmt.ID_DIGESTS][()], blake2b_rows(written[:4]))


def test_verify_reads_a_merged_view_of_one_value_per_image_and_of_several(tmp_path):
    """A merge's arrays are views of its shards (unchunked: read a block of rows at a time); verify reads one of a
    value per image (a score) as it reads one of several (maps) and finds every row as the shards hold it."""
    out = tmp_path / "run.h5"
    values = {}
    for rank in range(2):
        rng = np.random.default_rng(rank)
        with RunWriter(shard_path(out, rank, 2), checksum=True,
                       attrs={"config": json.dumps({"shard": [rank, 2]})}) as writer:
            for b in range(2):
                batch = {"maps/a": rng.standard_normal((4, 3, 5)).astype(np.float16),
                         "scores/s": rng.standard_normal(4).astype(np.float16)}
                writer.write_batch([f"r{rank}-{b}-{i}" for i in range(4)], batch)
                for name, v in batch.items():
                    values.setdefault(name, []).append(v)
    merge_shards(out)
    with h5py.File(out, "r") as f:
        assert f["scores/s"].is_virtual and f["scores/s"].chunks is None and f["scores/s"].ndim == 1
        for name, parts in values.items():
            assert np.array_equal(f[name][()], np.concatenate(parts))
    report = verify_run(out)
    assert report.ok and report.damaged == {} and report.arrays == ["maps/a", "scores/s"]


def test_verify_of_a_merged_view_names_only_the_rows_of_its_shards_damaged_chunks(tmp_path):
    """A merge's view reads each row from its shard's chunks, so a damaged chunk of a shard fails every block of the
    view around it: verify names exactly the rows that do not read (found by halving a block that does not), as h5py
    reading the view row by row finds them, not every row of the block (round 26: it named rows 0-23 of 24)."""
    out = tmp_path / "run.h5"
    for rank in range(2):
        write(shard_path(out, rank, 2), prefix=f"r{rank}", attrs={"config": json.dumps({"shard": [rank, 2]})})
    merge_shards(out)
    for rank, row in ((0, 5), (1, 2), (1, 3)):  # view rows 5, 14 and 15 (12 images a shard)
        _flip_in_chunk(shard_path(out, rank, 2), "maps/a", row, at=8)
    with h5py.File(out, "r") as f:
        view = f["maps/a"]
        assert view.is_virtual and view.shape[0] == 24
        unread = []
        for row in range(24):
            try:
                view[row]
            except OSError:
                unread.append(row)
    assert unread == [5, 14, 15]
    error = _h5py_error(out, "maps/a", 5, 6)
    report = verify_run(out)
    assert report.damaged == {"maps/a": [(5, 6), (14, 16)]}
    assert f"/maps/a: rows 5, 14-15 do not read ({error})" in report.problems


# ------------------------------------------------------------------------------------ models/windows.py
@pytest.mark.parametrize("case", [c for c in TWINS_LSA if "padded" in c.name], ids=lambda c: c.name)
def test_a_model_that_cuts_its_own_windows_gives_the_image_grid_tokens_projected(case):
    """Twins' locally-grouped attention takes the image-grid tokens and cuts the windows itself (``windows_inside``:
    the site windows the tokens, the padded grid too): its maps are the tokens entering the block's attention projected
    onto u_n and v_n directly (test_windows_forms' check, here so that round 26's selection reaches that branch)."""
    windowed_modes_projected(case)


# ------------------------------------------------------------------------------------ spectrum.py
def test_a_spectrum_computed_in_a_new_thread_reuses_the_cache_and_is_the_dense_svd():
    """A thread that never entered record() (a server's worker, a loader thread) asks for a spectrum of a model whose
    spectra are cached: answered, and equal to the dense SVD of W_qᵀW_k."""
    model = TINY_MODELS[0].model()
    first = qkhooks.spectrum(model)  # cached, in this thread
    out: dict[str, object] = {}

    def worker() -> None:
        try:
            out["spec"] = qkhooks.spectrum(model)
        except BaseException as exc:  # handed to the test's thread
            out["error"] = exc

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert "error" not in out, out.get("error")
    spec = out["spec"]
    for site in qkhooks.sites(model):
        w = site.weights()
        ref = torch.linalg.svdvals(w.w_q.double().transpose(1, 2) @ w.w_k.double())[:, :spec[site.layer].S.shape[1]]
        assert torch.allclose(spec[site.layer].S.double(), ref, rtol=1e-5, atol=1e-7 * float(ref.max()))
        assert torch.equal(spec[site.layer].S, first[site.layer].S)


spectrum_module = sys.modules["qkhooks.spectrum"]  # the module: qkhooks.spectrum is also the function's name


def _dense_svdvals(site, k: int) -> torch.Tensor:
    """The reference: singular values of W_qᵀW_k per head, dense float64."""
    w = site.weights()
    return torch.linalg.svdvals(w.w_q.double().transpose(1, 2) @ w.w_k.double())[:, :k]


def test_entering_record_again_compares_the_cached_weights_in_one_read_not_layer_by_layer(monkeypatch):
    """With the device path opened (as for the cache's copies on a GPU), entering record() again takes every cached
    layer's verdict from the one batched comparison: no per-layer comparison (``_same_bits``: on a GPU one host wait
    for every kernel queued, a layer), and the spectra are reused; an edit through ``.data`` is still seen (the edited
    layer's spectrum is the dense SVD of the new weights)."""
    monkeypatch.setattr(spectrum_module, "_compared_on_device", lambda t: True)
    per_layer: list[int] = []
    same_bits = spectrum_module._same_bits
    monkeypatch.setattr(spectrum_module, "_same_bits", lambda a, b: per_layer.append(1) or same_bits(a, b))
    model = TINY_MODELS[0].model()
    with qkhooks.record(model, modes=4) as first:
        pass
    per_layer.clear()
    with torch.no_grad():
        model.blocks[0].attn.qkv.weight.data[0, 0] += 1.0  # _version kept: only the bits tell
    with qkhooks.record(model, modes=4) as again:
        pass
    assert per_layer == []
    assert again.qk_spectrum[1] is first.qk_spectrum[1] and again.qk_spectrum[0] is not first.qk_spectrum[0]
    site = qkhooks.sites(model)[0]
    assert torch.allclose(again.qk_spectrum[0].S.double(), _dense_svdvals(site, 4), rtol=1e-5)


@pytest.mark.parametrize("qk_path", [True, False])
def test_a_float32_vit_takes_its_maps_from_the_models_own_q_and_k_by_default(qk_path):
    """Entering record() decides each layer's path once (round 25 moved that decision into the batched weights
    check's block): a float32 ViT with input="normed" takes every layer's maps from its own q/k outputs, ``qk_path=False``
    from the tokens; both give the tokens entering W_q/W_k projected onto u_n (the reference, in float64)."""
    tiny = TINY_MODELS[0]
    model, images = tiny.model(), tiny.images()
    tokens: dict[int, torch.Tensor] = {}
    with qkhooks.record(model, modes=4, qk_path=qk_path, keep_inputs=True) as run, torch.no_grad():
        assert run.mode_source == {s.layer: "qk" if qk_path else "x" for s in run.sites}
        run(images)
        tokens = {layer: x.double() for layer, x in run.inputs.items()}
    for site in run.sites:
        want = torch.einsum("bnd,hdk->bhkn", tokens[site.layer], run.spectrum(site.layer).U.double())
        assert torch.allclose(run.query(site.layer).double(), want, atol=1e-4)


def test_a_module_with_several_sites_takes_no_shared_verdict_and_its_edit_is_seen():
    """Two sites of one attention module (each reads its own tensors) get no verdict from the batched comparison: each
    takes its own bit-for-bit check, so an edit through ``.data`` is seen, while another module's cached spectrum is
    reused within the same block: the edited layer's spectrum is the dense SVD of its new weights."""
    model = TINY_MODELS[0].model()
    first = qkhooks.spectrum(model)  # every layer cached, with its copy of the weights
    site, other = qkhooks.sites(model)[:2]
    twin = dataclasses.replace(site)  # a second site of the same module
    with torch.no_grad():
        model.blocks[0].attn.qkv.weight.data[:8] *= 3.0  # _version kept: only the bits tell
    with spectrum_module.cached_weights_checked([site, twin, other]):
        edited, kept = spectrum_module.layer_spectrum(site), spectrum_module.layer_spectrum(other)
    assert kept is first[other.layer]
    ref = _dense_svdvals(site, edited.S.shape[1])
    assert torch.allclose(edited.S.double(), ref, rtol=1e-5, atol=1e-7 * float(ref.max()))


# ------------------------------------------------------------------------------------ tests/mutation.py: round26
def module_files(mutation: Any, module: str) -> list[str]:
    """The files the harness's ``module`` mutates, once its files and test files are seen to exist and its selection
    to name only test files it selects."""
    files, tests, select = mutation.MODULES[module]
    assert all((ROOT / f).is_file() for f in files) and all((ROOT / t).is_file() for t in tests)
    stems = {Path(t).stem for t in tests}
    assert {w for w in select.replace("(", " ").replace(")", " ").split() if w.startswith("test_")} <= stems
    return files


def commits_in(revs: str) -> list[str]:
    """The commits ``git rev-list revs`` names in this checkout (none where it cannot resolve them)."""
    listed = subprocess.run(["git", "rev-list", revs], cwd=ROOT, capture_output=True, text=True)
    return listed.stdout.split() if listed.returncode == 0 else []


def library_files_changed(base: str, head: str) -> list[str]:
    """The files under qkhooks/ that ``git diff base head`` changes in this checkout."""
    return subprocess.run(["git", "diff", "--name-only", base, head, "--", "qkhooks"], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout.split()


def check_round_module(module: str, named_set: str, base: str, head: str, library_commits: int) -> None:
    """The harness's ``module`` and its named set: every file to mutate and every test file exists, the selection names
    only test files it selects, the set is the commit range ``base..head``, which resolves in this checkout to
    ``library_commits`` commits under qkhooks/, and every library file they changed is mutated."""
    mutation = _harness()
    files = module_files(mutation, module)
    assert mutation.NAMED_SETS[named_set] == getattr(mutation, named_set) == (f"commits:{base}..{head}",)
    assert set(library_files_changed(base, head)) == set(files)
    library = subprocess.run(["git", "rev-list", f"{base}..{head}", "--", "qkhooks"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.split()
    assert len(library) == library_commits and set(library) <= set(commits_in(f"{base}..{head}"))


def test_the_round26_module_names_files_and_tests_that_exist_and_round_25s_commits():
    """The harness's module "round26" and its named set ROUND25: every file to mutate and every test file exists, the
    selection names only test files it selects, and the commit range resolves in this checkout to round 25's 20 commits (merges included)
    (``git rev-list``), so ``--only ROUND25`` draws the same sample wherever it runs."""
    mutation = _harness()
    files = module_files(mutation, "round26")
    assert mutation.NAMED_SETS["ROUND25"] == mutation.ROUND25 == ("commits:a5476db..aaff763",)
    assert len(commits_in("a5476db..aaff763")) == 20
    changed = library_files_changed("a5476db", "aaff763")
    named = {"_devices.py", "spectrum.py", "_hdf5.py", "format.py", "repair.py", "anisotropy.py", "bfd_reducers.py",
             "windows.py", "capture.py"}  # what round 25 changed that the module exists for
    assert {f for f in changed if Path(f).name in named} <= set(files)
