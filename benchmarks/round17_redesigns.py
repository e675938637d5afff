"""Round 17 (issue 20): two redesigns of what follows the modes' product, measured against what the library does.

    python benchmarks/round17_redesigns.py                   # ViT-Ti, batch 16, 1 thread

1. *Consumers fed in the capture hook.* The top-k reducer's token extremes and the run file's float16 copy, run
   right after each layer's product while its maps are in the cache, against the same operations at the end of
   the batch (where the reducer and the writer's hand-off run them). Thread CPU per batch, both sides of 12 layers,
   inside real recordings of a random-init model.
2. *Maps handed out token-major.* The projector's product is (S·H, B·N, K). Today a transposing pass writes
   contiguous (S, B, H, K, N) maps with the bias offsets subtracted, then the extremes reduce the last axis and the
   cast copies. The alternative subtracts in place, reduces over the token axis of the (S, H, B, N, K) block and
   lets the float16 copy transpose. Per batch (12 layers of ViT-Ti shapes), a 32 MiB buffer rewritten before each
   layer so that the maps come from memory as in a forward.

Prints ms per batch for each, medians.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from harness.options import round_parser  # noqa: E402


def main() -> None:
    args = round_parser(__doc__, threads=1, model="vit_tiny_patch16_224", batch=16, rounds=15).parse_args()

    import timm
    import torch

    import qkhooks
    from qkhooks import projector

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = timm.create_model(args.model, pretrained=False).eval()
    images = torch.randn(args.batch, 3, 224, 224)

    def consume(maps: torch.Tensor) -> None:  # what the top-k reducer and the writer's hand-off do with a map
        patches = maps[..., 1:]
        patches.amin(-1), patches.amax(-1)
        maps.to(torch.float16)

    spent = {"in the hook": [], "at the end of the batch": []}
    from_fused = projector.QKPathProjector.from_fused

    def in_hook(self, qk):
        query, key = from_fused(self, qk)
        t0 = time.thread_time()
        consume(query), consume(key)
        spent["in the hook"][-1] += time.thread_time() - t0
        return query, key

    class AtTheEnd:
        needs_inputs = False

        def update(self, batch) -> None:
            t0 = time.thread_time()
            for cap in batch.captures.values():
                consume(cap.query), consume(cap.key)
            spent["at the end of the batch"][-1] += time.thread_time() - t0

    projector.QKPathProjector.from_fused = in_hook
    try:
        for _ in range(args.rounds + 2):
            for times in spent.values():
                times.append(0.0)
            with torch.no_grad(), qkhooks.record(net, modes=16, sinks=[AtTheEnd()]) as run:
                run(images)
    finally:
        projector.QKPathProjector.from_fused = from_fused
    print(f"{args.model}, batch {args.batch}, {args.threads} thread(s), {args.rounds} forwards; ms per batch, medians")
    print("1. token extremes and float16 copy of every map")
    for where, times in spent.items():
        print(f"   {where:26s} {1000 * statistics.median(times[2:]):7.2f}")

    sides, heads, modes, tokens = 2, net.blocks[0].attn.num_heads, 16, net.patch_embed.num_patches + 1
    products = [torch.randn(sides * heads, args.batch * tokens, modes) for _ in net.blocks]
    offsets = torch.randn(sides * heads, 1, modes)
    flush = torch.empty(8 << 20)

    def as_today(product: torch.Tensor) -> None:
        maps = product.view(sides, heads, args.batch, tokens, modes).permute(0, 2, 1, 4, 3)
        out = torch.sub(maps, offsets.view(sides, 1, heads, modes, 1), out=product.new_empty(maps.shape))
        consume(out)

    def token_major(product: torch.Tensor) -> None:
        block = (product - offsets).view(sides, heads, args.batch, tokens, modes)
        block[:, :, :, 1:].amin(3), block[:, :, :, 1:].amax(3)
        block.permute(0, 2, 1, 4, 3).to(torch.float16, memory_format=torch.contiguous_format)

    print("2. after the product: offsets, token extremes, float16 copy")
    for name, fn in (("transposing pass (today)", as_today), ("token-major maps", token_major)):
        times = []
        for _ in range(args.rounds):
            total = 0.0
            for product in products:
                flush.fill_(1.0)
                t0 = time.perf_counter()
                fn(product)
                total += time.perf_counter() - t0
            times.append(total)
        print(f"   {name:26s} {1000 * statistics.median(times):7.2f}")


if __name__ == "__main__":
    main()
