"""Round 26 (issue 20): the q/k offsets subtracted inside each image's product (``baddbmm``) against a pass over all
maps after the products (``bmm`` then ``sub_``, rounds 15-25), in one process.

    python benchmarks/round26_offsets.py --threads 1 --rounds 16                        # ViT-S, batch 8
    python benchmarks/round26_offsets.py --threads 2 --rounds 16
    python benchmarks/round26_offsets.py --threads 2 --rounds 12 --model vit_base_patch16_224
    python benchmarks/round26_offsets.py --threads 1 --rounds 40 --per-layer                   # one layer's product

A random-init timm model; ``record(modes="all", attention="rows")`` (2 query tokens) with the spectrum given,
attached around each forward. The CPU's product layout for all modes is one product per image ("images"); the "old"
variant runs it as rounds 15-25 did (``torch.baddbmm`` replaced by ``bmm`` into the block, then one ``sub_`` of the
offsets over every image's maps once all products are done). Every variant once per round in random order, beside the
plain forward; prints the median [IQR] of each variant's time over the plain forward's in its round, wall and
process CPU (CPU is the one to read with one thread on a shared machine), and checks that both give the same maps.

``--per-layer``: one layer's product alone, the model's shapes (a fused qkv's q and k heads of a batch, d_k = 64, all
64 modes), both ways, the caches flushed and q/k written again before each (as the model's qkv Linear leaves them);
the median wall time over rounds, interleaved.
"""

from __future__ import annotations

import contextlib
import random
import statistics
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from harness.material import round_material  # noqa: E402
from harness.options import round_parser  # noqa: E402


@contextlib.contextmanager
def offsets_after_products():
    """``torch.baddbmm(offsets, a, b, beta=-1, out=o)`` run as rounds 15-25 ran it: ``bmm`` into ``o`` here, and the
    offsets subtracted from the whole block at the end (the first call of the next forward's layer, or on leaving)."""
    import torch

    import qkhooks.projector as projector

    pending: list[tuple] = []

    def flush() -> None:
        if pending:
            block, offsets = pending.pop()
            block.sub_(offsets)

    class OldTorch:
        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def baddbmm(offsets, a, b, *, beta, out):
            base = out._base
            if pending and pending[-1][0] is not base:
                flush()
            if not pending:
                pending.append((base, offsets))
            return torch.bmm(a, b, out=out)

    real_maps = projector.QKPathProjector._maps

    def maps(self, heads, sides):
        result = real_maps(self, heads, sides)
        flush()
        return result

    projector.torch, projector.QKPathProjector._maps = OldTorch(), maps
    try:
        yield
    finally:
        projector.torch, projector.QKPathProjector._maps = torch, real_maps


def per_layer(args) -> None:
    """One layer's all-modes product, both ways (``--per-layer``)."""
    import timm
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = timm.create_model(args.model, pretrained=False).blocks[0].attn
    b, n, h, dk = args.batch, 197, cfg.num_heads, cfg.head_dim
    qkv = torch.randn(b, n, 3 * h * dk)
    heads = qkv[..., :2 * h * dk].unflatten(-1, (2 * h, dk))
    weights, offsets = torch.randn(2 * h, dk, dk), torch.randn(2 * h, dk, 1)
    flush = torch.empty(64 << 18)

    def old() -> torch.Tensor:
        out = heads.new_empty(b, 2 * h, dk, n)
        for image in range(b):
            torch.bmm(weights, heads[image].permute(1, 2, 0), out=out[image])
        return out.sub_(offsets)

    def new() -> torch.Tensor:
        out = heads.new_empty(b, 2 * h, dk, n)
        for image in range(b):
            torch.baddbmm(offsets, weights, heads[image].permute(1, 2, 0), beta=-1, out=out[image])
        return out

    assert torch.equal(old(), new()), "the two ways gave different maps"
    times: dict[str, list[float]] = {"old": [], "new": []}
    for r in range(args.rounds):
        for name in random.sample(list(times), 2):
            flush.fill_(r)
            qkv.add_(0)
            start = time.perf_counter()
            (old if name == "old" else new)()
            times[name].append(time.perf_counter() - start)
    o, w = statistics.median(times["old"]) * 1e3, statistics.median(times["new"]) * 1e3
    print(f"{args.model} one layer, batch {b}, {args.threads} thread(s), {args.rounds} rounds: bmm + sub_ {o:.2f} ms, "
          f"baddbmm {w:.2f} ms ({w / o:.3f}x); bit-identical")


def main() -> None:
    parser = round_parser(__doc__, threads=1, model="vit_small_patch16_224", batch=8, rounds=16)
    parser.add_argument("--per-layer", action="store_true", help="one layer's product alone")
    args = parser.parse_args()
    if args.per_layer:
        return per_layer(args)

    import torch

    import qkhooks

    model, spectrum, images, query_tokens = round_material(args)
    runs = {name: qkhooks.record(model, spectrum=spectrum, modes="all", attention="rows") for name in ("new", "old")}
    context = {"new": contextlib.nullcontext, "old": offsets_after_products, "plain": contextlib.nullcontext}
    wall: dict[str, list[float]] = {name: [] for name in context}
    cpu: dict[str, list[float]] = {name: [] for name in context}
    maps: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for r in range(args.rounds + 2):  # two warm-up rounds
            for name in random.sample(list(context), len(context)):
                run = runs.get(name)
                with context[name]():
                    if run is not None:
                        run.attach()
                        run.set_batch(query_tokens=query_tokens)
                    start, start_cpu = time.perf_counter(), time.process_time()
                    model(images)
                    elapsed, elapsed_cpu = time.perf_counter() - start, time.process_time() - start_cpu
                    if run is not None:
                        maps[name] = run.last.query(5)
                        run.detach()
                if r >= 2:
                    wall[name].append(elapsed)
                    cpu[name].append(elapsed_cpu)
    assert torch.equal(maps["new"], maps["old"]), "the two ways gave different maps"
    print(f"{args.model}, batch {args.batch}, {args.threads} thread(s): plain {statistics.median(wall['plain']) * 1e3:.0f} "
          f"ms wall, {statistics.median(cpu['plain']) * 1e3:.0f} ms CPU; maps of both ways bit-identical")
    for name in ("new", "old"):
        for label, times in (("wall", wall), ("CPU", cpu)):
            ratios = [t / p for t, p in zip(times[name], times["plain"])]
            q1, _, q3 = statistics.quantiles(ratios, n=4)
            print(f"  all modes + rows, {name}, {label:4s} {statistics.median(ratios):.3f} [{q1:.3f}, {q3:.3f}]")
    paired = [(o - n) / p for n, o, p in zip(cpu["new"], cpu["old"], cpu["plain"])]
    q1, _, q3 = statistics.quantiles(paired, n=4)
    print(f"  old - new, CPU, in plain forwards: {statistics.median(paired):.4f} [{q1:.4f}, {q3:.4f}]")


if __name__ == "__main__":
    main()
