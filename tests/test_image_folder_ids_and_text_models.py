"""Round 40, helper FIX2: items found by review USER (a first-time researcher's run through README).

Each test here failed on the code before."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import qkhooks
from qkhooks import QKHooksError
from qkhooks.store import format as fmt
from test_review_symlinks_repair_messages import _KW, _interrupted
from test_spectrum_edits_and_dataparallel import _same_size_photos, _tiny_loaded
from test_file_stamps import _reference, _replace_with_same_size, _stored

# ---------------------------------------------------------------------------------------------- 1. ImageFolder ids


def _image_folder(tmp_path, transform=None):
    torchvision = pytest.importorskip("torchvision")
    root = tmp_path / "ifold"
    root.mkdir()
    _same_size_photos(root / "cat", ["c0.png", "c1.png"], seed=0)
    _same_size_photos(root / "dog", ["d0.png", "d1.png", "d2.png"], seed=1)
    return root, torchvision.datasets.ImageFolder(str(root), transform=transform)


def test_an_image_folder_is_recorded_by_its_files_relative_paths_with_their_stamps(tmp_path):
    """Before: a torchvision ImageFolder's images were recorded as '0', '1', ... and stored no file stamps."""
    root, ds = _image_folder(tmp_path)
    qkhooks.record_dataset(_tiny_loaded(), ds, tmp_path / "run.h5", **_KW)
    names = ["cat/c0.png", "cat/c1.png", "dog/d0.png", "dog/d1.png", "dog/d2.png"]
    with qkhooks.open_run(tmp_path / "run.h5") as run:
        assert list(run.ids) == names
    assert _stored(tmp_path / "run.h5") == _reference([root / n for n in names])


def test_an_image_folder_with_its_own_transform_keeps_its_pixels_and_gets_the_ids(tmp_path):
    """The dataset's own transform still makes the pixels (as before); only the ids and stamps are new. The
    reference: the same images given as a list of the transform's outputs (which has position ids)."""
    import numpy as np
    from PIL import ImageOps

    root, ds = _image_folder(tmp_path, transform=ImageOps.mirror)
    loaded = _tiny_loaded()
    qkhooks.record_dataset(loaded, ds, tmp_path / "run.h5", **_KW)
    qkhooks.record_dataset(loaded, [ds[i][0] for i in range(len(ds))], tmp_path / "ref.h5", **_KW)
    with qkhooks.open_run(tmp_path / "run.h5") as run, qkhooks.open_run(tmp_path / "ref.h5") as ref:
        assert list(run.ids)[0] == "cat/c0.png" and list(ref.ids)[0] == "0"
        maps = [name for name in run.arrays() if name.startswith("modes/")]
        assert maps
        for name in maps:
            assert np.array_equal(np.asarray(run.array(name)[:]), np.asarray(ref.array(name)[:])), name


def test_an_image_folder_resume_over_a_replaced_kept_photo_is_refused_naming_it(tmp_path):
    """Before: an ImageFolder resumed with a warning that its kept files were not checked."""
    root, ds = _image_folder(tmp_path)
    loaded, run = _tiny_loaded(), tmp_path / "run.h5"
    _interrupted(loaded, run, batches=2, data=ds)
    _replace_with_same_size(root / "cat" / "c1.png", seed=7)
    with pytest.raises(QKHooksError, match=r"modified since it recorded them \(first: 'cat/c1\.png'"):
        qkhooks.record_dataset(loaded, ds, run, resume=True, **_KW)


# ---------------------------------------------------------------------------------------------- 2. text models


def _tiny_bert(folder=None):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=32)
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    if folder is not None:
        model.save_pretrained(folder)
    return model


@pytest.mark.parametrize("given", ["module", "folder"])
def test_a_text_model_is_refused_for_an_image_run_naming_the_family_and_what_works_and_no_file_is_made(tmp_path, given):
    """Before: a BertModel was probed with a 32x32 image and told to load itself 'with the input size it was built
    for' (a module), or asked for a preprocessor_config.json (a folder without one)."""
    model = _tiny_bert(tmp_path / "bert")
    out = tmp_path / "b.h5"
    with pytest.raises(QKHooksError, match=r"text model \(bert\).*input_ids.*qkhooks\.spectrum\(model\).*qkhooks\.record"
                       ) as err:
        qkhooks.record_dataset(model if given == "module" else f"hf:{tmp_path / 'bert'}", "samples", out,
                               progress=False)
    assert "input size" not in str(err.value) and "preprocessor_config" not in str(err.value)
    assert not any(p.name.startswith("b.h5") for p in tmp_path.iterdir())


def test_a_text_model_still_records_live_on_token_ids_and_image_models_taking_ids_are_not_called_text():
    """The refusal is for image runs only: a live recording on input_ids holds the model's own attention (the
    reference: BertModel's output_attentions), and ImageGPT (token ids of colour clusters) is not taken for text."""
    import torch
    import transformers

    from qkhooks.models.hf import text_model_type

    model = _tiny_bert()
    model.set_attn_implementation("eager")  # its own attention probabilities, the reference
    ids = torch.tensor([[1, 5, 9, 13, 2]])
    with qkhooks.record(model, attention="full") as run, torch.no_grad():
        out = model(input_ids=ids, output_attentions=True)
    assert text_model_type(model) == "bert"
    for layer in (0, 1):
        torch.testing.assert_close(run.attention(layer, "full").float(), out.attentions[layer].float(), atol=1e-5,
                                   rtol=0)
    gpt = transformers.ImageGPTModel(transformers.ImageGPTConfig(vocab_size=17, n_positions=16, n_embd=16,
                                                                 n_layer=1, n_head=2))
    vit = transformers.ViTModel(transformers.ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                       intermediate_size=32, image_size=32, patch_size=16))
    assert text_model_type(gpt) is None and text_model_type(vit) is None


# ---------------------------------------------------------------------------------------------- 3. weights alone


def _tiny_vit_folder(folder):
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.ViTModel(transformers.ViTConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                                         intermediate_size=32, image_size=32, patch_size=16))
    model.save_pretrained(folder)  # no preprocessor_config.json
    return model


def _reference_singular_values(model, layer: int, heads: int):
    """Each head's singular values of W_q,h^T W_k,h straight from the Linear weights (dense SVD)."""
    import torch

    attn = dict(model.named_modules())
    wq, wk = (next(attn[f"{stem}.{layer}.{part}"] for stem in ("layers", "encoder.layer") for part in parts
                   if f"{stem}.{layer}.{part}" in attn).weight.detach().double()
              for parts in (("attention.q_proj", "attention.attention.query"), ("attention.k_proj",
                                                                                 "attention.attention.key")))
    d = wq.shape[0] // heads
    return [torch.linalg.svdvals(wq[h * d:(h + 1) * d].T @ wk[h * d:(h + 1) * d]) for h in range(heads)]


def test_the_spectrum_command_reads_a_local_checkpoint_without_an_image_processor_config(tmp_path):
    """Before: `qkhooks spectrum hf:DIR` refused a folder without preprocessor_config.json ("preprocessing ... not
    known"), though the spectrum reads the weights alone; recording it still refuses with that message."""
    import json

    import torch

    from qkhooks.cli import main

    model = _tiny_vit_folder(tmp_path / "vit")
    assert main(["spectrum", f"hf:{tmp_path / 'vit'}", "--json", str(tmp_path / "s.json")]) == 0
    got = json.loads((tmp_path / "s.json").read_text())["layers"]
    for layer in (0, 1):
        for head, ref in enumerate(_reference_singular_values(model, layer, 2)):
            values = torch.tensor(got[layer]["heads"][head]["singular_values"], dtype=torch.float64)
            assert torch.allclose(values, ref[:len(values)], rtol=1e-4, atol=1e-7)
    with pytest.raises(QKHooksError, match=r"has no image processor config.*preprocessing \(size, resize, mean, std\) "
                                           "is not known"):
        qkhooks.record_dataset(f"hf:{tmp_path / 'vit'}", "samples", tmp_path / "r.h5", progress=False)
    assert not (tmp_path / "r.h5").exists()


def test_compare_draws_weight_only_curves_of_a_checkpoint_without_an_image_processor_config(tmp_path):
    """Before: `qkhooks compare hf:DIR ...` refused the folder as the spectrum command did."""
    import json

    from qkhooks.cli import main

    _tiny_vit_folder(tmp_path / "vit")
    _tiny_vit_folder(tmp_path / "vit2")
    specs = [f"hf:{tmp_path / 'vit'}", f"hf:{tmp_path / 'vit2'}"]
    assert main(["compare", *specs, "--out", str(tmp_path / "cmp")]) == 0
    curves = json.dumps(json.loads((tmp_path / "cmp" / "compare.json").read_text()))
    assert all(spec in curves for spec in specs)


def test_a_model_loaded_for_its_weights_alone_is_refused_for_a_recording(tmp_path):
    from qkhooks.models.load import load_model

    _tiny_vit_folder(tmp_path / "vit")
    loaded = load_model(f"hf:{tmp_path / 'vit'}", for_images=False)
    assert loaded.image_config is None
    with pytest.raises(QKHooksError, match=r"loaded without its image preprocessing.*load_model\(spec\)"):
        qkhooks.record_dataset(loaded, "samples", tmp_path / "r.h5", progress=False)
    assert not (tmp_path / "r.h5").exists()


# ---------------------------------------------------------------------------------------------- 4. unknown keywords


def test_record_dataset_refuses_an_unknown_keyword_naming_it_the_closest_option_and_every_option(tmp_path):
    """Before: record_dataset(..., heads=2) raised a bare TypeError naming 'heads' alone; record() listed the options
    but named no close one."""
    import inspect

    model = _tiny_loaded()
    with pytest.raises(QKHooksError, match=r"record_dataset\(\) got unknown option\(s\) heads, layer; the options are "
                                           r".*\. Did you mean layers for layer\?$") as err:
        qkhooks.record_dataset(model, "samples", tmp_path / "r.h5", heads=2, layer="0", progress=False)
    listed = str(err.value).split("the options are ")[1].split(". Did")[0].split(", ")
    signature = inspect.signature(qkhooks.record_dataset).parameters
    assert listed == [name for name, p in signature.items() if p.kind is p.KEYWORD_ONLY]
    assert not (tmp_path / "r.h5").exists()
    with pytest.raises(QKHooksError, match=r"record\(\) got unknown option\(s\) mode; .*Did you mean modes for mode\?"):
        qkhooks.record(model.model, mode=2)


# ---------------------------------------------------------------------------------------------- 5. messages


def test_the_checkpoint_interval_the_ctrl_c_message_names_is_a_record_flag(tmp_path):
    """Before: the message said reducers are checkpointed "every checkpoint_every batches", a name the command line
    did not have (README: record's flags are made from RecordOptions' fields)."""
    import argparse

    import numpy as np

    from qkhooks.cli.record import _record_args
    from qkhooks.options import RecordOptions
    from qkhooks.store import RunWriter

    parser = argparse.ArgumentParser()
    _record_args(parser)
    args = parser.parse_args(["timm:x", "samples", "--out", "r.h5", "--checkpoint-every", "3"])
    assert RecordOptions.from_args(args) == RecordOptions(checkpoint_every=3)
    with RunWriter(tmp_path / "run.h5", dtype="float32") as w:
        w.write_batch(["a", "b", "c"], {"v": np.ones((3, 2), np.float32)})
        w.flush()
        assert "--checkpoint-every N" in w.interruption_help(1)


def test_a_ctrl_c_before_the_run_file_is_opened_says_nothing_was_recorded_and_no_file_was_made(tmp_path, monkeypatch,
                                                                                             capsys):
    """Before: `qkhooks record` printed only "qkhooks: interrupted"."""
    import qkhooks.cli.record as cli_record
    from qkhooks.cli import main

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_record, "load_from_args", stop)
    out = tmp_path / "new" / "run.h5"
    assert main(["record", "timm:vit_tiny_patch16_224", "samples", "--random-init", "--out", str(out)]) == 130
    said = capsys.readouterr().err
    assert "nothing was recorded" in said and f"no file was made at {out}" in said
    assert not out.exists() and not out.parent.exists()


def test_opening_a_reducer_checkpoint_as_a_run_names_it_and_the_run_file_to_open(tmp_path):
    """Before: open_run("x.h5.reducers") said the checkpoint was "not an HDF5 file at all"."""
    run = tmp_path / "x.h5"
    qkhooks.record_dataset(_tiny_loaded(), [os.fspath(p) for p in _photos(tmp_path)], run, **_KW)
    checkpoint = tmp_path / "x.h5.reducers"
    assert checkpoint.exists()
    with pytest.raises(QKHooksError, match=rf"{checkpoint} is the reducer checkpoint of the run file {run} .*"
                                           rf"qkhooks\.open_run\('{run}'\)") as err:
        qkhooks.open_run(checkpoint)
    assert "not an HDF5 file at all" not in str(err.value)
    with qkhooks.open_run(run) as opened:  # what the message says to do works
        assert opened.n == 4


def _photos(tmp_path):
    _same_size_photos(tmp_path / "p", ["a.png", "b.png", "c.png", "d.png"], seed=3)
    return sorted((tmp_path / "p").iterdir())


def test_compare_prints_every_file_it_wrote(tmp_path, capsys):
    """Before: `qkhooks compare` printed only index.html."""
    from qkhooks.cli import main

    _tiny_vit_folder(tmp_path / "vit")
    _tiny_vit_folder(tmp_path / "vit2")
    out = tmp_path / "cmp"
    assert main(["compare", f"hf:{tmp_path / 'vit'}", f"hf:{tmp_path / 'vit2'}", "--out", str(out)]) == 0
    said = capsys.readouterr().out
    written = sorted(p.name for p in out.iterdir())
    assert "compare.json" in written and any(name.endswith(".png") for name in written)
    for name in written:
        assert str(out / name) in said, name


def test_the_random_band_legend_shows_one_value_where_its_range_reads_as_one(tmp_path, monkeypatch):
    """Before: bands of 0.0358388 and 0.0358404 (not np.isclose) were labelled "±0.0358…0.0358"."""
    import numpy as np

    import qkhooks.plots as plots

    axes = []
    real = plots.figure
    monkeypatch.setattr(plots, "figure", lambda *a, **k: (lambda fa: (axes.append(fa[1]), fa)[1])(real(*a, **k)))
    rng = np.random.default_rng(0)
    S = np.abs(rng.normal(size=(4, 16))) + 0.1
    S2 = S.copy()
    S2[:, 0] *= 1.01
    cos = rng.uniform(-0.1, 0.1, size=(4, 16))
    plots.plot_weighted_cosine({0: (S, cos), 1: (S2, cos)}, 64, tmp_path / "c.png")
    labels = [label for label in axes[0].get_legend_handles_labels()[1] if label.startswith("random 95%, mean")]
    assert labels == ["random 95%, mean of heads (±0.0358)"]


def test_the_largest_difference_of_a_reading_is_called_largest_in_magnitude():
    """Before: "largest at L0: -0.451" for the difference largest in size, which read as the largest value."""
    import numpy as np

    from qkhooks.readings import compare_reading

    rng = np.random.default_rng(0)
    a = np.stack([rng.normal(-0.45, 0.02, 40), rng.normal(0.0, 0.5, 40)], axis=1)  # clear at L0 only: "mixed"
    reading = compare_reading(a, 0.0, [0, 1], "anisotropy", "zero", "images")
    assert reading.verdict == "mixed"
    assert f"largest in magnitude at L0: {a[:, 0].mean():.3f}" in reading.text


# ---------------------------------------------------------------------------------------------- 6. chance beside p_same


def test_the_printed_modes_table_shows_each_layers_chance_beside_p_same():
    """Before: `qkhooks analyze modes` printed p_same (0.32) with no chance level (0.08), though modes.json has it."""
    from qkhooks.analysis.modes import format_summary

    summary = {"layers": [{"layer": 0}, {"layer": 3}], "anisotropy": None,
               "same_object": {"layers": {0: {"p_same": 0.32, "chance": 0.08}, 3: {"p_same": 0.5, "chance": 0.25}},
                               "left_out": {}}}
    header, *rows = format_summary(summary).splitlines()
    assert header.split()[-2:] == ["p_same", "chance"]
    assert [row.split()[-2:] for row in rows] == [["+0.320", "+0.080"], ["+0.500", "+0.250"]]
