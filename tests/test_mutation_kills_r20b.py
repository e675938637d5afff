"""Round 20, second run: tests that kill the surviving mutants of the functions round 20 changed or added
(tests/MUTATION.md, "Run of 2026-12-03 (round 20, second run)"), each against an independent reference (PIL's own
decode, numpy, os.stat, h5py reads)."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin
from test_data_spec_grammar import _chunk, _chunks, _decoded_orientation, _exif_chunk_data, _png

from qkhooks.data.items import _file_orientation, read_mask_file, shown_frame
from qkhooks.errors import QKHooksError


def _forbid_png_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    """PIL's PNG decode made to fail: what is read after this was read from the chunks' headers."""
    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", lambda *a, **k: pytest.fail("decoded a PNG"))


def _rewritten(path: Path, chunks: list[bytes]) -> Path:
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"".join(chunks))
    return path


def test_a_png_whose_image_data_is_interrupted_by_another_chunk_is_left_to_pils_decode_which_refuses_it(tmp_path):
    """_png_exif_after_data (_48, _49: image data after other chunks walked on): the image data split around a text
    chunk ends PIL's decode early (the PNG standard wants IDAT chunks consecutive), so the photo is refused at open as
    PIL's decode fails, even with an eXIf chunk further on that a walk would read."""
    chunks = _chunks(_png(tmp_path / "whole.png", (20, 30), 6).read_bytes())
    at = next(i for i, c in enumerate(chunks) if c[4:8] == b"IDAT")
    data = chunks[at][8:-4]
    split = chunks[:at] + [_chunk(b"IDAT", data[:40]), _chunk(b"tEXt", b"Comment\0between"),
                           _chunk(b"IDAT", data[40:])] + chunks[at + 1:]
    path = _rewritten(tmp_path / "split.png", split)
    with Image.open(path) as im, pytest.raises(OSError):  # the reference: PIL's decode fails
        im.load()
    with pytest.raises(QKHooksError, match=r"^photo .*split\.png cannot be read \(OSError: .+\); replace or remove "
                                           r"it\.$"):
        shown_frame(path, "photo")


def test_a_png_with_a_chunk_type_that_is_not_letters_after_its_data_reads_the_orientation_pils_decode_reads(tmp_path):
    """_png_exif_after_data (_33: a malformed chunk type walked over): PIL's decode stops at a chunk whose type is not
    four letters or digits, so an eXIf chunk behind it is not read (orientation 1), and neither is it here."""
    broken = _chunk(b"ab c", b"") + _chunk(b"eXIf", _exif_chunk_data(6))
    path = _png(tmp_path / "broken.png", (20, 30), None, extra=broken)
    assert _decoded_orientation(path) == (1, (20, 30))  # the reference: PIL's decode
    assert shown_frame(path, "photo") == (1, (20, 30))


def test_a_long_exif_chunk_after_the_data_is_read_without_decoding_and_stored_in_info_as_pils_decode_stores_it(
        tmp_path, monkeypatch):
    """_png_exif_after_data (_77: the eXIf chunk read to the end of the file; _78: read as a text chunk's keyword,
    80 bytes): an eXIf chunk of more than 80 bytes after the image data gives the orientation and info["exif"] of
    PIL's decode (read before the decode is switched off), without decoding."""
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010E] = "a description long enough to take the chunk past eighty bytes, " * 2
    data = exif.tobytes()[6:]
    assert len(data) > 80
    path = _png(tmp_path / "long.png", (20, 30), None, extra=_chunk(b"eXIf", data))
    with Image.open(path) as im:  # the reference: PIL's decode
        assert "exif" not in im.info
        im.load()
        decoded = im.info["exif"]
    read = Image.Exif()
    read.load(decoded)
    assert read[0x0112] == 6
    _forbid_png_decode(monkeypatch)
    with Image.open(path) as im:
        assert _file_orientation(im, path) == 6
        assert im.info["exif"] == decoded


def test_a_png_with_its_orientation_in_a_header_text_chunk_is_read_without_decoding(tmp_path, monkeypatch):
    """_png_exif_after_data (_62: every chunk before the image data read as if after it, so the header's XMP text
    sent the file to PIL's decode): the XMP orientation before the image data is read from the header, equal to
    PIL's decode."""
    chunks = _chunks(_png(tmp_path / "plain.png", (20, 30), None).read_bytes())
    xmp = _chunk(b"iTXt", b"XML:com.adobe.xmp\0\0\0\0\0<x tiff:Orientation=\"8\"/>")
    path = _rewritten(tmp_path / "xmp.png", chunks[:1] + [xmp] + chunks[1:])  # right after IHDR
    expected = _decoded_orientation(path)
    assert expected == (8, (30, 20))
    _forbid_png_decode(monkeypatch)
    assert shown_frame(path, "photo") == expected


def test_a_mask_file_is_read_in_the_mode_asked_as_pil_converts_it(tmp_path):
    """read_mask_file (_10: the mode dropped): an RGB mask file read as "L" (O3's masks) equals PIL's own
    convert("L"), one channel."""
    pixels = np.random.default_rng(0).integers(0, 255, (6, 5, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "mask.png")
    grey, tagged = read_mask_file(tmp_path / "mask.png", "O3 image a.png", "target", "L")
    with Image.open(tmp_path / "mask.png") as im:
        np.testing.assert_array_equal(grey, np.asarray(im.convert("L")))
    assert grey.shape == (6, 5) and tagged is False


def test_a_run_without_a_data_attribute_is_named_by_a_question_mark_when_its_files_changed(tmp_path):
    """changed_files (_9: the stand-in name of a run whose data attribute is missing) against sizes from os.stat."""
    from qkhooks.data_files import changed_files

    (tmp_path / "a.png").write_bytes(b"x" * 7)
    from test_mutation_kills_r19 import files_dataset

    data = files_dataset({"a.png": str(tmp_path / "a.png")})
    now = (tmp_path / "a.png").stat().st_size
    assert changed_files({}, data, ["a.png"], sizes={"a.png": now + 1}) == (
        f"1 of the 1 images to draw in '?' are not the files this run recorded (first: 'a.png', {now + 1} bytes when "
        f"recorded, {now} now); drawing no photos rather than others. Put the recorded files back, or draw without "
        "photos (--no-images).")


def test_a_resume_of_a_run_whose_ids_and_array_were_cut_names_both_row_counts_ids_first(tmp_path):
    """RunWriter._check_whole (_17: an array's second axis named as its rows; _27: the ids' line after the arrays')
    against the row counts h5py reads back after the cut."""
    import h5py

    from qkhooks.store import RunWriter

    path = tmp_path / "run.h5"
    ids = [f"image_{i}" for i in range(6)]
    with RunWriter(path, dtype="float32", chunk_images=2, attrs={"model": "m"}) as w:
        for i in range(3):
            w.write_batch(ids[2 * i:2 * i + 2], {"v": np.full((2, 8), i, np.float32)})
    with h5py.File(path, "r+") as f:
        f["images/ids"].resize(4, axis=0)
        f["v"].resize(3, axis=0)
    with h5py.File(path, "r") as f:
        rows = {name: f[name].shape[0] for name in ("images/ids", "v")}
    assert rows == {"images/ids": 4, "v": 3}
    with pytest.raises(QKHooksError) as refused:
        RunWriter(path, mode="resume", dtype="float32", attrs={"model": "m"})
    assert str(refused.value) == (
        f"cannot resume {path}: it is damaged (images/ids has {rows['images/ids']} rows; v has {rows['v']} rows, with "
        f"6 images committed). Recover its intact images with `qkhooks repair {path} --out FIXED.h5` and resume that "
        "(the same command with --out FIXED.h5 --resume), or start again with --overwrite.")


@pytest.mark.parametrize("lost", [5, 6])
def test_repair_reads_only_the_rows_whose_chunks_lie_inside_the_file_and_lists_five_lost_chunks_at_most(
        tmp_path, lost):
    """repair._readable_rows (_47: why a chunk past the end is lost; _67, _71, _72: the list of lost chunks, cut
    after five with " ...") against the chunks' byte ranges h5py reports: the file taken as cut where the last
    ``lost`` chunks begin."""
    import h5py

    from qkhooks.store.repair import _readable_rows

    with h5py.File(tmp_path / "a.h5", "w") as f:
        ds = f.create_dataset("w", data=np.arange(10.0), chunks=(1,))
        spans = sorted((c.byte_offset, c.byte_offset + c.size, lo) for lo, c in
                       ((lo, ds.id.get_chunk_info_by_coord((lo,))) for lo in range(10)))
        cut = spans[-lost][0]  # the file ends where the first of the lost chunks begins
        want = np.array([end <= cut for _, end, _ in sorted(spans, key=lambda s: s[2])])
        problems: list[str] = []
        ok = _readable_rows(ds, 10, cut, problems)
        np.testing.assert_array_equal(ok, want)
        gone = [f"{lo}" for lo in range(10) if not want[lo]]  # one-row spans said as their rows (review r46)
        assert problems == [f"/w: rows {', '.join(gone[:5])}{' ...' if lost > 5 else ''} do not read (a chunk "
                            "missing from the file or lying past its end)"]


def test_the_file_size_column_is_os_stats_size_and_minus_one_for_no_file_or_one_gone(tmp_path):
    """data_files.file_size_column, _size (_6: the value of a file that cannot be read) against os.stat."""
    from qkhooks.data_files import file_size_column

    (tmp_path / "a.png").write_bytes(b"x" * 11)
    (tmp_path / "b.png").write_bytes(b"")
    from test_mutation_kills_r19 import files_dataset

    column = file_size_column(files_dataset({**{n: str(tmp_path / n) for n in ("a.png", "b.png", "gone.png")},
                                             "drawn": None}))
    sizes = column(["gone.png", "a.png", "drawn", "b.png", "unknown"])
    assert sizes.dtype == np.int64
    np.testing.assert_array_equal(sizes, [-1, os.stat(tmp_path / "a.png").st_size, -1, 0, -1])


def test_recorded_sizes_keep_an_empty_files_zero_and_leave_out_images_without_a_file(tmp_path):
    """data_files.recorded_sizes (_19: a recorded size of 0 bytes left out) against the array written."""
    from qkhooks.data_files import recorded_sizes
    from qkhooks.store import RunWriter, open_run
    from qkhooks.store.format import FILE_SIZES

    written = np.array([5, 0, -1, 7], np.int64)
    ids = ["a", "b", "c", "d"]
    with RunWriter(tmp_path / "run.h5", dtype="float32", attrs={"model": "m"}) as w:
        w.write_batch(ids, {"v": np.zeros((4, 2), np.float32), FILE_SIZES: written})
    with open_run(tmp_path / "run.h5") as run:
        assert recorded_sizes(run, run.ids, [3, 1, 2, 1, 9]) == {"b": 0, "d": 7}
        assert recorded_sizes(run, run.ids, []) == {}


class _Writer:
    """What WriterSink calls on a RunWriter, recorded."""

    def __init__(self, layout: list[str] | None):
        self.layout_arrays, self.statics, self.batches = layout, [], []

    def write_static(self, name: str, value: object) -> None:
        self.statics.append(name)

    def write_batch(self, ids: list[str], arrays: dict[str, object]) -> None:
        self.batches.append((list(ids), arrays))


def _batch(ids: list[str], meta: dict[str, object]) -> SimpleNamespace:
    arrays = {"modes/L0/query": np.ones((len(ids), 2)), "attention/L0/rows": np.zeros((len(ids), 3))}
    return SimpleNamespace(ids=ids, meta=meta, statics=lambda: {"spectrum/L0/S": np.ones(2)}, arrays=lambda: arrays)


@pytest.mark.parametrize("store_modes", [True, False])
def test_the_writer_sink_passes_the_batchs_arrays_its_extras_and_file_sizes_where_the_layout_takes_them(store_modes):
    """stream.WriterSink.update (_14: the modes left out by another prefix; _17: a batch without extras; _27: file
    sizes where the layout has none; _29: the sizes of other ids): the arrays each batch hands the writer."""
    from qkhooks.store.format import FILE_SIZES
    from qkhooks.stream import WriterSink

    sizes = {"a": 3, "b": 4, "c": 5}
    column = lambda ids: np.array([sizes[i] for i in ids], np.int64)  # noqa: E731
    for layout, stored in ((None, True), (["attention/L0/rows", FILE_SIZES], True), (["attention/L0/rows"], False)):
        writer = _Writer(layout)
        sink = WriterSink(writer, store_modes=store_modes, file_sizes=column)
        sink.update(_batch(["a", "b"], {"arrays": {"masks": np.ones((2, 4))}}))
        sink.update(_batch(["c"], {}))
        assert writer.statics == ["spectrum/L0/S"]  # once, before the first batch
        want = {"attention/L0/rows"} | ({"modes/L0/query"} if store_modes else set()) | (
            {FILE_SIZES} if stored else set())
        assert [ids for ids, _ in writer.batches] == [["a", "b"], ["c"]]
        assert [set(arrays) for _, arrays in writer.batches] == [want | {"masks"}, want]
        if stored:
            np.testing.assert_array_equal(writer.batches[1][1][FILE_SIZES], [5])
    writer = _Writer(None)
    WriterSink(writer, store_modes=store_modes).update(_batch(["a"], {}))
    assert FILE_SIZES not in writer.batches[0][1]


def test_open_dataset_takes_a_limit_of_one_and_refuses_other_limits_and_configs_in_whole_sentences():
    """datasets.open_dataset (_12: a float or bool limit let through; _16: a limit of 1 refused; _6: the config's
    refusal text): o3:4 cut to one display."""
    from qkhooks.data import ImageConfig, open_dataset

    cfg = ImageConfig(size=(32, 32), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert len(open_dataset("o3:4", cfg, limit=1)) == 1 and len(open_dataset("o3:4", cfg, limit=3)) == 3
    for limit in (0, -2, 2.5, True):
        with pytest.raises(QKHooksError) as refused:
            open_dataset("o3:4", cfg, limit=limit)
        assert str(refused.value) == f"limit must be a positive integer or None, got {limit!r}."
    with pytest.raises(QKHooksError) as refused:
        open_dataset("o3:4", {"size": (32, 32)})
    assert str(refused.value) == ("image_config must be a qkhooks.data.ImageConfig, got dict; use "
                                  "ImageConfig.from_timm(model) or load_model(...).image_config.")


def test_a_folder_given_as_a_path_object_is_opened_with_the_limit_and_check_asked(tmp_path):
    """datasets.open_dataset (_30: a Path's limit dropped; _21: check="decode" refused; _23: the check's refusal
    text): the ids of the first two files in sorted order, as a folder of three noise PNGs holds them."""
    from qkhooks.data import ImageConfig, open_dataset

    cfg = ImageConfig(size=(32, 32), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    for name in ("c.png", "a.png", "b.png"):
        Image.fromarray(np.random.default_rng(1).integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(tmp_path / name)
    assert open_dataset(tmp_path, cfg, limit=2, check="decode").ids == ["a.png", "b.png"]
    assert open_dataset(str(tmp_path), cfg, check="decode").ids == ["a.png", "b.png", "c.png"]
    with pytest.raises(QKHooksError) as refused:
        open_dataset(tmp_path, cfg, check="full")
    assert str(refused.value) == "check must be 'header' or 'decode', got 'full'."


def test_modes_come_from_the_qk_outputs_only_where_allowed_and_a_given_spectrum_follows_the_weights_of_each_call():
    """capture._layer_modes (_30, _31: the q/k path taken with qk_path=False or an augmented spectrum; _10: the
    projectors of a given spectrum cached, so a second recording with it after the weights changed projected the
    new q/k outputs through the old weights' solution): the q/k path's query modes equal the tokens' (x) path's."""
    import qkhooks
    from conftest import TINY_MODELS

    tiny = next(t for t in TINY_MODELS if t.name == "timm-vit-4x6")
    model, images = tiny.model(), tiny.images()
    for kwargs in ({"qk_path": False}, {"augmented": True}):
        with qkhooks.record(model, modes=2, **kwargs) as rec:
            assert rec.mode_source == {0: "x", 1: "x"}, kwargs
    given = qkhooks.spectrum(model)
    with qkhooks.record(model, modes=2, spectrum=given) as before:
        assert before.mode_source == {0: "qk", 1: "qk"}
    with torch.no_grad():
        model.blocks[1].attn.qkv.weight.mul_(2.0)  # the given spectrum stays; the q/k outputs double
    maps = {}
    for qk_path in (True, False):
        with qkhooks.record(model, modes=2, spectrum=given, qk_path=qk_path, spectrum_of_other_weights=True) as rec, \
                torch.no_grad():
            model(images)
        assert rec.mode_source[1] == ("qk" if qk_path else "x")
        maps[qk_path] = rec.last.query(1)
    torch.testing.assert_close(maps[True], maps[False], rtol=1e-4, atol=1e-5)


def test_a_layer_list_mixing_a_module_path_and_a_tensor_index_selects_both_blocks():
    """models.base._paths_as_indices (_27: a list joined into a string, where a 0-d tensor's str, "tensor(1)", is no
    index): the recorded layers are the blocks the path and the tensor name, found by the sites' own paths."""
    import qkhooks
    from conftest import TINY_MODELS

    model = next(t for t in TINY_MODELS if t.name == "timm-vit-4x6").model()
    with qkhooks.record(model, modes=2, layers=[torch.tensor(1), "blocks.0.attn"]) as rec:
        assert {s.layer: s.path for s in rec.sites} == {0: "blocks.0.attn", 1: "blocks.1.attn"}


@pytest.mark.parametrize("layout", [{"checksum": True}, {"compression": "gzip"}])
def test_a_checksummed_or_compressed_run_whose_first_batch_holds_one_image_gets_one_image_chunks(tmp_path, layout):
    """RunWriter._create_per_image (_16: a chunk of at least two images): one image a chunk, so a one-image batch
    fills its chunk (a checksummed chunk is never rewritten beside committed images); h5py reads the chunks."""
    import h5py

    from qkhooks.store import RunWriter

    with RunWriter(tmp_path / "run.h5", dtype="float32", attrs={"model": "m"}, **layout) as w:
        w.write_batch(["a"], {"v": np.full((1, 3), 1.0, np.float32)})
        w.write_batch(["b"], {"v": np.full((1, 3), 2.0, np.float32)})
    with h5py.File(tmp_path / "run.h5", "r") as f:
        assert f["v"].chunks == (1, 3)
        np.testing.assert_array_equal(f["v"][()], [[1.0] * 3, [2.0] * 3])
