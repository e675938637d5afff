"""zoo13: refusals say what really happened. ImageGPT's attention handed a second positional argument is refused
naming that argument (by position its cache, then its mask), not as cross-attention; TimeSformer's residual-stream
input is refused naming the frames its groups hold, not windows; the forms still refused for run files (Llama 4's
class token last, ImageGPT's token ids, VideoPrism's per-layer batch axes) name what a run file lacks for them."""

from __future__ import annotations

import pytest
import torch

import qkhooks
from qkhooks import QKHooksError

from test_inside_forms import _timesformer
from test_map_forms import _imagegpt, _llama4, _videoprism


def test_imagegpt_attention_handed_a_positional_argument_names_it_and_cross_attention_is_named_apart():
    model = _imagegpt()
    attn = model.h[0].attn
    x = torch.randn(1, 16, 32)
    with qkhooks.record(model, modes=0, attention="full", layers=[0]), torch.no_grad():
        with pytest.raises(QKHooksError, match=r"1 positional argument\(s\) after the tokens \(by position: layer_past"):
            attn(x, None)
        with pytest.raises(QKHooksError, match=r"encoder_hidden_states \(cross-attention"):
            attn(x, encoder_hidden_states=torch.randn(1, 16, 32))


def test_timesformer_residual_input_is_refused_naming_frames_not_windows():
    model = _timesformer()
    with pytest.raises(QKHooksError, match=r"TimeSformer's divided attention.*frames") as err:
        with qkhooks.record(model, modes=2, input="residual"), torch.no_grad():
            model(pixel_values=torch.randn(1, 4, 3, 32, 32))
    assert "window" not in str(err.value)


@pytest.mark.parametrize("build, missing", [
    (_llama4, r"class token after the patches.*no field for a class token after them"),
    (_imagegpt, r"token ids.*record_dataset feeds pixel_values"),
    (_videoprism, r"clips x frames.*no per-layer batch axis"),
], ids=["llama4", "imagegpt", "videoprism"])
def test_forms_still_refused_for_run_files_name_what_a_run_file_lacks(build, missing):
    from qkhooks.stream import probe_geometry

    model = build()
    with pytest.raises(QKHooksError, match=r"cannot be recorded into a run file: .*" + missing):
        probe_geometry(model, qkhooks.sites(model), (32, 32))
