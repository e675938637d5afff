"""Round 47 (mutation): kill tests of round 46's library code (module ``round46`` of ``tests/mutation.py``, ``--only
ROUND46``): ``ImageConfig.from_hf`` of a processor object checked against transformers' own pixels and its warning
said whole, repair's statics copy leaving an attribute whose string lies outside the file unread, and the hashes of
images held in memory checked against hashlib."""

from __future__ import annotations

import importlib
import io
import warnings

import h5py
import numpy as np
import pytest
from PIL import Image

from qkhooks.data import ImageConfig

repair_module = importlib.import_module("qkhooks.store.repair")  # the module (qkhooks.store.repair is its function)


def _transformers():
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("torchvision")
    if not hasattr(transformers, "CLIPImageProcessorPil"):
        pytest.skip("transformers 4: no backend attribute to name")
    return transformers


def _photo(width: int, height: int) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


# ------------------------------------------------------------------------------------------------- ImageConfig.from_hf


def test_a_processors_config_crops_where_the_processor_does_where_torchvision_would_start_a_pixel_later():
    """A 303x200 photo: CLIP's PIL processor resizes it to 339x224 and crops 224 from column (339 - 224) // 2 = 57;
    torchvision's rule rounds 57.5 to 58. The config read from the processor (object or dict) makes its pixels.
    Kills from_hf `_293` (the config built without crop="hf": torchvision's offset, one column later)."""
    transformers = _transformers()
    pil = transformers.CLIPImageProcessorPil()
    photo = _photo(303, 200)
    theirs = pil(images=photo, return_tensors="pt")["pixel_values"][0]
    for given in (pil, pil.to_dict()):
        config = ImageConfig.from_hf(given)
        assert (config(photo) - theirs).abs().max().item() <= 1e-6


def test_a_fast_processor_of_transformers_4_names_its_plain_class_as_the_pil_backend():
    """transformers 4 named a torchvision processor ``<Plain>Fast`` and its PIL one ``<Plain>``: the warning names
    ``<Plain>``, not ``<Plain>FastPil``. Kills from_hf `_310` (``endswith("fast")``)."""
    transformers = _transformers()

    class CLIPImageProcessorFast(transformers.CLIPImageProcessor):  # as transformers 4 named it (torchvision)
        pass

    with pytest.warns(UserWarning) as caught:
        ImageConfig.from_hf(CLIPImageProcessorFast())
    message = str(caught[0].message)
    assert "the PIL backend (CLIPImageProcessor), whatever" in message
    assert "use CLIPImageProcessor (AutoImageProcessor" in message and "FastPil" not in message


def test_the_torchvision_backends_warning_is_said_whole():
    """The warning for transformers 5's CLIPImageProcessor (torchvision backend), word for word. Kills from_hf
    `_318`, `_320` (its words' case)."""
    transformers = _transformers()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ImageConfig.from_hf(transformers.CLIPImageProcessor())
    ours = [str(w.message) for w in caught if "ImageConfig.from_hf" in str(w.message)]
    assert ours == [
        "ImageConfig.from_hf(CLIPImageProcessor): this processor runs transformers' torchvision backend, but qkhooks "
        "makes the pixels of the PIL backend (CLIPImageProcessorPil), whatever the processor handed in: resized "
        "photos differ from this processor's by up to one 8-bit level (0.015 after CLIP's normalisation, on 0.3% of "
        "the values of skimage's astronaut; 0.008 on 20% with ViT's bilinear resize of a 457x301 crop of it). To "
        "compare qkhooks' inputs with a processor's, use CLIPImageProcessorPil "
        "(AutoImageProcessor.from_pretrained(..., backend='pil')); pass processor.to_dict() to take the PIL "
        "backend's pixels without this warning."]


# -------------------------------------------------------------------------------------------- repair's statics copy


def test_the_statics_copy_leaves_an_attribute_named_outside_unread_and_names_it(tmp_path):
    """``_copy_statics(..., outside)`` on a healthy file: every group's and static dataset's attributes are copied
    but those named, which are named as lost, one line per object; the datasets are copied whole. Kills repair
    `_copy_statics` `_16` (the copy handed no ``attr_outside``: an AssertionError)."""
    src_path, dst_path = tmp_path / "src.h5", tmp_path / "dst.h5"
    with h5py.File(src_path, "w") as f:
        f.attrs["note"], f.attrs["kept"] = "root", "yes"
        group = f.create_group("model")
        group.attrs["info"], group.attrs["note"] = "{}", "torn"
        ds = f.create_dataset("spectrum/sigma", data=np.arange(6.0))
        ds.attrs["note"], ds.attrs["unit"] = "torn", "1"
    problems: list[str] = []
    with h5py.File(src_path, "r") as src, h5py.File(dst_path, "w") as dst:
        repair_module._copy_statics(src, dst, problems, {"note"})
    assert sorted(problems) == [f"/{name} attribute note lost: its string lies past the file's end"
                                for name in ("model", "spectrum/sigma")]
    with h5py.File(dst_path, "r") as f:
        assert dict(f["model"].attrs) == {"info": "{}"}
        assert dict(f["spectrum/sigma"].attrs) == {"unit": "1"}
        assert f["spectrum/sigma"][()].tolist() == list(np.arange(6.0))


# ----------------------------------------------------------------------------------------- images held in memory


def _pil_reference(image: Image.Image, orientation: int) -> int:
    """hashlib's BLAKE2b (8 bytes, little-endian signed, -1 stored as -2) of a PIL image's mode, size, palette,
    transparency and EXIF orientation, then its pixel bytes: what round 46 says a list's PIL image is stored with."""
    import hashlib

    head = (f"PIL {image.mode} {image.size} {image.getpalette()} {image.info.get('transparency')!r} "
            f"{orientation}").encode()
    value = int.from_bytes(hashlib.blake2b(head + image.tobytes(), digest_size=8).digest(), "little", signed=True)
    return -2 if value == -1 else value


def test_a_pil_images_transparency_and_orientation_are_part_of_its_hash():
    """The same palette pixels with and without a transparent index, and the same RGB pixels with and without EXIF
    orientation 6, are four images (each decodes to other RGB pixels): four hashes, each hashlib's. Kills readers
    `_held_hash` `_29` (the transparency left out: ``info.get(None)``)."""
    readers = importlib.import_module("qkhooks.data.readers")
    palette = Image.fromarray(np.arange(16, dtype=np.uint8).reshape(4, 4), "L").convert("P")
    transparent = palette.copy()
    transparent.info["transparency"] = 3
    rgb = _photo(4, 4)
    turned = rgb.copy()
    turned.getexif()[0x0112] = 6
    cases = [(palette, 1), (transparent, 1), (rgb, 1), (turned, 6)]
    hashes = [readers._held_hash(image) for image, _ in cases]
    assert hashes == [_pil_reference(image, orientation) for image, orientation in cases]
    assert len(set(hashes)) == 4


def _blake(data: bytes) -> int:
    import hashlib

    value = int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little", signed=True)
    return -2 if value == -1 else value


def test_a_hugging_face_datasets_held_hashes_reach_past_the_first_slice_of_rows():
    """600 rows of Image cells holding bytes (three of the reader's 256-row slices) and a binary cell's: each row's
    (position, BLAKE2b of its bytes), up to the position asked, hashlib's. Kills readers `_named_cells` `_22`
    (``range(0, step)``: the rows past the first slice never read, so a resume over the same data refused)."""
    from qkhooks.data import open_source

    datasets = pytest.importorskip("datasets")
    cells = []
    for i in range(600):  # 600 distinct 2x2 PNGs
        buffer = io.BytesIO()
        Image.fromarray(np.full((2, 2, 3), (i % 256, i // 256, 7), np.uint8)).save(buffer, "PNG")
        cells.append(buffer.getvalue())
    ds = datasets.Dataset.from_dict({"image": [{"bytes": b, "path": None} for b in cells]},
                                    features=datasets.Features({"image": datasets.Image()}))
    source = open_source(ds, ImageConfig(size=(16, 16), mean=(0.5,) * 3, std=(0.5,) * 3))
    assert source.held_hashes(600) == [(str(i), _blake(b)) for i, b in enumerate(cells)]
    assert source.held_hashes(300) == [(str(i), _blake(b)) for i, b in enumerate(cells[:300])]


# ------------------------------------------------------------------------------------------ reducer states in a file


def test_reducer_states_written_into_a_file_read_back_as_written(tmp_path):
    """States written into a file as a merge writes them (``write_states_into``: ``current`` names the slot, its
    ``scalars`` the JSON) read back with their arrays, the image count apart; a group without a slot named, or a slot
    without scalars, is no state. Kills format `_states_inside` `_20` (``not`` dropped: every state skipped)."""
    from qkhooks.store import format as fmt

    path = tmp_path / "states.h5"
    with h5py.File(path, "w") as f:
        fmt.write_states_into(f, {"topk": {"count": 3, "values": np.arange(4.0)}, "mean": {"n": 2}}, images=5)
        f[fmt.REDUCERS].create_group("unnamed").create_group("a")  # no "current"
        group = f[fmt.REDUCERS].create_group("empty")
        group.create_group("a")
        group.attrs["current"] = "a"  # a slot without scalars
    with h5py.File(path, "r") as f:
        images, states = fmt.read_states(f, path)
    assert images == 5 and sorted(states) == ["mean", "topk"]
    assert states["mean"] == {"n": 2}
    assert states["topk"]["count"] == 3 and states["topk"]["values"].tolist() == [0.0, 1.0, 2.0, 3.0]


# ------------------------------------------------------------------------------------------ a resume's held images


def test_a_resume_where_a_kept_image_held_as_bytes_is_now_an_array_is_refused(tmp_path):
    """A run of a Hugging Face dataset of PNG bytes (each image's hash recorded), resumed over the same images as
    array cells (no bytes, so no hash now): every kept image is named as holding other bytes, none let through
    unchecked. Kills stream `_held_or_file_hashes` `_21` (an id with no hash now read as ``int(None)``)."""
    import qkhooks
    from qkhooks import QKHooksError
    from test_review_symlinks_repair_messages import _KW, _interrupted
    from test_spectrum_edits_and_dataparallel import _tiny_loaded
    from test_resume_hf_image_bytes import _hf, _pngs

    datasets = pytest.importorskip("datasets")
    loaded, run = _tiny_loaded(), tmp_path / "run.h5"
    _interrupted(loaded, run, batches=3, data=_hf(_pngs(0)))
    arrays = [np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in _pngs(0)]
    as_arrays = datasets.Dataset.from_dict(
        {"image": arrays}, features=datasets.Features({"image": datasets.Array3D((16, 16, 3), "uint8")})).with_format("numpy", dtype=np.uint8)
    with pytest.raises(QKHooksError, match=r"(\d+) of the \1 images it keeps hold other bytes .*first: '0'"):
        qkhooks.record_dataset(loaded, as_arrays, run, resume=True, **_KW)


def test_the_warning_that_held_images_without_a_hash_are_not_checked_is_said_whole(tmp_path):
    """A run of a Hugging Face dataset's bytes recorded without their hashes (as before round 46) resumes with the
    warning, word for word. Kills stream `_refuse_changed_stream_files` `_98`, `_103` (its words)."""
    import re

    import qkhooks
    from qkhooks.store import format as fmt
    from test_review_symlinks_repair_messages import _KW, _interrupted
    from test_spectrum_edits_and_dataparallel import _tiny_loaded
    from test_resume_hf_image_bytes import _hf, _pngs

    pytest.importorskip("datasets")
    loaded, run = _tiny_loaded(), tmp_path / "run.h5"
    _interrupted(loaded, run, batches=3, data=_hf(_pngs(0)))
    with h5py.File(run, "r+") as f:  # as a qkhooks from before round 46 wrote it
        f[fmt.FILE_HASHES][...] = -1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qkhooks.record_dataset(loaded, _hf(_pngs(0)), run, resume=True, **_KW)
    said = [str(w.message) for w in caught if "this resume does not check" in str(w.message)]
    assert len(said) == 1
    whole = (re.escape(f"{run}: this resume does not check ") + r"(\d+) of the \1"
             + re.escape(" images it keeps (first: '0'): they are held in datasets:Dataset (not files) and the run "
                         "holds no hash of their bytes (recorded by a qkhooks from before it hashed them, or a Hugging "
                         "Face dataset's array cells, which are not hashed), so images replaced since would go on "
                         "under the kept images' ids. Record into a new --out (or --overwrite) to have every kept "
                         "image checked on a later resume."))
    assert re.fullmatch(whole, said[0]), said[0]


# ------------------------------------------------------------------------------------------------ an overwrite's file


def test_an_overwrite_records_the_new_run_with_every_chunk_index_before_its_first_chunk(tmp_path):
    """A run recorded with ``overwrite=True`` over an older one of other images: the file holds the new run's
    images, read back, and its per-image arrays' chunk indexes lie before their first chunk, as a new run's (the
    overwrite's SWMR session opened with the same metadata blocks). Kills writer `_publish` `_18` (the overwrite's
    file reopened as None)."""
    import qkhooks
    from qkhooks.store import format as fmt
    from test_spectrum_edits_and_dataparallel import _tiny_loaded
    from test_resume_in_memory_images import _arrays, _reference
    from test_run_file_metadata_blocks import test_every_per_image_arrays_chunk_index_lies_before_its_first_chunk

    loaded, run = _tiny_loaded(), tmp_path / "run.h5"
    qkhooks.record_dataset(loaded, _arrays(0, 4), run, layers="0", modes=2, batch_size=2, progress=False)
    new = _arrays(1, 6)
    qkhooks.record_dataset(loaded, new, run, layers="0", modes=2, batch_size=2, progress=False, overwrite=True)
    with qkhooks.open_run(run) as opened:
        assert opened.n == 6 and opened.complete and list(opened.ids) == [str(i) for i in range(6)]
        assert opened.array(fmt.FILE_HASHES)[:].tolist() == [_reference(a) for a in new]  # the new run's images
    test_every_per_image_arrays_chunk_index_lies_before_its_first_chunk(run)


def test_the_metadata_block_holds_every_arrays_index_in_whole_4_kib():
    """``meta_block_bytes(n)``: 16 KiB, or n indexes of 512 bytes rounded up to whole 4 KiB where that is more, for
    every count up to 5,000 arrays (a ceiling by integers). Kills `_hdf5.meta_block_bytes` `_11` (``// 4097``:
    one 4 KiB short from 4,097 arrays on)."""
    from qkhooks.store._hdf5 import meta_block_bytes

    for arrays in range(5001):
        room = arrays * 512
        whole = (room + 4095) // 4096 * 4096
        assert meta_block_bytes(arrays) == max(16 * 1024, whole), arrays


def test_a_transformers_4_processor_without_a_backend_is_read_by_its_class_name():
    """transformers 4's processors name no backend: a ``...Fast`` class runs torchvision (taken with the warning),
    the plain class PIL (no warning). Kills `_hf_backend` `_14` (the class name not read: no warning), `_18` (the
    plain class not "pil": a warning)."""
    transformers = _transformers()

    class CLIPImageProcessorFast(transformers.CLIPImageProcessor):  # transformers 4: no backend attribute
        backend = None

    class CLIPImageProcessor(transformers.CLIPImageProcessor):
        backend = None

    with pytest.warns(UserWarning, match=r"runs transformers' torchvision backend.*\(CLIPImageProcessor\)"):
        fast = ImageConfig.from_hf(CLIPImageProcessorFast())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain = ImageConfig.from_hf(CLIPImageProcessor())
    assert fast == plain == ImageConfig.from_hf(transformers.CLIPImageProcessorPil().to_dict())


def test_rows_past_a_datasets_end_are_said_in_the_singular_for_one():
    """Repair's note for an array cut shorter than the committed count: "row 7 is", "rows 5-7 are". Kills repair
    `_past_the_end` `_11` ("IS")."""
    assert repair_module._past_the_end("/b", 7, 8) == "/b: row 7 is past its end (it has 7 rows, 8 images are committed)"
    assert repair_module._past_the_end("/a", 5, 8) == ("/a: rows 5-7 are past its end (it has 5 rows, 8 images are "
                                                       "committed)")


def test_rows_whose_string_was_never_written_hold_no_collection_to_name(tmp_path):
    """A chunk of ids written in part: its unwritten rows hold null references (address 0, h5py reads b""), in no
    heap collection, so ``unreadable_strings`` (round 50: moved from repair to _hdf5) names none of them (nor the written ones: their collection is whole).
    Kills repair `_strings_outside` `_91` (``address >= 0``: the null references' rows named as outside)."""
    path = tmp_path / "ids.h5"
    with h5py.File(path, "w", libver="latest") as f:
        ds = f.create_dataset("ids", (8,), maxshape=(None,), chunks=(8,), dtype=h5py.string_dtype())
        ds[:4] = ["a", "b", "c", "d"]
    with h5py.File(path, "r") as f:
        assert f["ids"][4:].tolist() == [b""] * 4  # null references read as empty strings
        assert repair_module.unreadable_strings(f["ids"], 8, path, path.stat().st_size) == set()
