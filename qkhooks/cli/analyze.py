"""``qkhooks analyze preference`` and ``qkhooks analyze modes``: thin commands over :mod:`qkhooks.analysis`."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Sequence

from qkhooks.cli import command
from qkhooks.errors import QKHooksError, writable_dir

PREFERENCE_OUTPUTS = ("preference.csv", "preference.json", "preference.png")
MODES_OUTPUTS = ("modes.json", "same_object.csv", "same_object.png", "anisotropy.csv", "anisotropy.png", "figures")
BFD_OUTPUTS = ("bfd.json", "bfd_heads.png", "bfd_layers.png", "bfd_concentration.png", "bfd_modes_L*H*.png",
               "bfd_decoding.png")
"""The files (and folders) each ``analyze`` command writes under --out: what --overwrite removes first."""


def add_overwrite_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="replace this command's outputs already in --out (they are removed first, so none of an "
                        "earlier run is left beside the new ones)")


def previous_outputs(out: str, names: Sequence[str], command_name: str, overwrite: bool) -> list[Path]:
    """The outputs of ``command_name`` already in ``out`` (glob ``names``): refused without ``overwrite`` (round 38:
    a second run left the first's same_object.csv and figures beside the new modes.json). Check before any work;
    remove them with :func:`remove_outputs` just before writing."""
    folder = Path(out)
    found = sorted({p for name in names for p in folder.glob(name)}) if folder.is_dir() else []
    if found and not overwrite:
        shown = ", ".join(p.name + ("/" if p.is_dir() else "") for p in found[:6]) + (" ..." if len(found) > 6 else "")
        raise QKHooksError(f"{out} already holds the outputs of `qkhooks {command_name}` ({shown}); a new run would "
                           "leave those it does not write beside its own. Give another --out, or --overwrite to "
                           "remove them first.")
    return found


def remove_outputs(found: Sequence[Path]) -> None:
    for path in found:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def _sidecar_note(run_path: str) -> None:
    """Say so when the run's reducer states file (RUN.h5.reducers) is not next to it."""
    from qkhooks.store.reader import open_run

    with open_run(run_path) as run:
        missing = run.missing_states()
    if missing:
        print(f"note: {missing}")


# ------------------------------------------------------------------------------------ preference
def _preference_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="a run file recorded on odd-one-out data (o3:N or o3dir:DIR) with --attention rows")
    p.add_argument("--out", required=True, help="folder for preference.csv, preference.json, preference.png")
    add_overwrite_argument(p)


@command("analyze preference", "attention to same object / other objects / background on odd-one-out images (Fig. 2)")(_preference_args)
def run_preference(args: argparse.Namespace) -> int:
    from qkhooks.analysis.preference import analyze_preference, format_table

    writable_dir(args.out, "--out folder")
    remove_outputs(previous_outputs(args.out, PREFERENCE_OUTPUTS, "analyze preference", args.overwrite))
    result = analyze_preference(args.run, args.out)
    print(format_table(result))
    if not result["complete"]:
        print(f"note: {args.run} is incomplete (the recording stopped early); the table covers its "
              f"{result['num_images']} committed images.")
    _sidecar_note(args.run)
    print("wrote " + ", ".join(result["files"].values()))
    return 0


# ----------------------------------------------------------------------------------------- modes
def _modes_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="a run file written by `qkhooks record` (with modes, the default)")
    p.add_argument("--out", required=True, help="folder for modes.json, same_object.csv, anisotropy.csv and figures/")
    p.add_argument("--k", type=int, help="k distinct images per mode (either sign; default: as recorded, 8)")
    p.add_argument("--layers", help="block indices, e.g. '0,3,5-7,-1' (default all recorded); as in `qkhooks "
                   "record`, negative indices count from the model's last block (-1 = the model's last block, which "
                   "the run must have recorded)")
    p.add_argument("--figure-modes", default="2", help="per head, draw figures for its first N modes ('all', 0 = none; default 2)")
    p.add_argument("--no-overview", action="store_true", help="skip the per-layer sheets of each head's leading mode")
    p.add_argument("--no-images", action="store_true", help="draw the maps on black instead of reopening the dataset")
    p.add_argument("--same-object-top", type=int, default=5, help="images per mode for the same-object probability")
    p.add_argument("--normalize", default="max", choices=["max", "percentile"], help="map display scaling")
    add_overwrite_argument(p)


@command("analyze modes", "top-k images per QK mode, same-object probability and anisotropy (Fig. 4, 5, S3)")(_modes_args)
def run_modes(args: argparse.Namespace) -> int:
    from qkhooks.analysis.modes import analyze_modes, check_modes_options, format_summary

    fm = args.figure_modes
    try:
        figure_modes = None if str(fm).lower() == "all" else int(fm)
    except ValueError:
        raise QKHooksError(f"--figure-modes must be a number or 'all', got {fm!r}.") from None
    if args.k is not None and args.k < 1:
        raise QKHooksError(f"--k must be >= 1, got {args.k}.")
    check_modes_options(args.same_object_top, figure_modes)
    writable_dir(args.out, "--out folder")
    remove_outputs(previous_outputs(args.out, MODES_OUTPUTS, "analyze modes", args.overwrite))
    summary = analyze_modes(
        args.run, args.out, k=args.k, layers=args.layers, figure_modes=figure_modes, overview=not args.no_overview,
        images=not args.no_images, same_object_top=args.same_object_top, normalize=args.normalize,
    )
    print(format_summary(summary))
    if not summary["complete"]:
        base = summary.get("baseline_images")
        if base is not None and base < summary["images"]:
            print(f"note: {args.run} is incomplete (the recording stopped early); the top-k images, maps and "
                  f"same-object numbers cover its {summary['images']} committed images, the anisotropy baseline the "
                  f"{base} of its reducer checkpoint (resume the run with --resume to fold in the rest).")
        else:
            print(f"note: {args.run} is incomplete (the recording stopped early); every number covers its "
                  f"{summary['images']} committed images.")
    print(f"top-k: {summary['topk_source']}; {summary['photos']}")
    _sidecar_note(args.run)
    files = summary["files"]
    print("wrote " + ", ".join(v for k_, v in files.items() if k_ not in ("figures", "figure_count") and v)
          + (f" and {files['figure_count']} figures under {files['figures']}" if files["figure_count"] else ""))
    return 0
