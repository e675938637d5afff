"""Round 16 (issue 20): the default sinks' cost per batch, each new path against the one it replaced, in one process.

    python benchmarks/round16_sinks.py                       # ViT-Ti, batch 16, 1 thread, 8 batches, 5 rounds
    python benchmarks/round16_sinks.py --model vit_small_patch16_224 --batches 4

Batches of real maps are recorded from a random-init timm model (``record(modes=16)``, other random images in each
batch), so that fewer images enter the top k as more are seen, as in a dataset.

- ``TopKModes`` per batch (thread CPU), folding all layers of one shape as one tensor ("stacked", ``update``) or
  one layer at a time (``_fold``), and copying the maps of entering images only ("entering rows",
  ``_entrants_only``) or of every candidate ("every candidate"). "per layer, every candidate" is round 15's work.
- The run writer per batch (process CPU, so the writer thread counts): whole chunks with ``write_direct_chunk``
  against ``_PerImage.direct`` forced False (round 15's hyperslab writes).

Prints each variant's median ms per batch and its ratio to the baseline measured in the same rounds.
"""

from __future__ import annotations

import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from harness.options import round_parser  # noqa: E402


def main() -> None:
    parser = round_parser(__doc__, threads=1, model="vit_tiny_patch16_224", batch=16, rounds=5)
    parser.add_argument("--batches", type=int, default=8, help="batches folded per measurement")
    args = parser.parse_args()

    import timm
    import torch

    import qkhooks
    from qkhooks.analysis import topk
    from qkhooks.analysis.topk import TopKModes
    from qkhooks.results import BatchCapture, LayerCapture
    from qkhooks.store import RunWriter
    from qkhooks.store import writer as writer_module

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = timm.create_model(args.model, pretrained=False).eval()
    batches: list = []

    class Keep:
        def update(self, batch) -> None:
            batches.append(batch)

    with torch.no_grad(), qkhooks.record(net, modes=16, sinks=[Keep()]) as run:
        for _ in range(args.batches):  # other images in every batch: fewer enter the top k as more are seen
            run(torch.randn(args.batch, 3, 224, 224))
    first = batches[0]

    entrants = topk._entrants_only

    def fold(stacked: bool, entering_rows: bool) -> None:
        topk._entrants_only = lambda device: entering_rows
        try:
            reducer = TopKModes()
            prefix = first.meta["num_prefix_tokens"]
            for b in batches:
                if stacked:
                    reducer.update(b)
                    continue
                for layer, cap in sorted(b.captures.items()):
                    reducer._fold(layer, cap.query, cap.key, b.offset, prefix)
        finally:
            topk._entrants_only = entrants

    arrays = {f"modes/L{l}/{side}": getattr(c, side) for l, c in first.captures.items() for side in ("query", "key")}

    def write(direct: bool) -> None:
        init = writer_module._PerImage.__init__

        def forced(self, ds):
            init(self, ds)
            self.direct = self.direct and direct

        writer_module._PerImage.__init__ = forced
        try:
            with tempfile.TemporaryDirectory() as tmp, RunWriter(Path(tmp) / "w.h5") as w:
                for i in range(args.batches):
                    w.write_batch([f"{i}-{j}" for j in range(args.batch)], arrays)
        finally:
            writer_module._PerImage.__init__ = init

    groups = {
        "top-k": ({"stacked, entering rows": lambda: fold(True, True), "stacked, every candidate": lambda: fold(True, False),
                   "per layer, entering rows": lambda: fold(False, True),
                   "per layer, every candidate": lambda: fold(False, False)}, "per layer, every candidate",
                  time.thread_time),
        "writer": ({"whole chunks": lambda: write(True), "hyperslab": lambda: write(False)}, "hyperslab",
                   time.process_time),
    }
    for name, (variants, baseline, clock) in groups.items():
        for fn in variants.values():
            fn()  # warm-up
        times: dict[str, list[float]] = {v: [] for v in variants}
        for _ in range(args.rounds):
            order = list(variants)
            random.shuffle(order)
            for v in order:
                t0 = clock()
                variants[v]()
                times[v].append((clock() - t0) / args.batches)
        base = statistics.median(times[baseline])
        print(f"{name} ({args.model}, batch {args.batch}, {args.threads} thread(s), {args.rounds} rounds):")
        for v, ts in times.items():
            med = statistics.median(ts)
            print(f"  {v:26s} {1000 * med:7.2f} ms a batch   {med / base:.3f}x {baseline}")


if __name__ == "__main__":
    main()
