"""Streaming statistics with one protocol (baukit's runningstats idea): update, merge, state_dict.

A reducer is a sink of the recording context: after every complete forward it receives the
:class:`~qkhooks.capture.BatchCapture` (tensors still on the model's device) and folds it into a small
state, so memory never grows with the dataset. ``merge`` combines partial reducers (resumed runs, several
processes) into the result of one pass; ``state_dict``/``load_state_dict`` move the state through the run
file as plain numpy arrays.
"""

from __future__ import annotations

from typing import Any

from qkhooks.capture import BatchCapture

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

    def _check_same_kind(self, other: "Reducer") -> None:
        from qkhooks.errors import QKHooksError

        if type(other) is not type(self):
            raise QKHooksError(f"cannot merge a {type(other).__name__} into a {type(self).__name__}.")


def to_numpy_state(state: dict[str, Any]) -> dict[str, Any]:
    """Tensors -> numpy arrays (on the CPU), leaving scalars and strings alone."""
    out: dict[str, Any] = {}
    for key, value in state.items():
        if hasattr(value, "detach"):
            value = value.detach().cpu().numpy()
        out[key] = value
    return out
