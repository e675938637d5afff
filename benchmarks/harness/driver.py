"""The driver: ``python benchmarks/run.py [options]`` (and ``qkhooks bench`` from a checkout) runs the sections
and merges their results into ``benchmarks/results.json``, re-rendering ``benchmarks/RESULTS.md``."""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from harness.end_to_end import end_to_end_bench
from harness.machine import HEAP_KEPT, keep_heap, load_average, machine_info
from harness.material import Bench
from harness.memory import dataset_memory, measure_memory
from harness.methods import METHODS, time_methods
from harness.micro import projection_bench, svd_bench
from harness.options import DEFAULT_NOTES, DESCRIPTION, SECTIONS, add_arguments
from harness.profiles import op_diff, profile_method
from harness.render import render_markdown, save_results
from harness.sizes import SIZES
from harness.storage import codec_bench, writer_bench
from qkhooks.cli import DefaultsHelpFormatter
from qkhooks.errors import QKHooksError


def run(args: argparse.Namespace) -> int:
    """Run the chosen sections for each model size, saving the results after each (a killed run keeps them)."""
    if args.render_only:
        data = json.loads(Path(args.json).read_text())
        notes = Path(args.notes) if args.notes else DEFAULT_NOTES
        if notes.exists():
            data["notes"] = notes.read_text()
            Path(args.json).write_text(json.dumps(data, indent=1, default=str))
        Path(args.out).write_text(render_markdown(data))
        print(f"wrote {args.out}")
        return 0
    torch.set_num_threads(args.threads)
    sizes = [s.strip() for s in args.models.split(",") if s.strip()]
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    names = [s.strip() for s in args.methods.split(",")] if args.methods else list(METHODS)
    for bad in [s for s in sizes if s not in SIZES] + [s for s in sections if s not in SECTIONS] + [
            n for n in names if n not in METHODS]:
        raise QKHooksError(f"unknown size, section or method {bad!r}; see --help (methods: {', '.join(METHODS)}).")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise QKHooksError("--device cuda, but torch sees no GPU here.")
    device = torch.device(args.device)
    if sys.argv[1:2] == ["bench"]:
        cmd = " ".join(["qkhooks bench", *map(shlex.quote, sys.argv[2:])])
    else:
        cmd = " ".join(["python benchmarks/run.py", *map(shlex.quote, sys.argv[1:])])
    machine = machine_info()
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    if threading.current_thread() is threading.main_thread():  # a killed run still removes its run files
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    tmp = tempfile.TemporaryDirectory(prefix="qkhooks-bench-", dir=args.workdir)
    workdir = Path(tmp.name)
    entries: dict[str, dict[str, Any]] = {}
    json_path, md_path = Path(args.json), Path(args.out)
    fresh = args.fresh

    def record(section: str, size: str, params: dict, fn: Callable[[], Any], dev: str = args.device) -> None:
        nonlocal fresh
        log(f"[{section}] {size} on {dev} ...")
        before, t0 = load_average(), time.perf_counter()
        result = fn()
        switched = ""
        if args.switch_interval is not None:  # kept beside the default interval's entry, and said in its parameters
            switched, params = f"/switch{args.switch_interval:g}", {**params, "switch_interval": args.switch_interval}
        if args.heap == "kept":  # the same
            switched, params = f"{switched}/heapkept", {**params, "heap": HEAP_KEPT}
        entries[f"{section}/{size}/{dev}/t{args.threads}{switched}"] = {
            "section": section, "model": size, "device": dev, "command": cmd, "params": params, "machine": machine,
            "when": datetime.datetime.now().isoformat(timespec="seconds"), "load_before": before, "load_after": load_average(),
            "seconds": time.perf_counter() - t0, "data": result}
        save_results(entries, md_path, json_path, merge=not fresh)  # save as we go: a long run killed keeps its sections
        fresh = False
        log(f"[{section}] done in {time.perf_counter() - t0:.0f} s")

    if args.heap == "kept":
        keep_heap()
    interval = sys.getswitchinterval()
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)
    try:
        for size in sizes:
            bench = Bench(size, args.batch, device, workdir / size)
            try:
                if "methods" in sections:
                    p = dict(batch=args.batch, rounds=args.rounds, warmup=args.warmup, batches_per_rep=args.batches_per_rep,
                             methods=names, threads=args.threads, bracket=args.bracket)
                    record("methods", size, p, lambda: time_methods(bench, names, args.rounds, args.warmup,
                                                                    args.batches_per_rep, log, args.bracket))
                if "memory" in sections:
                    record("memory", size, dict(batch=args.batch, steps=args.memory_steps),
                           lambda: measure_memory(size, args.batch, names, args.device, args.threads, workdir / size,
                                                  args.memory_steps, log))
                if "projection" in sections:
                    record("projection", size, dict(batch=args.batch), lambda: projection_bench(bench))
                if "svd" in sections:
                    record("svd", size, {}, lambda: svd_bench(bench), dev="cpu")
                if "writer" in sections:
                    comps = [c.strip() for c in args.compressions.split(",") if c.strip()]
                    record("writer", size, dict(batch=args.batch, compressions=comps),
                           lambda: writer_bench(bench, comps, log=log))
                if "dataset_memory" in sections and device.type == "cpu":
                    record("dataset_memory", size, dict(batch=args.batch, images=args.dataset_images),
                           lambda: dataset_memory(size, args.batch, args.dataset_images, args.threads, workdir / size, log),
                           dev="cpu")
                if "end_to_end" in sections:
                    record("end_to_end", size, dict(images=args.e2e_images, batch=16, rounds=args.e2e_rounds),
                           lambda: end_to_end_bench(size, workdir / size, args.e2e_images, 16, args.e2e_rounds, log,
                                                    device))
                if "profile" in sections:
                    def profiles() -> dict[str, Any]:
                        targets = [n for n in ("rows2", "modes_all", "full_hdf5") if n in names]
                        return {"cprofile": [profile_method(bench, n) for n in targets],
                                "ops": [op_diff(bench, n) for n in ("rows2", "modes_all") if n in names]}

                    record("profile", size, dict(batch=args.batch), profiles)
            finally:
                bench.close()
        if "codecs" in sections:
            record("codecs", "dinov2_s14", {}, lambda: codec_bench(args.threads, workdir=workdir), dev="cpu")
        data = save_results(entries, md_path, json_path, merge=not fresh)
        notes = Path(args.notes) if args.notes else DEFAULT_NOTES
        if notes.exists():
            data["notes"] = notes.read_text()
            json_path.write_text(json.dumps(data, indent=1, default=str))
            md_path.write_text(render_markdown(data))
    finally:
        sys.setswitchinterval(interval)
        tmp.cleanup()
    log(f"wrote {md_path} and {json_path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python benchmarks/run.py [options]``: the same as ``qkhooks bench [options]``."""
    parser = argparse.ArgumentParser(prog="benchmarks/run.py", description=DESCRIPTION,
                                     formatter_class=DefaultsHelpFormatter)  # as `qkhooks bench --help` shows them
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except QKHooksError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 2
