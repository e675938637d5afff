"""Round 29: ``--heap kept`` (glibc's thresholds fixed for a benchmark run, its entries beside the default's) and the
one place a ratio is taken (``methods.ratio_samples``, at measurement and when results are re-read)."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from harness.driver import main as bench_main  # noqa: E402
from harness.methods import ratio_samples  # noqa: E402
from harness.render import paired_summary  # noqa: E402
from harness.stats import bracket_means, bracketed_schedule, summarize  # noqa: E402

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")

# Faults of a 40 MiB block written, freed and written again: above glibc's largest dynamic mmap threshold (32 MiB),
# so by default it is mapped afresh and faults every time; with the heap kept it comes from the heap the second time.
_FAULTS = textwrap.dedent("""
    import ctypes, resource, sys
    sys.path.insert(0, {benchmarks!r})
    if {kept}:
        from harness.machine import keep_heap
        keep_heap()
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
    def written_and_freed(n=40 << 20):  # malloc itself, as torch's CPU allocator: numpy asks for huge pages
        block = libc.malloc(n)
        ctypes.memset(block, 1, n)
        libc.free(block)
    written_and_freed()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    written_and_freed()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


@glibc
def test_keep_heap_stops_glibc_returning_a_large_freed_block_so_it_is_not_faulted_again():
    pages = 40 * 256  # 4 KiB pages in 40 MiB
    counts = {kept: int(subprocess.run([sys.executable, "-c", _FAULTS.format(benchmarks=str(BENCHMARKS), kept=kept)],
                                       capture_output=True, text=True, check=True).stdout)
              for kept in (False, True)}
    assert counts[False] >= pages // 2  # glibc's default: mapped afresh, faulted again
    assert counts[True] < pages // 20   # kept: the freed block is reused


@glibc
def test_heap_kept_entries_sit_beside_the_default_and_say_so(tmp_path, monkeypatch):
    """``--heap kept`` calls keep_heap before any section runs (not in this process: stubbed), keys its entries
    ``.../heapkept`` with the thresholds in their parameters, and the rendered headings say "heap kept"."""
    import harness.driver as driver

    calls = []
    monkeypatch.setattr(driver, "keep_heap", lambda: calls.append("kept"))
    md, js = tmp_path / "R.md", tmp_path / "r.json"
    common = ["--models", "tiny", "--sections", "svd", "--out", str(md), "--json", str(js), "--notes", str(tmp_path / "n")]
    assert bench_main([*common, "--fresh"]) == 0 and calls == []
    assert bench_main([*common, "--heap", "kept"]) == 0 and calls == ["kept"]
    entries = json.loads(js.read_text())["entries"]
    assert set(entries) == {"svd/tiny/cpu/t2", "svd/tiny/cpu/t2/heapkept"}
    assert entries["svd/tiny/cpu/t2/heapkept"]["params"]["heap"] == {"mmap_threshold": 256 << 20,
                                                                     "trim_threshold": 1 << 30}
    assert "heap" not in entries["svd/tiny/cpu/t2"]["params"]


def _bracketed(rng: np.random.Generator, rounds: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Times of a bracketed schedule of plain, a and b (random), and each method's plain means."""
    timeline = [(r, n, float(rng.uniform(1, 2))) for r, n in bracketed_schedule(["plain", "a", "b"], rounds)]
    times: dict[str, list[float]] = {}
    for r, n, t in timeline:
        times.setdefault(n, []).append(t)
    return times, bracket_means(timeline)


def test_ratio_samples_at_measurement_equal_the_ratios_re_read_from_the_json_entry():
    rng = np.random.default_rng(29)
    times, around = _bracketed(rng, 7)
    # by hand: each repetition over the mean of the plain forwards around it; a over b: both so, then divided
    assert len(times["plain"]) == 2 * 7 + 1 and len(times["a"]) == 7  # plain before each other method, and last
    a_own = [t / m for t, m in zip(times["a"], around["a"])]
    b_own = [t / m for t, m in zip(times["b"], around["b"])]
    assert np.allclose(ratio_samples(times, around, "a", "plain"), a_own)
    assert np.allclose(ratio_samples(times, around, "a", "b"), np.array(a_own) / np.array(b_own))
    assert ratio_samples(times, around, "plain", "plain") == [1.0] * 15
    # the entry as time_methods keeps it, re-read
    methods = {n: {"cpu_s": times[n], **({"plain_bracket_cpu_s": around[n]} if n != "plain" else {})} for n in times}
    assert paired_summary(methods, "a", "b", "cpu") == summarize(ratio_samples(times, around, "a", "b"))
    assert paired_summary(methods, "a", "plain", "cpu") == summarize(a_own)
    # unbracketed: paired by round, and None where the rounds differ
    flat = {"a": [2.0, 4.0], "plain": [1.0, 2.0]}
    assert ratio_samples(flat, None, "a", "plain") == [2.0, 2.0]
    assert paired_summary({n: {"cpu_s": v} for n, v in flat.items()}, "a", "plain", "cpu")["median"] == 2.0
    assert paired_summary({"a": {"cpu_s": [1.0]}, "plain": {"cpu_s": [1.0, 2.0]}}, "a", "plain", "cpu") is None


def test_the_end_to_end_parts_time_every_default_sink_including_the_anisotropy_rows_taken_in_hooks():
    """``_record_parts`` wraps each sink to time it: the anisotropy reducer, which takes each layer's tokens in the
    layer's hook (round 29), must get them through the wrapper (it refused the batch before the wrapper passed
    ``take_inputs`` on), and its time is counted as its part."""
    import timm
    import torch

    from harness.end_to_end import _record_parts

    torch.manual_seed(0)
    net = timm.create_model("vit_tiny_patch16_224", pretrained=False, embed_dim=32, depth=2, num_heads=2).eval()
    parts = _record_parts(net, 2, torch.device("cpu"), steps=1)
    assert {"plain_forward", "forward_with_capture", "forward_with_sinks", "writer_thread_cpu", "topk_modes",
            "anisotropy", "writer_handoff"} <= set(parts)
    assert parts["anisotropy"] > 0 and parts["topk_modes"] > 0
