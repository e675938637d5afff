"""Round 27 (issue 20, GPU): how many tensor operations a ``record_dataset`` batch dispatches on the main thread, by
the qkhooks function that dispatched them (innermost qkhooks frame; "model/torch" for none).

Next to a fast GPU the host sets the pace, and each operation costs the host a kernel launch (~5-10 us) whatever its
size, so this count is the machine-independent measure of a recording's host work there. It runs on the CPU: with
``--accelerator-path`` the top-k reducer takes the fold an accelerator takes (every candidate's rows, from the
stacked maps) and the q/k path its product's shape there (one product over the batch), as on a GPU. Per batch = the difference between two runs of different lengths (per-run work cancels), after a run that fills
the caches.

    python benchmarks/round27_ops.py [--model vit_ti] [--accelerator-path]
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from harness.material import make_image_folder  # noqa: E402
from harness.sizes import SIZES  # noqa: E402


class _Census(TorchDispatchMode):
    """Counts each dispatched aten operation under the innermost qkhooks function on the stack."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        frame, where = sys._getframe(1), "model/torch"
        while frame is not None:
            if "/qkhooks/" in frame.f_code.co_filename:
                where = frame.f_code.co_filename.split("/qkhooks/")[1] + ":" + frame.f_code.co_name
                break
            frame = frame.f_back
        self.counts[where] += 1
        return func(*args, **(kwargs or {}))


def main() -> int:
    import qkhooks
    from qkhooks import projector
    from qkhooks.analysis import topk
    from qkhooks.stream import record_dataset

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit_ti", choices=sorted(SIZES))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--accelerator-path", action="store_true", help="the top-k fold and q/k product an accelerator takes")
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.accelerator_path:  # the top-k fold and the q/k product's shape a GPU takes
        topk._entrants_only = lambda device: False
        projector._product_layout = lambda heads, modes: "batched"
    runs = {}
    with tempfile.TemporaryDirectory(prefix="qkhooks-ops-") as tmp:
        loaded = qkhooks.load_model(f"timm:{SIZES[args.model].timm_name}", random_init=True)
        for batches in (2, 2, 6):  # the first fills the caches (sites, spectra, projectors): not counted
            folder = make_image_folder(Path(tmp) / f"images{batches}", batches * args.batch, SIZES[args.model].image)
            with _Census() as census:
                record_dataset(loaded, str(folder), Path(tmp) / "run.h5", batch_size=args.batch, overwrite=True,
                               progress=False)
            runs[batches] = census.counts
    per_batch = {w: (runs[6][w] - runs[2][w]) / 4 for w in set(runs[2]) | set(runs[6])}
    shown = {w: n for w, n in per_batch.items() if abs(n) >= 0.5}
    print(f"{args.model}, batch {args.batch}{', accelerator path' if args.accelerator_path else ''}: "
          f"{sum(per_batch.values()):.0f} operations a batch on the main thread")
    for where, n in sorted(shown.items(), key=lambda kv: -kv[1]):
        print(f"  {n:7.1f}  {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
