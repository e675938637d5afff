"""Round 28, a new user's pass over the README: the mistakes one makes first get a refusal that names them.

- query tokens given as floats were truncated by ``.long()`` (token 1.5 gave the row of token 1, without a word);
- a refused ``pool_masks`` was named by the shape it had after flattening and padding, not the one given;
- ``paper_claims`` (the README's Python BFD snippet) gave a verdict on position probes tested on one held-out
  image, which the tables and the report call "not to be read".
"""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

import qkhooks
from qkhooks.analysis.bfd import MIN_HOLDOUT, paper_claims

GRID = 4  # 32 px images, 8 px patches: 16 patch tokens after one class token


@pytest.fixture(scope="module")
def vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                             depth=2, num_heads=4, num_classes=0).eval()


def _eager_maps(model: torch.nn.Module, images: torch.Tensor, layer: int) -> torch.Tensor:
    """(B, H, N, N) softmax(q kᵀ · scale) from the block's own qkv Linear: the reference the rows must equal."""
    attn, seen = model.blocks[layer].attn, {}
    handle = attn.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0].detach()))
    with torch.no_grad():
        model(images)
    handle.remove()
    x = seen["x"]
    b, n, d = x.shape
    q, k, _ = attn.qkv(x).reshape(b, n, 3, attn.num_heads, d // attn.num_heads).permute(2, 0, 3, 1, 4)
    return ((q @ k.transpose(-1, -2)) * attn.scale).softmax(-1)


def test_float_query_tokens_are_refused_and_integer_ones_give_the_models_rows(vit):
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    eager = _eager_maps(vit, images, 1)
    with qkhooks.record(vit, modes=None, layers=[1], attention="rows") as run, torch.no_grad():
        run(images, meta={"query_tokens": torch.tensor([[0, 5], [3, 16]])})
        torch.testing.assert_close(run.attention(1, "rows"), eager[[[0], [1]], :, [[0, 5], [3, 16]]].transpose(1, 2),
                                   atol=1e-6, rtol=1e-5)
        for bad in (torch.tensor([[0.0, 1.5]]).expand(2, -1), torch.tensor([[True, False]]).expand(2, -1)):
            with pytest.raises(qkhooks.QKHooksError, match=rf"query_tokens must be integer token indices .*{bad.dtype}"):
                run(images, meta={"query_tokens": bad})
        with pytest.raises(qkhooks.QKHooksError, match=r"query_tokens must be \(batch, T\) .* got shape \(2, 2, 1\)"):
            run(images, meta={"query_tokens": torch.zeros(2, 2, 1, dtype=torch.long)})


def test_refused_pool_masks_are_named_by_the_shape_given(vit):
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    tokens = torch.tensor([[0, 7]]).expand(2, -1)
    eager = _eager_maps(vit, images, 0)
    grid_masks = (torch.rand(2, 3, GRID, GRID, generator=torch.Generator().manual_seed(3)) > 0.5).float()
    with qkhooks.record(vit, modes=None, layers=[0], attention="pooled") as run, torch.no_grad():
        run(images, meta={"query_tokens": tokens, "pool_masks": grid_masks})
        rows = eager[:, :, [0, 7]].double().numpy()[..., 1:]  # the class token gets no mass from patch-grid masks
        want = np.einsum("bhtn,bmn->bhtm", rows, grid_masks.flatten(2).double().numpy())
        np.testing.assert_allclose(run.attention(0, "pooled").double().numpy(), want, atol=1e-6)
        with pytest.raises(qkhooks.QKHooksError) as other_batch:  # patch-token masks for 3 images
            run(images, meta={"query_tokens": tokens, "pool_masks": torch.ones(3, 2, GRID * GRID)})
        assert "got (3, 2, 16) for a batch of 2" in str(other_batch.value)
        with pytest.raises(qkhooks.QKHooksError) as wrong_grid:
            run(images, meta={"query_tokens": tokens, "pool_masks": torch.ones(2, 2, 3, 3)})
        assert "got (2, 2, 3, 3) (a patch grid of 9 cells, not 16) for a batch of 2" in str(wrong_grid.value)
        with pytest.raises(qkhooks.QKHooksError, match=r"got \(2, 17\) for a batch of 2"):  # one mask per image, no M
            run(images, meta={"query_tokens": tokens, "pool_masks": torch.ones(2, 17)})


def _bfd_result(held: int, r2: list[tuple[float, float]]) -> dict:
    """A BFD result of one CC head per layer whose P and C probes scored ``r2`` on ``held`` held-out images."""
    head = {"head": 0, "frobenius": {"energy": {"CC": 0.7, "CP": 0.2, "PC": 0.05, "PP": 0.05}, "label": "CC"}}
    return {"definition": "frobenius", "images": 5 * max(held, 1),
            "layers": [{"layer": i, "heads": [head], "decoding": {"holdout_images": held, "X": {"mean": 0.5},
                                                                  "P": {"mean": p}, "C": {"mean": c}}}
                       for i, (p, c) in enumerate(r2)]}


@pytest.mark.parametrize("r2", [[(0.95, 0.05), (0.92, 0.0)], [(0.95, 0.05), (0.5, 0.4)]])
def test_paper_claims_read_the_position_probes_only_on_enough_held_out_images(r2):
    scores = np.array(r2)
    holds = bool(scores[:, 0].min() >= 0.9 and scores[:, 1].max() <= 0.1)  # the claim's thresholds, in numpy
    assert paper_claims(_bfd_result(MIN_HOLDOUT, r2))["split_isolates_position"] is holds
    few = paper_claims(_bfd_result(1, r2))
    assert few["split_isolates_position"] is None
    assert few["sentences"][-1] == ("The position probes from C are tested on 1 held-out image, fewer than 8: not read "
                                    "(about one image in --holdout-every (holdout_every=, default 5) is held out, "
                                    "chosen by a hash of its id: record more images).")


def test_record_resume_says_how_many_images_it_kept_and_recorded(tmp_path, capsys):
    """README's `qkhooks record ... --resume` on a finished run added nothing but printed "wrote 2 images". The counts
    come from the resume itself (the images its resume point kept), not from a second look at the file before it."""
    import h5py

    from qkhooks.cli import main
    from qkhooks.store.format import set_committed

    args = ["record", "timm:vit_tiny_patch16_224@random", "samples", "--out", str(tmp_path / "run.h5"), "--limit", "2",
            "--layers", "0", "--modes", "2", "--batch-size", "1"]
    assert main(args) == 0
    with qkhooks.open_run(tmp_path / "run.h5") as run:
        n = run.n
    assert f"wrote {n} images to " in capsys.readouterr().out
    assert main(args + ["--resume"]) == 0
    assert f"resumed {tmp_path / 'run.h5'}: {n} images kept, 0 recorded, {n} in all" in capsys.readouterr().out
    with h5py.File(tmp_path / "run.h5", "r+") as f:  # as if killed after the first image: its checkpoint (n images)
        set_committed(f, 1)                           # is past the committed count, so the resume keeps none
    assert main(args + ["--resume"]) == 0
    assert f"resumed {tmp_path / 'run.h5'}: 0 images kept, {n} recorded, {n} in all" in capsys.readouterr().out
    with qkhooks.open_run(tmp_path / "run.h5") as run:
        assert run.n == n


def test_object_ids_up_to_int32_are_stored_as_given_and_one_past_is_refused_naming_the_item(tmp_path):
    """README: object ids are stored as given, up to 2**31 - 1; past that the refusal named neither item nor fix."""
    from PIL import Image

    loaded = qkhooks.load_model("timm:vit_tiny_patch16_224@random")
    photo = Image.fromarray(np.full((64, 64, 3), 90, np.uint8))
    objects = np.zeros((64, 64), np.int64)
    objects[:, 32:] = 2**31 - 1  # the right half of the photo: one object with the largest id int32 holds
    qkhooks.record_dataset(loaded, [{"image": photo, "id": "edge", "objects": objects}], tmp_path / "edge.h5",
                           layers="0", modes=2, progress=False)
    import h5py

    with h5py.File(tmp_path / "edge.h5", "r") as f:
        stored = f["masks/objects"][0]
    assert set(np.unique(stored).tolist()) == {0, 2**31 - 1}
    objects[:, 32:] = 2**31
    with pytest.raises(qkhooks.QKHooksError, match=r"mask 'objects' of 'past' holds ids 0\.\.2147483648, outside "
                                                    r"int32 .* Renumber its objects"):
        qkhooks.record_dataset(loaded, [{"image": photo, "id": "past", "objects": objects}], tmp_path / "past.h5",
                               layers="0", modes=2, progress=False)


def test_float_query_tokens_are_refused_on_a_windowed_layer_too():
    """A Swin layer reads its rows off its windows' maps by its own path, which truncated float tokens the same way."""
    torch.manual_seed(0)
    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=56, embed_dim=16,
                             depths=(1, 1), num_heads=(1, 2), window_size=7, num_classes=0).eval()
    images = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(4))
    with qkhooks.record(swin, modes=None, layers=[0], attention="rows") as run, torch.no_grad():
        assert type(run.sites[0]).__name__ == "WindowSite"
        with pytest.raises(qkhooks.QKHooksError, match=r"query_tokens must be integer token indices .*torch.float32"):
            run(images, meta={"query_tokens": torch.tensor([[0.0, 20.5]]).expand(2, -1)})


def test_masks_on_another_grid_of_as_many_cells_are_refused(vit):
    """A (2, 8) mask has the 16 cells of the layer's 4 x 4 grid, in another layout: summed on the flattened cells it
    would put its mass on other patches. Refused; the same mask given flattened (the model's token order, the user's
    responsibility) and on the layer's grid are both read."""
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    tokens = torch.tensor([[0, 7]]).expand(2, -1)
    masks = (torch.rand(2, 1, GRID, GRID, generator=torch.Generator().manual_seed(5)) > 0.5).float()
    eager = _eager_maps(vit, images, 0)
    want = np.einsum("bhtn,bmn->bhtm", eager[:, :, [0, 7]].detach().double().numpy()[..., 1:], masks.flatten(2).double().numpy())
    with qkhooks.record(vit, modes=None, layers=[0], attention="pooled") as run, torch.no_grad():
        for given in (masks, masks.flatten(2)):
            run(images, meta={"query_tokens": tokens, "pool_masks": given})
            np.testing.assert_allclose(run.attention(0, "pooled").double().numpy(), want, atol=1e-6)
        with pytest.raises(qkhooks.QKHooksError, match=r"on this layer's 4x4 grid; got \(2, 1, 2, 8\), whose 2x8 cells"):
            run(images, meta={"query_tokens": tokens, "pool_masks": masks.reshape(2, 1, 2, 8)})


def test_bad_batching_names_the_option_that_is_wrong(tmp_path):
    from qkhooks.data.sources import refuse_batching
    from qkhooks.stream import record_dataset

    with pytest.raises(qkhooks.QKHooksError) as one:
        record_dataset(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                                         embed_dim=32, depth=1, num_heads=4), "samples", tmp_path / "r.h5", limit=2,
                       progress=False, num_workers=-1)
    assert str(one.value) == ("the loader workers must be a whole number >= 0 (num_workers, --workers; 0 decodes in "
                              "this process), got -1.")
    assert not (tmp_path / "r.h5").exists()
    with pytest.raises(qkhooks.QKHooksError) as both:
        refuse_batching(0, -2)
    assert str(both.value) == ("the batch size must be a whole number >= 1 (batch_size, --batch-size), got 0; the "
                               "loader workers must be a whole number >= 0 (num_workers, --workers; 0 decodes in this "
                               "process), got -2.")
    refuse_batching(1, 0)  # the smallest allowed: no refusal


def test_resuming_a_run_that_ended_with_no_image_is_refused_before_anything_is_written(tmp_path):
    """A run whose data gave no image keeps its statics. Resumed, its first batch has no array to go into (a file in
    SWMR mode cannot gain datasets): refused in the caller's thread with the fix, the file's statics as they were (it
    was refused in the writer thread as "v appears after the run's first batch")."""
    import h5py

    from qkhooks.store import RunWriter
    from qkhooks.store.format import per_image_datasets

    path = tmp_path / "r.h5"
    with RunWriter(path, attrs={"model": "m"}) as writer:
        writer.write_static("spectrum/L0/S_all", np.arange(3.0))
    with pytest.raises(qkhooks.QKHooksError, match=r"ended with no image .* record it again with --overwrite"):
        with RunWriter(path, mode="resume", attrs={"model": "m"}) as writer:
            writer.write_batch(["a"], {"v": torch.zeros(1, 2)})
    with h5py.File(path, "r") as f:
        assert not per_image_datasets(f) and list(f["spectrum/L0/S_all"][:]) == [0.0, 1.0, 2.0]
    with RunWriter(path, mode="overwrite", attrs={"model": "m"}) as writer:  # the fix the refusal names works
        writer.write_batch(["a"], {"v": torch.ones(1, 2)})
    with h5py.File(path, "r") as f:
        assert list(per_image_datasets(f)) == ["v"] and f["v"][:].tolist() == [[1.0, 1.0]]


def test_a_statics_only_resume_refuses_arrays_after_an_ids_only_batch_with_the_same_fix(tmp_path):
    """The statics-only refusal is fixed when the run is opened, not read later off ``committed`` (which the writer
    thread updates): an ids-only batch first (no arrays: it fits the run) leaves a later batch with arrays refused with
    the same fix, not with the layout message of a run whose first batch lacked the array."""
    import h5py

    from qkhooks.store import RunWriter
    from qkhooks.store.format import per_image_datasets

    path = tmp_path / "r.h5"
    with RunWriter(path, attrs={"model": "m"}) as writer:
        writer.write_static("spectrum/L0/S_all", np.arange(3.0))
    with pytest.raises(qkhooks.QKHooksError, match=r"ended with no image .* record it again with --overwrite"):
        with RunWriter(path, mode="resume", attrs={"model": "m"}) as writer:
            writer.write_batch(["a"], {})
            writer.flush()
            assert writer.committed == 1
            writer.write_batch(["b"], {"v": torch.zeros(1, 2)})
    with h5py.File(path, "r") as f:
        assert not per_image_datasets(f)
