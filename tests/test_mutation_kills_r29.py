"""Kill tests for the mutants of round 29's library code (``e52c7d9..0c36b52``: the anisotropy baseline's centre rows
taken in the layer's hook, ``keep_last``, the statics-only resume fixed at open, the resume's message) that their tests
let survive (module "round29" of tests/mutation.py, ``--only ROUND29``; tests/MUTATION.md's "round 29" section names
each); and the harness's round29 module kept consistent."""

from __future__ import annotations

import subprocess
from pathlib import Path

from test_mutation_kills_r25 import _harness
from test_mutation_kills_r26 import commits_in, library_files_changed, module_files

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------ tests/mutation.py: round29
def test_the_round29_module_names_files_and_tests_that_exist_and_round_29s_commits():
    """The harness's module "round29" and its named set ROUND29: every file to mutate and every test file exists, the
    selection names only test files it selects, the commit range resolves in this checkout to round 29's library
    commits, and every library file they changed is mutated."""
    mutation = _harness()
    files = module_files(mutation, "round29")
    assert mutation.NAMED_SETS["ROUND29"] == mutation.ROUND29 == ("commits:e52c7d9..0c36b52",)
    assert set(library_files_changed("e52c7d9", "0c36b52")) == set(files)
    library = subprocess.run(["git", "rev-list", "e52c7d9..0c36b52", "--", "qkhooks"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.split()
    assert len(library) == 2 and set(library) <= set(commits_in("e52c7d9..0c36b52"))
