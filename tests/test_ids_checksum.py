"""Round 24: ``--checksum`` covers the image ids. HDF5 keeps the ids (variable-length strings) in its global heap,
which has no checksum; a checksummed run also stores each id's BLAKE2b digest (``/images/id_digests``, Fletcher-32),
and every reader of the ids checks them against it. A bit flipped inside an id's heap bytes (found by searching the
file for the id) must be refused by every reader, naming the image; one flipped inside a digest must fail its
checksum; repair must drop exactly the damaged image; merge must carry the digests; a run without ``--checksum``
has none. The reference digests are computed here with hashlib, not with qkhooks' own helper."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

from qkhooks import QKHooksError
from qkhooks.cli import main
from qkhooks.distributed import merge_shards, shard_path
from qkhooks.store import RunWriter, open_run, repair, verify_run
from qkhooks.store import format as fmt

BATCH = 4
ROOT = Path(__file__).resolve().parents[1]


def ids_of(batch: int, prefix: str = "photo") -> list[str]:
    return [f"{prefix}-{batch}{i}-{'ü' if i % 2 else 'x'}-folder" for i in range(BATCH)]  # unique, one not ASCII


def maps(batch: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(batch)
    return {"maps/a": rng.standard_normal((BATCH, 3, 5)).astype(np.float16)}


def write(path: Path, checksum: bool = True, batches: int = 3, prefix: str = "photo", **kw) -> list[str]:
    written: list[str] = []
    with RunWriter(path, checksum=checksum, **kw) as writer:
        for b in range(batches):
            writer.write_batch(ids_of(b, prefix), maps(b))
            written += ids_of(b, prefix)
    return written


def blake2b_rows(ids: list[str]) -> np.ndarray:
    """The digests as the schema documents them, computed independently of qkhooks."""
    return np.array([list(hashlib.blake2b(i.encode("utf-8"), digest_size=16).digest()) for i in ids], dtype=np.uint8)


def flip_in_id(path: Path, id_: str, bit: int) -> None:
    """Flip one bit of one byte of ``id_``'s bytes in the file (its only copy, in HDF5's global heap)."""
    data = bytearray(path.read_bytes())
    needle = id_.encode()
    assert data.count(needle) == 1, "the id must be stored exactly once"
    data[data.index(needle) + 2] ^= bit
    path.write_bytes(bytes(data))


def flip_in_digest(path: Path, image: int) -> None:
    """Flip one bit inside the stored digest of ``image`` (its own chunk's data, not the checksum after it)."""
    with h5py.File(path, "r") as f:
        info = f[fmt.ID_DIGESTS].id.get_chunk_info_by_coord((image, 0))
    with open(path, "r+b") as fh:
        fh.seek(info.byte_offset + 5)
        byte = fh.read(1)[0]
        fh.seek(info.byte_offset + 5)
        fh.write(bytes([byte ^ 0x04]))


def test_a_checksummed_run_stores_each_ids_digest_checksummed_across_a_resume(tmp_path):
    path = tmp_path / "run.h5"
    written = write(path, batches=2)
    with RunWriter(path, mode="resume", checksum=True) as writer:  # a resume keeps writing digests
        writer.write_batch(ids_of(2), maps(2))
    written += ids_of(2)
    with h5py.File(path, "r") as f:
        ds = f[fmt.ID_DIGESTS]
        assert ds.fletcher32 and ds.chunks == (1, 16) and ds.dtype == np.uint8
        assert np.array_equal(ds[()], blake2b_rows(written))  # committed by the same count as the ids
        assert int(f["images"].attrs["committed"]) == len(written) == ds.shape[0]
    with open_run(path) as run:
        assert run.ids == written
        assert "and on the image ids" in run.summary()
    report = verify_run(path)
    assert report.ok and report.id_digests
    assert "every chunk passed its checksum and every id its digest" in report.summary()


def test_an_unchecksummed_run_has_no_digests_and_its_layout_is_unchanged(tmp_path, monkeypatch):
    """No digest is made, nor its dataset laid out, without --checksum (the file as before round 24: a run written
    by round 23's writer and this one, create then resume, had the same sha256)."""
    def never(*_):
        raise AssertionError("a digest in a run without --checksum")

    monkeypatch.setattr(fmt, "id_digests", never)
    monkeypatch.setattr(fmt, "create_id_digests", never)
    path = tmp_path / "run.h5"
    written = write(path, checksum=False, batches=2)
    with RunWriter(path, mode="resume") as writer:
        writer.write_batch(ids_of(2), maps(2))
    written += ids_of(2)
    with h5py.File(path, "r") as f:
        found: list[str] = []
        f.visititems(lambda name, obj: found.append(name) if isinstance(obj, h5py.Dataset) else None)
    assert sorted(found) == ["images/ids", "images/skipped", "maps/a"]
    with open_run(path) as run:
        assert run.ids == written
    assert not verify_run(path).id_digests


WRITER_CHILD = textwrap.dedent("""
    import sys
    import numpy as np
    from qkhooks.store import RunWriter
    with RunWriter(sys.argv[1], checksum=True) as writer:
        for line in sys.stdin:  # one batch of the ids on the line, on disk before the child answers
            ids = line.split()
            writer.write_batch(ids, {"maps/a": np.zeros((len(ids), 3, 5), np.float16)})
            writer.flush()
            print("done", flush=True)
""")


def test_a_live_reader_checks_the_ids_of_images_committed_since_it_opened(tmp_path):
    """The digests are refreshed with the count, as the arrays: an SWMR reader following a writer in another process
    (one in the same process shares the writer's file) reads every new id checked against its digest."""
    path = tmp_path / "run.h5"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, "-c", WRITER_CHILD, str(path)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, env=env)
    try:
        def batch(b: int) -> None:
            child.stdin.write(" ".join(ids_of(b)) + "\n")
            child.stdin.flush()
            assert child.stdout.readline().strip() == "done"

        batch(0)
        with open_run(path) as run:
            assert run.ids == ids_of(0)
            for b in (1, 2):
                batch(b)
                assert run.refresh() == (b + 1) * BATCH
                assert run.ids == [i for k in range(b + 1) for i in ids_of(k)]
    finally:
        child.stdin.close()
        assert child.wait(timeout=60) == 0


@pytest.mark.parametrize("bit", [0x01, 0x80], ids=["another-letter", "not-utf8"])
def test_an_id_changed_on_disk_is_refused_by_every_reader_naming_the_image(tmp_path, bit, capsys):
    path = tmp_path / "run.h5"
    written = write(path)
    flip_in_id(path, written[6], bit)
    with h5py.File(path, "r") as f:  # the flip did change the id as HDF5 reads it: what the digest must catch
        assert f[fmt.IDS][6] != written[6].encode()
    with open_run(path) as run:
        with pytest.raises(QKHooksError) as raised:
            run.ids
        assert "image 6's id" in str(raised.value) and f"{path} is damaged" in str(raised.value)
        assert f"qkhooks repair {path}" in str(raised.value) and "recording the run again" in str(raised.value)
        assert run.array("maps/a")[6].shape == (3, 5)  # the arrays still read
    report = verify_run(path)
    assert not report.ok and report.damaged == {fmt.IDS: [(6, 7)]}
    assert main(["info", str(path), "--verify"]) == 1
    assert "/images/ids: row 6 does not read" in capsys.readouterr().out
    with pytest.raises(QKHooksError, match=r"cannot resume .*damaged \(image 6's id.*qkhooks repair"):
        RunWriter(path, mode="resume", checksum=True)

    fixed = repair(path, tmp_path / "fixed.h5")
    keep = [i for i in range(len(written)) if i != 6]
    assert fixed.lost == [6] and fixed.recovered == [written[i] for i in keep]
    with open_run(tmp_path / "fixed.h5") as run, open_run(path) as damaged:
        assert run.ids == [written[i] for i in keep]
        assert np.array_equal(run.array("maps/a")[:], damaged.array("maps/a")[keep])
        assert np.array_equal(run.file[fmt.ID_DIGESTS][()], blake2b_rows(run.ids))
        assert run.file[fmt.ID_DIGESTS].fletcher32
    assert verify_run(tmp_path / "fixed.h5").ok


def test_a_flipped_digest_fails_its_checksum_and_repair_drops_only_that_image(tmp_path):
    path = tmp_path / "run.h5"
    written = write(path)
    flip_in_digest(path, 5)
    with open_run(path) as run:
        with pytest.raises(QKHooksError, match=f"qkhooks repair {path}"):
            run.ids
    report = verify_run(path)
    assert not report.ok and report.damaged == {fmt.ID_DIGESTS: [(5, 6)]}
    assert "Fletcher-32" in report.summary()
    fixed = repair(path, tmp_path / "fixed.h5")
    assert fixed.lost == [5] and fixed.recovered == [i for n, i in enumerate(written) if n != 5]
    assert verify_run(tmp_path / "fixed.h5").ok


def _shards(tmp_path: Path, checksum: bool = True) -> tuple[Path, list[list[str]]]:
    out = tmp_path / "run.h5"
    ids = []
    for rank in range(2):
        attrs = {"model": "m", "config": json.dumps({"shard": [rank, 2]}), "data": "photos"}
        ids.append(write(shard_path(out, rank, 2), checksum=checksum, batches=2 + rank, prefix=f"rank{rank}", attrs=attrs))
    return out, ids


def test_a_merge_of_checksummed_shards_carries_the_digests_and_verifies(tmp_path):
    out, ids = _shards(tmp_path)
    merge_shards(out, copy=True)
    with open_run(out) as run:
        assert run.ids == ids[0] + ids[1]
        assert np.array_equal(run.file[fmt.ID_DIGESTS][()], blake2b_rows(ids[0] + ids[1]))
        assert run.file[fmt.ID_DIGESTS].fletcher32
    report = verify_run(out)
    assert report.ok and report.id_digests


def test_a_merge_refuses_a_shard_whose_id_changed(tmp_path):
    out, ids = _shards(tmp_path)
    flip_in_id(shard_path(out, 1, 2), ids[1][3], 0x02)
    with pytest.raises(QKHooksError, match=r"run\.rank1-of-2\.h5 is damaged \(image 3's id"):
        merge_shards(out)
    assert not out.exists()


def test_shards_without_checksum_merge_without_digests(tmp_path):
    out, ids = _shards(tmp_path, checksum=False)
    merge_shards(out)
    with h5py.File(out, "r") as f:
        assert fmt.ID_DIGESTS not in f


def test_an_older_checksummed_run_without_digests_says_its_ids_are_not_covered(tmp_path):
    """A run recorded with --checksum before the digests: read and resumed as before, and every report says that its
    ids are not checked (never the claim that every per-image datum is)."""
    path = tmp_path / "run.h5"
    written = write(path, batches=2)
    with h5py.File(path, "r+") as f:
        del f[fmt.ID_DIGESTS]
    with RunWriter(path, mode="resume", checksum=True) as writer:
        writer.write_batch(ids_of(2), maps(2))
    written += ids_of(2)
    with open_run(path) as run:
        assert run.ids == written and fmt.ID_DIGESTS not in run.file
        assert "not on the image ids (written before qkhooks stored their digests)" in run.summary()
    report = verify_run(path)
    assert report.ok and not report.id_digests
    assert "not on the image ids" in report.summary() and "(the ids carry none)" in report.summary()
