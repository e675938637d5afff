"""The zoo check of one model: recorded exactly, or refused with a QKHooksError that names the module.

Ground truth is the model's own: its output without hooks, its eager attention weights (timm's non-fused
path read at ``attn_drop``, HF's ``output_attentions`` under ``attn_implementation="eager"``), and its eager
logits (log attention, up to a constant per row) for the modes.
"""

from __future__ import annotations

import os
import re

import copy
import dataclasses
from typing import Any, Callable

import pytest
import torch
from torch import nn

import qkhooks
from qkhooks import QKHooksError


@dataclasses.dataclass
class Outcome:
    """``exact`` (every check passed), ``refused`` (a QKHooksError naming a module) or ``unbuildable``."""

    status: str
    detail: str = ""
    families: tuple[str, ...] = ()
    layers: int = 0
    form: str = ""


def perturb(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter perturbed, so zero-initialised biases, position tables and scales are really tested."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype)
            p.add_(noise * (0.2 if bool((p == 0).all()) else 0.02))
    return model.eval()


def _first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "last_hidden_state") and out.last_hidden_state is not None:
        return out.last_hidden_state
    if getattr(out, "feature_maps", None):  # an HF *Backbone's BackboneOutput: every stage it returns, in one tensor
        return torch.cat([f.flatten() for f in out.feature_maps])
    values = out.values() if isinstance(out, dict) else (out.to_tuple() if hasattr(out, "to_tuple") else out)
    return next(v for v in values if isinstance(v, torch.Tensor))


def _call(model: nn.Module, inputs: dict[str, Any], **extra: Any) -> Any:
    torch.manual_seed(0)  # models that draw at random in eval (ViTMAE's token masking) draw the same each call
    with torch.no_grad():
        return model(**inputs, **extra)


def eager_maps(model: nn.Module, sites: list, inputs: dict[str, Any], kind: str) -> list[torch.Tensor]:
    """The model's own attention weights per recorded site, from its non-fused path."""
    if kind == "torchvision":  # nn.MultiheadAttention: its own per-head weights, asked for in each call
        weights: dict[int, torch.Tensor] = {}
        asked = [s.module.register_forward_pre_hook(
            lambda m, a, k: (a, {**k, "need_weights": True, "average_attn_weights": False}), with_kwargs=True)
            for s in sites]
        kept = [s.module.register_forward_hook(lambda m, a, o, i=i: weights.__setitem__(i, o[1].detach()))
                for i, s in enumerate(sites)]
        try:
            _call(model, inputs)
        finally:
            for h in asked + kept:
                h.remove()
        return [weights[i] for i in range(len(sites)) if i in weights]
    if kind == "timm" or all(s.family.startswith("timm") for s in sites):  # zoo11-build: a timm model in an HF wrapper
        maps: dict[int, torch.Tensor] = {}
        fused = [(m, m.fused_attn) for m in model.modules() if hasattr(m, "fused_attn")]
        handles = []
        per_head: dict[int, list[torch.Tensor]] = {}  # zoo11-inside: one softmax per head (EfficientViT-MSRA), in order
        for i, site in enumerate(sites):
            if getattr(site, "softmaxes_per_call", 1) > 1:
                handles += _softmax_hooks(site.module, lambda t, i=i: per_head.setdefault(i, []).append(t.detach().clone()))
                continue
            if getattr(site.module, "talking_head2", None) is not None:  # EfficientFormer-v2: heads mixed after the softmax
                handles.append(site.module.talking_head2.register_forward_hook(
                    lambda m, a, o, i=i: maps.__setitem__(i, o.detach().clone())))
                continue
            if getattr(site.module, "attn_drop", None) is None:  # no dropout module (EfficientFormer): its softmax
                handles += _softmax_hooks(site.module, lambda t, i=i: maps.__setitem__(i, t.detach().clone()))
                continue
            handles.append(site.module.attn_drop.register_forward_hook(
                lambda m, a, o, i=i: maps.__setitem__(i, o.detach().clone())))
        try:
            for m, _ in fused:
                m.fused_attn = False
            _call(model, inputs)
        finally:
            for h in handles:
                h.remove()
            for m, value in fused:
                m.fused_attn = value
        maps.update({i: torch.stack(heads, dim=1) for i, heads in per_head.items()})
        return [maps[i] for i in range(len(sites)) if i in maps]
    # HF attention modules return (output, weights) on the eager path: read each site's own weights
    seen: dict[int, torch.Tensor] = {}
    handles = [site.module.register_forward_hook(
        lambda m, a, o, i=i: seen.__setitem__(i, o[1].detach()) if isinstance(o, tuple) and len(o) > 1
        and isinstance(o[1], torch.Tensor) else None) for i, site in enumerate(sites)]
    calls: dict[int, list[torch.Tensor]] = {}  # zoo11-inside: a layer run once per frame (VidEoMT): every call's weights
    handles += [site.module.register_forward_hook(lambda m, a, o, i=i: calls.setdefault(i, []).append(o[1].detach()))
                for i, site in enumerate(sites) if site.joins_calls()]
    softmaxed: dict[int, torch.Tensor] = {}  # modules that return no weights (HF MobileViT): the softmax they compute
    for i, site in enumerate(sites):
        handles += _softmax_hooks(site.module, lambda t, i=i: softmaxed.__setitem__(i, t.detach().clone()))
    segments: dict[int, list[torch.Tensor]] = {}  # zoo-packed: a packed tower's softmax of each segment, in order
    for i, site in enumerate(sites):
        if hasattr(site, "segment_lengths"):
            handles += _softmax_hooks(site.module, lambda t, i=i: segments.setdefault(i, []).append(t.detach().clone()))
    handles += [site.module.register_forward_pre_hook(_ask_for_weights, with_kwargs=True) for site in sites]
    before = model.config._attn_implementation
    # sub-models may run another implementation than the top config says (Mask2Former's Swin backbone: SDPA): each put back
    sub_configs = [(m, m.config._attn_implementation) for m in model.modules() if hasattr(getattr(m, "config", None), "_attn_implementation")]
    model.set_attn_implementation("eager")
    try:
        # zoo11-maps: Llama 4 vision's modules return their eager weights, but its encoder fails gathering them
        _call(model, inputs, **({} if type(model).__name__ == "Llama4VisionModel" else {"output_attentions": True}))
    finally:
        model.set_attn_implementation(before)
        for module, implementation in sub_configs:  # a config's setter passes its value down to its sub-configs:
            if module.config._attn_implementation != implementation:  # set only those that differ
                module.config._attn_implementation = implementation
        for h in handles:
            h.remove()
    seen.update({i: _padded_segments(maps) for i, maps in segments.items()})  # zoo-packed: its eager softmaxes
    seen.update({i: torch.stack(maps, dim=1).flatten(0, 1) for i, maps in calls.items()})  # zoo11-inside: b·T + t
    if len(seen) < len(sites) and before != "eager":  # the class picked its attention modules when built (Data2Vec):
        # an eager twin, same weights, on a copy of the config (building it sets the config's implementation: SAM2)
        twin = type(model)._from_config(copy.deepcopy(model.config), attn_implementation="eager").eval()
        twin.load_state_dict(model.state_dict())
        twin_sites = [dataclasses.replace(s, module=twin.get_submodule(s.path)) for s in sites]
        twin.config._attn_implementation = "eager"
        return eager_maps(twin, twin_sites, inputs, kind)
    seen = {i: seen.get(i, softmaxed.get(i)) for i in range(len(sites))}
    return [seen[i] for i in range(len(sites)) if seen[i] is not None]


def _padded_segments(maps: list[torch.Tensor]) -> torch.Tensor:
    """zoo-packed: per-segment maps (1, H, n_s, n_s) -> (S, H, n_max, n_max), zero outside each segment's block."""
    n = max(m.shape[-1] for m in maps)
    return torch.cat([torch.nn.functional.pad(m, (0, n - m.shape[-1], 0, n - m.shape[-2])) for m in maps])


def _packed_tokens(x: torch.Tensor, cu_seqlens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """zoo-packed: packed tokens (N_total, d) -> (S, n_max, d) zero-padded, and which positions are tokens (S, n_max)."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    valid = torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]
    return torch.nn.utils.rnn.pad_sequence(list(x.split(lengths)), batch_first=True), valid


def _ask_for_weights(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """output_attentions=True for a site whose wrapper does not pass the flag down (MaskFormer's Swin backbone)."""
    import inspect

    bound = inspect.signature(module.forward).bind_partial(*args, **kwargs)
    if "output_attentions" not in inspect.signature(module.forward).parameters or bound.arguments.get("output_attentions"):
        return None
    bound.arguments["output_attentions"] = True
    return bound.args, bound.kwargs


def _softmax_hooks(module: nn.Module, keep: Callable[[torch.Tensor], None]) -> list[Any]:
    """Hooks that hand ``keep`` the output of the softmax the module computes in its own forward (its attention map)."""
    from torch.overrides import TorchFunctionMode

    softmaxes = {torch.softmax, torch.Tensor.softmax, torch.nn.functional.softmax}

    class Grab(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func in softmaxes:
                keep(out)
            return out

    mode = Grab()

    def enter(m: nn.Module, a: tuple) -> None:
        mode.__enter__()

    def leave(m: nn.Module, a: tuple, o: Any) -> None:
        mode.__exit__(None, None, None)

    return [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]


def check(model: nn.Module, inputs: dict[str, Any], kind: str, skip_unmodelled: bool = False) -> Outcome:
    """Record ``model`` (perturbed already) on ``inputs`` and compare everything with the model's own (``skip_unmodelled``:
    a partial recording, the sites qkhooks models, each module left out named)."""
    try:
        sites = qkhooks.sites(model, skip_unmodelled=skip_unmodelled)
    except QKHooksError as err:
        return _refused(err)
    fired: list[int] = []  # layer indices must be the order the forward runs the sites
    inputs_seen: dict[int, torch.Tensor] = {}
    packed_valid: dict[int, torch.Tensor] = {}  # zoo-packed: token positions of each segment of a packed call

    def seen(site: Any):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            fired.append(site.layer)
            x = args[0] if args else kwargs[site.input_name]
            keep_map = hasattr(module, "talking_head1")  # EfficientFormer-v2: its NCHW map, for its own q/k convs
            if x.dim() == 4 and site.token_layout == "channels_first" and not keep_map:  # NCHW maps (BoTNet), row by row
                x = x.flatten(2).transpose(1, 2)
            inputs_seen[site.layer] = x.flatten(1, -2) if x.dim() == 4 and not keep_map else x
            if "cu_seqlens" in kwargs:  # zoo-packed: one packed sequence (HYV4VL: a batch of one), cut by its cu_seqlens
                inputs_seen[site.layer], packed_valid[site.layer] = _packed_tokens(x.reshape(-1, x.shape[-1]), kwargs["cu_seqlens"])

        return hook

    handles = [s.module.register_forward_pre_hook(seen(s), with_kwargs=True) for s in sites]
    try:
        ref = _first_tensor(_call(model, inputs))
    finally:
        for h in handles:
            h.remove()
    # zoo11-inside: a layer run once per frame (joins_calls) fires once per frame; every other layer once
    repeated = [l for l in set(fired) if fired.count(l) > 1 and not sites[l].joins_calls()]
    assert list(dict.fromkeys(fired)) == list(range(len(sites))) and not repeated, f"layer indices {fired} are not the forward order"
    eager = eager_maps(model, sites, inputs, kind)
    # zoo11-inside: maps-only layers (q or k made inside the module): their maps here, the other layers' modes below
    maps_only = [s.layer for s in sites if s.modes_refusal()]
    try:
        with qkhooks.record(model, modes=None if maps_only else "all", augmented=True, attention="full",
                            skip_unmodelled=skip_unmodelled) as run:
            out = _first_tensor(_call(model, inputs))
            called = [dataclasses.replace(s) for s in run.sites]  # as called: the recording forgets the call on exit
            # the call's own terms, read while recording: a finished recording forgets them
            bias = {s.layer: s.logit_bias() for s in run.sites}
            rotated = {s.layer: s.rotates() for s in run.sites}
            windows = {s.layer: s.window_index() for s in run.sites if hasattr(s, "window_index")}
            # MobileViT: (pixel offsets P, patch (p_h, p_w), patches (n_h, n_w)) of the call
            unfolded = {s.layer: (s.pixels, s.patch, s.patches_of_call()) for s in run.sites if hasattr(s, "patches_of_call")}
            form = _form(run.sites, bias, rotated)
    except QKHooksError as err:
        return _refused(err)
    modes_run = run
    if maps_only and len(maps_only) < len(sites):  # zoo11-inside: the modes of the layers that have them
        with qkhooks.record(model, modes="all", augmented=True, layers=[s.layer for s in sites if s.layer not in maps_only],
                            skip_unmodelled=skip_unmodelled) as modes_run:
            _call(model, inputs)
    families = tuple(sorted({s.family for s in sites}))
    assert torch.equal(out, ref), "output changed under record()"
    assert [s.layer for s in run.sites] == list(range(len(sites)))
    assert len(eager) == len(sites), f"{len(sites)} sites but the model returns {len(eager)} attention maps"
    for live, site, want in zip(sites, called, eager):
        got = run.attention(site.layer, "full")
        if want.dim() == 3:  # SAM folds the heads into the batch axis: (B·H, N, N)
            want = want.unflatten(0, (-1, site.num_heads))
        if site.family == "timm-halo":  # HaloNet's own (B·H, nB, Q, M): per image, blocks first
            want = want.unflatten(0, (-1, site.num_heads)).transpose(1, 2)
        if site.family == "timm-nest":  # NesT's own (B, H, T, N, N): blocks first, as every windowed layer's maps
            want = want.transpose(1, 2)
        if site.layer in windows and want.dim() == 4:  # one map per window: the model's (B·nW) batch axis split per image
            want = want.unflatten(0, (-1, windows[site.layer].shape[0]))
        if site.layer in unfolded:  # one map per (image, pixel offset): the model's (B·P) batch axis split per image
            got = got.flatten(0, 1)
        if site.family == "timm-diff":  # zoo11-maps: the model's 2H softmaxes (at attn_drop) as it combines them
            want = want.unflatten(1, (-1, 2))
            want = want[:, :, 0] - live.module._compute_lambda().detach().type_as(want) * want[:, :, 1]
        assert got.shape == want.shape, f"{site.path}: maps {tuple(got.shape)}, model {tuple(want.shape)}"
        err = float((got - want).abs().max())
        assert err < 1e-5, f"{site.path}: rebuilt maps differ from the model's eager attention by {err:.2e}"
        if site.layer in maps_only:  # zoo11-inside: no W_q^T W_k of its tokens, so no modes (refused if asked)
            continue
        # modes (augmented: biases folded in) rebuild the logits; the model's own are log A up to a row constant
        query, key, spectrum = modes_run.query(site.layer), modes_run.key(site.layer), modes_run.spectrum(site.layer)
        if site.family == "timm-halo":  # haloed key windows: tests/test_local_forms.py checks the modes against q·k
            continue
        if site.layer in unfolded:  # pixel-grid maps (B, H, K, n_h·p_h·n_w·p_w) back to the model's (B·P, H, K, N)
            _, (ph, pw), (nh, nw) = unfolded[site.layer]
            query, key = (t.reshape(*t.shape[:3], nh, ph, nw, pw).permute(0, 4, 6, 1, 2, 3, 5).reshape(
                -1, t.shape[1], t.shape[2], nh * nw) for t in (query, key))
        if site.layer in windows:
            query = _windowed(query, windows[site.layer], spectrum.U[:, -1])  # (B, nW, H, K, Nw)
            key = _windowed(key, windows[site.layer], spectrum.V[:, -1])
            logits = torch.einsum("bwhkn,hk,bwhkm->bwhnm", query, spectrum.S, key) * site.scale
        else:
            logits = torch.einsum("bhkn,hk,bhkm->bhnm", query, spectrum.S, key) * site.scale
        if not site.modes_rebuild_logits():  # RoPE, q/k-norm, CaiT: the modes are the content form, compared with q·k
            ref = _own_content_logits(live.module, inputs_seen[site.layer], site.num_heads) * site.scale
            if site.layer in windows:  # (B·nW, H, Nw, Nw) as the module saw it
                ref = ref.unflatten(0, (-1, windows[site.layer].shape[0]))
            if site.layer in packed_valid:  # zoo-packed: padding is no token; qkhooks reports 0 there
                valid = packed_valid[site.layer]
                ref = ref * (valid[:, None, :, None] & valid[:, None, None, :])
            err = float((logits - ref).abs().max() / ref.abs().max())
            assert err < 1e-4, f"{site.path}: modes do not rebuild the unrotated content logits ({err:.1e})"
            continue
        if bias[site.layer] is not None:  # the model's own additive term (relative table, mask)
            term = bias[site.layer][..., : logits.shape[-1]].to(logits.dtype)
            logits = logits + (term.unflatten(0, (-1, logits.shape[1])) if site.layer in windows and len(term) > 1 else term)
        own = want.double().clamp_min(1e-30).log()
        diff = (logits.double() - logits.double()[..., :1]) - (own - own[..., :1])
        keep = (want.double() > 1e-12) & (want[..., :1].double() > 1e-12)  # masked keys carry no logit
        scale = float((own - own[..., :1]).abs().max()) + 1.0
        assert float(diff.abs().where(keep, 0).max()) < 1e-4 * scale, f"{site.path}: modes do not rebuild the logits"
    if skip_unmodelled:  # never silent: every module left out is named with its reason, none is a recorded site
        assert run.left_out and not set(run.left_out) & {s.path for s in sites}, run.left_out
        return Outcome("exact", f"partial: {len(sites)} layers exact; left out (skip_unmodelled=True): "
                       + "; ".join(f"{p}: {why}" for p, why in list(run.left_out.items())[:1])
                       + f" (+ {len(run.left_out) - 1} more)", families, len(sites), ", ".join(filter(None, ("partial", form))))
    return Outcome("exact", f"{len(sites)} layers", families, len(sites), form)


def _windowed(maps: torch.Tensor, index: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
    """Grid maps (B, H, K, N) read at the window positions (B, nW, H, K, Nw); a padding position (-1) holds the
    zero token the model pads with, whose map under the augmented spectrum is ``padding`` (H, K): [0; 1]·u_n."""
    out = maps[..., index.clamp_min(0)].permute(0, 3, 1, 2, 4)  # (B, nW, H, K, Nw)
    return torch.where(index[:, None, None, :] >= 0, out, padding[None, None, :, :, None].to(out.dtype))


def _form(sites: list, bias: dict[int, Any], rotated: dict[int, bool]) -> str:
    """The attention form of a recorded model, as the README table names it, from its sites and the terms
    (additive term, rotation per layer) of the call recorded."""
    parts = []
    if len({s.stage for s in sites}) > 1:
        parts.append("stages")
    if any(rotated.values()):
        parts.append("RoPE")
    if any(b is not None for b in bias.values()):
        parts.append("bias/mask")
    if any(s.token_layout == "grid" for s in sites):
        parts.append("grid tokens")
    if any(s.qk_norm is not None for s in sites):
        parts.append("q/k-norm")
    if any(s.class_attention for s in sites):
        parts.append("class attention")
    if any(s.head_mixing is not None and not hasattr(s, "map_terms") for s in sites):
        parts.append("head mixing")
    if any(hasattr(s, "map_terms") for s in sites):  # zoo11-maps: differential attention, ConViT GPSA
        parts.append("two softmaxes")
    if any(getattr(s, "cap", None) is not None for s in sites):  # zoo11-maps: VideoPrism's c·tanh(logit / c)
        parts.append("soft-capped logits")
    if any(hasattr(s, "window_index") for s in sites):
        parts.append("windows")
    if any(getattr(s, "relative", None) is not None for s in sites):  # SAM/ViTDet decomposed relative positions
        parts.append("relative term")
    if any(s.key_tokens is not None and not hasattr(s, "key_window_index") for s in sites):
        parts.append("reduced keys")
    if any(hasattr(s, "key_window_index") for s in sites):  # HaloNet: each query block against its haloed window
        parts.append("haloed keys")
    if any(getattr(s, "pools_queries", False) for s in sites):  # Hiera, MViTv2: queries pooled after W_q
        parts.append("pooled queries")
    if any(hasattr(s, "segment_lengths") for s in sites):  # zoo-packed: one packed sequence cut by its cu_seqlens
        parts.append("packed segments (padding masked)")
    if any(getattr(s, "axis", None) in ("time", "space") for s in sites):  # zoo11-inside: TimeSformer's two groupings
        parts.append("divided space-time")
    if any(s.joins_calls() for s in sites):  # zoo11-inside: VidEoMT's per-frame layers, calls joined
        parts.append("per-frame calls")
    if any(s.observes_maps() for s in sites):  # zoo11-inside: q or k made inside the module, maps observed, no modes
        parts.append("q/k made inside (maps only)")
    return ", ".join(parts) or "plain"


def _own_content_logits(module: nn.Module, x: torch.Tensor, heads: int) -> torch.Tensor:
    """q·k (B, H, N, N) before any rotation, from the module's own q/k parameters, written out here."""
    if hasattr(module, "talking_head1"):  # EfficientFormer-v2: q, k from its own conv + BN on its (strided) NCHW map
        with torch.no_grad():
            x = x if module.stride_conv is None else module.stride_conv(x)
            q, k = (proj(x).flatten(2).unflatten(1, (heads, -1)) for proj in (module.q, module.k))  # (B, H, d_k, N)
            return q.transpose(-1, -2) @ k
    if getattr(module, "qkv", None) is not None:
        w, b = module.qkv.weight, module.qkv.bias
        if getattr(module, "q_bias", None) is not None:
            b = torch.cat([module.q_bias, module.k_bias, module.v_bias])
        rows = int(getattr(module, "dim_out_qk", w.shape[0] // 3))  # BoTNet: q and k may be narrower than v
        w = w.flatten(1)  # a 1x1-conv qkv (BoTNet) is a Linear at every pixel
        kv_rows = int(getattr(module, "kv_dim", rows))  # zoo-packed: Exaone 4.5's grouped-query qkv, q_dim + 2·kv_dim rows
        rows = int(getattr(module, "q_dim", rows))
        w_q, w_k = w[:rows], w[rows: rows + kv_rows]
        b_q, b_k = (None, None) if b is None else (b[:rows], b[rows: rows + kv_rows])
    elif getattr(module, "in_split", None) is not None:  # zoo11-maps: timm DiffParallelScalingBlock, [MLP | q | k | v]
        x = module.in_norm(x)
        start, width = module.in_split[0], module.in_split[1]
        w_q, w_k = module.in_proj.weight[start: start + width], module.in_proj.weight[start + width: start + 2 * width]
        bias = module.in_proj.bias
        b_q, b_k = (None, None) if bias is None else (bias[start: start + width], bias[start + width: start + 2 * width])
    elif getattr(module, "c_attn", None) is not None:  # zoo11-maps: ImageGPT's fused Conv1D (x @ W, W (d, 3d))
        w_q, w_k, _ = module.c_attn.weight.T.chunk(3)
        b_q, b_k, _ = module.c_attn.bias.chunk(3)
    elif getattr(module, "qk", None) is not None:  # zoo11-maps: ConViT GPSA's fused qk Linear, q rows then k rows
        w_q, w_k = module.qk.weight.chunk(2)
        b_q, b_k = (None, None) if module.qk.bias is None else module.qk.bias.chunk(2)
    elif getattr(module, "kv", None) is not None:  # zoo11-build: VOLO's class attention: q Linear, k the first half of kv
        rows = module.q.out_features
        w_q, b_q = module.q.weight, module.q.bias
        w_k, b_k = module.kv.weight[:rows], None if module.kv.bias is None else module.kv.bias[:rows]
    else:
        q_lin = getattr(module, "q_proj", None) or getattr(module, "query", None) or module.q
        k_lin = getattr(module, "k_proj", None) or getattr(module, "key", None) or module.k
        q_lin, k_lin = getattr(q_lin, "linear", q_lin), getattr(k_lin, "linear", k_lin)  # Gemma 4 wraps its Linear
        w_q, w_k, b_q, b_k = q_lin.weight, k_lin.weight, q_lin.bias, k_lin.bias
    with torch.no_grad():
        q = torch.nn.functional.linear(x, w_q, b_q).unflatten(-1, (heads, -1)).transpose(1, 2)
        k = torch.nn.functional.linear(x, w_k, b_k).unflatten(-1, (-1, q.shape[-1])).transpose(1, 2)
        k = k.repeat_interleave(heads // k.shape[1], dim=1)  # grouped-query: key head g serves heads g·G..g·G+G-1
        return q @ k.transpose(-1, -2)


def _refused(err: QKHooksError) -> Outcome:
    msg = str(err)
    names_module = "unsupported attention in '" in msg or "Attention-like modules it saw" in msg
    assert names_module, f"a refusal must name the module and the reason, got: {msg}"
    return Outcome("refused", msg)


def build_or_none(build: Callable[[], nn.Module]) -> nn.Module | None:
    torch.manual_seed(0)
    try:
        return build()
    except Exception:  # noqa: BLE001 - a model the zoo cannot build small is listed as such, not a qkhooks result
        return None


# ------------------------------------------------------------------------------------------ the cases
SMALL_VIT = dict(embed_dim=32, depth=2, num_heads=4, img_size=32, patch_size=8)
HF_SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32, patch_size=8)


def _timm(name: str, **kw: Any) -> Callable[[], nn.Module]:
    import timm

    return lambda: timm.create_model(name, pretrained=False, **kw)


def _hf(model_cls: str, config_cls: str, **kw: Any) -> Callable[[], nn.Module]:
    import transformers

    implementation = kw.pop("attn_implementation", "sdpa")

    def build() -> nn.Module:
        config = getattr(transformers, config_cls)(**kw)
        cls = getattr(transformers, model_cls)
        if getattr(cls, "_supports_sdpa", False):  # fused, as users run it; the eager path is the reference
            return cls._from_config(config, attn_implementation=implementation)
        return cls._from_config(config)

    return build


def _images(size: int | tuple[int, int], batch: int = 2) -> torch.Tensor:
    h, w = (size, size) if isinstance(size, int) else size
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(1))


@dataclasses.dataclass
class Case:
    """One zoo model: how to build it small, its inputs, and what qkhooks must do with it."""

    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], dict[str, Any]]
    kind: str
    expect: str  # "exact", or the words the refusal must contain
    refused_module: str = ""  # a module path the refusal must name
    entry: str = ""  # the timm entry point or transformers class it builds


def _timm_case(name: str, expect: str, size: int = 32, module: str = "", **kw: Any) -> Case:
    """``name`` is a timm entry point, optionally with a ``-variant`` label."""
    entry = name.partition("-")[0]
    return Case(name, _timm(entry, **kw), lambda: {"x": _images(size)}, "timm", expect, module, entry)


def _hf_case(label: str, model_cls: str, config_cls: str, expect: str, size: int = 32, module: str = "",
             inputs: Callable[[], dict[str, Any]] | None = None, **kw: Any) -> Case:
    return Case(label, _hf(model_cls, config_cls, **kw), inputs or (lambda: {"pixel_values": _images(size)}), "hf", expect,
                module, model_cls)


def _siglip2_padded() -> dict[str, Any]:
    """A NaFlex batch of two images, the second padded: 4x4 patches vs 2x4 patches plus 8 padding."""
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(2, 16, 3 * 8 * 8, generator=g)
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 8:] = 0
    return {"pixel_values": pixels, "pixel_attention_mask": mask, "spatial_shapes": torch.tensor([[4, 4], [2, 4]])}


def _clips(frames: int, size: int = 32, batch: int = 2, key: str = "pixel_values") -> Callable[[], dict[str, Any]]:
    """A batch of video clips (B, T, C, H, W), as HF video models take them (under ``key``)."""
    return lambda: {key: torch.randn(batch, frames, 3, size, size, generator=torch.Generator().manual_seed(1))}


def _small_eomt_dinov3() -> nn.Module:
    """EoMT on DINOv3 small, its mask head's logits centred per query: small random weights put every mask logit above
    0, so the mask of the last block would let every query see every patch; centred, each query masks about half."""
    model = _hf("EomtDinov3ForUniversalSegmentation", "EomtDinov3Config", num_queries=5, num_blocks=1, **HF_SMALL)()
    predict = model.predict

    def centred(hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        masks, classes = predict(hidden)
        return masks - masks.flatten(2).median(-1).values[..., None, None], classes

    model.predict = centred
    return model


def _small_timm_backbone() -> nn.Module:
    """transformers' TimmBackbone around a small timm ViT (its config names the timm entry point; sizes go to timm)."""
    import transformers

    config = transformers.TimmBackboneConfig(backbone="vit_tiny_patch16_224", out_indices=[1])
    return transformers.TimmBackbone(config, **SMALL_VIT)


# DepthPro: every DINOv2 encoder 2 layers of 4x4 patches (its patch_size is the encoders' image size); 128 px images
_DINOV2_SMALL = dict(HF_SMALL, model_type="dinov2")
DEPTH_PRO_SMALL = dict(patch_size=32, fusion_hidden_size=16, intermediate_hook_ids=[1, 0], intermediate_feature_dims=[16, 16],
                       scaled_images_feature_dims=[32, 32, 16], image_model_config=_DINOV2_SMALL,
                       patch_model_config=_DINOV2_SMALL, fov_model_config=_DINOV2_SMALL)
DETR_SMALL = dict(d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4,
                  encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=5)


# zoo12: SAM3's ViT small; its global layers' rotary tables are built for image_size (the model's own forward fails on
# another grid), so each case's images are that size. image_size is (height, width).
SAM3_VIT = dict(model_type="sam3_vit_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                image_size=56, patch_size=14, window_size=2, global_attn_indexes=[1], pretrain_image_size=28)
SAM3_VIT_PADDED = dict(SAM3_VIT, num_hidden_layers=3, image_size=[70, 42])


# a ResNet backbone of a few channels for DETR-family detectors (their default is a full ResNet-50), built eager:
# transformers' ResNet has no SDPA path to switch to
SMALL_RESNET = dict(backbone_config=dict(model_type="resnet", embedding_size=8, hidden_sizes=[8, 8, 16, 16], depths=[1, 1, 1, 1],
                                         out_features=["stage2", "stage3", "stage4"]),
                    use_timm_backbone=False, use_pretrained_backbone=False, attn_implementation="eager")


def _small_mobilenetv4_hybrid() -> nn.Module:
    """MobileNetV4-hybrid's layout small: a conv stem, then multi-query attention with and without kv stride (the
    timm entry points fix their block lists); a conv block ends the stage, as timm's feature info needs."""
    from timm.models._efficientnet_builder import decode_arch_def
    from timm.models.mobilenetv3 import MobileNetV3

    arch = [["cn_r1_k3_s2_e1_c16"], ["mqa_r1_k3_h2_s1_v2_d8_c16", "mqa_r1_k3_h2_s1_d8_c16", "cn_r1_k1_s1_c16"]]
    return MobileNetV3(block_args=decode_arch_def(arch), stem_size=8, num_features=32, num_classes=10)


def _small_mvitv2(**variant: Any) -> nn.Module:
    """MViTv2 small, with a class token (its entry points fix the config and leave the class token out); ``variant``:
    other MultiScaleVitCfg settings users load (pooling mode, pool first, residual pooling, relative positions)."""
    from timm.models.mvitv2 import MultiScaleVit, MultiScaleVitCfg

    cfg = MultiScaleVitCfg(**dict(dict(depths=(1, 2, 1, 1), embed_dim=16, num_heads=1, use_cls_token=True), **variant))
    return MultiScaleVit(cfg=cfg, img_size=64, num_classes=10)


def _small_caformer() -> nn.Module:
    """CAFormer's layout (separable-conv stages, then attention stages) small: its entry points fix depths and dims."""
    from timm.models.metaformer import Attention, LayerNorm2dNoBias, LayerNormNoBias, MetaFormer, SepConv

    return MetaFormer(depths=(1, 1, 1, 1), dims=(16, 16, 64, 64), token_mixers=(SepConv, SepConv, Attention, Attention),
                      norm_layers=[LayerNorm2dNoBias] * 2 + [LayerNormNoBias] * 2, num_classes=10)


def _small_nest() -> nn.Module:
    """NesT's three levels small (its entry points fix dims and depths): 16x16 patches, blocks of 4x4 then 2x2 tokens."""
    from timm.models.nest import Nest

    return Nest(img_size=32, patch_size=2, num_levels=3, embed_dims=(16, 32, 64), num_heads=(2, 2, 2), depths=(1, 1, 1))


def _small_halonet() -> nn.Module:
    """halonet_h1's layout small: blocks of 4 with a halo of 1, the second stage's first block strided (query stride 2)."""
    from timm.models.byobnet import ByoBlockCfg, ByobNet, ByoModelCfg

    cfg = ByoModelCfg(blocks=(ByoBlockCfg(type="self_attn", d=1, c=16, s=1, gs=0, br=1.0),
                              ByoBlockCfg(type="self_attn", d=2, c=32, s=2, gs=0, br=1.0)),
                      stem_chs=16, stem_type="7x7", stem_pool="maxpool", self_attn_layer="halo",
                      self_attn_kwargs=dict(block_size=4, halo_size=1, num_heads=2))
    return ByobNet(cfg, num_classes=10)


def _small_edgetam() -> nn.Module:
    """EdgeTAM's image encoder as its checkpoints build it: a timm RepViT-M1 (features of its four stages) and the FPN."""
    import transformers

    backbone = transformers.TimmWrapperConfig(architecture="repvit_m1", model_args={
        "in_chans": 3, "features_only": True, "out_indices": [0, 1, 2, 3]})
    return transformers.EdgeTamVisionModel(transformers.EdgeTamVisionConfig(backbone_config=backbone))

def _small_mobilenetv5() -> nn.Module:
    """zoo11-build: MobileNetV5's encoder layout small (its entry point fixes ~300M parameters of blocks): edge-residual
    and universal-inverted-residual stages, multi-query attention with and without kv stride, the multi-scale fusion."""
    import timm
    from timm.models._efficientnet_builder import decode_arch_def

    arch = [["er_r1_k3_s2_e4_c16"], ["uir_r1_a3_k5_s2_e6_c16"],
            ["uir_r1_a5_k5_s2_e6_c32", "uir_r1_a0_k0_s1_e1_c32", "mqa_r1_k3_h2_v2_s1_d8_c32", "uir_r1_a0_k0_s1_e2_c32"],
            ["uir_r1_a5_k5_s2_e6_c32", "mqa_r1_k3_h2_s1_d8_c32", "uir_r1_a0_k0_s1_e2_c32"]]
    return timm.create_model("mobilenetv5_300m_enc", pretrained=False, block_args=decode_arch_def(arch), stem_size=8,
                             msfa_output_resolution=4)


# zoo11-build: whole vision-language models, small: a SigLIP / CLIP tower and a one-layer language model; the tower is
# recorded, the language model left out by design (qkhooks/models/vlm.py)
VLM_TEXT = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=4, head_dim=8)
VLM_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8)
VLM_IMAGE_TOKEN = 63


def _vlm_inputs(image_tokens: int, pixels: torch.Tensor | None = None, **extra: Any) -> Callable[[], dict[str, Any]]:
    """Two prompts of a few text tokens around ``image_tokens`` image placeholders each, and their images."""
    def inputs() -> dict[str, Any]:
        ids = torch.tensor([[1, 2] + [VLM_IMAGE_TOKEN] * image_tokens + [3]] * 2)
        return dict(input_ids=ids, pixel_values=_images(32) if pixels is None else pixels, **extra)

    return inputs


def _granite4_vision_inputs() -> dict[str, Any]:
    """Granite4Vision's any-resolution input: per image its base view and one 32 px tile (grid pinpoint 32x32); the
    window Q-Former (query side 1 of window side 2) leaves 4 tokens per view plus one newline per tile row: 10."""
    pixels = torch.randn(2, 2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return _vlm_inputs(10, pixels, image_sizes=torch.tensor([[32, 32]] * 2))()


def _small_volo() -> nn.Module:
    """zoo11-build: VOLO-D1's layout small: an outlooker stage (8x8 tokens), then transformer stages (4x4) and two class
    attention blocks."""
    from timm.models.volo import VOLO

    return VOLO(layers=(1, 1, 1, 1), img_size=64, embed_dims=(32, 64, 64, 64), num_heads=(2, 2, 2, 2), num_classes=10)


def _mllama_tiles() -> dict[str, Any]:
    """zoo-packed: Mllama's tiled input, two images of up to 2 tiles of 32 px: the first one tile (the second masked)."""
    g = torch.Generator().manual_seed(1)
    return {"pixel_values": torch.randn(2, 1, 2, 3, 32, 32, generator=g), "aspect_ratio_ids": torch.tensor([[1], [2]]),
            "aspect_ratio_mask": torch.tensor([[[1, 0]], [[1, 1]]])}


def _minicpm_strip() -> dict[str, Any]:
    """zoo-packed: MiniCPM-V's packed input, the 4x6 and 2x4 patches of two images side by side in one 8 px strip."""
    g = torch.Generator().manual_seed(1)
    return {"pixel_values": torch.randn(1, 3, 8, 32 * 8, generator=g), "target_sizes": torch.tensor([[4, 6], [2, 4]])}


def _gemma4_padded() -> dict[str, Any]:
    """zoo-packed: HF Gemma 4 vision's padded batch: 6x6 patches, and 3x6 patches plus 18 padding positions (-1, -1)."""
    g = torch.Generator().manual_seed(1)
    positions = torch.full((2, 36, 2), -1, dtype=torch.long)
    for i, rows in enumerate((6, 3)):
        ys, xs = torch.meshgrid(torch.arange(rows), torch.arange(6), indexing="ij")
        positions[i, : rows * 6] = torch.stack([xs.flatten(), ys.flatten()], -1)
    return {"pixel_values": torch.randn(2, 36, 3 * 8 * 8, generator=g), "pixel_position_ids": positions}


def _packed_case(cls_name: str, module: str = "transformers", config: str = "", layout: str = "flat", **kw: Any) -> Case:
    """zoo-packed: a packed vision tower with PACKED_SMALL's sizes (``kw`` over them) and its packed inputs."""
    import importlib

    def parts() -> tuple[type, Any]:
        cls = getattr(importlib.import_module(module), cls_name)
        config_cls = getattr(importlib.import_module("transformers"), config) if config else cls.config_class
        default = config_cls()
        sizes = {k: v for k, v in PACKED_SMALL.items() if isinstance(getattr(default, k, None), int)}
        return cls, config_cls(**dict(sizes, **kw))

    def build() -> nn.Module:
        cls, cfg = parts()
        return cls._from_config(cfg, attn_implementation="sdpa")

    def inputs() -> dict[str, Any]:
        cls, cfg = parts()
        return _packed_inputs(cfg, cls, layout)

    return Case(cls_name, build, inputs, "hf", "exact", entry=cls_name)


SEG_SWIN = dict(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[2, 2, 2, 2], window_size=4,
                out_features=["stage1", "stage2", "stage3", "stage4"])
SAM2_HIERA = dict(embed_dim=16, num_heads=1, stages=(1, 2, 2, 1), window_spec=(4, 6, 2, 2), global_att_blocks=(4,),
                  global_pos_size=(4, 4))
HF_SAM2 = dict(backbone_config=dict(model_type="sam2_hiera_det_model", hidden_size=16, num_attention_heads=1,
                                    blocks_per_stage=[1, 2, 2, 1], embed_dim_per_stage=[16, 32, 64, 128],
                                    num_attention_heads_per_stage=[1, 2, 2, 4], window_size_per_stage=[4, 6, 2, 2],
                                    global_attention_blocks=[4], window_positional_embedding_background_size=[4, 4]),
               backbone_channel_list=[128, 64, 32, 16], fpn_hidden_size=16)
FAST_CASES = [
    _timm_case("vit_tiny_patch16_224", "exact", **SMALL_VIT),
    _timm_case("pit_ti_224", "exact", size=64, img_size=64, depth=(1, 2, 1), heads=(2, 2, 2), base_dims=(8, 8, 8)),
    _timm_case("vit_small_patch16_18x2_224", "exact", **SMALL_VIT),
    _timm_case("eva_giant_patch14_224", "exact", size=28, embed_dim=32, depth=2, num_heads=4, img_size=28, patch_size=7),
    # timm's parallel blocks ([MLP | q | k | v] in one in_proj from the block's in_norm), with and without q/k-norm
    _timm_case("vit_pwee_patch16_reg1_gap_256", "exact", qkv_bias=True, **SMALL_VIT),
    _timm_case("vit_pwee_patch16_reg1_gap_256-qknorm", "exact", qk_norm=True, **SMALL_VIT),
    _timm_case("vit_base_patch16_xp_224", "exact", **SMALL_VIT),
    _timm_case("eva02_tiny_patch14_224", "exact", size=28, depth=2, img_size=28, patch_size=7),
    _timm_case("vit_small_patch16_dinov3", "exact", embed_dim=32, depth=2, num_heads=4, img_size=32),
    _timm_case("vit_base_patch16_rope_reg1_gap_256", "exact", **SMALL_VIT),
    _timm_case("vit_small_patch16_224", "exact", qk_norm=True, **SMALL_VIT),
    _timm_case("cait_xxs24_224", "exact", depth_token_only=2, **SMALL_VIT),
    _timm_case("vit_pe_core_tiny_patch16_384", "exact", depth=2, img_size=32, qk_norm=True),  # AttentionRope
    _timm_case("vit_pe_core_tiny_patch16_384-grouped-query", "exact", depth=2, img_size=32,
               num_kv_heads=1, qkv_fused=False),
    _hf_case("DINOv3ViTModel", "DINOv3ViTModel", "DINOv3ViTConfig", "exact", hidden_size=32, num_hidden_layers=2,
             num_attention_heads=4, intermediate_size=64, image_size=32, patch_size=8, num_register_tokens=2),
    _hf_case("BeitModel-shared-bias", "BeitModel", "BeitConfig", "exact", use_shared_relative_position_bias=True,
             **HF_SMALL),
    _hf_case("BeitModel-layer-bias", "BeitModel", "BeitConfig", "exact", use_relative_position_bias=True, **HF_SMALL),
    _hf_case("PvtV2Model", "PvtV2Model", "PvtV2Config", "exact", size=64, hidden_sizes=[16, 16, 16, 16],
             num_attention_heads=[2, 2, 2, 2], depths=[1, 1, 1, 1], sr_ratios=[4, 2, 1, 1]),
    _hf_case("PvtV2Model-linear", "PvtV2Model", "PvtV2Config", "exact", size=64, hidden_sizes=[16, 16, 16, 16],
             num_attention_heads=[2, 2, 2, 2], depths=[1, 1, 1, 1], linear_attention=True),
    _hf_case("PvtModel", "PvtModel", "PvtConfig", "exact", size=64, image_size=64, hidden_sizes=[16, 16, 16, 16],
             num_attention_heads=[2, 2, 2, 2], depths=[1, 1, 1, 1], sequence_reduction_ratios=[4, 2, 1, 1]),
    _hf_case("SegformerModel", "SegformerModel", "SegformerConfig", "exact", size=64, hidden_sizes=[16, 16, 16, 16],
             num_attention_heads=[2, 2, 2, 2], depths=[1, 1, 1, 1], sr_ratios=[4, 2, 1, 1]),
    _hf_case("GLPNModel", "GLPNModel", "GLPNConfig", "exact", size=64, hidden_sizes=[16, 16, 16, 16],
             num_attention_heads=[2, 2, 2, 2], depths=[1, 1, 1, 1], sr_ratios=[4, 2, 1, 1]),
    _timm_case("pvt_v2_b0", "exact", size=64, embed_dims=(16, 16, 16, 16), num_heads=(2, 2, 2, 2),
               depths=(1, 1, 1, 1), sr_ratios=(4, 2, 1, 1)),
    _timm_case("pvt_v2_b2_li", "exact", size=64, embed_dims=(16, 16, 16, 16), num_heads=(2, 2, 2, 2),
               depths=(1, 1, 1, 1)),
    _timm_case("twins_pcpvt_small", "exact", size=64, img_size=64, embed_dims=(16, 16, 16, 16), num_heads=(2, 2, 2, 2),
               depths=(1, 1, 1, 1), sr_ratios=(4, 2, 1, 1)),
    _timm_case("swin_tiny_patch4_window7_224", "exact", size=64, img_size=64, embed_dim=16, depths=(2, 2),
               num_heads=(2, 2), window_size=4),
    _timm_case("swin_tiny_patch4_window7_224-padded", "exact", size=48, img_size=48, embed_dim=16, depths=(2, 2),
               num_heads=(2, 2), window_size=4),
    _hf_case("SwinModel", "SwinModel", "SwinConfig", "exact", size=64, image_size=64, patch_size=4, embed_dim=16,
             depths=[2, 2], num_heads=[2, 2], window_size=4),
    _hf_case("SwinModel-padded", "SwinModel", "SwinConfig", "exact", size=48, image_size=48, patch_size=4, embed_dim=16,
             depths=[2, 2], num_heads=[2, 2], window_size=4),
    # Swin-v2: cosine attention (the model's own normalisation and logit scale), log-CPB bias, shift masks
    _timm_case("swinv2_tiny_window8_256", "exact", size=64, img_size=64, embed_dim=16, depths=(2, 2), num_heads=(2, 2),
               window_size=4),
    _timm_case("swinv2_tiny_window8_256-padded", "exact", size=48, img_size=48, embed_dim=16, depths=(2, 2),
               num_heads=(2, 2), window_size=4),
    _timm_case("swinv2_cr_tiny_224", "exact", size=64, img_size=64, embed_dim=16, depths=(2, 2), num_heads=(2, 2),
               window_size=4),
    _hf_case("Swinv2Model", "Swinv2Model", "Swinv2Config", "exact", size=64, image_size=64, patch_size=4, embed_dim=16,
             depths=[2, 2], num_heads=[2, 2], window_size=4),
    _hf_case("Swinv2Model-padded", "Swinv2Model", "Swinv2Config", "exact", size=48, image_size=48, patch_size=4,
             embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=4),
    # MaxViT / CoAtNet: block and grid partitions (NHWC and NCHW), RelPosBias / RelPosBiasTf / RelPosMlp, whole-map
    _timm_case("test_maxvit", "exact", size=64, img_size=64),
    _timm_case("test_maxvit-nchw-tf", "exact", size=64, img_size=64, transformer_use_nchw_attn=True,
               transformer_head_first=False, transformer_rel_pos_type="bias_tf"),
    _timm_case("test_maxvit-parallel-mlp", "exact", size=64, img_size=64, block_type=("PM",) * 4,
               transformer_rel_pos_type="mlp", transformer_rel_pos_dim=16),
    _timm_case("test_coatnet", "exact", size=64, img_size=64),
    # Twins-SVT: locally grouped attention (windows cut inside the module, zero padding) and reduced-key global attention
    _timm_case("twins_svt_small", "exact", size=64, img_size=64, embed_dims=(16, 16, 16, 16), num_heads=(2, 2, 2, 2),
               depths=(2, 2, 2, 2), wss=(4, 4, 4, 4), sr_ratios=(4, 2, 1, 1)),
    _timm_case("twins_svt_small-padded", "exact", size=64, img_size=64, embed_dims=(16, 16, 16, 16),
               num_heads=(2, 2, 2, 2), depths=(2, 2, 2, 2), wss=(3, 3, 3, 3), sr_ratios=(4, 2, 1, 1)),
    # windowed families refused with the precise reason (no token-token q·k form)
    _timm_case("davit_tiny", "softmax runs over channels", module="stages.0.blocks.0.1.attn", depths=(1, 1, 1, 1),
               embed_dims=(16, 16, 16, 16), num_heads=(2, 2, 2, 2)),
    # zoo-davit: "-partial": recorded with skip_unmodelled=True, the modules qkhooks does not model named as left out
    _timm_case("davit_tiny-partial", "exact", depths=(1, 1, 1, 1), embed_dims=(16, 16, 16, 16), num_heads=(2, 2, 2, 2)),
    _timm_case("davit_base_fl-partial", "exact", size=64, depths=(1, 1, 1, 1), embed_dims=(16, 16, 16, 16),
               num_heads=(2, 2, 2, 2)),
    # zoo11-inside: GCViT's global-query blocks maps only (q_global made by the stage), local blocks exact with modes
    _timm_case("gcvit_xxtiny", "exact", size=64, img_size=64),
    # zoo11-inside: EfficientViT-MSRA's cascaded heads maps only (conv-mixed q, each head fed the previous one's output);
    # at 64 px the first stage's 4x4 map is one window, at 96 px its 6x6 map pads to 2x2 windows of 4
    _timm_case("efficientvit_m0", "exact", size=64, img_size=64),
    _timm_case("efficientvit_m0-padded-windows", "exact", size=96, img_size=96, window_size=(4, 4, 4)),
    # zoo11-maps: differential attention (softmax1 − λ·softmax2 of 2H component heads), with q/k RMSNorm
    _timm_case("vit_dwee_patch16_reg1_gap_256", "exact", qkv_bias=True, **SMALL_VIT),
    _timm_case("vit_dwee_patch16_reg1_gap_256-qknorm", "exact", qk_norm=True, **SMALL_VIT),
    _timm_case("vit_dpwee_patch16_reg1_gap_256", "exact", qkv_bias=True, **SMALL_VIT),  # inside parallel blocks
    # zoo11-maps: ConViT, every block: GPSA (a gated mix of a content and a position softmax), then MHSA
    _timm_case("convit_tiny", "exact", depth=3, local_up_to_layer=2, embed_dim=32, num_heads=4, img_size=32,
               patch_size=8),
    # zoo-bn: q/k from Linear or 1x1 conv + BatchNorm (folded), position-indexed biases, subsampled queries (LeViT)
    _timm_case("levit_128s", "exact", size=64, img_size=64, embed_dim=(32, 48, 64), key_dim=8, num_heads=(2, 3, 4),
               depth=(1, 1, 1)),
    _timm_case("levit_conv_128s", "exact", size=64, img_size=64, embed_dim=(32, 48, 64), key_dim=8, num_heads=(2, 3, 4),
               depth=(1, 1, 1)),
    _timm_case("shvit_s1", "exact", size=64, embed_dim=(32, 48, 64), partial_dim=(8, 12, 16), qk_dim=(8, 8, 8),
               depth=(1, 1, 1), types=("s", "s", "s")),
    # zoo-bn: EfficientFormer-v2: talking heads around the softmax (1x1 convs over heads), strided and local queries
    _timm_case("efficientformerv2_s0", "exact", size=64, img_size=64, depths=(1, 1, 2, 2), embed_dims=(16, 16, 32, 32),
               num_vit=2),
    # zoo-bn: TinyViT: windows cut by its block, its LayerNorm inside the module, a bias per window offset
    _timm_case("tiny_vit_5m_224", "exact", size=64, embed_dims=(16, 16, 32, 32), depths=(1, 2, 1, 1), num_heads=(1, 2, 2, 2),
               window_sizes=(4, 4, 4, 2)),
    _hf_case("MobileViTModel", "MobileViTModel", "MobileViTConfig", "exact", size=64, hidden_sizes=[16, 16, 16], neck_hidden_sizes=[8, 8, 8, 8, 8, 8, 16], image_size=64),
    _hf_case("GroupViTVisionModel", "GroupViTVisionModel", "GroupViTVisionConfig", "exact", hidden_size=32,
             num_attention_heads=4, intermediate_size=64, image_size=32, patch_size=8, depths=[1, 1, 1],
             num_group_tokens=[4, 2, 0], num_output_groups=[4, 2, 2]),
    _hf_case("Siglip2VisionModel-padded", "Siglip2VisionModel", "Siglip2VisionConfig", "exact", inputs=_siglip2_padded, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=64, patch_size=8, num_patches=16),
    _hf_case("VitDetModel", "VitDetModel", "VitDetConfig", "exact", hidden_size=32, num_hidden_layers=2,
             num_attention_heads=4, mlp_ratio=2, image_size=32, pretrain_image_size=32, patch_size=8),
    _hf_case("BlipVisionModel", "BlipVisionModel", "BlipVisionConfig", "exact", **HF_SMALL),
    _hf_case("InstructBlipVisionModel", "InstructBlipVisionModel", "InstructBlipVisionConfig", "exact", **HF_SMALL),
    # built eager: Data2Vec cannot switch its attention implementation later (tests/test_forms.py checks SDPA)
    _hf_case("Data2VecVisionModel", "Data2VecVisionModel", "Data2VecVisionConfig", "exact",
             use_relative_position_bias=True, attn_implementation="eager", **HF_SMALL),
    _hf_case("Data2VecVisionModel-shared-bias", "Data2VecVisionModel", "Data2VecVisionConfig", "exact",
             use_shared_relative_position_bias=True, attn_implementation="eager", **HF_SMALL),
    _hf_case("EomtForUniversalSegmentation", "EomtForUniversalSegmentation", "EomtConfig", "exact",
             num_queries=5, num_blocks=1, **HF_SMALL),
    _hf_case("Blip2VisionModel", "Blip2VisionModel", "Blip2VisionConfig", "exact", **HF_SMALL),
    # zoo-tail: RoPE in HF Pixtral (two images packed into one sequence, block mask) and MLCD (rotated class token)
    _hf_case("PixtralVisionModel", "PixtralVisionModel", "PixtralVisionConfig", "exact", head_dim=8, **HF_SMALL),
    _hf_case("MLCDVisionModel", "MLCDVisionModel", "MLCDVisionConfig", "exact", **HF_SMALL),
    # zoo-tail: timm Gemma 4 (2-D RoPE on RMS-normalised q/k, scale 1), with and without grouped-query heads
    _timm_case("gemma4_vit_167m", "exact", embed_dim=32, depth=2, num_heads=4, head_dim=8, img_size=32, patch_size=8,
               global_pool="avg"),
    _timm_case("gemma4_vit_167m-grouped-query", "exact", embed_dim=32, depth=2, num_heads=4, num_kv_heads=2, head_dim=8,
               img_size=32, patch_size=8, global_pool="avg"),
    # zoo-tail: plain softmax(q·k) of other timm families: (B, N, C) tokens, NCHW maps with a Linear or 1x1-conv qkv
    Case("caformer_s18", lambda: _small_caformer(), lambda: {"x": _images(64)}, "timm", "exact", entry="caformer_s18"),
    _timm_case("fastvit_sa12", "exact", size=64, layers=(1, 1, 1, 1), embed_dims=(16, 16, 32, 64), mlp_ratios=(2, 2, 2, 2)),
    # zoo-tail: DETR-family encoders, position embeddings added to the tokens entering W_q/W_k (4x4 tokens at 128 px)
    _hf_case("DetrModel", "DetrModel", "DetrConfig", "exact", size=128, **DETR_SMALL),
    _hf_case("TableTransformerModel", "TableTransformerModel", "TableTransformerConfig", "exact", size=128, **DETR_SMALL),
    # zoo-tail: a position-indexed additive bias (the module's own attention_biases table)
    _timm_case("efficientformer_l1", "exact", size=224, depths=(1, 1, 1, 2), embed_dims=(16, 16, 32, 64),
               num_vit=2),
    # zoo-tail: timm MobileViT's plain attention runs on images x pixels-in-patch: maps per (image, offset)
    _timm_case("mobilevit_xxs", "exact", size=64),
    # zoo-local: BoTNet's PosEmbedRel, a query-dependent relative term (models/halo.py), on NCHW maps
    _timm_case("eca_botnext26ts_256", "exact", size=64, img_size=64),
    # zoo-local: attention within image blocks: NesT (blocks on their own axis), TNT inner (pixels of each patch)
    Case("nest_tiny", lambda: _small_nest(), lambda: {"x": _images(32)}, "timm", "exact", entry="nest_tiny"),
    _timm_case("tnt_s_legacy_patch16_224", "exact", size=64, img_size=64, depth=2),
    # zoo-local: HaloNet's blocked queries against haloed key windows, PosEmbedRel term, a strided block (models/halo.py)
    Case("halonet_h1-small", lambda: _small_halonet(), lambda: {"x": _images(64)}, "timm", "exact", entry="halonet_h1"),
    _timm_case("visformer_tiny", "exact", size=64, img_size=64, init_channels=8, embed_dim=48, depth=(1, 1, 1),
               num_heads=2),
    # relative positions (models/relpos.py): timm tables, and the query-dependent decomposed term with SAM/ViTDet windows
    _timm_case("beit_base_patch16_224", "exact", **SMALL_VIT),
    _timm_case("beit_base_patch16_224-shared", "exact", use_rel_pos_bias=False, use_shared_rel_pos_bias=True, **SMALL_VIT),
    _timm_case("test_vit_relpos", "exact", **SMALL_VIT),
    _timm_case("vit_relpos_small_patch16_224-bias-cls", "exact", rel_pos_type="bias", class_token=True,
               global_pool="token", **SMALL_VIT),
    _timm_case("vit_srelpos_small_patch16_224", "exact", **SMALL_VIT),  # one RelPosMlp shared by every layer
    _timm_case("vit_relpos_small_patch16_rpn_224", "exact", **SMALL_VIT),
    _timm_case("samvit_base_patch16_224", "exact", size=48, img_size=48, embed_dim=32, depth=3, num_heads=4, patch_size=8,
               window_size=4, global_attn_indexes=[1]),
    _hf_case("SamVisionModel", "SamVisionModel", "SamVisionConfig", "exact", size=48, hidden_size=32, num_hidden_layers=3,
             num_attention_heads=4, mlp_dim=64, image_size=48, patch_size=8, window_size=4, global_attn_indexes=[1],
             output_channels=16),
    _hf_case("SamHQVisionModel", "SamHQVisionModel", "SamHQVisionConfig", "exact", size=48, hidden_size=32,
             num_hidden_layers=3, num_attention_heads=4, mlp_dim=64, image_size=48, patch_size=8, window_size=4,
             global_attn_indexes=[1], output_channels=16),
    _hf_case("VitDetModel-relpos-windows", "VitDetModel", "VitDetConfig", "exact", size=48, hidden_size=32,
             num_hidden_layers=3, num_attention_heads=4, mlp_ratio=2, image_size=48, pretrain_image_size=48, patch_size=8,
             use_relative_position_embeddings=True, window_size=4, window_block_indices=[0, 2]),
    # zoo-pooled: keys from other tokens: NextViT (AvgPool1d + BatchNorm1d), MobileNetV4's multi-query attention on
    # NCHW maps (one shared key head, strided depthwise conv + BatchNorm on the key side), with and without kv stride
    _timm_case("nextvit_small", "exact", size=64, depths=(1, 1, 5, 1), stem_chs=(8, 8, 16)),
    Case("mobilenetv4-multi-query", lambda: _small_mobilenetv4_hybrid(), lambda: {"x": _images(32)}, "timm", "exact"),
    # zoo-pooled: Hiera's mask-unit attention, queries max-pooled after W_q at each stage transition (mask units of 16,
    # 4 and 1 pooled tokens, then global attention)
    _timm_case("hiera_tiny_224", "exact", size=64, img_size=64, embed_dim=16, num_heads=1, stages=(1, 2, 1, 1),
               mask_unit_size=(4, 4)),
    _hf_case("HieraModel", "HieraModel", "HieraConfig", "exact", size=64, image_size=[64, 64], embed_dim=16,
             depths=[1, 2, 1, 1], num_heads=[1, 2, 2, 2], masked_unit_size=[8, 8]),
    # zoo-pooled: MViTv2, q and k pooled by strided convs + LayerNorm after W_q / W_k, class token kept apart, the
    # decomposed relative term on the pooled grids
    Case("mvitv2-cls", lambda: _small_mvitv2(), lambda: {"x": _images(64)}, "timm", "exact"),
    # zoo-sam2: MViTv2's other settings: max / avg pooling of q, k, v; no relative positions, no residual pooling, no
    # class token; pool first (tokens pooled and normed before W_q / W_k) refused naming what it does
    Case("mvitv2-max-pool", lambda: _small_mvitv2(mode="max", use_cls_token=False), lambda: {"x": _images(64)}, "timm",
         "exact"),
    Case("mvitv2-avg-pool-no-relpos-no-residual", lambda: _small_mvitv2(mode="avg", rel_pos_type="", residual_pooling=False),
         lambda: {"x": _images(64)}, "timm", "exact"),
    Case("mvitv2-pool-first", lambda: _small_mvitv2(pool_first=True), lambda: {"x": _images(64)}, "timm",
         "pools the tokens entering W_q and W_k", "stages.0.blocks.0.attn"),
    # zoo-sam2: SAM2's Hiera-det, q max-pooled after W_q at stage transitions inside windowed blocks; a 16x24 grid, so
    # windows of 6 pad (pooled and not), a global block, a pooling block of 1x1-query windows
    Case("sam2_hiera_tiny-padded", _timm("sam2_hiera_tiny", **SAM2_HIERA), lambda: {"x": _images((64, 96))}, "timm",
         "exact", entry="sam2_hiera_tiny"),
    Case("Sam2VisionModel-padded", _hf("Sam2VisionModel", "Sam2VisionConfig", **HF_SAM2), lambda: {"pixel_values": _images((64, 96))},
         "hf", "exact", entry="Sam2VisionModel"),
    # zoo-sam2: EdgeTAM's image encoder is a RepViT (convolutions, no attention); built by hand (the config's default
    # backbone entry is misspelt, so the generic build gets a ResNet whose channels do not fit its neck)
    Case("EdgeTamVisionModel", lambda: _small_edgetam(), lambda: {"pixel_values": _images(64)}, "hf", "no attention",
         entry="EdgeTamVisionModel"),
    # zoo-runs: segmentation models on a Swin image encoder (exact); their object-query decoders left out by design
    _hf_case("Mask2FormerForUniversalSegmentation", "Mask2FormerForUniversalSegmentation", "Mask2FormerConfig", "exact",
             size=64, backbone_config=dict(SEG_SWIN, model_type="swin"), feature_size=32, mask_feature_size=32,
             hidden_dim=32, encoder_feedforward_dim=32, encoder_layers=1, decoder_layers=2, num_attention_heads=2,
             dim_feedforward=32, num_queries=5),
    _hf_case("MaskFormerForInstanceSegmentation", "MaskFormerForInstanceSegmentation", "MaskFormerConfig", "exact",
             size=64, backbone_config=dict(SEG_SWIN, model_type="maskformer-swin"), fpn_feature_size=32,
             mask_feature_size=32, decoder_config=dict(DETR_SMALL, model_type="detr", num_queries=5)),

    # zoo-packed: vision towers of VLMs on one packed sequence of two images of different grids (4x6 and 2x4 patches):
    # one map per segment of the call's cu_seqlens; Qwen2.5-VL's window layers one per window
    _packed_case("Qwen2VisionTransformerPretrainedModel", module="transformers.models.qwen2_vl.modeling_qwen2_vl",
                 config="Qwen2VLVisionConfig", embed_dim=32, mlp_ratio=2),
    _packed_case("Qwen2_5_VisionTransformerPretrainedModel", config="Qwen2_5_VLVisionConfig", depth=3, window_size=32,
                 fullatt_block_indexes=[1]),
    _packed_case("Qwen3VLVisionModel"),
    _packed_case("GlmOcrVisionModel"),  # q/k RMSNorm before the rotation
    _packed_case("Exaone4_5_VisionModel", num_key_value_heads=2),  # grouped-query heads
    _packed_case("Kimi_K25VisionModel", layout="conv"),
    _packed_case("Inkling2VisionModel", layout="merged"),  # a class token per image
    _packed_case("HYV4VLVisionModel"),  # no rotation, a (1, tokens, d) batch of one
    # zoo11-build: LFM3-VL: gated short-convolution layers (no attention) between grouped-query q/k-RMSNorm attention
    _packed_case("Lfm3VlVisionModel", num_hidden_layers=4, num_key_value_heads=2,
                 layer_types=["conv", "full_attention", "conv", "full_attention"]),
    _hf_case("MllamaVisionModel", "MllamaVisionModel", "MllamaVisionConfig", "exact", inputs=lambda: _mllama_tiles(),
             hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_global_layers=1, attention_heads=4,
             image_size=32, patch_size=8, max_num_tiles=2, vision_output_dim=64, intermediate_layers_indices=[0],
             supported_aspect_ratios=[[1, 1], [1, 2]]),  # tiles, the padded tile masked
    # zoo11-build: the window-attention merger's packed attention is a site (per 2x2-token window), after layer 0
    _hf_case("MiniCPMV4_7VisionModel", "MiniCPMV4_7VisionModel", "MiniCPMV4_7VisionConfig", "exact", inputs=lambda: _minicpm_strip(), hidden_size=32, intermediate_size=64,
             num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8, insert_layer_id=0),
    # zoo11-build: the window-attention merger's packed attention is a site (per 2x2-token window), after layer 0
    _hf_case("MiniCPMOcrVisionModel", "MiniCPMOcrVisionModel", "MiniCPMOcrVisionConfig", "exact", inputs=lambda: _minicpm_strip(), hidden_size=32, intermediate_size=64,
             num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8, insert_layer_id=0),
    _hf_case("Gemma4VisionModel", "Gemma4VisionModel", "Gemma4VisionConfig", "exact", inputs=lambda: _gemma4_padded(), hidden_size=32, intermediate_size=64,
             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, head_dim=8, patch_size=8,
             position_embedding_size=64),

    # zoo-hfsmall: EoMT on DINOv3 (RoPE on the patch tokens; the object queries masked to their predicted masks in the
    # last block), an HF *Backbone wrapper (its BackboneOutput read whole), DepthPro (one DINOv2 on the image, one on
    # its overlapping patches at several scales), video ViTs on 5-D clips (joint space-time attention exact,
    # TimeSformer's divided attention refused)
    Case("EomtDinov3ForUniversalSegmentation", lambda: _small_eomt_dinov3(), lambda: {"pixel_values": _images(32)}, "hf",
         "exact", entry="EomtDinov3ForUniversalSegmentation"),
    _hf_case("Dinov2Backbone", "Dinov2Backbone", "Dinov2Config", "exact", out_features=["stage1", "stage2"], **HF_SMALL),
    _hf_case("Swinv2Backbone", "Swinv2Backbone", "Swinv2Config", "exact", size=64, image_size=64, patch_size=4, embed_dim=16,
             depths=[2, 2], num_heads=[2, 2], window_size=4, out_features=["stage1", "stage2"]),
    _hf_case("DepthProModel", "DepthProModel", "DepthProConfig", "exact", size=128, **DEPTH_PRO_SMALL),
    _hf_case("VideoMAEModel", "VideoMAEModel", "VideoMAEConfig", "exact", inputs=_clips(4), num_frames=4, tubelet_size=2,
             **HF_SMALL),
    _hf_case("VivitModel", "VivitModel", "VivitConfig", "exact", inputs=_clips(4), num_frames=4, tubelet_size=[2, 8, 8],
             hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32),
    # zoo11-inside: TimeSformer's divided space-time attention, time and space as their own sites (time first)
    _hf_case("TimesformerModel", "TimesformerModel", "TimesformerConfig", "exact", inputs=_clips(4), num_frames=4,
             **HF_SMALL),
    # zoo-hfsmall: transformers' LeViT (BatchNorm folded, attention biases, subsampled queries: models/hf_levit.py) and
    # Swin2SR (Swin-v2's cosine attention, log-CPB and shift masks on a 1-pixel-patch grid)
    _hf_case("LevitModel", "LevitModel", "LevitConfig", "exact", size=64, image_size=64, hidden_sizes=[32, 48, 64],
             num_attention_heads=[2, 3, 4], depths=[1, 1, 1], key_dim=[8, 8, 8]),
    # zoo-hfsmall: refused with their reasons (Llama 4's complex 2-D RoPE, VideoPrism's soft-capped logits, VidEoMT's
    # per-frame query blocks); Llama 4's pixel-shuffle adapter couples intermediate_size to hidden_size / ratio²
    _hf_case("Llama4VisionModel", "Llama4VisionModel", "Llama4VisionConfig", "exact",  # zoo11-maps: complex 2-D RoPE
             vision_output_dim=32, projector_input_dim=32, projector_output_dim=32, **dict(HF_SMALL, intermediate_size=128)),
    _hf_case("VideoPrismVisionModel", "VideoPrismVisionModel", "VideoPrismVisionConfig", "exact",  # zoo11-maps: soft-cap
             inputs=_clips(4, key="pixel_values_videos"), hidden_size=32,
             num_spatial_layers=2, num_temporal_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32,
             num_frames=4, tubelet_size=[1, 8, 8], attn_logit_softcapping=0.5),  # a cap that bends the small logits
    # zoo11-inside: VidEoMT's last num_blocks layers run once per frame: their calls joined, frames as images
    _hf_case("VideomtForUniversalSegmentation", "VideomtForUniversalSegmentation", "VideomtConfig", "exact",
             inputs=_clips(3, key="pixel_values_videos"), num_queries=5, num_blocks=1, **HF_SMALL),
    # zoo-hfsmall: OneFormer on a Swin encoder (exact), its object-query decoder, deformable pixel decoder and text
    # mapper left out by design as Mask2Former's; task_inputs: the task text's token ids
    _hf_case("OneFormerForUniversalSegmentation", "OneFormerForUniversalSegmentation", "OneFormerConfig", "exact",
             inputs=lambda: {"pixel_values": _images(64), "task_inputs": torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(2))},
             backbone_config=dict(SEG_SWIN, model_type="swin"), task_seq_len=8, text_encoder_width=32,
             text_encoder_context_length=8, text_encoder_num_layers=1, text_encoder_vocab_size=100, text_encoder_n_ctx=4,
             conv_dim=32, mask_dim=32, hidden_dim=32, encoder_feedforward_dim=32, encoder_layers=1, decoder_layers=2,
             num_attention_heads=2, dim_feedforward=32, num_queries=5, query_dec_layers=1),
    # zoo-hfsmall: refusals whose models only build with inputs or sizes the generic build lacks
    _hf_case("ImageGPTModel", "ImageGPTModel", "ImageGPTConfig", "exact",  # zoo11-maps: causal, a 4x4 image's tokens
             inputs=lambda: {"input_ids": torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))},
             n_embd=32, n_layer=2, n_head=4, n_positions=16),
    _hf_case("MobileViTV2Model", "MobileViTV2Model", "MobileViTV2Config", "separable", size=64, image_size=64,
             module="encoder.layer.2.transformer.layer.0.attention", width_multiplier=0.25),
    # zoo11-build: the timm ViT inside transformers' TimmBackbone, recorded by the timm adapter under the wrapper's paths
    Case("TimmBackbone", lambda: _small_timm_backbone(), lambda: {"pixel_values": _images(32)}, "hf", "exact",
         entry="TimmBackbone"),
    # zoo-hfsmall: DETR's segmentation head on the DETR encoder (exact; its mask-attention head left out as the decoder);
    # Deformable DETR's encoder refused (deformable attention: no q·k); both on a small ResNet backbone
    _hf_case("DetrForSegmentation", "DetrForSegmentation", "DetrConfig", "exact", size=128, **dict(
        DETR_SMALL, encoder_attention_heads=8, decoder_attention_heads=8), **SMALL_RESNET),  # its GroupNorm: d + heads = 8k
    _hf_case("DeformableDetrModel", "DeformableDetrModel", "DeformableDetrConfig", "deformable attention", size=64,
             module="encoder.layers.0.self_attn", num_feature_levels=3, **DETR_SMALL, **SMALL_RESNET),
    _hf_case("Swin2SRModel-v2-blocks", "Swin2SRModel", "Swin2SRConfig", "exact", size=16, image_size=16, patch_size=1, embed_dim=16,
             depths=[2], num_heads=[2], window_size=4),

    # zoo11-build: the models the generic small build could not enter. timm giants sized through their entry points'
    # kwargs (Gemma 4's encoder keeps its 3x3 soft-token pooling: 6x6 patches); MobileNetV5 from a small block list
    _timm_case("eva02_enormous_patch14_clip_224", "exact", size=28, embed_dim=32, depth=2, num_heads=4, img_size=28,
               patch_size=7),
    _timm_case("gemma4_vit_167m_enc", "exact", size=48, embed_dim=32, depth=2, num_heads=4, head_dim=8, img_size=48,
               patch_size=8),
    Case("mobilenetv5_300m_enc", lambda: _small_mobilenetv5(), lambda: {"x": _images(64)}, "timm", "exact",
         entry="mobilenetv5_300m_enc"),
    # zoo11-build: convolution-only HF models whose default config the generic shrink breaks (hidden_size shrunk but not
    # hidden_sizes; FocalNet's default hidden_sizes is a tuple its backbone adds to a list): no attention
    _hf_case("ConvNextModel", "ConvNextModel", "ConvNextConfig", "no attention", size=64, hidden_sizes=[8, 8, 16, 16],
             depths=[1, 1, 1, 1]),
    _hf_case("ConvNextV2Model", "ConvNextV2Model", "ConvNextV2Config", "no attention", size=64,
             hidden_sizes=[8, 8, 16, 16], depths=[1, 1, 1, 1]),
    _hf_case("ConvNextBackbone", "ConvNextBackbone", "ConvNextConfig", "no attention", size=64,
             hidden_sizes=[8, 8, 16, 16], depths=[1, 1, 1, 1], out_features=["stage1", "stage2"]),
    _hf_case("ConvNextV2Backbone", "ConvNextV2Backbone", "ConvNextV2Config", "no attention", size=64,
             hidden_sizes=[8, 8, 16, 16], depths=[1, 1, 1, 1], out_features=["stage1", "stage2"]),
    _hf_case("FocalNetBackbone", "FocalNetBackbone", "FocalNetConfig", "no attention", size=64, embed_dim=16,
             depths=[1, 1], hidden_sizes=[16, 32], out_features=["stage1", "stage2"]),
    # zoo11-build: whole VLMs (their class names end in VisionModel): the vision tower exact, the language model (and
    # Granite4Vision's window Q-Former) left out by design; 4 image tokens per image after the 2x2 downsampling
    _hf_case("AyaVisionModel", "AyaVisionModel", "AyaVisionConfig", "exact", inputs=_vlm_inputs(4),
             vision_config=dict(VLM_VISION, model_type="siglip_vision_model"), text_config=dict(VLM_TEXT, model_type="cohere2"),
             image_token_index=VLM_IMAGE_TOKEN),
    _hf_case("Cohere2VisionModel", "Cohere2VisionModel", "Cohere2VisionConfig", "exact", inputs=_vlm_inputs(4),
             vision_config=dict(VLM_VISION, model_type="siglip_vision_model"), text_config=dict(VLM_TEXT, model_type="cohere2"),
             image_token_id=VLM_IMAGE_TOKEN, alignment_intermediate_size=64),
    # its Q-Former's heads are hidden_size // 64: a 64-wide tower
    _hf_case("Granite4VisionModel", "Granite4VisionModel", "Granite4VisionConfig", "exact", inputs=_granite4_vision_inputs,
             vision_config=dict(VLM_VISION, hidden_size=64, model_type="clip_vision_model"),
             text_config=dict(VLM_TEXT, model_type="granite4_vision_text"), image_token_index=VLM_IMAGE_TOKEN,
             image_grid_pinpoints=[[32, 32]], downsample_rate="1/2", deepstack_layer_map=[[-1, 0]],
             spatial_target_layers=[0, 0, 0, 0], vision_feature_layer=-1,
             qformer_config=dict(model_type="blip_2_qformer", num_hidden_layers=1, intermediate_size=64)),
    # zoo11-build: LW-DETR's ViT backbone (num_windows must be a square dividing the image: 4 windows of 2x2 patches)
    _hf_case("LwDetrViTBackbone", "LwDetrViTBackbone", "LwDetrViTConfig", "exact", hidden_size=32, num_hidden_layers=2,
             num_attention_heads=4, mlp_ratio=2, image_size=32, pretrain_image_size=32, patch_size=8, num_windows=4,
             num_windows_side=2, window_block_indices=[0], out_features=["stage1", "stage2"], out_indices=[1, 2]),
    # zoo12: SAM3's image encoder small (4x4 patches of 14 px, windows of 2, a global block): 2-D axial RoPE on
    # interleaved pairs handed by position, windows folded into the batch axis
    _hf_case("Sam3VisionModel", "Sam3VisionModel", "Sam3VisionConfig", "exact", size=56, backbone_config=SAM3_VIT,
             fpn_hidden_size=16, backbone_feature_sizes=[[16, 16], [8, 8], [4, 4]]),
    # zoo12: a non-square 5x3 grid (70x42 px) whose windows of 2 pad to 6x4 (6 windows, zero tokens as keys), windowed
    # blocks on both sides of the global one
    Case("Sam3VisionModel-padded", _hf("Sam3VisionModel", "Sam3VisionConfig", backbone_config=SAM3_VIT_PADDED, fpn_hidden_size=16,
                                       backbone_feature_sizes=[[16, 16], [8, 8], [4, 4]]),
         lambda: {"pixel_values": _images((70, 42))}, "hf", "exact", entry="Sam3VisionModel"),
    # zoo11-build: Sapiens2: per-head q/k RMSNorm, then DINOv3's rotation of the patch tokens (registers unrotated); the
    # middle layer grouped-query (2 key heads for 4 query heads)
    _hf_case("Sapiens2Backbone", "Sapiens2Backbone", "Sapiens2Config", "exact", num_register_tokens=2,
             num_first_full_attention_layers=1, num_last_full_attention_layers=1, num_key_value_attention_heads=2,
             out_features=["stage1", "stage3"], **dict(HF_SMALL, num_hidden_layers=3)),
    # zoo11-build: VOLO (its entry points fix the layers): plain attention on NHWC grids and class attention exact, the
    # outlooker stage left out by name (a partial recording); refused whole, naming the outlook attention
    Case("volo_d1_224-partial", lambda: _small_volo(), lambda: {"x": _images(64)}, "timm", "exact", entry="volo_d1_224"),
    Case("volo_d1_224", lambda: _small_volo(), lambda: {"x": _images(64)}, "timm", "outlook attention", "network.0.0.attn"),
    # torchvision's ViT: nn.MultiheadAttention (packed in_proj, fused native kernel in eval), class token first
    Case("torchvision-VisionTransformer", lambda: _small_torchvision_vit(), lambda: {"x": _images(32)}, "torchvision",
         "exact", entry="VisionTransformer"),
    # a block's MultiheadAttention appending a zero key: refused naming it, or left out with skip_unmodelled=True
    Case("torchvision-VisionTransformer-add_zero_attn", lambda: _small_torchvision_vit(add_zero_attn=True),
         lambda: {"x": _images(32)}, "torchvision", "add_zero_attn=True appends a zero key",
         "encoder.layers.encoder_layer_1.self_attention"),
    Case("torchvision-VisionTransformer-add_zero_attn-partial", lambda: _small_torchvision_vit(add_zero_attn=True),
         lambda: {"x": _images(32)}, "torchvision", "exact"),
]


def _small_torchvision_vit(**last_attention: Any) -> nn.Module:
    """torchvision's ViT, small; ``last_attention``: the last block's MultiheadAttention built with these too."""
    from torchvision.models import VisionTransformer

    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64)
    if last_attention:
        model.encoder.layers[-1].self_attention = nn.MultiheadAttention(32, 4, batch_first=True, **last_attention)
    return model


def _run_case(case: Case) -> Outcome:
    torch.manual_seed(0)
    model = case.build()
    return check(perturb(model), case.inputs(), case.kind, skip_unmodelled=case.name.endswith("-partial"))


@pytest.mark.parametrize("case", FAST_CASES, ids=lambda c: c.name)
def test_zoo_fast_subset_exact_or_refused_naming_the_module(case: Case):
    if case.expect == "no attention":  # listed so the whole zoo builds it: no module owns a q/k projection
        from qkhooks.models.unsupported import describe_attention_like

        torch.manual_seed(0)
        assert describe_attention_like(case.build()).startswith("It saw no attention-like module")
        return
    outcome = _run_case(case)
    if case.expect == "exact":
        assert outcome.status == "exact", outcome.detail
    else:
        assert outcome.status == "refused" and case.expect in outcome.detail, outcome.detail
        assert case.refused_module in outcome.detail


# ------------------------------------------------------------------------------------------ the whole zoo
# Each model is built small (a few patches per side, two blocks where its class takes a depth), checked, then
# freed; ZOO_CHUNKS child processes run the zoo in turn, so neither memory nor a leak can build up across it.
ZOO_MAX_PARAMS = 120_000_000  # a form only buildable larger is listed as not built, not guessed
ZOO_CHUNKS = 8
ZOO_CHUNK_TIMEOUT_S = 1200
ZOO_MAX_RSS_MB = 4096
ZOO_ADDRESS_SPACE_MB = 12288  # virtual: imports alone take 3.6 GB of address space
_SMALL_SIZES = (64, 56, 128, 112)  # input sizes tried: 64 px is 2x2 tokens after a 32x downsampling, 56 4x4 patches of 14


_QK_ATTRIBUTES = ("qkv", "in_proj", "in_split", ("q", "k"), ("q", "kv"), ("q_proj", "k_proj"), ("query", "key"),
                  ("to_q", "to_k"), ("to_q", "to_kv"))
"""Attributes that make a module a place where queries and keys are made, whatever its class is called (timm's
``ParallelScalingBlock`` and ``DiffParallelScalingBlock`` make them in one ``in_proj`` beside the MLP's input)."""


def _attention_like_part(module: nn.Module) -> bool:
    """Whether a module's class name or its projections say it computes attention (the zoo's own rule, not the
    library's: :func:`_timm_forms` must find forms qkhooks might miss)."""
    name = type(module).__name__.lower()
    return "attn" in name or "attention" in name or any(
        all(hasattr(module, a) for a in ((attrs,) if isinstance(attrs, str) else attrs)) for attrs in _QK_ATTRIBUTES)


def _timm_forms() -> dict[tuple, tuple[int, str]]:
    """One timm entry point per distinct attention form: (module, model class, attention/block/q-norm classes)
    of every registered model, built on the meta device (no memory, no weights), smallest first."""
    import timm

    forms: dict[tuple, tuple[int, str]] = {}
    for name in timm.list_models():
        try:
            with torch.device("meta"):
                model = timm.create_model(name, pretrained=False)
        except Exception:  # noqa: BLE001 - an entry point that does not build by default is not a form
            continue
        parts = set()
        rope = any("rope" in n.lower() or "rotary" in n.lower() for n, _ in model.named_modules())
        for mod_name, module in model.named_modules():
            cls = type(module).__name__
            if _attention_like_part(module):
                parent = type(model.get_submodule(mod_name.rpartition(".")[0])).__name__ if "." in mod_name else ""
                norm = type(getattr(module, "q_norm", None)).__name__
                parts.add((cls, parent, norm, rope))
        if not parts:
            continue  # no attention at all (CNNs): nothing for qkhooks to record
        key = (type(model).__module__, type(model).__name__, tuple(sorted(parts)))
        size = sum(p.numel() for p in model.parameters())
        if key not in forms or size < forms[key][0]:
            forms[key] = (size, name)
    return forms


def _hf_vision_classes() -> list[str]:
    """Every vision model class transformers maps: image backbones, vision towers, universal segmentation."""
    from transformers.models.auto import modeling_auto as auto

    names = set(auto.MODEL_FOR_IMAGE_MAPPING_NAMES.values())
    names |= {v for v in auto.MODEL_MAPPING_NAMES.values() if isinstance(v, str) and v.endswith("VisionModel")}
    names |= {v for v in getattr(auto, "MODEL_FOR_UNIVERSAL_SEGMENTATION_MAPPING_NAMES", {}).values() if isinstance(v, str)}
    names |= {v for v in getattr(auto, "MODEL_FOR_BACKBONE_MAPPING_NAMES", {}).values() if isinstance(v, str)}  # *Backbone wrappers
    return sorted(names)


ZOO_FORMS_CACHE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "zoo_timm_forms.json")


def _timm_form_names() -> list[str]:
    """The entry points :func:`_timm_forms` picks, from ``tests/zoo_timm_forms.json`` when it was written by this
    timm version and this enumeration code (building ~1300 models on the meta device takes minutes), else anew;
    ``make zoo-table`` rewrites the file."""
    import hashlib
    import inspect
    import json

    import timm

    code = inspect.getsource(_timm_forms) + inspect.getsource(_attention_like_part) + repr(_QK_ATTRIBUTES)
    key = f"timm {timm.__version__}, enumeration {hashlib.sha256(code.encode()).hexdigest()[:12]}"
    if os.path.exists(ZOO_FORMS_CACHE):
        with open(ZOO_FORMS_CACHE) as f:
            cached = json.load(f)
        if cached.get("key") == key:
            return cached["names"]
    names = sorted(name for _, name in _timm_forms().values())
    if os.environ.get("QKHOOKS_ZOO_WRITE_FORMS"):
        with open(ZOO_FORMS_CACHE, "w") as f:
            json.dump({"key": key, "names": names}, f, indent=0)
    return names


def _torchvision_vits() -> list[str]:
    """torchvision's Vision Transformer builders (``vit_b_16`` ... ``vit_h_14``): the ``torchvision:`` specs."""
    try:
        import torchvision
    except ImportError:  # torchvision is optional
        return []
    return sorted(n for n in torchvision.models.list_models(module=torchvision.models) if n.startswith("vit_"))


def zoo_entries() -> list[dict[str, Any]]:
    """The whole zoo, in a fixed order: every timm form (its smallest entry point), every transformers class and
    torchvision's ViTs."""
    entries = [dict(model=name, kind="timm") for name in _timm_form_names()]
    entries += [dict(model=name, kind="hf") for name in _hf_vision_classes()]
    return entries + [dict(model=name, kind="torchvision") for name in _torchvision_vits()]


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _timm_small(name: str) -> tuple[nn.Module, dict[str, Any]]:
    """The model at its smallest valid input size (and depth 2 where its class takes an int depth), perturbed and
    run once: the first of those variants that builds under ZOO_MAX_PARAMS and runs."""
    import timm

    cfg = timm.get_pretrained_cfg(name)
    native = tuple(cfg.input_size[1:]) if cfg is not None and cfg.input_size else (224, 224)
    variants: list[tuple[dict[str, Any], Any]] = [
        (dict(img_size=s, depth=2), s) for s in _SMALL_SIZES] + [(dict(img_size=s), s) for s in _SMALL_SIZES]
    variants += [({}, s) for s in _SMALL_SIZES] + [({}, native)]
    failures = []
    for kwargs, size in variants:
        try:
            with torch.device("meta"):  # sized and shape-checked before it takes memory or time
                meta = timm.create_model(name, pretrained=False, **kwargs)
                params = _params(meta)
                if params > ZOO_MAX_PARAMS:
                    failures.append(f"{params / 1e6:.0f}M parameters with {kwargs or 'defaults'}")
                    continue
                try:
                    _call(meta.eval(), {"x": torch.empty(1, 3, *((size, size) if isinstance(size, int) else size))})
                except Exception as err:  # noqa: BLE001 - a shape error skips the variant; an op meta lacks does not
                    if "meta" not in str(err).lower():
                        raise
            torch.manual_seed(0)
            model = perturb(timm.create_model(name, pretrained=False, **kwargs))
            inputs = {"x": _images(size, batch=1)}
            _call(model, inputs)
            return model, inputs
        except Exception as err:  # noqa: BLE001 - this variant does not build or run: try the next
            failures.append(f"{kwargs or 'defaults'} at {size}: {type(err).__name__}: {str(err)[:80]}")
    raise RuntimeError("no small variant builds and runs: " + "; ".join(failures[-2:]))


# zoo11-build: why DiNAT (neighbourhood attention) is not built here (checked with pip against the package registry)
NATTEN_NOT_INSTALLABLE = (": the registry's only natten, 0.21.7, is a source build (no CPU wheel) without "
                          "natten2dqkrpb / natten2dav, which DiNAT imports")


def _hf_small(cls_name: str) -> tuple[nn.Module, dict[str, Any]]:
    """The class from its default config with the integer sizes HF_SMALL names shrunk, perturbed and run once."""
    import transformers

    cls = getattr(transformers, cls_name)
    if _takes_packed_grids(cls):  # zoo-packed: vision towers of VLMs take packed patches and per-image grids
        return _packed_small(cls)
    default = cls.config_class()
    shrink = {k: v for k, v in dict(HF_SMALL, num_channels=3).items() if isinstance(getattr(default, k, None), int)}
    if isinstance(getattr(default, "image_size", None), (list, tuple)) and len(default.image_size) == 2:  # YOLOS: (512, 864)
        shrink["image_size"] = [HF_SMALL["image_size"]] * 2
    if isinstance(getattr(default, "hidden_size", None), int) and isinstance(getattr(default, "head_dim", None), int):
        shrink["head_dim"] = 8
    config = cls.config_class(**shrink)
    size = getattr(config, "image_size", 32)
    size = size if isinstance(size, int) else int(size[0])
    extra = {"attn_implementation": "sdpa"} if getattr(cls, "_supports_sdpa", False) else {}
    with torch.device("meta"):  # sized before it takes memory: some classes carry a whole language model
        try:
            params = _params(cls._from_config(config, **extra))
        except ImportError as err:  # an optional package the class needs: say which, and why it is not here
            first = next(line for line in str(err).splitlines() + [type(err).__name__] if line.strip()).split(" but ")[0]
            raise RuntimeError(first + (NATTEN_NOT_INSTALLABLE if "natten" in str(err) else "")) from err
    if params > ZOO_MAX_PARAMS:
        raise RuntimeError(f"{params / 1e6:.0f}M parameters even with the small config")
    torch.manual_seed(0)
    model = perturb(cls._from_config(config, **extra))
    inputs = {"pixel_values": _images(size, batch=1)}
    _call(model, inputs)
    return model, inputs


# zoo-packed: two images of different grids, (t, h, w) = (1, 4, 6) and (1, 2, 4) patches, in one packed sequence
PACKED_GRIDS = ((1, 4, 6), (1, 2, 4))
PACKED_SMALL = dict(depth=2, num_hidden_layers=2, hidden_size=32, embed_dim=32, num_heads=4, num_attention_heads=4,
                    num_key_value_heads=4, intermediate_size=64, out_hidden_size=32, patch_size=8, temporal_patch_size=1,
                    spatial_merge_size=2, in_channels=3, num_channels=3, head_dim=8)


def _takes_packed_grids(cls: type) -> bool:
    """Whether the class's forward takes per-image patch grids beside the pixels (a packed vision tower)."""
    import inspect

    return bool({"grid_thw", "image_grid_thw"} & set(inspect.signature(cls.forward).parameters))


def _packed_inputs(config: Any, cls: type, layout: str = "flat", grids: tuple[tuple[int, int, int], ...] = PACKED_GRIDS
                   ) -> dict[str, Any]:
    """The grids and their patches under the forward's own argument names, laid out as ``layout`` says: ``"flat"``
    (sum of t·h·w, C·T·P·P) (Qwen-VL), ``"conv"`` (sum of t·h·w, C, P, P) (Kimi), ``"merged"`` (tokens after the
    m x m merge, P·m, P·m, C) with grids counted in merged tokens (Inkling2)."""
    import inspect

    params = list(inspect.signature(cls.forward).parameters)
    channels = getattr(config, "in_channels", None) or getattr(config, "num_channels", 3)
    temporal = getattr(config, "temporal_patch_size", None) or getattr(config, "patch_temporal", None) or 1
    patch, merge = config.patch_size, int(getattr(config, "spatial_merge_size", 2) or 2)
    grid = torch.tensor(grids)
    g = torch.Generator().manual_seed(1)
    count = int(grid.prod(-1).sum())
    if layout == "merged":
        grid = grid // torch.tensor([1, merge, merge])
        pixels = torch.randn(count // merge**2, patch * merge, patch * merge, channels, generator=g)
    elif layout == "conv":
        pixels = torch.randn(count, channels, patch, patch, generator=g)
    else:
        pixels = torch.randn(count, channels * temporal * patch * patch, generator=g)
    inputs = {params[1]: pixels, "image_grid_thw" if "image_grid_thw" in params else "grid_thw": grid}
    if "merge_sizes" in params:  # VideoLlama3: the merge size of each image
        inputs["merge_sizes"] = torch.full((len(grids),), merge)
    return inputs


def _packed_small(cls: type) -> tuple[nn.Module, dict[str, Any]]:
    """A packed vision tower from its default config with PACKED_SMALL's sizes, on two images of different grids
    (the first patch layout its forward runs on)."""
    default = cls.config_class()
    config = cls.config_class(**{k: v for k, v in PACKED_SMALL.items() if isinstance(getattr(default, k, None), int)})
    extra = {"attn_implementation": "sdpa"} if getattr(cls, "_supports_sdpa", False) else {}
    with torch.device("meta"):
        params = _params(cls._from_config(config, **extra))
    if params > ZOO_MAX_PARAMS:
        raise RuntimeError(f"{params / 1e6:.0f}M parameters even with the small config")
    torch.manual_seed(0)
    model = perturb(cls._from_config(config, **extra))
    failures = []
    for layout in ("flat", "conv", "merged"):
        inputs = _packed_inputs(config, cls, layout)
        try:
            _call(model, inputs)
            return model, inputs
        except Exception as err:  # noqa: BLE001 - not this layout: try the next
            failures.append(f"{layout}: {type(err).__name__}: {str(err)[:80]}")
    raise RuntimeError("no packed patch layout runs: " + "; ".join(failures))


def _small(name: str, kind: str) -> tuple[nn.Module, dict[str, Any]]:
    """The fast subset's hand-sized build where it has one for this entry (its inputs too: NaFlex batches, window
    sizes that fit), else the generic small build."""
    hand = [c for c in FAST_CASES if c.kind == kind and c.entry == name]
    if hand:
        torch.manual_seed(0)
        model, inputs = perturb(hand[0].build()), hand[0].inputs()
        _call(model, inputs)
        return model, inputs
    return {"timm": _timm_small, "torchvision": _torchvision_small}.get(kind, _hf_small)(name)


def _torchvision_small(name: str) -> tuple[nn.Module, dict[str, Any]]:
    """torchvision's ViT ``name`` with its own patch size, heads and widths (read off the builder's model on the meta
    device) at depth 2 on a 4x4 patch grid (its builders fix depth and image size, so the class is built directly),
    perturbed and run once."""
    import torchvision
    from torchvision.models import VisionTransformer

    with torch.device("meta"):
        full = torchvision.models.get_model_builder(name)(weights=None)
    attn = full.encoder.layers[0].self_attention
    kwargs = dict(image_size=4 * full.patch_size, patch_size=full.patch_size, num_layers=2, num_heads=attn.num_heads,
                  hidden_dim=full.hidden_dim, mlp_dim=full.mlp_dim)
    torch.manual_seed(0)
    model = perturb(VisionTransformer(**kwargs))
    inputs = {"x": _images(kwargs["image_size"], batch=1)}
    _call(model, inputs)
    return model, inputs


def _family(model: nn.Module, kind: str) -> str:
    """The README table's family: timm's and torchvision's model module (``swin_transformer``, ``vision_transformer``),
    transformers' ``model_type``."""
    if kind in ("timm", "torchvision"):
        return type(model).__module__.rpartition(".")[2]
    config = getattr(model, "config", None)
    return str(getattr(getattr(config, "vision_config", None) or config, "model_type", type(model).__name__))


def run_entry(entry: dict[str, Any]) -> dict[str, Any]:
    """One zoo row: exact, refused (naming the module), unbuildable (not qkhooks'), or MISMATCH / CRASH."""
    import time

    row = dict(entry)
    start = time.perf_counter()
    try:
        model, args = _small(entry["model"], entry["kind"])
    except Exception as err:  # noqa: BLE001 - the model does not build or run small on a plain image batch: not qkhooks'
        return dict(row, status="unbuildable", detail=f"{type(err).__name__}: {str(err).splitlines()[0][:200]}" if str(err) else type(err).__name__)
    row["family"] = _family(model, entry["kind"])
    from qkhooks.models.unsupported import describe_attention_like

    if describe_attention_like(model).startswith("It saw no attention-like module"):  # a CNN or an MLP mixer
        return dict(row, status="no attention", detail="no attention qkhooks records (no q/k projection outside the "
                    "pooling heads and text towers it leaves out by design)")
    try:
        outcome = check(model, args, entry["kind"])
        if outcome.status == "refused" and "skip_unmodelled=True" in outcome.detail:  # what a partial recording gives
            partial = check(model, args, entry["kind"], skip_unmodelled=True)
            outcome = partial if partial.status == "exact" else outcome
        row.update(status=outcome.status, detail="\n".join(outcome.detail.splitlines()[:3])[:600], families=list(outcome.families),
                   layers=outcome.layers, form=outcome.form)
    except AssertionError as err:
        row.update(status="MISMATCH", detail=str(err).splitlines()[0][:300])
    except Exception as err:  # noqa: BLE001
        row.update(status="CRASH", detail=f"{type(err).__name__}: {str(err).splitlines()[0][:300]}")
    row["seconds"] = round(time.perf_counter() - start, 2)
    return row


def run_chunk(entries: list[dict[str, Any]], index: int, count: int) -> dict[str, Any]:
    """Every ``count``-th entry from ``index`` (sizes spread evenly over the chunks), each model freed after."""
    import gc
    import resource

    import sys

    torch.set_num_threads(1)  # one chunk at a time, on a shared machine: threads only contend (5-15x slower here)
    # a safety net under the RSS budget: a model that would take the machine's memory fails here instead
    resource.setrlimit(resource.RLIMIT_AS, (ZOO_ADDRESS_SPACE_MB << 20, resource.getrlimit(resource.RLIMIT_AS)[1]))
    rows = []
    for entry in entries[index::count]:
        rows.append(run_entry(entry))
        gc.collect()
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes
        print(f"zoo {index}/{count}: {entry['model']}: {rows[-1]['status']} ({rows[-1].get('seconds', 0)} s, "
              f"peak RSS {peak_mb:.0f} MB)", file=sys.stderr, flush=True)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return dict(rows=rows, peak_rss_mb=round(peak_mb))


def _child(*args: str, timeout: float) -> None:
    import subprocess
    import sys

    subprocess.run([sys.executable, __file__, *args], check=True, timeout=timeout)


def run_zoo(workdir: str, chunks: int = ZOO_CHUNKS) -> tuple[list[dict[str, Any]], list[int]]:
    """The whole zoo in child processes (one lists it, then one per chunk): rows and each child's peak RSS (MB)."""
    import json
    from pathlib import Path

    work = Path(workdir)
    _child("--list", str(work / "entries.json"), timeout=ZOO_CHUNK_TIMEOUT_S)
    rows, peaks = [], []
    for i in range(chunks):
        out = work / f"chunk{i}.json"
        _child("--chunk", f"{i}/{chunks}", str(work / "entries.json"), str(out), timeout=ZOO_CHUNK_TIMEOUT_S)
        result = json.loads(out.read_text())
        rows += result["rows"]
        peaks.append(result["peak_rss_mb"])
    return rows, peaks


@pytest.mark.slow
def test_whole_zoo_exact_or_refused_never_a_crash_or_a_silent_mismatch(tmp_path):
    import json

    rows, peaks = run_zoo(str(tmp_path))
    out = os.environ.get("QKHOOKS_ZOO_RESULTS")
    if out:
        with open(out, "w") as f:
            json.dump(rows, f, indent=1)
    bad = [r for r in rows if r["status"] in ("MISMATCH", "CRASH")]
    assert not bad, "\n".join(f"{r['model']}: {r['status']}: {r['detail']}" for r in bad)
    assert sum(r["status"] == "exact" for r in rows) >= 10
    assert max(peaks) < ZOO_MAX_RSS_MB, f"a zoo chunk peaked at {max(peaks)} MB RSS"


def test_a_mask_handed_to_an_attention_the_adapter_does_not_model_it_for_is_refused_naming_it():
    import timm

    model = perturb(timm.create_model("vit_tiny_patch16_224", pretrained=False, **SMALL_VIT))
    x = torch.randn(2, 17, 32)
    mask = torch.zeros(2, 1, 17, 17)
    with qkhooks.record(model, modes=4, attention="full"), torch.no_grad():
        model.blocks[0](x)  # no mask: recorded
        with pytest.raises(QKHooksError, match=r"'blocks.0.attn'.*'attn_mask' \(a \(2, 1, 17, 17\) tensor\)"):
            model.blocks[0](x, attn_mask=mask)


def module_calls(model: nn.Module, modules: dict[int, nn.Module], inputs: dict[str, Any],
                 read: Callable[[int, tuple, dict], Any]) -> dict[int, Any]:
    """Layer -> ``read(layer, args, kwargs)`` of its module's call in one forward of ``model`` on ``inputs``."""
    seen: dict[int, Any] = {}
    handles = [m.register_forward_pre_hook(lambda mod, a, kw, layer=layer: seen.__setitem__(layer, read(layer, a, kw)),
                                           with_kwargs=True) for layer, m in modules.items()]
    try:
        _call(model, inputs)
    finally:
        for h in handles:
            h.remove()
    return seen


def rope_band_logits(site: Any, x: torch.Tensor, tables: Any) -> torch.Tensor:
    """Σ_f cos Δφ_f · x̃_i^T W_q^T P_f W_k x̃_j + sin Δφ_f · x̃_i^T W_q^T J_f W_k x̃_j over one band per pair (x̃ = [x; 1]),
    the angles read off the call's rotary tables: the rotated q·k (unscaled) as the band forms rebuild it."""
    from qkhooks.models.rope import rope_angles, rope_bands, rope_pairs

    x1 = torch.cat([x, torch.ones_like(x[..., :1])], -1).double()
    phi = rope_angles(site, tables, x.shape[1])
    logits = 0
    for band in rope_bands(site, tables, len(rope_pairs(site)[0]), augmented=True):
        (f,) = band.pairs
        delta = phi[None, :, f] - phi[:, None, f]  # Δφ[i, j] = φ(j) − φ(i)
        for trig, u, s, v in ((torch.cos, band.cos_U, band.cos_S, band.cos_V), (torch.sin, band.sin_U, band.sin_S, band.sin_V)):
            logits = logits + trig(delta) * torch.einsum("bnd,hdr,hr,bme,her->bhnm", x1, u, s, x1, v)
    return logits


@pytest.mark.parametrize("case", [c for c in FAST_CASES if c.name in (
    "vit_small_patch16_dinov3", "DINOv3ViTModel", "eva02_tiny_patch14_224", "MLCDVisionModel",
    "vit_pe_core_tiny_patch16_384-grouped-query", "Llama4VisionModel")], ids=lambda c: c.name)
def test_rope_band_forms_rebuild_the_models_rotated_logits(case: Case):
    """Σ_f cos Δφ_f · x̃_i^T W_q^T P_f W_k x̃_j + sin Δφ_f · x̃_i^T W_q^T J_f W_k x̃_j (one band per pair, biases folded in
    through x̃ = [x; 1]) equals the model's own rotated logits, read off its eager attention (log A per row)."""
    from qkhooks.models.rope import rope_bands

    torch.manual_seed(0)
    model, inputs = perturb(case.build()), case.inputs()
    sites = qkhooks.sites(model)
    by_layer = {s.layer: s for s in sites}
    seen = module_calls(model, {s.layer: s.module for s in sites}, inputs,
                        lambda l, a, kw: (a[0] if a else kw[by_layer[l].input_name], kw[by_layer[l].rope_input]))
    eager = eager_maps(model, sites, inputs, case.kind)
    for site, want in zip(sites, eager):
        x, tables = seen[site.layer]
        logits = rope_band_logits(site, x, tables) * site.scale
        own = want.double().log()
        diff = (logits - logits[..., :1]) - (own - own[..., :1])
        assert float(diff.abs().max()) < 1e-5 * (1 + float(own.abs().max())), f"{site.path}: {float(diff.abs().max()):.2e}"
        # the cos forms of any grouping sum to the content form W_q^T W_k (the zero-offset term)
        w = site.weights()
        dense = w.w_q.double().transpose(1, 2) @ w.w_k.double()
        summed = sum(torch.einsum("hdr,hr,her->hde", b.cos_U, b.cos_S, b.cos_V) for b in rope_bands(site, tables, 4))
        assert float((summed - dense).abs().max() / dense.abs().max()) < 1e-10


def test_spectrum_cli_adds_rope_bands_per_layer(tmp_path):
    import json
    import subprocess
    import sys

    out = tmp_path / "s.json"
    subprocess.run([sys.executable, "-m", "qkhooks", "spectrum", "timm:vit_small_patch16_dinov3", "--random-init",
                    "--rope-bands", "4", "--json", str(out), "--layers", "0,11"], check=True, capture_output=True)
    layers = json.loads(out.read_text())["layers"]
    assert [l["layer"] for l in layers] == [0, 11]
    for layer in layers:
        bands = layer["rope_bands"]
        assert len(bands) == 4 and sorted(p for b in bands for p in b["pairs"]) == list(range(32))  # d_k 64: 32 pairs
        assert [b["frequency"][1] for b in bands] == sorted((b["frequency"][1] for b in bands), reverse=True)
        assert abs(sum(b["cos"]["energy"] + b["sin"]["energy"] for b in bands) - 1) < 1e-9
        assert all(len(b["cos"]["cosine_weighted"]) == 6 for b in bands)


# ------------------------------------------------------------------------------ README "Supported models"
def _reason(detail: str) -> str:
    """The reason of a refusal, with the class it names: what follows the module's name, first sentence."""
    lines = detail.splitlines()
    if lines and "does not know how to find the attention layers" in lines[0]:
        listed = [line for line in lines[1:] if line.startswith("  - ")]  # the first attention-like module it saw
        if not listed:
            return "no adapter, and no attention-like module found"
        cls = re.search(r"\((\w+)[;)]", listed[0])
        why = listed[0].split("): ", 1)[-1].split(". ")[0]
        return f"{cls[1] if cls else '?'}: {why}".replace("|", "/")[:160]
    first = lines[0] if lines else detail
    cls = re.search(r"'\S+' \((\w+)\)", first)
    text = first.split("): ", 1)[-1] if "): " in first else first
    text = text.split(". ")[0].split("; ")[0].rstrip(".")
    return (f"{cls[1]}: " if cls else "") + text.replace("|", "/")[:160]


_FORM_WORDS = (("q/k normalisation", "q/k-norm"), ("window", "windows"), ("spatially reduced", "reduced keys"),
               ("rotary position embeddings", "RoPE"), ("relative-position", "bias"), ("relative_position", "bias"),
               ("rel_pos", "bias"), ("talking", "head mixing"), ("class attention", "class attention"))


def _refused_form(detail: str) -> str:
    reason = _reason(detail).lower()
    return ", ".join(dict.fromkeys(form for words, form in _FORM_WORDS if words in reason))


def _aside_reason(members: list[dict[str, Any]]) -> str:
    """Why models were not checked, counted: not qkhooks' results."""
    if members[0]["status"] == "no attention":
        return "no attention qkhooks records (CNNs, MLP mixers; pooling heads are left out by design)"
    kinds = {"need inputs besides one image batch": ("missing", "specify", "pixel_values_videos", "expected 5"),
             f"over {ZOO_MAX_PARAMS // 1_000_000}M parameters even small": ("parameters",)}
    counts: dict[str, int] = {}
    for r in members:
        label = next((k for k, words in kinds.items() if any(w in r["detail"] for w in words)), "fail to build or run small")
        counts[label] = counts.get(label, 0) + 1
    return "not built: " + ", ".join(f"{n} {label}" for label, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def _names(models: list[str], limit: int = 4) -> str:
    shown = ", ".join(f"`{m}`" for m in sorted(models)[:limit])
    return shown + (f" + {len(models) - limit} more" if len(models) > limit else "")


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """README's table: one line per model family the zoo checked (timm's model module, transformers' model type)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    aside = {"unbuildable": "(not built small here)", "no attention": "(no attention)"}
    for r in rows:
        groups.setdefault((aside.get(r["status"]) or r.get("family") or "?", r["kind"]), []).append(r)
    lines = ["| family | timm | Hugging Face | torchvision | form | exact | refused, and why |",
             "|---|---|---|---|---|---|---|"]
    order = lambda item: (item[0][0].startswith("("), item[0][1], item[0][0])  # noqa: E731
    for (family, kind), members in sorted(groups.items(), key=order):
        names = _names([r["model"] for r in members])
        exact = [r for r in members if r["status"] == "exact"]
        refused = [r for r in members if r["status"] != "exact"]
        forms = {f for r in exact for f in r.get("form", "").split(", ") if f}
        forms |= {f for r in refused for f in _refused_form(r["detail"]).split(", ") if f}
        if family.startswith("("):
            reasons = [_aside_reason(members)]
        else:
            reasons = sorted({_reason(r["detail"]) for r in refused})
        did = f"maps and modes ({len(exact)} of {len(members)})" if exact else ""
        why = "; ".join(reasons[:3]) + (f"; {len(reasons) - 3} more reasons" if len(reasons) > 3 else "")
        columns = " | ".join(names if kind == k else "" for k in ("timm", "hf", "torchvision"))
        lines.append(f"| {family} | {columns} | {', '.join(sorted(forms)) or ('plain' if exact else '')} | {did} | {why} |")
    return "\n".join(lines)


README_MARKERS = ("<!-- zoo-table: generated by python tests/test_zoo.py --readme README.md (make zoo-table) -->",
                  "<!-- /zoo-table -->")


def rewrite_readme(path: str, table: str) -> None:
    """Replace README's table between the zoo-table marker comments (the markers stay)."""
    from pathlib import Path

    text = Path(path).read_text()
    begin, end = text.index("<!-- zoo-table"), text.index(README_MARKERS[1])
    Path(path).write_text(text[:begin] + README_MARKERS[0] + "\n" + table + "\n" + text[end:])


def fast_rows() -> list[dict[str, Any]]:
    rows = []
    for case in FAST_CASES:
        outcome = _run_case(case)
        rows.append(dict(model=case.name, kind=case.kind, family=case.name, status=outcome.status,
                         detail=outcome.detail, form=outcome.form))
    return rows


@pytest.mark.parametrize("case", [c for c in FAST_CASES if c.name in ("BeitModel-shared-bias", "Siglip2VisionModel-padded",
                                                                        "vit_small_patch16_dinov3", "PvtV2Model",
                                                                        "SegformerModel")], ids=lambda c: c.name)
def test_rows_of_biased_masked_and_rotated_attention_are_the_full_maps_rows(case: Case):
    """Rows take the same additive term and rotation as the full maps (which the zoo checks against eager)."""
    torch.manual_seed(0)
    model, inputs = perturb(case.build()), case.inputs()
    tokens = torch.tensor([[0, 2], [3, 1]])  # within the 2x2 grid of the last stage of the staged models
    with qkhooks.record(model, modes=None, attention=["rows", "full"]) as run, torch.no_grad():
        run(**inputs, meta={"query_tokens": tokens})
    for layer in run.attention_layers("full"):
        full = run.attention(layer, "full")
        want = torch.stack([full[b][:, tokens[b]] for b in range(2)])
        assert torch.allclose(run.attention(layer, "rows"), want, atol=1e-6)


def main(argv: list[str]) -> None:
    """python tests/test_zoo.py --readme README.md [--save zoo.json]   run the whole zoo, write its table into README
    python tests/test_zoo.py --rows zoo.json [--readme README.md]     the table from saved rows
    python tests/test_zoo.py                                          the fast subset's table, printed
    (--list OUT and --chunk I/N ENTRIES OUT are the whole zoo's child processes)"""
    import argparse
    import json
    import tempfile

    parser = argparse.ArgumentParser(description=main.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--list", metavar="OUT")
    parser.add_argument("--chunk", nargs=3, metavar=("I/N", "ENTRIES", "OUT"))
    parser.add_argument("--readme", metavar="README")
    parser.add_argument("--rows", metavar="ZOO_JSON", help="rows saved by an earlier zoo run (no run)")
    parser.add_argument("--save", metavar="ZOO_JSON", help="save this run's rows")
    args = parser.parse_args(argv)
    if args.list:
        with open(args.list, "w") as f:
            json.dump(zoo_entries(), f)
        return
    if args.chunk:
        index, count = (int(v) for v in args.chunk[0].split("/"))
        with open(args.chunk[1]) as f:
            result = run_chunk(json.load(f), index, count)
        with open(args.chunk[2], "w") as f:
            json.dump(result, f)
        return
    if args.rows:
        with open(args.rows) as f:
            rows = json.load(f)
    elif args.readme or args.save:
        with tempfile.TemporaryDirectory() as work:
            rows, peaks = run_zoo(work)
        print(f"zoo: {len(rows)} models, peak RSS per chunk (MB): {peaks}")
        if args.save:
            with open(args.save, "w") as f:
                json.dump(rows, f, indent=1)
    else:
        rows = fast_rows()
    table = markdown_table(rows)
    rewrite_readme(args.readme, table) if args.readme else print(table)


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])


@pytest.mark.parametrize("case", [c for c in FAST_CASES if c.name in ("PvtV2Model", "PvtModel", "SegformerModel", "GLPNModel")],
                         ids=lambda c: c.name)
def test_reduced_keys_modes_from_the_models_qk_outputs_equal_those_from_the_tokens(case: Case):
    """Key maps (B, H, K, M) over the reduced tokens: the q/k path (the model's own key Linear output) and the x path
    (the reduction replayed with the model's modules) agree, and a reduced layer really has fewer keys."""
    torch.manual_seed(0)
    model, inputs = perturb(case.build()), case.inputs()
    maps = {}
    for qk_path in (True, False):
        with qkhooks.record(model, modes=4, qk_path=qk_path) as run, torch.no_grad():
            run(**inputs)
        assert set(run.mode_source.values()) == {"qk" if qk_path else "x"}
        maps[qk_path] = (run.query, run.key)
    reduced = 0
    for layer, key in maps[True][1].items():
        assert torch.allclose(key, maps[False][1][layer], atol=1e-5)
        assert torch.allclose(maps[True][0][layer], maps[False][0][layer], atol=1e-5)
        reduced += key.shape[-1] < maps[True][0][layer].shape[-1]
    assert reduced >= 2


def assert_maps_project_tokens(model: nn.Module, inputs: dict, sites: list, tokens: dict[int, torch.Tensor]) -> Any:
    """Each site's recorded query and key maps, from the model's q/k outputs and from the tokens alike (``qk_path``
    on and off), equal ``tokens[layer]`` (B, N, d: what a hook saw entering W_q/W_k) projected onto u_n and v_n.
    Returns the last recording (``qk_path=False``)."""
    for qk_path in (True, False):
        with qkhooks.record(model, modes=6, qk_path=qk_path) as run, torch.no_grad():
            run(**inputs)
        for site in sites:
            spec = run.spectrum(site.layer)
            x = tokens[site.layer].double()
            want_q = torch.einsum("bnd,hdk->bhkn", x, spec.U.double())
            want_k = torch.einsum("bnd,hdk->bhkn", x, spec.V.double())
            assert run.query(site.layer).shape == want_q.shape
            assert torch.allclose(run.query(site.layer).double(), want_q, atol=1e-4), site.path
            assert torch.allclose(run.key(site.layer).double(), want_k, atol=1e-4), site.path
    return run


@pytest.mark.parametrize("case", [c for c in FAST_CASES if "swin" in c.name.lower() and "v2" not in c.name.lower()],
                         ids=lambda c: c.name)
def test_windowed_modes_are_the_image_grid_tokens_projected(case: Case):
    """Query and key maps of a windowed layer sit on the image grid: they equal the tokens entering the block's
    attention, read before the model windows them (timm's norm1 output, HF's layernorm_before output, (B, H·W, d)),
    projected onto u_n and v_n directly; from the model's q/k outputs and from the windowed tokens alike."""
    torch.manual_seed(0)
    model, inputs = perturb(case.build()), case.inputs()
    sites = qkhooks.sites(model)
    grid_tokens: dict[int, torch.Tensor] = {}
    handles = [(s.block.norm1 if case.kind == "timm" else s.block.layernorm_before).register_forward_hook(
        lambda m, a, o, s=s: grid_tokens.__setitem__(s.layer, o.flatten(1, -2))) for s in sites]
    try:
        run = assert_maps_project_tokens(model, inputs, sites, grid_tokens)
    finally:
        for h in handles:
            h.remove()
    if "padded" in case.name:  # rows on the image grid are exact where the windows tile it (test_windows_forms)
        padded = [s.layer for s in run.sites if bool((s.window_index() < 0).any())]  # the layers whose grid is padded
        assert padded
        with pytest.raises(QKHooksError, match="padded to whole windows"):  # (rows across stages are refused anyway)
            with qkhooks.record(model, modes=None, attention="rows", layers=padded) as run, torch.no_grad():
                run(**inputs)
    with pytest.raises(QKHooksError, match="input='residual' is not modelled for windowed attention"):
        with qkhooks.record(model, modes=4, input="residual") as run, torch.no_grad():
            run(**inputs)


@pytest.mark.parametrize("case", [c for c in FAST_CASES if c.name in ("SwinModel", "swin_tiny_patch4_window7_224", "PvtV2Model",
                                                                        "pvt_v2_b2_li")], ids=lambda c: c.name)
def test_a_finished_recording_of_windowed_or_reduced_attention_keeps_no_model_alive(case: Case):
    _a_finished_recording_keeps_no_model_alive(case)


@pytest.mark.parametrize("case", [c for c in FAST_CASES if c.name in ("cait_xxs24_224", "efficientformer_l1",
                                                                        "efficientformerv2_s0", "convit_tiny",
                                                                        "vit_dwee_patch16_reg1_gap_256")],
                         ids=lambda c: c.name)
def test_a_finished_recording_of_talking_heads_or_biased_attention_keeps_no_model_alive(case: Case):
    """r49: the sites' head mixing (CaiT's and EfficientFormer-v2's talking heads, differential attention's and
    ConViT GPSA's two softmaxes) and bias readers (EfficientFormer's attention biases) read the model's modules; a
    finished recording, kept to read its maps, must not keep the model's modules alive through them."""
    _a_finished_recording_keeps_no_model_alive(case)


def _a_finished_recording_keeps_no_model_alive(case: Case) -> None:
    import gc
    import weakref

    torch.manual_seed(0)
    model, inputs = perturb(case.build()), case.inputs()
    with qkhooks.record(model, modes=4, attention="full") as run, torch.no_grad():
        run(**inputs)
    refs = [weakref.ref(m) for m in model.modules()]  # the attention modules and their reductions included
    del model
    gc.collect()
    assert all(ref() is None for ref in refs), [type(ref()).__name__ for ref in refs if ref() is not None]



@pytest.mark.parametrize("case", [c for c in FAST_CASES if c.expect == "exact"], ids=lambda c: c.name)
def test_a_second_recording_of_the_same_model_equals_the_first(case: Case):
    """record() keeps a model's sites between entries and hands each recording its own copies
    (capture.model_sites); the first entry is checked against the model's eager attention by the fast subset. A copy
    that still shared call state with the cached site or an earlier copy (a bound method of the original, a shared
    cache) would make the second entry differ or fail, for some form: every exact form is entered twice here."""
    torch.manual_seed(0)
    model = perturb(case.build())
    inputs = case.inputs()
    recorded = []
    # zoo11-inside: a model with maps-only layers (q or k made inside the module) is entered without modes
    maps_only = any(s.modes_refusal() for s in qkhooks.sites(model, skip_unmodelled=case.name.endswith("-partial")))
    for _ in range(2):
        with qkhooks.record(model, modes=None if maps_only else "all", augmented=True, attention="full",
                            skip_unmodelled=case.name.endswith("-partial")) as run:
            out = _first_tensor(_call(model, inputs))
        full = {l: run.attention(l, "full") for l in run.attention_layers("full")}
        modes = [] if maps_only else run.mode_layers
        recorded.append((out, full, {l: run.query(l) for l in modes}, {l: run.key(l) for l in modes}))
    (out1, full1, q1, k1), (out2, full2, q2, k2) = recorded
    assert torch.equal(out1, out2)
    assert sorted(full1) == sorted(full2) and (maps_only or sorted(full1) == sorted(q1) == sorted(q2)) and len(full1) > 0
    for layer in full1:
        assert torch.equal(full1[layer], full2[layer]), f"layer {layer}: full maps differ on the second entry"
        if not maps_only:
            assert torch.equal(q1[layer], q2[layer]) and torch.equal(k1[layer], k2[layer]), f"layer {layer}: modes differ"


def test_torchvisions_vits_are_zoo_entries_built_small_with_their_own_widths_in_a_column_of_their_own():
    """The whole zoo enumerates torchvision's ViT builders (README's table had no torchvision row) and builds each at
    depth 2 with the builder's own patch size, heads and widths; the table gives torchvision its own column."""
    pytest.importorskip("torchvision")
    assert _torchvision_vits() == ["vit_b_16", "vit_b_32", "vit_h_14", "vit_l_16", "vit_l_32"]
    model, inputs = _torchvision_small("vit_b_32")
    attn = model.encoder.layers[0].self_attention
    assert (model.patch_size, model.hidden_dim, model.mlp_dim, attn.num_heads, len(model.encoder.layers)) == (
        32, 768, 3072, 12, 2) and inputs["x"].shape == (1, 3, 128, 128)
    assert check(model, inputs, "torchvision").status == "exact"
    rows = [dict(model="vit_b_32", kind="torchvision", family="vision_transformer", status="exact", form="plain"),
            dict(model="vit_tiny", kind="timm", family="vision_transformer", status="exact", form="plain")]
    assert markdown_table(rows).splitlines() == [
        "| family | timm | Hugging Face | torchvision | form | exact | refused, and why |", "|---|---|---|---|---|---|---|",
        "| vision_transformer | `vit_tiny` |  |  | plain | maps and modes (1 of 1) |  |",
        "| vision_transformer |  |  | `vit_b_32` | plain | maps and modes (1 of 1) |  |"]
