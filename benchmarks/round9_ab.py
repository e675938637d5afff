"""Round 9 (issue 20), before and after in one process: the same hooked forwards with the previous projector and
site search (commit f7781d7's ``QKPathProjector``, ``find_sites`` at every ``record()`` entry) and with this round's,
interleaved round by round with the plain forward, so a loaded machine moves all of them alike.

    python benchmarks/round9_ab.py --model vit_small_patch16_224 --rounds 8 --threads 1

Rows: ``modes_all_rows2`` (all modes + the rows of 2 query tokens, spectrum given) and ``modes16_per_batch``
(``record(modes=16)`` entered around every forward, no spectrum given), each ``_before`` and ``_after``; ratios are
per-round process CPU (1 thread) or wall time (more threads) over the plain forward of the same round.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
import types
import weakref
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]
BEFORE = "f7781d7"


def _old_projector_class() -> type:
    """The previous QKPathProjector (one product per image and head), with the fused entry the capture now calls
    done the previous way: q and k sliced off the qkv output."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{BEFORE}:qkhooks/projector.py"], check=True,
                            capture_output=True, text=True).stdout
    module = types.ModuleType("projector_before")
    exec(compile(source, "projector_before.py", "exec"), module.__dict__)
    old = module.QKPathProjector

    class Before(old):  # type: ignore[misc, valid-type]
        def from_fused(self, qk):
            width = self.a.shape[0] * self.a.shape[1]
            return self.from_linear(qk[..., :width], qk[..., width:2 * width])

    return Before


def main() -> None:
    from round10_ab import model_parser  # the options every round's A/B script takes

    parser = model_parser(__doc__, rounds=8)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--parts", action="store_true", help="time the changed parts alone instead (1 thread, "
                        "thread CPU, interleaved): one layer's projection and record()'s entry and exit")
    args = parser.parse_args()

    import timm
    import torch

    import qkhooks
    from qkhooks import capture
    from qkhooks.models.base import find_sites

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False).eval()
    images = torch.randn(args.batch, 3, 224, 224)
    grid = 224 // model.patch_embed.patch_size[0]
    tokens = torch.tensor([[0, 1 + (grid // 2) * grid + grid // 2]] * args.batch)
    spectrum = qkhooks.spectrum(model)
    before_class = _old_projector_class()

    @contextlib.contextmanager
    def before():
        """The previous code paths: old projector class (its own projector cache), sites searched at every entry."""
        saved = capture.QKPathProjector, capture._LAYER_MODES, capture.model_sites
        capture.QKPathProjector, capture._LAYER_MODES = before_class, BEFORE_CACHE
        capture.model_sites = lambda m, layers: find_sites(m, layers)
        try:
            yield
        finally:
            capture.QKPathProjector, capture._LAYER_MODES, capture.model_sites = saved

    BEFORE_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
    runs = {}
    with before():
        runs["modes_all_rows2_before"] = qkhooks.record(model, modes="all", attention="rows", spectrum=spectrum)
    runs["modes_all_rows2_after"] = qkhooks.record(model, modes="all", attention="rows", spectrum=spectrum)
    assert isinstance(runs["modes_all_rows2_before"]._from_qk[0], before_class)

    def hooked(name):
        def step():
            run = runs[name]
            run.attach()
            try:
                run.set_batch(query_tokens=tokens)
                model(images)
            finally:
                run.detach()
        return step

    def per_batch(old: bool):
        def step():
            with before() if old else contextlib.nullcontext():
                with qkhooks.record(model, modes=16):
                    model(images)
        return step

    if args.parts:
        print(json.dumps(_parts(model, images, before, args.rounds), indent=1))
        return
    methods = {"plain": lambda: model(images), "modes_all_rows2_before": hooked("modes_all_rows2_before"),
               "modes_all_rows2_after": hooked("modes_all_rows2_after"), "modes16_per_batch_before": per_batch(True),
               "modes16_per_batch_after": per_batch(False)}
    clock = time.process_time if args.threads == 1 else time.perf_counter
    times: dict[str, list[float]] = {m: [] for m in methods}
    loads = [os.getloadavg()[0]]
    with torch.no_grad():
        for r in range(-args.warmup, args.rounds):
            order = list(methods) if r % 2 == 0 else list(methods)[::-1]
            for name in order:
                t0 = clock()
                methods[name]()
                if r >= 0:
                    times[name].append(clock() - t0)
            loads.append(os.getloadavg()[0])
    out = {"model": args.model, "batch": args.batch, "threads": args.threads, "rounds": args.rounds,
           "clock": "process CPU" if args.threads == 1 else "wall", "load_1min": [min(loads), max(loads)], "rows": {}}
    for name, t in times.items():
        ratios = sorted(a / b for a, b in zip(t, times["plain"]))
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        out["rows"][name] = {"ms": 1000 * statistics.median(t), "ratio_to_plain": statistics.median(ratios),
                             "iqr": [q[0], q[2]]}
    print(json.dumps(out, indent=1))


def _parts(model, images, before, rounds: int) -> dict:
    """Per layer (the middle block): the all-modes projection before (q and k sliced off the qkv output, one
    product per image and head) and after (one product per side and head over the batch); the model's block and
    its attention module for scale; ``record(modes=16)`` entered and left with no forward, before and after."""
    import torch

    import qkhooks

    block = model.blocks[len(model.blocks) // 2]
    with torch.no_grad():
        x = block.norm1(model._pos_embed(model.patch_embed(images)))
        qkv = block.attn.qkv(x)
        run = qkhooks.record(model, modes="all", spectrum=qkhooks.spectrum(model))
        after = run._from_qk[len(model.blocks) // 2]
        with before():
            old = qkhooks.record(model, modes="all", spectrum=qkhooks.spectrum(model))._from_qk[len(model.blocks) // 2]

        def entry(old_paths: bool):
            def step():
                with before() if old_paths else contextlib.nullcontext():
                    with qkhooks.record(model, modes=16):
                        pass
            return step

        parts = {"block": lambda: block(x),
                 "attention module": lambda: block.attn(x), "projection_before": lambda: old.from_fused(qkv),
                 "projection_after": lambda: after.from_fused(qkv), "entry_before": entry(True), "entry_after": entry(False)}
        for a, b in zip(old.from_fused(qkv), after.from_fused(qkv)):
            assert torch.equal(a, b)  # the same maps, bit for bit
        times: dict[str, list[float]] = {k: [] for k in parts}
        for r in range(-1, rounds):
            for name, fn in parts.items():
                t0 = time.thread_time()
                fn()
                if r >= 0:
                    times[name].append(1000 * (time.thread_time() - t0))
    return {"model_layers": len(model.blocks), "batch": images.shape[0], "rounds": rounds, "load_1min": os.getloadavg()[0],
            "ms_median_iqr": {k: [statistics.median(v), *statistics.quantiles(v, n=4)[::2]] for k, v in times.items()}}


if __name__ == "__main__":
    main()
