"""``qkhooks bench``: a thin entry to the benchmark harness, which lives in the source repository
(``benchmarks/harness/``, run as ``python benchmarks/run.py``), not in the installed package."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Sequence

from qkhooks.cli import command
from qkhooks.errors import QKHooksError

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
"""Where the harness is when qkhooks runs from a checkout (or an editable install of one)."""

NO_HARNESS = ("the benchmark harness is not part of the installed qkhooks package: it lives in benchmarks/ of the "
              "qkhooks source repository. Clone the repository and run `python benchmarks/run.py --help` there "
              "(or `qkhooks bench` with qkhooks installed from that checkout: pip install -e .).")


def harness_available() -> bool:
    return (BENCHMARKS / "harness" / "driver.py").is_file()


def _harness(module: str) -> ModuleType:
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    return importlib.import_module(f"harness.{module}")


class _AnyArguments(argparse.ArgumentParser):
    """Without the harness its options are unknown: take whatever follows ``bench``, so that the command can say
    what is missing instead of argparse rejecting the first option."""

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> tuple[Any, list[str]]:
        namespace, _ = super().parse_known_args([], namespace)
        namespace.options = list(args or [])
        return namespace, []


def _args(p: argparse.ArgumentParser) -> None:
    if harness_available():
        _harness("options").add_arguments(p)
    else:
        p.__class__ = _AnyArguments


@command("bench", "benchmark capture, projection, attention rows and HDF5 streaming against plain forwards and peers "
                  "(from a source checkout: runs benchmarks/run.py)")(_args)
def run_bench(args: argparse.Namespace) -> int:
    if not harness_available():
        raise QKHooksError(NO_HARNESS)
    return _harness("driver").run(args)
