"""``qkhooks record``: stream a dataset through a model into a run file, in one process or one per rank under
``torchrun`` (then rank 0 merges the shards into one file that reads like a single-process run).

Its flags are :class:`qkhooks.options.RecordOptions`' plus the model, the data, the file and the device. The library
is imported inside the command, not at module level: the parser is built without torch (see :mod:`qkhooks.cli`).
"""

from __future__ import annotations

import argparse
import os

from qkhooks.cli import DATA_HELP, add_model_arguments, command, load_from_args, run_file_folder, sigterm_exits
from qkhooks.errors import RunInterrupted
from qkhooks.options import RecordOptions


def _record_args(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("data", help=DATA_HELP)
    p.add_argument("--out", required=True, help="the run file (HDF5)")
    p.add_argument("--device", default="cpu", help="where the model runs; under torchrun 'cuda' is each rank's GPU")
    RecordOptions.add_arguments(p)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help="continue an interrupted run, or grow a run with a larger --limit")
    group.add_argument("--overwrite", action="store_true", help="replace an existing run file")


def _under_torchrun() -> bool:
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


@command("record", "stream a dataset through a model into an HDF5 run file")(_record_args)
def run_record(args: argparse.Namespace) -> int:
    from qkhooks.stream import check_options, record_dataset

    options = RecordOptions.from_args(args)
    check_options(options)  # before the run file's folder is made (round 38: --limit 0 left new/dir/ behind)
    if _under_torchrun():
        return _record_distributed(args, options)
    existed = os.path.lexists(args.out)
    with run_file_folder(args.out), sigterm_exits():
        try:
            loaded = load_from_args(args, device=args.device)
            result = record_dataset(loaded, args.data, args.out, options=options, device=args.device,
                                    resume=args.resume, overwrite=args.overwrite)
        except KeyboardInterrupt as exc:  # record_dataset says where a stop after its file was opened leaves it
            if isinstance(exc, RunInterrupted):
                raise
            left = (f"{args.out} is as it was" if existed else f"no file was made at {args.out}")
            raise RunInterrupted(f"nothing was recorded: the run stopped before it began writing (while the model "
                                 f"loaded, the data opened or the model was probed), so {left}; run the same command "
                                 "again.") from exc
    skipped = f" ({len(result.skipped)} skipped)" if result.skipped else ""
    if result.resumed_from is None:
        print(f"wrote {result.images} images to {result.path}{skipped}")
    else:  # "wrote 3 images" after a resume that added none would say work was done that was not
        print(f"resumed {result.path}: {result.resumed_from} images kept, {result.images - result.resumed_from} "
              f"recorded, {result.images} in all{skipped}")
    return 0


def _record_distributed(args: argparse.Namespace, options: RecordOptions) -> int:
    """One shard per rank, merged by rank 0 (:func:`qkhooks.distributed.record_dataset_distributed`)."""
    from qkhooks.distributed import record_dataset_distributed, shard_path, torchrun_process_group

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    with run_file_folder(args.out), torchrun_process_group(args.device) as device, sigterm_exits():
        loaded = load_from_args(args, device=device)
        result = record_dataset_distributed(loaded, args.data, args.out, options=options, device=device,
                                            resume=args.resume, overwrite=args.overwrite)
        if rank == 0:
            note = f" ({len(result.skipped)} skipped)" if result.skipped else ""
            print(f"wrote {result.images} images to {result.path}{note}: a view over {world} shards "
                  f"{shard_path(args.out, 0, world).name} ... (keep them next to it)")
    return 0
