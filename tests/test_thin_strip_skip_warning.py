"""Round 51, helper DATA: the warning that a folder's image is skipped names its file once."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from qkhooks.data import open_dataset
from qkhooks.data.preprocess import ImageConfig


def test_a_thin_strip_skipped_from_a_folder_is_named_once_in_its_warning(tmp_path, monkeypatch):
    """Before: "skipping image the model's preprocessing cannot take DIR/strip.png (DIR: 'strip.png': an image of
    1x400 pixels ...)": the preprocessing's refusal opens with the dataset's name and the image's id, which the
    warning did not take off as it takes off the file's path, so the file was named twice. Now once, with the reason
    after it; the skipped list keeps the full reason."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200_000)
    Image.fromarray(np.zeros((1, 400, 3), np.uint8)).save(tmp_path / "strip.png")
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(tmp_path / "photo.png")
    ds = open_dataset(str(tmp_path), ImageConfig(size=(16, 16), resize=64, mean=(0.5,) * 3, std=(0.5,) * 3))
    with pytest.warns(UserWarning) as said:
        items = [ds[i] for i in range(len(ds))]
    assert [item["id"] for item in items if item is not None] == ["photo.png"]
    (message,) = [str(w.message) for w in said]
    assert message.count("strip.png") == 1
    assert message.startswith(f"skipping image the model's preprocessing cannot take {tmp_path / 'strip.png'} (an "
                              "image of 1x400 pixels (height x width) would be resized to 64x25600 ")
    assert [(item_id, reason.startswith(f"{tmp_path}: 'strip.png': an image of 1x400")) for item_id, reason
            in ds.skipped] == [("strip.png", True)]
