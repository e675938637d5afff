"""Round 21 (data): a streamed photo with masks opened once, a PNG text chunk keyed 'xmp' after the image data refused
at open."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps
from test_data_r20 import CFG, _chunk, _counting_opens, _decoded_orientation, _noise_jpeg, _o3_masks, _png

from qkhooks.data import open_dataset
from qkhooks.data.items import _shown_frame
from qkhooks.data.readers import _item_to_raw
from qkhooks.errors import QKHooksError

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
        assert _shown_frame(photo, "photo") == expected
