"""Side-by-side benchmarks: ``qkhooks bench`` (or ``python benchmarks/run.py``) -> benchmarks/RESULTS.md + JSON.

What is measured, all in one process on the same model, batch and images, methods interleaved round by round
(the order rotated each round so no method always runs first), median and interquartile range over rounds:

- ``methods``: a plain fused forward (the physical limit), qkhooks capture only, + mode projection (top-16,
  all), + attention rows (2 query tokens, every layer), + HDF5 streaming, and the tools people use today:
  timm ``AttentionExtract`` (fused attention off), HF eager ``output_attentions=True``, naive hooks copying
  every attention input to the host. Ratios are paired per round (time of the method / time of the plain
  forward in the same round), which cancels slow drifts of a shared machine.
- ``memory``: peak memory per method, each in a fresh subprocess (CPU: the ``VmHWM`` high-water mark, reset
  after set-up through ``/proc/self/clear_refs``; GPU: ``torch.cuda.max_memory_allocated``).
- ``projection``: modes from x with a d x 2HK matrix vs from q/k with d_k x K matrices per head.
- ``svd``: factored SVD of W_q^T W_k (thin QR) vs the dense d x d SVD, all heads.
- ``writer``: time the forward loop spends blocked in ``RunWriter.write_batch``, per codec.
- ``codecs``: compression ratio and write/read speed of float16 maps per HDF5 codec.
- ``dataset_memory``: peak RSS of ``record_dataset`` at 1x and 10x the images (must stay flat).
- ``profile``: where the time of the recording methods goes (cProfile on qkhooks functions, and the extra
  torch ops over a plain forward from torch.profiler).

Timing assertions never belong in unit tests; tests/test_bench.py checks only this module's logic.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import pstats
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from qkhooks.cli import command
from qkhooks.store.format import per_image_datasets

__all__ = [
    "quantile", "summarize", "interleaved_schedule", "paired_ratios", "SIZES", "Bench", "METHODS", "TARGETS",
    "time_methods", "render_markdown", "save_results", "main",
]

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MD = ROOT / "benchmarks" / "RESULTS.md"
DEFAULT_JSON = ROOT / "benchmarks" / "results.json"
DEFAULT_NOTES = ROOT / "benchmarks" / "ANALYSIS.md"
SECTIONS = ("methods", "memory", "projection", "svd", "writer", "codecs", "dataset_memory", "end_to_end", "profile")
CHILD_MARK = "QKHOOKS_BENCH_RESULT "


# ============================================================================================ statistics
def quantile(values: Sequence[float], q: float) -> float:
    """The q-quantile with linear interpolation between order statistics (numpy's default method)."""
    if not values:
        raise ValueError("quantile of no values")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q}")
    v = sorted(float(x) for x in values)
    pos = (len(v) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def summarize(values: Sequence[float]) -> dict[str, float]:
    """Median, quartiles, IQR, min, max, mean and count of a sample."""
    vals = [float(x) for x in values]
    q1, med, q3 = quantile(vals, 0.25), quantile(vals, 0.5), quantile(vals, 0.75)
    return {"median": med, "q1": q1, "q3": q3, "iqr": q3 - q1, "min": min(vals), "max": max(vals),
            "mean": sum(vals) / len(vals), "n": len(vals)}


def interleaved_schedule(names: Sequence[str], rounds: int, warmup: int = 0) -> list[tuple[int, str]]:
    """(round, method) pairs: every round runs every method once (A B C, B C A, C A B, ...).

    Warm-up rounds come first and have negative round numbers. With three or more methods the order is
    rotated by one each round, so no method always runs first or always follows the same neighbour, and no
    method ever runs twice in a row; two methods simply alternate (A B A B ...).
    """
    names = list(names)
    if len(set(names)) != len(names):
        raise ValueError(f"method names repeat: {names}")
    out: list[tuple[int, str]] = []
    for i, r in enumerate(range(-warmup, rounds)):
        shift = i % len(names) if len(names) > 2 else 0
        out.extend((r, n) for n in names[shift:] + names[:shift])
    return out


def paired_ratios(times: Sequence[float], reference: Sequence[float]) -> list[float]:
    """Per-round ratios time / reference time (both lists indexed by round)."""
    if len(times) != len(reference):
        raise ValueError(f"{len(times)} times vs {len(reference)} reference times: pair them by round")
    return [t / r for t, r in zip(times, reference)]


# ============================================================================================ machine, memory
def _status_kb(field: str) -> int | None:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM), or None off Linux."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_mb() -> float | None:
    kb = _status_kb("VmRSS")
    return None if kb is None else kb / 1024


def peak_rss_mb() -> float | None:
    kb = _status_kb("VmHWM")
    return None if kb is None else kb / 1024


def reset_peak_rss() -> bool:
    """Reset this process's RSS high-water mark (VmHWM) to its current RSS (Linux >= 4.0); False if impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """CPU model, cores, memory, library versions, torch threads and GPU (if any)."""
    import h5py
    import numpy
    import timm
    import transformers

    mem = None
    try:
        with open("/proc/meminfo") as fh:
            mem = round(int(fh.readline().split()[1]) / 1024**2, 1)
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": _cpu_model(), "cores": os.cpu_count(), "memory_gib": mem, "python": platform.python_version(),
        "torch": torch.__version__, "timm": timm.__version__, "transformers": transformers.__version__,
        "h5py": h5py.__version__, "hdf5": h5py.version.hdf5_version, "numpy": numpy.__version__,
        "torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads(),
        "gpu": gpu, "platform": platform.platform(),
    }


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ============================================================================================ models
@dataclasses.dataclass(frozen=True)
class ModelSize:
    """One benchmark size: the timm architecture and the HF ViT config of the same shape."""

    key: str
    label: str
    timm_name: str
    hidden: int
    heads: int
    layers: int
    mlp: int
    image: int
    patch: int
    timm_kwargs: tuple[tuple[str, Any], ...] = ()


SIZES: dict[str, ModelSize] = {
    "vit_ti": ModelSize("vit_ti", "ViT-Ti/16 (timm vit_tiny_patch16_224, random init)", "vit_tiny_patch16_224",
                        192, 3, 12, 768, 224, 16),
    "vit_s": ModelSize("vit_s", "ViT-S/16 (timm vit_small_patch16_224, random init)", "vit_small_patch16_224",
                       384, 6, 12, 1536, 224, 16),
    "vit_b": ModelSize("vit_b", "ViT-B/16 (timm vit_base_patch16_224, random init)", "vit_base_patch16_224",
                       768, 12, 12, 3072, 224, 16),
    "tiny": ModelSize("tiny", "tiny ViT (2 blocks, d=32, for tests)", "vit_tiny_patch16_224", 32, 4, 2, 128, 32, 8,
                      (("img_size", 32), ("patch_size", 8), ("embed_dim", 32), ("depth", 2), ("num_heads", 4))),
}


def _seeded(build: Callable[[], Any], seed: int) -> Any:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


class Bench:
    """The shared material of one benchmark: models (built once, from a seed), images, spectrum, a work folder.

    Models are built lazily, so a memory subprocess builds only what its method needs.
    """

    def __init__(self, size: str, batch: int, device: str | torch.device = "cpu", workdir: str | Path | None = None,
                 seed: int = 0):
        if size not in SIZES:
            raise ValueError(f"unknown size {size!r}; choose from {', '.join(SIZES)}")
        self.size = SIZES[size]
        self.batch = batch
        self.device = torch.device(device)
        self.seed = seed
        self._tmp = None if workdir is not None else tempfile.TemporaryDirectory(prefix="qkhooks-bench-")
        self.workdir = Path(workdir) if workdir is not None else Path(self._tmp.name)  # type: ignore[union-attr]
        self.workdir.mkdir(parents=True, exist_ok=True)
        g = torch.Generator().manual_seed(seed + 1)
        self.images = torch.randn(batch, 3, self.size.image, self.size.image, generator=g).to(self.device)
        self._models: dict[str, torch.nn.Module] = {}
        self._spectrum = None

    # -- models
    def timm(self, variant: str = "fused") -> torch.nn.Module:
        """``fused`` (as built), or a copy with fused attention off: ``eager`` (plain) or ``extract`` (hooked)."""
        key = f"timm-{variant}"
        if key not in self._models:
            if variant == "fused":
                import timm

                kwargs = dict(self.size.timm_kwargs)
                model = _seeded(lambda: timm.create_model(self.size.timm_name, pretrained=False, **kwargs), self.seed)
                self._models[key] = model.eval().to(self.device)
            else:
                model = copy.deepcopy(self.timm("fused"))
                for module in model.modules():
                    if hasattr(module, "fused_attn"):
                        module.fused_attn = False
                self._models[key] = model
        return self._models[key]

    def hf(self, implementation: str) -> torch.nn.Module:
        """HF ``ViTModel`` of the same shape from a config (random init), attention ``sdpa`` or ``eager``."""
        key = f"hf-{implementation}"
        if key not in self._models:
            import transformers

            s = self.size
            config = transformers.ViTConfig(hidden_size=s.hidden, num_hidden_layers=s.layers, num_attention_heads=s.heads,
                                            intermediate_size=s.mlp, image_size=s.image, patch_size=s.patch, qkv_bias=True)
            model = _seeded(lambda: transformers.ViTModel._from_config(config, attn_implementation=implementation),
                            self.seed)
            self._models[key] = model.eval().to(self.device)
        return self._models[key]

    @property
    def spectrum(self):
        """The full spectrum of the fused timm model (computed once, reused by every recording)."""
        if self._spectrum is None:
            import qkhooks

            self._spectrum = qkhooks.spectrum(self.timm())
        return self._spectrum

    def sites(self):
        import qkhooks

        return qkhooks.sites(self.timm())

    @property
    def query_tokens(self) -> torch.Tensor:
        """(B, 2): the CLS token and the centre patch of every image."""
        grid = self.size.image // self.size.patch
        centre = 1 + (grid // 2) * grid + grid // 2
        return torch.tensor([[0, centre]] * self.batch)

    def close(self) -> None:
        self._models.clear()
        if self._tmp is not None:
            self._tmp.cleanup()


# ============================================================================================ methods
class Runner:
    """One method on one model: ``attach`` / ``step`` (one forward) / ``end_rep`` / ``detach`` / ``close``.

    Hooks exist only between ``attach`` and ``detach``, so interleaved methods never see each other's hooks.
    ``inspect`` says what the last step produced (used by the tests, never timed).
    """

    model: torch.nn.Module

    def attach(self) -> None: ...

    def detach(self) -> None: ...

    def step(self, images: torch.Tensor) -> Any:
        return self.model(images)

    def end_rep(self) -> None: ...

    def close(self) -> None: ...

    def inspect(self) -> dict[str, Any]:
        return {}


class PlainRunner(Runner):
    def __init__(self, model: torch.nn.Module, **call_kwargs: Any):
        self.model, self.call_kwargs, self.last = model, call_kwargs, None

    def step(self, images: torch.Tensor) -> Any:
        if self.call_kwargs:
            self.last = self.model(pixel_values=images, **self.call_kwargs)
        else:
            self.last = self.model(images)
        return self.last

    def inspect(self) -> dict[str, Any]:
        attentions = getattr(self.last, "attentions", None)
        return {"output": self.last, "attentions": list(attentions) if attentions is not None else None}


class RecordRunner(Runner):
    """``qkhooks.record`` with the given options, the spectrum precomputed; optionally a RunWriter sink.

    With ``writer=True`` every timed repetition ends with ``writer.flush()``, so the time includes the disk.
    Rows come from the library's :func:`qkhooks.attention.attention_rows` (keys folded away since patch A).
    """

    def __init__(self, bench: Bench, options: dict[str, Any], writer: bool = False, name: str = "record",
                 compression: str = "none", chunk_images: int | None = None):
        import qkhooks

        self.bench, self.model = bench, bench.timm()
        self.rows = "attention" in options
        spectrum = bench.spectrum if options.get("modes") is not None else None
        self.run = qkhooks.record(self.model, spectrum=spectrum, **options)
        self.writer = None
        self.path = bench.workdir / f"bench-{name}-{os.getpid()}.h5"
        if writer:
            from qkhooks.store import RunWriter
            from qkhooks.stream import WriterSink

            self.writer = RunWriter(self.path, mode="overwrite", compression=compression, chunk_images=chunk_images,
                                    attrs={"model": bench.size.timm_name, "config": {"bench": name, **options}})
            self.run.sinks.append(WriterSink(self.writer))

    def attach(self) -> None:
        self.run.attach()

    def detach(self) -> None:
        self.run.detach()

    def step(self, images: torch.Tensor) -> Any:
        if self.rows:
            self.run.set_batch(query_tokens=self.bench.query_tokens)
        return self.model(images)

    def end_rep(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.path.unlink(missing_ok=True)

    def inspect(self) -> dict[str, Any]:
        out: dict[str, Any] = {"batch": self.run.last}
        if self.writer is not None:
            self.writer.flush()
            out["file"] = self.path
        return out


class PerBatchRecordRunner(Runner):
    """``qkhooks.record`` entered around every forward with no spectrum given, as README's quick start does:
    what a user pays when the context is built per batch (the spectrum comes from the cache after the first)."""

    def __init__(self, bench: Bench, options: dict[str, Any]):
        self.bench, self.model, self.options = bench, bench.timm(), options
        self.last: Any = None

    def step(self, images: torch.Tensor) -> Any:
        import qkhooks

        with qkhooks.record(self.model, **self.options) as run:
            out = self.model(images)
        self.last = run.last
        return out

    def inspect(self) -> dict[str, Any]:
        return {"batch": self.last}


class NaiveHookRunner(Runner):
    """Forward hooks on every attention module that copy its input to the host (what many users write)."""

    def __init__(self, bench: Bench):
        self.model = bench.timm()
        self.modules = [s.module for s in bench.sites()]
        self.copies: list[torch.Tensor] = []
        self.handles: list[Any] = []

    def _hook(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        x = args[0] if args else next(iter(kwargs.values()))
        self.copies.append(x.detach().to("cpu", copy=True))

    def attach(self) -> None:
        self.handles = [m.register_forward_hook(self._hook, with_kwargs=True) for m in self.modules]

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def step(self, images: torch.Tensor) -> Any:
        self.copies = []
        return self.model(images)

    def inspect(self) -> dict[str, Any]:
        return {"copies": self.copies}


class ExtractRunner(Runner):
    """timm ``AttentionExtract`` (module hooks on ``*attn_drop``) on a copy with fused attention off.

    The hook method runs the whole model; timm's default ``fx`` method prunes the graph after the last
    softmax (less work than a forward), so it would not be a like-for-like comparison.
    """

    def __init__(self, bench: Bench):
        from timm.utils import AttentionExtract

        self.model = bench.timm("extract")
        self.extract = AttentionExtract(self.model, method="hook")
        self.last: dict[str, torch.Tensor] = {}

    def step(self, images: torch.Tensor) -> Any:
        self.last = self.extract(images)
        return self.last

    def inspect(self) -> dict[str, Any]:
        return {"maps": self.last}


# -------------------------------------------------------------------------------- prototypes (not the library)
class QKVProtoRunner(Runner):
    """PROTOTYPE of patch B. The library now takes its modes this way (``Recording(qk_path=True)``); its rows still
    come from x (patch A), while this prototype also takes them from the model's own q and k.

    q and k are taken from the output of each timm attention's own ``qkv`` Linear by a forward hook, so nothing
    the model computed is computed again.

    Modes: x·u_n = (q - b_q)·a_n with a_n = W_k v_n / sigma_n (d_k x K per head, bias folded into a constant);
    rows: softmax(q_t k^T * scale) from the model's own q and k. Optionally streams to a RunWriter.
    """

    def __init__(self, bench: Bench, modes: int = 16, rows: bool = True, writer: bool = False, name: str = "proto"):
        from qkhooks.projector import QKPathProjector

        self.bench, self.model, self.rows = bench, bench.timm(), rows
        self.layers = []
        spectrum = bench.spectrum.top(modes)
        for site, spec in zip(bench.sites(), spectrum):
            p = QKPathProjector(spec, site.weights())
            dev = bench.device
            a, c = p.a.float().to(dev), p.c.float().to(dev)
            bq = torch.zeros(a.shape[0], a.shape[2]) if p.q_offset is None else p.q_offset[:, 0].float()
            bk = torch.zeros(c.shape[0], c.shape[2]) if p.k_offset is None else p.k_offset[:, 0].float()
            self.layers.append((site, a, c, bq.to(dev)[None, :, :, None], bk.to(dev)[None, :, :, None]))
        self.handles: list[Any] = []
        self.current: dict[str, torch.Tensor] = {}
        self.last: dict[str, torch.Tensor] = {}
        self.count = 0
        self.writer = None
        self.path = bench.workdir / f"bench-{name}-{os.getpid()}.h5"
        if writer:
            from qkhooks.store import RunWriter

            self.writer = RunWriter(self.path, mode="overwrite", attrs={"model": bench.size.timm_name, "config": name})

    def _qkv_hook(self, layer: tuple) -> Callable:
        site, a, c, bq, bk = layer

        def hook(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> None:
            with torch.no_grad():
                b, n, _ = out.shape
                qkv = out.detach().view(b, n, 3, site.num_heads, site.head_dim)
                q, k = qkv[:, :, 0], qkv[:, :, 1]  # (B, N, H, dk)
                self.current[f"modes/L{site.layer}/query"] = torch.einsum("bnhd,hdk->bhkn", q, a) - bq
                self.current[f"modes/L{site.layer}/key"] = torch.einsum("bnhd,hdk->bhkn", k, c) - bk
                if self.rows:
                    idx = self.bench.query_tokens.to(out.device)
                    q_t = q[torch.arange(b, device=out.device)[:, None], idx]  # (B, T, H, dk)
                    logits = torch.einsum("bthd,bnhd->bhtn", q_t, k) * site.scale
                    self.current[f"attention/L{site.layer}/rows"] = torch.softmax(logits.float(), dim=-1)

        return hook

    def _end(self, module: torch.nn.Module, args: tuple, out: Any) -> None:
        self.last, self.current = self.current, {}
        if self.writer is not None:
            b = self.bench.batch
            self.writer.write_batch([str(self.count + i) for i in range(b)], self.last)
            self.count += b

    def attach(self) -> None:
        self.handles = [site.module.qkv.register_forward_hook(self._qkv_hook(layer))
                        for layer in self.layers for site in [layer[0]]]
        self.handles.append(self.model.register_forward_hook(self._end))

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def end_rep(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.path.unlink(missing_ok=True)

    def inspect(self) -> dict[str, Any]:
        return {"arrays": self.last}


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    label: str
    build: Callable[[Bench], Runner]
    family: str = "timm"
    reference: str = "plain"  # the same-family baseline for a second ratio
    kind: str = "qkhooks"  # qkhooks | baseline | peer | prototype


def _record(options: dict[str, Any], **kw: Any) -> Callable[[Bench], Runner]:
    return lambda bench: RecordRunner(bench, dict(options), **kw)


ROWS = {"attention": "rows"}
METHODS: dict[str, Method] = {m.name: m for m in [
    Method("plain", "plain forward, fused attention (the limit)", lambda b: PlainRunner(b.timm()), kind="baseline"),
    Method("capture", "qkhooks capture only (modes=None)", _record({"modes": None})),
    Method("modes16", "+ mode projection, top-16", _record({"modes": 16})),
    Method("modes_all", "+ mode projection, all modes", _record({"modes": "all"})),
    Method("rows2", "+ attention rows (2 query tokens, every layer)", _record({"modes": None, **ROWS})),
    Method("modes16_rows2", "top-16 modes + rows", _record({"modes": 16, **ROWS})),
    Method("modes16_per_batch", "top-16 modes, record() entered per batch, no spectrum given",
           lambda b: PerBatchRecordRunner(b, {"modes": 16})),
    Method("modes_all_rows2", "all modes + rows", _record({"modes": "all", **ROWS})),
    Method("full_maps", "full maps, every layer (attention='full', modes=None)", _record({"modes": None, "attention": "full"}),
           reference="timm_extract"),
    Method("full_hdf5", "full recording: top-16 + rows + HDF5 (RunWriter, flushed)",
           _record({"modes": 16, **ROWS}, writer=True, name="full")),
    Method("naive_hooks", "naive forward hooks copying every attention input to host", NaiveHookRunner, kind="peer"),
    Method("timm_eager", "timm forward, fused attention off (reference)", lambda b: PlainRunner(b.timm("eager")),
           kind="baseline"),
    Method("timm_extract", "timm AttentionExtract (fused off, hook method)", ExtractRunner, kind="peer",
           reference="timm_eager"),
    Method("hf_sdpa", "HF ViTModel, sdpa (reference)", lambda b: PlainRunner(b.hf("sdpa"), output_attentions=False),
           family="hf", kind="baseline"),
    Method("hf_eager_attn", "HF ViTModel eager, output_attentions=True",
           lambda b: PlainRunner(b.hf("eager"), output_attentions=True), family="hf", reference="hf_sdpa", kind="peer"),
    Method("proto_qkv_full_hdf5", "prototype: top-16 modes and (unlike the library) rows from the qkv output + HDF5",
           lambda b: QKVProtoRunner(b, 16, rows=True, writer=True, name="proto-full"), kind="prototype"),
    Method("proto_qkv_modes_all", "prototype: all modes from the qkv output (the library's path since patch B), minimal bookkeeping",
           lambda b: QKVProtoRunner(b, b.size.hidden // b.size.heads, rows=False, name="proto-all"), kind="prototype"),
]}

TARGETS: list[tuple[str, str, float]] = [
    ("capture", "capture alone", 0.02),
    ("rows2", "rows for 2 query tokens, every layer", 0.05),
    ("full_hdf5", "full recording (top-16 modes, rows, HDF5)", 0.10),
]
"""(method, what, allowed overhead over the plain fused forward on CPU)."""


# ============================================================================================ timing
def time_methods(bench: Bench, names: Sequence[str], rounds: int, warmup: int = 1, batches_per_rep: int = 1,
                 log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Time each method ``rounds`` times, interleaved; per method: wall and process CPU seconds per repetition,
    their summaries, and ratios to ``plain`` (and to the method's own-family reference) paired by round.

    ``ratio_to_plain`` uses the primary metric: process CPU time on the CPU with one torch thread (every
    thread of this process, the writer thread included; it does not move when other jobs take the cores, wall
    time does), wall time otherwise (CUDA, or several threads whose OpenMP workers spin while they wait).
    Both are kept (``ratio_to_plain_wall``, ``ratio_to_plain_cpu``).
    """
    runners = {}
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    order: list[str] = []
    try:
        for name in names:
            runners[name] = METHODS[name].build(bench)
        gc.collect()
        gc.freeze()  # set-up objects leave the collector's view: the collect before each repetition is then cheap
        for r, name in interleaved_schedule(names, rounds, warmup):
            runner = runners[name]
            gc.collect()
            runner.attach()
            try:
                with torch.no_grad():
                    _sync(bench.device)
                    t0, c0 = time.perf_counter(), time.process_time()
                    for _ in range(batches_per_rep):
                        runner.step(bench.images)
                    runner.end_rep()
                    _sync(bench.device)
                    dt, dc = time.perf_counter() - t0, time.process_time() - c0
            finally:
                runner.detach()
            if r >= 0:
                wall[name].append(dt)
                cpu[name].append(dc)
                order.append(name)
                if log and len(order) % len(names) == 0:
                    log(f"  round {r + 1}/{rounds} done (load {_load()})")
    finally:
        gc.unfreeze()
        for runner in runners.values():
            runner.close()
    images = bench.batch * batches_per_rep
    # CPU time measures work only when no OpenMP worker spins in a barrier: one torch thread on the CPU.
    metric = "cpu" if bench.device.type == "cpu" and torch.get_num_threads() == 1 else "wall"
    primary = wall if metric == "wall" else cpu
    out: dict[str, Any] = {"metric": metric, "order_first_rounds": order[: 3 * len(names)], "methods": {}}
    for name in names:
        m = METHODS[name]
        entry: dict[str, Any] = {
            "label": m.label, "kind": m.kind, "family": m.family, "wall_s": wall[name], "cpu_s": cpu[name],
            "images_per_s": summarize([images / t for t in wall[name]]),
            "ms_per_batch": summarize([1000 * t / batches_per_rep for t in wall[name]]),
            "cpu_ms_per_batch": summarize([1000 * t / batches_per_rep for t in cpu[name]]),
        }
        if "plain" in wall:
            entry["ratio_to_plain"] = summarize(paired_ratios(primary[name], primary["plain"]))
            entry["ratio_to_plain_wall"] = summarize(paired_ratios(wall[name], wall["plain"]))
            entry["ratio_to_plain_cpu"] = summarize(paired_ratios(cpu[name], cpu["plain"]))
        if m.reference != "plain" and m.reference in wall:
            entry["reference"] = m.reference
            entry["ratio_to_reference"] = summarize(paired_ratios(primary[name], primary[m.reference]))
        out["methods"][name] = entry
    return out


# ============================================================================================ memory
def _child_run(spec: dict[str, Any]) -> dict[str, Any]:
    """Body of a memory subprocess: set up, reset the peak, run, report (CPU RSS and, on CUDA, allocator peak)."""
    torch.set_num_threads(int(spec["threads"]))
    if spec["kind"] == "method":
        bench = Bench(spec["size"], int(spec["batch"]), spec["device"], spec["workdir"])
        runner = METHODS[spec["method"]].build(bench)
        runner.attach()

        def work() -> None:
            for _ in range(int(spec["steps"])):
                runner.step(bench.images)
            runner.end_rep()

        def finish() -> None:
            runner.detach()
            runner.close()

        device = bench.device
        extra: dict[str, Any] = {}
    elif spec["kind"] == "dataset":
        import qkhooks
        from qkhooks.stream import record_dataset

        bench = Bench(spec["size"], int(spec["batch"]), "cpu", spec["workdir"])
        loaded = qkhooks.load_model(bench.timm())
        trace: list[float] = []

        def work() -> None:
            record_dataset(loaded, spec["folder"], spec["out"], modes=16, attention="rows", reducers=[],
                           batch_size=int(spec["batch"]), limit=int(spec["images"]), overwrite=True, progress=False,
                           on_batch=lambda batch: trace.append(rss_mb() or 0.0))

        finish = lambda: None  # noqa: E731
        device = torch.device("cpu")
        extra = {"rss_after_batch_mb": trace, "images": int(spec["images"])}
    else:
        raise ValueError(spec["kind"])
    gc.collect()
    base = rss_mb()
    reset = reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        cuda_base = torch.cuda.memory_allocated(device)
    with torch.no_grad():
        work()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        extra["cuda_peak_delta_mb"] = (torch.cuda.max_memory_allocated(device) - cuda_base) / 2**20
    peak = peak_rss_mb()
    finish()
    return {"rss_base_mb": base, "rss_peak_mb": peak, "rss_peak_delta_mb": (peak - base) if reset and peak and base else None,
            "peak_reset": reset, **extra}


def child_main(payload: str) -> int:
    """Entry point of a memory subprocess (``python -c``); prints one result line."""
    result = _child_run(json.loads(payload))
    print(CHILD_MARK + json.dumps(result), flush=True)
    return 0


def run_child(spec: dict[str, Any], timeout: float = 600, env: dict[str, str] | None = None) -> dict[str, Any]:
    code = "import sys; from qkhooks.bench import child_main; sys.exit(child_main(sys.argv[1]))"
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True,
                          timeout=timeout, cwd=str(ROOT), env={**os.environ, **(env or {})})
    for line in proc.stdout.splitlines():
        if line.startswith(CHILD_MARK):
            return json.loads(line[len(CHILD_MARK):])
    raise RuntimeError(f"memory subprocess failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")


def measure_memory(size: str, batch: int, names: Sequence[str], device: str, threads: int, workdir: Path,
                   steps: int = 2, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Peak memory of each method, one fresh subprocess per method and allocator setting."""
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        out[name] = {}
        for variant, env in MALLOC_VARIANTS.items():
            spec = dict(kind="method", size=size, batch=batch, method=name, steps=steps, threads=threads,
                        device=device, workdir=str(workdir))
            out[name][variant] = run_child(spec, env=env)
        if log:
            log(f"  memory {name}: " + ", ".join(f"+{_fmt(r.get('rss_peak_delta_mb'), 1)} MB ({v})"
                                                 for v, r in out[name].items()))
    return {"steps": steps, "methods": out}


def make_image_folder(folder: Path, count: int, size: int = 224, seed: int = 0) -> Path:
    """``count`` smooth random JPEGs (real decoding work, deterministic)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        path = folder / f"img{i:05d}.jpg"
        if path.exists():
            continue
        small = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((size, size), Image.BICUBIC).save(path, quality=90)
    return folder


def end_to_end_bench(size: str, workdir: Path, images: int = 240, batch: int = 16, rounds: int = 3,
                     log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """``qkhooks record`` over a folder of JPEGs (defaults: top-16 modes, default reducers, float16 file) against
    a plain loop over the same images (the model's own transform, a DataLoader, the same batch and threads),
    interleaved round by round in one process; model loading excluded, run set-up (spectrum, file) included.

    Also times the parts of one recorded batch on the same model: the capture hooks, each default reducer's
    ``update`` and the writer's hand-off (main-thread CPU), and the writer thread's CPU per batch.
    """
    import qkhooks
    from torch.utils.data import DataLoader

    from qkhooks.data import collate, open_dataset
    from qkhooks.stream import record_dataset

    folder = make_image_folder(workdir / "images", images, SIZES[size].image)
    loaded = qkhooks.load_model(f"timm:{SIZES[size].timm_name}", random_init=True)
    net = loaded.model.eval()
    out_file = workdir / "end_to_end.h5"

    def plain() -> None:
        loader = DataLoader(open_dataset(str(folder), loaded.image_config), batch_size=batch, collate_fn=collate)
        for item in loader:
            with torch.no_grad():
                net(item["pixel_values"])

    def recorded() -> None:
        record_dataset(loaded, str(folder), out_file, batch_size=batch, overwrite=True, progress=False)

    wall: dict[str, list[float]] = {"plain": [], "record": []}
    cpu: dict[str, list[float]] = {"plain": [], "record": []}
    for r, name in interleaved_schedule(list(wall), rounds, warmup=1):
        gc.collect()
        t0, c0 = time.perf_counter(), time.process_time()
        (plain if name == "plain" else recorded)()
        if r >= 0:
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    out_file.unlink(missing_ok=True)
    result: dict[str, Any] = {"images": images, "batch": batch, "rounds": rounds, "parts_ms_per_batch": _record_parts(net, batch)}
    for name in wall:
        result[name] = {"wall_s": summarize(wall[name]), "cpu_s": summarize(cpu[name])}
    result["ratio_wall"] = summarize(paired_ratios(wall["record"], wall["plain"]))
    result["ratio_cpu"] = summarize(paired_ratios(cpu["record"], cpu["plain"]))
    if log:
        log(f"  end to end {size}: record/plain CPU {result['ratio_cpu']['median']:.3f}, wall {result['ratio_wall']['median']:.3f}")
    return result


def _record_parts(net: torch.nn.Module, batch: int, steps: int = 4) -> dict[str, float]:
    """Main-thread CPU ms per batch of each part of a default recording, and the writer thread's CPU."""
    import qkhooks
    from qkhooks.analysis.modes import AnisotropyReducer, TopKModes
    from qkhooks.store import RunWriter
    from qkhooks.stream import WriterSink

    spent: dict[str, float] = {}

    class Timed:
        def __init__(self, name: str, sink: Any):
            self.name, self.sink = name, sink

        def update(self, b: Any) -> None:
            t0 = time.thread_time()
            self.sink.update(b)
            spent[self.name] = spent.get(self.name, 0.0) + time.thread_time() - t0

    images = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory(prefix="qkhooks-parts-") as tmp:
        writer = RunWriter(Path(tmp) / "parts.h5", mode="overwrite")
        sinks = [Timed("topk_modes", TopKModes()), Timed("anisotropy", AnisotropyReducer()),
                 Timed("writer_handoff", WriterSink(writer))]
        times: dict[str, float] = {}
        for label, options in (("plain_forward", None), ("forward_with_capture", {"modes": 16, "keep_inputs": True}),
                               ("forward_with_sinks", {"modes": 16, "keep_inputs": True, "sinks": sinks})):
            for i in range(steps + 1):
                if i == 1:
                    spent.clear()
                    t0, p0 = time.thread_time(), time.process_time()
                with torch.no_grad():
                    if options is None:
                        net(images)
                    else:
                        with qkhooks.record(net, **options) as run:
                            run(images)
            writer.flush()
            times[label] = 1000 * (time.thread_time() - t0) / steps
            if label == "forward_with_sinks":
                other = (time.process_time() - p0) - (time.thread_time() - t0)  # the writer thread, mostly
                times["writer_thread_cpu"] = 1000 * other / steps
        writer.close()
    times.update({name: 1000 * v / steps for name, v in spent.items()})
    return times


MALLOC_VARIANTS: dict[str, dict[str, str]] = {
    "glibc default": {},
    "fixed mmap threshold": {"MALLOC_MMAP_THRESHOLD_": "131072"},
}
"""Allocator settings for the memory-vs-images runs. glibc raises its mmap threshold each time a large block is
freed, so later large arrays come from the heap and RSS wanders by tens of MB; a fixed threshold (128 KiB,
glibc's initial value) returns every large block to the system on free and shows the true trend."""


def dataset_memory(size: str, batch: int, base_images: int, threads: int, workdir: Path,
                   log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Issue 3: peak RSS of record_dataset (top-16 + rows + HDF5) at 1x and 10x the images, one process each,
    with glibc's default allocator settings and with a fixed mmap threshold (see :data:`MALLOC_VARIANTS`)."""
    image = SIZES[size].image
    folder = make_image_folder(workdir / "images", 10 * base_images, image)
    out: dict[str, Any] = {"base_images": base_images, "batch": batch, "variants": {}}
    for variant, env in MALLOC_VARIANTS.items():
        runs: dict[str, Any] = {}
        for factor in (1, 10):
            n = factor * base_images
            spec = dict(kind="dataset", size=size, batch=batch, images=n, folder=str(folder), threads=threads,
                        out=str(workdir / f"dataset-{n}.h5"), workdir=str(workdir))
            t0 = time.perf_counter()
            res = run_child(spec, timeout=1200, env=env)
            res["seconds"] = time.perf_counter() - t0
            res["file_mb"] = os.path.getsize(spec["out"]) / 2**20
            os.unlink(spec["out"])
            trace = res.get("rss_after_batch_mb") or []
            half = trace[len(trace) // 2:]
            if len(half) >= 3:  # least-squares slope of RSS over the second half, MB per 100 images
                xs = [i * batch for i in range(len(half))]
                mx, my = sum(xs) / len(xs), sum(half) / len(half)
                res["rss_slope_mb_per_100_images"] = 100 * sum((x - mx) * (y - my) for x, y in zip(xs, half)) / sum(
                    (x - mx) ** 2 for x in xs)
                res["rss_second_half_range_mb"] = [min(half), max(half)]
            runs[str(factor)] = res
            if log:
                log(f"  record_dataset {n} images ({variant}): peak +{_fmt(res.get('rss_peak_delta_mb'), 1)} MB")
        out["variants"][variant] = runs
    return out


# ============================================================================================ micro benchmarks
def _clock(device: torch.device) -> Callable[[], float]:
    """Process CPU time on the CPU (robust to other jobs on a shared machine), wall time with CUDA."""
    return time.perf_counter if device.type == "cuda" else time.process_time


def _interleaved_micro(fns: dict[str, Callable[[], Any]], rounds: int, device: torch.device,
                       warmup: int = 2) -> dict[str, dict[str, float]]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    clock = _clock(device)
    with torch.no_grad():
        for r, name in interleaved_schedule(list(fns), rounds, warmup):
            _sync(device)
            t0 = clock()
            fns[name]()
            _sync(device)
            if r >= 0:
                times[name].append(clock() - t0)
    return {k: summarize([1000 * t for t in v]) for k, v in times.items()}


def projection_bench(bench: Bench, rounds: int = 30) -> dict[str, Any]:
    """Per layer (all heads): the x path (ModeProjector) vs the q/k path (QKPathProjector); and attention rows of
    the 2 query tokens three ways: ``library`` (``qkhooks.attention.attention_rows``, the keys folded away since
    patch A), ``keys`` (the reference: softmax of ``qkhooks.attention._logits``, which computes every token's key,
    the library's path before patch A) and ``from_k`` (from the model's own k, as patch B would). Errors are max
    abs differences from ``keys``."""
    from qkhooks.attention import _logits, attention_rows
    from qkhooks.projector import ModeProjector, QKPathProjector

    site = bench.sites()[0]
    spec = bench.spectrum[site.layer]
    g = torch.Generator().manual_seed(3)
    n = (bench.size.image // bench.size.patch) ** 2 + 1
    x = torch.randn(bench.batch, n, site.dim, generator=g).to(bench.device)
    with torch.no_grad():
        q, k = site.qk(x)
    out: dict[str, Any] = {"layers": bench.size.layers, "tokens": n, "batch": bench.batch, "paths": {}}
    for modes in (16, spec.num_modes):
        top = spec.top(modes)
        xp, qp = ModeProjector(top), QKPathProjector(top, site.weights())
        with torch.no_grad():
            ref, got = xp(x), qp(q, k)
        err = max(float((a - b).abs().max() / a.abs().max()) for a, b in zip(ref, got))
        stats = _interleaved_micro({"x": lambda: xp(x), "qk": lambda: qp(q, k)}, rounds, bench.device)
        out["paths"][str(modes)] = {"x_ms": stats["x"], "qk_ms": stats["qk"], "max_rel_diff": err,
                                    "speedup": stats["x"]["median"] / stats["qk"]["median"]}
    tokens = bench.query_tokens.to(bench.device)
    scale = site.scale

    def rows_keys() -> torch.Tensor:
        x_q = torch.gather(x, 1, tokens[..., None].expand(-1, -1, x.shape[-1]))
        return torch.softmax(_logits(site, x_q, x).float(), dim=-1)

    def rows_from_k() -> torch.Tensor:
        b_idx = torch.arange(q.shape[0], device=q.device)[:, None, None]
        h_idx = torch.arange(q.shape[1], device=q.device)[None, :, None]
        q_t = q[b_idx, h_idx, tokens[:, None, :]]  # (B, H, T, dk)
        return torch.softmax((q_t @ k.transpose(-1, -2) * scale).float(), -1)

    fns = {"library": lambda: attention_rows(site, x, tokens), "keys": rows_keys, "from_k": rows_from_k}
    with torch.no_grad():
        ref = rows_keys()
        errs = {name: float((fn() - ref).abs().max()) for name, fn in fns.items()}
    stats = _interleaved_micro(fns, rounds, bench.device)
    folded = site.num_heads * tokens.shape[1] < site.dim  # the library's condition for the folded path
    out["library_rows_path"] = "folded" if folded else "keys"
    out["rows"] = {name: {"ms": s, "max_abs_diff_vs_keys": errs[name],
                          "speedup_vs_keys": stats["keys"]["median"] / s["median"]} for name, s in stats.items()}
    return out


def svd_bench(bench: Bench, rounds: int = 5, dense_rounds: int = 3) -> dict[str, Any]:
    """Factored vs dense SVD of W_q^T W_k for all heads of one layer (float64); whole model = x layers."""
    from qkhooks.spectrum import factored_svd

    w = bench.sites()[0].weights()
    w_q, w_k = w.w_q.double().cpu(), w.w_k.double().cpu()
    dense = lambda: torch.linalg.svd(w_q.transpose(-1, -2) @ w_k, full_matrices=False)  # noqa: E731
    factored = lambda: factored_svd(w_q, w_k)  # noqa: E731
    s_dense = torch.linalg.svdvals(w_q.transpose(-1, -2) @ w_k)[:, : w_q.shape[1]]
    s_fact = factored()[1]
    rel = float(((s_dense - s_fact).abs() / s_dense[:, :1]).max())
    f = _interleaved_micro({"factored": factored}, rounds, torch.device("cpu"), warmup=1)["factored"]
    d = _interleaved_micro({"dense": dense}, dense_rounds, torch.device("cpu"), warmup=1)["dense"]
    t0 = time.perf_counter()
    import qkhooks

    qkhooks.spectrum(bench.timm())
    whole = time.perf_counter() - t0
    return {"heads": w_q.shape[0], "dim": w_q.shape[-1], "head_dim": w_q.shape[1], "layers": bench.size.layers,
            "factored_ms_per_layer": f, "dense_ms_per_layer": d, "speedup": d["median"] / f["median"],
            "max_rel_sigma_diff": rel, "spectrum_whole_model_s": whole,
            "dense_whole_model_s_estimate": d["median"] * bench.size.layers / 1000}


def _chunks_of_1mib(writer: Any) -> None:
    """Make ``writer`` chunk every per-image dataset as RunWriter did before patch C: ~1 MiB chunks (at most 64
    images) whatever the compression, so compressed chunks span several batches and are rewritten at each append."""
    inner = writer._create_per_image

    def create(name: str, value: Any, n: int) -> Any:
        writer.chunk_images = int(min(64, max(1, (1 << 20) // max(1, value[0].nbytes))))
        try:
            return inner(name, value, n)
        finally:
            writer.chunk_images = None

    writer._create_per_image = create  # looked up on the instance by the writer thread


class _TimedWriter:
    """Wraps a RunWriter's ``write_batch`` (caller side, includes queue-full waits) and ``_do_batch`` (thread)."""

    def __init__(self, writer: Any):
        self.writer, self.blocked, self.thread, self.thread_cpu = writer, [], [], []
        inner_write, inner_do = writer.write_batch, writer._do_batch

        def write_batch(ids, arrays):
            t0 = time.perf_counter()
            inner_write(ids, arrays)
            self.blocked.append(time.perf_counter() - t0)

        def do_batch(ids, arrays):
            t0, c0 = time.perf_counter(), time.thread_time()
            inner_do(ids, arrays)
            self.thread.append(time.perf_counter() - t0)
            self.thread_cpu.append(time.thread_time() - c0)

        writer.write_batch = write_batch
        writer._do_batch = do_batch  # looked up on the instance by the writer thread


def writer_bench(bench: Bench, compressions: Sequence[str], rounds: int = 6, batches: int = 3,
                 log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Stream top-16 modes + rows through a RunWriter per codec, interleaved with a no-writer reference.

    Chunking: plain ``X`` is the writer's default (~1 MiB chunks uncompressed; one chunk per batch when compressed,
    since patch C); ``X@batch`` passes ``chunk_images=batch`` explicitly; ``X@1mib`` restores the ~1 MiB chunks of
    every dataset as before patch C (for the before/after file sizes, see :func:`_chunks_of_1mib`).

    Per repetition: ``batches`` forwards, then ``flush`` (drain). Reported: time blocked inside write_batch
    per batch, the writer thread's time per batch, the drain at the end, and wall time vs no writer.
    """
    runners: dict[str, RecordRunner] = {"no_writer": RecordRunner(bench, {"modes": 16, **ROWS}, name="nowriter")}
    timed: dict[str, _TimedWriter] = {}
    for c in compressions:
        codec, _, chunking = c.partition("@")  # "lzf@batch": chunks of one batch (every chunk written once)
        if chunking not in ("", "batch", "1mib"):
            raise ValueError(f"unknown chunking {chunking!r} in {c!r}: use CODEC, CODEC@batch or CODEC@1mib")
        runners[c] = RecordRunner(bench, {"modes": 16, **ROWS}, writer=True, name=f"writer-{codec}-{chunking}",
                                  compression=codec, chunk_images=bench.batch if chunking == "batch" else None)
        if chunking == "1mib":
            _chunks_of_1mib(runners[c].writer)
        timed[c] = _TimedWriter(runners[c].writer)
    wall: dict[str, list[float]] = {k: [] for k in runners}
    cpu: dict[str, list[float]] = {k: [] for k in runners}
    drain: dict[str, list[float]] = {k: [] for k in runners}
    gc.collect()
    gc.freeze()
    try:
        for r, name in interleaved_schedule(list(runners), rounds, 1):
            runner = runners[name]
            gc.collect()
            if name in timed and r == 0:  # forget warm-up samples
                timed[name].blocked.clear()
                timed[name].thread.clear()
                timed[name].thread_cpu.clear()
            runner.attach()
            try:
                with torch.no_grad():
                    t0, c0 = time.perf_counter(), time.process_time()
                    for _ in range(batches):
                        runner.step(bench.images)
                    t1 = time.perf_counter()
                    runner.end_rep()
                    _sync(bench.device)
                    t2, c2 = time.perf_counter(), time.process_time()
            finally:
                runner.detach()
            if r >= 0:
                wall[name].append(t2 - t0)
                cpu[name].append(c2 - c0)
                drain[name].append(t2 - t1)
        out: dict[str, Any] = {"batches_per_rep": batches, "batch": bench.batch, "codecs": {}}
        out["no_writer_ms_per_batch"] = summarize([1000 * t / batches for t in wall["no_writer"]])
        out["no_writer_cpu_ms_per_batch"] = summarize([1000 * t / batches for t in cpu["no_writer"]])
        for c in compressions:
            tw = timed[c]
            w = runners[c].writer
            w.flush()
            raw = sum(ds.size * ds.dtype.itemsize for ds in per_image_datasets(w._file).values())
            size = os.path.getsize(runners[c].path)
            per_batch_mb = raw / max(1, w.committed) * bench.batch / 2**20
            thread = summarize([1000 * t for t in tw.thread])
            thread_cpu = summarize([1000 * t for t in tw.thread_cpu])
            out["codecs"][c] = {
                "blocked_ms_per_batch": summarize([1000 * t for t in tw.blocked]),
                "blocked_fraction_of_wall": sum(tw.blocked) / sum(wall[c]),
                "writer_thread_ms_per_batch": thread,
                "writer_thread_cpu_ms_per_batch": thread_cpu,
                "drain_ms_per_rep": summarize([1000 * t for t in drain[c]]),
                "wall_ms_per_batch": summarize([1000 * t / batches for t in wall[c]]),
                "wall_ratio_to_no_writer": summarize(paired_ratios(wall[c], wall["no_writer"])),
                "cpu_ratio_to_no_writer": summarize(paired_ratios(cpu[c], cpu["no_writer"])),
                "mb_per_batch": per_batch_mb, "thread_mb_per_s": per_batch_mb / (thread_cpu["median"] / 1000),
                "file_ratio": raw / size if size else None, "file_mb": size / 2**20, "images": w.committed,
                "file_mb_per_batch": size / max(1, w.committed) * bench.batch / 2**20,
            }
            if log:
                log(f"  writer {c}: thread {thread['median']:.1f} ms/batch")
    finally:
        gc.unfreeze()
        for runner in runners.values():
            runner.close()
    return out


def codec_bench(threads: int, reps: int = 3, workdir: Path | None = None) -> dict[str, Any]:
    """Compression ratio and speed of float16 maps per HDF5 codec (was benchmarks/codecs.py).

    Maps of the real DINOv2-S/14 (``offline:dinov2-s14``) on the bundled photos when available, else a
    random-init ViT-S on random images (then say so: random weights give less structured maps).
    """
    import h5py
    import numpy as np

    import qkhooks

    source = "offline:dinov2-s14 on 8 bundled photos"
    try:
        from qkhooks.data import collate, open_dataset

        m = qkhooks.load_model("offline:dinov2-s14")
        ds = open_dataset("samples", m.image_config)
        pixels = collate([ds[i] for i in range(min(8, len(ds)))])["pixel_values"]
        model = m.model
    except Exception as exc:  # the offline model or the sample photos are not installed
        source = f"random-init ViT-S on random images (offline model unavailable: {type(exc).__name__})"
        bench = Bench("vit_s", 8)
        model, pixels = bench.timm(), bench.images
    with qkhooks.record(model, modes=16) as run, torch.no_grad():
        model(pixels)
    arrs = {k: v.contiguous().numpy().astype(np.float16) for k, v in run.last.arrays().items()}
    raw = sum(a.nbytes for a in arrs.values())
    codecs: dict[str, dict[str, Any]] = {
        "none": {}, "gzip1": dict(compression="gzip", compression_opts=1),
        "gzip4": dict(compression="gzip", compression_opts=4),
        "gzip1+shuffle": dict(compression="gzip", compression_opts=1, shuffle=True),
        "lzf": dict(compression="lzf"), "lzf+shuffle": dict(compression="lzf", shuffle=True),
    }
    try:
        import hdf5plugin

        codecs["blosc-lz4"] = dict(**hdf5plugin.Blosc(cname="lz4", clevel=5, shuffle=hdf5plugin.Blosc.SHUFFLE))
        codecs["blosc-zstd1"] = dict(**hdf5plugin.Blosc(cname="zstd", clevel=1, shuffle=hdf5plugin.Blosc.SHUFFLE))
        codecs["zstd1"] = dict(**hdf5plugin.Zstd(clevel=1))
    except ImportError:
        pass
    tmp = Path(tempfile.mkdtemp(prefix="qkhooks-codecs-", dir=workdir))
    out: dict[str, Any] = {"source": source, "raw_mb": raw / 2**20, "codecs": {}}
    try:
        for name, kw in codecs.items():
            path = tmp / f"{name}.h5"
            writes = []
            for _ in range(reps):
                path.unlink(missing_ok=True)
                t0 = time.perf_counter()
                with h5py.File(path, "w") as f:
                    for k, a in arrs.items():
                        f.create_dataset(k, data=a, chunks=(1,) + a.shape[1:], **kw)
                writes.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            with h5py.File(path) as f:
                for k in arrs:
                    f[k][:]
            read = time.perf_counter() - t0
            out["codecs"][name] = {"ratio": raw / path.stat().st_size, "write_mb_s": raw / min(writes) / 1e6,
                                   "read_mb_s": raw / read / 1e6}
    finally:
        for p in tmp.glob("*.h5"):
            p.unlink()
        tmp.rmdir()
    return out


# ============================================================================================ profiles
def profile_method(bench: Bench, name: str, steps: int = 3) -> dict[str, Any]:
    """cProfile attribution of one method's forwards to qkhooks functions (cumulative ms per batch)."""
    import qkhooks

    pkg = str(Path(qkhooks.__file__).parent)
    runner = METHODS[name].build(bench)
    runner.attach()
    try:
        with torch.no_grad():
            runner.step(bench.images)
            runner.end_rep()
            prof = cProfile.Profile()
            t0 = time.perf_counter()
            prof.enable()
            for _ in range(steps):
                runner.step(bench.images)
            runner.end_rep()
            prof.disable()
            wall = time.perf_counter() - t0
    finally:
        runner.detach()
        runner.close()
    stats = pstats.Stats(prof)
    rows = []
    for (filename, line, func), (_, ncalls, _, cumtime, _) in stats.stats.items():  # type: ignore[attr-defined]
        if filename.startswith(pkg) and not filename.endswith("bench.py"):
            rel = os.path.relpath(filename, os.path.dirname(pkg))
            rows.append({"function": f"{rel}:{line}({func})", "calls_per_batch": ncalls / steps,
                         "cum_ms_per_batch": 1000 * cumtime / steps, "share_of_wall": cumtime / wall})
    rows.sort(key=lambda r: -r["cum_ms_per_batch"])
    return {"method": name, "steps": steps, "wall_ms_per_batch": 1000 * wall / steps, "functions": rows[:10]}


def op_diff(bench: Bench, name: str, base: str = "plain", steps: int = 2, top: int = 8) -> dict[str, Any]:
    """Torch ops whose self CPU time grows most from ``base`` to ``name`` (torch.profiler, ``steps`` forwards)."""
    from torch.profiler import ProfilerActivity, profile

    def ops(method: str) -> dict[str, float]:
        runner = METHODS[method].build(bench)
        runner.attach()
        try:
            with torch.no_grad():
                runner.step(bench.images)
                activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if bench.device.type == "cuda" else [])
                with profile(activities=activities) as prof:
                    for _ in range(steps):
                        runner.step(bench.images)
                    runner.end_rep()
        finally:
            runner.detach()
            runner.close()
        return {e.key: e.self_cpu_time_total / 1000 / steps for e in prof.key_averages()}

    a, b = ops(base), ops(name)
    diff = sorted(((k, b.get(k, 0.0) - a.get(k, 0.0), b.get(k, 0.0)) for k in set(a) | set(b)), key=lambda t: -t[1])
    return {"method": name, "base": base, "total_base_ms": sum(a.values()), "total_ms": sum(b.values()),
            "ops": [{"op": k, "extra_ms_per_batch": d, "ms_per_batch": t} for k, d, t in diff[:top]]}


# ============================================================================================ results
def _threads(entry: dict[str, Any]) -> Any:
    return entry.get("machine", {}).get("torch_threads")


def _label(model: str) -> str:
    return SIZES[model].label if model in SIZES else model


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _med_iqr(s: dict[str, float] | None, digits: int = 1, scale: float = 1.0) -> str:
    if not s:
        return "n/a"
    return f"{s['median'] * scale:.{digits}f} [{s['q1'] * scale:.{digits}f}, {s['q3'] * scale:.{digits}f}]"


def _overhead(s: dict[str, float] | None) -> str:
    if not s:
        return "n/a"
    return f"{100 * (s['median'] - 1):+.1f}% [{100 * (s['q1'] - 1):+.1f}, {100 * (s['q3'] - 1):+.1f}]"


def target_verdict(ratio: dict[str, float] | None, limit: float) -> str:
    """met / missed, and whether the interquartile range straddles the limit (then noise could flip it)."""
    if not ratio:
        return "not measured"
    med, q1, q3 = ratio["median"] - 1, ratio["q1"] - 1, ratio["q3"] - 1
    if med <= limit:
        return "met" + (" (IQR reaches past the limit)" if q3 > limit else "")
    return "missed" + (" (within noise: IQR reaches below the limit)" if q1 <= limit else "")


def save_results(entries: dict[str, dict[str, Any]], md_path: Path, json_path: Path, merge: bool = True) -> dict:
    """Merge ``entries`` into the JSON file (key: section/model/device) and re-render the Markdown from it."""
    data: dict[str, Any] = {"schema": 1, "entries": {}}
    if merge and json_path.exists():
        try:
            data = json.loads(json_path.read_text())
        except json.JSONDecodeError:
            pass
    data.setdefault("entries", {}).update(entries)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(data, indent=1, default=str))
    md_path.write_text(render_markdown(data))
    return data


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def render_markdown(data: dict[str, Any]) -> str:
    """RESULTS.md from the merged JSON: machine, commands, headline tables, targets, sections, profiles."""
    entries: dict[str, dict[str, Any]] = data.get("entries", {})
    order = {k: i for i, k in enumerate(SIZES)}
    by_section: dict[str, list[tuple[str, dict]]] = {}
    for key, e in sorted(entries.items(), key=lambda kv: (order.get(kv[1]["model"], 99), kv[1]["device"],
                                                          str(_threads(kv[1])), kv[0])):
        by_section.setdefault(e["section"], []).append((key, e))
    L: list[str] = ["# qkhooks benchmarks", "",
                    "Generated by `qkhooks.bench` from `benchmarks/results.json` (machine-readable, every sample kept). "
                    "Do not edit by hand: re-run a command below and this file is re-rendered from the merged JSON.", ""]
    threads = sorted({str(_threads(e)) for e in entries.values()})
    machines = {json.dumps({k: v for k, v in e.get("machine", {}).items() if k != "torch_threads"}, sort_keys=True)
                for e in entries.values()}
    L += ["## Machine", ""]
    for m in sorted(machines):
        m = json.loads(m)
        if m:
            L.append(f"- CPU: {m.get('cpu')} ({m.get('cores')} cores, {m.get('memory_gib')} GiB); torch {m.get('torch')} "
                     f"with **{' or '.join(threads)} intra-op thread(s), set explicitly** per run (each table says which), "
                     f"{m.get('torch_interop_threads')} inter-op; timm {m.get('timm')}, transformers {m.get('transformers')}, "
                     f"h5py {m.get('h5py')} (HDF5 {m.get('hdf5')}), numpy {m.get('numpy')}, Python {m.get('python')}; "
                     f"GPU: {m.get('gpu') or 'none'}.")
    cuda = any(e.get("device") == "cuda" for e in entries.values())
    if not cuda:
        L += ["- GPU rows: **pending: no GPU lent** to the session that produced these numbers. The code is CUDA-ready "
              "(`torch.cuda.synchronize` around every timed region, `torch.cuda.max_memory_allocated` for peaks): "
              "run the same command with `--device cuda`."]
    L += ["", "## Commands", ""]
    first_run: dict[str, str] = {}
    for e in entries.values():
        cmd, when = e.get("command", ""), e.get("when", "")
        first_run[cmd] = min(first_run.get(cmd, when), when)
    for cmd, when in sorted(first_run.items(), key=lambda t: t[1]):
        sections = sorted({f"{e['section']}/{e['model']}" for e in entries.values() if e.get("command") == cmd})
        L.append(f"- `{cmd}` ({when.replace('T', ' ')}; {', '.join(sections)})")
    L += ["", "Statistics: methods run interleaved in rounds (every method once per round, the order rotated each "
          "round), after warm-up rounds; each cell is the **median [first quartile, third quartile]** over rounds. "
          "Overheads are paired per round: time of the method / time of the plain forward in the same round, minus 1. "
          "On the CPU the primary metric is the **process CPU time** (`time.process_time`: every thread of the process, "
          "the HDF5 writer thread included): the machine is shared (2 cores, other people's test suites, load averages "
          "listed per section), which moves wall time by tens of percent from one second to the next but hardly moves "
          "the CPU time a forward consumes. Wall-time ratios are shown beside it; with CUDA, wall time is primary. "
          "CPU time is primary only with one torch thread (no OpenMP worker spinning in a barrier, so CPU time is work "
          "done); with several threads wall time is primary. I/O waits are not CPU time, which is why the writer "
          "section measures the time blocked in `write_batch` separately.",
          ""]

    notes = data.get("notes")
    if notes:
        L += [notes.strip(), ""]
    peaks: dict[tuple[str, str, Any], dict] = {}
    for key, e in by_section.get("memory", []):
        peaks[(e["model"], e["device"], _threads(e))] = e["data"]
    for key, e in by_section.get("methods", []):
        d = e["data"]
        p = e["params"]
        L += [f"## Methods: {_label(e['model'])}, {e['device']}, batch {p['batch']}, {_threads(e)} torch thread(s)", "",
              f"{p['rounds']} rounds after {p['warmup']} warm-up, {p['batches_per_rep']} forward(s) per repetition; "
              f"load average before {e.get('load_before')}, after {e.get('load_after')}.", ""]
        memory = peaks.get((e["model"], e["device"], _threads(e)), {})
        mem = memory.get("methods", {})
        metric = d.get("metric", "wall")
        rows = []
        for name, m in d["methods"].items():
            ref = f"{_overhead(m.get('ratio_to_reference'))} vs {m['reference']}" if "reference" in m else ""
            pk = mem.get(name, {})
            if "rss_peak_delta_mb" in pk:  # a single measurement (older files)
                pk = {"glibc default": pk}
            peaks_cells = [_fmt(pk.get(v, {}).get("rss_peak_delta_mb"), 0) for v in MALLOC_VARIANTS]
            gpu = next((r["cuda_peak_delta_mb"] for r in pk.values() if r.get("cuda_peak_delta_mb") is not None), None)
            if gpu is not None:
                peaks_cells[0] += f" (GPU {_fmt(gpu, 0)})"
            rows.append([f"`{name}`", m["label"], _med_iqr(m["images_per_s"], 2), _med_iqr(m.get("cpu_ms_per_batch"), 0),
                         f"**{_overhead(m.get('ratio_to_plain'))}**",
                         _overhead(m.get("ratio_to_plain_wall" if metric == "cpu" else "ratio_to_plain_cpu")), ref,
                         *peaks_cells])
        primary = "process CPU time" if metric == "cpu" else "wall time"
        secondary = "wall" if metric == "cpu" else "process CPU time; OpenMP spinning included"
        L += _table(["method", "what", "images/s (wall)", "CPU ms/batch", f"overhead vs plain ({primary})",
                     f"overhead vs plain ({secondary})", f"vs own-family reference ({primary})",
                     *[f"peak RSS over set-up, MB ({v})" for v in MALLOC_VARIANTS]], rows)
        L += ["", "Peak memory: one fresh subprocess per method, RSS high-water mark (VmHWM, reset after set-up via "
              "`/proc/self/clear_refs`) minus RSS after set-up (model built, hooks attached), over "
              f"{memory.get('steps')} forwards of the same batch; with glibc's default malloc and with a fixed mmap "
              "threshold (`MALLOC_MMAP_THRESHOLD_=131072`, which returns every large block on free, so the peak is the "
              "memory really live rather than allocator slack)." if mem else "Peak memory: not measured.", ""]
        L += [f"### Targets ({_label(e['model'])}, {e['device']}, {_threads(e)} thread(s))", ""]
        trows = []
        for name, what, limit in TARGETS:
            ratio = d["methods"].get(name, {}).get("ratio_to_plain")
            trows.append([what, f"`{name}`", f"<= {100 * limit:.0f}%", _overhead(ratio), target_verdict(ratio, limit)])
        anchors = (("timm_extract", "anchor: timm AttentionExtract"), ("hf_eager_attn", "anchor: HF eager output_attentions"))
        for name, what in anchors:
            m = d["methods"].get(name)
            if m:
                trows.append([what, f"`{name}`", "(~15-20% published)", _overhead(m.get("ratio_to_plain")),
                              f"{_overhead(m.get('ratio_to_reference'))} vs {m.get('reference')}"])
        L += _table(["target", "method", "limit", "measured overhead", "verdict"], trows) + [""]

    for key, e in by_section.get("projection", []):
        d = e["data"]
        L += [f"## Projection paths and attention rows ({e['model']}, {e['device']}, one layer, all heads, batch "
              f"{d['batch']}, {d['tokens']} tokens)", "",
              "x path: `ModeProjector`, x (B, N, d) @ [U_K | V_K] (d x 2HK). q/k path: `QKPathProjector`, (q - b_q) a_n "
              "with d_k x K per head, q and k taken as given (the model computes them anyway). Times are ms per layer "
              f"(CPU time on the CPU), median [IQR]; x{d['layers']} layers per forward.", ""]
        rows = [[k, _med_iqr(v["x_ms"], 3), _med_iqr(v["qk_ms"], 3), f"{v['speedup']:.2f}x", f"{v['max_rel_diff']:.1e}"]
                for k, v in d["paths"].items()]
        L += _table(["modes K", "x path (ms/layer)", "q/k path (ms/layer)", "speed-up of q/k path", "max rel. difference"],
                    rows) + [""]
        if "max_abs_diff_vs_keys" in next(iter(d["rows"].values())):
            rows = [[f"`{k}`", _med_iqr(v["ms"], 3), f"{v['speedup_vs_keys']:.2f}x", f"{v['max_abs_diff_vs_keys']:.1e}"]
                    for k, v in d["rows"].items()]
            L += ["Attention rows of 2 query tokens, one layer: `library` = `qkhooks.attention.attention_rows` "
                  f"(path taken here: {d.get('library_rows_path', 'n/a')}; patch A folds the keys away, "
                  "(W_k^T q_t)·x_j, as q_t·b_k is constant over keys and cancels in the softmax: B·H·T·d·N work); "
                  "`keys` = the reference that computes every token's key (softmax of `qkhooks.attention._logits`, "
                  "the library's path before patch A: B·N·d² work); `from_k` = from the model's own k (patch B).", ""]
            L += _table(["rows", "ms/layer", "speed-up vs keys", "max abs diff vs keys"], rows) + [""]
        else:  # results from before patch A
            rows = [[k, _med_iqr(v["ms"], 3), f"{v['speedup']:.2f}x", f"{v['max_abs_diff']:.1e}"] for k, v in d["rows"].items()]
            L += _table(["rows (before patch A)", "ms/layer", "speed-up vs library", "max abs diff vs library"], rows) + [""]

    for key, e in by_section.get("svd", []):
        d = e["data"]
        L += [f"## Factored vs dense SVD ({e['model']}: {d['heads']} heads, d={d['dim']}, d_k={d['head_dim']}, float64)", "",
              *_table(["", "ms per layer (all heads)", "whole model"], [
                  ["factored (thin QR + d_k x d_k SVD)", _med_iqr(d["factored_ms_per_layer"], 1),
                   f"{d['spectrum_whole_model_s']:.2f} s (`qkhooks.spectrum`, measured once)"],
                  ["dense (d x d SVD)", _med_iqr(d["dense_ms_per_layer"], 1),
                   f"~{d['dense_whole_model_s_estimate']:.1f} s ({d['layers']} x per-layer median)"]]),
              "", f"Speed-up of the factored SVD: **{d['speedup']:.0f}x**; largest singular-value difference "
              f"{d['max_rel_sigma_diff']:.1e} (relative to sigma_1).", ""]

    for key, e in by_section.get("writer", []):
        d = e["data"]
        L += [f"## HDF5 writer: time the forward loop is blocked ({e['model']}, batch {d['batch']}, top-16 modes + rows, "
              f"float16)", "",
              f"Each repetition streams {d['batches_per_rep']} batches through `record` + `RunWriter`, then flushes. "
              "`blocked` = time inside `write_batch` (host copy + queue-full waits), the only time the forward loop "
              "waits on I/O; `thread` = the writer thread's time per batch (runs beside the next forward, competing "
              f"for the cores); `drain` = the final flush. No-writer reference: {_med_iqr(d['no_writer_ms_per_batch'], 0)} "
              f"ms/batch wall, {_med_iqr(d.get('no_writer_cpu_ms_per_batch'), 0)} ms/batch CPU. Load before "
              f"{e.get('load_before')}, after {e.get('load_after')}.", ""]
        rows = [[c, _med_iqr(v["blocked_ms_per_batch"], 2), f"{100 * v['blocked_fraction_of_wall']:.2f}%",
                 _med_iqr(v.get("writer_thread_cpu_ms_per_batch"), 1), _med_iqr(v["writer_thread_ms_per_batch"], 1),
                 f"{v['thread_mb_per_s']:.0f}", _med_iqr(v["drain_ms_per_rep"], 1), _overhead(v.get("cpu_ratio_to_no_writer")),
                 _overhead(v["wall_ratio_to_no_writer"]), f"{v['mb_per_batch']:.1f}", _fmt(v.get("file_mb_per_batch"), 1),
                 _fmt(v["file_ratio"], 2)]
                for c, v in d["codecs"].items()]
        L += ["Chunking: `CODEC` = the writer's default (~1 MiB chunks uncompressed; one chunk per batch when compressed, "
              "since patch C); `CODEC@batch` = `chunk_images` of one batch, given explicitly; `CODEC@1mib` = the ~1 MiB "
              "chunks of before patch C (compressed chunks spanning several batches, rewritten at every append). The compression "
              "ratio is raw bytes / file size: below 1 means the file is *larger* than the raw data.", ""]
        L += _table(["codec", "blocked ms/batch", "blocked % of wall", "thread CPU ms/batch", "thread wall ms/batch",
                     "thread MB/s (CPU)", "drain ms/rep", "CPU time vs no writer", "wall vs no writer", "raw MB/batch",
                     "file MB/batch", "compression ratio"], rows) + [""]

    for key, e in by_section.get("codecs", []):
        d = e["data"]
        L += ["## Codecs for float16 maps (formerly benchmarks/codecs.py)", "",
              f"Source: {d['source']}, top-16 modes, {d['raw_mb']:.1f} MB raw, chunks of one image, best of 3 writes.", ""]
        L += _table(["codec", "ratio", "write MB/s", "read MB/s"],
                    [[c, f"{v['ratio']:.2f}", f"{v['write_mb_s']:.0f}", f"{v['read_mb_s']:.0f}"] for c, v in d["codecs"].items()])
        L += ["", "Default stays `none`: the maps hardly compress, and every codec writes several times slower.", ""]

    for key, e in by_section.get("dataset_memory", []):
        d = e["data"]
        L += [f"## Memory does not grow with the number of images (issue 3; {e['model']}, batch {d['batch']})", "",
              "`record_dataset` (a folder of JPEGs, top-16 modes + rows, RunWriter, no reducers), one fresh process per "
              "run; peak = VmHWM after the model is built minus RSS then; RSS is sampled after every batch. glibc's "
              "default malloc raises its mmap threshold whenever a large block is freed, after which large arrays come "
              "from the heap and RSS wanders by tens of MB without a trend; the runs with a fixed threshold "
              "(`MALLOC_MMAP_THRESHOLD_=131072`) show the trend without that noise.", ""]
        rows = []
        verdicts = []
        for variant, runs in d.get("variants", {"glibc default": d.get("runs", {})}).items():
            for factor, r in runs.items():
                rng = r.get("rss_second_half_range_mb")
                rows.append([variant, f"{factor}x", r["images"], _fmt(r.get("rss_peak_delta_mb"), 1),
                             _fmt(r.get("rss_peak_mb"), 0), f"{rng[0]:.0f}-{rng[1]:.0f}" if rng else "n/a",
                             _fmt(r.get("rss_slope_mb_per_100_images"), 2), f"{r['file_mb']:.0f}", f"{r['seconds']:.0f}"])
            one, ten = runs.get("1", {}).get("rss_peak_delta_mb"), runs.get("10", {}).get("rss_peak_delta_mb")
            if one is not None and ten is not None:
                flat = ten <= one + max(16.0, 0.1 * one)
                verdicts.append(f"{variant}: peak at 10x the images {ten - one:+.1f} MB from 1x "
                                f"({'flat' if flat else 'higher'})")
        L += _table(["malloc", "size", "images", "peak RSS over start (MB)", "peak RSS (MB)", "RSS range, 2nd half (MB)",
                     "RSS slope, 2nd half (MB/100 images)", "file MB", "wall s"], rows)
        if verdicts:
            L += ["", "Peaks: " + "; ".join(verdicts) + ".", ""]

    e2e = by_section.get("end_to_end", [])
    if e2e:
        L += ["## End to end: `qkhooks record` over a folder vs a plain loop", "",
              "`record_dataset` (what `qkhooks record FOLDER --out r.h5` runs: top-16 modes, default reducers, float16 "
              "file, batch 16) against a plain loop over the same JPEGs (the model's transform, a DataLoader, no "
              "hooks), interleaved in one process, model loading excluded. Ratios paired per round. Parts: main-thread "
              "CPU ms per batch of one recorded batch (random images), and the writer thread's CPU.", ""]
        rows = []
        for key, e in e2e:
            d = e["data"]
            parts = d.get("parts_ms_per_batch", {})
            rows.append([_label(e["model"]), _threads(e), d["images"], _med_iqr(d["plain"]["cpu_s"], 2),
                         _med_iqr(d["record"]["cpu_s"], 2), f"**{_med_iqr(d['ratio_cpu'], 3)}**",
                         _med_iqr(d["ratio_wall"], 3), f"{e.get('load_before')}",
                         ", ".join(f"{k} {v:.1f}" for k, v in parts.items())])
        L += _table(["model", "threads", "images", "plain CPU s", "record CPU s", "record/plain (CPU)",
                     "record/plain (wall)", "load before", "parts, ms per batch"], rows)
        L.append("")
    for key, e in by_section.get("profile", []):
        d = e["data"]
        L += [f"## Where the time goes ({e['model']}, {e['device']})", "",
              "cProfile of qkhooks functions (cumulative, includes the torch ops they call; cProfile slows Python code, "
              "so shares are indicative), and torch.profiler: ops whose self CPU time grows most over the plain forward.", ""]
        for prof in d.get("cprofile", []):
            L += [f"**`{prof['method']}`** ({prof['wall_ms_per_batch']:.0f} ms/batch under cProfile):", ""]
            L += _table(["function", "calls/batch", "cum ms/batch", "share of wall"],
                        [[f"`{r['function']}`", f"{r['calls_per_batch']:.0f}", f"{r['cum_ms_per_batch']:.1f}",
                          f"{100 * r['share_of_wall']:.1f}%"] for r in prof["functions"][:6]]) + [""]
        for od in d.get("ops", []):
            L += [f"**`{od['method']}` vs `{od['base']}`** (self CPU ms per batch; totals {od['total_ms']:.0f} vs "
                  f"{od['total_base_ms']:.0f}):", ""]
            L += _table(["op", "extra ms/batch", "ms/batch"],
                        [[f"`{o['op']}`", f"{o['extra_ms_per_batch']:+.1f}", f"{o['ms_per_batch']:.1f}"]
                         for o in od["ops"]]) + [""]
    return "\n".join(L).rstrip() + "\n"


# ============================================================================================ driver
def _bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", default="vit_s", help=f"comma-separated sizes: {', '.join(SIZES)} (default vit_s)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, from {', '.join(SECTIONS)}")
    p.add_argument("--methods", help=f"comma-separated subset of {', '.join(METHODS)} (default all)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=12, help="timed rounds per method (interleaved)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up rounds (not recorded)")
    p.add_argument("--batches-per-rep", type=int, default=2, help="forwards per timed repetition")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (set explicitly)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--memory-steps", type=int, default=2, help="forwards per memory subprocess")
    p.add_argument("--dataset-images", type=int, default=40, help="images of the 1x record_dataset run (10x is the other)")
    p.add_argument("--compressions", default="none,lzf,gzip,lzf@1mib,gzip@1mib",
                   help="codecs for the writer section: CODEC (the writer's default chunks), CODEC@batch (chunks of one "
                        "batch), CODEC@1mib (the ~1 MiB chunks of before patch C)")
    p.add_argument("--e2e-images", type=int, default=240, help="JPEGs of the end_to_end section (default 240)")
    p.add_argument("--e2e-rounds", type=int, default=3, help="interleaved rounds of the end_to_end section")
    p.add_argument("--workdir", help="folder for temporary run files (default: a temporary folder)")
    p.add_argument("--out", default=str(DEFAULT_MD), help="Markdown results (re-rendered from the JSON)")
    p.add_argument("--json", default=str(DEFAULT_JSON), help="machine-readable results, merged across runs")
    p.add_argument("--fresh", action="store_true", help="start the JSON afresh instead of merging")
    p.add_argument("--notes", help="Markdown put at the top of the results (default benchmarks/ANALYSIS.md)")
    p.add_argument("--render-only", action="store_true", help="only re-render the Markdown from the JSON and the notes")


@command("bench", "benchmark capture, projection, attention rows and HDF5 streaming against plain forwards and "
                  "peers")(_bench_args)
def run_bench(args: argparse.Namespace) -> int:
    from qkhooks.errors import QKHooksError

    if args.render_only:
        data = json.loads(Path(args.json).read_text())
        notes = Path(args.notes) if args.notes else DEFAULT_NOTES
        if notes.exists():
            data["notes"] = notes.read_text()
            Path(args.json).write_text(json.dumps(data, indent=1, default=str))
        Path(args.out).write_text(render_markdown(data))
        print(f"wrote {args.out}")
        return 0
    torch.set_num_threads(args.threads)
    sizes = [s.strip() for s in args.models.split(",") if s.strip()]
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    names = [s.strip() for s in args.methods.split(",")] if args.methods else list(METHODS)
    for bad in [s for s in sizes if s not in SIZES] + [s for s in sections if s not in SECTIONS] + [
            n for n in names if n not in METHODS]:
        raise QKHooksError(f"unknown size, section or method {bad!r}; see qkhooks bench --help.")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise QKHooksError("--device cuda, but torch sees no GPU here.")
    device = torch.device(args.device)
    if sys.argv[1:2] == ["bench"]:
        cmd = " ".join(["qkhooks bench", *map(shlex.quote, sys.argv[2:])])
    else:
        cmd = " ".join(["python benchmarks/run.py", *map(shlex.quote, sys.argv[1:])])
    machine = machine_info()
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    if threading.current_thread() is threading.main_thread():  # a killed run still removes its run files
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    tmp = tempfile.TemporaryDirectory(prefix="qkhooks-bench-", dir=args.workdir)
    workdir = Path(tmp.name)
    entries: dict[str, dict[str, Any]] = {}
    json_path, md_path = Path(args.json), Path(args.out)
    fresh = args.fresh

    def record(section: str, size: str, params: dict, fn: Callable[[], Any], dev: str = args.device) -> None:
        nonlocal fresh
        log(f"[{section}] {size} on {dev} ...")
        before, t0 = _load(), time.perf_counter()
        result = fn()
        entries[f"{section}/{size}/{dev}/t{args.threads}"] = {
            "section": section, "model": size, "device": dev, "command": cmd, "params": params, "machine": machine,
            "when": datetime.datetime.now().isoformat(timespec="seconds"), "load_before": before, "load_after": _load(),
            "seconds": time.perf_counter() - t0, "data": result}
        save_results(entries, md_path, json_path, merge=not fresh)  # save as we go: a long run killed keeps its sections
        fresh = False
        log(f"[{section}] done in {time.perf_counter() - t0:.0f} s")

    try:
        for size in sizes:
            bench = Bench(size, args.batch, device, workdir / size)
            try:
                if "methods" in sections:
                    p = dict(batch=args.batch, rounds=args.rounds, warmup=args.warmup, batches_per_rep=args.batches_per_rep,
                             methods=names, threads=args.threads)
                    record("methods", size, p, lambda: time_methods(bench, names, args.rounds, args.warmup,
                                                                    args.batches_per_rep, log))
                if "memory" in sections:
                    record("memory", size, dict(batch=args.batch, steps=args.memory_steps),
                           lambda: measure_memory(size, args.batch, names, args.device, args.threads, workdir / size,
                                                  args.memory_steps, log))
                if "projection" in sections:
                    record("projection", size, dict(batch=args.batch), lambda: projection_bench(bench))
                if "svd" in sections:
                    record("svd", size, {}, lambda: svd_bench(bench), dev="cpu")
                if "writer" in sections:
                    comps = [c.strip() for c in args.compressions.split(",") if c.strip()]
                    record("writer", size, dict(batch=args.batch, compressions=comps),
                           lambda: writer_bench(bench, comps, log=log))
                if "dataset_memory" in sections and device.type == "cpu":
                    record("dataset_memory", size, dict(batch=args.batch, images=args.dataset_images),
                           lambda: dataset_memory(size, args.batch, args.dataset_images, args.threads, workdir / size, log),
                           dev="cpu")
                if "end_to_end" in sections and device.type == "cpu":
                    record("end_to_end", size, dict(images=args.e2e_images, batch=16, rounds=args.e2e_rounds),
                           lambda: end_to_end_bench(size, workdir / size, args.e2e_images, 16, args.e2e_rounds, log),
                           dev="cpu")
                if "profile" in sections:
                    def profiles() -> dict[str, Any]:
                        targets = [n for n in ("rows2", "modes_all", "full_hdf5") if n in names]
                        return {"cprofile": [profile_method(bench, n) for n in targets],
                                "ops": [op_diff(bench, n) for n in ("rows2", "modes_all") if n in names]}

                    record("profile", size, dict(batch=args.batch), profiles)
            finally:
                bench.close()
        if "codecs" in sections:
            record("codecs", "dinov2_s14", {}, lambda: codec_bench(args.threads, workdir=workdir), dev="cpu")
        data = save_results(entries, md_path, json_path, merge=not fresh)
        notes = Path(args.notes) if args.notes else DEFAULT_NOTES
        if notes.exists():
            data["notes"] = notes.read_text()
            json_path.write_text(json.dumps(data, indent=1, default=str))
            md_path.write_text(render_markdown(data))
    finally:
        tmp.cleanup()
    log(f"wrote {md_path} and {json_path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python benchmarks/run.py [options]``: the same as ``qkhooks bench [options]``."""
    parser = argparse.ArgumentParser(prog="benchmarks/run.py", description=run_bench.__doc__)
    _bench_args(parser)
    args = parser.parse_args(argv)
    try:
        return run_bench(args)
    except Exception as exc:
        from qkhooks.errors import QKHooksError

        if isinstance(exc, QKHooksError):
            print(f"bench: error: {exc}", file=sys.stderr)
            return 2
        raise
