"""Kill tests for the mutants of round 27's later library commits (``bb42916..dcf6012``) that their tests let survive
(module "round27b" of tests/mutation.py, ``--only ROUND27B``; tests/MUTATION.md's "round 27 (second run)" section
names each). The last test keeps the harness's round27b module consistent."""

from __future__ import annotations

import subprocess
from pathlib import Path

from test_mutation_kills_r25 import _harness
from test_mutation_kills_r26 import commits_in, module_files

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------ tests/mutation.py: round27b
def test_the_round27b_module_names_files_and_tests_that_exist_and_round_27s_later_commits():
    """The harness's module "round27b" and its named set ROUND27B: every file to mutate and every test file exists,
    the selection names only test files it selects, the commit range resolves in this checkout to round 27's four
    later library commits, and every library file they changed is mutated."""
    mutation = _harness()
    files = module_files(mutation, "round27b")
    assert mutation.NAMED_SETS["ROUND27B"] == mutation.ROUND27B == ("commits:bb42916..dcf6012",)
    changed = subprocess.run(["git", "diff", "--name-only", "bb42916", "dcf6012", "--", "qkhooks"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.split()
    assert set(changed) == set(files)
    library = subprocess.run(["git", "rev-list", "bb42916..dcf6012", "--", "qkhooks"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.split()
    assert len(library) == 4 and set(library) <= set(commits_in("bb42916..dcf6012"))
