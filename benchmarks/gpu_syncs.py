"""Where a recording makes the host wait for the GPU: every host-device synchronisation in steady state, by the
qkhooks line that caused it (torch's sync debug mode), per configuration. A synchronisation in a hook stalls the
model's forward once per layer; one per batch in a reducer stalls it once per batch. GPU only; run on a lent GPU:

    python benchmarks/gpu_syncs.py [--model vit_small_patch16_224] [--batch 32] [--json out.json]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

import qkhooks

PACKAGE = os.path.dirname(qkhooks.__file__) + os.sep


def synchronisations(step: Callable[[], Any], steps: int = 3) -> dict[str, int]:
    """Run ``step`` once (warm-up: spectra, probes, first allocations), then ``steps`` times under torch's sync debug
    mode; the count of synchronisations per qkhooks source line (the innermost qkhooks frame of each)."""
    step()
    torch.cuda.synchronize()
    seen: collections.Counter[str] = collections.Counter()

    def note(message, category, filename, lineno, file=None, line=None) -> None:
        if "prototype" in str(message):  # torch's notice that the debug mode is new, not a synchronisation
            return
        ours = [f for f in traceback.extract_stack()[:-1] if f.filename.startswith(PACKAGE)]
        frame = ours[-1] if ours else None
        seen[f"{frame.filename[len(PACKAGE):]}:{frame.lineno} ({frame.name})" if frame else f"{filename}:{lineno}"] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = note
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                step()
            torch.cuda.set_sync_debug_mode(0)
            torch.cuda.synchronize()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return {where: count // steps if count % steps == 0 else count / steps for where, count in seen.most_common()}


def main() -> int:
    import timm
    from qkhooks.analysis.modes import AnisotropyReducer, TopKModes
    from qkhooks.store import RunWriter
    from qkhooks.stream import WriterSink

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit_small_patch16_224")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("no GPU: nothing to measure", file=sys.stderr)
        return 2
    net = timm.create_model(args.model, pretrained=False).eval().cuda()
    images = torch.randn(args.batch, 3, 224, 224, device="cuda")
    tmp = tempfile.TemporaryDirectory(prefix="qkhooks-syncs-")
    writer = RunWriter(Path(tmp.name) / "syncs.h5", mode="overwrite")
    configs: dict[str, dict[str, Any]] = {
        "capture": {"modes": None},
        "modes16": {"modes": 16},
        "rows": {"modes": None, "attention": "rows"},
        "full": {"modes": None, "attention": "full"},
        "full_eager": {"modes": None, "attention": "full", "outputs": "eager"},
        "topk_reducer": {"modes": 16, "sinks": [TopKModes()]},
        "anisotropy_reducer": {"modes": 16, "sinks": [AnisotropyReducer()]},
        "writer": {"modes": 16, "attention": "rows", "sinks": [WriterSink(writer)]},
    }
    found: dict[str, dict[str, Any]] = {}

    def show(name: str) -> None:
        print(f"{name}: {sum(found[name].values())} per batch", flush=True)
        for where, count in found[name].items():
            print(f"    {count} x {where}", flush=True)

    for name, options in configs.items():
        with qkhooks.record(net, **options) as run, torch.no_grad():
            found[name] = synchronisations(lambda: run(images))
        show(name)

    def entered_per_batch() -> None:  # as README's quick start does: record() around every forward
        with qkhooks.record(net, modes=16) as run, torch.no_grad():
            run(images)

    found["modes16_entered_per_batch"] = synchronisations(entered_per_batch)
    show("modes16_entered_per_batch")
    writer.close()
    tmp.cleanup()
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "batch": args.batch,
                                               "gpu": torch.cuda.get_device_name(0), "per_batch": found}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
