"""Run files that never lose data: one writer per file, full disks, damaged files, crash safety by order."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import qkhooks
from qkhooks import QKHooksError
from qkhooks.store import RunWriter, open_run, repair, verify_run
from qkhooks.store import format as fmt
from qkhooks.stream import record_dataset
from conftest import mount_small_tmpfs

ROOT = Path(__file__).parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
BUILD = "timm.create_model('vit_small_patch16_224', pretrained=False, patch_size=32, embed_dim=32, depth=2, num_heads=4)"


def tiny_vit() -> qkhooks.LoadedModel:
    import timm  # noqa: F401  (BUILD names it)

    torch.manual_seed(0)
    return qkhooks.load_model(eval(BUILD).eval())


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_same_run(a_path: Path, b_path: Path) -> None:
    """Same ids, same values in every per-image array, same reducer states: what an uninterrupted run holds."""
    with open_run(a_path) as a, open_run(b_path) as b:
        assert a.complete and b.complete
        assert a.ids == b.ids and len(set(a.ids)) == len(a.ids)
        assert a.arrays() == b.arrays()
        for name in a.arrays():
            np.testing.assert_array_equal(a.array(name)[:], b.array(name)[:], err_msg=name)
        assert a.states() == b.states()
        for name in a.states():
            sa, sb = a.state(name), b.state(name)
            assert sa.keys() == sb.keys()
            for key in sa:
                np.testing.assert_allclose(sa[key], sb[key], rtol=1e-12, err_msg=f"{name}/{key}")


CHILD = textwrap.dedent(
    """
    import sys, time, torch, timm, qkhooks
    from qkhooks.analysis.preference import PreferenceReducer
    from qkhooks.stream import record_dataset
    torch.manual_seed(0)
    loaded = qkhooks.load_model({build}.eval())
    record_dataset(loaded, sys.argv[2], sys.argv[1], modes=8, attention="rows", batch_size=2,
                   reducers=[PreferenceReducer()], progress=False, checkpoint_every=3,
                   on_batch=lambda batch: time.sleep(float(sys.argv[3])), resume=len(sys.argv) > 4)
    """
)


def _record(out: Path, data: str, resume: bool = False, overwrite: bool = False):
    from qkhooks.analysis.preference import PreferenceReducer

    return record_dataset(tiny_vit(), data, out, modes=8, attention="rows", batch_size=2, reducers=[PreferenceReducer()],
                          progress=False, checkpoint_every=3, resume=resume, overwrite=overwrite)


def _start(tmp_path: Path, out: Path, data: str, pause: float, resume: bool = False) -> subprocess.Popen:
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(build=BUILD))
    args = [sys.executable, str(script), str(out), data, str(pause)] + (["resume"] if resume else [])
    return subprocess.Popen(args, env=ENV, stderr=subprocess.PIPE)


def _committed(out: Path) -> int:
    """The committed count as a reader sees it (0 while the file has no name yet)."""
    if not out.exists():
        return 0
    with open_run(out) as run:
        return run.n


def _wait_for(child: subprocess.Popen, out: Path, images: int, timeout: float = 300) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline and child.poll() is None:
        n = _committed(out)
        if n >= images:
            return n
        time.sleep(0.02)
    raise AssertionError(f"the writer did not reach {images} images: {child.stderr.read().decode()[-2000:]}")


# ------------------------------------------------------------------------------------------ one writer
def test_a_second_writer_on_a_live_run_is_refused_at_once_naming_the_writer(tmp_path):
    out = tmp_path / "run.h5"
    child = _start(tmp_path, out, "o3:16:1", pause=2.0)
    try:
        _wait_for(child, out, 2)
        for options in ({"resume": True}, {"overwrite": True}, {}):
            assert child.poll() is None  # still writing
            start = time.monotonic()
            with pytest.raises(QKHooksError, match=rf"being written by another process \(pid {child.pid} on "
                                                   rf"{socket.gethostname()}"):
                _record(out, "o3:16:1", **options)
            assert time.monotonic() - start < 5, options
        readers = [open_run(out) for _ in range(2)]  # readers take no lock: any number, while it writes
        for run in readers:
            assert run.n >= 2
            run.close()
        assert child.wait(timeout=300) == 0, child.stderr.read().decode()[-2000:]
    finally:
        child.kill()
    assert not (tmp_path / "run.h5.lock").exists()
    _record(tmp_path / "clean.h5", "o3:16:1")
    assert_same_run(out, tmp_path / "clean.h5")


HOLDER = textwrap.dedent(
    """
    import sys
    import numpy as np
    from qkhooks.store import RunWriter
    w = RunWriter(sys.argv[1], dtype="float32", chunk_images=2)
    print("laid out", flush=True)  # inside, before its first batch: the file has no name yet
    sys.stdin.readline()
    w.write_batch(["a0", "a1"], {"v": np.arange(16, dtype=np.float32).reshape(2, 8)})
    w.flush()
    print("written", flush=True)  # inside, with images committed
    sys.stdin.readline()
    w.write_batch(["a2", "a3"], {"v": -np.arange(16, dtype=np.float32).reshape(2, 8)})
    w.close()
    """
)


def test_a_second_writer_is_refused_while_another_process_holds_the_run_before_and_after_its_first_batch(tmp_path):
    """Two writers that really overlap, in step by a pipe, not by timing: process A holds a RunWriter, laid out with
    no batch yet (its file still under RUN.h5.creating), then with two images committed; each time a fresh run, a
    resume and an overwrite of the same file here are refused, naming A and what to do, and nothing of A's is touched:
    A finishes, and its file holds exactly what it wrote. (The test above overlaps record_dataset with a writer
    paused between batches, from its first committed images on.)"""
    out = tmp_path / "run.h5"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], env=ENV, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    refusal = (rf"{out} is being written by another process \(pid {holder.pid} on {socket.gethostname()}, since .*\); "
               r"wait for it to finish or stop it, then run again")
    try:
        for step in ("laid out", "written"):
            assert holder.stdout.readline().strip() == step, holder.stderr.read()[-2000:]
            before = sorted(p.name for p in tmp_path.iterdir())
            for mode in ("create", "resume", "overwrite"):
                with pytest.raises(QKHooksError, match=refusal):
                    RunWriter(out, mode=mode, dtype="float32")
            assert sorted(p.name for p in tmp_path.iterdir()) == before, step  # nothing made, moved or removed
            if step == "laid out":
                assert not out.exists() and out.with_name("run.h5.creating").exists()
            else:
                with open_run(out) as run:  # a reader takes no lock: it reads A's committed images meanwhile
                    assert run.ids == ["a0", "a1"]
                    np.testing.assert_array_equal(run.array("v")[:], np.arange(16).reshape(2, 8))
            holder.stdin.write("go\n")
            holder.stdin.flush()
        assert holder.wait(timeout=60) == 0, holder.stderr.read()[-2000:]
    finally:
        holder.kill()
        holder.wait()
    with open_run(out) as run:
        assert run.complete and run.ids == ["a0", "a1", "a2", "a3"]
        np.testing.assert_array_equal(run.array("v")[:], np.concatenate([np.arange(16), -np.arange(16)]).reshape(4, 8))
    assert verify_run(out).ok and not fmt.lock_path(out).exists()


def test_a_killed_writers_lock_is_released_by_the_system(tmp_path):
    out = tmp_path / "run.h5"
    child = _start(tmp_path, out, "o3:12:1", pause=0.2)
    try:
        _wait_for(child, out, 4)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert (tmp_path / "run.h5.lock").exists()  # left behind, but no longer held
    _record(out, "o3:12:1", resume=True)
    _record(tmp_path / "clean.h5", "o3:12:1")
    assert_same_run(out, tmp_path / "clean.h5")


# ------------------------------------------------------------------------------------------ order, not timing
def test_worker_processes_never_hold_the_run_file_so_the_writer_can_reopen_and_overwrite_it(tmp_path):
    """Forked decoding workers inherit the writer's descriptors; HDF5's lock and the writer lock are flock()s, so
    a child's copy would stop the writer from reopening its own run after the first batch."""
    out = tmp_path / "w.h5"
    for source in ("samples", [np.full((40, 48, 3), v, np.uint8) for v in (10, 90, 170, 250)]):
        for _ in range(2):  # the second time overwrites the first run
            record_dataset(tiny_vit(), source, out, modes=4, layers="0", batch_size=2, limit=4, num_workers=2,
                           overwrite=True, progress=False)
            with open_run(out) as run:
                assert run.complete and run.n == 4


def test_a_closed_writer_no_longer_hides_its_descriptors_from_forked_workers(tmp_path):
    """The writer keeps its descriptors out of forked children only while it holds them: once closed, the same
    numbers (even on the same file, e.g. a reader of the run) must reach forked workers intact."""
    from qkhooks.store import lock

    out = tmp_path / "r.h5"
    with RunWriter(out, dtype="float32") as writer:
        writer.write_batch(["a"], {"v": np.ones((1, 3))})
        writer.flush()
        held = dict(lock._HELD)
        assert len(held) >= 2  # the writer lock and the run file
    assert not set(held) & set(lock._HELD)


def test_the_writer_writes_data_then_flushes_then_commits_for_every_batch(tmp_path, monkeypatch):
    from qkhooks.store import format as fmt
    from qkhooks.store import writer as writer_module

    events: list[tuple] = []
    append, set_committed, flush = writer_module._PerImage.append, fmt.set_committed, h5py.File.flush

    def spy_append(self, n, value):
        events.append(("data", self.ds.name, n + len(value)))
        append(self, n, value)

    def spy_commit(f, n):
        events.append(("commit", n))
        set_committed(f, n)

    def spy_count(self, n):  # the count as a batch sets it (fmt.CommittedCount, round 23)
        events.append(("commit", n))
        count(self, n)

    def spy_flush(self):
        events.append(("flush",))
        flush(self)

    count = fmt.CommittedCount.set
    monkeypatch.setattr(writer_module._PerImage, "append", spy_append)
    monkeypatch.setattr(fmt, "set_committed", spy_commit)
    monkeypatch.setattr(fmt.CommittedCount, "set", spy_count)
    monkeypatch.setattr(h5py.File, "flush", spy_flush)
    out = tmp_path / "run.h5"
    record_dataset(tiny_vit(), "samples", out, modes=4, layers="0,1", attention="rows", limit=7, batch_size=2,
                   progress=False)
    with open_run(out) as run:
        arrays, n = set("/" + name for name in run.arrays()), run.n
    commits = [i for i, e in enumerate(events) if e[0] == "commit" and e[1] > 0]
    assert [events[i][1] for i in commits] == [2, 4, 6, 7] and n == 7
    last = 0
    for i in commits:
        batch = events[last:i]
        data = [e for e in batch if e[0] == "data"]
        assert {e[1] for e in data} == arrays and all(e[2] == events[i][1] for e in data)  # every array, to this count
        last_data = max(j for j, e in enumerate(batch) if e[0] == "data")
        assert ("flush",) in batch[last_data + 1:], "no flush between the data and its commit"
        last = i + 1


def test_readers_see_only_committed_rows_and_a_resume_cuts_the_rest(tmp_path):
    out = tmp_path / "run.h5"
    with RunWriter(out, dtype="float32") as w:
        w.write_batch(["a", "b", "c"], {"v": np.arange(9.0).reshape(3, 3)})
    with h5py.File(out, "r+") as f:  # rows past committed, as a writer killed between data and commit leaves
        for name in ("v", "images/ids"):
            f[name].resize(5, axis=0)
        f["v"][3:] = -1.0
        f["images/ids"][3:] = ["junk1", "junk2"]
    with open_run(out) as run:
        v = run.array("v")
        assert run.n == 3 and run.ids == ["a", "b", "c"] and v.shape == (3, 3) and len(v) == 3
        np.testing.assert_array_equal(v[:], np.arange(9.0).reshape(3, 3))
        np.testing.assert_array_equal(v[-1], [6.0, 7.0, 8.0])
        np.testing.assert_array_equal(v[1:10], np.arange(3.0, 9.0).reshape(2, 3))
        assert [len(block) for _, block in v.chunks(2)] == [2, 1]
        with pytest.raises(IndexError):
            v[3]
        with pytest.raises(IndexError):
            v[[0, 4]]
    with RunWriter(out, mode="resume", dtype="float32") as w:
        w.write_batch(["d"], {"v": np.full((1, 3), 9.0)})
    with open_run(out) as run:
        assert run.ids == ["a", "b", "c", "d"]
        np.testing.assert_array_equal(run.array("v")[:, 0], [0.0, 3.0, 6.0, 9.0])


def _leave_stale_heap_references(path: Path, name: str, n: int, refs: list[bytes]) -> None:
    """Write ``refs`` (raw 16-byte variable-length elements: length, heap collection address, object index) into
    the rows from ``n`` of ``name``'s chunk 0, past the dataset's end, as a writer killed while HDF5 flushed leaves
    the chunk of its uncommitted rows: on disk, but without the heap objects."""
    with h5py.File(path, "r+") as f:
        ds = f[name]
        assert ds.shape[0] == n and ds.dtype.kind == "O"
        mask, raw = ds.id.read_direct_chunk((0,) * ds.ndim)
        row = len(raw) // ds.chunks[0]
        stale = raw[:n * row] + b"".join(refs) + raw[n * row + len(b"".join(refs)):]
        ds.id.write_direct_chunk((0,) * ds.ndim, stale, mask)


def _element(path: Path, name: str, index: int) -> bytes:
    with h5py.File(path, "r") as f:
        ds = f[name]
        raw = ds.id.read_direct_chunk((0,) * ds.ndim)[1]
        size = len(raw) // int(np.prod(ds.chunks))
    return raw[index * size:(index + 1) * size]


@pytest.mark.parametrize("points_at", ["a committed id's heap object", "an object its heap does not have"],
                         ids=["committed-object", "missing-object"])  # ids without spaces: mutmut runs tests by id
def test_a_resume_writes_past_heap_references_a_dead_writer_left_past_the_committed_ids(tmp_path, points_at):
    # HDF5 frees the heap object of each variable-length element it overwrites. Before the resume dropped them, a stale
    # reference to a committed id's object freed it (that id no longer read: the run's ids were lost), and one to an
    # object the heap lacks failed the resumed run's next batch ("bad heap index"; CI, round 42).
    out = tmp_path / "run.h5"
    with RunWriter(out, dtype="float32") as w:
        w.write_batch(["a", "b", "c"], {"v": np.arange(9.0).reshape(3, 3)})
        w.write_skipped([("x.png", "unreadable")])
    first = _element(out, fmt.IDS, 0)
    ref = first if points_at.startswith("a committed") else first[:12] + (999).to_bytes(4, "little")
    _leave_stale_heap_references(out, fmt.IDS, 3, [ref, ref])
    _leave_stale_heap_references(out, fmt.SKIPPED, 1, [ref, ref])
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the list reads whole: nothing to say
        w = RunWriter(out, mode="resume", dtype="float32")
    with w:
        w.write_batch(["d", "e"], {"v": np.full((2, 3), 9.0)})
        w.write_skipped([("x.png", "unreadable"), ("y.png", "too large")])
    with open_run(out) as run:
        assert run.complete and run.ids == ["a", "b", "c", "d", "e"]
        assert run.skipped == [("x.png", "unreadable"), ("y.png", "too large")]
        np.testing.assert_array_equal(run.array("v")[:, 0], [0.0, 3.0, 6.0, 9.0, 9.0])


def test_the_skipped_list_grows_by_its_new_rows_leaving_the_strings_it_holds_where_they_are(tmp_path):
    # A whole rewrite frees and rewrites every row's string, so a kill in its flush could leave any row pointing at a
    # string not on disk; the rows added alone leave the held ones' references as they were
    out = tmp_path / "run.h5"
    with RunWriter(out, dtype="float32") as w:
        w.write_batch(["a"], {"v": np.zeros((1, 1))})
        w.write_skipped([("x.png", "unreadable")])
        w.flush()
        held = _element(out, fmt.SKIPPED, 0) + _element(out, fmt.SKIPPED, 1)
        w.write_skipped([("x.png", "unreadable"), ("y.png", "too large")])
        w.flush()
        assert _element(out, fmt.SKIPPED, 0) + _element(out, fmt.SKIPPED, 1) == held
        with open_run(out) as run:
            assert run.skipped == [("x.png", "unreadable"), ("y.png", "too large")]
        w.write_skipped([("x.png", "unreadable"), ("z.png", "unreadable")])  # one that parts from the file's after x
        w.flush()
        assert _element(out, fmt.SKIPPED, 0) + _element(out, fmt.SKIPPED, 1) == held  # x is never rewritten
    with open_run(out) as run:
        assert run.skipped == [("x.png", "unreadable"), ("z.png", "unreadable")]


def test_a_run_file_from_before_the_skipped_list_takes_an_empty_one_and_refuses_rows_naming_it(tmp_path):
    out = tmp_path / "run.h5"
    with RunWriter(out, dtype="float32") as w:
        w.write_batch(["a"], {"v": np.zeros((1, 1))})
    with h5py.File(out, "r+") as f:
        del f[fmt.SKIPPED]  # as files written before round 40 are
    w = RunWriter(out, mode="resume", dtype="float32")
    w.write_skipped([])
    w.flush()  # nothing to add: nothing refused
    w.write_skipped([("x.png", "unreadable")])
    with pytest.raises(QKHooksError, match=f"cannot add {fmt.SKIPPED} to .*its layout is fixed by its first batch"):
        w.close()
    with open_run(out) as run:
        assert run.ids == ["a"] and run.skipped == []


def test_a_resume_keeps_the_skipped_rows_that_read_and_writes_the_list_again(tmp_path):
    # Before, a dead writer's added rows without their strings made the resume refuse the run as damaged
    out = tmp_path / "run.h5"
    held = [("x.png", "unreadable"), ("w.png", "too large")]
    with RunWriter(out, dtype="float32") as w:
        w.write_batch(["a"], {"v": np.zeros((1, 1))})
        w.write_skipped(held)
    missing = _element(out, fmt.SKIPPED, 0)[:12] + (999).to_bytes(4, "little")
    _leave_stale_heap_references(out, fmt.SKIPPED, 2, [missing] * 4)
    with h5py.File(out, "r+") as f:
        f[fmt.SKIPPED].resize(3, axis=0)  # its added row on disk without its strings, and one more past its end
    with pytest.warns(UserWarning, match=r"list of skipped images reads up to row 2 of 3 \(.*\); the rest is dropped, "
                                        r"and this run writes the list again at its next checkpoint\.$"):
        w = RunWriter(out, mode="resume", dtype="float32")
    with open_run(out) as run:
        assert run.skipped == held
    with w:
        w.write_batch(["b"], {"v": np.ones((1, 1))})
        w.write_skipped(held + [("y.png", "too large"), ("q.png", "unreadable")])
    with open_run(out) as run:
        assert run.ids == ["a", "b"] and run.skipped == held + [("y.png", "too large"), ("q.png", "unreadable")]


def test_skipped_rows_read_up_to_the_first_that_does_not_read_or_is_not_utf8(tmp_path):
    with h5py.File(tmp_path / "run.h5", "w") as f:
        ds = f.create_dataset(fmt.SKIPPED, (3, 2), maxshape=(None, 2), chunks=(64, 2), dtype=h5py.string_dtype())
        ds[0] = ["x.png", "unreadable"]
        ds[1] = [b"\xff\xfe.png", b"unreadable"]  # bytes are written unchecked: damage inside a string
        ds[2] = ["z.png", "unreadable"]
        assert fmt.readable_skipped_rows(ds) == 1
        ds[1] = ["y.png", "unreadable"]
        assert fmt.readable_skipped_rows(ds) == 3


def test_a_resumes_warning_of_unread_skipped_rows_points_at_its_caller(tmp_path):
    # Out of mutation round 43's selection: mutmut's trampolines add frames, so only the ordinary suite checks this
    out = tmp_path / "run.h5"
    with RunWriter(out, dtype="float32") as w:
        w.write_batch(["a"], {"v": np.zeros((1, 1))})
        w.write_skipped([("x.png", "unreadable")])
    with h5py.File(out, "r+") as f:
        f[fmt.SKIPPED][0] = [b"\xff", b"unreadable"]
    with pytest.warns(UserWarning, match="reads up to row 0 of 1") as caught:
        RunWriter(out, mode="resume", dtype="float32").close()
    assert [w.filename for w in caught] == [__file__]


def _torn_skipped_list(path: Path, complete: bool, shard: list[int] | None = None) -> list[tuple[str, str]]:
    """A run of one image whose skipped list has two rows that read and a third without its strings, as a writer
    killed while it added rows leaves it (``complete``: marked finished, so the lost row is damage)."""
    held = [("x.png", "unreadable"), ("w.png", "too large")]
    attrs = {"model": "m", "data": "photos", "config": json.dumps({"shard": shard})} if shard else None
    w = RunWriter(path, dtype="float32", **({"attrs": attrs} if attrs else {}))
    w.write_batch(["a"], {"v": np.zeros((1, 1))})
    w.write_skipped(held)
    w.close(complete=complete)
    missing = _element(path, fmt.SKIPPED, 0)[:12] + (999).to_bytes(4, "little")
    _leave_stale_heap_references(path, fmt.SKIPPED, 2, [missing] * 2)
    with h5py.File(path, "r+") as f:
        f[fmt.SKIPPED].resize(3, axis=0)
    return held


def test_an_unfinished_runs_half_written_skipped_list_is_said_with_the_resume_that_mends_it(tmp_path, capsys):
    # Before, info, info --verify and every read of the list called the run damaged and pointed at repair alone
    out = tmp_path / "run.h5"
    held = _torn_skipped_list(out, complete=False)
    with open_run(out) as run:
        assert fmt.read_skipped_rows(run.file) == (held, [2], 3)
        with pytest.raises(QKHooksError, match=r"skipped images /images/skipped reads up to row 2 of 3 .*killed while "
                                               r"it added rows .*plus --resume.*`qkhooks repair"):
            run.skipped  # never a shorter list without a word
        summary = run.summary()
        assert run.problems == []
    assert "skipped  3: x.png, w.png  (reads up to row 2 of 3)" in summary and "plus --resume" in summary
    assert "         " + str(out) + ": its list of skipped images /images/skipped reads up to row 2 of 3 " in summary
    assert main_rc(["info", str(out)]) == 0
    report = verify_run(out)
    assert report.ok and len(report.resumable) == 1 and "reads up to row 2 of 3" in report.resumable[0]
    assert "result   every committed part read; the part named above is half-written" in report.summary()
    assert report.summary().startswith(f"verify   {out}\n") and "\nresume   " + report.resumable[0] in report.summary()
    assert main_rc(["info", "--verify", str(out)]) == 0
    capsys.readouterr()


def _refused_as_damage(out: Path, pattern: str, words: str, capsys) -> None:
    """A finished run's skipped list that does not read as qkhooks wrote it (``pattern`` after its name): reading it is
    refused as damage naming repair, the summary lists the one problem (``words``) and ``qkhooks info`` exits 2."""
    with open_run(out) as run:
        with pytest.raises(QKHooksError, match=rf"is damaged \(its list of skipped images /images/skipped {pattern}\): "
                                               r"run `qkhooks repair"):
            run.skipped
        run.summary()
        assert len(run.problems) == 1 and words in run.problems[0]
    capsys.readouterr()
    assert main_rc(["info", str(out)]) == 2


def test_a_finished_runs_unreadable_skipped_rows_are_damage_and_repair_keeps_the_rows_that_read(tmp_path, capsys):
    out = tmp_path / "run.h5"
    held = _torn_skipped_list(out, complete=True)
    _refused_as_damage(out, r"reads up to row 2 of 3", "reads up to row 2 of 3", capsys)
    assert f"is damaged: its list of skipped images /images/skipped reads up to row 2 of 3: run `qkhooks repair {out}" \
        in capsys.readouterr().err
    report = verify_run(out)
    assert not report.ok and report.resumable == [] and "reads up to row 2 of 3" in report.problems[0]
    fixed = repair(out, tmp_path / "fixed.h5")  # before, the copy's list was empty and nothing said so
    assert fixed.recovered == ["a"] and fixed.problems == [
        "/images/skipped: row 2 does not read (the copy lists the 2 of its 3 rows that read)"]
    with open_run(tmp_path / "fixed.h5") as run:
        assert run.skipped == held


def _skipped_list_with_a_hole(path: Path, complete: bool) -> list[tuple[str, str]]:
    """A run of one image whose skipped list of 10 rows has lost row 3's strings (its elements point at an object
    their heap does not have) while rows 4-9 read: damage in the middle of the list, not a killed writer's tail."""
    rows = [(f"{i}.png", "unreadable") for i in range(10)]
    w = RunWriter(path, dtype="float32")
    w.write_batch(["a"], {"v": np.zeros((1, 1))})
    w.write_skipped(rows)
    w.close(complete=complete)
    with h5py.File(path, "r+") as f:
        ds = f[fmt.SKIPPED]
        mask, raw = ds.id.read_direct_chunk((0, 0))
        size = len(raw) // int(np.prod(ds.chunks))
        lost = raw[3 * 2 * size:3 * 2 * size + 12] + (999).to_bytes(4, "little")
        ds.id.write_direct_chunk((0, 0), raw[:3 * 2 * size] + lost * 2 + raw[4 * 2 * size:], mask)
    with h5py.File(path, "r") as f:  # the damage is what the test says: row 3 alone does not read
        assert fmt.readable_skipped_rows(f[fmt.SKIPPED]) == 3 and [f[fmt.SKIPPED][i][0] for i in (2, 4, 9)] == \
            [b"2.png", b"4.png", b"9.png"]
    return rows[:3] + rows[4:]


def test_repair_keeps_every_skipped_row_that_reads_past_a_lost_one_and_names_it(tmp_path, capsys):
    # Before, repair (and info, verify) read the list up to its first lost row: rows 4-9 were dropped as lost too
    out = tmp_path / "run.h5"
    held = _skipped_list_with_a_hole(out, complete=True)
    with h5py.File(out, "r") as f:
        assert fmt.read_skipped_rows(f) == (held, [3], 10)
    _refused_as_damage(out, r"does not read at row 3 of 10 \(the others read\)", "does not read at row 3 of 10", capsys)
    with open_run(out) as run:
        assert "skipped  10: 0.png, 1.png, 2.png, 4.png, 5.png ...  (does not read at row 3 of 10 (the others read))" \
            in run.summary()
    report = verify_run(out)
    assert not report.ok and report.resumable == [] and len(report.problems) == 1 \
        and "does not read at row 3 of 10 (the others read)" in report.problems[0]
    fixed = repair(out, tmp_path / "fixed.h5")
    assert fixed.recovered == ["a"] and fixed.problems == [
        "/images/skipped: row 3 does not read (the copy lists the 9 of its 10 rows that read)"]
    with open_run(tmp_path / "fixed.h5") as run:
        assert run.skipped == held and run.summary() and run.problems == []
    assert verify_run(tmp_path / "fixed.h5").ok


def test_an_unfinished_runs_lost_skipped_row_is_named_and_its_resume_writes_the_list_again(tmp_path):
    out = tmp_path / "run.h5"
    _skipped_list_with_a_hole(out, complete=False)
    report = verify_run(out)
    assert report.ok and len(report.resumable) == 1 and "does not read at row 3 of 10" in report.resumable[0] \
        and "plus --resume" in report.resumable[0]
    with pytest.raises(QKHooksError, match=r"does not read at row 3 of 10 .*plus --resume"):
        with open_run(out) as run:
            run.skipped
    with pytest.warns(UserWarning, match=r"reads up to row 3 of 10"):  # cut at the lost row: the resume writes it all
        w = RunWriter(out, mode="resume", dtype="float32")
    with w:
        w.write_batch(["b"], {"v": np.ones((1, 1))})
        w.write_skipped([(f"{i}.png", "unreadable") for i in range(10)])
    with open_run(out) as run:
        assert run.ids == ["a", "b"] and run.skipped == [(f"{i}.png", "unreadable") for i in range(10)]


@pytest.mark.parametrize("complete", [False, True], ids=["unfinished", "finished"])
def test_a_merge_refuses_a_shard_whose_skipped_list_does_not_read_whole(tmp_path, complete):
    from qkhooks.distributed import merge_shards, shard_path

    out = tmp_path / "run.h5"
    _torn_skipped_list(shard_path(out, 0, 1), complete=complete, shard=[0, 1])
    fix = ("it is damaged: repair it (`qkhooks repair SHARD --out COPY`, which keeps the rows that read) and merge the "
           "copy." if complete else "its writer was killed while it added rows: resume that shard (its command plus "
           "--resume), which writes the list again, then merge again.")
    with pytest.raises(QKHooksError) as refused:
        merge_shards(out, copy=True)
    assert str(refused.value) == (f"cannot merge {shard_path(out, 0, 1)}: its list of skipped images /images/skipped "
                                  f"reads up to row 2 of 3; {fix}")
    assert not out.exists()


def test_a_shard_whose_skipped_list_reads_whole_merges_with_it(tmp_path):
    from qkhooks.distributed import merge_shards, shard_path

    out = tmp_path / "run.h5"
    attrs = {"model": "m", "data": "photos", "config": json.dumps({"shard": [0, 1]})}
    with RunWriter(shard_path(out, 0, 1), dtype="float32", attrs=attrs) as w:
        w.write_batch(["a"], {"v": np.zeros((1, 1))})
        w.write_skipped([("x.png", "unreadable")])
    merge_shards(out, copy=True)
    with open_run(out) as run:
        assert run.ids == ["a"] and run.skipped == [("x.png", "unreadable")]


def test_the_summary_names_the_first_five_skipped_images_of_a_whole_list(tmp_path):
    out = tmp_path / "run.h5"
    names = [(f"{i}.png", "unreadable") for i in range(6)]
    with RunWriter(out, dtype="float32") as w:
        w.write_batch(["a"], {"v": np.zeros((1, 1))})
        w.write_skipped(names[:2])
    with open_run(out) as run:
        assert "skipped  2: 0.png, 1.png\n" in run.summary()
    with RunWriter(out, mode="resume", dtype="float32") as w:
        w.write_skipped(names)
    with open_run(out) as run:
        assert "skipped  6: 0.png, 1.png, 2.png, 3.png, 4.png ...\n" in run.summary() and run.problems == []


@pytest.mark.parametrize("layout", ["one-column", "numbers", "group"])
def test_a_skipped_list_not_laid_out_as_qkhooks_writes_it_is_damage_never_other_rows(tmp_path, layout, capsys):
    # Before: a 1-D list of ids read as rows of character codes ('120', '46', ...), a numeric one as ('0', '0'),
    # without a word; the summary failed with a raw ValueError; verify called the run whole; repair copied the
    # character codes as (id, reason) pairs
    from qkhooks.distributed import merge_shards, shard_path

    for path, attrs in ((tmp_path / "run.h5", None),
                        (shard_path(tmp_path / "merged.h5", 0, 1), {"model": "m", "data": "photos",
                                                                    "config": json.dumps({"shard": [0, 1]})})):
        w = RunWriter(path, dtype="float32", **({"attrs": attrs} if attrs else {}))
        w.write_batch(["a"], {"v": np.zeros((1, 1))})
        w.close(complete=True)
        with h5py.File(path, "r+") as f:
            del f[fmt.SKIPPED]
            if layout == "one-column":
                f.create_dataset(fmt.SKIPPED, data=np.array(["x.png", "y.png"], dtype=object), dtype=h5py.string_dtype())
            elif layout == "group":  # before: verify called the run whole, repair died on the group's missing shape
                f.create_group(fmt.SKIPPED)
            else:
                f.create_dataset(fmt.SKIPPED, data=np.zeros((2, 2), dtype=np.int64))
    out = tmp_path / "run.h5"
    shape = {"one-column": "a \\(2,\\) dataset of object", "numbers": "a \\(2, 2\\) dataset of int64",
             "group": "a group"}[layout]
    _refused_as_damage(out, rf"is {shape}, not the \(n, 2\) strings \(image id, reason\) qkhooks writes",
                       "not the (n, 2) strings", capsys)
    assert "not the (n, 2) strings" in " ".join(verify_run(out).problems)
    fixed = repair(out, tmp_path / "fixed.h5")
    assert fixed.recovered == ["a"] and "not the (n, 2) strings" in fixed.problems[0]
    with open_run(tmp_path / "fixed.h5") as run:
        assert run.skipped == []
    with pytest.raises(QKHooksError, match=r"cannot merge .*merged\.rank0-of-1\.h5: its list of skipped images "
                                           r"/images/skipped is .*; repair it"):
        merge_shards(tmp_path / "merged.h5", copy=True)
    assert not (tmp_path / "merged.h5").exists()
    capsys.readouterr()


class _Resizes:
    """A dataset that records the sizes it is resized to; ``walk=False`` shows it as h5py built against an HDF5
    without ``H5Dchunk_iter`` (h5py 3.8's wheels) does: its ``id`` has no ``chunk_iter``."""

    def __init__(self, ds: h5py.Dataset, walk: bool):
        self._ds, self.sizes = ds, []
        self.id = ds.id if walk else object()

    def resize(self, size: int, axis: int) -> None:
        self.sizes.append(size)
        self._ds.resize(size, axis=axis)

    def __getattr__(self, name: str):
        return getattr(self._ds, name)


@pytest.mark.parametrize("walk", [True, False], ids=["chunk-walk", "no-chunk-walk"])
def test_stale_heap_references_are_dropped_growing_over_the_last_chunk_held_or_64_without_hdf5s_chunk_walk(tmp_path, walk):
    out = tmp_path / "run.h5"
    with RunWriter(out, dtype="float32") as w:
        w.write_batch(["a", "b"], {"v": np.zeros((2, 1))})
    stale = _element(out, fmt.IDS, 0)[:12] + (999).to_bytes(4, "little")
    _leave_stale_heap_references(out, fmt.IDS, 2, [stale])
    with h5py.File(out, "r+") as f:
        ids = _Resizes(f[fmt.IDS], walk)
        fmt.drop_stale_heap_references(ids, 2)
        rows = f[fmt.IDS].chunks[0]
        assert ids.sizes == [rows if walk else fmt.STALE_CHUNKS_WITHOUT_WALK * rows, 2] and f[fmt.IDS].shape == (2,)
    assert _element(out, fmt.IDS, 2) == bytes(16)  # the element past the end is the fill value: no reference
    with h5py.File(out, "r+") as f:
        f[fmt.IDS].resize(3, axis=0)
        f[fmt.IDS][2] = "c"  # frees nothing now
    with open_run(out) as run:
        assert run.ids[:2] == ["a", "b"]


@pytest.mark.slow
def test_sigkill_at_many_random_moments_then_resume_equals_an_uninterrupted_run(tmp_path):
    rng = random.Random(14)
    out, total, kills = tmp_path / "run.h5", 300, 30
    at_kill = []
    for k in range(kills):
        before = _committed(out)
        child = _start(tmp_path, out, f"o3:{total}:2", pause=0.0, resume=out.exists())
        try:  # let it commit a few more batches (randomly many) past where it restarts, then kill it
            target = min(total - 2, before + rng.randint(1, 16))
            _wait_for(child, out, target)
            time.sleep(rng.uniform(0, 0.05))
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
        at_kill.append((before, _committed(out)))
    assert all(after > 0 for _, after in at_kill) and max(after for _, after in at_kill) >= 200
    assert all(after > before for before, after in at_kill if before < total - 2)  # the kills landed after commits
    _record(out, f"o3:{total}:2", resume=True)
    _record(tmp_path / "clean.h5", f"o3:{total}:2")
    assert_same_run(out, tmp_path / "clean.h5")


# ------------------------------------------------------------------------------------------ full disk
@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "small"
    mount_small_tmpfs(mnt)
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)])


def test_a_full_disk_stops_the_run_cleanly_and_resume_finishes_it(tmp_path, small_disk):
    args = ["record", "timm:vit_tiny_patch16_224", "o3:32:1", "--random-init", "--modes", "all", "--layers", "0,11",
            "--batch-size", "2"]
    out = small_disk / "run.h5"
    done = subprocess.run([sys.executable, "-m", "qkhooks", *args, "--out", str(out)], env=ENV, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 2, done.stderr[-2000:]
    message = done.stderr.strip().splitlines()[-1]
    with open_run(out) as run:
        n = run.n
        assert not run.complete and 0 < n < 32  # 32 images: 9.6 MB of maps, the disk 8 MB
        kept = (fmt.read_checkpoint(out, fmt.run_id_of(run.file)) or (0,))[0]  # the disk may fill writing the checkpoint
    # round 40: counted by the reducers' checkpoint, what a resume keeps (before: "N images are committed and safe",
    # where the checkpoint at 16 images had failed on the full disk and a resume recorded all 16 again)
    held = (f"holds {kept} images complete (its reducers' last checkpoint); the {n - kept} committed after them"
            if 0 < kept < n else f"holds {n} images complete (all in its reducers' last checkpoint)" if kept == n
            else f"has {n} committed images and no reducer checkpoint yet")
    assert message.startswith(f"qkhooks: error: disk full while writing run.h5: run.h5 {held}"), message
    assert message.endswith(". Free space and run the same command with --resume"), message
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)  # space freed
    done = subprocess.run([sys.executable, "-m", "qkhooks", *args, "--out", str(out), "--resume"], env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    clean = tmp_path / "clean.h5"
    done = subprocess.run([sys.executable, "-m", "qkhooks", *args, "--out", str(clean)], env=ENV, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert_same_run(out, clean)


FILLING = textwrap.dedent(
    """
    import collections, sys
    import numpy as np
    from qkhooks import QKHooksError
    from qkhooks.store import writer

    class RoomyDisk:  # the free-space check sees plenty: HDF5 itself meets the full disk (another process filled it)
        @staticmethod
        def disk_usage(path):
            return collections.namedtuple("usage", "total used free")(1 << 50, 0, 1 << 50)

    writer.shutil = RoomyDisk
    w = writer.RunWriter(sys.argv[1], dtype="float32", chunk_images=1)
    try:
        for i in range(10 ** 6):
            w.write_batch([f"i{i}"], {"v": np.full((1, 16384), i, np.float32)})
            w.flush()
    except QKHooksError as exc:
        print(exc)
    w.close(complete=False)
    """
)


def test_a_write_error_inside_hdf5_closes_the_file_cleanly_and_keeps_every_committed_image(tmp_path, small_disk):
    out = small_disk / "run.h5"
    script = tmp_path / "fill.py"
    script.write_text(FILLING)
    done = subprocess.run([sys.executable, str(script), str(out)], env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]  # no segfault while h5py objects are finalised
    n = int(done.stdout.split("run.h5: ")[1].split(" images")[0])
    assert done.stdout.startswith(f"disk full while writing run.h5: {n} images are committed and safe") and n > 10
    with open_run(out) as run:
        assert run.n == n and run.ids == [f"i{i}" for i in range(n)]
        np.testing.assert_array_equal(run.array("v")[:, ::4096], np.repeat(np.arange(n, dtype=np.float32)[:, None], 4, 1))
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    with RunWriter(out, mode="resume", dtype="float32") as w:
        w.write_batch(["last"], {"v": np.full((1, 16384), -1.0, np.float32)})
    with open_run(out) as run:
        assert run.complete and run.n == n + 1 and run.array("v")[n, 0] == -1.0


# ------------------------------------------------------------------------------------------ damaged files
def _damaged_copies(run: Path, folder: Path) -> dict[str, Path]:
    data = run.read_bytes()
    with h5py.File(run, "r") as f:  # the ids' object header: a flip there loses every image (repair names images by
        info = h5py.h5o.get_info(f[fmt.IDS].id)  # their ids), which byte_flipped is not for; where it lies depends
        assert info.hdr.nchunks == 1  # on the layout before it (the root's attributes: round 25 moved it onto a flip)
        ids_header = range(info.addr, info.addr + info.hdr.space.total)
    copies = {
        "truncated_4k": data[:-4096],
        "truncated_half": data[: len(data) // 2],
        "byte_flipped": bytes(b ^ 0xFF if i % 997 == 13 and i not in ids_header else b for i, b in enumerate(data)),
        "zeroed_superblock": bytes(48) + data[48:],
    }
    paths = {}
    for name, content in copies.items():
        paths[name] = folder / f"{name}.h5"
        paths[name].write_bytes(content)
        shutil.copy(run.with_name(run.name + ".reducers"), folder / f"{name}.h5.reducers")  # its checkpoint beside it
    return paths


ANSWERS = {
    "info": [sys.executable, "-m", "qkhooks", "info", "{path}"],
    "open_run": [sys.executable, "-c", "import sys, qkhooks\ntry:\n    r = qkhooks.open_run(sys.argv[1])\n"
                 "    print(r.n, len(r.array('modes/L0/query')[:]))\nexcept qkhooks.QKHooksError as e:\n"
                 "    print(e, file=sys.stderr); sys.exit(2)", "{path}"],
    "analyze": [sys.executable, "-m", "qkhooks", "analyze", "modes", "{path}", "--out", "{path}.analysis",
                "--figure-modes", "0", "--no-overview", "--no-images"],
}


@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
    """A complete run (14 images, default reducers), what it holds, and four damaged copies of it."""
    folder = tmp_path_factory.mktemp("damaged")
    run = folder / "run.h5"
    record_dataset(tiny_vit(), "samples", run, modes=4, layers="0,1", batch_size=4, progress=False)
    with open_run(run) as good:
        held = good.ids, {name: good.array(name)[:] for name in good.arrays()}, good.state("topk_modes")
    return held, _damaged_copies(run, folder)


def test_damaged_run_files_open_or_refuse_clearly_and_repair_recovers_every_intact_image(damaged, tmp_path):
    (ids, maps, topk), copies = damaged
    assert len(ids) == 14
    for name, path in copies.items():
        before = sha(path)
        try:
            with open_run(path) as run:  # reads what it can (committed images only) ...
                assert run.n <= len(ids)
        except QKHooksError as exc:  # ... or says what is wrong and how to recover
            assert f"qkhooks repair {path} --out FIXED.h5" in str(exc)
        fixed = tmp_path / f"{name}.fixed.h5"
        report = repair(path, fixed)
        assert sha(path) == before  # the damaged file is never changed
        with open_run(fixed) as f:
            assert f.ids == report.recovered and f.n == len(report.recovered)
            rows = [ids.index(i) for i in f.ids]
            for array, values in maps.items() if f.n else ():
                np.testing.assert_array_equal(f.array(array)[:], values[rows], err_msg=f"{name} {array}")
        if name in ("zeroed_superblock", "truncated_4k"):  # the images' data and metadata are intact: all come back
            assert report.recovered == ids, report.summary()
    assert main_rc(["repair", str(copies["zeroed_superblock"]), "--out", str(tmp_path / "z2.h5")]) == 0
    with open_run(tmp_path / "z2.h5") as f:  # with its reducer checkpoint, so a --resume of it continues correctly
        assert f.ids == ids and f.complete
        np.testing.assert_array_equal(f.state("topk_modes")["index"], topk["index"])
    assert main_rc(["repair", str(copies["truncated_4k"]), "--out", str(tmp_path / "z2.h5")]) == 2  # never replaces


@pytest.mark.slow
@pytest.mark.parametrize("what", sorted(ANSWERS))
def test_info_open_run_and_analyze_answer_damaged_files_within_20_s(damaged, what):
    for name, path in damaged[1].items():
        done = subprocess.run([c.format(path=path) for c in ANSWERS[what]], env=ENV, capture_output=True, text=True,
                              timeout=20)  # a hang fails here
        assert done.returncode in (0, 2), f"{name} {what}: {done.stderr[-1500:]}"
        if done.returncode == 2:  # a clear message naming the way out, never a traceback
            assert "Traceback" not in done.stderr and "qkhooks repair" in done.stderr, f"{name} {what}: {done.stderr[-1500:]}"


def main_rc(argv: list[str]) -> int:
    from qkhooks.cli import main

    return main(argv)


# ------------------------------------------------------------------------------------------ review 18 (store)
def _small_run(path: Path, batches: int = 3, checkpoint: bool = False) -> None:
    with RunWriter(path, dtype="float32", chunk_images=2) as w:
        for i in range(batches):
            w.write_batch([f"i{2 * i}", f"i{2 * i + 1}"], {"v": np.full((2, 8), i, np.float32)})
        if checkpoint:
            w.write_checkpoint({"r": {"a": np.arange(64.0), "count": 6}})


def _header(path: Path, name: str) -> int:
    """File offset of ``name``'s object header."""
    with h5py.File(path, "r") as f:
        return h5py.h5o.get_info(f[name].id).addr


def _chunk_index(path: Path, name: str) -> int:
    """File offset of a byte of dataset ``name``'s chunk index (extensible array header): the one whose damage
    leaves the file's tree readable and makes the chunk lookup of ``name`` fail."""
    data = path.read_bytes()
    at = data.find(b"EAHD")
    while at >= 0:
        path.write_bytes(data[:at + 8] + bytes([data[at + 8] ^ 0xFF]) + data[at + 9:])
        try:
            with h5py.File(path, "r") as f:
                list(f["images"])
                try:
                    f[name].id.get_chunk_info_by_coord((0,) * f[name].ndim)
                except (OSError, RuntimeError):
                    return at + 8
        except (OSError, RuntimeError, KeyError):
            pass
        at = data.find(b"EAHD", at + 1)
    raise AssertionError(f"no chunk index of {name} found")
    # (the file is left with the byte flipped; the callers flip it again to damage it themselves)


def _flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def _as_if_killed(path: Path) -> None:
    """Set the superblock's "open for SWMR write" flags a killed writer leaves (readers then read in SWMR mode)."""
    from qkhooks.store._hdf5 import Superblock

    block = Superblock.read(path)
    with open(path, "r+b") as fh:
        fh.write(block.with_flags(0x05))


def _answer(argv: list[str], timeout: float = 20) -> subprocess.CompletedProcess:
    start = time.monotonic()
    done = subprocess.run(argv, env=ENV, capture_output=True, text=True, timeout=timeout)  # a hang fails here
    done.seconds = time.monotonic() - start
    return done


READ_ALL = ("import sys, qkhooks\ntry:\n    r = qkhooks.open_run(sys.argv[1])\n    [r.array(a)[:] for a in r.arrays()]\n"
            "    print(r.n, r.ids)\nexcept qkhooks.QKHooksError as e:\n    print(e, file=sys.stderr); sys.exit(2)")


@pytest.mark.parametrize("how", ["hardlink", "symlink"])
def test_a_second_writer_through_another_name_of_the_file_is_refused(tmp_path, how):
    """F1: the lock follows the file, not the name it was given (a hard link, a symlink)."""
    real, other = tmp_path / "real.h5", tmp_path / "other.h5"
    with RunWriter(real, dtype="float32", chunk_images=2) as w:
        w.write_batch(["a", "b"], {"v": np.ones((2, 8), np.float32)})
        w.flush()
        (os.link if how == "hardlink" else os.symlink)(real, other)
        for mode in ("resume", "overwrite"):
            # the writer above is this very process: a symlink reaches its lock file, a hard link only the file
            says = "being written by this process" if how == "symlink" else "being written by another writer under another name"
            with pytest.raises(QKHooksError, match=says):
                RunWriter(other, mode=mode, dtype="float32")
        w.write_batch(["c", "d"], {"v": np.ones((2, 8), np.float32)})
    with RunWriter(other, mode="resume", dtype="float32") as w2:  # once the first is gone, the other name may write
        w2.write_batch(["e", "f"], {"v": np.ones((2, 8), np.float32)})
    with open_run(real) as run:
        assert run.ids == list("abcdef") and run.complete


def test_a_killed_writers_run_lock_is_taken_over_by_a_writer_through_a_hard_link(tmp_path):
    real, link = tmp_path / "real.h5", tmp_path / "link.h5"
    _small_run(real)
    code = (f"import numpy as np, os, sys\nfrom qkhooks.store import RunWriter\nw = RunWriter({str(real)!r}, mode='resume', "
            "dtype='float32')\nw.flush()\nprint('held', flush=True)\nimport time; time.sleep(60)")
    child = subprocess.Popen([sys.executable, "-c", code], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert child.stdout.readline().strip() == b"held", child.stderr.read().decode()[-2000:]
        os.link(real, link)
        with pytest.raises(QKHooksError, match="another name of the same file"):
            RunWriter(link, mode="resume", dtype="float32")
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    with RunWriter(link, mode="resume", dtype="float32") as w:  # the dead writer's locks are gone
        w.write_batch(["x", "y"], {"v": np.zeros((2, 8), np.float32)})
    with open_run(real) as run:
        assert run.n == 8


def test_a_reader_of_a_killed_writers_file_with_damaged_metadata_answers_within_seconds(tmp_path):
    """F2: SWMR reading retried a bad metadata checksum for minutes; now it gives up in about a second."""
    for name, where in (("ids_header", lambda p: _header(p, "images/ids") + 12),
                        ("array_index", lambda p: _chunk_index(p, "v"))):
        path = tmp_path / f"{name}.h5"
        _small_run(path)
        clean = path.read_bytes()
        at = where(path)
        path.write_bytes(clean)
        _flip(path, at)
        _as_if_killed(path)
        for argv in ([sys.executable, "-c", READ_ALL, str(path)], [sys.executable, "-m", "qkhooks", "info", str(path)]):
            done = _answer(argv)
            assert done.returncode == 2 and "Traceback" not in done.stderr, (name, done.stderr[-1500:])
            assert f"qkhooks repair {path} --out FIXED.h5" in done.stderr and "damaged" in done.stderr, done.stderr
            assert done.seconds < 10, (name, done.seconds)


def test_damaged_metadata_of_a_complete_run_is_reported_as_damage_never_a_raw_error(tmp_path):
    """F6: one QKHooksError naming the file and `qkhooks repair`, from open_run, every read and `qkhooks info`."""
    ids_damaged = tmp_path / "ids.h5"
    _small_run(ids_damaged)
    _flip(ids_damaged, _header(ids_damaged, "images/ids") + 12)
    with pytest.raises(QKHooksError, match=r"damaged.*qkhooks repair") as err:
        open_run(ids_damaged)
    assert "not a qkhooks run" not in str(err.value)
    index_damaged = tmp_path / "index.h5"
    _small_run(index_damaged)
    _chunk_index(index_damaged, "v")  # leaves it flipped
    with open_run(index_damaged) as run:  # opens (the array's index is read only when it is read) ...
        with pytest.raises(QKHooksError, match=rf"{index_damaged} is damaged .*qkhooks repair {index_damaged} --out"):
            run.array("v")[:]
        with pytest.raises(QKHooksError, match="damaged"):
            run.array("v")[0]
    done = _answer([sys.executable, "-m", "qkhooks", "info", str(index_damaged)])
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-1500:]
    assert "DAMAGED" in done.stdout and f"qkhooks repair {index_damaged}" in done.stderr
    header_damaged = tmp_path / "header.h5"
    _small_run(header_damaged)
    _flip(header_damaged, _header(header_damaged, "v") + 12)
    for argv in ([sys.executable, "-m", "qkhooks", "info", str(header_damaged)],
                 [sys.executable, "-c", READ_ALL, str(header_damaged)]):
        done = _answer(argv)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-1500:]
        assert f"qkhooks repair {header_damaged} --out FIXED.h5" in done.stderr


RESUME_CUT = ("import numpy as np, sys\nfrom qkhooks.store import RunWriter\n"
              "with RunWriter(sys.argv[1], mode='resume', dtype='float32') as w:\n    w.truncate(2)\n"
              "    w.write_batch(['n2', 'n3'], {'v': np.full((2, 8), 7, np.float32)})")


def test_a_reader_of_a_closed_run_that_a_resume_cuts_says_so_instead_of_returning_stale_rows(tmp_path):
    """F7: a closed run is read without SWMR (nothing refreshes); a resume cuts and rewrites it in place."""
    path = tmp_path / "run.h5"
    _small_run(path)
    run = open_run(path)
    assert not run.file.swmr_mode and run.n == 6
    v = run.array("v")
    assert v[5][0] == 2
    done = subprocess.run([sys.executable, "-c", RESUME_CUT, str(path)], env=ENV, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    for read in (lambda: v[5], lambda: v[:], lambda: run.ids, run.refresh, lambda: run.array("v")):
        with pytest.raises(QKHooksError, match="changed .* since this reader opened it.*open it again"):
            read()
    run.close()
    with open_run(path) as again:
        assert again.ids == ["i0", "i1", "n2", "n3"] and again.array("v")[3][0] == 7


def test_a_readers_file_replaced_under_its_name_is_reported_on_refresh(tmp_path):
    path, other = tmp_path / "run.h5", tmp_path / "other.h5"
    _small_run(path)
    _small_run(other, batches=1)
    with open_run(path) as run:
        os.replace(other, path)
        with pytest.raises(QKHooksError, match="replaced by another file"):
            run.refresh()


def test_a_damaged_reducer_checkpoint_is_reported_never_silently_ignored(tmp_path):
    """F10: states() / state() raise naming the checkpoint and what a resume does; `qkhooks info` says it (exit 2)."""
    path = tmp_path / "run.h5"
    _small_run(path, checkpoint=True)
    with open_run(path) as run:
        assert run.states() == ["r"]
    ckpt = tmp_path / "run.h5.reducers"
    data = bytearray(ckpt.read_bytes())
    data[len(data) // 2] ^= 0x01
    ckpt.write_bytes(bytes(data))
    with open_run(path) as run:
        assert run.n == 6  # the images are unaffected
        for read in (run.states, lambda: run.state("r")):
            with pytest.raises(QKHooksError, match=rf"checkpoint {ckpt} is damaged.*--resume .* records every image again"):
                read()
    done = _answer([sys.executable, "-m", "qkhooks", "info", str(path)])
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "reducers DAMAGED" in done.stdout and str(ckpt) in done.stderr


def test_an_unusable_lock_file_and_a_dangling_symlink_are_refused_clearly(tmp_path):
    """F11: a lock file that cannot be opened (here a folder of that name; in real use, another user's) and a
    symlink to nothing as the output (writing would replace the link and never create its target)."""
    (tmp_path / "run.h5.lock").mkdir()
    with pytest.raises(QKHooksError, match=r"cannot take the writer lock of .*run.h5.lock"):
        RunWriter(tmp_path / "run.h5")
    link, target = tmp_path / "link.h5", tmp_path / "sub_target.h5"
    link.symlink_to(target)
    with pytest.raises(QKHooksError, match=rf"symlink to {target}, which does not exist"):
        RunWriter(link)
    assert link.is_symlink() and not target.exists()


def test_a_full_disk_while_laying_out_a_run_does_not_advise_resuming_a_file_that_does_not_exist(tmp_path, monkeypatch):
    import errno

    from qkhooks.store import writer as writer_module

    def full(self, name, value):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer_module.RunWriter, "_do_static", full)
    out = tmp_path / "run.h5"
    w = RunWriter(out)
    w.write_static("spectrum/L0/S", np.ones(3))
    with pytest.raises(QKHooksError) as err:
        w.close()
    assert "no run file was written" in str(err.value) and "--resume" not in str(err.value)
    assert not out.exists()
# ------------------------------------------------------------------------------------------ resume identity
def _other_weights() -> qkhooks.LoadedModel:
    import timm  # noqa: F401  (BUILD names it)

    torch.manual_seed(1)  # the same class and spec, other weights (which the model name cannot tell apart)
    return qkhooks.load_model(eval(BUILD).eval())


def _interrupted(out: Path, loaded, data="samples", after: int = 1, **kw) -> None:
    """A run stopped (KeyboardInterrupt from on_batch) after ``after`` batches of 2, checkpointed every batch."""
    seen = {"batches": 0}

    def stop(batch):
        seen["batches"] += 1
        if seen["batches"] == after:
            raise KeyboardInterrupt

    opts = {"layers": "0", "modes": 4, "batch_size": 2, "limit": 6, "checkpoint_every": 1, **kw}
    with pytest.raises(KeyboardInterrupt):
        record_dataset(loaded, data, out, progress=False, on_batch=stop, **opts)


def test_a_resume_refuses_other_weights_another_compute_dtype_or_other_preprocessing(tmp_path):
    import dataclasses

    out = tmp_path / "run.h5"
    _interrupted(out, tiny_vit())
    before = sha(out)
    others = _other_weights()
    half = tiny_vit()
    half.model.to(torch.bfloat16)
    moved = tiny_vit()
    moved.image_config = dataclasses.replace(moved.image_config, mean=(0.0, 0.0, 0.0))
    for loaded, what in ((others, r"the model's weights \(sha256"), (half, "compute dtype .*file float32, now bfloat16"),
                         (moved, r"preprocessing \(image_config.*mean: file")):
        with pytest.raises(QKHooksError, match=f"{what}.*never mixes.*--overwrite"):
            record_dataset(loaded, "samples", out, layers="0", modes=4, batch_size=2, limit=6, progress=False,
                           resume=True)
        assert sha(out) == before  # a refused resume changes nothing
    record_dataset(tiny_vit(), "samples", out, layers="0", modes=4, batch_size=2, limit=6, progress=False, resume=True)
    with open_run(out) as run:
        assert run.complete and run.n == 6


def test_a_weights_hash_that_differs_only_past_its_first_digits_is_shown_whole(tmp_path):
    """The refusal shows hashes by their first 12 digits only where those tell them apart (a damaged stored hash may
    share them), so it never reads "file 8486bb887b2e..., now 8486bb887b2e..."."""
    import json

    out = tmp_path / "run.h5"
    _interrupted(out, tiny_vit())
    with h5py.File(out, "r+") as f:
        identity = json.loads(f.attrs["identity"])
        true_hash = identity["weights_sha256"]
        identity["weights_sha256"] = true_hash[:-1] + ("0" if true_hash[-1] != "0" else "1")
        f.attrs["identity"] = json.dumps(identity)
    with pytest.raises(QKHooksError, match=f"file {identity['weights_sha256']}, now {true_hash}\\)"):
        record_dataset(tiny_vit(), "samples", out, layers="0", modes=4, batch_size=2, limit=6, progress=False,
                       resume=True)


def test_a_run_file_from_before_weight_hashes_is_resumed_by_comparing_its_spectra(tmp_path):
    out = tmp_path / "run.h5"
    _interrupted(out, tiny_vit())
    with h5py.File(out, "r+") as f:  # as older versions wrote it
        del f.attrs["identity"]
    others = _other_weights()
    with pytest.raises(QKHooksError, match="weights differ.*spectrum/L0/S_all"):
        record_dataset(others, "samples", out, layers="0", modes=4, batch_size=2, limit=6, progress=False, resume=True)
    record_dataset(tiny_vit(), "samples", out, layers="0", modes=4, batch_size=2, limit=6, progress=False, resume=True)
    with open_run(out) as run:
        assert run.complete and run.n == 6


def test_a_resume_refuses_an_image_added_before_its_resume_point_and_never_calls_it_undecodable(tmp_path):
    from conftest import noise_photos

    folder = tmp_path / "imgs"
    rng = noise_photos(folder, [f"im{i}.png" for i in range(6)], size=(40, 40))
    out = tmp_path / "run.h5"
    _interrupted(out, tiny_vit(), str(folder), after=2, reducers=[], limit=None)
    before = sha(out)
    noise_photos(folder, ["im0_added.png"], size=(40, 40), seed=int(rng.integers(1 << 30)))
    with pytest.raises(QKHooksError, match=r"'im0_added.png' \(number 1\) comes before .* not in the run file.*--overwrite"):
        record_dataset(tiny_vit(), str(folder), out, layers="0", modes=4, batch_size=2, reducers=[], progress=False,
                       resume=True)
    assert sha(out) == before
    (folder / "im0_added.png").unlink()
    result = record_dataset(tiny_vit(), str(folder), out, layers="0", modes=4, batch_size=2, reducers=[],
                            progress=False, resume=True)
    assert result.skipped == []
    with open_run(out) as run:
        assert run.complete and run.ids == [f"im{i}.png" for i in range(6)]

    # an image missing from a run although it decodes is never listed as "could not be decoded"
    from qkhooks.data import open_dataset
    from qkhooks.stream import _skipped

    ds = open_dataset(str(folder), tiny_vit().image_config)
    reasons = dict(_skipped([], ds, ds.ids, set(ds.ids[1:]), first_shard=True))
    assert list(reasons) == ["im0.png"] and "decodes now" in reasons["im0.png"]


def test_duplicate_ids_of_an_indexable_dataset_are_refused_before_any_file(tmp_path):
    from qkhooks.data import ImageDataset, open_dataset

    loaded = tiny_vit()
    ds = open_dataset("samples", loaded.image_config, limit=3)
    twice = ImageDataset("twice", ds._records + ds._records[:1], loaded.image_config, False)
    out = tmp_path / "run.h5"
    with pytest.raises(QKHooksError, match=r"items 0 and 3 of 'twice' have the same id .*Nothing was written"):
        record_dataset(loaded, twice, out, layers="0", modes=4, batch_size=2, reducers=[], progress=False)
    assert list(tmp_path.iterdir()) == []


def test_a_batch_refused_mid_run_says_where_the_file_stands_and_what_to_do(tmp_path):
    img = np.zeros((64, 64, 3), np.uint8)
    loaded = tiny_vit()
    kw = dict(layers="0", modes=4, batch_size=2, reducers=[], progress=False)
    out = tmp_path / "dup.h5"
    items = [{"image": img, "id": i} for i in ("a", "b", "c", "a")]
    # streamed (a list's ids are checked whole before anything is read: test_user_data_items)
    with pytest.raises(QKHooksError, match="the id 'a'.*The 2 images before it stay committed .*--resume.*--overwrite"):
        record_dataset(loaded, iter(items), out, **kw)
    with pytest.raises(QKHooksError, match="the id 'a'"):  # the file resumes once the data is fixed
        record_dataset(loaded, iter(items), out, resume=True, **kw)
    record_dataset(loaded, iter(items[:3] + [{"image": img, "id": "d"}]), out, resume=True, **kw)
    with open_run(out) as run:
        assert run.complete and run.ids == ["a", "b", "c", "d"]
    out = tmp_path / "masks.h5"
    obj = np.ones((64, 64), np.int32)
    items = [{"image": img, "id": "0"}, {"image": img, "id": "1", "objects": obj}]
    with pytest.raises(QKHooksError, match="item 0 .* has no 'objects' mask.*Nothing was recorded"):
        record_dataset(loaded, items, out, **{**kw, "batch_size": 1})  # a list is checked whole before any file
    assert not out.exists()
    with pytest.raises(QKHooksError, match="has no 'objects' mask.*--overwrite"):  # a stream: found as it is decoded
        record_dataset(loaded, (item for item in items), out, **{**kw, "batch_size": 1})


class _Failing(torch.utils.data.Dataset):
    def __init__(self, n: int, fail_at: int):
        self.n, self.fail_at = n, fail_at

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if i == self.fail_at:
            raise RuntimeError("user dataset bug")
        return np.full((64, 64, 3), 10 * i, np.uint8)


def test_overwrite_keeps_the_old_run_until_the_new_one_has_a_checkpoint(tmp_path):
    from qkhooks.analysis.preference import PreferenceReducer  # noqa: F401  (the default recipe's reducers)

    loaded = tiny_vit()
    kw = dict(layers="0", modes=4, batch_size=2, progress=False)
    out = tmp_path / "run.h5"
    record_dataset(loaded, "samples", out, limit=6, **kw)
    old, old_states = sha(out), sha(fmt.checkpoint_path(out))
    with pytest.raises(RuntimeError, match="user dataset bug"):  # fails before the new run's first checkpoint
        record_dataset(loaded, _Failing(6, 3), out, overwrite=True, checkpoint_every=8, num_workers=0, **kw)
    assert sha(out) == old and sha(fmt.checkpoint_path(out)) == old_states
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.h5", "run.h5.reducers"]
    with open_run(out) as run:
        assert run.complete and run.n == 6
    # a checkpoint: the new run replaces the old one (file and checkpoint) and resumes like any run
    with pytest.raises(RuntimeError, match="user dataset bug"):
        record_dataset(loaded, _Failing(6, 5), out, overwrite=True, checkpoint_every=1, num_workers=0, **kw)
    with open_run(out) as run:
        assert not run.complete and run.n == 4 and run.file.attrs["data"] != "samples"
    assert not list(tmp_path.glob("*.creating*"))
    record_dataset(loaded, _Failing(6, -1), out, resume=True, checkpoint_every=1, num_workers=0, **kw)
    with open_run(out) as run:
        assert run.complete and run.n == 6


def test_a_checkpoint_of_another_run_is_never_read_as_this_ones(tmp_path):
    run = tmp_path / "run.h5"
    fmt.write_checkpoint(run, 3, {"r": {"s": np.ones(2)}}, run_id="new")
    assert fmt.read_checkpoint(run, "new")[0] == 3
    assert fmt.read_checkpoint(run, "old") is None and fmt.read_checkpoint(run, None) is None
    fmt.write_checkpoint(run, 2, {"r": {"s": np.ones(2)}})  # no id (older versions, qkhooks repair): taken
    assert fmt.read_checkpoint(run, "any")[0] == 2


@pytest.mark.parametrize("edit", ["shrink", "delete"])
def test_a_resume_refuses_a_run_file_whose_arrays_were_cut_or_removed(tmp_path, edit):
    out = tmp_path / "run.h5"
    record_dataset(tiny_vit(), "samples", out, layers="0", modes=4, batch_size=2, limit=4, reducers=[], progress=False)
    with h5py.File(out, "r+") as f:
        if edit == "shrink":
            f["modes/L0/query"].resize(2, axis=0)
        else:
            del f["modes/L0/query"]
    before = sha(out)
    detail = "modes/L0/query has 2 rows" if edit == "shrink" else "modes/L0/query is missing"
    with pytest.raises(QKHooksError, match=f"damaged \\({detail}, with 4 images committed\\).*qkhooks repair"):
        record_dataset(tiny_vit(), "samples", out, layers="0", modes=4, batch_size=2, limit=4, reducers=[],
                       progress=False, resume=True)
    assert sha(out) == before


def test_a_resume_while_this_process_reads_the_run_says_to_close_the_reader(tmp_path):
    out = tmp_path / "run.h5"
    kw = dict(layers="0", modes=4, batch_size=2, limit=4, reducers=[], progress=False)
    record_dataset(tiny_vit(), "samples", out, **kw)
    with open_run(out) as run:
        with pytest.raises(QKHooksError, match=r"still has it open for reading.*run.close\(\)"):
            record_dataset(tiny_vit(), "samples", out, resume=True, **kw)
        assert run.n == 4
    record_dataset(tiny_vit(), "samples", out, resume=True, **kw)  # closed: the resume goes ahead
