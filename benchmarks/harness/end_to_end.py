"""End to end: ``qkhooks record`` over a folder of JPEGs against a plain DataLoader loop, and the parts of a batch."""

from __future__ import annotations

import contextlib
import gc
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from harness.material import make_image_folder
from harness.sizes import SIZES
from harness.stats import bracket_means, bracketed_schedule, paired_ratios, summarize

END_TO_END_LIMIT = 0.10
"""Issue 20's target: a recording over a folder at most 10 % over the plain loop (process CPU on the CPU, the proxy
for a fast GPU's host; wall time beside a GPU)."""


def end_to_end_bench(size: str, workdir: Path, images: int = 240, batch: int = 16, rounds: int = 3,
                     log: Callable[[str], None] | None = None, device: str | torch.device = "cpu") -> dict[str, Any]:
    """``qkhooks record`` over a folder of JPEGs (defaults: top-16 modes, default reducers, float16 file) against
    a plain loop over the same images (the model's own transform, a DataLoader, the same batch and threads),
    interleaved round by round in one process, each recording between two plain loops and its ratio to their mean
    (a drift of the machine's speed cancels; one plain loop more than recordings); model loading excluded, run set-up
    (spectrum, file) included.

    Also times the parts of one recorded batch on the same model: the capture hooks, each default reducer's
    ``update`` and the writer's hand-off (main-thread CPU), and the writer thread's CPU per batch.

    On a GPU both loops use the DataLoader workers ``record_dataset`` picks by default there, so the ratio is the
    recording's own cost; the wall-clock ratio is the one that counts there (the device waits for the host).
    """
    import qkhooks
    from torch.utils.data import DataLoader

    from qkhooks.data import collate, open_dataset
    from qkhooks.stream import default_workers, record_dataset

    device = torch.device(device)
    workers = default_workers(device)
    folder = make_image_folder(workdir / "images", images, SIZES[size].image)
    loaded = qkhooks.load_model(f"timm:{SIZES[size].timm_name}", random_init=True)
    net = loaded.model.to(device).eval()
    out_file = workdir / "end_to_end.h5"

    def plain() -> None:
        loader = DataLoader(open_dataset(str(folder), loaded.image_config), batch_size=batch, collate_fn=collate,
                            num_workers=workers)
        for item in loader:
            with torch.no_grad():
                net(item["pixel_values"].to(device, non_blocking=True))
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def recorded() -> None:
        record_dataset(loaded, str(folder), out_file, batch_size=batch, overwrite=True, progress=False, device=device)

    wall: dict[str, list[float]] = {"plain": [], "record": []}
    cpu: dict[str, list[float]] = {"plain": [], "record": []}
    timeline: list[tuple[int, str, float, float]] = []
    for r, name in bracketed_schedule(list(wall), rounds, warmup=1):  # every recording between two plain loops
        gc.collect()
        t0, c0 = time.perf_counter(), time.process_time()
        (plain if name == "plain" else recorded)()
        timeline.append((r, name, time.perf_counter() - t0, time.process_time() - c0))
        if r >= 0:
            wall[name].append(timeline[-1][2])
            cpu[name].append(timeline[-1][3])
    out_file.unlink(missing_ok=True)
    around = {"wall": bracket_means([(r, n, w) for r, n, w, _ in timeline])["record"],
              "cpu": bracket_means([(r, n, c) for r, n, _, c in timeline])["record"]}
    result: dict[str, Any] = {"images": images, "batch": batch, "rounds": rounds, "workers": workers,
                              "parts_ms_per_batch": _record_parts(net, batch, device)}
    for name in wall:
        result[name] = {"wall_s": summarize(wall[name]), "cpu_s": summarize(cpu[name])}
    result["samples"] = {"plain": {"wall_s": wall["plain"], "cpu_s": cpu["plain"]},  # one more plain loop, the last
                         "record": {"wall_s": wall["record"], "cpu_s": cpu["record"],
                                    "plain_bracket_wall_s": around["wall"], "plain_bracket_cpu_s": around["cpu"]}}
    result["bracketed"] = True
    result["ratio_wall"] = summarize(paired_ratios(wall["record"], around["wall"]))
    result["ratio_cpu"] = summarize(paired_ratios(cpu["record"], around["cpu"]))
    if log:
        log(f"  end to end {size}: record/plain CPU {result['ratio_cpu']['median']:.3f}, wall {result['ratio_wall']['median']:.3f}")
    return result


def _record_parts(net: torch.nn.Module, batch: int, device: torch.device, steps: int = 4) -> dict[str, float]:
    """Main-thread CPU ms per batch of each part of a default recording (``record()`` entered once, as
    ``record_dataset`` does), and the writer thread's CPU."""
    import qkhooks
    from qkhooks.analysis.modes import AnisotropyReducer, TopKModes
    from qkhooks.capture import takes_inputs
    from qkhooks.store import RunWriter
    from qkhooks.stream import WriterSink

    spent: dict[str, float] = {}

    class Timed:
        def __init__(self, name: str, sink: Any):
            self.name, self.sink = name, sink
            if takes_inputs(sink):  # each layer's tokens in its hook, timed as the same part
                self.take_inputs = self._timed(sink.take_inputs)

        def _timed(self, method: Callable[..., None]) -> Callable[..., None]:
            def timed(*args: Any) -> None:
                t0 = time.thread_time()
                method(*args)
                spent[self.name] = spent.get(self.name, 0.0) + time.thread_time() - t0

            return timed

        def update(self, b: Any) -> None:
            self._timed(self.sink.update)(b)

    images = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0)).to(device)
    with tempfile.TemporaryDirectory(prefix="qkhooks-parts-") as tmp:
        writer = RunWriter(Path(tmp) / "parts.h5", mode="overwrite")
        sinks = [Timed("topk_modes", TopKModes()), Timed("anisotropy", AnisotropyReducer()),
                 Timed("writer_handoff", WriterSink(writer))]
        times: dict[str, float] = {}
        for label, options in (("plain_forward", None), ("forward_with_capture", {"modes": 16}),
                               ("forward_with_sinks", {"modes": 16, "sinks": sinks})):
            with contextlib.ExitStack() as stack:  # record() entered once, as record_dataset does
                run = net if options is None else stack.enter_context(qkhooks.record(net, **options))
                for i in range(steps + 1):
                    if i == 1:
                        spent.clear()
                        t0, p0 = time.thread_time(), time.process_time()
                    with torch.no_grad():
                        run(images)
            writer.flush()
            times[label] = 1000 * (time.thread_time() - t0) / steps
            if label == "forward_with_sinks":
                other = (time.process_time() - p0) - (time.thread_time() - t0)  # the writer thread, mostly
                times["writer_thread_cpu"] = 1000 * other / steps
        writer.close()
    times.update({name: 1000 * v / steps for name, v in spent.items()})
    return times
