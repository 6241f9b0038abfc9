"""The forward/backward pairs of layers.py and losses.py: hand-computed values, gradient checks
(float64, threshold OP_THRESHOLD = 1e-7 per operation) and numerical stability."""
import numpy as np
import pytest

from minitransformer import layers as L
from minitransformer.gradcheck import OP_THRESHOLD, check_function
from minitransformer.losses import cross_entropy_backward, cross_entropy_forward


def assert_grads_ok(errors):
    """Every relative error of a check_function result is at most OP_THRESHOLD (1e-7)."""
    assert errors, "no gradient was checked"
    bad = {k: e for k, e in errors.items() if not e <= OP_THRESHOLD}
    assert not bad, f"relative errors above {OP_THRESHOLD:.0e}: {bad}"


# ----------------------------------------------------------------------------- values by hand


def test_linear_value_by_hand():
    x = np.array([[1.0, 2.0]])
    W = np.array([[1.0, 0.0, -1.0],
                  [2.0, 1.0, 0.0]])
    b = np.array([0.5, -1.0, 2.0])
    # y_j = sum_i x_i W_ij + b_j: [1+4+0.5, 0+2-1, -1+0+2]
    expected = np.array([[5.5, 1.0, 1.0]])
    out, _ = L.linear_forward(x, W, b)
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-15)


def test_linear_backward_value_by_hand():
    x = np.array([[1.0, 2.0], [3.0, -1.0]])  # (N=2, d_in=2)
    W = np.array([[1.0, 0.0, -1.0], [2.0, 1.0, 0.0]])
    dout = np.array([[1.0, 0.0, 2.0], [0.0, 1.0, 1.0]])
    _, cache = L.linear_forward(x, W, np.zeros(3))
    dx, grads = L.linear_backward(dout, cache)
    dW, db = grads["W"], grads["b"]
    # dx = dout @ W.T: row 0 = [1*1+0+2*(-1), 1*2+0+0] = [-1, 2]; row 1 = [0+0-1, 0+1+0] = [-1, 1]
    np.testing.assert_array_equal(dx, [[-1.0, 2.0], [-1.0, 1.0]])
    # dW = x.T @ dout: [[1*1+3*0, 1*0+3*1, 1*2+3*1], [2*1-1*0, 2*0-1*1, 2*2-1*1]]
    np.testing.assert_array_equal(dW, [[1.0, 3.0, 5.0], [2.0, -1.0, 3.0]])
    np.testing.assert_array_equal(db, [1.0, 1.0, 3.0])


def test_linear_skips_what_is_not_needed():
    x, W = np.ones((2, 3)), np.ones((3, 4))
    _, cache = L.linear_forward(x, W, np.zeros(4))
    assert L.linear_backward(np.ones((2, 4)), cache, need_dx=False, need_dW=False, need_db=False) == (None, {})
    dx, grads = L.linear_backward(np.ones((2, 4)), cache, need_dx=False, need_db=False)
    assert dx is None and list(grads) == ["W"]


def test_softmax_value_by_hand():
    # exp(0), exp(ln 2), exp(ln 3) = 1, 2, 3; divided by their sum 6
    p, _ = L.softmax_forward(np.array([0.0, np.log(2.0), np.log(3.0)]))
    np.testing.assert_allclose(p, [1 / 6, 2 / 6, 3 / 6], rtol=1e-15)
    # adding a constant to a row changes nothing
    p2, _ = L.softmax_forward(np.array([5.0, 5.0 + np.log(2.0), 5.0 + np.log(3.0)]))
    np.testing.assert_allclose(p2, [1 / 6, 2 / 6, 3 / 6], rtol=1e-14)
    # a masked entry (-inf) gets probability 0; the others share 1 + 3 = 4
    p3, _ = L.softmax_forward(np.array([[0.0, -np.inf, np.log(3.0)]]))
    np.testing.assert_allclose(p3, [[1 / 4, 0.0, 3 / 4]], rtol=1e-15)


def test_layernorm_value_by_hand():
    # row [0, 0, 2, 2]: mean 1, deviations [-1, -1, 1, 1], variance 1 -> xhat = [-1, -1, 1, 1]
    # row [1, 1, 3, 3] with eps = 3: variance 1, 1 / sqrt(1 + 3) = 0.5 -> xhat = [-.5, -.5, .5, .5]
    gamma, beta = np.array([1.0, 2.0, 3.0, 4.0]), np.array([0.0, 0.0, 0.0, 1.0])
    out, _ = L.layernorm_forward(np.array([[0.0, 0.0, 2.0, 2.0]]), gamma, beta, eps=0.0)
    np.testing.assert_allclose(out, [[-1.0, -2.0, 3.0, 5.0]], rtol=0, atol=1e-15)
    out, _ = L.layernorm_forward(np.array([[1.0, 1.0, 3.0, 3.0]]), gamma, beta, eps=3.0)
    np.testing.assert_allclose(out, [[-0.5, -1.0, 1.5, 3.0]], rtol=0, atol=1e-15)


def test_gelu_relu_tanh_values_by_hand():
    x = np.array([0.0, 1.0, -2.0])
    np.testing.assert_array_equal(L.relu_forward(x)[0], [0.0, 1.0, 0.0])
    np.testing.assert_allclose(L.tanh_forward(x)[0], np.tanh(x), rtol=1e-15)
    # GELU(0) = 0; GELU(1) = 0.5 (1 + tanh(sqrt(2/pi) * 1.044715))
    expected = np.array([0.0, 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * 1.044715)),
                         -1.0 * (1 + np.tanh(np.sqrt(2 / np.pi) * (-2 - 0.044715 * 8)))])
    np.testing.assert_allclose(L.gelu_forward(x)[0], expected, rtol=1e-14)


def test_embedding_repeated_token_gradients_add():
    ids = np.array([[2, 2, 0]])
    _, cache = L.embedding_forward(ids, np.zeros((4, 2)))
    dout = np.array([[[1.0, 2.0], [10.0, 20.0], [5.0, 5.0]]])
    dx, grads = L.embedding_backward(dout, cache)
    assert dx is None and list(grads) == ["W"]  # ids are integers: no dx
    dW = grads["W"]
    np.testing.assert_array_equal(dW, [[5.0, 5.0], [0.0, 0.0], [11.0, 22.0], [0.0, 0.0]])


def test_dropout_value_and_identity_in_eval(rng):
    x = rng.standard_normal((50, 40))
    out, cache = L.dropout_forward(x, 0.25, np.random.default_rng(3), train=True)
    mask, scale = cache
    assert scale == 1 / 0.75
    np.testing.assert_allclose(out, np.where(mask, x / 0.75, 0.0), rtol=1e-15, atol=0)
    assert 0.2 < 1 - mask.mean() < 0.3  # about a quarter dropped (2000 draws)
    same, cache = L.dropout_forward(x, 0.25, None, train=False)
    assert same is x and cache is None


# ----------------------------------------------------------------------------- gradient checks


def test_gradcheck_linear(rng):
    assert_grads_ok(check_function(L.linear_forward, L.linear_backward,
                                   {"x": rng.standard_normal((2, 3, 4)), "W": rng.standard_normal((4, 5)),
                                    "b": rng.standard_normal(5)}))


def test_gradcheck_token_embedding_with_repeats(rng):
    ids = np.array([[1, 3, 3], [3, 0, 1]])
    assert_grads_ok(check_function(lambda W: L.embedding_forward(ids, W),
                                   L.embedding_backward,
                                   {"W": rng.standard_normal((5, 4))}))


def test_gradcheck_position_embedding(rng):
    def forward(W_pos):  # broadcast over a batch of 2, as the model does
        out, cache = L.position_forward(3, W_pos)
        return out + np.zeros((2, 1, 1)), cache
    errors = check_function(forward, L.position_backward, {"W_pos": rng.standard_normal((6, 4))})
    assert_grads_ok(errors)


def test_gradcheck_layernorm(rng):
    assert_grads_ok(check_function(L.layernorm_forward, L.layernorm_backward,
                                   {"x": rng.standard_normal((2, 3, 6)), "gamma": rng.standard_normal(6),
                                    "beta": rng.standard_normal(6)}))


def test_gradcheck_layernorm_constant_row(rng):
    x = rng.standard_normal((2, 3, 6))
    x[1, 2] = -0.25  # variance 0 (exactly: the mean of six -0.25 is -0.25): xhat = 0, scale 1/sqrt(eps)
    out, _ = L.layernorm_forward(x, np.ones(6), np.zeros(6))
    assert np.all(np.isfinite(out)) and np.all(out[1, 2] == 0)
    # the function curves on the scale sqrt(eps) ~ 3e-3 there: h = 1e-6 keeps the finite
    # differences' truncation error below the threshold (gradcheck.py explains the numbers)
    errors = check_function(L.layernorm_forward, L.layernorm_backward,
                            {"x": x, "gamma": rng.standard_normal(6), "beta": rng.standard_normal(6)}, h=1e-6)
    assert_grads_ok(errors)


@pytest.mark.parametrize("act", ["gelu", "relu", "tanh"])
def test_gradcheck_activations(act, rng):
    fwd, bwd = L.ACTIVATIONS[act]
    x = rng.standard_normal((4, 7))
    x[np.abs(x) < 0.05] = 0.5  # keep relu's kink away from the finite differences
    assert_grads_ok(check_function(fwd, bwd, {"x": x}))


def test_gradcheck_softmax_with_masks(rng):
    masked = np.zeros((2, 3, 5), bool)
    masked[0, 0, [1, 3]] = True
    masked[1, 1, :] = True  # a fully masked row
    errors = check_function(lambda x: L.softmax_forward(np.where(masked, -np.inf, x)),
                            L.softmax_backward,
                            {"x": rng.standard_normal((2, 3, 5))})
    assert_grads_ok(errors)


def test_gradcheck_dropout_replayed(rng):
    # every forward draws its mask from a generator seeded anew: the same mask each time
    errors = check_function(lambda x: L.dropout_forward(x, 0.3, np.random.default_rng(5), True),
                            L.dropout_backward,
                            {"x": rng.standard_normal((4, 6))})
    assert_grads_ok(errors)


def test_gradcheck_cross_entropy_ignored_positions(rng):
    targets = np.array([[1, -100, 0], [3, 2, -100]])

    def forward(logits):
        loss, cache = cross_entropy_forward(logits, targets)
        return np.array(loss), cache
    def backward(dloss, cache):  # the loss's backward starts at dloss = 1: scale by the given one
        dlogits, grads = cross_entropy_backward(cache)
        return float(dloss) * dlogits, grads
    errors = check_function(forward, backward, {"logits": rng.standard_normal((2, 3, 4))})
    assert_grads_ok(errors)


def test_cross_entropy_value_by_hand():
    # logits [0, ln 3]: p = [1/4, 3/4]. Targets 1 and 0: loss = -(ln 3/4 + ln 1/4) / 2.
    # The ignored third row would add ln 2 (uniform over 2) if it counted.
    logits = np.array([[0.0, np.log(3.0)], [0.0, np.log(3.0)], [0.0, 0.0]])
    loss, cache = cross_entropy_forward(logits, np.array([1, 0, -100]))
    assert loss == pytest.approx(-(np.log(0.75) + np.log(0.25)) / 2, rel=1e-14)
    # dlogits = (p - onehot) / n with n = 2 counted rows; the ignored row gets 0
    dlogits, grads = cross_entropy_backward(cache)
    assert grads == {}
    np.testing.assert_allclose(dlogits,
                               [[0.125, -0.125], [-0.375, 0.375], [0.0, 0.0]], rtol=1e-14, atol=1e-16)


def test_backwards_never_write_into_dout(rng):
    """STYLE.md rule 5: a backward must not modify the caller's upstream gradient."""
    x = rng.standard_normal((3, 4))
    cases = [(L.gelu_forward(x)[1], L.gelu_backward), (L.relu_forward(x)[1], L.relu_backward),
             (L.tanh_forward(x)[1], L.tanh_backward), (L.softmax_forward(x)[1], L.softmax_backward),
             (L.layernorm_forward(x, np.ones(4), np.zeros(4))[1], L.layernorm_backward),
             (L.dropout_forward(x, 0.5, np.random.default_rng(0))[1], L.dropout_backward)]
    for cache, backward in cases:
        dout = rng.standard_normal((3, 4))
        before = dout.copy()
        backward(dout, cache)
        np.testing.assert_array_equal(dout, before, err_msg=backward.__name__)


# ----------------------------------------------------------------------------- stability


def test_softmax_extreme_logits_finite_and_correct():
    x = np.array([[1e4, -1e4, 1e4], [-1e4, -1e4, -1e4 + np.log(3.0)]])
    p, cache = L.softmax_forward(x)
    assert np.all(np.isfinite(p))
    np.testing.assert_allclose(p, [[0.5, 0.0, 0.5], [0.2, 0.2, 0.6]], rtol=1e-9, atol=0)
    dx, _ = L.softmax_backward(np.ones_like(x), cache)
    assert np.all(np.isfinite(dx))
    np.testing.assert_allclose(dx, 0.0, atol=1e-12)  # a shift of every logit changes nothing


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cross_entropy_extreme_logits_finite_and_correct(dtype):
    logits = np.array([[1e4, -1e4], [1e4, -1e4], [-1e4, -1e4]], dtype)
    loss, cache = cross_entropy_forward(logits, np.array([0, 1, 1]))
    # row 0 right with certainty: 0; row 1 wrong by 2e4: 2e4; row 2 a tie: ln 2. Mean over 3.
    assert loss == pytest.approx((0 + 2e4 + np.log(2.0)) / 3, rel=1e-6)
    d, _ = cross_entropy_backward(cache)
    assert d.dtype == dtype and np.all(np.isfinite(d))
    np.testing.assert_allclose(d, np.array([[0, 0], [1, -1], [0.5, -0.5]]) / 3, atol=1e-7)


def test_fully_masked_softmax_row_is_zero_not_nan():
    x = np.full((1, 4), -np.inf)
    p, cache = L.softmax_forward(x)
    np.testing.assert_array_equal(p, np.zeros((1, 4)))
    np.testing.assert_array_equal(L.softmax_backward(np.ones((1, 4)), cache)[0], np.zeros((1, 4)))


@pytest.mark.parametrize("op", ["linear", "layernorm", "gelu", "relu", "tanh", "softmax", "dropout"])
def test_float32_stays_float32(op, rng):
    x = rng.standard_normal((2, 3, 4)).astype(np.float32)
    W, v = rng.standard_normal((4, 4)).astype(np.float32), np.ones(4, np.float32)
    fwd = {"linear": lambda: L.linear_forward(x, W, v), "layernorm": lambda: L.layernorm_forward(x, v, v),
           "softmax": lambda: L.softmax_forward(x),
           "dropout": lambda: L.dropout_forward(x, 0.5, np.random.default_rng(0))}.get(
        op, lambda: L.ACTIVATIONS[op][0](x))
    bwd = {"linear": L.linear_backward, "layernorm": L.layernorm_backward, "softmax": L.softmax_backward,
           "dropout": L.dropout_backward}.get(op, L.ACTIVATIONS.get(op, (None, None))[1])
    out, cache = fwd()
    assert out.dtype == np.float32
    dx, grads = bwd(np.ones_like(out), cache)
    for g in (dx, *grads.values()):
        assert g.dtype == np.float32


def test_cross_entropy_with_every_position_ignored_is_zero_with_no_gradient():
    logits = np.array([[1.0, -2.0], [0.5, 0.5]])
    loss, cache = cross_entropy_forward(logits, np.array([-100, -100]))
    assert loss == 0.0 and np.copysign(1.0, loss) == 1.0  # +0.0, not -0.0
    dlogits, _ = cross_entropy_backward(cache)
    assert np.array_equal(dlogits, np.zeros_like(logits))
