"""qkhooks: query-key SVD modes, attention maps and position/content factors of unmodified ViTs."""

__version__ = "0.1.0"

from qkhooks.errors import QKHooksError

__all__ = ["QKHooksError", "__version__"]
