"""Round 26 (issue 20): does the HDF5 writer thread hold the GIL while it writes, and what starves it?

    python benchmarks/writer_gil.py --rounds 5                     # 4 s a cell, ~2.5 min

The run writer's thread writes each batch of a ViT-S recording (batch 32: 24 arrays of ~1.2 MB) as whole chunks
(``write_direct_chunk``, as qkhooks.store.writer does). Here a thread writes batches of that shape, for 4 seconds, in
one of two ways:

- ``h5py``: ``write_direct_chunk`` of each array's chunk into a preallocated HDF5 file, one flush a batch;
- ``pwrite``: ``os.pwrite`` of the same bytes (releases the GIL for the write, a reference).

Beside it, the main thread does one of three things: nothing (sleeps), runs pure Python (a busy loop: never lets go
of the GIL on its own, so another thread gets it only at the interpreter's forced switches, every
``sys.getswitchinterval()`` seconds), or runs small torch operations (each one lets go of the GIL while it runs, as
a GPU loop's launches do). Each cell is run at Python's default switch interval (5 ms) and at 0.5 ms. The cells run
interleaved in rounds, in random order. Printed: the writer's batches a second and the main thread's work a second,
as medians over rounds.

Reading: if h5py held the GIL while writing, the main thread beside the ``h5py`` writer would do less than beside
``pwrite``. A writer starved by a busy main thread waits for the GIL at every call into h5py or the kernel, up to a
switch interval each.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

CHUNK, ARRAYS, ROWS = 1_254_000, 24, 40  # ~1.2 MB x 24 = a ViT-S batch of 32's float16 maps; rows reused in turn


def one_cell(folder: Path, writer: str, main: str, interval: float, seconds: float) -> tuple[float, float]:
    """(writer batches a second, main-thread work units a second) for one cell."""
    import h5py
    import numpy as np
    import torch

    sys.setswitchinterval(interval)
    data = [np.random.default_rng(j).integers(0, 255, CHUNK, dtype=np.uint8) for j in range(ARRAYS)]
    stop, batches = threading.Event(), [0]

    def write() -> None:
        if writer == "h5py":
            with h5py.File(folder / "gil.h5", "w") as f:
                sets = [f.create_dataset(f"a{j}", shape=(ROWS, CHUNK), chunks=(1, CHUNK), dtype=np.uint8)
                        for j in range(ARRAYS)]
                while not stop.is_set():
                    for j, d in enumerate(sets):
                        d.id.write_direct_chunk((batches[0] % ROWS, 0), data[j])
                    f.flush()
                    batches[0] += 1
        else:
            fd = os.open(folder / "gil.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            try:
                while not stop.is_set():
                    for j in range(ARRAYS):
                        os.pwrite(fd, data[j], ((batches[0] % ROWS) * ARRAYS + j) * CHUNK)
                    batches[0] += 1
            finally:
                os.close(fd)

    thread, units, a = threading.Thread(target=write), 0, torch.randn(64, 64)
    thread.start()
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        if main == "idle":
            time.sleep(0.01)
        elif main == "python":
            for _ in range(1000):
                units += 1
        else:
            for _ in range(20):
                a = (a * 0.5 + 1.0).tanh_()
            units += 20
    stop.set()
    thread.join()
    elapsed = time.perf_counter() - start
    sys.setswitchinterval(0.005)
    return batches[0] / elapsed, units / elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=4.0)
    args = p.parse_args()
    import torch

    torch.set_num_threads(1)
    cells = [(w, m, i) for w in ("h5py", "pwrite") for m in ("idle", "python", "torch") for i in (0.005, 0.0005)]
    results: dict[tuple, list[tuple[float, float]]] = {c: [] for c in cells}
    with tempfile.TemporaryDirectory(prefix="qkhooks-gil-") as tmp:
        for _ in range(args.rounds):
            for cell in random.sample(cells, len(cells)):
                results[cell].append(one_cell(Path(tmp), *cell, args.seconds))
    print(f"writer thread beside the main thread, {args.rounds} rounds of {args.seconds:g} s (medians), "
          f"load {os.getloadavg()[0]:.1f}")
    print(f"{'writer':7s} {'main':7s} {'switch':>7s} {'batches/s':>10s} {'GB/s':>6s} {'main work/s':>12s}")
    for (w, m, i), values in results.items():
        rate = statistics.median(v[0] for v in values)
        work = statistics.median(v[1] for v in values)
        print(f"{w:7s} {m:7s} {i * 1e3:5.1f}ms {rate:10.1f} {rate * CHUNK * ARRAYS / 1e9:6.2f} {work:12.0f}")


if __name__ == "__main__":
    main()
