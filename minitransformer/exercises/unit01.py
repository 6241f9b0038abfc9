"""Checkers for notebooks/01_gradients_by_hand.ipynb.

    check_evaluation_count(count_evaluations)   (m, n) -> loss evaluations of a centred check
    check_best_step(best_step)                  (u, f, f3) -> the step h minimising the error
    check_linear_backward(linear_backward)      (dout, x, W) -> dx, dW, db
    check_softmax_cross_entropy_backward(fn)    (logits, targets) -> dlogits
    check_layernorm_backward(layernorm_backward)  (dout, xhat, rstd, gamma) -> dx
    check_rmsnorm_backward(rmsnorm_backward)    (dout, xhat, rstd, gamma) -> dx

Every backward is compared with centred finite differences (float64) of a forward the student
did not write: the package's own (layers.py, losses.py), or rmsnorm_forward below. A failure
says which output is wrong and, where a classic slip explains it, which one.
"""
import numpy as np

from .. import layers, losses
from ..gradcheck import OP_THRESHOLD, numerical_gradient, random_functional, rel_error
from . import Result, attempt, compare, is_number

# ----------------------------------------------------------------------------- helpers


def _call(name, fn, *args):
    """attempt(fn) on copies of the arrays; a function that writes into its inputs fails."""
    copies = [a.copy() if isinstance(a, np.ndarray) else a for a in args]
    got, failed = attempt(name, fn, *copies)
    if failed is None:
        for i, (a, c) in enumerate(zip(args, copies)):
            if isinstance(a, np.ndarray) and not np.array_equal(a, c):
                return None, Result(name, False, f"your function wrote into its argument {i + 1}; "
                                                 "a backward must leave what it was handed unchanged")
    return got, failed


def _gradients(name, got, expected, hints=None, tolerance=OP_THRESHOLD):
    """Compare each named gradient with its finite differences -> one Result: the first that
    fails (a wrong shape with its hint), or PASS with the largest error."""
    hints = hints or {}
    worst = 0.0
    for key, num in expected.items():
        arr = np.asarray(got[key])
        if arr.shape != num.shape:
            hint = f" ({hints[key]})" if key in hints else ""
            if arr.ndim == 2 and arr.shape == num.shape[::-1]:
                hint = f" (the transpose? {hints.get(key, key + ' has the shape of its variable')})"
            return Result(name, False, f"{key}: expected shape {num.shape}, got {arr.shape}{hint}")
        result = compare(name, arr, num, tolerance, what=f"{key}: max relative error")
        if not result.passed:
            return result
        worst = max(worst, rel_error(arr, num))
    return Result(name, True, f"max relative error {worst:.1e} <= {tolerance:.0e} "
                              f"({', '.join(expected)} against centred differences)")


def _describe(value):
    if value is None:
        return "None (a missing return?)"
    if isinstance(value, np.ndarray):
        return f"an array of shape {value.shape}"
    kind = type(value).__name__
    return ("an " if kind[0] in "aeiou" else "a ") + kind + (
        f" of length {len(value)}" if isinstance(value, (tuple, list)) else "")


def _relative(got, expected):
    return abs(got - expected) / abs(expected)


# ----------------------------------------------------------------------------- finite differences


def check_evaluation_count(count_evaluations):
    """count_evaluations(m, n): how many times a centred check of an (m, n) matrix evaluates
    the loss. PASS when it is right for several shapes."""
    name = "evaluations of a centred check"
    for m, n in ((3, 4), (1, 1), (64, 256)):
        got, failed = attempt(name, count_evaluations, m, n)
        if failed is not None:
            return failed
        if isinstance(got, bool) or not isinstance(got, (int, np.integer)):
            return Result(name, False, f"count_evaluations({m}, {n}): expected a whole number, got {_describe(got)}")
        if got != 2 * m * n:
            hint = ""
            if got == m * n + 1:
                hint = " (that is a forward difference: one shared L(x) plus one per entry)"
            elif got == m * n:
                hint = " (each entry is moved twice: once up, once down)"
            return Result(name, False, f"count_evaluations({m}, {n}) = {got}, expected {2 * m * n}{hint}")
    return Result(name, True, f"2 m n: {2 * 3 * 4} for a (3, 4) matrix, {2 * 64 * 256:,} for (64, 256)")


def check_best_step(best_step):
    """best_step(u, f, f3): the h minimising E(h) = h^2 f3 / 6 + u f / h (truncation of the
    centred difference + round-off), for a round-off u and sizes f = |f(x)|, f3 = |f'''(x)|."""
    name = "best step h"
    cases = ((2.0 ** -53, 1.0, 1.0), (2.0 ** -24, 1.0, 1.0), (1e-16, 10.0, 0.5), (1e-12, 0.2, 30.0))
    for u, f, f3 in cases:
        got, failed = attempt(name, best_step, u, f, f3)
        if failed is not None:
            return failed
        if not is_number(got):
            return Result(name, False, f"best_step({u:.2g}, {f}, {f3}): expected a number, got {_describe(got)}")
        expected = (3 * u * f / f3) ** (1 / 3)
        if not _relative(got, expected) <= 1e-6:
            hint = ""
            if _relative(got, np.sqrt(u * f / f3)) < 1e-6 or _relative(got, np.sqrt(u)) < 1e-6:
                hint = " (h ~ sqrt(u) is the forward difference's best step; the centred one's error is h^2, not h)"
            elif _relative(got, (u * f / f3) ** (1 / 3)) < 1e-6:
                hint = " (off by a factor 3^(1/3): set the derivative of E(h) to zero again)"
            return Result(name, False, f"best_step({u:.2g}, {f}, {f3}) = {got:.3g}, expected {expected:.3g}{hint}")
    return Result(name, True, f"h = (3 u f / f3)^(1/3): {(3 * 2.0 ** -53) ** (1 / 3):.1e} in float64, "
                              f"{(3 * 2.0 ** -24) ** (1 / 3):.1e} in float32 (f = f3 = 1)")


# ----------------------------------------------------------------------------- linear


def check_linear_backward(linear_backward):
    """linear_backward(dout, x, W) -> (dx, dW, db) for y = x @ W + b, x (N, d_in), W (d_in, d_out)."""
    name = "linear backward"
    rng = np.random.default_rng(1)
    x, W, b = rng.standard_normal((5, 4)), rng.standard_normal((4, 3)), rng.standard_normal(3)
    R = random_functional((5, 3), seed=1)  # L = sum(y * R), so dout = R
    got, failed = _call(name, linear_backward, R, x, W)
    if failed is not None:
        return failed
    if not isinstance(got, (tuple, list)) or len(got) != 3:
        return Result(name, False, f"expected a tuple (dx, dW, db), got {_describe(got)}")

    def L():
        return float(np.sum(layers.linear_forward(x, W, b)[0] * R))

    expected = {"dx": numerical_gradient(L, x), "dW": numerical_gradient(L, W), "db": numerical_gradient(L, b)}
    hints = {"dx": "dx has the shape of x, (N, d_in)", "dW": "dW has the shape of W, (d_in, d_out)",
             "db": "db has the shape of b, (d_out,): b was added to every row"}
    return _gradients(name, dict(zip(expected, got)), expected, hints)


# ----------------------------------------------------------------------------- softmax + cross-entropy


def check_softmax_cross_entropy_backward(softmax_cross_entropy_backward):
    """fn(logits, targets) -> dlogits of L = mean over the n rows of -log softmax(logits)[target].
    logits (n, K), targets (n,) ints."""
    name = "softmax cross-entropy backward"
    rng = np.random.default_rng(2)
    logits, targets = 2 * rng.standard_normal((6, 5)), rng.integers(0, 5, 6)
    got, failed = _call(name, softmax_cross_entropy_backward, logits, targets)
    if failed is not None:
        return failed
    num = numerical_gradient(lambda: losses.cross_entropy_forward(logits, targets)[0], logits)
    result = _gradients(name, {"dlogits": got}, {"dlogits": num})
    if result.passed is False and np.shape(got) == num.shape and np.all(np.isfinite(got)):
        got = np.asarray(got, np.float64)
        n = logits.shape[0]
        if rel_error(got / n, num) < OP_THRESHOLD:
            result.message += f"; yours is n = {n} times too large: the loss is a mean over the n rows"
        elif rel_error(-got, num) < OP_THRESHOLD:
            result.message += "; the sign: the gradient is p - onehot, which lowers the target's logit"
    return result


# ----------------------------------------------------------------------------- layernorm, rmsnorm


def _norm_hint(fn, xhat, rstd, gamma, dout, got, mean_term):
    """Why a norm backward failed, when a classic slip explains it -> "; ..." or ""."""
    def formula(dout, with_mean):  # the derived dx (checked against finite differences in the notebook)
        dxhat = dout * gamma
        centred = dxhat - dxhat.mean(-1, keepdims=True) if with_mean else dxhat
        return rstd * (centred - xhat * (dxhat * xhat).mean(-1, keepdims=True))

    if rel_error(np.asarray(got) * rstd, formula(dout, mean_term)) < OP_THRESHOLD:
        return "; the whole bracket is multiplied by rstd (xhat = (x - mu) * rstd)"
    if not mean_term and rel_error(got, formula(dout, True)) < OP_THRESHOLD:
        return "; RMSNorm does not centre its input: no mu in its forward, so no -mean(dxhat) term"
    # two inputs on which the true dx is (nearly) zero, each exposing one term of the bracket
    rows = np.arange(1.0, xhat.shape[0] + 1)[:, None]
    probes = [(xhat / gamma, "for dxhat along xhat (a stretch of the row) dx is ~0, since the scale "
                             "stretches with the row and xhat does not move: the -xhat * mean(dxhat * xhat) term")]
    if mean_term:
        probes.insert(0, (rows / gamma, "for a dxhat that is the same on every entry of a row dx is 0, "
                                                   "since a shift of the row moves mu with it: the -mean(dxhat) term"))
    for probe, term in probes:
        out, failed = attempt("probe", fn, probe.copy(), xhat.copy(), rstd.copy(), gamma.copy())
        if failed is None and np.shape(out) == xhat.shape and rel_error(out, formula(probe, mean_term)) > OP_THRESHOLD:
            return f"; {term} is missing or wrong"
    return ""


def _check_norm(name, fn, forward, mean_term):
    rng = np.random.default_rng(3)
    x = 1.5 * rng.standard_normal((4, 6)) + 0.5
    gamma, beta = 1 + 0.5 * rng.standard_normal(6), 0.5 * rng.standard_normal(6)
    _, (xhat, rstd, _) = forward(x, gamma, beta)
    R = random_functional(x.shape, seed=3)  # L = sum(y * R), so dout = R
    got, failed = _call(name, fn, R, xhat, rstd, gamma)
    if failed is not None:
        return failed
    num = numerical_gradient(lambda: float(np.sum(forward(x, gamma, beta)[0] * R)), x)
    result = _gradients(name, {"dx": got}, {"dx": num})
    if result.passed is False and np.shape(got) == x.shape and np.all(np.isfinite(got)):
        result.message += _norm_hint(fn, xhat, rstd, gamma, R, got, mean_term)
    return result


def check_layernorm_backward(layernorm_backward):
    """layernorm_backward(dout, xhat, rstd, gamma) -> dx, with xhat, rstd, gamma the cache of
    layers.layernorm_forward (rows of C entries)."""
    return _check_norm("layernorm backward", layernorm_backward, layers.layernorm_forward, mean_term=True)


def rmsnorm_forward(x, gamma, beta=None, eps=1e-5):
    """RMSNorm (LLaMA's normalisation): y = gamma * x / sqrt(mean(x^2) + eps), over the last axis.
    -> y, cache (xhat, rstd, gamma) like layernorm_forward. No centring, no beta."""
    rstd = 1 / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps)  # (N, 1)
    xhat = x * rstd  # (N, C)
    return xhat * gamma, (xhat, rstd, gamma)


def check_rmsnorm_backward(rmsnorm_backward):
    """rmsnorm_backward(dout, xhat, rstd, gamma) -> dx for rmsnorm_forward above."""
    return _check_norm("rmsnorm backward", rmsnorm_backward, rmsnorm_forward, mean_term=False)
