"""Checks of user input that several entry points share (the pipeline, the editing methods, the teacher samplers,
the commands and the server), written once, with errors that carry the field they name.

`InputError` is a `ValueError` with a `field` attribute, so a caller that reports errors per field (the HTTP API's
422 responses, argparse's messages) reads the field instead of parsing the message.
"""

import math
from typing import Callable, Optional

import numpy as np
import torch


class InputError(ValueError):
    """A `ValueError` about one input; `field` names it as the caller's API spells it (e.g. "sigmas")."""

    def __init__(self, message: str, field: Optional[str] = None):
        super().__init__(message)
        self.field = field


def _as_list(values) -> list:
    if isinstance(values, (torch.Tensor, np.ndarray)):
        return values.reshape(-1).tolist()
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise TypeError
    return list(values)


def parse_list(text: str, kind: Callable = float, field: str = "value", low=None) -> list:
    """`"22, 0"` -> `[22, 0]`: comma-separated integers (`kind=int`) or finite numbers (`kind=float`), each
    >= `low` when given; an [`InputError`] naming `field` for anything else (empty items are skipped)."""
    noun = "integers" if kind is int else "numbers"
    items = [item.strip() for item in str(text).split(",") if item.strip()]
    try:
        values = [kind(item) for item in items]
    except (ValueError, OverflowError):
        raise InputError(f"{field} must be comma-separated {noun}, got {text!r}.", field) from None
    if not values:
        raise InputError(f"{field} must list at least one of the comma-separated {noun}, got {text!r}.", field)
    if kind is float and not all(math.isfinite(value) for value in values):
        raise InputError(f"{field} must be comma-separated finite numbers, got {text!r}.", field)
    if low is not None and min(values) < low:
        raise InputError(f"{field} must list {noun} >= {low}, got {text!r}.", field)
    return values


def validate_sigmas(sigmas, low: float, high: float = math.inf, min_length: int = 1, field: str = "sigmas"):
    """Strictly descending, finite noise levels within [low, high] (a relative 1e-6 slack at `high` and an absolute
    1e-9 at `low`, so float32 round trips of the end points pass), at least `min_length` of them; float64 array."""
    try:
        values = np.asarray(_as_list(sigmas), dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        values = None
    if values is None or values.ndim != 1 or values.size < min_length or not np.all(np.isfinite(values)):
        count = "a non-empty" if min_length <= 1 else f"an at least {min_length}-long"
        raise InputError(f"`{field}` must be {count} 1-D list of strictly descending, finite noise levels, got "
                         f"{sigmas!r}.", field)
    if np.any(values[1:] >= values[:-1]):
        raise InputError(f"`{field}` must be strictly descending, got {values.tolist()}.", field)
    if values[-1] < low - 1e-9 or values[0] > high * (1 + 1e-6):
        where = f"within [sigma_min={low}, sigma_max={high}]" if math.isfinite(high) else f">= sigma_min={low}"
        raise InputError(f"`{field}` must be strictly descending noise levels {where} of this model, got "
                         f"{values.tolist()}.", field)
    return values


def validate_timesteps(timesteps, num_train_timesteps: int, field: str = "timesteps") -> np.ndarray:
    """Strictly descending integer indices into a `num_train_timesteps`-point grid (0 = sigma_max); int64 array."""
    try:
        values = _as_list(timesteps)
    except TypeError:
        values = None
    if not values:
        raise InputError(f"`{field}` must be a non-empty list of grid indices, e.g. [0] for one step, got "
                         f"{timesteps!r}.", field)
    if any(isinstance(v, bool) or not _is_integral(v) for v in values):
        raise InputError(
            f"`{field}` must be integer indices into the {num_train_timesteps}-point training grid (e.g. [22, 0]), "
            f"got {values}; pass `sigmas` for arbitrary noise levels.", field
        )
    indices = [int(v) for v in values]
    if any(b >= a for a, b in zip(indices, indices[1:])):
        raise InputError(f"`{field}` must be strictly descending (e.g. [22, 0]), got {indices}.", field)
    if indices[0] >= num_train_timesteps or indices[-1] < 0:
        raise InputError(
            f"`{field}` must lie in [0, {num_train_timesteps - 1}] (num_train_timesteps={num_train_timesteps}), "
            f"got {indices}.", field
        )
    return np.asarray(indices, dtype=np.int64)


def _is_integral(value) -> bool:
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return False
    return math.isfinite(number) and number == int(value)
