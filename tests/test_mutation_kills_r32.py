"""Kill tests for the mutants of the library code of rounds 31 and 32 (``4a07a01..fcb421f``: each layer's geometry
read in its hook and its own prefix tokens, GroupViT's segment tokens, the refusals of windows and mixed batch axes, a
failed forward's batch dropped, a merged view's missing shards refused; the float16 overflow refusals,
``Reducer.images_held``, same-object's chance per layer) that their tests let survive (module "round32" of
tests/mutation.py, ``--only ROUND32``; tests/MUTATION.md's "round 32" section names each); and the harness's round32
module kept consistent."""

from __future__ import annotations

from test_mutation_kills_r26 import check_round_module


# ------------------------------------------------------------------------------------ tests/mutation.py: round32
def test_the_round32_module_names_files_and_tests_that_exist_and_rounds_31_and_32s_commits():
    """The harness's module "round32" and its named set ROUND32: every file to mutate and every test file exists, the
    selection names only test files it selects, the commit range resolves in this checkout to the 13 library commits
    of ``4a07a01..fcb421f``, and every library file they changed is mutated."""
    check_round_module("round32", "ROUND32", "4a07a01", "fcb421f", library_commits=13)
