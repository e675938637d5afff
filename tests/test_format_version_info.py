"""Round 26: ``qkhooks info`` (and ``RunReader.summary``, which it prints) names the run file's format: the number
of the root attribute ``qkhooks_format``, 0 for a file written before the numbers, and for a newer format than this
qkhooks writes that reading works and the rest takes an upgrade. Each case is checked against the attribute as
h5py reads it from the file."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from qkhooks.cli import main
from qkhooks.store import open_run
from qkhooks.store import format as fmt

from test_format_version_refusals import set_format, write


def format_lines(path: Path, capsys: pytest.CaptureFixture[str]) -> list[str]:
    """The ``format`` lines of ``qkhooks info PATH``, after checking that the CLI prints the Python API's summary."""
    assert main(["info", str(path)]) == 0
    printed = capsys.readouterr().out
    with open_run(path) as run:
        assert printed == run.summary() + "\n"
    return [line for line in printed.splitlines() if line.startswith("format ")]


def stored_format(path: Path) -> object:
    with h5py.File(path, "r") as f:
        return f.attrs.get(fmt.FORMAT_ATTR)


def test_info_prints_the_format_number_a_new_run_carries(tmp_path, capsys):
    path = tmp_path / "run.h5"
    write(path)
    number = stored_format(path)
    assert isinstance(number, np.integer) and number == fmt.FORMAT
    assert format_lines(path, capsys) == [f"format   {int(number)}"]


def test_info_says_a_file_without_the_attribute_predates_format_numbers(tmp_path, capsys):
    path = tmp_path / "run.h5"
    write(path)
    set_format(path, None)
    assert stored_format(path) is None
    assert format_lines(path, capsys) == [f"format   0 (written before format numbers: no root attribute "
                                          f"{fmt.FORMAT_ATTR})"]


@pytest.mark.parametrize("ahead", [1, 7])
def test_info_says_a_newer_format_is_read_and_the_rest_takes_an_upgrade(tmp_path, capsys, ahead):
    path = tmp_path / "run.h5"
    write(path)
    set_format(path, np.int64(fmt.FORMAT + ahead))
    number = int(stored_format(path))
    assert number == fmt.FORMAT + ahead
    assert format_lines(path, capsys) == [
        f"format   {number}, newer than format {fmt.FORMAT}, the newest this qkhooks knows: reading it works; to "
        "resume, merge, repair or verify it, upgrade qkhooks (pip install -U qkhooks)"]


@pytest.mark.parametrize("value", ["2", True, -1], ids=["string", "bool", "negative"])
def test_info_names_a_format_attribute_qkhooks_never_writes(tmp_path, capsys, value):
    path = tmp_path / "run.h5"
    write(path)
    set_format(path, value)
    stored = stored_format(path)
    assert format_lines(path, capsys) == [
        f"format   unknown: root attribute {fmt.FORMAT_ATTR} is {stored!r}, not a run-file format number qkhooks "
        "writes (another tool wrote or changed the file)"]
