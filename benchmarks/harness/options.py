"""The options of the benchmark harness. Imports no torch: ``qkhooks bench`` builds them with every parser."""

from __future__ import annotations

import argparse
from pathlib import Path

from harness.sizes import SIZES

BENCHMARKS = Path(__file__).resolve().parents[1]
DEFAULT_MD = BENCHMARKS / "RESULTS.md"
DEFAULT_JSON = BENCHMARKS / "results.json"
DEFAULT_NOTES = BENCHMARKS / "ANALYSIS.md"
DESCRIPTION = "benchmark capture, projection, attention rows and HDF5 streaming against plain forwards and peers"
SECTIONS = ("methods", "memory", "projection", "svd", "writer", "codecs", "dataset_memory", "end_to_end", "profile")


def round_parser(doc: str | None, *, threads: int, model: str, batch: int, rounds: int) -> argparse.ArgumentParser:
    """The options every kept round script shares (``benchmarks/round*.py``): torch threads, the timm model, the batch
    size and the interleaved rounds, with that script's defaults; the script adds its own."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=threads)
    parser.add_argument("--model", default=model)
    parser.add_argument("--batch", type=int, default=batch)
    parser.add_argument("--rounds", type=int, default=rounds)
    return parser


def count(least: int):
    """An argparse type: a whole number >= ``least`` (argparse's error names the option and the value)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < least:
            raise argparse.ArgumentTypeError(f"must be a whole number >= {least}, got {text!r}")
        return value

    parse.__name__ = f"whole number >= {least}"
    return parse


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``python benchmarks/run.py`` and ``qkhooks bench`` (no torch import: every CLI call builds them)."""
    p.add_argument("--models", default="vit_s", help=f"comma-separated sizes: {', '.join(SIZES)} (default vit_s)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, from {', '.join(SECTIONS)}")
    p.add_argument("--methods", help="comma-separated subset of the methods in benchmarks/harness/methods.py (default all; "
                        "an unknown name lists them)")
    p.add_argument("--batch", type=count(1), default=8, help="images per forward")
    p.add_argument("--rounds", type=count(1), default=12, help="timed rounds per method (interleaved)")
    p.add_argument("--warmup", type=count(0), default=2, help="warm-up rounds (not recorded)")
    p.add_argument("--batches-per-rep", type=count(1), default=2, help="forwards per timed repetition")
    p.add_argument("--bracket", action="store_true",
                   help="methods section: run the plain forward before every other method's repetition and take each "
                        "ratio to the mean of the two plain forwards around it (drift within a round cancels; about "
                        "twice the time)")
    p.add_argument("--threads", type=count(1), default=2, help="torch intra-op threads (set explicitly)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--switch-interval", type=float, default=None,
                   help="seconds between the interpreter's forced thread switches for the whole run (sys."
                        "setswitchinterval; default Python's 0.005): how long the HDF5 writer thread can wait for the "
                        "GIL while the main thread runs Python")
    p.add_argument("--heap", choices=("glibc", "kept"), default="glibc",
                   help="kept: before measuring, set glibc's mmap and trim thresholds (mallopt) so freed memory stays "
                        "in the heap for reuse, for the whole run. glibc's default trims the heap as its history "
                        "dictates, and the loop that trips it re-faults its temporaries: several points of noise between "
                        "a plain and a recorded loop (benchmarks/ANALYSIS.md, round 29). Entries kept beside the default's")
    p.add_argument("--memory-steps", type=int, default=2, help="forwards per memory subprocess")
    p.add_argument("--dataset-images", type=int, default=40, help="images of the 1x record_dataset run (10x is the other)")
    p.add_argument("--compressions", default="none,none+checksum,lzf,gzip,lzf@1mib,gzip@1mib",
                   help="codecs for the writer section: CODEC (the writer's default chunks), CODEC@batch (chunks of one "
                        "batch), CODEC@1mib (the ~1 MiB chunks of before patch C), each optionally +checksum (Fletcher-32, "
                        "--checksum)")
    p.add_argument("--e2e-images", type=int, default=240, help="JPEGs of the end_to_end section (default 240)")
    p.add_argument("--e2e-rounds", type=int, default=3, help="interleaved rounds of the end_to_end section")
    p.add_argument("--workdir", help="folder for temporary run files (default: a temporary folder)")
    p.add_argument("--out", default=str(DEFAULT_MD), help="Markdown results (re-rendered from the JSON)")
    p.add_argument("--json", default=str(DEFAULT_JSON), help="machine-readable results, merged across runs")
    p.add_argument("--fresh", action="store_true", help="start the JSON afresh instead of merging")
    p.add_argument("--notes", help="Markdown put at the top of the results (default benchmarks/ANALYSIS.md)")
    p.add_argument("--render-only", action="store_true", help="only re-render the Markdown from the JSON and the notes")
