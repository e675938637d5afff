"""Partial recording (``skip_unmodelled=True``) and the forms recorded with it: DaViT's spatial windows beside its
channel blocks. References are computed here from the model's own parameters and the tensors its modules receive
(plain forward hooks), never from qkhooks' own rebuild."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import qkhooks
from qkhooks.errors import QKHooksError
from qkhooks.models.load import load_model
from qkhooks.store import open_run
from qkhooks.stream import record_dataset
from test_zoo import perturb
from conftest import forward_with_hooks

DAVIT = dict(depths=(1, 1, 1, 1), embed_dims=(16, 16, 16, 16), num_heads=(2, 2, 2, 2))


def _davit(**kw) -> torch.nn.Module:
    import timm

    torch.manual_seed(0)
    return perturb(timm.create_model("davit_tiny", pretrained=False, **{**DAVIT, **kw})).eval()


def _spatial_calls(model: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, tuple]]:
    """The model's output and, per spatial block, (its (B, C, H, W) input grid, the windows its attention receives)."""
    seen: dict[str, list] = {}
    handles = []
    for name, module in model.named_modules():
        if type(module).__name__ == "SpatialBlock":
            handles.append(module.register_forward_pre_hook(
                lambda m, a, n=name: seen.setdefault(n, [None, None]).__setitem__(0, a[0].shape[2:])))
            handles.append(module.attn.register_forward_pre_hook(
                lambda m, a, n=name: seen[n].__setitem__(1, a[0].detach().clone())))
    out = forward_with_hooks(model, handles, images)
    return out, {n: tuple(v) for n, v in seen.items()}


def _window_of_grid(h: int, w: int, win: tuple[int, int]) -> torch.Tensor:
    """(nW, Nw) grid index of each window position, as timm's window_partition cuts a bottom/right-padded grid."""
    hp, wp = -(-h // win[0]) * win[0], -(-w // win[1]) * win[1]
    index = torch.full((hp, wp), -1, dtype=torch.long)
    index[:h, :w] = torch.arange(h * w).view(h, w)
    return index.view(hp // win[0], win[0], wp // win[1], win[1]).permute(0, 2, 1, 3).reshape(-1, win[0] * win[1])


def test_a_model_with_channel_attention_is_refused_by_default_naming_the_module_and_the_flag():
    model = _davit()
    with pytest.raises(QKHooksError, match=r"'stages\.0\.blocks\.0\.1\.attn' \(ChannelAttention\).*over channels.*"
                                           r"skip_unmodelled=True"):
        qkhooks.sites(model)
    with pytest.raises(QKHooksError, match="skip_unmodelled=True"):
        qkhooks.record(model)


@pytest.mark.parametrize("v2", [False, True], ids=["ChannelAttention", "ChannelAttentionV2"])
def test_davit_partial_recording_is_exact_on_its_spatial_windows_and_names_every_channel_block(v2: bool):
    """Spatial blocks recorded, indexed 0..3 in forward order; every channel block named with its reason; outputs
    bit-identical; full maps = softmax(scale·q·kᵀ) of the model's own qkv on the windows its attention receives
    (the grid padded to whole windows); modes (biases folded in) rebuild those logits, read on the image grid."""
    model = _davit(channel_attn_v2=v2, named_blocks=v2)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    plain, calls = _spatial_calls(model, images)
    with torch.no_grad(), qkhooks.record(model, modes="all", augmented=True, attention="full", skip_unmodelled=True) as rec:
        out = model(images)
    assert torch.equal(out, plain)
    spatial = [n for n, m in model.named_modules() if type(m).__name__ == "SpatialBlock"]
    channel = [n + ".attn" for n, m in model.named_modules() if type(m).__name__ == "ChannelBlock"]
    assert rec.layers == [0, 1, 2, 3] and [rec.module_paths[l] for l in rec.layers] == [n + ".attn" for n in spatial]
    assert list(rec.left_out) == channel
    cls = "ChannelAttentionV2" if v2 else "ChannelAttention"
    assert all(why.startswith(f"{cls}: its softmax runs over channels") for why in rec.left_out.values())
    for layer, block in enumerate(spatial):
        (h, w), windows = calls[block]
        attn = model.get_submodule(block).attn
        heads, dk = attn.num_heads, attn.qkv.out_features // 3 // attn.num_heads
        q, k = F.linear(windows.double(), attn.qkv.weight.detach().double(), attn.qkv.bias.detach().double()).unflatten(
            -1, (3, heads, dk)).permute(2, 0, 3, 1, 4)[:2]
        logits = attn.scale * q @ k.transpose(-1, -2)  # (B·nW, H, Nw, Nw)
        got = rec.attention(layer, "full")  # (B, nW, H, Nw, Nw), windows in the model's order
        torch.testing.assert_close(got.flatten(0, 1).double(), logits.softmax(-1), atol=1e-6, rtol=0)
        index = _window_of_grid(int(h), int(w), tuple(model.get_submodule(block).window_size))
        assert got.shape[1] == index.shape[0] and bool((index < 0).any()) == (h % 7 != 0)
        spectrum = rec.spectrum(layer)
        # query/key maps on the image grid (B, H, K, h·w), cut into the model's windows (padding: the bias direction)
        pad = lambda t, last: torch.cat([t, last[None, :, :, None].expand(t.shape[0], -1, -1, 1)], -1)  # noqa: E731
        qm, km = (pad(rec.query(layer).double(), spectrum.U[:, -1].double()),
                  pad(rec.key(layer).double(), spectrum.V[:, -1].double()))
        at = torch.where(index < 0, h * w, index)
        qw, kw = qm[..., at].permute(0, 3, 1, 2, 4), km[..., at].permute(0, 3, 1, 2, 4)  # (B, nW, H, K, Nw)
        rebuilt = torch.einsum("bwhkn,hk,bwhkm->bwhnm", qw, spectrum.S.double(), kw) * attn.scale
        torch.testing.assert_close(rebuilt.flatten(0, 1), logits, atol=1e-5 * float(logits.abs().max()), rtol=0)


def test_skip_unmodelled_with_nothing_modelled_is_refused_naming_the_modules():
    import timm

    torch.manual_seed(0)
    model = timm.create_model("xcit_nano_12_p16_224", pretrained=False, depth=2, cls_attn_layers=0, img_size=32)
    with pytest.raises(QKHooksError, match=r"'blocks\.0\.attn' \(XCA\): cross-covariance.*leaves nothing to record: no attention of Xcit"):
        qkhooks.sites(model, skip_unmodelled=True)


def test_run_file_stores_the_modules_left_out_and_info_prints_them(tmp_path, capsys):
    """record_dataset(skip_unmodelled=True) writes the left-out modules to model/info, `qkhooks info` lists them, the
    stored full maps are the live recording's; without the flag the run is refused before any file exists."""
    from qkhooks.cli import main

    model = _davit()
    loaded = load_model(model)
    with pytest.raises(QKHooksError, match="skip_unmodelled"):
        record_dataset(loaded, "samples", tmp_path / "refused.h5", limit=2, progress=False, reducers=[])
    assert not (tmp_path / "refused.h5").exists()
    live: list[torch.Tensor] = []
    record_dataset(loaded, "samples", tmp_path / "davit.h5", limit=2, batch_size=2, progress=False, dtype="float32",
                   modes=2, attention="full:1", reducers=[], skip_unmodelled=True,
                   on_batch=lambda b: live.append(b.attention(1, "full").clone()))
    with open_run(tmp_path / "davit.h5") as run:
        left = run.info["left_out_unmodelled"]
        assert list(left) == [f"stages.{s}.blocks.0.1.attn" for s in range(4)] and run.layers == [0, 1, 2, 3]
        torch.testing.assert_close(torch.as_tensor(run.attention(1, "full")[:]), torch.cat(live), atol=0, rtol=0)
    assert main(["info", str(tmp_path / "davit.h5")]) == 0
    assert "not recorded: stages.2.blocks.0.1.attn: ChannelAttention: its softmax runs over channels" in capsys.readouterr().out


def test_gcvit_local_windows_are_exact_and_its_global_query_blocks_are_maps_only_sites():
    """Local blocks: full maps equal each module's own eager attention (its attn_drop input: softmax(scale·q·k +
    RelPosBias) per window); the global-query blocks (queries from the stage's GlobalContext, no W_q) are maps-only
    sites since zoo11-inside (tests/test_inside_forms.py), so nothing is left out and every block is recorded."""
    import timm

    torch.manual_seed(0)
    model = perturb(timm.create_model("gcvit_xxtiny", pretrained=False, img_size=64)).eval()
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    local = [n for n, m in model.named_modules() if type(m).__name__ == "WindowAttentionGlobal" and not m.use_global]
    every = [n for n, m in model.named_modules() if type(m).__name__ == "WindowAttentionGlobal"]
    eager: dict[str, torch.Tensor] = {}
    handles = [model.get_submodule(n).attn_drop.register_forward_hook(
        lambda m, a, o, n=n: eager.__setitem__(n, o.detach().clone())) for n in local]
    plain = forward_with_hooks(model, handles, images)
    layers = [every.index(n) for n in local]
    with torch.no_grad(), qkhooks.record(model, modes=4, layers=layers, attention="full", skip_unmodelled=True) as rec:
        out = model(images)
    assert torch.equal(out, plain)
    assert [rec.module_paths[l] for l in rec.layers] == local and not rec.left_out
    assert [s.path for s in qkhooks.sites(model)] == every
    for layer, name in zip(layers, local):
        got = rec.attention(layer, "full")  # (B, nW, H, Nw, Nw)
        torch.testing.assert_close(got.flatten(0, 1), eager[name], atol=1e-6, rtol=0)


def test_convit_mhsa_blocks_are_exact_after_its_gpsa_blocks():
    """ConViT: the MHSA blocks after its GPSA blocks (class token joined) recorded, their full maps equal to each
    module's own eager softmax (its attn_drop input). zoo11-maps: GPSA is modelled now (tests/test_map_forms.py), so
    every block is recorded and none is left out."""
    import timm

    torch.manual_seed(0)
    model = perturb(timm.create_model("convit_tiny", pretrained=False, depth=3, local_up_to_layer=2, embed_dim=32,
                                      num_heads=4, img_size=32, patch_size=8)).eval()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    eager: list[torch.Tensor] = []
    handle = model.blocks[2].attn.attn_drop.register_forward_hook(lambda m, a, o: eager.append(o.detach().clone()))
    try:
        with torch.no_grad():
            plain = model(images)
    finally:
        handle.remove()
    with torch.no_grad(), qkhooks.record(model, modes=4, attention="full") as rec:
        out = model(images)
    assert torch.equal(out, plain)
    assert rec.module_paths[2] == "blocks.2.attn" and not rec.left_out
    assert rec.sites[2].num_prefix_tokens == 1
    got = rec.attention(2, "full")
    assert got.shape == eager[0].shape == (2, 4, 17, 17)
    torch.testing.assert_close(got, eager[0], atol=1e-6, rtol=0)


def test_the_refusal_offers_skip_unmodelled_only_where_it_would_record_something():
    """Factorised attention in every block (CoaT-Lite, no softmax of q·k): nothing is modelled, so the refusal does
    not point at the flag (zoo11-maps: differential attention, used here before, is modelled now)."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("coat_lite_tiny", pretrained=False)
    with pytest.raises(QKHooksError, match=r"'serial_blocks1\.0\.factoratt_crpe' \(FactorAttnConvRelPosEnc\): factorised") as err:
        qkhooks.sites(model)
    assert "skip_unmodelled" not in str(err.value)
    with pytest.raises(QKHooksError, match=r"FactorAttnConvRelPosEnc.*leaves nothing to record"):
        qkhooks.sites(model, skip_unmodelled=True)


def test_left_out_names_the_unmodelled_modules_only_when_a_selection_of_sites_is_recorded():
    model = _davit()
    every = qkhooks.sites(model, skip_unmodelled=True)
    channel = [n + ".attn" for n, m in model.named_modules() if type(m).__name__ == "ChannelBlock"]
    with qkhooks.record(model, modes=2, sites=every[1:2], skip_unmodelled=True) as rec:
        pass
    with qkhooks.record(model, modes=2, layers=[1], skip_unmodelled=True) as chosen:
        pass
    assert list(rec.left_out) == list(chosen.left_out) == channel and rec.layers == chosen.layers == [1]


@pytest.mark.parametrize("name", ["MobileViTV2Model", "SwiftFormerModel"])  # VidEoMT, Llama 4, VideoPrism: modelled now
def test_skip_unmodelled_never_takes_a_module_of_a_known_unmodelled_class(name):
    """An adapter takes every attention of its family; a partial recording must still leave out a class qkhooks knows
    it does not model (VidEoMT's per-frame layers were once recorded once per forward, silently, before they were
    modelled). Every attention of these two is such a class, so the flag is not offered and, given, leaves nothing
    to record."""
    from qkhooks.models import find_sites
    from qkhooks.models.unsupported import SKIP_HINT
    from test_zoo import _small

    model, _ = _small(name, "hf")
    with pytest.raises(QKHooksError) as plain:
        find_sites(model)
    assert "unsupported attention in" in str(plain.value) and SKIP_HINT not in str(plain.value)
    with pytest.raises(QKHooksError, match="leaves nothing to record"):
        find_sites(model, skip_unmodelled=True)
    with pytest.raises(QKHooksError, match="leaves nothing to record"):
        qkhooks.record(model, modes=2, skip_unmodelled=True)
