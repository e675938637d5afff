"""Round 35 (issue 20, full maps): one layer's attention on the CPU, computed as three whole-batch passes (round 12's
per-image logits, one softmax over the batch, per-image maps @ v) against one pass per image
(:func:`qkhooks.sdpa.softmax_attention`; :func:`~qkhooks.sdpa.softmax_maps` for maps alone), with timm's eager
attention (what ``AttentionExtract`` runs) and torch's fused kernel beside them. Both qkhooks variants give the same
bits (checked here); only the order of the work differs.

Interleaved rounds, medians, and each variant's median per-round ratio to the whole-batch passes that compute
the same things (the maps alone against the maps alone).

    python benchmarks/round35_fused.py [--threads 1] [--heads 6] [--batch 8] [--tokens 197] [--rounds 40]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> int:
    from qkhooks.sdpa import maps_times_values, scaled_logits, softmax_attention, softmax_maps

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--heads", type=int, default=6, help="6: ViT-S, 12: ViT-B")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tokens", type=int, default=197)
    p.add_argument("--rounds", type=int, default=40)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    b, h, n, d = args.batch, args.heads, args.tokens, 64
    qkv = torch.randn(b, n, 3, h, d, generator=torch.Generator().manual_seed(0)).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # strided views of one fused Linear output, as the model hands them over
    scale = d ** -0.5

    def whole_batch() -> tuple[torch.Tensor, torch.Tensor]:
        maps = torch.softmax(scaled_logits(q, k, scale), dim=-1)
        return maps, maps_times_values(maps, v)

    def per_image() -> tuple[torch.Tensor, torch.Tensor]:
        return softmax_attention(q, k, v, scale)

    def whole_batch_maps() -> torch.Tensor:
        return torch.softmax(scaled_logits(q, k, scale), dim=-1)

    def per_image_maps() -> torch.Tensor:
        return softmax_maps(q, k, scale)

    def timm_eager() -> tuple[torch.Tensor, torch.Tensor]:  # timm.layers.Attention with fused_attn off
        attn = ((q * scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        return attn, (attn @ v).transpose(1, 2).reshape(b, n, h * d)

    def fused() -> torch.Tensor:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    old, new = whole_batch(), per_image()
    assert torch.equal(old[0], new[0]) and torch.equal(old[1], new[1]), "the per-image pass changed the values"
    assert torch.equal(whole_batch_maps(), per_image_maps())
    variants = {"maps + output, whole-batch passes": whole_batch, "maps + output, per image (softmax_attention)": per_image,
                "maps only, whole-batch passes": whole_batch_maps, "maps only, per image": per_image_maps,
                "timm eager attention (AttentionExtract's)": timm_eager, "torch fused SDPA (no maps)": fused}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(args.rounds + 2):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            if r >= 2:
                times[name].append(time.perf_counter() - t0)
    # each row against the whole-batch passes that compute the same things: the maps alone against theirs
    against = {name: "maps only, whole-batch passes" if name.startswith("maps only") else
               "maps + output, whole-batch passes" for name in variants}
    print(f"one attention layer, batch {b}, {h} heads, {n} tokens, d_k {d}, {args.threads} thread(s), "
          f"{args.rounds} interleaved rounds; ratio: median per-round time over its whole-batch passes'")
    for name, t in times.items():
        ratio = statistics.median(x / y for x, y in zip(t, times[against[name]]))
        print(f"  {name:48s} {statistics.median(t) * 1e3:7.2f} ms   {ratio:.3f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
