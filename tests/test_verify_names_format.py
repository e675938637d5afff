"""Round 27: ``qkhooks info RUN --verify`` names the run file's format too (the rules its verdict was read by), in the
words of ``qkhooks info``; each case against the attribute as h5py reads it from the file. (A format attribute
qkhooks never writes, or a newer format, is refused by verify itself: tests/test_format_version_refusals.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from qkhooks.cli import main
from qkhooks.store import format as fmt
from qkhooks.store.repair import verify_run

from test_format_version_refusals import set_format, write
from test_format_version_info import stored_format


def verify_format_lines(path: Path, capsys: pytest.CaptureFixture[str]) -> list[str]:
    """The ``format`` lines of ``qkhooks info PATH --verify`` (exit 0: nothing damaged), after checking that the CLI
    prints the report's summary and that the line follows the ``verify`` line."""
    assert main(["info", str(path), "--verify"]) == 0
    printed = capsys.readouterr().out
    assert printed == verify_run(path).summary() + "\n"
    lines = printed.splitlines()
    assert lines[0] == f"verify   {path}"
    return [line for line in lines if line.startswith("format ")]


@pytest.mark.parametrize("stored", ["written", None], ids=["a new run", "before format numbers"])
def test_verify_names_the_format_as_info_does(tmp_path, capsys, stored):
    path = tmp_path / "run.h5"
    write(path)
    if stored is None:
        set_format(path, None)
    number = stored_format(path)
    expected = (f"format   0 (written before format numbers: no root attribute {fmt.FORMAT_ATTR})" if number is None
                else f"format   {int(number)}")
    assert (number is None) == (stored is None) and (number is None or number == fmt.FORMAT)
    assert verify_format_lines(path, capsys) == [expected]
