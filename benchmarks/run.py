"""Run the qkhooks benchmark suite: the same as ``qkhooks bench [options]``.

    python benchmarks/run.py                                  # ViT-S, every section, ~10 min on 2 CPU cores
    python benchmarks/run.py --models vit_b --sections methods,projection,svd --rounds 6 --batches-per-rep 1
    python benchmarks/run.py --device cuda --sections methods,memory,projection,writer   # on a GPU machine

Results are merged into benchmarks/results.json and benchmarks/RESULTS.md is re-rendered from it; the code
lives in qkhooks/bench.py (tested by tests/test_bench.py). ``--help`` lists every option.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from qkhooks.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
