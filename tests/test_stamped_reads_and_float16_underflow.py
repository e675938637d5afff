"""Review r40 (REV): adversarial review of round 40's stamps, preference refusal and q/k reader refactor.

Each test here failed on the code before its fix (round 40 HEAD 235cb78)."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from qkhooks.analysis.preference import preference_from_rows
from qkhooks.data.items import read_oriented, stamps_read
from qkhooks.errors import QKHooksError


def test_a_multi_frame_file_decoded_from_its_stamped_bytes_is_named_in_the_first_frame_warning(tmp_path):
    """Before: inside stamps_read (every recording of files since round 40) the file is decoded from its bytes in
    memory, which have no filename, so the warning said "an image has 3 frames" instead of naming the file."""
    path = tmp_path / "anim.gif"
    rng = np.random.default_rng(0)
    frames = [Image.fromarray(rng.integers(0, 255, (8, 12, 3), dtype=np.uint8)) for _ in range(3)]
    frames[0].save(path, save_all=True, append_images=frames[1:])
    with warnings.catch_warnings(record=True) as caught, stamps_read() as seen:
        warnings.simplefilter("always")
        image, _ = read_oriented(str(path))
    messages = [str(w.message) for w in caught if "frames" in str(w.message)]
    assert messages and all(str(path) in m for m in messages), messages
    assert str(path) in seen  # still stamped, and still the first frame's pixels PIL gives for the path
    with Image.open(path) as reference:
        np.testing.assert_array_equal(np.asarray(image), np.asarray(reference.convert("RGB")))


def test_a_softmax_row_whose_patch_entries_underflowed_in_float16_is_refused_naming_float32_storage():
    """A real softmax row with a tiny positive patch mass (each entry < 3e-8) stored in float16 (a run file's
    default) reads as all-zero on the patches: refused, and the message must name the fix that applies to a softmax
    (--dtype float32), not only "leave those layers out", which would drop a layer that is a softmax."""
    t = torch.zeros(1, 2, 2)
    d = torch.zeros(1, 2, 2)
    t[:, 0, 0], d[:, 1, 1] = 1.0, 1.0
    logits = torch.tensor([30.0, 12.0, 12.0, 12.0, 12.0])  # CLS first: patch entries exp(-18) ~ 1.5e-8 each
    row = torch.softmax(logits.double(), -1)
    assert float(row[1:].sum()) > 0 and float(row[1:].max()) < 3e-8  # a distribution over the patches in float64
    stored = row.to(torch.float16).double()  # as the run file keeps it
    assert float(stored[1:].sum()) == 0.0
    rows = torch.stack([stored, torch.full((5,), 0.2, dtype=torch.float64)])[None, None]  # (1, 1, 2, 5)
    with pytest.raises(QKHooksError, match="no attention distribution over the patch tokens") as err:
        preference_from_rows(rows, t, d, 1, layer=11)
    assert "--dtype float32" in str(err.value)


def test_a_large_file_that_is_no_image_is_refused_from_its_header_not_read_whole_first(tmp_path):
    """Before: inside stamps_read every path was read whole into memory before PIL looked at it, so a large
    non-image file in a list of paths (a video under an image's name) cost its whole size in memory per worker, and
    /dev/zero ran the process out of memory, where PIL's decode of the path refuses both from their headers."""
    import tracemalloc

    path = tmp_path / "video.jpg"
    path.write_bytes(b"this is no image. " * (2 << 20))  # 36 MB
    tracemalloc.start()
    try:
        with stamps_read() as seen, pytest.raises(Image.UnidentifiedImageError, match=re.escape(repr(str(path)))):
            read_oriented(str(path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"{peak / 2**20:.1f} MB allocated to refuse a non-image file"
    assert str(path) not in seen  # no stamp of a file never read
    # an image still decodes from the bytes it is stamped with (a second identification does not change them)
    image_path = tmp_path / "a.png"
    pixels = np.random.default_rng(1).integers(0, 255, (6, 7, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(image_path)
    with stamps_read() as seen:
        image, orientation = read_oriented(str(image_path))
    np.testing.assert_array_equal(np.asarray(image), pixels)
    assert orientation == 1 and seen[str(image_path)][0] == image_path.stat().st_size
