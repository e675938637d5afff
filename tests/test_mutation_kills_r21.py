"""Kill tests for the mutants of round 21's functions that its own tests let survive (module "round21" of
tests/mutation.py); each checks a behaviour against an independent reference."""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import timm
from PIL import Image
from test_checksum import batches, write
from test_data import _exif_jpeg, _stored_labels
from test_wrapped_qk_layers_and_half_precision import PeftLoraLinear, _timm_vit
from test_low_precision_x_path import _images, _vit
from test_verify_run import flip_in_chunk

import qkhooks
from qkhooks.data.readers import _item_to_raw
from qkhooks.distributed import merge_shards, shard_path
from qkhooks.errors import QKHooksError
from qkhooks.models.base import find_sites
from qkhooks.models.unsupported import PEFT_FIX
from qkhooks.sdpa import scaled_logits
from qkhooks.store import RunWriter
from qkhooks.store.reader import RunArray
from qkhooks.store.repair import VerifyReport, repair, verify_run


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("which", ["q", "k"])
def test_scaled_logits_of_one_half_and_one_float32_operand_are_float32_of_their_values(half, which):
    """Either operand in half precision sends both through float32 (not only when both are half): the logits are
    the float64 product of the values held, rounded once to float32."""
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 5, 8, generator=gen), torch.randn(2, 3, 7, 8, generator=gen)
    q, k = (q.to(half), k) if which == "q" else (q, k.to(half))
    got = scaled_logits(q, k, 0.3)
    want = 0.3 * np.einsum("bhld,bhsd->bhls", q.double().numpy(), k.double().numpy())
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)


def _report(arrays: list[str], checksummed: list[str]) -> VerifyReport:
    return VerifyReport(Path("run.h5"), 4, True, arrays, checksummed, 2, {}, [], [])


@pytest.mark.parametrize("unsummed", [3, 4])
def test_the_verify_checksum_line_names_three_unsummed_arrays_then_an_ellipsis(unsummed):
    """Arrays without a checksum beside one with: the first three named, " ..." only when there are more."""
    names = [f"maps/{c}" for c in "abcd"[:unsummed]]
    line = [s for s in _report(["ids_sum", *names], ["ids_sum"]).summary().splitlines() if s.startswith("checksum")]
    assert line == [f"checksum Fletcher-32 on 1 of {unsummed + 1} per-image arrays; none on "
                    f"{', '.join(names[:3])}{' ...' if unsummed > 3 else ''}, whose chunks were only read and "
                    "decompressed: a flipped bit inside their data cannot be detected"]


# ------------------------------------------------------------------ readers: one user item to its image and masks
def _image(h: int = 6, w: int = 8) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8))


def test_a_pair_whose_second_element_is_a_mask_is_refused_with_the_whole_reason():
    with pytest.raises(QKHooksError) as exc:
        _item_to_raw((_image(), np.zeros((6, 8))), "item 3")
    assert str(exc.value) == (
        "item 3: a 2-item tuple is read as (image, label), and its second element is taken as a label and not used; "
        "only a label that is one value (an int, a float, a str, a 0-d array or tensor) is accepted there, so that a "
        "mask or a second image given there is not lost without a word. This one is a ndarray of shape (6, 8) (a "
        "multi-label or one-hot vector, boxes, a mask?). Give each item as a dict instead: {'image': image} records "
        "the image alone (e.g. [{'image': img} for img, _ in pairs], or a Dataset whose __getitem__ returns "
        "{'image': img}); give masks in a dict {'image': image, 'objects': mask}.")


def test_an_item_without_an_image_is_refused_naming_its_keys():
    with pytest.raises(QKHooksError) as exc:
        _item_to_raw({"label": 1, 2: "x"}, "item 0")
    assert str(exc.value) == ("item 0 has no image: its keys are ['2', 'label']; put the image under 'image' (or pass "
                              "image_column= for a Hugging Face dataset).")


def test_an_items_own_id_is_its_id_or_a_webdataset_samples_key_and_member():
    png = io.BytesIO()
    _image().save(png, format="PNG")
    assert _item_to_raw({"image": _image(), "id": 7}, "item 0")[0] == "7"
    assert _item_to_raw({"__key__": "shard/s1", "png": png.getvalue()}, "item 0")[0] == "shard/s1.png"
    assert _item_to_raw({"png": png.getvalue()}, "item 0")[0] is None
    assert _item_to_raw({"image": _image(), "__key__": "s1"}, "item 0")[0] is None  # the image is not a member


def test_odd_one_out_masks_keep_the_objects_given_and_an_overlap_names_the_items_id():
    target, distractor = np.zeros((6, 8), np.uint8), np.zeros((6, 8), np.uint8)
    target[:2, :3], distractor[4:, 5:] = 1, 1
    objects = np.arange(48, dtype=np.int32).reshape(6, 8)
    raw = _item_to_raw({"image": _image(), "target": target, "distractor": distractor, "objects": objects}, "item 0")[1]
    np.testing.assert_array_equal(raw.objects, objects)
    with pytest.raises(QKHooksError, match=r"item 4 \(id 'x9'\)"):
        _item_to_raw({"image": _image(), "target": target, "distractor": target, "id": "x9"}, "item 4")


def test_a_colour_label_mask_is_refused_naming_the_photo_the_mask_and_its_shape(tmp_path):
    path = tmp_path / "p.png"
    _image().save(path)
    with pytest.raises(QKHooksError) as exc:
        _item_to_raw({"image": str(path), "objects": np.zeros((6, 8, 3), np.uint8), "id": 2}, "item 0")
    assert str(exc.value).startswith(f"item 0 (id '2', {path}): mask 'objects' ") and "(6, 8, 3)" in str(exc.value)


def test_a_mask_file_drawn_on_a_turned_photos_stored_pixels_is_turned_with_it(tmp_path):
    """A mask given as a path (untagged, in the stored frame) of an EXIF-rotated photo read as a path: turned as the
    photo is shown (np.rot90, independent of qkhooks)."""
    _exif_jpeg(tmp_path / "photo.jpg", np.zeros((120, 200, 3), np.uint8), 6)  # shown 200 x 120
    labels = _stored_labels(120, 200)
    Image.fromarray(labels).save(tmp_path / "stored.png")
    raw = _item_to_raw({"image": str(tmp_path / "photo.jpg"), "objects": str(tmp_path / "stored.png")}, "item 0")[1]
    assert raw.image.size == (120, 200)
    np.testing.assert_array_equal(raw.objects, np.rot90(labels, -1))


# ------------------------------------------------------------------ repair
def test_a_repair_of_an_undamaged_run_reports_no_problem_and_keeps_every_image_and_value(tmp_path):
    """Every id read is no row past the ids' end: an intact run copies whole, with nothing to report."""
    written = write(tmp_path / "run.h5", checksum=True)
    report = repair(tmp_path / "run.h5", tmp_path / "fixed.h5")
    assert report.problems == [] and report.lost == []
    with h5py.File(tmp_path / "run.h5", "r") as f, h5py.File(tmp_path / "fixed.h5", "r") as g:
        assert list(g["images/ids"].asstr()[:]) == list(f["images/ids"].asstr()[:])
        for name, values in written.items():
            np.testing.assert_array_equal(g[name][:], values)


def test_a_repair_that_loses_a_chunk_is_incomplete_and_names_the_checkpoint_it_cannot_keep(tmp_path):
    """A complete run with a checkpoint and one damaged chunk (its rows as h5py reports them): the copy lacks those
    images, so it is not complete, and the checkpoint counting them is dropped with a note; the report names the
    damaged run."""
    run = tmp_path / "run.h5"
    with RunWriter(run, checksum=True) as writer:
        for ids, arrays in batches():
            writer.write_batch(ids, arrays)
        writer.write_checkpoint({"r": {"s": np.ones(2)}})
    with h5py.File(run, "r") as f:
        assert f.attrs["complete"]
    lo, hi = flip_in_chunk(run, "labels", chunk=0)
    report = repair(run, tmp_path / "fixed.h5")
    assert report.source == run and report.lost == list(range(lo, hi)) and report.states == []
    assert ("the reducer checkpoint counts images that were not recovered; a --resume of fixed.h5 starts again from "
            "its first image") in report.problems
    with h5py.File(tmp_path / "fixed.h5", "r") as g:
        assert not g.attrs["complete"]


def test_a_repaired_runs_id_and_skipped_lists_are_laid_out_as_the_writer_lays_them_out(tmp_path):
    """So that a resume of the copy appends to them as to the writer's own (chunks, growth, width)."""
    write(tmp_path / "run.h5", checksum=False)
    repair(tmp_path / "run.h5", tmp_path / "fixed.h5")
    with h5py.File(tmp_path / "run.h5", "r") as f, h5py.File(tmp_path / "fixed.h5", "r") as g:
        for name in ("images/ids", "images/skipped"):
            assert (g[name].chunks, g[name].maxshape, g[name].dtype) == (f[name].chunks, f[name].maxshape,
                                                                         f[name].dtype), name


# ------------------------------------------------------------------ reader
def test_a_boolean_image_mask_of_another_length_is_refused_with_both_lengths(tmp_path):
    with h5py.File(tmp_path / "a.h5", "w") as f:
        f["a"] = np.arange(12.0).reshape(6, 2)
        array = RunArray(f["a"], 5)  # five committed of six rows
        np.testing.assert_array_equal(array[np.arange(5) % 2 == 0], f["a"][[0, 2, 4]])
        with pytest.raises(IndexError) as exc:
            array[np.ones(6, bool)]
        assert str(exc.value) == "a boolean image mask must have one entry per image (5), not (6,)."


def test_a_chunk_without_a_checksum_that_does_not_decompress_is_not_blamed_on_a_checksum(tmp_path):
    path = tmp_path / "run.h5"
    with RunWriter(path, dtype="float32", chunk_images=2, compression="gzip") as w:
        for b in range(3):
            w.write_batch([f"im{2 * b}", f"im{2 * b + 1}"], {"v": np.full((2, 64), b, np.float32)})
    lo, hi = flip_in_chunk(path, "v", chunk=1, fill=0xAB)
    (line,) = [p for p in verify_run(path).problems if p.startswith("/v: ")]
    assert line.startswith(f"/v: rows {lo}-{hi - 1} do not read (") and "Fletcher-32" not in line


def test_the_verify_summary_lists_every_reducer_that_loads():
    report = dataclasses.replace(_report(["maps/a"], ["maps/a"]), states=["anisotropy", "topk"])
    assert "reducers anisotropy, topk load" in report.summary().splitlines()


def test_a_merged_view_of_one_value_per_image_is_verified_row_block_by_row_block(tmp_path):
    """A merge's per-image arrays are unchunked views (read 64 MiB of rows at a time); a 1-D one verifies like any
    other, and a missing shard's rows are named."""
    out = tmp_path / "run.h5"
    for rank in range(2):
        with RunWriter(shard_path(out, rank, 2), attrs={"config": json.dumps({"shard": [rank, 2]})}) as w:
            w.write_batch([f"r{rank}i{i}" for i in range(3)], {"labels": np.arange(3, dtype=np.int32) + 10 * rank})
    merge_shards(out)
    with h5py.File(out, "r") as f:
        assert f["labels"].is_virtual and f["labels"].chunks is None
    report = verify_run(out)
    assert report.ok and report.arrays == ["labels"]
    shard_path(out, 1, 2).rename(tmp_path / "elsewhere.h5")
    assert verify_run(out).damaged["labels"] == [(3, 6)]


# ------------------------------------------------------------------ capture: the q/k path only for float32 q and k
def test_a_pinned_qk_layer_refused_under_autocast_names_the_dtype_its_linear_returned():
    model, images = _vit(), _images()
    with qkhooks.record(model, modes=4) as run, torch.no_grad():
        run.pin_mode_source()
        path = next(s.path for s in run.sites if s.layer == 0)
        with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(QKHooksError) as exc:
            model(images)
    assert str(exc.value) == (
        f"layer 0 ({path}): its q/k Linear returned bfloat16 in this batch, where this recording's store states its "
        "maps come from the model's float32 q and k (decided before the first batch); from q and k below float32 they "
        "would be far less exact than from the tokens. Enter torch.autocast (or cast the model) before record() / "
        "record_dataset, so that each layer's source is decided at entry, or record with qk_path=False.")


# ------------------------------------------------------------------ the unplain-W_q/W_k refusal
def test_a_lora_wrapper_is_refused_with_the_whole_message():
    model = _timm_vit()
    wrapper = model.blocks[1].attn.qkv = PeftLoraLinear(model.blocks[1].attn.qkv)
    cls = type(wrapper)
    with pytest.raises(QKHooksError) as exc:
        find_sites(model)
    assert str(exc.value) == (
        f"unsupported attention in 'blocks.1.attn' (Attention): W_q/W_k are read off 'blocks.1.attn.qkv' "
        f"({cls.__module__}.{cls.__qualname__}), whose forward is not one qkhooks knows to compute exactly what the "
        "weights read say (a LoRA layer adds B·A·x), so the spectrum, modes and maps would describe the bare weights, "
        f"not what the model computes. To record it, {PEFT_FIX}.")


def test_weights_read_through_the_attention_librarys_own_modules_are_taken():
    """timm's LeViT reads W_q/W_k through LinearNorm (timm.models.levit, BatchNorm folded): the attention's own
    library, so every attention module of the model is a site."""
    model = timm.create_model("levit_128s", pretrained=False).eval()
    attentions = [m for m in model.modules() if type(m).__name__ in ("Attention", "AttentionDownsample")]
    assert [s.module for s in find_sites(model)] == attentions
