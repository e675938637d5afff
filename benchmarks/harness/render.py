"""The results files: merge entries into ``results.json`` and render ``RESULTS.md`` from it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Sequence

from harness.machine import MALLOC_VARIANTS
from harness.end_to_end import END_TO_END_LIMIT
from harness.methods import METHODS, TARGETS, ratio_samples
from harness.stats import paired_ratios, summarize
from harness.sizes import SIZES


def _threads(entry: dict[str, Any]) -> Any:
    return entry.get("machine", {}).get("torch_threads")


def _label(model: str) -> str:
    return SIZES[model].label if model in SIZES else model


def _switched(entry: dict[str, Any]) -> str:
    """", switch interval 0.5 ms" for an entry measured with ``--switch-interval``, ", heap kept" for one measured
    with ``--heap kept``; each kept beside the default's."""
    params = entry.get("params", {})
    interval = params.get("switch_interval")
    return ("" if interval is None else f", switch interval {interval * 1e3:g} ms") + (", heap kept" if "heap" in params else "")


def _run_date(entry: dict[str, Any]) -> str:
    """", run 2026-12-05 14:51 UTC": when the entry was measured, so two runs of one configuration kept side by side (an
    older one under its dated key) are told apart by their headings (review r34: two identical headings)."""
    when = str(entry.get("when", ""))[:16].replace("T", " ")
    return f", run {when} UTC" if when else ""


def fmt(value: Any, digits: int = 2) -> str:
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
    """met / missed / unresolved, read from the median's confidence interval (``stats.median_interval``): met when
    all of it lies at or under the limit, missed when all of it lies above, unresolved when it straddles the limit
    (more rounds or a quieter machine would place it). A summary without an interval (an end-to-end entry written
    before round 28, which kept no samples): the median's side, with a word where the interquartile range straddles."""
    if not ratio:
        return "not measured"
    if "ci_low" not in ratio:
        med, q1, q3 = ratio["median"] - 1, ratio["q1"] - 1, ratio["q3"] - 1
        if med <= limit:
            return "met" + (" (IQR reaches past the limit)" if q3 > limit else "")
        return "missed" + (" (within noise: IQR reaches below the limit)" if q1 <= limit else "")
    low, high = ratio["ci_low"] - 1, ratio["ci_high"] - 1
    interval = f"{100 * ratio['ci_coverage']:.0f} % CI of the median [{100 * low:+.1f}, {100 * high:+.1f}]"
    if ratio["ci_coverage"] < 0.95:
        interval += f", all {ratio['n']} rounds: too few for 95 %"
    if high <= limit:
        return f"met ({interval})"
    if low > limit:
        return f"missed ({interval})"
    return f"unresolved: the {interval} straddles the limit"


BRACKETED = (", each between two plain forwards (`--bracket`), its ratio to their mean: the plain row's figures are "
             "all its forwards")


def paired_summary(methods: dict[str, Any], name: str, versus: str, metric: str) -> dict[str, float] | None:
    """``name``'s time over ``versus``'s, paired by round, summarised afresh from the samples the entry keeps (so
    older entries get the median's interval too; bracketed, each over the plain forwards around it); None where
    either was not measured."""
    key = "cpu_s" if metric == "cpu" else "wall_s"
    if name not in methods or versus not in methods:
        return None
    times = {n: methods[n][key] for n in (name, versus)}
    if f"plain_bracket_{key}" in methods[name]:  # bracketed: each over the plain forwards around it
        around = {n: methods[n][f"plain_bracket_{key}"] for n in (name, versus) if f"plain_bracket_{key}" in methods[n]}
        return summarize(ratio_samples(times, around, name, versus))
    return summarize(ratio_samples(times, None, name, versus)) if len(times[name]) == len(times[versus]) else None


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
                    "Generated by `python benchmarks/run.py` (the code: `benchmarks/harness/`) from "
                    "`benchmarks/results.json` (machine-readable, every sample kept). "
                    "Do not edit by hand: re-run a command below and this file is re-rendered from the merged JSON.", ""]
    machines: dict[str, set[str]] = {}  # machine -> the sections measured on it (the machine can change between runs)
    machine_threads: dict[str, set[str]] = {}  # machine -> the thread counts its runs set
    for e in entries.values():
        m = json.dumps({k: v for k, v in e.get("machine", {}).items() if k != "torch_threads"}, sort_keys=True)
        machines.setdefault(m, set()).add(f"{e['section']}/{e['model']}")
        machine_threads.setdefault(m, set()).add(str(_threads(e)))
    L += ["## Machine", ""]
    for key, sections in sorted(machines.items()):
        m = json.loads(key)
        if m:
            L.append(f"- CPU: {m.get('cpu')} ({m.get('cores')} cores, {m.get('memory_gib')} GiB); torch {m.get('torch')} "
                     f"with **{' or '.join(sorted(machine_threads[key]))} intra-op thread(s), set explicitly** per run "
                     "(each table says which), "
                     f"{m.get('torch_interop_threads')} inter-op; timm {m.get('timm')}, transformers {m.get('transformers')}, "
                     f"h5py {m.get('h5py')} (HDF5 {m.get('hdf5')}), numpy {m.get('numpy')}, Python {m.get('python')}; "
                     f"GPU: {m.get('gpu') or 'none'}." + (f" Measured here: {', '.join(sorted(sections))}."
                                                            if len(machines) > 1 else ""))
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
          "Overheads are paired per round: time of the method / time of the plain forward in the same round (in a "
          "bracketed table, the mean of the two plain forwards just before and after it), minus 1; that pairing is what "
          "removes the machine's drift (the plain forward alone spreads as much in CPU time as in wall time on this VM). "
          "On the CPU with one torch thread the primary metric is the **process CPU time** (`time.process_time`: every "
          "thread of the process, the HDF5 writer thread included), which leaves out the time other jobs on the shared "
          "machine take from it (load averages are listed per section). Wall-time ratios are shown beside it; with CUDA, "
          "wall time is primary. A median's confidence interval is distribution-free (order statistics); its exact "
          "coverage, at least 95 %, is given with it (95.1-98.7 % for 12 to 30 rounds). "
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
        L += [f"## Methods: {_label(e['model'])}, {e['device']}, batch {p['batch']}, {_threads(e)} torch thread(s){_switched(e)}"
              f"{_run_date(e)}", "",
              f"{p['rounds']} rounds after {p['warmup']} warm-up, {p['batches_per_rep']} forward(s) per repetition"
              f"{BRACKETED if p.get('bracket') else ''}; "
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
            peaks_cells = [fmt(pk.get(v, {}).get("rss_peak_delta_mb"), 0) for v in MALLOC_VARIANTS]
            gpu = next((r["cuda_peak_delta_mb"] for r in pk.values() if r.get("cuda_peak_delta_mb") is not None), None)
            if gpu is not None:
                peaks_cells[0] += f" (GPU {fmt(gpu, 0)})"
            rows.append([f"`{name}`", m["label"], _med_iqr(m["images_per_s"], 2), _med_iqr(m.get("cpu_ms_per_batch"), 0),
                         _med_iqr(m.get("minor_faults_per_batch"), 0),
                         f"**{_overhead(m.get('ratio_to_plain'))}**",
                         _overhead(m.get("ratio_to_plain_wall" if metric == "cpu" else "ratio_to_plain_cpu")), ref,
                         *peaks_cells])
        primary = "process CPU time" if metric == "cpu" else "wall time"
        secondary = "wall" if metric == "cpu" else "process CPU time; OpenMP spinning included"
        L += _table(["method", "what", "images/s (wall)", "CPU ms/batch", "minor page faults/batch", f"overhead vs plain ({primary})",
                     f"overhead vs plain ({secondary})", f"vs own-family reference ({primary})",
                     *[f"peak RSS over set-up, MB ({v})" for v in MALLOC_VARIANTS]], rows)
        L += ["", "Peak memory: one fresh subprocess per method, RSS high-water mark (VmHWM, reset after set-up via "
              "`/proc/self/clear_refs`) minus RSS after set-up (model built, hooks attached), over "
              f"{memory.get('steps')} forwards of the same batch; with glibc's default malloc and with a fixed mmap "
              "threshold (`MALLOC_MMAP_THRESHOLD_=131072`, which returns every large block on free, so the peak is the "
              "memory really live rather than allocator slack)." if mem else "Peak memory: not measured.", ""]
        L += [f"### Targets ({_label(e['model'])}, {e['device']}, {_threads(e)} thread(s){_switched(e)}{_run_date(e)})", ""]
        trows = []
        for t in TARGETS:
            if t.device in (None, e["device"]):
                ratio = paired_summary(d["methods"], t.method, t.versus, metric)
                versus = "" if t.versus == "plain" else f" of `{t.versus}`'s"
                trows.append([t.what, f"`{t.method}`", f"<= {100 * t.limit:.0f}%{versus}", _overhead(ratio),
                              target_verdict(ratio, t.limit)])
        anchors = (("timm_extract", "anchor: timm AttentionExtract"), ("hf_eager_attn", "anchor: HF eager output_attentions"))
        for name, what in anchors:
            m = d["methods"].get(name)
            if m:
                versus = (f"{_overhead(m['ratio_to_reference'])} vs {m['reference']}" if m.get("ratio_to_reference")
                          else f"its reference (`{METHODS[name].reference}`) not measured")
                trows.append([what, f"`{name}`", "(~15-20% published)", _overhead(m.get("ratio_to_plain")), versus])
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
                 _overhead(v["wall_ratio_to_no_writer"]), f"{v['mb_per_batch']:.1f}", fmt(v.get("file_mb_per_batch"), 1),
                 fmt(v["file_ratio"], 2)]
                for c, v in d["codecs"].items()]
        L += ["Chunking: `CODEC` = the writer's default when measured (~1 MiB chunks uncompressed; when compressed or "
              "checksummed one chunk per batch from patch C, one image per chunk from round 21); `CODEC@batch` = `chunk_images` of one batch, given explicitly; `CODEC@1mib` = the ~1 MiB "
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
                rows.append([variant, f"{factor}x", r["images"], fmt(r.get("rss_peak_delta_mb"), 1),
                             fmt(r.get("rss_peak_mb"), 0), f"{rng[0]:.0f}-{rng[1]:.0f}" if rng else "n/a",
                             fmt(r.get("rss_slope_mb_per_100_images"), 2), f"{r['file_mb']:.0f}", f"{r['seconds']:.0f}"])
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
              "hooks), interleaved in one process, model loading excluded. Ratios paired per round (bracketed entries, since "
              "round 28: each recording over the mean of the plain loops just before and after it). Parts: main-thread "
              "CPU ms per batch of one recorded batch (random images), and the writer thread's CPU.", ""]
        rows = []
        for key, e in e2e:
            d = e["data"]
            parts = d.get("parts_ms_per_batch", {})
            cpu_ratio, wall_ratio = _med_iqr(d["ratio_cpu"], 3), _med_iqr(d["ratio_wall"], 3)
            if e["device"] == "cpu":  # the primary metric in bold: process CPU on the CPU, wall time beside a GPU
                cpu_ratio = f"**{cpu_ratio}**"
            else:
                wall_ratio = f"**{wall_ratio}**"
            primary = d["ratio_cpu"] if e["device"] == "cpu" else d["ratio_wall"]
            rows.append([_label(e["model"]) + _switched(e), e["device"], _threads(e), d["images"], d.get("workers", 0),
                         _med_iqr(d["plain"]["cpu_s"], 2), _med_iqr(d["record"]["cpu_s"], 2), cpu_ratio,
                         _med_iqr(d["plain"]["wall_s"], 2), _med_iqr(d["record"]["wall_s"], 2), wall_ratio,
                         target_verdict(primary, END_TO_END_LIMIT), f"{e.get('load_before')}",
                         ", ".join(f"{k} {v:.1f}" for k, v in parts.items())])
        L += _table(["model", "device", "threads", "images", "loader workers", "plain CPU s", "record CPU s",
                     "record/plain (CPU)", "plain wall s", "record wall s", "record/plain (wall)",
                     f"<= {1 + END_TO_END_LIMIT:.2f}x (bold ratio)", "load before", "parts, ms per batch"], rows)
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
