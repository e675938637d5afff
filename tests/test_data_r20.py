"""Round 20 (data): the data-spec grammar in one place, each annotated photo opened once, PNG orientations read
without decoding the image."""

from __future__ import annotations

import io
import os
import re
import struct
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps, PngImagePlugin

from qkhooks.data import ImageConfig, open_dataset
from qkhooks.data.datasets import (
    DATASET_SPECS,
    FOLDER_PREFIXES,
    GENERATED_PREFIXES,
    NAMED_SPECS,
    STREAMED_PREFIXES,
)
from qkhooks.data.items import _shown_frame
from qkhooks.data.sources import _SPECS as STREAMED_SPECS
from qkhooks.data_files import absolute_spec
from qkhooks.errors import QKHooksError

CFG = ImageConfig(size=(32, 32), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def test_the_grammar_is_what_the_docs_name_and_what_the_parsers_accept():
    """The named specs and prefixes the users are told of (DATASET_SPECS, open_source's streamed specs) are the
    grammar's, and each is parsed as such: a named spec or a prefix with nothing after it is not an unknown spec."""
    assert set(re.findall(r"'([a-z0-9]+)'", DATASET_SPECS)) == set(NAMED_SPECS)
    assert set(re.findall(r"'([a-z0-9]+:)", DATASET_SPECS)) == set(FOLDER_PREFIXES + GENERATED_PREFIXES)
    assert set(re.findall(r"\b([a-z0-9]+:)[A-Z]", STREAMED_SPECS)) == set(STREAMED_PREFIXES)
    for prefix in FOLDER_PREFIXES + GENERATED_PREFIXES:
        with pytest.raises(QKHooksError, match="is incomplete"):
            open_dataset(prefix, CFG)
    for prefix in STREAMED_PREFIXES:
        with pytest.raises(QKHooksError, match="is streamed"):
            open_dataset(prefix + "x", CFG)
    with pytest.raises(QKHooksError, match="unknown dataset spec"):
        open_dataset("nosuchprefix:x", CFG)


def test_every_spec_form_the_parsers_accept_is_known_to_absolute_spec(tmp_path, monkeypatch):
    """A spec that names a folder here is recorded with that folder absolute, whatever its prefix; a named or generated
    spec is kept as typed even where a folder of that very name exists (the named spec wins, as when opened)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "imgs").mkdir()
    here = os.path.join(os.getcwd(), "imgs")
    for prefix in FOLDER_PREFIXES + STREAMED_PREFIXES:
        assert absolute_spec(prefix + "imgs") == prefix + here, prefix
    for spec in [*NAMED_SPECS, *(prefix + "4" for prefix in GENERATED_PREFIXES)]:
        (tmp_path / spec).mkdir()
        assert absolute_spec(spec) == spec
        assert absolute_spec(f"imgs+{spec}") == f"{here}+{spec}"  # a join of it with a folder


# ------------------------------------------------------------------------------ an annotated photo opened once


def _noise_jpeg(path: Path, size: tuple[int, int], orientation: int) -> None:
    """A noise photo of stored ``size`` (H, W) with an EXIF orientation tag."""
    path.parent.mkdir(parents=True, exist_ok=True)
    exif = Image.Exif()
    exif[0x0112] = orientation
    pixels = np.random.default_rng(1).integers(0, 255, (*size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, exif=exif)


def _counting_opens(monkeypatch) -> Counter:
    """PIL.Image.open patched to count the opens of each path."""
    opens: Counter = Counter()
    real = Image.open

    def counting(fp, *args, **kwargs):
        opens[os.fspath(fp) if isinstance(fp, (str, os.PathLike)) else "<file>"] += 1
        return real(fp, *args, **kwargs)

    monkeypatch.setattr(Image, "open", counting)
    return opens


def _as_shown(path: Path) -> np.ndarray:
    """Independent reference: the photo as a viewer shows it."""
    with Image.open(path) as im:
        return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))


def test_an_ade20k_item_opens_its_rotated_photo_once_with_the_pixels_and_mask_turn_of_before(tmp_path, monkeypatch):
    root = tmp_path / "ade"
    photo, annotation = root / "images" / "training" / "a.jpg", root / "annotations" / "training" / "a.png"
    _noise_jpeg(photo, (20, 30), 6)  # shown 30x20: turned 90 degrees clockwise
    classes = np.zeros((20, 30), np.uint8)  # drawn on the stored pixels: turned like the photo
    classes[:, :10], classes[:5, 20:] = 9, 5
    annotation.parent.mkdir(parents=True)
    Image.fromarray(classes).save(annotation)
    record = open_dataset(f"ade20k:{root}", CFG)._records[0]
    opens = _counting_opens(monkeypatch)
    raw = record.load()
    assert opens[str(photo)] == 1 and opens[str(annotation)] == 1
    np.testing.assert_array_equal(np.asarray(raw.image), _as_shown(photo))
    turned = np.asarray(Image.fromarray(classes).transpose(Image.Transpose.ROTATE_270))
    np.testing.assert_array_equal(raw.objects, np.unique(turned, return_inverse=True)[1].reshape(turned.shape))
    Image.fromarray(classes[:, :24]).save(annotation)  # changed after the open: fits neither frame, refused as before
    with pytest.raises(QKHooksError, match=r"a\.jpg: the 'objects' mask .*a\.png has size 20x24, but the photo is "
                                           r"30x20 as shown"):
        record.load()


def _o3_masks(root: Path) -> tuple[np.ndarray, np.ndarray]:
    """O3 target and distractor masks of item ``a``, 20x30 (the stored frame of its photo)."""
    target, distractor = np.zeros((20, 30), np.uint8), np.zeros((20, 30), np.uint8)
    target[2:6, 3:9], distractor[10:15, 12:25] = 255, 255
    for sub, mask in (("targ_images", target), ("dist_images", distractor)):
        (root / sub).mkdir()
        Image.fromarray(mask).save(root / sub / "a.png")
    return target, distractor


def test_an_o3dir_item_opens_its_rotated_photo_once_with_the_pixels_and_mask_turn_of_before(tmp_path, monkeypatch):
    root = tmp_path / "o3"
    photo = root / "images" / "a.jpg"
    _noise_jpeg(photo, (20, 30), 8)  # shown 30x20: turned 90 degrees anticlockwise
    target, distractor = _o3_masks(root)
    record = open_dataset(f"o3dir:{root}", CFG)._records[0]
    opens = _counting_opens(monkeypatch)
    raw = record.load()
    assert opens[str(photo)] == 1
    np.testing.assert_array_equal(np.asarray(raw.image), _as_shown(photo))
    for mask, got in ((target, raw.target), (distractor, raw.distractor)):
        turned = np.asarray(Image.fromarray(mask).transpose(Image.Transpose.ROTATE_90)) >= 128
        np.testing.assert_array_equal(got, turned.astype(np.float32))


# ------------------------------------------------------------------------------ PNG orientation without decoding


def _chunks(data: bytes) -> list[bytes]:
    """A PNG's chunks, each whole (length, type, data, CRC), after the signature."""
    out, at = [], 8
    while at < len(data):
        length = struct.unpack(">I", data[at:at + 4])[0]
        out.append(data[at:at + 12 + length])
        at += 12 + length
    return out


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(path: Path, size: tuple[int, int], orientation: int | None, where: str = "after", extra: bytes = b"") -> Path:
    """A noise PNG; its EXIF orientation in an eXIf chunk (PIL's ``exif=``) left before the image data or moved
    after it; ``extra`` chunks inserted after the image data."""
    pixels = np.random.default_rng(2).integers(0, 255, (*size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    Image.fromarray(pixels).save(buffer, format="PNG", exif=exif if orientation is not None else None)
    chunks = _chunks(buffer.getvalue())
    if where == "after":
        moved = [c for c in chunks if c[4:8] == b"eXIf"]
        chunks = [c for c in chunks if c[4:8] != b"eXIf"]
        chunks[-1:-1] = moved  # before IEND
    chunks[-1:-1] = [extra] if extra else []
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"".join(chunks))
    return path


def _decoded_orientation(path: Path) -> tuple[int, tuple[int, int]]:
    """Independent reference: PIL's own getexif (which decodes a PNG to read chunks after the image data), and the
    (h, w) of the photo as shown."""
    with Image.open(path) as im:
        orientation = im.getexif().get(0x0112, 1)
        shown = ImageOps.exif_transpose(im)
        return orientation, (shown.height, shown.width)


def test_a_png_orientation_after_the_image_data_is_found_without_decoding(tmp_path, monkeypatch):
    files = [_png(tmp_path / "after6.png", (20, 30), 6), _png(tmp_path / "after3.png", (20, 30), 3),
             _png(tmp_path / "header8.png", (20, 30), 8, where="header"), _png(tmp_path / "none.png", (20, 30), None),
             _png(tmp_path / "text.png", (20, 30), 6, extra=_chunk(b"tEXt", b"Comment\0after the data"))]
    with Image.open(files[0]) as im:
        assert "exif" not in im.info  # PIL's header does not hold it: only its decode finds it
    expected = {f.name: _decoded_orientation(f) for f in files}
    assert [expected[f.name][0] for f in files] == [6, 3, 8, 1, 6]

    def no_decode(self, *args, **kwargs):
        raise AssertionError("decoded a PNG to read its orientation")

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", no_decode)
    assert {f.name: _shown_frame(f, "photo") for f in files} == expected


def test_a_png_whose_trailing_chunks_pil_reads_exif_from_is_still_decoded_with_the_same_result(tmp_path, monkeypatch):
    """A text chunk after the image data that PIL reads EXIF or XMP from: left to PIL's decode, as before."""
    xmp = _chunk(b"iTXt", b"XML:com.adobe.xmp\0\0\0\0\0<x tiff:Orientation=\"8\"/>")
    path = _png(tmp_path / "xmp.png", (20, 30), None, extra=xmp)
    expected = _decoded_orientation(path)
    assert expected[0] == 8
    loads = Counter()
    real = PngImagePlugin.PngImageFile.load

    def counting(self, *args, **kwargs):
        loads["load"] += 1
        return real(self, *args, **kwargs)

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", counting)
    assert _shown_frame(path, "photo") == expected and loads["load"] >= 1


def test_an_o3dir_of_pngs_opens_without_decoding_and_turns_masks_by_an_orientation_after_the_image_data(
        tmp_path, monkeypatch):
    root = tmp_path / "o3"
    photo = _png(root / "images" / "a.png", (20, 30), 6)
    target, _ = _o3_masks(root)
    real = PngImagePlugin.PngImageFile.load
    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", lambda *a, **k: pytest.fail("decoded at open"))
    dataset = open_dataset(f"o3dir:{root}", CFG)
    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", real)
    raw = dataset._records[0].load()
    np.testing.assert_array_equal(np.asarray(raw.image), _as_shown(photo))
    turned = np.asarray(Image.fromarray(target).transpose(Image.Transpose.ROTATE_270)) >= 128
    np.testing.assert_array_equal(raw.target, turned.astype(np.float32))


def test_a_truncated_png_is_still_refused_at_open_as_unreadable(tmp_path):
    """The walk meets the end of the file before IEND and leaves the file to PIL's decode, which fails, as before."""
    whole = _png(tmp_path / "whole.png", (20, 30), 6).read_bytes()
    cut = tmp_path / "cut.png"
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(QKHooksError, match=r"photo .*cut\.png cannot be read"):
        _shown_frame(cut, "photo")
