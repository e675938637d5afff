"""Round 32 (issue 20): what each of round 32's per-batch checks costs, against the forward it guards, on one thread.

- the bit-for-bit compare of every recorded layer's W_q/W_k with the spectrum cache's copy (``weights_unchanged``,
  views kept from entry, so a batch slices nothing);
- the run writer's float16 overflow check (``store.writer._overflow``: one min-max pass per wider float array) on a
  batch of top-16 query and key maps of every layer, as ``record_dataset`` hands them over.

Prints milliseconds per batch and the share of a plain forward of the same batch; the share is what counts on a busy
machine (ANALYSIS round 32 quotes these).

    python benchmarks/round32_checks.py [--batch 8] [--repeats 50]
"""

from __future__ import annotations

import argparse
import time

import timm
import torch

import qkhooks
from qkhooks.spectrum import weights_unchanged
from qkhooks.store.writer import _overflow


def _per_call(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name in ("vit_small_patch16_224", "vit_base_patch16_224"):
        model = timm.create_model(name, pretrained=False).eval()
        images = torch.randn(args.batch, 3, 224, 224)
        with torch.no_grad():
            model(images)
            forward = _per_call(lambda: model(images), 2)
        recording = qkhooks.record(model, modes=16)
        pairs = [(recording._weights_at_entry[s.layer], s) for s in recording.sites]
        live = [recording._live_weights[s.layer] for s in recording.sites]
        compare = _per_call(lambda: weights_unchanged(pairs, live), args.repeats)
        with recording, torch.no_grad():
            model(images)
            maps = recording.last.arrays()
        ids = [str(i) for i in range(args.batch)]
        check = _per_call(lambda: _overflow(ids, maps, torch.float16), args.repeats)
        print(f"{name}, batch {args.batch}: forward {forward * 1e3:.0f} ms; weights compare {compare * 1e3:.2f} ms "
              f"({100 * compare / forward:.2f} %); writer's float16 overflow check on {len(maps)} arrays "
              f"{check * 1e3:.2f} ms ({100 * check / forward:.2f} %)")


if __name__ == "__main__":
    main()
