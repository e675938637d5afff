"""Streaming statistics with one protocol (baukit's runningstats idea): update, merge, state_dict.

A reducer is a sink of the recording context: after every complete forward it receives the
:class:`~qkhooks.capture.BatchCapture` (tensors still on the model's device) and folds it into a small
state, so memory never grows with the dataset. ``merge`` combines partial reducers (resumed runs, several
processes) into the result of one pass; ``state_dict``/``load_state_dict`` move the state through the run
file as plain numpy arrays.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from qkhooks.capture import BatchCapture
from qkhooks.errors import QKHooksError

__all__ = ["Reducer", "to_numpy_state"]


class Reducer:
    """Base class of every streaming statistic.

    Class attributes:
        name: key under ``/reducers/`` in the run file.
        needs_inputs: the reducer reads the captured tokens (B, N, d), so the recording must keep them.
        needs_modes: the reducer reads the query/key maps.
    """

    name: str = "reducer"
    needs_inputs: bool = False
    needs_modes: bool = False

    def update(self, batch: BatchCapture) -> None:
        """Fold one complete batch into the state."""
        raise NotImplementedError

    def merge(self, other: "Reducer") -> None:
        """Fold another reducer of the same kind and configuration (a disjoint set of images) into this one."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """The state as numpy arrays and scalars, enough to continue or to finish."""
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state written by :meth:`state_dict`."""
        raise NotImplementedError

    def configuration(self) -> dict[str, Any]:
        """The settings two reducers must share to merge: by default the constructor's arguments that the
        reducer keeps under the same name as plain values (numbers, strings, dtypes, tuples of them).

        None stands for "not known yet" (e.g. a prefix count read off the first batch) and matches anything.
        Reducers whose configuration includes arrays compare those in their own ``merge``.
        """
        kept = [n for n in inspect.signature(type(self).__init__).parameters if hasattr(self, n)]
        plain = {n: _plain(getattr(self, n)) for n in kept}
        return {n: value for n, value in plain.items() if value is not _NOT_PLAIN}

    def _check_same_kind(self, other: "Reducer") -> None:
        """Refuse to merge a reducer of another kind or configuration: every ``merge`` starts with this check."""
        if type(other) is not type(self):
            raise QKHooksError(
                f"cannot merge a {type(other).__name__} into a {type(self).__name__}; merge only reducers of one kind."
            )
        mine, theirs = self.configuration(), other.configuration()
        differ = sorted(k for k in mine.keys() & theirs.keys()
                        if None not in (mine[k], theirs[k]) and mine[k] != theirs[k])
        if differ:
            settings = ", ".join(f"{k}={theirs[k]!r} (here {mine[k]!r})" for k in differ)
            raise QKHooksError(
                f"cannot merge a {type(self).__name__} configured with {settings}; merge only parts recorded with "
                "the same settings."
            )


_NOT_PLAIN = object()


def _plain(value: Any) -> Any:
    """``value`` if it is a plain setting (compared by ==), lists as tuples; ``_NOT_PLAIN`` otherwise."""
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype)):
        return value
    if isinstance(value, (tuple, list)):
        items = tuple(_plain(v) for v in value)
        return _NOT_PLAIN if any(v is _NOT_PLAIN for v in items) else items
    return _NOT_PLAIN


def to_numpy_state(state: dict[str, Any]) -> dict[str, Any]:
    """Tensors -> numpy arrays (on the CPU), leaving scalars and strings alone."""
    out: dict[str, Any] = {}
    for key, value in state.items():
        if hasattr(value, "detach"):
            value = value.detach().cpu().numpy()
        out[key] = value
    return out
