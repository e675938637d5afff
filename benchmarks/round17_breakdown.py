"""Round 17 (issue 20): where a batch of ``qkhooks record`` over a folder goes, against the plain loop, in one process.

    python benchmarks/round17_breakdown.py                    # ViT-Ti, 240 JPEGs, batch 16, 1 thread, 5 rounds
    python benchmarks/round17_breakdown.py --model vit_small_patch16_224 --rounds 3

The plain loop (the model's transform, a DataLoader, no workers) and ``record_dataset`` with its defaults (top-16
modes, the default reducers, a float16 run file) run interleaved, the order turned each round. Thread CPU time is
summed per part with wrappers around the functions that do each part:

- ``decode``: the DataLoader's fetch (reading, decoding and transforming the JPEGs);
- ``forward``: the model's ``forward``, the capture hooks inside it included;
- ``modes product``: the projector's product inside the hooks (part of ``forward``);
- ``sink: NAME``: each sink's ``update`` at the end of a batch (the writer's hand-off is ``WriterSink``);
- ``writer thread``: the run writer's thread, the whole run (laying out the file, the batches, the checkpoints);
- ``process``: the process's CPU time, every thread.

Prints each part's median over rounds in ms per batch, and the process CPU ratio. The wrappers cost a little
themselves; the ratio of record to plain is ``qkhooks bench --sections end_to_end``'s job, this is the breakdown.
Set ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` (README, performance) to take glibc's page faults out.
"""

from __future__ import annotations

import collections
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from harness.options import round_parser  # noqa: E402


def main() -> None:
    parser = round_parser(__doc__, threads=1, model="vit_tiny_patch16_224", batch=16, rounds=5)
    parser.add_argument("--images", type=int, default=240)
    args = parser.parse_args()

    import torch
    import torch.utils.data.dataloader as loader_module
    from torch.utils.data import DataLoader

    import qkhooks
    from harness.material import make_image_folder
    from qkhooks import capture, projector
    from qkhooks.data import collate, open_dataset
    from qkhooks.store import writer as writer_module
    from qkhooks.stream import record_dataset

    torch.set_num_threads(args.threads)
    spent: collections.Counter = collections.Counter()

    def timed(part: str, fn: Callable) -> Callable:
        def wrapper(*a: Any, **k: Any) -> Any:
            t0 = time.thread_time()
            try:
                return fn(*a, **k)
            finally:
                spent[part] += time.thread_time() - t0
        return wrapper

    with tempfile.TemporaryDirectory(prefix="qkhooks-breakdown-") as tmp:
        work = Path(tmp)
        loaded = qkhooks.load_model(f"timm:{args.model}", random_init=True)
        net = loaded.model.eval()
        folder = make_image_folder(work / "images", args.images, int(loaded.image_config.size[0]))
        batches = -(-args.images // args.batch)

        loader_module._SingleProcessDataLoaderIter._next_data = timed(
            "decode", loader_module._SingleProcessDataLoaderIter._next_data)
        type(net).forward = timed("forward", type(net).forward)
        projector.QKPathProjector.from_fused = timed("modes product", projector.QKPathProjector.from_fused)
        end_batch = capture.Recording._end_batch

        def end_batch_timed(self: Any, *a: Any, **k: Any) -> None:
            for sink in self.sinks:
                if not getattr(sink, "_breakdown", False):
                    sink.update, sink._breakdown = timed(f"sink: {type(sink).__name__}", sink.update), True
            end_batch(self, *a, **k)

        capture.Recording._end_batch = end_batch_timed
        writer_module.RunWriter._work = timed("writer thread", writer_module.RunWriter._work)

        def plain() -> None:
            for item in DataLoader(open_dataset(str(folder), loaded.image_config), batch_size=args.batch,
                                   collate_fn=collate):
                with torch.no_grad():
                    net(item["pixel_values"])

        def recorded() -> None:
            record_dataset(loaded, str(folder), work / "run.h5", batch_size=args.batch, overwrite=True, progress=False)

        runs: dict[str, list[dict[str, float]]] = {"plain": [], "record": []}
        for r in range(args.rounds + 1):  # round 0 warms up
            order = [("plain", plain), ("record", recorded)]
            for name, fn in order if r % 2 else order[::-1]:
                gc.collect()
                spent.clear()
                c0, m0 = time.process_time(), time.thread_time()
                fn()  # record_dataset returns after closing its writer, whose thread has then ended
                if r:
                    runs[name].append(dict(spent, process=time.process_time() - c0, main=time.thread_time() - m0))
    parts = sorted(set().union(*runs["record"], *runs["plain"]))
    print(f"{args.model}, {args.images} images, batch {args.batch}, {args.threads} thread(s), {args.rounds} rounds; "
          "ms per batch, medians")
    print(f"{'part':28s} {'plain':>9s} {'record':>9s}")
    for part in parts:
        cells = [1000 * statistics.median(run.get(part, 0.0) for run in runs[name]) / batches for name in runs]
        print(f"{part:28s} {cells[0]:9.2f} {cells[1]:9.2f}")
    ratio = statistics.median(a["process"] / b["process"] for a, b in zip(runs["record"], runs["plain"]))
    print(f"process CPU, record / plain: {ratio:.3f}")


if __name__ == "__main__":
    main()
