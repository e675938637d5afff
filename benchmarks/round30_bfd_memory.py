"""Peak RSS and time of a BFD run (``run_bfd``, both passes) with the reducers folding each layer's tokens in its hook
(round 30's default) against keeping every layer's tokens to the batch's end (round 29: the same reducers with their
``take_inputs`` hidden, so the recording keeps the tokens for them).

Each variant runs in its own process, alternating, on a random-init timm ViT at 224 px over synthetic odd-one-out
images; the child reports its peak RSS (``ru_maxrss``), process CPU time and a digest of the result (both
variants must give the same, bit for bit). Prints a Markdown table.

    PYTHONPATH=. python benchmarks/round30_bfd_memory.py [--model vit_small_patch16_224] [--images 64] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys

CHILD = r"""
import hashlib, json, resource, sys, time
import torch, timm
from qkhooks.analysis import bfd_reducers
from qkhooks.analysis.bfd import run_bfd
model_name, images, batch, variant = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
if variant == "kept":  # round 29: no take_inputs, so record_dataset keeps every layer's tokens for the reducers
    for cls in (bfd_reducers.PositionMeans, bfd_reducers.BFDEnergies, bfd_reducers.PositionDecoding):
        cls.take_inputs = None
torch.set_num_threads(1)
torch.manual_seed(0)
model = timm.create_model(model_name, pretrained=False).eval()
c0 = time.process_time()
result = run_bfd(model, f"o3:{images}:0", None, batch_size=batch, limit=images)
digest = hashlib.sha256(json.dumps(result, sort_keys=True, default=str).encode()).hexdigest()[:16]
print(json.dumps({"cpu_s": time.process_time() - c0, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "result_sha256": digest}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}
    runs: dict[str, list[dict]] = {"taken": [], "kept": []}
    for _ in range(args.repeats):
        for variant in runs:
            out = subprocess.run([sys.executable, "-c", CHILD, args.model, str(args.images), str(args.batch), variant],
                                 env=env, capture_output=True, text=True, check=True)
            runs[variant].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(variant, runs[variant][-1], f"load {os.getloadavg()[0]:.2f}", file=sys.stderr)
    print(f"BFD run (`run_bfd`, both passes), {args.model} random init, {args.images} o3 images, batch {args.batch}, "
          f"1 torch thread, {platform.processor() or platform.machine()}, {args.repeats} runs each (median):\n")
    print("| tokens | peak RSS (MB) | process CPU (s) |\n|---|---|---|")
    for variant, label in (("kept", "kept to the batch's end (round 29)"), ("taken", "folded in each layer's hook (round 30)")):
        rss = statistics.median(r["peak_rss_mb"] for r in runs[variant])
        cpu = statistics.median(r["cpu_s"] for r in runs[variant])
        print(f"| {label} | {rss:,.0f} | {cpu:.1f} |")
    digests = {r["result_sha256"] for rs in runs.values() for r in rs}
    print(f"\nresults {'bit-identical' if len(digests) == 1 else 'DIFFER: ' + ', '.join(sorted(digests))} across variants")


if __name__ == "__main__":
    main()
