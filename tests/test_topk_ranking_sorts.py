"""Round 23 (issue 20, the top-k reducer's ranking): a batch whose images all come after the state's is ranked with one
stable sort by score (the entries' positions are then their index order); any other batch order takes the two sorts.
Either way the state equals sorting every image by (score desc, index asc), ties included (brute force in loops)."""

from __future__ import annotations

import pytest
import torch

from qkhooks.analysis import topk
from qkhooks.analysis.modes import TopKModes
from test_modes import assert_matches_brute, fake_batch, tied_maps

ORDERS = {
    "in order": [(0, 4), (4, 5), (9, 6)],
    "later images first": [(9, 6), (4, 5), (0, 4)],  # the state holds higher indices than each batch
    "mixed": [(4, 5), (0, 4), (9, 6)],
}


@pytest.mark.parametrize("order", ORDERS, ids=list(ORDERS))
def test_tied_images_in_any_batch_order_rank_as_brute_force(order: str) -> None:
    q, k = tied_maps(n=15, seed=4)
    reducer = TopKModes(k=5, num_prefix_tokens=1, map_dtype="float32")
    for start, size in ORDERS[order]:
        reducer.update(fake_batch({0: (q[start:start + size], k[start:start + size])}, start))
    assert_matches_brute(reducer, q.numpy(), k.numpy(), prefix=1)


def test_one_sort_is_taken_only_for_a_batch_after_the_state(monkeypatch: pytest.MonkeyPatch) -> None:
    """Which ranking each fold takes: one stable sort when the batch's images follow the state's, else ``_rank``."""
    calls: list[bool] = []
    rank = topk._rank
    monkeypatch.setattr(topk, "_rank", lambda *a: calls.append(True) or rank(*a))
    q, k = tied_maps(n=15, seed=4)
    for order, expected in (("in order", 0), ("later images first", 2), ("mixed", 1)):
        calls.clear()
        reducer = TopKModes(k=5, num_prefix_tokens=1, map_dtype="float32")
        for start, size in ORDERS[order]:
            reducer.update(fake_batch({0: (q[start:start + size], k[start:start + size])}, start))
        assert len(calls) == expected, order
