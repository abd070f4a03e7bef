"""The project's one error type for user mistakes.

Code that checks a user's input (config values, datasets, weights, files) raises
:class:`UserError` with a message naming the file, key or numbers. The command-line entry points
turn this type, and only this type, into a one-line ``error: ...``; every other exception is a
bug and keeps its traceback.
"""

__all__ = ["UserError"]


class UserError(ValueError):
    """A mistake in the user's input. Subclasses ``ValueError`` so that callers that already
    expect a ``ValueError`` for a bad value keep working."""
