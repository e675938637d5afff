"""Review r42 (sci42): a reading's sentence must state what its numbers show.

The trend reading's bend ("lowest at Lj and rises again") picks Lj among the inner layers only; on the bundled
DINOv2-S's same-object share (demo report, 48 displays) it said "It is lowest at L7 (0.290)" while L0 is lower (0.218).
"""

from __future__ import annotations

import re

import numpy as np

from qkhooks.readings import trend_reading

LAYERS = list(range(12))
# the bundled DINOv2-S's same-object share per layer (qkhooks demo, 48 odd-one-out displays)
SAME_OBJECT = np.array([0.218, 0.457, 0.380, 0.368, 0.328, 0.296, 0.358, 0.290, 0.318, 0.296, 0.364, 0.436])


def _named(text: str, word: str) -> tuple[str, int, float] | None:
    found = re.search(r"(It is|it is|It|it) " + word + r" at L(\d+) \(([-+0-9.]+)\)", text)
    return None if found is None else (found.group(1), int(found.group(2)), float(found.group(3)))


def test_a_bend_below_the_first_layer_names_the_inner_layers():
    rng = np.random.default_rng(42)
    x = SAME_OBJECT + 0.05 * rng.standard_normal((48, 12))
    r = trend_reading(x, LAYERS, "The same-object share", "images", limits=(0.0, 1.0))
    mean = x.mean(0)
    assert "last_minus_minimum" in r.estimates, r.text  # the rise from L7 to L11 is clear
    who, layer, value = _named(r.text, "lowest")
    assert layer == int(1 + np.argmin(mean[1:-1])) and value == round(float(mean[layer]), 3)
    assert mean[0] < mean[layer]  # so the sentence must not call L7 the lowest of all layers
    assert who.lower() == "it is" and "Of the inner layers (L1–L10) it is lowest at L7" in r.text, r.text


def test_a_peak_below_the_first_layer_names_the_inner_layers():
    rng = np.random.default_rng(43)
    x = (1 - SAME_OBJECT) + 0.05 * rng.standard_normal((48, 12))  # the mirror: highest at L0, inner peak L7
    r = trend_reading(x, LAYERS, "x", "images", limits=(0.0, 1.0))
    assert "last_minus_maximum" in r.estimates, r.text
    assert "Of the inner layers (L1–L10) it peaks at L7" in r.text and "It peaks" not in r.text, r.text


def test_a_true_global_minimum_keeps_the_plain_sentence():
    """A fall to L10 and back at L11: L10 is the lowest of all layers, said as before."""
    rng = np.random.default_rng(44)
    curve = np.r_[np.linspace(1, 0, 11), 0.5]
    r = trend_reading(curve + 0.25 * rng.standard_normal((48, 12)), LAYERS, "x", "images")
    who, layer, _ = _named(r.text, "lowest")
    assert who == "It is" and layer == 10 and "inner layers" not in r.text, r.text


def test_the_augmented_spectrum_json_says_its_cosines_are_of_the_token_parts(tmp_path, monkeypatch):
    """An augmented spectrum's cosines are between u_n[:d] and v_n[:d], each renormalised (LayerSpectrum.cos):
    u_n·v_n of the stored (d+1)-vectors is another number (up to 1.6 apart on DINOv2-S), so the JSON must say
    which one it lists. Checked against numpy on a tiny model with large biases."""
    import json

    import timm
    import torch

    import qkhooks.cli.spectrum as cli_spectrum
    from qkhooks.cli import main
    from qkhooks.models.load import LoadedModel

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1,
                              embed_dim=32, num_heads=2).eval()
    with torch.no_grad():
        model.blocks[0].attn.qkv.bias.normal_(0, 3.0)
    monkeypatch.setattr(cli_spectrum, "load_from_args",
                        lambda args, for_images=False: LoadedModel(model=model, spec="tiny-biased", image_config=None))
    out = tmp_path / "spec.json"
    assert main(["spectrum", "timm:vit_tiny_patch16_224", "--augmented", "--json", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert "token parts" in payload["biases"]
    w = model.blocks[0].attn.qkv.weight.detach().double().numpy()
    b = model.blocks[0].attn.qkv.bias.detach().double().numpy()
    d, dk = 32, 16
    q, k = np.hstack([w[:dk], b[:dk, None]]), np.hstack([w[d:d + dk], b[d:d + dk, None]])
    U, S, Vt = np.linalg.svd(q.T @ k)
    u, v = U[:d, :dk], Vt[:dk, :d].T
    token_part = (u * v).sum(0) / np.linalg.norm(u, axis=0) / np.linalg.norm(v, axis=0)
    whole = (U[:, :dk] * Vt[:dk].T).sum(0)
    listed = np.array(payload["layers"][0]["heads"][0]["cosine"])
    assert np.allclose(listed, token_part, atol=1e-5) and not np.allclose(listed, whole, atol=1e-2)
