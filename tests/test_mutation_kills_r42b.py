"""Kill tests of round 42's own library code (module "round42" of tests/mutation.py): what its tests missed. The
torchvision ViT's refusals are checked whole (each names the module, the reason and the fix), the weights download is
asked for the file torchvision's own loader would keep, with the hash prefix of its name, and outputs="eager" names the
shape of maps that do not fit the site."""

from __future__ import annotations

import dataclasses
import enum
import types

import pytest
import torch
from torch import nn

import qkhooks
from qkhooks import QKHooksError
from test_torchvision_vit import DIM, HEADS, _calling, _replaced, images, tiny

PATH = "'encoder.layers.encoder_layer_1.self_attention'"
BUILT = ("torchvision's Vision Transformers build it as nn.MultiheadAttention(hidden_dim, num_heads, batch_first=True); "
         "another form needs an adapter of its own, qkhooks.register_adapter (README, 'Your own architecture')")
SKIP = ("To record the layers qkhooks does model and leave this one out, named with its reason in the recording and the "
        "run file, pass skip_unmodelled=True (qkhooks record --skip-unmodelled).")


def _refusal(call) -> str:
    with pytest.raises(QKHooksError) as err:
        call()
    return str(err.value)


class _OwnForward(nn.MultiheadAttention):
    def forward(self, *args, **kwargs):
        return super().forward(*args, **kwargs)


def test_a_multihead_attention_overriding_its_forward_is_refused_whole():
    model = tiny()
    model.encoder.layers[1].self_attention = _OwnForward(DIM, HEADS, batch_first=True)
    assert _refusal(lambda: qkhooks.sites(model)) == (
        f"unsupported attention in {PATH} (_OwnForward): _OwnForward overrides nn.MultiheadAttention.forward, which "
        "is what qkhooks models, so how the tokens reach this attention (the class token first, then the patch grid in "
        "raster order, after ln_1 as query, key and value) and what it computes with them is not known to qkhooks: the "
        "maps, modes and grid recorded could describe other tokens than those it runs on; record a plain torchvision "
        "VisionTransformer, or register your own adapter (README, 'Your own architecture').")


@pytest.mark.parametrize("mha, why", [
    (dict(kdim=16, vdim=16), "its keys and values have other widths than its queries (kdim=16, vdim=16, embed_dim=32): "
                             "separate q/k/v_proj_weight, so keys come from other tokens than the queries "
                             "(cross-attention)"),
    (dict(add_bias_kv=True), "add_bias_kv=True appends a learned key and value to every sequence, a key that is no "
                             "token's, which the maps and modes of W_q^T W_k over the tokens do not model"),
    (dict(add_zero_attn=True), "add_zero_attn=True appends a zero key and value to every sequence, a key that is no "
                               "token's, which the maps and modes over the tokens do not model"),
    (dict(batch_first=False), "batch_first=False: it takes (tokens, batch, width) sequences, while qkhooks reads the "
                              "tokens entering it as (batch, tokens, width)"),
], ids=["kdim", "add_bias_kv", "add_zero_attn", "batch_first"])
def test_each_unmodelled_multihead_attention_form_is_refused_whole(mha, why):
    assert _refusal(lambda: qkhooks.sites(_replaced(**mha))) == (
        f"unsupported attention in {PATH} (MultiheadAttention): {why} ({BUILT}). {SKIP}")


def _recorded(model):
    with torch.no_grad(), qkhooks.record(model, attention="full"):
        model(images())


CALL = f"unsupported attention in {PATH} (MultiheadAttention): "


@pytest.mark.parametrize("call, why", [
    (lambda x: ((x, x.clone(), x), {}), "its key is not the query tensor"),
    (lambda x: ((x, x, x.clone()), {}), "its value is not the query tensor"),
    (lambda x: ((x, x.clone(), x.clone()), {}), "its key and value are not the query tensor"),
], ids=["key", "value", "both"])
def test_a_call_with_other_keys_or_values_is_refused_naming_which(call, why):
    assert _refusal(lambda: _recorded(_calling(tiny(), call))) == CALL + why + (
        " it is handed (cross-attention, or a copy), so the keys are not known to be the queries' tokens, which the maps "
        "and modes of W_q^T W_k here assume. Call it as torchvision's EncoderBlock does: self_attention(x, x, x).")


@pytest.mark.parametrize("call, what", [
    (lambda x: ((x, x, x), dict(attn_mask=torch.zeros(x.shape[1], x.shape[1]))), "attn_mask (a (17, 17)"),
    (lambda x: ((x, x, x), dict(key_padding_mask=torch.zeros(x.shape[:2], dtype=torch.bool))), "key_padding_mask (a (2, 17)"),
], ids=["attn_mask", "key_padding_mask"])
def test_a_masked_call_is_refused_naming_the_mask_and_its_shape(call, what):
    assert _refusal(lambda: _recorded(_calling(tiny(), call))) == CALL + (
        f"the call hands it {what} tensor), a term qkhooks does not model for this family, so rebuilt maps and modes "
        "would not be the model's. Record a model or input without it.")


def test_a_subclass_replacing_how_tokens_are_made_is_refused_whole():
    class Own(type(tiny())):
        def _process_input(self, x):
            return super()._process_input(x)

    model = Own(image_size=32, patch_size=8, num_layers=2, num_heads=HEADS, hidden_dim=DIM, mlp_dim=64)
    assert _refusal(lambda: qkhooks.sites(model)) == (
        "Own overrides torchvision VisionTransformer._process_input, so where its tokens come from (one class token "
        "first, then the patch grid) is not known to qkhooks; record a plain VisionTransformer (del "
        "model._process_input restores the class's own on an instance), or register your own adapter (README, 'Your "
        "own architecture').")


def test_a_dilated_stem_convolution_is_named_as_dilated_when_masks_need_its_pixels():
    from torchvision.models.vision_transformer import ConvStemConfig

    model = tiny(conv_stem_configs=[ConvStemConfig(out_channels=8, kernel_size=3, stride=2),
                                    ConvStemConfig(out_channels=8, kernel_size=3, stride=4)])
    conv = model.conv_proj.conv_bn_relu_0[0]
    conv.dilation = (2, 2)
    assert _refusal(qkhooks.sites(model)[0].pixel_convs) == (
        f"torchvision ViT's stem convolution {conv} is dilated (dilation=(2, 2)); which pixels its tokens read is not "
        "modelled, so masks cannot be read onto them. Record this model without masks.")


def test_eager_outputs_name_the_shape_of_maps_that_do_not_fit_the_site():
    model = tiny()
    sites = [dataclasses.replace(s, num_heads=2, head_dim=DIM // 2) for s in qkhooks.sites(model)]

    def run():
        with torch.no_grad(), qkhooks.record(model, sites=sites, attention="full", outputs="eager"):
            model(images())

    assert "its attention weights have shape (2, 4, 17, 17), not the (batch, 2 heads, tokens, keys) the adapter " \
           "describes" in _refusal(run)


def test_an_unknown_torchvision_architecture_is_refused_listing_the_vits():
    assert _refusal(lambda: qkhooks.load_model("torchvision:resnet50", random_init=True)) == (
        "torchvision:resnet50: qkhooks loads torchvision's Vision Transformers (vit_b_16, vit_b_32, vit_h_14, "
        "vit_l_16, vit_l_32); other torchvision models have no attention qkhooks models (build one yourself and pass "
        "the module, with image_config=..., to be told why).")


def _weights_like(transforms):
    """A stand-in weights enum of one entry whose preprocessing is ``transforms`` (torchvision's ViT weights are all
    a square crop after resizing, bilinear or bicubic)."""

    class Weights(enum.Enum):
        ONLY = types.SimpleNamespace(meta={"min_size": (32, 32), "categories": ["a", "b"]},
                                     url="https://download.pytorch.org/models/vit_x-0123abcd.pth",
                                     transforms=lambda: transforms)

    Weights.DEFAULT = Weights.ONLY
    for name in ("meta", "url", "transforms"):
        setattr(Weights, name, property(lambda self, name=name: getattr(self.value, name)))
    return Weights


def test_a_preprocessing_qkhooks_does_not_reproduce_is_refused_naming_it(monkeypatch):
    import torchvision

    preprocess = types.SimpleNamespace(interpolation=torchvision.transforms.InterpolationMode.NEAREST,
                                       crop_size=[32], resize_size=[36], mean=[0.5] * 3, std=[0.5] * 3)
    monkeypatch.setattr(torchvision.models, "get_model_weights", lambda arch: _weights_like(preprocess))
    message = _refusal(lambda: qkhooks.load_model("torchvision:vit_b_16", random_init=True))
    assert message == (f"torchvision:vit_b_16: its weights' preprocessing ({preprocess}) is not one qkhooks reproduces "
                       "(a square crop after resizing the shorter side, bilinear or bicubic); pass image_config=....")


def test_missing_weights_are_downloaded_to_torchvisions_own_cache_file_checked_by_the_hash_in_its_name(tmp_path,
                                                                                                     monkeypatch):
    from qkhooks.models import load

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(load, "_does_not_resolve", lambda host, probe: False)
    monkeypatch.delenv(load.DOWNLOAD_TIMEOUT_ENV, raising=False)
    asked = []

    def download(url, dst, timeout):
        asked.append((url, dst, timeout))
        raise OSError("no network in this test")

    monkeypatch.setattr(load, "_download", download)  # the hash in the name: test_torchvision_vit's local server
    weights = _weights_like(None).ONLY
    message = _refusal(lambda: load._torchvision_weights_file("torchvision:vit_x", weights))
    path = tmp_path / "hub" / "checkpoints" / "vit_x-0123abcd.pth"
    assert asked == [(weights.url, path, 60.0)]
    assert message.startswith("could not download the weights of torchvision:vit_x (OSError: no network in this "
                              f"test). Download {weights.url} where there is network and put it at {path}")


# ------------------------------------------------------------------ second pass (round42, after the first kills)
def test_the_offline_refusal_names_the_host_that_does_not_resolve(tmp_path, monkeypatch):
    import socket

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    asked = []

    def no_dns(host, *args, **kwargs):
        asked.append(host)
        raise socket.gaierror(f"no such host {host}")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    message = _refusal(lambda: qkhooks.load_model("torchvision:vit_b_16"))
    assert asked == ["download.pytorch.org"] and "and download.pytorch.org does not resolve from this machine" in message


def test_a_checkpoint_with_a_torchvision_spec_is_refused_saying_where_its_file_goes():
    assert _refusal(lambda: qkhooks.load_model("torchvision:vit_b_16", checkpoint="w.pth")) == (
        "--checkpoint goes with a timm:NAME architecture; for HF give the folder as hf:DIR; for torchvision put the "
        "weights file in the torch hub cache (torch.hub.get_dir()/checkpoints).")


def test_only_a_torchvision_module_without_an_image_config_is_pointed_at_torchvision_specs():
    message = _refusal(lambda: qkhooks.load_model(nn.Linear(2, 2)))
    assert message.endswith("with your model's values.") and "torchvision" not in message


def test_the_grid_read_off_each_call_is_whole_numbers():
    model = tiny()
    with torch.no_grad(), qkhooks.record(model, modes=2) as run:
        model(images())
    grid = run.geometry(0).grid
    assert grid == (4, 4) and all(type(g) is int for g in grid)


def test_a_multihead_attention_without_biases_records_its_own_weights():
    from test_torchvision_vit import own_weights

    model = tiny()
    model.encoder.layers[1].self_attention = nn.MultiheadAttention(DIM, HEADS, batch_first=True, bias=False)
    want = own_weights(model, images())
    with torch.no_grad(), qkhooks.record(model, attention="full") as run:
        model(images())
    assert float((run.attention(1, "full") - want[1]).abs().max()) < 1e-5


def test_eager_outputs_in_eval_mode_ignore_the_attention_dropout_rate():
    """An eval-mode MultiheadAttention hands multi_head_attention_forward its dropout rate with training=False: no
    dropout runs, so outputs='eager' records it (only training with a rate is refused)."""
    from test_torchvision_vit import own_weights

    model = tiny(attention_dropout=0.3).eval()
    want = own_weights(model, images())
    with torch.no_grad(), qkhooks.record(model, attention="full", outputs="eager") as run:
        model(images())
    assert float((run.attention(1, "full") - want[1]).abs().max()) < 1e-5


@pytest.mark.parametrize("average", [True, False])
def test_eager_outputs_hand_a_caller_asking_for_weights_the_ones_it_asked_for(average):
    from test_torchvision_vit import own_weights

    handed = []
    model = tiny()
    want = own_weights(model, images())[1]
    model = _calling(model, lambda x: ((x, x, x), dict(need_weights=True, average_attn_weights=average)))
    model.encoder.layers[1].self_attention.register_forward_hook(lambda m, a, out: handed.append(out[1]))
    handed.clear()
    with torch.no_grad(), qkhooks.record(model, attention="full", outputs="eager"):
        model(images())
    assert len(handed) == 1
    expected = want.mean(dim=1) if average else want
    assert handed[0].shape == expected.shape and float((handed[0] - expected).abs().max()) < 1e-5


def test_a_global_peak_before_the_last_layer_keeps_the_plain_sentence():
    """The mirror of test_readings_bend_sentences's global minimum: a rise to L10 and a fall at L11 names L10 as the peak of
    all layers, with the last layer's own value."""
    import numpy as np

    from qkhooks.readings import trend_reading

    rng = np.random.default_rng(44)
    x = np.r_[np.linspace(0, 1, 11), 0.5] + 0.25 * rng.standard_normal((48, 12))
    r = trend_reading(x, list(range(12)), "x", "images")
    mean = x.mean(0)
    assert int(np.argmax(mean[1:-1])) + 1 == 10 and mean[0] < mean[10]
    assert f" It peaks at L10 ({mean[10]:.3f}) and falls again to {mean[-1]:.3f} at the last layer" in r.text, r.text


# ------------------------------------------------------------------ third pass (round42's final sample)
def test_an_unknown_weights_tag_is_refused_listing_every_tag():
    assert _refusal(lambda: qkhooks.load_model("torchvision:vit_b_16.FOO", random_init=True)) == (
        "torchvision:vit_b_16.FOO: ViT_B_16_Weights has no weights 'FOO'; it has IMAGENET1K_V1, "
        "IMAGENET1K_SWAG_E2E_V1, IMAGENET1K_SWAG_LINEAR_V1 (e.g. torchvision:vit_b_16.IMAGENET1K_V1).")


@pytest.mark.parametrize("crop, resize", [([32, 28], [36]), ([32], [36, 40])], ids=["crop", "resize"])
def test_a_crop_or_resize_that_is_not_one_side_is_refused_even_when_bilinear(monkeypatch, crop, resize):
    import torchvision

    preprocess = types.SimpleNamespace(interpolation=torchvision.transforms.InterpolationMode.BILINEAR,
                                       crop_size=crop, resize_size=resize, mean=[0.5] * 3, std=[0.5] * 3)
    monkeypatch.setattr(torchvision.models, "get_model_weights", lambda arch: _weights_like(preprocess))
    assert "is not one qkhooks reproduces (a square crop after resizing the shorter side" in _refusal(
        lambda: qkhooks.load_model("torchvision:vit_b_16", random_init=True))


def test_a_download_into_an_existing_cache_folder_is_asked_for(tmp_path, monkeypatch):
    from qkhooks.models import load

    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)  # torchvision's cache holds other weights already
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(load, "_does_not_resolve", lambda host, probe: False)
    asked = []
    monkeypatch.setattr(load, "_download", lambda url, dst, timeout: asked.append(dst) or open(dst, "wb").close())
    path = load._torchvision_weights_file("torchvision:vit_x", _weights_like(None).ONLY)
    assert asked == [path] and path == tmp_path / "hub" / "checkpoints" / "vit_x-0123abcd.pth"


def test_the_sites_grid_is_whole_numbers():
    grid = qkhooks.sites(tiny())[0].grid
    assert grid == (4, 4) and all(type(g) is int for g in grid)


def test_an_attention_called_by_keyword_and_a_block_handed_its_input_by_keyword_record_exactly():
    """The site reads the query (``input_name``) and the block's input (``block_input_name``) by name where a call
    hands them so: here block 1 is called as block(input=x) and its attention as attn(query=, key=, value=), each
    by a pre-hook registered before record() that hands the call on by keyword (a forward replaced on the instance
    is refused: test_torchvision_vit's route tests)."""
    model = _calling(tiny(), lambda x: ((), dict(query=x, key=x, value=x, need_weights=False)))
    model.encoder.layers[1].register_forward_pre_hook(lambda m, a, kw: ((), {**kw, "input": a[0]}) if a else None,
                                                      with_kwargs=True)
    x, seen = images(), {}
    block, attn = model.encoder.layers[1], model.encoder.layers[1].self_attention
    handles = [block.register_forward_pre_hook(lambda m, a, kw: seen.__setitem__("block", kw["input"].clone()),
                                               with_kwargs=True),
               attn.register_forward_pre_hook(lambda m, a, kw: seen.__setitem__("query", kw["query"].clone()),
                                              with_kwargs=True)]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    with torch.no_grad():
        want = attn.forward(seen["query"], seen["query"], seen["query"], need_weights=True,  # its hooks left out
                            average_attn_weights=False)[1]
    with torch.no_grad(), qkhooks.record(model, attention="full") as run:
        model(x)
    assert float((run.attention(1, "full") - want).abs().max()) < 1e-5
    with torch.no_grad(), qkhooks.record(model, modes=2, input="residual", keep_inputs=True) as run:
        model(x)
    assert torch.equal(run.inputs(1), seen["block"]) and not torch.equal(seen["block"], seen["query"])


def test_a_call_that_does_not_fit_the_attentions_signature_is_refused_naming_it():
    model = _calling(tiny(), lambda x: ((x, x, x), dict(colour="red")))
    assert _refusal(lambda: _recorded(model)) == (
        "encoder.layers.encoder_layer_1.self_attention: its call does not fit nn.MultiheadAttention.forward (got an "
        "unexpected keyword argument 'colour').")


def test_a_global_minimum_before_the_last_layer_follows_the_trend_sentence():
    import numpy as np

    from qkhooks.readings import trend_reading

    rng = np.random.default_rng(44)
    x = np.r_[np.linspace(1, 0, 11), 0.5] + 0.25 * rng.standard_normal((48, 12))
    r = trend_reading(x, list(range(12)), "x", "images")
    mean = x.mean(0)
    assert r.text.startswith("x ") and " with depth" in r.text.split(" It is lowest at L10")[0], r.text
    assert f" It is lowest at L10 ({mean[10]:.3f}) and rises again to {mean[-1]:.3f}" in r.text


# ------------------------------------------------------------------ fourth pass (round42's whole set, partly run)
def test_eager_outputs_record_a_training_mode_model_without_attention_dropout():
    """Only dropping weights at random is refused: in training mode with a rate of 0 the maps are the ones used."""
    from test_torchvision_vit import own_weights

    model = tiny().train()  # attention_dropout=0.0, dropout=0.0: training mode changes nothing here
    want = own_weights(model, images())
    with torch.no_grad(), qkhooks.record(model, attention="full", outputs="eager") as run:
        model(images())
    assert float((run.attention(1, "full") - want[1]).abs().max()) < 1e-5


def test_a_weights_file_named_without_a_hash_is_downloaded_unchecked(tmp_path, monkeypatch):
    from qkhooks.models import load

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(load, "_does_not_resolve", lambda host, probe: False)
    asked = []  # _download checks a hash only where the name has one (test_torchvision_vit's local server)
    monkeypatch.setattr(load, "_download", lambda url, dst, timeout: asked.append(dst.name) or open(dst, "wb").close())
    weights = types.SimpleNamespace(url="https://download.pytorch.org/models/plain_name.pth")
    assert load._torchvision_weights_file("torchvision:vit_x", weights).name == "plain_name.pth"
    assert asked == ["plain_name.pth"]


def test_another_attention_mode_runs_multihead_attention_as_called():
    """The base AttentionCallMode (InsideCall's) hands multi_head_attention_forward back untouched: output and weights
    are the module's own, positional and keyword arguments alike."""
    from qkhooks.sdpa import AttentionCallMode

    class Watch(AttentionCallMode):
        def begin(self) -> None:
            pass

    torch.manual_seed(0)
    mha = nn.MultiheadAttention(DIM, HEADS, batch_first=True).eval()
    x = torch.randn(2, 5, DIM)
    class Plain(torch.overrides.TorchFunctionMode):  # any mode sends the module off its fused path: the same path
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with torch.no_grad():
        with Plain():
            want = mha(x, x, x, need_weights=True, average_attn_weights=False)
        mode = Watch(site=None)
        mode.enter()
        try:
            got = mha(x, x, x, need_weights=True, average_attn_weights=False)
        finally:
            mode.leave()
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]) and got[1].shape == (2, HEADS, 5, 5)


def test_a_stem_convolution_padding_by_a_rule_is_named_so_when_masks_need_its_pixels():
    from torchvision.models.vision_transformer import ConvStemConfig

    model = tiny(conv_stem_configs=[ConvStemConfig(out_channels=8, kernel_size=3, stride=2),
                                    ConvStemConfig(out_channels=8, kernel_size=3, stride=4)])
    conv = model.conv_proj.conv_bn_relu_0[0]
    conv.padding = "same"  # a rule torch resolves per call, not the fixed rows and columns qkhooks models
    assert _refusal(qkhooks.sites(model)[0].pixel_convs) == (
        f"torchvision ViT's stem convolution {conv} pads by a rule (padding='same'); which pixels its tokens read is "
        "not modelled, so masks cannot be read onto them. Record this model without masks.")


# ------------------------------------------------------------------ the review fixes' helpers (round42, last pass)
def test_a_file_is_taken_for_safetensors_only_by_its_header_length_and_brace(tmp_path):
    from qkhooks.models.load import _looks_like_safetensors

    def file(data: bytes):
        path = tmp_path / f"f{len(list(tmp_path.iterdir()))}.pth"
        path.write_bytes(data)
        return path

    length = lambda n: n.to_bytes(8, "little")  # noqa: E731
    assert _looks_like_safetensors(file(length(2) + b"{}"))  # the smallest: an empty header, no tensors
    assert _looks_like_safetensors(file(length(12) + b'{"a": "b"}  ' + b"\0" * 4))
    assert not _looks_like_safetensors(file(length(12) + b'{"a": "b"}  '[:11]))  # the header runs past the end
    assert not _looks_like_safetensors(file(length(1) + b"{"))  # no JSON object fits in one byte
    assert not _looks_like_safetensors(file(length(5) + b"X" + b"0" * 20))  # a fitting length, no brace
    assert not _looks_like_safetensors(file(b"PK\x03\x04" + b"\0" * 30))  # torch.save's zip
    assert not _looks_like_safetensors(file(length(2) + b"{"))  # too short to hold its header: 9 bytes of 10


def test_a_bend_needs_an_earlier_layer_strictly_beyond_the_extreme():
    import numpy as np

    from qkhooks.readings import _beyond

    assert _beyond(np.array([0.5, 0.2]), 0.3, 1) and _beyond(np.array([0.1, 0.4]), 0.3, -1)
    assert not _beyond(np.array([0.3, 0.2]), 0.3, 1) and not _beyond(np.array([0.3, 0.4]), 0.3, -1)  # a tie is no fall
    assert not _beyond(np.array([0.5]), 0.6, 1) and not _beyond(np.array([np.nan, 0.1]), 0.3, 1)


def test_a_runs_limit_is_named_by_its_number_or_as_all_the_data():
    from qkhooks.stream import _limit_words

    assert _limit_words(5) == "--limit 5" and _limit_words(0) == "--limit 0"
    assert _limit_words(None) == "no --limit (all the data)"
