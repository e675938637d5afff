"""Fuzzing the analysis side against numpy: random tiny timm / HF ViTs (heads, head width, depth, patch grid,
class token, registers, biases), random small batches split at random, random odd-one-out masks and object labels.

Every reference here is computed from the model's raw weights (W_q, W_k, b_q, b_k read off its Linear modules) and
the tokens entering them (a forward pre-hook of our own, in a plain forward outside any recording), in float64:
dense ``np.linalg.svd`` of W_q^T W_k per head, attention rows by an explicit softmax, the preference shares,
the top-k rankings by ``np.lexsort``, the anisotropy baseline, the BFD ANOVA split with explicit N x N logits, the
same-object probability. The streaming reducers are also fed the same captured slices in other batch splits,
orders, merges and saved-state round trips, which must give the one-batch result (exactly where each image's
numbers are the same bits: top-k; to float rounding where sums are reordered).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import pytest
import timm
import torch
import transformers

import qkhooks
from qkhooks.analysis.anisotropy import AnisotropyReducer
from qkhooks.analysis.bfd import run_bfd
from qkhooks.analysis.bfd_reducers import BFDEnergies, PositionMeans, full_modes
from qkhooks.analysis.bfd_summary import TERMS, CELLS, summarize
from qkhooks.analysis.preference import GROUPS, PreferenceReducer, odd_one_out_meta, preference_from_reducer
from qkhooks.analysis.same_object import same_object_table
from qkhooks.analysis import topk as topk_module
from qkhooks.analysis.topk import TopKModes, top_images
from qkhooks.capture import BatchCapture, LayerCapture
from qkhooks.reducers import Reducer

SEEDS = range(12)  # make_case cycles through 9 families: every family in a test of 9 seeds or more


# ------------------------------------------------------------------------------------------------ random models
@dataclasses.dataclass
class Case:
    seed: int
    model: torch.nn.Module
    family: str
    prefix: int
    grid: tuple[int, int]
    patch: int
    heads: int
    head_dim: int
    depth: int
    images: torch.Tensor

    @property
    def hw(self) -> tuple[int, int]:
        return self.grid[0] * self.patch, self.grid[1] * self.patch

    def __repr__(self) -> str:
        qk_norm = any(not isinstance(b.attn.q_norm, torch.nn.Identity) for b in self.model.blocks) \
            if self.family.startswith("timm") else False
        return (f"Case(seed={self.seed}, {self.family}, qk_norm={qk_norm}, prefix={self.prefix}, grid={self.grid}, "
                f"patch={self.patch}, "
                f"heads={self.heads}, head_dim={self.head_dim}, depth={self.depth}, images={len(self.images)})")


def make_case(seed: int, min_images: int = 3, max_images: int = 9) -> Case:
    rng = np.random.default_rng(1000 + seed)
    family = ["timm", "timm", "timm-deit", "hf-vit", "hf-dinov2-reg", "timm", "hf-clip", "hf-siglip", "hf-deit"][seed % 9]
    heads, head_dim, depth = int(rng.integers(1, 5)), int(rng.choice([2, 3, 4, 6, 8])), int(rng.integers(1, 4))
    patch = int(rng.choice([4, 8]))
    grid = (int(rng.integers(2, 5)), int(rng.integers(2, 5)))
    d = heads * head_dim
    torch.manual_seed(seed)
    if family == "timm":
        class_token = bool(rng.integers(0, 2))
        reg = int(rng.integers(0, 3))
        model = timm.create_model(
            "vit_tiny_patch16_224", pretrained=False, img_size=(grid[0] * patch, grid[1] * patch), patch_size=patch,
            embed_dim=d, depth=depth, num_heads=heads, mlp_ratio=2.0, class_token=class_token, reg_tokens=reg,
            qkv_bias=bool(rng.integers(0, 2)), global_pool="token" if class_token else "avg",
            no_embed_class=bool(rng.integers(0, 2)), qk_norm=bool(rng.integers(0, 3) == 0))
        prefix = int(class_token) + reg
    elif family == "timm-deit":
        model = timm.create_model(
            "deit_tiny_distilled_patch16_224", pretrained=False, img_size=(grid[0] * patch, grid[1] * patch),
            patch_size=patch, embed_dim=d, depth=depth, num_heads=heads, mlp_ratio=2.0)
        prefix = 2
    else:
        reg = int(rng.integers(1, 4))
        base = dict(hidden_size=d, num_hidden_layers=depth, num_attention_heads=heads, intermediate_size=2 * d,
                    patch_size=patch, qkv_bias=True)
        if family in ("hf-vit", "hf-deit"):
            config_cls, model_cls = ((transformers.ViTConfig, transformers.ViTModel) if family == "hf-vit"
                                     else (transformers.DeiTConfig, transformers.DeiTModel))
            config = config_cls(**base, image_size=(grid[0] * patch, grid[1] * patch))
            model = model_cls._from_config(config, attn_implementation="sdpa")
            prefix = 1 if family == "hf-vit" else 2
        elif family in ("hf-clip", "hf-siglip"):
            grid = (grid[0], grid[0])  # square position embeddings
            config_cls, model_cls = ((transformers.CLIPVisionConfig, transformers.CLIPVisionModel) if family == "hf-clip"
                                     else (transformers.SiglipVisionConfig, transformers.SiglipVisionModel))
            base.pop("qkv_bias")
            model = model_cls._from_config(config_cls(**base, image_size=grid[0] * patch), attn_implementation="sdpa")
            prefix = 1 if family == "hf-clip" else 0
        else:
            grid = (grid[0], grid[0])  # Dinov2's position embeddings are a square grid
            config = transformers.Dinov2WithRegistersConfig(**base, image_size=grid[0] * patch, num_register_tokens=reg)
            model = transformers.Dinov2WithRegistersModel._from_config(config, attn_implementation="sdpa")
            prefix = 1 + reg
    model.eval()
    with torch.no_grad():  # no parameter left at its init's zeros: biases, tokens and position embeddings random
        for name, p in model.named_parameters():
            if name.endswith("bias") or "token" in name or "embed" in name:
                p.normal_(0, 0.5)
    if rng.integers(0, 4) == 0:  # a pruned head: one head's W_q or W_k rows zero (sigma = 0, null modes)
        layer, head, side = int(rng.integers(0, depth)), int(rng.integers(0, heads)), int(rng.integers(0, 2))
        with torch.no_grad():
            if family.startswith("timm"):
                qkv = model.blocks[layer].attn.qkv.weight
                qkv[side * d + head * head_dim: side * d + (head + 1) * head_dim] = 0
            else:
                name = "q_proj" if side == 0 else "k_proj"
                lin = [m for n_, m in model.named_modules() if n_.endswith(name)][layer]
                lin.weight[head * head_dim:(head + 1) * head_dim] = 0
    n = int(rng.integers(min_images, max_images + 1))
    images = torch.from_numpy(rng.normal(size=(n, 3, grid[0] * patch, grid[1] * patch)).astype(np.float32))
    return Case(seed, model, family, prefix, grid, patch, heads, head_dim, depth, images)


def qk_weights(case: Case) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Per layer (W_q (H, dh, d), b_q (H, dh), W_k, b_k) in float64, read off the model's own Linear modules."""
    h, dh = case.heads, case.head_dim
    d = h * dh
    out = []
    for q_lin, k_lin in _qk_linears(case):
        if q_lin is k_lin:  # timm's fused qkv: q rows first, then k rows
            w = q_lin.weight.detach().double().numpy()
            b = np.zeros(3 * d) if q_lin.bias is None else q_lin.bias.detach().double().numpy()
            wq, wk, bq, bk = w[:d], w[d:2 * d], b[:d], b[d:2 * d]
        else:
            wq, wk = (m.weight.detach().double().numpy() for m in (q_lin, k_lin))
            bq, bk = (np.zeros(d) if m.bias is None else m.bias.detach().double().numpy() for m in (q_lin, k_lin))
        out.append((wq.reshape(h, dh, d), bq.reshape(h, dh), wk.reshape(h, dh, d), bk.reshape(h, dh)))
    return out


def _qk_linears(case: Case) -> list[tuple[torch.nn.Module, torch.nn.Module]]:
    if case.family.startswith("timm"):
        return [(b.attn.qkv, b.attn.qkv) for b in case.model.blocks]
    mods = dict(case.model.named_modules())
    q = [m for name, m in mods.items() if name.endswith("q_proj")]
    k = [m for name, m in mods.items() if name.endswith("k_proj")]
    assert len(q) == len(k) == case.depth
    return list(zip(q, k))


def _blocks(case: Case) -> list[torch.nn.Module]:
    """The blocks whose input is the residual stream (the attention module's parent)."""
    if case.family.startswith("timm"):
        return list(case.model.blocks)
    mods = dict(case.model.named_modules())
    return [mods[name.rsplit(".", 2)[0]] for name in mods if name.endswith("q_proj")]


def tokens(case: Case, images: torch.Tensor | None = None, input: str = "normed") -> list[np.ndarray]:
    """Per layer, the tokens (B, N, d) entering W_q/W_k (``input="residual"``: entering the block), float64: a
    pre-hook of ours in a plain forward."""
    seen: list[torch.Tensor] = []

    def keep(module, args, kwargs):
        seen.append((args[0] if args else kwargs["hidden_states"]).detach().clone())

    where = [q for q, _ in _qk_linears(case)] if input == "normed" else _blocks(case)
    handles = [m.register_forward_pre_hook(keep, with_kwargs=True) for m in where]
    try:
        with torch.no_grad():
            case.model(case.images if images is None else images)
    finally:
        for handle in handles:
            handle.remove()
    assert len(seen) == case.depth
    return [t.double().numpy() for t in seen]


def augment(w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[W | b] (H, dh, d + 1): the form of x -> [x; 1]."""
    return np.concatenate([w, b[..., None]], -1)


def dense_modes(wq: np.ndarray, wk: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """U (H, d, dk), S (H, dk), V (H, d, dk): np.linalg.svd of the dense d x d W_q^T W_k of every head."""
    dk = wq.shape[1]
    us, ss, vs = [], [], []
    for a, b in zip(wq, wk):
        u, s, vt = np.linalg.svd(a.T @ b)
        us.append(u[:, :dk])
        ss.append(s[:dk])
        vs.append(vt[:dk].T)
    return np.stack(us), np.stack(ss), np.stack(vs)


def layer_norm_np(t: np.ndarray, norm: torch.nn.Module | None) -> np.ndarray:
    """A LayerNorm over the last axis with ``norm``'s eps and affine weights (None: identity)."""
    if norm is None or isinstance(norm, torch.nn.Identity):
        return t
    t = (t - t.mean(-1, keepdims=True)) / np.sqrt(t.var(-1, keepdims=True) + norm.eps)
    return t * norm.weight.detach().double().numpy() + norm.bias.detach().double().numpy()


def qk_norms(case: Case) -> list[tuple[Any, Any]]:
    """Per layer the model's own q and k norms (timm's qk_norm), else (None, None)."""
    if not case.family.startswith("timm"):
        return [(None, None)] * case.depth
    return [(b.attn.q_norm, b.attn.k_norm) for b in case.model.blocks]


def softmax_rows(x: np.ndarray, wq, bq, wk, bk, norms: tuple[Any, Any] = (None, None)) -> np.ndarray:
    """Attention (B, H, N, N) of every head by an explicit softmax of (x W_q^T + b_q)(x W_k^T + b_k)^T / sqrt(dh),
    q and k through the model's q/k norms where it has them."""
    q = layer_norm_np(np.einsum("bnd,hed->bhne", x, wq) + bq[None, :, None], norms[0])
    k = layer_norm_np(np.einsum("bnd,hed->bhne", x, wk) + bk[None, :, None], norms[1])
    logits = np.einsum("bhne,bhme->bhnm", q, k) / math.sqrt(wq.shape[1])
    logits -= logits.max(-1, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(-1, keepdims=True)


def random_splits(rng: np.random.Generator, n: int) -> list[slice]:
    """A random partition of range(n) into consecutive batches of random sizes (1 to n)."""
    cuts = sorted(rng.choice(np.arange(1, n), size=int(rng.integers(0, n)), replace=False).tolist()) if n > 1 else []
    edges = [0, *cuts, n]
    return [slice(a, b) for a, b in zip(edges[:-1], edges[1:])]


def odd_one_out_masks(rng: np.random.Generator, n: int, hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Random non-overlapping target and distractor rectangles (pixels), the image cut in two along a random line."""
    H, W = hw
    target, distractor = torch.zeros(n, H, W), torch.zeros(n, H, W)
    for i in range(n):
        if rng.integers(0, 2):
            cut = int(rng.integers(1, W))
            sides = ((slice(0, H), slice(0, cut)), (slice(0, H), slice(cut, W)))
        else:
            cut = int(rng.integers(1, H))
            sides = ((slice(0, cut), slice(0, W)), (slice(cut, H), slice(0, W)))
        if rng.integers(0, 2):
            sides = sides[::-1]
        for mask, (rows, cols) in zip((target, distractor), sides):
            r0, c0 = int(rng.integers(rows.start, rows.stop)), int(rng.integers(cols.start, cols.stop))
            r1, c1 = int(rng.integers(r0 + 1, rows.stop + 1)), int(rng.integers(c0 + 1, cols.stop + 1))
            mask[i, r0:r1, c0:c1] = 1.0
    return target, distractor


def block_means(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    n, H, W = mask.shape
    return mask.reshape(n, grid[0], H // grid[0], grid[1], W // grid[1]).mean((2, 4))


# ------------------------------------------------------------------------------------------------ references
def aligned(u_lib: np.ndarray, u_ref: np.ndarray) -> np.ndarray:
    """The sign of each of u_ref's columns that matches u_lib's (H, K)."""
    return np.sign(np.einsum("hdk,hdk->hk", u_lib, u_ref))


def ranked(score: np.ndarray, k: int) -> np.ndarray:
    """The positions of the k best of ``score`` (n,): score descending, then lower index."""
    return np.lexsort((np.arange(len(score)), -score))[:k]


def assert_same_ranking(got_index: np.ndarray, got_score: np.ndarray, ref: np.ndarray, k: int, what: str,
                        exact_ties: bool = False) -> None:
    """A kept list (index, score) against the numpy scores ``ref`` (n,) of every image: the same scores in the same
    order, and the same images wherever the reference's scores are not tied within float32 rounding. With
    ``exact_ties`` (the library scored the very maps ``ref`` comes from) an exact tie must go to the lower index;
    without, images whose maps are equal in exact arithmetic may be scored a rounding apart (the tokens of a d = 2
    LayerNorm take two values, so images tie exactly; the float32 projection of equal rows can round apart)."""
    order = ranked(ref, k)
    valid = got_index >= 0
    assert int(valid.sum()) == len(order), what
    got_index, got_score = got_index[valid], got_score[valid]
    scale = max(float(np.abs(ref).max()), 1e-30)
    tol = 2e-5 * scale
    np.testing.assert_allclose(got_score, ref[order], rtol=0, atol=tol, err_msg=what)
    np.testing.assert_allclose(ref[got_index], got_score, rtol=0, atol=tol, err_msg=what)
    for j, (g, r) in enumerate(zip(got_index, order)):  # an exact tie (copies, scores of 0) goes to the lower index
        assert g == r or ((ref[g] != ref[r] or not exact_ties) and abs(ref[g] - ref[r]) <= 2 * tol), \
            f"{what}: slot {j} holds image {g}, numpy ranks {r} there"


def signed_scores_np(q: np.ndarray, k: np.ndarray, prefix: int) -> np.ndarray:
    """(n, H, K, 2) ranking scores from maps (n, H, K, N): max(0, max q) max(0, max k) and the flipped pair's."""
    q, k = q[..., prefix:], k[..., prefix:]
    plus = np.maximum(q.max(-1), 0) * np.maximum(k.max(-1), 0)
    minus = np.maximum(-q.min(-1), 0) * np.maximum(-k.min(-1), 0)
    return np.stack([plus, minus], -1)


def same_object_np(scores: np.ndarray, q: np.ndarray, k: np.ndarray, objects: np.ndarray, top: int,
                   prefix: int) -> tuple[list[bool], bool]:
    """One mode's same-object decisions over its ``top`` images by the better sign (METHODS A.6, A.7), from its
    scores (n, 2) and maps (n, N), and whether a near-tie (in the ranking, the better sign or an object's mean)
    makes them depend on float rounding."""
    n = len(scores)
    better = scores.max(-1)
    sign = np.where(scores[:, 0] >= scores[:, 1], 1.0, -1.0)
    order = np.lexsort((np.arange(n), -better))
    tol = 1e-3 * max(float(better.max()), 1e-30)
    ambiguous = top < n and abs(better[order[top - 1]] - better[order[top]]) <= tol
    same = []
    for i in order[:top]:
        labels = objects[i].reshape(-1)
        present = [o for o in np.unique(labels) if o > 0]
        if not present:
            continue
        ambiguous |= bool(abs(scores[i, 0] - scores[i, 1]) <= tol)
        picks = []
        for mp in (sign[i] * q[i, prefix:], sign[i] * k[i, prefix:]):
            means = np.array([mp[labels == o].mean() for o in present])
            ranked_means = np.sort(means)
            ambiguous |= bool(len(means) > 1 and ranked_means[-1] - ranked_means[-2] <= 1e-3 * np.abs(mp).max())
            picks.append(present[int(np.argmax(means))])  # the first maximum: the lowest label
        same.append(picks[0] == picks[1])
    return same, bool(ambiguous)


def preference_np(rows: np.ndarray, t: np.ndarray, d: np.ndarray, prefix: int) -> np.ndarray:
    """(n, H, 6) values TT TD TB DD DT DB from rows (n, H, 2, N) and grid masks (n, gh, gw)."""
    a = rows[..., prefix:]
    a = a / a.sum(-1, keepdims=True)
    t, d = t.reshape(len(t), -1), d.reshape(len(d), -1)
    b = np.clip(1 - t - d, 0, None)
    region = lambda m: np.einsum("nhqp,np->nhq", a, m)  # noqa: E731
    rt, rd, rb = region(t), region(d), region(b)
    return np.stack([rt[..., 0], rd[..., 0], rb[..., 0], rd[..., 1], rt[..., 1], rb[..., 1]], -1)


def np_bfd(x: np.ndarray, wq: np.ndarray, wk: np.ndarray) -> dict[str, Any]:
    """METHODS B by the obvious loops: explicit N x N logits of every term per image, SVD of the dense form."""
    n = len(x)
    p = x.mean(0)
    c = x - p
    mu = p.mean(0)
    g, pt = np.broadcast_to(mu, p.shape), p - mu
    heads = []
    for a, b in zip(wq, wk):
        m = a.T @ b
        side = {name: np.broadcast_to(f, x.shape) for name, f in (("P", p), ("C", c), ("G", g), ("T", pt), ("X", x))}
        energy = lambda s, t: np.mean(((side[s] @ m @ side[t].transpose(0, 2, 1)) ** 2).sum((1, 2)))  # noqa: E731
        frob = {t: energy(t[0], t[1]) for t in TERMS}
        total = energy("X", "X")
        three = {cell: energy(cell[0].replace("P", "T"), cell[1].replace("P", "T")) for cell in CELLS}
        u, s, vt = np.linalg.svd(m)
        dk = a.shape[0]
        u, s, v = u[:, :dk], s[:dk], vt[:dk].T
        qp, qc = ((pt @ u) ** 2).mean(0), ((c @ u) ** 2).mean((0, 1))
        kp, kc = ((pt @ v) ** 2).mean(0), ((c @ v) ** 2).mean((0, 1))
        add = {"CC": s**2 * qc * kc, "CP": s**2 * qc * kp, "PC": s**2 * qp * kc, "PP": s**2 * qp * kp}
        pf = np.broadcast_to(p, x.shape)
        mode_frob = {t: s**2 * np.mean(((dict(P=pf, C=c)[t[0]] @ u) ** 2).sum(1)
                                         * ((dict(P=pf, C=c)[t[1]] @ v) ** 2).sum(1), 0) for t in TERMS}
        heads.append({"frob": frob, "total": total, "three": three, "add": add, "mode_frob": mode_frob, "s": s})
    var_p, var_c = float((pt**2).sum()), float((c**2).sum() / n)
    return {"heads": heads, "position_variance_share": var_p / (var_p + var_c)}


# ------------------------------------------------------------------------------------------------ recording
class Collect:
    """A sink keeping what each batch recorded (maps, rows, tokens, metadata), copied."""

    def __init__(self) -> None:
        self.batches: list[dict[str, Any]] = []

    def update(self, batch: BatchCapture) -> None:
        self.batches.append({
            "offset": batch.offset, "size": batch.size, "ids": list(batch.ids),
            "query_tokens": batch.meta["query_tokens"].clone(),
            "target_grid": batch.meta["target_grid"].clone(), "distractor_grid": batch.meta["distractor_grid"].clone(),
            "layers": {l: {"query": c.query.detach().clone(), "key": c.key.detach().clone(),
                           "rows": c.attention["rows"].detach().clone(), "inputs": c.inputs.detach().clone()}
                       for l, c in batch.captures.items()},
        })

    def cat(self, layer: int, name: str) -> torch.Tensor:
        return torch.cat([b["layers"][layer][name] for b in self.batches])


def record_case(case: Case, splits: list[slice], modes: Any, target: torch.Tensor, distractor: torch.Tensor,
                sinks: list[Any], **options: Any) -> Any:
    with qkhooks.record(case.model, modes=modes, attention="rows", keep_inputs=True, sinks=sinks, **options) as run:
        for sl in splits:
            meta = odd_one_out_meta(target[sl], distractor[sl], case.grid, case.prefix)
            with torch.no_grad():
                run(case.images[sl], ids=[f"img{i}" for i in range(sl.start, sl.stop)], meta=meta)
        return run.qk_spectrum


def hand_batches(col: Collect, order: list[slice], prefix: int, grid: tuple[int, int], copies: dict[int, int]):
    """The collected batch, re-cut into ``order``'s slices (in that order), as BatchCaptures with global offsets;
    image ``i`` of ``copies`` replaced by an exact copy of image ``copies[i]`` (ties in every score)."""
    layers = sorted(col.batches[0]["layers"])
    whole = {l: {name: col.cat(l, name) for name in ("query", "key", "rows", "inputs")} for l in layers}
    tg = torch.cat([b["target_grid"] for b in col.batches])
    dg = torch.cat([b["distractor_grid"] for b in col.batches])
    for dst, src in copies.items():
        for t in (tg, dg, *(v for parts in whole.values() for v in parts.values())):
            t[dst] = t[src]
    for sl in order:
        size = sl.stop - sl.start
        caps = {l: LayerCapture(l, size, inputs=whole[l]["inputs"][sl], query=whole[l]["query"][sl],
                                key=whole[l]["key"][sl], attention={"rows": whole[l]["rows"][sl]}) for l in layers}
        yield BatchCapture(ids=[f"img{i}" for i in range(sl.start, sl.stop)], offset=sl.start, layers=caps,
                           meta={"num_prefix_tokens": prefix, "grid": grid, "prefix_tokens": {l: prefix for l in layers},
                                 "target_grid": tg[sl], "distractor_grid": dg[sl]})


def topk_arrays(reducer: TopKModes) -> dict[int, dict[str, np.ndarray]]:
    return {l: {name: (v if name == "index" else v.float()).detach().cpu().numpy() for name, v in st.items()}
            for l, st in reducer.layers.items()}


# ------------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("seed", range(27))
def test_spectrum_is_the_dense_svd_of_each_heads_form(seed):
    case = make_case(seed)
    spec = qkhooks.spectrum(case.model)
    assert [s.layer for s in spec] == list(range(case.depth)), case
    for layer, (wq, _, wk, _) in zip(spec, qk_weights(case)):
        U, S, V = dense_modes(wq, wk)
        u, s, v = (np.asarray(a, np.float64) for a in (layer.U, layer.S, layer.V))
        top = S[:, :1]
        np.testing.assert_allclose(s, S, rtol=0, atol=1e-5 * top.max(), err_msg=repr(case))
        dense = np.einsum("hdk,hk,hek->hde", u, s, v)
        np.testing.assert_allclose(dense, np.einsum("hed,hef->hdf", wq, wk), atol=1e-5 * top.max(), err_msg=repr(case))
        # every mode whose sigma stands apart is the dense SVD's, up to one joint sign
        gaps = np.minimum(np.abs(np.diff(S, prepend=np.inf, axis=1)), np.abs(np.diff(S, append=-np.inf, axis=1)))
        apart = (gaps > 1e-3 * top) & (S > 1e-4 * top)
        su, sv = aligned(u, U), aligned(v, V)
        assert (su[apart] == sv[apart]).all(), case  # u and v flip together
        np.testing.assert_allclose((u * su[:, None])[np.broadcast_to(apart[:, None], u.shape)],
                                   U[np.broadcast_to(apart[:, None], U.shape)], atol=1e-4, err_msg=repr(case))
        # the documented sign: each u_n's largest-magnitude entry is positive
        pick = np.take_along_axis(u, np.abs(u).argmax(1)[:, None], 1)[:, 0]
        assert (pick > 0).all(), case
        cos_ref = np.einsum("hdk,hdk->hk", U, V)
        np.testing.assert_allclose(np.asarray(layer.cos)[apart], cos_ref[apart], atol=1e-4, err_msg=repr(case))
        with np.errstate(invalid="ignore"):  # a pruned head: no weights, NaN
            weighted = (S / S.sum(1, keepdims=True) * np.einsum("hdk,hdk->hk", u, v)).sum(1)
        np.testing.assert_allclose(np.asarray(layer.cosine_weighted, np.float64), weighted, atol=1e-5,
                                   err_msg=repr(case))


@pytest.mark.parametrize("seed", SEEDS)
def test_recorded_maps_topk_preference_and_anisotropy_equal_numpy_in_any_batching(seed, monkeypatch):
    case = make_case(seed)
    rng = np.random.default_rng(seed)
    n = len(case.images)
    dk = case.head_dim
    modes = "all" if rng.integers(0, 3) == 0 else int(rng.integers(1, dk + 1))
    kept_modes = dk if modes == "all" else min(int(modes), dk)
    k = int(rng.integers(1, n + 2))  # sometimes more slots than images
    target, distractor = odd_one_out_masks(rng, n, case.hw)
    splits = random_splits(rng, n)
    col, topk, pref, aniso = Collect(), TopKModes(k=k, map_dtype="float32"), PreferenceReducer(), AnisotropyReducer()
    chosen = sorted(rng.choice(case.depth, size=int(rng.integers(1, case.depth + 1)), replace=False).tolist())
    named = [l - case.depth if rng.integers(0, 2) else l for l in chosen]  # block indices, some from the last
    options = {"input": str(rng.choice(["normed", "residual"])), "augmented": bool(rng.integers(0, 2)),
               "qk_path": bool(rng.integers(0, 2)), "layers": named}
    spec = record_case(case, splits, modes, target, distractor, [col, topk, pref, aniso], **options)
    assert [s.layer for s in spec] == chosen and sorted(col.batches[0]["layers"]) == chosen, (case, named)
    assert sorted(topk.layers) == chosen and sorted(aniso.baselines()) == chosen and sorted(pref.stats) == chosen
    xs, weights, normed = tokens(case, input=options["input"]), qk_weights(case), tokens(case)
    tg, dg = block_means(target.numpy(), case.grid), block_means(distractor.numpy(), case.grid)
    np.testing.assert_allclose(torch.cat([b["target_grid"] for b in col.batches]).numpy(), tg, atol=1e-6)
    tq = np.stack([tg.reshape(n, -1).argmax(1), dg.reshape(n, -1).argmax(1)], 1) + case.prefix
    np.testing.assert_array_equal(torch.cat([b["query_tokens"] for b in col.batches]).numpy(), tq, err_msg=repr(case))
    assert [b["offset"] for b in col.batches] == [sl.start for sl in splits]
    pref_values = {}
    for layer in chosen:
        x, xn, (wq, bq, wk, bk) = xs[layer], normed[layer], weights[layer]
        what = f"{case}, layer {layer}, modes={modes}, k={k}, splits={[(s.start, s.stop) for s in splits]}, {options}"
        np.testing.assert_allclose(col.cat(layer, "inputs").double().numpy(), x, atol=1e-5, err_msg=what)
        xa = np.concatenate([x, np.ones((*x.shape[:2], 1))], -1) if options["augmented"] else x  # the maps' tokens
        U, S, V = dense_modes(augment(wq, bq), augment(wk, bk)) if options["augmented"] else dense_modes(wq, wk)
        lib = spec[layer]
        assert lib.num_modes == kept_modes, what
        u, v = (np.asarray(a, np.float64) for a in (lib.U, lib.V))
        sign = aligned(u, U[..., :kept_modes])
        # maps: x . u_n and x . v_n over every token, against the dense SVD's vectors (sign-aligned)
        q_ref = np.einsum("bnd,hdk->bhkn", xa, U[..., :kept_modes] * sign[:, None])
        k_ref = np.einsum("bnd,hdk->bhkn", xa, V[..., :kept_modes] * sign[:, None])
        scale = np.abs(xa).max() * 2
        gaps = np.minimum(np.abs(np.diff(S, prepend=np.inf, axis=1)), np.abs(np.diff(S, append=-np.inf, axis=1)))
        apart = ((gaps > 1e-3 * S[:, :1]) & (S > 1e-4 * S[:, :1]))[:, :kept_modes]
        q_got, k_got = col.cat(layer, "query").double().numpy(), col.cat(layer, "key").double().numpy()
        for got, ref in ((q_got, q_ref), (k_got, k_ref)):
            np.testing.assert_allclose(got[:, apart], ref[:, apart], atol=2e-4 * scale, err_msg=what)
        # the maps are the library's own vectors' too (all modes, ties included)
        np.testing.assert_allclose(q_got, np.einsum("bnd,hdk->bhkn", xa, u), atol=2e-4 * scale, err_msg=what)
        np.testing.assert_allclose(k_got, np.einsum("bnd,hdk->bhkn", xa, v), atol=2e-4 * scale, err_msg=what)
        # attention rows at the odd-one-out tokens: an explicit softmax of the raw weights (the normed tokens)
        attn = softmax_rows(xn, wq, bq, wk, bk, qk_norms(case)[layer])
        rows_ref = np.stack([attn[i][:, tq[i]] for i in range(n)])
        np.testing.assert_allclose(col.cat(layer, "rows").double().numpy(), rows_ref, atol=2e-5, err_msg=what)
        pref_values[layer] = preference_np(rows_ref, tg, dg, case.prefix)
        # top-k: numpy's scores of the library's maps' references, ranked by lexsort
        scores = signed_scores_np(np.einsum("bnd,hdk->bhkn", xa, u), np.einsum("bnd,hdk->bhkn", xa, v), case.prefix)
        st = topk_arrays(topk)[layer]
        for h in range(case.heads):
            for m in range(kept_modes):
                for s in (0, 1):
                    assert_same_ranking(st["index"][h, m, s], st["score"][h, m, s], scores[:, h, m, s], k,
                                        f"{what}: head {h} mode {m} sign {s}")
                    for slot, i in enumerate(st["index"][h, m, s]):  # the kept maps are the image's signed maps
                        if i >= 0:
                            flip = 1 - 2 * s
                            np.testing.assert_allclose(st["query"][h, m, s, slot], flip * q_got[i, h, m], atol=1e-6)
                            np.testing.assert_allclose(st["key"][h, m, s, slot], flip * k_got[i, h, m], atol=1e-6)
                best = top_images({name: a for name, a in st.items()}, h, m, "both", k)
                better = scores[:, h, m].max(-1)
                assert_same_ranking(best["index"], best["score"], better, min(k, n), f"{what}: head {h} mode {m} both")
        # anisotropy: mean cosine between different images' centre tokens
        centre = case.prefix + (case.grid[0] // 2) * case.grid[1] + case.grid[1] // 2
        z = x[:, centre] / np.linalg.norm(x[:, centre], axis=1, keepdims=True)
        ref = ((z.sum(0) ** 2).sum() - n) / (n * (n - 1))
        np.testing.assert_allclose(aniso.baselines()[layer], ref, atol=1e-6, err_msg=what)
    # preference table: means over images and heads, spread across images of the head-averaged groups
    table = preference_from_reducer(pref)
    assert table["layers"] == chosen
    for i, layer in enumerate(table["layers"]):
        v = pref_values[layer]
        for name, (a, b) in GROUPS.items():
            g = (v[..., a] + v[..., b]) / 2
            np.testing.assert_allclose(table[name]["mean"][i], g.mean(), atol=1e-6, err_msg=f"{case} {name}")
            np.testing.assert_allclose(table[name]["std"][i], g.mean(1).std(), atol=1e-5, err_msg=f"{case} {name}")
            np.testing.assert_allclose(table["per_head"][name]["mean"][i], g.mean(0), atol=1e-6)
    np.testing.assert_allclose(np.asarray(table["per_head"]["TT"]["mean"][0]), pref_values[chosen[0]][..., 0].mean(0),
                               atol=1e-6)

    # the same captured numbers re-cut, shuffled, split across reducers, merged and saved: the one-batch result
    whole = [slice(0, n)]
    copies = {int(i): int(rng.integers(0, n)) for i in rng.choice(n, size=int(rng.integers(0, n)), replace=False)}
    one = {}
    for name, build in (("topk", lambda: TopKModes(k=k, map_dtype="float32")), ("pref", PreferenceReducer),
                        ("aniso", AnisotropyReducer)):
        r = build()
        for batch in hand_batches(col, whole, case.prefix, case.grid, copies):
            r.update(batch)
        one[name] = r
    cuts = random_splits(rng, n)
    order = [cuts[i] for i in rng.permutation(len(cuts))]
    half = int(rng.integers(0, len(order) + 1))
    map_dtype = str(rng.choice(["float32", "float16", "bfloat16"]))
    if rng.integers(0, 2):  # an accelerator's fold (layers stacked, every candidate's rows copied), on the CPU
        monkeypatch.setattr(topk_module, "_entrants_only", lambda device: False)
        if rng.integers(0, 2):  # folded in parts of one layer
            monkeypatch.setattr(topk_module, "STACK_BYTES", 1)
    for name, build in (("topk", lambda: TopKModes(k=k, map_dtype=map_dtype)), ("pref", PreferenceReducer),
                        ("aniso", AnisotropyReducer)):
        a, b = build(), build()
        for i, batch in enumerate(hand_batches(col, order, case.prefix, case.grid, copies)):
            if i == half and i:  # a saved state continued mid-way
                a = Reducer.from_state(a.saved_state())
            (a if i < half else b).update(batch)
        if rng.integers(0, 2):
            a, b = b, a
        if not getattr(a, "layers", True) and name == "topk":
            a, b = b, a
        a.merge(b)
        what = f"{case}, {name}, order={[(s.start, s.stop) for s in order]}, half={half}"
        if name == "topk":
            got, ref = topk_arrays(a), topk_arrays(one["topk"])
            dup = {l: [t.clone() for t in (col.cat(l, "query"), col.cat(l, "key"))] for l in chosen}
            for l, (q_dup, k_dup) in dup.items():  # numpy's ranking of the copies: exact ties go to the lower index
                for dst, src in copies.items():
                    q_dup[dst], k_dup[dst] = q_dup[src], k_dup[src]
                sc = signed_scores_np(q_dup.double().numpy(), k_dup.double().numpy(), case.prefix)
                for h in range(case.heads):
                    for m in range(kept_modes):
                        for sg in (0, 1):
                            assert_same_ranking(ref[l]["index"][h, m, sg], ref[l]["score"][h, m, sg], sc[:, h, m, sg],
                                                k, f"{case} copies {copies}: L{l} head {h} mode {m} sign {sg}",
                                                exact_ties=True)
            what += f", map_dtype={map_dtype}, entrants only: {topk_module._entrants_only(torch.device('cpu'))}"
            for layer in ref:
                for key in ("index", "score"):
                    np.testing.assert_array_equal(got[layer][key], ref[layer][key], err_msg=f"{what} L{layer} {key}")
                for key in ("query", "key"):  # the kept maps, rounded to the map dtype
                    rounded = torch.from_numpy(ref[layer][key]).to(getattr(torch, map_dtype)).float().numpy()
                    np.testing.assert_array_equal(got[layer][key].astype(np.float32), rounded,
                                                  err_msg=f"{what} L{layer} {key}")
            live = topk_arrays(topk)
            for layer in ref:  # the live recording's batches: the same ranking (maps computed per batch may round)
                if not copies:
                    np.testing.assert_allclose(live[layer]["score"], ref[layer]["score"], rtol=1e-5, atol=1e-7,
                                               err_msg=what)
        elif name == "pref":
            t1, t2 = preference_from_reducer(a), preference_from_reducer(one["pref"])
            for g in GROUPS:
                np.testing.assert_allclose(t1[g]["mean"], t2[g]["mean"], rtol=1e-12, atol=1e-14, err_msg=what)
                np.testing.assert_allclose(t1[g]["std"], t2[g]["std"], rtol=1e-9, atol=1e-12, err_msg=what)
            assert t1["num_images"] == n
        else:
            b1, b2 = a.baselines(), one["aniso"].baselines()
            assert sorted(b1) == sorted(b2)
            np.testing.assert_allclose([b1[l] for l in sorted(b1)], [b2[l] for l in sorted(b2)], rtol=1e-12,
                                       atol=1e-14, err_msg=what)


@pytest.mark.parametrize("seed", range(9))
def test_bfd_energies_are_the_numpy_anova_split_whatever_the_batch_size(seed):
    case = make_case(seed, min_images=2, max_images=7)
    rng = np.random.default_rng(50 + seed)
    n = len(case.images)
    drop = bool(rng.integers(0, 2)) and case.prefix > 0
    xs, weights = tokens(case), qk_weights(case)
    chosen = sorted(rng.choice(case.depth, size=int(rng.integers(1, case.depth + 1)), replace=False).tolist())
    named = [l - case.depth if rng.integers(0, 2) else l for l in chosen]
    results = [run_bfd(case.model, case.images, batch_size=int(bs), drop_prefix=drop, holdout_every=2, layers=named)
               for bs in (rng.integers(1, n + 1), rng.integers(1, n + 1))]
    for result in results:
        assert result["images"] == n and [e["layer"] for e in result["layers"]] == chosen, (case, named)
        for entry in result["layers"]:
            x, (wq, _, wk, _) = xs[entry["layer"]], weights[entry["layer"]]
            what = f"{case}, drop_prefix={drop}, layer {entry['layer']}"
            x = x[:, case.prefix:] if drop else x
            ref = np_bfd(x, wq, wk)
            np.testing.assert_allclose(entry["position_variance_share"], ref["position_variance_share"], rtol=1e-6,
                                       err_msg=what)
            for h, (head, rh) in enumerate(zip(entry["heads"], ref["heads"])):
                frob = head["frobenius"]
                scale = rh["total"]
                if not rh["s"][0] > 0:  # a pruned head: no energy, no share, no label (never 0% of each)
                    assert all(frob["energy"][t] is None for t in TERMS) and frob["interference"] is None, what
                    assert frob["energy_abs"]["total"] == 0 and frob["label"] == "none", what
                    continue
                for t in TERMS:
                    np.testing.assert_allclose(frob["energy_abs"][t], rh["frob"][t], rtol=1e-6, atol=1e-9 * scale,
                                               err_msg=f"{what} head {h} {t}")
                summed = sum(rh["frob"].values())
                np.testing.assert_allclose(frob["energy_abs"]["total"], rh["total"], rtol=1e-6, err_msg=what)
                np.testing.assert_allclose(frob["interference"], (rh["total"] - summed) / rh["total"], atol=1e-6,
                                           err_msg=what)
                np.testing.assert_allclose(sum(frob["energy"][t] for t in TERMS), 1.0, atol=1e-9)
                cells = sum(rh["three"].values())
                for c in CELLS:
                    np.testing.assert_allclose(head["three_way"]["cells"][c], rh["three"][c] / cells, atol=1e-6,
                                               err_msg=f"{what} head {h} cell {c}")
                if "undetermined" in head:
                    continue
                add = {t: rh["add"][t].sum() for t in TERMS}
                for t in TERMS:
                    np.testing.assert_allclose(head["additive"]["energy_abs"][t], add[t], rtol=1e-6,
                                               atol=1e-9 * sum(add.values()), err_msg=f"{what} head {h} additive {t}")
                s = rh["s"]
                for mode in head["modes"]:
                    m = mode["mode"]
                    if mode["null"] or s[m] < 1e-4 * s[0]:
                        continue
                    msum = sum(rh["mode_frob"][t][m] for t in TERMS)
                    asum = sum(rh["add"][t][m] for t in TERMS)
                    for t in TERMS:
                        np.testing.assert_allclose(mode["frobenius"]["energy"][t], rh["mode_frob"][t][m] / msum,
                                                   atol=1e-5, err_msg=f"{what} head {h} mode {m} {t}")
                        np.testing.assert_allclose(mode["additive"]["energy"][t], rh["add"][t][m] / asum, atol=1e-5,
                                                   err_msg=f"{what} head {h} mode {m} additive {t}")
    a, b = results
    for la, lb in zip(a["layers"], b["layers"]):
        for f in "XPC":  # the position probes: the same held-out images (by id) whatever the batch size
            for c in ("row", "col"):
                va, vb = la["decoding"][f][c], lb["decoding"][f][c]
                assert (va is None) == (vb is None), f"{case} decoding {f}"
                if va is not None:
                    np.testing.assert_allclose(va, vb, rtol=1e-4, atol=1e-6, err_msg=f"{case} decoding {f} {c}")
        for ha, hb in zip(la["heads"], lb["heads"]):
            for t in TERMS:
                np.testing.assert_allclose(ha["frobenius"]["energy_abs"][t], hb["frobenius"]["energy_abs"][t],
                                           # the float32 tokens round differently with the batch size
                                           rtol=1e-6, atol=1e-6 * hb["frobenius"]["energy_abs"]["total"])


@pytest.mark.parametrize("seed", range(6))
def test_bfd_reducers_merged_over_shuffled_batches_equal_one_batch(seed):
    """PositionMeans and BFDEnergies fed the same tokens in shuffled batches, split over two reducers, one restored
    from its saved state, and merged: the one-batch sums to float rounding."""
    case = make_case(seed, min_images=2, max_images=8)
    rng = np.random.default_rng(70 + seed)
    xs = tokens(case)
    n = len(case.images)
    x = {l: torch.from_numpy(t) for l, t in enumerate(xs)}

    def batches(order):
        for sl in order:
            yield BatchCapture(ids=[str(i) for i in range(sl.start, sl.stop)], meta={}, offset=sl.start,
                               layers={l: LayerCapture(l, sl.stop - sl.start, inputs=t[sl]) for l, t in x.items()})

    def feed(build, order):
        half = int(rng.integers(0, len(order) + 1))
        a, b = build(), build()
        for i, batch in enumerate(batches(order)):
            if i == half and i:
                a = Reducer.from_state(a.saved_state(), **({} if isinstance(a, PositionMeans) else context))
            (a if i < half else b).update(batch)
        a.merge(b)
        return a

    cuts = random_splits(rng, n)
    order = [cuts[i] for i in rng.permutation(len(cuts))]
    one = PositionMeans()
    for batch in batches([slice(0, n)]):
        one.update(batch)
    context: dict[str, Any] = {}
    means = feed(PositionMeans, order).means()
    for l in x:
        np.testing.assert_allclose(means[l].numpy(), xs[l].mean(0), rtol=1e-12, atol=1e-12)
    spectra = full_modes(case.model)
    context = {"spectra": spectra}
    drop = bool(rng.integers(0, 2))
    build = lambda: BFDEnergies(spectra, one, case.prefix, drop)  # noqa: E731
    whole = build()
    for batch in batches([slice(0, n)]):
        whole.update(batch)
    merged = feed(build, order)
    ref, got = summarize(whole.state_dict()), summarize(merged.state_dict())
    for la, lb in zip(ref["layers"], got["layers"]):
        for ha, hb in zip(la["heads"], lb["heads"]):
            for kind in ("frobenius", "additive"):
                for t in TERMS:
                    va, vb = ha[kind]["energy"][t], hb[kind]["energy"][t]
                    assert (va is None) == (vb is None)
                    if va is not None:
                        np.testing.assert_allclose(vb, va, rtol=1e-9, atol=1e-12, err_msg=f"{case} {kind} {t}")


@pytest.mark.parametrize("seed", range(9))
def test_same_object_table_equals_numpy_over_the_top_images(seed):
    case = make_case(seed, min_images=3, max_images=8)
    rng = np.random.default_rng(90 + seed)
    n = len(case.images)
    k = int(rng.integers(1, n + 1))
    top = int(rng.integers(1, k + 1))
    target, distractor = odd_one_out_masks(rng, n, case.hw)
    topk = TopKModes(k=k, map_dtype="float32")
    spec = record_case(case, random_splits(rng, n), "all", target, distractor, [topk])
    objects = rng.integers(0, int(rng.integers(1, 5)), size=(n, *case.grid))
    table = same_object_table(topk.state_dict(), objects, {l: {"S": np.asarray(spec[l].S)} for l in range(case.depth)},
                              case.prefix, top=top)
    for row, x in zip(table["rows"], tokens(case)):
        layer = row["layer"]
        u, v = (np.asarray(a, np.float64) for a in (spec[layer].U, spec[layer].V))
        q, kk = np.einsum("bnd,hdk->bhkn", x, u), np.einsum("bnd,hdk->bhkn", x, v)
        scores = signed_scores_np(q, kk, case.prefix)
        S = np.asarray(spec[layer].S, np.float64)
        p = np.full(S.shape, np.nan)
        ambiguous = np.zeros(S.shape, bool)
        for h in range(case.heads):
            for m in range(S.shape[1]):
                same, ambiguous[h, m] = same_object_np(scores[:, h, m], q[:, h, m], kk[:, h, m], objects, top,
                                                       case.prefix)
                if same:
                    p[h, m] = np.mean(same)
        got = np.asarray(row["per_mode"], np.float64)
        sure = ~ambiguous
        what = f"{case}, layer {layer}, k={k}, top={top}"
        np.testing.assert_array_equal(np.isnan(got[sure]), np.isnan(p[sure]), err_msg=what)
        np.testing.assert_allclose(got[sure & ~np.isnan(p)], p[sure & ~np.isnan(p)], atol=1e-12, err_msg=what)
        if sure.all() and not row["uninformative"]:  # sigma-weighted per head over the modes with a value
            w = np.where(np.isnan(p), 0, S)
            with np.errstate(invalid="ignore"):
                per_head = np.where(w.sum(1) > 0, (w * np.nan_to_num(p)).sum(1) / w.sum(1), np.nan)
            np.testing.assert_allclose(row["per_head"], per_head, atol=1e-12, err_msg=what)
            if np.isfinite(per_head).any():
                np.testing.assert_allclose(row["p_same"], np.nanmean(per_head), atol=1e-12, err_msg=what)


def majority_np(labels: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Per patch the label covering most of its pixels; ties: 0 first, then the lower id."""
    H, W = labels.shape
    blocks = labels.reshape(grid[0], H // grid[0], grid[1], W // grid[1]).transpose(0, 2, 1, 3).reshape(*grid, -1)
    out = np.zeros(grid, np.int64)
    for r in range(grid[0]):
        for c in range(grid[1]):
            ids, counts = np.unique(blocks[r, c], return_counts=True)
            out[r, c] = ids[int(np.argmax(counts))]  # np.unique sorts: the first maximum is the lowest id
    return out


@pytest.mark.parametrize("seed", range(5))
def test_run_file_modes_preference_and_same_object_equal_numpy(seed, tmp_path):
    """record_dataset into a run file (random batch size, storage dtype, k), then analyze_modes and
    analyze_preference from the file, against numpy from the raw weights and our own tokens."""
    from PIL import Image

    from qkhooks.analysis.modes import analyze_modes
    from qkhooks.analysis.preference import analyze_preference
    from qkhooks.data import ImageConfig
    from qkhooks.models.load import LoadedModel
    from qkhooks.store import open_run
    from qkhooks.stream import record_dataset

    case = make_case(seed, min_images=3, max_images=8)
    rng = np.random.default_rng(200 + seed)
    n, (H, W) = len(case.images), case.hw
    cfg = ImageConfig(size=(H, W), mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.25))
    loaded = LoadedModel(model=case.model, spec=f"fuzz-{seed}", image_config=cfg)
    photos = rng.integers(0, 256, size=(n, H, W, 3), dtype=np.uint8)
    target, distractor = odd_one_out_masks(rng, n, (H, W))
    labels = rng.integers(0, int(rng.integers(2, 5)), size=(n, H, W))
    items = [{"image": photos[i], "id": f"im{i}", "target": target[i].numpy() > 0, "distractor": distractor[i].numpy() > 0,
              "objects": labels[i]} for i in range(n)]
    dtype = str(rng.choice(["float32", "float16"]))
    modes = "all" if rng.integers(0, 2) else int(rng.integers(1, case.head_dim + 1))
    bs = int(rng.integers(1, n + 1))
    chosen = sorted(rng.choice(case.depth, size=int(rng.integers(1, case.depth + 1)), replace=False).tolist())
    result = record_dataset(loaded, items, tmp_path / "run.h5", modes=modes, attention="rows", batch_size=bs,
                            progress=False, dtype=dtype,
                            layers=[l - case.depth if rng.integers(0, 2) else l for l in chosen])
    analysed = sorted(rng.choice(chosen, size=int(rng.integers(1, len(chosen) + 1)), replace=False).tolist())
    asked = None if rng.integers(0, 2) else [l - case.depth if rng.integers(0, 2) else l for l in analysed]
    analysed = chosen if asked is None else analysed
    k = None if rng.integers(0, 2) else int(rng.integers(1, 12))  # k above the saved 8: ranked from the stored maps
    top = int(rng.integers(1, min(k or 8, 5) + 1))
    summary = analyze_modes(result.path, tmp_path / "modes", k=k, figure_modes=0, overview=False, images=False,
                            same_object_top=top, layers=asked)
    assert [e["layer"] for e in summary["layers"]] == analysed, (case, chosen, asked)
    table = analyze_preference(result.path, tmp_path / "pref")
    pixels = torch.stack([cfg(Image.fromarray(p)) for p in photos])
    xs, weights = tokens(case, pixels), qk_weights(case)
    objects = np.stack([majority_np(l, case.grid) for l in labels])
    with open_run(result.path) as run:
        np.testing.assert_array_equal(run.array("masks/objects")[:], objects)
        spectra = {l: run.spectrum(l) for l in chosen}
    tol = 2e-5 if dtype == "float32" else 4e-3
    tg, dg = block_means(target.numpy(), case.grid), block_means(distractor.numpy(), case.grid)
    tq = np.stack([tg.reshape(n, -1).argmax(1), dg.reshape(n, -1).argmax(1)], 1) + case.prefix
    what = f"{case}, dtype={dtype}, modes={modes}, batch_size={bs}, k={k}, top={top}, layers {chosen} / {asked}"
    assert table["layers"] == chosen, what
    for entry in summary["layers"]:
        layer = entry["layer"]
        x, (wq, bq, wk, bk) = xs[layer], weights[layer]
        u, v, S = (np.asarray(a, np.float64) for a in (spectra[layer].U, spectra[layer].V, spectra[layer].S))
        q, kk = np.einsum("bnd,hdk->bhkn", x, u), np.einsum("bnd,hdk->bhkn", x, v)
        scores = signed_scores_np(q, kk, case.prefix)
        kept = summary["k"]
        for h, head in enumerate(entry["heads"]):
            for m, mode in enumerate(head["modes"]):
                got = mode["top"]
                if mode.get("null"):  # sigma = 0 (a pruned head): no cosine, no images, no p_same
                    assert got == [] and mode["cos"] is None and S[h, m] <= 1e-6 * max(S.max(), 1e-30), what
                    assert mode.get("p_same") is None, what
                    continue
                better = scores[:, h, m].max(-1)
                scale = max(float(np.abs(better).max()), 1e-30)
                assert_same_ranking(np.array([t["index"] for t in got]), np.array([t["score"] for t in got]), better,
                                    min(kept, n), f"{what}: layer {layer} head {h} mode {m}") if dtype == "float32" \
                    else np.testing.assert_allclose([t["score"] for t in got],
                                                    np.sort(better)[::-1][:min(kept, n)], atol=tol * scale, err_msg=what)
        # anisotropy baseline and the weighted cosines from the run
        centre = case.prefix + (case.grid[0] // 2) * case.grid[1] + case.grid[1] // 2
        z = x[:, centre] / np.linalg.norm(x[:, centre], axis=1, keepdims=True)
        base = ((z.sum(0) ** 2).sum() - n) / (n * (n - 1))
        an = summary["anisotropy"][layer]
        np.testing.assert_allclose(an["baseline"], base, atol=1e-5, err_msg=what)
        U, Sd, V = dense_modes(wq, wk)
        with np.errstate(invalid="ignore"):  # a pruned head has no weights: left out of the layer's mean
            per_head = (Sd / Sd.sum(1, keepdims=True) * np.einsum("hdk,hdk->hk", U, V)).sum(1)
        weighted = per_head[np.isfinite(per_head)].mean() if np.isfinite(per_head).any() else np.nan
        np.testing.assert_allclose(an["cos_weighted"], weighted, atol=1e-5, err_msg=what)
        np.testing.assert_allclose(an["relative_cos_weighted"], weighted - base, atol=2e-5, err_msg=what)
        # same object: per mode, over its top images by the better sign
        p = np.full(S.shape, np.nan)
        ambiguous = np.zeros(S.shape, bool)
        for h in range(S.shape[0]):
            for m in range(S.shape[1]):
                same, ambiguous[h, m] = same_object_np(scores[:, h, m], q[:, h, m], kk[:, h, m], objects, top,
                                                       case.prefix)
                if same:
                    p[h, m] = np.mean(same)
        got = np.array([[np.nan if md.get("p_same") is None else md["p_same"] for md in hd["modes"]]
                        for hd in entry["heads"]], np.float64)
        null = S <= 1e-6 * S.max(1, keepdims=True)  # null modes: no value (their directions are arbitrary)
        p[null] = np.nan
        sure = ~ambiguous | null
        np.testing.assert_array_equal(np.isnan(got[sure]), np.isnan(p[sure]), err_msg=what)
        np.testing.assert_allclose(got[sure & ~np.isnan(p)], p[sure & ~np.isnan(p)], atol=1e-12, err_msg=what)
        # preference from the stored rows: numpy from the raw weights' softmax at the masks' maximum tokens
        attn = softmax_rows(x, wq, bq, wk, bk, qk_norms(case)[layer])
        rows = np.stack([attn[i][:, tq[i]] for i in range(n)])
        vals = preference_np(rows, tg, dg, case.prefix)
        i = table["layers"].index(layer)
        for name, (a, b) in GROUPS.items():
            g = (vals[..., a] + vals[..., b]) / 2
            np.testing.assert_allclose(table[name]["mean"][i], g.mean(), atol=tol * 10, err_msg=f"{what} {name}")
            np.testing.assert_allclose(table[name]["std"][i], g.mean(1).std(), atol=tol * 10, err_msg=f"{what} {name}")


@pytest.mark.parametrize("seed", range(4))
def test_bfd_run_file_equals_the_tensor_pass_and_reads_back(seed, tmp_path):
    """run_bfd through record_dataset into a run file (random batch size, layers, prefix dropped or not) gives the
    energies of the in-memory pass over the same preprocessed images, and read_bfd recomputes them from the file."""
    from PIL import Image

    from qkhooks.analysis.bfd import read_bfd
    from qkhooks.data import ImageConfig
    from qkhooks.models.load import LoadedModel

    case = make_case(seed, min_images=3, max_images=7)
    rng = np.random.default_rng(300 + seed)
    n, (H, W) = len(case.images), case.hw
    cfg = ImageConfig(size=(H, W), mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.25))
    photos = rng.integers(0, 256, size=(n, H, W, 3), dtype=np.uint8)
    pixels = torch.stack([cfg(Image.fromarray(p)) for p in photos])
    chosen = sorted(rng.choice(case.depth, size=int(rng.integers(1, case.depth + 1)), replace=False).tolist())
    options = dict(layers=chosen, drop_prefix=bool(rng.integers(0, 2)), holdout_every=2,
                   definition=str(rng.choice(["frobenius", "additive"])))
    filed = run_bfd(LoadedModel(model=case.model, spec=f"fuzz-{seed}", image_config=cfg),
                    [{"image": p, "id": str(i)} for i, p in enumerate(photos)], tmp_path / "bfd.h5",
                    batch_size=int(rng.integers(1, n + 1)), **options)
    live = run_bfd(case.model, pixels, batch_size=int(rng.integers(1, n + 1)), **options)
    again = read_bfd(tmp_path / "bfd.h5", definition=options["definition"])
    what = f"{case}, {options}"
    for a, b, c in zip(filed["layers"], live["layers"], again["layers"]):
        assert a["layer"] == b["layer"] == c["layer"], what
        for x, y in ((a, b), (a, c)):
            np.testing.assert_allclose(x["position_variance_share"], y["position_variance_share"], rtol=1e-6,
                                       err_msg=what)
            for hx, hy in zip(x["heads"], y["heads"]):
                for t in TERMS:
                    for kind in ("frobenius", "additive"):
                        vx, vy = hx[kind]["energy"][t], hy[kind]["energy"][t]
                        assert (vx is None) == (vy is None), what
                        if vx is not None:
                            np.testing.assert_allclose(vx, vy, atol=1e-6, err_msg=f"{what} {kind} {t}")
                    assert hx["energy"][t] == hx[options["definition"]]["energy"][t], what
            for f in "XPC":
                for part in ("row", "col"):
                    vx, vy = x["decoding"][f][part], y["decoding"][f][part]
                    assert (vx is None) == (vy is None), what
                    if vx is not None:
                        np.testing.assert_allclose(vx, vy, rtol=1e-4, atol=1e-6, err_msg=f"{what} decoding {f}")
