"""Round 21 (store and reading API): image selections read as HDF5 slices wherever they are one, a resume of a file
whose per-image arrays differ in layout, the lock refusal told by its errno, unknown module paths answered with the
closest ones."""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
import timm
import torch

from conftest import noise_photos
import qkhooks
from qkhooks.access import CLOSEST_PATHS
from qkhooks.analysis.modes import analyze_modes
from qkhooks.errors import QKHooksError
from qkhooks.store import RunWriter, open_run
from qkhooks.store import format as fmt
from qkhooks.store import reader
from qkhooks.store._hdf5 import LOCK_REFUSED, open_swmr_writer
from qkhooks.store.reader import RunArray, RunReader
from qkhooks.stream import record_dataset
from conftest import KeyLog

N = 9  # committed images; the dataset holds two more, uncommitted, which no read may show


@pytest.fixture(params=[(1, None), (4, None), (1, 2 * 96)], ids=["chunk1", "chunk4", "span2"])
def stored(request, tmp_path, monkeypatch):
    """A (N + 2, 3, 4, 2) float32 array (96 bytes an image) in an HDF5 file, chunked by 1 or 4 images (a read
    then spans images not asked for), or with reads cut every 2 images; and the first N rows read whole."""
    chunk, span_bytes = request.param
    if span_bytes:
        monkeypatch.setattr(reader, "SPAN_BYTES", span_bytes)
    values = np.random.default_rng(0).normal(size=(N + 2, 3, 4, 2)).astype(np.float32)
    with h5py.File(tmp_path / "a.h5", "w") as f:
        f.create_dataset("a", data=values, chunks=(chunk, 3, 4, 2), maxshape=(None, 3, 4, 2))
    with h5py.File(tmp_path / "a.h5", "r") as f:
        yield f["a"], values[:N]


def image_keys(rng: np.random.Generator) -> list:
    """Keys of the image axis: slices of every sign of step with starts and stops out of range, evenly stepped index
    arrays in every order, uneven ones, repeats, single images, empty picks, masks."""
    ends = [None, *range(-N - 3, N + 4)]
    keys: list = [slice(None, None, -1), slice(10, 2, -2), slice(2, 10, -2), slice(-1, -N - 5, -3), slice(N + 4, None, -1),
                  [], np.array([], np.int64), [4], [-1], [4, 2, 0], [0, 2, 4], [8, 5, 2], [1, 2, 3, 4],
                  [3, 3], [0, 4, 2, 4], [0, 1, 5], np.arange(N), np.arange(N)[::-1], np.array([-1, -3, -5]),
                  np.array([2, 5, 8], np.uint32), np.arange(N) % 3 == 0, np.zeros(N, bool)]
    for _ in range(60):
        keys.append(slice(rng.choice(ends), rng.choice(ends), rng.choice([None, 1, 2, 3, 5, -1, -2, -4])))
    for _ in range(40):
        start, step = int(rng.integers(0, N)), int(rng.choice([1, 2, 3, -1, -2]))
        stepped = np.arange(start, -1 if step < 0 else N, step)[: int(rng.integers(0, 5))]
        keys.append(rng.permutation(stepped) if rng.random() < 0.3 else stepped)
    return keys


REST = [(), (1,), (-1, 2), (slice(None), slice(1, None)), (slice(None, None, -1),), (slice(None), [3, 1]),
        (0, slice(None), [1, 1]), ([2, 0],), (Ellipsis, 1), (slice(None), slice(None, None, -2), 0)]


def test_every_image_selection_is_numpys_answer_on_the_array_read_whole(stored):
    """Property-style: each image key, alone and with keys on the other axes (HDF5's own and numpy's), gives exactly
    numpy's answer on the committed rows read whole, never an uncommitted row."""
    dataset, whole = stored
    array = RunArray(dataset, N)
    checked = 0
    for first in image_keys(np.random.default_rng(1)):
        for rest in REST:
            key = (first, *rest)
            try:
                want = whole[key]
            except IndexError:  # shapes numpy itself cannot broadcast
                continue
            got = array[key]
            assert got.shape == want.shape and np.array_equal(got, want), key
            checked += 1
    assert checked > 1000


@pytest.mark.parametrize("first", [slice(None, None, -1), slice(10, 2, -2), slice(-2, None, -3), slice(None, None, 2),
                                   [6, 4, 2, 0], [0, 3, 6], [5, 5, 6, 7], [7, 0, 1, 7], np.arange(N) % 2 == 1])
@pytest.mark.parametrize("rest", [(), (1, slice(None, None, -1), 1)])
def test_picked_images_are_read_as_contiguous_slices_not_a_strided_or_listed_selection(stored, first, rest):
    """A backward slice, a stepped one or a list of images reach HDF5 as contiguous forward slices, never as a strided
    or listed selection (which HDF5 reads row by row, 10-50x slower); the answer is still numpy's."""
    dataset, whole = stored
    log = KeyLog(dataset)
    got = RunArray(log, N)[(first, *rest)]
    assert np.array_equal(got, whole[(first, *rest)])
    assert log.keys and all(isinstance(k[0], slice) and k[0].step in (None, 1) for k in log.keys), log.keys


def test_a_read_spanning_images_not_asked_for_is_bounded(tmp_path, monkeypatch):
    """Images within a chunk of each other are read together with those between, at most SPAN_BYTES at a time (here
    4 images); images a chunk or more apart are read apart; a contiguous run is read whole."""
    monkeypatch.setattr(reader, "SPAN_BYTES", 2 * 96)
    values = np.random.default_rng(0).normal(size=(20, 3, 4, 2)).astype(np.float32)
    with h5py.File(tmp_path / "a.h5", "w") as f:
        f.create_dataset("a", data=values, chunks=(4, 3, 4, 2), maxshape=(None, 3, 4, 2))
    with h5py.File(tmp_path / "a.h5", "r") as f:
        log = KeyLog(f["a"])
        for key, reads in [(slice(None, None, 2), [(0, 3), (4, 7), (8, 11), (12, 15), (16, 19)]),
                           ([19, 1, 2, 9, 14], [(1, 3), (9, 10), (14, 15), (19, 20)]), (slice(17, 1, -1), [(2, 18)])]:
            log.keys.clear()
            assert np.array_equal(RunArray(log, 20)[key], values[key])
            assert [(k[0].start, k[0].stop) for k in log.keys] == reads, key


def tiny_vit() -> qkhooks.LoadedModel:
    torch.manual_seed(0)
    return qkhooks.load_model(timm.create_model("vit_small_patch16_224", pretrained=False, patch_size=32,
                                                embed_dim=32, depth=1, num_heads=2).eval())


def record(out: Path, **kw) -> None:
    record_dataset(tiny_vit(), "samples", out, modes=2, layers="0", limit=5, batch_size=2, progress=False,
                   reducers=[], **kw)


def test_a_resume_of_a_file_whose_arrays_differ_in_layout_keeps_each_and_names_them(tmp_path):
    """A run stopped after its first batch, one of its arrays then rewritten by h5py with gzip and a checksum: the
    resume warns naming each layout's arrays (not one layout picked for all), and each array keeps its own layout
    while the images go on as in a run never stopped."""
    record(tmp_path / "whole.h5")

    def stop(batch) -> None:
        raise KeyboardInterrupt  # killed after its first batch

    path = tmp_path / "run.h5"
    with pytest.raises(KeyboardInterrupt):
        record(path, on_batch=stop)
    changed = "modes/L0/query"
    with h5py.File(path, "r+") as f:
        old = f[changed]
        values, attrs, chunks = old[()], dict(old.attrs), old.chunks
        del f[changed]
        new = f.create_dataset(changed, data=values, maxshape=(None,) + values.shape[1:], chunks=chunks,
                               compression="gzip", fletcher32=True)
        new.attrs.update(attrs)
        others = sorted(n for n in fmt.per_image_datasets(f) if n != changed)
    assert others
    with pytest.warns(UserWarning, match="differ in layout") as caught:
        record(path, resume=True)
    said = " ".join(str(w.message) for w in caught)
    assert f"compression gzip, a Fletcher-32 checksum: {changed}" in said
    assert f"compression none, no checksum: {', '.join(others)}" in said
    with h5py.File(path, "r") as f, h5py.File(tmp_path / "whole.h5", "r") as whole:
        assert f[changed].compression == "gzip" and f[changed].fletcher32
        for name in others:
            assert f[name].compression is None and not f[name].fletcher32, name
        for name in [changed, *others]:
            assert f[name].shape[0] == 5 and np.array_equal(f[name][:5], whole[name][:5]), name


def test_a_refused_hdf5_lock_is_told_by_its_errno(held_run):
    held = held_run
    """The signal the writer's retry reads: h5py's OSError for HDF5's refused flock carries errno EAGAIN."""
    fapl = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
    fapl.set_libver_bounds(h5py.h5f.LIBVER_LATEST, h5py.h5f.LIBVER_LATEST)
    with pytest.raises(OSError) as caught:
        h5py.h5f.open(os.fsencode(held), h5py.h5f.ACC_RDWR | h5py.h5f.ACC_SWMR_WRITE, fapl=fapl)
    assert caught.value.errno == errno.EAGAIN and isinstance(caught.value, BlockingIOError)
    assert errno.EAGAIN in LOCK_REFUSED


def open_failing_with_lock(monkeypatch, error: OSError) -> list[bool]:
    """h5py.h5f.open raising ``error`` wherever HDF5's file lock is asked for; returns the lock flag of each call."""
    real, calls = h5py.h5f.open, []

    def fake(name, flags, fapl):
        calls.append(bool(fapl.get_file_locking()[0]))
        if calls[-1]:
            raise error
        return real(name, flags, fapl=fapl)

    monkeypatch.setattr(h5py.h5f, "open", fake)
    return calls


def test_the_writer_opens_without_the_lock_where_its_errno_says_refused_whatever_the_words(held_run, monkeypatch):
    held = held_run
    """A lock refused in other words (another HDF5's wording) is still retried without the lock: the errno decides;
    an open that fails for another reason (here EIO, though its text mentions a lock) is raised as it is."""
    calls = open_failing_with_lock(monkeypatch, BlockingIOError(errno.EAGAIN, "Unable to open file (flock refused)"))
    f = open_swmr_writer(held, 1 << 20)
    try:
        assert calls == [True, False] and f.swmr_mode and f["v"].shape == (2, 4)
    finally:
        f.close()
    calls = open_failing_with_lock(monkeypatch, OSError(errno.EIO, "Unable to open file (unable to lock file, I/O)"))
    with pytest.raises(OSError) as caught:
        open_swmr_writer(held, 1 << 20)
    assert caught.value.errno == errno.EIO and calls == [True]


@pytest.fixture(scope="module")
def deep_run(tmp_path_factory):
    """A 40-block model and its run file: more attention modules than a refusal should list."""
    torch.manual_seed(0)
    model = qkhooks.load_model(timm.create_model("vit_small_patch16_224", pretrained=False, patch_size=32,
                                                 embed_dim=16, depth=40, num_heads=2).eval())
    out = tmp_path_factory.mktemp("deep") / "run.h5"
    record_dataset(model, "samples", out, modes=1, limit=1, batch_size=1, reducers=[], progress=False)
    return model, out


def quoted_paths(message: str) -> list[str]:
    return re.findall(r"'(blocks\.\d+\.attn)' \(layer (\d+)\)", message)


def test_an_unknown_module_path_of_a_deep_run_names_the_closest_and_how_to_list_all(deep_run):
    """Of a run's 40 modules the refusal names the closest few (each with its layer), the count and `module_paths`,
    not all 40; the right path still reads the layer it names."""
    _, path = deep_run
    with open_run(path) as run:
        assert len(run.module_paths) == 40
        with pytest.raises(QKHooksError) as caught:
            run.query("blocks.37.atn")
        message = str(caught.value)
        named = quoted_paths(message)
        assert ("blocks.37.attn", "37") in named and len(named) == CLOSEST_PATHS
        assert all(run.module_paths[int(layer)] == p for p, layer in named)
        assert "40 attention modules" in message and "`.module_paths`" in message
        assert np.array_equal(run.query("blocks.37.attn")[:], run.query(37)[:])


def test_an_unknown_module_path_in_a_layer_selection_names_the_closest_and_qkhooks_sites(deep_run):
    model, _ = deep_run
    with pytest.raises(QKHooksError) as caught:
        qkhooks.record(model.model, modes=1, layers="blocks.12.attn.qkv")
    message = str(caught.value)
    named = quoted_paths(message)
    assert ("blocks.12.attn", "12") in named and len(named) == CLOSEST_PATHS
    assert "qkhooks.sites(model)" in message and "40 attention modules" in message
    with qkhooks.record(model.model, modes=1, layers="blocks.12.attn") as live:
        assert live.layers == [12] and live.module_paths == {12: "blocks.12.attn"}


def test_the_modes_analysis_opens_its_run_once_and_still_checks_the_photos_against_the_recorded_sizes(tmp_path,
                                                                                                      monkeypatch):
    """analyze_modes reads everything it needs from the run, the drawn images' recorded file sizes included, in one
    open (RunReader.__init__ counted); those sizes still decide whether the photos drawn are the files recorded."""
    imgs = tmp_path / "imgs"
    noise_photos(imgs, [f"im{i}.png" for i in range(4)], size=(40, 40))
    record_dataset(tiny_vit(), str(imgs), tmp_path / "run.h5", modes=2, layers="0", batch_size=2, progress=False)
    opens = []
    real = RunReader.__init__

    def counted(self, path):
        opens.append(path)
        real(self, path)

    monkeypatch.setattr(RunReader, "__init__", counted)
    summary = analyze_modes(tmp_path / "run.h5", tmp_path / "out", figure_modes=1, overview=False)
    assert len(opens) == 1 and summary["photos"].startswith("photos from")
    for name in sorted(p.name for p in imgs.iterdir()):  # same names, other sizes: not the files recorded
        noise_photos(imgs, [name], size=(48, 40), seed=1)
    summary = analyze_modes(tmp_path / "run.h5", tmp_path / "out2", figure_modes=1, overview=False)
    assert len(opens) == 2 and "not the files this run recorded" in summary["photos"]
