"""Round 46 (mutation): kill tests of round 45's library code (module ``round45``, ``--only ROUND45``): repair's reading
of attribute messages off the raw bytes (``_hdf5.attribute_message``, ``dataspace_count``: repair's ``_attr_message``,
``_dataspace_count`` until round 51), checked against what h5py reads of the same attributes, and the whole words
of round 45's refusals (processor configs, decoding workers)."""

from __future__ import annotations

import importlib
import pickle
import warnings
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from qkhooks.data import ImageConfig, open_dataset, open_source
from qkhooks.errors import QKHooksError
from qkhooks.store import _hdf5

repair_module = importlib.import_module("qkhooks.store.repair")  # the module (qkhooks.store.repair is its function)

_STRINGS = h5py.string_dtype()


def _attribute_file(path: Path) -> dict[str, int]:
    """A file laid out as qkhooks writes it (libver latest: version-3 attribute messages, a version-2 superblock and
    dataspaces), with string attributes of every dataspace kind, then two a user adds with h5py's default (version-1
    messages, each part padded to 8 bytes); each attribute's element count as h5py reads it."""
    with h5py.File(path, "w", libver="latest") as f:
        f.attrs["empty"] = h5py.Empty(_STRINGS)
        f.attrs["three"] = np.array(["a", "b", "c"], dtype=_STRINGS)
        f.attrs["scalar"] = "s"
        f.attrs["grid"] = np.array([["a", "b", "c"], ["d", "e", "f"]], dtype=_STRINGS)
        f.attrs["long"] = "n" * 3000
    with h5py.File(path, "a") as f:
        f.attrs["user"] = np.array(["u"] * 5, dtype=_STRINGS)
        f.attrs["user_empty"] = h5py.Empty(_STRINGS)
    with h5py.File(path, "r") as f:
        spaces = {name: f.attrs.get_id(name).get_space() for name in f.attrs}
        return {name: 0 if space.get_simple_extent_type() == h5py.h5s.NULL else space.get_simple_extent_npoints()
                for name, space in spaces.items()}


def _message(data: bytes, name: str) -> tuple[int, tuple[int, int, int] | None]:
    encoded = name.encode() + b"\0"
    at = data.find(encoded, 8)
    return at, _hdf5.attribute_message(data, at, len(encoded))


def test_each_attribute_message_is_found_and_its_element_count_is_the_one_h5py_reads(tmp_path):
    """Every attribute message, of qkhooks' layout (version 3) and h5py's default (version 1), is found before its name,
    and its dataspace gives the element count h5py reads: 0 for an empty (null) attribute, whose data is no reference
    to read, 1 for a scalar, the product of the dimensions for an array."""
    path = tmp_path / "attrs.h5"
    counts = _attribute_file(path)
    assert counts == {"empty": 0, "three": 3, "scalar": 1, "grid": 6, "long": 1, "user": 5, "user_empty": 0}
    data = path.read_bytes()
    for name, count in counts.items():
        _, parts = _message(data, name)
        assert parts is not None, name
        assert data[parts[0]] & 0x0F == 9, name  # a variable-length datatype, read where it is
        assert _hdf5.dataspace_count(data, parts[1], 8) == count, name


def test_an_attribute_name_the_hdf5_library_marks_utf8_is_read_like_an_ascii_one(tmp_path):
    """A version-3 attribute message's byte 8 is its name's character set, 0 (ASCII, what h5py writes) or 1 (UTF-8, as
    the HDF5 library writes with H5Pset_char_encoding): both are attribute messages, so an attribute written by
    another tool whose string a cut tore is found too (else HDF5 would be asked for it, and spin)."""
    path = tmp_path / "attrs.h5"
    _attribute_file(path)
    data = bytearray(path.read_bytes())
    at, parts = _message(bytes(data), "long")
    assert data[at - 9] == 3 and data[at - 1] == 0 and parts is not None  # version 3, ASCII
    data[at - 1] = 1  # the same message with its name marked UTF-8
    utf8 = tmp_path / "utf8.h5"
    utf8.write_bytes(bytes(data))
    assert _hdf5.attribute_message(bytes(data), at, len(b"long\0")) == parts
    collection = bytes(data).find(b"GCOL")
    cut = collection + 64  # told of a file cut 64 bytes into the collection that holds the strings (nothing is cut)
    assert int.from_bytes(data[collection + 8:collection + 16], "little") > 64
    found = repair_module._attrs_outside(utf8, {"long", "three"}, cut)
    assert "long" in found
    data[at - 1] = 2  # no character set HDF5 defines: no attribute message
    assert _hdf5.attribute_message(bytes(data), at, len(b"long\0")) is None


def test_bytes_giving_a_datatype_of_no_bytes_are_no_attribute_message():
    """An attribute message's datatype part is at least its 8-byte header: bytes before a name that give it 0 bytes
    are data that happen to look like a header, not a message (its "datatype" would be the dataspace's bytes)."""
    name = b"note\0"
    sizes = (len(name), 0, 8)  # name, datatype (none), dataspace
    head = bytes([3, 0]) + b"".join(s.to_bytes(2, "little") for s in sizes) + bytes([0])
    data = b"\0" * 16 + head + name + bytes([2, 1, 1, 1]) + (4).to_bytes(8, "little") + b"\0" * 64
    assert _hdf5.attribute_message(data, 16 + len(head), len(name)) is None
    typed = bytes([3, 0]) + b"".join(s.to_bytes(2, "little") for s in (len(name), 1, 8)) + bytes([0])
    data = b"\0" * 16 + typed + name + bytes([9]) + bytes([2, 1, 1, 1]) + (4).to_bytes(8, "little") + b"\0" * 64
    at = 16 + len(typed)
    assert _hdf5.attribute_message(data, at, len(name)) == (at + 5, at + 6, at + 14)


# ------------------------------------------------------------------ round 45's refusals, whole
def test_a_long_side_cap_is_refused_with_its_whole_message():
    processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": 64, "longest_edge": 100},
                                                   crop_size={"height": 64, "width": 64})
    with pytest.raises(QKHooksError) as caught:
        ImageConfig.from_hf(processor.to_dict())
    assert str(caught.value).endswith(
        "caps the resized long side at longest_edge (a wide photo's short side then ends below shortest_edge, and the "
        "centre crop pads it), which ImageConfig does not model; build ImageConfig(size=..., resize=shortest_edge, "
        "...) by hand if the cap does not matter for your photos.")


class _WithALambda(torch.utils.data.Dataset):
    """A Dataset holding a lambda: it cannot be pickled."""

    def __init__(self) -> None:
        self.images, self.load = [Image.new("RGB", (20, 24), (9, 9, 9))] * 2, lambda image: image

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Image.Image:
        return self.load(self.images[index])


def _stream():
    return open_source(_WithALambda(), ImageConfig(size=(16, 16), mean=(0.5,) * 3, std=(0.5,) * 3))


def test_an_unpicklable_dataset_is_refused_naming_the_error_pickling_raised():
    """The refusal names the error pickling raised (its type and words), as pickle raises it for the dataset."""
    with pytest.raises(Exception) as raised:
        pickle.dumps(_WithALambda())
    with pytest.raises(QKHooksError) as caught:
        _stream()._refuse_unpicklable(2, "spawn")
    assert f"cannot be pickled ({type(raised.value).__name__}: " in str(caught.value)
    _stream()._refuse_unpicklable(2, "fork")  # fork copies the dataset: nothing is pickled


def test_a_dead_workers_message_ends_with_the_resume():
    said = _stream()._worker_died([2, 4], "fork")
    assert "held items 2..3 " in said and "import the dataset's class" not in said
    assert said.endswith("resume=True (--resume) continues the run file from its last checkpoint.")
    assert "started by 'spawn', unable to import the dataset's class" in _stream()._worker_died([0, 2], "spawn")


# ------------------------------------------------------------------ a resume's stream: its recorded length
stream_module = importlib.import_module("qkhooks.stream")


def _source(length: int | None, ids: list[str] | None = None) -> SimpleNamespace:
    """A source as record_dataset's resume sees it: its name, whole length, and the ids before a position (None: its
    items cannot be named again without decoding, a torch Dataset's)."""
    return SimpleNamespace(name="torch:Photos", source_length=length, ids_before=lambda start: ids)


def _position(state: dict[str, object]) -> object:
    position = stream_module._StreamPosition(0, 8)
    position.load_state_dict(state)
    return position


def test_a_checkpoint_from_before_the_recorded_length_compares_no_length():
    """A stream checkpoint written before round 45 has no "length": its recorded length is unknown (None), never a
    number, and a resume over a Dataset of any length is not refused for it; one with "length" -1 (a source with no
    length) reads the same; one with 8 reads 8."""
    assert _position({"position": 4, "skipped": "[]"}).recorded_length is None
    assert _position({"position": 4, "skipped": "[]", "length": -1}).recorded_length is None
    assert _position({"position": 4, "skipped": "[]", "length": 8}).recorded_length == 8
    for length in (1, 6, 8):
        stream_module._refuse_changed_length("run.h5", _source(length), _position({"position": 4, "skipped": "[]"}),
                                             4, 4)


def test_a_changed_length_is_refused_only_where_both_lengths_are_known_and_the_ids_cannot_be_checked():
    """Refused: a Dataset of 8 items, resumed over one of 6 (its ids not checkable). Not refused: a source with no
    length now (an iterable), a run recorded from one, the same length, ids that are checked, or no image kept."""
    recorded = _position({"position": 4, "skipped": "[]", "length": 8})
    with pytest.raises(QKHooksError) as caught:
        stream_module._refuse_changed_length("run.h5", _source(6), recorded, 4, 4)
    assert str(caught.value) == (
        "cannot resume run.h5: torch:Photos has 6 items now, and the run was recorded from 8; items were added or "
        "removed since the run started, and a resume continues at a position (item 4), so if any were before it every "
        "later image would be recorded under another's id, which cannot be checked here (its items before that point "
        "are not read again). Put the data back as it was, record into a new --out, or --overwrite to start again.")
    unknown = _position({"position": 4, "skipped": "[]", "length": -1})
    for source, position, done in ((_source(None), recorded, 4), (_source(6), unknown, 4), (_source(8), recorded, 4),
                                   (_source(6, ["a", "b", "c", "d"]), recorded, 4), (_source(6), recorded, 0)):
        stream_module._refuse_changed_length("run.h5", source, position, done, 4)


def test_the_warning_that_a_resumes_kept_in_memory_items_are_unchecked_is_said_whole():
    """A resume of a streamed Hugging Face dataset of in-memory photos (no file recorded: sizes -1) warns, in full,
    that its kept images are not checked against the data (a torch Dataset's and an iterable's are since round 47)."""
    writer = SimpleNamespace(path="run.h5", ids=["0", "1", "2", "3"], rows=lambda name, done: np.full(done, -1))
    source = SimpleNamespace(name="datasets:Photos", file_paths=lambda start, progress=False, first=0: None,
                             file_stamps=lambda start, progress=False, first=0: None)
    with pytest.warns(UserWarning) as caught:
        stream_module._refuse_changed_stream_files(writer, source, 4, 4)
    assert [str(w.message) for w in caught] == [
        "run.h5: this resume does not check that the 4 images it keeps are datasets:Photos's first items: they are "
        "not read again before the resume point (a streamed Hugging Face dataset has no index) and hold no files "
        "whose stamps could be compared, so data changed since (items reordered or replaced) would go on under the "
        "kept images' ids. Load it as a map-style dataset (not streamed), or pass the items as a list or another "
        "iterable, to have them checked."]


# ------------------------------------------------------------------ tied sigma
def test_numerically_null_modes_that_tie_with_each_other_are_null_not_tied():
    """Two numerically null sigma (below max sigma * dim * eps) lie within the tie band of each other, yet carry no
    energy: tied_modes leaves them out (null_modes flags them as null); a tie of two non-null sigma is flagged."""
    from qkhooks.spectrum import null_modes, tied_modes

    eps = float(np.finfo(np.float32).eps)
    S = np.array([[1.0, 0.5, 0.25, 1e-7, 1e-7 + eps * 2]], np.float32)  # null below 64 * eps (7.6e-6)
    assert tied_modes(S, 64).tolist() == [[False] * 5]
    assert null_modes(S, 64).tolist() == [[False, False, False, True, True]]
    S = np.array([[1.0, 0.5, 0.5, 0.25]], np.float32)
    assert tied_modes(S, 64).tolist() == [[False, True, True, False]]


def test_a_tied_heads_additive_global_mean_share_is_undetermined_and_the_others_are_numbers():
    """BFD's additive global-mean share is a sum over modes of products: None for the head with tied sigma (under
    its own key, as every head has it), a finite number for the heads whose sigma are distinct."""
    from test_tied_sigma_and_unit_ranges import _tied_vit

    from qkhooks.analysis.bfd import run_bfd

    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    result = run_bfd(_tied_vit(None), images, batch_size=6, decode=False, definition="additive")
    layer = result["layers"][0] if isinstance(result["layers"], list) else next(iter(result["layers"].values()))
    shares = [head["additive"]["global_mean_share"] for head in layer["heads"]]
    assert shares[0] is None and "undetermined" in layer["heads"][0]
    assert all(isinstance(s, float) and np.isfinite(s) for s in shares[1:]), shares


# ------------------------------------------------------------------ a folder's images of formats it does not read
def _unread_formats_warning(folder: Path) -> warnings.WarningMessage:
    """The warning that opening ``folder`` (a PNG beside five TIFFs) gives about its unread image files."""
    for name in ["a.png"] + [f"t{i}.tif" for i in range(5)]:
        Image.fromarray(np.full((12, 14, 3), 9, np.uint8)).save(folder / name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = open_dataset(str(folder), ImageConfig(size=(16, 16), mean=(0.5,) * 3, std=(0.5,) * 3))
    assert dataset.ids == ["a.png"]
    said = [w for w in caught if "extension a folder does not read" in str(w.message)]
    assert len(said) == 1
    return said[0]


def test_a_folders_unread_image_files_past_the_third_are_counted(tmp_path):
    """Five TIFFs beside a PNG: the warning names the first three and "2 more" (5 in all)."""
    assert str(_unread_formats_warning(tmp_path).message).startswith(
        f"5 image files under {tmp_path} have an extension a folder does not read (.tif): t0.tif, t1.tif, t2.tif and 2 "
        "more, so they are not recorded")


def test_the_unread_formats_warning_points_at_the_callers_line(tmp_path):
    """The warning points at the line that opened the folder (the user's), not into qkhooks. Left out of the module
    round45's selection: mutmut's trampoline adds frames, so only the ordinary suite can check a stacklevel."""
    assert _unread_formats_warning(tmp_path).filename == __file__


# ------------------------------------------------------------------ heap collections read off the raw bytes
def test_a_heap_collection_whose_size_field_reads_zero_holds_no_string_that_can_be_asked(tmp_path):
    """A collection header with its "GCOL" signature but a size of 0 (damage: no collection is empty, its header alone
    takes 16 bytes) is not wholly in the file: the rows whose strings it holds are named, never asked of HDF5."""
    from qkhooks.store import RunWriter
    from test_mutation_kills_r45 import _collection_of

    path = tmp_path / "run.h5"
    ids = [f"image-{i:04d}-" + "x" * 80 for i in range(60)]
    with RunWriter(path, dtype="float32") as w:
        w.write_batch(ids, {"v": np.zeros((60, 1), dtype=np.float32)})
    data = path.read_bytes()
    start, held = _collection_of(data, ids[-1].encode())
    rows = {ids.index(value.decode()) for value in held}
    assert rows and int.from_bytes(data[start + 8:start + 16], "little") > 0
    sizeless = tmp_path / "sizeless.h5"
    sizeless.write_bytes(data[:start + 8] + bytes(8) + data[start + 16:])
    with h5py.File(path, "r") as f:
        assert repair_module.unreadable_strings(f["images/ids"], 60, path, len(data)) == set()
    with h5py.File(sizeless, "r") as f:
        assert repair_module.unreadable_strings(f["images/ids"], 60, sizeless, len(data)) == rows


@pytest.mark.parametrize("sizes", [(8, 2), (2, 8), (8, 8)], ids=["lengths_2", "offsets_2", "qkhooks"])
def test_a_superblock_of_other_sizes_of_offsets_or_lengths_is_not_read_as_qkhooks_layout(tmp_path, sizes):
    """A heap reference is read off the raw bytes only in the layout qkhooks writes: a version-2+ superblock whose
    sizes of offsets and of lengths are both 4 or 8 bytes. A file of 2-byte offsets or 2-byte lengths (HDF5 allows
    2 to 32) is not, whichever of the two differs."""
    path = tmp_path / "sizes.h5"
    fcpl = h5py.h5p.create(h5py.h5p.FILE_CREATE)
    fcpl.set_sizes(*sizes)
    fapl = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
    fapl.set_libver_bounds(h5py.h5f.LIBVER_LATEST, h5py.h5f.LIBVER_LATEST)
    with h5py.File(h5py.h5f.create(str(path).encode(), h5py.h5f.ACC_TRUNC, fcpl=fcpl, fapl=fapl)) as f:
        f.attrs["a"] = "x"
    data = path.read_bytes()
    assert data[8] >= 2 and (data[9], data[10]) == sizes  # version, size of offsets, size of lengths
    layout = repair_module.heap_reference_layout(path)
    if sizes == (8, 8):
        assert layout is not None and layout[1] == 8 and layout[0].itemsize == 16
    else:
        assert layout is None


# ------------------------------------------------------------------ masks and grids outside [0, 1]
def test_the_refusal_of_grids_outside_0_1_counts_them_in_patches_and_of_masks_in_pixels():
    """The streaming reducer's refusal names the values and how many patches hold them (one per image of a batch of
    two: "2 patches"); a pixel mask's, how many pixels ("1 pixel")."""
    from qkhooks.analysis.preference import PreferenceReducer
    from qkhooks.data.masks import refuse_outside_fractions

    t, d = torch.zeros(2, 4, 4), torch.zeros(2, 4, 4)
    t[:, 0, 0], d[:, 2, 2] = 1.0, 1.0
    rows = torch.softmax(torch.randn(2, 2, 2, 17, generator=torch.Generator().manual_seed(0)), -1)
    batch = SimpleNamespace(captures={0: SimpleNamespace(attention={"rows": rows})},
                            meta={"target_grid": t * 255, "distractor_grid": d}, ids=None)
    with pytest.raises(QKHooksError) as caught:
        PreferenceReducer().update(batch)
    assert str(caught.value).startswith("the target grid holds values outside [0, 1] (255 at 2 patches): ")
    mask = torch.zeros(3, 3)
    mask[1, 2] = -0.5
    with pytest.raises(QKHooksError) as caught:
        refuse_outside_fractions(mask, "target mask", "pixel")
    assert str(caught.value).startswith("the target mask holds values outside [0, 1] (-0.5 at 1 pixel): ")


def test_a_masks_values_outside_0_1_are_listed_and_its_refusal_is_said_whole():
    """A target mask of 0/255 (an 8-bit PNG) handed to odd_one_out_meta is refused naming it ("the target mask") and
    its 64 pixels of 255; a mask holding -1, 2 and 3 lists the three values, and the refusal is said whole."""
    from test_tied_sigma_and_unit_ranges import _two_squares

    from qkhooks.analysis.preference import odd_one_out_meta
    from qkhooks.data.masks import refuse_outside_fractions

    with pytest.raises(QKHooksError) as caught:
        odd_one_out_meta(*_two_squares(torch.uint8, 255, 0), (4, 4), 1)
    assert str(caught.value).startswith("the target mask holds values outside [0, 1] (255 at 64 pixels): ")
    mask = torch.tensor([[0.0, 2.0, 3.0], [-1.0, 2.0, 0.5]])
    with pytest.raises(QKHooksError) as caught:
        refuse_outside_fractions(mask, "distractor mask", "pixel")
    assert str(caught.value) == (
        "the distractor mask holds values outside [0, 1] (-1, 2, 3 at 4 pixels): a mask is the fraction of each cell "
        "its object covers (METHODS A.7: background = 1 - target - distractor), so such values make shares outside "
        "[0, 1]. Pass booleans or fractions: mask > 0 for a 0/255 (8-bit) or labelled mask, mask / 255 for an "
        "anti-aliased 8-bit one; NaN has no fraction.")
