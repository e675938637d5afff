"""Round 26 (issue 20): what entering and leaving ``record(model, modes=16)`` costs once the model's sites and spectra
are cached (the per-batch context manager), in thread CPU time.

    python benchmarks/round26_entry.py vit_small_patch16_224
    PYTHONPATH=/path/to/an/older/checkout python benchmarks/round26_entry.py vit_base_patch16_224   # another version

A random-init timm model, 1 torch thread; one recording first (it fills the caches), then 7 repetitions of 40
entries; prints the median [2nd, 6th of 7] milliseconds an entry and which qkhooks it measured. Round 26 ran it for
round 25's code (a worktree of aaff763 on PYTHONPATH) and its own, alternating.
"""

from __future__ import annotations

import sys
import time

import timm
import torch

import qkhooks


def main() -> None:
    name = sys.argv[1] if len(sys.argv) > 1 else "vit_small_patch16_224"
    torch.set_num_threads(1)
    model = timm.create_model(name, pretrained=False).eval()
    with torch.no_grad(), qkhooks.record(model, modes=16):
        model(torch.randn(2, 3, 224, 224))

    def entry() -> None:
        run = qkhooks.record(model, modes=16)
        run.__enter__()
        run.__exit__(None, None, None)

    reps = []
    for _ in range(7):
        start = time.thread_time()
        for _ in range(40):
            entry()
        reps.append((time.thread_time() - start) / 40 * 1e3)
    reps.sort()
    print(f"{qkhooks.__file__.rsplit('/qkhooks', 1)[0]} {name}: enter+exit {reps[3]:.2f} ms [{reps[1]:.2f}, {reps[5]:.2f}]")


if __name__ == "__main__":
    main()
