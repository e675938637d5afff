"""Round 44: a run file cut short (a copy stopped, a file-size limit, a killed writer's file) loses, in ``repair``,
the images whose bytes are not in the file and as few others as the layout allows. Measured on default runs of
40-300 images cut at 70+ points, most of the loss beyond the data cut off was the whole-chunk rule, which dropped
every row of the chunk a cut went through
(the last chunk written: a batch of images, 20 of a 40-image run cut 0.1 % short). A chunk of raw bytes (no filter)
keeps each row at a known place, so the rows wholly before the cut are recovered, bit for bit; a row the cut tears,
and any chunk a filter (checksum, compression, shuffle) covers, is still lost whole. The rest was the ids: the writer
left each batch's ids (and digests) to the file's flush, which placed their chunk after the arrays' chunks, so a cut
between lost images whose rows were whole; it now sends them to the file before the arrays. (What was left, HDF5
placing each array's chunk index after its first chunk, where a cut in that chunk's unused room took the index and the
images with it, went in round 46: the writer's session opens 16 KiB metadata blocks, which hold every index before the
first chunk; tests/test_run_file_metadata_blocks.py.)"""

from __future__ import annotations

import importlib
import shutil
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import qkhooks
from qkhooks.store import open_run
from qkhooks.store import format as fmt
from qkhooks.store._hdf5 import open_damaged
from qkhooks.stream import record_dataset

repair_module = importlib.import_module("qkhooks.store.repair")  # the module (qkhooks.store.repair is its function)


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> Path:
    """A finished run of 24 images of the tiny ViT (rows, modes, masks; chunks of several images)."""
    return _record(tmp_path_factory.mktemp("cut") / "whole.h5")


def _row_ends(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Per image of the uncut file: the byte where its last row of any per-image array ends (a filtered chunk's end:
    it reads whole or not at all), and where the last chunk holding one of its rows ends (what the whole-chunk rule
    needed in the file)."""
    with h5py.File(path, "r") as f:
        n = fmt.committed(f)
        rows, chunks = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
        for ds in fmt.per_image_datasets(f).values():
            assert ds.chunks[1:] == ds.shape[1:]
            raw = ds.id.get_create_plist().get_nfilters() == 0
            row = int(np.prod(ds.shape[1:])) * ds.dtype.itemsize if raw else 1 << 62
            places: dict[int, tuple[int, int]] = {}
            ds.id.chunk_iter(lambda info: places.__setitem__(info.chunk_offset[0], (info.byte_offset, info.size)))
            for i in range(n):
                first = i - i % ds.chunks[0]
                offset, size = places[first]
                rows[i] = max(rows[i], min(offset + (i - first + 1) * row, offset + size))
                chunks[i] = max(chunks[i], offset + size)
    return rows, chunks


def _record(path: Path, checksum: bool = False) -> Path:
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, patch_size=32, embed_dim=32, depth=2,
                              num_heads=4).eval()
    record_dataset(qkhooks.load_model(model), "o3:24:1", path, modes=8, attention="rows", batch_size=2,
                   checkpoint_every=3, progress=False, checksum=checksum)
    return path


def _cut_copy(whole: Path, at: int, tmp_path: Path) -> Path:
    cut = tmp_path / "cut.h5"
    shutil.copy(whole, cut)
    with open(cut, "r+b") as f:
        f.truncate(at)
    return cut


@pytest.mark.parametrize("short", [0, 1])
def test_a_cut_through_the_last_chunk_recovers_its_rows_before_the_cut_equal_to_the_uncut_file(whole, tmp_path, short):
    """Cut where the last image but two ends (``short`` = 1: one byte before, tearing it): every image whose rows all
    lie before the cut is recovered, id and arrays equal to the uncut file's; the torn one is lost and listed."""
    rows, chunks = _row_ends(whole)
    n = len(rows)
    torn = int(np.argsort(rows)[-3])
    at = int(rows[torn]) - short
    expected = np.flatnonzero(rows <= at)
    assert (torn in expected) == (short == 0)
    assert len(expected) > int((chunks <= at).sum())  # the whole-chunk rule recovered fewer: the case tested
    cut = _cut_copy(whole, at, tmp_path)
    fixed = tmp_path / "fixed.h5"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the reducer checkpoint counts images past the cut
        report = qkhooks.store.repair(cut, fixed)
    assert report.committed == n
    assert report.lost == sorted(set(range(n)) - set(expected.tolist()))
    with h5py.File(whole, "r") as uncut, open_run(fixed) as run:
        ids = [fmt.as_str(s) for s in uncut[fmt.IDS][:n]]
        assert run.ids == [ids[i] for i in expected]
        names = sorted(fmt.per_image_datasets(uncut))
        assert sorted(run.arrays()) == names
        for name in names:
            np.testing.assert_array_equal(run.array(name)[:], uncut[name][expected], err_msg=name)
    assert any("lying past its end" in line for line in report.problems)


def test_an_uncut_run_repairs_whole(whole, tmp_path):
    """No cut, no loss: every image, in order, equal to the run's own."""
    fixed = tmp_path / "fixed.h5"
    report = qkhooks.store.repair(whole, fixed)
    assert report.lost == [] and report.problems == []
    with h5py.File(whole, "r") as uncut, open_run(fixed) as run:
        assert run.ids == [fmt.as_str(s) for s in uncut[fmt.IDS][:]]
        for name in run.arrays():
            np.testing.assert_array_equal(run.array(name)[:], uncut[name][:], err_msg=name)


@pytest.mark.parametrize("filters", [{}, {"shuffle": True}, {"fletcher32": True}, {"compression": "gzip"}])
def test_only_raw_chunks_give_up_their_rows_before_a_cut(tmp_path, filters):
    """Three chunks of four rows written in order, the file cut two and a half rows into the second: a raw chunk
    gives its first two rows, read back equal; a filtered one (its bytes are not rows: shuffled, compressed or under
    one checksum) none, so a shuffled chunk's zeroed tail is never read as rows."""
    path = tmp_path / "a.h5"
    values = np.arange(10 * 3, dtype="f4").reshape(10, 3) + 0.5
    with h5py.File(path, "w", libver="latest") as f:
        ds = f.create_dataset("a", shape=(10, 3), maxshape=(None, 3), chunks=(4, 3), dtype="f4", **filters)
        for lo in (0, 4, 8):
            ds[lo:lo + 4] = values[lo:lo + 4]
            f.flush()
        places = repair_module._chunk_locations(ds)
    assert places[0][0] < places[4][0] < places[8][0]
    at = places[4][0] + (30 if not filters else places[4][1] // 2)
    cut = _cut_copy(path, at, tmp_path)
    with open_damaged(cut) as f:
        ds = f["a"]
        failing, why = repair_module._failing_rows(ds, 10, at)
        assert "lying past its end" in why
        if filters:
            assert failing == [(4, 8), (8, 10)]
        else:
            assert failing == [(6, 8), (8, 10)]
            np.testing.assert_array_equal(ds[4:6], values[4:6])


def _three_raw_chunks(path: Path) -> tuple[np.ndarray, dict[int, tuple[int, int]]]:
    """Ten rows in chunks of four (the last two rows of the last chunk never written), written chunk by chunk."""
    values = np.arange(10 * 3, dtype="f4").reshape(10, 3) + 0.5
    with h5py.File(path, "w", libver="latest") as f:
        ds = f.create_dataset("a", shape=(10, 3), maxshape=(None, 3), chunks=(4, 3), dtype="f4")
        for lo in (0, 4, 8):
            ds[lo:lo + 4] = values[lo:lo + 4]
            f.flush()
        places = repair_module._chunk_locations(ds)
    assert places[0][0] < places[4][0] < places[8][0] and places[8][0] + places[8][1] == path.stat().st_size
    return values, places


def _rows_handed_to_each(cut: Path, at: int) -> tuple[list, str, dict[int, np.ndarray]]:
    """``_failing_rows`` over the ten-row array of a file cut at byte ``at``, with every row it hands to ``each``."""
    seen: dict[int, np.ndarray] = {}
    with open_damaged(cut) as f:
        failing, why = repair_module._failing_rows(f["a"], 10, at, each=lambda lo, block: seen.update(
            {lo + k: row for k, row in enumerate(block)}))
    return failing, why, seen


@pytest.mark.parametrize("rows_in", [2, 3])
def test_a_cut_through_the_last_chunks_unused_room_loses_nothing(tmp_path, rows_in):
    """The last chunk holds images 8-9 and room for two more; a cut after them (exactly, or a row further) loses
    no row and names nothing, and every row is handed to ``each`` once, as read."""
    values, places = _three_raw_chunks(tmp_path / "a.h5")
    at = places[8][0] + rows_in * 12
    failing, why, seen = _rows_handed_to_each(_cut_copy(tmp_path / "a.h5", at, tmp_path), at)
    assert (failing, why) == ([], "")
    assert sorted(seen) == list(range(10))
    np.testing.assert_array_equal(np.stack([seen[i] for i in range(10)]), values)


def test_the_rows_before_a_cut_are_handed_to_each_as_read(tmp_path):
    values, places = _three_raw_chunks(tmp_path / "a.h5")
    at = places[4][0] + 30  # two and a half rows into the second chunk
    failing, _, seen = _rows_handed_to_each(_cut_copy(tmp_path / "a.h5", at, tmp_path), at)
    assert failing == [(6, 8), (8, 10)]
    assert sorted(seen) == [0, 1, 2, 3, 4, 5]
    np.testing.assert_array_equal(np.stack([seen[i] for i in range(6)]), values[:6])


def test_a_chunk_narrower_than_a_row_is_lost_whole(tmp_path):
    """Chunks of half a row (another tool's layout: qkhooks chunks whole rows) do not keep a row in one place, so a
    cut through one loses its rows whole, never reads a row's missing half as zeros."""
    path = tmp_path / "a.h5"
    values = np.arange(10 * 4, dtype="f4").reshape(10, 4) + 0.5
    with h5py.File(path, "w", libver="latest") as f:
        ds = f.create_dataset("a", shape=(10, 4), maxshape=(None, 4), chunks=(4, 2), dtype="f4")
        for lo in (0, 4, 8):
            ds[lo:lo + 4] = values[lo:lo + 4]
            f.flush()
        places = {(info.chunk_offset[0], info.chunk_offset[1]): info.byte_offset for info in _chunks(ds)}
    at = max(places[4, 0], places[4, 2]) + 20  # two and a half half-rows into the block's later chunk
    cut = _cut_copy(path, at, tmp_path)
    with open_damaged(cut) as f:
        failing, _ = repair_module._failing_rows(f["a"], 10, at)
    assert failing == [(4, 8), (8, 10)]


def _chunks(ds: h5py.Dataset) -> list:
    found: list = []
    ds.id.chunk_iter(found.append)
    return found


def _arrays_read(cut: Path, n: int) -> np.ndarray:
    """Per image: whether its rows of every per-image array read back from the cut file (repair's own verdict)."""
    with open_damaged(cut) as f:
        ok = np.ones(n, dtype=bool)
        for ds in fmt.per_image_datasets(f).values():
            ok &= repair_module._readable_rows(ds, n, cut.stat().st_size, [])
    return ok


@pytest.mark.parametrize("checksum", [False, True])
def test_wherever_a_run_is_cut_no_image_whose_rows_read_is_lost_for_its_id(tmp_path, checksum):
    """Cut at each place an image's rows end (and a byte before): repair recovers every image whose rows of every
    array read from the file, so none is lost for its id alone. The writer wrote each batch's ids after its arrays
    and left them to the file's flush, which placed the ids' chunk after the arrays' first chunks: a cut between
    lost images for their ids alone (here 20 of 24 at cuts of 65-73 %, where the last array's chunk index, placed
    after its first chunk, now loses them: not an id's doing)."""
    whole = _record(tmp_path / "whole.h5", checksum)
    rows, _ = _row_ends(whole)
    n = len(rows)
    with h5py.File(whole, "r") as uncut:
        ids = [fmt.as_str(s) for s in uncut[fmt.IDS][:]]
    recovered_somewhere = 0
    for at in sorted({int(e) - d for e in rows for d in (0, 1)}):
        cut = _cut_copy(whole, at, tmp_path)
        fixed = tmp_path / "fixed.h5"
        readable = _arrays_read(cut, n)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                report = qkhooks.store.repair(cut, fixed)
        except qkhooks.QKHooksError as err:  # a cut before the ids' dataset is laid out: nothing recoverable
            assert "no image can be recovered" in str(err) and not readable.any()
            continue
        finally:
            cut.unlink()
        assert report.recovered == [ids[i] for i in np.flatnonzero(readable)], \
            f"cut at {at} of {whole.stat().st_size} bytes: {report.problems}"
        recovered_somewhere += len(report.recovered)
        fixed.unlink()
        fmt.checkpoint_path(fixed).unlink(missing_ok=True)
    assert recovered_somewhere


_REPAIR_CHILD = """
import sys, warnings
from qkhooks.store import repair
warnings.simplefilter("ignore")
print(len(repair(sys.argv[1], sys.argv[2]).recovered))
"""


def test_a_cut_inside_a_heap_collection_of_ids_is_repaired_in_bounded_time(tmp_path):
    """A cut inside the heap collection holding the latest ids (variable-length strings): HDF5 spun without end
    reading a collection cut short, so ``repair`` never returned (round 44's measurement: 10 minutes at full CPU).
    Those ids are now read off the raw chunks as not in the file and lost, listed; every other image is recovered,
    equal to the uncut file."""
    import subprocess
    import sys

    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, patch_size=32, embed_dim=32, depth=2,
                              num_heads=4).eval()
    whole = tmp_path / "whole.h5"
    record_dataset(qkhooks.load_model(model), "o3:200:1", whole, progress=False)
    data = whole.read_bytes()
    collections = [at for at in range(len(data)) if data.startswith(b"GCOL", at)]
    assert len(collections) >= 3  # the attributes', then the ids' (a new one after ~160 ids)
    cut = _cut_copy(whole, collections[-1] + 64, tmp_path)
    fixed = tmp_path / "fixed.h5"
    env = {**__import__("os").environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    try:
        done = subprocess.run([sys.executable, "-c", _REPAIR_CHILD, str(cut), str(fixed)], env=env, timeout=60,
                              capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        pytest.fail("repair of a run cut inside a heap collection did not return in 60 s")
    assert done.returncode == 0, done.stderr
    recovered = int(done.stdout.split()[-1])
    with h5py.File(whole, "r") as uncut, open_run(fixed) as run:
        ids = [fmt.as_str(s) for s in uncut[fmt.IDS][:]]
        assert 0 < recovered == len(run.ids) < len(ids)
        rows = [ids.index(i) for i in run.ids]
        for name in run.arrays():
            np.testing.assert_array_equal(run.array(name)[:], uncut[name][rows], err_msg=name)


def test_repair_keeps_the_runs_skipped_list_where_its_strings_are_in_the_file(tmp_path):
    """The skipped list is copied when every string of it is in the file (``_strings_outside`` checks its heap
    collections as the ids' are checked before they are read): here a whole file, whose list is kept as it is."""
    from qkhooks.store import RunWriter

    path = tmp_path / "run.h5"
    with RunWriter(path, attrs={"model": "x", "config": "{}"}) as writer:
        writer.write_batch(["a", "b"], {"maps/a": np.zeros((2, 3), dtype=np.float32)})
        writer.write_skipped([("bad.png", "truncated"), ("worse.png", "not an image")])
    report = qkhooks.store.repair(path, tmp_path / "fixed.h5")
    assert report.recovered == ["a", "b"]
    with h5py.File(tmp_path / "fixed.h5", "r") as f:
        assert fmt.read_skipped(f) == [("bad.png", "truncated"), ("worse.png", "not an image")]


def test_repair_asks_no_skipped_row_whose_string_lies_outside_the_file_and_keeps_the_others(tmp_path, monkeypatch):
    """Rows whose heap collection a cut left outside the file are never asked of HDF5 (it would spin): the copy keeps
    every other row, those after it too (round 45; before, none from the first such row), and names the lost ones.
    The layout is forced (a cut there was not reproduced)."""
    from qkhooks.store import RunWriter

    repair_module = importlib.import_module("qkhooks.store.repair")
    path = tmp_path / "run.h5"
    with RunWriter(path, attrs={"model": "x", "config": "{}"}) as writer:
        writer.write_batch(["a"], {"maps/a": np.zeros((1, 3), dtype=np.float32)})
        writer.write_skipped([("bad.png", "truncated"), ("worse.png", "not an image"), ("odd.png", "truncated")])
    real = repair_module.unreadable_strings
    asked = []

    def outside(ds, n, run, real_size, where=None):
        if ds.name == f"/{fmt.SKIPPED}":
            asked.append(n)
            return {1}
        return real(ds, n, run, real_size, where)

    read_rows = []
    real_getitem = h5py.Dataset.__getitem__

    def getitem(ds, key):
        if ds.name == f"/{fmt.SKIPPED}":
            read_rows.append(key)
        return real_getitem(ds, key)

    monkeypatch.setattr(repair_module, "unreadable_strings", outside)
    monkeypatch.setattr(h5py.Dataset, "__getitem__", getitem)
    report = qkhooks.store.repair(path, tmp_path / "fixed.h5")
    monkeypatch.undo()
    assert asked == [3] and report.recovered == ["a"] and read_rows == [0, 2]  # row 1 never asked
    assert report.problems == ["/images/skipped: row 1 does not read (the copy lists the 2 of its 3 rows that read)"]
    with h5py.File(tmp_path / "fixed.h5", "r") as f:
        assert fmt.read_skipped(f) == [("bad.png", "truncated"), ("odd.png", "truncated")]
    with h5py.File(path, "r") as f:  # read_skipped_rows' unasked rows: counted lost, never read; past the list ignored
        assert fmt.read_skipped_rows(f, unasked=[1, 2]) == ([("bad.png", "truncated")], [1, 2], 3)
        assert fmt.read_skipped_rows(f, unasked=[0, 1, 2]) == ([], [0, 1, 2], 3)
        assert fmt.read_skipped_rows(f, unasked=[3, -1]) == (fmt.read_skipped(f), [], 3) and len(fmt.read_skipped(f)) == 3


@pytest.mark.parametrize("checksum", [False, True])
def test_a_static_whose_data_a_cut_left_past_the_files_end_is_lost_and_named_not_copied_as_zeros(tmp_path, checksum):
    """HDF5 reads bytes past the end of a cut file as zeros (its sec2 driver fills a short read), and a Fletcher-32
    chunk of zeros passes its checksum: repair of a merged copy cut before its statics' data (round 49's damage
    sweep: 3 of 8 cut merged copies) wrote every spectrum array as zeros into the copy without a word, and
    ``run.spectrum(l)`` gave U, S, V of zeros. Now a static whose data do not lie wholly in the file is lost and
    named (``lost_statics``), so the copy's reader refuses the spectrum."""
    import timm

    from qkhooks.distributed import merge_shards, shard_path
    from qkhooks.errors import QKHooksError

    torch.manual_seed(0)
    loaded = qkhooks.load_model(timm.create_model("vit_small_patch16_224", pretrained=False, patch_size=32,
                                                  embed_dim=32, depth=1, num_heads=2).eval())
    out = tmp_path / "run.h5"
    for rank in range(2):
        record_dataset(loaded, "o3:4:1", shard_path(out, rank, 2), shard=(rank, 2), modes=2, batch_size=2,
                       progress=False, checksum=checksum)
    merge_shards(out, copy=True)
    with h5py.File(out, "r") as f:
        ds = f["spectrum/L0/U"]
        start = ds.id.get_chunk_info(0).byte_offset if ds.chunks else ds.id.get_offset()
    cut = tmp_path / "cut.h5"
    cut.write_bytes(out.read_bytes()[:start])
    fixed = tmp_path / "fixed.h5"
    report = qkhooks.store.repair(cut, fixed)
    assert any("spectrum/L0/U" in line for line in report.problems), report.problems
    with open_run(fixed) as run:
        assert "spectrum/L0/U" in fmt.lost_statics(run.attrs)
        with pytest.raises(QKHooksError, match="lost"):
            run.spectrum(0)
        arrays = run.spectrum_arrays(0)  # what was copied reads; the lost array is refused by name, not a KeyError
        assert "U" not in arrays
        with pytest.raises(QKHooksError, match="lost spectrum/L0/U to damage"):
            arrays["U"]
        with pytest.raises(KeyError):  # a name no run stores stays a plain KeyError
            arrays["no such array"]
