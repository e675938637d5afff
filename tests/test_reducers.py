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
from qkhooks.reducers import Reducer, to_numpy_state


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
    """A reducer with plain settings, one setting it does not keep, and settings that are arrays."""

    name = "scaled"

    def __init__(self, scale: int, offset: int = 0, source: object = None, weights: np.ndarray | None = None,
                 parts: list = ()):
        self.scale, self.offset, self.weights, self.parts = scale, offset, weights, list(parts)
        self.total = 0.0

    def merge(self, other: Reducer) -> None:
        self._check_same_kind(other)
        self.total += other.total


def test_the_configuration_is_the_plain_constructor_arguments_the_reducer_keeps():
    reducer = _Scaled(2, source=object(), weights=np.arange(3.0), parts=[np.zeros(1), 1])
    # not `source` (not kept), not `weights` or `parts` (arrays, or lists holding one)
    assert reducer.configuration() == {"scale": 2, "offset": 0}
    assert _Scaled(2, parts=[1, 2]).configuration() == {"scale": 2, "offset": 0, "weights": None, "parts": (1, 2)}
    reducer.total, other = 1.0, _Scaled(2)  # `weights` None here, an array there: the reducer's own business
    other.total = 2.5
    reducer.merge(other)
    assert reducer.total == 3.5
    message = (r"^cannot merge a _Scaled configured with offset=1 \(here 0\), scale=3 \(here 2\); merge only parts "
               r"recorded with the same settings\.$")
    with pytest.raises(QKHooksError, match=message):
        reducer.merge(_Scaled(3, offset=1))
    assert reducer.total == 3.5


def test_to_numpy_state_moves_tensors_and_leaves_the_rest():
    state = to_numpy_state({"sum": torch.arange(3.0), "k": 3, "name": "x"})
    assert isinstance(state["sum"], np.ndarray) and state["sum"].tolist() == [0.0, 1.0, 2.0]
    assert state["k"] == 3 and state["name"] == "x"
