"""Round 28 (issue 20, end to end on ViT-Ti): the top-16 modes' q/k-path product in four layouts, one layer's shapes
(ViT-Ti, batch 16: 3 heads of 64, 16 modes, q and k side by side in the qkv Linear's output), thread CPU, caches
flushed and q/k written again before each, 40 interleaved rounds, medians. Asserts that every layout gives the
library's maps ("tokens", the current layout on the CPU for few modes) exactly.

    python benchmarks/round28_layouts.py

Round 28 on the AMD EPYC VM (1 thread), two runs: tokens 1.29 / 1.91 ms, one product over the batch (the accelerator's
layout, the same contiguous output) 1.14 / 0.93, block-diagonal Linear 3.11 / 2.89, one product per image 1.18 / 1.17.
Round 15 chose "tokens" on the CPU for few modes (18-26 % faster then); these runs disagree, so round 29 ran the
whole-forward A/B (``benchmarks/round29_layout_ab.py``): no difference, "tokens" stays.
"""

from __future__ import annotations

import statistics
import time

import torch


def main() -> None:
    torch.set_num_threads(1)
    B, N, H, dk, K = 16, 197, 3, 64, 16
    lin = torch.randn(B, N, 3 * H * dk)
    heads = lin[..., :2 * H * dk].unflatten(-1, (2 * H, dk))  # (B, N, S·H, dk), a view of the Linear's output
    W, off = torch.randn(2 * H, K, dk), torch.randn(2 * H, K, 1)
    tokens = heads.reshape(B * N, 2 * H, dk)
    block = torch.block_diag(*W)  # (S·H·K, S·H·dk)
    flush = torch.empty(16 * 1024 * 1024 // 4)

    def tokens_major() -> torch.Tensor:  # the library's: (S·H, B·N, K), then a transposing pass with the offsets
        maps = torch.bmm(tokens.transpose(0, 1), W.transpose(1, 2)).view(-1, H, B, N, K).permute(0, 2, 1, 4, 3)
        return torch.sub(maps, off.view(-1, 1, H, K, 1), out=heads.new_empty(maps.shape))

    def over_batch() -> torch.Tensor:  # (S·H, K, B·N), then a permuting copy
        out = torch.baddbmm(off, W, tokens.permute(1, 2, 0), beta=-1)
        return out.view(2, H, K, B, N).permute(0, 3, 1, 2, 4).contiguous()

    def block_diagonal() -> torch.Tensor:  # one Linear on the q/k block, zeros off the diagonal
        out = torch.addmm(-off.reshape(-1), lin.reshape(B * N, -1)[:, :2 * H * dk], block.t())
        return out.view(B, N, 2, H, K).permute(2, 0, 3, 4, 1).contiguous()

    def per_image() -> torch.Tensor:
        out = heads.new_empty(B, 2 * H, K, N)
        for i in range(B):
            torch.baddbmm(off, W, heads[i].permute(1, 2, 0), beta=-1, out=out[i])
        return out.view(B, 2, H, K, N).transpose(0, 1)

    layouts = [tokens_major, over_batch, block_diagonal, per_image]
    reference = tokens_major()
    for f in layouts[1:]:
        torch.testing.assert_close(f(), reference, rtol=0, atol=1e-5)
    times: dict[str, list[float]] = {f.__name__: [] for f in layouts}
    for r in range(40):
        for f in layouts:
            flush.fill_(r)
            lin.add_(0.0)
            t0 = time.thread_time()
            f()
            times[f.__name__].append(time.thread_time() - t0)
    for name, t in times.items():
        print(f"{name}: {1000 * statistics.median(t):.3f} ms")


if __name__ == "__main__":
    main()
