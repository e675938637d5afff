"""The single error type qkhooks raises for bad input (einops style: one type, a message that says the fix)."""


class QKHooksError(Exception):
    """Raised for anything the user can fix: unsupported models, bad arguments, mismatched run files.

    The message always names the problem and what to do about it.
    """
