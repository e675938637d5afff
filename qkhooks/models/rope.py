"""RoPE split into frequency bands, exactly (METHODS.md C).

With R(i) the block rotation of token i (pairs f of the head's dimensions turned by φ_f(i)),

    q_i^T R(i)^T R(j) k_j = Σ_f cos(Δφ_f) q_i^T P_f k_j + sin(Δφ_f) q_i^T J_f k_j,    Δφ_f = φ_f(j) − φ_f(i),

P_f the projector onto pair f and J_f its 90° turn. So each band of pairs has two bilinear forms,
W_q^T P_b W_k (the zero-offset part; the bands sum to W_q^T W_k) and W_q^T J_b W_k, each with its own SVD
and cosines. The pairs and the angles are read off the model's own rotary tables (the ones it hands its
attention), so the split is the model's, not a guess.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch
from torch import nn

from qkhooks.errors import QKHooksError
from qkhooks.models.base import AttentionSite
from qkhooks.models.unsupported import own_hook, remove_own_hooks
from qkhooks.spectrum import augmented_weights, factored_svd, head_weighted_cosines

__all__ = ["RopeBand", "rope_pairs", "rope_angles", "rope_bands", "capture_rope_tables", "rope_band_summary"]


@dataclasses.dataclass
class RopeBand:
    """One band of rotation pairs of one layer: its cos (P_b) and sin (J_b) forms, factored per head.

    Attributes:
        pairs: indices f of the rotation pairs in the band (highest frequency band first).
        frequency: (min, max) angle step per token along the grid of its pairs, in radians.
        cos_U, cos_S, cos_V / sin_U, sin_S, sin_V: SVD factors (H, d, r), (H, r) of W_q^T P_b W_k and W_q^T J_b W_k.
    """

    pairs: list[int]
    frequency: tuple[float, float]
    cos_U: torch.Tensor
    cos_S: torch.Tensor
    cos_V: torch.Tensor
    sin_U: torch.Tensor
    sin_S: torch.Tensor
    sin_V: torch.Tensor


def rope_pairs(site: AttentionSite) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b): the two dimensions of every rotation pair, in the model's layout (interleaved or halves)."""
    if site.rope_apply is None:
        raise QKHooksError(f"{site.path}: this attention has no rotary embedding, so it has no RoPE bands.")
    dk = site.head_dim
    if site.rope_layout == "half":
        return torch.arange(dk // 2), torch.arange(dk // 2, dk)
    if site.rope_layout == "axes":  # two halves (rows, columns), each rotated by its own halves (Gemma 4)
        quarter = torch.arange(dk // 4)
        first = torch.cat([quarter, quarter + dk // 2])
        return first, first + dk // 4
    return torch.arange(0, dk, 2), torch.arange(1, dk, 2)


def _cos_sin(tables: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(tables, torch.Tensor) and tables.is_complex():  # zoo11-maps: Llama 4's freqs_ci (N, ..., d_k/2)
        tables = tables.reshape(tables.shape[0], -1)  # pair i = dimensions (2i, 2i + 1): each angle on both
        cos, sin = tables.real.repeat_interleave(2, -1), tables.imag.repeat_interleave(2, -1)
    elif isinstance(tables, (tuple, list)):  # HF: (cos, sin)
        cos, sin = tables
    else:  # timm: [sin | cos] along the last axis
        sin, cos = tables.chunk(2, -1)
    while cos.dim() > 2:  # a leading axis of images, or of heads (RoPE-Mixed): every entry must be the first's
        if cos.shape[0] != 1 and not (torch.equal(cos, cos[:1].expand_as(cos)) and torch.equal(sin, sin[:1].expand_as(sin))):
            raise QKHooksError(f"the rotary tables differ along their leading axis of {cos.shape[0]} (images of the "
                               "batch, or heads with their own frequencies), so one set of RoPE bands does not hold "
                               "for all of them; the bands need one table.")
        cos, sin = cos[0], sin[0]
    return cos.double(), sin.double()


def rope_angles(site: AttentionSite, tables: Any, num_tokens: int) -> torch.Tensor:
    """φ_f(i) (N, P) of every token and pair; prefix tokens are not rotated (angle 0), as the model does."""
    a, _ = rope_pairs(site)
    cos, sin = _cos_sin(tables)
    phi = torch.atan2(sin[:, a], cos[:, a])
    prefix = num_tokens - phi.shape[0]
    if prefix < 0:
        raise QKHooksError(f"{site.path}: {phi.shape[0]} rotated tokens but only {num_tokens} tokens.")
    return torch.cat([phi.new_zeros(prefix, phi.shape[1]), phi])


def _frequency(site: AttentionSite, phi_patches: torch.Tensor) -> torch.Tensor:
    """Angle step per token of every pair: the larger of its mean steps along grid rows and columns."""
    n = phi_patches.shape[0]
    grid = getattr(site, "rope_grid", None) or site.grid  # zoo12: a windowed site's tables are one window's (SAM3)
    if grid and n == site.num_prefix_tokens + grid[0] * grid[1]:  # tables with the prefix rows (MLCD)
        phi_patches, n = phi_patches[site.num_prefix_tokens:], n - site.num_prefix_tokens
    suffix = int(getattr(site, "num_suffix_tokens", 0))  # zoo11-maps: Llama 4 vision's class token after the patches
    if not grid or grid[0] * grid[1] != n - suffix:  # steps along rows and columns need the model's own grid
        raise QKHooksError(f"{site.path}: {n} rotated tokens are not the native {grid} grid the rotary tables "
                           "are read on; qkhooks does not guess another grid for the RoPE bands.")
    gh, gw = grid
    grid = phi_patches[: gh * gw].reshape(gh, gw, -1)
    steps = []
    for diff in (grid[:, 1:] - grid[:, :-1], grid[1:] - grid[:-1]):
        if diff.numel():
            steps.append(torch.atan2(diff.sin(), diff.cos()).abs().flatten(0, 1).mean(0))
    return torch.stack(steps).max(0).values if steps else phi_patches.new_zeros(phi_patches.shape[1])


def _band_weights(site: AttentionSite, pairs: Sequence[int], augmented: bool) -> tuple[torch.Tensor, ...]:
    """Rows of W_q, W_k ([W | b] when augmented) on the band's dimensions, and of J W_k."""
    w = site.weights()
    w_q, w_k = augmented_weights(w) if augmented else (w.w_q, w.w_k)
    a, b = rope_pairs(site)
    a, b = a[list(pairs)], b[list(pairs)]
    rows = torch.cat([a, b])
    j_k = torch.cat([-w_k[:, b], w_k[:, a]], dim=1)  # (J W_k) on rows (a, b): (-W_k[b], W_k[a])
    return w_q[:, rows].double(), w_k[:, rows].double(), j_k.double()


def rope_bands(site: AttentionSite, tables: Any, num_bands: int, augmented: bool = False) -> list[RopeBand]:
    """The layer's rotation pairs grouped by frequency into ``num_bands`` bands (highest first), with the
    SVD of each band's cos and sin forms."""
    a, _ = rope_pairs(site)
    if not 1 <= num_bands <= len(a):
        raise QKHooksError(f"--rope-bands must be between 1 and {len(a)} (the rotation pairs of {site.path}); got {num_bands}.")
    cos, _ = _cos_sin(tables)
    phi = rope_angles(site, tables, cos.shape[0])
    freq = _frequency(site, phi)
    order = torch.argsort(freq, descending=True, stable=True).tolist()
    bands = []
    for chunk in torch.tensor_split(torch.tensor(order), num_bands):
        pairs = sorted(chunk.tolist())
        w_q, w_k, j_k = _band_weights(site, pairs, augmented)
        cu, cs, cv = factored_svd(w_q, w_k)
        su, ss, sv = factored_svd(w_q, j_k)
        f = freq[pairs]
        bands.append(RopeBand(pairs, (float(f.min()), float(f.max())), cu, cs, cv, su, ss, sv))
    return bands


def capture_rope_tables(model: nn.Module, sites: Sequence[AttentionSite]) -> dict[int, Any]:
    """The rotary tables the model hands each site, from one forward on a blank image of the native size."""
    tables: dict[int, Any] = {}

    def grab(site: AttentionSite):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            site.refuse_unmodelled_inputs(args, kwargs)  # reads the tables wherever the site's call carries them
            tables[site.layer] = site._call_rope
            site.forget_call()

        return hook

    site = next((s for s in sites if s.grid is not None and s.patch_size is not None), sites[0])  # windowed sites have no grid
    if site.grid is None or site.patch_size is None:
        raise QKHooksError(f"{site.path}: no native grid and patch size, so no blank image to read the rotary tables.")
    size = (site.grid[0] * site.patch_size[0], site.grid[1] * site.patch_size[1])
    param = next(model.parameters())
    image = torch.zeros(1, 3, *size, dtype=param.dtype, device=param.device)
    handles = [own_hook(model, s.module, grab(s), with_kwargs=True) for s in sites]
    try:
        with torch.no_grad():
            model(image) if type(model).__module__.startswith("timm.") else model(pixel_values=image)
    finally:
        remove_own_hooks(handles)
    missing = [s.layer for s in sites if tables.get(s.layer) is None]
    if missing:
        raise QKHooksError(f"layers {missing} were handed no rotary tables: the model does not rotate q and k there (no "
                           "RoPE), so they have no RoPE bands; drop --rope-bands for this model, or pick its RoPE layers "
                           "with --layers.")
    return tables


def rope_band_summary(model: nn.Module, sites: Sequence[AttentionSite], num_bands: int) -> dict[int, list[dict]]:
    """Layer -> per band: pairs, frequency range, each form's σ-weighted cosine per head and its energy share."""
    tables = capture_rope_tables(model, sites)
    out: dict[int, list[dict]] = {}
    for site in sites:
        bands = rope_bands(site, tables[site.layer], num_bands)
        total = sum(float((b.cos_S**2).sum() + (b.sin_S**2).sum()) for b in bands) or 1.0
        rows = []
        for index, band in enumerate(bands):
            row: dict[str, Any] = {"band": index, "pairs": band.pairs, "frequency": list(band.frequency)}
            for form, (u, s, v) in (("cos", (band.cos_U, band.cos_S, band.cos_V)), ("sin", (band.sin_U, band.sin_S, band.sin_V))):
                cos = (u * v).sum(1)  # (H, r) cosine of u_n and v_n
                heads = head_weighted_cosines(s.numpy(), cos.numpy())
                row[form] = {"cosine_weighted": [float(c) for c in heads], "energy": float((s**2).sum()) / total}
            rows.append(row)
        out[site.layer] = rows
    return out
