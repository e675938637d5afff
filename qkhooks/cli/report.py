"""``qkhooks demo`` (every analysis on one model or several, one HTML report each) and ``qkhooks compare`` (their
per-layer curves overlaid).

The library is imported inside the commands, not at module level: the parser is built without torch (see
:mod:`qkhooks.cli`); so the defaults of ``--model`` and ``--data`` are filled in from :mod:`qkhooks.report` there.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from qkhooks.cli import add_run_arguments, command, sigterm_exits
from qkhooks.errors import QKHooksError, RunInterrupted, writable_dir


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", action="append",
                   help="timm:NAME, hf:ID_OR_DIR, torchvision:NAME or offline:dinov2-s14, SPEC@random for random weights (default: the "
                        "bundled offline:dinov2-s14); repeat it to report several models and compare them in DIR/compare "
                        "(all are loaded before the first report)")
    p.add_argument("--random-init", action="store_true", help="build the architecture without pretrained weights")
    p.add_argument("--checkpoint", help="local weights for a timm:NAME architecture (safetensors or .pth)")
    p.add_argument("--out", default="demo_out", help="report folder (default demo_out)")
    p.add_argument("--data", help="photos for Fig. 4, S3 and BFD: a folder or dataset spec (default: every bundled photo)")
    p.add_argument("--images", type=int, help="use only the first N photos (default all)")
    p.add_argument("--o3", type=int, default=48, help="odd-one-out displays for attention preference (default 48)")
    p.add_argument("--objects", type=int, default=24, help="displays added to the masked photos (default 24)")
    p.add_argument("--objects-data", help="a dataset with object masks for Fig. 5 instead (e.g. ade20k:DIR)")
    p.add_argument("--input", choices=("normed", "residual"), default="normed",
                   help="tokens the maps project: the block's normed input (default) or the residual stream (paper)")
    p.add_argument("--display", choices=("max", "percentile"), default="max",
                   help="mode maps scaled by their max (default) or clipped to the 30th-95th percentile (paper)")
    p.add_argument("--keep-runs", action="store_true", help="keep per-image maps and every per-mode figure (large)")
    add_run_arguments(p)


@command("demo", "run every analysis on one model (or several) and write DIR/index.html and DIR/summary.json")(_demo_args)
def run_demo(args: argparse.Namespace) -> int:
    from qkhooks.compare import compare
    from qkhooks.models.load import check_device, load_model
    from qkhooks.report import DEFAULT_MODEL, PHOTOS, make_report

    writable_dir(args.out, "--out folder")
    specs = args.model or [DEFAULT_MODEL]
    outs = [Path(args.out)] if len(specs) == 1 else [Path(args.out) / _slug(s) for s in specs]
    if len(set(outs)) < len(outs):
        raise QKHooksError(f"--model names the same model twice ({', '.join(specs)}): each gets its own report "
                           "folder; give each model once.")
    if len(specs) > 1 and args.checkpoint:
        raise QKHooksError("--checkpoint would load one file into every --model: report the checkpoint alone "
                           "(`qkhooks demo --model timm:NAME --checkpoint PATH --out DIR`), then `qkhooks compare DIR ...`.")
    if args.images is not None and args.images < 1:
        raise QKHooksError(f"--images must be a positive number of photos, got {args.images}; leave it out to use "
                           "every photo.")
    with sigterm_exits():  # SIGTERM stops it as Ctrl-C does: the run file being written closed, and a word on the report
        # Every model is loaded (on the host) before the first report, so a bad second --model is refused before
        # minutes of work; each goes to --device for its own report only, so models that fit one at a time still do.
        check_device(args.device)
        models = [load_model(spec, random_init=args.random_init, checkpoint=args.checkpoint) for spec in specs]
        for out in outs:
            loaded = models.pop(0)
            loaded.model.to(args.device)
            had_page = (out / "index.html").exists()
            try:
                summary = make_report(out, loaded, photos=args.images, data=args.data or PHOTOS, o3=args.o3,
                                      objects=args.objects, objects_data=args.objects_data, input=args.input,
                                      display=args.display, keep_runs=args.keep_runs, batch_size=args.batch_size,
                                      device=args.device)
            except KeyboardInterrupt as exc:  # the run file's own "--resume" advice is not demo's: it has none
                raise RunInterrupted(_unfinished(out, had_page)) from exc
            print(f"report: {out / 'index.html'} ({summary['seconds']} s)")
        if len(outs) > 1:
            page = compare([str(o) for o in outs], Path(args.out) / "compare")
            print(f"comparison: {page}")
    return 0


def _unfinished(out: Path, had_page: bool) -> str:
    """Where an interrupted report stands and how to go on (demo starts each report over: there is no --resume)."""
    page = ("index.html and summary.json are still the previous report's, while the sections written so far are this "
            "run's" if had_page else "no index.html or summary.json was written")
    return (f"the report in {out} is unfinished ({page}; its run files under {out / 'runs'} were closed cleanly). demo "
            "has no --resume: run the same command again to write the whole report.")


def _slug(spec: str) -> str:
    """A folder name for a model spec."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in spec)


def _compare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("items", nargs="+", metavar="REPORT_OR_MODEL",
                   help="report folders (qkhooks demo --out DIR) or model specs (SPEC@random for random weights)")
    p.add_argument("--out", default="compare_out", help="folder for index.html, compare.json and the figures")


@command("compare", "overlay the per-layer curves of several models (reports or model specs)")(_compare_args)
def run_compare(args: argparse.Namespace) -> int:
    from qkhooks.compare import compare

    writable_dir(args.out, "--out folder")  # before any model is loaded (round 38: a file here gave a traceback)
    page = compare(args.items, args.out)
    figures = json.loads((page.parent / "compare.json").read_text())["figures"]  # review r40: all it wrote
    print(f"wrote {page}, {page.parent / 'compare.json'} (the curves) and {len(figures)} figure"
          f"{'' if len(figures) == 1 else 's'}: {', '.join(str(page.parent / name) for name in figures)}")
    return 0
