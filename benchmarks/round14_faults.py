"""Round 14 (issue 20): a recording attached around each forward, against the plain forward, with page faults counted.

    python benchmarks/round14_faults.py --options '{"modes": "all"}' --threads 2 --rounds 12
    PYTHONPATH=/path/to/other/tree python benchmarks/round14_faults.py ...   # the same on another tree

A plain forward and a forward inside ``record(model, **options)`` alternate (the order flipped every round) in one
process, after 3 warm-up rounds. Printed: the median ratio of their wall times and the median minor page faults per
forward of each (``resource.getrusage``). Unlike ``qkhooks bench``, whose rounds run every method in turn, the
process runs only these two forwards, so what the recording allocates each batch decides whether the process
faults in fresh pages. Run it several times: which allocation regime a process lands in moves from run to run.
"""

from __future__ import annotations

import argparse
import ast
import resource
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--options", default='{"modes": "all"}', help="record() options, a Python dict literal")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=12)
    args = parser.parse_args()

    import timm
    import torch

    import qkhooks

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    options = ast.literal_eval(args.options)
    model = timm.create_model(args.model, pretrained=False).eval()
    images = torch.randn(args.batch, 3, 224, 224)
    run = qkhooks.record(model, spectrum=qkhooks.spectrum(model) if options.get("modes") is not None else None,
                         **options)

    def faults() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    def forward(recorded: bool) -> tuple[float, int]:
        if recorded:
            run.attach()
        before, start = faults(), time.perf_counter()
        model(images)
        seconds, faulted = time.perf_counter() - start, faults() - before
        if recorded:
            run.detach()
        return seconds, faulted

    seen: dict[bool, list[tuple[float, int]]] = {False: [], True: []}
    with torch.no_grad():
        for _ in range(3):
            forward(False)
            forward(True)
        for i in range(args.rounds):
            for recorded in ((False, True) if i % 2 else (True, False)):
                seen[recorded].append(forward(recorded))
    ratio = statistics.median(on[0] / off[0] for off, on in zip(seen[False], seen[True]))
    print(f"{args.model} batch {args.batch}, {args.threads} thread(s), record({args.options}): "
          f"recorded / plain {ratio:.3f}; plain {statistics.median(s for s, _ in seen[False]) * 1e3:.1f} ms; "
          f"minor page faults per forward: plain {statistics.median(f for _, f in seen[False]):.0f}, "
          f"recorded {statistics.median(f for _, f in seen[True]):.0f}")


if __name__ == "__main__":
    main()
