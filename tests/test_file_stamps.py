"""Round 40, helper STAMP: every run that reads image files stores and checks each file's stamp (size, modification
time, BLAKE2b of its bytes), whatever the source (a folder, a list of paths, a Hugging Face path column, ``wds:``
shards), and the stamp is taken where the file is read and decoded (no second read in the main process).

Each test here failed on the code before (round 39 stored stamps for folders only, read in the main process)."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import qkhooks
from qkhooks import QKHooksError
from qkhooks.data.items import read_oriented
from qkhooks.store import format as fmt
from test_review_symlinks_repair_messages import _KW, _interrupted
from test_spectrum_edits_and_dataparallel import _same_size_photos, _tiny_loaded

_NAMES = [f"a{i}.png" for i in range(8)]


def _blake(data: bytes) -> int:
    """The reference: hashlib's BLAKE2b (8 bytes), little-endian signed, as the run stores it (-1 kept for "no file")."""
    value = int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little", signed=True)
    return -2 if value == -1 else value


def _reference(paths) -> dict[str, list[int]]:
    """Each file's stamp by os.stat and hashlib, independent of qkhooks."""
    stats = [os.stat(p) for p in paths]
    return {fmt.FILE_SIZES: [s.st_size for s in stats], fmt.FILE_MTIMES: [s.st_mtime_ns for s in stats],
            fmt.FILE_HASHES: [_blake(Path(p).read_bytes()) for p in paths]}


def _stored(run_path) -> dict[str, list[int]]:
    with qkhooks.open_run(run_path) as run:
        return {name: run.array(name)[:].tolist() for name in (fmt.FILE_SIZES, fmt.FILE_MTIMES, fmt.FILE_HASHES)}


def _replace_with_same_size(path: Path, seed: int) -> None:
    """Another photo of the same file size in place of ``path``, its time moved on (so the time and the bytes differ)."""
    was = path.stat()
    _same_size_photos(path.parent, [path.name], seed=seed)
    assert path.stat().st_size == was.st_size and path.read_bytes() != b""
    os.utime(path, ns=(was.st_atime_ns, was.st_mtime_ns + 5 * 10**9))


def _restaged(paths, later_s: int = 10) -> None:
    """Every file rewritten with the same bytes, its time ``later_s`` seconds on (a data set copied again)."""
    for path in paths:
        data, stat = Path(path).read_bytes(), Path(path).stat()
        Path(path).write_bytes(data)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + later_s * 10**9))


def _kept(run) -> int:
    with qkhooks.open_run(run) as before:
        return before.n


def _hf(paths, decode_false: bool):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"image": [str(p) for p in paths]})
    return ds.cast_column("image", datasets.Image()) if decode_false else ds


# ---------------------------------------------------------------------------------------------- a list of paths


def test_a_list_of_paths_stores_stamps_equal_to_os_stat_and_blake2b(tmp_path):
    """Before: a run of a list of paths stored no file sizes, times or hashes at all."""
    folder = tmp_path / "imgs"
    _same_size_photos(folder, _NAMES, seed=0)
    paths = [str(folder / n) for n in _NAMES]
    qkhooks.record_dataset(_tiny_loaded(), paths, tmp_path / "run.h5", **_KW)
    assert _stored(tmp_path / "run.h5") == _reference(paths)


def test_a_list_of_paths_resume_over_a_kept_photo_replaced_by_one_of_the_same_size_is_refused_naming_it(tmp_path):
    """Before: the resume of a list of paths compared ids only, so a kept photo overwritten in place (the same name)
    resumed without a word and the run mixed maps of two data sets."""
    loaded, folder, run = _tiny_loaded(), tmp_path / "imgs", tmp_path / "run.h5"
    _same_size_photos(folder, _NAMES, seed=0)
    paths = [str(folder / n) for n in _NAMES]
    _interrupted(loaded, run, batches=3, data=paths)
    kept = _kept(run)
    _replace_with_same_size(folder / "a1.png", seed=7)
    first = str(folder / "a1.png")
    with pytest.raises(QKHooksError, match=r"images it keeps were modified since it recorded them \(first: "
                                           + repr(first).replace(".", r"\.") + r".*their bytes differ"):
        qkhooks.record_dataset(loaded, paths, run, resume=True, **_KW)
    assert _kept(run) == kept  # the refused resume left the file as it was


def test_a_list_of_paths_copied_again_resumes_and_equals_an_uninterrupted_run(tmp_path):
    """The same bytes with new times (a data set staged again) resume, and the stamps equal the reference."""
    loaded, folder, run = _tiny_loaded(), tmp_path / "imgs", tmp_path / "run.h5"
    _same_size_photos(folder, _NAMES, seed=0)
    paths = [str(folder / n) for n in _NAMES]
    _interrupted(loaded, run, batches=3, data=paths)
    _restaged(paths)
    assert qkhooks.record_dataset(loaded, paths, run, resume=True, **_KW).images == 8
    stored = _stored(run)
    reference = _reference(paths)
    assert stored[fmt.FILE_SIZES] == reference[fmt.FILE_SIZES]
    assert stored[fmt.FILE_HASHES] == reference[fmt.FILE_HASHES]
    kept = [i for i, (a, b) in enumerate(zip(stored[fmt.FILE_MTIMES], reference[fmt.FILE_MTIMES])) if a != b]
    assert kept and kept == list(range(len(kept)))  # the kept rows keep their recorded times; the rest are now's


# ---------------------------------------------------------------------------------------------- Hugging Face


@pytest.mark.parametrize("decode_false", [False, True], ids=["path-strings", "Image-cells"])
def test_a_hugging_face_path_column_resume_over_a_replaced_photo_is_refused_and_a_copy_resumes(tmp_path, decode_false):
    """A map-style Hugging Face dataset whose image column holds file paths (strings, or Image cells read from
    files, which record_dataset reads as Image(decode=False) {"path": ..., "bytes": None}). Before: no stamps stored,
    the resume checked ids only."""
    loaded, folder, run = _tiny_loaded(), tmp_path / "imgs", tmp_path / "run.h5"
    _same_size_photos(folder, _NAMES, seed=0)
    paths = [str(folder / n) for n in _NAMES]
    _interrupted(loaded, run, batches=3, data=_hf(paths, decode_false))
    kept = _kept(run)
    assert _stored(run) == {k: v[:kept] for k, v in _reference(paths).items()}
    recorded = (folder / "a2.png").read_bytes()
    _replace_with_same_size(folder / "a2.png", seed=9)
    with pytest.raises(QKHooksError, match=r"modified since it recorded them \(first: '[^']*a2\.png'.*bytes differ"):
        qkhooks.record_dataset(loaded, _hf(paths, decode_false), run, resume=True, **_KW)
    assert _kept(run) == kept
    (folder / "a2.png").write_bytes(recorded)  # the recorded photo back, then the whole set copied again
    _restaged(paths)
    assert qkhooks.record_dataset(loaded, _hf(paths, decode_false), run, resume=True, **_KW).images == 8


# ---------------------------------------------------------------------------------------------- wds: shards


def _shard(path: Path, members: dict[str, bytes], mtime: int) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), mtime
            tar.addfile(info, io.BytesIO(data))


def _pngs(seed: int) -> dict[str, bytes]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = {}
    for name in _NAMES:
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(buffer, "PNG", compress_level=0)
        out[name] = buffer.getvalue()
    return out


def test_wds_stores_each_members_stamp_and_a_resume_over_a_rewritten_member_is_refused(tmp_path):
    """A tar member's stamp: its header's size and time, the BLAKE2b of its bytes as read. Before: a wds: run stored
    none, and a shard rewritten with other bytes for a kept member (same name, same size) resumed without a word."""
    loaded, shard, run = _tiny_loaded(), tmp_path / "s0.tar", tmp_path / "run.h5"
    members = _pngs(0)
    _shard(shard, members, mtime=1_700_000_000)
    _interrupted(loaded, run, batches=3, data=f"wds:{shard}")
    kept = _kept(run)
    with qkhooks.open_run(run) as got:
        assert list(got.ids) == _NAMES[:kept]
    assert _stored(run) == {fmt.FILE_SIZES: [len(members[n]) for n in _NAMES[:kept]],
                            fmt.FILE_MTIMES: [1_700_000_000 * 10**9] * kept,
                            fmt.FILE_HASHES: [_blake(members[n]) for n in _NAMES[:kept]]}
    other = dict(members, **{"a1.png": _pngs(3)["a1.png"]})
    assert len(other["a1.png"]) == len(members["a1.png"]) and other["a1.png"] != members["a1.png"]
    _shard(shard, other, mtime=1_700_000_100)
    with pytest.raises(QKHooksError, match=r"modified since it recorded them \(first: 'a1\.png'.*bytes differ"):
        qkhooks.record_dataset(loaded, f"wds:{shard}", run, resume=True, **_KW)
    assert _kept(run) == kept
    _shard(shard, members, mtime=1_700_000_200)  # the same members written again with new times: resumes
    assert qkhooks.record_dataset(loaded, f"wds:{shard}", run, resume=True, **_KW).images == 8
    assert _stored(run)[fmt.FILE_HASHES] == [_blake(members[n]) for n in _NAMES]


def _wds_run(tmp_path, shards: dict[str, dict[str, bytes]], batches: int = 3):
    """A wds: run over ``shards`` (file name: members, in order) stopped after ``batches`` batches: (spec, run, kept)."""
    for name, members in shards.items():
        _shard(tmp_path / name, members, mtime=1_700_000_000)
    spec, run = f"wds:{tmp_path}/s{{0..{len(shards) - 1}}}.tar", tmp_path / "run.h5"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "skipping unreadable image")  # the test of gaps has samples to skip
        _interrupted(_tiny_loaded(), run, batches=batches, data=spec)
    return spec, run, _kept(run)


def test_a_wds_resume_over_kept_samples_reordered_is_refused_and_resumes_once_put_back(tmp_path):
    """Round 49: a wds: resume checked the kept ids against the members' stamps by membership alone, so kept samples
    swapped together with their ids (or shards renamed into another order) resumed, the file's image i no longer the
    data's item i; every other source read again checks their order. Put back, the run resumes and ends as an
    uninterrupted one."""
    members = _pngs(0)
    first, second = dict(list(members.items())[:2]), dict(list(members.items())[2:4])
    rest = dict(list(members.items())[4:])
    # three shards, the first two swapped on disk after the run kept their four samples: the same ids before the
    # resume point, in another order
    spec, run, kept = _wds_run(tmp_path, {"s0.tar": first, "s1.tar": second, "s2.tar": rest})
    assert kept >= 4
    _shard(tmp_path / "s0.tar", second, mtime=1_700_000_000)
    _shard(tmp_path / "s1.tar", first, mtime=1_700_000_000)
    loaded = _tiny_loaded()
    with pytest.raises(QKHooksError, match=r"not those the run recorded \(image 0 of the file is 'a0\.png', the "
                                           r"data's is 'a2\.png'\).*Put the data back as it was"):
        qkhooks.record_dataset(loaded, spec, run, resume=True, **_KW)
    assert _kept(run) == kept
    # two kept members swapped within a shard, each with its bytes (every stamp as recorded)
    swapped = {"a1.png": members["a1.png"], "a0.png": members["a0.png"]}
    _shard(tmp_path / "s0.tar", swapped, mtime=1_700_000_000)
    _shard(tmp_path / "s1.tar", second, mtime=1_700_000_000)
    with pytest.raises(QKHooksError, match=r"image 0 of the file is 'a0\.png', the data's is 'a1\.png'"):
        qkhooks.record_dataset(loaded, spec, run, resume=True, **_KW)
    _shard(tmp_path / "s0.tar", first, mtime=1_700_000_000)  # put back: resumes, as an uninterrupted run
    assert qkhooks.record_dataset(loaded, spec, run, resume=True, **_KW).images == 8
    with qkhooks.open_run(run) as got:
        assert list(got.ids) == _NAMES


def test_a_wds_resume_over_skipped_samples_checks_the_order_around_their_gaps(tmp_path):
    """Samples the recording skipped before the resume point (an image that does not decode, read by file_stamps; a
    sample of two images, left out by it) are not kept: the kept ids around them, in order, resume, and two kept
    samples swapped across the gap are refused."""
    members = _pngs(0)
    odd = {"a0.png": members["a0.png"], "a1.png": b"broken, not a png", "a2.jpg": members["a2.png"],
           "a2.png": members["a2.png"], "a3.png": members["a3.png"], "a4.png": members["a4.png"]}
    spec, run, kept = _wds_run(tmp_path, {"s0.tar": odd, "s1.tar": dict(list(members.items())[5:])})
    with qkhooks.open_run(run) as got:
        assert list(got.ids) == ["a0.png", "a3.png", "a4.png", "a5.png"][:kept] and kept >= 3
    swapped = {"a3.png": members["a3.png"], **{k: v for k, v in odd.items() if k != "a3.png"}}
    _shard(tmp_path / "s0.tar", swapped, mtime=1_700_000_000)
    loaded = _tiny_loaded()
    with pytest.raises(QKHooksError, match=r"image 0 of the file is 'a0\.png', the data's is 'a3\.png'"):
        qkhooks.record_dataset(loaded, spec, run, resume=True, **_KW)
    _shard(tmp_path / "s0.tar", odd, mtime=1_700_000_000)
    done = qkhooks.record_dataset(loaded, spec, run, resume=True, **_KW)
    with qkhooks.open_run(run) as got:
        assert list(got.ids) == ["a0.png", "a3.png", "a4.png", "a5.png", "a6.png", "a7.png"] and done.images == 6


# ---------------------------------------------------------------------------------------------- where stamps are taken


def test_the_recording_stamps_where_files_are_read_and_never_reads_them_again_in_the_main_process(tmp_path, monkeypatch):
    """Before: WriterSink hashed every file of a batch in the main process (a second read of each file). Now the
    stamps come with the batch from where the image was decoded; data_files.file_hash (the main process's reader)
    is not called while recording a folder, and the stamps equal the reference."""
    import qkhooks.data_files as data_files

    folder = tmp_path / "imgs"
    _same_size_photos(folder, _NAMES, seed=0)

    def no_second_read(path):
        raise AssertionError(f"{path} read again in the main process")

    monkeypatch.setattr(data_files, "file_hash", no_second_read)
    qkhooks.record_dataset(_tiny_loaded(), str(folder), tmp_path / "run.h5", **_KW)
    assert _stored(tmp_path / "run.h5") == _reference([folder / n for n in _NAMES])


@pytest.mark.parametrize("source", ["folder", "list"])
def test_with_two_workers_the_stamps_still_arrive_and_equal_the_reference(tmp_path, source, monkeypatch):
    """The stamps are taken in the loader's worker processes and carried with the batch (a DataLoader's for a
    folder, the stream's process pool for a list); the main process reads no file again (before: a folder's were
    hashed there, a list's not stored)."""
    import qkhooks.data_files as data_files

    monkeypatch.setattr(data_files, "file_hash", lambda path: pytest.fail(f"{path} read again in the main process"))
    folder = tmp_path / "imgs"
    _same_size_photos(folder, _NAMES, seed=0)
    paths = [str(folder / n) for n in _NAMES]
    data = str(folder) if source == "folder" else paths
    qkhooks.record_dataset(_tiny_loaded(), data, tmp_path / "run.h5", **{**_KW, "batch_size": 4, "num_workers": 2})
    assert _stored(tmp_path / "run.h5") == _reference(paths)


# ---------------------------------------------------------------------------------------------- no file, older runs


def test_in_memory_images_store_no_file_and_resume(tmp_path):
    """Items with no file (arrays) are stored with -1 size and time; since round 46 their content's hash is stored
    (tests/test_resume_in_memory_images.py checks it and the resume's refusals): the same items resume."""
    loaded, run = _tiny_loaded(), tmp_path / "run.h5"
    rng = np.random.default_rng(0)
    items = [{"image": rng.integers(0, 255, (16, 16, 3), dtype=np.uint8), "id": f"m{i}"} for i in range(8)]
    _interrupted(loaded, run, batches=3, data=items)
    stored = _stored(run)
    assert all(v == -1 for name in (fmt.FILE_SIZES, fmt.FILE_MTIMES) for v in stored[name])
    assert all(v != -1 for v in stored[fmt.FILE_HASHES])
    assert qkhooks.record_dataset(loaded, items, run, resume=True, **_KW).images == 8


def as_before_the_stamps(run) -> None:
    """``run`` as a run written before round 40's file stamps: without the images/file_* arrays, in its listing too."""
    import json

    with h5py.File(run, "r+", locking=False) as f:
        for name in (fmt.FILE_SIZES, fmt.FILE_MTIMES, fmt.FILE_HASHES):
            del f[name]
        listed = json.loads(fmt.as_str(f["images"].attrs[fmt.ARRAYS_ATTR]))
        f["images"].attrs[fmt.ARRAYS_ATTR] = json.dumps([a for a in listed if not a.startswith("images/file_")])


def _hf_named(pngs: dict[str, bytes], ids: bool):
    """A map-style Hugging Face dataset of the images' bytes, in _NAMES' order, with an id column or (``ids`` False)
    none: its rows are then named by their positions."""
    datasets = pytest.importorskip("datasets")
    columns = {"image": [{"bytes": pngs[n], "path": None} for n in _NAMES], **({"id": _NAMES} if ids else {})}
    features = {"image": datasets.Image(), **({"id": datasets.Value("string")} if ids else {})}
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features))


@pytest.mark.parametrize("source", ["list of paths", "hf bytes with ids"])
def test_a_run_written_before_the_stamps_whose_ids_are_checked_warns_that_their_content_is_not(tmp_path, source):
    """Round 50: a list's or a map-style Hugging Face dataset's run from before the file stamps (no images/file_*
    arrays) had its kept ids checked in order as the data was opened, and resumed without a word though nothing of
    their content was (a test pinned that silence). Now it warns as a torch Dataset's run does (round 49), naming the
    run, how many kept images, and the fix (resume_ids_only=True is refused for such data as it was). Ids changed are
    still refused."""
    loaded, run = _tiny_loaded(), tmp_path / "run.h5"
    if source == "list of paths":
        _same_size_photos(tmp_path / "imgs", _NAMES, seed=0)
        data = [str(tmp_path / "imgs" / n) for n in _NAMES]
        swapped = [data[1], data[0], *data[2:]]
    else:
        data = _hf_named(_pngs(0), ids=True)
        swapped = data.select([1, 0, *range(2, 8)])
    _interrupted(loaded, run, batches=3, data=data)
    as_before_the_stamps(run)
    with pytest.raises(QKHooksError, match=r"not those the run recorded \(image 0 of the file"):
        qkhooks.record_dataset(loaded, swapped, run, resume=True, **_KW)
    with pytest.warns(UserWarning, match=r"(?s)run\.h5 was recorded before qkhooks stored each image's stamps .*checks "
                                         r"the 4 images it keeps by their ids alone, in order: .*their content is not "
                                         r"checked.*record it afresh into a new --out"):
        assert qkhooks.record_dataset(loaded, data, run, resume=True, **_KW).images == 8
    with qkhooks.open_run(run) as after:
        assert after.complete and not after.has(fmt.FILE_SIZES)


@pytest.mark.parametrize("source", ["hf bytes", "hf binary column", "list of arrays"])
def test_a_run_written_before_the_stamps_of_images_named_by_position_is_refused_a_resume_it_cannot_check(tmp_path,
                                                                                                         source):
    """Round 50: a map-style Hugging Face dataset of image bytes with no id column (an Image or a binary column), or a
    list of arrays without ids, names its rows by their positions, and a run of it from before the file stamps holds
    nothing of their content: its resume checked ids that cannot differ, and went on without a word (reproduced: rows
    0 and 1 swapped; a row swapped across the resume point would leave the file holding one image twice and another
    never). Nothing at all can be checked, so the resume is refused, the data changed or not, naming the run, the
    images named by position, and the fix; the file is left as it was."""
    loaded, run = _tiny_loaded(), tmp_path / "run.h5"
    if source.startswith("hf"):
        data = _hf_named(_pngs(0), ids=False)
        if source == "hf binary column":  # no masks, no paths: a dataset whose rows the opening names not at all
            datasets = pytest.importorskip("datasets")
            data = datasets.Dataset.from_dict({"image": list(_pngs(0).values())},
                                              features=datasets.Features({"image": datasets.Value("binary")}))
        swapped = data.select([1, 0, *range(2, 8)])
    else:
        rng = np.random.default_rng(0)
        data = [rng.integers(0, 255, (16, 16, 3), dtype=np.uint8) for _ in _NAMES]
        swapped = [data[1], data[0], *data[2:]]
    _interrupted(loaded, run, batches=3, data=data)
    kept = _kept(run)
    as_before_the_stamps(run)
    for now in (data, swapped):  # as it was, or changed: neither can be told
        with pytest.raises(QKHooksError, match=r"cannot resume .*run\.h5: it keeps 4 images, was recorded before "
                                               r"qkhooks stored each image's stamps .*and 4 of them are named by their "
                                               r"position in .* alone .*Record it afresh into a new --out"):
            qkhooks.record_dataset(loaded, now, run, resume=True, **_KW)
        with qkhooks.open_run(run) as after:
            assert list(after.ids) == [str(i) for i in range(kept)] and not after.complete


def test_a_wds_run_written_before_the_stamps_checks_its_kept_samples_in_order_warns_and_resumes_once_put_back(
        tmp_path):
    """Round 50: a wds: run recorded before the file stamps (no images/file_* arrays) resumed with no check at all and
    without a word: shards renamed into another order, two kept samples swapped, or one removed, went on with the
    file's image i no longer the data's item i. Now its kept ids are checked against the shards' samples in order
    (read again without decoding, as a newer run's stamps are), as a torch Dataset's are on such a run, and the
    resume warns that their content is not checked; put back, it resumes and ends as an uninterrupted run."""
    members = _pngs(0)
    first, second = dict(list(members.items())[:2]), dict(list(members.items())[2:4])
    spec, run, kept = _wds_run(tmp_path, {"s0.tar": first, "s1.tar": second, "s2.tar": dict(list(members.items())[4:])})
    assert kept >= 4
    as_before_the_stamps(run)
    loaded = _tiny_loaded()
    changes = [({"s0.tar": second, "s1.tar": first}, "'a0\\.png', the data's is 'a2\\.png'"),  # shards reordered
               ({"s0.tar": {"a1.png": members["a1.png"], "a0.png": members["a0.png"]}},  # two samples swapped
                "'a0\\.png', the data's is 'a1\\.png'"),
               ({"s0.tar": {"a1.png": members["a1.png"]}}, "'a0\\.png', the data's is 'a1\\.png'")]  # one removed
    for shards, ids in changes:
        for name, held in shards.items():
            _shard(tmp_path / name, held, mtime=1_700_000_000)
        with pytest.raises(QKHooksError, match=r"not those the run recorded \(image 0 of the file is " + ids
                                               + r"\).*record into a new --out"):
            qkhooks.record_dataset(loaded, spec, run, resume=True, **_KW)
        assert _kept(run) == kept  # the refused resume left the file as it was
        for name, held in (("s0.tar", first), ("s1.tar", second)):  # put back
            _shard(tmp_path / name, held, mtime=1_700_000_000)
    with pytest.warns(UserWarning, match=r"recorded before qkhooks stored each image's stamps .*checks the 4 images "
                                         r"it keeps by their ids alone, in order"):
        result = qkhooks.record_dataset(loaded, spec, run, resume=True, **_KW)
    assert result.images == 8 and result.resumed_from == 4  # the checkpoint's 4 of the file's kept
    whole = tmp_path / "whole.h5"
    qkhooks.record_dataset(loaded, spec, whole, **_KW)
    with qkhooks.open_run(run) as resumed, qkhooks.open_run(whole) as reference:
        assert list(resumed.ids) == list(reference.ids) == _NAMES
        for name in reference.arrays():
            if not name.startswith("images/file_"):
                np.testing.assert_array_equal(resumed.array(name)[:], reference.array(name)[:], err_msg=name)


def test_a_streamed_hugging_face_run_written_before_the_stamps_checks_its_kept_ids_in_passing_and_warns(tmp_path):
    """Round 50: a streamed Hugging Face dataset's items before the resume point were not read again, and a run
    recorded before the file stamps holds nothing else to compare, so its resume went on without a word whatever the
    stream now gave (reproduced: rows 0 and 1, 4 and 5 swapped resumed, and the complete file held its first images in
    the recorded order, the rest in the new); round 50 refused it. Round 51 reads those rows in passing (skip() reads
    them anyway), so such a run's kept ids are checked in order, as an iterable's are: swapped, refused and the file
    left as it was; as it was, resumed with the warning that their content is not checked. (Rows named by their
    position alone are refused: test_resume_read_in_passing.)"""
    datasets = pytest.importorskip("datasets")
    pngs = _pngs(0)
    table = datasets.Dataset.from_dict(
        {"image": [{"bytes": pngs[n], "path": None} for n in _NAMES], "id": _NAMES},
        features=datasets.Features({"image": datasets.Image(), "id": datasets.Value("string")}))
    loaded, run = _tiny_loaded(), tmp_path / "run.h5"
    _interrupted(loaded, run, batches=3, data=table.to_iterable_dataset())
    kept = _kept(run)
    as_before_the_stamps(run)
    swapped = table.select([1, 0, 2, 3, 5, 4, 6, 7]).to_iterable_dataset()
    with pytest.raises(QKHooksError, match=r"not those the run recorded \(image 0 of the file is 'a0\.png', the "
                                           r"data's is 'a1\.png'\)"):
        qkhooks.record_dataset(loaded, swapped, run, resume=True, **_KW)
    with qkhooks.open_run(run) as after:
        assert list(after.ids) == _NAMES[:kept] and not after.complete
    with pytest.warns(UserWarning, match=r"recorded before qkhooks stored each image's stamps .*checks the 4 images "
                                         r"it keeps by their ids alone, in order"):
        result = qkhooks.record_dataset(loaded, table.to_iterable_dataset(), run, resume=True, **_KW)
    assert result.images == 8 and result.resumed_from == 4
    with qkhooks.open_run(run) as after:
        assert list(after.ids) == _NAMES and after.complete


def test_a_torch_dataset_of_paths_resume_checks_its_kept_files(tmp_path):
    """A torch Dataset's items were not read again before the resume point (its __getitem__ may load the image), so
    its kept files were not checked, and the resume said so; since round 47 they are read again (one __getitem__ an
    item) and checked as a list's: the same files resume without a word."""
    import warnings

    import torch

    class Paths(torch.utils.data.Dataset):
        def __init__(self, paths):
            self.paths = paths

        def __len__(self):
            return len(self.paths)

        def __getitem__(self, i):
            return self.paths[i]

    loaded, folder, run = _tiny_loaded(), tmp_path / "imgs", tmp_path / "run.h5"
    _same_size_photos(folder, _NAMES, seed=0)
    paths = [str(folder / n) for n in _NAMES]
    _interrupted(loaded, run, batches=3, data=Paths(paths))
    kept = _kept(run)
    assert _stored(run) == {k: v[:kept] for k, v in _reference(paths).items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert qkhooks.record_dataset(loaded, Paths(paths), run, resume=True, **_KW).images == 8


class _PathsOrLoaded(torch.utils.data.Dataset):
    """A torch Dataset giving its photos as file paths (``loaded`` None) or, from item ``first`` on, as the image
    it loads through qkhooks' own reader: a PIL image, an array or a tensor."""

    def __init__(self, paths, loaded=None, first: int = 0):
        self.paths, self.loaded, self.first = paths, loaded, first

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        path = self.paths[i]
        if self.loaded is None or i < self.first:
            return {"image": path, "id": Path(path).name}
        image = read_oriented(path)[0]
        image = {"pil": image, "array": np.asarray(image), "tensor": torch.from_numpy(np.array(image))}[self.loaded]
        return {"image": image, "id": Path(path).name}


@pytest.mark.parametrize("ids_only", [False, True], ids=["resume", "resume_ids_only"])
@pytest.mark.parametrize("loaded, first", [("pil", 0), ("array", 0), ("tensor", 1)])
def test_a_kept_image_recorded_from_its_file_and_given_in_memory_now_is_refused_saying_so(tmp_path, ids_only, loaded,
                                                                                         first):
    """Round 50: a Dataset that gave its photos as paths when the run recorded them (qkhooks read the files and
    stored their stamps), resumed giving the images it loads in memory instead, was refused as if the kept files had
    changed size ("852 bytes then, unreadable now"), a true refusal for a reason that did not happen. The refusal now
    says that the kept images were recorded from files and are given in memory now, naming the first, and the fix;
    given as paths again, the run resumes and ends as an uninterrupted one. (A tensor as item 0 is refused as the
    data is opened, naming the tensor: here the tensors start at item 1.)"""
    loaded_model, folder, run = _tiny_loaded(), tmp_path / "imgs", tmp_path / "run.h5"
    _same_size_photos(folder, _NAMES, seed=0)
    paths = [str(folder / n) for n in _NAMES]
    _interrupted(loaded_model, run, batches=3, data=_PathsOrLoaded(paths))
    kept = _kept(run)
    assert _stored(run) == {k: v[:kept] for k, v in _reference(paths).items()}  # recorded from the files
    with pytest.raises(QKHooksError, match=rf"{4 - first} of the 4 images it keeps were read from files when it "
                                           rf"recorded them, and torch:_PathsOrLoaded now gives them in memory, not as "
                                           rf"their files' paths \(first: '{_NAMES[first]}'.*Give those items as "
                                           r"their file paths again.*or record afresh into a new --out"):
        qkhooks.record_dataset(loaded_model, _PathsOrLoaded(paths, loaded, first), run, resume=True,
                               resume_ids_only=ids_only, **_KW)
    assert _kept(run) == kept  # the refused resume left the file as it was
    assert qkhooks.record_dataset(loaded_model, _PathsOrLoaded(paths), run, resume=True, resume_ids_only=ids_only,
                                  **_KW).images == 8
    whole = tmp_path / "whole.h5"
    qkhooks.record_dataset(loaded_model, _PathsOrLoaded(paths), whole, **_KW)
    with qkhooks.open_run(run) as resumed, qkhooks.open_run(whole) as reference:
        assert list(resumed.ids) == list(reference.ids) == _NAMES
        for name in reference.arrays():  # the stamps too: the same files, read from the same paths
            np.testing.assert_array_equal(resumed.array(name)[:], reference.array(name)[:], err_msg=name)


def test_shards_of_a_streamed_run_recorded_before_and_after_the_stamps_merge(tmp_path):
    """A torchrun resume after an upgrade: rank 0's shard of a list of paths, begun before round 40 (no file arrays),
    beside rank 1's, recorded with them. They are one run: the merge goes without the three arrays (a streamed run's
    serve only a resume of its shards) rather than refusing rank 0's as "not one run"; the rest equals a single run."""
    from qkhooks.distributed import merge_shards, shard_path

    loaded, folder, out = _tiny_loaded(), tmp_path / "imgs", tmp_path / "run.h5"
    _same_size_photos(folder, _NAMES[:6], seed=0)
    paths = [str(folder / n) for n in _NAMES[:6]]
    for rank in (0, 1):
        qkhooks.record_dataset(loaded, paths, shard_path(out, rank, 2), shard=(rank, 2), **_KW)
    as_before_the_stamps(shard_path(out, 0, 2))
    with qkhooks.open_run(shard_path(out, 1, 2)) as one:
        assert one.has(fmt.FILE_SIZES)  # the shards do differ in layout
    qkhooks.record_dataset(loaded, paths, tmp_path / "single.h5", **_KW)
    merge_shards(out)
    with qkhooks.open_run(out) as merged, qkhooks.open_run(tmp_path / "single.h5") as whole:
        assert merged.complete and list(merged.ids) == list(whole.ids) == paths
        assert not merged.has(fmt.FILE_SIZES)
        for name in whole.arrays():
            if not name.startswith("images/file_"):
                np.testing.assert_array_equal(merged.array(name)[:], whole.array(name)[:], err_msg=name)


def test_a_wds_resume_reads_the_shards_headers_once(tmp_path, monkeypatch):
    """Round 48: a wds: resume read the shards up to its point to stamp the kept members (file_stamps), then read them
    from the start again to skip to that point (rows). The rows now go on from where the stamps stopped: each sample
    read once, the same samples as a fresh read from that point."""
    from qkhooks.data import readers

    shard = tmp_path / "s0.tar"
    members = _pngs(0)
    _shard(shard, members, mtime=1_700_000_000)
    read = []
    samples = readers._TarReader._samples

    def counted(self):
        for sample in samples(self):
            read.append(sample["__key__"])
            yield sample

    monkeypatch.setattr(readers._TarReader, "_samples", counted)
    reader = readers.open_wds(str(shard))
    stamps = reader.file_stamps(4)
    assert [(i, s[2]) for i, s in stamps] == [(n, _blake(members[n])) for n in _NAMES[:4]]
    rest = list(reader.rows(4))
    assert read == [n.split(".")[0] for n in _NAMES]  # each sample once
    assert [row["__key__"] for row in rest] == [row["__key__"] for row in readers.open_wds(str(shard)).rows(4)]
    assert [row["png"] for row in rest] == [members[n] for n in _NAMES[4:]]


def test_wds_file_stamps_from_a_first_position_leave_out_the_earlier_samples_and_the_skipped(tmp_path):
    """file_stamps(stop, first=...) gives the samples from ``first`` (a shard's first, as a resume's order check reads
    them) in order, a sample of two images left out, each stamp equal to the member's header and hashlib's BLAKE2b."""
    from qkhooks.data import readers

    members = _pngs(0)
    odd = {**dict(list(members.items())[:3]), "a3.jpg": members["a3.png"], **dict(list(members.items())[3:])}
    _shard(tmp_path / "s0.tar", odd, mtime=1_700_000_000)
    stamps = readers.open_wds(str(tmp_path / "s0.tar")).file_stamps(6, first=2)
    assert stamps == [(n, (len(members[n]), 1_700_000_000 * 10**9, _blake(members[n])))
                      for n in ("a2.png", "a4.png", "a5.png")]
