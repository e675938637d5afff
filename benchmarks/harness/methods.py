"""The methods timed side by side (a plain forward, qkhooks' recordings, the peers' tools) and the timing loop.

Each method is a :class:`Runner` on the shared :class:`~harness.material.Bench`; :func:`time_methods` runs them
interleaved round by round and pairs every ratio with the plain forward of the same round.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import time
from typing import Any, Callable, Sequence

import torch

from harness.machine import load_average, minor_page_faults, sync
from harness.material import Bench
from harness.stats import bracket_means, bracketed_schedule, interleaved_schedule, paired_ratios, summarize


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
                 compression: str = "none", chunk_images: int | None = None, checksum: bool = False):
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
                                    checksum=checksum, attrs={"model": bench.size.timm_name, "config": {"bench": name, **options}})
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

        # the previous batch dropped before the next forward, as README's loop does (`with ... as run:` rebinds run,
        # and the previous recording with its maps goes, before the model is called): held through the call, they
        # made ~1 forward in 4 fault ~30,000 pages (ViT-S, batch 8) that the plain forward around it did not (round 46)
        self.last = None
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
        # the previous batch's maps dropped before the next call, as a recording frees run.last when its next forward
        # begins: held through the call, they made every extract forward fault ~3,000 (ViT-S) to ~29,000 (ViT-B)
        # pages a batch where the recordings fault none, a handicap for the peer (review r34)
        self.last = {}
        self.last = self.extract(images)
        return self.last

    def inspect(self) -> dict[str, Any]:
        return {"maps": self.last}


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    label: str
    build: Callable[[Bench], Runner]
    family: str = "timm"
    reference: str = "plain"  # the same-family baseline for a second ratio
    kind: str = "qkhooks"  # qkhooks | baseline | peer


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
    Method("full_maps_eager", "full maps, every layer, attention computed once from them (outputs='eager')",
           _record({"modes": None, "attention": "full", "outputs": "eager"}), reference="timm_extract"),
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
]}

@dataclasses.dataclass(frozen=True)
class Target:
    """A method's allowed overhead: its time over ``versus``'s in the same round, minus 1, at most ``limit``; on
    ``device`` only (None: any)."""

    method: str
    what: str
    limit: float
    device: str | None = None
    versus: str = "plain"


TARGETS: list[Target] = [
    Target("capture", "capture alone", 0.02),
    Target("rows2", "rows for 2 query tokens, every layer", 0.05, "cpu"),
    Target("full_hdf5", "full recording (top-16 modes, rows, HDF5)", 0.10, "cpu"),
    Target("full_hdf5", "full recording (top-16 modes, rows, HDF5)", 0.05, "cuda"),
    # issue 20's on the CPU (its GPU targets are capture's and the full recording's)
    Target("modes16_per_batch", "top-16 modes, record() entered per batch", 0.05, "cpu"),
    Target("modes_all_rows2", "all modes + rows", 0.05, "cpu"),
    Target("full_maps_eager", "full maps (outputs='eager') against AttentionExtract", 0.0, "cpu", "timm_extract"),
    Target("full_maps", "full maps (default outputs) against AttentionExtract", 0.0, "cpu", "timm_extract"),
]
"""The benchmarks' targets, each read in RESULTS.md from the median's confidence interval (``render.target_verdict``)."""


# ============================================================================================ timing
def time_methods(bench: Bench, names: Sequence[str], rounds: int, warmup: int = 1, batches_per_rep: int = 1,
                 log: Callable[[str], None] | None = None, bracket: bool = False) -> dict[str, Any]:
    """Time each method ``rounds`` times, interleaved; per method: wall and process CPU seconds per repetition,
    their summaries, and ratios to ``plain`` (and to the method's own-family reference) paired by round.

    ``bracket``: ``plain`` runs before every other method's repetition and once at the end
    (:func:`~harness.stats.bracketed_schedule`), and each repetition's ratio is to the mean of the two ``plain``
    repetitions around it (kept as ``plain_bracket_wall_s`` / ``plain_bracket_cpu_s``), not to the round's one:
    the machine's drift within a round cancels, at about twice the time. ``plain``'s own samples are then all its
    repetitions.

    ``ratio_to_plain`` uses the primary metric: process CPU time on the CPU with one torch thread (every
    thread of this process, the writer thread included; it does not move when other jobs take the cores, wall
    time does), wall time otherwise (CUDA, or several threads whose OpenMP workers spin while they wait).
    Both are kept (``ratio_to_plain_wall``, ``ratio_to_plain_cpu``).
    """
    runners = {}
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    faults: dict[str, list[float]] = {n: [] for n in names}
    order: list[str] = []
    timeline: list[tuple[int, str, float, float]] = []  # (round, method, wall, cpu) of every repetition, warm-up too
    schedule = bracketed_schedule(names, rounds, warmup) if bracket else interleaved_schedule(names, rounds, warmup)
    try:
        for name in names:
            runners[name] = METHODS[name].build(bench)
        gc.collect()
        gc.freeze()  # set-up objects leave the collector's view: the collect before each repetition is then cheap
        for r, name in schedule:
            runner = runners[name]
            gc.collect()
            runner.attach()
            try:
                with torch.no_grad():
                    sync(bench.device)
                    f0, t0, c0 = minor_page_faults(), time.perf_counter(), time.process_time()
                    for _ in range(batches_per_rep):
                        runner.step(bench.images)
                    runner.end_rep()
                    sync(bench.device)
                    dt, dc = time.perf_counter() - t0, time.process_time() - c0
                    df = None if f0 is None else (minor_page_faults() or 0) - f0
            finally:
                runner.detach()
            timeline.append((r, name, dt, dc))
            if r >= 0:
                wall[name].append(dt)
                cpu[name].append(dc)
                if df is not None:
                    faults[name].append(df / batches_per_rep)
                order.append(name)
                if log and len(order) % (2 * len(names) - 2 if bracket else len(names)) == 0:
                    log(f"  round {r + 1}/{rounds} done (load {load_average()})")
    finally:
        gc.unfreeze()
        for runner in runners.values():
            runner.close()
    images = bench.batch * batches_per_rep
    # CPU time measures work only when no OpenMP worker spins in a barrier: one torch thread on the CPU.
    metric = "cpu" if bench.device.type == "cpu" and torch.get_num_threads() == 1 else "wall"
    primary = wall if metric == "wall" else cpu
    out: dict[str, Any] = {"metric": metric, "order_first_rounds": order[: 3 * len(names)], "methods": {}}
    # around[metric][method], bracketed: the mean of the two plain forwards around each of the method's repetitions
    around: dict[str, dict[str, list[float]]] | None = None
    if bracket:
        out["bracketed"] = True
        around = {"wall": bracket_means([(r, n, w) for r, n, w, _ in timeline]),
                  "cpu": bracket_means([(r, n, c) for r, n, _, c in timeline])}
    for name in names:
        m = METHODS[name]
        entry: dict[str, Any] = {
            "label": m.label, "kind": m.kind, "family": m.family, "wall_s": wall[name], "cpu_s": cpu[name],
            "images_per_s": summarize([images / t for t in wall[name]]),
            "ms_per_batch": summarize([1000 * t / batches_per_rep for t in wall[name]]),
            "cpu_ms_per_batch": summarize([1000 * t / batches_per_rep for t in cpu[name]]),
        }
        if faults[name]:
            entry["minor_faults_per_batch"] = summarize(faults[name])
        if around is not None and name in around["wall"]:
            entry["plain_bracket_wall_s"], entry["plain_bracket_cpu_s"] = around["wall"][name], around["cpu"][name]
        if "plain" in wall:
            to_plain = {key: ratio_samples(times, around[key] if around else None, name, "plain")
                        for key, times in (("wall", wall), ("cpu", cpu))}
            entry["ratio_to_plain"] = summarize(to_plain[metric])
            entry["ratio_to_plain_wall"] = summarize(to_plain["wall"])
            entry["ratio_to_plain_cpu"] = summarize(to_plain["cpu"])
        if m.reference != "plain" and m.reference in wall:
            entry["reference"] = m.reference
            entry["ratio_to_reference"] = summarize(ratio_samples(primary, around[metric] if around else None, name,
                                                                  m.reference))
        out["methods"][name] = entry
    return out


def ratio_samples(times: dict[str, list[float]], around: dict[str, list[float]] | None, name: str,
                  versus: str) -> list[float]:
    """``name``'s repetitions over ``versus``'s, paired by round: the one place a ratio is taken, at measurement
    (:func:`time_methods`) and when results are re-read (``render.paired_summary``). Bracketed (``around``: each
    method's per-repetition means of the plain forwards around it; plain itself has none), each side is first taken
    over its own plain means, and a ratio to plain is the method over its plain means."""
    if around is None:
        return paired_ratios(times[name], times[versus])
    own = paired_ratios(times[name], around.get(name, times[name]))
    if versus == "plain":
        return own
    return paired_ratios(own, paired_ratios(times[versus], around.get(versus, times[versus])))
