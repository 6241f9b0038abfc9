"""The checkers' private references (minitransformer/exercises/_reference.py) against centred
finite differences in float64 (gradcheck.numerical_gradient, threshold OP_THRESHOLD = 1e-7 as
for every operation of the package), on shapes with no two sizes equal. The references call no
package backward, so they stay right whatever the package's backward signatures become."""
import numpy as np
import pytest

from minitransformer import attention, losses
from minitransformer.adapters import adapter_forward
from minitransformer.exercises import _reference as ref
from minitransformer.gradcheck import OP_THRESHOLD, numerical_gradient, rel_error

g = np.random.default_rng(0)


def fd(loss, *arrays):
    return [numerical_gradient(loss, a) for a in arrays]


def test_linear_backward():
    x, W, b, R = g.standard_normal((4, 5)), g.standard_normal((5, 3)), g.standard_normal(3), g.standard_normal((4, 3))
    got = ref.linear_backward(R, x, W)
    for a, n in zip(got, fd(lambda: float(np.sum((x @ W + b) * R)), x, W, b)):
        assert rel_error(a, n) < OP_THRESHOLD


def test_cross_entropy_backward():
    z, t = 3 * g.standard_normal((6, 5)), g.integers(0, 5, 6)
    n = numerical_gradient(lambda: float(losses.cross_entropy_forward(z, t)[0]), z)
    assert rel_error(ref.cross_entropy_backward(z, t), n) < OP_THRESHOLD
    big = z + 800.0  # the reference itself is stable
    assert np.all(np.isfinite(ref.cross_entropy_backward(big, t)))


@pytest.mark.parametrize("centre", [True, False])
def test_norm_backward(centre):
    x, gamma, R = 1.5 * g.standard_normal((3, 7)) + 0.5, 1 + 0.5 * g.standard_normal(7), g.standard_normal((3, 7))

    def loss():
        xhat, _ = ref.norm_stats(x, centre)
        return float(np.sum(xhat * gamma * R))
    xhat, rstd = ref.norm_stats(x, centre)
    assert rel_error(ref.norm_backward(R, xhat, rstd, gamma, centre), numerical_gradient(loss, x)) < OP_THRESHOLD


def test_head_backward():
    T, hs = 5, 3
    Q, K, V, R = (g.standard_normal((T, hs)) for _ in range(4))
    bias = ref.causal_mask(T)
    _, P = ref.head_forward(Q, K, V, bias)
    got = ref.head_backward(R, Q, K, V, P)
    for a, n in zip(got, fd(lambda: float(np.sum(ref.head_forward(Q, K, V, bias)[0] * R)), Q, K, V)):
        assert rel_error(a, n) < OP_THRESHOLD


def test_attention_forward_is_the_packages_and_pre_ln_dx_is_right():
    B, T, C, H = 2, 4, 6, 2
    x = g.standard_normal((B, T, C))
    w = {f"{k}_{n}": 0.5 * g.standard_normal((C, C) if k == "W" else C) for n in "qkvo" for k in "Wb"}
    pad = np.ones((B, T), bool)
    pad[1, 3:] = False
    bias = attention.attention_bias(T, True, pad, np.float64)
    assert rel_error(ref.attention_forward(x, w, H, bias)[0], attention.attention_forward(x, w, H, bias)[0]) < 1e-13
    gamma, beta, R = 1 + 0.3 * g.standard_normal(C), 0.3 * g.standard_normal(C), g.standard_normal((B, T, C))
    dx, _, _ = ref.pre_ln_pieces(R, x, gamma, beta, w, H, bias)
    n = numerical_gradient(lambda: float(np.sum(ref.pre_ln_attention_forward(x, gamma, beta, w, H, bias)[0] * R)), x)
    assert rel_error(dx, n) < OP_THRESHOLD


def test_adapter_forward_and_backward():
    C, m = 5, 3
    h = g.standard_normal((2, 4, C))
    w = [0.5 * g.standard_normal(s) for s in ((C, m), (m,), (m, C), (C,))]
    names = ("W_down", "b_down", "W_up", "b_up")
    assert rel_error(ref.adapter_forward(h, *w)[0], adapter_forward(h, dict(zip(names, w)))[0]) < 1e-14
    R = g.standard_normal(h.shape)
    got = ref.adapter_backward(R, h, *w)
    for a, n in zip(got, fd(lambda: float(np.sum(ref.adapter_forward(h, *w)[0] * R)), h, *w)):
        assert rel_error(a, n) < OP_THRESHOLD


def test_lora_backward():
    x, A, B, R, s = g.standard_normal((2, 3, 5)), g.standard_normal((5, 2)), g.standard_normal((2, 4)), \
        g.standard_normal((2, 3, 4)), 1.7
    got = ref.lora_backward(R, x, A, B, s)
    for a, n in zip(got, fd(lambda: float(np.sum(s * (x @ A) @ B * R)), x, A, B)):
        assert rel_error(a, n) < OP_THRESHOLD


def test_prefix_backward():
    Bn, n, T, C = 3, 2, 4, 5
    P, k_own, dk = g.standard_normal((n, C)), g.standard_normal((Bn, T, C)), g.standard_normal((Bn, n + T, C))

    def loss():
        return float(np.sum(np.concatenate([np.broadcast_to(P, (Bn, n, C)), k_own], axis=1) * dk))
    for a, num in zip(ref.prefix_backward(dk, n), fd(loss, P, k_own)):
        assert rel_error(a, num) < OP_THRESHOLD


def test_counts_and_closed_forms():
    assert ref.count_evaluations(3, 4) == 24
    h = ref.best_step(2.0 ** -53, 1.0, 1.0)
    E = (lambda h: h * h / 6 + 2.0 ** -53 / h)
    assert E(h) < E(h * 1.01) and E(h) < E(h / 1.01)  # a minimum of the error
    assert ref.attention_costs(2, 16, 64, 4) == (4 * 64 * 64 + 4 * 64, 8 * 2 * 16 * 64 * 64 + 4 * 2 * 16 * 16 * 64)
    assert abs(ref.TRUNCATION - 0.7737) < 1e-4
