"""Round 41: the stamp of a file its record's loader reads otherwise than through ``read_oriented``, the path-naming of
PIL's "cannot identify" in both stamped reads, and ``ImageDataset.file_of`` / ``files``."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from qkhooks.data import ImageConfig, open_dataset
from qkhooks.data.items import NO_STAMP, ImageDataset, ItemRecord, RawItem, bytes_hash, read_oriented, stamps_read
from qkhooks.data_files import file_sizes
from qkhooks.stream import _Stamped

CFG = ImageConfig(size=(32, 32), mean=(0.5,) * 3, std=(0.5,) * 3)


def _photo(path, seed: int = 0) -> str:
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(path)
    return str(path)


def _read_by_pil(path: str, then=None) -> RawItem:
    """A loader that opens the file itself (not through read_oriented), as a user's own record could."""
    with Image.open(path) as im:
        item = RawItem(image=im.convert("RGB"))
    if then is not None:
        then(path)
    return item


def _dataset(records) -> ImageDataset:
    return ImageDataset("own", records, CFG, has_masks=False)


def test_a_file_read_otherwise_is_stamped_from_one_more_read_of_it(tmp_path):
    path = _photo(tmp_path / "a.png")
    item = _Stamped(_dataset([ItemRecord(id="a", load=lambda: _read_by_pil(path), path=path)]))[0]
    data = open(path, "rb").read()
    assert item["file_stamp"] == (len(data), os.stat(path).st_mtime_ns, bytes_hash(data))


def test_a_file_gone_after_it_was_read_otherwise_gets_no_stamp(tmp_path):
    path = _photo(tmp_path / "a.png")
    item = _Stamped(_dataset([ItemRecord(id="a", load=lambda: _read_by_pil(path, then=os.remove), path=path)]))[0]
    assert item["file_stamp"] == NO_STAMP


def test_an_item_not_read_from_a_file_has_no_stamp_and_no_file():
    image = np.zeros((40, 48, 3), np.uint8)
    ds = _dataset([ItemRecord(id="made", load=lambda: RawItem(image=Image.fromarray(image)))])
    assert _Stamped(ds)[0]["file_stamp"] == NO_STAMP
    assert ds.file_of(0) is None and ds.files() == {}


@pytest.mark.parametrize("stamped", [True, False])
def test_a_non_image_is_named_by_its_path_read_stamped_or_not(tmp_path, stamped):
    bad = tmp_path / "notes.jpg"
    bad.write_bytes(b"not an image at all" * 100)
    with pytest.raises(Image.UnidentifiedImageError, match="cannot identify image file") as caught:
        if stamped:
            with stamps_read():
                read_oriented(str(bad))
        else:
            read_oriented(str(bad))
    assert str(caught.value) == f"cannot identify image file {str(bad)!r}"  # as PIL says it of a path


def test_a_folders_files_are_its_items_paths_and_their_sizes_are_read_from_them(tmp_path):
    for n in range(3):
        _photo(tmp_path / f"p{n}.png", seed=n)
    ds = open_dataset(str(tmp_path), CFG)
    files = ds.files()
    assert sorted(files) == sorted(ds.ids) and len(files) == 3
    assert [ds.file_of(i) for i in range(len(ds))] == [files[i] for i in ds.ids]
    assert file_sizes(ds) == {i: os.path.getsize(p) for i, p in files.items()}
