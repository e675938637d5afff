"""Round 12 (issue 20): the attention products loop over images, not heads.

    python benchmarks/round12_ab.py --model vit_small_patch16_224 --threads 2 --rounds 40

Medians [IQR] in ms per layer (the middle block, batch 8), interleaved in one process: thread CPU time with one
thread, wall time with more. timm's eager attention with ``AttentionExtract``'s hook against the attention computed
once (``outputs="eager"``, today's products); then the core alone (q·kᵀ, softmax, maps @ v into the layout the next
reshape reads) three ways: ``matmul`` on contiguous copies (timm's eager path), one product per head on the strided
views (round 11), one product per image (round 12, :func:`qkhooks.attention.scaled_logits`).
Run it on a quiet machine: with other processes on the cores, many short parallel regions of a 2-thread run wait on
each other and the figures say more about the load than about the code.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from round10_ab import _interleaved, eager_and_once, middle_attention, model_parser, one_thread_model, print_table  # noqa: E402


def main() -> None:
    parser = model_parser(__doc__, rounds=40)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch

    from qkhooks.attention import maps_times_values, scaled_logits

    model, images, _ = one_thread_model(args)
    torch.set_num_threads(args.threads)
    attn, x, site, (q, k, v) = middle_attention(model, images)
    heads = site.num_heads
    eager, attention_once = eager_and_once(attn, x, site)

    def on_copies() -> torch.Tensor:  # timm's eager path
        maps = torch.softmax((q * site.scale) @ k.transpose(-1, -2), dim=-1)
        return (maps @ v).transpose(1, 2).reshape(x.shape)

    def per_head() -> torch.Tensor:  # round 11
        logits = q.new_empty(*q.shape[:-1], k.shape[-2])
        for h in range(heads):
            torch.baddbmm(logits[:, h], q[:, h], k[:, h].transpose(-1, -2), beta=0, alpha=site.scale, out=logits[:, h])
        maps = torch.softmax(logits, dim=-1)
        out = v.new_empty(v.shape[0], maps.shape[-2], heads, v.shape[-1])
        for h in range(heads):
            torch.bmm(maps[:, h], v[:, h], out=out[:, :, h])
        return out.reshape(x.shape)

    def per_image() -> torch.Tensor:  # round 12: the library's products
        maps = torch.softmax(scaled_logits(q, k, site.scale), dim=-1)
        return maps_times_values(maps, v).transpose(1, 2).reshape(x.shape)

    with torch.no_grad():
        reference = on_copies()
        for other in (per_head, per_image):
            assert torch.allclose(other(), reference, atol=1e-5), other.__name__
    parts: dict[str, Callable[[], Any]] = {
        "timm eager attention + AttentionExtract's hook": eager,
        "attention computed once (outputs='eager')": attention_once,
        "- core: matmul on contiguous copies (timm's eager path)": on_copies,
        "- core: one product per head, strided views (round 11)": per_head,
        "- core: one product per image, strided views (round 12)": per_image,
    }
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    times = _interleaved(parts, args.rounds, clock=clock)
    what = "thread CPU" if args.threads == 1 else "wall"
    print_table(f"{args.model}, batch {args.batch}, {args.threads} thread(s), {what} ms per layer, medians [IQR] of "
                f"{args.rounds}", times)


if __name__ == "__main__":
    main()
