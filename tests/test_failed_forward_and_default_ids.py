"""Round 31: three small fixes round 30 left open. A forward that raises no longer leaves its partial batch held by
the recording until the next forward; an ``hf:`` checkpoint whose image processor config cannot be read is refused
naming the file, the reader's error and the fix; the BFD tensor pass gives the ids by the recording's one rule."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

import qkhooks
from qkhooks.errors import QKHooksError
from test_taken_inputs_anisotropy import _images, _tiny_vit  # the 3-layer ViT of 4x4 patches


# ------------------------------------------------------------------ capture.py: a failed forward's batch is freed
def test_a_forward_that_raises_inside_a_layer_leaves_none_of_its_batch_held_and_the_next_forward_is_whole():
    """Block 2 raises: the partial batch (layer 0's q/k maps and full attention, taken before) is no longer referenced
    by the recording once the forward has failed, not only once the next one begins; reading says why there is no
    batch, and the next forward records what a fresh recording records for the same images."""
    model = _tiny_vit()
    held: dict[str, weakref.ref] = {}

    class Watch:  # takes inputs, so it sees the open batch in each layer's hook
        def take_inputs(self, batch, layer, tokens) -> None:
            held["batch"] = weakref.ref(batch)
            for l, cap in batch.captures.items():
                held[f"query{l}"], held[f"full{l}"] = weakref.ref(cap.query), weakref.ref(cap.attention["full"])

        def update(self, batch) -> None:
            pass

    def boom(module, args):
        raise RuntimeError("boom")

    with torch.no_grad(), qkhooks.record(model, modes=2, attention="full", sinks=[Watch()]) as run:
        handle = model.blocks[2].register_forward_pre_hook(boom)
        try:
            with pytest.raises(RuntimeError, match="boom"):
                run(_images(1))
        finally:
            handle.remove()
        gc.collect()
        assert sorted(held) == ["batch", "full0", "query0"]  # layer 0's maps were taken before block 2 raised
        assert all(ref() is None for ref in held.values())
        with pytest.raises(QKHooksError, match=r"^the last forward did not complete \(it raised, or it is still "
                                               r"running\)"):
            run.query(0)
        run(_images(2))
        got = {l: (run.query(l).clone(), run.attention(l, "full").clone()) for l in run.layers}
        assert run.ids == ["0", "1", "2"]  # the failed batch counted no images
    with torch.no_grad(), qkhooks.record(model, modes=2, attention="full") as fresh:
        fresh(_images(2))
        for l in fresh.layers:
            assert torch.equal(got[l][0], fresh.query(l)) and torch.equal(got[l][1], fresh.attention(l, "full"))


# ------------------------------------------------------------ models/load.py: an unreadable processor config, named
from test_hf_processor_config_required import hf_checkpoint  # noqa: E402,F401 - the tiny ViT folder without a processor


@pytest.mark.parametrize("saved, error", [("{not json", r"OSError: It looks like the config file at '\S+' is not a "
                                                        r"valid JSON file\."),
                                          ('{"image_processor_type": "NoSuchImageProcessor"}',
                                           r"ValueError: Unrecognized image processor in \S+\. .{0,300}(\.\.\.)?")])
def test_a_pretrained_hf_folder_whose_processor_config_cannot_be_read_is_refused_naming_the_file_the_error_and_the_fix(
        hf_checkpoint, saved, error):
    """Before round 31 the reader's error was swallowed and the folder refused as having no processor config at all.
    The refusal names the file, transformers' own error (its first line, at most 300 characters) and the fix; with
    an image_config given the folder loads with it, and a folder without the file keeps its own refusal."""
    import re

    from qkhooks.data import ImageConfig
    from qkhooks.models.load import load_model

    (hf_checkpoint / "preprocessor_config.json").write_text(saved)
    with pytest.raises(QKHooksError) as refused:
        load_model(f"hf:{hf_checkpoint}")
    message = str(refused.value)
    assert re.fullmatch(
        re.escape(f"hf:{hf_checkpoint}'s image processor config ({hf_checkpoint / 'preprocessor_config.json'}) could "
                  "not be read (") + error + re.escape(
            "), so its preprocessing (size, resize, mean, std) is not known, and qkhooks does not guess it for "
            "pretrained weights. Fix or replace that file (AutoImageProcessor.save_pretrained writes it; a hub id "
            "must be cached or reachable), or pass load_model(..., "
            "image_config=qkhooks.data.ImageConfig.from_hf(processor_dict))."), message), message
    given = ImageConfig(size=(32, 32), mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6))
    assert load_model(f"hf:{hf_checkpoint}", image_config=given).image_config is given
    (hf_checkpoint / "preprocessor_config.json").unlink()
    with pytest.raises(QKHooksError, match=r"^hf:\S+ has no image processor config that transformers can read"):
        load_model(f"hf:{hf_checkpoint}")


# ---------------------------------------------------------------- ids: one rule for the recording and the BFD pass
class _Ids:
    """A sink that notes the batch's ids as each layer's hook sees them, and as the batch ends."""

    def __init__(self):
        self.in_hooks: list[list[str]] = []
        self.ended: list[list[str]] = []

    def take_inputs(self, batch, layer, tokens) -> None:
        if layer == 0:
            self.in_hooks.append(list(batch.ids))

    def update(self, batch) -> None:
        self.ended.append(list(batch.ids))


def test_default_ids_are_the_ids_a_batch_without_ids_gets_counted_from_the_recordings_index_base():
    model = _tiny_vit()
    seen = _Ids()
    with torch.no_grad(), qkhooks.record(model, modes=None, sinks=[seen]) as run:
        run.index_base = 5  # e.g. a resumed run, or one shard of a distributed run
        assert run.default_ids(3) == ["5", "6", "7"]
        run(_images(1))
        assert run.default_ids(2) == ["8", "9"]
        run(_images(2, n=2))
        run(_images(3, n=2), ids=run.default_ids(2))
    assert seen.in_hooks == [[], [], ["10", "11"]]  # made as the batch ends unless given up front
    assert seen.ended == [["5", "6", "7"], ["8", "9"], ["10", "11"]]


def test_the_bfd_tensor_pass_gives_each_batch_the_ids_of_the_recordings_rule_up_front(monkeypatch):
    """The tensor pass hands each batch ``run.default_ids(n)`` before its forward, so the layer hooks see the ids
    (the position probes split tokens there) and they are the recording's: with the rule replaced, the pass gives the
    replacement's ids (before round 31 it restated the rule, without the index base)."""
    from qkhooks.analysis.bfd import _tensor_pass
    from qkhooks.capture import Recording

    model = _tiny_vit()
    batches = [_images(1), _images(2, n=2)]
    seen = _Ids()
    _tensor_pass(model, batches, [seen], layers=[0, 1], input="normed", device="cpu")
    assert seen.in_hooks == seen.ended == [["0", "1", "2"], ["3", "4"]]
    monkeypatch.setattr(Recording, "default_ids", lambda self, n: [f"rule{self.images_seen + i}" for i in range(n)])
    seen = _Ids()
    _tensor_pass(model, batches, [seen], layers=[0, 1], input="normed", device="cpu")
    assert seen.in_hooks == seen.ended == [["rule0", "rule1", "rule2"], ["rule3", "rule4"]]
