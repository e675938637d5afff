"""Kill tests for the mutants of round 27's later library commits (``bb42916..dcf6012``) that their tests let survive
(module "round27b" of tests/mutation.py, ``--only ROUND27B``; tests/MUTATION.md's "round 27, second run" section
names each): verify of a file whose format attribute does not read, the newer-format refusal naming its file, the
fused q|k path at N = 2·H·d_k tokens and its one slice, what handing a batch to the writer and a compute dtype's casts
cost, a compiled grid source of a model whose sites are never cached; and the harness's round27b module kept consistent."""

from __future__ import annotations

import subprocess
import types
from pathlib import Path

import h5py
import numpy as np
import pytest
import timm
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import qkhooks
from qkhooks import QKHooksError, capture
from qkhooks.projector import QKPathProjector
from qkhooks.store import RunWriter, open_run, repair, verify_run
from qkhooks.store import format as fmt

from conftest import CountOps
from test_torch_compile import REFUSED, _hf_vit, _refused_model
from test_format_version_refusals import refusal, set_format, write
from test_mutation_kills_r25 import _harness
from test_mutation_kills_r26 import commits_in, library_files_changed, module_files
from test_speed_round9 import _dense_maps, _vit

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------ store/repair.py
def test_verify_names_a_format_attribute_that_does_not_read_and_checks_the_file_all_the_same(tmp_path):
    """A format attribute h5py cannot read (an HDF5 time type, as another tool may write): verify neither refuses the
    file as a newer format nor stops; its report says the format is unreadable, under the verify line, and every
    committed image is still checked (the same counts as the file before the attribute was changed)."""
    path = tmp_path / "run.h5"
    write(path)
    before = verify_run(path)
    with h5py.File(path, "r+") as f:
        del f.attrs[fmt.FORMAT_ATTR]
        h5py.h5a.create(f.id, fmt.FORMAT_ATTR.encode(), h5py.h5t.UNIX_D32LE, h5py.h5s.create(h5py.h5s.SCALAR))
        with pytest.raises(TypeError):
            f.attrs[fmt.FORMAT_ATTR]
    report = verify_run(path)
    assert report.format == f"unreadable (root attribute {fmt.FORMAT_ATTR} does not read)"
    assert report.summary().splitlines()[:2] == [f"verify   {path}", f"format   {report.format}"]
    assert (report.images, report.arrays, report.damaged) == (before.images, before.arrays, {})


def test_repair_and_verify_refusing_a_newer_format_name_the_file_they_refuse(tmp_path):
    """The refusal says which file: a user repairing or verifying many runs must know which one to upgrade for."""
    path = tmp_path / "shard-7.h5"
    write(path)
    set_format(path, np.int64(fmt.FORMAT + 1))
    for doing, call in (("repair", lambda: repair(path, tmp_path / "fixed.h5")), ("verify", lambda: verify_run(path))):
        with pytest.raises(QKHooksError, match=refusal(fmt.FORMAT + 1, doing)) as raised:
            call()
        assert str(raised.value).startswith(f"cannot {doing} {path}: "), doing


# ------------------------------------------------------------------------------------ projector.py
def test_a_fused_qkv_output_of_as_many_tokens_as_q_and_k_have_features_gives_the_dense_maps():
    """from_fused cuts v off by the width of the last axis alone: a call of N = 2·H·d_k tokens (96 here, e.g. a 8x12
    grid without a class token), whose (B, N, 3·H·d_k) output has the q|k width on its token axis, gives x·u_n and
    x·v_n (float64), as a call of another token count does, and the q|k block handed alone (a compute_dtype's cast)
    gives the same maps without a second slice."""
    model = _vit()
    site = qkhooks.sites(model)[1]
    spectrum = qkhooks.spectrum(model)[site.layer].top(5)
    projector = QKPathProjector(spectrum, site.weights())
    width = site.num_heads * site.head_dim
    x = torch.randn(2, 2 * width, site.dim, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        qkv = site.module.qkv(x)
    assert qkv.shape == (2, 2 * width, 3 * width)
    query, key = projector.from_fused(qkv)
    ref_q, ref_k = _dense_maps(x, spectrum)
    scale = max(np.abs(ref_q).max(), np.abs(ref_k).max())
    np.testing.assert_allclose(query.double().numpy(), ref_q, atol=2e-5 * scale, rtol=0)
    np.testing.assert_allclose(key.double().numpy(), ref_k, atol=2e-5 * scale, rtol=0)
    block = qkv[..., :2 * width]
    with CountOps() as whole_ops:
        projector.from_fused(qkv)
    with CountOps() as block_ops:
        alone = projector.from_fused(block)
    assert torch.equal(alone[0], query) and torch.equal(alone[1], key)
    # v is cut off only where it is there: the block (what a compute_dtype cast hands on) costs one slice less
    assert whole_ops.count - block_ops.count == {"slice": 1} and not block_ops.count - whole_ops.count


# ------------------------------------------------------------------------------------ tests/mutation.py: round27b
def test_the_round27b_module_names_files_and_tests_that_exist_and_round_27s_later_commits():
    """The harness's module "round27b" and its named set ROUND27B: every file to mutate and every test file exists,
    the selection names only test files it selects, the commit range resolves in this checkout to round 27's four
    later library commits, and every library file they changed is mutated."""
    mutation = _harness()
    files = module_files(mutation, "round27b")
    assert mutation.NAMED_SETS["ROUND27B"] == mutation.ROUND27B == ("commits:bb42916..dcf6012",)
    changed = library_files_changed("bb42916", "dcf6012")
    assert set(changed) == set(files)
    library = subprocess.run(["git", "rev-list", "bb42916..dcf6012", "--", "qkhooks"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.split()
    assert len(library) == 4 and set(library) <= set(commits_in("bb42916..dcf6012"))


# ------------------------------------------------------------------------------------ store/writer.py
def test_handing_a_batch_to_the_writer_costs_the_caller_only_the_casts_its_arrays_need(tmp_path):
    """What ``write_batch`` dispatches in the caller's thread (on a GPU each operation is a launch the forward waits
    behind): one cast per array not already in the run's float16 and nothing for the others, no ``detach`` of arrays
    that track no grad; an array that tracks grad is detached (and stored as its values). Round 32's float16 overflow
    check adds one min-max of each wider array and a fixed few operations on the (arrays,) peaks, whatever their
    size, and nothing for a batch already in float16."""
    g = torch.Generator().manual_seed(3)
    half, single = torch.randn(2, 3, 4, generator=g).half(), torch.randn(2, 3, 4, generator=g)
    leaf = torch.randn(2, 3, 4, generator=g, requires_grad=True)
    with RunWriter(tmp_path / "run.h5", attrs={"model": "m", "config": "{}"}) as writer:
        with CountOps() as plain:
            writer.write_batch(["a", "b"], {"maps/half": half, "maps/single": single})
        with CountOps() as tracked:
            writer.write_batch(["c", "d"], {"maps/half": half, "maps/single": leaf * 1.0})
    check = {"aminmax": 1, "stack": 1, "abs": 1, "view": 1, "amax": 1, "_to_copy": 1, "lt": 1, "bitwise_not": 1,
             "ne": 1, "bitwise_and": 1}  # the overflow check of the one float32 array: its peak, cast and compared
    assert dict(plain.count) == {**check, "_to_copy": 2}
    assert dict(tracked.count) == {**check, "mul": 1, "detach": 2, "_to_copy": 2}  # detached for the check and the cast
    with CountOps() as halves:
        writer_path = tmp_path / "halves.h5"
        with RunWriter(writer_path, attrs={"model": "m", "config": "{}"}) as other:
            other.write_batch(["a", "b"], {"maps/half": half})
    assert halves.count["aminmax"] == halves.count["_to_copy"] == 0  # nothing to check, nothing to cast
    with open_run(tmp_path / "run.h5") as run:
        np.testing.assert_array_equal(run.array("maps/half")[:], np.concatenate([half.numpy(), half.numpy()]))
        np.testing.assert_array_equal(run.array("maps/single")[:],
                                      np.concatenate([single.numpy(), leaf.detach().numpy()]).astype(np.float16))


# ------------------------------------------------------------------------------------ capture.py: the entry
def test_a_compiled_grid_source_of_a_model_whose_sites_are_never_cached_is_refused_at_every_entry(monkeypatch):
    """Sites holding a helper that leads back to them are searched afresh at every entry, never cached. The search
    itself refuses compiled attention (refuse_opaque), but not a compiled module qkhooks hooks outside it: the HF ViT's
    patch projection, whose call gives the grid. With no cached verdict, each entry looks there too: refused in the
    words a model whose sites are cached gets."""
    with pytest.raises(QKHooksError) as cached:
        qkhooks.record(_refused_model("hf grid source"), modes=4)
    real = capture.find_sites

    def with_helpers(*args, **kwargs):
        found = real(*args, **kwargs)
        for site in found:
            site.helper = types.SimpleNamespace(call=site.grid_for)  # leads back to the site: never shared
        return found

    monkeypatch.setattr(capture, "find_sites", with_helpers)
    model = _hf_vit()
    with torch.no_grad(), qkhooks.record(model, modes=4):
        pass
    assert capture._SITES.get(model) is None
    model.embeddings.patch_embeddings.projection.compile(backend="eager")
    with pytest.raises(QKHooksError) as fresh:
        qkhooks.record(model, modes=4)
    assert str(fresh.value) == str(cached.value) and REFUSED["hf grid source"] in str(fresh.value)


# ------------------------------------------------------------------------------------ capture.py: the q/k hook
class _Casts(TorchDispatchMode):
    """The (shape, from, to) of every dtype cast dispatched inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.casts: list[tuple[tuple[int, ...], torch.dtype, torch.dtype | None]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ == "_to_copy":
            self.casts.append((tuple(args[0].shape), args[0].dtype, (kwargs or {}).get("dtype")))
        return func(*args, **(kwargs or {}))


def test_a_compute_dtype_casts_q_and_k_of_a_fused_qkv_and_leaves_v_alone():
    """With compute_dtype, a fused qkv layer on the q/k path casts its Linear's q|k block (2·H·d_k features a token),
    never the v third it does not project (a third more bytes to convert for nothing); the tokens' cast is the
    layer's other one. The maps are the float64 x path's."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                              depth=2, num_heads=4).eval()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), qkhooks.record(model, modes=4, compute_dtype=torch.float64, keep_inputs=True) as run:
        model(images)  # the first batch builds what later ones reuse
        with _Casts() as seen:
            model(images)
    assert run.mode_source == {0: "qk", 1: "qk"}
    tokens, block = ((2, 17, 32), torch.float32, torch.float64), ((2, 17, 64), torch.float32, torch.float64)
    assert seen.casts == [tokens, block] * 2
    for layer in run.layers:
        ref_q, ref_k = _dense_maps(run.inputs[layer], run.spectrum[layer])
        np.testing.assert_allclose(run.query[layer].numpy(), ref_q, atol=1e-5 * np.abs(ref_q).max(), rtol=0)
        np.testing.assert_allclose(run.key[layer].numpy(), ref_k, atol=1e-5 * np.abs(ref_k).max(), rtol=0)
