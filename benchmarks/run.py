"""Run the qkhooks benchmark suite (the harness in benchmarks/harness/; ``qkhooks bench`` runs the same from a checkout).

    python benchmarks/run.py                                  # ViT-S, every section, ~10 min on 2 CPU cores
    python benchmarks/run.py --models vit_b --sections methods,projection,svd --rounds 6 --batches-per-rep 1
    python benchmarks/run.py --device cuda --sections methods,memory,projection,writer   # on a GPU machine

Results are merged into benchmarks/results.json and benchmarks/RESULTS.md is re-rendered from it (tested by
tests/test_bench.py). ``--help`` lists every option.
"""

import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCHMARKS), str(BENCHMARKS.parent)]  # this harness, and qkhooks from the checkout

from harness.driver import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
