"""argparse types that validate numbers and lists when the command line is parsed, with a message naming the flag
(`int_at_least(1)`, `float_at_least(0)`, `finite_float`, `number_list(int, "--timesteps")`, ...): NaN and
infinities are never accepted."""

import argparse
import math

from .validation import InputError, parse_list


def _number(kind, text: str):
    try:
        value = kind(text)
    except ValueError:
        kind_name = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"must be {kind_name}, got {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def finite_float(text: str) -> float:
    """argparse type: any finite float (NaN and +-inf refused)."""
    return _number(float, text)


def int_at_least(low: int):
    """argparse type: an integer >= `low`."""

    def parse(text: str) -> int:
        value = _number(int, text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}")
        return value

    parse.__name__ = f"int_at_least_{low}"
    return parse


def float_at_least(low: float, strict: bool = False):
    """argparse type: a finite float >= `low` (> `low` when `strict`)."""

    def parse(text: str) -> float:
        value = _number(float, text)
        if value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"must be a number {'>' if strict else '>='} {low:g}, got {text!r}")
        return value

    parse.__name__ = f"float_at_least_{low:g}"
    return parse


def float_in(low: float, high: float, high_open: bool = False):
    """argparse type: a finite float in [low, high] ([low, high) when `high_open`)."""

    def parse(text: str) -> float:
        value = _number(float, text)
        if not low <= value <= high or (high_open and value == high):
            raise argparse.ArgumentTypeError(
                f"must lie in [{low:g}, {high:g}{')' if high_open else ']'}, got {text!r}"
            )
        return value

    parse.__name__ = f"float_in_{low:g}_{high:g}"
    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)
positive_float = float_at_least(0.0, strict=True)
non_negative_float = float_at_least(0.0)


def number_list(kind, flag: str, low=None):
    """argparse type: comma-separated integers (`kind=int`) or finite numbers (`kind=float`), each >= `low` when
    given, e.g. `--timesteps 22,0`; parsed by [`cm_diffusers.validation.parse_list`], as the server parses its
    form fields."""

    def parse(text: str) -> list:
        try:
            return parse_list(text, kind, flag, low)
        except InputError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    parse.__name__ = f"{kind.__name__}_list"
    return parse
