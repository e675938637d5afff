"""Tests written to kill mutants of reducers, models (base, timm, hf), stream, store, data/preprocess and the
analyses' statistics that survived the rest of the suite (tests/MUTATION.md, round 11), each against an
independent reference: numpy, a direct computation, or a run file read back with h5py."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from qkhooks.errors import QKHooksError
from qkhooks.reducers import (_RECIPES, _REDUCERS, DESCRIPTION_KEY, Recipe, Reducer, describe_state, recipe,
                              reducer_class)


# ------------------------------------------------------------------------------------------------ reducers
@pytest.fixture
def registered():
    """Reducer kinds defined by a test, registered under a name of their own and forgotten afterwards."""
    made: list[str] = []

    def define(name: str, init, state_keys=("total",)) -> type[Reducer]:
        def state_dict(self):
            return {k: np.asarray(getattr(self, k)) for k in state_keys}

        def load_state_dict(self, state):
            for k in state_keys:
                setattr(self, k, float(state[k]))

        made.append(name)
        return type(name, (Reducer,), {"name": name, "__init__": init, "state_dict": state_dict,
                                       "load_state_dict": load_state_dict})

    yield define
    for name in made:
        _REDUCERS.pop(name, None)


def test_a_reducer_rebuilt_from_its_state_gets_the_context_the_state_cannot_hold(registered):
    """``from_state(..., **context)`` hands the context (e.g. BFD's ``spectra=``) to the rebuilt reducer."""

    def init(self, scale: int = 1, source: object = None):
        self.scale, self.source, self.total = scale, source, 0.0

    kind = registered("test_kills_rest_context", init)
    saved = kind(scale=3, source=object())  # not a plain setting: not in the configuration
    saved.total = 2.5
    source = object()
    rebuilt = Reducer.from_state(saved.saved_state(), source=source)
    assert type(rebuilt) is kind and rebuilt.source is source and rebuilt.scale == 3 and rebuilt.total == 2.5


def test_a_configuration_that_is_only_a_dtype_round_trips_through_the_saved_description(registered):
    """The description's top level is the configuration dict itself, so a reducer whose one setting is named
    ``dtype`` must not be read back as a bare dtype (only nested ``{"dtype": name}`` dicts are dtypes)."""

    def init(self, dtype: torch.dtype = torch.float32):
        self.dtype, self.total = dtype, 0.0

    kind = registered("test_kills_rest_dtype", init)
    saved = kind(dtype=torch.float16).saved_state()
    assert describe_state(saved) == ("test_kills_rest_dtype", {"dtype": torch.float16})
    assert Reducer.from_state(saved).dtype is torch.float16


def test_a_configuration_holding_a_tuple_of_dtypes_round_trips_through_the_saved_description(registered):
    def init(self, sizes: tuple = (), dtypes: tuple = (torch.float32,)):
        self.dtypes, self.sizes, self.total = dtypes, sizes, 0.0

    kind = registered("test_kills_rest_dtypes", init)
    saved = kind(dtypes=(torch.float16, torch.bfloat16), sizes=[2, 3]).saved_state()
    # the description is JSON in UTF-8 bytes, keys sorted (not in the constructor's order, so the same settings give
    # the same bytes), dtypes as {"dtype": name}, tuples as lists
    assert bytes(saved[DESCRIPTION_KEY]) == (b'{"config": {"dtypes": [{"dtype": "float16"}, {"dtype": "bfloat16"}], '
                                             b'"sizes": [2, 3]}, "kind": "test_kills_rest_dtypes"}')
    assert describe_state(saved) == ("test_kills_rest_dtypes",
                                     {"dtypes": (torch.float16, torch.bfloat16), "sizes": (2, 3)})


def test_a_description_given_as_a_list_of_byte_values_is_read_as_bytes():
    """``describe_state`` reads the description as bytes whatever container holds them (a state that went through
    ``tolist()`` or JSON holds Python ints, which numpy would otherwise make 8 bytes wide)."""
    text = b'{"kind": "topk_modes", "config": {"k": 2}}'
    assert describe_state({DESCRIPTION_KEY: list(text)}) == ("topk_modes", {"k": 2})
    assert describe_state({DESCRIPTION_KEY: np.frombuffer(text, dtype=np.uint8).astype(np.int64)}) == (
        "topk_modes", {"k": 2})


def test_describing_a_state_refuses_a_missing_description_and_another_kind_with_the_whole_message():
    with pytest.raises(QKHooksError) as missing:
        describe_state({"total": np.zeros(1)})
    assert str(missing.value) == ("this reducer state does not say which reducer wrote it (saved before reducers "
                                  "described themselves); pass kind=NAME, the name it is saved under.")
    described = {DESCRIPTION_KEY: np.frombuffer(b'{"kind": "topk_modes", "config": {}}', dtype=np.uint8)}
    with pytest.raises(QKHooksError) as other:
        describe_state(described, kind="anisotropy")
    assert str(other.value) == "the state saved as 'anisotropy' was written by a 'topk_modes' reducer."


def test_loading_a_state_of_another_configuration_is_refused_with_the_whole_message(registered):
    def init(self, scale: int = 1):
        self.scale, self.total = scale, 0.0

    kind = registered("test_kills_rest_scale", init)
    into = kind(scale=4)
    with pytest.raises(QKHooksError) as refused:
        into.load_saved(kind(scale=3).saved_state())
    assert str(refused.value) == ("cannot load a test_kills_rest_scale state saved with scale=3 (here 4); build the "
                                  "reducer with the saved settings (or start the run again).")


@pytest.mark.parametrize("lookup", ["reducer_class", "recipe"])
def test_kinds_and_recipes_not_registered_yet_are_looked_for_in_the_builtin_analyses_package(lookup, tmp_path,
                                                                                            monkeypatch):
    """``reducer_class`` and ``recipe`` import :data:`BUILTIN_ANALYSES` when asked for a name nobody registered:
    a stand-in package that registers one kind (or one recipe) when imported must be imported by the lookup."""
    module = f"kills_rest_analyses_{lookup}"
    registers = ("class Late(Reducer):\n    name = 'test_kills_rest_late'\n" if lookup == "reducer_class" else
                 "LATE = register_recipe(Recipe('test_kills_rest_late'))\n")
    (tmp_path / f"{module}.py").write_text("from qkhooks.reducers import Recipe, Reducer, register_recipe\n"
                                           + registers)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr("qkhooks.reducers.BUILTIN_ANALYSES", module)
    monkeypatch.delitem(sys.modules, module, raising=False)
    try:
        if lookup == "reducer_class":
            assert reducer_class("test_kills_rest_late").__module__ == module
        else:
            assert recipe("test_kills_rest_late").name == "test_kills_rest_late"
    finally:
        _REDUCERS.pop("test_kills_rest_late", None)
        _RECIPES.pop("test_kills_rest_late", None)
        sys.modules.pop(module, None)


def test_a_recipe_hands_its_build_the_modes_attention_and_target_flag_and_the_default_recipe_is_named_default():
    calls = []
    mine = Recipe("test_kills_rest_args", build=lambda *args: calls.append(args) or [])
    assert mine.reducers("modes", ["spec"], True) == [] and calls == [("modes", ["spec"], True)]
    assert recipe().name == "default" and recipe() is recipe("default")
    with pytest.raises(QKHooksError) as unknown:
        recipe("test_kills_rest_nobody")
    assert str(unknown.value) == f"no recipe is registered as 'test_kills_rest_nobody'; registered: {sorted(_RECIPES)}."
    assert "default" in str(unknown.value)
