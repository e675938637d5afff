"""Tests written to kill mutants of the I/O and statistics modules (reducers, stream, store, data/preprocess, the
analyses' statistics, capture, models) that survived the rest of the suite (tests/MUTATION.md, round 10), each
against an independent reference: numpy, a direct computation, or a run file read back with h5py."""

from __future__ import annotations
