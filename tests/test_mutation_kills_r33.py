"""Kill tests for the mutants of round 32's later library code, the review fixes (``fcb421f..ebe8fa2``: the per-batch
weights check of live views, a given spectrum checked against the weights, maps under autocast in float32, an unknown
HF attention function and an ignored timm scale refused, HF processors read as their class reads them and HF's centre
crop, a dataset of another preprocessing refused, tRNS, truncated and animated images, symlinked subfolders,
``Recipe.reducers`` of a builtin, the writer's overflow check by ``reducers.overflows``) that their tests let survive
(module "round33" of tests/mutation.py, ``--only ROUND33``; tests/MUTATION.md's "round 33" section names each); and
the harness's round33 module kept consistent."""

from __future__ import annotations

import dataclasses
import io
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image, ImageFile

import qkhooks
from qkhooks.data import ImageConfig, open_dataset
from qkhooks.data.display import to_rgb
from qkhooks.errors import QKHooksError

from test_mutation_kills_r26 import check_round_module


# ------------------------------------------------------------------------------------ tests/mutation.py: round33
def test_the_round33_module_names_files_and_tests_that_exist_and_round_32s_later_commits():
    """The harness's module "round33" and its named set ROUND33: every file to mutate and every test file exists, the
    selection names only test files it selects, the commit range resolves in this checkout to the 5 library commits
    of ``fcb421f..ebe8fa2``, and every library file they changed is mutated."""
    check_round_module("round33", "ROUND33", "fcb421f", "ebe8fa2", library_commits=5)


# ------------------------------------------------------------------ helpers
from test_capture_weights_and_spectra import _images, _vit  # noqa: E402  (a 2-layer timm ViT of 32 px images: 4 heads of d_k = 8)


_OTHER_WEIGHTS = (r". It belongs to other weights \(a checkpoint before a training step, another model\), so its maps "
                  r"would be projections on another model's modes\. Pass qkhooks\.spectrum\(model\) of these weights, "
                  r"or leave spectrum= out: record\(\) takes it from a cache that computes it once per set of weights; "
                  r"to project on other weights' modes on purpose, add spectrum_of_other_weights=True\.$")


def _refusal(layer: int, why: str) -> str:
    return (rf"^layer {layer} \(blocks\.{layer}\.attn\): the spectrum given \(spectrum=\) is not that of this layer's "
            rf"weights: {why}{_OTHER_WEIGHTS}")


# ------------------------------------------------------------------ a given spectrum checked against the weights
def test_a_spectrum_of_another_head_layout_is_refused_naming_both_shapes_in_the_whole_sentence():
    """foreign_spectrum's shape check (``_22``: V's shape dropped, ``_23``: the heads read off d_k): the sentence names
    the spectrum's U, S, V shapes and the layer's heads and width."""
    model = _vit()
    torch.manual_seed(0)
    two_heads = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                                  depth=2, num_heads=2, num_classes=0).eval()
    why = r"its U \(2, 32, 16\), S \(2, 16\), V \(2, 32, 16\) do not fit the layer's 4 heads of d=32"
    with pytest.raises(QKHooksError, match=_refusal(0, why)):
        qkhooks.record(model, modes=4, spectrum=qkhooks.spectrum(two_heads))


def test_a_given_spectrum_is_held_to_each_heads_own_largest_sigma_not_the_layers():
    """The diag(S) residual is relative to each head's largest sigma (``_30``: the layer's largest, which let a head
    of small weights be 1 % off unseen). Head 0's W_q made 1000x smaller; its sigmas given 1 % too large."""
    model = _vit()
    with torch.no_grad():
        model.blocks[0].attn.qkv.weight[0:8] *= 1e-3  # head 0's W_q rows
    own = qkhooks.spectrum(_copy(model)).layers  # computed apart from the cache: checked, not vouched for
    S = torch.as_tensor(own[0].S).clone()
    assert float(S[0].max()) < 1e-2 * float(S[1:].max())  # head 0's sigmas far below the others'
    S[0] *= 1.01
    wrong = dataclasses.replace(own[0], S=S)
    why = r"U\^T \(W_q\^T W_k\) V differs from diag\(S\) by (?P<off>[0-9.e-]+) of the head's largest sigma"
    with pytest.raises(QKHooksError, match=_refusal(0, why)) as refused:
        qkhooks.record(model, modes="all", spectrum=[wrong, own[1]])
    assert float(re.match(_refusal(0, why), str(refused.value))["off"]) == pytest.approx(0.01, rel=0.02)  # 1 %
    qkhooks.record(model, modes="all", spectrum=list(own))  # the right ones: taken


def test_a_truncated_spectrum_whose_leading_sigmas_are_not_its_S_is_refused_at_any_scale_of_the_weights():
    """S_all's leading K values must be S (``_127``: the difference multiplied by the head's sigma, not divided, which
    weights of small sigmas let pass; ``_130``: S_all cut at the heads' count, not at K). S_all reversed keeps the
    sum of squares (||M||_F^2), so only the leading values tell; K = 3 modes of 4 heads."""
    model = _vit()
    with torch.no_grad():
        model.blocks[0].attn.qkv.weight.mul_(0.1)  # sigmas ~2e-4
    whole = qkhooks.spectrum(_copy(model)).layers
    tops = [layer.top(3) for layer in whole]
    with torch.no_grad(), qkhooks.record(model, modes=3, spectrum=tops) as run:  # the right ones: taken
        run(_images())
        assert torch.equal(torch.as_tensor(run.spectrum(0).S), torch.as_tensor(tops[0].S))
    reversed_all = dataclasses.replace(tops[0], S_all=torch.as_tensor(tops[0].S_all).flip(-1))
    with pytest.raises(QKHooksError, match=_refusal(0, r"its sigmas \(S_all\) are not those of W_q\^T W_k")):
        qkhooks.record(model, modes=3, spectrum=[reversed_all, tops[1]])


def test_the_caches_own_spectrum_handed_back_is_not_checked_again_and_one_computed_apart_is_checked_per_layer(
        monkeypatch):
    """``is_cached_spectrum`` (``_1``, ``_9``: never the cache's): qkhooks.spectrum(model) handed back to record()
    costs no other check; the same values computed apart (another model object) are checked once a layer."""
    import qkhooks.capture as capture

    checked = []
    real = capture.foreign_spectrum
    monkeypatch.setattr(capture, "foreign_spectrum", lambda site, spec: checked.append(site.layer) or real(site, spec))
    model = _vit()
    qkhooks.record(model, modes=4, spectrum=qkhooks.spectrum(model))
    assert checked == []
    qkhooks.record(model, modes=4, spectrum=qkhooks.spectrum(_vit()))
    assert checked == [0, 1]


def _copy(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(model)


# ------------------------------------------------------------------ to_rgb: animated and truncated images
def test_a_still_image_gives_no_warning_and_an_animated_one_warns_in_the_whole_sentence_naming_its_file(tmp_path):
    """``to_rgb`` ``_32`` (every image warned as animated), ``_38`` / ``_48`` (the name or its stand-in), ``_54``."""
    still = Image.new("RGB", (4, 3), (1, 2, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.asarray(to_rgb(still)).tolist() == np.asarray(still).tolist()
        path = tmp_path / "still.png"
        still.save(path)
        with Image.open(path) as opened:
            to_rgb(opened)
    frames = [Image.new("RGB", (4, 3), c) for c in ((200, 10, 10), (10, 200, 10), (10, 10, 200))]
    path = tmp_path / "moving.png"
    frames[0].save(path, "PNG", save_all=True, append_images=frames[1:])
    tail = (r" has 3 frames; its first frame is recorded \(as timm and Hugging Face read it\); save the frame you mean "
            r"as a still image to record another\.$")
    with Image.open(path) as opened, pytest.warns(UserWarning, match="^" + re.escape(str(path)) + tail):
        np.testing.assert_array_equal(np.asarray(to_rgb(opened)), np.asarray(frames[0]))
    buffer = io.BytesIO(path.read_bytes())
    with Image.open(buffer) as opened, pytest.warns(UserWarning, match="^an image" + tail):
        to_rgb(opened)


@pytest.mark.skipif("MUTANT_UNDER_TEST" in __import__("os").environ,
                    reason="inside mutmut its trampolines are the callers, so no warning can point at this file")
def test_the_animated_image_and_symlinked_folder_warnings_point_at_the_callers_line(tmp_path):
    """``to_rgb`` ``_55`` (``stacklevel=3``) and ``list_images`` ``_50`` (``stacklevel=5``): each warning names the
    line that called ``to_rgb`` or ``open_dataset``, where the fix belongs."""
    import inspect

    frames = [Image.new("RGB", (4, 3), c) for c in ((200, 10, 10), (10, 200, 10))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "PNG", save_all=True, append_images=frames[1:])
    buffer.seek(0)
    with Image.open(buffer) as opened, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = inspect.currentframe().f_lineno + 1
        to_rgb(opened)
    assert [(Path(w.filename).name, w.lineno) for w in caught] == [(Path(__file__).name, line)]
    (tmp_path / "photos").mkdir()
    Image.new("RGB", (40, 50)).save(tmp_path / "photos" / "a.png")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "photos" / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    config = ImageConfig(size=(32, 32), mean=(0.5,) * 3, std=(0.5,) * 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = inspect.currentframe().f_lineno + 1
        open_dataset(str(tmp_path / "photos"), config)
    assert [(Path(w.filename).name, w.lineno) for w in caught] == [(Path(__file__).name, line)]


def test_loading_truncated_images_is_refused_in_the_whole_sentence(tmp_path, monkeypatch):
    """``to_rgb`` ``_19``, ``_21``: the refusal's middle and fix, word for word."""
    path = tmp_path / "photo.png"
    Image.new("RGB", (4, 3)).save(path)
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    sentence = ("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True in this process (set by your code or a library), so a "
                "truncated photo would be decoded with its missing rows filled grey and recorded without a word, where "
                "qkhooks skips it naming it; set PIL.ImageFile.LOAD_TRUNCATED_IMAGES = False while recording.")
    with Image.open(path) as opened, pytest.raises(QKHooksError, match="^" + re.escape(sentence) + "$"):
        to_rgb(opened)
    assert np.asarray(to_rgb(Image.new("RGB", (4, 3), (5, 6, 7)))).tolist() == [[[5, 6, 7]] * 4] * 3  # no file: read


# ------------------------------------------------------------------ HF processor configs read as their class reads them
_PLAIN = {"size": {"height": 32, "width": 48}, "resample": 2, "do_normalize": True, "image_mean": [0.5, 0.4, 0.3],
          "image_std": [0.2, 0.25, 0.3]}  # names no class, says what matters


def test_a_config_naming_no_class_needs_no_statistics_where_it_does_not_normalise_and_is_read_as_it_says():
    """``_as_its_class_reads_it`` ``_23``, ``_25``-``_27`` (which keys a classless config must give: the statistics only
    where it normalises), ``from_hf`` ``_187``, ``_198``, ``_200`` (no ``do_rescale`` or ``rescale_factor``: 1/255)."""
    config = ImageConfig.from_hf(dict(_PLAIN))
    assert (config.size, config.mean, config.std, config.interpolation, config.crop) == (
        (32, 48), (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), "bilinear", "hf")
    bare = ImageConfig.from_hf({"size": {"height": 32, "width": 48}, "resample": 3, "do_normalize": False})
    assert (bare.mean, bare.std, bare.interpolation) == ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "bicubic")
    sentence = ("the processor config names no class (image_processor_type) and leaves out {}, whose defaults differ "
                "from class to class; pass processor.to_dict() of the loaded processor, add image_processor_type, or "
                "build ImageConfig(...) by hand.")
    for config, missing in (({"size": 32, "do_normalize": False}, "resample"),
                            ({"size": 32, "resample": 2, "do_normalize": True}, "image_mean, image_std"),
                            ({"size": 32, "resample": 2, "image_std": [1, 1, 1]}, "do_normalize, image_mean")):
        with pytest.raises(QKHooksError, match="^" + re.escape(sentence.format(missing)) + "$"):
            ImageConfig.from_hf(config)


def test_a_config_naming_a_class_this_transformers_lacks_is_refused_in_the_whole_sentence():
    """``_as_its_class_reads_it`` ``_20``: the refusal's fix, word for word."""
    sentence = ("the processor config names the class 'NoSuchImageProcessor', which this transformers does not know "
                "(AttributeError), so its defaults and rules cannot be read; upgrade transformers, or build "
                "ImageConfig(...) by hand.")
    with pytest.raises(QKHooksError, match="^" + re.escape(sentence) + "$"):
        ImageConfig.from_hf({**_PLAIN, "image_processor_type": "NoSuchImageProcessor"})


def test_processor_settings_imageconfig_does_not_model_are_refused_in_the_whole_sentence():
    """``_as_its_class_reads_it`` ``_52``-``_56``: the refusal of unmodelled keys, word for word, naming each set."""
    sentence = ("the processor config sets do_pad=True, size_divisor=32, which ImageConfig does not model (channel "
                "order, aspect-keeping resizes, crop percentages, padding): the pixels would differ from the "
                "processor's; build ImageConfig(...) by hand where it can express them.")
    with pytest.raises(QKHooksError, match="^" + re.escape(sentence) + "$"):
        ImageConfig.from_hf({**_PLAIN, "do_pad": True, "size_divisor": 32})
    neutral = {"do_pad": False, "size_divisor": None, "ensure_multiple_of": 1, "do_flip_channel_order": False}
    assert ImageConfig.from_hf({**_PLAIN, **neutral}) == ImageConfig.from_hf(dict(_PLAIN))


def test_a_rescale_other_than_1_255_is_refused_in_the_whole_sentence_stating_both_settings():
    """``from_hf`` ``_213``, ``_217``, ``_222``: the refusal names do_rescale (True where the config leaves it out) and
    the factor, and says what qkhooks does."""
    sentence = ("processor do_rescale={}, rescale_factor={}: qkhooks scales pixels by 1/255 before normalising; build "
                "ImageConfig(...) by hand for another scale.")
    for extra, shown in (({"rescale_factor": 1 / 127.5}, ("True", repr(1 / 127.5))),
                         ({"do_rescale": False}, ("False", "None")),
                         ({"do_rescale": True, "rescale_factor": 1.0}, ("True", "1.0"))):
        with pytest.raises(QKHooksError, match="^" + re.escape(sentence.format(*shown)) + "$"):
            ImageConfig.from_hf({**_PLAIN, **extra})
    assert ImageConfig.from_hf({**_PLAIN, "do_rescale": True, "rescale_factor": 1 / 255}) == ImageConfig.from_hf(
        dict(_PLAIN))


def test_a_config_whose_statistics_are_not_three_numbers_is_refused_naming_which():
    """``from_hf`` ``_164``: the statistic's name in the refusal."""
    for key in ("image_mean", "image_std"):
        with pytest.raises(QKHooksError, match=rf"^{key} must be three numbers \(R, G, B\), got \[0\.5, 0\.5\]\.$"):
            ImageConfig.from_hf({**_PLAIN, key: [0.5, 0.5]})


# ------------------------------------------------------------------ the q/k path of separate q and k Linears
def _hf_vit():
    import transformers

    torch.manual_seed(0)
    return transformers.ViTModel(transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                        intermediate_size=64, image_size=32, patch_size=8)).eval()


def test_an_hf_vits_maps_from_its_separate_q_and_k_linears_are_the_tokens_projections_on_the_modes():
    """``QKPathProjector._split`` (``_9``, ``_13``, ``_17``, ``_20``: the wrong heads or side): the query and key maps
    taken from q_proj's and k_proj's outputs equal x·u_n and x·v_n of the tokens entering each layer's attention
    (its layernorm_before output), in float64, layer by layer."""
    model = _hf_vit()
    seen = []
    hooks = [layer.layernorm_before.register_forward_hook(lambda m, a, o: seen.append(o.detach().clone()))
             for layer in model.layers]
    with torch.no_grad(), qkhooks.record(model, modes=4) as run:
        run(_images())
    for h in hooks:
        h.remove()
    assert all(type(run._from_qk[layer]).__name__ == "QKPathProjector" for layer in (0, 1))  # the q/k path taken
    for layer in (0, 1):
        spectrum = run.spectrum(layer)
        u, v = torch.as_tensor(spectrum.U).double(), torch.as_tensor(spectrum.V).double()
        assert run.query(layer).shape == (2, 4, 4, 17)
        assert torch.allclose(run.query(layer).double(), torch.einsum("bnd,hdk->bhkn", seen[layer].double(), u),
                              atol=1e-5)
        assert torch.allclose(run.key(layer).double(), torch.einsum("bnd,hdk->bhkn", seen[layer].double(), v),
                              atol=1e-5)


# ------------------------------------------------------------------ scales the model computes with
def test_a_talking_heads_scale_set_before_record_is_the_one_its_maps_are_rebuilt_with():
    """``_refuse_unread_scale`` ``_22`` / ``_25`` (a module without ``fused_attn`` read as fused): CaiT's talking-heads
    attention has no fused path and computes with its ``scale`` whatever it is, so a scale set before record() is
    taken, and the recorded maps are the model's own (its attn_drop input)."""
    torch.manual_seed(0)
    model = timm.create_model("cait_xxs24_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=2,
                              num_heads=4, depth_token_only=1, num_classes=0).eval()
    attn = model.blocks[0].attn
    assert type(attn).__name__ == "TalkingHeadAttn" and not hasattr(attn, "fused_attn")
    attn.scale = 0.05
    seen = {}
    handle = attn.attn_drop.register_forward_hook(lambda m, a, o: seen.__setitem__("maps", a[0].detach().clone()))
    with torch.no_grad(), qkhooks.record(model, modes=None, attention="full", layers=[0]) as run:
        run(_images())
    handle.remove()
    assert run.sites[0].scale == 0.05
    assert torch.allclose(run.attention(0, "full"), seen["maps"], atol=1e-6)


def test_an_unknown_hf_attention_function_is_refused_in_the_whole_sentence():
    """``_refuse_unknown_attention_function`` ``_31``: the refusal's last words (how to pick a known function)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    AttentionInterface.register("qkhooks_test_r33", sdpa_attention_forward)
    model = _hf_vit()
    model.set_attn_implementation("qkhooks_test_r33")
    sentence = ("unsupported attention in 'layers.0.attention' (ViTAttention): its config's _attn_implementation is "
                "'qkhooks_test_r33', an attention function qkhooks does not know (registered with AttentionInterface, "
                "or a hub kernel): it may compute other than softmax(scaling·q·kᵀ + mask), which the recorded maps "
                "rebuild. Record with one of eager, flash_attention_2, flash_attention_3, flex_attention, sdpa "
                "(model.set_attn_implementation('sdpa')).")
    with pytest.raises(QKHooksError, match="^" + re.escape(sentence) + "$"):
        qkhooks.record(model, modes=None, attention="full")


# ------------------------------------------------------------------ the x path of an augmented spectrum
def _norm1_tokens(model, x) -> list[torch.Tensor]:
    """The tokens entering each block's attention (its norm1 output), as the model computes them."""
    seen = []
    hooks = [b.norm1.register_forward_hook(lambda m, a, o: seen.append(o.detach().clone())) for b in model.blocks]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("autocast", [False, True])
def test_an_augmented_spectrums_maps_from_x_are_the_tokens_with_a_constant_one_on_the_modes(autocast):
    """``ModeProjector.__call__`` ``_11`` (the bias row left out), ``_20`` (addmm without the tokens): with
    ``augmented=True`` the x path's maps are [x; 1]·u_n and [x; 1]·v_n (float64 reference), under a caller's CPU
    autocast too (maps in float32)."""
    model = _vit()
    with torch.no_grad():
        for block in model.blocks:  # timm initialises the biases to 0: give the constant coordinate a weight
            block.attn.qkv.bias.copy_(torch.randn(block.attn.qkv.bias.shape, generator=torch.Generator().manual_seed(1)))
    x = _images()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        tokens = _norm1_tokens(model, x)
        with torch.no_grad(), qkhooks.record(model, modes=4, augmented=True, qk_path=False) as run:
            run(x)
    for layer in (0, 1):
        spectrum = run.spectrum(layer)
        assert spectrum.augmented and run.query(layer).dtype == torch.float32
        ones = torch.cat([tokens[layer].double(), torch.ones_like(tokens[layer][..., :1]).double()], -1)
        u, v = torch.as_tensor(spectrum.U).double(), torch.as_tensor(spectrum.V).double()
        assert (run.query(layer).double() - torch.einsum("bnd,hdk->bhkn", ones, u)).abs().max() < 1e-4
        assert (run.key(layer).double() - torch.einsum("bnd,hdk->bhkn", ones, v)).abs().max() < 1e-4
        assert float(u[:, -1].abs().max()) > 1e-2  # the constant coordinate weighs
