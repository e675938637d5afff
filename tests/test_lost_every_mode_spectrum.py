"""A repaired run that lost a layer's every-mode sigma (``spectrum/L{l}/S_all``) to damage: the modes analysis refuses
that layer naming what is not known (the sigma-weighted cosine over all modes, which the anisotropy note describes,
and whether the last kept mode ties with the next), not that its modes are unknown: U, S, V and cos are in the copy.
It never gives the weighted cosine of the kept modes alone, and the other layers are analysed as in the whole run."""

from __future__ import annotations

from pathlib import Path

import h5py
import timm
import pytest
import torch

import qkhooks
from qkhooks import QKHooksError
from qkhooks.analysis.modes import analyze_modes
from qkhooks.store import format as fmt
from qkhooks.store import open_run
from qkhooks.stream import record_dataset


def _flip_static(path: Path, name: str) -> None:
    """One bit flipped inside the data of the static ``name``, one Fletcher-32 chunk in a --checksum run."""
    with h5py.File(path, "r") as f:
        at = f[name].id.get_chunk_info(0).byte_offset + 2
    with open(path, "r+b") as fh:
        fh.seek(at)
        byte = fh.read(1)[0]
        fh.seek(at)
        fh.write(bytes([byte ^ 0x08]))


def test_a_repaired_run_that_lost_S_all_is_refused_naming_what_is_unknown_not_its_modes(tmp_path):
    torch.manual_seed(0)
    loaded = qkhooks.load_model(timm.create_model("vit_small_patch16_224", pretrained=False, patch_size=32,
                                                  embed_dim=32, depth=2, num_heads=2).eval())
    run_path = tmp_path / "run.h5"
    record_dataset(loaded, "o3:8:1", run_path, modes=2, batch_size=4, progress=False, checksum=True)
    whole = analyze_modes(run_path, tmp_path / "whole", images=False)
    _flip_static(run_path, "spectrum/L0/S_all")
    fixed = tmp_path / "fixed.h5"
    report = qkhooks.store.repair(run_path, fixed)
    assert report.lost == [] and any("spectrum/L0/S_all" in line for line in report.problems), report.problems
    with open_run(fixed) as run:
        assert fmt.lost_statics(run.attrs) == ["spectrum/L0/S_all"]

    with pytest.raises(QKHooksError) as refused:
        analyze_modes(fixed, tmp_path / "fixed", images=False)
    words = str(refused.value)
    assert "lost spectrum/L0/S_all to damage" in words and "modes of those layers are not known" not in words
    assert "sigma-weighted cosine over all modes" in words and "ties" in words and "--layers" in words
    assert "qkhooks spectrum MODEL" in words
    with open_run(fixed) as run:  # what the words say the copy holds
        assert {"U", "S", "V", "cos"} <= set(run.spectrum_arrays(0))
    other = analyze_modes(fixed, tmp_path / "other", images=False, layers="1")
    assert other["anisotropy"][1] == whole["anisotropy"][1]
