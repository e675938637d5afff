"""Round 22, the newcomer path: what a user can easily get wrong is answered with the fix, not a raw traceback, and
the help and README say what the code does."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

import qkhooks
from qkhooks.analysis.bfd import format_table
from qkhooks.cli import _load_commands, build_parser, main
from qkhooks.errors import QKHooksError
from qkhooks.store import open_run
from qkhooks.stream import record_dataset

README = Path(__file__).resolve().parents[1] / "README.md"


def tiny_vit() -> qkhooks.LoadedModel:
    """A 2-block ViT at 224 px (7 x 7 patches of 32 px, 4 heads of 8 dimensions)."""
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, patch_size=32, embed_dim=32, depth=2,
                              num_heads=4).eval()
    return qkhooks.load_model(model)


@pytest.fixture(scope="module")
def run_path(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ux") / "run.h5"
    record_dataset(tiny_vit(), "samples", out, modes=4, layers="0,1", limit=3, batch_size=3, progress=False,
                   dtype="float32")
    return out


# ------------------------------------------------------------------------------------------ 1: states
def test_an_unknown_state_is_refused_naming_the_states(run_path):
    with open_run(run_path) as run:
        have = run.states()
        assert "topk_modes" in have
        with pytest.raises(QKHooksError) as err:
            run.state("topk")  # the typo of the review: was None, then AttributeError in from_state
        assert "'topk'" in str(err.value) and all(name in str(err.value) for name in have)
        assert run.state("topk", default=None) is None
        assert run.state("topk_modes")["index"].shape == run.state("reducers/topk_modes")["index"].shape


def test_from_state_of_none_says_what_it_needs():
    with pytest.raises(QKHooksError, match=r"run\.state\(name\).*not NoneType"):
        qkhooks.Reducer.from_state(None)


# ------------------------------------------------------------------------------------------ 2: indices
def test_an_integer_past_an_axis_names_the_axis_and_its_size(run_path):
    with open_run(run_path) as run:
        query = run.query(1)
        n, heads, modes, tokens = query.shape
        assert (heads, modes, tokens) == (4, 4, 50)
        everything = np.asarray(query[:])
        for key, axis, name, size in [((0, 5), 1, "heads", heads), ((0, 0, -5), 2, "modes", modes),
                                      ((Ellipsis, 50), 3, "tokens", tokens), ((slice(None), 0, 9), 2, "modes", modes)]:
            with pytest.raises(IndexError) as ours:
                query[key]
            with pytest.raises(IndexError) as numpy_says:
                everything[key]
            assert f"index {key[-1]} is out of bounds for axis {axis} with size {size}" in str(numpy_says.value)
            assert f"index {key[-1]} is out of bounds for axis {axis} ({name}) with size {size}" in str(ours.value)
        np.testing.assert_array_equal(query[0, -1, ..., 49], everything[0, -1, ..., 49])  # in range: read as numpy
        with pytest.raises(IndexError, match=r"image 3 is out of range for a run of 3 images"):
            query[3, 0]


# ------------------------------------------------------------------------------------------ 3: spectrum
def test_spectrum_takes_a_model_spec_as_the_command_line_does():
    spec = qkhooks.spectrum("timm:vit_tiny_patch16_224@random", layers="blocks.3.attn")
    loaded = qkhooks.load_model("timm:vit_tiny_patch16_224@random")
    site = qkhooks.sites(loaded.model)[3]
    weight = site.module.qkv.weight.detach().double().numpy()
    d_k = site.head_dim
    wq, wk = weight[:d_k], weight[192:192 + d_k]  # head 0 of the fused qkv
    dense = np.linalg.svd(wq.T @ wk, compute_uv=False)[:d_k]
    assert [l.layer for l in spec.layers] == [3] and "timm:vit_tiny_patch16_224@random" in spec.table()
    np.testing.assert_allclose(np.asarray(spec.layers[0].S[0], dtype=np.float64), dense, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------ 4: query tokens, masks
def test_batch_metadata_given_to_record_names_the_way_to_hand_it():
    model = tiny_vit().model
    with pytest.raises(QKHooksError, match=r"run\(images, meta=\{'query_tokens': tokens\}\).*set_batch"):
        qkhooks.record(model, query_tokens=torch.zeros(1, 1, dtype=torch.long))
    with pytest.raises(QKHooksError, match=r"pool_masks.*run\(images, meta=\{'pool_masks': masks\}\)"):
        with qkhooks.record(model, layers=[1], attention="pooled") as run, torch.no_grad():
            run(torch.randn(1, 3, 224, 224))


def test_readme_says_how_to_choose_query_tokens():
    text = README.read_text()
    assert "**Choosing query tokens and pooled masks.**" in text
    assert 'meta={"query_tokens": picked, "pool_masks": halves}' in text  # the snippet test_readme runs


# ------------------------------------------------------------------------------------------ 5: module paths
def test_attention_layers_take_module_paths_as_layers_does(tmp_path):
    loaded = tiny_vit()
    images = torch.randn(1, 3, 224, 224)
    with qkhooks.record(loaded.model, layers="blocks.1.attn", attention="full:blocks.1.attn", modes=None) as run, \
            torch.no_grad():
        run(images)
    assert run.attention_layers("full") == [1]
    maps = run.attention(1, "full")
    with qkhooks.record(loaded.model, layers=[1], attention="full:1", modes=None) as by_index, torch.no_grad():
        by_index(images)
    torch.testing.assert_close(maps, by_index.attention(1, "full"), rtol=0, atol=0)
    out = tmp_path / "paths.h5"
    record_dataset(loaded, "samples", out, modes=None, layers="blocks.1.attn", attention="full:blocks.1.attn",
                   limit=1, batch_size=1, reducers=[], progress=False)
    with open_run(out) as stored:
        assert stored.attention_layers("full") == [1] and stored.config["attention"] == [{"kind": "full", "layers": [1]}]


def test_attention_layers_count_negative_indices_from_the_last_block_as_layers_does():
    """FUZZ-REC: ``layers=[-1]`` is the last block, but ``attention="full:-1"`` was refused: "asks for layers [-1], which
    this recording does not hook (recorded layers: [0, 1])", though it hooks the last block. The maps now equal the
    model's own eager softmax of its last block."""
    model = tiny_vit().model
    images = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    last = len(model.blocks) - 1
    with qkhooks.record(model, layers=[-1], attention="full:-1", modes=None) as run, torch.no_grad():
        run(images)
    assert run.attention_layers("full") == [last] and list(run.config["attention"][0]["layers"]) == [last]
    eager: list[torch.Tensor] = []
    attn = model.blocks[last].attn
    handle = attn.attn_drop.register_forward_pre_hook(lambda m, a: eager.append(a[0].clone()))
    fused, attn.fused_attn = attn.fused_attn, False
    try:
        with torch.no_grad():
            model(images)
    finally:
        attn.fused_attn = fused
        handle.remove()
    torch.testing.assert_close(run.attention(last, "full"), eager[0], rtol=0, atol=1e-6)
    with pytest.raises(QKHooksError, match=r"layer -9 does not exist: this model has blocks 0\.\.1"):
        qkhooks.record(model, attention="full:-9", modes=None)
    with qkhooks.record(model, layers=[1], attention="full:1", sites=qkhooks.sites(model)[1:]) as given:
        assert [spec.layers for spec in given.attention_specs] == [(1,)]  # an index among a selection stays as given


def test_bfd_takes_module_paths():
    from qkhooks.analysis.bfd import run_bfd

    loaded = tiny_vit()
    images = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    by_path = run_bfd(loaded.model, images, None, layers="blocks.1.attn", decode=False)
    by_index = run_bfd(loaded.model, images, None, layers="1", decode=False)
    assert [l["layer"] for l in by_path["layers"]] == [1]
    np.testing.assert_array_equal(*(np.array([r["layers"][0]["energy"][t] for t in ("CC", "CP", "PC", "PP")])
                                    for r in (by_path, by_index)))


# ------------------------------------------------------------------------------------------ 6, 8: BFD words
def bfd_result(held: int) -> dict:
    """A BFD result as ``summarize`` writes it, one layer of one head, its probes tested on ``held`` images."""
    energy = {t: 0.25 for t in ("CC", "CP", "PC", "PP")}
    decoding = {"holdout_images": held, "X": {"mean": 0.5}, "P": {"mean": 0.5}, "C": {"mean": 0.1}}
    return {"model": "m", "images": 5 * held, "definition": "frobenius",
            "layers": [{"layer": 2, "energy": energy, "position_variance_share": 0.1, "coupling": 0.5,
                        "interference": 0.0, "global_mean_share": 0.1, "decoding": decoding,
                        "heads": [{"head": h, "coupling": 0.5} for h in range(3)]}]}


def test_bfd_table_says_when_its_probes_are_not_to_be_read():
    assert "1 held-out image, fewer than 8: not to be read" in format_table(bfd_result(1))
    assert "held-out" not in format_table(bfd_result(8))


def test_a_head_not_in_the_result_lists_the_heads():
    from qkhooks.analysis.bfd import _pick_head

    with pytest.raises(QKHooksError, match=r"head L2 H7 is not in this result; pick a recorded layer and head \(L2: H0-2\)"):
        _pick_head(bfd_result(8), (2, 7))
    assert _pick_head(bfd_result(8), (2, 1))[1]["head"] == 1


def test_analyze_modes_of_a_bfd_run_says_it_is_one():
    from qkhooks.analysis.modes import _no_modes

    class BfdRun:
        config = {"modes": None, "extra": {"bfd": {"decode": True}}, "reducers": ["bfd_energies"]}

    with pytest.raises(QKHooksError, match=r"b\.h5 is a BFD run, written by `qkhooks bfd`.*`qkhooks analyze bfd b\.h5`"):
        _no_modes(BfdRun(), "b.h5")


# ------------------------------------------------------------------------------------------ 7: help
def parsers(parser: argparse.ArgumentParser, name: str = "qkhooks"):
    """Every parser of the command line, by its command words."""
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for word, sub in action.choices.items():
                yield from parsers(sub, f"{name} {word}")


def test_every_option_with_a_default_shows_it_in_its_help():
    _load_commands()
    seen = 0
    for name, parser in parsers(build_parser()):
        formatter = parser._get_formatter()
        for action in parser._actions:  # an option with a default to state: not None, not a flag's False, shown
            if (not action.option_strings or action.nargs == 0 or action.help is argparse.SUPPRESS
                    or action.default in (None, argparse.SUPPRESS)):
                continue
            seen += 1
            text = formatter._expand_help(action)
            assert "default" in text and str(action.default) in text, (name, action.option_strings, text)
    assert seen > 40  # record, bfd, demo, bench, analyze ... all walked


def test_help_states_bfd_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["bfd", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag, default in [("--batch-size BATCH_SIZE", "16"), ("--holdout-every HOLDOUT_EVERY", "5"),
                          ("--alpha ALPHA", "0.001"), ("--device DEVICE", "cpu")]:
        assert re.search(re.escape(flag) + r" [^-]*\(default: " + re.escape(default) + r"\)", text), flag


# ------------------------------------------------------------------------------------------ 9, 10: README
def test_readme_dinov2_curve_names_every_layer():
    text = " ".join(README.read_text().split())
    assert "0.62–0.66 at L0–L1, 0.45 at L2, 0.12–0.23 from L3 to L10, 0.37 at L11" in text


def test_joined_data_specs_are_documented_and_open():
    from qkhooks.data import open_dataset
    from qkhooks.data.preprocess import ImageConfig

    assert "joined with `+` (`voc+arc2017+o3:24:7`" in " ".join(README.read_text().split())
    _load_commands()
    record = dict(parsers(build_parser()))["qkhooks record"]
    assert "voc+arc2017+o3:24:7" in next(a.help for a in record._actions if a.dest == "data")
    config = ImageConfig(size=(64, 64), mean=(0.5,) * 3, std=(0.5,) * 3)
    joined = open_dataset("voc+o3:2:7", config)
    assert joined.ids == open_dataset("voc", config).ids + open_dataset("o3:2:7", config).ids


def test_sites_takes_a_loaded_model_and_refuses_a_spec_string_by_name():
    loaded = tiny_vit()
    paths = [s.path for s in qkhooks.sites(loaded.model)]
    assert paths and [s.path for s in qkhooks.sites(loaded)] == paths
    with pytest.raises(QKHooksError, match="got str; load one with qkhooks.load_model"):
        qkhooks.sites("timm:vit_tiny_patch16_224@random")
