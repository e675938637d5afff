"""Round 21 (data): only a file's own faults make it unreadable (the machine's propagate), a streamed photo with
masks opened once, a PNG text chunk keyed 'xmp' after the image data refused at open."""

from __future__ import annotations

import errno
import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps
from test_data_spec_grammar import CFG, _chunk, _counting_opens, _decoded_orientation, _noise_jpeg, _o3_masks, _png

from qkhooks.data import open_dataset
from qkhooks.data.items import read_mask_file, read_photo, shown_frame
from qkhooks.data.readers import _item_to_raw, Unreadable
from qkhooks.errors import DataRefusal, QKHooksError

# ------------------------------------------------------------------------------ the file's faults, the machine's


def _png_bytes(size: tuple[int, int] = (20, 30)) -> bytes:
    pixels = np.random.default_rng(3).integers(0, 255, (*size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _jpeg_bytes(size: tuple[int, int] = (20, 30)) -> bytes:
    pixels = np.random.default_rng(4).integers(0, 255, (*size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def _bad_idat(data: bytes) -> bytes:
    """The PNG with its compressed image data overwritten (its chunk structure intact)."""
    at = data.index(b"IDAT") + 4
    return data[:at + 2] + b"\xff" * 40 + data[at + 42:]


_CORRUPT = {  # name: the bytes of a file PIL cannot decode
    "zero bytes": lambda: b"",
    "garbage": lambda: bytes(np.random.default_rng(5).integers(0, 255, 600, dtype=np.uint8)),
    "JPEG header only": lambda: _jpeg_bytes()[:20],
    "JPEG cut in its image data": lambda: _jpeg_bytes()[: len(_jpeg_bytes()) // 2],
    "PNG cut in its image data": lambda: _png_bytes()[: len(_png_bytes()) // 2],
    "PNG with a corrupt data stream": lambda: _bad_idat(_png_bytes()),
    "decompression bomb": lambda: _png_bytes((120, 100)),  # over twice the MAX_IMAGE_PIXELS set below
}


def _pil_failure(path: Path) -> BaseException:
    """Independent reference: what PIL raises on the file, checked whole first (its verify(): a PNG's chunks and
    their CRCs, to IEND), then decoded."""
    for check in (lambda im: im.verify(), lambda im: im.load()):
        try:
            with Image.open(path) as im:
                check(im)
        except Exception as exc:
            return exc
    raise AssertionError(f"PIL decodes {path}")


@pytest.mark.parametrize("case", list(_CORRUPT))
def test_a_file_pil_cannot_decode_is_still_refused_or_skipped_naming_it(tmp_path, monkeypatch, case):
    """PIL's errors on bad data (UnidentifiedImageError and other OSErrors without an errno, SyntaxError,
    DecompressionBombError, ...) stay the file's: refused naming it and the fix, or skipped from a stream."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)
    path = tmp_path / "photo.img"
    path.write_bytes(_CORRUPT[case]())
    failure = _pil_failure(path)
    assert getattr(failure, "errno", None) is None  # the case is PIL's own, not the OS's
    if isinstance(failure, Image.DecompressionBombError):  # PIL's size guard: the fix is its limit, if genuine
        with pytest.raises(DataRefusal, match=rf"^photo {path} cannot be read: Image size \(12000 pixels\) exceeds "
                                              r"limit .* raise PIL's limit .*MAX_IMAGE_PIXELS.*; otherwise remove it\.$"):
            read_photo(path, "photo")
    else:
        with pytest.raises(DataRefusal, match=rf"^photo {path} cannot be read \({type(failure).__name__}: .*\); "
                                              r"replace or remove it\.$"):
            read_photo(path, "photo")
    with pytest.raises(Unreadable, match=rf"^{type(failure).__name__}: "):
        _item_to_raw({"image": str(path), "objects": np.zeros((20, 30), np.uint8)}, "item 0")


def test_a_path_that_names_no_readable_file_is_the_files_fault(tmp_path, monkeypatch):
    """A file gone or a folder in its place, and a disk that cannot read its blocks (EIO), are refused naming it."""
    (tmp_path / "folder.jpg").mkdir()
    for path in (tmp_path / "gone.jpg", tmp_path / "folder.jpg"):
        with pytest.raises(DataRefusal, match=rf"^photo {path} cannot be read \((FileNotFoundError|"
                                              r"IsADirectoryError): .*\); replace or remove it\.$"):
            read_photo(path, "photo")
    path = tmp_path / "a.jpg"
    path.write_bytes(_jpeg_bytes())
    monkeypatch.setattr(ImageFile.ImageFile, "load", _raising(OSError(errno.EIO, "Input/output error")))
    with pytest.raises(DataRefusal, match=r"cannot be read \(OSError: \[Errno 5\] Input/output error\); replace"):
        read_photo(path, "photo")
    # Pillow 9.3's MspImagePlugin builds its error with two arguments: its errno is that text, not the OS's
    monkeypatch.setattr(ImageFile.ImageFile, "load", _raising(OSError("Truncated MSP file, expected %d bytes on row "
                                                                      "%s", (4, 0))))
    with pytest.raises(DataRefusal, match=r"cannot be read \(OSError: .*Truncated MSP file.*\); replace or remove"):
        read_photo(path, "photo")


def _raising(error: BaseException):
    def raise_it(*args, **kwargs):
        raise error
    return raise_it


_MACHINE = {  # name: a failure that is the machine's or the file system's, not the file's
    "MemoryError": lambda: MemoryError(),
    "EMFILE": lambda: OSError(errno.EMFILE, "Too many open files"),
    "ENFILE": lambda: OSError(errno.ENFILE, "Too many open files in system"),
    "ENOMEM": lambda: OSError(errno.ENOMEM, "Cannot allocate memory"),
    "EINTR": lambda: InterruptedError(errno.EINTR, "Interrupted system call"),
    "ESTALE": lambda: OSError(errno.ESTALE, "Stale file handle"),
    "ETIMEDOUT": lambda: TimeoutError(errno.ETIMEDOUT, "Connection timed out"),
}


def _folder(tmp_path: Path) -> Path:
    path = tmp_path / "folder" / "a.jpg"
    path.parent.mkdir()
    path.write_bytes(_jpeg_bytes())
    return path


_READS = {  # name: read the file at path (a folder dataset of it opened before)
    "annotated photo load": lambda path, _: read_photo(path, "photo"),
    "annotated photo open": lambda path, _: shown_frame(path, "photo"),
    "annotated mask load": lambda path, _: read_mask_file(path, "photo", "objects"),
    "folder open": lambda path, _: open_dataset(str(path.parent), CFG),
    "folder item load": lambda _, dataset: dataset[0],
    "streamed item": lambda path, _: _item_to_raw({"image": path, "objects": np.zeros((20, 30), np.uint8)}, "item 0"),
}


@pytest.mark.parametrize("error", list(_MACHINE))
@pytest.mark.parametrize("read", list(_READS))
def test_the_machines_failure_while_reading_a_file_propagates_unchanged(tmp_path, monkeypatch, read, error):
    """Out of memory, too many open files, an interrupted call, a stale or timed-out network file system: replacing
    the file would not help, so no refusal says so and no file is skipped for it; the error itself goes up."""
    path = _folder(tmp_path)
    dataset = open_dataset(str(path.parent), CFG)
    raised = _MACHINE[error]()
    monkeypatch.setattr(Image, "open", _raising(raised))
    with pytest.raises(type(raised)) as caught:
        _READS[read](path, dataset)
    assert caught.value is raised
    assert dataset.skipped == []


@pytest.mark.parametrize("read", ["annotated photo load", "folder item load", "streamed item"])
def test_running_out_of_memory_while_decoding_propagates_unchanged(tmp_path, monkeypatch, read):
    path = _folder(tmp_path)
    dataset = open_dataset(str(path.parent), CFG)
    raised = MemoryError()
    monkeypatch.setattr(ImageFile.ImageFile, "load", _raising(raised))
    with pytest.raises(MemoryError) as caught:
        _READS[read](path, dataset)
    assert caught.value is raised and dataset.skipped == []


_PERMISSION = r"cannot be read: permission denied \(.*\); give the user running qkhooks read permission on it"


def test_a_file_without_read_permission_is_refused_naming_permissions(tmp_path, monkeypatch):
    path = _folder(tmp_path)
    monkeypatch.setattr(Image, "open", _raising(PermissionError(errno.EACCES, "Permission denied", str(path))))
    with pytest.raises(DataRefusal, match=rf"^photo {path} {_PERMISSION}"):
        read_photo(path, "photo")
    with pytest.raises(QKHooksError, match=rf"^photo {path} {_PERMISSION}"):
        shown_frame(path, "photo")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads files without permission")
def test_a_file_chmod_000_is_refused_naming_permissions(tmp_path):
    path = _folder(tmp_path)
    path.chmod(0)
    try:
        with pytest.raises(DataRefusal, match=rf"^photo {path} {_PERMISSION}"):
            read_photo(path, "photo")
    finally:
        path.chmod(0o644)


# ------------------------------------------------------------------------------ a streamed photo opened once

_AS_GIVEN = {  # how a user's item gives the photo at path
    "str path": lambda p: str(p),
    "Path": lambda p: p,
    "bytes": lambda p: p.read_bytes(),
    "Hugging Face cell, bytes": lambda p: {"bytes": p.read_bytes(), "path": None},
    "Hugging Face cell, path": lambda p: {"bytes": None, "path": str(p)},
}


@pytest.mark.parametrize("given", list(_AS_GIVEN))
def test_a_streamed_photo_with_a_mask_is_opened_once_and_its_mask_turned_as_exif_transpose_turns_it(
        tmp_path, monkeypatch, given):
    """The decode and the orientation its masks are turned by come from one opening of the file (it was opened
    again for the orientation), and the mask drawn on the stored pixels is turned as PIL turns the photo."""
    photo = tmp_path / "a.jpg"
    _noise_jpeg(photo, (20, 30), 6)  # shown 30x20: turned 90 degrees clockwise
    labels = np.zeros((20, 30), np.uint8)  # drawn on the stored pixels
    labels[:4, :7], labels[12:, 25:] = 3, 8
    item = {"image": _AS_GIVEN[given](photo), "objects": labels}
    opens = _counting_opens(monkeypatch)
    _, raw = _item_to_raw(item, "item 0")
    assert sum(opens.values()) == 1
    monkeypatch.undo()
    with Image.open(photo) as im:  # independent reference: the mask as PIL turns an image with the photo's tag
        assert np.asarray(im).shape[:2] == (20, 30)
        buffer = io.BytesIO()
        Image.fromarray(labels).save(buffer, format="PNG", exif=im.getexif())
    with Image.open(buffer) as tagged:
        np.testing.assert_array_equal(raw.objects, np.asarray(ImageOps.exif_transpose(tagged)))
    with Image.open(photo) as im:
        np.testing.assert_array_equal(np.asarray(raw.image), np.asarray(ImageOps.exif_transpose(im).convert("RGB")))


# ------------------------------------------------------------------------------ PNG text chunk keyed 'xmp'


def _xmp_png(path: Path, kind: bytes) -> Path:
    """A PNG with a text chunk keyed 'xmp' after its image data (as round 20's commit 56920d2 names it)."""
    text = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:Description tiff:Orientation="6"/></x:xmpmeta>'
    data = b"xmp\0" + text if kind == b"tEXt" else b"xmp\0\0\0\0\0" + text
    return _png(path, (20, 30), None, extra=_chunk(kind, data))


@pytest.mark.parametrize("kind", [b"tEXt", b"iTXt"])
def test_a_png_with_a_text_chunk_keyed_xmp_after_its_image_data_is_read_as_pil_reads_it_at_open(tmp_path, kind):
    """The walk leaves such a chunk to PIL's decode: where PIL fails on it (Pillow >= 11.2 reads info['xmp'] and
    fails on the text), the photo is refused when the dataset opens, naming it, not halfway through a run; where PIL
    reads it, its orientation is PIL's."""
    root = tmp_path / "o3"
    photo = _xmp_png(root / "images" / "a.png", kind)
    _o3_masks(root)
    try:
        expected: tuple | BaseException = _decoded_orientation(photo)
    except Exception as exc:
        expected = exc
    if isinstance(expected, BaseException):
        with pytest.raises(QKHooksError, match=rf"^O3 image {photo} cannot be read \({type(expected).__name__}: "):
            open_dataset(f"o3dir:{root}", CFG)
    else:
        assert shown_frame(photo, "photo") == expected


# ------------------------------------------------------------------------------ files PIL reads that have no RGB colours


def _float_tiff(path: Path, top: float) -> Path:
    """A float ('F') image, as a TIFF holds one, under the name given (a folder reads files by their contents)."""
    grey = np.random.default_rng(6).integers(0, 255, (16, 20)).astype(np.float32) / 255 * top
    Image.fromarray(grey).save(path, format="TIFF")
    return path


def _int32_tiff(path: Path) -> Path:
    """A 32-bit integer ('I') image, which has no defined display range, under the name given."""
    Image.fromarray(np.arange(16 * 20, dtype=np.int32).reshape(16, 20) * 1000).save(path, format="TIFF")
    return path


def test_a_folder_image_without_display_colours_is_skipped_naming_it_and_the_others_are_recorded(tmp_path):
    """Before: a float image outside 0..1 or a 32-bit integer image in a folder (a TIFF named .png) stopped the run
    halfway with to_rgb's refusal, which named no file, and left a run file of the images before it without saying
    so. Now it is skipped and listed, as a folder's other unusable files are, with the file and the fix named."""
    import qkhooks
    from test_review_symlinks_repair_messages import _KW
    from test_spectrum_edits_and_dataparallel import _same_size_photos, _tiny_loaded

    folder = tmp_path / "photos"
    _same_size_photos(folder, ["a.png", "b.png", "c.png", "e.png"], seed=0)
    _float_tiff(folder / "d.png", top=3.0)
    _int32_tiff(folder / "f.png")
    with Image.open(folder / "d.png") as im, Image.open(folder / "f.png") as im32:  # the reference: what PIL reads
        assert im.mode == "F" and np.asarray(im).max() > 1 and im32.mode == "I"
    with pytest.warns(UserWarning, match=r"skipping .*d\.png") as said:
        result = qkhooks.record_dataset(_tiny_loaded(), str(folder), tmp_path / "run.h5", **_KW)
    for name, why in (("d.png", "float image with values in"), ("f.png", "image mode 'I' has no")):
        # the warning names the file once (it printed "... d.png (.../d.png: float image ...)")
        warned = [str(w.message) for w in said if str(folder / name) in str(w.message)]
        assert len(warned) == 1 and warned[0].count(str(folder / name)) == 1
        assert warned[0].startswith(f"skipping image without defined display colours {folder / name} ({why}")
    with qkhooks.open_run(tmp_path / "run.h5") as run:
        assert list(run.ids) == ["a.png", "b.png", "c.png", "e.png"]
    reasons = dict(result.skipped)
    assert sorted(reasons) == ["d.png", "f.png"]
    assert str(folder / "d.png") in reasons["d.png"] and "0..1" in reasons["d.png"]
    assert str(folder / "f.png") in reasons["f.png"] and "mode 'I'" in reasons["f.png"]


def test_an_image_without_display_colours_in_a_list_is_refused_naming_it_and_where_the_run_file_stands(tmp_path):
    """Before: the refusal named neither the file nor the item, and said nothing of the run file it left holding the
    batches before it. Now it names the file (a path) or the item (an image in memory) and how to go on."""
    import qkhooks
    from test_review_symlinks_repair_messages import _KW
    from test_spectrum_edits_and_dataparallel import _same_size_photos, _tiny_loaded

    folder = tmp_path / "photos"
    _same_size_photos(folder, ["a.png", "b.png", "c.png"], seed=0)
    bad = _float_tiff(tmp_path / "d.tif", top=3.0)
    paths = [str(folder / n) for n in ("a.png", "b.png", "c.png")] + [str(bad)]
    loaded = _tiny_loaded()
    with pytest.raises(QKHooksError, match=rf"{bad}: float image with values in .*0\.\.1.*The 2 images before it stay "
                                           r"committed in .*run\.h5.*--resume"):
        qkhooks.record_dataset(loaded, paths, tmp_path / "run.h5", **_KW)
    with Image.open(bad) as im:
        in_memory = [Image.open(p).convert("RGB") for p in paths[:3]] + [im.copy()]
    with pytest.raises(QKHooksError, match=r"item 3: float image with values in .*0\.\.1.*The 2 images before it stay "
                                           r"committed in .*mem\.h5.*--resume"):
        qkhooks.record_dataset(loaded, in_memory, tmp_path / "mem.h5", **_KW)


def test_an_item_refused_after_the_first_batch_says_where_the_run_file_stands_in_every_source(tmp_path):
    """Before: a refusal of one item's data met after the first batch (a float array in a list, an ADE20K annotation
    that is an RGB image) came alone, and the run file holding the batches before it was left without a word. Now
    the refusal says how many images stay committed and how to go on, as a missing mask's does."""
    import qkhooks
    from test_review_symlinks_repair_messages import _KW
    from test_spectrum_edits_and_dataparallel import _tiny_loaded

    loaded = _tiny_loaded()
    rng = np.random.default_rng(7)
    arrays = [rng.integers(0, 255, (16, 20, 3), dtype=np.uint8) for _ in range(3)] + [rng.random((16, 20, 3))]
    with pytest.raises(QKHooksError, match=r"item 3: an image array must be uint8 .*float64.*The 2 images before it "
                                           r"stay committed in .*arrays\.h5.*--resume"):
        qkhooks.record_dataset(loaded, arrays, tmp_path / "arrays.h5", **_KW)
    root = tmp_path / "ade"
    for i in range(4):
        (root / "images" / "training").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / "training").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (16, 20, 3), dtype=np.uint8)).save(root / f"images/training/a{i}.png")
        classes = rng.integers(0, 4, (16, 20, 3) if i == 3 else (16, 20), dtype=np.uint8)  # the last one RGB
        Image.fromarray(classes).save(root / f"annotations/training/a{i}.png")
    with pytest.raises(QKHooksError, match=r"a3\.png is not a single-channel class map\. The 2 images before it stay "
                                           r"committed in .*ade\.h5.*--resume"):
        qkhooks.record_dataset(loaded, f"ade20k:{root}", tmp_path / "ade.h5", **_KW)


def test_a_png_without_its_iend_chunk_is_unreadable_in_every_route(tmp_path):
    """Before: a folder skipped a PNG cut just before its IEND chunk (PIL's verify() fails: a truncated file, perhaps
    still being copied in), while a folder opened with check="decode", a list of paths, hfds: bytes and an annotated
    dataset's photo or mask recorded it (PIL's decode stops at the image data's end). Now every route tests the same
    bytes the same way: skipped and listed from a folder and a stream, refused naming the file elsewhere."""
    whole = _png_bytes()
    cut = whole[:-12]  # the IEND chunk: length, type, CRC
    assert whole[-12:] == b"\0\0\0\0IEND\xaeB`\x82"
    with Image.open(io.BytesIO(cut)) as im:  # the reference: PIL decodes it, and its verify() says it is cut
        im.load()
    with pytest.raises(OSError, match="truncated PNG file"), Image.open(io.BytesIO(cut)) as im:
        im.verify()
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.png").write_bytes(whole)
    (folder / "b.png").write_bytes(cut)
    for check in ("header", "decode"):
        with pytest.warns(UserWarning, match=r"skipping unreadable image .*b\.png \(OSError: truncated PNG file\)"):
            dataset = open_dataset(str(folder), CFG, check=check)
        assert dataset.ids == ["a.png"] and dataset.skipped == [("b.png", "OSError: truncated PNG file")]
    path = folder / "b.png"
    for value in (str(path), cut, {"bytes": cut, "path": None}):  # a list's path, encoded bytes, a hfds: cell
        with pytest.raises(Unreadable, match=r"^OSError: truncated PNG file$"):
            _item_to_raw({"image": value}, "item 0")
    _item_to_raw({"image": {"bytes": whole, "path": None}}, "item 0")  # the whole file is read as before
    with pytest.raises(DataRefusal, match=rf"^photo {path} cannot be read \(OSError: truncated PNG file\); replace"):
        read_photo(path, "photo")
    with pytest.raises(DataRefusal, match=rf"^a\.png: the 'objects' mask {path} cannot be read \(OSError: truncated "
                                          r"PNG file\); replace"):
        read_mask_file(path, "a.png", "objects")
