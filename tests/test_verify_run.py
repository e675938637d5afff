"""``qkhooks info RUN --verify`` (:func:`qkhooks.store.verify_run`): a whole run file read back, one chunk at a time,
with every part that does not read named, the image rows of each damaged chunk exact (against the chunk ranges h5py
reports), and without a checksum nothing claimed about bit flips (the flipped value is read back, unseen)."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from test_checksum import BATCH, tiny_vit, write
from test_store_safety import _as_if_killed

from qkhooks.cli import main
from qkhooks.errors import QKHooksError
from qkhooks.distributed import merge_shards, shard_path
from qkhooks.store import RunWriter, open_run, verify_run
from qkhooks.store import format as fmt
from qkhooks.stream import record_dataset

IMAGES = 3 * BATCH  # test_checksum.write's three batches


def flip_in_chunk(path: Path, name: str, chunk: int, fill: int | None = None) -> tuple[int, int]:
    """Flip one byte inside the stored bytes of ``name``'s ``chunk``-th chunk in file order (or overwrite the whole
    chunk with ``fill``); returns the [start, stop) image rows that chunk holds, as h5py reports them. Read in SWMR
    mode, which also opens a file a killed writer left flagged as open."""
    with h5py.File(path, "r", swmr=True) as f:
        ds = f[name]
        info = ds.id.get_chunk_info(chunk)
        rows = (info.chunk_offset[0], min(info.chunk_offset[0] + ds.chunks[0], ds.shape[0]))
    with open(path, "r+b") as fh:
        if fill is None:
            fh.seek(info.byte_offset + 5)  # in the chunk's first row: data, also where a chunk outgrows the rows
            byte = fh.read(1)[0]
            fh.seek(info.byte_offset + 5)
            fh.write(bytes([byte ^ 0x04]))
        else:
            fh.seek(info.byte_offset)
            fh.write(bytes([fill]) * info.size)
    return rows


def verify_cli(path: Path, capsys) -> tuple[int, str]:
    status = main(["info", str(path), "--verify"])
    return status, capsys.readouterr().out


def test_a_clean_checksummed_recording_verifies_with_every_part_counted_and_exit_status_0(tmp_path, capsys):
    path = tmp_path / "run.h5"
    record_dataset(tiny_vit(), "samples", path, modes=2, layers="0", batch_size=4, limit=8, attention="rows",
                   progress=False, checksum=True)
    with h5py.File(path, "r") as f:  # what the file holds, counted with h5py directly
        datasets: list[str] = []
        f.visititems(lambda name, obj: datasets.append(name) if isinstance(obj, h5py.Dataset) else None)
        per_image = sorted(name for name in datasets if f[name].attrs.get("per_image", False))
        lists = ("images/ids", "images/id_digests")  # the ids and (checksummed) their digests: read as the ids
        statics = [name for name in datasets if name not in per_image and name not in lists]
        committed = int(f["images"].attrs["committed"])
    with open_run(path) as run:
        states = run.states()
    report = verify_run(path)
    assert report.ok and report.damaged == {} and report.problems == []
    assert report.images == committed == 8 and report.complete
    assert report.arrays == report.checksummed == per_image and len(per_image) == 4
    assert report.statics == len(statics) and report.states == states == ["anisotropy", "topk_modes"]
    status, out = verify_cli(path, capsys)
    assert status == 0 and out.strip() == report.summary()
    assert "result   every part read, every chunk passed its checksum" in out and "repair" not in out


@pytest.mark.parametrize("killed", [False, True])
def test_a_flipped_byte_names_the_array_and_exactly_the_rows_of_its_chunk_and_exits_1(tmp_path, capsys, killed):
    path = tmp_path / "run.h5"
    want = write(path, checksum=True)
    rows = flip_in_chunk(path, "maps/a", chunk=1)
    with h5py.File(path, "r") as f:
        with pytest.raises(OSError):
            f["maps/a"][rows[0]]  # h5py itself refuses the chunk: its checksum fails
        assert f["labels"][:].tobytes() == want["labels"].tobytes()
    if killed:  # a killed writer's flags: read in SWMR mode, as a run still open
        _as_if_killed(path)
    report = verify_run(path)
    assert not report.ok and report.images == IMAGES
    with h5py.File(path, "r", swmr=True) as f:
        chunk_rows = f["maps/a"].chunks[0]  # one image a chunk for a checksummed array (issue: no chunk rewritten)
    assert report.damaged == {"maps/a": [rows]} and rows[1] - rows[0] == chunk_rows  # only that chunk, not labels
    said = f"row {rows[0]} does" if rows[1] - rows[0] == 1 else f"rows {rows[0]}-{rows[1] - 1} do"  # review r46
    assert len(report.problems) == 1 and report.problems[0].startswith(f"/maps/a: {said} not read")
    status, out = verify_cli(path, capsys)
    assert status == 1
    assert f"run `qkhooks repair {path} --out FIXED.h5`" in out and "passed its checksum" not in out


def test_every_damaged_chunk_of_every_array_is_collected_not_only_the_first(tmp_path):
    path = tmp_path / "run.h5"
    write(path, checksum=True)
    damaged = {"maps/a": [flip_in_chunk(path, "maps/a", chunk=c) for c in (0, 2)],
               "labels": [flip_in_chunk(path, "labels", chunk=1)]}
    report = verify_run(path)
    assert report.damaged == {name: sorted(rows) for name, rows in damaged.items()}
    assert len(report.problems) == 2


def test_only_the_committed_images_of_a_killed_run_are_checked(tmp_path):
    """A killed writer leaves rows past the committed count (a batch written, not committed): damage there is not
    the run's, damage in a committed chunk is."""
    path = tmp_path / "run.h5"
    write(path, checksum=True)
    with h5py.File(path, "r+") as f:
        fmt.set_committed(f, 2 * BATCH)
    _as_if_killed(path)
    with h5py.File(path, "r", swmr=True) as f:
        chunk_rows = f["maps/a"].chunks[0]
    past = flip_in_chunk(path, "maps/a", chunk=2 * BATCH // chunk_rows)  # the first chunk past the committed images
    assert past == (2 * BATCH, 2 * BATCH + chunk_rows)
    report = verify_run(path)
    assert report.ok and report.images == 2 * BATCH
    inside = flip_in_chunk(path, "labels", chunk=0)
    assert verify_run(path).damaged == {"labels": [inside]}


def test_without_checksums_the_same_flip_reads_back_changed_and_the_report_says_it_cannot_see_that(tmp_path, capsys):
    path = tmp_path / "run.h5"
    want = write(path, checksum=False)
    rows = flip_in_chunk(path, "maps/a", chunk=0)
    with h5py.File(path, "r") as f:
        assert f["maps/a"][rows[0]:rows[1]].tobytes() != want["maps/a"][rows[0]:rows[1]].tobytes()  # silently wrong
    report = verify_run(path)
    assert report.ok and report.checksummed == [] and report.damaged == {}
    status, out = verify_cli(path, capsys)
    assert status == 0
    assert "checksum none: every chunk was read and decompressed, but a flipped bit inside the data" in out
    assert "cannot be detected (record with --checksum)" in out and "passed its checksum" not in out


def test_without_checksums_a_chunk_that_does_not_decompress_is_still_reported(tmp_path):
    path = tmp_path / "run.h5"
    with RunWriter(path, dtype="float32", chunk_images=2, compression="gzip") as w:
        for b in range(3):
            w.write_batch([f"im{2 * b}", f"im{2 * b + 1}"], {"v": np.full((2, 64), b, np.float32)})
    rows = flip_in_chunk(path, "v", chunk=1, fill=0xAB)
    assert verify_run(path).damaged == {"v": [rows]}


def test_a_damaged_or_mismatched_reducer_checkpoint_is_reported(tmp_path, capsys):
    path = tmp_path / "run.h5"
    with RunWriter(path, dtype="float32", chunk_images=2) as w:
        w.write_batch(["a", "b"], {"v": np.zeros((2, 8), np.float32)})
        w.write_checkpoint({"r": {"a": np.arange(64.0), "count": 2}})
    assert verify_run(path).states == ["r"]
    ckpt = fmt.checkpoint_path(path)
    good = ckpt.read_bytes()
    data = bytearray(good)
    data[100] ^= 0xFF
    ckpt.write_bytes(bytes(data))
    with open_run(path) as run:
        with pytest.raises(Exception, match="checkpoint"):
            run.states()  # what the reader does with it
    report = verify_run(path)
    assert not report.ok and report.states == [] and report.damaged == {}
    assert len(report.problems) == 1 and f"the reducer checkpoint {ckpt} is damaged" in report.problems[0]
    assert verify_cli(path, capsys)[0] == 1
    with h5py.File(path, "r") as f:
        run_id = fmt.run_id_of(f)
    fmt.write_checkpoint(path, 3, {"r": {"a": np.arange(64.0), "count": 3}}, run_id)  # counts an uncommitted image
    problems = verify_run(path).problems
    assert len(problems) == 1 and problems[0].startswith(
        f"the reducer states of {path} ({ckpt}) do not belong to the images it holds: they count 3 images, and the "
        "file holds 2: they were saved after this file was.")


def test_a_file_that_does_not_open_is_reported_with_the_repair_command(tmp_path, capsys):
    path = tmp_path / "run.h5"
    write(path, checksum=True)
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.truncate(size - 100)
    report = verify_run(path)
    assert report.images is None and not report.ok
    assert report.problems == [f"the file does not open (truncated at {size - 100} of {size} bytes)"]
    status, out = verify_cli(path, capsys)
    assert status == 1 and f"qkhooks repair {path} --out FIXED.h5" in out


def test_a_merged_view_whose_shard_file_is_gone_names_that_shards_rows(tmp_path):
    """HDF5 reads a view's rows from a missing shard as NaN / -1 without an error; verify names them."""
    out = tmp_path / "run.h5"
    for rank in range(2):
        record_dataset(tiny_vit(), "samples", shard_path(out, rank, 2), modes=2, layers="0", batch_size=4, limit=8,
                       progress=False, reducers=[], shard=(rank, 2), checksum=True)
    merge_shards(out)
    assert verify_run(out).ok
    counts = []
    for rank in range(2):
        with open_run(shard_path(out, rank, 2)) as shard:
            counts.append(shard.n)
    shutil.move(shard_path(out, 1, 2), tmp_path / "elsewhere.h5")
    with open_run(out) as run:
        with pytest.raises(QKHooksError, match=rf"holding images {counts[0]}-{counts[0] + counts[1] - 1} are missing"):
            run.query(0)[counts[0]]  # HDF5 alone reads the fill value without an error; a reader refuses (round 31)
        arrays = run.arrays()
    report = verify_run(out)
    gone = (counts[0], counts[0] + counts[1])
    assert report.damaged == {name: [gone] for name in arrays}, report.damaged


def test_each_per_image_read_spans_one_chunk_at_most(tmp_path, monkeypatch):
    """Bounded memory: never more than one chunk's rows of an array in memory, however long the run."""
    path = tmp_path / "run.h5"
    write(path, checksum=True)
    spans: list[tuple[str, int]] = []
    read = h5py.Dataset.__getitem__

    def recording(self, key, *rest):
        if isinstance(key, slice) and self.chunks:
            spans.append((self.name, len(range(*key.indices(self.shape[0])))))
        return read(self, key, *rest)

    monkeypatch.setattr(h5py.Dataset, "__getitem__", recording)
    assert verify_run(path).ok
    with h5py.File(path, "r") as f:
        chunk_rows = {ds: f[ds].chunks[0] for ds in ("/maps/a", "/labels")}
    per_array = {name: [rows for n, rows in spans if n == name] for name in chunk_rows}
    assert all(per_array[name] == [chunk_rows[name]] * (IMAGES // chunk_rows[name]) for name in chunk_rows), per_array


def test_an_unreadable_object_header_is_named_and_the_rest_of_the_file_still_checked(tmp_path):
    path = tmp_path / "run.h5"
    write(path, checksum=True)
    with h5py.File(path, "r") as f:
        header = h5py.h5o.get_info(f["labels"].id).addr
    with open(path, "r+b") as fh:  # a byte of the array's object header: its checksum fails
        fh.seek(header + 12)
        byte = fh.read(1)[0]
        fh.seek(header + 12)
        fh.write(bytes([byte ^ 0xFF]))
    with h5py.File(path, "r") as f:
        with pytest.raises((OSError, KeyError)):
            f["labels"]
    rows = flip_in_chunk(path, "maps/a", chunk=2)
    report = verify_run(path)
    assert report.arrays == ["maps/a"] and report.damaged == {"maps/a": [rows]}
    said = f"row {rows[0]} does" if rows[1] - rows[0] == 1 else f"rows {rows[0]}-{rows[1] - 1} do"  # review r46
    assert report.problems[0].startswith(f"/maps/a: {said} not read")
    assert report.problems[1].startswith("/labels unreadable (")
    assert report.problems[2:] == ["the layout: labels is missing"]
