"""The ``qkhooks`` command. Each subcommand is a thin layer over the public Python API.

Errors the user can fix (:class:`QKHooksError`) print one clear line and exit with status 2, no traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from qkhooks.errors import QKHooksError, writable_dir

COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int], str]] = {}


def command(name: str, help: str):
    """Register ``add_arguments`` + ``run`` for a subcommand; ``"analyze modes"`` nests under ``analyze``.

    Usage (from any module listed in ``COMMAND_MODULES``)::

        def _args(p): p.add_argument("run")
        @command("analyze modes", "top-k images per mode")(_args)
        def run_modes(args): ...; return 0
    """

    def wrap(add_arguments):
        def register(run):
            COMMANDS[name] = (add_arguments, run, help)
            return run

        return register

    return wrap


def add_model_arguments(p: argparse.ArgumentParser, default: str | None = None) -> None:
    """The model spec (positional, or ``--model`` with a default) and how to load it."""
    if default is None:
        p.add_argument("model", help="timm:NAME, hf:ID_OR_DIR or offline:dinov2-s14")
    else:
        p.add_argument("--model", default=default, help=f"timm:NAME, hf:ID_OR_DIR or offline:dinov2-s14 (default {default})")
    p.add_argument("--random-init", action="store_true", help="build the architecture without pretrained weights")
    p.add_argument("--checkpoint", help="local weights for a timm:NAME architecture (safetensors or .pth)")


def load_from_args(args: argparse.Namespace, device: str = "cpu"):
    from qkhooks.models.load import load_model

    return load_model(args.model, random_init=args.random_init, checkpoint=args.checkpoint, device=device)


@contextlib.contextmanager
def sigterm_exits() -> Iterator[None]:
    """Turn SIGTERM into ``SystemExit`` while recording, so a scheduler's preemption (or torchrun stopping
    the other ranks when one dies) closes the run file cleanly, resumable, instead of killing it mid-write."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def jsonable(value: Any, digits: int | None = None) -> Any:
    """NaN/inf -> None, numpy scalars -> Python, recursively (optionally rounded), so the output is strict JSON."""
    if isinstance(value, dict):
        return {str(k): jsonable(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v, digits) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (np.floating, float)):
        if not math.isfinite(float(value)):
            return None
        return float(value) if digits is None else round(float(value), digits)
    if isinstance(value, np.integer):
        return int(value)
    return value


def write_json(path: str | Path, payload: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1))


# -------------------------------------------------------------------------------------- spectrum
def _spectrum_args(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--layers", help="block indices, e.g. '0,3,5-7' (default all)")
    p.add_argument("--augmented", action="store_true", help="fold biases in through x -> [x; 1]")
    p.add_argument("--json", help="write the per-layer/per-head spectrum as JSON here")
    p.add_argument("--plot", help="write the cosine-by-layer figure here (PNG); per-head spectra go next to it")
    p.add_argument("--rope-bands", type=int, default=0, metavar="N",
                   help="RoPE models: group the rotation frequencies into N bands (highest first) and add each "
                        "band's cos/sin form cosines and energies to --json as 'rope_bands' per layer")


@command("spectrum", "singular modes of W_q^T W_k per head, cosines, weighted averages")(_spectrum_args)
def run_spectrum(args: argparse.Namespace) -> int:
    from qkhooks.models.base import parse_layers
    from qkhooks.spectrum import spectrum

    for target in filter(None, (args.json, args.plot)):
        writable_dir(Path(target).parent, "output folder")
    loaded = load_from_args(args)
    spec = spectrum(loaded.model, layers=parse_layers(args.layers), augmented=args.augmented, name=loaded.spec)
    print(spec.table())
    if loaded.note:
        print(f"note: {loaded.note}")
    if args.json:
        payload = spec.to_dict()
        payload["note"] = loaded.note
        payload["biases"] = "folded in ([x; 1])" if args.augmented else "excluded (bias-free bilinear form)"
        if args.rope_bands:
            from qkhooks.models import sites as find_sites
            from qkhooks.models.rope import rope_band_summary

            bands = rope_band_summary(loaded.model, find_sites(loaded.model, parse_layers(args.layers)), args.rope_bands)
            for layer in payload["layers"]:
                layer["rope_bands"] = bands[layer["layer"]]
        write_json(args.json, payload)
        print(f"wrote {args.json}")
    if args.plot:
        from qkhooks.plots import plot_cosine_by_layer, plot_head_spectra

        plot = Path(args.plot)
        plot_cosine_by_layer(spec, plot)
        spectra = plot.with_name(plot.stem + "_spectra" + plot.suffix)
        plot_head_spectra(spec, spectra)
        print(f"wrote {plot} and {spectra}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from qkhooks import __version__

    parser = argparse.ArgumentParser(prog="qkhooks", description="Query-key analysis of unmodified vision transformers.")
    parser.add_argument("--version", action="version", version=f"qkhooks {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    for name, (add_arguments, run, help) in COMMANDS.items():
        group, _, leaf = name.partition(" ")
        if leaf:
            if group not in groups:
                gp = sub.add_parser(group, help=f"{group} subcommands", description=f"{group} subcommands")
                groups[group] = gp.add_subparsers(dest=f"{group}_command", required=True)
            p = groups[group].add_parser(leaf, help=help, description=help)
        else:
            p = sub.add_parser(name, help=help, description=help)
        add_arguments(p)
        p.set_defaults(_run=run)
    return parser


# Modules that register subcommands with @command.
COMMAND_MODULES = (
    "qkhooks.stream",
    "qkhooks.distributed",
    "qkhooks.cli.analyze",
    "qkhooks.cli.bfd",
    "qkhooks.report",
    "qkhooks.compare",
    "qkhooks.bench",
)


def _load_commands() -> None:
    """Import modules that register further subcommands."""
    import importlib

    for module in COMMAND_MODULES:
        importlib.import_module(module)


def main(argv: Sequence[str] | None = None) -> int:
    _load_commands()
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except QKHooksError as exc:
        print(f"qkhooks: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qkhooks: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
