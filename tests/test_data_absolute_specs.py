"""Round 19 (data): where a run's photos came from (qkhooks.data_files), what a folder reads, masks of EXIF-rotated
ADE20K photos checked at open, and a streamed source's mask refusal mid-run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import qkhooks
from qkhooks.data import ImageConfig, open_dataset
from qkhooks.data_files import SIZES_ATTR, absolute_spec, changed_files, file_sizes, recorded_sizes
from qkhooks.errors import QKHooksError
from qkhooks.store import open_run
from qkhooks.stream import record_dataset

from conftest import noise_photos

CFG = ImageConfig(size=(32, 32), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def _tiny_loaded() -> qkhooks.LoadedModel:
    import timm

    torch.manual_seed(0)
    return qkhooks.load_model(timm.create_model("vit_small_patch16_224", pretrained=False, img_size=32, patch_size=16,
                                                embed_dim=32, depth=1, num_heads=2).eval())


def _ade(root: Path, stems: list[str], size: tuple[int, int] = (20, 30)) -> None:
    """An ADEChallengeData2016 layout: noise photos with one class map each (class 4 on the left half)."""
    noise_photos(root / "images" / "training", [f"{s}.jpg" for s in stems], size)
    (root / "annotations" / "training").mkdir(parents=True)
    classes = np.zeros(size, np.uint8)
    classes[:, : size[1] // 2] = 4
    for s in stems:
        Image.fromarray(classes).save(root / "annotations" / "training" / f"{s}.png")


def _o3(root: Path, stems: list[str], size: tuple[int, int] = (20, 30)) -> None:
    noise_photos(root / "images", [f"{s}.png" for s in stems], size)
    for sub, box in (("targ_images", np.s_[2:6, 2:6]), ("dist_images", np.s_[10:15, 10:20])):
        (root / sub).mkdir()
        mask = np.zeros(size, np.uint8)
        mask[box] = 255
        for s in stems:
            Image.fromarray(mask).save(root / sub / f"{s}.png")


# ------------------------------------------------------------------------------ absolute_spec


def test_absolute_spec_makes_every_kind_of_local_path_absolute_and_leaves_names_alone(tmp_path, monkeypatch):
    """Each branch of absolute_spec against os.path.abspath: local paths (folders, ade20k:, o3dir:, hfds: with and
    without a split, wds: patterns, joins, ~, a symlink kept by its own name) become absolute; named specs (even
    with a folder of that name here), hub names, URLs, pipes, missing paths and non-strings stay as given."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for folder in ("imgs", "ade", "o3", "hf", "my+data", "samples", "voc", "shards", "home/photos", "org"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "data.parquet").write_bytes(b"")
    (tmp_path / "link").symlink_to(tmp_path / "imgs")
    t = str(tmp_path)
    expected = {
        "imgs": f"{t}/imgs", "./imgs/": f"{t}/imgs", "link": f"{t}/link", "~/photos": f"{t}/home/photos",
        "missing": "missing", "samples": "samples", "voc": "voc", "arc2017": "arc2017", "o3:8:1": "o3:8:1",
        "ade20k:ade": f"ade20k:{t}/ade", "ade20k:/elsewhere": "ade20k:/elsewhere", "ade20k:": "ade20k:",
        "ade20k:missing": "ade20k:missing", "o3dir:o3": f"o3dir:{t}/o3", "o3dir:~/photos": f"o3dir:{t}/home/photos",
        "hfds:hf": f"hfds:{t}/hf", "hfds:hf:validation": f"hfds:{t}/hf:validation",
        "hfds:data.parquet": f"hfds:{t}/data.parquet", "hfds:my+data": f"hfds:{t}/my+data",
        "hfds:ILSVRC/imagenet-1k:validation": "hfds:ILSVRC/imagenet-1k:validation", "hfds:org/name": "hfds:org/name",
        "hfds:https://host/x": "hfds:https://host/x",
        "wds:shards/part-{000..009}.tar": f"wds:{t}/shards/part-{{000..009}}.tar",
        "wds:part-{0..1}.tar": f"wds:{t}/part-{{0..1}}.tar", "wds:nowhere/part.tar": "wds:nowhere/part.tar",
        "wds:https://host/part-{0..1}.tar": "wds:https://host/part-{0..1}.tar",
        "wds:pipe:cat a.tar": "wds:pipe:cat a.tar",
        "my+data": f"{t}/my+data", "imgs+ade20k:ade": f"{t}/imgs+ade20k:{t}/ade", "samples+imgs": f"samples+{t}/imgs",
        "voc+o3:4": "voc+o3:4", "": "",
    }
    for spec, absolute in expected.items():
        assert absolute_spec(spec) == absolute, spec
        assert absolute_spec(absolute) == absolute, absolute  # made once, stays so
    assert absolute_spec(Path("imgs")) == f"{t}/imgs" and absolute_spec(Path("missing")) == Path("missing")
    mine = [{"image": "x.png"}]
    assert absolute_spec(mine) is mine and absolute_spec(None) is None


def test_an_absolute_spec_opens_the_same_files_from_any_folder(tmp_path, monkeypatch):
    """The reference is the spec as typed, opened in its own folder: from another folder (which holds other files of
    the same names) the absolute spec gives the same ids and the same pixels."""
    here, there = tmp_path / "here", tmp_path / "there"
    noise_photos(here / "imgs", ["a.png", "b/c.png"], seed=1)
    noise_photos(there / "imgs", ["a.png", "b/c.png"], seed=2)
    _ade(here / "ade", ["ADE_1"])
    _o3(here / "o3", ["d"])
    spec = "imgs+ade20k:ade+o3dir:o3"
    monkeypatch.chdir(here)
    typed = open_dataset(spec, CFG)
    pixels = [typed[i]["pixel_values"] for i in range(len(typed))]  # read here (a dataset reads its files lazily)
    absolute = absolute_spec(spec)
    monkeypatch.chdir(there)
    reopened = open_dataset(absolute, CFG)
    assert reopened.ids == typed.ids == ["a.png", "b/c.png", "training/ADE_1.jpg", "d.png"]
    for i, expected in enumerate(pixels):
        assert torch.equal(reopened[i]["pixel_values"], expected)
    assert not torch.equal(open_dataset("imgs", CFG)[0]["pixel_values"], pixels[0])  # the spec as typed: others


def test_a_folder_opened_by_a_relative_path_loads_its_own_files_after_a_change_of_directory(tmp_path, monkeypatch):
    """Images load lazily: a dataset opened as "imgs" in one folder reads those files even when the working directory
    changes before an item is loaded (to a folder with other files of the same names)."""
    here, there = tmp_path / "here", tmp_path / "there"
    noise_photos(here / "imgs", ["a.png"], seed=1)
    noise_photos(there / "imgs", ["a.png"], seed=2)
    monkeypatch.chdir(there)
    reference = open_dataset("imgs", CFG)[0]["pixel_values"]  # "imgs" of there, opened and read there
    monkeypatch.chdir(here)
    opened_here = open_dataset("imgs", CFG)
    monkeypatch.chdir(there)
    assert not torch.equal(opened_here[0]["pixel_values"], reference)
    monkeypatch.chdir(here)
    assert torch.equal(opened_here[0]["pixel_values"], open_dataset("imgs", CFG)[0]["pixel_values"])


@pytest.mark.parametrize("kind", ["o3dir", "ade20k"])
def test_an_annotated_dataset_opened_by_a_relative_path_loads_its_own_files_after_a_change_of_directory(
        tmp_path, monkeypatch, kind):
    """As for folders: ``o3dir:o3`` / ``ade20k:ade`` opened in one folder read that folder's photos after a change of
    working directory (to a folder with other photos of the same names)."""
    here, there = tmp_path / "here", tmp_path / "there"
    for root, seed in ((here, 1), (there, 2)):
        if kind == "o3dir":
            _o3(root / "d", ["a"])
            noise_photos(root / "d" / "images", ["a.png"], (20, 30), seed=seed)
        else:
            _ade(root / "d", ["ADE_1"])
            noise_photos(root / "d" / "images" / "training", ["ADE_1.jpg"], (20, 30), seed=seed)
    monkeypatch.chdir(here)
    opened_here = open_dataset(f"{kind}:d", CFG)
    reference = opened_here[0]["pixel_values"]
    monkeypatch.chdir(there)
    assert torch.equal(opened_here[0]["pixel_values"], reference)
    assert not torch.equal(open_dataset(f"{kind}:d", CFG)[0]["pixel_values"], reference)


# ------------------------------------------------------------------------------ file sizes and changed files


def test_annotated_datasets_keep_their_photos_sizes_like_a_folder(tmp_path):
    """ade20k: and o3dir: photos are files too: a run keeps their sizes, and a photo replaced by another file is
    found when the dataset is reopened (before, only plain folders kept sizes, so other photos were drawn)."""
    _ade(tmp_path / "ade", ["ADE_1", "ADE_2"])
    _o3(tmp_path / "o3", ["d", "e"])
    for spec, photos in ((f"ade20k:{tmp_path / 'ade'}", tmp_path / "ade" / "images"), (f"o3dir:{tmp_path / 'o3'}",
                                                                                          tmp_path / "o3" / "images")):
        out = tmp_path / f"{spec[:3]}.h5"
        record_dataset(_tiny_loaded(), spec, out, modes=2, layers="0", progress=False)
        with open_run(out) as run:
            attrs, ids = dict(run.attrs), list(run.ids)
            stored = recorded_sizes(run, ids, range(len(ids)))
        assert stored == {i: (photos / i).stat().st_size for i in ids} and len(stored) == 2
        assert changed_files(attrs, open_dataset(spec, CFG), ids, stored) == ""
        Image.new("RGB", (30, 20), (9, 9, 9)).save(photos / ids[1])  # same name and size in pixels, another photo
        said = changed_files(attrs, open_dataset(spec, CFG), ids, stored)
        assert f"1 of the 2 images to draw in {spec!r} are not the files this run recorded (first: {ids[1]!r}" in said


def test_file_sizes_leave_out_files_gone_and_non_file_data(tmp_path):
    noise_photos(tmp_path / "imgs", ["a.png", "b.png", "c.png"])
    dataset = open_dataset(str(tmp_path / "imgs"), CFG)
    (tmp_path / "imgs" / "b.png").unlink()  # gone after the open: left out, the recording skips it and says why
    sizes = {i: (tmp_path / "imgs" / i).stat().st_size for i in ("a.png", "c.png")}
    assert file_sizes(dataset) == sizes
    assert file_sizes(dataset, ["c.png", "b.png", "zz.png"]) == {"c.png": sizes["c.png"]}
    assert file_sizes(open_dataset("o3:2", CFG)) == {} and file_sizes([{"image": "x.png"}]) == {}


def test_changed_files_without_usable_sizes_judges_only_a_relative_spec(tmp_path, monkeypatch):
    """A run without (readable) sizes: images missing from a folder it names relatively mean another folder; an
    absolute one, or a damaged sizes attribute with every image there, is not judged."""
    monkeypatch.chdir(tmp_path)
    noise_photos(tmp_path / "imgs", ["a.png"])
    dataset = open_dataset("imgs", CFG)
    for attrs in ({"data": "imgs"}, {"data": "imgs", SIZES_ATTR: "{not json"}, {"data": "imgs", SIZES_ATTR: None}):
        assert changed_files(attrs, dataset, ["a.png"]) == ""
        assert "not in 'imgs' (first: 'b.png')" in changed_files(attrs, dataset, ["a.png", "b.png"])
    assert changed_files({"data": str(tmp_path / "imgs")}, dataset, ["a.png", "b.png"]) == ""  # counted by the caller


# ------------------------------------------------------------------------------ what a folder reads (README)


def test_a_folder_reads_jpg_png_webp_only_and_follows_symlinked_files_not_folders(tmp_path):
    """README: '.jpg .jpeg .png .webp in any letter case, other extensions such as gif, bmp and tif are not read,
    and symlinked subfolders are not followed (symlinked files are)'."""
    root, outside = tmp_path / "photos", tmp_path / "outside"
    noise_photos(root, ["a.png", "b.JPEG", "c.webp", "d.gif", "e.bmp", "f.tif", "g.TIFF", "sub/h.jpg"])
    noise_photos(outside, ["i.png", "j.png"])
    (root / "linked_dir").symlink_to(outside)
    (root / "linked_file.png").symlink_to(outside / "j.png")
    (root / "sub" / "loop").symlink_to(root)  # a loop is harmless: not followed
    dataset = open_dataset(str(root), CFG)
    assert dataset.ids == ["a.png", "b.JPEG", "c.webp", "linked_file.png", "sub/h.jpg"] and dataset.skipped == []
    linked = dataset.ids.index("linked_file.png")
    assert torch.equal(dataset[linked]["pixel_values"], CFG(Image.open(outside / "j.png")))
    assert file_sizes(dataset)["linked_file.png"] == (outside / "j.png").stat().st_size


# ------------------------------------------------------------------------------ EXIF frames of ADE20K masks


def _rotated_jpeg(path: Path, size: tuple[int, int], orientation: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(np.zeros((*size, 3), np.uint8)).save(path, exif=exif)


def test_an_ade20k_mask_whose_frame_cannot_be_told_is_refused_at_open_and_nothing_is_written(tmp_path):
    """Last round this was found only when the item was loaded, mid-run, after earlier batches were written."""
    root = tmp_path / "ade"
    _ade(root, ["ADE_1", "ADE_2", "ADE_3"], size=(24, 24))
    _rotated_jpeg(root / "images" / "training" / "ADE_3.jpg", (24, 24), 6)  # square: both frames are 24x24
    with pytest.raises(QKHooksError, match=r"ADE_3\.jpg.*orientation 6.*cannot be told.*exif_transpose"):
        open_dataset(f"ade20k:{root}", CFG)
    out = tmp_path / "run.h5"
    with pytest.raises(QKHooksError, match=r"ADE_3\.jpg.*cannot be told"):
        record_dataset(_tiny_loaded(), f"ade20k:{root}", out, modes=2, layers="0", batch_size=1, progress=False)
    assert not out.exists()
    assert open_dataset(f"ade20k:{root}", CFG, limit=2).ids == ["training/ADE_1.jpg", "training/ADE_2.jpg"]
    _rotated_jpeg(root / "images" / "training" / "ADE_3.jpg", (24, 36), 6)  # fits neither frame
    with pytest.raises(QKHooksError, match=r"ADE_3\.jpg: the 'objects' mask .*ADE_3\.png has size 24x24, but the "
                                           r"photo is 36x24 as shown"):
        open_dataset(f"ade20k:{root}", CFG)
    _rotated_jpeg(root / "images" / "training" / "ADE_3.jpg", (24, 24), 1)
    (root / "annotations" / "training" / "ADE_3.png").write_bytes(b"not a png")  # an upright photo's annotation
    assert len(open_dataset(f"ade20k:{root}", CFG)) == 3  # is not read at open: only rotated photos' are
    (root / "images" / "training" / "ADE_2.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(QKHooksError, match=r"ADE20K image .*ADE_2\.jpg cannot be read"):
        open_dataset(f"ade20k:{root}", CFG)


# ------------------------------------------------------------------------------ masks missing late in a stream


def _photos(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) for _ in range(n)]


@pytest.mark.parametrize("workers", [0, 2])
def test_masks_missing_late_in_a_stream_leave_a_run_the_message_says_how_to_continue(tmp_path, workers):
    """A generator whose item 5 lacks the 'objects' mask the others have: refused after 4 images are committed
    (batches of 2). The message names the item, the file, the images it holds and both ways on; resuming after
    the fix gives the run a clean recording gives (same ids, masks and maps)."""
    photos, mask = _photos(7), np.ones((32, 32), np.int64)
    lacking = 5

    def items(fixed: bool):
        for i, photo in enumerate(photos):
            yield {"image": photo, "id": f"p{i}", **({} if i == lacking and not fixed else {"objects": mask * (i + 1)})}

    out, loaded = tmp_path / "run.h5", _tiny_loaded()
    opts = dict(modes=2, layers="0", batch_size=2, progress=False, num_workers=workers, checkpoint_every=1)
    with pytest.raises(QKHooksError) as refused:
        record_dataset(loaded, items(False), out, **opts)
    said = str(refused.value)
    assert f"item {lacking} (id 'p{lacking}') has no 'objects' mask, but item 0 (id 'p0') has" in said
    assert f"The 4 images before it stay committed in {out}: fix the data and run the same command with --resume" \
        in said
    assert "or start again with --overwrite" in said
    with open_run(out) as run:
        assert run.n == 4 and not run.complete
    record_dataset(loaded, items(True), out, resume=True, **opts)
    record_dataset(loaded, items(True), tmp_path / "clean.h5", **opts)
    with open_run(out) as run, open_run(tmp_path / "clean.h5") as clean:
        assert run.complete and run.ids == clean.ids == [f"p{i}" for i in range(7)]
        np.testing.assert_array_equal(run.array("masks/objects")[:], clean.array("masks/objects")[:])
        np.testing.assert_array_equal(run.query(0)[:], clean.query(0)[:])
