"""The opt-in checksum of the per-image arrays (``checksum=True``, ``qkhooks record --checksum``): HDF5's Fletcher-32
filter on every per-image array, so a flipped bit inside an array's data is reported by every reader, never returned,
and ``qkhooks repair`` recovers exactly the images outside the damaged chunk. Without it the same flip reads back as
a different value without a word: the contrast each damage test below shows is what the option is for."""

from __future__ import annotations

import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import timm
import torch

import qkhooks
from qkhooks import QKHooksError
from qkhooks.cli import main
from qkhooks.distributed import merge_shards, shard_path
from qkhooks.options import RecordOptions
from qkhooks.store import RunWriter, open_run, repair
from qkhooks.stream import record_dataset

BATCH = 4


def batches(count: int = 3) -> list[tuple[list[str], dict[str, np.ndarray]]]:
    """Batches of two per-image arrays: float16 maps (a small array, which uncompressed would share chunks across
    batches) and int32 labels."""
    rng = np.random.default_rng(7)
    return [([f"im{b * BATCH + i}" for i in range(BATCH)],
             {"maps/a": rng.standard_normal((BATCH, 3, 8)).astype(np.float16),
              "labels": rng.integers(-1000, 1000, (BATCH, 2)).astype(np.int32)}) for b in range(count)]


def write(path: Path, checksum: bool, **kw) -> dict[str, np.ndarray]:
    """A run of the batches above; returns each array's values as written."""
    written = batches()
    with RunWriter(path, checksum=checksum, **kw) as writer:
        for ids, arrays in written:
            writer.write_batch(ids, arrays)
    return {name: np.concatenate([arrays[name] for _, arrays in written]) for name in written[0][1]}


def flip_byte(path: Path, name: str, image: int) -> None:
    """Flip one bit of one byte inside the raw data of the chunk that holds ``image`` of array ``name``."""
    with h5py.File(path, "r") as f:
        ds = f[name]
        start = image // ds.chunks[0] * ds.chunks[0]
        info = ds.id.get_chunk_info_by_coord((start,) + (0,) * (ds.ndim - 1))
        row_bytes = int(np.prod(ds.shape[1:])) * ds.dtype.itemsize
    at = info.byte_offset + (image - start) * row_bytes + 3  # a byte of the image's own row in the chunk
    with open(path, "r+b") as fh:
        fh.seek(at)
        byte = fh.read(1)[0]
        fh.seek(at)
        fh.write(bytes([byte ^ 0x10]))


def test_checksummed_arrays_carry_the_filter_one_image_a_chunk_and_round_trip_bit_exactly(tmp_path):
    for checksum in (True, False):
        path = tmp_path / f"{checksum}.h5"
        want = write(path, checksum)
        with h5py.File(path, "r") as f:
            for name in want:
                assert f[name].fletcher32 is checksum, name
        with open_run(path) as run:
            for name, values in want.items():
                got = run.array(name)[:]
                assert got.dtype == values.dtype and got.tobytes() == values.tobytes(), name
    with h5py.File(tmp_path / "True.h5", "r") as f:
        # a checksummed chunk is written once, whole, before its image is committed (never rewritten in place
        # beside committed images, whatever the later batches): one image a chunk, also for the small array that
        # would otherwise group batches
        assert f["maps/a"].chunks == (1, 3, 8) and f["labels"].chunks == (1, 2)
    with h5py.File(tmp_path / "False.h5", "r") as f:
        assert f["maps/a"].chunks[0] > 3 * BATCH  # the unchecksummed layout is unchanged: small arrays group batches


def test_a_flipped_byte_in_a_checksummed_chunk_is_reported_and_repair_recovers_every_other_image(tmp_path):
    path = tmp_path / "run.h5"
    want = write(path, checksum=True)
    flip_byte(path, "maps/a", image=5)  # inside its own chunk
    with open_run(path) as run:
        for read in (lambda a: a[5], lambda a: a[:], lambda a: a[[0, 5]], lambda a: a[4:8, 1]):
            with pytest.raises(QKHooksError) as raised:
                read(run.array("maps/a"))
            message = str(raised.value)
            assert f"{path} is damaged" in message and "/maps/a" in message and f"qkhooks repair {path}" in message
        intact = [0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 11]
        assert run.array("maps/a")[intact].tobytes() == want["maps/a"][intact].tobytes()
        assert run.array("labels")[:].tobytes() == want["labels"].tobytes()  # another array's same images read
        assert "checksum Fletcher-32 on every per-image array" in run.summary()
    report = repair(path, tmp_path / "fixed.h5")
    assert report.lost == [5] and report.recovered == [f"im{i}" for i in intact]
    assert any(p.startswith("/maps/a: row 5 does not read") for p in report.problems), report.problems
    with open_run(tmp_path / "fixed.h5") as fixed:
        for name, values in want.items():
            assert fixed.array(name).dataset.fletcher32  # the repaired run keeps the checksum
            assert fixed.array(name)[:].tobytes() == values[intact].tobytes(), name


def test_without_the_checksum_the_same_flip_reads_back_as_a_different_value_without_a_word(tmp_path):
    path = tmp_path / "run.h5"
    want = write(path, checksum=False)
    flip_byte(path, "maps/a", image=5)
    with open_run(path) as run:
        got = run.array("maps/a")[5]  # no error: the wrong value is returned (why --checksum exists)
        assert got.tobytes() != want["maps/a"][5].tobytes()
        assert "checksum none on the per-image arrays" in run.summary()
    assert repair(path, tmp_path / "fixed.h5").lost == []  # repair copies it as it is


def test_a_resume_keeps_the_files_layout_and_warns_where_the_options_differ(tmp_path):
    path = tmp_path / "run.h5"
    first, second = batches(2)
    with RunWriter(path, checksum=True) as writer:
        writer.write_batch(*first)
    for checksum, compression, warned in ((False, "none", "(a Fletcher-32 checksum, though none is asked for now)"),
                                          (True, "gzip", "(compression none, not gzip as given now)"), (True, "none", None)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            writer = RunWriter(path, mode="resume", checksum=checksum, compression=compression)
        found = [str(w.message) for w in caught]
        assert (warned is None and not found) or (len(found) == 1 and warned in found[0]), found
        assert writer.checksum is True and writer.compression is None  # what it writes: the file's layout
        writer.close(complete=False)
    with pytest.warns(UserWarning, match="keep the layout"), RunWriter(path, mode="resume", checksum=False) as writer:
        writer.write_batch(*second)
    with h5py.File(path, "r") as f:
        assert f["maps/a"].fletcher32 and f["maps/a"].compression is None and f["maps/a"].shape[0] == 2 * BATCH
    with open_run(path) as run:
        assert run.array("maps/a")[:].tobytes() == np.concatenate([first[1]["maps/a"], second[1]["maps/a"]]).tobytes()


def tiny_vit() -> qkhooks.LoadedModel:
    torch.manual_seed(0)
    return qkhooks.load_model(timm.create_model("vit_small_patch16_224", pretrained=False, patch_size=32,
                                                embed_dim=32, depth=1, num_heads=2).eval())


def test_record_dataset_with_checksum_writes_the_same_values_and_reports_a_damaged_chunk(tmp_path, capsys):
    assert RecordOptions.from_args(_parsed("--checksum")) == RecordOptions(checksum=True)
    model = tiny_vit()
    for checksum in (False, True):
        record_dataset(model, "samples", tmp_path / f"{checksum}.h5", modes=2, layers="0", batch_size=4, limit=8,
                       attention="rows", progress=False, reducers=[], checksum=checksum)
    with open_run(tmp_path / "False.h5") as plain, open_run(tmp_path / "True.h5") as summed:
        assert summed.arrays() == plain.arrays() and summed.config == plain.config  # not part of the run's content
        for name in summed.arrays():
            assert summed.array(name).dataset.fletcher32 and not plain.array(name).dataset.fletcher32, name
            assert summed.array(name)[:].tobytes() == plain.array(name)[:].tobytes(), name
        want = summed.query(0)[:]
    flip_byte(tmp_path / "True.h5", "modes/L0/query", image=6)
    with open_run(tmp_path / "True.h5") as run:
        with pytest.raises(QKHooksError, match="qkhooks repair"):
            run.query(0)[6]
        assert run.query(0)[[0, 1, 2, 3, 4, 5, 7]].tobytes() == want[[0, 1, 2, 3, 4, 5, 7]].tobytes()
    # an analysis that reads the maps (no reducer states to use) stops with the damage error: exit status 2
    assert main(["analyze", "modes", str(tmp_path / "True.h5"), "--out", str(tmp_path / "analysis"), "--figure-modes",
                 "0", "--no-overview", "--no-images"]) == 2
    assert "HDF5 cannot read its array /modes/L0/query" in capsys.readouterr().err
    assert main(["repair", str(tmp_path / "True.h5"), "--out", str(tmp_path / "fixed.h5")]) == 0
    with open_run(tmp_path / "fixed.h5") as fixed:
        assert fixed.n == 7 and fixed.query(0)[:].tobytes() == want[[0, 1, 2, 3, 4, 5, 7]].tobytes()


def test_merged_shards_keep_the_checksum_a_copy_in_its_arrays_a_view_through_its_shards(tmp_path):
    out = tmp_path / "run.h5"
    for rank in range(2):
        record_dataset(tiny_vit(), "samples", shard_path(out, rank, 2), modes=2, layers="0", batch_size=4, limit=8,
                       progress=False, reducers=[], shard=(rank, 2), checksum=True)
    merge_shards(out, copy=True)
    merge_shards(tmp_path / "view.h5", [shard_path(out, rank, 2) for rank in range(2)])
    with open_run(out) as copied:
        assert all(copied.array(name).dataset.fletcher32 for name in copied.arrays())
        want = copied.query(0)[:]
    flip_byte(shard_path(out, 1, 2), "modes/L0/query", image=1)  # image 5 of the run
    with open_run(tmp_path / "view.h5") as view:
        assert view.query(0)[:4].tobytes() == want[:4].tobytes()
        with pytest.raises(QKHooksError, match="qkhooks repair"):
            view.query(0)[5]


def _parsed(*argv: str):
    import argparse

    from qkhooks.cli.record import _record_args

    parser = argparse.ArgumentParser()
    _record_args(parser)
    return parser.parse_args(["timm:vit_tiny_patch16_224", "samples", "--out", "run.h5", *argv])


def test_a_flipped_byte_in_a_merged_checksum_copys_reducer_states_is_reported_never_read(tmp_path):
    """``merge --copy`` keeps the merged reducer states inside the file (``/reducers/<name>/a/<array>``); in a
    ``--checksum`` run they were written without the checksum its statics carry, so a flipped byte there (round 49's
    damage sweep: 2 of 15 bursts in a merged copy's data) came back from ``run.states()`` as other values, and
    ``--verify`` called the run intact. Now each state array is one Fletcher-32 chunk: the read is refused naming
    ``qkhooks repair``, and verify names the array."""
    from qkhooks.store import verify_run

    out = tmp_path / "run.h5"
    for rank in range(2):
        record_dataset(tiny_vit(), "samples", shard_path(out, rank, 2), modes=2, layers="0", batch_size=2, limit=8,
                       progress=False, shard=(rank, 2), checksum=True)
    merge_shards(out, copy=True)
    with h5py.File(out, "r") as f:
        states = []
        f["reducers"].visititems(lambda name, obj: states.append(obj) if isinstance(obj, h5py.Dataset) and obj.size
                                 and obj.dtype.kind in "fiu" else None)
        target = max(states, key=lambda ds: ds.nbytes)  # the largest numeric state array
        name, want = target.name, target[()]
        at = (target.id.get_chunk_info(0).byte_offset if target.chunks else target.id.get_offset()) + target.nbytes // 2
    with open(out, "r+b") as fh:
        fh.seek(at)
        byte = fh.read(1)[0]
        fh.seek(at)
        fh.write(bytes([byte ^ 0x10]))
    with h5py.File(out, "r") as f:  # the flip landed in the state's data
        assert f[name].fletcher32 or not np.array_equal(f[name][()], want)
    with open_run(out) as run:
        with pytest.raises(QKHooksError, match="qkhooks repair"):
            run.states()
    report = verify_run(out)
    assert not report.ok and any(name.lstrip("/") in line for line in report.problems), report.problems


def test_a_checksummed_chunk_zeroed_whole_is_reported_never_read_as_zeros(tmp_path):
    """Fletcher-32 of zero bytes is zero, so a chunk whose stored bytes a zeroed disk page covered, its checksum
    included, passes the checksum: round 49's sweep zeroed 4 KiB pages of --checksum runs and 5 of 15 read back an
    image's maps as zeros without a word (``verify`` called the run intact, ``repair`` copied the zeros under a new
    checksum). A recorded float row is never all zero, so such a chunk is now damage: reads refuse it naming
    ``qkhooks repair``, verify names its rows, repair leaves that image out; the other images read as before."""
    from qkhooks.store import verify_run

    run = tmp_path / "run.h5"
    record_dataset(tiny_vit(), "samples", run, modes=2, layers="0", batch_size=4, limit=6, attention="rows",
                   progress=False, reducers=[], checksum=True)
    name = "attention/L0/rows"
    with open_run(run) as reader:
        want = reader.array(name)[:]
        ids = reader.ids
        assert reader.array(name).dataset.chunks[0] == 1
    with h5py.File(run, "r") as f:
        info = f[name].id.get_chunk_info_by_coord((3,) + (0,) * (f[name].ndim - 1))
    with open(run, "r+b") as fh:  # the chunk's stored bytes, data and checksum, zeroed
        fh.seek(info.byte_offset)
        fh.write(bytes(info.size))
    with open_run(run) as reader:
        for key in (3, slice(None), [1, 3], slice(2, 5)):
            with pytest.raises(QKHooksError, match=f"image 3.*{name}.*qkhooks repair"):
                reader.array(name)[key]
        np.testing.assert_array_equal(reader.array(name)[[0, 1, 2, 4, 5]], want[[0, 1, 2, 4, 5]])
    report = verify_run(run)
    assert not report.ok and report.damaged.get(name) == [(3, 4)], report.problems
    fixed = repair(run, tmp_path / "fixed.h5")
    assert fixed.lost == [3] and fixed.recovered == [i for k, i in enumerate(ids) if k != 3]
    with open_run(tmp_path / "fixed.h5") as got:
        np.testing.assert_array_equal(got.array(name)[:], want[[0, 1, 2, 4, 5]])


def test_a_recorded_mode_projection_that_is_all_zero_is_read_not_taken_for_a_zeroed_chunk(tmp_path):
    """A layer whose attention input is zero (its norm's weight and bias zero, as in a pruned layer) projects every
    token onto its modes as zeros: a true recording. Stored as +0.0, the chunk's bytes were all zero, its Fletcher-32
    too, and every read refused it as a zeroed disk page ("damaged ... run qkhooks repair"), and repair dropped the
    images. Such rows are stored as -0.0 (equal to 0.0 in every comparison and sum, but not zero bytes): read as the
    run without the checksum reads them, verify calls the run intact, repair loses nothing."""
    from qkhooks.store import verify_run

    model = tiny_vit()
    norm = model.model.blocks[0].norm1
    with torch.no_grad():
        norm.weight.zero_()
        norm.bias.zero_()
    for checksum in (False, True):
        record_dataset(model, "samples", tmp_path / f"{checksum}.h5", modes=2, layers="0", batch_size=4, limit=6,
                       attention="rows", progress=False, reducers=[], checksum=checksum)
    with open_run(tmp_path / "False.h5") as plain:
        want = {name: plain.array(name)[:] for name in plain.arrays()}
    assert not want["modes/L0/query"].any() and not want["modes/L0/key"].any()  # zero input: zero projections
    with open_run(tmp_path / "True.h5") as summed:
        for name, values in want.items():
            np.testing.assert_array_equal(summed.array(name)[:], values)
    assert verify_run(tmp_path / "True.h5").ok
    assert repair(tmp_path / "True.h5", tmp_path / "fixed.h5").lost == []


@pytest.mark.parametrize("name", ["images/file_sizes", "images/file_hashes"])
def test_a_zeroed_chunk_of_an_images_file_size_or_hash_is_reported_never_read_as_zero(tmp_path, name):
    """Round 50's cut-scan of a --checksum run of 400 one-image chunks zeroed a 4 KiB page over the small chunks of
    images/file_sizes, file_hashes, file_mtimes and attention/query_tokens of four images: all-zero bytes pass
    Fletcher-32, so they read back as 0 and repair copied the zeros, without a word. A file's size is never 0 (-1 for an
    image not from a file; an empty file does not decode) and its hash's 8 bytes are 0 once in 2**64: such a chunk is
    damage, as one of maps is. (A file time and query token 0 are real values: not checked.)"""
    from PIL import Image

    from qkhooks.store import verify_run

    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(3)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (40, 56, 3), np.uint8)).save(photos / f"img{i}.png")
    run = tmp_path / "run.h5"
    record_dataset(tiny_vit(), str(photos), run, modes=2, layers="0", batch_size=4, progress=False, reducers=[],
                   checksum=True)
    with open_run(run) as reader:
        ids = reader.ids
        want = reader.array(name)[:]
    sizes = np.array([(photos / i).stat().st_size for i in ids])  # the files themselves: the values to read back
    if name == "images/file_sizes":
        np.testing.assert_array_equal(want, sizes)
    with h5py.File(run, "r") as f:
        info = f[name].id.get_chunk_info_by_coord((2,))
    with open(run, "r+b") as fh:  # image 2's chunk, data and checksum, zeroed as a zeroed disk page leaves it
        fh.seek(info.byte_offset)
        fh.write(bytes(info.size))
    with open_run(run) as reader:
        for key in (2, slice(None), [1, 2]):
            with pytest.raises(QKHooksError, match=f"image 2.*{name}.*qkhooks repair"):
                reader.array(name)[key]
        np.testing.assert_array_equal(reader.array(name)[[0, 1, 3, 4]], want[[0, 1, 3, 4]])
    report = verify_run(run)
    assert not report.ok and report.damaged.get(name) == [(2, 3)], report.problems
    fixed = repair(run, tmp_path / "fixed.h5")
    assert fixed.lost == [2] and fixed.recovered == [i for k, i in enumerate(ids) if k != 2]
    with open_run(tmp_path / "fixed.h5") as got:
        np.testing.assert_array_equal(got.array(name)[:], want[[0, 1, 3, 4]])
