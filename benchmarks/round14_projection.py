"""Round 14 (issue 20): the modes' projection computed five ways, each after the caches are flushed, as in a forward.

    python benchmarks/round14_projection.py --threads 2 --rounds 60          # ViT-S shapes, batch 8
    python benchmarks/round14_projection.py --threads 1 --batch 16 --heads 3  # ViT-Ti shapes, batch 16

Inside a forward the projection reads q and k after the model's qkv Linear has written them (and pushed them out of
the L2 cache), so each call here is preceded by a 32 MB write (the flush) and a fresh qkv ``addmm``; only the
projection is timed (wall, median [IQR] ms). For top-16 and all 64 modes per head, with the bias offsets:

- ``bmm + copy``: one (K, d_k) @ (d_k, B·N) product per side and head on the strided q/k view, then one pass into
  per-image (B, H, K, N) maps with the offsets subtracted (:class:`qkhooks.projector.QKPathProjector`'s product in
  rounds 9-14, its "batched" layout since round 15, used off the CPU);
- ``per image``: one such product per image, written in place into (B, 2H, K, N), offsets subtracted after;
- ``per image and side``: the same per image, one product per side, so each side's maps stay contiguous;
- ``per image, baddbmm``: the same with the offsets folded into ``baddbmm``;
- ``tokens-major``: (B·N, d_k) @ (d_k, K) products, then a transposing pass into per-image maps (the projector's
  "tokens" layout on the CPU for K <= d_k / 4 since round 15; "per image" is its "images" layout above that);
- ``x path``: the tokens x (B·N, d) @ (d, 2·H·K), then a pass into per-image maps (:class:`ModeProjector`'s way).
Every variant's maps are checked equal (to 1e-4) to the first's before timing.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from round10_ab import print_table  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=197)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=60)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    b, n, h, dk = args.batch, args.tokens, args.heads, args.head_dim
    d = h * dk
    x = torch.randn(b * n, d)
    w_qkv, b_qkv = torch.randn(3 * d, d) * 0.05, torch.randn(3 * d)
    flush = torch.empty(8 * 1024 * 1024)

    def timed(project: Callable[[torch.Tensor], torch.Tensor]) -> list[float]:
        times = []
        with torch.no_grad():
            for r in range(args.rounds + 5):
                flush.fill_(float(r))  # the model's other work between the qkv Linear's output and the projection
                qkv = torch.addmm(b_qkv, x, w_qkv.t()).view(b, n, 3 * d)
                start = time.perf_counter()
                project(qkv)
                if r >= 5:
                    times.append((time.perf_counter() - start) * 1e3)
        return times

    for k in (16, dk):
        w = torch.randn(2 * h, k, dk)  # (side, head) rows of (K, d_k), as the projector stacks them
        offsets = torch.randn(2 * h, k, 1)
        w_x = torch.randn(d, 2 * h * k)

        def heads(qkv: torch.Tensor) -> torch.Tensor:
            return qkv[..., :2 * d].unflatten(-1, (2 * h, dk))  # (B, N, 2H, d_k), a view

        def per_image_maps(t: torch.Tensor) -> torch.Tensor:  # (2H, K, B·N) -> (2, B, H, K, N)
            return t.view(2, h, k, b, n).permute(0, 3, 1, 2, 4)

        def bmm_and_copy(qkv: torch.Tensor) -> torch.Tensor:
            product = torch.bmm(w, heads(qkv).reshape(b * n, 2 * h, dk).permute(1, 2, 0))
            return torch.sub(per_image_maps(product), offsets.view(2, 1, h, k, 1)).contiguous()

        def per_image(qkv: torch.Tensor) -> torch.Tensor:
            out, q = torch.empty(b, 2 * h, k, n), heads(qkv)
            for i in range(b):
                torch.bmm(w, q[i].permute(1, 2, 0), out=out[i])
            return out.sub_(offsets).view(b, 2, h, k, n).transpose(0, 1)

        def per_image_side(qkv: torch.Tensor) -> torch.Tensor:
            out, q = torch.empty(2, b, h, k, n), heads(qkv)
            for i in range(b):
                for side in range(2):
                    torch.bmm(w[side * h:(side + 1) * h], q[i, :, side * h:(side + 1) * h].permute(1, 2, 0), out=out[side, i])
            return out.sub_(offsets.view(2, 1, h, k, 1))

        def per_image_baddbmm(qkv: torch.Tensor) -> torch.Tensor:
            out, q, minus = torch.empty(b, 2 * h, k, n), heads(qkv), offsets.expand(-1, -1, n)
            for i in range(b):
                torch.baddbmm(minus, w, q[i].permute(1, 2, 0), beta=-1, out=out[i])
            return out.view(b, 2, h, k, n).transpose(0, 1)

        def tokens_major(qkv: torch.Tensor) -> torch.Tensor:
            product = torch.bmm(heads(qkv).reshape(b * n, 2 * h, dk).transpose(0, 1), w.transpose(1, 2))  # (2H, B·N, K)
            return torch.sub(product.view(2, h, b, n, k).permute(0, 2, 1, 4, 3), offsets.view(2, 1, h, k, 1),
                             out=torch.empty(2, b, h, k, n))

        def x_path(qkv: torch.Tensor) -> torch.Tensor:
            return (x @ w_x).view(b, n, 2, h, k).permute(2, 0, 3, 4, 1).contiguous()

        variants = {"bmm + copy": bmm_and_copy, "per image": per_image, "per image and side": per_image_side, "per image, baddbmm": per_image_baddbmm,
                    "tokens-major": tokens_major, "x path (other weights: timed, not compared)": x_path}
        with torch.no_grad():
            qkv = torch.addmm(b_qkv, x, w_qkv.t()).view(b, n, 3 * d)
            want = bmm_and_copy(qkv)
            for name, project in list(variants.items())[1:5]:
                assert torch.allclose(project(qkv), want, atol=1e-4), name
        print_table(f"K = {k} modes per head, batch {b}, {n} tokens, {h} heads x {dk}, {args.threads} thread(s)",
                    {name: timed(project) for name, project in variants.items()})


if __name__ == "__main__":
    main()
