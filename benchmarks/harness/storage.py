"""The run file's cost: time the forward loop is blocked in ``RunWriter.write_batch`` per codec and chunking,
and the compression ratio and speed of float16 maps per HDF5 codec."""

from __future__ import annotations

import gc
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from harness.machine import sync
from harness.material import Bench
from harness.methods import ROWS, RecordRunner
from harness.stats import interleaved_schedule, paired_ratios, summarize
from qkhooks.store.format import per_image_datasets


def _chunks_of_1mib(writer: Any) -> None:
    """Make ``writer`` chunk every per-image dataset as RunWriter did before patch C: ~1 MiB chunks (at most 64
    images) whatever the compression, so compressed chunks span several batches and are rewritten at each append."""
    inner = writer._create_per_image

    def create(name: str, value: Any, n: int) -> Any:
        writer.chunk_images = int(min(64, max(1, (1 << 20) // max(1, value[0].nbytes))))
        try:
            return inner(name, value, n)
        finally:
            writer.chunk_images = None

    writer._create_per_image = create  # looked up on the instance by the writer thread


class _TimedWriter:
    """Wraps a RunWriter's ``write_batch`` (caller side, includes queue-full waits) and ``_do_batch`` (thread)."""

    def __init__(self, writer: Any):
        self.writer, self.blocked, self.thread, self.thread_cpu = writer, [], [], []
        inner_write, inner_do = writer.write_batch, writer._do_batch

        def write_batch(ids, arrays):
            t0 = time.perf_counter()
            inner_write(ids, arrays)
            self.blocked.append(time.perf_counter() - t0)

        def do_batch(ids, arrays):
            t0, c0 = time.perf_counter(), time.thread_time()
            inner_do(ids, arrays)
            self.thread.append(time.perf_counter() - t0)
            self.thread_cpu.append(time.thread_time() - c0)

        writer.write_batch = write_batch
        writer._do_batch = do_batch  # looked up on the instance by the writer thread


def writer_bench(bench: Bench, compressions: Sequence[str], rounds: int = 6, batches: int = 3,
                 log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Stream top-16 modes + rows through a RunWriter per codec, interleaved with a no-writer reference.

    Chunking: plain ``X`` is the writer's default (~1 MiB chunks uncompressed; when compressed or checksummed one
    chunk per batch from patch C, one image per chunk from round 21); ``X@batch`` passes ``chunk_images=batch`` explicitly; ``X@1mib`` restores the ~1 MiB chunks of
    every dataset as before patch C (for the before/after file sizes, see :func:`_chunks_of_1mib`); a ``+checksum``
    suffix adds HDF5's Fletcher-32 filter (``--checksum``) to the same layout, for its cost.

    Per repetition: ``batches`` forwards, then ``flush`` (drain). Reported: time blocked inside write_batch
    per batch, the writer thread's time per batch, the drain at the end, and wall time vs no writer.
    """
    runners: dict[str, RecordRunner] = {"no_writer": RecordRunner(bench, {"modes": 16, **ROWS}, name="nowriter")}
    timed: dict[str, _TimedWriter] = {}
    for c in compressions:
        layout, plus, extra = c.partition("+")  # "none+checksum": the same with Fletcher-32 on every array
        codec, _, chunking = layout.partition("@")  # "lzf@batch": chunks of one batch (every chunk written once)
        if chunking not in ("", "batch", "1mib") or (plus and extra != "checksum"):
            raise ValueError(f"unknown writer layout {c!r}: use CODEC, CODEC@batch or CODEC@1mib, each optionally "
                             "followed by +checksum")
        runners[c] = RecordRunner(bench, {"modes": 16, **ROWS}, writer=True,
                                  name=f"writer-{codec}-{chunking}{'-checksum' if plus else ''}", compression=codec,
                                  chunk_images=bench.batch if chunking == "batch" else None, checksum=bool(plus))
        if chunking == "1mib":
            _chunks_of_1mib(runners[c].writer)
        timed[c] = _TimedWriter(runners[c].writer)
    wall: dict[str, list[float]] = {k: [] for k in runners}
    cpu: dict[str, list[float]] = {k: [] for k in runners}
    drain: dict[str, list[float]] = {k: [] for k in runners}
    gc.collect()
    gc.freeze()
    try:
        for r, name in interleaved_schedule(list(runners), rounds, 1):
            runner = runners[name]
            gc.collect()
            if name in timed and r == 0:  # forget warm-up samples
                timed[name].blocked.clear()
                timed[name].thread.clear()
                timed[name].thread_cpu.clear()
            runner.attach()
            try:
                with torch.no_grad():
                    t0, c0 = time.perf_counter(), time.process_time()
                    for _ in range(batches):
                        runner.step(bench.images)
                    t1 = time.perf_counter()
                    runner.end_rep()
                    sync(bench.device)
                    t2, c2 = time.perf_counter(), time.process_time()
            finally:
                runner.detach()
            if r >= 0:
                wall[name].append(t2 - t0)
                cpu[name].append(c2 - c0)
                drain[name].append(t2 - t1)
        out: dict[str, Any] = {"batches_per_rep": batches, "batch": bench.batch, "codecs": {}}
        out["no_writer_ms_per_batch"] = summarize([1000 * t / batches for t in wall["no_writer"]])
        out["no_writer_cpu_ms_per_batch"] = summarize([1000 * t / batches for t in cpu["no_writer"]])
        for c in compressions:
            tw = timed[c]
            w = runners[c].writer
            w.flush()
            raw = sum(ds.size * ds.dtype.itemsize for ds in per_image_datasets(w._file).values())
            size = os.path.getsize(runners[c].path)
            per_batch_mb = raw / max(1, w.committed) * bench.batch / 2**20
            thread = summarize([1000 * t for t in tw.thread])
            thread_cpu = summarize([1000 * t for t in tw.thread_cpu])
            out["codecs"][c] = {
                "blocked_ms_per_batch": summarize([1000 * t for t in tw.blocked]),
                "blocked_fraction_of_wall": sum(tw.blocked) / sum(wall[c]),
                "writer_thread_ms_per_batch": thread,
                "writer_thread_cpu_ms_per_batch": thread_cpu,
                "drain_ms_per_rep": summarize([1000 * t for t in drain[c]]),
                "wall_ms_per_batch": summarize([1000 * t / batches for t in wall[c]]),
                "wall_ratio_to_no_writer": summarize(paired_ratios(wall[c], wall["no_writer"])),
                "cpu_ratio_to_no_writer": summarize(paired_ratios(cpu[c], cpu["no_writer"])),
                "mb_per_batch": per_batch_mb, "thread_mb_per_s": per_batch_mb / (thread_cpu["median"] / 1000),
                "file_ratio": raw / size if size else None, "file_mb": size / 2**20, "images": w.committed,
                "file_mb_per_batch": size / max(1, w.committed) * bench.batch / 2**20,
            }
            if log:
                log(f"  writer {c}: thread {thread['median']:.1f} ms/batch")
    finally:
        gc.unfreeze()
        for runner in runners.values():
            runner.close()
    return out


def codec_bench(threads: int, reps: int = 3, workdir: Path | None = None) -> dict[str, Any]:
    """Compression ratio and speed of float16 maps per HDF5 codec (was benchmarks/codecs.py).

    Maps of the real DINOv2-S/14 (``offline:dinov2-s14``) on the bundled photos when available, else a
    random-init ViT-S on random images (then say so: random weights give less structured maps).
    """
    import h5py
    import numpy as np

    import qkhooks

    source = "offline:dinov2-s14 on 8 bundled photos"
    try:
        from qkhooks.data import collate, open_dataset

        m = qkhooks.load_model("offline:dinov2-s14")
        ds = open_dataset("samples", m.image_config)
        pixels = collate([ds[i] for i in range(min(8, len(ds)))])["pixel_values"]
        model = m.model
    except Exception as exc:  # the offline model or the sample photos are not installed
        source = f"random-init ViT-S on random images (offline model unavailable: {type(exc).__name__})"
        bench = Bench("vit_s", 8)
        model, pixels = bench.timm(), bench.images
    with qkhooks.record(model, modes=16) as run, torch.no_grad():
        model(pixels)
    arrs = {k: v.contiguous().numpy().astype(np.float16) for k, v in run.last.arrays().items()}
    raw = sum(a.nbytes for a in arrs.values())
    codecs: dict[str, dict[str, Any]] = {
        "none": {}, "gzip1": dict(compression="gzip", compression_opts=1),
        "gzip4": dict(compression="gzip", compression_opts=4),
        "gzip1+shuffle": dict(compression="gzip", compression_opts=1, shuffle=True),
        "lzf": dict(compression="lzf"), "lzf+shuffle": dict(compression="lzf", shuffle=True),
    }
    try:
        import hdf5plugin

        codecs["blosc-lz4"] = dict(**hdf5plugin.Blosc(cname="lz4", clevel=5, shuffle=hdf5plugin.Blosc.SHUFFLE))
        codecs["blosc-zstd1"] = dict(**hdf5plugin.Blosc(cname="zstd", clevel=1, shuffle=hdf5plugin.Blosc.SHUFFLE))
        codecs["zstd1"] = dict(**hdf5plugin.Zstd(clevel=1))
    except ImportError:
        pass
    tmp = Path(tempfile.mkdtemp(prefix="qkhooks-codecs-", dir=workdir))
    out: dict[str, Any] = {"source": source, "raw_mb": raw / 2**20, "codecs": {}}
    try:
        for name, kw in codecs.items():
            path = tmp / f"{name}.h5"
            writes = []
            for _ in range(reps):
                path.unlink(missing_ok=True)
                t0 = time.perf_counter()
                with h5py.File(path, "w") as f:
                    for k, a in arrs.items():
                        f.create_dataset(k, data=a, chunks=(1,) + a.shape[1:], **kw)
                writes.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            with h5py.File(path) as f:
                for k in arrs:
                    f[k][:]
            read = time.perf_counter() - t0
            out["codecs"][name] = {"ratio": raw / path.stat().st_size, "write_mb_s": raw / min(writes) / 1e6,
                                   "read_mb_s": raw / read / 1e6}
    finally:
        for p in tmp.glob("*.h5"):
            p.unlink()
        tmp.rmdir()
    return out
