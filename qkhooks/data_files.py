"""Where a run's photos came from, so that they can be found again: the data spec made absolute, and each file's size.

A run stores no pixels: ``analyze modes`` (and reports) reopen the dataset from the run's ``data`` attribute to draw
maps over the photos. A spec such as ``imgs`` typed in one folder names other files, or none, from another folder,
so :func:`absolute_spec` makes the paths in a spec absolute at record time. :func:`file_sizes` keeps each image
file's size in the run (root attribute :data:`SIZES_ATTR`, JSON ``{id: bytes}``), and :func:`changed_files` checks
a reopened dataset against the run: every image drawn that is still there must have the size it had when recorded
(images that are gone are left out and counted). A run from before these existed names its data as typed and has
no sizes: when that is a relative path and images are missing, the folder found is taken to be another one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from qkhooks.data.datasets import FOLDER_PREFIXES, GENERATED_PREFIXES, NAMED_SPECS, STREAMED_PREFIXES
from qkhooks.data.readers import _split_spec

__all__ = ["SIZES_ATTR", "absolute_spec", "file_sizes", "changed_files"]

SIZES_ATTR = "data_file_sizes"
"""Root attribute of a run file: JSON ``{image id: file size in bytes}`` for datasets read from files."""


def _absolute(path: str) -> str:
    """``path`` absolute (``~`` expanded), keeping the user's names (symbolic links are not resolved)."""
    return os.path.abspath(os.path.expanduser(path))


def _absolute_part(spec: str) -> str:
    if spec in NAMED_SPECS or spec.startswith(GENERATED_PREFIXES):
        return spec  # generated or installed: no path (a named spec wins over a folder of the same name)
    for prefix in FOLDER_PREFIXES + STREAMED_PREFIXES:
        if spec.startswith(prefix):
            rest = spec[len(prefix):]
            if not rest or "://" in rest or rest.startswith(("pipe:", "/")):
                return spec
            if prefix == "hfds:":  # hfds:DIR_OR_NAME[:SPLIT], split off as the reader does: a hub name stays a name
                head, split = _split_spec(rest)
                tail = "" if split is None else ":" + split
                return prefix + _absolute(head) + tail if Path(head).expanduser().exists() else spec
            if prefix == "wds:":  # a (brace) pattern: its folder must exist here
                folder = os.path.dirname(rest) or "."
                return prefix + _absolute(rest) if Path(folder).expanduser().is_dir() else spec
            return prefix + _absolute(rest) if Path(rest).expanduser().exists() else spec
    return _absolute(spec) if Path(spec).expanduser().exists() else spec


def absolute_spec(spec: Any) -> Any:
    """A dataset spec with the paths in it made absolute (a folder, ``ade20k:DIR``, ``o3dir:DIR``, ``hfds:DIR``,
    ``wds:PATTERN``, parts joined with ``+``); named specs, paths that do not exist here and anything that is not a
    spec string (your own dataset objects) as given."""
    if isinstance(spec, os.PathLike):
        return _absolute(os.fspath(spec)) if Path(spec).expanduser().exists() else spec
    if not isinstance(spec, str) or not spec:
        return spec
    if "+" in spec and not spec.startswith(STREAMED_PREFIXES) and not Path(spec).expanduser().exists():
        return "+".join(_absolute_part(part) if part else part for part in spec.split("+"))
    return _absolute_part(spec)


def _paths(dataset: Any) -> dict[str, str]:
    """Image id -> file path, for datasets read from files (folders, ade20k:, o3dir:, joins of them)."""
    records = getattr(dataset, "_records", None) or []
    return {r.id: r.path for r in records if getattr(r, "path", None)}


def file_sizes(dataset: Any, ids: Sequence[str] | None = None) -> dict[str, int]:
    """``{id: size in bytes}`` of the image files behind ``dataset`` (only ``ids`` when given); {} for data that is
    not read from files (generated displays, your own containers)."""
    paths = _paths(dataset)
    wanted = paths if ids is None else {i: paths[i] for i in ids if i in paths}
    sizes = {}
    for id_, path in wanted.items():
        try:
            sizes[id_] = os.stat(path).st_size
        except OSError:
            continue  # unreadable now: the recording skips it and says why
    return sizes


def changed_files(attrs: Mapping[str, Any], dataset: Any, ids: Sequence[str]) -> str:
    """Why the reopened ``dataset`` does not hold the images ``ids`` the run recorded ("" when it does, as far as can
    be told). A run with stored sizes: a file there with another size means other files (images that are gone are
    left out and counted by the caller). A run from before, naming a folder relative to where it was recorded: any
    image missing means the folder found from here is another one."""
    spec = str(attrs.get("data", "?"))
    present = set(getattr(dataset, "ids", []))
    try:
        stored = json.loads(attrs.get(SIZES_ATTR) or "{}")
    except (TypeError, ValueError):
        stored = {}
    if not stored:
        absent = [i for i in ids if i not in present]
        if absent and absolute_spec(spec) != spec:
            return (f"{len(absent)} of the {len(ids)} images to draw are not in {spec!r} (first: {absent[0]!r}), a "
                    "path this run names relative to the folder it was recorded in, so the folder found from here is "
                    "not the one recorded; drawing no photos rather than others. Run from that folder, or draw "
                    "without photos (--no-images).")
        return ""
    checked = [i for i in ids if i in stored and i in present]
    now = file_sizes(dataset, checked)
    differ = [i for i in checked if now.get(i) != stored[i]]
    if differ:
        first = differ[0]
        return (f"{len(differ)} of the {len(ids)} images to draw in {spec!r} are not the files this run recorded "
                f"(first: {first!r}, {stored[first]} bytes when recorded, {now.get(first, 'unreadable')} now); "
                "drawing no photos rather than others. Put the recorded files back, or draw without photos "
                "(--no-images).")
    return ""
