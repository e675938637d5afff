"""Strict JSON for summaries the library writes (reports, analysis results) and the command line prints."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["jsonable", "write_json"]


def jsonable(value: Any, digits: int | None = None) -> Any:
    """NaN/inf -> None, numpy scalars -> Python, recursively (optionally rounded), so the output is strict JSON."""
    if isinstance(value, dict):
        return {str(k): jsonable(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v, digits) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (np.floating, float)):
        if not math.isfinite(float(value)):
            return None
        return float(value) if digits is None else round(float(value), digits)
    if isinstance(value, np.integer):
        return int(value)
    return value


def write_json(path: str | Path, payload: dict) -> None:
    """``payload`` as indented strict JSON at ``path`` (its folder created): NaN and inf written as null
    (:func:`jsonable`), never as the ``NaN`` other JSON readers refuse."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(jsonable(payload), indent=1, allow_nan=False))
