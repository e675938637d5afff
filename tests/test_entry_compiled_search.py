"""Round 27 (issue 20): entering ``record()`` again on an unchanged model no longer walks the module tree for compiled
modules where qkhooks hooks (~0.35 ms of a ViT-S entry): whether any module is compiled is part of the cached sites'
structure key, found once per key. A model, or a module inside it, compiled between two entries is still refused at
the next one, with the same words as a fresh entry."""

from __future__ import annotations

import pytest
import torch

import qkhooks
from qkhooks import capture
from qkhooks.errors import QKHooksError
from conftest import TINY_MODELS, count_calls


def _enter(model: torch.nn.Module) -> None:
    with torch.no_grad(), qkhooks.record(model, modes=4):
        pass


def test_an_unchanged_model_is_not_searched_for_compiled_modules_again(monkeypatch):
    model = TINY_MODELS[0].model()
    _enter(model)  # fills the cache (and finds nothing compiled)
    walked = count_calls(monkeypatch, capture, "refuse_compiled")
    searched = count_calls(monkeypatch, capture, "compiled_by_dynamo")
    for _ in range(3):
        _enter(model)
    assert walked == [0] and searched == [0]


def _compile(model: torch.nn.Module, how: str) -> torch.nn.Module:
    """``model`` compiled (eager backend: nothing runs, the refusal comes at entry) in one of the ways users do."""
    if how == "model.compile":
        model.compile(backend="eager")
    elif how == "attention module compiled":
        model.blocks[1].attn.compile(backend="eager")
    else:
        model.blocks[1].attn = torch.compile(model.blocks[1].attn, backend="eager")
    return model


@pytest.mark.parametrize("how", ["model.compile", "attention module compiled", "wrapper in place"])
def test_a_model_compiled_between_entries_is_refused_at_the_next_as_a_fresh_entry_refuses_it(how):
    with pytest.raises(QKHooksError) as fresh:  # nothing cached for this model
        qkhooks.record(_compile(TINY_MODELS[0].model(), how), modes=4)
    model = TINY_MODELS[0].model()
    _enter(model)
    _enter(model)  # the cache holds its sites and its verdict: nothing compiled
    _compile(model, how)
    with pytest.raises(QKHooksError) as cached:
        qkhooks.record(model, modes=4)
    assert str(cached.value) == str(fresh.value) and "is compiled by torch.compile" in str(cached.value)
