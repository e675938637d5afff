"""The per-batch fixed cost of ``with qkhooks.record(model, modes=16):`` entered around every forward, counted rather
than timed: per batch, the Python function calls (all, and those in qkhooks' own files), the torch operators dispatched
(a ``TorchDispatchMode``), the tensors allocated (outputs whose storage is none of the inputs': count and MB) and the
bytes of W_q/W_k compared bit for bit (``spectrum._same_bits``), against the plain forward; then process CPU time per
batch (``time.process_time``, one torch thread, interleaved rounds, median), which a loaded machine disturbs less than
wall time. A random-init timm ViT-S/16.

    PYTHONPATH=. python benchmarks/round51_fixed_cost.py [--batches 1,8] [--rounds 15] [--json out.json]

Counts are exact and repeatable (the same on any machine); the CPU times are not (the machine, its load).
Run it from another checkout's root (``PYTHONPATH=/path/to/other``) to count that code: it imports whatever
``qkhooks`` is on the path and prints which.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class _Ops(TorchDispatchMode):
    """Counts every torch operator dispatched and the tensors it allocates (an output whose storage is no input's)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()
        self.allocations = 0
        self.allocated_bytes = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        out = func(*args, **kwargs)
        self.ops[func.overloadpacket.__name__] += 1
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes() and t.untyped_storage().data_ptr() not in inputs:
                self.allocations += 1
                self.allocated_bytes += t.untyped_storage().nbytes()
        return out


def _python_calls(step: Callable[[], Any]) -> tuple[int, int]:
    """(all Python function calls, those in qkhooks' files) of one call of ``step`` (``sys.setprofile``)."""
    counts = [0, 0]

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event == "call":
            counts[0] += 1
            counts[1] += "/qkhooks/" in frame.f_code.co_filename

    sys.setprofile(profile)
    try:
        step()
    finally:
        sys.setprofile(None)
    return counts[0], counts[1]


def _compared_bytes(step: Callable[[], Any]) -> int:
    """Bytes of W_q/W_k copies compared bit for bit with the weights in one call of ``step``."""
    spectrum_module = sys.modules["qkhooks.spectrum"]
    original = spectrum_module._same_bits
    seen = [0]

    def counting(copy: tuple, now: tuple) -> bool:
        seen[0] += sum(t.numel() * t.element_size() for t in copy)
        return original(copy, now)

    spectrum_module._same_bits = counting
    try:
        step()
    finally:
        spectrum_module._same_bits = original
    return seen[0]


def count(step: Callable[[], Any]) -> dict[str, Any]:
    """The deterministic counts of one batch (after two warm-up batches)."""
    step()
    step()
    calls, own = _python_calls(step)
    with _Ops() as ops:
        step()
    return {"python_calls": calls, "qkhooks_calls": own, "torch_ops": sum(ops.ops.values()), "allocations": ops.allocations,
            "allocated_mb": round(ops.allocated_bytes / 1e6, 2), "weights_compared_mb": round(_compared_bytes(step) / 1e6, 2),
            "ops": dict(ops.ops.most_common())}


def cpu_times(steps: dict[str, Callable[[], Any]], rounds: int, held: Any) -> dict[str, dict[str, float]]:
    """Process CPU ms a batch, methods interleaved round by round (order rotated): median per method, and the median of
    the paired difference from the plain forward of the same round. ``held``: a recording attached around its own
    timed forward only (its hooks' cost without entering and leaving the context)."""
    steps = {**steps, "record(modes=16) held open, no sinks": steps["plain"]}
    names = list(steps)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds + 1):  # the first round warms up
        for n in names[r % len(names):] + names[:r % len(names)]:
            opened = n.endswith("held open, no sinks")
            if opened:
                held.attach()
            t0 = time.process_time()
            steps[n]()
            spent = (time.process_time() - t0) * 1e3
            if opened:
                held.detach()
            if r:
                times[n].append(spent)
    plain = times["plain"]
    return {n: {"median_ms": round(statistics.median(v), 2),
                "paired_extra_ms": round(statistics.median(a - b for a, b in zip(v, plain)), 2)} for n, v in times.items()}


def _commit(path: Path) -> str:
    try:
        return subprocess.run(["git", "-C", str(path), "describe", "--always", "--dirty"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", default="1,8")
    p.add_argument("--rounds", type=int, default=15, help="interleaved rounds of the CPU-time part (0: counts only)")
    p.add_argument("--json", default=None)
    args = p.parse_args()

    import timm

    import qkhooks
    from qkhooks.analysis.recipes import default_reducers

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False).eval()
    code = Path(qkhooks.__file__).resolve().parent.parent
    print(f"qkhooks from {code} ({_commit(code)}), torch {torch.__version__}, timm {timm.__version__}, 1 torch thread")
    results: dict[str, Any] = {"qkhooks": str(code), "commit": _commit(code)}
    for batch in (int(b) for b in args.batches.split(",")):
        images = torch.randn(batch, 3, 224, 224)
        held = qkhooks.record(model, modes=16, keep_last=False)
        reduced = qkhooks.record(model, modes=16, keep_last=False, sinks=default_reducers(16, [], False))

        def plain() -> Any:
            return model(images)

        def per_batch() -> Any:
            with qkhooks.record(model, modes=16) as run:
                model(images)
            return run.last

        def held_step() -> Any:
            return model(images)

        steps = {"plain": plain, "record(modes=16) entered per batch": per_batch}
        rows = {name: count(step) for name, step in steps.items()}
        for name, recording in (("record(modes=16) held open, no sinks", held),
                                ("held open + default reducers (top-k, anisotropy)", reduced)):
            recording.attach()
            try:
                rows[name] = count(held_step)
            finally:
                recording.detach()
        print(f"\nbatch {batch}: per batch | Python calls (qkhooks) | torch ops | allocations (MB) | W_q/W_k compared MB")
        for name, row in rows.items():
            print(f"  {name:52s} {row['python_calls']:6d} ({row['qkhooks_calls']:5d}) | {row['torch_ops']:5d} | "
                  f"{row['allocations']:4d} ({row['allocated_mb']:7.2f}) | {row['weights_compared_mb']:.2f}")
        results[f"batch{batch}"] = {"counts": rows}
        if args.rounds:
            times = cpu_times(steps, args.rounds, held)
            results[f"batch{batch}"]["cpu"] = times
            for name, t in times.items():
                print(f"  CPU {name:48s} median {t['median_ms']:8.2f} ms, paired extra {t['paired_extra_ms']:+7.2f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
