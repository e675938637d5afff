"""Round 39's fixes of the recording core and of the run file's resume checks (helper FIXB): a spectrum edited
inside an open record(), DataParallel's replicas, and a same-size image replaced before a resume. Each test was seen
to fail on the code before its fix; the numbers are compared with a dense float64 SVD of W_q_hᵀW_k_h per head
(numpy) applied to the tokens entering the layer."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

import qkhooks
from qkhooks.errors import QKHooksError
from test_capture_changes_inside_record import _images, _timm
from test_capture_shared_qkv_threads_copies import _tokens


def _dense_modes(attn: torch.nn.Module, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(U (H, d, k), S (H, k), V (H, d, k)) of W_q_hᵀW_k_h per head from numpy's dense float64 SVD, each u_n's largest
    |entry| positive and v_n's sign following it."""
    w = attn.qkv.weight.detach().double().numpy()
    heads = attn.num_heads
    dk = w.shape[0] // 3 // heads
    us, ss, vs = [], [], []
    for h in range(heads):
        u, s, vt = np.linalg.svd(w[h * dk:(h + 1) * dk].T @ w[heads * dk + h * dk:heads * dk + (h + 1) * dk])
        u, v = u[:, :k], vt[:k].T
        sign = np.sign(u[np.abs(u).argmax(0), np.arange(k)])
        us.append(u * sign), ss.append(s[:k]), vs.append(v * sign)
    return np.stack(us), np.stack(ss), np.stack(vs)


def _rel(a, b: np.ndarray) -> float:
    a = np.asarray(a.detach().float() if isinstance(a, torch.Tensor) else a, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def _edit(spec) -> None:
    """What a caller does to a spectrum for a plot: sigma normalised in place, a sign flipped."""
    spec.S.div_(spec.S.max())
    spec.U.neg_()
    spec.V.mul_(2)


# ------------------------------------------------------------- 1. a spectrum edited inside an open record()
def test_a_spectrum_edited_inside_an_open_record_changes_nothing_it_reports_or_projects_with():
    """Before: ``run.spectrum(l)`` was a view of the spectrum cache's arrays, which ``qkhooks.spectrum(model)`` hands
    out too, so S.div_ there made the recording report the edited S (off by 0.84), and a batch under autocast (its
    x path, built at that batch from the recording's spectrum) gave maps off by 2.0 (U's sign flipped)."""
    model, x = _timm(), _images()
    U, S, V = _dense_modes(model.blocks[0].attn, 4)
    queries = np.einsum("bnd,hdk->bhkn", _tokens(model, x)[0], U)
    with torch.no_grad(), qkhooks.record(model, modes=4) as run:
        model(x)
        _edit(qkhooks.spectrum(model)[0])  # the cache's own arrays
        _edit(run.spectrum(0))  # the recording's, handed out
        _edit(run.last.spectrum(0))
        model(x)
        batch = run.last
        for spec in (run.spectrum(0), batch.spectrum(0), run.qk_spectrum[0]):
            assert _rel(spec.S, S) < 1e-6 and _rel(spec.U, U) < 1e-5 and _rel(spec.V, V) < 1e-5
        assert _rel(run.query(0), queries) < 1e-5
        with torch.autocast("cpu", dtype=torch.bfloat16):  # q/k below float32: this batch's maps come from x
            model(x)
        assert run.mode_source[0] == "x"
        assert _rel(run.query(0), queries) < 2e-2
    # the next recording's spectrum is the weights' again too
    with torch.no_grad(), qkhooks.record(model, modes=4) as again:
        assert _rel(again.spectrum(0).S, S) < 1e-6 and _rel(again.spectrum(0).U, U) < 1e-5


def test_a_spectrum_given_and_edited_inside_the_record_changes_nothing_it_reports():
    """Before: ``record(model, spectrum=given)`` kept the given arrays themselves; editing them after entry changed
    ``run.spectrum(l)`` (and would the statics of a run file written from it)."""
    model, x = _timm(), _images()
    U, S, V = _dense_modes(model.blocks[1].attn, 16)
    given = qkhooks.spectrum(model)
    with torch.no_grad(), qkhooks.record(model, modes="all", spectrum=given) as run:
        _edit(given[1])
        model(x)
        assert _rel(run.spectrum(1).S, S) < 1e-6 and _rel(run.spectrum(1).U, U) < 1e-5
        assert _rel(run.spectrum(1).V, V) < 1e-5


def _edited_as_it_is_written(monkeypatch, name: str, spec) -> None:
    """The caller edits ``spec`` (:func:`_edit`) just before the writer thread writes the static ``name`` (a callback
    or another thread while the writer is behind), so what is stored is what the queued array holds by then."""
    from qkhooks.store.writer import RunWriter

    do_static = RunWriter._do_static

    def late(self, static, value):
        if static == name:
            _edit(spec)
        return do_static(self, static, value)

    monkeypatch.setattr(RunWriter, "_do_static", late)


def test_record_dataset_stores_the_spectrum_of_its_maps_when_the_caller_edits_it_meanwhile(tmp_path, monkeypatch):
    """Before: the statics were queued as views of the spectrum cache's arrays (qkhooks.spectrum(model) hands out the
    same), and an edit made before the writer thread reached them was stored: S off by 0.84, U's sign flipped."""
    from qkhooks.data.preprocess import ImageConfig
    from qkhooks.models.load import load_model
    from qkhooks.stream import record_dataset

    model = _timm()
    _edited_as_it_is_written(monkeypatch, "spectrum/L0/S", qkhooks.spectrum(model)[0])
    tokens: list[np.ndarray] = []

    def on_batch(batch):
        if not tokens:
            _edit(batch.spectrum(0))
        tokens.append(batch.inputs(0).double().numpy().copy())

    config = ImageConfig(size=(16, 16), mean=(0.5,) * 3, std=(0.5,) * 3)
    out = tmp_path / "run.h5"
    record_dataset(load_model(model, image_config=config), "samples", out, limit=4, batch_size=2, progress=False,
                   dtype="float32", modes="all", reducers=[], keep_inputs=True, on_batch=on_batch)
    U, S, V = _dense_modes(model.blocks[0].attn, 16)
    with qkhooks.open_run(out) as run:
        arrays = run.spectrum_arrays(0)
        assert _rel(arrays["S"], S) < 1e-6 and _rel(arrays["S_all"], S) < 1e-6
        assert _rel(arrays["U"], U) < 1e-5 and _rel(arrays["V"], V) < 1e-5
        queries = np.einsum("bnd,hdk->bhkn", np.concatenate(tokens), U)
        assert _rel(run.array("modes/L0/query")[:], queries) < 1e-5


def test_a_static_written_from_ones_own_loop_is_the_array_as_it_was_handed_over(tmp_path, monkeypatch):
    """Before: RunWriter.write_static queued the caller's array itself, so an edit before the writer thread reached
    it was stored (a run file written with WriterSink from one's own loop, its spectrum written by hand)."""
    from qkhooks.store.writer import RunWriter
    from qkhooks.stream import WriterSink

    model, x = _timm(), _images()
    U, S, V = _dense_modes(model.blocks[0].attn, 4)
    path = tmp_path / "run.h5"
    with RunWriter(path, attrs={"model": "vit", "config": "{}"}, dtype="float32") as writer:
        with torch.no_grad(), qkhooks.record(model, modes=4, sinks=[WriterSink(writer)]) as run:
            handed = run.spectrum(0)
            _edited_as_it_is_written(monkeypatch, "mine/S", handed)
            writer.write_static("mine/S", handed.S)
            writer.write_static("mine/U", handed.U.numpy())
            writer.flush()  # the edit (in the writer thread) done before the batch reads the recording's spectrum
            model(x)
    with qkhooks.open_run(path) as stored:
        assert _rel(stored.file["mine/S"][()], S) < 1e-6 and _rel(stored.file["mine/U"][()], U) < 1e-5
    assert _rel(run.spectrum(0).S, S) < 1e-6 and _rel(run.spectrum(0).U, U) < 1e-5


# ------------------------------------------------------------- 2. DataParallel's replicas
def _cpu_replicate(monkeypatch):
    """``torch.nn.parallel.replicate`` itself (the module copies DataParallel runs on each GPU at every forward), its
    broadcast of the weights to GPUs replaced by CPU copies: this machine has no GPU."""
    import importlib

    replicate = importlib.import_module("torch.nn.parallel.replicate")
    monkeypatch.setattr(replicate, "_broadcast_coalesced_reshape",
                        lambda tensors, devices, detach=False: [[t.detach().clone() for t in tensors] for _ in devices])
    return replicate.replicate


def test_a_dataparallel_replica_is_refused_naming_dataparallel_and_the_fix_and_the_model_still_records(monkeypatch):
    """Before: a replica's call (DataParallel over two GPUs) was refused as "a copy of the recorded model made inside
    record() (copy.deepcopy, copy.copy)", which names none of what the caller did nor the fix."""
    replicate = _cpu_replicate(monkeypatch)
    model, x = _timm(), _images()
    U, _, _ = _dense_modes(model.blocks[0].attn, 4)
    queries = np.einsum("bnd,hdk->bhkn", _tokens(model, x)[0], U)
    refusals: list[BaseException] = []

    def in_a_thread(replica):  # as DataParallel's parallel_apply runs each replica
        try:
            replica(x)
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            refusals.append(exc)

    with torch.no_grad(), qkhooks.record(model, modes=4) as run:
        replicas = replicate(model, [0, 1])
        with pytest.raises(QKHooksError, match=r"a replica of the recorded model made by torch\.nn\.DataParallel.*"
                                               r"qkhooks\.record\(dp\.module\).*torchrun.*DistributedDataParallel"):
            replicas[0](x)
        thread = threading.Thread(target=in_a_thread, args=(replicas[1],))
        thread.start()
        thread.join()
        assert len(refusals) == 1 and "torch.nn.DataParallel" in str(refusals[0])
        assert isinstance(refusals[0], QKHooksError)
        model(x)
        assert run.images_seen == 2 and _rel(run.query(0), queries) < 1e-5


def test_the_module_inside_a_dataparallel_on_one_device_or_none_records_through_the_wrapper():
    """The fix the refusal names: record ``dp.module``; DataParallel on one device (or none, as on this machine) calls
    the module itself, so ``dp(x)`` is recorded (the wrapper itself is refused by the adapters, naming dp.module)."""
    model, x = _timm(), _images()
    U, _, _ = _dense_modes(model.blocks[0].attn, 4)
    queries = np.einsum("bnd,hdk->bhkn", _tokens(model, x)[0], U)
    dp = torch.nn.DataParallel(model)
    assert len(dp.device_ids) <= 1  # no replicas here (a GPU machine with two would replicate: refused above)
    with pytest.raises(QKHooksError, match=r"DataParallel wraps a model qkhooks knows: record model\.module"):
        qkhooks.record(dp, modes=4)
    with torch.no_grad(), qkhooks.record(dp.module, modes=4) as run:
        dp(x)
    assert _rel(run.query(0), queries) < 1e-5


# ------------------------------------------------------------- 3. a same-size image replaced before a resume
def _same_size_photos(folder, names, seed: int) -> None:
    """16x16 noise photos stored as uncompressed PNG: every one has the same file size, whatever its pixels."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(exist_ok=True)
    for name in names:
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / name, compress_level=0)


def _tiny_loaded():
    from qkhooks.data.preprocess import ImageConfig
    from qkhooks.models.load import load_model

    return load_model(_timm(), image_config=ImageConfig(size=(16, 16), mean=(0.5,) * 3, std=(0.5,) * 3))


def test_a_resume_over_an_image_replaced_by_another_of_the_same_file_size_is_refused_naming_it(tmp_path):
    """Before: only the kept files' sizes were compared, so a photo replaced by another of the same pixel size
    (same bytes, stored uncompressed) resumed without a word, one run holding maps of two datasets."""
    import os

    from test_review_symlinks_repair_messages import _KW, _interrupted

    loaded, folder, run = _tiny_loaded(), tmp_path / "imgs", tmp_path / "run.h5"
    names = [f"a{i}.png" for i in range(8)]
    _same_size_photos(folder, names, seed=0)
    _interrupted(loaded, run, batches=3, data=str(folder))
    was = (folder / "a1.png").stat()
    _same_size_photos(folder, ["a1.png"], seed=1)  # another picture under the same name, of the same size
    now = (folder / "a1.png").stat()
    assert now.st_size == was.st_size and now.st_mtime_ns != was.st_mtime_ns
    with pytest.raises(QKHooksError, match=r"cannot resume .*run\.h5: 1 of the 4 images it keeps were modified since "
                                           r"it recorded them \(first: 'a1\.png', its file's modification time .* UTC "
                                           r"then, .* UTC now\).*same pixel size.*--overwrite"):
        qkhooks.record_dataset(loaded, str(folder), run, resume=True, **_KW)
    with qkhooks.open_run(run) as after:  # refused before anything was cut or written; each file's time as stat said
        assert after.n == 6 and not after.complete
        times = after.array("images/file_mtimes")[:]
    assert [int(t) for t in times] == [was.st_mtime_ns if name == "a1.png" else (folder / name).stat().st_mtime_ns
                                       for name in names[:6]]
    _same_size_photos(folder, ["a1.png"], seed=0)  # put back as it was, its time too: the resume goes on
    os.utime(folder / "a1.png", ns=(was.st_atime_ns, was.st_mtime_ns))
    assert qkhooks.record_dataset(loaded, str(folder), run, resume=True, **_KW).images == 8


def test_a_run_written_without_file_times_resumes_on_sizes_alone_and_says_so(tmp_path, monkeypatch):
    """A run from before the times were stored (no images/file_mtimes) still resumes, checked as before (sizes),
    with one warning that names what is not checked."""
    import qkhooks.stream as stream
    from test_review_symlinks_repair_messages import _KW, _interrupted

    loaded, folder, run = _tiny_loaded(), tmp_path / "imgs", tmp_path / "run.h5"
    _same_size_photos(folder, [f"a{i}.png" for i in range(8)], seed=0)
    with monkeypatch.context() as older:
        older.setattr(stream, "file_mtime_column", lambda dataset: None)  # what qkhooks wrote before round 39
        _interrupted(loaded, run, batches=2, data=str(folder))
    with qkhooks.open_run(run) as before:
        assert before.n == 4 and not before.has("images/file_mtimes") and before.has("images/file_sizes")
    with pytest.warns(UserWarning, match=r"recorded before qkhooks stored each image file's modification time "
                                         r"\(images/file_mtimes\), so this resume checks the \d+ images it keeps by "
                                         r"their file sizes only") as warned:
        assert qkhooks.record_dataset(loaded, str(folder), run, resume=True, **_KW).images == 8
    assert sum("modification time" in str(w.message) for w in warned) == 1
    with qkhooks.open_run(run) as after:
        assert after.complete and after.n == 8 and not after.has("images/file_mtimes")
