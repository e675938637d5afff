"""Round 20 (data): the data-spec grammar in one place, each annotated photo opened once, PNG orientations read
without decoding the image."""

from __future__ import annotations

import os
import re

import pytest

from qkhooks.data import ImageConfig, open_dataset
from qkhooks.data.datasets import (
    DATASET_SPECS,
    FOLDER_PREFIXES,
    GENERATED_PREFIXES,
    NAMED_SPECS,
    STREAMED_PREFIXES,
)
from qkhooks.data.sources import _SPECS as STREAMED_SPECS
from qkhooks.data_files import absolute_spec
from qkhooks.errors import QKHooksError

CFG = ImageConfig(size=(32, 32), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def test_the_grammar_is_what_the_docs_name_and_what_the_parsers_accept():
    """The named specs and prefixes the users are told of (DATASET_SPECS, open_source's streamed specs) are the
    grammar's, and each is parsed as such: a named spec or a prefix with nothing after it is not an unknown spec."""
    assert set(re.findall(r"'([a-z0-9]+)'", DATASET_SPECS)) == set(NAMED_SPECS)
    assert set(re.findall(r"'([a-z0-9]+:)", DATASET_SPECS)) == set(FOLDER_PREFIXES + GENERATED_PREFIXES)
    assert set(re.findall(r"\b([a-z0-9]+:)[A-Z]", STREAMED_SPECS)) == set(STREAMED_PREFIXES)
    for prefix in FOLDER_PREFIXES + GENERATED_PREFIXES:
        with pytest.raises(QKHooksError, match="is incomplete"):
            open_dataset(prefix, CFG)
    for prefix in STREAMED_PREFIXES:
        with pytest.raises(QKHooksError, match="is streamed"):
            open_dataset(prefix + "x", CFG)
    with pytest.raises(QKHooksError, match="unknown dataset spec"):
        open_dataset("nosuchprefix:x", CFG)


def test_every_spec_form_the_parsers_accept_is_known_to_absolute_spec(tmp_path, monkeypatch):
    """A spec that names a folder here is recorded with that folder absolute, whatever its prefix; a named or generated
    spec is kept as typed even where a folder of that very name exists (the named spec wins, as when opened)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "imgs").mkdir()
    here = os.path.join(os.getcwd(), "imgs")
    for prefix in FOLDER_PREFIXES + STREAMED_PREFIXES:
        assert absolute_spec(prefix + "imgs") == prefix + here, prefix
    for spec in [*NAMED_SPECS, *(prefix + "4" for prefix in GENERATED_PREFIXES)]:
        (tmp_path / spec).mkdir()
        assert absolute_spec(spec) == spec
        assert absolute_spec(f"imgs+{spec}") == f"{here}+{spec}"  # a join of it with a folder
