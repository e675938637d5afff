"""Kill tests for the mutants of round 25's code that its own tests let survive (module "round26" of
tests/mutation.py, ``--only ROUND25``; tests/MUTATION.md's round-26 section names each)."""

from __future__ import annotations
