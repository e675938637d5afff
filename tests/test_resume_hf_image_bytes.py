"""Round 46, helper DATA: what was left open by round 45.

A map-style Hugging Face dataset whose images are held in it as bytes (``Image`` cells with bytes, as
``Dataset.from_dict`` of PIL images or a hub parquet stores them) had only its length checked on resume: the same
number of other images resumed into the run without a word, one run holding maps of two data sets. Each kept image's
BLAKE2b of its bytes is now stored (size and time -1: no file) and compared on resume."""

from __future__ import annotations

import hashlib
import io
import warnings

import h5py
import numpy as np
import pytest
from PIL import Image

import qkhooks
from qkhooks import QKHooksError
from qkhooks.store import format as fmt
from test_review_symlinks_repair_messages import _KW, _interrupted
from test_spectrum_edits_and_dataparallel import _tiny_loaded

datasets = pytest.importorskip("datasets")


def _pngs(seed: int, n: int = 8) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(buffer, "PNG")
        out.append(buffer.getvalue())
    return out


def _hf(pngs: list[bytes], ids: bool = False):
    """A map-style dataset of ``Image`` cells holding the bytes (no file), with an id column if ``ids``."""
    columns = {"image": [{"bytes": b, "path": None} for b in pngs]}
    features = {"image": datasets.Image()}
    if ids:
        columns["id"] = [f"p{i}" for i in range(len(pngs))]
        features["id"] = datasets.Value("string")
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features))


def _blake(data: bytes) -> int:
    """The reference: hashlib's BLAKE2b (8 bytes), little-endian signed, -1 kept for "none" (stored as -2)."""
    value = int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little", signed=True)
    return -2 if value == -1 else value


def _stored(run) -> dict[str, list]:
    with qkhooks.open_run(run) as opened:
        out = {name: opened.array(name)[:].tolist() for name in (fmt.FILE_SIZES, fmt.FILE_MTIMES, fmt.FILE_HASHES)}
        out["ids"] = list(opened.ids)
        return out


def _kept(run) -> int:
    with qkhooks.open_run(run) as opened:
        return opened.n


@pytest.mark.parametrize("ids", [False, True], ids=["by-position", "id-column"])
def test_hugging_face_image_bytes_store_each_images_blake2b_and_no_file(tmp_path, ids):
    """Before: -1 in all three columns, nothing a resume could compare."""
    pngs = _pngs(0)
    qkhooks.record_dataset(_tiny_loaded(), _hf(pngs, ids), tmp_path / "run.h5", **_KW)
    stored = _stored(tmp_path / "run.h5")
    assert stored[fmt.FILE_HASHES] == [_blake(b) for b in pngs]
    assert stored[fmt.FILE_SIZES] == [-1] * 8 and stored[fmt.FILE_MTIMES] == [-1] * 8  # not files


@pytest.mark.parametrize("ids", [False, True], ids=["by-position", "id-column"])
def test_a_resume_over_other_images_of_the_same_count_is_refused_and_the_same_images_resume(tmp_path, ids):
    """Before: the resume compared the dataset's length only and went on over the other images without a word."""
    loaded, run = _tiny_loaded(), tmp_path / "run.h5"
    _interrupted(loaded, run, batches=3, data=_hf(_pngs(0), ids))
    kept = _kept(run)
    other = _pngs(0)
    other[1] = _pngs(5)[1]  # one kept image replaced, the count the same
    first = "p1" if ids else "1"
    with pytest.raises(QKHooksError, match=rf"(?s)cannot resume .*run\.h5: 1 of the \d+ images it keeps hold other "
                                           rf"bytes .*first: '{first}'.*BLAKE2b.*two datasets.*--overwrite"):
        qkhooks.record_dataset(loaded, _hf(other, ids), run, resume=True, **_KW)
    assert _kept(run) == kept  # the refused resume left the file as it was
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # checked: no word of unchecked images
        assert qkhooks.record_dataset(loaded, _hf(_pngs(0), ids), run, resume=True, **_KW).images == 8
    reference = tmp_path / "whole.h5"
    qkhooks.record_dataset(loaded, _hf(_pngs(0), ids), reference, **_KW)
    assert _stored(run) == _stored(reference)


def test_a_resume_over_the_same_images_reordered_is_refused(tmp_path):
    """Named by position, two kept images swapped read as the same ids: their bytes tell them apart."""
    loaded, run = _tiny_loaded(), tmp_path / "run.h5"
    _interrupted(loaded, run, batches=3, data=_hf(_pngs(0)))
    pngs = _pngs(0)
    pngs[0], pngs[2] = pngs[2], pngs[0]
    with pytest.raises(QKHooksError, match=r"2 of the \d+ images it keeps hold other bytes .*first: '0'"):
        qkhooks.record_dataset(loaded, _hf(pngs), run, resume=True, **_KW)


def test_files_and_bytes_in_one_dataset_each_checked_their_own_way(tmp_path):
    """Even rows files, odd rows bytes: the files copied again (new times, the same bytes) resume, their hashes read
    from the files; one kept image's bytes replaced is refused by its hash."""
    loaded, run, folder = _tiny_loaded(), tmp_path / "run.h5", tmp_path / "imgs"
    folder.mkdir()
    pngs = _pngs(0)
    for i in range(0, 8, 2):
        (folder / f"a{i}.png").write_bytes(pngs[i])

    def mixed(data):
        cells = [{"path": str(folder / f"a{i}.png"), "bytes": None} if i % 2 == 0 else {"bytes": data[i], "path": None}
                 for i in range(8)]
        return datasets.Dataset.from_dict({"image": cells}, features=datasets.Features({"image": datasets.Image()}))

    _resume_files_and_held(loaded, run, folder, mixed, pngs, _pngs(5)[3], [_blake(b) for b in pngs])


def _resume_files_and_held(loaded, run, folder, mixed, held, replacement, hashes) -> None:
    """Record 3 batches of ``mixed(held)`` (even items the files ``folder/a{i}.png``, odd items held in memory), check
    the stored hashes against ``hashes`` (the files' sizes stored, the held ones' -1), then: the odd item 3 replaced by
    ``replacement`` is refused by its hash; the files copied again (new times, the same bytes) resume."""
    import os

    _interrupted(loaded, run, batches=3, data=mixed(held))
    stored = _stored(run)
    assert stored[fmt.FILE_HASHES] == hashes[:len(stored["ids"])]
    assert [s >= 0 for s in stored[fmt.FILE_SIZES]] == [i % 2 == 0 for i in range(len(stored["ids"]))]
    other = list(held)
    other[3] = replacement
    with pytest.raises(QKHooksError, match=r"1 of the \d+ images it keeps hold other bytes .*first: '3'"):
        qkhooks.record_dataset(loaded, mixed(other), run, resume=True, **_KW)
    for i in range(0, 8, 2):  # the files copied again: new times, the same bytes
        path = folder / f"a{i}.png"
        stat = path.stat()
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10 * 10**9))
    assert qkhooks.record_dataset(loaded, mixed(held), run, resume=True, **_KW).images == 8


def test_a_run_recorded_without_the_hashes_resumes_saying_its_kept_images_are_not_checked(tmp_path):
    """A run of such a dataset recorded before round 46 (-1 hashes) cannot be checked: it resumes, and says so."""
    loaded, run = _tiny_loaded(), tmp_path / "run.h5"
    _interrupted(loaded, run, batches=3, data=_hf(_pngs(0)))
    with h5py.File(run, "r+") as f:  # as an older qkhooks wrote it
        f[fmt.FILE_HASHES][...] = -1
    with pytest.warns(UserWarning, match=r"(?s)does not check \d+ of the \d+ images it keeps \(first: '0'\).*held in "
                                         r".*no hash of their bytes.*new --out"):
        assert qkhooks.record_dataset(loaded, _hf(_pngs(0)), run, resume=True, **_KW).images == 8


def test_a_binary_column_of_encoded_images_is_hashed_and_checked_alike(tmp_path):
    """A column of encoded bytes (Value("binary"), no Image feature) is read as bytes too: hashed, and checked."""
    def binary(pngs):
        return datasets.Dataset.from_dict({"image": pngs}, features=datasets.Features({"image": datasets.Value("binary")}))

    loaded, run = _tiny_loaded(), tmp_path / "run.h5"
    _interrupted(loaded, run, batches=3, data=binary(_pngs(0)))
    stored = _stored(run)
    assert stored[fmt.FILE_HASHES] == [_blake(b) for b in _pngs(0)][:len(stored["ids"])]
    other = _pngs(0)
    other[1] = _pngs(5)[1]
    with pytest.raises(QKHooksError, match=r"1 of the \d+ images it keeps hold other bytes .*first: '1'"):
        qkhooks.record_dataset(loaded, binary(other), run, resume=True, **_KW)
    assert qkhooks.record_dataset(loaded, binary(_pngs(0)), run, resume=True, **_KW).images == 8
