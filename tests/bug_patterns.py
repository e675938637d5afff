"""The twelve bug patterns of issue 19, applied to a scratch copy of the library one at a time (``make bug-patterns``).

Each pattern is a plausible bug written as a text edit of one library file: the original text (which must still be
there, so a refactoring that moves the code makes this script fail instead of passing vacuously), the buggy text,
and the tests that must fail under it. The script copies ``qkhooks/`` and ``tests/`` to a temporary folder, applies
one edit at a time, runs the named tests there in a fresh process and reports each pattern as killed (the tests
failed), survived (they passed) or stale (the original text is gone: update the table). Exit status 0 only when all
twelve are killed. ``tests/MUTATION.md`` holds the table in prose; this is the executable copy, run when the code under
a pattern changes (it takes a few minutes: twelve short pytest runs).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class BugPattern:
    """One bug of issue 19's list: ``original`` replaced by ``buggy`` in ``file`` (every occurrence, at least one)."""

    name: str
    file: str
    original: str
    buggy: str
    tests: tuple[str, ...]


_WRITER_ORDER = ("        f.flush()  # the images reach the disk before the count that commits them\n"
                 "        self._committed_count.set(n + b)")
_STRICT = "tests/test_store_safety.py::test_readers_see_only_committed_rows_and_a_resume_cuts_the_rest"
PATTERNS: tuple[BugPattern, ...] = (
    BugPattern("default centre query token swaps rows and columns", "qkhooks/attention.py",
               "(gh // 2) * gw + gw // 2", "(gw // 2) * gh + gh // 2",
               ("tests/test_asymmetry.py::test_default_query_tokens_are_cls_and_the_centre_patch_of_a_rows_by_cols_grid",)),
    BugPattern("timm grid reader swaps rows and columns", "qkhooks/models/timm.py",
               "grid = tuple(int(g) for g in patch_embed.grid_size)",
               "grid = tuple(int(g) for g in reversed(patch_embed.grid_size))",
               ("tests/test_core.py::test_sites_describe_each_family[timm-vit-4x6]",)),
    BugPattern("HF grid reader swaps rows and columns", "qkhooks/models/hf.py",
               "return rows // patch_rows, cols // patch_cols", "return cols // patch_cols, rows // patch_rows",
               ("tests/test_core.py::test_sites_describe_each_family[hf-vit-4x6-key-first]",)),
    BugPattern("anisotropy centre token swaps rows and columns", "qkhooks/analysis/anisotropy.py",
               "prefix + (rows // 2) * cols + cols // 2", "prefix + (cols // 2) * rows + rows // 2",
               ("tests/test_asymmetry.py::test_anisotropy_takes_the_centre_patch_of_a_rows_by_cols_grid",)),
    BugPattern("the run file's count committed before the flush that carries the batch", "qkhooks/store/writer.py",
               _WRITER_ORDER, "        self._committed_count.set(n + b)\n        f.flush()",
               ("tests/test_store_safety.py::test_the_writer_writes_data_then_flushes_then_commits_for_every_batch",)),
    BugPattern("reader slices not limited to the committed rows", "qkhooks/store/reader.py",
               "picked = range(*first.indices(self.n))", "picked = range(*first.indices(len(self.dataset)))",
               (_STRICT,)),
    BugPattern("reader counts not limited to the committed rows", "qkhooks/store/reader.py",
               "n = fmt.committed(self.file) or 0", "n = len(self.file[fmt.IDS])", (_STRICT,)),
    BugPattern("resume after a late decode failure restarts from the image count", "qkhooks/stream.py",
               "return done, last + 1", "return done, done",
               ("tests/test_late_decode.py::test_late_decode_failure_then_interruption_then_resume_equals_one_run"
                "[between-checkpoints]",)),
    BugPattern("preprocessing swaps mean and std", "qkhooks/data/preprocess.py",
               "x.sub(mean).div(std)", "x.sub(std).div(mean)",
               ("tests/test_asymmetry.py::test_timm_preprocessing_with_mean_not_std_is_bit_identical_to_timm",)),
    BugPattern("q/k Linear outputs taken in call order, not by module", "qkhooks/capture.py",
               "outputs = (seen[0], seen[1])", "outputs = tuple(seen.values())",
               ("tests/test_core.py::test_modes_sum_to_model_logits[hf-vit-4x6-key-first]",)),
    BugPattern("reducers of different kinds merged", "qkhooks/reducers.py",
               "if type(other) is not type(self):", "if False:",
               ("tests/test_reducers.py::test_merge_of_another_kind_is_refused",)),
    BugPattern("augmented-spectrum cosine over all d+1 coordinates, the bias coordinate included", "qkhooks/spectrum.py",
               "self.U[:, : self.dim], self.V[:, : self.dim]", "self.U, self.V",
               ("tests/test_mutation_kills.py::test_augmented_spectrum_and_cosines_match_a_dense_svd_of_the_augmented_form",)),
)


def _scratch_copy(into: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".mutation", ".venv")
    for name in ("qkhooks", "tests"):
        shutil.copytree(ROOT / name, into / name, ignore=ignore)
    for name in ("setup.cfg", "setup.py"):
        shutil.copy2(ROOT / name, into / name)


def _pytest(copy: Path, tests: Sequence[str]) -> tuple[int, str]:
    """Run ``tests`` in ``copy`` in a fresh process: (exit status, the last line pytest printed)."""
    env = {**os.environ, "PYTHONPATH": str(copy), "PYTHONDONTWRITEBYTECODE": "1"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
                          cwd=copy, env=env, capture_output=True, text=True)
    return done.returncode, (done.stdout.strip().splitlines() or [""])[-1] or done.stderr.strip()[-300:]


def check(pattern: BugPattern, copy: Path) -> tuple[str, str]:
    """Apply ``pattern`` to ``copy``, run its tests, restore the file: (verdict, the last line pytest printed)."""
    path = copy / pattern.file
    source = path.read_text()
    if pattern.original not in source:
        return "stale", f"{pattern.file} no longer holds {pattern.original!r}"
    path.write_text(source.replace(pattern.original, pattern.buggy))
    try:
        status, last = _pytest(copy, pattern.tests)
    finally:
        path.write_text(source)
    if status == 1 and "failed" in last:
        return "killed", last
    if status == 0:
        return "survived", last
    return "error", last  # collection errors, a missing test id: not a kill


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", type=int, nargs="*", help="pattern numbers (1-12) to run; default all")
    args = parser.parse_args()
    chosen = [(i, p) for i, p in enumerate(PATTERNS, 1) if not args.only or i in args.only]
    verdicts = []
    with tempfile.TemporaryDirectory(prefix="qkhooks-bug-patterns-") as tmp:
        _scratch_copy(Path(tmp))
        status, last = _pytest(Path(tmp), sorted({t for _, p in chosen for t in p.tests}))
        print(f"unchanged code: {last}", flush=True)
        if status != 0:  # a test failing on the code as it is would count every pattern as killed
            print("the patterns' tests must pass on the unchanged code first")
            return 1
        for i, pattern in chosen:
            verdict, detail = check(pattern, Path(tmp))
            verdicts.append(verdict)
            print(f"{i:2d} {verdict:8s} {pattern.name}: {detail}", flush=True)
    killed = verdicts.count("killed")
    print(f"{killed} of {len(chosen)} bug patterns killed")
    return 0 if killed == len(chosen) else 1


if __name__ == "__main__":
    sys.exit(main())
