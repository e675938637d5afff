"""Review r42 (revtv): torchvision ViT adapter edge cases, each checked against an independent reference."""

from __future__ import annotations

import types

import pytest
import torch

import qkhooks
from qkhooks import QKHooksError

torchvision = pytest.importorskip("torchvision")
from torchvision.models.vision_transformer import VisionTransformer  # noqa: E402


def tiny() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64).eval()


def _class_token_last(self, x):
    x = self._process_input(x)
    x = torch.cat([x, self.class_token.expand(x.shape[0], -1, -1)], dim=1)  # the class token after the patches
    return self.heads(self.encoder(x)[:, -1])


@pytest.mark.parametrize("method", ["forward", "_process_input"])
def test_a_forward_replaced_on_the_instance_is_refused_as_a_subclass_is(method):
    """An instance patch moves the class token (here: last) as a subclass would; qkhooks' rows at token 0 would then be
    a patch's, labelled the class token's. Before the fix only a subclass's override was refused."""
    model = tiny()
    if method == "forward":
        model.forward = types.MethodType(_class_token_last, model)
    else:
        real = model._process_input
        model._process_input = lambda x: real(x).flip(1)  # patches in reverse raster order
    with pytest.raises(QKHooksError, match=rf"replaces torchvision VisionTransformer.{method} on the instance"):
        with qkhooks.record(model, attention="rows"), torch.no_grad():
            model(torch.randn(1, 3, 32, 32))
    del model.__dict__[method]  # the class's own again: recorded
    with qkhooks.record(model, attention="rows") as run, torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert run.attention(0, "rows").shape == (1, 4, 2, 17)


def test_accelerates_device_only_wrapper_on_the_model_is_still_taken():
    """accelerate's device placement (``device_map=...``) wraps model.forward on the instance around the class's own
    forward, moving tensors only: recorded, maps equal to the MultiheadAttention's own weights."""
    from test_foreign_hooks_refused import _accelerate

    hooks = _accelerate("stand-in")
    model, x = tiny(), torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    seen = {}
    handles = [b.self_attention.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, a[0].clone()))
               for i, b in enumerate(model.encoder.layers)]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    hooks.add_hook_to_module(model, hooks.AlignDevicesHook(execution_device="cpu", io_same_device=True))
    assert "forward" in vars(model)
    with qkhooks.record(model, attention="full") as run, torch.no_grad():
        model(x)
    for i, block in enumerate(model.encoder.layers):
        t = seen[i]
        with torch.no_grad():
            want = block.self_attention(t, t, t, need_weights=True, average_attn_weights=False)[1]
        assert float((run.attention(i, "full") - want).abs().max()) < 1e-5


@pytest.mark.parametrize("outputs", ["unchanged", "eager"])
def test_a_refused_masked_call_leaves_nothing_behind(outputs):
    """What test_torchvision_vit's test_the_unpatched_call_records_again_after_a_refused_one names but does not do
    (it records a need_weights=True call, refusing nothing): a call with a mask refused, the mask taken away, and the
    next recording (same model, same outputs) equal to the MultiheadAttention's own weights, with no torch function
    mode or hook of qkhooks' left behind. The mask is handed by a pre-hook registered before record() (a block whose
    forward is replaced on the instance is refused before any call: test_torchvision_vit's route tests)."""
    from torch.overrides import _get_current_function_mode_stack

    model, x = tiny(), torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    attn = model.encoder.layers[1].self_attention
    masked = attn.register_forward_pre_hook(
        lambda m, a, kw: (a, {**kw, "attn_mask": torch.zeros(a[0].shape[1], a[0].shape[1])}), with_kwargs=True)
    with pytest.raises(QKHooksError, match="attn_mask"), torch.no_grad():
        with qkhooks.record(model, attention="full", outputs=outputs):
            model(x)
    assert not _get_current_function_mode_stack()
    assert [list(b.self_attention._forward_pre_hooks) for b in model.encoder.layers] == [[], [masked.id]]
    assert all(not b.self_attention._forward_hooks for b in model.encoder.layers)
    masked.remove()
    seen = {}
    handles = [b.self_attention.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, a[0].clone()))
               for i, b in enumerate(model.encoder.layers)]
    with torch.no_grad():
        ref = model(x)
    for h in handles:
        h.remove()
    with qkhooks.record(model, attention="full", outputs=outputs) as run, torch.no_grad():
        out = model(x)
    assert float((out - ref).abs().max()) < 1e-5
    for i, b in enumerate(model.encoder.layers):
        with torch.no_grad():
            want = b.self_attention(seen[i], seen[i], seen[i], need_weights=True, average_attn_weights=False)[1]
        assert float((run.attention(i, "full") - want).abs().max()) < 1e-5
