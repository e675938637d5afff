"""The reducer protocol: a merge of another kind or another configuration is refused, never folded in."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qkhooks import QKHooksError
from qkhooks.analysis.bfd_reducers import PositionMeans
from qkhooks.analysis.modes import AnisotropyReducer, TopKModes
from qkhooks.analysis.preference import PreferenceReducer
from qkhooks.capture import BatchCapture, LayerCapture
from qkhooks.reducers import Reducer


def _tokens_batch(x: torch.Tensor, offset: int = 0) -> BatchCapture:
    ids = [str(offset + i) for i in range(x.shape[0])]
    layers = {0: LayerCapture(layer=0, batch_size=x.shape[0], inputs=x)}
    return BatchCapture(ids=ids, meta={"num_prefix_tokens": 1, "grid": (2, 3)}, layers=layers, offset=offset)


@pytest.mark.parametrize(
    "mine, theirs",
    [
        (TopKModes(k=4), AnisotropyReducer()),
        (AnisotropyReducer(), PreferenceReducer()),
        (PositionMeans(), AnisotropyReducer()),
        (PreferenceReducer(), TopKModes(k=4)),
    ],
    ids=lambda r: type(r).__name__,
)
def test_merge_of_another_kind_is_refused(mine, theirs):
    with pytest.raises(QKHooksError, match=f"cannot merge a {type(theirs).__name__} into a {type(mine).__name__}"):
        mine.merge(theirs)


@pytest.mark.parametrize(
    "mine, theirs, setting",
    [
        (TopKModes(k=4), TopKModes(k=3), "k=3"),
        (TopKModes(k=4, map_dtype="float16"), TopKModes(k=4, map_dtype="float32"), "map_dtype"),
        (TopKModes(k=4, num_prefix_tokens=1), TopKModes(k=4, num_prefix_tokens=2), "prefix"),
        (AnisotropyReducer(grid=(2, 3)), AnisotropyReducer(grid=(3, 2)), r"grid=\(3, 2\)"),
        (AnisotropyReducer(num_prefix_tokens=1), AnisotropyReducer(num_prefix_tokens=0), "num_prefix_tokens=0"),
        (PositionMeans(layers=[0]), PositionMeans(layers=[0, 1]), r"layers=\(0, 1\)"),
        (PositionMeans(dtype=torch.float64), PositionMeans(dtype=torch.float32), "dtype"),
    ],
)
def test_merge_of_another_configuration_is_refused_and_leaves_the_state_alone(mine, theirs, setting):
    before = {k: v.copy() if hasattr(v, "copy") else v for k, v in mine.state_dict().items()}
    with pytest.raises(QKHooksError, match=setting):
        mine.merge(theirs)
    after = mine.state_dict()
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert (after[key] == value).all() if hasattr(value, "all") else after[key] == value, key


def test_anisotropy_parts_on_different_grids_do_not_merge_but_same_grids_add_up():
    """Same tokens, grids (2, 3) and (3, 2): the centre tokens differ, so the parts measure different things."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7, 4, generator=g, dtype=torch.float64)
    whole, a, b = AnisotropyReducer(grid=(2, 3)), AnisotropyReducer(grid=(2, 3)), AnisotropyReducer(grid=(2, 3))
    whole.update(_tokens_batch(x))
    a.update(_tokens_batch(x[:2]))
    b.update(_tokens_batch(x[2:], offset=2))
    a.merge(b)
    assert a.baselines()[0] == pytest.approx(whole.baselines()[0], abs=1e-12)
    with pytest.raises(QKHooksError, match="grid"):
        a.merge(AnisotropyReducer(grid=(3, 2)))


def test_unset_settings_are_learnt_not_refused():
    """A prefix count still unknown (None, read off the first batch) matches any known one."""
    a, b = AnisotropyReducer(), AnisotropyReducer(num_prefix_tokens=1)
    b.update(_tokens_batch(torch.randn(3, 7, 4)))
    a.merge(b)
    assert a.num_prefix_tokens == 1 and a.count == b.count


class _Scaled(Reducer):
    """A reducer with one plain setting, one setting it does not keep and one it keeps as an array."""

    name = "scaled"

    def __init__(self, scale: int, source: object = None, weights: np.ndarray | None = None):
        self.scale = scale
        self.weights = np.ones(3) if weights is None else weights
        self.total = 0.0

    def merge(self, other: Reducer) -> None:
        self._check_same_kind(other)
        self.total += other.total


def test_the_configuration_is_the_plain_constructor_arguments_the_reducer_keeps():
    reducer = _Scaled(2, source=object(), weights=np.arange(3.0))
    assert reducer.configuration() == {"scale": 2}  # not `source` (not kept), not `weights` (an array)
    reducer.total, other = 1.0, _Scaled(2, weights=np.zeros(3))
    other.total = 2.5
    reducer.merge(other)  # arrays are the reducer's own business to compare
    assert reducer.total == 3.5
    with pytest.raises(QKHooksError, match=r"scale=3 \(here 2\)"):
        reducer.merge(_Scaled(3))
    assert reducer.total == 3.5
