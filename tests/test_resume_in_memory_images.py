"""Round 46, helper LIST: a list or tuple of in-memory images is checked on resume.

A run recorded from a list of numpy arrays, PIL images, encoded bytes (or dicts whose ``"image"`` is one of those)
stored -1 for each image's stamp: a resume over another list of the same length (or the same images reordered) went
on into one run of two data sets without a word. Each such image's BLAKE2b of its content is now stored (size and
time -1: no file), as round 46 did for a Hugging Face dataset's bytes, and a resume hashes the kept items again."""

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
from test_resume_hf_image_bytes import _kept, _resume_files_and_held, _stored


def _arrays(seed: int, n: int = 8) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, (16, 16, 3), dtype=np.uint8) for _ in range(n)]


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


def _value(digest) -> int:
    value = int.from_bytes(digest.digest(), "little", signed=True)
    return -2 if value == -1 else value


def _reference(image) -> int:
    """The reference, from hashlib: encoded bytes as given; an array's dtype and shape, then its bytes (C order); a
    PIL image's mode, size, palette, transparency and EXIF orientation, then its pixel bytes."""
    if isinstance(image, bytes):
        return _value(hashlib.blake2b(image, digest_size=8))
    if isinstance(image, np.ndarray):
        head = f"array {image.dtype.str} {image.shape}".encode()
        return _value(hashlib.blake2b(head + image.tobytes(order="C"), digest_size=8))
    head = f"PIL {image.mode} {image.size} {image.getpalette()} {image.info.get('transparency')!r} 1".encode()
    return _value(hashlib.blake2b(head + image.tobytes(), digest_size=8))


def _mixed(arrays: list[np.ndarray]) -> list:
    """Each kind in turn: an array, a PIL image, PNG bytes, a dict holding an array (a column-major one)."""
    kinds = [lambda a: a, Image.fromarray, _png, lambda a: {"image": np.asfortranarray(a)}]
    return [kinds[i % 4](a) for i, a in enumerate(arrays)]


def test_in_memory_images_in_a_list_store_each_ones_blake2b_and_no_file(tmp_path):
    """Before: -1 in all three columns, nothing a resume could compare."""
    items = _mixed(_arrays(0))
    qkhooks.record_dataset(_tiny_loaded(), items, tmp_path / "run.h5", **_KW)
    stored = _stored(tmp_path / "run.h5")
    images = [item["image"] if isinstance(item, dict) else item for item in items]
    assert stored[fmt.FILE_HASHES] == [_reference(image) for image in images]
    assert len(set(stored[fmt.FILE_HASHES])) == 8
    assert stored[fmt.FILE_SIZES] == [-1] * 8 and stored[fmt.FILE_MTIMES] == [-1] * 8  # not files


@pytest.mark.parametrize("container", [list, tuple])
def test_a_resume_over_another_list_of_the_same_length_is_refused_and_the_same_list_resumes(tmp_path, container):
    """Before: named by position, the other images resumed into the run without a word."""
    loaded, run = _tiny_loaded(), tmp_path / "run.h5"
    _interrupted(loaded, run, batches=3, data=container(_mixed(_arrays(0))))
    kept = _kept(run)
    # a PIL image, PNG bytes, a dict's array (a tuple: one of them, for speed): one kept image replaced, the same count
    for replaced in (1, 2, 3) if container is list else (2,):
        other = _arrays(0)
        other[replaced] = _arrays(5)[replaced]
        refused = rf"(?s)cannot resume .*run\.h5: 1 of the \d+ images it keeps hold other bytes .*first: '{replaced}'"
        with pytest.raises(QKHooksError, match=refused + r".*BLAKE2b.*two datasets.*--overwrite"):
            qkhooks.record_dataset(loaded, container(_mixed(other)), run, resume=True, **_KW)
        assert _kept(run) == kept  # the refused resume left the file as it was
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # checked: no word of unchecked images
        assert qkhooks.record_dataset(loaded, container(_mixed(_arrays(0))), run, resume=True, **_KW).images == 8
    reference = tmp_path / "whole.h5"
    qkhooks.record_dataset(loaded, container(_mixed(_arrays(0))), reference, **_KW)
    assert _stored(run) == _stored(reference)


def test_a_resume_over_the_same_arrays_reordered_is_refused(tmp_path):
    """Named by position, two kept images swapped read as the same ids: their content tells them apart."""
    loaded, run = _tiny_loaded(), tmp_path / "run.h5"
    _interrupted(loaded, run, batches=3, data=_arrays(0))
    arrays = _arrays(0)
    arrays[0], arrays[2] = arrays[2], arrays[0]
    with pytest.raises(QKHooksError, match=r"2 of the \d+ images it keeps hold other bytes .*first: '0'"):
        qkhooks.record_dataset(loaded, arrays, run, resume=True, **_KW)


def test_an_array_of_the_same_bytes_in_another_shape_is_another_image(tmp_path):
    """The dtype and shape are hashed with the bytes: the same bytes as (8, 32, 3) are not the (16, 16, 3) image."""
    loaded, run = _tiny_loaded(), tmp_path / "run.h5"
    _interrupted(loaded, run, batches=3, data=_arrays(0))
    other = _arrays(0)
    other[1] = other[1].reshape(8, 32, 3)
    with pytest.raises(QKHooksError, match=r"1 of the \d+ images it keeps hold other bytes .*first: '1'"):
        qkhooks.record_dataset(loaded, other, run, resume=True, **_KW)


def test_a_list_run_recorded_without_the_hashes_resumes_saying_its_kept_images_are_not_checked(tmp_path):
    """A run recorded before (-1 hashes) cannot be checked: it resumes, and says so."""
    loaded, run = _tiny_loaded(), tmp_path / "run.h5"
    _interrupted(loaded, run, batches=3, data=_arrays(0))
    with h5py.File(run, "r+") as f:  # as an older qkhooks wrote it
        f[fmt.FILE_HASHES][...] = -1
    with pytest.warns(UserWarning, match=r"(?s)does not check \d+ of the \d+ images it keeps \(first: '0'\).*held in "
                                         r".*no hash of their bytes.*new --out"):
        assert qkhooks.record_dataset(loaded, _arrays(0), run, resume=True, **_KW).images == 8


def test_files_and_arrays_in_one_list_each_checked_their_own_way(tmp_path):
    """Even items file paths, odd items arrays: the files copied again (new times, the same bytes) resume, their
    hashes read from the files; one kept array replaced is refused by its hash."""
    loaded, run, folder = _tiny_loaded(), tmp_path / "run.h5", tmp_path / "imgs"
    folder.mkdir()
    arrays = _arrays(0)
    for i in range(0, 8, 2):
        (folder / f"a{i}.png").write_bytes(_png(arrays[i]))

    def mixed(data):
        return [str(folder / f"a{i}.png") if i % 2 == 0 else data[i] for i in range(8)]

    _resume_files_and_held(loaded, run, folder, mixed, arrays, _arrays(5)[3],
                           [_reference(_png(a) if i % 2 == 0 else a) for i, a in enumerate(arrays)])
