"""Catalogue of notebook 02's exercises: wrong answers rejected for their reason, correct
alternatives accepted (fresh random cases at every call)."""
import numpy as np
import pytest
from _catalogue import fails, passes

from minitransformer import attention
from minitransformer.exercises import unit02 as ex


def head(dctx, Q, K, V, P, scale=None, transpose_dS=False, second=True, dV_T=True):
    hs = Q.shape[-1]
    s = 1 / np.sqrt(hs) if scale is None else scale(hs, Q.shape[0])
    dV = P.T @ dctx if dV_T else P @ dctx
    dP = dctx @ V.T
    dS = P * (dP - (dP * P).sum(-1, keepdims=True)) if second else P * dP
    return dS @ K * s, (dS if transpose_dS else dS.T) @ Q * s, dV


HEAD_WRONG = [
    (lambda *a: head(*a, scale=lambda hs, T: 1.0), "times too large"),
    (lambda *a: head(*a, scale=lambda hs, T: 1 / hs), "applied twice"),  # 1/hs = (1/sqrt(hs))^2
    (lambda *a: head(*a, scale=lambda hs, T: 1 / np.sqrt(T)), "not 1/sqrt(T)"),
    (lambda *a: head(*a, transpose_dS=True), "dS transposed"),
    (lambda *a: head(*a, second=False), "misses its second term"),
    (lambda *a: head(*a, dV_T=False), "you computed P dctx"),
    (lambda *a: head(*a)[::-1], "return them in the order (dQ, dK, dV)"),
    (lambda *a: head(*a)[:2], "expected 3 values (dQ, dK, dV), got a tuple of 2"),
    (lambda *a: (head(*a)[0], head(*a)[0], head(*a)[2]), "that is dQ"),
    (lambda *a: (head(*a)[0], head(*a)[1], np.zeros_like(a[3])), "dV: max relative error"),
    (lambda *a: tuple(g * 0.5 if a[1].shape == (5, 4) else g for g in head(*a)) if False else
     tuple(g / np.sqrt(a[1].shape[1]) * 2 for g in head(*a)[:2]) + (head(*a)[2],), "max relative error"),
]


@pytest.mark.parametrize("answer, reason", HEAD_WRONG)
def test_head_backward_wrong(answer, reason):
    fails(lambda: ex.check_attention_backward(answer), reason)


def test_head_backward_package_call_is_named():
    def answer(dctx, Q, K, V, P):
        attention.attention_backward(dctx[None], {})
    fails(lambda: ex.check_attention_backward(answer), "attention.attention_backward")


def head_einsum(dctx, Q, K, V, P):
    dP = np.einsum("td,ud->tu", dctx, V)
    dS = P * (dP - np.einsum("tu,tu->t", dP, P)[:, None])
    return dS @ K / np.sqrt(Q.shape[1]), dS.T @ Q / np.sqrt(Q.shape[1]), np.einsum("tu,td->ud", P, dctx)


@pytest.mark.parametrize("answer", [head, head_einsum, lambda *a: [g.tolist() for g in head(*a)]])
def test_head_backward_correct(answer):
    passes(lambda: ex.check_attention_backward(answer))


MASK_WRONG = [
    (lambda T: np.where(np.triu(np.ones((T, T), bool)), 0.0, -np.inf), "can see key"),
    (lambda T: np.triu(np.full((T, T), -np.inf), 0), "its own present"),
    (lambda T: np.triu(np.full((T, T), -1e9), 1), "use -inf"),
    (lambda T: np.tril(np.ones((T, T), bool)), "bool array"),
    (lambda T: np.tril(np.ones((T, T), int)), "integer array cannot hold -inf"),
    (lambda T: np.triu(np.full((T, T), -np.inf), 1)[None, None], "no batch or head axes"),
    (lambda T: np.triu(np.full((6, 6), -np.inf), 1), "expected shape"),
    (lambda T: np.where(np.tril(np.ones((T, T), bool)), 1.0, -np.inf), "expected 0"),
    (lambda T: np.triu(np.full((T, T), -np.inf), 2), "can see key"),
    (lambda T: attention.attention_bias(T, causal=True, dtype=np.float64)[0, 0], "attention.attention_bias"),
]


@pytest.mark.parametrize("answer, reason", MASK_WRONG)
def test_causal_mask_wrong(answer, reason):
    fails(lambda: ex.check_causal_mask(answer), reason)


@pytest.mark.parametrize("answer", [lambda T: np.triu(np.full((T, T), -np.inf), 1),
                                    lambda T: np.where(np.arange(T)[None] > np.arange(T)[:, None], -np.inf, 0).astype(np.float32),
                                    lambda T: [[0.0 if u <= t else -np.inf for u in range(T)] for t in range(T)]])
def test_causal_mask_correct(answer):
    passes(lambda: ex.check_causal_mask(answer))


def costs(B, T, C, H):
    return 4 * C * C + 4 * C, 8 * B * T * C * C + 4 * B * T * T * C


COST_WRONG = [
    (lambda B, T, C, H: (4 * C * C, costs(B, T, C, H)[1]), "four biases"),
    (lambda B, T, C, H: (3 * C * C + 3 * C, costs(B, T, C, H)[1]), "output projection"),
    (lambda B, T, C, H: (4 * C * C * H + 4 * C * H, costs(B, T, C, H)[1]), "H does not change the parameters"),
    (lambda B, T, C, H: (costs(B, T, C, H)[0], costs(B, T, C, H)[1] // 2), "multiply-add as 2 flops"),
    (lambda B, T, C, H: (costs(B, T, C, H)[0], 8 * B * T * C * C), "Q K^T and P V"),
    (lambda B, T, C, H: (costs(B, T, C, H)[0], 4 * B * T * T * C), "the four projections"),
    (lambda B, T, C, H: (costs(B, T, C, H)[0], 8 * B * T * C * C + 4 * B * T * T * C * H), "one head of size C"),
    (lambda B, T, C, H: (costs(B, T, C, H)[0], 6 * B * T * C * C + 4 * B * T * T * C), "W_q, W_k, W_v and W_o"),
    (lambda B, T, C, H: tuple(float(v) for v in costs(B, T, C, H)), "expected an integer"),
    (lambda B, T, C, H: costs(B, T, C, H)[0], "expected two integers"),
]


@pytest.mark.parametrize("answer, reason", COST_WRONG)
def test_attention_costs_wrong(answer, reason):
    fails(lambda: ex.check_attention_costs(answer), reason)


@pytest.mark.parametrize("answer", [costs, lambda B, T, C, H: [np.int64(4 * C * (C + 1)), B * (8 * T * C * C + 4 * T * T * C)]])
def test_attention_costs_correct(answer):
    passes(lambda: ex.check_attention_costs(answer))
