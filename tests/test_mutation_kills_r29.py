"""Kill tests for the mutants of round 29's library code (``e52c7d9..0c36b52``: the anisotropy baseline's centre rows
taken in the layer's hook, ``keep_last``, the statics-only resume fixed at open, the resume's message) that their tests
let survive (module "round29" of tests/mutation.py, ``--only ROUND29``; tests/MUTATION.md's "round 29" section names
each); and the harness's round29 module kept consistent."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

import qkhooks
from qkhooks.analysis.anisotropy import AnisotropyReducer, CentreEmbeddings
from qkhooks.capture import BatchCapture, LayerCapture
from qkhooks.errors import QKHooksError

from test_mutation_kills_r26 import check_round_module
from test_mutation_kills_r27 import _stage_batch, _unit_sum


# ------------------------------------------------------------------------------------ tests/mutation.py: round29
def test_the_round29_module_names_files_and_tests_that_exist_and_round_29s_commits():
    """The harness's module "round29" and its named set ROUND29: every file to mutate and every test file exists, the
    selection names only test files it selects, the commit range resolves in this checkout to round 29's library
    commits, and every library file they changed is mutated."""
    check_round_module("round29", "ROUND29", "e52c7d9", "0c36b52", library_commits=2)


# ------------------------------------------------------------------------ anisotropy.py: take_inputs, _batch_centres
def _handed_over(batch: BatchCapture, reducer: AnisotropyReducer) -> dict[int, torch.Tensor]:
    """Each layer's kept tokens handed to ``reducer.take_inputs`` as a recording's hook would, then dropped from the
    batch (so the fold can only use the rows taken); returns the tokens."""
    tokens = {layer: cap.inputs for layer, cap in batch.captures.items()}
    for layer, x in tokens.items():
        batch.captures[layer].inputs = None
        reducer.take_inputs(batch, layer, x)
    return tokens


def test_rows_taken_from_stages_of_two_grids_are_each_layers_own_centre_as_numpy():
    """take_inputs finds each layer's centre on that layer's own grid (the recorded geometry: a 3 x 3 stage, then a
    2 x 2 one), not the batch's default grid: the folded sums and counts are numpy's of each layer's centre token."""
    reducer = AnisotropyReducer()
    batches = [_stage_batch(seed, n) for seed, n in ((0, 4), (1, 3))]
    tokens = []
    for batch in batches:
        tokens.append(_handed_over(batch, reducer))
        reducer.update(batch)
    for layer, centre in {0: 5, 1: 5, 2: 4}.items():  # CLS + the centre of 3 x 3 (token 5), of 2 x 2 (row 1, col 1)
        expected, count = _unit_sum(np.concatenate([t[layer][:, centre].numpy() for t in tokens]))
        assert reducer.count[layer] == count
        np.testing.assert_allclose(reducer.sums[layer].numpy(), expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("taken", [True, False], ids=["taken", "kept"])
def test_the_prefix_learnt_from_the_first_batch_is_checked_against_its_token_count_not_the_width(taken):
    """A batch of narrow tokens (width 4) behind five prefix tokens (CLS + 4 registers) on a 3 x 3 grid, handed over
    in the hook or kept: the prefix learnt on the first batch is checked against the 14 tokens, not the width 4, and
    the centre folded is token 9: numpy's sum and count."""
    x = torch.randn(3, 5 + 9, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    batch = BatchCapture(ids=[], meta={"num_prefix_tokens": 5, "grid": (3, 3)},
                         layers={0: LayerCapture(0, 3, inputs=None if taken else x)}, offset=0)
    reducer = AnisotropyReducer()
    if taken:
        reducer.take_inputs(batch, 0, x)
    reducer.update(batch)
    expected, count = _unit_sum(x[:, 5 + 4].numpy())
    assert reducer.num_prefix_tokens == 5 and reducer.count[0] == count == 3
    np.testing.assert_allclose(reducer.sums[0].numpy(), expected, rtol=1e-12, atol=0)


def test_tokens_of_the_wrong_rank_handed_over_or_kept_are_refused_naming_their_layer():
    flat = torch.zeros(3, 10)
    refusal = r"^layer 1: tokens must be \(batch, tokens, dim\), got \(3, 10\)\.$"
    batch = BatchCapture(ids=[], meta={"num_prefix_tokens": 1, "grid": (3, 3)}, layers={1: LayerCapture(1, 3)}, offset=0)
    with pytest.raises(QKHooksError, match=refusal):
        AnisotropyReducer().take_inputs(batch, 1, flat)
    kept = BatchCapture(ids=[], meta={"num_prefix_tokens": 1, "grid": (3, 3)},
                        layers={1: LayerCapture(1, 3, inputs=flat)}, offset=0)
    with pytest.raises(QKHooksError, match=refusal):
        AnisotropyReducer().update(kept)


@pytest.mark.parametrize("reducer_type", [AnisotropyReducer, CentreEmbeddings])
def test_a_batch_without_tokens_is_refused_by_the_reducers_own_name(reducer_type):
    """Both refusals (no layer's tokens; some layers' tokens missing) name the reducer that refuses."""
    x = torch.zeros(2, 10, 6)
    none = BatchCapture(ids=[], meta={"num_prefix_tokens": 1, "grid": (3, 3)}, layers={0: LayerCapture(0, 2)}, offset=0)
    with pytest.raises(QKHooksError, match=rf"^{reducer_type.__name__} needs the captured tokens: record with "
                                           r"keep_inputs=True\.$"):
        reducer_type().update(none)
    some = BatchCapture(ids=[], meta={"num_prefix_tokens": 1, "grid": (3, 3)},
                        layers={0: LayerCapture(0, 2, inputs=x), 1: LayerCapture(1, 2)}, offset=0)
    with pytest.raises(QKHooksError, match=rf"^{reducer_type.__name__} got no tokens of layer\(s\) \[1\]: the "
                                           r"recording neither handed them over .* nor kept them; pass this reducer "
                                           r"in record\(\.\.\., sinks=\[\.\.\.\]\), or record with "
                                           r"keep_inputs=True\.$"):
        reducer_type().update(some)


# ------------------------------------------------------------------------------------- capture.py: keep_last
def test_reading_the_last_batch_of_a_recording_that_keeps_none_is_refused_with_the_whole_fix():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                              depth=1, num_heads=4).eval()
    with torch.no_grad(), qkhooks.record(model, modes=2, keep_last=False) as run:
        run(torch.zeros(1, 3, 32, 32))
        with pytest.raises(QKHooksError, match=r"^this recording hands each batch to its sinks only \(keep_last=False, "
                                               r"as record_dataset's\), so it keeps no last batch to read; record with "
                                               r"keep_last=True\.$"):
            run.query(0)


# ------------------------------------------------------------------- stream.py: record_dataset's keep_last=False
def test_record_dataset_frees_each_batch_before_the_next_forward(tmp_path):
    """record_dataset's recording keeps no last batch (keep_last=False): when the next batch's forward begins, no
    batch handed to the sinks is still alive (held as run.last, a batch's maps and tokens would live through it)."""
    import gc
    import weakref

    from qkhooks.stream import record_dataset

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                              depth=2, num_heads=4).eval()
    handed: list[weakref.ref] = []
    alive: list[list[bool]] = []

    def at_each_forward(module: torch.nn.Module, args: tuple) -> None:
        gc.collect()
        alive.append([ref() is not None for ref in handed])

    model.patch_embed.register_forward_pre_hook(at_each_forward)
    result = record_dataset(model, "samples", tmp_path / "run.h5", modes=2, limit=6, batch_size=2, progress=False,
                            on_batch=lambda batch: handed.append(weakref.ref(batch)))
    assert result.images == 6 and len(handed) == 3
    assert [len(seen) for seen in alive[-2:]] == [1, 2] and not any(any(seen) for seen in alive)
