"""Round 46, helper DATA: a one-row span in a run file's messages (repair, verify, a skipped list's loss, a merged
view's missing shard) said "rows 5-5"; it says "row 5" (format.span_words)."""

from __future__ import annotations

import pytest

from qkhooks.store import format as fmt

# ---------------------------------------------------------------------------------------------- rows in messages


@pytest.mark.parametrize("rows, said", [
    ([5], "row 5"),  # before: "rows 5-5"
    ([5, 6, 7], "rows 5-7"),
    ([3, 5, 6, 7], "rows 3, 5-7"),  # before: "rows 3-3, 5-7"
    ([0, 2], "rows 0, 2"),
])
def test_a_one_row_span_is_said_as_its_row(rows, said):
    assert fmt.span_words(fmt.row_spans(rows)) == said


def test_spans_past_the_limit_end_in_dots_and_images_are_named_so():
    assert fmt.span_words([(0, 1), (2, 3), (4, 6)], limit=2) == "rows 0, 2 ..."
    assert fmt.span_words([(4, 5)], "image") == "image 4"
    assert fmt.skipped_loss_words([2], 10) == "does not read at row 2 of 10 (the others read)"
    assert fmt.skipped_loss_words([2, 3, 6], 10) == "does not read at rows 2-3, 6 of 10 (the others read)"
