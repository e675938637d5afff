"""Review r40 (REV): adversarial review of round 40's stamps, preference refusal and q/k reader refactor.

Each test here failed on the code before its fix (round 40 HEAD 235cb78)."""

from __future__ import annotations

import warnings

import numpy as np
from PIL import Image

from qkhooks.data.items import read_oriented, stamps_read


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
