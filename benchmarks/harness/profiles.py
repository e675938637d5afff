"""Where the time of a recording goes: cProfile on qkhooks functions, and torch.profiler's ops over a plain forward."""

from __future__ import annotations

import cProfile
import os
import pstats
import time
from pathlib import Path
from typing import Any

import torch

from harness.material import Bench
from harness.methods import METHODS


def profile_method(bench: Bench, name: str, steps: int = 3) -> dict[str, Any]:
    """cProfile attribution of one method's forwards to qkhooks functions (cumulative ms per batch)."""
    import qkhooks

    pkg = str(Path(qkhooks.__file__).parent)
    runner = METHODS[name].build(bench)
    runner.attach()
    try:
        with torch.no_grad():
            runner.step(bench.images)
            runner.end_rep()
            prof = cProfile.Profile()
            t0 = time.perf_counter()
            prof.enable()
            for _ in range(steps):
                runner.step(bench.images)
            runner.end_rep()
            prof.disable()
            wall = time.perf_counter() - t0
    finally:
        runner.detach()
        runner.close()
    stats = pstats.Stats(prof)
    rows = []
    for (filename, line, func), (_, ncalls, _, cumtime, _) in stats.stats.items():  # type: ignore[attr-defined]
        if filename.startswith(pkg):
            rel = os.path.relpath(filename, os.path.dirname(pkg))
            rows.append({"function": f"{rel}:{line}({func})", "calls_per_batch": ncalls / steps,
                         "cum_ms_per_batch": 1000 * cumtime / steps, "share_of_wall": cumtime / wall})
    rows.sort(key=lambda r: -r["cum_ms_per_batch"])
    return {"method": name, "steps": steps, "wall_ms_per_batch": 1000 * wall / steps, "functions": rows[:10]}


def op_diff(bench: Bench, name: str, base: str = "plain", steps: int = 2, top: int = 8) -> dict[str, Any]:
    """Torch ops whose self CPU time grows most from ``base`` to ``name`` (torch.profiler, ``steps`` forwards)."""
    from torch.profiler import ProfilerActivity, profile

    def ops(method: str) -> dict[str, float]:
        runner = METHODS[method].build(bench)
        runner.attach()
        try:
            with torch.no_grad():
                runner.step(bench.images)
                activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if bench.device.type == "cuda" else [])
                with profile(activities=activities) as prof:
                    for _ in range(steps):
                        runner.step(bench.images)
                    runner.end_rep()
        finally:
            runner.detach()
            runner.close()
        return {e.key: e.self_cpu_time_total / 1000 / steps for e in prof.key_averages()}

    a, b = ops(base), ops(name)
    diff = sorted(((k, b.get(k, 0.0) - a.get(k, 0.0), b.get(k, 0.0)) for k in set(a) | set(b)), key=lambda t: -t[1])
    return {"method": name, "base": base, "total_base_ms": sum(a.values()), "total_ms": sum(b.values()),
            "ops": [{"op": k, "extra_ms_per_batch": d, "ms_per_batch": t} for k, d, t in diff[:top]]}
