"""``qkhooks bfd`` and ``qkhooks analyze bfd``: thin commands over :mod:`qkhooks.analysis.bfd`."""

from __future__ import annotations

import argparse
from pathlib import Path

from qkhooks.cli import (DATA_HELP, add_model_arguments, add_run_arguments, command, load_from_args, output_file,
                         run_file_folder, sigterm_exits, write_json)
from qkhooks.cli.analyze import BFD_OUTPUTS, add_overwrite_argument, previous_outputs, remove_outputs
from qkhooks.errors import QKHooksError, RunInterrupted, writable_dir
from qkhooks.options import LAYERS_HELP, RecordOptions


def _bfd_args(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("data", help=DATA_HELP)
    p.add_argument("--out", required=True, help="run file (HDF5) for pass 2; pass 1 goes to RUN.pass1.h5 next to it")
    p.add_argument("--json", help="write the result as JSON here")
    p.add_argument("--layers", help=LAYERS_HELP)
    add_run_arguments(p)
    RecordOptions.add_arguments(p, names=("limit", "num_workers", "image_column"))  # read data as `qkhooks record` does
    p.add_argument("--input", default="normed", choices=["normed", "residual"],
                   help="the tensor entering W_q/W_k (normed, default) or the block's residual input")
    p.add_argument("--drop-prefix", action="store_true", help="leave prefix tokens out (default: they are positions)")
    p.add_argument("--holdout-every", type=int, default=5,
                   help="hold out about one image in this many for the probes (chosen by a hash of its id, so the same "
                        "images whatever the batching, sharding or resume)")
    _summary_args(p)
    p.add_argument("--no-decode", action="store_true", help="skip the position probes")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help="continue an interrupted run")
    group.add_argument("--overwrite", action="store_true", help="replace an existing run file")


@command("bfd", "position vs content (BFD): CC/CP/PC/PP energies per head and mode, position probes")(_bfd_args)
def run_bfd_command(args: argparse.Namespace) -> int:
    from qkhooks.analysis.bfd import check_holdout, format_table, run_bfd
    from qkhooks.stream import check_options

    output_file(args.out, "--out")
    if args.json:
        output_file(args.json, "--json")
    # the values run_bfd refuses whatever the model and data, before the run file's folder is made (round 38:
    # --limit 0 left new/dir/ behind); what needs them is refused inside run_file_folder, which then takes it away
    check_holdout(args.holdout_every, not args.no_decode)
    check_options(RecordOptions(batch_size=args.batch_size, limit=args.limit, num_workers=args.num_workers))
    with run_file_folder(args.out), sigterm_exits():
        try:
            loaded = load_from_args(args, device=args.device)
            result = run_bfd(
                loaded, args.data, args.out, layers=args.layers, batch_size=args.batch_size, device=args.device,
                limit=args.limit, input=args.input, drop_prefix=args.drop_prefix, holdout_every=args.holdout_every,
                alpha=args.alpha, definition=args.definition, decode=not args.no_decode, resume=args.resume,
                overwrite=args.overwrite, progress=True, num_workers=args.num_workers, image_column=args.image_column,
            )
        except KeyboardInterrupt as exc:  # run_bfd says where a stop in or between its passes leaves the files
            if isinstance(exc, RunInterrupted):
                raise
            raise RunInterrupted("BFD stopped before pass 1 of 2 (the position means) began, while the model loaded "
                                 "or the data opened: nothing was written; run the same command again.") from exc
    print(format_table(result))
    if result.get("note"):
        print(f"note: {result['note']}")
    print(f"wrote {args.out}")
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")
    return 0


def _analyze_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="a run file written by `qkhooks bfd`")
    p.add_argument("--out", required=True, help="folder for bfd.json and the figures")
    p.add_argument("--head", help="'LAYER,HEAD' for the per-mode figure (default: largest CP+PC coupling)")
    _summary_args(p)
    add_overwrite_argument(p)


def _summary_args(p: argparse.ArgumentParser) -> None:
    """How the energies are summarised, in `qkhooks bfd` and again in `qkhooks analyze bfd`."""
    p.add_argument("--definition", default="frobenius", choices=["frobenius", "additive"],
                   help="which energy definition fills the main numbers (both are in the JSON)")
    p.add_argument("--alpha", type=_alpha, default=1e-3,
                   help="relative ridge strength of the position probes, a number > 0")


def _alpha(text: str) -> float:
    """--alpha through the library's own check (:func:`qkhooks.analysis.bfd_summary.check_alpha`), refused in
    argparse's words, which name the option and the value."""
    from qkhooks.analysis.bfd_summary import check_alpha

    try:
        return check_alpha(text)
    except QKHooksError:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, the relative ridge strength of the position "
                                         f"probes (e.g. 1e-3, the default), got {text!r}") from None


@command("analyze bfd", "BFD tables and figures from a run file written by `qkhooks bfd`")(_analyze_args)
def run_analyze_bfd(args: argparse.Namespace) -> int:
    from qkhooks.analysis.bfd import check_head, format_table, plot_bfd, read_bfd

    head = None
    if args.head:
        try:
            layer, h = (int(v) for v in args.head.split(","))
        except ValueError:
            raise QKHooksError(f"--head must be 'LAYER,HEAD', e.g. '5,2'; got {args.head!r}.") from None
        head = (layer, h)
    writable_dir(args.out, "--out folder")
    found = previous_outputs(args.out, BFD_OUTPUTS, "analyze bfd", args.overwrite)
    result = read_bfd(args.run, definition=args.definition, alpha=args.alpha)
    check_head(result, head)  # before any file (round 38: --head 99,0 wrote bfd.json and two figures, then refused)
    remove_outputs(found)
    out = Path(args.out)
    write_json(out / "bfd.json", result)
    paths = plot_bfd(result, out, head)
    print(format_table(result))
    print("wrote " + ", ".join(str(p) for p in [out / "bfd.json", *paths.values()]))
    return 0
