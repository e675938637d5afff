"""Round 29 (issue 20): round 28's layout question settled on the whole forward. ``benchmarks/round28_layouts.py``
timed the top-16 modes' q/k-path product alone and read one product over the batch ("batched", the accelerator's
layout) 12-50 % faster than the CPU's "tokens" layout. Here ``record(modes=16)`` runs the whole forward with each
layout forced (``qkhooks.projector._product_layout``), each forward between two plain forwards and its ratio to their
mean, the two layouts' order alternating by round; the maps of both are checked equal first.

    python benchmarks/round29_layout_ab.py [MODEL] [BATCH] [THREADS] [ROUNDS]

Round 29 on the AMD EPYC VM, 1 thread, batch 16 (ratios to plain, medians): ViT-Ti, 40 rounds, tokens 1.128,
batched 1.127 (batched faster in 19 of 40 rounds); ViT-S, 16 rounds, tokens 1.035, batched 1.039 (7 of 16). No
difference on the whole forward: the CPU keeps "tokens" for few modes.
"""

from __future__ import annotations

import statistics
import sys
import time

import timm
import torch

import qkhooks
import qkhooks.projector as projector


def main() -> None:
    given = sys.argv[1:5]
    name, *numbers = given + ["vit_tiny_patch16_224", "16", "1", "20"][len(given):]
    batch, threads, rounds = map(int, numbers)
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    images = torch.randn(batch, 3, 224, 224)
    chosen = projector._product_layout

    def forced(layout: str):
        return lambda heads, modes: layout if chosen(heads, modes) == "tokens" else chosen(heads, modes)

    def plain() -> None:
        with torch.no_grad():
            model(images)

    def recorded(layout: str) -> torch.Tensor:
        projector._product_layout = forced(layout)
        try:
            with qkhooks.record(model, modes=16) as run, torch.no_grad():
                model(images)
            return run.query(len(model.blocks) - 1)
        finally:
            projector._product_layout = chosen

    layouts = ["tokens", "batched"]
    torch.testing.assert_close(recorded("tokens"), recorded("batched"), rtol=0, atol=1e-4)
    for _ in range(2):
        plain()
        for layout in layouts:
            recorded(layout)
    ratios: dict[str, list[float]] = {layout: [] for layout in layouts}
    for r in range(rounds):
        for layout in layouts if r % 2 == 0 else layouts[::-1]:
            t0 = time.perf_counter()
            plain()
            t1 = time.perf_counter()
            recorded(layout)
            t2 = time.perf_counter()
            plain()
            t3 = time.perf_counter()
            ratios[layout].append((t2 - t1) / ((t1 - t0 + t3 - t2) / 2))
    for layout, values in ratios.items():
        print(f"{name} batch {batch}, {threads} thread(s), {layout}: median {statistics.median(values):.4f}")
    wins = sum(b < t for b, t in zip(ratios["batched"], ratios["tokens"]))
    print(f"batched faster in {wins} of {rounds} rounds")


if __name__ == "__main__":
    main()
