"""The benchmark harness (benchmarks/harness/, outside the installed package): its logic only — statistics,
interleaving, what each method's hooks produce on a tiny model, the peak-memory helpers and the results files;
and that the installed package holds no harness. No timing assertions: on a shared machine a timing proves
nothing in a unit test (the numbers live in benchmarks/RESULTS.md)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import qkhooks

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # the harness is not installed: it is imported from the checkout

from harness import methods as M  # noqa: E402
from harness.driver import main as bench_main  # noqa: E402
from harness.machine import peak_rss_mb, reset_peak_rss, rss_mb  # noqa: E402
from harness.material import Bench  # noqa: E402
from harness.methods import METHODS, ROWS, RecordRunner, time_methods  # noqa: E402
from harness.micro import projection_bench  # noqa: E402
from harness.render import save_results, target_verdict  # noqa: E402
from harness.stats import interleaved_schedule, paired_ratios, quantile, summarize  # noqa: E402
from harness.storage import _chunks_of_1mib, writer_bench  # noqa: E402
from qkhooks.attention import _logits, attention_rows
from qkhooks.store.format import per_image_datasets


# ------------------------------------------------------------------------------------------- statistics
def test_quantile_and_summary_match_numpy():
    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 4, 7, 12, 31):
        x = rng.normal(size=n) * 10
        for q in (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0):
            assert quantile(list(x), q) == pytest.approx(float(np.quantile(x, q)), abs=1e-12)
        s = summarize(x)
        q1, med, q3 = np.percentile(x, [25, 50, 75])
        assert s["median"] == pytest.approx(med) and s["q1"] == pytest.approx(q1) and s["q3"] == pytest.approx(q3)
        assert s["iqr"] == pytest.approx(q3 - q1)
        assert (s["min"], s["max"], s["n"]) == (x.min(), x.max(), n)
        assert s["mean"] == pytest.approx(x.mean())
    with pytest.raises(ValueError):
        quantile([], 0.5)


def test_paired_ratios_pair_by_round():
    assert paired_ratios([2.0, 3.0], [1.0, 2.0]) == [2.0, 1.5]
    with pytest.raises(ValueError):
        paired_ratios([1.0], [1.0, 2.0])


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_schedule_interleaves_every_round_and_never_repeats_a_method_back_to_back(n):
    names = [f"m{i}" for i in range(n)]
    sched = interleaved_schedule(names, rounds=2 * n, warmup=2)
    assert len(sched) == (2 * n + 2) * n
    rounds = [r for r, _ in sched]
    assert rounds == sorted(rounds) and rounds[0] == -2 and rounds[-1] == 2 * n - 1
    for r in range(-2, 2 * n):
        assert sorted(m for rr, m in sched if rr == r) == names  # each round runs each method once
    if n > 1:
        assert all(a[1] != b[1] for a, b in zip(sched, sched[1:]))
    if n == 2:
        assert [m for _, m in sched[:6]] == ["m0", "m1"] * 3  # A B A B
    if n > 2:  # rotation: every method leads some round
        assert {next(m for rr, m in sched if rr == r) for r in range(n)} == set(names)
    with pytest.raises(ValueError):
        interleaved_schedule(["a", "a"], 1)


def test_target_verdict_reads_the_median_and_says_when_noise_could_flip_it():
    s = lambda med, q1, q3: {"median": med, "q1": q1, "q3": q3}  # noqa: E731
    assert target_verdict(s(1.03, 1.01, 1.04), 0.05) == "met"
    assert target_verdict(s(1.04, 1.02, 1.07), 0.05).startswith("met (IQR")
    assert target_verdict(s(1.08, 1.06, 1.10), 0.05) == "missed"
    assert "within noise" in target_verdict(s(1.06, 1.04, 1.10), 0.05)
    assert target_verdict(None, 0.05) == "not measured"


# ------------------------------------------------------------------------------------------- methods
@pytest.fixture(scope="module")
def bench():
    b = Bench("tiny", batch=2)
    model = b.timm()  # build first, then non-zero biases so bias handling is exercised; copies follow
    with torch.no_grad():
        g = torch.Generator().manual_seed(5)
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    yield b
    b.close()


def _run(bench, name):
    return _step(METHODS[name].build(bench), bench.images)


def _step(runner, images):
    """One timed step of a runner, hooks removed afterwards; returns (runner, what it recorded)."""
    runner.attach()
    try:
        with torch.no_grad():
            runner.step(images)
            runner.end_rep()
    finally:
        runner.detach()
    return runner, runner.inspect()


def _no_hooks(model):
    return all(not (m._forward_hooks or m._forward_pre_hooks) for m in model.modules())


def test_each_method_produces_what_it_claims_and_leaves_no_hooks(bench):
    b, h, n, layers = 2, 4, 17, 2
    tokens = bench.query_tokens
    assert tokens.tolist() == [[0, 1 + 2 * 4 + 2]] * 2  # CLS and the centre patch of the 4 x 4 grid
    out = {}
    runners = {}
    for name in METHODS:
        runners[name], out[name] = _run(bench, name)
        assert _no_hooks(bench.timm()), name  # interleaved methods must not see each other's hooks
    try:
        assert tuple(out["plain"]["output"].shape) == (b, 1000)
        cap = out["capture"]["batch"]
        assert sorted(cap.layers) == [0, 1] and all(c.query is None and not c.attention for c in cap.layers.values())
        for name, k in (("modes16", 8), ("modes_all", 8)):  # d_k = 8: top-16 keeps all 8 modes
            q = out[name]["batch"].captures[1].query
            assert tuple(q.shape) == (b, h, k, n) and out[name]["batch"].captures[1].attention == {}
        rows = out["rows2"]["batch"].captures[1].attention["rows"]
        assert tuple(rows.shape) == (b, h, 2, n) and torch.allclose(rows.sum(-1), torch.ones(b, h, 2))
        assert out["rows2"]["batch"].captures[1].query is None
        both = out["modes16_rows2"]["batch"].arrays()
        assert {"modes/L0/query", "modes/L0/key", "attention/L0/rows", "attention/query_tokens"} <= set(both)

        runners["full_hdf5"].writer.flush()
        with h5py.File(runners["full_hdf5"].path, "r", swmr=True) as f:
            assert f["images"].attrs["committed"] == b
            assert f["modes/L1/query"].shape == (b, h, 8, n)
            np.testing.assert_allclose(f["attention/L1/rows"][:], both["attention/L1/rows"].numpy(), atol=1e-3)

        copies = out["naive_hooks"]["copies"]
        assert len(copies) == layers and all(tuple(c.shape) == (b, n, 32) and c.device.type == "cpu" for c in copies)

        maps = list(out["timm_extract"]["maps"].values())  # AttentionExtract's eager maps hold our rebuilt rows
        assert len(maps) == layers and tuple(maps[1].shape) == (b, h, n, n)
        idx = tokens[:, None, :, None].expand(b, h, 2, n)
        assert torch.allclose(maps[1].gather(2, idx), rows, atol=1e-5)
        full = out["full_maps"]["batch"].captures[1].attention["full"]  # the library's full maps are the same maps
        assert torch.allclose(full.float(), maps[1], atol=1e-5)
        once = out["full_maps_eager"]["batch"].captures[1].attention["full"]  # attention computed once, same maps
        assert torch.allclose(once, maps[1], atol=1e-5)

        assert out["hf_sdpa"]["attentions"] is None
        att = out["hf_eager_attn"]["attentions"]
        assert len(att) == layers and tuple(att[0].shape) == (b, h, n, n)

        site = bench.sites()[1]  # rows2 took the library's folded path (no keys), and the eager maps above, which
        assert site.num_heads * 2 < site.dim  # the model computed from its own keys, hold the same rows
        # the prototypes of patches A and B are in the library now: the harness times only real methods
        assert {m.kind for m in METHODS.values()} == {"qkhooks", "baseline", "peer"}
        assert not any(name.startswith("proto") for name in METHODS) and not hasattr(M, "rows_folded")
    finally:
        for r in runners.values():
            r.close()
    assert not any(bench.workdir.glob("*.h5"))  # closing a runner removes its run file


def test_time_methods_keeps_one_sample_per_round_and_pairs_ratios(bench):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: process CPU time is the primary metric
    try:
        res = time_methods(bench, ["plain", "capture", "rows2"], rounds=2, warmup=1)
    finally:
        torch.set_num_threads(threads)
    assert res["order_first_rounds"] == [m for r, m in interleaved_schedule(["plain", "capture", "rows2"], 2, 1) if r >= 0]
    for name, m in res["methods"].items():
        assert len(m["wall_s"]) == len(m["cpu_s"]) == 2 and m["images_per_s"]["n"] == m["cpu_ms_per_batch"]["n"] == 2
    assert res["metric"] == "cpu"  # process CPU time is the primary metric on the CPU
    assert res["methods"]["plain"]["ratio_to_plain"]["median"] == 1.0
    assert res["methods"]["rows2"]["ratio_to_plain"] == summarize(
        paired_ratios(res["methods"]["rows2"]["cpu_s"], res["methods"]["plain"]["cpu_s"]))


def _rows_with_keys(site, x, tokens):
    """The reference: rows from every token's key (the library's path before patch A)."""
    x_q = torch.gather(x, 1, tokens[..., None].expand(-1, -1, x.shape[-1]))
    return torch.softmax(_logits(site, x_q, x).float(), dim=-1)


def test_library_rows_equal_the_rows_computed_from_the_keys_on_every_family(tiny):
    model = tiny.model()
    sites = qkhooks.sites(model)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, sites[0].grid[0] * sites[0].grid[1] + tiny.prefix, sites[0].dim, generator=g)
    few = torch.tensor([[0, 3], [1, 2]])
    many = torch.arange(x.shape[1])[None].expand(2, -1)  # H·T >= d: the library computes the keys
    for site in sites:
        assert site.num_heads * few.shape[1] < site.dim <= site.num_heads * many.shape[1]  # both paths exercised
        with torch.no_grad():
            for tokens in (few, many):
                ref = _rows_with_keys(site, x, tokens)
                got = attention_rows(site, x, tokens)
                assert got.shape == ref.shape and torch.allclose(got, ref, atol=1e-6), (site.layer, tokens.shape)


def test_projection_bench_compares_library_rows_with_the_keys_reference(bench):
    res = projection_bench(bench, rounds=1)
    assert res["library_rows_path"] == "folded"
    assert set(res["rows"]) == {"library", "keys", "from_k"}
    assert res["rows"]["keys"]["max_abs_diff_vs_keys"] == 0.0
    for name in ("library", "from_k"):
        assert res["rows"][name]["max_abs_diff_vs_keys"] < 1e-5, name
        assert res["rows"][name]["ms"]["n"] == 1 and res["rows"][name]["speedup_vs_keys"] > 0
    for v in res["paths"].values():
        assert v["max_rel_diff"] < 1e-4


# ------------------------------------------------------------------------------------------- memory
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc is Linux only")
def test_peak_rss_reset_and_growth():
    assert rss_mb() > 0
    assert reset_peak_rss()
    assert peak_rss_mb() - rss_mb() < 8  # the high-water mark restarts at the current RSS
    base = rss_mb()
    block = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
    assert peak_rss_mb() - base > 48
    del block


# ------------------------------------------------------------------------------------------- results
def _s(med):
    return {"median": med, "q1": med * 0.99, "q3": med * 1.01, "iqr": med * 0.02, "min": med, "max": med, "mean": med, "n": 3}


def _entry(section, data, model="vit_s", **extra):
    return {"section": section, "model": model, "device": "cpu", "command": "qkhooks bench --models vit_s",
            "when": "2026-01-01T00:00:00", "machine": {"cpu": "Test CPU", "cores": 2, "torch_threads": 2, "gpu": None},
            "load_before": [1.0, 1.0, 1.0], "load_after": [1.5, 1.0, 1.0], "data": data, **extra}


def test_results_files_merge_and_render(tmp_path):
    plain_cpu = [0.10, 0.12, 0.11]  # per round; each method's rounds are its ratio times these, give or take 1 %
    methods = {name: {"label": METHODS[name].label, "kind": "x", "family": "timm", "wall_s": [0.1] * 3,
                      "cpu_s": [t * ratio * f for t, f in zip(plain_cpu, (0.99, 1.0, 1.01))], "images_per_s": _s(80.0),
                      "ms_per_batch": _s(100.0), "cpu_ms_per_batch": _s(90.0), "ratio_to_plain": _s(ratio),
                      "ratio_to_plain_wall": _s(1.5)}
               for name, ratio in (("plain", 1.0), ("capture", 1.005), ("rows2", 1.12), ("full_hdf5", 1.08))}
    methods["plain"]["cpu_s"] = plain_cpu
    methods["timm_extract"] = {**methods["rows2"], "reference": "timm_eager", "ratio_to_reference": _s(1.2)}
    params = {"batch": 8, "rounds": 3, "warmup": 1, "batches_per_rep": 2}
    entries = {
        "methods/vit_s/cpu": _entry("methods", {"metric": "cpu", "methods": methods}, params=params),
        "memory/vit_s/cpu": _entry("memory", {"steps": 2, "methods": {"plain": {
            "glibc default": {"rss_peak_delta_mb": 12.5}, "fixed mmap threshold": {"rss_peak_delta_mb": 7.0}}}}),
        "dataset_memory/vit_s/cpu": _entry("dataset_memory", {"base_images": 4, "batch": 2, "variants": {"glibc default": {
            "1": {"images": 4, "rss_peak_delta_mb": 20.0, "rss_peak_mb": 700.0, "file_mb": 1.0, "seconds": 3.0},
            "10": {"images": 40, "rss_peak_delta_mb": 61.0, "rss_peak_mb": 741.0, "file_mb": 9.0, "seconds": 9.0,
                   "rss_slope_mb_per_100_images": 0.01, "rss_second_half_range_mb": [690.0, 741.0]}}}}),
    }
    md, js = tmp_path / "RESULTS.md", tmp_path / "results.json"
    save_results(entries, md, js, merge=False)
    text = md.read_text()
    assert "Test CPU" in text and "**2 intra-op thread(s), set explicitly**" in text
    assert "pending: no GPU lent" in text and "`qkhooks bench --models vit_s`" in text
    assert "| `rows2` |" in text and "| **+12.0% [+10.9, +13.1]** | +50.0% [+48.5, +51.5] |" in text
    assert "overhead vs plain (process CPU time)" in text
    # targets: read from the rounds the entry keeps, with the median's interval (3 rounds: 75 %, said so)
    assert ("| rows for 2 query tokens, every layer | `rows2` | <= 5% | +12.0% [+11.4, +12.6] | missed (75 % CI of the "
            "median [+10.9, +13.1], all 3 rounds: too few for 95 %) |") in text
    assert ("| capture alone | `capture` | <= 2% | +0.5% [-0.0, +1.0] | met (75 % CI of the median [-0.5, +1.5], all 3 "
            "rounds: too few for 95 %) |") in text
    assert "full recording (top-16 modes, rows, HDF5) | `full_hdf5` | <= 10% |" in text  # the CPU's limit, not the GPU's
    assert "| `full_hdf5` | <= 5% |" not in text
    assert "+20.0% [+18.8, +21.2] vs timm_eager" in text and "| 12 | 7 |" in text  # reference ratio, peaks
    assert "| glibc default | 10x | 40 | 61.0 | 741 | 690-741 | 0.01 | 9 | 9 |" in text
    assert "Peaks: glibc default: peak at 10x the images +41.0 MB from 1x (higher)." in text

    svd = {"heads": 6, "dim": 384, "head_dim": 64, "layers": 12, "factored_ms_per_layer": _s(2.0),
           "dense_ms_per_layer": _s(200.0), "speedup": 100.0, "max_rel_sigma_diff": 1e-12,
           "spectrum_whole_model_s": 0.05, "dense_whole_model_s_estimate": 2.4}
    save_results({"svd/vit_s/cpu": _entry("svd", svd)}, md, js)  # merges with what is there
    data = json.loads(js.read_text())
    assert set(data["entries"]) == set(entries) | {"svd/vit_s/cpu"}
    assert "**100x**" in md.read_text() and "| `rows2` |" in md.read_text()
    save_results({"svd/vit_s/cpu": _entry("svd", svd)}, md, js, merge=False)  # --fresh starts over
    assert set(json.loads(js.read_text())["entries"]) == {"svd/vit_s/cpu"}


def test_bench_command_is_registered_and_runs_the_cheap_sections(tmp_path, capsys):
    from qkhooks.cli import main

    assert main(["bench", "--models", "nope"]) == 2
    assert "unknown size, section or method 'nope'" in capsys.readouterr().err
    md, js = tmp_path / "R.md", tmp_path / "r.json"
    rc = bench_main(["--models", "tiny", "--sections", "svd", "--out", str(md), "--json", str(js), "--fresh",
                 "--notes", str(tmp_path / "none.md")])
    assert rc == 0
    data = json.loads(js.read_text())
    (entry,) = [e for e in data["entries"].values() if e["section"] == "svd" and e["model"] == "tiny"]
    assert entry["data"]["max_rel_sigma_diff"] < 1e-10
    assert entry["machine"]["torch_threads"] == 2 and entry["command"].startswith("python benchmarks/run.py")
    assert "Factored vs dense SVD" in md.read_text()


def test_switch_interval_is_set_for_the_run_kept_beside_the_default_and_restored(tmp_path, monkeypatch):
    """``--switch-interval``: the sections run with the interpreter's switch interval set (seen from inside a
    section), their entries sit beside the default interval's under their own key, saying the interval, and the
    interval is restored when the run ends."""
    import harness.driver as driver

    seen = []
    real = driver.svd_bench
    monkeypatch.setattr(driver, "svd_bench", lambda bench: (seen.append(sys.getswitchinterval()), real(bench))[1])
    before = sys.getswitchinterval()
    md, js = tmp_path / "R.md", tmp_path / "r.json"
    common = ["--models", "tiny", "--sections", "svd", "--out", str(md), "--json", str(js), "--notes", str(tmp_path / "n")]
    assert bench_main([*common, "--fresh"]) == 0
    assert bench_main([*common, "--switch-interval", "0.0007"]) == 0
    assert seen == [before, 0.0007] and sys.getswitchinterval() == before
    entries = json.loads(js.read_text())["entries"]
    assert set(entries) == {"svd/tiny/cpu/t2", "svd/tiny/cpu/t2/switch0.0007"}
    assert entries["svd/tiny/cpu/t2/switch0.0007"]["params"]["switch_interval"] == 0.0007
    assert "switch_interval" not in entries["svd/tiny/cpu/t2"]["params"]


def test_writer_bench_times_the_caller_and_the_thread_per_codec(bench):
    res = writer_bench(bench, ["none", "lzf@batch", "none+checksum"], rounds=1, batches=2)
    assert set(res["codecs"]) == {"none", "lzf@batch", "none+checksum"}
    for c, v in res["codecs"].items():
        assert v["blocked_ms_per_batch"]["n"] == 2 and v["writer_thread_cpu_ms_per_batch"]["n"] == 2, c
        assert v["mb_per_batch"] > 0 and v["file_ratio"] > 0 and v["file_mb_per_batch"] > 0
        assert v["images"] == 2 * 2 * bench.batch  # warm-up round + 1 round, 2 batches each
    assert not any(bench.workdir.glob("*.h5"))
    for bad in ("lzf@nope", "none+crc"):
        with pytest.raises(ValueError, match="unknown writer layout"):
            writer_bench(bench, [bad], rounds=1, batches=1)


def test_writer_bench_checksum_suffix_gives_the_arrays_fletcher32(bench):
    """``CODEC+checksum`` measures the same layout with the Fletcher-32 filter (--checksum), and only that."""
    for spec, want in (("none", False), ("none+checksum", True)):
        codec, plus, _ = spec.partition("+")
        runner = RecordRunner(bench, {"modes": 16, **ROWS}, writer=True, name=f"sum-{codec}-{bool(plus)}", checksum=bool(plus))
        _step(runner, bench.images)
        runner.writer.flush()
        with h5py.File(runner.path, "r", swmr=True) as f:
            found = {bool(ds.fletcher32) for ds in per_image_datasets(f).values()}
        runner.close()
        assert found == {want}, spec


def test_chunks_of_1mib_restore_the_chunking_of_before_patch_c(bench):
    def chunks(compression, chunking):
        runner = RecordRunner(bench, {"modes": 16, **ROWS}, writer=True, name=f"chunks-{compression}-{chunking}",
                                compression=compression)
        if chunking == "1mib":
            _chunks_of_1mib(runner.writer)
        _step(runner, bench.images)
        with h5py.File(runner.path, "r", swmr=True) as f:
            datasets = per_image_datasets(f).values()
            out = {ds.name: ds.chunks[0] for ds in datasets}
            per = {ds.name: int(np.prod(ds.shape[1:])) * ds.dtype.itemsize for ds in datasets}
        assert runner.writer.chunk_images is None  # the 1 MiB override is undone after each dataset
        runner.close()
        return out, per

    default, _ = chunks("lzf", "")
    assert set(default.values()) == {1}  # round 21: one image a chunk when compressed (patch C: one batch)
    legacy, per = chunks("lzf", "1mib")
    assert legacy == {name: min(64, max(1, (1 << 20) // per[name])) for name in legacy}


def test_end_to_end_section_renders_the_record_to_plain_ratio(tmp_path):
    data = {"images": 240, "batch": 16, "rounds": 2, "plain": {"wall_s": _s(8.0), "cpu_s": _s(7.0)},
            "record": {"wall_s": _s(8.6), "cpu_s": _s(7.7)}, "ratio_wall": _s(1.075), "ratio_cpu": _s(1.1),
            "parts_ms_per_batch": {"plain_forward": 480.0, "topk_modes": 11.0}}
    md, js = tmp_path / "RESULTS.md", tmp_path / "results.json"
    gpu = dict(_entry("end_to_end", {**data, "workers": 4, "ratio_wall": _s(1.03)}, model="vit_ti"), device="cuda")
    save_results({"end_to_end/vit_ti/cpu/t1": _entry("end_to_end", data, model="vit_ti"),
                  "end_to_end/vit_ti/cuda/t1": gpu}, md, js, merge=False)
    text = md.read_text()
    assert "## End to end: `qkhooks record` over a folder vs a plain loop" in text
    cpu_row = next(line for line in text.splitlines() if "| cpu | 2 | 240 | 0 |" in line)
    cuda_row = next(line for line in text.splitlines() if "| cuda | 2 | 240 | 4 |" in line)
    assert cpu_row.startswith("| ViT-Ti/16 (timm vit_tiny_patch16_224, random init) |")
    # the primary metric is bold: process CPU time on the CPU, wall time beside a GPU
    assert "**1.100 [1.089, 1.111]**" in cpu_row and "**1.075 [1.064, 1.086]**" not in cpu_row
    assert "**1.030 [" in cuda_row and "**1.100" not in cuda_row
    assert "plain_forward 480.0, topk_modes 11.0" in cpu_row


def test_per_batch_record_runner_builds_the_recording_each_step_and_matches_the_given_spectrum_path():
    bench = Bench("tiny", 2)
    per_batch, given = METHODS["modes16_per_batch"].build(bench), METHODS["modes16"].build(bench)
    with torch.no_grad():
        per_batch.step(bench.images)
        given.attach()
        given.step(bench.images)
        given.detach()
    a, b = per_batch.inspect()["batch"], given.inspect()["batch"]
    assert a is not None and b is not None and a is not b
    for layer in b.layers:
        torch.testing.assert_close(a.captures[layer].query, b.captures[layer].query, rtol=0, atol=0)
    bench.close()


def test_per_batch_record_runner_holds_no_earlier_batch_while_the_model_runs():
    """README's loop rebinds ``run`` before the model is called, dropping the previous batch: the runner must too, or
    every timed forward carries the previous batch's maps (a heap the plain forward does not have; round 46)."""
    bench = Bench("tiny", 2)
    per_batch = METHODS["modes16_per_batch"].build(bench)
    held: list[object] = []
    handle = per_batch.model.register_forward_pre_hook(lambda module, args: held.append(per_batch.inspect()["batch"]))
    try:
        with torch.no_grad():
            per_batch.step(bench.images)
            first = per_batch.inspect()["batch"]
            per_batch.step(bench.images)
    finally:
        handle.remove()
    assert first is not None and held == [None, None]
    assert per_batch.inspect()["batch"] is not None and per_batch.inspect()["batch"] is not first
    bench.close()


# ------------------------------------------------------------------------------------------- where the harness lives
def test_the_installed_package_holds_no_benchmark_harness():
    from setuptools.config.setupcfg import read_configuration

    packages = read_configuration(str(ROOT / "setup.cfg"))["options"]["packages"]  # what a wheel would contain
    assert "qkhooks" in packages and not any(p.split(".")[0] == "benchmarks" or "harness" in p for p in packages)
    files = [f for p in packages for f in (ROOT / p.replace(".", "/")).glob("*.py")]
    assert [f.relative_to(ROOT).as_posix() for f in files if "bench" in f.stem] == ["qkhooks/cli/bench.py"]
    harness_names = ("def time_methods(", "def render_markdown(", "def interleaved_schedule(", "class Bench:", "def machine_info(")
    assert not [f for f in files if any(name in f.read_text() for name in harness_names)]


def test_qkhooks_bench_without_the_repository_says_how_to_run_the_harness(tmp_path):
    shutil.copytree(Path(qkhooks.__file__).parent, tmp_path / "qkhooks", ignore=shutil.ignore_patterns("__pycache__"))
    code = ("import sys, qkhooks; assert qkhooks.__file__.startswith(sys.argv[1]), qkhooks.__file__; "
            "from qkhooks.cli import main; sys.exit(main(sys.argv[2:]))")
    for args in (["bench", "--models", "vit_s", "--sections", "svd"], ["bench"]):
        proc = subprocess.run([sys.executable, "-c", code, str(tmp_path), *args], capture_output=True, text=True,
                              cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path)}, timeout=300)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "qkhooks: error: the benchmark harness is not part of the installed qkhooks package" in proc.stderr
        assert "python benchmarks/run.py" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "benchmarks").exists()


def test_the_harness_options_import_no_torch():
    """``qkhooks bench`` builds the harness's options with every parser: they must not pull torch in."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import argparse, harness.options as o; "
            "o.add_arguments(argparse.ArgumentParser()); print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))")
    proc = subprocess.run([sys.executable, "-c", code, str(ROOT / "benchmarks")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stderr[-2000:]


def test_run_py_renders_results_md_from_the_json_like_the_harness(tmp_path):
    svd = {"heads": 6, "dim": 384, "head_dim": 64, "layers": 12, "factored_ms_per_layer": _s(2.0),
           "dense_ms_per_layer": _s(200.0), "speedup": 100.0, "max_rel_sigma_diff": 1e-12,
           "spectrum_whole_model_s": 0.05, "dense_whole_model_s_estimate": 2.4}
    md, js, notes = tmp_path / "RESULTS.md", tmp_path / "results.json", tmp_path / "notes.md"
    data = save_results({"svd/vit_s/cpu": _entry("svd", svd)}, md, js, merge=False)
    notes.write_text("Hand-written reading.\n")
    md.unlink()
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--render-only", "--json", str(js),
                           "--out", str(md), "--notes", str(notes)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    from harness.render import render_markdown

    assert md.read_text() == render_markdown({**data, "notes": "Hand-written reading.\n"})
    assert "Hand-written reading." in md.read_text() and "**100x**" in md.read_text()
