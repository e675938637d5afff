"""Throughput of `qkhooks record` with 1 and 2 processes (torchrun, gloo, CPU) on this machine.

    .venv/bin/python benchmarks/distributed_throughput.py [--images 96] [--repeats 2] [--json out.json]

Each configuration records the same images into a fresh folder and reports two rates:

- ``record img/s``: images / seconds of the recording itself, measured inside the workers from "model loaded,
  all ranks ready" to "merged run file written" (so it includes waiting for the slowest rank and the merge);
- ``end-to-end img/s``: images / wall seconds of the whole command, process start-up, imports and model build
  included (what a user waits for).

Configurations: one process with torch's default thread count, one process with 1 thread, and torchrun with
2 processes of 1 thread each (torchrun's default OMP_NUM_THREADS=1), interleaved over the repeats; the best run
of each counts (the machine may be shared). The merged 2-process file is checked to equal the 1-process file
(same ids, same arrays) before the numbers are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WORKER = r'''
import json, os, sys, time
import torch
import qkhooks
from qkhooks.stream import record_dataset

out, model, data, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
kw = dict(modes=16, attention="rows", batch_size=16, progress=False)
if threads:
    torch.set_num_threads(threads)
loaded = qkhooks.load_model(model, random_init=True)
if int(os.environ.get("WORLD_SIZE", "1")) > 1:
    import torch.distributed as dist
    from qkhooks.distributed import record_dataset_distributed, _exchange
    dist.init_process_group("gloo")
    _exchange(None, lambda _: None)  # every rank has its model: start the clock together
    start = time.perf_counter()
    result = record_dataset_distributed(loaded, data, out, **kw)
    seconds = time.perf_counter() - start
    if dist.get_rank() == 0:
        print(json.dumps({"images": result.images, "seconds": seconds, "threads": torch.get_num_threads()}))
    dist.destroy_process_group()
else:
    start = time.perf_counter()
    result = record_dataset(loaded, data, out, **kw)
    seconds = time.perf_counter() - start
    print(json.dumps({"images": result.images, "seconds": seconds, "threads": torch.get_num_threads()}))
'''


def run(cmd: list[str], cwd: Path, env: dict[str, str]) -> tuple[dict, float]:
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}")
    line = [l for l in done.stdout.splitlines() if l.startswith("{")][-1]
    return json.loads(line), wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="timm:vit_small_patch16_224")
    p.add_argument("--images", type=int, default=96)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    data = f"o3:{args.images}:1"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "OMP_NUM_THREADS")}
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    configs = {
        "1 process, default threads": ([sys.executable, "worker.py"], 0, {}),
        "1 process, 1 thread": ([sys.executable, "worker.py"], 1, {"OMP_NUM_THREADS": "1"}),
        "2 processes (torchrun), 1 thread each": (
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "worker.py"], 0, {}),
    }
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "worker.py").write_text(WORKER)
        for repeat in range(args.repeats):  # configurations interleaved, so a busy spell hits all of them alike
            for name, (cmd, threads, extra) in configs.items():
                folder = tmp / f"{len(results)}"
                folder.mkdir()
                shutil.copy(tmp / "worker.py", folder / "worker.py")
                inner, wall = run(cmd + ["run.h5", args.model, data, str(threads)], folder, {**env, **extra})
                results.append({"config": name, "repeat": repeat, "images": inner["images"], "threads": inner["threads"],
                                "record_s": inner["seconds"], "wall_s": wall,
                                "record_img_s": inner["images"] / inner["seconds"], "end_to_end_img_s": inner["images"] / wall,
                                "folder": str(folder)})
                print(f"{name:40s} run {repeat}: {results[-1]['record_img_s']:6.1f} img/s recording, "
                      f"{results[-1]['end_to_end_img_s']:6.1f} img/s end to end", flush=True)
        _check_equal(Path(results[0]["folder"]) / "run.h5", Path(results[2]["folder"]) / "run.h5")
    summary = {}
    for name in configs:
        rows = [r for r in results if r["config"] == name]
        summary[name] = {"record_img_s": max(r["record_img_s"] for r in rows),
                         "end_to_end_img_s": max(r["end_to_end_img_s"] for r in rows), "threads": rows[0]["threads"]}
    print(f"\n{args.model}, {args.images} odd-one-out images, 16 modes x all layers + attention rows, batch 16, "
          f"default reducers; best of {args.repeats}; {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()})")
    print(f"| configuration | torch threads per process | record img/s | end-to-end img/s |\n|---|---|---|---|")
    for name, s in summary.items():
        print(f"| {name} | {s['threads']} | {s['record_img_s']:.1f} | {s['end_to_end_img_s']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "images": args.images, "cpus": os.cpu_count(),
                                               "runs": [{k: v for k, v in r.items() if k != "folder"} for r in results],
                                               "summary": summary}, indent=1))


def _check_equal(single: Path, merged: Path) -> None:
    import numpy as np

    from qkhooks.store import open_run

    with open_run(single) as a, open_run(merged) as b:
        assert a.ids == b.ids and a.arrays() == b.arrays(), "the 2-process run differs from the 1-process run"
        for name in a.arrays():
            assert np.array_equal(a.array(name)[:], b.array(name)[:]), name
    print("the merged 2-process run file equals the 1-process one (ids and every per-image array)")


if __name__ == "__main__":
    main()
