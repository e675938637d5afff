"""Zeroed chunks (a disk page zeroed over a --checksum run's one-image chunks: all-zero bytes pass Fletcher-32) of the
per-image arrays whose zero can be told from a recorded value: an image's file time where the image is not read from
a file (then it is -1; a file's time may be 0, a tar member's often is), and the two-softmax terms (softmaxes, whose
rows sum to 1). The reader refuses them naming repair, verify names their rows and repair leaves the image out, as
for file sizes and hashes (round 50); a file whose time is 0 is read as 0."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import timm
import torch
from PIL import Image

import qkhooks
from qkhooks import QKHooksError
from qkhooks.store import RunWriter, open_run, repair, verify_run
from qkhooks.stream import record_dataset


def _tiny_vit() -> qkhooks.LoadedModel:
    torch.manual_seed(0)
    return qkhooks.load_model(timm.create_model("vit_small_patch16_224", pretrained=False, patch_size=32,
                                                embed_dim=32, depth=1, num_heads=2).eval())


def _photos(count: int) -> list[Image.Image]:
    rng = np.random.default_rng(3)
    return [Image.fromarray(rng.integers(0, 255, (40, 56, 3), np.uint8)) for _ in range(count)]


def _zero_chunk(run: Path, name: str, image: int) -> None:
    """Image ``image``'s chunk of ``name``, data and checksum, zeroed as a zeroed disk page leaves it."""
    with h5py.File(run, "r") as f:
        info = f[name].id.get_chunk_info_by_coord((image,) + (0,) * (f[name].ndim - 1))
    with open(run, "r+b") as fh:
        fh.seek(info.byte_offset)
        fh.write(bytes(info.size))


def _refused_everywhere(run: Path, name: str, image: int, n: int, want: np.ndarray, tmp_path: Path) -> None:
    """Every read of ``image`` refused naming repair, the others read; verify names its row; repair leaves it out."""
    others = [i for i in range(n) if i != image]
    with open_run(run) as reader:
        ids = reader.ids
        for key in (image, slice(None), [image - 1, image]):
            with pytest.raises(QKHooksError, match=f"image {image}.*{name}.*qkhooks repair"):
                reader.array(name)[key]
        np.testing.assert_array_equal(reader.array(name)[others], want[others])
    report = verify_run(run)
    assert not report.ok and report.damaged.get(name) == [(image, image + 1)], report.problems
    fixed = repair(run, tmp_path / "fixed.h5")
    assert fixed.lost == [image] and fixed.recovered == [ids[i] for i in others]
    with open_run(tmp_path / "fixed.h5") as got:
        np.testing.assert_array_equal(got.array(name)[:], want[others])


def test_a_zeroed_file_time_of_an_image_not_read_from_a_file_is_damage(tmp_path):
    run = tmp_path / "run.h5"
    record_dataset(_tiny_vit(), _photos(5), run, modes=2, layers="0", batch_size=4, progress=False, reducers=[],
                   checksum=True)
    with open_run(run) as reader:  # images held in memory: no file, so no size and no time (-1), a hash
        want = reader.array("images/file_mtimes")[:]
        assert list(want) == [-1] * 5 and list(reader.array("images/file_sizes")[:]) == [-1] * 5
    _zero_chunk(run, "images/file_mtimes", 2)
    _refused_everywhere(run, "images/file_mtimes", 2, 5, want, tmp_path)


def test_a_file_whose_time_is_zero_is_read_as_zero_not_taken_for_damage(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, photo in enumerate(_photos(4)):
        photo.save(folder / f"img{i}.png")
    os.utime(folder / "img2.png", ns=(0, 0))  # 1970-01-01, as a tar member's or a reproducible build's time
    run = tmp_path / "run.h5"
    record_dataset(_tiny_vit(), str(folder), run, modes=2, layers="0", batch_size=4, progress=False, reducers=[],
                   checksum=True)
    with open_run(run) as reader:
        times = dict(zip(reader.ids, reader.array("images/file_mtimes")[:]))
    assert times["img2.png"] == 0 and all(t == (folder / i).stat().st_mtime_ns for i, t in times.items())
    assert verify_run(run).ok
    assert repair(run, tmp_path / "fixed.h5").lost == []


def test_a_zeroed_chunk_of_a_two_softmax_term_is_damage(tmp_path):
    rng = np.random.default_rng(5)
    logits = rng.standard_normal((6, 2, 3, 5))
    terms = (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).astype(np.float16)  # softmax rows: sum to 1
    run = tmp_path / "run.h5"
    with RunWriter(run, checksum=True) as writer:
        for lo in (0, 3):
            writer.write_batch([f"im{i}" for i in range(lo, lo + 3)], {"terms/L0/softmax1": terms[lo:lo + 3]})
    _zero_chunk(run, "terms/L0/softmax1", 4)
    _refused_everywhere(run, "terms/L0/softmax1", 4, 6, terms, tmp_path)
