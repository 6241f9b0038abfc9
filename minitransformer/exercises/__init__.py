"""Checkers for the course's exercises (notebooks/): each takes what the student wrote and
returns a Result, shown in the notebook as one line, PASS or FAIL, with the measured error or
the expected value.

    from minitransformer.exercises import unit01 as ex
    ex.check_linear_backward(linear_backward)      # -> PASS linear backward: max relative error 3e-11

A solution not written yet (a student copy's `raise NotImplementedError`) gives
"not implemented yet", not a traceback. One module per unit: unit01.py for notebook 01, ...
The helpers below are what every unit's checkers are made of.
"""
from dataclasses import dataclass

import numpy as np

from ..gradcheck import rel_error


@dataclass
class Result:
    """The outcome of one check: `passed` (None: not implemented yet) and one line saying why."""
    name: str
    passed: bool | None
    message: str

    def __bool__(self):
        return bool(self.passed)

    def __repr__(self):
        if self.passed is None:
            return f"not implemented yet: {self.name} ({self.message})"
        return f"{'PASS' if self.passed else 'FAIL'} {self.name}: {self.message}"

    _repr_pretty_ = lambda self, p, cycle: p.text(repr(self))  # noqa: E731  (IPython's display)


def attempt(name, fn, *args, **kwargs):
    """Call the student's fn -> (value, None), or (None, Result) when it is not written yet or
    raised: the Result says so in one line instead of a traceback."""
    try:
        return fn(*args, **kwargs), None
    except NotImplementedError:
        return None, Result(name, None, "write your solution in the cell above, run it, then run this cell again")
    except Exception as e:  # the student's code failed: say how, in one line
        return None, Result(name, False, f"your code raised {type(e).__name__}: {e}")


def compare(name, got, expected, tolerance, what="max relative error"):
    """PASS when rel_error(got, expected) <= tolerance (arrays or numbers); FAIL names the error,
    or the shape/dtype mismatch."""
    got_a, exp_a = np.asarray(got), np.asarray(expected)
    if got_a.shape != exp_a.shape:
        return Result(name, False, f"expected shape {exp_a.shape}, got {got_a.shape}")
    if not np.all(np.isfinite(got_a)):
        return Result(name, False, "your result holds NaN or inf")
    err = rel_error(got_a, exp_a)
    verdict = "<=" if err <= tolerance else ">"
    return Result(name, err <= tolerance, f"{what} {err:.1e} {verdict} {tolerance:.0e}")


def is_number(value):
    """A real number (Python's or NumPy's), and not a bool (True is not the answer 1)."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def is_integer(value):
    """An int (Python's or NumPy's), and not a bool: a count the student gives."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_number(name, got, expected, tolerance=0.0):
    """A number the student worked out: PASS when |got - expected| <= tolerance."""
    if not is_number(got):
        return Result(name, False, f"expected a number, got {type(got).__name__}")
    ok = abs(got - expected) <= tolerance
    return Result(name, ok, f"got {got}" + ("" if ok else f", expected {expected}"))
