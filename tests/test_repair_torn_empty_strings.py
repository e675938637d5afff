"""Round 46: ``repair`` of a run cut inside a heap collection still hung where round 45's check did not look.

- An empty string is a heap object too (a zero length, the collection's address): HDF5 reads its collection, and
  spins on one a cut tore, as for any other string. ``_attrs_outside`` and ``_strings_outside`` skipped every
  zero-length reference, so an empty root attribute (``model_note`` of every run: ``repair`` of a run cut inside its
  first collection hung once the run's headers lay before that collection, as with 16 KiB metadata blocks) and an
  empty skipped row were asked of HDF5. Only a null reference (address 0: never written) holds no string.
- Statics' attributes (``model/info``, a spectrum's) and the reducer states' (``current``, ``scalars``) were read
  unchecked: an attribute a cut left outside the file hung ``_copy_statics`` or ``_copy_states``.

Each case is made as a user's h5py edit makes it (a string in a new collection at the file's end) and cut 64 bytes
into that collection; each repair runs in a child killed after 60 s (each timed out on the code before)."""

from __future__ import annotations

from pathlib import Path

import h5py

from qkhooks.distributed import merge_shards, shard_path
from qkhooks.store import format as fmt
from qkhooks.store import open_run
from qkhooks.stream import record_dataset
from test_repair_torn_attributes import _repair_in_child, _tiny_vit


def _last_collection(path: Path) -> tuple[int, int]:
    """(address, size) of the last global heap collection ("GCOL", version, 3 reserved bytes, 8-byte size)."""
    data = path.read_bytes()
    at = data.rfind(b"GCOL")
    return at, int.from_bytes(data[at + 8:at + 16], "little")


def _repair_cut(run: Path, tmp_path: Path) -> dict:
    """Cut ``run`` 64 bytes into its last heap collection (header in the file, strings not) and repair the cut copy
    in a child; a child that spins is killed (the hang this guards against)."""
    at, size = _last_collection(run)
    assert size > 64
    cut = tmp_path / "cut.h5"
    cut.write_bytes(run.read_bytes()[:at + 64])
    return _repair_in_child(cut, tmp_path / "fixed.h5")


def _run(tmp_path: Path) -> tuple[Path, list[str]]:
    run = tmp_path / "run.h5"
    record_dataset(_tiny_vit(), "o3:4:1", run, modes=2, batch_size=2, progress=False, reducers=[])
    with h5py.File(run, "r") as f:
        return run, [fmt.as_str(s) for s in f[fmt.IDS][:]]


def test_an_empty_root_attribute_whose_collection_a_cut_tore_is_lost_not_read(tmp_path):
    """An empty attribute in the collection at the file's end (beside a long one that made it): both are lost and
    named, every image is recovered. Before, the long one was named and the empty one read: repair spun."""
    run, ids = _run(tmp_path)
    with h5py.File(run, "a") as f:
        f.attrs["note"] = "n" * 3000  # a new collection at the file's end, with room left
        f.attrs["empty"] = ""  # in that room: a zero length, that collection's address
    report = _repair_cut(run, tmp_path)
    assert report["recovered"] == ids and report["lost"] == []
    for name in ("note", "empty"):
        assert f"root attribute {name} lost: its string lies past the file's end" in report["problems"]


def test_an_empty_skipped_row_whose_collection_a_cut_tore_is_lost_not_read(tmp_path):
    """A skipped row of two empty strings whose references point into the collection a cut tore: the row is lost and
    named, the row before it kept. Before, the row was asked of HDF5 (its zero lengths counted as no string)."""
    run, ids = _run(tmp_path)
    with h5py.File(run, "a") as f:
        listed = f[fmt.SKIPPED]
        listed.resize((1, 2))
        listed[0] = ["a/0", "unreadable"]  # its chunk, before the collection made below
    with h5py.File(run, "a") as f:
        f.attrs["note"] = "n" * 3000
        listed = f[fmt.SKIPPED]
        listed.resize((2, 2))
        listed[1] = ["", ""]  # into the new collection's room, through the chunk written above
    report = _repair_cut(run, tmp_path)
    assert report["recovered"] == ids
    assert f"/{fmt.SKIPPED}: row 1 does not read (the copy lists the 1 of its 2 rows that read)" in report["problems"]
    with open_run(tmp_path / "fixed.h5") as fixed:
        assert ("a/0", "unreadable") in [tuple(row) for row in fixed.skipped]


def test_a_statics_attribute_whose_string_a_cut_left_outside_the_file_is_lost_and_named(tmp_path):
    """An attribute added to the model group (a static) in a collection at the file's end: lost and named, the
    group's own info copied, every image recovered. Before, ``_copy_statics`` asked it of HDF5 and spun."""
    run, ids = _run(tmp_path)
    with h5py.File(run, "a") as f:
        info = fmt.as_str(f["model"].attrs["info"])
        f["model"].attrs["note"] = "n" * 3000
    report = _repair_cut(run, tmp_path)
    assert report["recovered"] == ids and report["lost"] == []
    assert "/model attribute note lost: its string lies past the file's end" in report["problems"]
    with h5py.File(tmp_path / "fixed.h5", "r") as f:
        assert fmt.as_str(f["model"].attrs["info"]) == info and "note" not in f["model"].attrs


def test_reducer_states_whose_string_a_cut_left_outside_the_file_are_left_out_and_named(tmp_path):
    """A merged copy keeps its reducer states inside; a state added with h5py after a long root attribute (its
    ``current`` and ``scalars`` strings in the collection that attribute made at the file's end), the file cut inside
    that collection: the states are left out, said so, every image recovered. Before, ``_copy_states`` read them
    through HDF5 and spun."""
    out = tmp_path / "run.h5"
    for rank in range(2):
        record_dataset(_tiny_vit(), "o3:4:1", shard_path(out, rank, 2), shard=(rank, 2), modes=2, batch_size=2,
                       progress=False)
    merge_shards(out, copy=True)
    with h5py.File(out, "a") as f:
        ids = [fmt.as_str(s) for s in f[fmt.IDS][:]]
        group = f[fmt.REDUCERS].create_group("extra")  # its headers before the collection made next
        slot = group.create_group("a")
        f.attrs["note"] = "n" * 3000
        group.attrs["current"], slot.attrs["scalars"] = "a", "{}"
    report = _repair_cut(out, tmp_path)
    assert report["recovered"] == ids and report["lost"] == [] and report["states"] == []
    assert ("reducer states lost: their attributes current, scalars lie past the file's end, so fixed.h5 reads "
            "without reducer states") in report["problems"]
