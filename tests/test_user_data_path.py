"""Round 45's review of the user's own data path, from a researcher's seat: each test reproduces a result that was
wrong without a word (pixels other than the model's own processor gives, checked against that processor's PIL
backend) or an error that did not name the problem and the fix, and checks the fix."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from qkhooks.data import ImageConfig
from qkhooks.errors import QKHooksError


def _wide_photo() -> Image.Image:
    rng = np.random.default_rng(0)
    small = rng.integers(0, 255, (13, 51, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((400, 100), Image.BICUBIC)


# ------------------------------------------------------------------ processor settings from_hf did not read
# Each processor gave other pixels (or another input size) than ImageConfig.from_hf of its own config, without a
# word: a long side capped by longest_edge (the crop then pads), EfficientNet's second division by the std
# (include_top), Perceiver's crop before its resize, DeepSeek-OCR 2's tiles; VitPose's affine crop by boxes was a
# bare KeyError('resample').
REFUSED = [
    (lambda: transformers.CLIPImageProcessorPil(size={"shortest_edge": 64, "longest_edge": 100},
                                                crop_size={"height": 64, "width": 64}), r"longest_edge"),
    (lambda: transformers.EfficientNetImageProcessorPil(size={"height": 64, "width": 64}), r"include_top=True"),
    (lambda: transformers.EfficientNetImageProcessorPil(size={"height": 64, "width": 64}, include_top=False,
                                                        rescale_offset=True), r"rescale_offset=True"),
    (lambda: transformers.PerceiverImageProcessorPil(size={"height": 48, "width": 48},
                                                     crop_size={"height": 64, "width": 64}), r"Perceiver"),
    (lambda: transformers.DeepseekOcr2ImageProcessorPil(size={"height": 64, "width": 64}), r"crop_to_patches=True"),
    (lambda: transformers.DeepseekOcr2ImageProcessorPil(size={"height": 64, "width": 64}, crop_to_patches=False,
                                                        tile_size=48), r"tile_size=48"),
    (lambda: transformers.VitPoseImageProcessorPil(), r"do_affine_transform=True"),
]


@pytest.mark.parametrize("build, setting", REFUSED, ids=["longest_edge", "include_top", "rescale_offset",
                                                         "perceiver", "crop_to_patches", "tile_size",
                                                         "affine"])
def test_processor_settings_that_change_the_pixels_are_refused_not_dropped(build, setting):
    processor = build()
    config = processor.to_dict()
    try:
        ours = ImageConfig.from_hf(config)
    except QKHooksError as exc:
        assert re.search(setting, str(exc)), str(exc)
        assert "ImageConfig(" in str(exc)  # the fix: build it by hand
        return
    # accepted: then it must give the processor's own pixels (it did not: the reason for this test)
    photo = _wide_photo()
    theirs = processor(images=photo, return_tensors="pt")["pixel_values"][0]
    mine = ours(photo)
    assert mine.shape == theirs.shape and torch.allclose(mine, theirs, atol=1e-6, rtol=0), (
        f"{type(processor).__name__}: from_hf accepted {config} but gave other pixels")
    pytest.fail(f"{type(processor).__name__}'s {setting} was neither read nor refused")


def test_a_shortest_edge_without_a_long_side_cap_still_gives_the_processors_pixels():
    processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
    photo = _wide_photo()
    theirs = processor(images=photo, return_tensors="pt")["pixel_values"][0]
    assert torch.allclose(ImageConfig.from_hf(processor.to_dict())(photo), theirs, atol=1e-6, rtol=0)


# ------------------------------------------------------------------ decoding workers that cannot start or that die
def _photos(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(1)
    return [Image.fromarray(rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8)) for i in range(n)]


class _WithALambda(torch.utils.data.Dataset):
    """A Dataset holding a lambda (a loader, a transform of its own): it cannot be pickled."""

    def __init__(self) -> None:
        self.images, self.load = _photos(4), lambda image: image

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Image.Image:
        return self.load(self.images[index])


class _DiesInAWorker(torch.utils.data.Dataset):
    """A Dataset whose item 2 ends the process reading it when that is not the process that made it (a worker killed
    for memory, a crash inside a decoder)."""

    def __init__(self) -> None:
        self.images, self.parent = _photos(4), __import__("os").getpid()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Image.Image:
        import os

        if index == 2 and os.getpid() != self.parent:
            os._exit(9)
        return self.images[index]


def _config() -> ImageConfig:
    return ImageConfig(size=(16, 16), mean=(0.5,) * 3, std=(0.5,) * 3)


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_workers_that_must_pickle_an_unpicklable_dataset_are_refused_naming_the_fix(monkeypatch, method):
    """With the spawn (macOS, Windows) or forkserver (Linux from Python 3.14) start method, the workers get the
    dataset pickled: a Dataset holding a lambda stopped the run with a bare AttributeError("Can't pickle local
    object ...") from inside multiprocessing."""
    import multiprocessing

    from qkhooks.data import open_source
    from qkhooks.data import sources

    stream = open_source(_WithALambda(), _config())
    context = multiprocessing.get_context(method)
    monkeypatch.setattr(sources.multiprocessing, "get_context", lambda *a: context)
    with pytest.raises(QKHooksError, match=rf"(?s)workers.*'{method}'.*pickle.*_WithALambda.*num_workers=0 "
                                           r"\(--workers 0\)"):
        list(stream.batches(2, workers=1))
    assert [len(b.items) for b in stream.batches(2, workers=0)] == [2, 2]  # the fix named works


def test_a_worker_that_dies_is_named_with_the_items_it_held_and_the_fix():
    """A worker process that ended abruptly stopped the run with concurrent.futures' BrokenProcessPool ("A process
    in the process pool was terminated abruptly ..."), which names neither the data, nor where, nor what to do."""
    from qkhooks.data import open_source

    stream = open_source(_DiesInAWorker(), _config())
    with pytest.raises(QKHooksError, match=r"(?s)decoding worker.*torch:_DiesInAWorker.*items \d+\.\.3 .*"
                                           r"num_workers=0 \(--workers 0\).*resume") as caught:
        list(stream.batches(2, workers=1))
    assert int(re.search(r"items (\d+)\.\.", str(caught.value)).group(1)) <= 2  # the range holds the item that died
    assert "import the dataset's class" not in str(caught.value)  # forked workers import nothing
    assert [b.end for b in stream.batches(2, workers=0)] == [2, 4]


# ------------------------------------------------------------------ a resume over a Dataset that changed
class _InMemory(torch.utils.data.Dataset):
    """A torch Dataset of in-memory photos, named by position (no id, no file): what a resume of it keeps cannot be
    checked by id or by file."""

    def __init__(self, photos: list[Image.Image]) -> None:
        self.photos = photos

    def __len__(self) -> int:
        return len(self.photos)

    def __getitem__(self, index: int) -> Image.Image:
        return self.photos[index]


def test_a_resume_over_a_dataset_of_another_length_is_refused_where_its_items_cannot_be_checked(tmp_path):
    """A torch Dataset of 8 photos, stopped after 4, resumed over one of 6 (two removed): the stream went on at
    position 4 and finished a run of 8 images, 4 of one data set and 4 of another, named 0..7, without a word."""
    from test_review_symlinks_repair_messages import _KW, _interrupted
    from test_spectrum_edits_and_dataparallel import _tiny_loaded

    import qkhooks

    loaded, run = _tiny_loaded(), tmp_path / "run.h5"
    photos = _photos(8)
    _interrupted(loaded, run, batches=2, data=_InMemory(photos))
    with qkhooks.open_run(run) as before:
        kept = before.n
    with pytest.raises(QKHooksError, match=r"(?s)cannot resume .*run\.h5.*has 6 items now.*recorded from 8.*"
                                           r"new --out.*--overwrite"):
        qkhooks.record_dataset(loaded, _InMemory(photos[:2] + photos[4:]), run, resume=True, **_KW)
    with qkhooks.open_run(run) as after:  # the refusal left the file as it was
        assert after.n == kept
    import warnings

    with warnings.catch_warnings():  # the same photos: taken, and checked since round 47 (read again: no warning)
        warnings.simplefilter("error")
        assert qkhooks.record_dataset(loaded, _InMemory(photos), run, resume=True, **_KW).images == 8


def test_a_resume_whose_kept_items_cannot_be_checked_says_so(tmp_path):
    """The same Dataset with other photos in it (same length): it went on without a word (round 45: with a warning
    that its kept items were not checked). Round 47 reads a torch Dataset's kept items again, and an iterable's where
    the resume skips them: refused, naming the first."""
    from test_review_symlinks_repair_messages import _KW, _interrupted
    from test_spectrum_edits_and_dataparallel import _tiny_loaded

    import qkhooks

    loaded, run = _tiny_loaded(), tmp_path / "run.h5"
    _interrupted(loaded, run, batches=2, data=_InMemory(_photos(8)))
    with pytest.raises(QKHooksError, match=r"(?s)\d+ of the \d+ images it keeps hold other bytes .*first: '0'"):
        qkhooks.record_dataset(loaded, _InMemory(_photos(8)[::-1]), run, resume=True, **_KW)
    other = tmp_path / "other.h5"
    _interrupted(loaded, other, batches=2, data=iter(_photos(8)))
    with pytest.raises(QKHooksError, match=r"(?s)\d+ of the \d+ images it keeps hold other bytes .*first: '0'"):
        qkhooks.record_dataset(loaded, iter(_photos(8)[::-1]), other, resume=True, **_KW)


# ------------------------------------------------------------------ the user's own code failing: where, and why
class _LenLies(torch.utils.data.Dataset):
    """__len__ counts 8 items, __getitem__ holds 5."""

    def __init__(self) -> None:
        self.photos = _photos(5)

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> Image.Image:
        return self.photos[index]


def test_a_dataset_whose_len_counts_more_items_than_it_holds_is_named_so():
    """The IndexError said only "list index out of range (while qkhooks read item 5 of torch:_LenLies)"."""
    from qkhooks.data import open_source

    with pytest.raises(IndexError) as caught:
        list(open_source(_LenLies(), _config()).batches(2))
    notes = " ".join(getattr(caught.value, "__notes__", []))
    assert re.search(r"item 5 of torch:_LenLies.*__len__ says 8.*Subset\(dataset, range\(5\)\)", notes), notes


def test_a_generator_that_raises_midway_is_named_with_the_item_it_stopped_at():
    """A generator raising at its item 3 stopped the run with its own error alone: no word of which item or source."""
    from qkhooks.data import open_source

    def photos():
        for index, photo in enumerate(_photos(6)):
            if index == 3:
                raise ValueError("a row of my own reader is broken")
            yield photo

    with pytest.raises(ValueError, match="a row of my own reader") as caught:
        list(open_source(photos(), _config()).batches(2))
    notes = " ".join(getattr(caught.value, "__notes__", []))
    assert re.search(r"while qkhooks read item 3 of iterable:generator", notes), notes


# ------------------------------------------------------------------ a folder's images of other formats
def test_a_folders_images_of_formats_it_does_not_read_are_named_not_left_out_without_a_word(tmp_path):
    """A folder of PNGs and TIFFs (microscopy, scans) recorded its PNGs and left the TIFFs out without a word: the
    folder spec reads .jpg .jpeg .png .webp only, and said so only where it held no such file at all."""
    from qkhooks.data import open_dataset

    for name, value in (("a.png", 10), ("b.tif", 20), ("sub/c.BMP", 30), ("d.png", 40), ("notes.txt", None)):
        path = tmp_path / "photos" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if value is None:
            path.write_text("not an image")
        else:
            Image.fromarray(np.full((12, 14, 3), value, np.uint8)).save(path)
    with pytest.warns(UserWarning, match=r"(?s)2 image files under .*photos have an extension a folder does not read "
                                         r"\(\.bmp, \.tif\).*b\.tif.*not recorded.*Python list") as caught:
        dataset = open_dataset(str(tmp_path / "photos"), _config())
    assert dataset.ids == ["a.png", "d.png"]
    assert not any("notes.txt" in str(w.message) for w in caught)  # files that are not images are not named
