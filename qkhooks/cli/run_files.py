"""Commands on run files: ``qkhooks info``, ``qkhooks repair``, ``qkhooks merge``.

``info`` (and ``info --verify``) reads with h5py and numpy only: this module and what ``info`` imports load no
torch, so it works where torch is not installed (tests/test_imports.py). ``merge`` rebuilds reducers, which needs
torch: it imports :mod:`qkhooks.distributed` inside the command.
"""

from __future__ import annotations

import argparse

from qkhooks.cli import command


def _info_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="a run file written by qkhooks record")
    p.add_argument("--verify", action="store_true",
                   help="read every committed chunk, dataset, attribute and reducer state back and say what is damaged "
                        "(exit status 1 when something is); checksums are checked where the run has them (--checksum)")


@command("info", "print what a run file holds")(_info_args)
def run_info(args: argparse.Namespace) -> int:
    from qkhooks.errors import QKHooksError

    if args.verify:
        from qkhooks.store.repair import verify_run  # reads with h5py and numpy only, as the reader

        report = verify_run(args.run)
        print(report.summary())
        return 0 if report.ok else 1
    from qkhooks.store.reader import open_run  # the reader alone: qkhooks.store also holds the writer (torch)

    with open_run(args.run) as run:
        print(run.summary())
        if run.problems:  # damage found while summarising: said, and the exit status says it too
            raise QKHooksError(f"{args.run} is damaged: " + "; ".join(run.problems))
    return 0


def _repair_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="a damaged run file (left unchanged)")
    p.add_argument("--out", required=True, help="the new run file with every readable committed image")


@command("repair", "copy every readable committed image and reducer state of a damaged run file into a new one")(_repair_args)
def run_repair(args: argparse.Namespace) -> int:
    from qkhooks.store.repair import repair

    print(repair(args.run, args.out).summary())
    return 0


def _merge_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", help="the merged run file (RUN.h5); its shards RUN.rank*-of-W.h5 sit next to it")
    p.add_argument("shards", nargs="*", help="shard files (default: RUN.rank*-of-*.h5 next to OUT)")
    p.add_argument("--copy", action="store_true",
                   help="copy the per-image arrays into OUT (self-contained) instead of a virtual view over the shards")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


@command("merge", "merge the shard files of a distributed recording (torchrun) into one run file")(_merge_args)
def run_merge(args: argparse.Namespace) -> int:
    from qkhooks.distributed import find_shards, merge_shards
    from qkhooks.store.reader import open_run

    out = merge_shards(args.out, args.shards or None, copy=args.copy, overwrite=args.overwrite)
    with open_run(out) as run:
        state = "" if run.complete else " (incomplete: some shards are not finished; resume them and merge again)"
        print(f"wrote {out}: {run.n} images from {len(args.shards) or len(find_shards(out))} shards{state}")
    return 0
