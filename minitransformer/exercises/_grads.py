"""Checking a student's backward against a reference, case after case (units 01, 02, 04, 07)."""
import numpy as np

from . import TOL32, TOL64, as_array, attempt, fail, rel_error, unchanged, unpack


def tolerance(*arrays):
    """TOL32 when any input is float32 (the student may compute in it), else TOL64."""
    return TOL32 if any(isinstance(a, np.ndarray) and a.dtype == np.float32 for a in arrays) else TOL64


def run_case(name, fn, args, labels, expected, where, reference, forbid=(), hint=None, passed=()):
    """Call fn(*copies of args) and compare what it returns with `expected`, {name: array}
    (one entry: a single array is expected; several: a tuple in that order).

    reference = (function, inputs): what computed `expected`, function(*inputs) in float64;
    term_sizes measures with it how large the terms are that meet in each output, and the
    error is taken relative to the larger of that size and the output's own entries. (A db
    that sums six terms of size 1 to 0.001 carries their rounding, 6e-8 each in float32: a
    correct answer is off by ~1e-4 of the sum, ~1e-7 of its terms.)

    -> (worst relative error, None), or (None, Result): the first problem, in one line.
    hint(key, got_array) -> "" or "; why" names a known slip when a value is wrong; when an
    earlier case of other sizes passed (`passed`, their descriptions), a size written into the
    code is the likelier reason, and the line says so instead."""
    copies = [a.copy() if isinstance(a, np.ndarray) else a for a in args]
    got, failed = attempt(name, fn, *copies, where=where, forbid=forbid)
    if failed is not None:
        return None, failed
    wrote = unchanged(name, args, copies, labels)
    if wrote is not None:
        return None, wrote
    keys = list(expected)
    if len(keys) > 1:
        got, failed = unpack(name, got, keys, where)
        if failed is not None:
            return None, failed
    else:
        got = [got]
    tol = tolerance(*args)
    sizes = term_sizes(*reference, base=expected)
    shapes = {k: v.shape for k, v in expected.items()}
    worst = 0.0
    for key, value in zip(keys, got):
        arr, problem = as_array(value, key, expected[key].shape)
        if problem is not None:
            if isinstance(value, np.ndarray):  # a right array in the wrong place?
                other = [k for k in keys if k != key and shapes[k] == value.shape]
                if other and len(keys) > 1:
                    problem += f": the shape of {other[0]}; return them in the order ({', '.join(keys)})"
            why = _safe(hint, key, value) if isinstance(value, np.ndarray) else ""
            return None, fail(name, f"{problem} on {where}{why}")
        err = rel_error(arr, expected[key], floor=sizes[key])
        if not err <= tol:
            swapped = [k for k in keys if k != key and expected[k].shape == arr.shape and matches(arr, expected[k])]
            if swapped:
                why = f"; that is {swapped[0]}: return them in the order ({', '.join(keys)})"
            elif passed:
                why = f" (right on {passed[0]}: is a size written into your code?)"
            else:
                why = _safe(hint, key, arr)
            return None, fail(name, f"{key}: max relative error {err:.1e} > {tol:.0e} on {where}{why}")
        worst = max(worst, err)
    return worst, None


def term_sizes(function, inputs, base, u=2.0 ** -24, trials=3):
    """How large the terms are that meet in each output of function(*inputs), which is `base`
    ({key: array}) -> {key: size}.

    Every float input is moved by about a float32 rounding, x * (1 +- u) with random signs,
    and each output moves by about u times the size of its terms, whether they cancel or not
    (a sum of terms of size 1 moves by ~u, though it may itself be 0.001). The size is the
    largest move over `trials` such nudges, divided by u. The nudges are drawn from a fixed
    seed: the same inputs always give the same sizes."""
    g = np.random.default_rng(0)
    sizes = dict.fromkeys(base, 0.0)
    for _ in range(trials):
        nudged = [a * (1 + u * g.choice([-1.0, 1.0], a.shape)) if isinstance(a, np.ndarray) and a.dtype.kind == "f"
                  else a for a in inputs]
        for key, value in function(*nudged).items():
            sizes[key] = max(sizes[key], float(np.max(np.abs(value - base[key]), initial=0.0)) / u)
    return sizes


def _safe(hint, key, value):
    """hint(key, value), or "" when there is none or it cannot tell (an odd shape, say)."""
    if hint is None:
        return ""
    try:
        return hint(key, value)
    except Exception:
        return ""


def matches(got, candidate, tol=1e-6):
    """got equals the candidate wrong answer (to float32 precision, well below any slip's size)."""
    candidate = np.asarray(candidate)
    return np.shape(got) == candidate.shape and np.all(np.isfinite(candidate)) and rel_error(got, candidate) <= tol


def passed_line(worst, tol_note, cases):
    bound = "below 1e-12" if worst < 1e-12 else f"{worst:.0e}"
    return f"matches the reference on {cases} fresh random cases; max relative error {bound} ({tol_note})"
