"""Kill tests for round 49's library code (module "round49" of ``tests/mutation.py``, ``--only ROUND49``): each
asserts the real behaviour against an independent reference and was seen failing with its mutant active (the mutant's
name in the test's docstring; tests/MUTATION.md, round 50's run)."""

from __future__ import annotations
