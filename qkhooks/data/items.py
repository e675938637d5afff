"""One item of qkhooks' own datasets, from loading to a batch: the full-resolution record (:class:`RawItem`), how to
load it (:class:`ItemRecord`), the dataset that preprocesses it for one model (:class:`ImageDataset`), and
:func:`collate`. Shared by the folder, sample, ADE20K and O3 datasets and by the user's sources."""

from __future__ import annotations

import contextlib
import contextvars
import errno
import hashlib
import io
import os
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps
from torch.utils.data import Dataset

from qkhooks.data.preprocess import ImageConfig, to_rgb
from qkhooks.errors import DataRefusal, QKHooksError

__all__ = ["IMAGE_EXTENSIONS", "ImageDataset", "collate"]

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp")
"""Extensions a folder dataset picks up (compared case-insensitively)."""


@dataclass
class RawItem:
    """One item before preprocessing: full-resolution image and masks."""

    image: Image.Image
    objects: np.ndarray | None = None
    target: np.ndarray | None = None
    distractor: np.ndarray | None = None
    distractor_items: np.ndarray | None = None
    native: bool = False  # already at model size (generated stimuli): normalise only
    extras: dict[str, Any] = field(default_factory=dict)
    unread: tuple[str, ...] = ()  # the user's item's fields that were not read (named once per stream, not recorded)
    stamp: tuple[int, int, int] | None = None  # a tar member's (size, mtime ns, hash) where it was read (wds:)


@dataclass(frozen=True)
class ItemRecord:
    """How to load one item: ``path`` is its image file (a run keeps its size, :mod:`qkhooks.data_files`), and
    ``skip_unreadable`` makes a decode failure skip the item instead of raising (a folder's files)."""

    id: str
    load: Callable[[], RawItem]
    path: str | None = None
    skip_unreadable: bool = False


def open_image(path: str | os.PathLike[str] | IO[bytes]) -> Image.Image:
    """``PIL.Image.open``, refusing every image past PIL's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``):
    PIL itself raises only past twice the limit and merely warns between the two, while README (and a user who set
    the limit) expects the limit to hold. Raised as PIL's own ``DecompressionBombError``, which the readers name."""
    image = Image.open(path)
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and image.width * image.height > limit:
        image.close()
        raise Image.DecompressionBombError(
            f"Image size ({image.width * image.height} pixels) exceeds limit of {limit} pixels, could be "
            "decompression bomb DOS attack.")
    return image


def verify_whole(source: str | os.PathLike[str] | IO[bytes], opened: Image.Image | None = None) -> None:
    """Raise PIL's own error where an image file (a path, or an open binary file holding it from its start, left
    where it was) is not whole:
    ``Image.verify()`` reads a PNG's chunks up to its IEND and checks their CRCs. PIL's decode stops at the end of
    the image data, so a PNG cut after it (its IEND missing: a truncated file, perhaps still being copied in)
    decodes as if whole. The one test of a whole file: a folder's check at open and every decode of a file or bytes
    (:func:`read_oriented`, :func:`read_mask`) make it, so that every route leaves out (or refuses) the same files
    (the fuzz sweep of r50: a folder skipped such a PNG, a list of paths and ``hfds:`` recorded it).

    ``opened``: the image a caller already opened from ``source`` to decode it; where its format's plugin checks
    nothing in ``verify()`` (JPEG, WebP, ...: only PNG's does in Pillow 9.3 to 13), the file is not opened again."""
    if opened is not None and type(opened).verify is ImageFile.ImageFile.verify:
        return
    at = None if isinstance(source, (str, os.PathLike)) else source.tell()
    if at is not None:
        source.seek(0)
    with open_image(source) as im:
        im.verify()
    if at is not None:
        source.seek(at)


NO_STAMP: tuple[int, int, int] = (-1, -1, -1)
"""The stamp of an image not read from a file (generated, in memory, bytes given): -1 in each per-image column."""

_STAMPS: contextvars.ContextVar[dict[str, tuple[int, int, int]] | None] = contextvars.ContextVar(
    "qkhooks_file_stamps", default=None)


def digest_value(digest: Any) -> int:
    """A BLAKE2b (8 bytes) digest as the int64 a run stores (:data:`qkhooks.store.format.FILE_HASHES`): little-endian
    signed, -2 where that reads -1 (-1 means "no file")."""
    value = int.from_bytes(digest.digest(), "little", signed=True)
    return -2 if value == -1 else value


def bytes_hash(data: bytes | bytearray | memoryview) -> int:
    """:func:`digest_value` of ``data``'s BLAKE2b: what :func:`qkhooks.data_files.file_hash` gives for a file of
    these bytes."""
    return digest_value(hashlib.blake2b(data, digest_size=8))


@contextlib.contextmanager
def stamps_read() -> Iterator[dict[str, tuple[int, int, int]]]:
    """While the block runs, every image file this process decodes (:func:`read_oriented` of a path) is read whole
    into memory once, decoded from those bytes, and its stamp put in the dict yielded, under the path as given:
    ``(size in bytes, modification time in ns, hash of the bytes)`` (:func:`bytes_hash`), so the hash is of exactly
    the bytes decoded and no file is read twice. A recording takes each item's stamp so, in the process that reads
    it (a DataLoader or stream worker), and carries it with the batch to the run file
    (:class:`qkhooks.stream.WriterSink`)."""
    seen: dict[str, tuple[int, int, int]] = {}
    token = _STAMPS.set(seen)
    try:
        yield seen
    finally:
        _STAMPS.reset(token)


def read_stamped(path: str | os.PathLike[str], identify: bool = False) -> tuple[bytes, tuple[int, int, int]]:
    """A file's bytes and its stamp (size, ``st_mtime_ns`` of the open file, :func:`bytes_hash`), from one read.

    ``identify``: PIL first identifies the open file from its header (:func:`open_image`), so that a file that is no
    image (PIL's UnidentifiedImageError, naming the path) or is past the pixel limit is refused before it is read
    whole, as PIL's decode of a path refused it (review r40 REV: a 200 MB non-image file in a list was read into
    memory first, /dev/zero until the memory ran out)."""
    with open(path, "rb") as f:
        mtime = os.fstat(f.fileno()).st_mtime_ns
        if identify:
            with _named_as_path(os.fspath(path)), open_image(f):  # the header only; leaves f open
                pass
            f.seek(0)
        data = f.read()
    return data, (len(data), mtime, bytes_hash(data))


def read_oriented(path: str | os.PathLike[str] | IO[bytes]) -> tuple[Image.Image, int]:
    """Fully decode an image file (a path or an open binary file) to RGB as a viewer shows it (:func:`to_rgb`,
    the one conversion every source's pixels go through), with the EXIF orientation that applied, from one opening
    of the file (masks beside a photo are turned alike), and close the file. Inside :func:`stamps_read`, a path is
    read whole once, stamped, and decoded from its bytes (PIL names the path in its errors as before)."""
    seen = _STAMPS.get()
    if seen is not None and isinstance(path, (str, os.PathLike)):
        name = os.fspath(path)
        data, seen[name] = read_stamped(name, identify=True)
        with _named_as_path(name):
            return _decode_oriented(io.BytesIO(data), name)
    return _decode_oriented(path)


@contextlib.contextmanager
def _named_as_path(name: str) -> Iterator[None]:
    """PIL's "cannot identify image file" of an open or in-memory file, said of the file's path, as PIL says it when
    given the path (the readers and skip lists name the file the user can look at)."""
    try:
        yield
    except Image.UnidentifiedImageError:
        raise Image.UnidentifiedImageError(f"cannot identify image file {name!r}") from None


def _decode_oriented(path: str | os.PathLike[str] | IO[bytes], name: str | None = None) -> tuple[Image.Image, int]:
    """``name``: the file the in-memory bytes ``path`` were read from, for to_rgb's warnings (PIL's ``filename`` is
    not set to it: PIL would then map the file again to decode it, not the bytes hashed)."""
    with open_image(path) as im:
        verify_whole(path, im)
        # to_rgb first, as when read alone; the Exif it read (cached on the image) is the one it applied
        try:
            return to_rgb(im, name=name), exif_orientation(im.getexif())
        except DataRefusal as exc:  # pixels without display colours: the refusal names the file it is about
            file = name or (os.fspath(path) if isinstance(path, (str, os.PathLike)) else None)
            if file is None:
                raise
            raise DataRefusal(f"{file}: {exc}") from None


# errno values of an OSError that are the file's own: its path names no readable file (gone, a folder, a dangling
# link), its blocks cannot be read off the disk (EIO), or its permissions. Any other errno (ENOMEM, EMFILE, ENFILE,
# EINTR, ESTALE, ETIMEDOUT, ...) is the machine's or the file system's, and replacing the file would not help. PIL's
# own errors on bad data (UnidentifiedImageError, "image file is truncated", "broken data stream ...") carry none,
# or, built with two arguments (Pillow 9.3's "Truncated MSP file, expected %d bytes on row %s", (rowlen, x)), no int.
_FILE_ERRNOS = frozenset({errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG, errno.ELOOP, errno.EIO,
                          errno.EACCES, errno.EPERM})


def file_fault(exc: BaseException) -> bool:
    """Whether ``exc``, raised while reading an image file or bytes, is the file's own fault, so that the file may
    be skipped or refused: corrupt, truncated or unidentified data (PIL raises OSError without an errno,
    SyntaxError, ValueError, struct.error, DecompressionBombError, ...) or an errno of :data:`_FILE_ERRNOS`. Not
    MemoryError nor an OSError with another errno (too many open files, an interrupted or timed-out network file
    system): those are the machine's, and propagate unchanged."""
    if isinstance(exc, OSError) and isinstance(exc.errno, int):
        return exc.errno in _FILE_ERRNOS
    return isinstance(exc, Exception) and not isinstance(exc, MemoryError)


@contextlib.contextmanager
def _unreadable_refused(what: str, path: str | os.PathLike[str], error: type[QKHooksError] = QKHooksError
                        ) -> Iterator[None]:
    """A failure to read the file ``path`` that is the file's own (:func:`file_fault`) as a refusal naming it
    (``what`` names the file's role) and the fix; a QKHooksError (a refusal of what the file holds) and the
    machine's failures pass as they are."""
    try:
        yield
    except QKHooksError:
        raise
    except Exception as exc:
        if not file_fault(exc):
            raise
        if isinstance(exc, Image.DecompressionBombError):  # PIL's guard, not damage: a genuine large photo trips it
            raise error(f"{what} {path} cannot be read: {exc} If the photo is genuine, raise PIL's limit before "
                        "recording (`PIL.Image.MAX_IMAGE_PIXELS = None` or a larger count); otherwise remove it."
                        ) from exc
        if isinstance(exc, PermissionError):
            raise error(f"{what} {path} cannot be read: permission denied ({exc}); give the user running qkhooks "
                        "read permission on it (and search permission on its folders), or remove it.") from exc
        raise error(f"{what} {path} cannot be read ({type(exc).__name__}: {exc}); replace or remove it.") from exc


def read_photo(path: str | os.PathLike[str], what: str) -> tuple[Image.Image, int]:
    """:func:`read_oriented` of a photo beside masks. A file that fails to decode is refused naming it (``what``:
    its role), as at open: the open reads headers only, so a corrupt data stream is found here. A
    :class:`DataRefusal`, as it is found while a run is recorded."""
    with _unreadable_refused(what, path, DataRefusal):
        return read_oriented(path)


def read_mask_file(path: str | os.PathLike[str], photo: str, key: str, mode: str | None = None
                    ) -> tuple[np.ndarray, bool]:
    """:func:`read_mask` of the ``key`` mask file of a dataset's ``photo``, refused as in :func:`read_photo`."""
    with _unreadable_refused(f"{photo}: the {key!r} mask", path, DataRefusal):
        return read_mask(path, mode)


# ------------------------------------------------------------------------------ masks beside EXIF-rotated photos
#
# A photo is recorded as shown: to_rgb applies its EXIF orientation. Its masks must be turned alike, and a mask file
# does not say in which frame it was drawn, so its size decides (README, "Your data"): a mask the size of the photo's
# stored pixels (and not of the photo as shown) was drawn on them and gets the photo's very transpose; a mask the size
# of the photo as shown is already in its frame. Where both frames have the same size (a square photo turned by 90
# degrees, any flip or 180-degree turn) nothing is guessed: the item is refused, naming the photo and the fix. A mask
# file (or PIL image) with an orientation tag of its own is read as a viewer shows it, like the photo, so it is in the
# shown frame: this is how a mask drawn on the stored pixels says so unambiguously (saved with the photo's tag).

_EXIF_ORIENTATION = 0x0112
_TURNS: dict[int, Callable[[np.ndarray], np.ndarray]] = {  # ImageOps.exif_transpose, on an array's first two axes
    2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1], 5: lambda a: np.swapaxes(a, 0, 1),
    6: lambda a: np.rot90(a, -1), 7: lambda a: np.swapaxes(np.rot90(a, 2), 0, 1), 8: lambda a: np.rot90(a, 1),
}
_TURN_WORDS = {2: "mirrored left-right", 3: "turned 180 degrees", 4: "mirrored top-bottom",
               5: "mirrored along its main diagonal", 6: "turned 90 degrees clockwise",
               7: "mirrored along its anti-diagonal", 8: "turned 90 degrees anticlockwise"}


def exif_orientation(exif: Image.Exif) -> int:
    """The EXIF orientation ``ImageOps.exif_transpose`` (so :func:`to_rgb`) applies for ``exif``: 2..8, or 1 for
    none. It looks the tag's value up in its table (Pillow 9.3 to 13: ``{2: ..., 8: ...}.get(orientation)``), so
    only a value equal to a key turns the pixels (6, 6.0, a rational 6/1; not the text "6", nor inf)."""
    value = exif.get(_EXIF_ORIENTATION, 1)
    try:
        return int(value) if value in _TURNS else 1
    except (TypeError, ValueError, ArithmeticError):  # unhashable, or no integer: nothing exif_transpose turns by
        return 1


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Keywords of the text chunks (tEXt, zTXt, iTXt) that PIL reads an orientation from: PngStream.chunk_tEXt/zTXt/iTXt
# store a chunk in image.info under its keyword, and Image.Image.getexif reads info["exif"], info["Raw profile type
# exif"] and the XMP in info["XML:com.adobe.xmp"] (Pillow >= 11.2 also info["xmp"], and fails on the text a chunk
# keyed "xmp" puts there: left to PIL's decode at open, so such a file is refused before a run starts, not halfway).
_PNG_EXIF_TEXT_KEYS = (b"exif", b"Raw profile type exif", b"XML:com.adobe.xmp", b"xmp")


def _png_exif_after_data(path: str | os.PathLike[str]) -> tuple[bool, bytes | None]:
    """Whether the chunks after a PNG's image data could be walked (their headers read: length, type; their data
    skipped) and the last ``eXIf`` chunk among them, which PIL finds only by decoding the image. Not walked (False),
    so that PIL's decode decides as before: a text chunk there that PIL reads EXIF or XMP from, an animation, image
    data after other chunks, a broken chunk structure (a truncated file). The image data itself is not checked: a
    corrupt data stream passes here and is refused when the item loads (:func:`read_photo`).

    PIL's own chunk reader is not reused: ``PngImagePlugin.ChunkStream.read`` parses only the 8-byte header (one
    ``struct.unpack`` here) and, on a broken one, raises SyntaxError or, where the process-wide
    ``ImageFile.LOAD_TRUNCATED_IMAGES`` is set, returns it as a chunk (Pillow 9.3 to 13), so the walk would keep its
    own check; ``ChunkStream.crc`` and the ``PngStream`` chunk handlers read (and decompress) a chunk's whole data,
    where the walk seeks past the image data and reads a text chunk's keyword only."""
    exif, in_data, after_data = None, False, False
    with open(path, "rb") as f:
        if f.read(8) != _PNG_SIGNATURE:
            return False, None
        while True:
            head = f.read(8)
            if len(head) < 8:
                return False, None
            length, kind = struct.unpack(">I4s", head)
            if kind == b"IEND":
                return True, exif
            if kind in (b"acTL", b"fcTL", b"fdAT") or not kind.isalpha() or (kind == b"IDAT" and after_data):
                return False, None
            in_data, after_data = kind == b"IDAT", after_data or (in_data and kind != b"IDAT")
            data = b""
            if after_data and kind in (b"eXIf", b"tEXt", b"zTXt", b"iTXt"):
                data = f.read(length if kind == b"eXIf" else min(length, 80))  # a text chunk's keyword: <= 79 bytes
                if kind == b"eXIf":
                    if len(data) < length:
                        return False, None
                    exif = data
                elif data.split(b"\0", 1)[0] in _PNG_EXIF_TEXT_KEYS:
                    return False, None
            f.seek(length - len(data) + 4, os.SEEK_CUR)  # the rest of the data, and the CRC


def _file_orientation(image: Image.Image, path: str | os.PathLike[str]) -> int:
    """The EXIF orientation of an image just opened from ``path``, without decoding a PNG: PIL decodes a PNG without
    EXIF in its header to reach an ``eXIf`` chunk after the image data, which walking the chunks finds alike. The
    chunk found is stored in ``image.info["exif"]`` as PIL's decode stores it (``PngStream.chunk_eXIf``), so that
    the caller's image, opened for this alone, reads as if decoded."""
    if image.format == "PNG" and "exif" not in image.info:
        walked, exif = _png_exif_after_data(path)
        if walked:
            if exif is not None:
                image.info["exif"] = b"Exif\x00\x00" + exif
            # the base class's getexif reads the header's info (eXIf, Raw profile, XMP) and does not decode, as
            # PngImageFile.getexif does where info has no "exif"
            return exif_orientation(Image.Image.getexif(image))
    return exif_orientation(image.getexif())


_WIDE_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def mask_pixels(image: Image.Image, mode: str | None = None) -> tuple[np.ndarray, bool]:
    """A mask image's pixels (converted to ``mode`` if given), and whether it carried an orientation tag of its own
    (then applied, as a viewer shows it: the pixels are in the shown frame). A 16-bit or float greyscale mask read
    as ``"L"`` (O3's white-on-black masks) is scaled by its range as a photo is (:func:`to_rgb`: ``round(v / 257)``),
    not clipped by PIL's conversion (every 16-bit level from 255 up, 0.4% grey, read as white); a 32-bit integer one,
    which has no range, is refused."""
    own = exif_orientation(image.getexif())
    if own != 1:
        image = ImageOps.exif_transpose(image)
    if mode == "L" and image.mode in _WIDE_GREY_MODES:
        return np.array(to_rgb(image))[:, :, 0], own != 1
    if mode is not None and image.mode != mode:
        image = image.convert(mode)
    return np.array(image), own != 1


def read_mask(path: str | os.PathLike[str] | IO[bytes], mode: str | None = None) -> tuple[np.ndarray, bool]:
    """:func:`mask_pixels` of a mask file (whole: :func:`verify_whole`), closed after reading; a refusal of its pixels
    names a file given by path."""
    with open_image(path) as im:
        verify_whole(path, im)
        try:
            return mask_pixels(im, mode)
        except DataRefusal as exc:
            if not isinstance(path, (str, os.PathLike)):
                raise
            raise DataRefusal(f"{os.fspath(path)}: {exc}") from None


def _other_frame(hw: tuple[int, int], orientation: int) -> tuple[int, int]:
    """``(h, w)`` of an image in its other frame (stored <-> shown): orientations 5..8 swap the axes, 1..4 keep them."""
    return (int(hw[1]), int(hw[0])) if orientation >= 5 else (int(hw[0]), int(hw[1]))


def shown_frame(path: str | os.PathLike[str], what: str) -> tuple[int, tuple[int, int]]:
    """The EXIF orientation of an image file and its ``(h, w)`` as a viewer shows it, from its header (a JPEG's
    EXIF is in its header; a PNG's eXIf chunk may follow the image data: its chunks are walked, not decoded);
    ``what`` names the file in a refusal."""
    with _unreadable_refused(what, path), open_image(path) as im:
        orientation = _file_orientation(im, path)
        return orientation, _other_frame((im.height, im.width), orientation)


def check_mask_file(mask_file: str | os.PathLike[str], orientation: int, shown_hw: tuple[int, int], photo: str,
                     key: str) -> tuple[int, int] | None:
    """Open-time form of :func:`mask_as_shown` for a mask file (headers only where they hold the tags): refuses a mask
    of an EXIF-rotated photo whose frame cannot be told or that fits neither frame; returns the mask's ``(h, w)`` in
    the photo's shown frame for the caller to compare, or None where the frame rule already matched it."""
    own, mask_hw = shown_frame(mask_file, f"{photo}: the {key!r} mask")  # worded as in read_mask_file
    if own == 1 and orientation != 1:
        _needs_turn(mask_hw, orientation, shown_hw, photo, key, str(mask_file))
        return None
    return mask_hw


def _needs_turn(mask_hw: tuple[int, int], orientation: int, shown_hw: tuple[int, int], photo: str, key: str,
                mask_file: str | None = None) -> bool:
    """Whether a mask of size ``mask_hw`` is in the stored frame of a photo with this EXIF ``orientation`` that is
    ``shown_hw`` as shown (then it gets the photo's transpose); refused where the frame cannot be told."""
    if orientation == 1:
        return False
    mask_hw, shown_hw = tuple(int(v) for v in mask_hw), tuple(int(v) for v in shown_hw)
    stored_hw = _other_frame(shown_hw, orientation)
    size = f"{mask_hw[0]}x{mask_hw[1]}"
    mask = f"{key!r} mask {mask_file}" if mask_file else f"{key!r} mask"
    if mask_hw == stored_hw == shown_hw:
        raise QKHooksError(
            f"{photo}: the photo has EXIF orientation {orientation} (shown {_TURN_WORDS[orientation]}), and its "
            f"{mask} ({size}) fits both its stored pixels and the photo as shown, so it cannot be told in "
            "which of the two it was drawn (qkhooks does not guess). If the mask was drawn on the photo as shown, "
            "save the photo with its orientation applied (PIL.ImageOps.exif_transpose(Image.open(photo)).save(...)); "
            "if it was drawn on the stored pixels, save the mask file with the photo's orientation tag "
            "(mask.save(path, exif=Image.open(photo).getexif())), or strip the photo's tag to record it as stored."
        )
    if mask_hw == shown_hw:
        return False
    if mask_hw == stored_hw:
        return True
    raise QKHooksError(
        f"{photo}: the {mask} has size {size}, but the photo is {shown_hw[0]}x{shown_hw[1]} as shown (EXIF "
        f"orientation {orientation}: {_TURN_WORDS[orientation]}) and {stored_hw[0]}x{stored_hw[1]} as stored; a "
        "mask must have the photo's size in one of these frames."
    )


def mask_as_shown(mask: np.ndarray, orientation: int, shown_hw: tuple[int, int], photo: str, key: str,
                   tagged: bool = False, mask_file: str | None = None) -> np.ndarray:
    """``mask`` in the frame of the photo as shown (see the rule above); ``tagged``: the mask carried an
    orientation tag of its own and is in that frame already."""
    if tagged or orientation == 1 or np.ndim(mask) < 2:
        return mask
    if _needs_turn(np.shape(mask)[:2], orientation, shown_hw, photo, key, mask_file):
        return np.ascontiguousarray(_TURNS[orientation](np.asarray(mask)))
    return mask


def load_file(path: str) -> RawItem:
    return RawItem(image=read_oriented(path)[0])


def load_array(array: np.ndarray) -> RawItem:
    return RawItem(image=to_rgb(np.asarray(array)))


class ImageDataset(Dataset):
    """A deterministic, indexable stream of preprocessed images (and masks).

    Build it with :func:`open_dataset`. Items are dicts (see the module
    docstring); batch them with :func:`collate`.

    Attributes:
        name: Canonical spec of the source (e.g. ``"samples"``, ``"o3:16:0"``, a folder path).
        image_config: Preprocessing applied to every item.
        has_masks: Whether items carry ``"objects"`` (and O3 masks).
        has_targets: Whether items carry odd-one-out ``"target"`` and ``"distractor"`` masks.
        skipped: ``(id, reason)`` for every file left out, at open time or later; the id is the path
            relative to the dataset root, as item ids are.
    """

    def __init__(
        self,
        name: str,
        records: Sequence[ItemRecord],
        image_config: ImageConfig,
        has_masks: bool,
        skipped: list[tuple[str, str]] | None = None,
        has_targets: bool = False,
    ) -> None:
        if not isinstance(image_config, ImageConfig):
            raise QKHooksError(
                f"image_config must be a qkhooks.data.ImageConfig, got {type(image_config).__name__}; "
                "use ImageConfig.from_timm(model) or load_model(...).image_config."
            )
        self.name = name
        self.image_config = image_config
        self.has_masks = has_masks
        self.has_targets = has_targets
        self.skipped: list[tuple[str, str]] = list(skipped or [])
        self._records = list(records)

    @property
    def ids(self) -> list[str]:
        """Item ids in dataset order."""
        return [r.id for r in self._records]

    def __len__(self) -> int:
        return len(self._records)

    def file_of(self, index: int) -> str | None:
        """The image file item ``index`` is read from, or None for an item not read from a file (generated, built
        in): the file a run stamps and checks on resume."""
        return self._records[index].path

    def files(self) -> dict[str, str]:
        """``{id: image file}`` of the items read from files (a folder's, ``ade20k:``, ``o3dir:``, joins of them);
        {} for generated and built-in data."""
        return {r.id: r.path for r in self._records if r.path}

    def __repr__(self) -> str:
        return (
            f"ImageDataset(name={self.name!r}, len={len(self)}, size={self.image_config.size}, "
            f"has_masks={self.has_masks}, skipped={len(self.skipped)})"
        )

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        """Load, preprocess and return item ``index``.

        Returns:
            The item dict, or ``None`` if a folder image that passed the open-time
            check fails to decode (warned about and appended to :attr:`skipped`).
        """
        record = self._records[index]
        try:
            raw = record.load()
        except DataRefusal as exc:  # a folder's file whose pixels have no display colours (a float TIFF): skipped
            if not record.skip_unreadable:
                raise
            return self._skip(record, str(exc), "image without defined display colours")
        except QKHooksError as exc:  # a refusal of this item's data: record_dataset says where the run file stands
            raise DataRefusal(str(exc)) from exc
        except Exception as exc:
            if not (record.skip_unreadable and file_fault(exc)):
                raise
            return self._skip(record, f"{type(exc).__name__}: {exc}", "unreadable image")
        try:
            return self._transform(record.id, raw)
        except DataRefusal as exc:  # a folder's image the model's preprocessing cannot take (a thin strip): skipped
            if not record.skip_unreadable:
                raise
            return self._skip(record, str(exc), "image the model's preprocessing cannot take")

    def _skip(self, record: ItemRecord, reason: str, what: str) -> None:
        """Leave a folder's image out, warned about and listed in :attr:`skipped` (the run goes on); the warning
        names the file once, where the reason opens with it (a refusal of its pixels names it for the list, and the
        preprocessing's, of a thin strip, the dataset and the id: round 51, the file was named twice)."""
        said = reason.removeprefix(f"{record.path}: ").removeprefix(f"{self.name}: {record.id!r}: ")
        warnings.warn(f"skipping {what} {record.path} ({said})", stacklevel=3)
        self.skipped.append((record.id, reason))
        return None

    def _transform(self, item_id: str, raw: RawItem) -> dict[str, Any]:
        return preprocess_raw(self.name, self.image_config, item_id, raw)


def preprocess_raw(name: str, cfg: ImageConfig, item_id: str, raw: RawItem) -> dict[str, Any]:
    """One item in model-input geometry: the model's preprocessing for the image, its geometry for the masks."""
    hw = (raw.image.height, raw.image.width)
    for key in ("objects", "target", "distractor", "distractor_items"):
        value = getattr(raw, key)
        # DataRefusals: found while a run is recorded, record_dataset says where its file stands (review r35 B)
        if value is not None and np.ndim(value) == 3 and value.shape[:2] == hw:
            raise DataRefusal(f"{name}: mask {key!r} of {item_id!r} {not_a_label_map(value.shape)}")
        if value is not None and value.shape != hw:
            raise DataRefusal(
                f"{name}: mask {key!r} of {item_id!r} has size {value.shape} but its image is {hw}; "
                "annotation and image files must have the same size."
            )
        if key in ("objects", "distractor_items") and value is not None:
            _refuse_ids_not_stored(name, key, item_id, np.asarray(value))
    item: dict[str, Any] = {"id": item_id}
    if raw.native:
        item["pixel_values"] = cfg.normalize(raw.image)
        for key, dtype in (("objects", torch.long), ("distractor_items", torch.long)):
            if getattr(raw, key) is not None:
                item[key] = torch.from_numpy(np.asarray(getattr(raw, key))).to(dtype)
        for key in ("target", "distractor"):
            if getattr(raw, key) is not None:
                item[key] = torch.from_numpy(np.asarray(getattr(raw, key), dtype=np.float32))
    else:
        try:
            item["pixel_values"] = cfg(raw.image)
        except DataRefusal as exc:  # the image's own size (a thin strip): named, as the masks' refusals are
            raise DataRefusal(f"{name}: {item_id!r}: {exc}") from None
        for key in ("objects", "distractor_items"):
            if getattr(raw, key) is not None:
                item[key] = cfg.mask(getattr(raw, key), "labels")
        for key in ("target", "distractor"):
            if getattr(raw, key) is not None:
                item[key] = cfg.mask(getattr(raw, key), "fraction")
    # Stable key order: id, pixel_values, masks, extras.
    order = ("id", "pixel_values", "objects", "target", "distractor", "distractor_items")
    ordered = {k: item[k] for k in order if k in item}
    ordered.update(raw.extras)
    return ordered


def set_pil_limit(limit: int | None, *_: Any) -> None:
    """Set this process's PIL decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``) to ``limit``: a decoding
    worker's initializer, given the main process's limit as its workers start. A worker started by spawn or
    forkserver imports PIL afresh, with the default, so a limit the user raised (or lowered) did not reach it, and
    which images a run held depended on its worker count (review r35 C). Extra arguments (a DataLoader's worker id)
    are ignored."""
    Image.MAX_IMAGE_PIXELS = limit


def _refuse_ids_not_stored(name: str, key: str, item_id: str, ids: np.ndarray) -> None:
    """Object ids are 0 (background) or positive, and ``masks/objects`` is int32: a negative id or one past int32
    would not be stored as given, so the item is refused, named, with the renumbering that fixes it."""
    if not ids.size or not np.issubdtype(ids.dtype, np.integer):
        return
    low, high, bounds = int(ids.min()), int(ids.max()), np.iinfo(np.int32)
    renumber = "ids = np.unique(mask, return_inverse=True)[1].reshape(mask.shape)"
    if low < 0:
        raise DataRefusal(
            f"{name}: mask {key!r} of {item_id!r} holds negative ids (from {low}); object ids are 0 = background "
            f"and 1, 2, ... = objects. Map the negative ones to 0 if they mean 'no object' (mask[mask < 0] = 0), or "
            f"renumber them all: {renumber} (the smallest id becomes 0 = background)."
        )
    if high > bounds.max:
        raise DataRefusal(
            f"{name}: mask {key!r} of {item_id!r} holds ids {low}..{high}, outside int32 ({bounds.min}..{bounds.max}), "
            f"the type run files store them in. Renumber its objects: {renumber} (0 stays 0 = background)."
        )


def not_a_label_map(shape: tuple[int, ...]) -> str:
    """Why an (H, W, C) mask is refused, with the conversion (the end of a sentence naming the mask)."""
    return (
        f"is a {shape[2]}-channel ({shape[0]}, {shape[1]}, {shape[2]}) image, e.g. a colour-coded label PNG; a mask "
        "must be a 2-D (H, W) map of integer instance ids (0 = background; 'target' / 'distractor': nonzero = in "
        "the mask). Convert a colour-coded one with one id per colour: colours, ids = np.unique(rgb.reshape(-1, "
        f"{shape[2]}), axis=0, return_inverse=True); ids = ids.reshape(rgb.shape[:2]) (np.unique sorts the colours, "
        "so black becomes 0 = background when present), or decode its own scheme (COCO panoptic: R + 256 * G + "
        "65536 * B)."
    )


def collate(items: Sequence[dict[str, Any] | None]) -> dict[str, Any]:
    """Batch item dicts: tensors are stacked, everything else (ids, labels) becomes a list.

    ``None`` items (images that failed to decode) are dropped, so always read
    the ids from ``batch["id"]`` rather than assuming positions. An all-``None``
    batch gives ``{"id": []}``.

    Args:
        items: Items from an :class:`ImageDataset`, e.g. as a DataLoader's ``collate_fn``.

    Returns:
        ``{"id": list[str], "pixel_values": (B, 3, H, W), ...}``.

    Raises:
        QKHooksError: if items disagree in keys or tensor shapes (items from different datasets or configs).
    """
    kept = [it for it in items if it is not None]
    if not kept:
        return {"id": []}
    keys = list(kept[0])
    for it in kept[1:]:
        if list(it) != keys:
            raise QKHooksError(
                f"cannot batch items with different keys ({keys} vs {list(it)}); batch items of one dataset."
            )
    batch: dict[str, Any] = {}
    for key in keys:
        values = [it[key] for it in kept]
        if all(isinstance(v, torch.Tensor) for v in values):
            shapes = {tuple(v.shape) for v in values}
            if len(shapes) > 1:
                raise QKHooksError(
                    f"cannot stack {key!r} of shapes {sorted(shapes)}; use one ImageConfig for the whole batch."
                )
            batch[key] = torch.stack(values)
        else:
            batch[key] = values
    return batch


_UNREAD_IMAGE_EXTENSIONS = (".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".jp2", ".avif", ".heic",
                            ".heif", ".dng")
"""Image formats a folder holds that it does not read: named in a warning (review r45: left out without a word)."""


NAS_THUMBNAIL_FOLDERS = ("@eaDir",)
"""Folders a NAS keeps its own thumbnails of the photos beside them in (Synology's ``@eaDir/<photo>/SYNOFILE_THUMB_
*.jpg``), never the user's photos: a folder dataset, and ``hfds:`` of an image folder, leave them out (review r50: they
doubled a NAS photo folder)."""


def nas_thumbnail_folder(relative: str) -> str | None:
    """The NAS thumbnail folder (:data:`NAS_THUMBNAIL_FOLDERS`) a file's posix path relative to its root lies in, as
    that relative path, or None."""
    parts = relative.split("/")[:-1]
    at = next((k for k, part in enumerate(parts) if part in NAS_THUMBNAIL_FOLDERS), None)
    return None if at is None else "/".join(parts[:at + 1])


def nas_thumbnails_left_out(root: Path, folders: Sequence[str], count: int, stacklevel: int) -> None:
    """Warn that the ``count`` image files in the NAS thumbnail ``folders`` (relative to ``root``, sorted) were left
    out: one wording for a folder and for ``hfds:`` of an image folder (round 51: hfds: recorded them)."""
    if count:
        shown = ", ".join(f"{f}/" for f in folders[:5])
        more = f" and {len(folders) - 5} more" if len(folders) > 5 else ""
        s = "s" if len(folders) > 1 else ""
        many = count > 1
        warnings.warn(f"{count} image file{'s' if many else ''} in {len(folders)} Synology thumbnail folder{s} "
                      f"(@eaDir) under {root} {'are' if many else 'is'} not recorded: {shown}{more}; a NAS keeps its "
                      "own thumbnails of the photos beside them there, not photos. To record such a folder anyway, "
                      "point DATA at it itself.", stacklevel=stacklevel + 1)


def list_images(root: Path) -> list[str]:
    """Relative posix paths of image files under ``root``, sorted; hidden files and folders ignored. Symlinked
    subfolders are not followed (a link back up would loop), and a warning names them: their images are left out;
    so does one naming the image files of other formats (:data:`_UNREAD_IMAGE_EXTENSIONS`), which are not read, and
    one counting the images of a NAS's thumbnail folders (:data:`NAS_THUMBNAIL_FOLDERS`), which are left out."""
    found: list[str] = []
    linked: list[str] = []
    unread: list[str] = []
    thumbnails: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        thumbnails += [Path(dirpath, d) for d in sorted(dirnames) if d in NAS_THUMBNAIL_FOLDERS]
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in NAS_THUMBNAIL_FOLDERS)
        linked += [Path(dirpath, d).relative_to(root).as_posix() for d in dirnames if os.path.islink(Path(dirpath, d))]
        for name in filenames:
            if name.startswith("."):
                continue
            ext = os.path.splitext(name)[1].lower()
            if ext in IMAGE_EXTENSIONS:
                found.append(Path(dirpath, name).relative_to(root).as_posix())
            elif ext in _UNREAD_IMAGE_EXTENSIONS:
                unread.append(Path(dirpath, name).relative_to(root).as_posix())
    if thumbnails:
        count = sum(os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS
                    for folder in thumbnails for _, _, names in os.walk(folder) for name in names)
        nas_thumbnails_left_out(root, [f.relative_to(root).as_posix() for f in thumbnails], count, stacklevel=4)
    if linked:
        shown = ", ".join(f"{d}/" for d in linked[:5]) + (f" and {len(linked) - 5} more" if len(linked) > 5 else "")
        warnings.warn(f"{len(linked)} symlinked subfolder(s) of {root} are not followed, so their images are not "
                      f"recorded: {shown}; point DATA at such a folder itself, or link its files instead.", stacklevel=4)
    if unread and found:  # none found: the refusal names the extensions seen
        unread.sort()
        kinds = ", ".join(sorted({os.path.splitext(u)[1].lower() for u in unread}))
        shown = ", ".join(unread[:3]) + (f" and {len(unread) - 3} more" if len(unread) > 3 else "")
        warnings.warn(f"{len(unread)} image file{'s' if len(unread) > 1 else ''} under {root} have an extension a "
                      f"folder does not read ({kinds}): {shown}, so they are not recorded (a folder reads "
                      f"{' '.join(IMAGE_EXTENSIONS)}). Convert them to PNG (e.g. `mogrify -format png *.tif`), or pass "
                      "the paths as a Python list to qkhooks.record_dataset (any format PIL reads; each id is then "
                      "its path as given).", stacklevel=4)
    return sorted(found)
