"""Every error a user can meet, in one module: a message that names the thing to fix.

The command line prints a ``CkapipeError`` as a single line and exits with
status 2; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
from typing import Sequence


class CkapipeError(ValueError):
    """Bad input or an unusable cache; ``str(err)`` is the one-line message."""


class StoreError(CkapipeError):
    """A cache, run or chunk that cannot be used as asked."""


class SpecError(CkapipeError):
    """A model or dataset spec that cannot be resolved."""


class MissingExtra(CkapipeError, ImportError):
    """An optional dependency is missing; the message names the extra to install (an ImportError too)."""


class LayerError(CkapipeError):
    """A layer selection that does not fit the model."""


class ActivationError(CkapipeError):
    """Activations that cannot be stored faithfully (NaN/Inf, beyond float16)."""


class DataError(CkapipeError):
    """Data given as an object (a DataLoader, Dataset, tensor or array) that cannot be used as asked."""


class PipelineError(CkapipeError):
    """A pipeline file, or a study's jobs, that cannot be used; the message names file, line and key."""


def suggest(name: str, choices: Sequence[str], n: int = 3) -> str:
    """``"; did you mean: a, b?"`` for the nearest choices, or an empty string."""
    close = difflib.get_close_matches(name, list(choices), n=n, cutoff=0.5)
    return f"; did you mean: {', '.join(close)}?" if close else ""
