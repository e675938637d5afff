"""The analyses: each reads recordings (live reducers or run files) and writes tables and figures.

Importing the package registers qkhooks' own reducers by name and the default recipe
(:mod:`qkhooks.analysis.recipes`), which is how the recording core finds them without importing them itself.
"""

from qkhooks.analysis import bfd_reducers, recipes  # noqa: F401  (they register themselves)
