"""The checkers of notebook 01 (minitransformer/exercises/unit01.py): for every exercise a
catalogue of wrong answers of the kinds students write, each rejected FOR ITS REASON (the line
says it), correct alternatives accepted, and malformed returns, exceptions and hangs turned into
one FAIL line. The checkers draw fresh cases at every call, so each catalogue entry is run twice."""
import numpy as np
import pytest

from minitransformer import layers
from minitransformer.exercises import unit01 as ex


def one_line_fail(result, *needles):
    text = repr(result)
    assert result.passed is False, text
    assert text.startswith("FAIL ") and "\n" not in text and "Traceback" not in text, text
    for needle in needles:
        assert needle in result.message, text
    return text


def passes(check, *answer):
    for _ in range(2):
        result = check(*answer)
        assert result.passed is True, result
        assert "\n" not in repr(result)


def fails(check, answer, reason):
    """FAIL, and the line holds `reason` (or one of them, when a fresh case decides which slip shows)."""
    for _ in range(2):
        result = check(answer)
        one_line_fail(result)
        reasons = reason if isinstance(reason, tuple) else (reason,)
        assert any(r in result.message for r in reasons), repr(result)


# ----------------------------------------------------------------------------- exercise 1: evaluations

COUNT_WRONG = [
    (lambda m, n: m * n + 1, "forward difference"),
    (lambda m, n: m * n, "moved twice"),
    (lambda m, n: 2 * m * n + 1, "no evaluation at the unmoved point"),
    (lambda m, n: 2 * (m + n), "every entry is moved"),
    (lambda m, n: 2.0 * m * n, "expected a whole number (an int), got the float"),
    (lambda m, n: np.float64(2 * m * n), "expected a whole number"),
    (lambda m, n: 24, "= 24, expected 2"),  # the (3, 4) case written in
    (lambda m, n: {(3, 4): 24, (1, 1): 2}.get((m, n), 0), "= 0, expected"),
    (lambda m, n: 4 * m * n, "expected"),
    (lambda m, n: True, "got the bool True"),
]


@pytest.mark.parametrize("answer, reason", COUNT_WRONG)
def test_evaluation_count_wrong_answers(answer, reason):
    fails(ex.check_evaluation_count, answer, reason)


@pytest.mark.parametrize("answer", [lambda m, n: 2 * m * n, lambda m, n: np.int64(m) * n * 2,
                                    lambda m, n: sum(2 for _ in range(m * n))])
def test_evaluation_count_correct_answers(answer):
    passes(ex.check_evaluation_count, answer)


# ----------------------------------------------------------------------------- exercise 2: best step

STEP_WRONG = [
    (lambda u, f, f3: np.sqrt(u * f / f3), "forward difference's best step"),
    (lambda u, f, f3: (u * f / f3) ** (1 / 3), "factor 3^(1/3)"),
    (lambda u, f, f3: (6 * u * f / f3) ** (1 / 3), "factor 2^(1/3)"),
    (lambda u, f, f3: (3 * u * f / f3) ** 0.5, "a square root"),
    (lambda u, f, f3: (3 * u * f3 / f) ** (1 / 3), "f0 and f3 swapped"),
    (lambda u, f, f3: (3 * u) ** (1 / 3), "depends on f0 and f3"),
    (lambda u, f, f3: (3 * u * f / f3) ** 1 / 3, "divides by 3"),
    (lambda u, f, f3: 1e-5, "expected"),
    (lambda u, f, f3: str((3 * u * f / f3) ** (1 / 3)), "expected a number, got the str"),
    (lambda u, f, f3: [(3 * u * f / f3) ** (1 / 3)], "expected a number, got a list"),
]


@pytest.mark.parametrize("answer, reason", STEP_WRONG)
def test_best_step_wrong_answers(answer, reason):
    fails(ex.check_best_step, answer, reason)


@pytest.mark.parametrize("answer", [lambda u, f, f3: (3 * u * f / f3) ** (1 / 3),
                                    lambda u, f, f3: np.cbrt(3 * u * f / f3),
                                    lambda u, f, f3: np.exp(np.log(3 * u * f / f3) / 3)])
def test_best_step_correct_answers(answer):
    passes(ex.check_best_step, answer)


# ----------------------------------------------------------------------------- exercise 3: linear


def linear_backward(dout, x, W):
    return dout @ W.T, x.T @ dout, dout.sum(axis=0)


def linear_inplace(dout, x, W):
    dout *= 1.0
    dout[0] = 0
    return dout @ W.T, x.T @ dout, dout.sum(axis=0)


LINEAR_WRONG = [
    (lambda d, x, W: (d @ W.T, d.T @ x, d.sum(0)), "dW: expected shape"),
    (lambda d, x, W: (d @ W.T, x.T @ d, d.sum(1)), "db sums dout over the rows"),
    (lambda d, x, W: (d @ W.T, x.T @ d, d), "b was added to every row"),
    (lambda d, x, W: (d @ W.T, x.T @ d, d.mean(0)), "a mean, not a sum"),
    (lambda d, x, W: (d @ W.T, x.T @ d / len(x), d.sum(0)), "divided by N"),
    (lambda d, x, W: (x.T @ d, d @ W.T, d.sum(0)), "return them in the order (dx, dW, db)"),
    (lambda d, x, W: (d @ W.T, x.T @ d), "expected 3 values (dx, dW, db), got a tuple of 2"),
    (lambda d, x, W: (d @ W.T, sum(np.outer(x[i], d[i]) for i in range(4)), d.sum(0)),
     ("is a size written into your code", "raised IndexError")),
    (lambda d, x, W: layers.linear_backward(d, layers.linear_forward(x, W, np.zeros(W.shape[1]))[1]),
     "calls the package's own layers.linear_backward"),
    (linear_inplace, "wrote into its argument dout"),
    (lambda d, x, W: [list(r) for r in d @ W.T][:-1] + [[1.0]], "dx"),  # a ragged list where an array belongs
    (lambda d, x, W: (d @ W.T, (x.T @ d).astype(int), d.sum(0)), "expected a float array"),
]


@pytest.mark.parametrize("answer, reason", LINEAR_WRONG)
def test_linear_backward_wrong_answers(answer, reason):
    fails(ex.check_linear_backward, answer, reason)


@pytest.mark.parametrize("answer", [linear_backward,
                                    lambda d, x, W: [d @ W.T, np.einsum("ni,no->io", x, d), np.ones(len(d)) @ d],
                                    lambda d, x, W: tuple(np.asarray(a, np.float64) for a in linear_backward(d, x, W))])
def test_linear_backward_correct_answers(answer):
    passes(ex.check_linear_backward, answer)


# ----------------------------------------------------------------------------- exercise 4: softmax + cross-entropy


def ce(logits, targets):
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    p = e / e.sum(axis=-1, keepdims=True)
    return (p - np.eye(logits.shape[-1])[targets]) / logits.shape[0]


def ce_naive(logits, targets):
    e = np.exp(logits)
    p = e / e.sum(axis=-1, keepdims=True)
    return (p - np.eye(logits.shape[-1])[targets]) / logits.shape[0]


def ce_axis0(logits, targets):
    e = np.exp(logits - logits.max(axis=0, keepdims=True))
    p = e / e.sum(axis=0, keepdims=True)
    return (p - np.eye(logits.shape[-1])[targets]) / logits.shape[0]


CE_WRONG = [
    (ce_naive, "np.exp overflowed on large logits"),
    (lambda z, t: ce(z, t) * z.shape[0], "times too large"),
    (lambda z, t: -ce(z, t), "the sign"),
    (lambda z, t: ce(z, t) + np.eye(z.shape[1])[t] / z.shape[0], "the target's -1 is missing"),
    (lambda z, t: ce(z, t) * z.shape[0] / z.shape[1], "divided by n_cls"),
    (ce_axis0, "max relative error"),
    (lambda z, t: (ce(z, t), 0.0), "expected an array"),
    (lambda z, t: ce(z, t)[:, :-1], "expected shape"),
    (lambda z, t: ce(z, t) / 6 * z.shape[0], "is a size written into your code"),
    (lambda z, t: layers.softmax_forward(z)[0] / len(z), "calls the package's own layers.softmax_forward"),
]


@pytest.mark.parametrize("answer, reason", CE_WRONG)
def test_softmax_cross_entropy_wrong_answers(answer, reason):
    fails(ex.check_softmax_cross_entropy_backward, answer, reason)


def ce_logsumexp(z, t):
    m = z.max(axis=1, keepdims=True)
    log_p = z - m - np.log(np.exp(z - m).sum(axis=1, keepdims=True))
    d = np.exp(log_p)
    d[np.arange(len(t)), t] -= 1
    return d / len(t)


@pytest.mark.parametrize("answer", [ce, ce_logsumexp, lambda z, t: ce(z.astype(np.float64), t).tolist()])
def test_softmax_cross_entropy_correct_answers(answer):
    passes(ex.check_softmax_cross_entropy_backward, answer)


# ----------------------------------------------------------------------------- exercises 5 and 6: the norms


def ln(dout, xhat, rstd, gamma):
    g = dout * gamma
    return rstd * (g - g.mean(-1, keepdims=True) - xhat * (g * xhat).mean(-1, keepdims=True))


def rms(dout, xhat, rstd, gamma):
    g = dout * gamma
    return rstd * (g - xhat * (g * xhat).mean(-1, keepdims=True))


def ln_c6(dout, xhat, rstd, gamma):  # the row length written in: right on C = 6 only
    g = dout * gamma
    return rstd * (g - g.sum(-1, keepdims=True) / 6 - xhat * (g * xhat).sum(-1, keepdims=True) / 6)


def rms_c6(dout, xhat, rstd, gamma):
    g = dout * gamma
    return rstd * (g - xhat * (g * xhat).sum(-1, keepdims=True) / 6)


NORM_WRONG = {
    "layernorm": [
        (lambda d, xh, r, g: r * d * g, "the -mean(dxhat) term is missing or wrong"),
        (lambda d, xh, r, g: r * (d * g - xh * (d * g * xh).mean(-1, keepdims=True)), "the -mean(dxhat) term"),
        (lambda d, xh, r, g: r * (d * g - (d * g).mean(-1, keepdims=True)), "-xhat * mean(dxhat * xhat) term"),
        (lambda d, xh, r, g: ln(d, xh, r, g) * r, "rstd is applied twice"),
        (lambda d, xh, r, g: ln(d, xh, r, g) / r, "multiplied by rstd"),
        (lambda d, xh, r, g: ln(d / g, xh, r, g), "gamma is missing"),
        (ln_c6, "is a size written into your code"),
        (lambda d, xh, r, g: layers.layernorm_backward(d, (xh, r, g))[0], "layers.layernorm_backward"),
        (lambda d, xh, r, g: (ln(d, xh, r, g), None, None), "expected an array of shape"),
        (lambda d, xh, r, g: ln(d, xh, r, g).T, "expected shape"),
        (lambda d, xh, r, g: np.full(d.shape, np.nan), "holds NaN or inf"),
    ],
    "rmsnorm": [
        (ln, "RMSNorm does not centre its input"),
        (lambda d, xh, r, g: r * d * g, "-xhat * mean(dxhat * xhat) term"),
        (lambda d, xh, r, g: rms(d, xh, r, g) * r, "rstd is applied twice"),
        (lambda d, xh, r, g: rms(d, xh, r, g) / r, "multiplied by rstd"),
        (lambda d, xh, r, g: rms(d / g, xh, r, g), "gamma is missing"),
        (rms_c6, "is a size written into your code"),
        (lambda d, xh, r, g: (rms(d, xh, r, g), None, None), "expected an array of shape"),
        (lambda d, xh, r, g: rms(d, xh, r, g).astype(np.float16), "expected dtype float32 or float64"),
        (lambda d, xh, r, g: rms(d, xh, r, g)[:, :-1], "expected shape"),
    ],
}


@pytest.mark.parametrize("which, answer, reason", [(w, a, r) for w, cat in NORM_WRONG.items() for a, r in cat])
def test_norm_wrong_answers(which, answer, reason):
    check = ex.check_layernorm_backward if which == "layernorm" else ex.check_rmsnorm_backward
    fails(check, answer, reason)


def ln_two_step(dout, xhat, rstd, gamma):
    C = xhat.shape[-1]
    dxhat = dout * gamma
    return rstd / C * (C * dxhat - dxhat.sum(-1, keepdims=True) - xhat * (dxhat * xhat).sum(-1, keepdims=True))


@pytest.mark.parametrize("check, answer", [(ex.check_layernorm_backward, ln),
                                           (ex.check_layernorm_backward, ln_two_step),
                                           (ex.check_rmsnorm_backward, rms),
                                           (ex.check_rmsnorm_backward,
                                            lambda d, xh, r, g: r * d * g - r * xh * np.mean(d * g * xh, axis=1)[:, None])])
def test_norm_correct_answers(check, answer):
    passes(check, answer)


def test_rmsnorm_forward_is_the_forward_the_text_shows():
    x, gamma = np.random.default_rng(0).standard_normal((3, 5)), np.ones(5)
    y, (xhat, rstd, g) = ex.rmsnorm_forward(x, gamma)
    assert np.allclose(y, x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-5))
