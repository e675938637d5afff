"""The machine a benchmark ran on, its load, and process memory (RSS and its high-water mark, from /proc)."""

from __future__ import annotations

import os
import platform
import time
from typing import Any, Callable

import torch


def _status_kb(field: str) -> int | None:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM), or None off Linux."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_mb() -> float | None:
    kb = _status_kb("VmRSS")
    return None if kb is None else kb / 1024


def peak_rss_mb() -> float | None:
    kb = _status_kb("VmHWM")
    return None if kb is None else kb / 1024


def reset_peak_rss() -> bool:
    """Reset this process's RSS high-water mark (VmHWM) to its current RSS (Linux >= 4.0); False if impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """CPU model, cores, memory, library versions, torch threads and GPU (if any)."""
    import h5py
    import numpy
    import timm
    import transformers

    mem = None
    try:
        with open("/proc/meminfo") as fh:
            mem = round(int(fh.readline().split()[1]) / 1024**2, 1)
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": _cpu_model(), "cores": os.cpu_count(), "memory_gib": mem, "python": platform.python_version(),
        "torch": torch.__version__, "timm": timm.__version__, "transformers": transformers.__version__,
        "h5py": h5py.__version__, "hdf5": h5py.version.hdf5_version, "numpy": numpy.__version__,
        "torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads(),
        "gpu": gpu, "platform": platform.platform(),
    }


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (written next to every result: the machine is shared)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def sync(device: torch.device) -> None:
    """Wait for the GPU, so that a timed region ends when its work does."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(device: torch.device) -> Callable[[], float]:
    """Process CPU time on the CPU (robust to other jobs on a shared machine), wall time with CUDA."""
    return time.perf_counter if device.type == "cuda" else time.process_time


MALLOC_VARIANTS: dict[str, dict[str, str]] = {
    "glibc default": {},
    "fixed mmap threshold": {"MALLOC_MMAP_THRESHOLD_": "131072"},
}
"""Allocator settings for the memory-vs-images runs. glibc raises its mmap threshold each time a large block is
freed, so later large arrays come from the heap and RSS wanders by tens of MB; a fixed threshold (128 KiB,
glibc's initial value) returns every large block to the system on free and shows the true trend."""


HEAP_KEPT = {"mmap_threshold": 256 << 20, "trim_threshold": 1 << 30}
"""glibc thresholds of ``--heap kept`` (bytes): blocks up to 256 MiB come from the heap, and freed memory stays there
up to 1 GiB at its top. Fixed, they also stop glibc's own adjustment of both."""


def keep_heap() -> None:
    """Set :data:`HEAP_KEPT` for this process (glibc's ``mallopt``); refused where the C library is not glibc or
    takes neither value. For the whole process and irreversible, so for a benchmark run only: the library never does
    this to its users' processes."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is None or not hasattr(libc, "mallopt") or platform.libc_ver()[0] != "glibc":
        raise SystemExit("--heap kept needs glibc's mallopt; this C library is not glibc.")
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    for option, value in ((m_mmap_threshold, HEAP_KEPT["mmap_threshold"]), (m_trim_threshold, HEAP_KEPT["trim_threshold"])):
        if libc.mallopt(option, value) != 1:
            raise SystemExit(f"--heap kept: glibc refused mallopt({option}, {value}).")


def minor_page_faults() -> int | None:
    """This process's minor page faults so far (None where ``resource`` is missing): with glibc's default malloc a
    ViT-S forward re-touches ~220 MB (~56,000 faults), and how many a method pays moves its ratio by several points
    between rounds (ANALYSIS.md, speed round 10)."""
    try:
        import resource
    except ImportError:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
