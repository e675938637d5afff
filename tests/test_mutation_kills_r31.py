"""Kill tests for the mutants of round 30's later library code (``abe37ed..4a07a01``: ``run.last`` freed as the next
forward begins and the refusal after a forward that raised, each layer's own geometry handed to a live recording's
sinks, the ``hf:`` processor refusals, ``qkhooks bfd``'s data flags) that their tests let survive (module "round31" of
tests/mutation.py, ``--only ROUND31``; tests/MUTATION.md's "round 31" section names each); and the harness's round31
module kept consistent."""

from __future__ import annotations

import types
import warnings

import pytest
import torch

import qkhooks
from qkhooks.errors import QKHooksError

from test_mutation_kills_r26 import check_round_module
from test_taken_inputs_anisotropy import _images, _tiny_vit, _videomt  # the 3-layer ViT of 4x4 patches (CLS + 16 tokens)


# ------------------------------------------------------------------------------------ tests/mutation.py: round31
def test_the_round31_module_names_files_and_tests_that_exist_and_round_30s_later_commits():
    """The harness's module "round31" and its named set ROUND31: every file to mutate and every test file exists, the
    selection names only test files it selects, the commit range resolves in this checkout to the eight library
    commits of ``abe37ed..4a07a01``, and every library file they changed is mutated."""
    check_round_module("round31", "ROUND31", "abe37ed", "4a07a01", library_commits=8)


# ---------------------------------------------------------- capture.py: the deprecated dicts read the last batch
def test_the_deprecated_dicts_and_attention_maps_are_the_last_batchs_and_refuse_with_the_last_batchs_reasons():
    """``run.query[l]`` / ``run.key[l]`` / ``run.inputs[l]`` and ``run.attention_maps(kind)`` (deprecated) hold exactly
    the layers that have the array, each the tensor ``run.query(l)`` and the like return; with no last batch they give
    the same refusal as the methods: before any forward, after a forward that raised, with keep_last=False."""
    model = _tiny_vit()
    specs = ["rows", "full:0"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with torch.no_grad(), qkhooks.record(model, modes=2, layers=[0, 2], attention=specs) as run:
            with pytest.raises(QKHooksError, match=r"^nothing recorded yet: run the model inside the context first "
                                                   r"\(a forward that runs none of the recorded layers records nothing\)\.$"):
                run.query[0]
            with pytest.raises(QKHooksError, match=r"^nothing recorded yet"):
                run.attention_maps("rows")
            run(_images(1))
            for name in ("query", "key"):
                old = dict(getattr(run, name).items())
                assert sorted(old) == [0, 2]
                assert all(torch.equal(old[l], getattr(run, name)(l)) for l in (0, 2))
            assert dict(run.inputs.items()) == {}  # no layer kept its tokens
            rows, full = run.attention_maps("rows"), run.attention_maps("full")
            assert sorted(rows) == [0, 2] and sorted(full) == [0]
            assert all(torch.equal(rows[l], run.attention(l, "rows")) for l in (0, 2))
            assert torch.equal(full[0], run.attention(0, "full")) and full[0].shape[-2:] == (17, 17)
            handle = model.blocks[1].register_forward_pre_hook(lambda module, args: 1 / 0)
            try:
                with pytest.raises(ZeroDivisionError):
                    run(_images(2))
            finally:
                handle.remove()
            for read in (lambda: run.query[0], lambda: run.inputs[0], lambda: run.attention_maps("full")):
                with pytest.raises(QKHooksError) as refused:
                    read()
                assert str(refused.value) == (
                    "the last forward did not complete (it raised, or it is still running), and a recording frees its "
                    "last batch as the next forward begins, so there is no batch to read; run the model again (keep the "
                    "batch you need: batch = run.last).")
        with torch.no_grad(), qkhooks.record(model, modes=2, keep_last=False) as run:
            run(_images(1))
            with pytest.raises(QKHooksError, match=r"^this recording hands each batch to its sinks only \(keep_last=False"):
                run.key[0]


# ------------------------------------------------------------------ capture.py: run.geometry(l) reads the batch's
def test_run_geometry_is_the_geometry_the_caller_gave_the_batch_also_for_layers_without_maps():
    """A batch given ``meta["geometry"]`` (record_dataset's probe) answers ``run.geometry(l)`` with it (here marked by
    its stage), also where the recording has no maps to read token counts off (modes=None)."""
    import dataclasses

    from qkhooks.stream import probe_geometry

    model = _tiny_vit()
    probe = probe_geometry(model, qkhooks.record(model, modes=2).sites, (32, 32))
    assert [(probe[l].num_prefix_tokens, tuple(probe[l].grid)) for l in (0, 1, 2)] == [(1, (4, 4))] * 3
    given = {l: dataclasses.replace(g, stage=f"given for layer {l}") for l, g in probe.items()}
    with torch.no_grad(), qkhooks.record(model, modes=None) as run:
        run(_images(1), meta={"geometry": given})
        assert [run.geometry(l) for l in (0, 1, 2)] == [given[0], given[1], given[2]]
        assert run.geometry("blocks.2.attn") == given[2]


# ---------------------------------------------------------------- models/load.py: the processor saved with a module
class _NoConfig(torch.nn.Module):
    """A module with no ``config`` (its image size on itself, as ImageConfig.from_hf_model then reads it)."""

    image_size = 32


class _NoPath(torch.nn.Module):
    """A module whose config records no checkpoint folder (no ``_name_or_path``)."""

    def __init__(self):
        super().__init__()
        self.config = types.SimpleNamespace(image_size=24, model_type="vit")


@pytest.mark.parametrize("module, size, mean", [(_NoConfig, (32, 32), (0.485, 0.456, 0.406)),
                                                (_NoPath, (24, 24), (0.5, 0.5, 0.5))])
def test_a_module_that_names_no_checkpoint_folder_gets_the_guess_without_a_saved_processor_looked_for(module, size, mean):
    """No ``config``, or a config without ``_name_or_path``: no folder to read a processor from, so the guess from the
    config (ImageNet statistics for an unknown model type, 0.5 for ``vit``, its image size), with its warning."""
    from qkhooks.models.load import _image_config

    with pytest.warns(UserWarning, match="guessed preprocessing"):
        config = _image_config("hf", module())
    assert tuple(config.size) == size and tuple(config.mean) == pytest.approx(mean)


def test_the_processor_saved_with_a_module_is_looked_for_on_this_machine_only(monkeypatch, tmp_path):
    """A module whose checkpoint is a hub id: its processor is read from the local cache only (``local_files_only``),
    never fetched; none there, the guess."""
    import transformers

    from qkhooks.models.load import _image_config

    asked: list[tuple[str, dict]] = []

    def reader(where, **kwargs):
        asked.append((where, kwargs))
        raise OSError(f"{where} is not cached")

    monkeypatch.setattr(transformers.AutoImageProcessor, "from_pretrained", reader)
    model = _NoPath()
    model.config._name_or_path = "nobody/not-cached-here"
    monkeypatch.chdir(tmp_path)  # no folder of that name
    with pytest.warns(UserWarning, match="guessed preprocessing"):
        _image_config("hf", model)
    assert asked == [("nobody/not-cached-here", {"local_files_only": True})]


@pytest.mark.parametrize("saved, error", [("{not json", "OSError: It looks like the config file at "),
                                          ('{"image_processor_type": "NoSuchImageProcessor"}',
                                           "ValueError: Unrecognized image processor in ")])
def test_a_processor_saved_beside_a_module_that_cannot_be_read_is_refused_naming_the_readers_error(tmp_path, saved, error):
    import transformers

    from qkhooks.models.load import load_model
    from test_inputs import TINY_VIT

    folder = tmp_path / "tiny-vit"
    transformers.ViTModel(transformers.ViTConfig(**TINY_VIT)).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(saved)
    with pytest.raises(QKHooksError) as refused:
        load_model(transformers.ViTModel.from_pretrained(folder).eval())
    assert f"the image processor saved with this model ({str(folder)!r}) could not be read ({error}" in str(refused.value)


# ------------------------------------------------------------ capture.py: _last_batch names an unknown layer first
def test_with_no_batch_to_read_an_unknown_layer_is_named_first_and_a_known_module_path_gets_the_reason():
    """Before any forward: ``run.query(7)`` names the unknown layer and this recording's layers (the layer is the
    caller's first mistake); a module path the recording knows is resolved and gets the reason there is no batch; a
    path it does not know is refused naming the closest."""
    model = _tiny_vit()
    with torch.no_grad(), qkhooks.record(model, modes=2, layers=[0, 2]) as run:
        with pytest.raises(QKHooksError, match=r"^this recording did not record layer 7; its layers are \[0, 2\]\.$"):
            run.query(7)
        with pytest.raises(QKHooksError, match=r"^this recording did not record layer 1; its layers are \[0, 2\]\.$"):
            run.geometry(1)
        for read in (run.query, run.key, run.geometry):
            with pytest.raises(QKHooksError, match=r"^nothing recorded yet"):
                read("blocks.2.attn")
        with pytest.raises(QKHooksError, match=r"blocks\.1\.attn.*blocks\.0\.attn"):
            run.key("blocks.1.attn")


# ------------------------------------------------------------------- options.py: add_arguments(names=) refuses
def test_record_flags_chosen_by_name_are_added_alone_and_a_name_without_a_flag_is_refused_naming_it():
    import argparse

    from qkhooks.options import RecordOptions

    parser = argparse.ArgumentParser()
    RecordOptions.add_arguments(parser, names=("limit", "num_workers", "image_column"))
    assert sorted(a.dest for a in parser._actions if a.dest != "help") == ["image_column", "limit", "num_workers"]
    args = parser.parse_args(["--limit", "3", "--workers", "2", "--image-column", "img"])
    assert (args.limit, args.num_workers, args.image_column) == (3, 2, "img")
    for names, named in ((("limit", "no_such"), "['no_such']"), (("keep_inputs", "limit", "masks"), "['keep_inputs', 'masks']")):
        with pytest.raises(ValueError) as refused:
            RecordOptions.add_arguments(argparse.ArgumentParser(), names=names)
        assert str(refused.value) == f"no flag of RecordOptions is named {named}"


# ------------------------------------------------------------------- bfd.py: loader options refused for tensors
@pytest.mark.parametrize("given, named", [({"num_workers": 0}, "num_workers"), ({"image_column": "img"}, "image_column"),
                                          ({"num_workers": 2, "image_column": "img"}, "num_workers and image_column")])
def test_run_bfd_refuses_loader_options_for_image_tensors_in_one_whole_sentence_naming_each(given, named):
    from qkhooks.analysis.bfd import run_bfd

    with pytest.raises(QKHooksError) as refused:
        run_bfd(_tiny_vit(), _images(1), None, **given)
    assert str(refused.value) == (f"{named} say how a dataset is read, and image tensors are read as they are: leave "
                                  "them out, or pass a dataset spec.")


# --------------------------------------------------------------------- models/load.py: a processor handed in
def test_a_processor_handed_to_image_config_is_used_not_the_one_saved_beside_the_model(tmp_path):
    """``_image_config("hf", model, processor)`` (what load_model hands on from an hf: folder) uses that processor; the
    one saved beside the module is read only when none is handed in."""
    import transformers

    from qkhooks.models.load import _image_config
    from test_inputs import TINY_VIT

    folder = tmp_path / "tiny-vit"
    transformers.ViTModel(transformers.ViTConfig(**TINY_VIT)).save_pretrained(folder)
    saved, handed = ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6)), ((0.15, 0.25, 0.35), (0.45, 0.55, 0.65))
    for (mean, std), where in ((saved, folder), (handed, tmp_path / "handed")):
        transformers.ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=list(mean),
                                       image_std=list(std)).save_pretrained(where)
    model = transformers.ViTModel.from_pretrained(folder).eval()
    processor = transformers.AutoImageProcessor.from_pretrained(tmp_path / "handed").to_dict()
    for given, (mean, std) in ((processor, handed), (None, saved)):
        config = _image_config("hf", model, given)
        assert tuple(config.mean) == pytest.approx(mean) and tuple(config.std) == pytest.approx(std)


# ------------------------------------------- capture.py / results.py: windowed layers' geometry in a live batch
def test_a_live_swins_batches_carry_each_layers_windows_as_its_blocks_define_them():
    """Each layer's geometry in a live Swin batch (``meta["geometry"]``, read by ``run.geometry(l)``): the window size,
    shift and count of its own block (timm's ``window_size`` / ``shift_size`` on a 16 x 16 then 8 x 8 token grid), not
    a refusal and not the first layer's."""
    import timm

    torch.manual_seed(0)
    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=64, embed_dim=16, depths=(2, 2),
                             num_heads=(2, 4), window_size=4, num_classes=0).eval()
    blocks = [block for stage in swin.layers for block in stage.blocks]
    grids = [16, 16, 8, 8]
    expected = [{"size": list(b.window_size), "shift": list(b.shift_size),
                 "windows": (g // b.window_size[0]) * (g // b.window_size[1]), "pad_first": False}
                for b, g in zip(blocks, grids)]
    assert [e["shift"] for e in expected] == [[0, 0], [2, 2], [0, 0], [2, 2]]  # the shifted blocks differ
    with torch.no_grad(), qkhooks.record(swin, modes=2) as run:
        run(torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)))
        carried = run.last.meta["geometry"]
        assert [carried[l].window for l in range(4)] == expected
        assert [tuple(carried[l].grid) for l in range(4)] == [(16, 16), (16, 16), (8, 8), (8, 8)]
        assert [run.geometry(l) for l in range(4)] == [carried[l] for l in range(4)]


def test_a_forward_that_runs_no_recorded_layer_completes_with_nothing_recorded_and_says_so():
    """A forward of the model that runs none of the recorded layers (block 2 recorded, the blocks cut to the first two
    for one forward) completes without a batch (the last one is freed as it began): reading says nothing was recorded,
    not that the forward did not complete."""
    model = _tiny_vit()
    with torch.no_grad(), qkhooks.record(model, modes=2, layers=[2]) as run:
        run(_images(1))
        assert run.ids == ["0", "1", "2"]
        blocks, model.blocks = model.blocks, model.blocks[:2]
        try:
            run(_images(2))
        finally:
            model.blocks = blocks
        with pytest.raises(QKHooksError) as refused:
            run.query(2)
        assert str(refused.value) == ("nothing recorded yet: run the model inside the context first (a forward that runs "
                                      "none of the recorded layers records nothing).")
        run(_images(3))
        assert run.ids == ["3", "4", "5"]


def test_the_geometry_a_caller_gives_a_batch_is_kept_and_only_the_layers_it_leaves_out_are_read_off_the_maps():
    """``meta["geometry"]`` given by the caller (record_dataset's probe) wins over the one read off the maps as the
    batch ends: a layer it gives keeps the caller's value (here marked by its stage), a layer it leaves out gets the
    observed one (the probe's value), and the caller's dict is not changed."""
    import dataclasses

    from qkhooks.stream import probe_geometry

    model = _tiny_vit()
    probe = probe_geometry(model, qkhooks.record(model, modes=2).sites, (32, 32))
    given = {0: dataclasses.replace(probe[0], stage="given by the caller")}
    with torch.no_grad(), qkhooks.record(model, modes=2) as run:
        run(_images(1), meta={"geometry": given})
        assert run.last.meta["geometry"] == {0: given[0], 1: probe[1], 2: probe[2]}
        assert run.geometry(0).stage == "given by the caller" and run.geometry(2) == probe[2]
    assert list(given) == [0]


def test_timesformers_refusal_names_the_layers_path_and_site_class():
    from test_inside_forms import _timesformer

    model = _timesformer()
    clip = torch.randn(2, 4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), qkhooks.record(model, modes=2) as run:
        model(pixel_values=clip)
        site = run.sites[0]
        with pytest.raises(QKHooksError) as refused:
            run.geometry(0)
    assert type(site).__name__ == "DividedSite"
    assert str(refused.value) == (f"{site.path} (DividedSite) groups its tokens in its own way (TimeSformer's time or "
                                  "space groups), not in windows of an image grid, so it has no layer geometry.")


def test_a_pretrained_hf_folder_without_a_processor_config_is_refused_in_the_whole_sentence(tmp_path):
    import transformers

    from qkhooks.models.load import load_model
    from test_inputs import TINY_VIT

    folder = tmp_path / "tiny-vit"
    transformers.ViTModel(transformers.ViTConfig(**TINY_VIT)).save_pretrained(folder)
    with pytest.raises(QKHooksError) as refused:
        load_model(f"hf:{folder}")
    assert str(refused.value) == (
        f"hf:{folder} has no image processor config that transformers can read (preprocessor_config.json), so its "
        "preprocessing (size, resize, mean, std) is not known, and qkhooks does not guess it for pretrained weights: "
        "every activation would be off without a word. Put the checkpoint's preprocessor_config.json in the folder "
        "(AutoImageProcessor.save_pretrained writes it), or pass "
        "load_model(..., image_config=qkhooks.data.ImageConfig.from_hf(processor_dict)).")


def test_a_forward_that_runs_some_recorded_layers_carries_the_geometry_of_those_alone():
    """Layers 1 and 2 recorded, the blocks cut to the first two for one forward: the batch holds layer 1 and carries
    its geometry (the probe's), none for layer 2, which did not run."""
    from qkhooks.stream import probe_geometry

    model = _tiny_vit()
    probe = probe_geometry(model, qkhooks.record(model, modes=2).sites, (32, 32))
    with torch.no_grad(), qkhooks.record(model, modes=2, layers=[1, 2]) as run:
        blocks, model.blocks = model.blocks, model.blocks[:2]
        try:
            run(_images(2))
        finally:
            model.blocks = blocks
        assert sorted(run.last.captures) == [1] and run.last.meta["geometry"] == {1: probe[1]}


# ------------------------------------------------------- capture.py: a joining layer's tokens handed over once
def test_a_per_frame_layers_tokens_are_handed_to_a_taking_sink_once_joined_and_never_per_call():
    """VidEoMT's per-frame layers run once per frame: a sink that takes inputs gets each layer's tokens once a batch,
    all 2 clips x 3 frames joined, equal to the tokens keep_inputs=True keeps; never one frame's call alone."""
    model, clip = _videomt()

    class Taken:
        def __init__(self):
            self.calls: list[tuple[int, torch.Tensor]] = []

        def take_inputs(self, batch, layer, tokens) -> None:
            self.calls.append((layer, tokens.clone()))

        def update(self, batch) -> None:
            pass

    taken = Taken()
    with torch.no_grad(), qkhooks.record(model, modes=0, sinks=[taken]) as run:
        model(pixel_values_videos=clip)
        joined = [s.layer for s in run.sites if s.joins_calls()]
    with torch.no_grad(), qkhooks.record(model, modes=0, keep_inputs=True) as kept:
        model(pixel_values_videos=clip)
        tokens = {layer: kept.inputs(layer) for layer in kept.layers}
    assert joined  # the model has per-frame layers
    assert sorted(layer for layer, _ in taken.calls) == sorted(tokens)  # each layer once
    for layer, x in taken.calls:
        assert x.shape[0] == 6 and torch.equal(x, tokens[layer])
