"""Round 10 (issue 20): the hot path's parts, timed alone on the real layer's tensors, interleaved, in one process.

    python benchmarks/round10_ab.py --model vit_small_patch16_224 --rounds 20

One thread, thread CPU time (``time.thread_time``), medians [IQR] in ms per layer (the middle block, batch 8):
the model's block, attention module and qkv Linear for scale; the all-modes projection (``from_fused``, and its
parts: the batched product, the offsets, the permute copy, and ``baddbmm`` with the offsets folded in, which was
measured and not kept); the rows of 2 query tokens from x (kept) and from the model's q and k; the full maps rebuilt
beside the fused kernel before (out-of-place softmax) and after (written over the logits); the attention computed
once (``outputs="eager"``) against timm's eager attention with ``AttentionExtract``'s hook; ``record(modes=16)``
entered and left with no forward (the site copies). ``--faults`` counts the minor page faults of whole forwards.
"""

from __future__ import annotations

import argparse
import copy
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]


def _summary(values: list[float]) -> str:
    q = statistics.quantiles(values, n=4)
    return f"{statistics.median(values):.2f} [{q[0]:.2f}, {q[2]:.2f}]"


def _interleaved(parts: dict[str, Callable[[], Any]], rounds: int, warmup: int = 2,
                 clock: Callable[[], float] = time.thread_time) -> dict[str, list[float]]:
    """ms per call of each part, the parts run in turn each round; thread CPU time unless another clock is given
    (wall time where torch runs on more than one thread)."""
    import torch

    times: dict[str, list[float]] = {name: [] for name in parts}
    with torch.no_grad():
        for r in range(rounds + warmup):
            for name, part in parts.items():
                start = clock()
                part()
                if r >= warmup:
                    times[name].append((clock() - start) * 1e3)
    return times


def print_table(title: str, times: dict[str, list[float]]) -> None:
    """The A/B scripts' output: a title line, then one Markdown row per part with its median [IQR]."""
    print(title)
    print("| part | ms |\n|---|---|")
    for name, values in times.items():
        print(f"| {name} | {_summary(values)} |")


def middle_attention(model: Any, images: Any) -> tuple[Any, Any, Any, tuple[Any, Any, Any]]:
    """The middle block's attention module, the tokens x it gets for ``images``, its attention site, and its q, k, v
    as strided (B, H, N, d) views of the fused qkv Linear's output, as the hooks see them."""
    import torch

    import qkhooks
    from qkhooks.attention import split_heads

    middle = len(model.blocks) // 2
    attn, seen = model.blocks[middle].attn, {}
    hook = attn.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
    with torch.no_grad():
        model(images)
    hook.remove()
    site = qkhooks.sites(model)[middle]
    width = site.num_heads * site.head_dim
    with torch.no_grad():
        qkv = attn.qkv(seen["x"])
    return attn, seen["x"], site, tuple(split_heads(site, qkv[..., i * width:(i + 1) * width]) for i in range(3))


def _own_copy_before(site: Any) -> Any:
    """Round 9's ``capture._own_copy`` (commit 46de4db), for the entry's before/after."""
    import dataclasses
    import inspect

    copied = dataclasses.replace(site)
    for name, value in vars(site).items():
        if inspect.ismethod(value) and value.__self__ is site:
            value = value.__func__.__get__(copied)
        elif any(cell.cell_contents is site for cell in getattr(value, "__closure__", None) or ()):
            return None
        elif isinstance(value, (dict, list, set)):
            value = type(value)(value)
        setattr(copied, name, value)
    return copied


def model_parser(doc: str, rounds: int) -> argparse.ArgumentParser:
    """The options every round's A/B script takes: which timm model, its batch, how many interleaved rounds."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=rounds)
    return parser


def one_thread_model(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """Torch on one thread; the random-init timm model, a batch of 224 x 224 images and, per image, the query tokens
    of the rows (the class token and the centre patch)."""
    import timm
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False).eval()
    images = torch.randn(args.batch, 3, 224, 224)
    grid = 224 // model.patch_embed.patch_size[0]
    return model, images, torch.tensor([[0, 1 + (grid // 2) * grid + grid // 2]] * args.batch)


def eager_and_once(attn: Any, x: Any, site: Any) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """timm's eager attention (a copy with ``fused_attn`` off) with ``AttentionExtract``'s hook on ``attn_drop``, and
    the module's own call with its attention computed once (``OneAttention``, as ``outputs="eager"`` runs it)."""
    from qkhooks.attention import OneAttention

    eager = copy.deepcopy(attn)
    eager.fused_attn = False
    extracted: dict[str, Any] = {}
    eager.attn_drop.register_forward_hook(lambda m, a, out: extracted.__setitem__("maps", out))
    once = OneAttention(site)

    def attention_once() -> Any:
        once.enter()
        attn(x)
        once.leave()
        return once.take()

    return (lambda: eager(x)), attention_once


def main() -> None:
    parser = model_parser(__doc__, rounds=20)
    parser.add_argument("--faults", action="store_true", help="also count page faults of whole forwards")
    args = parser.parse_args()

    import torch

    import qkhooks
    from qkhooks.attention import attention_rows, full_from_qk, rows_from_qk, split_heads

    model, images, tokens = one_thread_model(args)
    spectrum = qkhooks.spectrum(model)
    middle = len(model.blocks) // 2
    block, seen = model.blocks[middle], {}
    hooks = [block.register_forward_pre_hook(lambda m, a: seen.__setitem__("block", a[0])),
             block.attn.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))]
    with torch.no_grad():
        model(images)
    for h in hooks:
        h.remove()
    run = qkhooks.record(model, modes="all", attention="rows", spectrum=spectrum)
    site, projector = run.sites[middle], run._from_qk[middle]
    attn, x = block.attn, seen["x"]
    width = site.num_heads * site.head_dim
    with torch.no_grad():
        qkv = attn.qkv(x)
    q, k = split_heads(site, qkv[..., :width]), split_heads(site, qkv[..., width:2 * width])
    weights, offsets = projector._weights(qkv.device, qkv.dtype)
    heads = qkv[..., :2 * width].unflatten(-1, (2 * site.num_heads, site.head_dim))
    b, n = heads.shape[:2]
    stacked = heads.reshape(b * n, -1, site.head_dim).permute(1, 2, 0)
    product = torch.bmm(weights, stacked)
    eager, attention_once = eager_and_once(attn, x, site)

    def full_before() -> torch.Tensor:  # main's _softmax: a new tensor for the softmax
        return torch.softmax((q * site.scale) @ k.transpose(-1, -2), dim=-1)

    def entry() -> None:
        with qkhooks.record(model, modes=16):
            pass

    def entry_before() -> None:  # round 9's _own_copy: direct bound methods and closures only
        from qkhooks import capture

        saved, capture._own_copy = capture._own_copy, _own_copy_before
        try:
            entry()
        finally:
            capture._own_copy = saved

    parts: dict[str, Callable[[], Any]] = {
        "the block (reference)": lambda: block(seen["block"]),
        "the model's attention module (fused)": lambda: attn(x),
        "the qkv Linear": lambda: attn.qkv(x),
        "all-modes projection (from_fused)": lambda: projector.from_fused(qkv[..., :2 * width]),
        "- the batched product (bmm)": lambda: torch.bmm(weights, stacked),
        "- the offsets (sub_)": lambda: product.sub_(offsets).add_(offsets),  # timed twice over: halve it
        "- the permute copy to (B, H, K, N)": lambda: product.view(2, site.num_heads, -1, b, n).permute(0, 3, 1, 2, 4).contiguous(),
        "- baddbmm, offsets folded in (not kept)": lambda: torch.baddbmm(-offsets, weights, stacked),
        "rows, 2 tokens, x path (kept)": lambda: attention_rows(site, x, tokens),
        "rows, 2 tokens, from q and k": lambda: rows_from_qk(site, q, k, tokens),
        "full maps rebuilt, softmax out of place (before)": full_before,
        "full maps rebuilt, softmax over the logits (after)": lambda: full_from_qk(site, q, k),
        "timm eager attention + AttentionExtract's hook": eager,
        "attention computed once (outputs='eager')": attention_once,
        "record(modes=16) entry + exit, round 9's site copies (before)": entry_before,
        "record(modes=16) entry + exit, site copies checked for links back (after)": entry,
    }
    times = _interleaved(parts, args.rounds)
    print_table(f"{args.model}, batch {args.batch}, 1 thread, thread CPU ms, medians [IQR] of {args.rounds}", times)

    if args.faults:
        def faults() -> int:
            return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

        print("\nminor page faults per whole forward (4 forwards each):")
        for label, options in (("plain", None), ("all modes + rows", {"modes": "all", "attention": "rows"})):
            rec = None if options is None else qkhooks.record(model, spectrum=spectrum, **options)
            counts = []
            for _ in range(4):
                if rec is not None:
                    rec.attach()
                    rec.set_batch(query_tokens=tokens)
                before = faults()
                with torch.no_grad():
                    model(images)
                counts.append(faults() - before)
                if rec is not None:
                    rec.detach()
            print(f"{label}: {counts}")


if __name__ == "__main__":
    main()
