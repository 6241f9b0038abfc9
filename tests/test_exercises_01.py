"""The checkers of notebook 01 (minitransformer/exercises/unit01.py): the reference solutions pass,
the classic wrong ones FAIL with the reason in the message, and a solution not written yet gives
"not implemented yet" (passed is None), never a traceback."""
import numpy as np
import pytest

from minitransformer.exercises import unit01 as ex

# ----------------------------------------------------------------------------- reference solutions


def count_evaluations(m, n):
    return 2 * m * n


def best_step(u, f, f3):
    return (3 * u * f / f3) ** (1 / 3)


def linear_backward(dout, x, W):
    return dout @ W.T, x.T @ dout, dout.sum(axis=0)


def softmax_cross_entropy_backward(logits, targets):
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    p = e / e.sum(axis=-1, keepdims=True)
    return (p - np.eye(logits.shape[-1])[targets]) / logits.shape[0]


def layernorm_backward(dout, xhat, rstd, gamma):
    g = dout * gamma
    return rstd * (g - g.mean(-1, keepdims=True) - xhat * (g * xhat).mean(-1, keepdims=True))


def rmsnorm_backward(dout, xhat, rstd, gamma):
    g = dout * gamma
    return rstd * (g - xhat * (g * xhat).mean(-1, keepdims=True))


CHECKS = [(ex.check_evaluation_count, count_evaluations), (ex.check_best_step, best_step),
          (ex.check_linear_backward, linear_backward),
          (ex.check_softmax_cross_entropy_backward, softmax_cross_entropy_backward),
          (ex.check_layernorm_backward, layernorm_backward), (ex.check_rmsnorm_backward, rmsnorm_backward)]


@pytest.mark.parametrize("check, solution", CHECKS, ids=[c.__name__ for c, _ in CHECKS])
def test_the_reference_solution_passes(check, solution):
    result = check(solution)
    assert result.passed is True, result
    assert repr(result).startswith("PASS ") and "\n" not in repr(result)


@pytest.mark.parametrize("check", [c for c, _ in CHECKS], ids=[c.__name__ for c, _ in CHECKS])
def test_not_written_yet_is_not_a_failure(check):
    def student(*args):
        raise NotImplementedError  # what a student copy holds

    result = check(student)
    assert result.passed is None and not result
    assert repr(result).startswith("not implemented yet: ")


def fails(result, *words):
    """The result is a FAIL whose one-line message holds every word."""
    assert result.passed is False, result
    assert repr(result).startswith("FAIL ") and "\n" not in repr(result)
    for word in words:
        assert word in result.message, (word, result.message)
    return True


# ----------------------------------------------------------------------------- linear


def test_linear_with_dW_transposed_fails():
    assert fails(ex.check_linear_backward(lambda dout, x, W: (dout @ W.T, dout.T @ x, dout.sum(0))),
                 "dW", "expected shape (4, 3), got (3, 4)", "transpose")


def test_linear_with_db_averaged_fails():
    assert fails(ex.check_linear_backward(lambda dout, x, W: (dout @ W.T, x.T @ dout, dout.mean(0))),
                 "db: max relative error")


def test_linear_with_a_wrong_dx_fails():
    assert fails(ex.check_linear_backward(lambda dout, x, W: (-dout @ W.T, x.T @ dout, dout.sum(0))),
                 "dx: max relative error")


def test_linear_that_writes_into_dout_fails():
    def in_place(dout, x, W):
        db = dout.sum(0)
        dout *= 2
        return dout @ W.T / 2, x.T @ dout / 2, db
    assert fails(ex.check_linear_backward(in_place), "wrote into its argument 1")


def test_linear_without_a_return_or_raising_fails_in_one_line():
    assert fails(ex.check_linear_backward(lambda dout, x, W: None), "expected a tuple (dx, dW, db)")
    assert fails(ex.check_linear_backward(lambda dout, x, W: (dout @ W, 0, 0)), "your code raised ValueError")


# ----------------------------------------------------------------------------- finite differences


def test_evaluation_count_wrong_answers_fail():
    assert fails(ex.check_evaluation_count(lambda m, n: m * n), "expected 24", "twice")
    assert fails(ex.check_evaluation_count(lambda m, n: m * n + 1), "forward difference")
    assert fails(ex.check_evaluation_count(lambda m, n: 2.0 * m * n), "whole number")


def test_best_step_wrong_answers_fail():
    assert fails(ex.check_best_step(lambda u, f, f3: np.sqrt(u)), "forward difference")
    assert fails(ex.check_best_step(lambda u, f, f3: (u * f / f3) ** (1 / 3)), "3^(1/3)")
    assert fails(ex.check_best_step(lambda u, f, f3: 1e-5), "expected 6.93e-06")


# ----------------------------------------------------------------------------- softmax + cross-entropy


def test_cross_entropy_without_the_mean_fails():
    assert fails(ex.check_softmax_cross_entropy_backward(
        lambda z, t: softmax_cross_entropy_backward(z, t) * z.shape[0]), "n = 6 times too large")


def test_cross_entropy_with_the_wrong_sign_fails():
    assert fails(ex.check_softmax_cross_entropy_backward(
        lambda z, t: -softmax_cross_entropy_backward(z, t)), "the sign")


def test_cross_entropy_without_the_softmax_fails():
    def no_softmax(z, t):
        return (z - np.eye(z.shape[-1])[t]) / z.shape[0]
    assert fails(ex.check_softmax_cross_entropy_backward(no_softmax), "dlogits: max relative error")


# ----------------------------------------------------------------------------- layernorm, rmsnorm


def test_layernorm_missing_its_mean_term_fails_and_says_so():
    def no_mean(dout, xhat, rstd, gamma):
        g = dout * gamma
        return rstd * (g - xhat * (g * xhat).mean(-1, keepdims=True))
    assert fails(ex.check_layernorm_backward(no_mean), "dx: max relative error", "-mean(dxhat) term is missing")


def test_layernorm_missing_its_xhat_term_fails_and_says_so():
    def no_scale(dout, xhat, rstd, gamma):
        g = dout * gamma
        return rstd * (g - g.mean(-1, keepdims=True))
    assert fails(ex.check_layernorm_backward(no_scale), "-xhat * mean(dxhat * xhat) term is missing")


def test_layernorm_with_the_mean_over_the_wrong_axis_fails():
    def wrong_axis(dout, xhat, rstd, gamma):
        g = dout * gamma
        return rstd * (g - g.mean(0, keepdims=True) - xhat * (g * xhat).mean(-1, keepdims=True))
    assert fails(ex.check_layernorm_backward(wrong_axis), "-mean(dxhat) term")


def test_layernorm_without_rstd_or_gamma_fails():
    assert fails(ex.check_layernorm_backward(
        lambda dout, xhat, rstd, gamma: layernorm_backward(dout, xhat, rstd, gamma) / rstd), "multiplied by rstd")
    assert fails(ex.check_layernorm_backward(
        lambda dout, xhat, rstd, gamma: layernorm_backward(dout, xhat, rstd, np.ones_like(gamma))),
        "dx: max relative error")


def test_layernorm_direct_path_only_fails():
    assert fails(ex.check_layernorm_backward(lambda dout, xhat, rstd, gamma: rstd * dout * gamma),
                 "-mean(dxhat) term is missing")


def test_rmsnorm_with_a_mean_term_fails_and_says_why():
    assert fails(ex.check_rmsnorm_backward(layernorm_backward), "does not centre")


def test_rmsnorm_missing_its_xhat_term_fails():
    assert fails(ex.check_rmsnorm_backward(lambda dout, xhat, rstd, gamma: rstd * dout * gamma),
                 "-xhat * mean(dxhat * xhat) term is missing")


def test_rmsnorm_forward_normalises_by_the_root_mean_square():
    x = np.array([[3.0, 4.0]])
    y, (xhat, rstd, _) = ex.rmsnorm_forward(x, np.array([1.0, 2.0]), eps=0.0)
    assert np.allclose(rstd, 1 / np.sqrt(12.5)) and np.allclose(y, [[3 / np.sqrt(12.5), 8 / np.sqrt(12.5)]])
