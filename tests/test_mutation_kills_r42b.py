"""Kill tests of round 42's own library code (module "round42" of tests/mutation.py): the mutants its tests missed."""

from __future__ import annotations
