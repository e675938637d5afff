"""Round 47, helper DATA: what round 46 left open in the resume's check of images held in memory.

A resume of a list of in-memory images (or of a map-style Hugging Face dataset's bytes) hashes every kept image
again before it goes on: a list of 100,000 224x224 arrays took about 25 s (20,000 in 5 s measured) without a word.
It now shows a progress bar, as the recording does, where that takes over two seconds (a quick check says nothing).

A torch map-style Dataset (or another sequence that is no list or tuple, a DataLoader's dataset, a Subset) of in-memory
images stored -1 and resumed with a warning that its kept images were not checked: another Dataset of the same length
resumed into one run of two data sets. Its in-memory images are now stamped with the BLAKE2b of their content as a
list's are, and a resume reads its kept items again through ``__getitem__`` (once) and refuses any that differs; a
Dataset of file paths has its kept files checked alike. An iterable's alike, read where the resume skips them
anyway (no second pass)."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import qkhooks
from qkhooks import QKHooksError
from qkhooks.store import format as fmt
from qkhooks.data import readers
from test_review_symlinks_repair_messages import _KW, _interrupted
from test_spectrum_edits_and_dataparallel import _tiny_loaded
from test_resume_hf_image_bytes import _hf, _kept, _pngs, _stored
from test_resume_in_memory_images import _arrays, _mixed, _reference

datasets = pytest.importorskip("datasets")


def test_the_kept_images_hashes_are_those_of_their_content_and_their_check_shows_a_bar(capsys, monkeypatch):
    """held_hashes with progress: the same hashes (hashlib's), and a bar counting every kept item where the check
    runs past the bar's delay (here 0 s); with the default delay, a quick check says nothing, nor without progress."""
    arrays = _arrays(0, n=6)
    reader = readers.MapReader(arrays)
    expected = [(str(i), _reference(a)) for i, a in enumerate(arrays[:5])]
    assert reader.held_hashes(5, progress=True) == expected  # quick: under the default 2 s
    assert reader.held_hashes(5) == expected
    assert "check kept images" not in capsys.readouterr().err
    monkeypatch.setattr(readers, "CHECK_BAR_DELAY", 0)
    assert reader.held_hashes(5, progress=True) == expected
    err = capsys.readouterr().err
    assert "check kept images" in err and "5/5" in err
    assert reader.held_hashes(5, progress=False) == expected
    assert capsys.readouterr().err == ""


def test_a_hugging_face_datasets_held_bytes_check_shows_a_bar_too(capsys, monkeypatch):
    pngs = _pngs(0)
    reader = readers.hf_reader(_hf(pngs), None, None)
    monkeypatch.setattr(readers, "CHECK_BAR_DELAY", 0)
    assert reader.held_hashes(7, progress=True) == [(str(i), _reference(b)) for i, b in enumerate(pngs[:7])]
    err = capsys.readouterr().err
    assert "check kept images" in err and "7/7" in err


def test_a_resume_of_a_list_shows_its_check_only_where_it_takes_a_while(tmp_path, capsys, monkeypatch):
    """The resume of record_dataset(progress=True): quick, no bar for the check; past the delay, one that counts the
    kept images, which the resume then keeps (the run completes as a whole recording does)."""
    loaded, run, other = _tiny_loaded(), tmp_path / "run.h5", tmp_path / "other.h5"
    for path in (run, other):
        _interrupted(loaded, path, batches=3, data=_arrays(0))
    capsys.readouterr()
    shown = {**_KW, "progress": True}
    assert qkhooks.record_dataset(loaded, _arrays(0), run, resume=True, **shown).images == 8
    assert "check kept images" not in capsys.readouterr().err
    monkeypatch.setattr(readers, "CHECK_BAR_DELAY", 0)
    assert qkhooks.record_dataset(loaded, _arrays(0), other, resume=True, **shown).images == 8
    err = capsys.readouterr().err
    resumed = int(err.split("resuming the stream at item ")[1].split(":")[0])
    assert resumed > 0 and "check kept images: 100%" in err and f"{resumed}/{resumed}" in err


# ------------------------------------------------------------------ a torch map-style Dataset of in-memory images
class _Held(torch.utils.data.Dataset):
    """A torch Dataset of in-memory images (named by position), counting its reads."""

    def __init__(self, items: list) -> None:
        self.items, self.reads, self.indices = items, 0, []

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        self.reads += 1
        self.indices.append(index)
        return self.items[index]


def _images(items: list) -> list:
    return [item["image"] if isinstance(item, dict) else item for item in items]


def test_a_torch_datasets_in_memory_images_store_each_ones_blake2b_and_no_file(tmp_path):
    """Before: -1 in all three columns (a list of the same items stored their hashes)."""
    items = _mixed(_arrays(0))  # an array, a PIL image, PNG bytes, a dict of a column-major array, in turn
    qkhooks.record_dataset(_tiny_loaded(), _Held(items), tmp_path / "run.h5", **_KW)
    stored = _stored(tmp_path / "run.h5")
    assert stored[fmt.FILE_HASHES] == [_reference(image) for image in _images(items)]
    assert stored[fmt.FILE_SIZES] == [-1] * 8 and stored[fmt.FILE_MTIMES] == [-1] * 8


def test_a_resume_over_another_dataset_of_the_same_length_is_refused_and_the_same_one_resumes_unwarned(tmp_path):
    """Before: it resumed, warning that the kept images were not checked, into one run of two data sets."""
    loaded, run = _tiny_loaded(), tmp_path / "run.h5"
    _interrupted(loaded, run, batches=3, data=_Held(_mixed(_arrays(0))))
    kept = _kept(run)
    other = _arrays(0)
    other[2] = _arrays(5)[2]  # the PNG bytes of another picture, in place of a kept one
    with pytest.raises(QKHooksError, match=r"(?s)cannot resume .*run\.h5: 1 of the \d+ images it keeps hold other "
                                           r"bytes .*first: '2'.*replaced or reordered since \(or the data gives "
                                           r"another image each time it is read.*two datasets.*--overwrite"):
        qkhooks.record_dataset(loaded, _Held(_mixed(other)), run, resume=True, **_KW)
    assert _kept(run) == kept
    again = _Held(_mixed(_arrays(0)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # checked: no word of unchecked images
        assert qkhooks.record_dataset(loaded, again, run, resume=True, **_KW).images == 8
    whole = tmp_path / "whole.h5"
    qkhooks.record_dataset(loaded, _Held(_mixed(_arrays(0))), whole, **_KW)
    assert _stored(run) == _stored(whole)


def test_a_datasets_kept_items_are_read_again_once_with_a_bar(capsys, monkeypatch):
    """The resume's file_paths and held_hashes of one point share one read of each item (one __getitem__ each), with
    a bar where it takes a while; the hashes are hashlib's of the content."""
    items = _mixed(_arrays(0))
    dataset = _Held(items)
    reader = readers.MapReader(dataset)
    monkeypatch.setattr(readers, "CHECK_BAR_DELAY", 0)
    assert reader.file_paths(6, progress=True) == [(str(i), None) for i in range(6)]
    assert reader.held_hashes(6, progress=True) == [(str(i), _reference(x)) for i, x in enumerate(_images(items)[:6])]
    assert dataset.reads == 6
    err = capsys.readouterr().err
    assert err.count("check kept images: 100%") == 1 and "6/6" in err


def test_a_dataset_whose_getitem_gives_other_pixels_each_time_is_refused_naming_a_random_transform(tmp_path):
    """A random transform in __getitem__: the resume cannot tell the kept images from others, and says why."""
    loaded, run = _tiny_loaded(), tmp_path / "run.h5"

    jitter = itertools.count(1)  # every read another: a random transform's draw

    class Jittered(_Held):
        def __getitem__(self, index: int):
            return Image.fromarray(self.items[index] ^ np.uint8(next(jitter) % 255 + 1))

    _interrupted(loaded, run, batches=3, data=Jittered(_arrays(0)))
    with pytest.raises(QKHooksError, match=r"first: '0'.*random transform in a Dataset's __getitem__"):
        qkhooks.record_dataset(loaded, Jittered(_arrays(0)), run, resume=True, **_KW)


def test_a_torch_dataset_of_paths_has_its_kept_files_checked(tmp_path):
    """Before: its kept files were not checked (a warning said so): a photo replaced by another of the same file
    size resumed into the run."""
    from test_spectrum_edits_and_dataparallel import _same_size_photos
    from test_file_stamps import _replace_with_same_size

    names = [f"a{i}.png" for i in range(8)]
    loaded, folder, run = _tiny_loaded(), tmp_path / "imgs", tmp_path / "run.h5"
    _same_size_photos(folder, names, seed=0)
    paths = [str(folder / n) for n in names]
    _interrupted(loaded, run, batches=3, data=_Held(paths))
    _replace_with_same_size(folder / "a1.png", seed=1)
    with pytest.raises(QKHooksError, match=r"(?s)1 of the \d+ images it keeps were modified .*first: '.*a1\.png'.*"
                                           r"bytes differ"):
        qkhooks.record_dataset(loaded, _Held(paths), run, resume=True, **_KW)


class _Iterable(torch.utils.data.IterableDataset):
    """An iterable of in-memory images, counting the items it gives."""

    def __init__(self, items: list) -> None:
        self.items, self.given = items, 0

    def __iter__(self):
        for item in self.items:
            self.given += 1
            yield item


def test_an_iterables_in_memory_images_are_checked_where_the_resume_skips_them(tmp_path):
    """Before: stored -1, and a resume over another iterable of the same images but one went on, warning that its
    kept images were not checked. The resume reads the items before its point anyway (to skip them): it hashes them
    there, refuses the one replaced, and goes on from there with no second pass (each item given once, and once for
    the first item, which opening the stream reads to learn its masks)."""
    loaded, run = _tiny_loaded(), tmp_path / "run.h5"
    items = _mixed(_arrays(0))
    _interrupted(loaded, run, batches=3, data=_Iterable(items))
    stored = _stored(run)
    assert stored[fmt.FILE_HASHES] == [_reference(image) for image in _images(items)][:len(stored["ids"])]
    other = _arrays(0)
    other[1] = _arrays(5)[1]  # a PIL image of another picture
    with pytest.raises(QKHooksError, match=r"(?s)1 of the \d+ images it keeps hold other bytes .*first: '1'.*"
                                           r"an iterable that shuffles"):
        qkhooks.record_dataset(loaded, _Iterable(_mixed(other)), run, resume=True, **_KW)
    again = _Iterable(_mixed(_arrays(0)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # checked: no word of unchecked images
        assert qkhooks.record_dataset(loaded, again, run, resume=True, **_KW).images == 8
    assert again.given == 8 + 1
    whole = tmp_path / "whole.h5"
    qkhooks.record_dataset(loaded, _Iterable(_mixed(_arrays(0))), whole, **_KW)
    assert _stored(run) == _stored(whole)


def test_a_generators_kept_images_are_checked_and_the_rest_recorded_from_the_same_pass(tmp_path):
    """A one-shot generator: the check reads the items before the resume point from it, and the recording goes on
    from where the check stopped (a generator cannot be read twice); reordered, it is refused."""
    loaded, run = _tiny_loaded(), tmp_path / "run.h5"
    _interrupted(loaded, run, batches=3, data=(a for a in _arrays(0)))
    swapped = _arrays(0)
    swapped[0], swapped[1] = swapped[1], swapped[0]
    with pytest.raises(QKHooksError, match=r"2 of the \d+ images it keeps hold other bytes .*first: '0'"):
        qkhooks.record_dataset(loaded, (a for a in swapped), run, resume=True, **_KW)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert qkhooks.record_dataset(loaded, (a for a in _arrays(0)), run, resume=True, **_KW).images == 8
    whole = tmp_path / "whole.h5"
    qkhooks.record_dataset(loaded, _arrays(0), whole, **_KW)
    assert _stored(run)[fmt.FILE_HASHES] == _stored(whole)[fmt.FILE_HASHES]
    with qkhooks.open_run(run) as resumed, qkhooks.open_run(whole) as reference:
        assert list(resumed.ids) == list(reference.ids)
        np.testing.assert_array_equal(resumed.array("modes/L0/query")[:], reference.array("modes/L0/query")[:])


def test_a_dataset_slow_to_read_again_has_the_kept_images_read_within_the_budget_checked_and_says_so(tmp_path,
                                                                                                   monkeypatch):
    """A Dataset that loads big photos from files would take hours to read again on a large resume: the reading stops
    after readers.READ_AGAIN_BUDGET seconds (here 0: after the first item); the items read are checked (one replaced
    there is refused), and the resume says which were not (one replaced after them goes on, said unchecked)."""
    loaded, run = _tiny_loaded(), tmp_path / "run.h5"
    _interrupted(loaded, run, batches=3, data=_Held(_arrays(0)))  # its checkpoint keeps 4 images
    monkeypatch.setattr(readers, "READ_AGAIN_BUDGET", 0)
    first = _arrays(0)
    first[0] = _arrays(5)[0]
    with pytest.raises(QKHooksError, match=r"1 of the 1 images it keeps hold other bytes .*first: '0'"):
        with pytest.warns(UserWarning, match=r"checks only the first 1 of the \d+ images it keeps"):
            qkhooks.record_dataset(loaded, _Held(first), run, resume=True, **_KW)
    later = _arrays(0)
    later[2] = _arrays(5)[2]
    with pytest.warns(UserWarning, match=r"(?s)checks only the first 1 of the 4 images it keeps: reading "
                                         r"torch:_Held's items again through its __getitem__ took \d+ s for 1 of them "
                                         r".*all 4 would take about \d+ s\), so the other 3 are not checked.*as file "
                                         r"paths"):
        assert qkhooks.record_dataset(loaded, _Held(later), run, resume=True, **_KW).images == 8


def test_the_time_a_full_check_would_take_is_said_roughly():
    from qkhooks.stream import _duration

    assert [_duration(s) for s in (0.4, 40, 89, 90, 720, 5399, 5400, 16920)] == [
        "0 s", "40 s", "89 s", "2 min", "12 min", "90 min", "1.5 h", "4.7 h"]


def test_a_generator_failing_before_the_resume_point_is_named_where():
    """The check reads the iterable's items before the resume point: the source's own error there says which item."""
    def failing():
        yield from _arrays(0, n=2)
        raise OSError("the share went away")

    reader = readers.IterReader(failing())
    with pytest.raises(OSError, match="the share went away") as caught:
        reader.held_hashes(4)
    assert caught.value.__notes__ == [
        "(while qkhooks read item 2 of the data again, to check the images a resume keeps)"]


def test_a_dataset_cut_by_the_budget_whose_ids_all_changed_is_refused(tmp_path, monkeypatch):
    """Review r47: under the budget, the kept images checked were counted by the kept ids found among the items read,
    so data whose ids had all changed (the same pictures renamed) checked none of them and resumed, with a warning
    that 0 were checked. The items read are now compared in order with the ids recorded."""
    loaded, run = _tiny_loaded(), tmp_path / "run.h5"
    arrays = _arrays(0)
    _interrupted(loaded, run, batches=3, data=_Held([{"image": a, "id": f"x{i}"} for i, a in enumerate(arrays)]))
    monkeypatch.setattr(readers, "READ_AGAIN_BUDGET", 0)
    renamed = _Held([{"image": a, "id": f"y{i}"} for i, a in enumerate(arrays)])
    with pytest.raises(QKHooksError, match=r"items before the resume point are not those the run recorded \(image 0 "
                                           r"of the file is 'x0', the data's is 'y0'\)"):
        qkhooks.record_dataset(loaded, renamed, run, resume=True, **_KW)
    same = _Held([{"image": a, "id": f"x{i}"} for i, a in enumerate(arrays)])
    with pytest.warns(UserWarning, match=r"checks only the first 1 of the 4 images it keeps"):
        assert qkhooks.record_dataset(loaded, same, run, resume=True, **_KW).images == 8


class _Opened(torch.utils.data.Dataset):
    """A torch Dataset that opens each photo lazily (``Image.open``: decoded when first read), as many do."""

    def __init__(self, paths: list) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        return {"image": Image.open(self.paths[index]), "id": f"p{index}"}


def test_a_truncated_photo_the_recording_skipped_does_not_stop_the_resume_and_one_truncated_since_is_refused(tmp_path):
    """Review r47: a lazily opened photo whose file is truncated is skipped by the recording (unreadable), but reading
    it again to hash it raised the bare OSError, so the run could never be resumed. It now has no hash (it is not kept);
    a kept photo truncated since has none either, which differs from the one recorded: refused."""
    import io

    folder = tmp_path / "imgs"
    folder.mkdir()
    paths = []
    for i, a in enumerate(_arrays(0)):
        png = io.BytesIO()
        Image.fromarray(a).save(png, format="PNG")
        data = png.getvalue()
        paths.append(folder / f"a{i}.png")
        paths[-1].write_bytes(data[:len(data) // 2] if i == 1 else data)
    loaded, run = _tiny_loaded(), tmp_path / "run.h5"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the skipped photo's warning
        _interrupted(loaded, run, batches=3, data=_Opened(paths))
    kept = _stored(run)["ids"]
    assert "p1" not in kept and "p0" in kept and "p2" in kept
    whole = paths[2].read_bytes()
    paths[2].write_bytes(whole[:len(whole) // 2])
    with pytest.raises(QKHooksError, match=r"1 of the \d+ images it keeps hold other bytes .*first: 'p2'"):
        qkhooks.record_dataset(loaded, _Opened(paths), run, resume=True, **_KW)
    paths[2].write_bytes(whole)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert qkhooks.record_dataset(loaded, _Opened(paths), run, resume=True, **_KW).images == 7


def test_a_shards_dataset_read_again_begins_at_its_own_first_item(tmp_path, monkeypatch):
    """Review r47: a shard's resume read the Dataset's items from the first of all, so under the budget the second of
    two shards spent it on the first shard's items and checked none of its own (a warning said 0 were checked, and a
    replaced one went on). It now reads from its own first item: here one item within the budget, the shard's first,
    replaced and refused; the same data resumes checking 1."""
    from qkhooks.distributed import shard_path

    loaded, run = _tiny_loaded(), shard_path(tmp_path / "run.h5", 1, 2)
    arrays = _arrays(0, 16)
    _interrupted(loaded, run, batches=3, data=_Held(list(arrays)), shard=(1, 2))
    monkeypatch.setattr(readers, "READ_AGAIN_BUDGET", 0)
    other = list(arrays)
    other[8] = _arrays(5, 16)[8]  # the second shard's first image
    held = _Held(other)
    with pytest.raises(QKHooksError, match=r"1 of the 1 images it keeps hold other bytes .*first: '8'"):
        with pytest.warns(UserWarning, match=r"checks only the first 1 of the 4 images it keeps.*for 1 of them "
                                             r"\(.*all 4 would take"):
            qkhooks.record_dataset(loaded, held, run, resume=True, shard=(1, 2), **_KW)
    assert held.indices.count(8) == 1 and held.indices.count(0) <= 1  # read again: 8 alone (0: the source's probe)
    with pytest.warns(UserWarning, match=r"checks only the first 1 of the 4 images it keeps"):
        assert qkhooks.record_dataset(loaded, _Held(list(arrays)), run, resume=True, shard=(1, 2), **_KW).images == 8


def test_a_dataset_read_again_whole_whose_kept_items_were_reordered_is_refused(tmp_path):
    """Round 48: read again whole (within the budget), the kept ids were checked by membership alone (only the budget's
    cut checked their order), so kept items swapped with their ids resumed. Both now compare them in order with the ids
    recorded (_refuse_other_items)."""
    loaded, run = _tiny_loaded(), tmp_path / "run.h5"
    items = [{"image": a, "id": f"x{i}"} for i, a in enumerate(_arrays(0))]
    _interrupted(loaded, run, batches=3, data=_Held(list(items)))
    kept = _kept(run)
    swapped = list(items)
    swapped[0], swapped[1] = swapped[1], swapped[0]  # each image under its own id: the hashes agree id by id
    with pytest.raises(QKHooksError, match=r"items before the resume point are not those the run recorded \(image 0 "
                                           r"of the file is 'x0', the data's is 'x1'\)"):
        qkhooks.record_dataset(loaded, _Held(swapped), run, resume=True, **_KW)
    assert _kept(run) == kept
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same data: read again whole, checked, no word
        assert qkhooks.record_dataset(loaded, _Held(list(items)), run, resume=True, **_KW).images == 8


def test_an_iterables_shard_reads_the_earlier_shards_items_but_hashes_only_its_own(monkeypatch):
    """Round 48: a shard's check (first=lo) of an iterable read every item before its resume point, as it has to (no
    index), but hashed the earlier shards' items too, which it does not compare. Now it hashes its own alone: the
    same hashes (hashlib's), one a kept item of the shard, and the rows after the check go on from there."""
    arrays = _arrays(0, n=16)
    hashed = []
    held_hash = readers._held_hash
    monkeypatch.setattr(readers, "_held_hash", lambda item: hashed.append(item) or held_hash(item))
    source = _Iterable(list(arrays))
    reader = readers.IterReader(source)
    assert reader.held_hashes(12, first=8) == [(str(i), _reference(arrays[i])) for i in range(8, 12)]
    assert reader.file_paths(12, first=8) == [(str(i), None) for i in range(8, 12)]
    assert len(hashed) == 4 and source.given == 12  # read up to the point once, hashed from the shard's first
    rest = list(reader.rows(12))
    assert [np.asarray(a).tobytes() for a in rest] == [a.tobytes() for a in arrays[12:]] and source.given == 16


@pytest.mark.parametrize("source", ["folder", "wds"])
def test_a_folders_retimed_files_and_wds_shards_read_again_show_the_check_bar_where_it_takes_a_while(
        tmp_path, capsys, monkeypatch, source):
    """Round 48: a folder's kept files hashed again because their times changed, and a wds: shard's samples read
    again up to the resume point, showed no bar (a Dataset's items read again did). Now the same "check kept images"
    bar: none for a quick check, one counting them all past the delay (here 0 s); the resumes complete."""
    import os

    from test_file_stamps import _NAMES, _pngs as _members, _shard
    from test_spectrum_edits_and_dataparallel import _same_size_photos

    loaded, quick, slow = _tiny_loaded(), tmp_path / "quick.h5", tmp_path / "slow.h5"
    if source == "folder":
        folder = tmp_path / "imgs"
        _same_size_photos(folder, _NAMES, seed=0)
        data = str(folder)
    else:
        shard = tmp_path / "s0.tar"
        _shard(shard, _members(0), mtime=1_700_000_000)
        data = f"wds:{shard}"
    for run in (quick, slow):
        _interrupted(loaded, run, batches=3, data=data)
    if source == "folder":  # every file touched (copied again without its times): each kept one is hashed again
        for name in _NAMES:
            os.utime(folder / name, ns=(1_600_000_000 * 10**9, 1_600_000_000 * 10**9))
    capsys.readouterr()
    shown = {**_KW, "progress": True}
    assert qkhooks.record_dataset(loaded, data, quick, resume=True, **shown).images == 8
    assert "check kept images" not in capsys.readouterr().err
    monkeypatch.setattr(readers, "CHECK_BAR_DELAY", 0)
    assert qkhooks.record_dataset(loaded, data, slow, resume=True, **shown).images == 8
    err = capsys.readouterr().err
    # the images kept: a folder's, those before the 8 - N it records then; a shard's, the samples before its point
    checked = (8 - int(err.split("record:   0%|          | 0/")[1].split()[0]) if source == "folder" else
               int(err.split("resuming the stream at item ")[1].split(":")[0]))
    assert checked > 0 and "check kept images: 100%" in err and f"{checked}/{checked}" in err


class _Jittered(_Held):
    """A random transform in __getitem__: every read gives other pixels (a draw from a shared counter)."""

    draws = itertools.count(1)

    def __init__(self, items: list, ids: list | None = None) -> None:
        super().__init__(items)
        self.ids = ids or [f"j{i}" for i in range(len(items))]

    def __getitem__(self, index: int):
        return {"image": Image.fromarray(self.items[index] ^ np.uint8(next(self.draws) % 255 + 1)),
                "id": self.ids[index]}


def test_a_dataset_with_a_random_transform_resumes_by_its_ids_alone_when_asked_warned_and_marked_in_the_file(tmp_path):
    """Round 48: such data could not be resumed at all. The refusal now names the opt-in, resume_ids_only=True, which
    checks the kept images' ids (in order: reordered ones are refused even so) and not their content, warns, and
    records the resume in the run's config (resumes_ids_only: the images it kept), so a reader can tell; a resume
    that checks content adds nothing there. Data whose content a resume can check (a list) is refused the opt-in."""
    import json

    from qkhooks.store.format import UNCHECKED_RESUMES

    loaded, run = _tiny_loaded(), tmp_path / "run.h5"
    arrays = _arrays(0)
    _interrupted(loaded, run, batches=3, data=_Jittered(arrays))
    with pytest.raises(QKHooksError, match=r"random transform in a Dataset's __getitem__.*resume_ids_only=True"):
        qkhooks.record_dataset(loaded, _Jittered(arrays), run, resume=True, **_KW)
    with pytest.raises(QKHooksError, match=r"resume_ids_only=True.*a list"):
        qkhooks.record_dataset(loaded, [{"image": a, "id": f"j{i}"} for i, a in enumerate(arrays)], run,
                               resume=True, resume_ids_only=True, **_KW)
    with pytest.raises(QKHooksError, match=r"resume_ids_only=True goes with resume=True"):
        qkhooks.record_dataset(loaded, _Jittered(arrays), tmp_path / "new.h5", resume_ids_only=True, **_KW)
    swapped = [arrays[1], arrays[0], *arrays[2:]]
    ids = ["j1", "j0", *(f"j{i}" for i in range(2, 8))]
    with pytest.raises(QKHooksError, match=r"image 0 of the file is 'j0', the data's is 'j1'"):
        qkhooks.record_dataset(loaded, _Jittered(swapped, ids), run, resume=True, resume_ids_only=True, **_KW)
    with qkhooks.open_run(run) as before:
        assert UNCHECKED_RESUMES not in json.loads(before.attrs["config"])
    with pytest.warns(UserWarning, match=r"(?s)checks the 4 images it keeps by their ids alone \(resume_ids_only=True"
                                         r"\).*not their content.*resumes_ids_only"):
        result = qkhooks.record_dataset(loaded, _Jittered(arrays), run, resume=True, resume_ids_only=True, **_KW)
    assert result.images == 8 and result.resumed_from == 4
    with qkhooks.open_run(run) as after:
        assert list(after.ids) == [f"j{i}" for i in range(8)]
        assert json.loads(after.attrs["config"])[UNCHECKED_RESUMES] == [{"kept": 4, "shard": None}]
    with pytest.raises(QKHooksError, match=r"hold other bytes"):  # the mark carried on: compared as the run's config
        qkhooks.record_dataset(loaded, _Jittered(arrays), run, resume=True, **_KW)


def test_a_merge_joins_the_shards_resumes_by_ids_alone(tmp_path):
    """The merged file's config lists each shard's resumes by ids alone (a shard's own config is its rank's only)."""
    import json

    from qkhooks.distributed import merge_shards, shard_path
    from qkhooks.store.format import UNCHECKED_RESUMES

    loaded, out = _tiny_loaded(), tmp_path / "run.h5"
    arrays = _arrays(0, 16)
    qkhooks.record_dataset(loaded, _Jittered(arrays), shard_path(out, 0, 2), shard=(0, 2), **_KW)
    _interrupted(loaded, shard_path(out, 1, 2), batches=3, data=_Jittered(arrays), shard=(1, 2))
    with pytest.warns(UserWarning, match=r"by their ids alone"):
        qkhooks.record_dataset(loaded, _Jittered(arrays), shard_path(out, 1, 2), resume=True, resume_ids_only=True,
                               shard=(1, 2), **_KW)
    merge_shards(out, [shard_path(out, r, 2) for r in range(2)])
    with qkhooks.open_run(out) as merged:
        assert merged.n == 16
        assert json.loads(merged.attrs["config"])[UNCHECKED_RESUMES] == [{"kept": 4, "shard": [1, 2]}]


class _JitteredAndFiles(_Jittered):
    """The items at ``files`` given as file paths (qkhooks reads those, the same on each read), the others in memory
    with a random transform."""

    def __init__(self, items: list, paths: list, files=range(0, 8, 2)) -> None:
        super().__init__(items)
        self.paths, self.files = paths, set(files)

    def __getitem__(self, index: int):
        return {"image": self.paths[index], "id": self.ids[index]} if index in self.files else super().__getitem__(index)


def test_a_resume_by_ids_alone_still_checks_the_kept_files_by_their_stamps(tmp_path):
    """Round 49: resume_ids_only=True skipped every content check, the stamps of kept images read from files too
    (qkhooks reads those, the same on each read: nothing random in them), so a kept file replaced since went on under
    its id. Now those files are checked as without the option, and the warning counts only the images held in the
    data (none: no warning, no mark in the file)."""
    import json
    import os
    from pathlib import Path

    from test_file_stamps import _replace_with_same_size
    from test_spectrum_edits_and_dataparallel import _same_size_photos

    from qkhooks.store.format import UNCHECKED_RESUMES

    loaded, run, folder = _tiny_loaded(), tmp_path / "run.h5", tmp_path / "imgs"
    names = [f"p{i}.png" for i in range(8)]
    _same_size_photos(folder, names, seed=0)
    paths = [str(folder / n) for n in names]
    arrays = _arrays(0)
    _interrupted(loaded, run, batches=3, data=_JitteredAndFiles(arrays, paths))
    was = Path(paths[2]).read_bytes()
    _replace_with_same_size(Path(paths[2]), seed=5)  # a kept file (item 2), another photo of the same size
    with pytest.raises(QKHooksError, match=r"modified since it recorded them \(first: 'j2'.*bytes differ"):
        qkhooks.record_dataset(loaded, _JitteredAndFiles(arrays, paths), run, resume=True, resume_ids_only=True,
                               **_KW)
    stat = os.stat(paths[2])
    Path(paths[2]).write_bytes(was)  # its own bytes back, a later time: resumes
    os.utime(paths[2], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.warns(UserWarning, match=r"checks 2 of the 4 images it keeps \(those held in the data; the 2 read "
                                         r"from files are checked by their stamps\) by their ids alone"):
        result = qkhooks.record_dataset(loaded, _JitteredAndFiles(arrays, paths), run, resume=True,
                                        resume_ids_only=True, **_KW)
    assert result.images == 8 and result.resumed_from == 4
    with qkhooks.open_run(run) as after:
        assert list(after.ids) == [f"j{i}" for i in range(8)]
        assert json.loads(after.attrs["config"])[UNCHECKED_RESUMES] == [{"kept": 4, "shard": None}]
    files = tmp_path / "files.h5"  # every kept image read from a file: each checked, nothing to warn of or mark
    _interrupted(loaded, files, batches=3, data=_JitteredAndFiles(arrays, paths, files=range(8)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert qkhooks.record_dataset(loaded, _JitteredAndFiles(arrays, paths, files=range(8)), files, resume=True,
                                      resume_ids_only=True, **_KW).resumed_from == 4
    with qkhooks.open_run(files) as after:
        assert UNCHECKED_RESUMES not in json.loads(after.attrs["config"])


def test_a_resume_by_ids_alone_of_a_run_from_before_the_stamps_checks_the_ids_in_order_warns_and_is_marked(tmp_path):
    """Round 49: on a run recorded before the file stamps (no images/file_* arrays), resume_ids_only=True read no item
    again and warned of nothing, though the file was marked as resumed by ids alone: kept items reordered went on.
    Now the kept ids are checked in order, as on a newer run, and the same warning says they alone were checked."""
    import json

    from test_file_stamps import as_before_the_stamps

    from qkhooks.store.format import UNCHECKED_RESUMES

    loaded, run = _tiny_loaded(), tmp_path / "run.h5"
    arrays = _arrays(0)
    _interrupted(loaded, run, batches=3, data=_Jittered(arrays))
    as_before_the_stamps(run)
    swapped = [arrays[1], arrays[0], *arrays[2:]]
    ids = ["j1", "j0", *(f"j{i}" for i in range(2, 8))]
    with pytest.raises(QKHooksError, match=r"image 0 of the file is 'j0', the data's is 'j1'"):
        qkhooks.record_dataset(loaded, _Jittered(swapped, ids), run, resume=True, resume_ids_only=True, **_KW)
    with pytest.warns(UserWarning, match=r"(?s)checks the 4 images it keeps by their ids alone \(resume_ids_only=True"
                                         r"\).*not their content.*resumes_ids_only"):
        result = qkhooks.record_dataset(loaded, _Jittered(arrays), run, resume=True, resume_ids_only=True, **_KW)
    assert result.images == 8 and result.resumed_from == 4
    with qkhooks.open_run(run) as after:
        assert list(after.ids) == [f"j{i}" for i in range(8)] and not after.has(fmt.FILE_SIZES)
        assert json.loads(after.attrs["config"])[UNCHECKED_RESUMES] == [{"kept": 4, "shard": None}]


class _Named(_Held):
    """A torch Dataset of in-memory images, each with its own id."""

    def __init__(self, items: list, ids: list) -> None:
        super().__init__(items)
        self.ids = ids

    def __getitem__(self, index: int):
        return {"image": self.items[index], "id": self.ids[index]}


def test_a_dataset_resumed_on_a_run_from_before_the_stamps_has_its_kept_ids_checked_in_order_and_warns(tmp_path):
    """Round 49: on a run recorded before the file stamps, a torch Dataset's (or an iterable's) resume read no item
    again and said nothing, so its kept items reordered (ids and images) went on, and an image replaced since would
    go on under a kept id without a word. Now its kept ids are read again and checked in order, as on a newer run,
    and the resume warns that their content cannot be checked."""
    from test_file_stamps import as_before_the_stamps

    loaded, run = _tiny_loaded(), tmp_path / "run.h5"
    arrays, ids = _arrays(0), [f"n{i}" for i in range(8)]
    _interrupted(loaded, run, batches=3, data=_Named(arrays, ids))
    as_before_the_stamps(run)
    swapped = _Named([arrays[1], arrays[0], *arrays[2:]], ["n1", "n0", *ids[2:]])
    with pytest.raises(QKHooksError, match=r"image 0 of the file is 'n0', the data's is 'n1'"):
        qkhooks.record_dataset(loaded, swapped, run, resume=True, **_KW)
    with pytest.warns(UserWarning, match=r"recorded before qkhooks stored each image's stamps .*checks the 4 images "
                                         r"it keeps by their ids alone, in order: an image of .* replaced since is "
                                         r"not noticed"):
        result = qkhooks.record_dataset(loaded, _Named(arrays, ids), run, resume=True, **_KW)
    assert result.images == 8 and result.resumed_from == 4
    with qkhooks.open_run(run) as after:
        assert list(after.ids) == ids
