"""Round 37's review findings, each a test seen to fail on the code before its fix."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

import qkhooks
from qkhooks.errors import QKHooksError
from test_review_symlinks_repair_messages import _interrupted, _loaded, _tiny  # round 36's tiny ViT, its LoadedModel, a Ctrl-C run


@pytest.fixture(scope="module")
def tiny_loaded():
    return _loaded(_tiny())


def _photos(n: int = 5) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (40, 40, 3), dtype=np.uint8) for _ in range(n)]


# ------------------------------------------------------------------------ record_dataset's arguments (lead)
@pytest.mark.parametrize("bad, named", [
    ({"shard": (2, 2)}, "0 <= rank < world"),  # a rank past the last recorded no image and ended as a complete run
    ({"shard": (-1, 2)}, "0 <= rank < world"),
    ({"shard": (0, 0)}, "0 <= rank < world"),
    ({"shard": 3}, "(rank, world)"),
    ({"checkpoint_every": 0}, "checkpoint_every"),  # ZeroDivisionError after the file was made
    ({"batch_size": 2.5}, "a whole number >= 1 (batch_size, --batch-size), got 2.5"),  # islice's ValueError
    ({"num_workers": 1.0}, "a whole number >= 0 (num_workers, --workers; 0 decodes in this process), got 1.0"),
])
def test_record_dataset_refuses_arguments_out_of_range_before_making_a_file(tiny_loaded, tmp_path, bad, named):
    out = tmp_path / "run.h5"
    with pytest.raises(QKHooksError, match=named.replace("(", r"\(").replace(")", r"\)")):
        qkhooks.record_dataset(tiny_loaded, _photos(), out, progress=False, **bad)
    assert list(tmp_path.iterdir()) == []


def test_a_batch_tensor_given_as_data_is_refused_naming_the_preprocessing_and_record(tiny_loaded, tmp_path):
    """A (B, C, H, W) tensor is some other preprocessing's output: the refusal says so and names record(), not 'a
    single Tensor'."""
    with pytest.raises(QKHooksError, match=r"one tensor \(4, 3, 48, 48\).*qkhooks\.record\(model\)"):
        qkhooks.record_dataset(tiny_loaded, torch.rand(4, 3, 48, 48), tmp_path / "run.h5", progress=False)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------- a merged view over a shard its writer left open (round 36 F, lead)
def test_a_view_over_a_shard_left_open_for_writing_says_so_and_merge_copy_reads_it(tiny_loaded, tmp_path):
    """A shard whose writer was killed keeps its "open for SWMR write" flags, and HDF5 then opens it for no one
    through a merged view: reading its rows said the view was damaged and named ``repair`` (which refuses views).
    Now the read and verify name the shard and the fixes, a new view over it is refused, and a merge with copy=True
    reads its rows, equal to the shard's own."""
    from qkhooks.distributed import merge_shards, shard_path
    from qkhooks.store import verify_run
    from qkhooks.store._hdf5 import Superblock

    out = tmp_path / "run.h5"
    photos = _photos(8)
    for rank in (0, 1):
        qkhooks.record_dataset(tiny_loaded, photos, shard_path(out, rank, 2), shard=(rank, 2), batch_size=2,
                               progress=False)
    view = merge_shards(tmp_path / "view.h5", [shard_path(out, r, 2) for r in (0, 1)])
    shard = shard_path(out, 1, 2)
    with qkhooks.open_run(shard) as own:
        expected = own.array("modes/L0/query")[:]
    block = Superblock.read(shard)
    with open(shard, "r+b") as fh:  # as a killed writer leaves it
        fh.write(block.with_flags(0x05))

    with qkhooks.open_run(view) as run:
        assert run.array("modes/L0/query")[:4].shape[0] == 4  # shard 0's rows still read
        with pytest.raises(QKHooksError, match=rf"{shard.name} are open for writing.*not damage.*--copy") as caught:
            run.array("modes/L0/query")[4:]
        assert "repair" not in str(caught.value)
    report = verify_run(view)
    assert not report.ok and shard.name in report.problems[0] and "open for writing" in report.problems[0]
    assert "qkhooks repair " + str(view) not in report.summary() and "merge again" in report.summary()
    with pytest.raises(QKHooksError, match="as a view: .*open for writing"):
        merge_shards(tmp_path / "view2.h5", [shard_path(out, r, 2) for r in (0, 1)])
    assert not (tmp_path / "view2.h5").exists()
    copied = merge_shards(tmp_path / "copy.h5", [shard_path(out, r, 2) for r in (0, 1)], copy=True)
    with qkhooks.open_run(copied) as run:
        np.testing.assert_array_equal(run.array("modes/L0/query")[4:], expected)


# ------------------------------------------------------- BFD: one grid, one input size (review B 1-3, review A 4)
def _dynamic_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, dynamic_img_size=True,
                             embed_dim=64, depth=2, num_heads=2).eval()


def test_bfd_reducers_refuse_a_second_grid_of_the_same_token_count():
    """3x5 and 5x3 images give tokens of one shape whose positions are other places of the image: the position
    means, the energies and the probes each refuse the second grid (they took both, and the summary averaged them)."""
    from qkhooks.analysis.bfd import BFDEnergies, PositionDecoding, PositionMeans, full_modes

    model = _dynamic_vit()
    wide, tall = torch.randn(4, 3, 48, 80), torch.randn(4, 3, 80, 48)
    means = PositionMeans()
    with qkhooks.record(model, modes=None, sinks=[means]) as run, torch.no_grad():
        run(wide)
        with pytest.raises(QKHooksError, match="5x3 patch grid, the earlier ones on 3x5"):
            run(tall)
    assert means.counts == {0: 4, 1: 4} and means.grids == {0: (3, 5), 1: (3, 5)}
    again = PositionMeans()
    again.load_state_dict(means.state_dict())  # the grid survives a checkpoint
    assert again.grids == means.grids
    for reducer in (BFDEnergies(full_modes(model), means, 1), PositionDecoding(means, (3, 5), 1, 3)):
        with qkhooks.record(model, modes=None, sinks=[reducer]) as run, torch.no_grad():
            with pytest.raises(QKHooksError, match="5x3 patch grid, the earlier ones on 3x5"):
                run(tall)
            run(wide)
        assert reducer.images_held() == 4


def test_run_bfd_refuses_batches_of_two_sizes_in_words():
    from qkhooks.analysis.bfd import run_bfd

    with pytest.raises(QKHooksError, match="2 shapes.*one input size"):
        run_bfd(_dynamic_vit(), [torch.randn(4, 3, 32, 48), torch.randn(4, 3, 48, 32)], None, batch_size=4)


def test_a_layer_without_content_is_named_in_the_refusal():
    from qkhooks.analysis.bfd_summary import refuse_no_content

    with pytest.raises(QKHooksError, match="zero at layer 3: .*--layers"):
        refuse_no_content(0.0, 1.0, 6, np.float64, layer=3)


# ----------------------------------------------- one copy of a run's statics for merge and repair (review C 2)
def test_merge_keeps_the_statics_checksum_and_repair_their_attributes(tiny_loaded, tmp_path):
    """A merge copied the statics without their Fletcher-32 checksum, a repair without their attributes; both now
    copy through one function that keeps both (and the values)."""
    import h5py

    from qkhooks.distributed import merge_shards, shard_path
    from qkhooks.store import repair

    out = tmp_path / "run.h5"
    for rank in (0, 1):
        qkhooks.record_dataset(tiny_loaded, _photos(6), shard_path(out, rank, 2), shard=(rank, 2), batch_size=3,
                               progress=False, checksum=True)
    merged = merge_shards(out, [shard_path(out, r, 2) for r in (0, 1)])
    with h5py.File(shard_path(out, 0, 2), "r") as shard, h5py.File(merged, "r") as f:
        assert shard["spectrum/L0/U"].fletcher32 and f["spectrum/L0/U"].fletcher32
        np.testing.assert_array_equal(f["spectrum/L0/U"][()], shard["spectrum/L0/U"][()])

    single = tmp_path / "single.h5"
    qkhooks.record_dataset(tiny_loaded, _photos(4), single, batch_size=2, progress=False)
    with h5py.File(single, "a") as f:
        f["spectrum/L1/S"].attrs["note"] = "kept"
    fixed = tmp_path / "fixed.h5"
    repair(single, fixed)
    with h5py.File(fixed, "r") as f:
        assert f["spectrum/L1/S"].attrs["note"] == "kept"


def test_a_reducer_the_run_lacks_is_named_with_those_it_has_and_attention_none_is_not_offered_twice(tiny_loaded, tmp_path):
    from qkhooks.attention import AttentionSpec
    from qkhooks.errors import MissingReducer

    result = qkhooks.record_dataset(tiny_loaded, _photos(2), tmp_path / "run.h5", progress=False)
    with pytest.raises(QKHooksError, match=r"no reducer 'topk'; its reducers: topk_modes, anisotropy") as caught:
        result.reducer("topk")
    assert isinstance(caught.value, KeyError) and isinstance(caught.value, MissingReducer)
    assert result.reducer("topk_modes") is result.reducers[0]
    with pytest.raises(QKHooksError) as caught:
        AttentionSpec("none")  # "none" is what parse_attention reads as no attention, not a kind of spec
    assert "or 'none'" not in str(caught.value) and "attention=None" in str(caught.value)


def test_bfd_claims_count_the_heads_with_a_value_and_share_of_head_is_defined_as_what_it_is():
    """A head with W_q = 0 has no shares: the claim's mean skipped it but said "over 4 heads" (review B); and
    share_of_head is each mode's energy over the sum of its head's mode energies (checked here against the head's
    own per-mode energies), which DEFINITIONS now says is not the head's energy under frobenius."""
    from qkhooks.analysis.bfd import DEFINITIONS, paper_claims, run_bfd

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                              depth=2, num_heads=2).eval()
    with torch.no_grad():
        model.blocks[1].attn.qkv.weight[16:32] = 0  # layer 1, head 1: W_q = 0
    result = run_bfd(model, torch.randn(8, 3, 32, 32), None, batch_size=4)
    heads = [h for layer in result["layers"] for h in layer["heads"]]
    valued = sum(any(v is not None for v in h["energy"].values()) for h in heads)
    assert (len(heads), valued) == (4, 3)
    assert "over 3 heads (1 head with no value left out)" in paper_claims(result)["sentences"][0]
    head = result["layers"][0]["heads"][0]
    shares = np.array([m["share_of_head"] for m in head["modes"]])
    np.testing.assert_allclose(shares.sum(), 1.0, rtol=1e-9)
    assert "not of the head" in DEFINITIONS["share_of_head"]


def test_the_demo_report_names_the_files_of_its_data_it_skipped(tmp_path):
    """A folder with an unreadable file: the page and summary.json said "N photos" and never named it (review D)."""
    from PIL import Image

    from qkhooks.report import make_report

    folder = tmp_path / "photos"
    folder.mkdir()
    for i, photo in enumerate(_photos(3)):
        Image.fromarray(photo).save(folder / f"p{i}.png")
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, patch_size=32, embed_dim=32, depth=2,
                              num_heads=4).eval()
    with pytest.warns(UserWarning):
        summary = make_report(tmp_path / "report", qkhooks.load_model(model), data=str(folder), o3=3, objects=2,
                              batch_size=4, progress=False)
    skipped = summary["sections"]["modes"]["skipped"]
    assert [name for name, _ in skipped] == ["broken.jpg"]
    page = (tmp_path / "report" / "index.html").read_text()
    assert "1 image file(s) of the data were skipped as unreadable (broken.jpg)" in page


def test_a_photo_between_pils_limit_and_twice_it_is_held_to_the_limit(tiny_loaded, tmp_path, monkeypatch):
    """PIL raises only past twice MAX_IMAGE_PIXELS and warns below: a photo between was recorded although README
    says the limit refuses it (review D). Now it is skipped in a folder, with PIL's reason."""
    from PIL import Image

    for name, side in (("small.png", 20), ("large.png", 40)):  # 400 and 1,600 pixels; the limit is 1,000
        Image.fromarray(np.zeros((side, side, 3), np.uint8)).save(tmp_path / name)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.warns(UserWarning, match="large.png"):
        result = qkhooks.record_dataset(tiny_loaded, str(tmp_path), tmp_path / "run.h5", progress=False)
    assert result.images == 1 and [name for name, _ in result.skipped] == ["large.png"]
    assert "exceeds limit of 1000 pixels" in result.skipped[0][1]


def test_the_demos_defaults_are_the_installed_photos_beside_folders_of_their_names(tmp_path, monkeypatch):
    """Run from a folder that holds ./voc and ./samples (a VOC project), the demo's own specs were refused as
    ambiguous, naming spellings the user never typed (review G); its defaults are now the installed photos, and a run
    of them records their plain name, which analyses reopen as the photos (not the folder)."""
    from qkhooks.data.datasets import bundled
    from qkhooks.report import make_report

    monkeypatch.chdir(tmp_path)
    for name in ("voc", "samples"):
        (tmp_path / name).mkdir()
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, patch_size=32, embed_dim=32, depth=2,
                              num_heads=4).eval()
    summary = make_report(tmp_path / "report", qkhooks.load_model(model), photos=2, o3=3, objects=2, batch_size=4,
                          progress=False)
    assert summary["data"]["photos"] == "bundled:samples" and summary["sections"]["modes"]["images"] == 2
    assert bundled("voc+arc2017+o3:2:7") == "bundled:voc+bundled:arc2017+o3:2:7" and bundled("/x/voc") == "/x/voc"
    with pytest.raises(QKHooksError, match="ambiguous"):  # what a user types is read as typed
        qkhooks.record_dataset(_loaded(_tiny()), "voc", tmp_path / "run.h5", progress=False)


def _stopped(loaded, data, path) -> None:
    """A run of ``data`` with the default options, stopped by Ctrl-C after 2 batches of 2, a checkpoint after each."""
    from qkhooks.options import RecordOptions

    _interrupted(loaded, path, data=data, layers=None, modes=RecordOptions().modes)


def test_a_resume_over_a_list_whose_items_before_the_resume_point_changed_is_refused(tiny_loaded, tmp_path):
    """A stream resumes at a position: a path removed before it shifted every later image onto the next one's place
    without a word (the id check sees only ids met twice), and a run of an earlier qkhooks (position ids) resumed
    over the same paths went on under path ids (review G). The ids before the resume point are now compared."""
    from PIL import Image

    paths = []
    for i, photo in enumerate(_photos(8)):
        paths.append(str(tmp_path / f"img{i}.png"))
        Image.fromarray(photo).save(paths[-1])
    run = tmp_path / "run.h5"
    _stopped(tiny_loaded, paths, run)
    with qkhooks.open_run(run) as stored:
        assert stored.ids == paths[:4]
    with pytest.raises(QKHooksError, match=r"image 0 of the file is '.*img0.png', the data's is '.*img1.png'"):
        qkhooks.record_dataset(tiny_loaded, paths[1:], run, resume=True, progress=False)
    old = tmp_path / "old.h5"  # as an earlier qkhooks named them: by position
    _stopped(tiny_loaded, [{"image": p, "id": str(i)} for i, p in enumerate(paths)], old)
    with pytest.raises(QKHooksError, match=r"image 0 of the file is '0'.*by their position"):
        qkhooks.record_dataset(tiny_loaded, paths, old, resume=True, progress=False)
    done = qkhooks.record_dataset(tiny_loaded, paths, run, resume=True, progress=False)  # the same list resumes
    assert done.resumed_from == 2  # the checkpoint after the first batch (Ctrl-C came before the second one's)
    with qkhooks.open_run(run) as stored:
        assert stored.complete and stored.ids == paths


def test_the_models_own_forward_stopped_by_ctrl_c_is_not_called_a_partial_call():
    """torch runs no always_call hook for a KeyboardInterrupt, so the batch stays open: reading it said "a call other
    than the model's own ... record layers=[0]" (review G); the model's own call says it did not complete."""
    model = _tiny()
    images = torch.randn(2, 3, 48, 48)

    def interrupt(module, args, output):
        raise KeyboardInterrupt

    with qkhooks.record(model, modes=2) as run, torch.no_grad():
        model(images)
        assert run.n == 2
        handle = model.blocks[0].register_forward_hook(interrupt)  # a block, not a q/k module: layer 1 never runs
        with pytest.raises(KeyboardInterrupt):
            model(images)
        handle.remove()
        assert run.n == 0
        with pytest.raises(QKHooksError) as caught:
            run.query(0)
    assert "did not complete" in str(caught.value) and "other than the model's own" not in str(caught.value)


def test_a_resume_over_a_recorded_photo_the_dataset_now_skips_names_the_reason(tiny_loaded, tmp_path, monkeypatch):
    """A photo recorded under PIL's earlier leniency (or a higher limit) is skipped as the folder is opened now: the
    resume said the dataset changed ("files removed, renamed or reordered"), wrong advice (review G)."""
    from PIL import Image

    folder = tmp_path / "photos"
    folder.mkdir()
    for i, photo in enumerate(_photos(6)):
        Image.fromarray(photo if i != 1 else np.zeros((50, 50, 3), np.uint8)).save(folder / f"img{i}.png")
    run = tmp_path / "run.h5"
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    _stopped(tiny_loaded, str(folder), run)
    with qkhooks.open_run(run) as stored:
        assert "img1.png" in stored.ids
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # img1 is 2,500 pixels, the others 1,600
    with pytest.warns(UserWarning), pytest.raises(QKHooksError, match=r"'img1.png' of the run file is skipped now as "
                                                                       r"the dataset is opened \(.*exceeds limit.*MAX_IMAGE_PIXELS"):
        qkhooks.record_dataset(tiny_loaded, str(folder), run, resume=True, progress=False)


def test_numpy_integers_are_whole_numbers_for_every_count_option(tiny_loaded, tmp_path):
    """refuse_batching took numpy integers, the shard and checkpoint checks refused them, saying
    "0 <= rank < world" of a shard that is (review G): one test now."""
    result = qkhooks.record_dataset(tiny_loaded, _photos(4), tmp_path / "run.h5", progress=False,
                                    shard=(np.int64(1), np.int64(2)), checkpoint_every=np.int64(1),
                                    batch_size=np.int64(2))
    assert result.images == 2


class _Items(torch.utils.data.Dataset):
    """A map-style Dataset (its ids cannot be read without __getitem__, so a resume does not compare them ahead)."""

    def __init__(self, ids: list[str]):
        self.ids, self.photos = ids, _photos(len(ids))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.photos[i], "id": self.ids[i]}


def test_a_resumed_stream_meeting_an_id_already_in_the_file_names_both_causes(tiny_loaded, tmp_path):
    run = tmp_path / "run.h5"
    _stopped(tiny_loaded, _Items([f"p{i}" for i in range(8)]), run)
    with pytest.raises(QKHooksError, match=r"item id 'p0' is already in the run file: two items of the data have it "
                                           r".* or the data changed since the run started"):
        qkhooks.record_dataset(tiny_loaded, _Items(["p0", "p1", "p0", "p3", "p4", "p5", "p6", "p7"]), run,
                               resume=True, progress=False)


@pytest.mark.parametrize("padding", [0, 1, (2, 0), "valid", "same"])
def test_one_conv_output_size_matches_torchs_conv_with_every_padding(padding):
    """Two copies of the formula had drifted: one raised a TypeError on padding='same' (review C). One helper now,
    checked against the conv itself."""
    from qkhooks.models.base import conv_output_size

    stride = 1 if padding == "same" else 2
    dilation = 1 if padding == "same" else (1, 2)
    conv = torch.nn.Conv2d(3, 4, kernel_size=(3, 5), stride=stride, padding=padding, dilation=dilation)
    out = conv(torch.zeros(1, 3, 23, 31)).shape[-2:]
    assert (conv_output_size(23, conv, 0), conv_output_size(31, conv, 1)) == tuple(out)
