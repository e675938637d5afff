"""The README's Python snippets run as written (in order, one namespace), so the quick start cannot rot."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

import qkhooks
from qkhooks.models.base import _ADAPTERS, adapters

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_the_two_setup_commands():
    text = README.read_text()
    setup = text.split("## Set-up on a fresh machine", 1)[1].split("##", 1)[0]
    commands = [line.split("#")[0].strip() for line in re.findall(r"```bash\n(.*?)```", setup, flags=re.S)[0].splitlines()]
    assert [c for c in commands if c] == ["make demo", "make test"]


def test_readme_python_snippets_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    blocks = python_blocks()
    assert len(blocks) >= 3
    namespace: dict = {}
    try:
        for i, block in enumerate(blocks):
            try:
                exec(compile(block, f"README.md python block {i}", "exec"), namespace)
            except Exception as exc:  # pragma: no cover - the message points at the block
                pytest.fail(f"README python block {i} failed: {exc!r}\n{block}")
        assert "mynet" in {name for name, _ in adapters()}
    finally:
        _ADAPTERS[:] = [a for a in _ADAPTERS if a.name != "mynet"]
    # The quick start's claims hold on what it produced.
    assert tuple(namespace["query"].shape) == (2, 6, 16, 197)
    assert tuple(namespace["rows"].shape) == (2, 6, 2, 197)
    assert namespace["result"].images == 4 and namespace["top"] is not None
    # The mode-over-a-photo snippet draws the mode's best image with that image's own stored maps (round 40).
    best, item = namespace["best"], namespace["item"]
    assert item["id"] == namespace["names"][0] and namespace["picture"].shape == (224, 224, 3)
    with qkhooks.open_run(tmp_path / "quickstart.h5") as run:
        i, sign = int(best["index"][0]), int(best["sign"][0])
        for side, stored in (("query", run.query(5)), ("key", run.key(5))):
            np.testing.assert_allclose(best[side][0], sign * np.asarray(stored[i, 0, 0], np.float32), rtol=1e-3, atol=1e-3)
    assert "layer" in capsys.readouterr().out.lower()
