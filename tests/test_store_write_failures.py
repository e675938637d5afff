"""Round 23 (run-file safety, adversarial): a writer child process meeting the largest file it may write (``ulimit -f``,
RLIMIT_FSIZE: writes fail with EFBIG, as past FAT32's 4 GiB) stops with the images it committed readable and resumable.

Each child writes images whose values say their index, so every read is compared with what was written."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from qkhooks.errors import QKHooksError
from qkhooks.store import open_run, repair
from qkhooks.store.lock import RESERVE_BYTES
from qkhooks.store.writer import RunWriter
from conftest import mount_small_tmpfs

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
WIDTH = 16384  # 64 KiB a float32 image, one image a chunk


def _values(lo: int, hi: int) -> np.ndarray:
    return np.repeat(np.arange(lo, hi, dtype=np.float32)[:, None], WIDTH, 1)


WRITER = textwrap.dedent(
    """
    import resource, sys
    import numpy as np
    from qkhooks import QKHooksError
    from qkhooks.store import writer

    if sys.argv[2] == "unseen":  # the check before a batch sees no limit: HDF5 meets it (a file system's largest file)
        class Unlimited:
            RLIMIT_FSIZE, RLIM_INFINITY = resource.RLIMIT_FSIZE, resource.RLIM_INFINITY

            @staticmethod
            def getrlimit(what):
                return resource.RLIM_INFINITY, resource.RLIM_INFINITY

        writer.resource = Unlimited
    w = writer.RunWriter(sys.argv[1], dtype="float32", chunk_images=1)
    try:
        for i in range(10 ** 6):
            w.write_batch([f"i{i}"], {"v": np.full((1, %d), i, np.float32)})
            w.flush()
    except QKHooksError as exc:
        print(exc)
    w.close(complete=False)
    """ % WIDTH
)


def _write_until_the_limit(tmp_path: Path, how: str) -> tuple[Path, str]:
    out = tmp_path / "run.h5"
    limit = 3 << 20

    def limited() -> None:  # in the child: writes past `limit` bytes fail with EFBIG (Python ignores SIGXFSZ)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    done = subprocess.run([sys.executable, "-c", WRITER, str(out), how], env=ENV, capture_output=True, text=True,
                          timeout=120, preexec_fn=limited)
    assert done.returncode == 0, done.stderr[-2000:]
    return out, done.stdout.strip()


def test_a_file_size_limit_stops_the_run_with_its_committed_images_readable_and_a_resume_finishes_it(tmp_path):
    out, said = _write_until_the_limit(tmp_path, "seen")
    assert said.startswith("file size limit reached while writing run.h5: "), said  # was: writing ... failed: [Errno 27]
    n = int(said.split("run.h5: ")[1].split(" images")[0])
    assert said == (f"file size limit reached while writing run.h5: {n} images are committed and safe; raise the limit "
                    "on file size (`ulimit -f`; where the file system has a largest file, such as FAT32's 4 GiB, write "
                    "the run to another) and run the same command with --resume") and 10 < n < 48
    with open_run(out) as run:  # the file closed whole (before: its end of file lay past the limit, so it did not open)
        assert run.n == n and run.ids == [f"i{i}" for i in range(n)] and not run.complete
        np.testing.assert_array_equal(run.array("v")[:], _values(0, n))
    with RunWriter(out, mode="resume", dtype="float32") as w:  # the limit raised
        w.write_batch([f"i{n}", f"i{n + 1}"], {"v": _values(n, n + 2)})
    with open_run(out) as run:
        assert run.complete and run.ids == [f"i{i}" for i in range(n + 2)]
        np.testing.assert_array_equal(run.array("v")[:], _values(0, n + 2))


def test_a_file_size_limit_met_inside_hdf5_names_the_damage_and_repair_recovers_every_committed_image(tmp_path):
    out, said = _write_until_the_limit(tmp_path, "unseen")
    assert said.startswith("file size limit reached while writing run.h5, and closing it left it truncated at "), said
    n = int(said.split("its ")[1].split(" committed")[0])
    assert said.endswith(f"its {n} committed images are recoverable: raise the limit on file size (`ulimit -f`; where "
                         "the file system has a largest file, such as FAT32's 4 GiB, write the run to another), run "
                         f"`qkhooks repair {out} --out FIXED.h5` and resume that (the same command with --out FIXED.h5 "
                         "--resume)") and n > 10
    report = repair(out, tmp_path / "fixed.h5")
    assert report.recovered == [f"i{i}" for i in range(n)]
    with open_run(tmp_path / "fixed.h5") as run:
        np.testing.assert_array_equal(run.array("v")[:], _values(0, n))


READER = textwrap.dedent(
    """
    import sys
    import numpy as np
    from qkhooks import QKHooksError
    from qkhooks.store import open_run

    run = open_run(sys.argv[1])
    print(run.file.swmr_mode, run.n, flush=True)
    for line in sys.stdin:  # read everything again when told
        try:
            n = run.refresh()
            v = run.array("v")[:]
            print("read", n, run.ids == [f"i{i}" for i in range(n)], bool((v == np.arange(n)[:, None]).all()), flush=True)
        except QKHooksError as exc:
            print("error", exc, flush=True)
    """
)


def test_a_reader_opening_a_new_run_the_moment_it_gets_its_name_follows_the_writer(tmp_path, monkeypatch):
    """The name appears on a file already open for SWMR writing, so a reader opening it then reads it as SWMR and
    follows every batch (before: it found the file closed, read it plainly, and the writer's reopening made every
    later read "changed (a writer resumed or truncated it) since this reader opened it")."""
    out = tmp_path / "run.h5"
    replace, reader = os.replace, []

    def replace_then_open_a_reader(src, dst):  # the reader opens between the rename and the writer's next step
        replace(src, dst)
        if Path(dst) == out and not reader:
            reader.append(subprocess.Popen([sys.executable, "-c", READER, str(out)], env=ENV, text=True,
                                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
            reader.append(reader[0].stdout.readline().strip())

    monkeypatch.setattr(os, "replace", replace_then_open_a_reader)
    try:
        with RunWriter(out, dtype="float32") as w:
            for i in range(0, 6, 2):
                w.write_batch([f"i{i}", f"i{i + 1}"], {"v": np.arange(i, i + 2, dtype=np.float32)[:, None] * [1, 1]})
                w.flush()
                reader[0].stdin.write("\n")
                reader[0].stdin.flush()
                assert reader[0].stdout.readline().strip() == f"read {i + 2} True True"
        assert reader[1] == "True 0"  # opened as SWMR, nothing committed yet
    finally:
        if reader:
            reader[0].stdin.close()
            reader[0].wait(timeout=30)  # its reads of the file and the stdin it waits on end


@pytest.fixture
def read_only_disk(tmp_path):
    """A small tmpfs with a finished run on it, then remounted read-only (root only, as test_store_safety's small_disk)."""
    mnt = tmp_path / "ro"
    mount_small_tmpfs(mnt)
    try:
        with RunWriter(mnt / "run.h5", dtype="float32") as w:
            w.write_batch(["i0", "i1"], {"v": _values(0, 2)})
            w.write_checkpoint({"count": {"n": np.array([2])}})
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)])


def test_a_run_on_a_read_only_file_system_reads_and_a_resume_says_to_copy_it(read_only_disk):
    run_file = read_only_disk / "run.h5"
    with open_run(run_file) as run:
        assert run.ids == ["i0", "i1"] and run.complete
        np.testing.assert_array_equal(run.array("v")[:], _values(0, 2))
    with pytest.raises(QKHooksError) as refused:
        RunWriter(run_file, mode="resume", dtype="float32")
    assert str(refused.value) == (f"cannot resume {run_file}: its file system is read-only (reading it works). Copy it "
                                  "with run.h5.reducers to a writable folder and resume the copy.")
    with pytest.raises(QKHooksError) as refused:
        RunWriter(read_only_disk / "new.h5", dtype="float32")
    assert str(refused.value) == (f"cannot write {read_only_disk / 'new.h5'}: its file system is read-only; choose a "
                                  "writable location.")
    assert sorted(p.name for p in read_only_disk.iterdir()) == ["run.h5", "run.h5.reducers"]


def test_an_exceeded_disk_quota_met_inside_hdf5_says_so_keeps_the_committed_images_and_resumes(tmp_path, monkeypatch):
    """A quota is invisible to the free-space check: HDF5 meets it (its error carries errno 122, EDQUOT). The writer
    gives back the lock file's reserve as for a full disk and says what ran out (before: 'writing ... failed')."""
    from qkhooks.store import writer

    out = tmp_path / "run.h5"
    append = writer._PerImage.append

    def over_quota_from_image_4(self, n, value):
        if n >= 4:
            raise RuntimeError("Can't write data (file write failed: time = ..., errno = 122, error message = 'Disk "
                               "quota exceeded')")
        append(self, n, value)

    monkeypatch.setattr(writer._PerImage, "append", over_quota_from_image_4)
    w = RunWriter(out, dtype="float32")
    with pytest.raises(QKHooksError) as stopped:
        for i in range(0, 8, 2):
            w.write_batch([f"i{i}", f"i{i + 1}"], {"v": _values(i, i + 2)})
            w.flush()
    assert str(stopped.value) == ("disk quota exceeded while writing run.h5: 4 images are committed and safe; free space "
                                  "within your quota (or have it raised) and run the same command with --resume")
    assert os.path.getsize(w._writer_lock.path) < 4096  # the reserve given back for the last flush and close
    w.close(complete=False)
    monkeypatch.setattr(writer._PerImage, "append", append)
    with open_run(out) as run:
        assert run.ids == ["i0", "i1", "i2", "i3"] and not run.complete
        np.testing.assert_array_equal(run.array("v")[:], _values(0, 4))
    with RunWriter(out, mode="resume", dtype="float32") as w:
        w.write_batch(["i4", "i5"], {"v": _values(4, 6)})
    with open_run(out) as run:
        assert run.complete and run.ids == [f"i{i}" for i in range(6)]
        np.testing.assert_array_equal(run.array("v")[:], _values(0, 6))


def test_a_file_size_limit_below_the_lock_files_reserve_names_the_limit_not_free_space(tmp_path):
    """The lock file reserves RESERVE_BYTES before anything is written; under a smaller `ulimit -f` that reservation
    fails with EFBIG, which said "free space first" (no disk was full). Nothing is left behind."""
    out = tmp_path / "run.h5"
    code = ("import sys\nfrom qkhooks import QKHooksError\nfrom qkhooks.store import writer\n"
            "try:\n    writer.RunWriter(sys.argv[1], dtype='float32')\nexcept QKHooksError as exc:\n    print(exc)\n")
    limit = 64 << 10
    assert RESERVE_BYTES > limit
    done = subprocess.run([sys.executable, "-c", code, str(out)], env=ENV, capture_output=True, text=True, timeout=120,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert done.returncode == 0, done.stderr[-2000:]
    said = done.stdout.strip()
    assert said.startswith(f"cannot start writing {out}: ") and "ulimit -f" in said and "free space" not in said, said
    assert sorted(p.name for p in tmp_path.iterdir()) == []
