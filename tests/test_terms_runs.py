"""zoo12: a two-softmax layer's terms (ConViT GPSA: content per image, position and gate once) stored in the run file
and read back in the vocabulary of a live recording (``run.terms(l)``); checked with h5py against the live terms, and
the stored pieces against the stored maps (the model's combination written out here)."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from qkhooks import QKHooksError

from test_map_forms import _convit


def test_gpsa_terms_in_a_run_file_equal_the_live_terms_and_combine_into_the_stored_maps(tmp_path):
    from qkhooks.data.preprocess import ImageConfig
    from qkhooks.models.load import load_model
    from qkhooks.store import open_run
    from qkhooks.stream import record_dataset

    model = _convit().eval()
    live: dict[int, dict[str, list[torch.Tensor]]] = {}

    def keep(batch) -> None:
        for layer, cap in batch.captures.items():
            for name, term in (cap.terms or {}).items():
                live.setdefault(layer, {}).setdefault(name, []).append(term.clone())

    config = ImageConfig(size=(32, 32), mean=(0.5,) * 3, std=(0.5,) * 3)
    path = tmp_path / "convit.h5"
    record_dataset(load_model(model, image_config=config), "samples", path, limit=4, batch_size=2, progress=False,
                   dtype="float32", modes=2, attention="full", reducers=[], on_batch=keep)
    assert sorted(live) == [0, 1]  # the two GPSA blocks; the MHSA block has one softmax per map
    with h5py.File(path, "r") as f:
        for layer, terms in live.items():
            np.testing.assert_array_equal(f[f"terms/L{layer}/content"][:], torch.cat(terms["content"]).numpy())
            for name in ("position", "gate"):  # the layer's own: the same in every batch, stored once
                assert all(torch.equal(t, terms[name][0]) for t in terms[name])
                np.testing.assert_array_equal(f[f"terms/L{layer}/{name}"][()], terms[name][0].numpy())
    with open_run(path) as run:
        assert run.terms_layers == [0, 1]
        for layer in run.terms_layers:
            terms = run.terms(layer)
            assert sorted(terms) == ["content", "gate", "position"]
            content, position = np.asarray(terms["content"][:], np.float64), np.asarray(terms["position"], np.float64)
            gate = np.asarray(terms["gate"], np.float64)[None, :, None, None]
            mixed = (1 - gate) * content + gate * position[None]
            want = mixed / mixed.sum(-1, keepdims=True)  # GPSA's gated mix, renormalised per row
            np.testing.assert_allclose(run.attention(layer, "full")[:], want, atol=1e-5, rtol=0)
        with pytest.raises(QKHooksError, match=r"two-softmax terms"):
            run.terms(2)  # the MHSA block: one softmax per map, no terms
