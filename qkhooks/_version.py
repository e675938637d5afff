"""The package version, in a module of its own so that library modules can stamp it without importing ``qkhooks``
itself (which imports them: a cycle)."""

__version__ = "0.1.0"

#: The release that drops the old spellings which still answer with a DeprecationWarning (issue 18's renames).
REMOVED_IN = "0.2"
