"""``qkhooks record``'s ``--workers`` default, measured: record_dataset over a folder of JPEGs with 0, 1 and 2
DataLoader workers against the plain loop (no workers), interleaved round by round in one process.

    python benchmarks/workers_default.py --model vit_ti --rounds 3 --threads 1

Wall time is what a worker changes (decoding moves to another core); the CPU columns add the workers' own CPU
(children, reaped at the end of each run) to this process's, so the work a worker costs shows too.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCHMARKS), str(BENCHMARKS.parent)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="vit_ti")
    parser.add_argument("--images", type=int, default=240)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workers", default="0,1,2")
    args = parser.parse_args()

    import torch
    from torch.utils.data import DataLoader

    import qkhooks
    from harness.material import make_image_folder
    from harness.sizes import SIZES
    from qkhooks.data import collate, open_dataset
    from qkhooks.stream import record_dataset

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="qkhooks-workers-"))
    size = SIZES[args.model]
    folder = make_image_folder(work / "images", args.images, size.image)
    loaded = qkhooks.load_model(f"timm:{size.timm_name}", random_init=True)
    net = loaded.model.eval()

    def plain() -> None:
        loader = DataLoader(open_dataset(str(folder), loaded.image_config), batch_size=args.batch, collate_fn=collate)
        for item in loader:
            with torch.no_grad():
                net(item["pixel_values"])

    def recorded(workers: int):
        return lambda: record_dataset(loaded, str(folder), work / "r.h5", batch_size=args.batch, overwrite=True,
                                      progress=False, num_workers=workers)

    methods = {"plain": plain, **{f"record_w{w}": recorded(int(w)) for w in args.workers.split(",")}}
    times: dict[str, dict[str, list[float]]] = {m: {"wall": [], "cpu": []} for m in methods}
    for r in range(-1, args.rounds):  # round -1 warms up
        for name, fn in methods.items():
            children = resource.getrusage(resource.RUSAGE_CHILDREN)
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            if r >= 0:
                times[name]["wall"].append(time.perf_counter() - t0)
                times[name]["cpu"].append(time.process_time() - c0 + (after.ru_utime + after.ru_stime)
                                          - (children.ru_utime + children.ru_stime))
    plain_wall = times["plain"]["wall"]
    out = {"model": args.model, "images": args.images, "batch": args.batch, "threads": args.threads,
           "cpus": len(os.sched_getaffinity(0)), "load_after": os.getloadavg(), "methods": {}}
    for name, t in times.items():
        ratios = [a / b for a, b in zip(t["wall"], plain_wall)]
        out["methods"][name] = {"wall_s": statistics.median(t["wall"]), "cpu_s": statistics.median(t["cpu"]),
                                "wall_ratio_to_plain": statistics.median(ratios), "wall_ratios": ratios}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
