"""An image that passes the open check but fails to decode, then an interruption, then a resume: the resumed
run file equals the uninterrupted one (ids, skipped list, every array, reducer states). Public API only
(``record_dataset`` / ``open_run``), so the test survives a rewrite of the store's internals."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qkhooks import load_model
from qkhooks.analysis.modes import AnisotropyReducer, TopKModes
from qkhooks.data import ImageConfig
from qkhooks.store.reader import open_run
from qkhooks.stream import record_dataset
from conftest import TINY_MODELS

LATE = "c_late.jpg"


def _folder(root: Path) -> Path:
    """Eight readable photos and one JPEG cut in half (its header opens, its body does not decode), third in order."""
    folder = root / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.jpg", LATE, "d.png", "e.jpg", "f.png", "g.png", "h.jpg", "i.png"):
        Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(folder / name, quality=95)
    late = (folder / LATE).read_bytes()
    (folder / LATE).write_bytes(late[: len(late) // 2])
    with Image.open(folder / LATE) as im:  # the premise: the open-time check passes, decoding fails
        im.verify()
    with pytest.raises(OSError), Image.open(folder / LATE) as im:
        im.load()
    return folder


def _record(loaded, folder: Path, out: Path, stop_after: int | None = None, resume: bool = False):
    batches = []

    def interrupt(batch):
        batches.append(batch.ids)
        if stop_after is not None and len(batches) == stop_after:
            raise KeyboardInterrupt

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the late file warns each time it is read
        return record_dataset(loaded, str(folder), out, modes=4, attention="rows", batch_size=2, checkpoint_every=2,
                              reducers=[TopKModes(k=3), AnisotropyReducer()], progress=False, on_batch=interrupt,
                              resume=resume)


def _assert_same_run(path_a: Path, path_b: Path) -> None:
    with open_run(path_a) as a, open_run(path_b) as b:
        assert a.complete and b.complete
        assert a.ids == b.ids and a.skipped == b.skipped
        assert a.info == b.info
        assert a.arrays() == b.arrays() and a.arrays()
        for name in a.arrays():
            np.testing.assert_array_equal(a.array(name)[:], b.array(name)[:], err_msg=name)
        assert a.states() == b.states() and a.states()
        for name in a.states():
            sa, sb = a.state(name), b.state(name)
            assert sa.keys() == sb.keys(), name
            for key in sa:
                np.testing.assert_allclose(np.asarray(sa[key]), np.asarray(sb[key]), rtol=1e-12, err_msg=f"{name}/{key}")


@pytest.mark.parametrize("stop_after", [2, 3], ids=["at-a-checkpoint", "between-checkpoints"])
def test_late_decode_failure_then_interruption_then_resume_equals_one_run(tmp_path, stop_after):
    tiny = next(t for t in TINY_MODELS if t.name == "timm-vit-4x6")  # 4 x 6 patches, mean != std
    model = tiny.model()
    loaded = load_model(model, image_config=ImageConfig.from_timm(model))
    folder = _folder(tmp_path)
    clean, broken = tmp_path / "clean.h5", tmp_path / "resumed.h5"
    result = _record(loaded, folder, clean)
    assert result.images == 8 and [Path(p).name for p, _ in result.skipped] == [LATE]

    with pytest.raises(KeyboardInterrupt):
        _record(loaded, folder, broken, stop_after=stop_after)
    with open_run(broken) as run:
        assert not run.complete and LATE not in run.ids and 0 < run.n < 8
    _record(loaded, folder, broken, resume=True)
    _assert_same_run(clean, broken)
    with open_run(clean) as run:  # the run describes the 4 x 6 grid, rows by columns
        assert run.info["grid"] == [4, 6]
