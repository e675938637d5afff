"""Round 15 (issue 20): the projector's product layouts against round 9-14's single product, in one process.

    python benchmarks/round15_layouts.py --threads 2 --rounds 20                        # ViT-S, batch 8
    python benchmarks/round15_layouts.py --threads 1 --rounds 10 --batch 16
    python benchmarks/round15_layouts.py --threads 2 --rounds 12 --model vit_base_patch16_224

A random-init timm model; ``record()`` with the spectrum given, attached around each forward (all modes + rows of 2
query tokens, and top-16). Each recording runs once with the layouts ``_product_layout`` picks ("new") and once with
it forced to "batched" (the single product of rounds 9-14, "old"), every variant once per round in random order,
beside the plain forward. Prints the median [IQR] of each variant's wall time over the plain forward's in its round.
"""

from __future__ import annotations

import random
import statistics
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from harness.material import round_material  # noqa: E402
from harness.options import round_parser  # noqa: E402


def main() -> None:
    args = round_parser(__doc__, threads=2, model="vit_small_patch16_224", batch=8, rounds=20).parse_args()

    import torch

    import qkhooks
    import qkhooks.projector as projector

    model, spectrum, images, query_tokens = round_material(args)
    chosen, batched = projector._product_layout, (lambda heads, modes: "batched")
    options = {"all modes + rows": {"modes": "all", "attention": "rows"}, "top-16": {"modes": 16}}
    variants = {f"{name}, {which}": (qkhooks.record(model, spectrum=spectrum, **opts), layout)
                for name, opts in options.items() for which, layout in (("new", chosen), ("old", batched))}
    times: dict[str, list[float]] = {name: [] for name in ["plain", *variants]}
    with torch.no_grad():
        for r in range(args.rounds + 2):  # two warm-up rounds
            for name in random.sample(list(times), len(times)):
                run, layout = variants.get(name, (None, chosen))
                projector._product_layout = layout
                if run is not None:
                    run.attach()
                    if "rows" in name:
                        run.set_batch(query_tokens=query_tokens)
                start = time.perf_counter()
                model(images)
                elapsed = time.perf_counter() - start
                if run is not None:
                    run.detach()
                if r >= 2:
                    times[name].append(elapsed)
    projector._product_layout = chosen
    plain = times.pop("plain")
    print(f"{args.model}, batch {args.batch}, {args.threads} thread(s): plain {statistics.median(plain) * 1e3:.0f} ms")
    for name, values in times.items():
        ratios = [t / p for t, p in zip(values, plain)]
        q1, _, q3 = statistics.quantiles(ratios, n=4)
        print(f"  {name:26s} {statistics.median(ratios):.3f} [{q1:.3f}, {q3:.3f}]")


if __name__ == "__main__":
    main()
