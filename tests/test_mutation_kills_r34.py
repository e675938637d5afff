"""Kill tests for the mutants of round 33's later library code and round 34's fixes (``ebe8fa2..b0ec42d``: masks read
from the pixels each token shows, the review-33 fixes, timm's parallel blocks, round 34's review fixes) that their tests
let survive (module "round34" of tests/mutation.py, ``--only ROUND34``; tests/MUTATION.md's "round 34" section names
each); and the harness's round34 module kept consistent."""

from __future__ import annotations

from test_mutation_kills_r26 import check_round_module


# ------------------------------------------------------------------------------------ tests/mutation.py: round34
def test_the_round34_module_names_files_and_tests_that_exist_and_round_33s_later_commits():
    """The harness's module "round34" and its named set ROUND34: every file to mutate and every test file exists, the
    selection names only test files it selects, the commit range resolves in this checkout to the 24 library commits
    of ``ebe8fa2..b0ec42d``, and every library file they changed is mutated."""
    check_round_module("round34", "ROUND34", "ebe8fa2", "b0ec42d", library_commits=24)
