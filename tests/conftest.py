"""Tiny models of every supported family, built from configs (no downloads), shared by the tests.

Besides one square model per family, the list holds models built to expose asymmetry, so that a mix-up of
two things that are equal in the usual fixtures fails a test: a 4 x 6 patch grid (rows != cols) for the timm
and the HF families, a timm data config with mean != std (and no two channels alike), and an HF attention
that calls its ``key`` Linear before its ``query`` Linear. Biases are non-zero everywhere.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no network here: fail fast instead of retrying the hub
os.environ.setdefault("MPLBACKEND", "Agg")

import dataclasses
from collections import Counter
from typing import Any, Callable

import pytest
import timm
import torch
import transformers
from torch.utils._python_dispatch import TorchDispatchMode

torch.set_num_threads(2)

TINY = dict(embed_dim=32, depth=2, num_heads=4)


@dataclasses.dataclass
class Tiny:
    """A tiny model, its input shape, its prefix-token count and how to get its eager attention."""

    name: str
    build: Callable[[], torch.nn.Module]
    image_size: int | tuple[int, int]  # an int is a square image; a pair is (height, width)
    prefix: int
    kind: str  # "timm" or "hf"
    grid: tuple[int, int] = (4, 4)  # the patch grid (rows, cols) the model must report, written down by hand

    @property
    def hw(self) -> tuple[int, int]:
        """Input (height, width) in pixels."""
        size = self.image_size
        return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))

    def model(self) -> torch.nn.Module:
        torch.manual_seed(0)
        model = self.build().eval()
        with torch.no_grad():  # non-zero biases everywhere, so bias handling is really tested
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.2)
                if "token" in name or "embedding" in name or "pos_embed" in name:
                    p.normal_(0, 0.5)
        return model

    def images(self, batch: int = 2, seed: int = 1) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.randn(batch, 3, *self.hw, generator=g)


def _timm(name: str, **kw) -> Callable[[], torch.nn.Module]:
    return lambda: timm.create_model(name, pretrained=False, **{**TINY, **kw})


def _hf(model_cls: str, config_cls: str, **kw) -> Callable[[], torch.nn.Module]:
    base = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32, patch_size=8)

    def build():
        config = getattr(transformers, config_cls)(**{**base, **kw})
        return getattr(transformers, model_cls)._from_config(config, attn_implementation="sdpa")

    return build


# timm's data config for the non-square model: mean != std in every channel and no two channels alike, so a
# swapped mean/std or a channel mix-up changes the pixels; squash mode is what timm can do for rows != cols.
ASYMMETRIC_DATA_CONFIG = dict(
    input_size=(3, 32, 48), mean=(0.1, 0.3, 0.6), std=(0.2, 0.45, 0.35), crop_mode="squash", crop_pct=0.9,
    interpolation="bilinear",
)


class KeyFirstViTAttention(transformers.models.vit.modeling_vit.ViTAttention):
    """HF ViT attention that calls ``k_proj`` before ``q_proj`` (the same numbers as its parent): capture must
    take q and k by module, not by call order."""

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        from transformers.models.vit.modeling_vit import eager_attention_forward

        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        key_states = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        query_states = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        out, weights = attend(self, query_states, key_states, value_states, attention_mask,
                              dropout=0.0, scaling=self.scaling, **kwargs)
        return self.o_proj(out.reshape(*hidden_states.shape[:-1], -1).contiguous()), weights


def _key_first(build: Callable[[], torch.nn.Module]) -> Callable[[], torch.nn.Module]:
    def built():
        model = build()
        for module in model.modules():
            # transformers 5 calls q_proj first; 4.x's ViTSelfAttention already calls self.key before self.query
            if type(module) is transformers.models.vit.modeling_vit.ViTAttention and hasattr(module, "k_proj"):
                module.__class__ = KeyFirstViTAttention
        return model

    return built


TINY_MODELS = [
    Tiny("timm-vit", _timm("vit_tiny_patch16_224", img_size=32, patch_size=8), 32, 1, "timm"),
    Tiny("timm-deit-distilled", _timm("deit_tiny_distilled_patch16_224", img_size=32, patch_size=8), 32, 2, "timm"),
    Tiny("timm-clip", _timm("vit_base_patch16_clip_224", img_size=32, patch_size=8), 32, 1, "timm"),
    Tiny("timm-dinov2-reg", _timm("vit_small_patch14_reg4_dinov2", img_size=28, patch_size=7), 28, 5, "timm"),
    Tiny("hf-vit", _hf("ViTModel", "ViTConfig", qkv_bias=True), 32, 1, "hf"),
    Tiny("hf-deit", _hf("DeiTModel", "DeiTConfig"), 32, 2, "hf"),
    Tiny("hf-dinov2", _hf("Dinov2Model", "Dinov2Config"), 32, 1, "hf"),
    Tiny("hf-dinov2-reg", _hf("Dinov2WithRegistersModel", "Dinov2WithRegistersConfig", num_register_tokens=3), 32, 4, "hf"),
    Tiny("hf-clip", _hf("CLIPVisionModel", "CLIPVisionConfig"), 32, 1, "hf"),
    Tiny("hf-siglip", _hf("SiglipVisionModel", "SiglipVisionConfig"), 32, 0, "hf"),
    # asymmetry: 4 x 6 patches; timm with mean != std; HF calling key before query
    Tiny("timm-vit-4x6", _timm("vit_tiny_patch16_224", img_size=(32, 48), patch_size=8,
                               pretrained_cfg_overlay=ASYMMETRIC_DATA_CONFIG), (32, 48), 1, "timm", (4, 6)),
    Tiny("hf-vit-4x6-key-first", _key_first(_hf("ViTModel", "ViTConfig", qkv_bias=True, image_size=(32, 48))),
         (32, 48), 1, "hf", (4, 6)),
]
ASYMMETRIC = [t for t in TINY_MODELS if t.grid[0] != t.grid[1]]


@pytest.fixture(params=TINY_MODELS, ids=lambda t: t.name)
def tiny(request) -> Tiny:
    return request.param


def forward_with_hooks(model: torch.nn.Module, handles: list, *args, **kwargs):
    """One no-grad forward of ``model`` while the hooks behind ``handles`` watch it; the hooks are removed afterwards,
    even when the forward fails, so that no test's hook outlives it into a shared (module-scoped) model."""
    try:
        with torch.no_grad():
            return model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()


def noise_photos(folder, names, size: tuple[int, int] = (40, 50), seed: int = 0):
    """Random-noise RGB photos of ``size`` (H, W) saved in ``folder`` (made if missing) under ``names`` (relative
    paths, their format by extension); returns the generator, for more photos that differ from these."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(folder / name)
    return rng


def record_samples(model: torch.nn.Module, size: tuple[int, int], path, on_batch, limit: int = 4) -> None:
    """Record the bundled sample photos, resized to ``size`` (H, W), into the run file ``path`` with full maps and two
    modes, no reducers and float32 storage (nothing rounded), handing each live batch to ``on_batch``: the live side of
    a "the run file equals the live recording" test."""
    from qkhooks.data.preprocess import ImageConfig
    from qkhooks.models.load import load_model
    from qkhooks.stream import record_dataset

    config = ImageConfig(size=size, mean=(0.5,) * 3, std=(0.5,) * 3)
    record_dataset(load_model(model, image_config=config), "samples", path, limit=limit, batch_size=2, progress=False,
                   dtype="float32", modes=2, attention="full", reducers=[], on_batch=on_batch)


def record_live_full_maps(model: torch.nn.Module, size: tuple[int, int], path) -> dict[int, list[torch.Tensor]]:
    """:func:`record_samples` keeping each live batch's full maps per layer (copies, in batch order): the live side of
    a "the run file's maps equal the live recording's" test."""
    maps: dict[int, list[torch.Tensor]] = {}

    def keep(batch) -> None:
        for layer in batch.attention_layers("full"):
            maps.setdefault(layer, []).append(batch.attention(layer, "full").clone())

    record_samples(model, size, path, keep)
    return maps


def pixel_spans_read(image: torch.Tensor, tokens: torch.Tensor) -> tuple[tuple[tuple[int, int], ...], ...]:
    """The reference for where a token grid reads its pixels: per row (then per column) of ``tokens`` (1, C, H', W'),
    made from ``image`` (1, 3, H, W, requires_grad) by the model's own modules, the [start, stop) span of input rows
    (columns) its values depend on (nonzero gradient)."""
    spans = []
    for axis in (0, 1):
        axis_spans = []
        for i in range(tokens.shape[2 + axis]):
            picked = tokens[0, :, i, 0] if axis == 0 else tokens[0, :, 0, i]
            (grad,) = torch.autograd.grad(picked.pow(2).sum() + picked.sum(), image, retain_graph=True)
            read = (grad[0].abs().sum(0).sum(1 - axis) > 0).nonzero()[:, 0]
            axis_spans.append((int(read.min()), int(read.max()) + 1))
        spans.append(tuple(axis_spans))
    return tuple(spans)


def timm_module_eager_maps(model: torch.nn.Module, attn: torch.nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """The softmax outputs one timm attention module hands its ``attn_drop`` on its eager path (fused attention off for
    one forward of ``model``, restored after), one per call: an independent reference for that module's maps."""
    seen: list[torch.Tensor] = []
    attn.fused_attn = False
    handle = attn.attn_drop.register_forward_hook(lambda m, a, out: seen.append(out.detach().clone()))
    try:
        forward_with_hooks(model, [handle], images)
    finally:
        attn.fused_attn = True
    return seen


class CountOps(TorchDispatchMode):
    """Counts every aten operation dispatched inside it (views included), by name: on a GPU each costs the host a
    kernel launch whatever its size, so a count is the machine-independent measure of host work (no timing)."""

    def __init__(self) -> None:
        super().__init__()
        self.count: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.count.values())


def count_calls(monkeypatch, owner: Any, name: str) -> list[int]:
    """``owner.name`` replaced (for the test) by a wrapper counting its calls: the count is the list's one item."""
    calls = [0]
    real = getattr(owner, name)

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


def eager_attention(tiny: Tiny, model: torch.nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """The model's own eager attention maps per layer (B, H, N, N): an independent reference."""
    if tiny.kind == "timm":
        maps: list[torch.Tensor] = []
        handles = []
        for block in model.blocks:
            block.attn.fused_attn = False
            handles.append(block.attn.attn_drop.register_forward_hook(lambda m, i, o: maps.append(o.detach().clone())))
        try:
            forward_with_hooks(model, handles, images)
        finally:
            for block in model.blocks:
                block.attn.fused_attn = True
        return maps
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(pixel_values=images, output_attentions=True)
    finally:
        model.set_attn_implementation("sdpa")
    return [a.detach() for a in out.attentions]


@pytest.fixture
def held_run(tmp_path):
    """A run file (one batch of ids "a", "b", values 1) held open by h5py with HDF5's default locking in another
    process, as a notebook holds a run it reads (tests of the writer's open without HDF5's flock)."""
    import subprocess
    import sys

    import numpy as np

    from qkhooks.store import RunWriter

    path = tmp_path / "run.h5"
    with RunWriter(path, dtype="float32", chunk_images=2) as w:
        w.write_batch(["a", "b"], {"v": np.ones((2, 4), np.float32)})
    holder = subprocess.Popen([sys.executable, "-c", "import sys, h5py; f = h5py.File(sys.argv[1], 'r'); "
                               "print('open', flush=True); sys.stdin.read()", str(path)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        yield path
    finally:
        holder.communicate("", timeout=30)


class LayerStack(torch.nn.Module):
    """A user's own network for the own-architecture tests: its layers applied to the tokens in turn."""

    def __init__(self, *layers: torch.nn.Module):
        super().__init__()
        self.layers = torch.nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class KeyLog:
    """An h5py dataset that records the keys it is indexed with."""

    def __init__(self, dataset: "h5py.Dataset"):
        self.dataset, self.keys = dataset, []

    def __getitem__(self, key):
        self.keys.append(key if isinstance(key, tuple) else (key,))
        return self.dataset[key]

    def __getattr__(self, name):
        return getattr(self.dataset, name)


def mount_small_tmpfs(path) -> None:
    """Mount an 8 MiB tmpfs at ``path`` (made here) for the full-disk and read-only tests, or skip: it needs root and
    a machine that lets a test mount (CI runs as root). Unmount with ``umount -l``."""
    import shutil
    import subprocess
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(path)]).returncode:
        pytest.skip("this machine does not let the test mount a tmpfs")


def child_json(code: str, *args: object, what: str, timeout: float = 60) -> Any:
    """Run ``code`` in a child Python (this checkout on its path, one thread) with ``args`` and return the JSON its
    last line of output prints; a child still running after ``timeout`` s fails the test naming ``what``: a call
    that may spin without end inside HDF5 (a damaged heap) fails the test instead of hanging the suite."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    try:
        done = subprocess.run([sys.executable, "-c", code, *map(str, args)], env=env, timeout=timeout,
                              capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{what} did not return in {timeout:g} s")
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])
