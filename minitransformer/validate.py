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

from . import sizes

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


def model_inputs(config, ids, pad_mask, task_config=None, dtype=np.float32):
    """Refuse what Transformer.forward cannot run: ids (B, T) integer token ids below vocab_size,
    T <= max_len, a batch that fits in memory; pad_mask None or (B, T) bool with a real token in
    every row (a row of padding only would leave its queries nothing to attend to)."""
    if not isinstance(ids, np.ndarray) or not np.issubdtype(ids.dtype, np.integer):
        got = ids.dtype if isinstance(ids, np.ndarray) else type(ids).__name__
        raise TypeError(f"ids: expected an integer numpy array of token ids, got {got}")
    if ids.ndim != 2:
        raise ValueError(f"ids: expected shape (batch, seq_len), got shape {ids.shape}")
    if ids.size == 0:
        raise ValueError(f"ids: expected at least one sequence of at least one token, got shape {ids.shape}")
    if ids.shape[1] > config.max_len:
        raise ValueError(f"ids: expected seq_len <= max_len={config.max_len}, got seq_len={ids.shape[1]}")
    sizes.check_fits(sizes.activation_count(config, *ids.shape, task_config) * np.dtype(dtype).itemsize,
                     f"ids: a batch of shape {ids.shape} (split it into smaller batches)")
    if ids.min() < 0 or ids.max() >= config.vocab_size:
        bad = ids[(ids < 0) | (ids >= config.vocab_size)].flat[0]
        raise ValueError(f"ids: expected token ids in [0, {config.vocab_size}), got {bad}")
    if pad_mask is not None:
        if not isinstance(pad_mask, np.ndarray) or pad_mask.dtype != bool or pad_mask.shape != ids.shape:
            got = (pad_mask.dtype, pad_mask.shape) if isinstance(pad_mask, np.ndarray) else type(pad_mask)
            raise ValueError(f"pad_mask: expected a bool array of shape {ids.shape}, got {got}")
        empty = np.flatnonzero(~pad_mask.any(axis=1))
        if empty.size:
            raise ValueError(f"pad_mask: expected at least one real token (True) in every row, "
                             f"got row {empty[0]} with none")
