"""Round 38's lead fixes, each checked against an independent reference (torch's own modules, numpy)."""

from __future__ import annotations

import pytest
import torch


@pytest.mark.parametrize("padding", [0, (1, 0, 2), "valid", "same"])
def test_the_video_tubelets_grid_is_what_the_conv3d_itself_gives(padding):
    """The Conv3d tubelet embedding's (frames, rows, cols) came from a third copy of the conv formula, which took a
    string padding apart letter by letter (TypeError on 'same'); it is the shared helper now, checked against the conv."""
    from qkhooks.models.video import SpaceTimeSite

    stride = 1 if padding == "same" else (2, 3, 2)
    conv = torch.nn.Conv3d(3, 4, kernel_size=(2, 3, 3), stride=stride, padding=padding)
    site = SpaceTimeSite.__new__(SpaceTimeSite)
    site._thw_of_call, site.tubelets = None, conv
    (module, hook), = site.context_hooks()
    clip = torch.zeros(1, 3, 7, 17, 12)
    hook(module, (clip,), {})
    assert site._thw_of_call == tuple(conv(clip).shape[2:])


def test_every_old_spelling_names_the_release_that_removes_it():
    """Review C (round 37): the compatibility shims warned with no removal version, so a user could not plan the
    change. Each names the release now, from one constant."""
    import warnings

    import qkhooks
    from qkhooks._version import REMOVED_IN
    from qkhooks.results import BatchCapture

    assert REMOVED_IN.split(".") > qkhooks.__version__.split(".")  # a release still to come
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        BatchCapture(ids=[], meta={}, layers={})
    (warning,) = [w for w in caught if issubclass(w.category, DeprecationWarning)]
    assert f"removed in qkhooks {REMOVED_IN}" in str(warning.message)
    assert "BatchCapture(captures=...)" in str(warning.message)


def _vit() -> torch.nn.Module:
    from test_capture_changes_inside_record import _timm

    return _timm(depth=2)


def _dense_sigmas(model: torch.nn.Module, layer: int) -> torch.Tensor:
    """(H, d_k) singular values of W_q^T W_k per head, float64 SVD of the model's own weights (the reference)."""
    attn = model.blocks[layer].attn
    d, h = attn.qkv.in_features, attn.num_heads
    w_q, w_k = (attn.qkv.weight[i * d:(i + 1) * d].double().view(h, d // h, d) for i in (0, 1))
    return torch.linalg.svdvals(w_q.transpose(1, 2) @ w_k)[:, : d // h]


@pytest.mark.parametrize("edit", ["in place", "a view of top(k) in place", "assigned", "modes='all' run's, in place"])
def test_a_spectrum_edited_by_its_caller_does_not_change_later_recordings(edit):
    """Review EDGE (round 38): the spectrum cache handed its own arrays out, so normalising them for a plot
    (S.div_(S.max())) changed every later record() on that model: its S in the run was the edited one, and signs
    flipped in place flipped later maps. The cache now notices its arrays edited or replaced and computes again."""
    import qkhooks

    model, images = _vit(), torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    truth = _dense_sigmas(model, 0)
    with qkhooks.record(model, modes=1) as reference:
        model(images)
    spec = qkhooks.spectrum(model)[0]
    if edit == "in place":
        spec.S.div_(spec.S.max())
        spec.U.neg_()
    elif edit == "a view of top(k) in place":
        spec.top(1).S.mul_(3.0)
    elif edit == "assigned":
        spec.S = spec.S / spec.S.max()
    else:
        with qkhooks.record(model, modes="all") as run:
            model(images)
        run.spectrum(0).S.mul_(9.0)
    with qkhooks.record(model, modes="all") as after:
        model(images)
    assert torch.allclose(after.spectrum(0).S.double(), truth, rtol=1e-5)
    want = reference.last.query(0)  # the first mode's maps, signs included, as before any edit
    assert torch.allclose(after.last.query(0)[..., :1, :], want, rtol=0, atol=1e-5 * float(want.abs().max()))
    again = qkhooks.spectrum(model)[0]
    assert torch.allclose(again.S.double(), truth, rtol=1e-5) and again is qkhooks.spectrum(model)[0]  # cached again


def test_load_model_leaves_a_module_you_built_in_its_own_train_mode_and_record_dataset_hands_it_back_so(tmp_path):
    """Review EDGE (round 38): load_model(module) called module.eval().to("cpu") on the caller's own module, so a
    training loop that went on after record_dataset ran without dropout (README promises the modes back)."""
    import qkhooks

    model = _vit()
    model.train()
    model.blocks[1].eval()  # a mixed set of flags, as a fine-tuning script may leave
    flags = {name: m.training for name, m in model.named_modules()}
    loaded = qkhooks.load_model(model)
    assert loaded.model is model and {name: m.training for name, m in model.named_modules()} == flags
    import numpy as np

    images = [np.random.default_rng(i).integers(0, 256, (20, 24, 3), dtype=np.uint8) for i in range(3)]
    result = qkhooks.record_dataset(model, images, tmp_path / "r.h5", modes=2, progress=False, batch_size=2)
    assert result.images == 3
    assert {name: m.training for name, m in model.named_modules()} == flags
    spec = qkhooks.load_model("timm:vit_tiny_patch16_224@random")  # what qkhooks loads itself runs for inference
    assert not any(m.training for m in spec.model.modules())


@pytest.mark.parametrize("left_out", ["participation_ratio", "modes"])
def test_each_bfd_figure_comes_back_under_its_own_caption_when_one_is_left_out(tmp_path, left_out):
    """Review NB (round 38): plot_bfd returned a list that the report and notebook 06 zipped with FIGURE_CAPTIONS by
    place, so a result without participation ratios (or mode entries) shifted every later caption onto the wrong
    figure, and the notebook showed the concentration figure as "one head's modes". Each file comes back under its
    caption now; the file names say which figure each is."""
    from conftest import TINY_MODELS

    from qkhooks.analysis.bfd import FIGURE_CAPTIONS, plot_bfd, run_bfd

    tiny = next(t for t in TINY_MODELS if t.name == "timm-vit")
    result = run_bfd(tiny.model(), tiny.images(10, seed=2), batch_size=5, holdout_every=4)
    for layer in result["layers"]:
        for head in layer["heads"]:
            head.pop(left_out, None)
    figures = plot_bfd(result, tmp_path)
    gone = FIGURE_CAPTIONS[2] if left_out == "participation_ratio" else FIGURE_CAPTIONS[3]
    assert list(figures) == [c for c in FIGURE_CAPTIONS if c != gone]
    stems = {FIGURE_CAPTIONS[0]: "bfd_heads", FIGURE_CAPTIONS[1]: "bfd_layers", FIGURE_CAPTIONS[2]: "bfd_concentration",
             FIGURE_CAPTIONS[3]: "bfd_modes_", FIGURE_CAPTIONS[4]: "bfd_decoding"}
    assert all(path.name.startswith(stems[caption]) and path.is_file() for caption, path in figures.items())
