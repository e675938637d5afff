"""Round 21 (data): a PNG text chunk keyed 'xmp' after the image data refused at open."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_data_r20 import CFG, _chunk, _decoded_orientation, _o3_masks, _png

from qkhooks.data import open_dataset
from qkhooks.data.items import _shown_frame
from qkhooks.errors import QKHooksError

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
