"""Round 40 (MINOR): round 39's open items on run files and their messages.

1. A ``--checksum`` run's attribute digests guard exactly what qkhooks wrote: a user's own attribute (added with
   h5py) is accepted and listed as not sealed; a sealed one changed, missing or renamed is refused as before.
2. A resume that rewrites a static with another value never shows a reader a state its digests refuse.
3. A full disk (a quota, a file size limit) says what the run file holds complete: its reducers' checkpoint.
4. ``/images/skipped`` is written with each checkpoint, so a killed run's file names the images it skipped.
5. A stop (SIGTERM, Ctrl-C) of ``qkhooks bfd`` names the pass that ran, what each of its files holds and what to run.
6. ``merge --copy`` and ``repair`` check the free space again before each large write.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from qkhooks import QKHooksError
from qkhooks.cli import main
from qkhooks.distributed import merge_shards, shard_path
from qkhooks.store import open_run, repair, verify_run
from qkhooks.store import format as fmt

from test_attribute_digests import CONFIG, INFO, sha, stored, write


def annotate(path: Path) -> None:
    """What a researcher does to a run file: a note on the root, one on a group, one on a static dataset."""
    with h5py.File(path, "r+") as f:
        f.attrs["note"] = "pilot"
        f["model"].attrs["reviewed_by"] = "ana"
        f["spectrum/L3/S_all"].attrs["seen"] = np.int64(3)


USER = ["/@note", "/model@reviewed_by", "/spectrum/L3/S_all@seen"]


def test_a_users_own_attribute_is_accepted_and_listed_as_not_sealed(tmp_path, capsys):
    path = tmp_path / "run.h5"
    write(path)
    annotate(path)
    with open_run(path) as run:  # before: "root attribute note not covered by the digests" refused it
        assert run.n == 4 and run.info["layers"] == [3]
    report = verify_run(path)
    assert report.ok, report.problems
    assert report.unsealed == sorted(USER) and fmt.unsealed_attrs(h5py.File(path, "r")) == sorted(USER)
    assert main(["info", str(path), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "unsealed root attribute note: not sealed" in out
    assert "unsealed attribute reviewed_by of /model: not sealed" in out
    assert "damaged" not in out


def test_a_sealed_attribute_changed_missing_or_renamed_is_still_refused_beside_a_users_own(tmp_path):
    path = tmp_path / "run.h5"
    write(path)
    annotate(path)
    with h5py.File(path, "r+") as f:  # a byte of the name "data" flipped, as h5py can do it: "data" -> "dcta"
        value = f.attrs["data"]
        del f.attrs["data"]
        f.attrs["dcta"] = value
    with pytest.raises(QKHooksError, match="root attribute data missing"):
        open_run(path)
    report = verify_run(path)
    assert not report.ok and report.attrs_off == [
        "root attribute data missing (its digest in root attribute attr_digests)"]
    assert "/@dcta" in report.unsealed  # the new name is not vouched for, and is named
    with h5py.File(path, "r+") as f:
        del f.attrs["dcta"]
        f.attrs["data"] = value
        f["model"].attrs["info"] = json.dumps(dict(INFO, layers=[2]))
    with pytest.raises(QKHooksError, match="attribute info of /model changed since it was written"):
        open_run(path)


def test_a_flipped_byte_in_an_attribute_name_on_disk_is_refused(tmp_path):
    """On disk the names sit in the object headers, which HDF5 checksums: the flip never reads as a user's name."""
    path = tmp_path / "run.h5"
    write(path)
    data = bytearray(path.read_bytes())
    at = [k for k in range(len(data)) if data[k:k + 4] == b"data" and data[k - 1:k] != b"@"]
    assert len(at) == 1, "the root attribute's name must be stored once outside the digests' JSON"
    data[at[0] + 1] ^= 0x02
    path.write_bytes(bytes(data))
    with pytest.raises(QKHooksError, match="incorrect metadata checksum"):
        open_run(path)


@pytest.mark.parametrize("where", ["per_image", "shard"])
def test_an_added_attribute_of_a_name_qkhooks_reads_is_still_refused(tmp_path, where):
    path = tmp_path / "run.h5"
    write(path)
    with h5py.File(path, "r+") as f:
        if where == "per_image":  # a spectrum would be read as a per-image array
            f["spectrum/L3/S_all"].attrs["per_image"] = True
        else:
            f["images"].attrs["shard"] = "{}"
    with pytest.raises(QKHooksError, match="not covered by the digests .* qkhooks reads an attribute of that name"):
        open_run(path)
    assert not verify_run(path).ok


def test_resume_merge_and_repair_keep_a_users_attribute_unsealed(tmp_path):
    path = tmp_path / "run.h5"
    write(path)
    annotate(path)
    write(path, mode="resume")
    repair(path, tmp_path / "fixed.h5")
    out = tmp_path / "merged.h5"
    for rank in range(2):
        shard = shard_path(out, rank, 2)
        write(shard, prefix=f"rank{rank}", config=dict(CONFIG, shard=[rank, 2]))
        annotate(shard)
    for copy, merged in ((False, out), (True, tmp_path / "copied.h5")):
        merge_shards(merged, [shard_path(out, r, 2) for r in range(2)], copy=copy)
    for run in (path, tmp_path / "fixed.h5", out, tmp_path / "copied.h5"):
        with h5py.File(run, "r") as f:
            assert f.attrs["note"] == "pilot" and f["model"].attrs["reviewed_by"] == "ana"
            assert stored(run)["/@config"] == sha(f.attrs["config"])
        assert not set(USER[:2]) & set(stored(run)), run  # not vouched for: the user may edit their note
        report = verify_run(run)
        assert report.ok and set(USER[:2]) <= set(report.unsealed), (run, report.problems)
        with h5py.File(run, "r+") as f:
            f.attrs["note"] = "pilot, edited"
        with open_run(run) as opened:
            assert opened.n in (8, 16)


def test_a_reader_opening_while_a_resume_rewrites_a_static_is_not_refused(tmp_path, monkeypatch):
    """The value goes to the file before the digests' final state: a reader opened between the writes (here, right
    after each, flushed as a cache eviction may) reads the old or the new value, never a refusal (before: refused
    right after the value's write)."""
    path = tmp_path / "run.h5"
    write(path)
    seen: list[str] = []
    modify = h5py.AttributeManager.modify

    def modify_then_read(self, name, value):
        modify(self, name, value)
        if name in ("info", fmt.ATTR_DIGESTS):  # after each write of the value or of the digests
            h5py.h5f.flush(self._id)
            try:
                with open_run(path) as run:
                    seen.append(run.info["marker"])
            except QKHooksError as exc:
                seen.append(str(exc))

    monkeypatch.setattr(h5py.AttributeManager, "modify", modify_then_read)
    write(path, mode="resume", info=dict(INFO, marker="r8z"))
    assert seen == ["q7k", "r8z", "r8z"]  # the digests accepting both, the value, the digests of the new value
    monkeypatch.undo()
    assert stored(path)["/model@info"] == sha(json.dumps(dict(INFO, marker="r8z")))  # one digest again
    assert verify_run(path).ok


# ------------------------------------------------------------------------------------------ 3. full disk
def _over_room_from(monkeypatch, first: int, errno_text: str = "errno = 28, error message = 'No space left on device'"):
    from qkhooks.store import writer

    append = writer._PerImage.append

    def fails(self, n, value):
        if n >= first:
            raise RuntimeError(f"Can't write data (file write failed: time = ..., {errno_text})")
        append(self, n, value)

    monkeypatch.setattr(writer._PerImage, "append", fails)
    return append


def test_a_full_disk_says_how_many_images_the_checkpoint_holds_and_how_to_resume(tmp_path, monkeypatch):
    from test_run_file_safety_adversarial import KW, _loaded, _photos
    from qkhooks.store import writer
    from qkhooks.stream import record_dataset

    data, run = _photos(tmp_path / "photos", 12), tmp_path / "run.h5"
    append = _over_room_from(monkeypatch, 6)  # batches of 2, a checkpoint every 2 batches: at 4 images, then 8
    with pytest.raises(QKHooksError) as stopped:
        record_dataset(_loaded(), str(data), run, **KW)
    assert str(stopped.value) == (
        "disk full while writing run.h5: run.h5 holds 4 images complete (its reducers' last checkpoint); the 2 "
        "committed after them are not in that checkpoint and no later image is in the file, so a resume keeps those 4 "
        "and records every image after them (2 of them again). Free space and run the same command with --resume")
    with open_run(run) as opened:  # what the message counts, read back
        assert opened.n == 6 and fmt.read_checkpoint(run, fmt.run_id_of(opened.file))[0] == 4
    monkeypatch.setattr(writer._PerImage, "append", append)
    assert record_dataset(_loaded(), str(data), run, resume=True, **KW).images == 12


def test_a_full_disk_before_the_first_checkpoint_says_none_is_complete(tmp_path, monkeypatch):
    from test_run_file_safety_adversarial import KW, _loaded, _photos
    from qkhooks.stream import record_dataset

    data, run = _photos(tmp_path / "photos", 8), tmp_path / "run.h5"
    _over_room_from(monkeypatch, 2, "errno = 122, error message = 'Disk quota exceeded'")
    with pytest.raises(QKHooksError) as stopped:
        record_dataset(_loaded(), str(data), run, **KW)
    assert str(stopped.value) == (
        "disk quota exceeded while writing run.h5: run.h5 has 2 committed images and no reducer checkpoint yet (one is "
        "written every --checkpoint-every (checkpoint_every) batches, 8 by default), so none is complete: a resume "
        "records them all again. Free space "
        "within your quota (or have it raised) and run the same command with --resume")

# ------------------------------------------------------------------------------------------ 4. skipped images
def test_a_stopped_runs_file_lists_the_images_skipped_up_to_its_checkpoint_and_a_resume_lists_each_once(
        tmp_path, capsys):
    """The run stops after its third batch (as a kill would: the end of record_dataset, which wrote the list, is
    never reached); its file names the image unreadable at opening and the one that failed when reached."""
    from test_run_file_safety_adversarial import KW, _loaded, _photos
    from qkhooks.stream import record_dataset

    data, run = _photos(tmp_path / "photos", 12), tmp_path / "run.h5"
    (data / "img009.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"x" * 50)  # unreadable as the dataset opens
    batches = []

    def stop_at_the_third(batch):
        batches.append(list(batch.ids))
        if len(batches) == 1:  # unreadable by the time the loader reaches it (before the checkpoint at batch 2)
            (data / "img003.png").write_bytes(b"not an image any more")
        if len(batches) == 3:
            raise RuntimeError("stopped")

    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match="stopped"):
        record_dataset(_loaded(), str(data), run, on_batch=stop_at_the_third, **KW)
    with open_run(run) as opened:
        assert opened.ids == ["img000.png", "img001.png", "img002.png", "img004.png", "img005.png"]
        assert [i for i, _ in opened.skipped] == ["img009.png", "img003.png"]  # before: [] until a resume
        assert "cannot identify image file" in dict(opened.skipped)["img003.png"]
    assert main(["info", str(run)]) in (0, 2)
    assert "skipped  2: img009.png, img003.png" in capsys.readouterr().out
    with pytest.warns(UserWarning):
        done = record_dataset(_loaded(), str(data), run, resume=True, **KW)
    with open_run(run) as opened:
        assert opened.n == 10 and opened.complete
        assert sorted(i for i, _ in opened.skipped) == ["img003.png", "img009.png"]  # each once
        assert sorted(opened.skipped) == sorted(done.skipped)


# ------------------------------------------------------------------------------------------ 5. bfd stopped
def _bfd_stopped_at(tmp_path, monkeypatch, where: str):
    """run_bfd on 8 photos, stopped (a KeyboardInterrupt, as SIGTERM's Terminated is) at ``where``; its message."""
    from test_run_file_safety_adversarial import _loaded, _photos
    from qkhooks.analysis import bfd, bfd_reducers
    from qkhooks.errors import RunInterrupted

    data, out = _photos(tmp_path / "photos", 8), tmp_path / "r.h5"
    if where == "between":
        checks = []

        def stop_at_the_second(n):  # the first is before pass 1, the second after it
            checks.append(n)
            if len(checks) == 2:
                raise KeyboardInterrupt

        monkeypatch.setattr(bfd, "refuse_one_image", stop_at_the_second)
    else:
        cls = bfd_reducers.PositionMeans if where == "pass1" else bfd_reducers.BFDEnergies
        update, calls = cls.update, []

        def stop_at_the_third(self, batch):
            calls.append(1)
            if len(calls) == 3:
                raise KeyboardInterrupt
            update(self, batch)

        monkeypatch.setattr(cls, "update", stop_at_the_third)
    kw = dict(batch_size=2, holdout_every=2, progress=False)
    with pytest.raises(KeyboardInterrupt) as stopped:  # not RunInterrupted alone: a plain one would end pytest
        bfd.run_bfd(_loaded(), str(data), out, **kw)
    monkeypatch.undo()
    assert isinstance(stopped.value, RunInterrupted), "a stop with no word of the pass or the files"
    return str(stopped.value), out, lambda: bfd.run_bfd(_loaded(), str(data), out, resume=True, **kw)


@pytest.mark.parametrize("where", ["pass1", "between", "pass2"])
def test_a_bfd_run_stopped_says_which_pass_ran_what_each_file_holds_and_what_to_run(tmp_path, monkeypatch, where):
    message, out, resume = _bfd_stopped_at(tmp_path, monkeypatch, where)
    pass1 = tmp_path / "r.pass1.h5"
    if where == "pass1":
        assert message.startswith(f"BFD stopped during pass 1 of 2 (the position means), recorded into {pass1}: "
                                  f"{pass1} keeps 6 committed images")
        assert "the same command with --resume continues after those 0" in message  # the pass's own words
        assert message.endswith(f"Pass 2 has not touched {out}: the resume runs it once pass 1 is done.")
        assert not out.exists()
    elif where == "between":
        assert message == (f"BFD stopped between pass 1 of 2 (the position means) and pass 2 of 2 (the energies and "
                           f"position probes): pass 1 is complete in {pass1}, and pass 2 has not touched {out}; the "
                           "same command with --resume reads pass 1's means from r.pass1.h5 (recording none of it "
                           "again) and runs pass 2.")
        assert not out.exists()
    else:
        assert message.startswith(f"BFD stopped during pass 2 of 2 (the energies and position probes), recorded into "
                                  f"{out}: {out} keeps 6 committed images")
        assert message.endswith(f"Pass 1 is complete in {pass1}: the resume does not record it again.")
    if where != "pass1":
        with open_run(pass1) as run:  # what the message says of pass 1's file
            assert run.complete and run.n == 8
    assert resume()["images"] == 8  # and what it says to run does finish


def test_sigterm_between_bfds_passes_names_the_pass_in_the_cli(tmp_path, monkeypatch, capsys):
    import signal

    from test_cli_compare_and_folder_refusals import _tiny_hf
    from test_run_file_safety_adversarial import _photos
    from qkhooks.analysis import bfd
    from qkhooks.cli import Terminated

    checks = []

    def terminated(n):
        checks.append(n)
        if len(checks) == 2:  # as the handler sigterm_exits installs raises it, here between the passes
            raise Terminated(signal.SIGTERM)

    monkeypatch.setattr(bfd, "refuse_one_image", terminated)
    out = tmp_path / "r.h5"
    with pytest.warns(UserWarning):
        status = main(["bfd", _tiny_hf(tmp_path / "vit"), str(_photos(tmp_path / "photos", 6)), "--out", str(out),
                       "--holdout-every", "2", "--batch-size", "3"])
    assert status == 128 + signal.SIGTERM
    err = capsys.readouterr().err.splitlines()[-1]  # after the progress bars
    assert err.startswith("qkhooks: stopped by SIGTERM: BFD stopped between pass 1 of 2 (the position means) and "
                          "pass 2 of 2"), err  # before: "qkhooks: stopped by SIGTERM" and nothing else
    assert "the same command with --resume reads pass 1's means" in err


# ------------------------------------------------------------------------------------------ 6. room, re-checked
def _disk_filling_after_the_first_check(monkeypatch) -> list[str]:
    """shutil.disk_usage as on a disk another program fills once the copy has started: 10 GiB free at the first
    check (the one before anything is written), 1 MiB at every later one."""
    import shutil
    import traceback

    real, calls = shutil.disk_usage, []

    def filling(path):
        calls.append(traceback.extract_stack(limit=2)[0].name)
        usage = real(path)
        return type(usage)(usage.total, usage.used, (10 << 30) if len(calls) == 1 else (1 << 20))

    monkeypatch.setattr(shutil, "disk_usage", filling)
    return calls


def test_merge_copy_rechecks_the_room_before_each_write_and_leaves_nothing_half_written(tmp_path, monkeypatch):
    out = tmp_path / "run.h5"
    shards = [shard_path(out, rank, 2) for rank in range(2)]
    for rank, shard in enumerate(shards):
        write(shard, prefix=f"rank{rank}", config=dict(CONFIG, shard=[rank, 2]))
    before = [s.read_bytes() for s in shards]
    calls = _disk_filling_after_the_first_check(monkeypatch)
    with pytest.raises(QKHooksError) as refused:
        merge_shards(out, copy=True)
    assert str(refused.value).startswith(f"merging into {out} stopped before copying more of maps/a: {tmp_path} has "
                                         "1.0 MiB free, and the next write needs 4.0 MiB")
    assert "Nothing was written (run.h5.merging removed; the shards are unchanged)." in str(refused.value)
    assert calls == ["_refuse_no_room", "short_of_room"]  # the second check is the one before the first write
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == sorted(s.name for s in shards)
    assert [s.read_bytes() for s in shards] == before
    monkeypatch.undo()
    merge_shards(out, copy=True)  # room again: the same command merges
    with open_run(out) as run:
        assert run.n == 8


def test_repair_rechecks_the_room_before_each_write_and_leaves_nothing_half_written(tmp_path, monkeypatch):
    run, fixed = tmp_path / "run.h5", tmp_path / "new" / "fixed.h5"
    write(run)
    calls = _disk_filling_after_the_first_check(monkeypatch)
    with pytest.raises(QKHooksError) as refused:
        repair(run, fixed)
    assert str(refused.value) == (
        f"repair stopped before copying more of /maps/a: {fixed.parent} has 1.0 MiB free, and the next write needs "
        "4.0 MiB with HDF5's spare (the disk filled since the repair began: something else writes there); free space "
        f"or give --out on another disk, then repair again. {run} is unchanged and nothing was left at {fixed}.")
    assert calls == ["_refuse_unwritable", "short_of_room"]
    assert not fixed.parent.exists()  # the folder made for it too
    monkeypatch.undo()
    assert len(repair(run, fixed).recovered) == 4
