"""Kill tests of round 42's mutation run of round 40's library code (module "round40" in tests/mutation.py)."""
