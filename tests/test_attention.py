"""Multi-head self-attention: values by hand, masks, gradient checks (float64, OP_THRESHOLD 1e-7)."""
import numpy as np
import pytest

from minitransformer.attention import (attention_backward, attention_bias, attention_forward,
                                       merge_heads, split_heads)
from minitransformer.gradcheck import OP_THRESHOLD, check_function

NAMES = [f"{k}_{n}" for n in "qkvo" for k in "Wb"]


def hand_weights(C, s):
    """W_q = s I, W_k = W_v = W_o = I, biases 0: scores are s * x_t . x_u / sqrt(hs)."""
    w = {f"W_{n}": np.eye(C) for n in "qkvo"}
    w["W_q"] = s * np.eye(C)
    w.update({f"b_{n}": np.zeros(C) for n in "qkvo"})
    return w


# Two heads of size hs = 2 on C = 4, with W_q = s I and s = sqrt(2) ln 3, so that a score
# s * (x_t . x_u) / sqrt(2) is ln 3 when x_t . x_u = 1 within the head, else 0.
#   x0 = [1, 0 | 1, 0],  x1 = [0, 1 | 0, 0]
# head 0 (dims 0-1): query 0 scores [ln 3, 0] -> p = [3/4, 1/4] -> v = 3/4 [1,0] + 1/4 [0,1]
#                    query 1 scores [0, ln 3] -> p = [1/4, 3/4] -> [1/4, 3/4]
# head 1 (dims 2-3): query 0 scores [ln 3, 0] -> p = [3/4, 1/4] -> 3/4 [1,0] + 1/4 [0,0] = [3/4, 0]
#                    query 1 is zero: scores [0, 0] -> p = [1/2, 1/2] -> [1/2, 0]
X = np.array([[[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0]]])  # (B=1, T=2, C=4)
S = np.sqrt(2.0) * np.log(3.0)


def test_attention_value_by_hand_two_heads():
    out, _ = attention_forward(X, hand_weights(4, S), n_heads=2)
    expected = np.array([[[0.75, 0.25, 0.75, 0.0], [0.25, 0.75, 0.5, 0.0]]])
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-15)


def test_attention_value_by_hand_causal():
    # query 0 may only see key 0: it copies v0 = x0 in both heads; query 1 is unchanged
    out, _ = attention_forward(X, hand_weights(4, S), 2, attention_bias(2, causal=True, dtype=np.float64))
    expected = np.array([[[1.0, 0.0, 1.0, 0.0], [0.25, 0.75, 0.5, 0.0]]])
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-15)


def test_attention_value_by_hand_padding_and_output_bias():
    # key 1 is padding: every query sees only key 0 and copies x0; then b_o is added
    w = hand_weights(4, S)
    w["b_o"] = np.array([0.5, -0.5, 0.0, 1.0])
    bias = attention_bias(2, pad_mask=np.array([[True, False]]), dtype=np.float64)
    out, _ = attention_forward(X, w, 2, bias)
    expected = np.array([[[1.5, -0.5, 1.0, 1.0], [1.5, -0.5, 1.0, 1.0]]])
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-15)


def test_attention_bias_values():
    bias = attention_bias(3, causal=True, pad_mask=np.array([[True, True, False]]), dtype=np.float32)
    assert bias.shape == (1, 1, 3, 3) and bias.dtype == np.float32
    inf = np.inf
    np.testing.assert_array_equal(bias[0, 0], [[0, -inf, -inf], [0, 0, -inf], [0, 0, -inf]])
    assert attention_bias(3) is None


def test_split_and_merge_heads_are_inverse(rng):
    x = rng.standard_normal((2, 5, 6))
    h = split_heads(x, 3)
    assert h.shape == (2, 3, 5, 2)
    np.testing.assert_array_equal(h[1, 2, 4], x[1, 4, 4:6])  # head 2 holds dims 4..5
    np.testing.assert_array_equal(merge_heads(h), x)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_gradcheck_attention(causal, padded, rng):
    B, T, C, H = 2, 4, 6, 2
    pad = np.array([[True] * 4, [True, True, True, False]]) if padded else None
    bias = attention_bias(T, causal, pad, np.float64)
    w = {n: rng.standard_normal((C, C) if n[0] == "W" else C) * 0.5 for n in NAMES}
    errors = check_function(lambda x, **ws: attention_forward(x, ws, H, bias), attention_backward,
                            {"x": rng.standard_normal((B, T, C)), **w})
    assert set(errors) == {"x", *NAMES}
    assert max(errors.values()) <= OP_THRESHOLD, errors


def test_attention_frozen_weights_get_no_gradient(rng):
    """The container skips a frozen weight's product; dx does not depend on what is frozen."""
    from minitransformer.modules import Attention
    attn = Attention("attn", 4, 2, rng, np.float64, std=0.5)
    x = rng.standard_normal((2, 3, 4))
    out, cache = attn.forward(x)
    dout = rng.standard_normal(out.shape)
    dx_all = attn.backward(dout, cache)
    all_grads = {k: p.grad for k, p in attn.p.items()}
    for k, p in attn.p.items():
        p.grad, p.trainable = None, k in ("W_v", "b_o")
    out, cache = attn.forward(x)
    dx = attn.backward(dout, cache)
    assert {k for k, p in attn.p.items() if p.grad is not None} == {"W_v", "b_o"}
    np.testing.assert_array_equal(dx, dx_all)
    np.testing.assert_array_equal(attn.p["W_v"].grad, all_grads["W_v"])
    # only the output projection trains and nothing below wants dx: attend's backward is skipped
    for k, p in attn.p.items():
        p.grad, p.trainable = None, k == "W_o"
    out, cache = attn.forward(x)
    assert attn.backward(dout, cache, need_dx=False) is None
    assert {k for k, p in attn.p.items() if p.grad is not None} == {"W_o"}


def test_fully_padded_sequence_no_nan(rng):
    """A sequence whose every key is padding: zero attention, no NaN, forward and backward."""
    C = 4
    w = {n: rng.standard_normal((C, C) if n[0] == "W" else C) for n in NAMES}
    x = rng.standard_normal((2, 3, C))
    pad = np.array([[True, True, False], [False, False, False]])
    out, cache = attention_forward(x, w, 2, attention_bias(3, True, pad, np.float64))
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out[1], np.broadcast_to(w["b_o"], (3, C)))  # nothing attended: just b_o
    dx, grads = attention_backward(np.ones_like(out), cache)
    assert np.all(np.isfinite(dx)) and all(np.all(np.isfinite(g)) for g in grads.values())
    np.testing.assert_array_equal(dx[1], 0.0)  # no query of sequence 1 looked at any key


def test_attention_keeps_float32(rng):
    C = 4
    w = {n: rng.standard_normal((C, C) if n[0] == "W" else C).astype(np.float32) for n in NAMES}
    x = rng.standard_normal((2, 3, C)).astype(np.float32)
    out, cache = attention_forward(x, w, 2, attention_bias(3, True, np.ones((2, 3), bool), np.float32))
    assert out.dtype == np.float32
    dx, grads = attention_backward(np.ones_like(out), cache)
    assert dx.dtype == np.float32 and all(g.dtype == np.float32 for g in grads.values())
