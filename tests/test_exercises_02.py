"""The checkers of notebooks/02_attention.ipynb: the reference answers pass, known wrong answers
FAIL and say why, a solution not written yet gives passed None."""
import numpy as np
import pytest

from minitransformer.exercises import unit02 as ex


# ----------------------------------------------------------------------------- attention backward


def backward(dctx, Q, K, V, P, scale=True, transpose_P=True, rowsum=True):
    """One head's backward, with switches for the mistakes the checker must catch."""
    hs = Q.shape[-1]
    s = 1 / np.sqrt(hs) if scale else 1.0
    dV = (P.T if transpose_P else P) @ dctx
    dP = dctx @ V.T
    dS = P * (dP - (dP * P).sum(axis=-1, keepdims=True)) if rowsum else P * dP
    return dS @ K * s, dS.T @ Q * s, dV


def test_attention_backward_reference_passes():
    r = ex.check_attention_backward(backward)
    assert r.passed is True, r
    assert repr(r).startswith("PASS") and "below 1e-09" in repr(r)


def test_attention_backward_without_scale_fails_and_says_so():
    r = ex.check_attention_backward(lambda *a: backward(*a, scale=False))
    assert r.passed is False
    assert "1/sqrt(hs)" in r.message and "too large" in r.message and repr(r).startswith("FAIL")


def test_attention_backward_scaled_twice_fails():
    def twice(dctx, Q, K, V, P):
        dQ, dK, dV = backward(dctx, Q, K, V, P)
        s = 1 / np.sqrt(Q.shape[-1])
        return dQ * s, dK * s, dV
    r = ex.check_attention_backward(twice)
    assert r.passed is False and "twice" in r.message


def test_attention_backward_untransposed_P_fails():
    r = ex.check_attention_backward(lambda *a: backward(*a, transpose_P=False))
    assert r.passed is False and "dV = P^T dctx" in r.message


def test_attention_backward_softmax_without_row_sum_fails():
    r = ex.check_attention_backward(lambda *a: backward(*a, rowsum=False))
    assert r.passed is False and "softmax step" in r.message


def test_attention_backward_wrong_shape_and_wrong_type():
    r = ex.check_attention_backward(lambda *a: (backward(*a)[0], a[2].T, backward(*a)[2]))
    assert r.passed is False and "dK: expected shape" in r.message
    r = ex.check_attention_backward(lambda *a: backward(*a)[:2])
    assert r.passed is False and "three arrays" in r.message


def test_attention_backward_does_not_trust_the_caller_arrays():
    # a solution that writes into its inputs must not corrupt the finite differences
    def in_place(dctx, Q, K, V, P):
        out = backward(dctx, Q, K, V, P)
        Q += 1.0
        P *= 0.0
        return out
    assert ex.check_attention_backward(in_place).passed is True


def test_attention_backward_not_written_and_raising():
    def todo(*a):
        raise NotImplementedError
    r = ex.check_attention_backward(todo)
    assert r.passed is None and repr(r).startswith("not implemented yet")
    r = ex.check_attention_backward(lambda *a: 1 / 0)
    assert r.passed is False and "ZeroDivisionError" in r.message


# ----------------------------------------------------------------------------- causal mask


def causal(T):
    return np.where(np.tril(np.ones((T, T), bool)), 0.0, -np.inf)


def test_causal_mask_reference_passes():
    r = ex.check_causal_mask(causal)
    assert r.passed is True, r


def test_causal_mask_seeing_the_future_fails():
    # triu instead of tril: every query sees the future and not its past
    r = ex.check_causal_mask(lambda T: np.where(np.triu(np.ones((T, T), bool)), 0.0, -np.inf))
    assert r.passed is False and "in its future" in r.message
    # off by one: each query also sees the next key
    r = ex.check_causal_mask(lambda T: np.where(np.tril(np.ones((T, T), bool), k=1), 0.0, -np.inf))
    assert r.passed is False and "query 0 can see key 1, which is in its future" in r.message


def test_causal_mask_hiding_the_present_fails():
    r = ex.check_causal_mask(lambda T: np.where(np.tril(np.ones((T, T), bool), k=-1), 0.0, -np.inf))
    assert r.passed is False and "cannot see key 0" in r.message


def test_causal_mask_other_mistakes():
    r = ex.check_causal_mask(lambda T: np.tril(np.ones((T, T), bool)))
    assert r.passed is False and "bool" in r.message
    r = ex.check_causal_mask(lambda T: np.where(np.tril(np.ones((T, T), bool)), 0.0, -1e9))
    assert r.passed is False and "use -inf" in r.message
    r = ex.check_causal_mask(lambda T: causal(T)[None, None])
    assert r.passed is False and "expected shape" in r.message


def test_causal_mask_not_written():
    def todo(T):
        raise NotImplementedError
    assert ex.check_causal_mask(todo).passed is None


# ----------------------------------------------------------------------------- costs


def costs(B, T, C, H):
    return 4 * C * C + 4 * C, 8 * B * T * C * C + 4 * B * T * T * C


@pytest.mark.parametrize("wrong, reason", [
    (lambda B, T, C, H: (4 * C * C, costs(B, T, C, H)[1]), "biases"),
    (lambda B, T, C, H: (3 * C * C + 3 * C, costs(B, T, C, H)[1]), "output projection"),
    (lambda B, T, C, H: (costs(B, T, C, H)[0], costs(B, T, C, H)[1] // 2), "2 flops"),
    (lambda B, T, C, H: (costs(B, T, C, H)[0], 8 * B * T * C * C), "Q K^T and P V"),
    (lambda B, T, C, H: (costs(B, T, C, H)[0], 8 * B * T * C * C + 4 * B * T * T * C * H), "H heads"),
])
def test_attention_costs_wrong_answers_fail(wrong, reason):
    r = ex.check_attention_costs(wrong)
    assert r.passed is False and reason in r.message, r


def test_attention_costs_reference_passes_and_todo():
    assert ex.check_attention_costs(costs).passed is True
    def todo(B, T, C, H):
        raise NotImplementedError
    assert ex.check_attention_costs(todo).passed is None
    assert ex.check_attention_costs(lambda *a: 5).passed is False
