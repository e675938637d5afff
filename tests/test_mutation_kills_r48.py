"""Kill tests for round 47's library code (module "round47" of ``tests/mutation.py``, ``--only ROUND47``): each
asserts the real behaviour against an independent reference and was seen failing with its mutant active (the mutant's
name in the test's docstring; tests/MUTATION.md, round 48's run)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

import qkhooks
from qkhooks.data import readers
from test_resume_held_images_check_progress import _Held
from test_resume_hf_image_bytes import _blake, _hf, _pngs
from test_resume_in_memory_images import _arrays, _reference
from test_review_symlinks_repair_messages import _KW, _interrupted
from test_spectrum_edits_and_dataparallel import _tiny_loaded

datasets = pytest.importorskip("datasets")


# ------------------------------------------------------------------ tests/mutation.py: round47
def test_the_round47_module_names_files_and_tests_that_exist_and_round_47s_commits():
    """The harness's module "round47" and its named set ROUND47: every file to mutate and every test file exists, the
    selection names only test files it selects, the range resolves in this checkout to round 47's 13 library commits (27 in all)
    (``git rev-list``), so ``--only ROUND47`` draws the same sample wherever it runs, and every library file they
    changed is mutated but ``readings.py``, whose one changed line is a docstring's (no mutant)."""
    import subprocess

    from test_mutation_kills_r26 import ROOT, _harness, commits_in, library_files_changed, module_files

    mutation = _harness()
    files = module_files(mutation, "round47")
    assert mutation.NAMED_SETS["ROUND47"] == mutation.ROUND47 == ("commits:2885a7a..13f19ad",)
    assert len(commits_in("2885a7a..13f19ad")) == 27
    library = subprocess.run(["git", "rev-list", "2885a7a..13f19ad", "--", "qkhooks"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.split()
    assert len(library) == 13
    assert set(library_files_changed("2885a7a", "13f19ad")) - set(files) == {"qkhooks/readings.py"}


# ------------------------------------------------------------------ the check's progress bar
def test_the_checks_bar_counts_images_against_the_items_it_reads(capsys, monkeypatch):
    """The bar of a list's, an iterable's and a Hugging Face dataset's check (past the delay, here 0 s) counts in
    "img" against the number of items it reads: an iterable's all before the resume point (``ReadInPassing``'s
    ``_read_again`` ``_11``, no total), a dataset's from a shard's first (``_HFReader.held_hashes`` ``_26``, ``+ first``
    in its total); ``_checking`` ``_9`` (no unit: "it")."""
    monkeypatch.setattr(readers, "CHECK_BAR_DELAY", 0)
    arrays = _arrays(0, n=6)
    assert readers.MapReader(arrays).held_hashes(5, progress=True) == [(str(i), _reference(a))
                                                                       for i, a in enumerate(arrays[:5])]
    err = capsys.readouterr().err
    assert " 5/5 " in err and "img/s]" in err and "it/s]" not in err
    assert readers.IterReader(iter(arrays)).held_hashes(4, progress=True) == [(str(i), _reference(a))
                                                                              for i, a in enumerate(arrays[:4])]
    assert " 4/4 " in capsys.readouterr().err
    pngs = _pngs(0)
    reader = readers.hf_reader(_hf(pngs), None, None)
    assert reader.held_hashes(7, progress=True, first=3) == [(str(i), _blake(pngs[i])) for i in range(3, 7)]
    assert " 4/4 " in capsys.readouterr().err


# ------------------------------------------------------------------ a shard's first item
def test_a_hugging_face_datasets_file_paths_begin_at_the_shards_first_row():
    """``_HFReader.file_paths`` from ``first`` (a shard's first row) to ``stop``, and from row 0 by default
    (``_12``: ``first`` not handed on; ``_2``: a default of 1), against the rows' own positions."""
    reader = readers.hf_reader(_hf(_pngs(0)), None, None)
    assert reader.file_paths(7, first=3) == [(str(i), None) for i in range(3, 7)]
    assert reader.file_paths(7) == [(str(i), None) for i in range(7)]


def test_an_image_folders_file_paths_begin_at_the_shards_first_item_and_end_at_its_last(tmp_path):
    """``FolderReader.file_paths`` gives each item's (path relative to the root, file) from ``first`` (a shard's
    first) to ``stop``, never past the folder's last item, against the ImageFolder's own samples
    (``FolderReader.file_paths`` ``_10``: ``min(self.length or 0)``, a TypeError; no test of the selection reached it)."""
    import os

    from test_image_folder_ids_and_text_models import _image_folder

    root, folder = _image_folder(tmp_path)
    files = [path for path, _ in folder.samples]
    named = [(os.path.relpath(path, root).replace(os.sep, "/"), path) for path in files]
    reader = readers.folder_reader(folder)
    assert reader.file_paths(4, first=1) == named[1:4]
    assert reader.file_paths(99) == named and len(named) == 5


# ------------------------------------------------------------------ the read-again budget's warning
class _Slow(_Held):
    """A torch Dataset whose every read takes 2 s on ``clock`` (readers' ``time`` in the test)."""

    clock = SimpleNamespace(now=100.0)

    def __getitem__(self, index: int):
        self.clock.now += 2.0
        return super().__getitem__(index)


def test_the_read_again_budgets_warning_says_the_time_an_item_took_and_all_would_take(tmp_path, monkeypatch):
    """A Dataset whose every read takes 2 s (a clock its reads advance) under a 5 s budget: the resume reads 3 of its 4
    kept items again (2 s, 4 s, 6 s: past the budget after the third), checks those 3, and says whole: 6 s for 3 of
    them, 2000 ms each, all 4 about 8 s, the other 1 not checked (``_refuse_changed_stream_files`` ``_100``, ``_101``:
    the milliseconds an item as ``seconds * read``, ``1000 / seconds``)."""
    loaded, run = _tiny_loaded(), tmp_path / "run.h5"
    _interrupted(loaded, run, batches=3, data=_Slow(_arrays(0)))  # its checkpoint keeps 4 images
    monkeypatch.setattr(readers, "time", SimpleNamespace(monotonic=lambda: _Slow.clock.now))
    monkeypatch.setattr(readers, "READ_AGAIN_BUDGET", 5.0)
    with pytest.warns(UserWarning) as caught:
        assert qkhooks.record_dataset(loaded, _Slow(_arrays(0)), run, resume=True, **_KW).images == 8
    said = [str(w.message) for w in caught if "checks only" in str(w.message)]
    assert said == [
        f"{run}: this resume checks only the first 3 of the 4 images it keeps: reading torch:_Slow's items again "
        "through its __getitem__ took 6 s for 3 of them (2000 ms each; all 4 would take about 8 s), so the other 1 "
        "are not checked, and data changed since among them would go on under the kept images' ids. Pass the images "
        "as a list (in memory), or give the Dataset's items as file paths, to have every kept image checked quickly."]


# ------------------------------------------------------------------ a merged copy's metadata block
def test_a_merged_copys_metadata_block_holds_every_chunk_index_of_thousands_of_chunks(tmp_path):
    """A file made as ``merge --copy`` makes it (``create_run_file`` with ``merged_meta_block_bytes`` of its arrays'
    chunk counts; every object first, then the rows): two Fletcher-32 arrays of 3,000 one-row chunks each, whose
    indexes (16-byte entries) outgrow the 64 KiB for the objects: every piece of both indexes (the extensible arrays'
    header, index block and data blocks, found by their signatures in the file's bytes) lies before the first chunk.
    ``merged_meta_block_bytes`` ``_4`` (``/ INDEX_ENTRY_BYTES``: a 68 KiB block) put data blocks after the rows; the
    merge tests' 24 chunks fit either way."""
    import h5py

    from qkhooks.store._hdf5 import create_run_file, merged_meta_block_bytes
    from test_merge_copy_cuts import _signatures

    rows, path = 3000, tmp_path / "copy.h5"
    with create_run_file(path, meta_block=merged_meta_block_bytes([rows, rows])) as f:
        arrays = [f.create_dataset(f"a{k}", shape=(rows, 4), maxshape=(None, 4), dtype="u4", chunks=(1, 4),
                                   fletcher32=True) for k in range(2)]
        values = np.arange(rows * 4, dtype="u4").reshape(rows, 4)
        for ds in arrays:
            ds[:] = values
    with h5py.File(path, "r") as f:
        first_chunk = min(f[f"a{k}"].id.get_chunk_info(0).byte_offset for k in range(2))
        assert all((f[f"a{k}"][:] == values).all() for k in range(2))
    data = path.read_bytes()
    for signature in (b"EAHD", b"EAIB", b"EADB"):
        found = _signatures(data, signature)
        assert found and max(found) < first_chunk, signature


def test_a_merges_metadata_block_counts_each_arrays_chunks_as_the_merged_array_has_them(tmp_path):
    """``distributed._merged_meta_block`` sizes the block by each merged array's chunk count: 433 rows (shards of 217
    and 216) in chunks of 2 rows are 217 chunks, counted by h5py on such an array once written, where the rows / 2 of
    ``_merged_meta_block`` ``_13`` (``/`` for ``//``: 216.5, no ceiling) gave a block 4 KiB smaller."""
    import h5py

    from qkhooks.distributed import _merged_meta_block
    from qkhooks.store._hdf5 import merged_meta_block_bytes

    with h5py.File(tmp_path / "a.h5", "w") as f:
        merged = f.create_dataset("rows", shape=(433, 3), dtype="f2", chunks=(2, 3))
        merged[:] = 1
        chunks = merged.id.get_num_chunks()
        shards = [SimpleNamespace(n=n, per_image={"rows": merged}) for n in (217, 216)]
        assert chunks == 217 and _merged_meta_block(shards) == merged_meta_block_bytes([chunks])


def test_an_iterables_unreadable_item_is_skipped_under_its_position(tmp_path):
    """An iterable's item whose bytes are no image is skipped under its id, its position where it names none
    (``IterReader.row_id`` ``_2``: ``_item_id(row, None)``, every such item named "None"; no selected test reached
    it), its own where it names one."""
    arrays = _arrays(0, n=4)
    data = [arrays[0], b"not an image", arrays[2], {"image": b"nor this", "id": "own"}]
    with pytest.warns(UserWarning):  # the skipped items' warning
        result = qkhooks.record_dataset(_tiny_loaded(), (item for item in data), tmp_path / "run.h5", **_KW)
    assert [item_id for item_id, _ in result.skipped] == ["1", "own"]
    with qkhooks.open_run(tmp_path / "run.h5") as run:
        assert list(run.ids) == ["0", "2"]
