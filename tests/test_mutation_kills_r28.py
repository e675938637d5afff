"""Kill tests for the mutants of round 28's mending of round 27's review items (``f2eeb12..f1e0255``) that their tests
let survive (module "round28" of tests/mutation.py, ``--only ROUND28``; tests/MUTATION.md's "round 28" section names
each); and the harness's round28 module and stale-free named sets kept consistent."""

from __future__ import annotations


from test_mutation_kills_r26 import check_round_module


# ------------------------------------------------------------------------------------ tests/mutation.py: round28
def test_the_round28_module_names_files_and_tests_that_exist_and_round_28s_commits():
    """The harness's module "round28" and its named set ROUND28: every file to mutate and every test file exists, the
    selection names only test files it selects, the commit range resolves in this checkout to round 28's library
    commits, and every library file they changed is mutated."""
    check_round_module("round28", "ROUND28", "f2eeb12", "f1e0255", library_commits=2)
