"""Round 11 (issue 20): the attention products read q, k and v in place; rows come from the q/k hook.

    python benchmarks/round11_ab.py --model vit_small_patch16_224 --rounds 20

One thread, thread CPU time, medians [IQR] in ms per layer (the middle block, batch 8), interleaved in one process:
timm's eager attention with ``AttentionExtract``'s hook against the attention computed once (``outputs="eager"``);
the core products before (``matmul`` on contiguous copies, softmax over the logits) and after (one product per head
on the strided views, softmax out of place); the full maps rebuilt beside the fused kernel, before and after; the
rows of 2 query tokens from x (before, where modes come from q and k) and from the hook's q and k (after).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from round10_ab import _interleaved, eager_and_once, middle_attention, model_parser, one_thread_model, print_table  # noqa: E402  (round 10's timing loop and options)


def main() -> None:
    args = model_parser(__doc__, rounds=20).parse_args()

    import torch

    from qkhooks.attention import attention_rows, full_from_qk, maps_times_values, rows_from_qk, scaled_logits

    model, images, tokens = one_thread_model(args)
    attn, x, site, (q, k, v) = middle_attention(model, images)
    eager, attention_once = eager_and_once(attn, x, site)

    def core_before() -> torch.Tensor:  # round 10: matmul on copies, softmax written over the logits
        logits = (q * site.scale) @ k.transpose(-1, -2)
        maps = torch.ops.aten._softmax.out(logits, -1, False, out=logits)
        return (maps @ v).transpose(1, 2).reshape(x.shape)

    def core_after() -> torch.Tensor:
        maps = torch.softmax(scaled_logits(q, k, site.scale), dim=-1)
        return maps_times_values(maps, v).transpose(1, 2).reshape(x.shape)

    parts: dict[str, Callable[[], Any]] = {
        "the model's attention module (fused)": lambda: attn(x),
        "timm eager attention + AttentionExtract's hook": eager,
        "attention computed once (outputs='eager')": attention_once,
        "- its core before: matmul on copies, softmax over the logits, maps @ v, reshape": core_before,
        "- its core after: per-head products in place, softmax out of place": core_after,
        "full maps rebuilt beside the fused kernel, before (matmul on copies)":
            lambda: torch.softmax((q * site.scale) @ k.transpose(-1, -2), dim=-1),
        "full maps rebuilt beside the fused kernel, after (full_from_qk)": lambda: full_from_qk(site, q, k),
        "rows of 2 tokens from x (before, with modes from q and k)": lambda: attention_rows(site, x, tokens),
        "rows of 2 tokens from the hook's q and k (after)": lambda: rows_from_qk(site, q, k, tokens),
    }
    times = _interleaved(parts, args.rounds)
    print_table(f"{args.model}, batch {args.batch}, 1 thread, thread CPU ms per layer, medians [IQR] of {args.rounds}", times)


if __name__ == "__main__":
    main()
