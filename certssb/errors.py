"""Errors raised at the package's boundaries.

`CertssbError` is a user error: bad input, a missing file, a setting that
cannot work. Its message says what was wrong and what to do; the CLI prints
it without a traceback and exits with status 2. Anything else escaping the
package is a bug.
"""
from __future__ import annotations


class CertssbError(ValueError):
    """A user-facing error whose message says what was wrong and what to do."""


class DataError(CertssbError):
    """A dataset is missing, truncated, corrupt or of the wrong shape."""


class CheckpointError(CertssbError):
    """A checkpoint, sigma file or region store is missing, corrupt or unsafe."""
