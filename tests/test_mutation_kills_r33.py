"""Kill tests for the mutants of round 32's later library code, the review fixes (``fcb421f..ebe8fa2``: the per-batch
weights check of live views, a given spectrum checked against the weights, maps under autocast in float32, an unknown
HF attention function and an ignored timm scale refused, HF processors read as their class reads them and HF's centre
crop, a dataset of another preprocessing refused, tRNS, truncated and animated images, symlinked subfolders,
``Recipe.reducers`` of a builtin, the writer's overflow check by ``reducers.overflows``) that their tests let survive
(module "round33" of tests/mutation.py, ``--only ROUND33``; tests/MUTATION.md's "round 33" section names each); and
the harness's round33 module kept consistent."""

from __future__ import annotations

from test_mutation_kills_r26 import check_round_module


# ------------------------------------------------------------------------------------ tests/mutation.py: round33
def test_the_round33_module_names_files_and_tests_that_exist_and_round_32s_later_commits():
    """The harness's module "round33" and its named set ROUND33: every file to mutate and every test file exists, the
    selection names only test files it selects, the commit range resolves in this checkout to the 5 library commits
    of ``fcb421f..ebe8fa2``, and every library file they changed is mutated."""
    check_round_module("round33", "ROUND33", "fcb421f", "ebe8fa2", library_commits=5)
