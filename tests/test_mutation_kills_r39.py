"""Kill tests for the mutants that survived round 40's mutation run of round 39's library code (``4f4469b..a0291ba``,
module "round39" of tests/mutation.py, ``--only ROUND39``); tests/MUTATION.md's "round 40" section names each. And the
harness's module kept consistent."""

from __future__ import annotations

from test_mutation_kills_r26 import _harness, commits_in, library_files_changed, module_files

ROUND39_NAMED = {"qkhooks/spectrum.py", "qkhooks/capture.py", "qkhooks/data_files.py", "qkhooks/stream.py",
                 "qkhooks/store/writer.py", "qkhooks/store/format.py", "qkhooks/store/reader.py",
                 "qkhooks/store/repair.py", "qkhooks/store/_hdf5.py", "qkhooks/distributed.py",
                 "qkhooks/cli/__init__.py", "qkhooks/compare.py", "qkhooks/analysis/bfd.py",
                 "qkhooks/analysis/bfd_summary.py", "qkhooks/data/readers.py"}


# ------------------------------------------------------------------------------------- tests/mutation.py: round39
def test_the_round39_module_names_round_39s_commits_and_files_they_changed():
    """Module "round39" and its named set ROUND39: files and tests exist, every file mutated is one round 39's library
    commits changed, and the range resolves in this checkout to its 50 commits (33 of them library commits)."""
    mutation = _harness()
    files = module_files(mutation, "round39")
    assert set(files) == ROUND39_NAMED and ROUND39_NAMED <= set(library_files_changed("4f4469b", "a0291ba"))
    assert mutation.NAMED_SETS["ROUND39"] == mutation.ROUND39 == ("commits:4f4469b..a0291ba",)
    assert len(commits_in("4f4469b..a0291ba")) == 50


# ------------------------------------------------------------------ helpers
import json  # noqa: E402
from pathlib import Path  # noqa: E402

import h5py  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from qkhooks.errors import QKHooksError  # noqa: E402
from qkhooks.store import verify_run  # noqa: E402
from qkhooks.store import format as fmt  # noqa: E402


# ------------------------------------------------------------------ store/repair.py: VerifyReport.summary
def test_verify_of_a_run_whose_attribute_was_edited_says_the_whole_fix(tmp_path):
    """``VerifyReport.summary`` ``_16`` (the fix's "record the run again ..." upper-cased): round 39's tests match
    "no repair restores" only. A checksum run with its config edited by h5py: the summary's lines in full."""
    from test_attribute_digests import write

    path = tmp_path / "run.h5"
    write(path)
    with h5py.File(path, "r+") as f:
        f.attrs["config"] = json.dumps({"modes": 6, "dtype": "float16"})
    report = verify_run(path)
    off = "root attribute config changed since it was written (its digest in root attribute attr_digests)"
    assert report.attrs_off == [off] and report.problems == [off]
    lines = report.summary().splitlines()
    assert "attrs    sha256 digests: every attribute checked against its own" in lines
    assert lines[-2:] == [
        f"damaged  {off}",
        "result   DAMAGED: attributes that say how the numbers are read changed, and no repair restores one (its copy "
        "keeps failing them): record the run again (--overwrite, or a new --out); if you changed, added or deleted "
        "one yourself, set it back to how it was recorded"]


# ------------------------------------------------------------------ distributed.py: _refuse_no_room
@pytest.mark.parametrize("copy", [False, True])
def test_merge_refuses_past_ulimit_f_from_the_bytes_it_needs_and_merges_at_the_limit(tmp_path, monkeypatch, copy):
    """``_refuse_no_room`` ``_53`` (the ``ulimit -f`` refusal's message None), ``_10`` (the shards' bytes subtracted
    from the bound, not added) and ``_13`` (a view's bound taken as a copy's): round 39's test of it starts another
    Python (a real ``ulimit -f``), which mutmut's mutants do not reach. In process, the limit is read through
    ``resource.getrlimit``: one byte below the bound computed here from the shard files (4 MiB spare + the largest
    reducer checkpoint + the shards' sizes for a copy, 64 bytes an image for a view) is refused in full words with
    nothing written; at the bound, the merge goes on and holds every image."""
    import resource

    from test_attribute_digests import _shards

    from qkhooks.distributed import merge_shards, shard_path
    from qkhooks.store import open_run

    out = _shards(tmp_path)
    shards = [shard_path(out, rank, 2) for rank in (0, 1)]
    states = max((fmt.checkpoint_path(p).stat().st_size for p in shards if fmt.checkpoint_path(p).exists()), default=0)
    images = 8  # two shards of two batches of two, none skipped
    needed = (4 << 20) + states + (sum(p.stat().st_size for p in shards) if copy else 64 * images)
    real = resource.getrlimit

    def limited(to: int):
        return lambda which: (to, to) if which == resource.RLIMIT_FSIZE else real(which)

    monkeypatch.setattr(resource, "getrlimit", limited(needed - 1))
    with pytest.raises(QKHooksError) as refused:
        merge_shards(out, copy=copy)
    assert str(refused.value) == (
        f"merging into {out} needs up to {needed / 2**20:.1f} MiB, more than the largest file this process may write "
        f"({(needed - 1) / 2**20:.1f} MiB, `ulimit -f`); raise the limit on file size, then merge again. Nothing was "
        "written.")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("run.h5")) == []
    monkeypatch.setattr(resource, "getrlimit", limited(needed))
    merge_shards(out, copy=copy)
    with open_run(out) as merged:
        assert merged.complete and merged.n == images


# ------------------------------------------------------------------ store/repair.py: _refuse_unwritable
def test_repair_refuses_past_ulimit_f_in_full_words_and_repairs_at_the_limit(tmp_path, monkeypatch):
    """``_refuse_unwritable`` ``_43`` ("Nothing was written." lower-cased): round 39's test of it starts another
    Python. In process, ``resource.getrlimit`` one byte below the damaged file's size + 4 MiB is refused with the
    whole sentence and no file; at that bound the repair copies every image."""
    import resource

    from test_attribute_digests import write

    from qkhooks.store import repair

    run, fixed = tmp_path / "run.h5", tmp_path / "fixed.h5"
    write(run)
    needed = run.stat().st_size + (4 << 20)
    real = resource.getrlimit
    monkeypatch.setattr(resource, "getrlimit",
                        lambda which: (needed - 1, needed - 1) if which == resource.RLIMIT_FSIZE else real(which))
    with pytest.raises(QKHooksError) as refused:
        repair(run, fixed)
    assert str(refused.value) == (
        f"repair needs up to {needed / 2**20:.1f} MiB (the damaged file's size), more than the largest file this "
        f"process may write ({(needed - 1) / 2**20:.1f} MiB, `ulimit -f`); raise the limit on file size, then repair "
        "again. Nothing was written.")
    assert not list(tmp_path.glob("fixed*"))
    monkeypatch.setattr(resource, "getrlimit",
                        lambda which: (needed, needed) if which == resource.RLIMIT_FSIZE else real(which))
    assert repair(run, fixed).recovered == [f"img-{b}-{i}" for b in range(2) for i in range(2)]


# ------------------------------------------------------------------ compare.py: _refuse_repeated
@pytest.mark.parametrize("twice", ["report", "spec"])
def test_compare_of_one_report_or_spec_twice_is_refused_in_the_whole_sentence(tmp_path, twice):
    """``_refuse_repeated`` ``_40`` (the fix's ```qkhooks demo --model SPEC`` lower-cased): round 39's tests match
    parts of the refusal. The third argument repeats the first (a report through its summary.json, or a model spec):
    the sentence in full, arguments 1 and 3, and nothing made."""
    from test_cli_compare_and_folder_refusals import _report

    from qkhooks.compare import compare

    a, b = _report(tmp_path / "a", "A"), _report(tmp_path / "b", "B", (0.3, 0.4))
    first, again = ((str(a), str(a / "summary.json")) if twice == "report" else
                    ("timm:test_vit@random", "timm:test_vit@random"))
    out = tmp_path / "cmp"
    with pytest.raises(QKHooksError) as refused:
        compare([first, str(b), again], out)
    what = f"one report ({a / 'summary.json'})" if twice == "report" else "one model spec"
    assert str(refused.value) == (
        f"arguments 1 and 3 ({first!r} and {again!r}) name {what}: compare overlays different models, and this one's "
        "curves would be drawn twice. Pass each report folder or model spec once, and another report (`qkhooks demo "
        "--model SPEC --out DIR`) or model spec to compare it with.")
    assert not out.exists()


def test_compare_names_one_report_folder_spelt_twice_before_finding_it_has_no_summary(tmp_path, monkeypatch):
    """``_refuse_repeated`` ``_7`` (every argument keyed as a model spec unless its summary.json exists): round 39's
    tests name existing reports, keyed by the file's inode. A folder without summary.json (a demo not run yet)
    given twice, as ``rep`` and ``./rep/../rep``, is one report by its real path: the repetition is named, the
    arguments checked before any is read."""
    from qkhooks.compare import compare

    (tmp_path / "rep").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(QKHooksError) as refused:
        compare(["rep", "./rep/../rep"], tmp_path / "cmp")
    assert str(refused.value).startswith(
        "arguments 1 and 2 ('rep' and './rep/../rep') name one report (rep/../rep/summary.json): compare overlays")
    assert not (tmp_path / "cmp").exists()


# ------------------------------------------------------------------ stream.py: check_options
@pytest.mark.parametrize("every", [0, 1.5])
def test_a_checkpoint_interval_that_is_no_whole_number_is_refused_in_full_before_the_model_loads(tmp_path, every):
    """``check_options`` ``_13`` (the checkpoint-interval refusal's message None): no selected test gives a bad
    ``checkpoint_every``. record_dataset refuses it first, whole, before it looks at the model (a spec that names no
    model is never read) and with no folder made."""
    from qkhooks.stream import record_dataset

    out = tmp_path / "new" / "run.h5"
    with pytest.raises(QKHooksError) as refused:
        record_dataset("timm:no_such_model_r39", "bundled:photos", out, checkpoint_every=every, progress=False)
    assert str(refused.value) == (f"checkpoint_every must be a whole number >= 1 (batches between checkpoints), got "
                                  f"{every!r}.")
    assert not (tmp_path / "new").exists()


# ------------------------------------------------------------------ store/repair.py: _seal_copy; format.py: seal_attrs
def test_repair_of_a_run_whose_digests_do_not_parse_carries_them_and_says_so_in_full(tmp_path):
    """``_seal_copy`` ``_9`` (the problem's sentence wrapped in XX): round 39's tests repair runs whose digests parse.
    Digests that do not parse are copied as they are, so the copy is refused as the damaged file is, and the report
    says it in the whole sentence."""
    from test_attribute_digests import write

    from qkhooks.store import open_run, repair

    run, fixed = tmp_path / "run.h5", tmp_path / "fixed.h5"
    write(run)
    with h5py.File(run, "r+") as f:
        f.attrs[fmt.ATTR_DIGESTS] = "{not json"
    report = repair(run, fixed)
    assert report.recovered == [f"img-{b}-{i}" for b in range(2) for i in range(2)]
    assert "root attribute attr_digests does not parse: copied as it is, so the copy's attributes are refused as the " \
           "damaged file's are; record the run again" in report.problems
    with h5py.File(fixed, "r") as f:
        assert fmt.as_str(f.attrs[fmt.ATTR_DIGESTS]) == "{not json"
    with pytest.raises(QKHooksError, match="root attribute attr_digests does not parse"):
        open_run(fixed)


def test_repair_of_a_run_with_an_attribute_added_since_its_digests_leaves_it_uncovered_in_the_copy(tmp_path):
    """``seal_attrs`` ``_6`` (an uncovered attribute's entry dropped by ``pop(None)``: a KeyError): round 39's tests
    repair runs whose failing attributes changed, whose digests the copy carries. One added with h5py after the
    digests has none to carry: the copy holds every image and its own digests of the rest (each as hashlib computes
    it), the added attribute stays uncovered, so readers refuse the copy naming it (round 40: a user's own attribute is
    accepted, but ``shard`` on /images is a name qkhooks reads)."""
    import hashlib

    from test_attribute_digests import write

    from qkhooks.store import open_run, repair

    run, fixed = tmp_path / "run.h5", tmp_path / "fixed.h5"
    write(run)
    with h5py.File(run, "r+") as f:
        f["images"].attrs["shard"] = "{}"
    report = repair(run, fixed)
    assert report.recovered == [f"img-{b}-{i}" for b in range(2) for i in range(2)]
    assert any(p.startswith("attribute shard of /images not covered by the digests (added after they were written), "
                            "and qkhooks reads an attribute of that name in the damaged file") for p in report.problems)
    with h5py.File(fixed, "r") as f:
        digests = json.loads(fmt.as_str(f.attrs[fmt.ATTR_DIGESTS]))
        assert "/images@shard" not in digests
        assert digests["/@config"] == hashlib.sha256(b"s:" + fmt.as_str(f.attrs["config"]).encode()).hexdigest()
    with pytest.raises(QKHooksError, match="attribute shard of /images not covered by the digests"):
        open_run(fixed)


# ------------------------------------------------------------------ store/format.py: attr_value_digest
def _reference_digest(strings: list[str]) -> str:
    """sha256 of an attribute holding an array of variable-length strings, as format.ATTR_DIGESTS documents it: the
    numpy dtype and shape, then each string's UTF-8 bytes after their length (8 bytes, little-endian)."""
    import hashlib

    h = hashlib.sha256(f"a:|O:({len(strings)},):".encode())
    for s in strings:
        raw = s.encode("utf-8")
        h.update(len(raw).to_bytes(8, "little") + raw)
    return h.hexdigest()


def test_an_attribute_holding_an_array_of_strings_is_sealed_by_its_strings_and_a_changed_one_is_named(tmp_path):
    """``attr_value_digest`` ``_42`` (the lengths' byte order "LITTLE": a ValueError): round 39's run files hold
    text and numeric attributes only. An array of variable-length strings (h5py reads it back as an object array) is
    digested as documented, computed here with hashlib; sealed in a file, it verifies, and one string changed is
    named."""
    strings = ["layer.0", "bloc\u00e9", ""]
    assert fmt.attr_value_digest(np.array(strings, dtype=object)) == _reference_digest(strings)
    path = tmp_path / "plain.h5"
    with h5py.File(path, "w") as f:
        f.create_group("model").attrs.create("names", strings, dtype=h5py.string_dtype())
        fmt.seal_attrs(f)
    with h5py.File(path, "r") as f:
        assert json.loads(fmt.as_str(f.attrs[fmt.ATTR_DIGESTS])) == {"/model@names": _reference_digest(strings)}
        assert fmt.failing_attrs(f) == {}
    with h5py.File(path, "r+") as f:
        f["model"].attrs.create("names", ["layer.1", "bloc\u00e9", ""], dtype=h5py.string_dtype())
    with h5py.File(path, "r") as f:
        assert fmt.failing_attrs(f) == {"/model@names": "changed since it was written"}


# ------------------------------------------------------------------ store/writer.py: RunWriter.write_static
def test_a_static_edited_by_its_caller_after_write_static_is_stored_as_it_was_given(tmp_path, monkeypatch):
    """``RunWriter.write_static`` ``_8`` (a tensor queued without a copy, ``copy=False``): round 39's recordings hand
    it numpy copies only. The writer thread is held until the caller has edited both arrays in place (a spectrum
    shared with qkhooks' cache, normalised for a plot): the file holds the values as given, for a tensor and a numpy
    array alike."""
    import threading

    import torch

    from qkhooks.store import RunWriter

    gate = threading.Event()
    real = RunWriter._do_static

    def held(self, name, value):
        assert gate.wait(30), "the test never let the writer go on"
        return real(self, name, value)

    monkeypatch.setattr(RunWriter, "_do_static", held)
    path = tmp_path / "run.h5"
    tensor, array = torch.arange(4.0), np.arange(4.0)
    with RunWriter(path, attrs={"model": "m", "config": json.dumps({"modes": 4}), "data": "d"}) as writer:
        writer.write_static("spectrum/L0/S_all", tensor)
        writer.write_static("spectrum/L1/S_all", array)
        tensor.div_(tensor.max())
        array /= array.max()
        gate.set()
        writer.write_batch(["a", "b"], {"maps/x": np.zeros((2, 3), np.float16)})
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["spectrum/L0/S_all"][()], np.arange(4.0, dtype=np.float32))
        np.testing.assert_array_equal(f["spectrum/L1/S_all"][()], np.arange(4.0))


# ------------------------------------------------------------------ store/_hdf5.py: _RepairView.readinto
def test_the_repair_view_of_a_truncated_run_reads_its_bytes_then_zeros_up_to_the_recorded_end(tmp_path):
    """``_RepairView.readinto`` ``_18`` (``got = 1`` before the read: past the file's real end the first byte of the
    caller's buffer is left as it was, and a read at the end fails on ``bytes(-1)``): round 39's tests read damaged
    superblocks, not a cut tail. A run cut 100 bytes short: the view reads the file's own bytes past the superblock,
    zeros (into a buffer full of 0xFF) from the real end to the end the superblock records, and 0 bytes there."""
    from test_attribute_digests import write

    from qkhooks.store._hdf5 import _RepairView

    path = tmp_path / "run.h5"
    write(path)
    whole = path.read_bytes()
    path.write_bytes(whole[:-100])
    view = _RepairView(path)
    try:
        assert view.seek(0, 2) == len(whole)  # the end the superblock records
        view.seek(4096)
        buffer = bytearray(b"\xff" * (len(whole) - 100 - 4096))
        assert view.readinto(buffer) == len(buffer) and bytes(buffer) == whole[4096:-100]
        view.seek(len(whole) - 100)
        buffer = bytearray(b"\xff" * 160)
        assert view.readinto(buffer) == 100
        assert bytes(buffer) == bytes(100) + b"\xff" * 60  # zeros up to the end, the rest of the buffer untouched
        assert view.readinto(bytearray(8)) == 0  # at the end: nothing read, no error
    finally:
        view.close()


# ------------------------------------------------------------------ capture.py: Recording.__init__
def test_a_float32_recording_projects_from_the_q_k_outputs_and_its_queries_are_the_dense_svds():
    """``Recording.__init__`` ``_147`` (``_layer_modes`` handed None for ``from_qk``: every layer projected from x):
    round 39's tests look at the maps' values, which the x path gives too, and at a batch under autocast, which takes x
    either way. A float32 timm ViT recorded with the default ``qk_path=True`` takes its maps from the q/k Linear
    outputs (``mode_source`` "qk", as decided at entry and after a batch), and its queries are the tokens projected
    on the dense SVD's modes (numpy); with ``qk_path=False`` the same queries come from x."""
    import torch

    import qkhooks
    from test_capture_shared_qkv_threads_copies import _tokens
    from test_spectrum_edits_and_dataparallel import _dense_modes, _images, _rel, _timm

    model, x = _timm(), _images()
    U, _, _ = _dense_modes(model.blocks[0].attn, 4)
    queries = np.einsum("bnd,hdk->bhkn", _tokens(model, x)[0], U)
    for qk_path, source in ((True, "qk"), (False, "x")):
        with torch.no_grad(), qkhooks.record(model, modes=4, qk_path=qk_path) as run:
            assert run.mode_source == {site.layer: source for site in run.sites}
            model(x)
            assert run.mode_source == {site.layer: source for site in run.sites}
            assert _rel(run.query(0), queries) < 1e-5
