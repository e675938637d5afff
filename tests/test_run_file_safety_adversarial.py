"""Round 39, review SAFE: run-file safety probed adversarially (kills, full disks, second writers, damage, merges).

Each test here failed on the code before its fix."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from qkhooks.data import ImageConfig
from qkhooks.distributed import merge_shards, shard_path
from qkhooks.errors import QKHooksError
from qkhooks.models.load import LoadedModel
from qkhooks.store import open_run
from qkhooks.stream import record_dataset

CFG = ImageConfig(size=(48, 48), mean=(0.5,) * 3, std=(0.5,) * 3)
KW = dict(modes=4, attention="rows", batch_size=2, progress=False, checkpoint_every=2)


def _loaded(seed: int = 0) -> LoadedModel:
    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=48, patch_size=8, embed_dim=32,
                              depth=2, num_heads=4, num_classes=0).eval()
    return LoadedModel(model=model, spec="tiny", image_config=CFG)


def _photos(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(n)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (40, 56, 3), np.uint8)).save(folder / f"img{i:03d}.png")
    return folder


def _shard(loaded: LoadedModel, data: Path, out: Path, rank: int) -> Path:
    path = shard_path(out, rank, 2)
    record_dataset(loaded, str(data), path, shard=(rank, 2), **KW)
    return path


# ------------------------------------------------------------------------------------------ merge
def test_merge_refuses_shards_of_other_weights_under_one_spec(tmp_path):
    """Two shards whose models share a spec (a Python module, a checkpoint path rewritten) but not their weights
    merged into one run called complete: rank 1's maps of one model beside rank 0's spectra of the other."""
    data, out = _photos(tmp_path / "data", 6), tmp_path / "run.h5"
    _shard(_loaded(0), data, out, 0)
    _shard(_loaded(1), data, out, 1)
    with pytest.raises(QKHooksError, match=r"the model's weights .* differs between .*run\.rank0-of-2\.h5 and "
                                           r".*run\.rank1-of-2\.h5"):
        merge_shards(out)
    assert not out.exists() and not list(tmp_path.glob("*.merging"))


@pytest.mark.parametrize("change", ["grown", "shrunk"])
def test_merge_refuses_shards_cut_from_datasets_of_other_lengths(tmp_path, change):
    """Rank 1 recorded after the folder changed: its block no longer starts where rank 0's ends. The merge dropped
    the images between the blocks (grown) or read a block cut from other indices (shrunk), and called the merged
    run complete."""
    data, out = _photos(tmp_path / "data", 10), tmp_path / "run.h5"
    loaded = _loaded(0)
    _shard(loaded, data, out, 0)  # images 0..4
    if change == "grown":
        for name in ("img100.png", "img101.png"):
            shutil.copy(data / "img000.png", data / name)
    else:
        for name in ("img000.png", "img001.png"):
            (data / name).unlink()
    _shard(loaded, data, out, 1)
    word = "drop" if change == "grown" else "repeat"
    with pytest.raises(QKHooksError, match=rf"rank 0's block \(run\.rank0-of-2\.h5\) ends at image 5.*would {word} "
                                           r"images"):
        merge_shards(out)
    assert not out.exists()


def test_merge_of_one_runs_shards_still_equals_the_single_process_run(tmp_path):
    """The checks above pass the shards of one run (the merged view reads like the single-process run)."""
    data, out = _photos(tmp_path / "data", 7), tmp_path / "run.h5"
    loaded = _loaded(0)
    single = tmp_path / "single.h5"
    record_dataset(loaded, str(data), single, **KW)
    for rank in (0, 1):
        _shard(loaded, data, out, rank)
    merge_shards(out)
    with open_run(out) as merged, open_run(single) as one:
        assert merged.complete and merged.ids == one.ids
        for name in one.arrays():
            np.testing.assert_array_equal(merged.array(name)[:], one.array(name)[:], err_msg=name)


# ------------------------------------------------------------------------------------------ a damaged superblock
def _flipped(path: Path, offset: int, bit: int | None) -> Path:
    """A copy of ``path`` with one bit flipped (None: the highest bit set in that byte, so an address gets smaller)."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << (bit if bit is not None else data[offset].bit_length() - 1)
    damaged = path.with_name(f"{path.stem}_{offset}_{bit}.h5")
    damaged.write_bytes(bytes(data))
    return damaged


@pytest.mark.parametrize("offset, bit, field", [(24, 6, "extension address"), (29, None, "end-of-file address, made smaller"),
                                                (37, 1, "root object header address"),
                                                (41, 6, "root object header address, high byte")])
def test_one_flipped_bit_in_the_superblock_is_reported_and_repair_recovers_every_image(tmp_path, offset, bit, field):
    """A single bit of the 48-byte superblock: the reader raised a raw OverflowError (a defined-looking extension
    address past 2**63, seeked by the repair view that names the damage), and repair re-summed the damaged addresses
    and lost every image (root address), or the last image and the reducer checkpoint (end of file)."""
    from qkhooks.store import repair

    data = _photos(tmp_path / "data", 6)
    run = tmp_path / "run.h5"
    record_dataset(_loaded(), str(data), run, checksum=True, **KW)
    damaged = _flipped(run, offset, bit)
    (damaged.parent / (damaged.name + ".reducers")).write_bytes((tmp_path / "run.h5.reducers").read_bytes())
    with pytest.raises(QKHooksError, match=r"is damaged .*qkhooks repair"):
        with open_run(damaged) as reader:
            reader.array("modes/L1/query")[:]
    fixed = tmp_path / "fixed.h5"
    report = repair(damaged, fixed)
    assert not report.problems, report.problems
    with open_run(fixed) as got, open_run(run) as want:
        assert got.ids == want.ids and got.complete
        for name in want.arrays():
            np.testing.assert_array_equal(got.array(name)[:], want.array(name)[:], err_msg=name)
        assert got.states() == want.states()


# ------------------------------------------------------------------------------------------ a damaged checkpoint
def test_a_damaged_array_header_in_the_reducer_checkpoint_is_reported_never_a_raw_error(tmp_path):
    """A flipped byte in the header of one array inside ``RUN.h5.reducers`` is parsed by numpy before the member's
    CRC is checked: ``run.states()``, ``run.state()`` and ``qkhooks info`` raised a raw tokenize.TokenError
    instead of reporting the damaged checkpoint."""
    from qkhooks.cli import main

    data = _photos(tmp_path / "data", 4)
    run = tmp_path / "run.h5"
    record_dataset(_loaded(), str(data), run, **KW)
    checkpoint = tmp_path / "run.h5.reducers"
    raw = checkpoint.read_bytes()
    with zipfile.ZipFile(checkpoint) as archive:  # the largest array: read in parts, its header before its CRC
        largest = max(archive.infolist(), key=lambda info: info.file_size)
    header = raw.index(b"\x93NUMPY", largest.header_offset)
    at = raw.index(b"}", header)  # one bit: the closing brace becomes DEL, so the header never closes
    checkpoint.write_bytes(raw[:at] + bytes([raw[at] ^ 0x02]) + raw[at + 1:])
    with open_run(run) as reader:
        with pytest.raises(QKHooksError, match=r"reducer checkpoint .*run\.h5\.reducers is damaged"):
            reader.states()
        assert reader.array("modes/L1/query")[:].shape[0] == 4  # the arrays still read
    assert main(["info", str(run)]) == 2


def test_verify_does_not_call_a_run_intact_whose_checkpoint_names_another_run(tmp_path):
    """``RUN.h5.reducers`` of another run beside a run (copied along by mistake, or this file's ``run_id`` changed by
    one flipped bit: attributes carry no checksum): its states are not read (info says so), but ``info --verify``
    said "every part read" with "reducers no saved state"."""
    from qkhooks.store import verify_run

    data = _photos(tmp_path / "data", 4)
    run, other = tmp_path / "run.h5", tmp_path / "other.h5"
    for path in (run, other):
        record_dataset(_loaded(), str(data), path, **KW)
    assert verify_run(run).ok
    shutil.copy(tmp_path / "other.h5.reducers", tmp_path / "run.h5.reducers")
    report = verify_run(run)
    assert not report.ok and not report.states
    assert any("run.h5.reducers belongs to another run" in p for p in report.problems), report.problems


# ------------------------------------------------------------------------------------------ merge without room
def test_merge_refuses_before_writing_a_copy_that_cannot_fit(tmp_path):
    """``merge --copy`` past the largest file this process may write (a full disk alike) failed inside HDF5, which
    then died closing the file (a segfault on a full tmpfs): no message, ``RUN.h5.merging`` left filling the disk, and
    under torchrun the other ranks left waiting for rank 0. Now refused before anything is written."""
    import os
    import resource
    import signal
    import subprocess
    import sys

    data, out = _photos(tmp_path / "data", 8), tmp_path / "run.h5"
    loaded = _loaded(0)
    for rank in (0, 1):
        record_dataset(loaded, str(data), shard_path(out, rank, 2), shard=(rank, 2),
                       **dict(KW, attention="full", dtype="float32"))
    limit = sum(shard_path(out, r, 2).stat().st_size for r in (0, 1)) // 2  # below the copy's size (~0.8 of theirs)

    def small_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    root = Path(__file__).parents[1]
    done = subprocess.run([sys.executable, "-m", "qkhooks", "merge", str(out), "--copy"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(root)}, preexec_fn=small_files, timeout=120)
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert "more than the largest file this process may write" in done.stderr and "Nothing was written" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("run.h5")) == []


# ------------------------------------------------------------------------------------------ repair without room
def test_repair_refuses_a_copy_past_ulimit_f_before_writing(tmp_path):
    """Repair checked the disk's free space but not the largest file the process may write: past ``ulimit -f`` HDF5
    failed, the message said nothing was left, then the process died (a segfault closing the file) with the copy's
    reducer checkpoint left behind."""
    import os
    import resource
    import signal
    import subprocess
    import sys

    data, run = _photos(tmp_path / "data", 6), tmp_path / "run.h5"
    record_dataset(_loaded(), str(data), run, **dict(KW, attention="full", dtype="float32"))
    limit = run.stat().st_size // 2

    def small_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    done = subprocess.run([sys.executable, "-m", "qkhooks", "repair", str(run), "--out", str(tmp_path / "fixed.h5")],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
                          preexec_fn=small_files, timeout=120)
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert "largest file this process may write" in done.stderr and "Nothing was written" in done.stderr
    assert not list(tmp_path.glob("fixed*"))


def test_a_repair_that_fails_late_leaves_no_checkpoint_of_its_copy(tmp_path, monkeypatch):
    """A repair that failed after writing the copy's reducer checkpoint (``FIXED.h5.reducers``, tied to the run id the
    copy keeps) said nothing was left at FIXED.h5, and left that checkpoint beside the missing copy."""
    import os

    from qkhooks.store import repair

    data, run = _photos(tmp_path / "data", 4), tmp_path / "run.h5"
    record_dataset(_loaded(), str(data), run, **KW)
    replace = os.replace

    def failing(src, dst, *args, **kwargs):
        if str(src).endswith("fixed.h5.creating"):
            raise OSError(28, "No space left on device")
        return replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(QKHooksError, match="nothing was left at"):
        repair(run, tmp_path / "fixed.h5")
    assert not list(tmp_path.glob("fixed*"))


def test_merge_refuses_a_finished_shard_copied_without_its_reducer_checkpoint(tmp_path):
    """Shards copied from nodes by hand, one without its ``.reducers``: the merge left that shard's images out and
    told the user to resume shards that were finished ("some shards are not finished"), where the fix is to copy the
    checkpoint."""
    data, out = _photos(tmp_path / "data", 6), tmp_path / "run.h5"
    loaded = _loaded(0)
    for rank in (0, 1):
        _shard(loaded, data, out, rank)
    checkpoint = tmp_path / "run.rank1-of-2.h5.reducers"
    saved = checkpoint.read_bytes()
    checkpoint.unlink()
    with pytest.raises(QKHooksError, match=r"run\.rank1-of-2\.h5 is a finished shard of 3 images, but its reducer "
                                           r"checkpoint run\.rank1-of-2\.h5\.reducers is missing"):
        merge_shards(out)
    assert not out.exists()
    checkpoint.write_bytes((tmp_path / "run.rank0-of-2.h5.reducers").read_bytes())  # rank 0's, beside rank 1
    with pytest.raises(QKHooksError, match=r"run\.rank1-of-2\.h5\.reducers belongs to another run"):
        merge_shards(out)
    checkpoint.write_bytes(saved)
    merge_shards(out)
    with open_run(out) as merged:
        assert merged.complete and merged.n == 6


def test_merge_overwrite_replaces_only_a_run(tmp_path):
    """``merge --overwrite`` into a file that is no run (a photo, another program's HDF5 file) replaced it, where
    ``record --overwrite`` refuses: one mistyped name lost the user's file."""
    data, out = _photos(tmp_path / "data", 4), tmp_path / "run.h5"
    loaded = _loaded(0)
    for rank in (0, 1):
        _shard(loaded, data, out, rank)
    shards = [shard_path(out, rank, 2) for rank in (0, 1)]
    photo = tmp_path / "photo.h5"
    photo.write_bytes((data / "img000.png").read_bytes())
    kept = photo.read_bytes()
    with pytest.raises(QKHooksError, match=r"photo\.h5 is not a qkhooks run \(not HDF5 at all\)"):
        merge_shards(photo, shards, overwrite=True)
    assert photo.read_bytes() == kept
    merge_shards(out, overwrite=True)  # a run, or nothing yet, is replaced as before
    merge_shards(out, overwrite=True)
    with open_run(out) as merged:
        assert merged.complete and merged.n == 4


# ------------------------------------------------------------------------------------------ never hang
@pytest.mark.skipif(not hasattr(__import__("os"), "mkfifo"), reason="needs FIFOs")
@pytest.mark.parametrize("what", ["repair", "merge"])
def test_repair_and_merge_refuse_a_fifo_instead_of_waiting_forever(tmp_path, what):
    """``qkhooks repair FIFO`` and a merge whose shard is a FIFO (a symlink to one) opened it and waited for a writer
    forever; ``info``, ``--verify`` and ``merge --overwrite`` into one already refused it."""
    import os
    import subprocess
    import sys

    fifo = tmp_path / "fifo.h5"
    os.mkfifo(fifo)
    if what == "repair":
        argv = ["repair", str(fifo), "--out", str(tmp_path / "fixed.h5")]
    else:
        data, out = _photos(tmp_path / "data", 4), tmp_path / "run.h5"
        _shard(_loaded(), data, out, 0)
        (tmp_path / "run.rank1-of-2.h5").symlink_to(fifo)
        argv = ["merge", str(out)]
    done = subprocess.run([sys.executable, "-m", "qkhooks", *argv], capture_output=True, text=True, timeout=30,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})  # a hang fails here
    assert done.returncode == 2 and "not a regular file" in done.stderr, done.stderr[-1000:]
