"""The analyses: each reads recordings (live reducers or run files) and writes tables and figures.

Importing the package registers qkhooks' own reducers by name and the default recipe
(:mod:`qkhooks.analysis.recipes`), which is how the recording core finds them without importing them itself.
"""

from qkhooks.analysis import bfd_reducers, recipes  # noqa: F401  (they register themselves)


def __getattr__(name: str) -> object:
    """``qkhooks.analysis.bfd`` (and each analysis module) after a plain ``import qkhooks``: imported on first use."""
    import importlib
    import importlib.util

    if importlib.util.find_spec(f"{__name__}.{name}") is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return importlib.import_module(f"{__name__}.{name}")
