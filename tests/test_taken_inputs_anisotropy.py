"""Round 29: the anisotropy baseline takes each layer's centre patch in the layer's hook (``take_inputs``), so a
recording with the default reducers no longer keeps every layer's tokens (B, N, d) until the batch ends. The state
must equal the one folded from kept tokens, bit for bit, and a direct numpy computation; refusals stay whole."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import timm
import torch

import qkhooks
from qkhooks.analysis.anisotropy import AnisotropyReducer, CentreEmbeddings
from qkhooks.capture import BatchCapture, LayerCapture
from qkhooks.errors import QKHooksError
from qkhooks.stream import record_dataset


def _tiny_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=3,
                             num_heads=4).eval()


def _images(seed: int, n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _numpy_mean_pairwise_cosine(z: np.ndarray) -> float:
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    gram = z @ z.T
    n = len(z)
    return float((gram.sum() - np.trace(gram)) / (n * (n - 1)))


def test_taken_centres_fold_to_the_same_state_as_kept_tokens_and_numpy_without_keeping_any_tokens():
    model = _tiny_vit()
    taken, kept, images = AnisotropyReducer(), AnisotropyReducer(), CentreEmbeddings()
    with torch.no_grad(), qkhooks.record(model, modes=None, sinks=[taken, images]) as run:
        for seed in (1, 2):
            run(_images(seed))
            assert all(c.inputs is None for c in run.last.captures.values())  # no tokens kept for the batch
    inputs: dict[int, list[torch.Tensor]] = {}
    with torch.no_grad(), qkhooks.record(model, modes=None, keep_inputs=True, sinks=[kept]) as run:
        for seed in (1, 2):
            run(_images(seed))
            for layer in run.layers:
                inputs.setdefault(layer, []).append(run.inputs(layer).clone())
    assert sorted(taken.sums) == sorted(kept.sums) == [0, 1, 2] and taken.num_prefix_tokens == kept.num_prefix_tokens == 1
    for layer in kept.sums:
        assert torch.equal(taken.sums[layer], kept.sums[layer]) and taken.count[layer] == kept.count[layer] == 6
        z = torch.cat(inputs[layer])[:, 1 + 2 * 4 + 2].double().numpy()  # prefix 1, 4x4 grid: its centre patch
        assert taken.baselines()[layer] == pytest.approx(_numpy_mean_pairwise_cosine(z), abs=1e-12)
        np.testing.assert_allclose(np.concatenate(images.vectors[layer]), z / np.linalg.norm(z, axis=1, keepdims=True),
                                   rtol=0, atol=1e-6)


def test_record_dataset_with_the_default_reducers_keeps_no_tokens_and_its_baseline_equals_kept_tokens(tmp_path):
    model = _tiny_vit()
    seen: list[bool] = []
    common = dict(modes=2, limit=4, batch_size=2, progress=False)
    default = record_dataset(model, "samples", tmp_path / "a.h5", on_batch=lambda b: seen.append(
        any(c.inputs is not None for c in b.captures.values())), **common)
    kept = record_dataset(model, "samples", tmp_path / "b.h5", keep_inputs=True, **common)
    assert seen == [False, False]
    a, b = default.reducer("anisotropy"), kept.reducer("anisotropy")
    assert sorted(a.sums) == sorted(b.sums) and all(torch.equal(a.sums[l], b.sums[l]) for l in a.sums)
    assert a.count == b.count and a.num_prefix_tokens == b.num_prefix_tokens


def _batch(x: dict[int, torch.Tensor], inputs: bool) -> BatchCapture:
    caps = {l: LayerCapture(l, v.shape[0], inputs=v if inputs else None) for l, v in x.items()}
    return BatchCapture(ids=[], meta={"num_prefix_tokens": 1, "grid": (3, 3)}, layers=caps, offset=0)


def _tokens(seed: int, layers: int = 2, n: int = 3) -> dict[int, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {l: torch.randn(n, 10, 6, generator=g) for l in range(layers)}


def test_a_non_finite_centre_taken_in_a_hook_refuses_the_batch_whole_and_leaves_nothing_behind():
    reducer = AnisotropyReducer()
    first = _tokens(0)
    batch = _batch(first, inputs=False)
    for layer, x in first.items():
        reducer.take_inputs(batch, layer, x)
    reducer.update(batch)
    state = {l: s.clone() for l, s in reducer.sums.items()}, dict(reducer.count)
    bad = _tokens(1)
    bad[1][2, 5, 0] = float("nan")  # image 2's centre patch (prefix 1, 3x3 grid: token 5) at layer 1
    batch = _batch(bad, inputs=False)
    for layer, x in bad.items():
        reducer.take_inputs(batch, layer, x)
    with pytest.raises(QKHooksError, match="centre-patch embeddings"):
        reducer.update(batch)
    assert all(torch.equal(reducer.sums[l], state[0][l]) for l in state[0]) and reducer.count == state[1]
    assert not reducer._taken and reducer._taken.pop(batch) == {}  # the refused batch's rows are gone


def test_rows_taken_for_a_batch_whose_forward_failed_are_not_folded_into_the_next_and_do_not_keep_it_alive():
    reducer = AnisotropyReducer()
    failed = _batch(_tokens(0), inputs=False)
    reducer.take_inputs(failed, 0, _tokens(0)[0] * 1000)  # the forward then fails: no update for this batch
    del failed
    gc.collect()
    assert not reducer._taken  # a weak reference: the failed batch is not kept alive
    tokens = _tokens(1)
    reducer.update(_batch(tokens, inputs=True))  # its tokens kept: folded from them alone
    reference = AnisotropyReducer()
    reference.update(_batch(tokens, inputs=True))
    assert all(torch.equal(reducer.sums[l], reference.sums[l]) for l in reference.sums)


def test_a_layer_whose_tokens_were_neither_taken_nor_kept_is_refused_by_name():
    reducer = AnisotropyReducer()
    tokens = _tokens(0, layers=3)
    batch = _batch(tokens, inputs=False)
    for layer in (0, 2):
        reducer.take_inputs(batch, layer, tokens[layer])
    with pytest.raises(QKHooksError, match=r"got no tokens of layer\(s\) \[1\]: .* or record with keep_inputs=True"):
        reducer.update(batch)
    assert reducer.sums == {}
    with pytest.raises(QKHooksError, match="needs the captured tokens: record with keep_inputs=True"):
        reducer.update(_batch(tokens, inputs=False))


def _videomt() -> tuple[torch.nn.Module, torch.Tensor]:
    """A tiny VidEoMT (per-frame layers whose calls a recording joins) and a batch of 2 clips of 3 frames."""
    import transformers

    torch.manual_seed(0)
    config = transformers.VideomtConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                                        image_size=32, patch_size=8, num_queries=5, num_blocks=2)
    model = transformers.VideomtForUniversalSegmentation(config).eval()
    return model, torch.randn(2, 3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_a_layer_run_once_per_frame_hands_over_all_its_calls_once_joined_and_keeps_no_tokens_after():
    """VidEoMT's per-frame layers join their calls at the batch's end (a hook sees one frame's call only): the
    recording keeps their tokens until then, hands the joined (B·T, N, d) tokens over once, and drops them. What a
    taking sink gets equals what ``keep_inputs=True`` keeps, layer by layer."""
    model, clip = _videomt()

    class Taker:
        def __init__(self):
            self.taken: list[tuple[int, torch.Tensor]] = []

        def take_inputs(self, batch, layer, tokens):
            self.taken.append((layer, tokens.clone()))

        def update(self, batch):
            pass

    taker = Taker()
    with torch.no_grad(), qkhooks.record(model, modes=0, attention="full", sinks=[taker]) as run:
        model(pixel_values_videos=clip)
        assert all(c.inputs is None for c in run.last.captures.values())
    with torch.no_grad(), qkhooks.record(model, modes=0, attention="full", keep_inputs=True) as kept:
        model(pixel_values_videos=clip)
    assert [layer for layer, _ in taker.taken] == [0, 1, 2]  # one hand-over a layer, the joined ones at the end
    for layer, tokens in taker.taken:
        assert tokens.shape[0] == 6 and torch.equal(tokens, kept.inputs(layer))  # 2 clips x 3 frames


def test_keep_last_false_hands_batches_to_the_sinks_only_and_frees_them_before_the_next_forward():
    """record_dataset's recording keeps no ``run.last``: a batch's arrays (maps, tokens) are freed once the sinks are
    done, not held through the next forward; the sinks get the same batches, and reading a last batch is refused with
    the option that keeps it."""
    import weakref

    model = _tiny_vit()
    handed: list[weakref.ref] = []
    sizes: list[torch.Tensor] = []

    class Watch:
        def update(self, batch):
            handed.append(weakref.ref(batch))
            sizes.append(batch.captures[2].query.clone())

    with torch.no_grad(), qkhooks.record(model, modes=2, keep_last=False, sinks=[Watch()]) as run:
        run(_images(1))
        gc.collect()
        assert handed[0]() is None and run.last is None and run.images_seen == 3
        with pytest.raises(QKHooksError, match=r"keep_last=False.*record with keep_last=True"):
            run.query(2)
    with torch.no_grad(), qkhooks.record(model, modes=2) as kept:
        kept(_images(1))
    assert torch.equal(kept.query(2), sizes[0])  # the sinks saw what a kept last batch holds
    with torch.no_grad(), qkhooks.record(model, modes=2) as fresh:
        with pytest.raises(QKHooksError, match="nothing recorded yet"):
            fresh.query(2)
