"""Round 38's review of capture (a q/k Linear shared by two blocks, recordings across threads, a deepcopy of the
model inside record(), per-batch meta, a truncated spectrum handed in, an empty batch, functional_call): each test
seen to fail on the code before its fix, each number compared with an independent reference (a dense float64 SVD of
W_q_hᵀW_k_h per head applied to the tokens a plain hook saw, or the model's own eager attention)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import timm
import torch

import qkhooks
from qkhooks.errors import QKHooksError


def _timm(depth: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, embed_dim=32, depth=depth, num_heads=2,
                              img_size=16, patch_size=8, num_classes=0).eval()
    with torch.no_grad():  # non-trivial maps: the default init gives near-uniform ones
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


def _images(n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def _tokens(model: torch.nn.Module, x: torch.Tensor) -> dict[int, np.ndarray]:
    """The tokens entering each block's attention (a plain pre-hook; float64 copies)."""
    seen: dict[int, np.ndarray] = {}
    handles = [b.attn.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, a[0].double().numpy().copy()))
               for i, b in enumerate(model.blocks)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return seen


def _dense_query(attn: torch.nn.Module, x: np.ndarray, k: int) -> np.ndarray:
    """x·u_n per head from a dense float64 SVD of W_q_hᵀW_k_h (sign: the largest |u| entry positive): (B, H, k, N)."""
    w = attn.qkv.weight.detach().double().numpy()
    heads = attn.num_heads
    dk = w.shape[0] // 3 // heads
    out = []
    for h in range(heads):
        u, _, _ = np.linalg.svd(w[h * dk:(h + 1) * dk].T @ w[heads * dk + h * dk:heads * dk + (h + 1) * dk])
        u = u[:, :k] * np.sign(u[np.abs(u[:, :k]).argmax(0), np.arange(k)])
        out.append(np.einsum("bnd,dk->bkn", x, u))
    return np.stack(out, 1)


def _eager_probs(model: torch.nn.Module, x: torch.Tensor) -> dict[int, torch.Tensor]:
    """The softmax each block's attention computes (its eager path, on a copy): attn_drop's input."""
    ref = copy.deepcopy(model)
    probs: dict[int, torch.Tensor] = {}
    for i, block in enumerate(ref.blocks):
        block.attn.fused_attn = False
        block.attn.attn_drop.register_forward_pre_hook(lambda m, a, i=i: probs.__setitem__(i, a[0].clone()))
    with torch.no_grad():
        ref(x)
    return probs


def _rel(a: torch.Tensor | np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


# ------------------------------------------------------------- 1. a q/k Linear shared by two blocks
@pytest.mark.parametrize("layers", [None, [0]])
def test_a_qkv_linear_shared_by_two_blocks_gives_each_layer_its_own_maps(layers):
    """Before: with ``blocks[1].attn.qkv = blocks[0].attn.qkv``, layer 0's modes and full maps were layer 1's (its
    q/k hook took the shared Linear's later call in the same forward), off by ~0.9, also with layers=[0] alone."""
    model, x = _timm(), _images()
    model.blocks[1].attn.qkv = model.blocks[0].attn.qkv
    tokens, probs = _tokens(model, x), _eager_probs(model, x)
    with torch.no_grad(), qkhooks.record(model, modes=4, layers=layers, attention="full") as run:
        model(x)
    assert run.mode_source[0] == "qk"
    for layer in run.layers:
        want = _dense_query(model.blocks[layer].attn, tokens[layer], 4)
        assert _rel(run.query(layer), want) < 1e-5, layer
        assert float((run.attention(layer, "full") - probs[layer]).abs().max()) < 1e-5, layer
    other = _dense_query(model.blocks[0].attn, tokens[1], 4)  # the shared Linear's call in block 1
    assert _rel(run.query(0), other) > 0.1


def test_a_qkv_linear_also_called_by_a_head_after_the_blocks_leaves_its_layer_exact():
    """Before: a head calling ``blocks[0].attn.qkv`` on its own input after the blocks crashed inside qkhooks' hook
    with a plain ValueError (or, with a head of the same shape, replaced layer 0's maps)."""
    model, x = _timm(), _images()

    class Head(torch.nn.Module):
        def __init__(self, qkv: torch.nn.Module) -> None:
            super().__init__()
            self.qkv = qkv

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.qkv(tokens[:, None] * 2.0)[..., :5]

    model.head = Head(model.blocks[0].attn.qkv)
    tokens, probs = _tokens(model, x), _eager_probs(model, x)
    with torch.no_grad(), qkhooks.record(model, modes=4, layers=[0], attention="full") as run:
        model(x)
    assert _rel(run.query(0), _dense_query(model.blocks[0].attn, tokens[0], 4)) < 1e-5
    assert float((run.attention(0, "full") - probs[0]).abs().max()) < 1e-5


def test_a_qkv_linear_called_twice_within_its_own_attention_call_is_refused():
    """An attention module that calls its qkv Linear twice in one call: which output is q and k cannot be told."""
    model, x = _timm(depth=1), _images()
    attn = model.blocks[0].attn
    plain = type(attn).forward

    def twice(self, tokens, *args, **kwargs):
        self.qkv(tokens * 0.5)
        return plain(self, tokens, *args, **kwargs)

    with torch.no_grad(), qkhooks.record(model, modes=4) as run:
        type(attn).forward = twice
        try:
            with pytest.raises(QKHooksError, match=r"blocks\.0\.attn\.qkv \(layer 0's q/k projection\) ran more than "
                                                   r"once within one call of blocks\.0\.attn.*qk_path=False"):
                model(x)
        finally:
            type(attn).forward = plain
        model(x)  # the next batch is recorded, exact
    assert _rel(run.query(0), _dense_query(attn, _tokens(model, x)[0], 4)) < 1e-5
