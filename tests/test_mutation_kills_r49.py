"""Kill tests for round 48's library code (module "round48" of ``tests/mutation.py``, ``--only ROUND48``): each
asserts the real behaviour against an independent reference and was seen failing with its mutant active (the mutant's
name in the test's docstring; tests/MUTATION.md, round 49's run)."""

from __future__ import annotations

import subprocess


# ------------------------------------------------------------------ tests/mutation.py: round48
def test_the_round48_module_names_files_and_tests_that_exist_and_round_48s_commits():
    """The harness's module "round48" and its named set ROUND48: every file to mutate and every test file exists, the
    selection names only test files it selects, the range resolves in this checkout to round 48's 14 library commits
    (38 in all) (``git rev-list``), so ``--only ROUND48`` draws the same sample wherever it runs, and every library file
    they changed is mutated but ``models/base.py`` (a dataclass field and its docstring) and ``store/format.py`` (a
    constant and its docstring), whose changed lines hold no mutant."""
    from test_mutation_kills_r26 import ROOT, _harness, commits_in, library_files_changed, module_files

    mutation = _harness()
    files = module_files(mutation, "round48")
    assert mutation.NAMED_SETS["ROUND48"] == mutation.ROUND48 == ("commits:368b4c5..edf303a",)
    assert len(commits_in("368b4c5..edf303a")) == 38
    library = subprocess.run(["git", "rev-list", "368b4c5..edf303a", "--", "qkhooks"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.split()
    assert len(library) == 14
    assert set(library_files_changed("368b4c5", "edf303a")) - set(files) == {"qkhooks/models/base.py",
                                                                          "qkhooks/store/format.py"}
