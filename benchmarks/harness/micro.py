"""Micro benchmarks of one layer: the two projection paths, three ways to compute attention rows, and the
factored vs the dense SVD."""

from __future__ import annotations

import time
from typing import Any, Callable

import torch

from harness.machine import clock, sync
from harness.material import Bench
from harness.stats import interleaved_schedule, summarize


def _interleaved_micro(fns: dict[str, Callable[[], Any]], rounds: int, device: torch.device,
                       warmup: int = 2) -> dict[str, dict[str, float]]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    now = clock(device)
    with torch.no_grad():
        for r, name in interleaved_schedule(list(fns), rounds, warmup):
            sync(device)
            t0 = now()
            fns[name]()
            sync(device)
            if r >= 0:
                times[name].append(now() - t0)
    return {k: summarize([1000 * t for t in v]) for k, v in times.items()}


def projection_bench(bench: Bench, rounds: int = 30) -> dict[str, Any]:
    """Per layer (all heads): the x path (ModeProjector) vs the q/k path (QKPathProjector); and attention rows of
    the 2 query tokens three ways: ``library`` (``qkhooks.attention.attention_rows``, the keys folded away since
    patch A), ``keys`` (the reference: softmax of ``qkhooks.attention._logits``, which computes every token's key,
    the library's path before patch A) and ``from_k`` (from the model's own k, as patch B would). Errors are max
    abs differences from ``keys``."""
    from qkhooks.attention import _logits, attention_rows
    from qkhooks.projector import ModeProjector, QKPathProjector

    site = bench.sites()[0]
    spec = bench.spectrum[site.layer]
    g = torch.Generator().manual_seed(3)
    n = (bench.size.image // bench.size.patch) ** 2 + 1
    x = torch.randn(bench.batch, n, site.dim, generator=g).to(bench.device)
    with torch.no_grad():
        q, k = site.qk(x)
    out: dict[str, Any] = {"layers": bench.size.layers, "tokens": n, "batch": bench.batch, "paths": {}}
    for modes in (16, spec.num_modes):
        top = spec.top(modes)
        xp, qp = ModeProjector(top), QKPathProjector(top, site.weights())
        with torch.no_grad():
            ref, got = xp(x), qp(q, k)
        err = max(float((a - b).abs().max() / a.abs().max()) for a, b in zip(ref, got))
        stats = _interleaved_micro({"x": lambda: xp(x), "qk": lambda: qp(q, k)}, rounds, bench.device)
        out["paths"][str(modes)] = {"x_ms": stats["x"], "qk_ms": stats["qk"], "max_rel_diff": err,
                                    "speedup": stats["x"]["median"] / stats["qk"]["median"]}
    tokens = bench.query_tokens.to(bench.device)
    scale = site.scale

    def rows_keys() -> torch.Tensor:
        x_q = torch.gather(x, 1, tokens[..., None].expand(-1, -1, x.shape[-1]))
        return torch.softmax(_logits(site, x_q, x).float(), dim=-1)

    def rows_from_k() -> torch.Tensor:
        b_idx = torch.arange(q.shape[0], device=q.device)[:, None, None]
        h_idx = torch.arange(q.shape[1], device=q.device)[None, :, None]
        q_t = q[b_idx, h_idx, tokens[:, None, :]]  # (B, H, T, dk)
        return torch.softmax((q_t @ k.transpose(-1, -2) * scale).float(), -1)

    fns = {"library": lambda: attention_rows(site, x, tokens), "keys": rows_keys, "from_k": rows_from_k}
    with torch.no_grad():
        ref = rows_keys()
        errs = {name: float((fn() - ref).abs().max()) for name, fn in fns.items()}
    stats = _interleaved_micro(fns, rounds, bench.device)
    folded = site.num_heads * tokens.shape[1] < site.dim  # the library's condition for the folded path
    out["library_rows_path"] = "folded" if folded else "keys"
    out["rows"] = {name: {"ms": s, "max_abs_diff_vs_keys": errs[name],
                          "speedup_vs_keys": stats["keys"]["median"] / s["median"]} for name, s in stats.items()}
    return out


def svd_bench(bench: Bench, rounds: int = 5, dense_rounds: int = 3) -> dict[str, Any]:
    """Factored vs dense SVD of W_q^T W_k for all heads of one layer (float64); whole model = x layers."""
    from qkhooks.spectrum import factored_svd

    w = bench.sites()[0].weights()
    w_q, w_k = w.w_q.double().cpu(), w.w_k.double().cpu()
    dense = lambda: torch.linalg.svd(w_q.transpose(-1, -2) @ w_k, full_matrices=False)  # noqa: E731
    factored = lambda: factored_svd(w_q, w_k)  # noqa: E731
    s_dense = torch.linalg.svdvals(w_q.transpose(-1, -2) @ w_k)[:, : w_q.shape[1]]
    s_fact = factored()[1]
    rel = float(((s_dense - s_fact).abs() / s_dense[:, :1]).max())
    f = _interleaved_micro({"factored": factored}, rounds, torch.device("cpu"), warmup=1)["factored"]
    d = _interleaved_micro({"dense": dense}, dense_rounds, torch.device("cpu"), warmup=1)["dense"]
    t0 = time.perf_counter()
    import qkhooks

    qkhooks.spectrum(bench.timm())
    whole = time.perf_counter() - t0
    return {"heads": w_q.shape[0], "dim": w_q.shape[-1], "head_dim": w_q.shape[1], "layers": bench.size.layers,
            "factored_ms_per_layer": f, "dense_ms_per_layer": d, "speedup": d["median"] / f["median"],
            "max_rel_sigma_diff": rel, "spectrum_whole_model_s": whole,
            "dense_whole_model_s_estimate": d["median"] * bench.size.layers / 1000}
