"""Peak RSS of ``--modes all --attention full`` recording at 300 and 3000 images (issue 14).

Each size is recorded in its own process (a small random-weight timm ViT at 64 px, so it runs in minutes on a
CPU); the child reports its peak RSS (``ru_maxrss``) and its RSS after every 100 images. Writes
``benchmarks/store_memory.json`` and prints a Markdown table for ``benchmarks/RESULTS.md``.

    PYTHONPATH=. python benchmarks/store_memory.py [--sizes 300,3000] [--workdir /tmp/qkhooks-mem]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
import torch, timm, qkhooks
from qkhooks.stream import record_dataset
torch.set_num_threads(1)
torch.manual_seed(0)
model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64).eval()
loaded = qkhooks.load_model(model)
trace = []
def rss_mb():
    with open("/proc/self/status") as fh:
        return next(int(l.split()[1]) for l in fh if l.startswith("VmRSS")) / 1024
def on_batch(batch, seen=[0]):
    seen[0] += len(batch.ids)
    if seen[0] % 100 == 0:
        trace.append([seen[0], round(rss_mb(), 1)])
t0 = time.time()
result = record_dataset(loaded, f"o3:{sys.argv[1]}:0", sys.argv[2], modes="all", attention="full", batch_size=20,
                        progress=False, on_batch=on_batch)
print(json.dumps({"images": result.images, "seconds": time.time() - t0, "trace_mb": trace,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="300,3000")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--json", default=str(Path(__file__).with_name("store_memory.json")))
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="qkhooks-mem-"))
    workdir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {}
    for n in [int(s) for s in args.sizes.split(",")]:
        out = workdir / f"mem-{n}.h5"
        for stale in workdir.glob(f"mem-{n}.h5*"):
            stale.unlink()
        load = os.getloadavg()
        done = subprocess.run([sys.executable, "-c", CHILD, str(n), str(out)], env=env, capture_output=True,
                              text=True, check=True)
        res = json.loads(done.stdout.strip().splitlines()[-1])
        res["file_mb"] = out.stat().st_size / 2**20
        res["load_before"] = [round(x, 2) for x in load]
        runs[str(n)] = res
        print(f"{n} images: peak RSS {res['peak_rss_mb']:.1f} MB, file {res['file_mb']:.0f} MB, "
              f"{res['seconds']:.0f} s", flush=True)
        for stale in workdir.glob(f"mem-{n}.h5*"):
            stale.unlink()
    sizes = sorted(runs, key=int)
    base, top = runs[sizes[0]]["peak_rss_mb"], runs[sizes[-1]]["peak_rss_mb"]
    result = {"when": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": f"{platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} cores", "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
              "python": platform.python_version(), "runs": runs, "ratio": top / base}
    Path(args.json).write_text(json.dumps(result, indent=1))
    print(f"\n| images | peak RSS (MB) | RSS at 100 / last 100 images (MB) | file (MB) | seconds |\n|---|---|---|---|---|")
    for n in sizes:
        r = runs[n]
        first, last = (r["trace_mb"][0][1], r["trace_mb"][-1][1]) if r["trace_mb"] else (None, None)
        print(f"| {n} | {r['peak_rss_mb']:.1f} | {first} / {last} | {r['file_mb']:.0f} | {r['seconds']:.0f} |")
    print(f"\npeak RSS at {sizes[-1]} / at {sizes[0]} images: {top / base:.3f}")


if __name__ == "__main__":
    main()
