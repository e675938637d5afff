"""Round 33's review findings, each fixed: the test states the exact value or the refusal, against an independent
reference (the model's own patch grid, a direct computation, the repaired file's rows against the original's)."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import timm
import torch
import transformers

import qkhooks
from qkhooks.errors import QKHooksError


@torch.no_grad()
def test_detection_tokens_after_the_patches_are_not_read_as_a_row_of_the_native_grid():
    """YOLOS on a 24x32 image: its patch convolution makes 3x4 patches, then 4 detection tokens: 16 tokens after
    CLS, the native 4x4 grid's count. Round 32 read them as that grid (default rows at its centre, token 11)."""
    torch.manual_seed(0)
    config = transformers.YolosConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                      patch_size=8, image_size=[32, 32], num_detection_tokens=4)
    model = transformers.YolosModel(config).eval()
    own = {}
    handle = model.embeddings.patch_embeddings.projection.register_forward_hook(
        lambda mod, a, out: own.__setitem__("grid", tuple(out.shape[-2:])))
    try:
        with qkhooks.record(model, modes=2, attention="full") as run:
            model(torch.randn(1, 3, 24, 32))
    finally:
        handle.remove()
    assert own["grid"] == (3, 4) and run.geometry(0).grid is None  # no grid claimed for 1 + 12 + 4 tokens
    with pytest.raises(QKHooksError, match=r"grid is 3x4 \(12 patches\), but 16 tokens follow the 1 prefix tokens"):
        run.sites[0].grid_for(17)
    with pytest.raises(QKHooksError, match=r"grid is 3x4"):  # the default rows need the centre patch of a grid
        with qkhooks.record(model, modes=2, attention="rows"):
            model(torch.randn(1, 3, 24, 32))


@torch.no_grad()
def test_dropped_patches_are_refused_a_grid_and_patch_dropout_is_named_in_the_training_warning():
    """timm's PatchDropout keeps 16 of a 5x5 grid's 25 patches (the native 4x4 count) in random order: no grid for
    them, and the training-mode warning names it (round 32 said nothing and claimed 4x4)."""
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                              depth=1, num_heads=2, dynamic_img_size=True, patch_drop_rate=0.36, num_classes=3).train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with qkhooks.record(model, modes=2) as run:
            model(torch.randn(1, 3, 40, 40))
    assert any("patch_drop (PatchDropout p=0.36)" in str(w.message) for w in caught), [str(w.message) for w in caught]
    assert run.query(0).shape[-1] == 17 and run.geometry(0).grid is None
    with pytest.raises(QKHooksError, match=r"grid is 5x5 \(25 patches\), but 16 tokens follow"):
        run.sites[0].grid_for(17)


@torch.no_grad()
def test_tokens_made_outside_the_recording_get_no_native_grid_of_their_count():
    """HF ViT: embeddings of a 16x64 image (2x8 patches, interpolated) made before the recording, its layers run inside:
    the patch embedding did not run in the recorded call, so the native 4x4 grid (same count) is not claimed; the
    whole forward reads its own 2x8."""
    torch.manual_seed(0)
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                    patch_size=8, image_size=32)
    model = transformers.ViTModel(config).eval()
    image = torch.randn(1, 3, 16, 64)
    tokens = model.embeddings(image, interpolate_pos_encoding=True)
    with pytest.raises(QKHooksError, match=r"its patch embedding did not run in this recorded call"):
        with qkhooks.record(model, modes=2, attention="rows"):
            for layer in model.layers if hasattr(model, "layers") else model.encoder.layer:  # transformers 5, 4
                tokens = layer(tokens)
    with qkhooks.record(model, modes=2, attention="rows") as run:
        model(image, interpolate_pos_encoding=True)
    assert run.geometry(0).grid == (2, 8) and run.last.meta["query_tokens"].tolist() == [[0, 1 + 1 * 8 + 4]]


def test_a_given_spectrum_of_the_other_form_is_refused():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                              depth=1, num_heads=2, qkv_bias=True).eval()
    plain = qkhooks.spectrum(model)
    with pytest.raises(QKHooksError, match=r"record\(augmented=True\) asks for the bias-augmented form, but the "
                                           r"spectrum given \(spectrum=\) is of the bias-free one"):
        qkhooks.record(model, modes=2, augmented=True, spectrum=plain)
    with pytest.raises(QKHooksError, match=r"bias-free form, but the spectrum given .* bias-augmented one"):
        qkhooks.record(model, modes=2, spectrum=qkhooks.spectrum(model, augmented=True))
    with qkhooks.record(model, modes=2, augmented=True, spectrum=qkhooks.spectrum(model, augmented=True)) as run:
        with torch.no_grad():
            model(torch.randn(1, 3, 32, 32))
    assert run.spectrum(0).augmented


def test_rope_tables_that_differ_between_heads_are_refused_not_read_off_the_first():
    """RoPE-Mixed with 3 heads: head 2 shares head 0's frequencies, head 1 does not. Round 32 compared only the first
    and last entry and built every head's bands on head 0's angles (off by 0.9 on a logit scale of 3)."""
    from qkhooks.models.rope import _cos_sin

    cos = torch.rand(3, 5, 4)
    sin = torch.rand(3, 5, 4)
    same = (cos[:1].expand(3, 5, 4).clone(), sin[:1].expand(3, 5, 4).clone())
    assert torch.equal(_cos_sin(same)[0], cos[0].double())
    middle = (same[0].clone(), same[1].clone())
    middle[0][1] += 0.5  # only the middle head differs
    with pytest.raises(QKHooksError, match=r"differ along their leading axis of 3 \(images of the batch, or heads"):
        _cos_sin(middle)
    middle_sin = (same[0].clone(), same[1].clone())
    middle_sin[1][1] -= 0.25  # the sines alone
    with pytest.raises(QKHooksError, match="differ along their leading axis"):
        _cos_sin(middle_sin)


def test_a_block_mask_is_refused_naming_it_where_it_crashed():
    from qkhooks.models.base import additive_mask

    class BlockMask:  # what flex_attention hands a module: no dtype, no tensor
        pass

    with pytest.raises(QKHooksError, match=r"a BlockMask, not a tensor .* attn_implementation 'sdpa' or 'eager'"):
        additive_mask(BlockMask())
    mask = torch.tensor([[True, False]])
    assert torch.equal(additive_mask(mask), torch.tensor([[0.0, torch.finfo(torch.float32).min]]))


def _bfd_model(name: str, **kw):
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, patch_size=8, embed_dim=32, depth=1, num_heads=2, img_size=32,
                             **kw).eval()


def test_bfd_says_when_the_model_adds_a_relative_position_table_the_energies_leave_out():
    """timm vit_relpos adds a position-only table to each layer's logits (rec.bias gives it, nonzero): the BFD result
    names the layer content-only with that reason; a plain ViT gets no such variant. Round 32 said nothing."""
    from qkhooks.analysis.bfd import run_bfd

    images = torch.randn(4, 3, 32, 32)
    relpos = _bfd_model("vit_relpos_small_patch16_224")
    with qkhooks.record(relpos, modes=2) as run, torch.no_grad():
        relpos(images[:1])
    assert run.bias(0).abs().max() > 0
    result = run_bfd(relpos, images, None, batch_size=4, decode=False, per_mode=False)
    assert "relative-position table" in result["content_only_layers"]["0"]
    assert result["variant"].startswith("content-only") and "relative-position table" in result["variant"]
    plain = run_bfd(_bfd_model("vit_tiny_patch16_224"), images, None, batch_size=4, decode=False, per_mode=False)
    assert "variant" not in plain and "content_only_layers" not in plain


def test_bfd_refuses_a_second_pass_over_other_images():
    """A dataset with a random crop hands pass 2 other tokens than pass 1: the content factor's mean, zero up to
    rounding over the same tokens (checked here too, ~1e-16), is far from it; the run is refused, not summarised."""
    from PIL import Image

    from qkhooks.analysis.bfd import run_bfd
    from qkhooks.analysis.bfd_summary import PASS_TOLERANCE
    from qkhooks.models.load import load_model

    rng = np.random.default_rng(0)
    photos = [Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)) for _ in range(4)]

    class Cropped(torch.utils.data.Dataset):
        def __init__(self, random: bool):
            self.random, self.rng = random, np.random.default_rng(1)

        def __len__(self):
            return len(photos)

        def __getitem__(self, i):
            x0 = int(self.rng.integers(0, 16)) if self.random else 8
            return {"image": photos[i].crop((x0, x0, x0 + 32, x0 + 32)), "id": f"p{i}"}

    loaded = load_model(_bfd_model("vit_tiny_patch16_224"),
                        image_config=qkhooks.data.ImageConfig(size=(32, 32), mean=(0.5,) * 3, std=(0.5,) * 3))
    same = run_bfd(loaded, Cropped(False), None, batch_size=2, decode=False, per_mode=False, num_workers=0)
    assert same["layers"][0]["checks"]["content_mean"] < 1e-12 < PASS_TOLERANCE
    with pytest.raises(QKHooksError, match=r"BFD layer 0: the second pass did not see the tokens the first did"):
        run_bfd(loaded, Cropped(True), None, batch_size=2, decode=False, per_mode=False, num_workers=0)


def test_repair_of_a_cut_file_recovers_its_readable_images_where_it_raised(tmp_path):
    """A run file cut short: HDF5 can fail to say where a chunk lies (a RuntimeError round 32's repair did not catch,
    so it wrote nothing). The repaired file holds the images whose rows still read, each equal to the original's."""
    import shutil

    from qkhooks.data import ImageConfig
    from qkhooks.models.load import load_model
    from qkhooks.store import open_run
    from qkhooks.store import repair as repair_run
    from qkhooks.stream import record_dataset

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                              depth=2, num_heads=2).eval()
    whole = tmp_path / "whole.h5"
    record_dataset(load_model(model, image_config=ImageConfig(size=(32, 32), mean=(0.5,) * 3, std=(0.5,) * 3)),
                   "samples", whole, limit=8, batch_size=1, progress=False, modes=2, attention="rows", checksum=True)
    with open_run(whole) as run:
        originals = {i: np.asarray(run.array("modes/L1/query")[k]) for k, i in enumerate(run.ids)}
    recovered_any = False
    for fraction in (0.3, 0.45, 0.6, 0.75, 0.9):
        cut = tmp_path / f"cut{int(fraction * 100)}.h5"
        shutil.copy(whole, cut)
        os.truncate(cut, int(os.path.getsize(whole) * fraction))
        fixed = tmp_path / f"fixed{int(fraction * 100)}.h5"
        try:
            repair_run(cut, fixed)  # raised a bare RuntimeError for cuts of 10-97 %
        except QKHooksError as err:  # a cut through the ids themselves: nothing to recover, said so
            assert "no image can be recovered" in str(err) and not fixed.exists()
            continue
        with open_run(fixed) as run:
            for k, image in enumerate(run.ids):
                np.testing.assert_array_equal(np.asarray(run.array("modes/L1/query")[k]), originals[image])
            recovered_any |= len(run.ids) > 0
    assert recovered_any


def test_the_modes_summary_says_when_the_anisotropy_baseline_covers_fewer_images_than_the_run():
    from qkhooks.analysis.modes import _baseline_images_note

    state = {"layers": np.array([0, 11]), "count": np.array([16, 16]), "sum": np.zeros((2, 4))}
    assert _baseline_images_note(state, 22) == ("; the baseline covers 16 of the run's 22 images: the reducer checkpoint "
                                                "was written before the run stopped; resume the run (--resume) to "
                                                "fold in the rest.")
    assert _baseline_images_note(state, 16) == ""


def test_a_checksummed_runs_spectra_carry_checksums_so_a_flipped_bit_is_found_not_read(tmp_path):
    """--checksum covered the per-image arrays only: one flipped exponent bit in /spectrum/L0/cos_all changed a
    cosine by 4x and verify called the run intact. Now verify names the array and a read refuses it."""
    import h5py

    from qkhooks.data import ImageConfig
    from qkhooks.models.load import load_model
    from qkhooks.store import open_run, verify_run
    from qkhooks.stream import record_dataset

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                              depth=1, num_heads=2).eval()
    path = tmp_path / "run.h5"
    record_dataset(load_model(model, image_config=ImageConfig(size=(32, 32), mean=(0.5,) * 3, std=(0.5,) * 3)),
                   "samples", path, limit=2, batch_size=2, progress=False, modes=2, checksum=True)
    assert verify_run(path).ok
    with h5py.File(path, "r") as f:
        ds = f["spectrum/L0/cos_all"]
        assert ds.fletcher32 and ds.chunks == ds.shape
        offset = ds.id.get_chunk_info(0).byte_offset
    with open(path, "r+b") as handle:
        handle.seek(offset + 3)
        byte = handle.read(1)[0]
        handle.seek(offset + 3)
        handle.write(bytes([byte ^ 0x40]))
    report = verify_run(path)
    assert not report.ok and report.problems[0].startswith("/spectrum/L0/cos_all unreadable")
    with pytest.raises(QKHooksError, match=r"is damaged \(HDF5 cannot read it: .*\): run `qkhooks repair"):
        with open_run(path) as run:
            run.spectrum(0)


def merged_shards(tmp_path):
    """(loaded model, photo folder, its rng, merged view, its two shards, record options): 4 photos recorded in two
    shards and merged into a view beside them."""
    from PIL import Image

    from qkhooks.distributed import merge_shards, shard_path
    from qkhooks.stream import record_dataset

    torch.manual_seed(0)
    loaded = qkhooks.load_model(timm.create_model("vit_small_patch16_224", pretrained=False, patch_size=32,
                                                  embed_dim=32, depth=1, num_heads=2).eval())
    folder, rng = tmp_path / "photos", np.random.default_rng(0)
    folder.mkdir()
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / f"p{i}.png")
    out, kw = tmp_path / "m.h5", dict(modes=2, batch_size=2, reducers=[], progress=False)
    shards = [shard_path(out, r, 2) for r in range(2)]
    for r, p in enumerate(shards):
        record_dataset(loaded, str(folder), p, shard=(r, 2), **kw)
    merge_shards(out)
    return loaded, folder, rng, out, shards, kw


def test_a_merged_view_refuses_a_shard_rewritten_by_another_run(tmp_path):
    """A merged view reads its images from the shard files beside it. A rerun that rewrote one shard (killed before
    the view was merged again) left the old view reading the new run's rows as its own, verify saying intact. Now the
    view knows each shard's run id: a read refuses and verify names the rows; merging again reads the new run."""
    from PIL import Image

    from qkhooks.distributed import merge_shards
    from qkhooks.store import open_run, verify_run
    from qkhooks.stream import record_dataset

    loaded, folder, rng, out, shards, kw = merged_shards(tmp_path)
    with open_run(out) as run:
        first = np.asarray(run.query(0)[:])
    assert verify_run(out).ok
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / "p3.png")  # a photo replaced
    record_dataset(loaded, str(folder), shards[1], shard=(1, 2), overwrite=True, **kw)  # the rerun's rank 1 only
    with open_run(shards[1]) as shard:
        rewritten = np.asarray(shard.query(0)[:])
    assert not np.array_equal(rewritten, first[2:])  # the new run's rows differ: reading them would be a wrong number
    with pytest.raises(QKHooksError, match=r"its shard\(s\) m.rank1-of-2.h5 now hold another run than the one merged"):
        with open_run(out) as run:
            run.query(0)[:]
    report = verify_run(out)
    assert not report.ok and any("holds another run than the one merged" in p for p in report.problems)
    merge_shards(out, overwrite=True)
    with open_run(out) as run:
        np.testing.assert_array_equal(np.asarray(run.query(0)[:]), np.concatenate([first[:2], rewritten]))


def test_bfd_labels_numerically_null_modes_null_and_leaves_them_out_of_the_claims():
    """Head 0's W_q with 4 of its 16 rows zero: W_q^T W_k has rank 12 there (numpy's SVD), so its last 4 modes are
    null (vectors not fixed by the weights). Round 32 labelled them CC/CP/PC/PP and counted them in the claims."""
    from qkhooks.analysis.bfd import paper_claims, run_bfd

    model = _bfd_model("vit_tiny_patch16_224")
    dk, d = 16, 32
    with torch.no_grad():
        model.blocks[0].attn.qkv.weight[:4] = 0  # head 0's first 4 query rows
    w = model.blocks[0].attn.qkv.weight.detach().double().numpy()
    ranks = [np.linalg.matrix_rank(w[h * dk:(h + 1) * dk].T @ w[d + h * dk:d + (h + 1) * dk]) for h in range(2)]
    assert ranks == [12, 16]
    result = run_bfd(model, torch.randn(4, 3, 32, 32), None, batch_size=4, decode=False, per_mode=True)
    heads = result["layers"][0]["heads"]
    assert [len(h["modes"]) for h in heads] == [dk, dk]
    assert [[m["null"] for m in h["modes"]].count(True) for h in heads] == [dk - 12, dk - 16]
    assert all(m["label"] == "null" for h in heads for m in h["modes"] if m["null"])
    assert all(m["label"] in ("CC", "CP", "PC", "PP") for h in heads for m in h["modes"] if not m["null"])
    sentence = next(s for s in paper_claims(result)["sentences"] if s.startswith("Mode labels"))
    assert sentence.startswith("Mode labels over 28 modes") and "(4 numerically null modes left out" in sentence


def test_damage_that_h5py_reports_as_none_or_bad_json_is_one_qkhookserror_naming_repair(tmp_path):
    """Two reads that raised raw Python errors on a damaged file: a spectrum array whose object header does not read
    (h5py hands None: TypeError) and an attribute's JSON that no longer parses (JSONDecodeError)."""
    import h5py

    from qkhooks.data import ImageConfig
    from qkhooks.models.load import load_model
    from qkhooks.store import open_run
    from qkhooks.stream import record_dataset

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                              depth=1, num_heads=2).eval()
    path = tmp_path / "run.h5"
    record_dataset(load_model(model, image_config=ImageConfig(size=(32, 32), mean=(0.5,) * 3, std=(0.5,) * 3)),
                   "samples", path, limit=2, batch_size=2, progress=False, modes=2)
    with h5py.File(path, "r+") as f:
        info = f["model"].attrs["info"]
        f["model"].attrs["info"] = (info.decode() if isinstance(info, bytes) else info)[:-7] + "\x02\x01}"
    with open_run(path) as run:
        with pytest.raises(QKHooksError, match=r"is damaged \(an attribute's JSON does not parse .*qkhooks repair"):
            run.info
        with pytest.raises(QKHooksError, match=r"is damaged .*qkhooks repair"):
            run.query(0)[:]

    with h5py.File(path, "r+") as f:
        f["model"].attrs["info"] = info  # mended: the second damage alone

    class _Group(dict):  # what h5py hands for a group whose member's header is damaged: the member as None
        pass

    with open_run(path) as run:
        real = run.file.get
        run.file.get = lambda name, default=None: (_Group(U=None) if name == "spectrum/L0" else real(name, default))
        with pytest.raises(QKHooksError, match=r"spectrum/L0/U cannot be opened \(its object header does not read\)"):
            run.spectrum_arrays(0)


def test_reading_after_a_checkpointed_backward_names_the_recomputation_not_a_failed_forward():
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                              depth=2, num_heads=2, num_classes=3)
    model.set_grad_checkpointing(True)
    model.train()  # no dropout configured: the forward is deterministic
    images = torch.randn(2, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with qkhooks.record(model, modes=2, attention="full") as run:
            model(images).sum().backward()
            with pytest.raises(QKHooksError, match=r"last ran inside backward\(\), recomputed by gradient checkpointing"):
                run.attention(0, "full")
            with torch.no_grad():
                model(images)
            maps = run.attention(0, "full")  # a forward completes again: its batch reads
    assert maps.shape == (2, 2, 17, 17) and torch.allclose(maps.sum(-1), torch.ones(2, 2, 17), atol=1e-5)


def test_a_query_key_pair_of_any_module_type_is_seen_as_attention_and_named_in_the_refusal():
    """iFormer's SHMA makes q and k with conv + norm blocks in a class not named like attention: it was neither found
    nor named ("saw no attention-like module"), so beside modelled layers it could have been left out unnamed."""
    from torch import nn

    from qkhooks.models.unsupported import attention_like

    class ConvNorm(nn.Sequential):
        def __init__(self):
            super().__init__(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8))

    class Mixer(nn.Module):  # softmax(q·k) of conv-norm q and k, as SHMA
        def __init__(self):
            super().__init__()
            self.q, self.k, self.proj = ConvNorm(), ConvNorm(), nn.Conv2d(8, 8, 1)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.mixer, self.mlp = Mixer(), nn.Sequential(nn.Linear(8, 8))

    assert [name for name, _ in attention_like(Net())] == ["mixer"]
    with pytest.raises(QKHooksError, match=r"'mixer' \(Mixer; children: q, k, proj\): no registered adapter"):
        qkhooks.sites(Net())
