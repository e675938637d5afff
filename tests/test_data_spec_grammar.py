"""Round 20 (data): the data-spec grammar in one place, each annotated photo opened once, PNG orientations read
without decoding the image."""

from __future__ import annotations

import io
import os
import re
import struct
import warnings
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
from qkhooks.data.items import _TURNS, read_photo, shown_frame
from qkhooks.data.sources import _SPECS as STREAMED_SPECS
from qkhooks.data_files import absolute_spec
from qkhooks.errors import DataRefusal, QKHooksError

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
    # the PNG annotation: opened to decode, and once more for PIL's verify() (verify_whole: its chunks to IEND)
    assert opens[str(photo)] == 1 and opens[str(annotation)] == 2
    np.testing.assert_array_equal(np.asarray(raw.image), _as_shown(photo))
    turned = np.asarray(Image.fromarray(classes).transpose(Image.Transpose.ROTATE_270))
    np.testing.assert_array_equal(raw.objects, np.unique(turned, return_inverse=True)[1].reshape(turned.shape))
    Image.fromarray(classes[:, :24]).save(annotation)  # changed after the open: fits neither frame, refused as before
    with pytest.raises(QKHooksError, match=r"a\.jpg: the 'objects' mask .*a\.png has size 20x24, but the photo is "
                                           r"30x20 as shown"):
        record.load()


def _o3_masks(root: Path, name: str = "a") -> tuple[np.ndarray, np.ndarray]:
    """O3 target and distractor masks of item ``name``, 20x30 (the stored frame of its photo)."""
    target, distractor = np.zeros((20, 30), np.uint8), np.zeros((20, 30), np.uint8)
    target[2:6, 3:9], distractor[10:15, 12:25] = 255, 255
    for sub, mask in (("targ_images", target), ("dist_images", distractor)):
        (root / sub).mkdir(exist_ok=True)
        Image.fromarray(mask).save(root / sub / f"{name}.png")
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
    assert {f.name: shown_frame(f, "photo") for f in files} == expected


def _exif_chunk_data(orientation: int) -> bytes:
    """The TIFF data of an EXIF block holding only this orientation (an eXIf chunk's data)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()[6:]  # without the "Exif\0\0" header, as in an eXIf chunk


def _apng(path: Path, extra: bytes) -> Path:
    """A two-frame animated PNG with ``extra`` chunks after its last frame's data."""
    frames = [Image.new("RGB", (30, 20), colour) for colour in ("red", "blue")]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="PNG", save_all=True, append_images=frames[1:])
    chunks = _chunks(buffer.getvalue())
    assert {c[4:8] for c in chunks} >= {b"acTL", b"fcTL", b"fdAT"}
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"".join(chunks[:-1] + [extra] + chunks[-1:]))
    return path


_RAW_PROFILE_6 = "\nexif\n%8d\n%s\n" % (len(_exif_chunk_data(6)) + 6, (b"Exif\0\0" + _exif_chunk_data(6)).hex())
_TRAILING_CHUNKS_PIL_DECODES = {  # name: (a PNG with that after its image data, the orientation PIL's decode finds)
    "iTXt XMP": (lambda p: _png(p, (20, 30), None, extra=_chunk(
        b"iTXt", b"XML:com.adobe.xmp\0\0\0\0\0<x tiff:Orientation=\"8\"/>")), 8),
    "zTXt raw profile": (lambda p: _png(p, (20, 30), None, extra=_chunk(
        b"zTXt", b"Raw profile type exif\0\0" + zlib.compress(_RAW_PROFILE_6.encode()))), 6),
    "tEXt exif": (lambda p: _png(p, (20, 30), None, extra=_chunk(b"tEXt", b"exif\0" + _exif_chunk_data(6))), 6),
    # PIL's decode of an animation reads its first frame only, so it never reaches an eXIf after the last one
    "APNG, eXIf after the last frame": (lambda p: _apng(p, _chunk(b"eXIf", _exif_chunk_data(6))), 1),
}


@pytest.mark.parametrize("case", list(_TRAILING_CHUNKS_PIL_DECODES))
def test_a_png_whose_trailing_chunks_only_pil_reads_right_is_still_decoded_with_the_same_result(
        tmp_path, monkeypatch, case):
    """A text chunk after the image data that PIL reads EXIF or XMP from, or an animation: left to PIL's decode,
    which the walk cannot stand in for."""
    make, decoded = _TRAILING_CHUNKS_PIL_DECODES[case]
    path = make(tmp_path / "trailing.png")
    expected = _decoded_orientation(path)
    assert expected[0] == decoded  # the case is what it says (a walk that skipped the chunk would differ)
    loads = Counter()
    real = PngImagePlugin.PngImageFile.load

    def counting(self, *args, **kwargs):
        loads["load"] += 1
        return real(self, *args, **kwargs)

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", counting)
    assert shown_frame(path, "photo") == expected and loads["load"] >= 1


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
        shown_frame(cut, "photo")


# ------------------------------------------------------------------------------ orientation tags of any value


def _jpeg_with_orientation_entry(path: Path, size: tuple[int, int], kind: int, count: int, value: bytes) -> Path:
    """A noise JPEG of stored ``size`` (H, W) whose EXIF holds one Orientation entry of TIFF type ``kind``, written
    by hand (PIL writes only well-formed ones): ``value`` inline when it fits 4 bytes, else right after the IFD."""
    inline = len(value) <= 4
    entry = struct.pack(">HHI", 0x0112, kind, count) + (value.ljust(4, b"\0") if inline else struct.pack(">I", 26))
    tiff = b"MM\0*" + struct.pack(">I", 8) + struct.pack(">H", 1) + entry + struct.pack(">I", 0)
    pixels = np.random.default_rng(3).integers(0, 255, (*size, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, exif=b"Exif\0\0" + tiff + (b"" if inline else value))
    return path


_ORIENTATION_ENTRIES = {  # name: (TIFF type, count, value bytes, the value PIL reads)
    "SHORT 6": (3, 1, struct.pack(">H", 6), 6),
    "ASCII '6'": (2, 2, b"6\0", "6"),
    "DOUBLE 6.0": (12, 1, struct.pack(">d", 6.0), 6.0),
    "DOUBLE inf": (12, 1, struct.pack(">d", float("inf")), float("inf")),
    "RATIONAL 6/1": (5, 1, struct.pack(">II", 6, 1), 6),
    "SHORT 9": (3, 1, struct.pack(">H", 9), 9),
}


@pytest.mark.parametrize("case", list(_ORIENTATION_ENTRIES))
def test_the_orientation_read_from_any_tag_value_is_the_one_exif_transpose_applies(tmp_path, case):
    """Masks are turned by the orientation read (_TURNS), so it must be the very turn ImageOps.exif_transpose gives
    the pixels: the stored pixels turned by it are the photo as shown, and the photo read is that, for a tag value
    exif_transpose turns by (6, 6.0, 6/1) or not (the text "6", inf, 9)."""
    kind, count, value, read = _ORIENTATION_ENTRIES[case]
    path = _jpeg_with_orientation_entry(tmp_path / "photo.jpg", (20, 30), kind, count, value)
    with Image.open(path) as im:
        assert im.getexif().get(0x0112) == read  # the case is what it says
        stored, shown = np.asarray(im.convert("RGB")), np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    orientation, shown_hw = shown_frame(path, "photo")
    assert shown_hw == shown.shape[:2]
    np.testing.assert_array_equal(_TURNS.get(orientation, lambda a: a)(stored), shown)
    photo, applied = read_photo(path, "photo")
    assert applied == orientation
    np.testing.assert_array_equal(np.asarray(photo), shown)


def test_a_jpeg_whose_orientation_is_an_infinite_double_is_read_by_a_folder_dataset_as_pil_gives_it(tmp_path):
    """Such a tag is no turn (exif_transpose leaves the pixels): the image is read, not skipped as unreadable."""
    kind, count, value, _ = _ORIENTATION_ENTRIES["DOUBLE inf"]
    path = _jpeg_with_orientation_entry(tmp_path / "imgs" / "a.jpg", (20, 30), kind, count, value)
    dataset = open_dataset(str(tmp_path / "imgs"), CFG)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a skip warns
        item = dataset[0]
    assert item is not None and dataset.skipped == []
    with Image.open(path) as im:
        np.testing.assert_array_equal(np.asarray(dataset._records[0].load().image), np.asarray(im.convert("RGB")))


def test_an_o3dir_square_photo_with_a_text_orientation_is_not_turned_so_its_masks_are_not_either(tmp_path):
    """An ASCII "6" tag turns no pixels (exif_transpose looks it up and finds nothing), so the masks of a square photo
    are in its one frame: recorded as they are, not refused as if the frame could not be told."""
    root = tmp_path / "o3"
    kind, count, value, _ = _ORIENTATION_ENTRIES["ASCII '6'"]
    photo = _jpeg_with_orientation_entry(root / "images" / "a.jpg", (24, 24), kind, count, value)
    target, distractor = np.zeros((24, 24), np.uint8), np.zeros((24, 24), np.uint8)
    target[2:6, 3:9], distractor[10:15, 12:20] = 255, 255
    for sub, mask in (("targ_images", target), ("dist_images", distractor)):
        (root / sub).mkdir()
        Image.fromarray(mask).save(root / sub / "a.png")
    raw = open_dataset(f"o3dir:{root}", CFG)._records[0].load()
    np.testing.assert_array_equal(np.asarray(raw.image), _as_shown(photo))
    np.testing.assert_array_equal(raw.target, (target >= 128).astype(np.float32))
    np.testing.assert_array_equal(raw.distractor, (distractor >= 128).astype(np.float32))


# ------------------------------------------------------------------------------ files found unreadable when loaded


def _corrupt_png(path: Path) -> Path:
    """A 20x30 PNG whose chunks are well formed but whose image data is not a zlib stream: opened, not decoded."""
    chunks = _chunks(_png(path, (20, 30), None).read_bytes())
    data = [_chunk(b"IDAT", b"\x78\x9c" + b"\xff" * 50) if c[4:8] == b"IDAT" else c for c in chunks]
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"".join(dict.fromkeys(data)))  # one corrupt IDAT
    return path


def _truncated_jpeg(path: Path) -> Path:
    """A 20x30 JPEG cut off in its image data."""
    _noise_jpeg(path, (20, 30), 1)
    whole = path.read_bytes()
    path.write_bytes(whole[: whole.index(b"\xff\xda") + 40])  # cut after its start of scan: the header reads
    return path


def _o3dir(root: Path, names: tuple[str, ...] = ("a",)) -> Path:
    """An O3 folder of noise PNG photos and their masks."""
    for name in names:
        _png(root / "images" / f"{name}.png", (20, 30), None)
        _o3_masks(root, name)
    return root


def _ade20k(root: Path) -> Path:
    """An ADEChallengeData2016 folder of one noise PNG photo and its class map."""
    _png(root / "images" / "training" / "a.png", (20, 30), None)
    annotation = root / "annotations" / "training" / "a.png"
    annotation.parent.mkdir(parents=True)
    Image.fromarray(np.arange(600, dtype=np.uint8).reshape(20, 30) % 3).save(annotation)
    return root


_BROKEN_ON_LOAD = {  # name: (spec prefix, make the dataset, the file to break, how, the file's role in the refusal)
    "o3dir photo, corrupt PNG data": ("o3dir:", _o3dir, "images/a.png", _corrupt_png, r"O3 image \S+/images/a\.png"),
    "o3dir photo, truncated JPEG": ("o3dir:", _o3dir, "images/a.png", None, r"O3 image \S+/images/a\.jpg"),
    "o3dir target mask, corrupt PNG data": (
        "o3dir:", _o3dir, "targ_images/a.png", _corrupt_png,
        r"O3 image \S+/images/a\.png: the 'target' mask \S+/targ_images/a\.png"),
    "ade20k photo, corrupt PNG data": (
        "ade20k:", _ade20k, "images/training/a.png", _corrupt_png, r"ADE20K image \S+/images/training/a\.png"),
    "ade20k annotation, corrupt PNG data": (
        "ade20k:", _ade20k, "annotations/training/a.png", _corrupt_png,
        r"ADE20K image \S+/images/training/a\.png: the 'objects' mask \S+/annotations/training/a\.png"),
}


@pytest.mark.parametrize("case", list(_BROKEN_ON_LOAD))
def test_an_annotated_file_that_opens_but_does_not_decode_is_refused_when_loaded_naming_it(tmp_path, case):
    """The open reads headers only (a PNG's chunks are walked), so a corrupt image data stream is found when its item
    loads: refused there, naming the file and the fix as the open's refusal does, not a bare decoder error."""
    prefix, make, broken, how, role = _BROKEN_ON_LOAD[case]
    root = make(tmp_path / "data")
    if how is None:  # the photo as a JPEG cut off in its image data
        (root / broken).unlink()
        _truncated_jpeg(root / broken.replace(".png", ".jpg"))
    else:
        how(root / broken)
    dataset = open_dataset(prefix + str(root), CFG)
    with pytest.raises(DataRefusal, match=role + r" cannot be read \((OSError|SyntaxError): .+\); replace or remove "
                                          r"it\.$"):
        dataset[0]
    assert dataset.skipped == []


def test_a_run_meeting_an_o3dir_photo_that_does_not_decode_stops_with_the_refusal_and_keeps_what_it_committed(
        tmp_path):
    """As an O3 photo that fails to decode always did (annotated items are never skipped: their masks would be
    missing from the analyses), the run stops, now with the refusal naming the file and where the run file stands."""
    import timm

    from qkhooks.models.load import LoadedModel
    from qkhooks.store import open_run
    from qkhooks.stream import record_dataset

    torch_model = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                                    embed_dim=32, depth=1, num_heads=2)
    loaded = LoadedModel(model=torch_model.eval(), spec="tiny-deit-32", image_config=CFG)
    root = _o3dir(tmp_path / "o3", ("a", "b"))
    _corrupt_png(root / "images" / "b.png")
    out = tmp_path / "run.h5"
    with pytest.raises(QKHooksError, match=r"O3 image \S+/images/b\.png cannot be read \(OSError: .+\); replace or "
                                           r"remove it\. The 1 images before it stay committed in .*run\.h5.*--resume"):
        record_dataset(loaded, f"o3dir:{root}", out, modes=None, attention="rows", batch_size=1, num_workers=0,
                       progress=False)
    with open_run(out) as run:
        assert list(run.ids) == ["a.png"]
