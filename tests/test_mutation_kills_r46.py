"""Round 46 (mutation): kill tests of round 45's library code (module ``round45``, ``--only ROUND45``): repair's reading
of attribute messages off the raw bytes (``repair._attr_message``, ``_dataspace_count``), checked against what h5py
reads of the same attributes, and the whole words of round 45's refusals (processor configs, decoding workers)."""

from __future__ import annotations

import importlib
import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from qkhooks.data import ImageConfig, open_source
from qkhooks.errors import QKHooksError

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
    return at, repair_module._attr_message(data, at, len(encoded))


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
        assert repair_module._dataspace_count(data, parts[1], 8) == count, name


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
    assert repair_module._attr_message(bytes(data), at, len(b"long\0")) == parts
    collection = bytes(data).find(b"GCOL")
    cut = collection + 64  # told of a file cut 64 bytes into the collection that holds the strings (nothing is cut)
    assert int.from_bytes(data[collection + 8:collection + 16], "little") > 64
    found = repair_module._attrs_outside(utf8, {"long", "three"}, cut)
    assert "long" in found
    data[at - 1] = 2  # no character set HDF5 defines: no attribute message
    assert repair_module._attr_message(bytes(data), at, len(b"long\0")) is None


def test_bytes_giving_a_datatype_of_no_bytes_are_no_attribute_message():
    """An attribute message's datatype part is at least its 8-byte header: bytes before a name that give it 0 bytes
    are data that happen to look like a header, not a message (its "datatype" would be the dataspace's bytes)."""
    name = b"note\0"
    sizes = (len(name), 0, 8)  # name, datatype (none), dataspace
    head = bytes([3, 0]) + b"".join(s.to_bytes(2, "little") for s in sizes) + bytes([0])
    data = b"\0" * 16 + head + name + bytes([2, 1, 1, 1]) + (4).to_bytes(8, "little") + b"\0" * 64
    assert repair_module._attr_message(data, 16 + len(head), len(name)) is None
    typed = bytes([3, 0]) + b"".join(s.to_bytes(2, "little") for s in (len(name), 1, 8)) + bytes([0])
    data = b"\0" * 16 + typed + name + bytes([9]) + bytes([2, 1, 1, 1]) + (4).to_bytes(8, "little") + b"\0" * 64
    at = 16 + len(typed)
    assert repair_module._attr_message(data, at, len(name)) == (at + 5, at + 6, at + 14)


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
