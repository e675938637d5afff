"""The ``qkhooks`` command. Each subcommand is a thin layer over the public Python API.

The command line is built from one explicit list, :data:`COMMAND_MODULES`: each module there registers its
subcommands with :func:`command`. Only modules under ``qkhooks/cli/`` import this package; the library never does
(``tests/test_imports.py``). Command modules import the library inside their ``run`` functions, not at module
level: building the parser must not import torch, so that ``qkhooks info RUN.h5`` reads a run file where torch
is not installed, and a command whose dependency is missing says so when asked for.

Errors the user can fix (:class:`QKHooksError`) print one clear line and exit with status 2, no traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import itertools
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from qkhooks._json import jsonable, write_json
from qkhooks._version import __version__
from qkhooks.errors import QKHooksError

__all__ = ["main", "build_parser", "command", "COMMAND_MODULES", "add_model_arguments", "add_run_arguments", "DATA_HELP", "load_from_args",
           "sigterm_exits", "Terminated", "jsonable", "write_json", "output_file", "run_file_folder"]  # the helpers the command modules share

COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int], str]] = {}

COMMAND_MODULES = (
    "qkhooks.cli.spectrum",
    "qkhooks.cli.record",
    "qkhooks.cli.run_files",
    "qkhooks.cli.analyze",
    "qkhooks.cli.bfd",
    "qkhooks.cli.report",
    "qkhooks.cli.bench",
)
"""The modules that register subcommands with :func:`command`, in the order ``qkhooks --help`` lists them."""

OPTIONAL_DEPENDENCIES = ("torch", "torchvision", "timm", "transformers")
"""Packages a command module may need that reading run files does not: a command module that cannot be imported
for want of one is left out (asking for its commands says which package is missing), the others still work."""


def command(name: str, help: str):
    """Register ``add_arguments`` + ``run`` for a subcommand; ``"analyze modes"`` nests under ``analyze``.

    Usage (from any module listed in ``COMMAND_MODULES``)::

        def _args(p): p.add_argument("run")
        @command("analyze modes", "top-k images per mode")(_args)
        def run_modes(args): ...; return 0
    """

    def wrap(add_arguments):
        def register(run):
            if name in COMMANDS and COMMANDS[name][1].__module__ != run.__module__:
                raise RuntimeError(f"two modules register the command {name!r}: {COMMANDS[name][1].__module__} and "
                                   f"{run.__module__}")
            COMMANDS[name] = (add_arguments, run, help)
            return run

        return register

    return wrap


def add_model_arguments(p: argparse.ArgumentParser, default: str | None = None) -> None:
    """The model spec (positional, or ``--model`` with a default) and how to load it."""
    if default is None:
        p.add_argument("model", help="timm:NAME, hf:ID_OR_DIR, torchvision:NAME or offline:dinov2-s14")
    else:
        p.add_argument("--model", default=default, help=f"timm:NAME, hf:ID_OR_DIR, torchvision:NAME or offline:dinov2-s14 (default {default})")
    p.add_argument("--random-init", action="store_true", help="build the architecture without pretrained weights")
    p.add_argument("--checkpoint", help="local weights for a timm:NAME architecture (safetensors or .pth)")


DATA_HELP = ("a folder, samples, voc, arc2017, ade20k:DIR, o3:N[:seed], o3dir:DIR, several of these joined with '+' "
             "(voc+arc2017+o3:24:7), hfds:DIR_OR_NAME[:SPLIT] (Hugging Face datasets) or wds:PATTERN (tar shards)")
"""The help of a command's dataset argument (README's DATA)."""


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """Where the model runs and how many images go through it at once (commands that run a model over data)."""
    p.add_argument("--batch-size", type=int, default=16, help="images per forward pass")
    p.add_argument("--device", default="cpu", help="where the model runs: cpu, cuda, cuda:N or mps")


def output_file(path: str, what: str, figure: bool = False) -> Path:
    """Refuse, before any work, an output file the command could not write at the end: a path that is a folder,
    a figure whose suffix matplotlib cannot write, a folder that cannot be written. Returns the path."""
    from qkhooks.errors import writable_dir

    target = Path(path).expanduser()
    if target.is_dir():
        raise QKHooksError(f"{what} {path!r} is a folder, and it names a file: give a file name, e.g. "
                           f"{str(target / ('out.png' if figure else 'out.json'))!r}.")
    if figure:
        from matplotlib.backend_bases import FigureCanvasBase  # only the commands that draw ask for it

        kinds = FigureCanvasBase.get_supported_filetypes()
        if target.suffix.lower().lstrip(".") not in kinds:
            raise QKHooksError(f"{what} {path!r} must end in a figure format matplotlib writes ("
                               + ", ".join(f".{k}" for k in sorted(kinds)) + "), e.g. .png.")
    writable_dir(target.parent, f"folder of {what}")
    return target


@contextlib.contextmanager
def run_file_folder(out: str, what: str = "folder of --out") -> Iterator[Path]:
    """Make the folder of the run file ``out`` (the writer does not) for the command's work, and take away the
    folders it made when the command stops with them still empty: a refusal found only with the model or the data
    (a layer it lacks, an empty folder of images) leaves nothing behind. Check the options first (what needs neither
    the model nor the data is refused before any folder is made). Yields the folder."""
    from qkhooks.errors import writable_dir

    folder = Path(out).expanduser().parent
    made = []  # the folders this makes, the deepest first
    above = folder
    while not os.path.lexists(above) and above != above.parent:
        made.append(above)
        above = above.parent
    try:
        yield writable_dir(folder, what, create=True)
    except BaseException:
        for path in made:  # only while empty: a run file (or anything else) written there stays, with its folders
            try:
                os.rmdir(path)
            except OSError:
                break
        raise


def load_from_args(args: argparse.Namespace, device: str = "cpu", for_images: bool = True):
    """The model of :func:`add_model_arguments`' flags, on ``device`` (``for_images=False``: for its weights alone,
    without requiring an image processor config; :func:`qkhooks.models.load.load_model`)."""
    from qkhooks.models.load import load_model  # here: loading a model needs torch, building the parser does not

    return load_model(args.model, random_init=args.random_init, checkpoint=args.checkpoint, device=device,
                      for_images=for_images)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's preemption, torchrun stopping the other ranks, ``kill``) while a command runs, raised by
    :func:`sigterm_exits`'s handler: a KeyboardInterrupt, so it stops the work as Ctrl-C does (the run file closed,
    committed up to its last batch, and a message saying where it stands and how to go on), and :func:`main` exits
    with ``128 + signum`` naming the signal."""

    def __init__(self, signum: int = signal.SIGTERM):  # a default: an exception unpickles from its args, here none
        super().__init__()
        self.signum = signum


def _terminating_signal(exc: BaseException) -> int | None:
    """The signal behind an interrupt: :class:`Terminated` itself or anywhere in its chain (``record_dataset`` turns
    it into a RunInterrupted with the run file's state, demo into its report's), else None (Ctrl-C)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, Terminated):
            return exc.signum
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


@contextlib.contextmanager
def sigterm_exits() -> Iterator[None]:
    """Turn SIGTERM into a clean stop while a command records (record, bfd, demo): :class:`Terminated`, a
    KeyboardInterrupt, so a preemption closes the run file cleanly, resumable, and says how to go on, as Ctrl-C does,
    instead of killing it mid-write; the command exits with 128 + SIGTERM."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, _frame: Any) -> None:
        raise Terminated(signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _shows_default(action: argparse.Action) -> bool:
    """Whether an option's help must state its default: it has one (not None, not a flag's False) and is shown."""
    return (action.help is not argparse.SUPPRESS and action.default not in (None, argparse.SUPPRESS)
            and action.nargs != 0 and bool(action.option_strings or action.nargs in ("?", "*")))


def _states_default(help: str, default: Any) -> bool:
    """Whether ``help`` already says the default ``default`` (``... (default 16)``)."""
    return "default" in help and str(default) in help


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, unless the help already says it (one rule for every command, so a
    new option cannot forget it)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help = action.help or ""
        if _shows_default(action) and not _states_default(help, action.default):
            help += " (default: %(default)s)"
        return help


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qkhooks", description="Query-key analysis of unmodified vision transformers.",
                                     formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--version", action="version", version=f"qkhooks {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    for name, (add_arguments, run, help) in COMMANDS.items():
        group, _, leaf = name.partition(" ")
        if leaf:
            if group not in groups:
                gp = sub.add_parser(group, help=f"{group} subcommands", description=f"{group} subcommands",
                                    formatter_class=DefaultsHelpFormatter)
                # not required=True: argparse would name the internal field; main says which subcommands there are
                groups[group] = gp.add_subparsers(dest=f"{group}_command", metavar="SUBCOMMAND")
                gp.set_defaults(_run=None, _group=gp)
            p = groups[group].add_parser(leaf, help=help, description=help, formatter_class=DefaultsHelpFormatter)
        else:
            p = sub.add_parser(name, help=help, description=help, formatter_class=DefaultsHelpFormatter)
        add_arguments(p)
        p.set_defaults(_run=run)
    return parser


def _missing_dependency(exc: ModuleNotFoundError) -> str | None:
    """The optional package ``exc`` says is missing, or None when it is anything else (a real error)."""
    name = (exc.name or "").split(".")[0]
    return name if name in OPTIONAL_DEPENDENCIES else None


def _load_commands(asked: Sequence[str] = ()) -> dict[str, str]:
    """Import :data:`COMMAND_MODULES` in order, stopping once the command ``asked`` for (its words, e.g. ``["info"]``
    or ``["analyze", "modes"]``) is registered, so that ``qkhooks info`` does not import the modules of commands that
    need torch; all of them for ``--help`` or a name no module registers. Returns {module: missing package} for
    modules that need a package not installed here."""
    wanted = {" ".join(asked[:2]), " ".join(asked[:1])} - {""}
    unavailable = {}
    for module in COMMAND_MODULES:
        if wanted & COMMANDS.keys():
            break
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if _missing_dependency(exc) is None:
                raise
            unavailable[module] = str(exc.name)
    return unavailable


def _stdout_to_devnull() -> None:
    """Point stdout at /dev/null, so that Python's own flush at exit does not report the closed pipe again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):  # a stdout without a file (captured)
        pass


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    words = list(itertools.takewhile(lambda a: not a.startswith("-"), argv))
    unavailable = _load_commands(words)
    asked = words[0] if words else None
    if unavailable and asked is not None and asked not in {name.partition(" ")[0] for name in COMMANDS}:
        missing = ", ".join(sorted(set(unavailable.values())))
        print(f"qkhooks: error: {asked!r} is not a command available here: {missing} is not installed (needed by "
              f"{', '.join(unavailable)}); install it, or see `qkhooks --help` for the commands that work without it.",
              file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    if args._run is None:  # a command group without its subcommand (`qkhooks analyze`)
        leaves = [name.partition(" ")[2] for name in COMMANDS if name.partition(" ")[0] == args.command]
        args._group.error(f"choose one of: {', '.join(leaves)}")
    try:
        status = int(args._run(args) or 0)
        sys.stdout.flush()  # here, not at the interpreter's exit: a closed pipe is caught below
        return status
    except BrokenPipeError:  # `qkhooks info RUN | head`: the reader has gone; stop quietly, as other tools do
        _stdout_to_devnull()
        return 128 + signal.SIGPIPE if hasattr(signal, "SIGPIPE") else 1
    except QKHooksError as exc:
        print(f"qkhooks: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        if _missing_dependency(exc) is None:
            raise
        print(f"qkhooks: error: this command needs {exc.name}, which is not installed here; install it "
              f"(pip install {exc.name}).", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # a run file's state and the way on, where one was being written (RunInterrupted)
        signum = _terminating_signal(exc)
        stopped = "interrupted" if signum is None else f"stopped by {signal.Signals(signum).name}"
        print(f"qkhooks: {stopped}{f': {exc}' if str(exc) else ''}", file=sys.stderr)
        return 130 if signum is None else 128 + signum


if __name__ == "__main__":
    sys.exit(main())
