"""Kill tests for round 50's library code (module "round50" of ``tests/mutation.py``, ``--only ROUND50``): each
asserts the real behaviour against an independent reference and was seen failing with its mutant active (the mutant's
name in the test's docstring; tests/MUTATION.md, round 51's run)."""

from __future__ import annotations

import pytest
import torch

from qkhooks.errors import QKHooksError

from test_mutation_kills_r26 import check_round_module, commits_in


# ------------------------------------------------------------------ tests/mutation.py: round50
def test_the_round50_module_names_files_and_tests_that_exist_and_round_50s_commits():
    """The harness's module "round50" and its named set ROUND50: every file to mutate and every test file exists, the
    selection names only test files it selects, the range resolves in this checkout to round 50's 25 library commits
    (35 in all) (``git rev-list``), so ``--only ROUND50`` draws the same sample wherever it runs, and every library file
    they changed (16) is mutated."""
    check_round_module("round50", "ROUND50", "81bab99", "bebb0cb", library_commits=25)
    assert len(commits_in("81bab99..bebb0cb")) == 35


# ------------------------------------------------------------------ stream: the probe's blank image (round 49's code)
def test_the_probe_of_a_timm_model_in_float64_feeds_it_a_blank_image_of_its_own_dtype(monkeypatch):
    """stream._probe_forward (_39: the blank image made without ``dtype=``, so float32; left unkilled by round 50's
    sample, where HF DeiT casts its pixels itself): a 4 x 6 timm ViT in float64, its class taken off the list whose
    geometry needs no forward, is probed with one float64 image (timm's patch embedding does not cast: a float32 image
    fails its float64 convolution, and the error passes as it is, since the model alone runs on a blank image of its
    own dtype) and reads the grid, prefix and token counts written down for the fixture."""
    import qkhooks.stream as stream
    from conftest import TINY_MODELS
    from qkhooks.models.base import find_sites

    tiny = next(t for t in TINY_MODELS if t.name == "timm-vit-4x6")
    model = tiny.model().double()
    monkeypatch.setattr(stream, "_STATIC_GEOMETRY", set())
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append((tuple(args[0].shape), args[0].dtype)))
    found = stream.probe_geometry(model, find_sites(model), tiny.hw)
    assert seen == [((1, 3, *tiny.hw), torch.float64)]
    assert {l: (g.grid, g.num_prefix_tokens, g.query_tokens, g.key_tokens) for l, g in found.items()} == {
        l: (tiny.grid, tiny.prefix, 25, 25) for l in range(len(find_sites(model)))}


# ------------------------------------------------------------------ attention: block indices among a selection
def test_attention_block_zero_asked_of_a_selection_without_it_is_refused_naming_the_recorded_layers():
    """attention._resolved (_35: block index 0 resolved as a negative index is, among the given sites): a recording
    of block 1 alone, handed that selection of sites, asked for block 0's full maps is refused naming the layers it
    records, as the same recording without ``sites=`` is; block 0 exists (the model has two), so the mutant's "layer 0
    does not exist: this model has blocks 0..0" would be false."""
    import qkhooks
    from test_newcomer_messages import tiny_vit

    model = tiny_vit().model
    said = []
    for sites in (None, qkhooks.sites(model)[1:]):
        with pytest.raises(QKHooksError) as err:
            qkhooks.record(model, layers=[1], attention="full:0", modes=None, sites=sites)
        said.append(str(err.value))
    assert said == ["attention 'full' asks for layers [0], which this recording does not hook (recorded layers: [1]); "
                    "pick block indices among them or add them to layers."] * 2


# ------------------------------------------------------------------ data: Synology's @eaDir folders
def test_one_synology_thumbnail_in_one_folder_is_warned_of_in_the_singular(tmp_path):
    """data.items._nas_thumbnails_left_out (_23, _34: "folders" and "files" whatever the count): a folder whose one
    @eaDir folder holds one thumbnail image (and a file that is not an image) is read without it, and the warning says
    so in the singular, whole; it said "1 image file ... are not recorded" before (seen failing)."""
    from PIL import Image

    from qkhooks.data import ImageConfig, open_dataset

    Image.new("RGB", (16, 16), (10, 20, 30)).save(tmp_path / "a.png")
    (tmp_path / "@eaDir" / "a.png").mkdir(parents=True)
    Image.new("RGB", (8, 8), (30, 20, 10)).save(tmp_path / "@eaDir" / "a.png" / "SYNOFILE_THUMB_M.jpg")
    (tmp_path / "@eaDir" / "a.png" / "SYNOINDEX_MEDIA_INFO").write_text("not an image")
    with pytest.warns(UserWarning) as said:
        ds = open_dataset(str(tmp_path), ImageConfig(size=16, mean=(0.5,) * 3, std=(0.5,) * 3))
    assert ds.ids == ["a.png"]
    assert [str(w.message) for w in said] == [
        f"1 image file in 1 Synology thumbnail folder (@eaDir) under {tmp_path} is not recorded: @eaDir/; a NAS keeps "
        "its own thumbnails of the photos beside them there, not photos. To record such a folder anyway, point DATA at "
        "it itself."]


# ------------------------------------------------------------------ stream: a list's resume of a run from before the stamps
def test_a_list_of_paths_resumed_on_a_run_from_before_the_stamps_warning_points_at_the_callers_line(tmp_path):
    """stream._refuse_changed_stream_files (_47: the ids-alone warning's stacklevel one frame past the caller's): a
    list of file paths resumed on a run recorded before the file stamps warns once that it checks the kept images by
    their ids alone, pointing at the line that called record_dataset (this file), not into qkhooks or pytest. Left out
    of the module round50's selection (the name's last words): mutmut's trampoline adds frames, so only the ordinary
    suite can check a stacklevel."""
    import warnings

    import qkhooks
    from test_mutation_kills_r50 import paths_stopped_before_the_stamps
    from test_review_symlinks_repair_messages import _KW

    loaded, paths, run = paths_stopped_before_the_stamps(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert qkhooks.record_dataset(loaded, paths, run, resume=True, **_KW).images == 8
    said = [w for w in caught if "by their ids alone" in str(w.message)]
    assert [w.filename for w in said] == [__file__], [(w.filename, w.lineno) for w in said]


# ------------------------------------------------------------------ format: ids in a heap block HDF5 cannot read
@pytest.mark.parametrize("lost, said", [({3}, "image 3's id lies"), ({6, 3, 5}, "image 3's id and 2 more lie")])
def test_ids_in_a_heap_block_hdf5_cannot_read_are_refused_in_the_whole_sentence_counting_them(tmp_path, monkeypatch,
                                                                                            lost, said):
    """store.format.read_ids (_17: the OSError's sentence dropped; _22: "and 0 more" for one id): a run's ids of which
    ``unreadable_strings`` finds some in a heap collection HDF5 would read without end (simulated: the byte-level
    check is test_ids_heap_damage's; here the set it returns) are refused in the whole sentence, naming the first and
    counting the others, in the singular for one (it said "image 3's id lie" before: seen failing)."""
    import numpy as np

    import qkhooks.store._hdf5 as hdf5
    from qkhooks.store import RunWriter, open_run

    run = tmp_path / "run.h5"
    with RunWriter(run, dtype="float32") as writer:
        writer.write_batch([f"p{i}" for i in range(8)], {"v": np.zeros((8, 2), np.float32)})
    def unreadable_strings(*args, why=None, **kwargs):
        if why is not None:  # the words of each lost id's heap block, as the byte-level check gives them
            why.update((i, hdf5.HEAP_ZEROS) for i in lost)
        return set(lost)

    monkeypatch.setattr(hdf5, "unreadable_strings", unreadable_strings)
    with open_run(run) as reader, pytest.raises(QKHooksError) as err:
        reader.ids
    assert str(err.value) == (
        f"{run} is damaged (HDF5 cannot read its image ids: {said} in {hdf5.HEAP_ZEROS}): run `qkhooks repair {run} --out FIXED.h5` to copy every committed "
        "image still readable (of 8 committed) into a new file (it leaves run.h5 unchanged).")


# ------------------------------------------------------------------ repair: verify of an id that is not UTF-8
def test_verify_of_a_run_with_one_id_not_utf8_says_why_its_row_does_not_read(tmp_path):
    """store.repair._failing_rows (_281: every failing row of strings said to lie in a cut or damaged heap block):
    one id's first byte changed to one no UTF-8 text starts with (test_ids_heap_damage's run of 300 images) is named
    by verify with the reason it does not read, its string is not UTF-8 text, not a heap block HDF5 cannot read (the
    heap is whole: every other id reads)."""
    import h5py

    from qkhooks.store import format as fmt
    from qkhooks.store import verify_run
    from test_ids_heap_damage import _run

    run = tmp_path / "run.h5"
    ids, _ = _run(run)
    data = bytearray(run.read_bytes())
    data[data.find(b"photo-0150.png")] = 0xBA
    run.write_bytes(bytes(data))
    with h5py.File(run, "r") as f:  # the reference: every other id reads as written
        assert [f[fmt.IDS][i].decode() for i in range(300) if i != 150] == ids[:150] + ids[151:]
    report = verify_run(run)
    assert report.damaged == {fmt.IDS: [(150, 151)]}
    assert [p for p in report.problems if p.startswith("/")] == [
        f"/{fmt.IDS}: row 150 does not read (their strings are {fmt.NOT_TEXT})"]


# ------------------------------------------------------------------ stream: images named by position, before the stamps
def test_a_list_of_arrays_from_before_the_stamps_is_refused_a_resume_in_the_whole_sentence(tmp_path):
    """stream._refuse_changed_stream_files (_26: "hugging face" in lower case; _28: the reason's last word): a list of
    arrays without ids (its images named by their positions) recorded before the file stamps is refused a resume,
    read whole: the run, the images kept, the images named by position and why that says nothing of them, the fix."""
    import numpy as np

    import qkhooks
    from qkhooks.store import format as fmt
    from test_file_stamps import _KW, _NAMES, _interrupted, _tiny_loaded, as_before_the_stamps

    loaded, run = _tiny_loaded(), tmp_path / "run.h5"
    rng = np.random.default_rng(0)
    data = [rng.integers(0, 255, (16, 16, 3), dtype=np.uint8) for _ in _NAMES]
    _interrupted(loaded, run, batches=3, data=data)
    as_before_the_stamps(run)
    with pytest.raises(QKHooksError) as err:
        qkhooks.record_dataset(loaded, data, run, resume=True, **_KW)
    assert str(err.value) == (
        f"cannot resume {run}: it keeps 4 images, was recorded before qkhooks stored each image's stamps "
        f"({fmt.FILE_SIZES}), and 4 of them are named by their position in sequence:list alone (no id of their own: a dict's "
        "'id', a file path, a Hugging Face id column), which says nothing of the image at it, so this resume cannot "
        "check that they are still the data's first items, in that order: resumed, data changed since (items "
        "reordered, added, removed or replaced) would go on under the kept images' ids. Record it afresh into a new "
        "--out, or --overwrite to start again.")



def test_a_dataset_resumed_by_ids_alone_on_a_run_from_before_the_stamps_warns_whole_and_records_it(tmp_path):
    """stream._warn_kept_ids_alone (_1: the run file not handed to the ids-alone warning): a torch Dataset of arrays
    with ids of its own resumed with resume_ids_only=True on a run recorded before the file stamps warns once, read
    whole, that it checks the 4 kept images by their ids alone, naming the run file, ends with every image, and the
    run's config lists the resume."""
    import warnings

    import qkhooks
    from qkhooks.store import format as fmt
    from test_file_stamps import as_before_the_stamps
    from test_resume_held_images_check_progress import _KW, _interrupted, _Named, _tiny_loaded
    from test_resume_in_memory_images import _arrays

    loaded, run = _tiny_loaded(), tmp_path / "run.h5"
    data = _Named(_arrays(0), [f"n{i}" for i in range(8)])
    _interrupted(loaded, run, batches=3, data=data)
    as_before_the_stamps(run)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert qkhooks.record_dataset(loaded, data, run, resume=True, resume_ids_only=True, **_KW).images == 8
    said = [str(w.message) for w in caught if "by their ids alone" in str(w.message)]
    assert said == [
        f"{run}: this resume checks the 4 images it keeps by their ids alone (resume_ids_only=True): not their content, "
        f"so images of torch:_Named replaced since would go on under the kept ones' ids. The run file records it: its "
        f"config's {fmt.UNCHECKED_RESUMES!r} lists this resume."]
    with qkhooks.open_run(run) as after:
        assert fmt.UNCHECKED_RESUMES in dict(after.config)
