"""Run files, round 19: a resume of a damaged killed run, bounded reader retries, one checkpoint load per summary,
SWMR read attempts reaching the reader's file."""

from __future__ import annotations

import ctypes
import warnings

import h5py
import numpy as np
import pytest
from test_store_safety import _as_if_killed, _chunk_index, _flip, _header, _interrupted, sha, tiny_vit

from qkhooks import QKHooksError
from qkhooks.store import RunWriter, _hdf5, open_run
from qkhooks.store import format as fmt
from qkhooks.store import reader as reader_module
from qkhooks.stream import record_dataset

IDS = [f"image_{i:04d}" for i in range(6)]


def _killed_run(path, attrs=None, damage: str | None = None) -> str:
    """Three batches of two (ids :data:`IDS`), damaged as :func:`_damage` says, then left as a killed writer leaves
    it (SWMR-write flags set); returns what a refusal must name."""
    with RunWriter(path, dtype="float32", chunk_images=2, attrs=attrs) as w:
        for i in range(3):
            w.write_batch(IDS[2 * i:2 * i + 2], {"v": np.full((2, 8), i, np.float32)})
    what = _damage(path, damage) if damage else ""
    _as_if_killed(path)
    return what


def _damage(path, how: str) -> str:
    """Damage ``path`` as ``how`` says; returns what the refusal must name."""
    if how == "ids_header":  # the object header of /images/ids (the committed count's dataset)
        _flip(path, _header(path, "images/ids") + 12)
        return "checksum"
    if how == "array_header":  # a per-image array's object header
        _flip(path, _header(path, "v") + 12)
        return "reading it failed"
    if how == "array_index":  # its chunk index (the file's tree still reads)
        _chunk_index(path, "v")  # leaves it flipped
        return "v's chunk index is unreadable"
    if how == "root_attributes":  # the root group's header, where the model and options are
        _flip(path, _header(path, "/") + 12)
        return "checksum"
    if how == "id_bytes":  # one committed id's bytes in the heap: no longer UTF-8
        data = path.read_bytes()
        assert data.count(IDS[3].encode()) == 1
        _flip(path, data.index(IDS[3].encode()))
        return "image 3's id is not UTF-8 text"
    if how == "model_attribute":  # an attribute the resume compares, gone
        with h5py.File(path, "r+") as f:
            del f.attrs["model"]
        return "its root attribute 'model' is missing"
    raise AssertionError(how)


DAMAGE = ["ids_header", "array_header", "array_index", "root_attributes", "id_bytes", "model_attribute"]


@pytest.mark.parametrize("how", DAMAGE)
def test_a_resume_of_a_damaged_killed_run_is_one_refusal_naming_the_damage_and_the_fix_and_writes_nothing(tmp_path, how):
    path = tmp_path / "run.h5"
    what = _killed_run(path, attrs={"model": "m"}, damage=how)
    before = sha(path)
    with pytest.raises(QKHooksError) as err:
        RunWriter(path, mode="resume", dtype="float32", attrs={"model": "m"})
    message = str(err.value)
    assert message.startswith(f"cannot resume {path}: it is damaged (") and what in message, message
    assert f"qkhooks repair {path} --out FIXED.h5" in message and "--overwrite" in message, message
    assert sha(path) == before  # nothing written, not even the open flags cleared
    with RunWriter(path, mode="overwrite", dtype="float32", attrs={"model": "m"}) as w:  # the lock was let go
        w.write_batch(["a", "b"], {"v": np.ones((2, 8), np.float32)})
    with open_run(path) as run:
        assert run.ids == ["a", "b"] and run.complete


def test_record_dataset_resuming_a_damaged_killed_run_raises_one_qkhooks_error(tmp_path):
    out = tmp_path / "run.h5"
    _interrupted(out, tiny_vit(), after=2)
    _flip(out, _header(out, "images/ids") + 12)
    _as_if_killed(out)
    before = sha(out)
    with pytest.raises(QKHooksError, match=rf"cannot resume {out}: it is damaged \(.*qkhooks repair {out} --out "
                                           r"FIXED.h5.*--overwrite"):
        record_dataset(tiny_vit(), "samples", out, layers="0", modes=4, batch_size=2, limit=6, progress=False,
                       resume=True)
    assert sha(out) == before


# ------------------------------------------------------------------------------------------ bounded retries
class _FakeClock:
    """A clock that moves only when slept on: a deadline test without waiting."""

    def __init__(self):
        self.now = 0.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds > 0
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def clock(monkeypatch) -> _FakeClock:
    fake = _FakeClock()
    monkeypatch.setattr(_hdf5, "_clock", fake.monotonic)
    monkeypatch.setattr(_hdf5, "_sleep", fake.sleep)
    return fake


def _assert_backoff(sleeps: list[float]) -> None:
    """Growing pauses from the first to the longest, stopping at the deadline."""
    assert sleeps[0] == _hdf5.FIRST_PAUSE_S
    assert all(b == min(2 * a, _hdf5.LONGEST_PAUSE_S) for a, b in zip(sleeps[:-2], sleeps[1:-1])), sleeps
    assert max(sleeps) == _hdf5.LONGEST_PAUSE_S
    assert sum(sleeps) == pytest.approx(_hdf5.READ_DEADLINE_S)


def test_a_file_that_never_opens_is_retried_with_growing_pauses_until_the_deadline(tmp_path, clock):
    path = tmp_path / "run.h5"
    _killed_run(path)
    with open(path, "r+b") as fh:  # a superblock that never reads (as if a writer were laying it out forever)
        fh.write(bytes(48))
    with pytest.raises(QKHooksError, match=rf"{path} is damaged \(it has no HDF5 superblock.*qkhooks repair"):
        open_run(path)
    _assert_backoff(clock.sleeps)


def test_a_file_that_keeps_changing_while_it_opens_is_retried_with_pauses_then_refused_saying_why(tmp_path, clock,
                                                                                                monkeypatch):
    path = tmp_path / "run.h5"
    with RunWriter(path, dtype="float32", chunk_images=2) as w:  # closed: read without SWMR, so a change is stale
        w.write_batch(IDS[:2], {"v": np.zeros((2, 8), np.float32)})
    stamp = reader_module._stamp
    changes = iter(range(10**6))
    monkeypatch.setattr(reader_module, "_stamp", lambda p: stamp(p)[:3] + (next(changes),))  # a new mtime each look
    with pytest.raises(QKHooksError, match=rf"{path} kept changing while it was being opened, for 3 s .*open it again"):
        open_run(path)
    _assert_backoff(clock.sleeps)


# ------------------------------------------------------------------------------------------ one checkpoint load
@pytest.mark.parametrize("checkpoint", ["readable", "damaged"])
def test_summary_loads_the_reducer_checkpoint_once(tmp_path, monkeypatch, checkpoint):
    path = tmp_path / "run.h5"
    with RunWriter(path, dtype="float32", chunk_images=2) as w:
        w.write_batch(IDS[:2], {"v": np.zeros((2, 8), np.float32)})
        w.write_checkpoint({"r": {"a": np.arange(64.0), "count": 2}})
    if checkpoint == "damaged":
        _flip(fmt.checkpoint_path(path), 100)
    loads = []
    load = fmt._load_checkpoint
    monkeypatch.setattr(fmt, "_load_checkpoint", lambda p: loads.append(p) or load(p))
    with open_run(path) as run:
        text = run.summary()
    assert loads == [fmt.checkpoint_path(path)], len(loads)
    if checkpoint == "readable":
        assert "reducers r" in text.splitlines()
    else:
        assert "reducers DAMAGED checkpoint run.h5.reducers" in text and run.problems


# ------------------------------------------------------------------------------------------ SWMR read attempts
def _read_attempts(f: h5py.File) -> int:
    """The metadata read attempts of ``f``'s file-access property list, read back from the HDF5 library h5py uses."""
    get = _hdf5._libhdf5().H5Pget_metadata_read_attempts
    get.argtypes, get.restype = [ctypes.c_int64, ctypes.POINTER(ctypes.c_uint)], ctypes.c_int
    fapl = f.id.get_access_plist()  # kept alive while HDF5 reads it
    attempts = ctypes.c_uint(0)
    assert get(fapl.id, ctypes.byref(attempts)) >= 0
    return attempts.value


def test_an_swmr_reader_opens_its_file_with_the_bounded_read_attempts(tmp_path):
    path = tmp_path / "run.h5"
    _killed_run(path)
    with open_run(path) as run:
        assert run.file.swmr_mode
        assert _read_attempts(run.file) == _hdf5.SWMR_READ_ATTEMPTS == 29


def test_where_the_read_attempts_cannot_be_set_the_reader_warns_once_and_still_reads(tmp_path, monkeypatch):
    path = tmp_path / "run.h5"
    _killed_run(path)

    def no_library():
        raise OSError("libhdf5 not found")

    monkeypatch.setattr(_hdf5, "_libhdf5", no_library)
    monkeypatch.setattr(_hdf5, "_H5P_SET_ATTEMPTS", None)
    monkeypatch.setattr(_hdf5, "_WARNED_ATTEMPTS", [])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            with open_run(path) as run:
                assert run.ids == IDS and run.file.swmr_mode
    bounded = [w for w in caught if "could not bound HDF5's metadata read attempts" in str(w.message)]
    assert len(bounded) == 1, [str(w.message) for w in caught]


def test_a_resume_reads_the_attributes_of_every_object_in_the_file_before_it_writes(tmp_path, monkeypatch):
    """The resume's check goes through every object header and attribute (statics are rewritten in place): damage
    anywhere in them is found before anything is written, not halfway through the run."""
    path = tmp_path / "run.h5"
    with RunWriter(path, dtype="float32", chunk_images=2, attrs={"model": "m"}) as w:
        w.write_static("spectrum/L0/S", np.ones(3))  # statics: nested groups and datasets, with attributes
        w.write_static("model/info", "{}")
        for i in range(2):
            w.write_batch(IDS[2 * i:2 * i + 2], {"v": np.full((2, 8), i, np.float32)})
    with h5py.File(path, "r") as f:
        names = {"/"}
        f.visit(lambda name: names.add("/" + name))
    _as_if_killed(path)
    read: set[str] = set()
    items = h5py.AttributeManager.items

    def counted(self):
        read.add(h5py.h5i.get_name(self._id).decode())
        return items(self)

    monkeypatch.setattr(h5py.AttributeManager, "items", counted)
    with RunWriter(path, mode="resume", dtype="float32", attrs={"model": "m"}):
        pass
    assert names <= read, sorted(names - read)
