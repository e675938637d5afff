"""Where the host's time goes in ``qkhooks record`` over a folder: cProfile of one ``record_dataset`` run (after a
warm-up run), the functions with the most own time and the qkhooks functions with the most cumulative time. On a GPU
the host's time is what sets the pace (the device waits for it), so this is the profile to read there.

    python benchmarks/profile_record.py [--device cuda] [--model vit_ti] [--images 480] [--out profile.txt]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from harness.material import make_image_folder  # noqa: E402
from harness.sizes import SIZES  # noqa: E402


def main() -> int:
    import qkhooks
    from qkhooks.stream import record_dataset

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default="vit_ti", choices=sorted(SIZES))
    p.add_argument("--images", type=int, default=480)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--out", default=None, help="also write the report here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="qkhooks-profile-") as tmp:
        folder = make_image_folder(Path(tmp) / "images", args.images, SIZES[args.model].image)
        loaded = qkhooks.load_model(f"timm:{SIZES[args.model].timm_name}", random_init=True)

        def once() -> float:
            t0 = time.perf_counter()
            record_dataset(loaded, str(folder), Path(tmp) / "run.h5", batch_size=args.batch, overwrite=True,
                           progress=False, device=args.device)
            return time.perf_counter() - t0

        warm = once()
        profiler = cProfile.Profile()
        profiler.enable()
        timed = once()
        profiler.disable()
    text = io.StringIO()
    text.write(f"record_dataset {args.model} on {args.device}, {args.images} images, batch {args.batch}: "
               f"{warm:.2f} s warm-up run, {timed:.2f} s profiled run (cProfile slows Python code)\n\n")
    stats = pstats.Stats(profiler, stream=text)
    text.write("== most own time (all functions)\n")
    stats.sort_stats("tottime").print_stats(args.top)
    text.write("== most cumulative time (qkhooks functions)\n")
    stats.sort_stats("cumulative").print_stats("qkhooks", args.top)
    report = text.getvalue()
    print(report)
    if args.out:
        Path(args.out).write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
