"""Checking a value where it enters: each function refuses a bad one with a ValueError that
names the field, says what was expected and shows what came.

    integer("n_layers", 0)                 n_layers: expected a positive integer, got 0
    number("ln_eps", nan, "a number > 0", lambda v: v > 0)
                                           ln_eps: expected a number > 0, got nan
    flag("causal", 1)                      causal: expected True or False, got 1
    choice("init", "he", ("gaussian", "kaiming"))
                                           init: expected one of ('gaussian', 'kaiming'), got 'he'
    subset("targets", ("q", "x"), ("q", "k", "v"))
                                           targets: expected distinct names from (...), ...
"""
import math

import numpy as np

_INTEGER_WORDS = {0: "a non-negative integer", 1: "a positive integer"}


def integer(name, value, least=1, expected=None):
    """An int (NumPy's too) >= least. A bool is refused: n_layers=True is a mistake, not 1."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < least:
        expected = expected or _INTEGER_WORDS.get(least, f"an integer >= {least}")
        raise ValueError(f"{name}: expected {expected}, got {value!r}")
    return value


def number(name, value, expected, ok):
    """A real, finite number (not a bool; NaN and inf refused) for which ok(value) is True."""
    real = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
    if not (real and math.isfinite(value) and ok(value)):
        raise ValueError(f"{name}: expected {expected}, got {value!r}")
    return value


def flag(name, value):
    """True or False, nothing else (1, "yes" and None are refused)."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name}: expected True or False, got {value!r}")
    return value


def choice(name, value, choices):
    """One of `choices`."""
    if value not in choices:
        raise ValueError(f"{name}: expected one of {choices}, got {value!r}")
    return value


def subset(name, value, choices, allow_empty=False):
    """A tuple of distinct names from `choices` (a list, as from a JSON file, becomes a tuple)."""
    if isinstance(value, str) or not isinstance(value, (tuple, list)):
        raise ValueError(f"{name}: expected a tuple of names from {choices}, got {value!r}")
    bad = [v for v in value if v not in choices]
    if bad or len(set(value)) != len(value) or not (value or allow_empty):
        raise ValueError(f"{name}: expected distinct names from {choices}"
                         f"{'' if allow_empty else ', at least one'}, got {tuple(value)!r}")
    return tuple(value)
