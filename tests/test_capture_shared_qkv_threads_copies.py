"""Round 38's review of capture (a q/k Linear shared by two blocks, recordings across threads, a deepcopy of the
model inside record(), per-batch meta, a truncated spectrum handed in, an empty batch, functional_call): each test
seen to fail on the code before its fix, each number compared with an independent reference (a dense float64 SVD of
W_q_hᵀW_k_h per head applied to the tokens a plain hook saw, or the model's own eager attention)."""

from __future__ import annotations

import contextlib

import copy

import numpy as np
import pytest
import torch

import qkhooks
from qkhooks.errors import QKHooksError
from test_capture_changes_inside_record import _images, _timm
from conftest import forward_with_hooks


def _collected() -> tuple[list, object]:
    """A sink that keeps every batch handed to it, and the list it keeps them in."""
    batches: list = []
    return batches, type("Sink", (), {"update": lambda self, batch: batches.append(batch)})()


def _tokens(model: torch.nn.Module, x: torch.Tensor) -> dict[int, np.ndarray]:
    """The tokens entering each block's attention (a plain pre-hook; float64 copies)."""
    seen: dict[int, np.ndarray] = {}
    handles = [b.attn.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, a[0].double().numpy().copy()))
               for i, b in enumerate(model.blocks)]
    forward_with_hooks(model, handles, x)
    return seen


def _dense_query(attn: torch.nn.Module, x: np.ndarray, k: int) -> np.ndarray:
    """x·u_n per head from a dense float64 SVD of W_q_hᵀW_k_h (sign: the largest |u| entry positive): (B, H, k, N)."""
    w = attn.qkv.weight.detach().double().numpy()
    heads = attn.num_heads
    dk = w.shape[0] // 3 // heads
    out = []
    for h in range(heads):
        u, _, _ = np.linalg.svd(w[h * dk:(h + 1) * dk].T @ w[heads * dk + h * dk:heads * dk + (h + 1) * dk])
        u = u[:, :k] * np.sign(u[np.abs(u[:, :k]).argmax(0), np.arange(k)])
        out.append(np.einsum("bnd,dk->bkn", x, u))
    return np.stack(out, 1)


def _eager_probs(model: torch.nn.Module, x: torch.Tensor) -> dict[int, torch.Tensor]:
    """The softmax each block's attention computes (its eager path, on a copy): attn_drop's input."""
    ref = copy.deepcopy(model)
    probs: dict[int, torch.Tensor] = {}
    for i, block in enumerate(ref.blocks):
        block.attn.fused_attn = False
        block.attn.attn_drop.register_forward_pre_hook(lambda m, a, i=i: probs.__setitem__(i, a[0].clone()))
    with torch.no_grad():
        ref(x)
    return probs


def _rel(a: torch.Tensor | np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


# ------------------------------------------------------------- 1. a q/k Linear shared by two blocks
@pytest.mark.parametrize("layers", [None, [0]])
def test_a_qkv_linear_shared_by_two_blocks_gives_each_layer_its_own_maps(layers):
    """Before: with ``blocks[1].attn.qkv = blocks[0].attn.qkv``, layer 0's modes and full maps were layer 1's (its
    q/k hook took the shared Linear's later call in the same forward), off by ~0.9, also with layers=[0] alone."""
    model, x = _timm(), _images()
    model.blocks[1].attn.qkv = model.blocks[0].attn.qkv
    tokens, probs = _tokens(model, x), _eager_probs(model, x)
    with torch.no_grad(), qkhooks.record(model, modes=4, layers=layers, attention="full") as run:
        model(x)
    assert run.mode_source[0] == "qk"
    for layer in run.layers:
        want = _dense_query(model.blocks[layer].attn, tokens[layer], 4)
        assert _rel(run.query(layer), want) < 1e-5, layer
        assert float((run.attention(layer, "full") - probs[layer]).abs().max()) < 1e-5, layer
    other = _dense_query(model.blocks[0].attn, tokens[1], 4)  # the shared Linear's call in block 1
    assert _rel(run.query(0), other) > 0.1


def test_a_qkv_linear_also_called_by_a_head_after_the_blocks_leaves_its_layer_exact():
    """Before: a head calling ``blocks[0].attn.qkv`` on its own input after the blocks crashed inside qkhooks' hook
    with a plain ValueError (or, with a head of the same shape, replaced layer 0's maps)."""
    model, x = _timm(), _images()

    class Head(torch.nn.Module):
        def __init__(self, qkv: torch.nn.Module) -> None:
            super().__init__()
            self.qkv = qkv

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.qkv(tokens[:, None] * 2.0)[..., :5]

    model.head = Head(model.blocks[0].attn.qkv)
    tokens, probs = _tokens(model, x), _eager_probs(model, x)
    with torch.no_grad(), qkhooks.record(model, modes=4, layers=[0], attention="full") as run:
        model(x)
    assert _rel(run.query(0), _dense_query(model.blocks[0].attn, tokens[0], 4)) < 1e-5
    assert float((run.attention(0, "full") - probs[0]).abs().max()) < 1e-5


@contextlib.contextmanager
def qkv_called_twice(attn):
    """While open, every call of ``attn``'s class runs its qkv Linear once more first (on halved tokens)."""
    plain = type(attn).forward

    def twice(self, tokens, *args, **kwargs):
        self.qkv(tokens * 0.5)
        return plain(self, tokens, *args, **kwargs)

    type(attn).forward = twice
    try:
        yield
    finally:
        type(attn).forward = plain


def test_a_qkv_linear_called_twice_within_its_own_attention_call_is_refused():
    """An attention module that calls its qkv Linear twice in one call: which output is q and k cannot be told."""
    model, x = _timm(depth=1), _images()
    attn = model.blocks[0].attn
    with torch.no_grad(), qkhooks.record(model, modes=4) as run:
        with qkv_called_twice(attn), pytest.raises(
                QKHooksError, match=r"blocks\.0\.attn\.qkv \(layer 0's q/k projection\) ran more than once within one "
                                    r"call of blocks\.0\.attn.*qk_path=False"):
            model(x)
        model(x)  # the next batch is recorded, exact
    assert _rel(run.query(0), _dense_query(attn, _tokens(model, x)[0], 4)) < 1e-5


# ------------------------------------------------------------- 3. a copy of the model made inside record()
def _hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_a_deepcopy_made_inside_record_is_refused_there_and_a_plain_model_after():
    """Before: ``copy.deepcopy(model)`` inside the context copied qkhooks' hooks with it; the copy's forward was handed
    to the recording's sinks as a batch (maps of the copy's tokens with the model's modes, 0.45-0.52 off the copy's
    own), after exit every call of the copy raised AttributeError, and record(copy) was refused blaming someone
    else's hook. Now its call inside is refused (the model's batches kept), and after exit it is a plain model."""
    model, x, y = _timm(), _images(), _images(seed=1)
    batches, sink = _collected()

    with torch.no_grad(), qkhooks.record(model, modes=4, sinks=[sink]) as run:
        model(x)
        ema = copy.deepcopy(model)
        for p in ema.parameters():
            p.mul_(0.5)
        with pytest.raises(QKHooksError, match=r"a copy of the recorded model made inside record\(\).*Copy the model "
                                               r"before entering record\(\)"):
            ema(y)
    assert len(batches) == 1 and batches[0].ids == ["0", "1"]
    assert _rel(run.query(1), _dense_query(model.blocks[1].attn, _tokens(model, x)[1], 4)) < 1e-5
    with torch.no_grad():
        out = ema(y)  # after exit: the copy's hooks do nothing, and take themselves off
    assert _hook_count(ema) == 0
    plain = copy.deepcopy(ema)
    with torch.no_grad():
        assert torch.equal(out, plain(y))
        with qkhooks.record(ema, modes=4) as copied:
            ema(y)
    assert _rel(copied.query(1), _dense_query(ema.blocks[1].attn, _tokens(ema, y)[1], 4)) < 1e-5


def test_the_model_saved_inside_record_pickles_and_loads_without_live_hooks(tmp_path):
    """Before: ``torch.save(model)`` inside the context failed: "Can't pickle local object
    '_untraced.<locals>.untraced_hook'"."""
    model, x = _timm(), _images()
    with torch.no_grad(), qkhooks.record(model, modes=4) as run:
        model(x)
        torch.save(model, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
        with qkhooks.record(loaded, modes=4) as again:
            loaded(x)
    assert torch.equal(again.query(0), run.query(0))
    assert _hook_count(loaded) == 0


# ------------------------------------------------------------- 2. recordings and threads
_THREAD = r"called from another thread than the one that entered record\(\).*one copy of the model per thread before"


def _in_thread(fn):
    """Run ``fn`` in a new thread; its return value, or the exception it raised."""
    import threading

    out = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            out["value"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return out["value"]


def test_a_recordings_model_called_from_another_thread_is_refused_and_its_own_batches_kept():
    """Before: one recording whose model was called from two threads got partial and mixed batches under one set of
    ids (a layer's maps from the other thread's images)."""
    model, x, y = _timm(), _images(), _images(seed=1)
    batches, sink = _collected()

    with torch.no_grad(), qkhooks.record(model, modes=4, sinks=[sink]) as run:
        model(x)
        got = _in_thread(lambda: model(y))
        assert isinstance(got, QKHooksError) and __import__("re").search(_THREAD, str(got)), got
    assert len(batches) == 1 and run.images_seen == 2
    tokens = _tokens(model, x)
    for layer in run.layers:
        assert _rel(run.query(layer), _dense_query(model.blocks[layer].attn, tokens[layer], 4)) < 1e-5


def test_two_recordings_of_one_model_in_two_threads_are_refused_and_copies_made_before_are_exact():
    """Before: two recordings on one model, one per thread, each received the other's batches. Now a call meets the
    other thread's hooks and is refused. One copy of the model per thread, made before record(), is the fix named."""
    import threading

    model, x, y = _timm(), _images(), _images(seed=1)
    attached, called = threading.Barrier(2), threading.Barrier(2)
    errors = {}

    def work(name, images):
        with torch.no_grad(), qkhooks.record(model, modes=4) as run:
            attached.wait()
            try:
                model(images)
            except QKHooksError as exc:
                errors[name] = str(exc)
            called.wait()
        return run

    threads = [threading.Thread(target=work, args=a) for a in (("a", x), ("b", y))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(errors) == ["a", "b"] and all(__import__("re").search(_THREAD, e) for e in errors.values())

    copies = [copy.deepcopy(model), copy.deepcopy(model)]
    runs = {}

    def one(i, images):
        with torch.no_grad(), qkhooks.record(copies[i], modes=4) as run:
            for _ in range(3):
                copies[i](images)
        runs[i] = run

    threads = [threading.Thread(target=one, args=a) for a in ((0, x), (1, y))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, images in ((0, x), (1, y)):
        tokens = _tokens(model, images)
        assert runs[i].images_seen == 6
        assert _rel(runs[i].query(2), _dense_query(model.blocks[2].attn, tokens[2], 4)) < 1e-5


# ------------------------------------------------------------- 4. per-batch meta
def test_per_batch_tokens_and_masks_are_the_batchs_own_and_one_row_of_tokens_is_kept_per_image():
    """Before: ``meta={"query_tokens": qt, "pool_masks": masks}`` was kept by reference, so a caller reusing qt and masks
    in place for the next batch changed what the earlier batch said it was recorded with; tokens given as (T,) were
    kept as (T,), where the rest of the code (and the docs) take (B, T)."""
    model, x = _timm(), _images(3)
    probs = _eager_probs(model, x)
    qt = torch.tensor([[0, 3]] * 3)
    masks = torch.zeros(3, 1, 4)
    masks[:, 0, :2] = 1
    batches, sink = _collected()

    with torch.no_grad(), qkhooks.record(model, modes=None, layers=[1], attention=["rows", "pooled"],
                                         sinks=[sink]) as run:
        run(x, meta={"query_tokens": qt, "pool_masks": masks})
        qt[:, 1] = 4
        masks[:, 0] = 1 - masks[:, 0]
        run(x, meta={"query_tokens": qt, "pool_masks": masks})
        run(x, meta={"query_tokens": torch.tensor([2, 0]), "pool_masks": masks})
    first, second, third = batches
    assert first.meta["query_tokens"].tolist() == [[0, 3]] * 3 and second.meta["query_tokens"].tolist() == [[0, 4]] * 3
    assert float(first.meta["pool_masks"][:, 0, :2].min()) == 1 and float(first.meta["pool_masks"][:, 0, 2:].max()) == 0
    want = probs[1]
    assert float((first.attention(1, "rows") - want[:, :, [0, 3]]).abs().max()) < 1e-5
    assert float((second.attention(1, "rows") - want[:, :, [0, 4]]).abs().max()) < 1e-5
    pooled = want[:, :, [0, 3], 1:3].sum(-1, keepdim=True)  # mass on the first two patch tokens
    assert float((first.attention(1, "pooled") - pooled).abs().max()) < 1e-5
    assert tuple(third.meta["query_tokens"].shape) == (3, 2) and third.meta["query_tokens"].tolist() == [[2, 0]] * 3
    assert float((third.attention(1, "rows") - want[:, :, [2, 0]]).abs().max()) < 1e-5


@pytest.mark.parametrize("images", [2, 3])
def test_tokens_given_as_one_row_are_stored_per_image_by_a_recording_without_rows(tmp_path, images):
    """FUZZ-REC: with full maps only, tokens given as (T,) stayed (T,) in the batch, so a run file got
    ``attention/query_tokens`` of shape (T,): refused as 'one row per id' where T != B, and where T == B stored
    silently as one token per image (image 0 token 0, image 1 token 3). Each image gets the tokens, as with rows."""
    import h5py

    from qkhooks.store.writer import RunWriter
    from qkhooks.stream import WriterSink

    model, x = _timm(), _images(images)
    path = tmp_path / "run.h5"
    batches, sink = _collected()
    with RunWriter(path, attrs={"model": "vit", "config": "{}"}, dtype="float32") as writer:
        with torch.no_grad(), qkhooks.record(model, modes=None, layers=[1], attention="full",
                                             sinks=[sink, WriterSink(writer)]) as run:
            run(x, meta={"query_tokens": torch.tensor([0, 3])})
    assert batches[0].meta["query_tokens"].tolist() == [[0, 3]] * images
    with pytest.raises(QKHooksError, match="query_tokens has 3 rows for a batch of 2 images; give one row per image"):
        with torch.no_grad(), qkhooks.record(model, modes=None, layers=[1], attention="full") as run:
            run(x[:2], meta={"query_tokens": torch.tensor([[0, 1], [2, 3], [1, 1]])})  # read by no layer, still kept
    with h5py.File(path, "r") as f:
        assert f["attention/query_tokens"][:].tolist() == [[0, 3]] * images
        np.testing.assert_allclose(f["attention/L1/full"][:], _eager_probs(model, x)[1].numpy(), atol=1e-6, rtol=0)


# ------------------------------------------------------------- 5. a truncated spectrum handed in
@pytest.mark.parametrize("modes", ["all", 8])
def test_a_truncated_spectrum_given_is_what_the_config_says_and_the_warning_names_it(modes):
    """Before: modes='all' with ``spectrum=qkhooks.spectrum(m).top(4)`` recorded 4 of 16 modes while config["modes"]
    and modes_kept said 'all'; modes=8 warned that "its 16-dim heads have at most 4 modes each", blaming the heads."""
    model, x = _timm(), _images()
    with pytest.warns(UserWarning, match=r"spectrum given \(spectrum=\).*truncated to the top 4 modes of each head") as got:
        with torch.no_grad(), qkhooks.record(model, modes=modes, spectrum=qkhooks.spectrum(model).top(4)) as run:
            model(x)
    assert not any("-dim heads" in str(w.message) for w in got)
    assert run.config["modes"] == 4 and run.modes_kept == 4
    tokens = _tokens(model, x)
    for layer in run.layers:
        assert run.query(layer).shape[2] == 4
        assert _rel(run.query(layer), _dense_query(model.blocks[layer].attn, tokens[layer], 4)) < 1e-5


# ------------------------------------------------------------- 6. a batch of no images
def test_an_empty_batch_is_refused_naming_it_and_the_batch_before_is_kept():
    """Before: a batch of 0 images raised a plain RuntimeError from a reshape in projector.py."""
    import transformers as T

    model, x = _timm(), _images()
    with torch.no_grad(), qkhooks.record(model, modes=4, attention="rows") as run:
        model(x)
        with pytest.raises(QKHooksError, match=r"the batch is empty \(an input of shape \(0, 3, 16, 16\): 0 images\)"):
            model(x[:0])
        with pytest.raises(QKHooksError, match=r"the batch is empty \(an input of shape \(0, 5, 32\): 0 images\)"):
            model.blocks[0].attn(torch.zeros(0, 5, 32))
        assert run.images_seen == 2 and run.ids == ["0", "1"]
    assert _rel(run.query(2), _dense_query(model.blocks[2].attn, _tokens(model, x)[2], 4)) < 1e-5

    torch.manual_seed(0)
    hf = T.ViTModel(T.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                image_size=16, patch_size=8)).eval()
    with torch.no_grad(), qkhooks.record(hf, modes=4) as run:
        with pytest.raises(QKHooksError, match=r"the batch is empty \(an input of shape \(0, 3, 16, 16\)"):
            hf(pixel_values=x[:0])


# ------------------------------------------------------------- 7. parameters substituted (torch.func.functional_call)
def test_functional_call_is_refused_naming_the_substituted_parameters_and_an_in_place_edit_keeps_its_message():
    """Before: functional_call with the model's own parameters cloned was refused as "weights changed ... (a
    checkpoint loaded, an optimiser step, ...)", which names none of what the caller did."""
    model, x = _timm(), _images()
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    with torch.no_grad(), qkhooks.record(model, modes=4) as run:
        model(x)
        with pytest.raises(QKHooksError, match=r"layer 0 \(blocks\.0\.attn\): its parameters are not the module's own "
                                               r"in this call \('blocks\.0\.attn\.qkv\.weight'.*torch\.func\."
                                               r"functional_call.*load_state_dict"):
            torch.func.functional_call(model, params, (x,))
        assert run.images_seen == 2
        model.blocks[0].attn.qkv.weight.mul_(1.5)
        with pytest.raises(QKHooksError, match=r"its weights changed inside this record\(\) context \(a checkpoint"):
            model(x)
    with torch.no_grad():
        model.blocks[0].attn.qkv.weight.div_(1.5)
    assert _rel(run.query(1), _dense_query(model.blocks[1].attn, _tokens(model, x)[1], 4)) < 1e-5
