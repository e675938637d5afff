"""Kill tests for round 49's library code (module "round49" of ``tests/mutation.py``, ``--only ROUND49``): each
asserts the real behaviour against an independent reference and was seen failing with its mutant active (the mutant's
name in the test's docstring; tests/MUTATION.md, round 50's run)."""

from __future__ import annotations

import subprocess


# ------------------------------------------------------------------ tests/mutation.py: round49
def test_the_round49_module_names_files_and_tests_that_exist_and_round_49s_commits():
    """The harness's module "round49" and its named set ROUND49: every file to mutate and every test file exists, the
    selection names only test files it selects, the range resolves in this checkout to round 49's 22 library commits
    (31 in all) (``git rev-list``), so ``--only ROUND49`` draws the same sample wherever it runs, and every library file
    they changed is mutated but ``report.py`` (one line of the modes report, which only the full report reaches)."""
    from test_mutation_kills_r26 import ROOT, _harness, commits_in, library_files_changed, module_files

    mutation = _harness()
    files = module_files(mutation, "round49")
    assert mutation.NAMED_SETS["ROUND49"] == mutation.ROUND49 == ("commits:edf303a..81bab99",)
    assert len(commits_in("edf303a..81bab99")) == 31
    library = subprocess.run(["git", "rev-list", "edf303a..81bab99", "--", "qkhooks"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.split()
    assert len(library) == 22
    assert set(library_files_changed("edf303a", "81bab99")) - set(files) == {"qkhooks/report.py"}
