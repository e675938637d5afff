"""Kill tests for round 48's library code (module "round48" of ``tests/mutation.py``, ``--only ROUND48``): each
asserts the real behaviour against an independent reference and was seen failing with its mutant active (the mutant's
name in the test's docstring; tests/MUTATION.md, round 49's run)."""

from __future__ import annotations

import subprocess
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

from qkhooks.data import readers
from qkhooks.errors import QKHooksError


# ------------------------------------------------------------------ tests/mutation.py: round48
def test_the_round48_module_names_files_and_tests_that_exist_and_round_48s_commits():
    """The harness's module "round48" and its named set ROUND48: every file to mutate and every test file exists, the
    selection names only test files it selects, the range resolves in this checkout to round 48's 14 library commits
    (38 in all) (``git rev-list``), so ``--only ROUND48`` draws the same sample wherever it runs, and every library file
    they changed is mutated but ``models/base.py`` (a dataclass field and its docstring) and ``store/format.py`` (a
    constant and its docstring), whose changed lines hold no mutant."""
    from test_mutation_kills_r26 import ROOT, _harness, commits_in, library_files_changed, module_files

    mutation = _harness()
    files = module_files(mutation, "round48")
    assert mutation.NAMED_SETS["ROUND48"] == mutation.ROUND48 == ("commits:368b4c5..edf303a",)
    assert len(commits_in("368b4c5..edf303a")) == 38
    library = subprocess.run(["git", "rev-list", "368b4c5..edf303a", "--", "qkhooks"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.split()
    assert len(library) == 14
    assert set(library_files_changed("368b4c5", "edf303a")) - set(files) == {"qkhooks/models/base.py",
                                                                          "qkhooks/store/format.py"}


# ------------------------------------------------------------------ unsupported: the image-to-token route refused
def _nested_route() -> tuple[nn.Module, nn.Conv2d]:
    """A model whose patch convolution sits three levels down ('a.b.c'): two modules hold it besides the model."""
    conv = nn.Conv2d(3, 4, 2, stride=2)
    model = nn.Sequential(OrderedDict(a=nn.Sequential(OrderedDict(b=nn.Sequential(OrderedDict(c=conv))))))
    return model, conv


def _mirror(module, args):
    """Someone else's pre-hook: the image mirrored before the patch convolution sees it."""
    return (args[0].flip(-1),)


def _roll(module, args, output):
    """Someone else's hook: the tokens rolled by one column."""
    return torch.roll(output, 1, dims=-1)


ROUTE_SENTENCE = ("so which pixels each token reads is not what its patch embedding's patch size or convolutions say, and masks read "
                  "onto the tokens would be wrong. Record this model without masks, or remove the hook "
                  "(handle.remove()) / restore the module while recording masks.")


@pytest.mark.parametrize("holder", ["", "a", "a.b"])
def test_a_pre_hook_on_every_module_holding_the_route_is_refused_naming_it(holder):
    """A forward pre-hook someone else put on any module holding the route's module (the model, 'a', 'a.b' around
    'a.b.c') may change the image before it is embedded: refused naming that module, in the whole sentence
    (``refuse_moved_pixels`` ``_9``: ``rsplit(".")`` without its count named 'a' twice and never 'a.b'; ``_39``,
    ``_42``, ``_43``: the sentence's words); its forward hooks run after the tokens are made and are taken."""
    from qkhooks.models.unsupported import refuse_moved_pixels

    model, conv = _nested_route()
    target = model.get_submodule(holder)
    target.register_forward_hook(_roll)
    refuse_moved_pixels("test", [("a.b.c", conv)], model)  # a forward hook on a holder: taken
    target.register_forward_pre_hook(_mirror)
    with pytest.raises(QKHooksError) as err:
        refuse_moved_pixels("test", [("a.b.c", conv)], model)
    named = repr(holder) if holder else "the model itself"
    assert str(err.value) == (f"test's {named} (Sequential) carries a forward pre-hook someone else registered "
                              f"({__name__}._mirror), which can change the image before its patch embedding sees it, "
                              + ROUTE_SENTENCE), str(err.value)


@pytest.mark.parametrize("kind", ["forward hook", "forward pre-hook"])
def test_a_hook_on_the_routes_module_is_refused_naming_its_kind(kind):
    """A hook someone else put on the route's module itself is refused whichever kind, the message saying which
    (``_foreign_hook`` ``_4``: "FORWARD HOOK")."""
    from qkhooks.models.unsupported import refuse_moved_pixels

    model, conv = _nested_route()
    refuse_moved_pixels("test", [("a.b.c", conv)], model)  # no hook: nothing to refuse
    conv.register_forward_hook(_roll) if kind == "forward hook" else conv.register_forward_pre_hook(_mirror)
    with pytest.raises(QKHooksError) as err:
        refuse_moved_pixels("test", [("a.b.c", conv)], model)
    hook = f"{__name__}._roll" if kind == "forward hook" else f"{__name__}._mirror"
    assert str(err.value) == (f"test's 'a.b.c' (Conv2d) carries a {kind} someone else registered ({hook}), which can "
                              "move or mix pixels, " + ROUTE_SENTENCE), str(err.value)


# ------------------------------------------------------------------ torchvision: the conv stem's own modules
def test_a_conv_stem_with_a_forward_of_its_own_is_refused_naming_conv_proj_in_the_whole_sentence():
    """A stem whose class adds a forward of its own (here a Sequential that mirrors its output) reads pixels its
    convolutions do not say: refused naming 'conv_proj' itself, in the whole sentence (``_refuse_stem_moving_pixels``
    ``_20``: 'conv_projXXXX'; ``_23``: "batchnorm")."""
    from qkhooks.models.torchvision import _refuse_stem_moving_pixels

    class Mirrored(nn.Sequential):
        def forward(self, x):
            return super().forward(x).flip(-1)

    _refuse_stem_moving_pixels(nn.Sequential(nn.Conv2d(3, 4, 2, stride=2), nn.BatchNorm2d(4), nn.ReLU()))
    with pytest.raises(QKHooksError) as err:
        _refuse_stem_moving_pixels(Mirrored(nn.Conv2d(3, 4, 2, stride=2), nn.BatchNorm2d(4), nn.ReLU()))
    assert str(err.value) == (
        "torchvision ViT's stem module 'conv_proj' (Mirrored) is not a convolution, a BatchNorm or an activation "
        "acting on each pixel alone, so which pixels each token reads is not what the stem's convolutions say, and "
        "masks read onto the tokens would be wrong. Record this model without masks, or restore the stem while "
        "recording masks."), str(err.value)


# ------------------------------------------------------------------ readers: an iterable read again
def test_an_iterables_second_check_to_another_point_reads_from_its_first_item():
    """A check read again to item 3, then to item 5 (another point): the second reads the iterable from its first
    item, as given (``ReadInPassing._rows_after_check`` ``_2``: ``and`` for ``or`` handed the rows left after item 3
    to a read from 0, so items 3-5 were taken as 0-2), and the rows of the last point go on after it."""
    items = [{"id": f"img{k}", "image": np.full((4, 4, 3), k, dtype=np.uint8)} for k in range(7)]
    reader = readers.IterReader(items)
    assert [i for i, _ in reader.held_hashes(3)] == ["img0", "img1", "img2"]
    assert [i for i, _ in reader.held_hashes(5)] == ["img0", "img1", "img2", "img3", "img4"]
    assert [row["id"] for row in reader.rows(5)] == ["img5", "img6"]


# ------------------------------------------------------------------ timm_backbone: the wrapped network's sites
def test_a_wrapped_timm_vits_stages_are_paths_of_the_wrapper_holding_their_blocks():
    """transformers' TimmBackbone: each site's stage, like its path and block, is named where it sits in the wrapper
    (the module exists there and holds the block), not in the wrapped network (``timm_backbone.find`` ``_11``: the
    stage left as the network names it)."""
    import qkhooks
    from test_zoo import _small_timm_backbone

    model = _small_timm_backbone().eval()
    modules = dict(model.named_modules())
    sites = qkhooks.sites(model)
    assert sites
    for site in sites:
        assert modules[site.block_path] is site.block and modules[site.path] is site.module
        assert site.stage in modules and site.block_path.startswith(f"{site.stage}."), (site.stage, site.block_path)


# ------------------------------------------------------------------ sources and stream: a resume's checks
def test_a_sources_file_stamps_are_none_where_its_items_are_not_tar_members():
    """Only a ``wds:`` source stamps its items as members of a file; any other has no stamps to read again, with or
    without a bar (``ItemStream.file_stamps`` ``_10``: the reader's missing ``file_stamps`` called: TypeError)."""
    from qkhooks.data import ImageConfig
    from qkhooks.data.sources import ItemStream, open_source

    config = ImageConfig(size=(16, 16), mean=(0.5,) * 3, std=(0.5,) * 3)
    source = open_source([np.full((16, 16, 3), k, dtype=np.uint8) for k in range(3)], config)
    assert isinstance(source, ItemStream)
    assert source.file_stamps(2) is None and source.file_stamps(2, progress=True) is None


def test_a_datasets_retimed_kept_files_are_hashed_under_the_check_bar(tmp_path, capsys, monkeypatch):
    """A torch Dataset of paths whose kept files were copied again (their times changed, their bytes not): the resume
    reads the items again (one bar, every item before the resume point) and hashes the retimed kept files (a second
    bar, those files alone: here 2), then completes (``_refuse_changed_stream_files`` ``_231``, ``_238``: the bar's
    ``progress`` not handed on, so the hashing showed none)."""
    import os
    import re

    import qkhooks
    from test_resume_held_images_check_progress import _Held
    from test_review_symlinks_repair_messages import _KW, _interrupted
    from test_spectrum_edits_and_dataparallel import _same_size_photos, _tiny_loaded

    names = [f"a{i}.png" for i in range(8)]
    loaded, folder, run = _tiny_loaded(), tmp_path / "imgs", tmp_path / "run.h5"
    _same_size_photos(folder, names, seed=0)
    paths = [str(folder / n) for n in names]
    _interrupted(loaded, run, batches=3, data=_Held(paths))
    for name in names[:2]:  # kept: the first images of any resume point
        os.utime(folder / name, ns=(1_600_000_000 * 10**9, 1_600_000_000 * 10**9))
    monkeypatch.setattr(readers, "CHECK_BAR_DELAY", 0)
    capsys.readouterr()
    assert qkhooks.record_dataset(loaded, _Held(paths), run, resume=True, **{**_KW, "progress": True}).images == 8
    err = capsys.readouterr().err
    assert re.search(r"check kept images: 100%[^\r\n]*\| 2/2 ", err), err


# ------------------------------------------------------------------ unsupported: hooks on the q/k norms
@pytest.mark.parametrize("kind", ["forward hook", "forward pre-hook"])
def test_a_hook_of_either_kind_on_a_qk_norm_is_refused_at_entry_and_taken_once_removed(kind):
    """A hook someone else put on ``attn.k_norm`` changes k after W_k as a steering hook on ``qkv`` would: refused at
    entry naming the norm and the hook's kind, whichever kind (``refuse_altered_qk`` ``_153``: the norms' hooks not
    looked for); removed, the maps are the model's own."""
    import qkhooks
    from test_capture_changes_inside_record import _assert_maps_are_the_models, _eager_probs, _images, _timm

    model = _timm(qk_norm=True)
    norm = model.blocks[1].attn.k_norm
    handle = (norm.register_forward_hook(lambda module, args, out: out * 3 + 0.5) if kind == "forward hook" else
              norm.register_forward_pre_hook(lambda module, args: (args[0] * 3 + 0.5,)))
    with pytest.raises(QKHooksError, match=r"q or k is normalised by 'blocks\.1\.attn\.k_norm' \(.*\), which carries "
                                           rf"a {kind} someone else registered"):
        qkhooks.record(model, modes=2, attention="full")
    handle.remove()
    x = _images()
    with qkhooks.record(model, modes=2, attention="full") as run, torch.no_grad():
        model(x)
    _assert_maps_are_the_models(run, _eager_probs(model, x))  # the model's own eager attention


# ------------------------------------------------------------------ hf: a model without an embeddings module
def test_masks_are_read_onto_a_hugging_face_model_without_an_embeddings_module():
    """SAM's vision encoder embeds its patches in ``patch_embed``, no module named ``embeddings``: its masks are read
    onto the cells its 6 x 6 grid makes of a 48 px image, 8 px each (``hf._pixel_route`` ``_10``: a route of
    ``(None,)``, a TypeError when masks are read)."""
    import qkhooks
    from test_relpos import _case

    from qkhooks.stream import mask_cells, probe_geometry

    model, inputs, _ = _case("SamVisionModel")
    assert not any(name.rpartition(".")[2] == "embeddings" for name, _ in model.named_modules())
    sites = qkhooks.sites(model)
    size = tuple(inputs["pixel_values"].shape[-2:])
    assert size == (48, 48)
    cells = mask_cells(sites, probe_geometry(model, sites, size), size, "first", model)
    spans = tuple((8 * i, 8 * i + 8) for i in range(6))
    assert {grid: (c.rows, c.cols) for grid, c in cells.items()} == {(6, 6): (spans, spans)}
