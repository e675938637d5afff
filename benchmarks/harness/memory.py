"""Peak memory: each method, and record_dataset at 1x and 10x the images, in a fresh subprocess each."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from harness.machine import MALLOC_VARIANTS, peak_rss_mb, reset_peak_rss, rss_mb
from harness.material import Bench, make_image_folder
from harness.methods import METHODS
from harness.render import fmt
from harness.sizes import SIZES

BENCHMARKS = Path(__file__).resolve().parents[1]
CHILD_MARK = "QKHOOKS_BENCH_RESULT "


def _child_run(spec: dict[str, Any]) -> dict[str, Any]:
    """Body of a memory subprocess: set up, reset the peak, run, report (CPU RSS and, on CUDA, allocator peak)."""
    torch.set_num_threads(int(spec["threads"]))
    if spec["kind"] == "method":
        bench = Bench(spec["size"], int(spec["batch"]), spec["device"], spec["workdir"])
        runner = METHODS[spec["method"]].build(bench)
        runner.attach()

        def work() -> None:
            for _ in range(int(spec["steps"])):
                runner.step(bench.images)
            runner.end_rep()

        def finish() -> None:
            runner.detach()
            runner.close()

        device = bench.device
        extra: dict[str, Any] = {}
    elif spec["kind"] == "dataset":
        import qkhooks
        from qkhooks.stream import record_dataset

        bench = Bench(spec["size"], int(spec["batch"]), "cpu", spec["workdir"])
        loaded = qkhooks.load_model(bench.timm())
        trace: list[float] = []

        def work() -> None:
            record_dataset(loaded, spec["folder"], spec["out"], modes=16, attention="rows", reducers=[],
                           batch_size=int(spec["batch"]), limit=int(spec["images"]), overwrite=True, progress=False,
                           on_batch=lambda batch: trace.append(rss_mb() or 0.0))

        finish = lambda: None  # noqa: E731
        device = torch.device("cpu")
        extra = {"rss_after_batch_mb": trace, "images": int(spec["images"])}
    else:
        raise ValueError(spec["kind"])
    gc.collect()
    base = rss_mb()
    reset = reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        cuda_base = torch.cuda.memory_allocated(device)
    with torch.no_grad():
        work()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        extra["cuda_peak_delta_mb"] = (torch.cuda.max_memory_allocated(device) - cuda_base) / 2**20
    peak = peak_rss_mb()
    finish()
    return {"rss_base_mb": base, "rss_peak_mb": peak, "rss_peak_delta_mb": (peak - base) if reset and peak and base else None,
            "peak_reset": reset, **extra}


def child_main(payload: str) -> int:
    """Entry point of a memory subprocess (``python -c``); prints one result line."""
    result = _child_run(json.loads(payload))
    print(CHILD_MARK + json.dumps(result), flush=True)
    return 0


def run_child(spec: dict[str, Any], timeout: float = 600, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run :func:`child_main` in a fresh interpreter (from the checkout: its qkhooks and this harness)."""
    code = ("import sys; sys.path.insert(0, sys.argv[2]); from harness.memory import child_main; "
            "sys.exit(child_main(sys.argv[1]))")
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(spec), str(BENCHMARKS)], capture_output=True,
                          text=True, timeout=timeout, cwd=str(BENCHMARKS.parent), env={**os.environ, **(env or {})})
    for line in proc.stdout.splitlines():
        if line.startswith(CHILD_MARK):
            return json.loads(line[len(CHILD_MARK):])
    raise RuntimeError(f"memory subprocess failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")


def measure_memory(size: str, batch: int, names: Sequence[str], device: str, threads: int, workdir: Path,
                   steps: int = 2, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Peak memory of each method, one fresh subprocess per method and allocator setting. On CUDA only glibc's
    default setting: the GPU peak is what that run is for, and each subprocess pays CUDA's start-up (~10 s; round
    25's lease ran out after three of eight methods with both settings)."""
    out: dict[str, dict[str, Any]] = {}
    variants = dict(list(MALLOC_VARIANTS.items())[:1]) if device.startswith("cuda") else MALLOC_VARIANTS
    for name in names:
        out[name] = {}
        for variant, env in variants.items():
            spec = dict(kind="method", size=size, batch=batch, method=name, steps=steps, threads=threads,
                        device=device, workdir=str(workdir))
            out[name][variant] = run_child(spec, env=env)
        if log:
            log(f"  memory {name}: " + ", ".join(f"+{fmt(r.get('rss_peak_delta_mb'), 1)} MB ({v})"
                                                 for v, r in out[name].items()))
    return {"steps": steps, "methods": out}


def dataset_memory(size: str, batch: int, base_images: int, threads: int, workdir: Path,
                   log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Issue 3: peak RSS of record_dataset (top-16 + rows + HDF5) at 1x and 10x the images, one process each,
    with glibc's default allocator settings and with a fixed mmap threshold (see :data:`MALLOC_VARIANTS`)."""
    image = SIZES[size].image
    folder = make_image_folder(workdir / "images", 10 * base_images, image)
    out: dict[str, Any] = {"base_images": base_images, "batch": batch, "variants": {}}
    for variant, env in MALLOC_VARIANTS.items():
        runs: dict[str, Any] = {}
        for factor in (1, 10):
            n = factor * base_images
            spec = dict(kind="dataset", size=size, batch=batch, images=n, folder=str(folder), threads=threads,
                        out=str(workdir / f"dataset-{n}.h5"), workdir=str(workdir))
            t0 = time.perf_counter()
            res = run_child(spec, timeout=1200, env=env)
            res["seconds"] = time.perf_counter() - t0
            res["file_mb"] = os.path.getsize(spec["out"]) / 2**20
            os.unlink(spec["out"])
            trace = res.get("rss_after_batch_mb") or []
            half = trace[len(trace) // 2:]
            if len(half) >= 3:  # least-squares slope of RSS over the second half, MB per 100 images
                xs = [i * batch for i in range(len(half))]
                mx, my = sum(xs) / len(xs), sum(half) / len(half)
                res["rss_slope_mb_per_100_images"] = 100 * sum((x - mx) * (y - my) for x, y in zip(xs, half)) / sum(
                    (x - mx) ** 2 for x in xs)
                res["rss_second_half_range_mb"] = [min(half), max(half)]
            runs[str(factor)] = res
            if log:
                log(f"  record_dataset {n} images ({variant}): peak +{fmt(res.get('rss_peak_delta_mb'), 1)} MB")
        out["variants"][variant] = runs
    return out
