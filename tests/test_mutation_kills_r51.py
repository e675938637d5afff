"""Kill tests for round 50's library code (module "round50" of ``tests/mutation.py``, ``--only ROUND50``): each
asserts the real behaviour against an independent reference and was seen failing with its mutant active (the mutant's
name in the test's docstring; tests/MUTATION.md, round 51's run)."""

from __future__ import annotations

from test_mutation_kills_r26 import check_round_module, commits_in


# ------------------------------------------------------------------ tests/mutation.py: round50
def test_the_round50_module_names_files_and_tests_that_exist_and_round_50s_commits():
    """The harness's module "round50" and its named set ROUND50: every file to mutate and every test file exists, the
    selection names only test files it selects, the range resolves in this checkout to round 50's 25 library commits
    (35 in all) (``git rev-list``), so ``--only ROUND50`` draws the same sample wherever it runs, and every library file
    they changed (16) is mutated."""
    check_round_module("round50", "ROUND50", "81bab99", "bebb0cb", library_commits=25)
    assert len(commits_in("81bab99..bebb0cb")) == 35
