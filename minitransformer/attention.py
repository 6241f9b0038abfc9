"""Multi-head self-attention, forward and backward, with causal and key-padding masks.

    q = x W_q + b_q,  k = x W_k + b_k,  v = x W_v + b_v           each (B, T, C)
    Q, K, V = the H heads of q, k, v                              each (B, H, T, hs)
    S = Q K^T / sqrt(hs) + bias                                   (B, H, T, T) scores
    P = softmax(S)                                                over the keys (last axis)
    ctx = P V, heads merged back                                  (B, T, C)
    out = ctx W_o + b_o                                           (B, T, C)

Two pairs: attend_forward/attend_backward is the middle (heads, scores, mask, softmax,
context: PyTorch's scaled_dot_product_attention), and attention_forward/attention_backward
puts the four projections around it. No Python loop over batch, heads or positions: the heads
are a reshape of the width, and every head of every sequence goes through one batched matrix
product. The backward is derived step by step in notebooks/02_attention.ipynb.

Shapes: B batch, T sequence length, C model width, H heads, hs = C // H head size. The
weights `w` are a dict: W_q, W_k, W_v, W_o of shape (C, C) and b_q, b_k, b_v, b_o of shape
(C,), stored as y = x @ W + b like every linear layer of the package.
"""
import math

import numpy as np

from .layers import linear_backward, linear_forward, softmax_backward, softmax_forward


def attention_bias(T, causal=False, pad_mask=None, dtype=np.float32):
    """The mask added to the scores: 0 where a query may look at a key, -inf where not.

    causal: position t sees only keys 0..t (next-token models).
    pad_mask: (B, T) bool, True for real tokens; padded keys are hidden from every query.
    Returns None (no mask) or an array that broadcasts to (B, H, T, T).
    """
    allowed = None
    if causal:
        allowed = np.tril(np.ones((T, T), dtype=bool))[None, None]  # (1, 1, T, T): key <= query
    if pad_mask is not None:
        keys = pad_mask[:, None, None, :]  # (B, 1, 1, T): the mask hides keys, not queries
        allowed = keys if allowed is None else (allowed & keys)  # (B, 1, T, T)
    if allowed is None:
        return None
    bias = np.zeros(allowed.shape, dtype=dtype)
    bias[~allowed] = -np.inf  # exp(-inf) = 0: a hidden key gets probability 0
    return bias


def split_heads(x, H):
    """(B, T, C) -> (B, H, T, hs): head h is the slice h*hs:(h+1)*hs of the width."""
    B, T, C = x.shape
    return x.reshape(B, T, H, C // H).transpose(0, 2, 1, 3)


def merge_heads(x):
    """(B, H, T, hs) -> (B, T, C), the inverse of split_heads."""
    B, H, T, hs = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, T, H * hs)


def transpose(x):
    """Swap the last two axes: (B, H, T, K) -> (B, H, K, T)."""
    return x.swapaxes(-1, -2)


# ----------------------------------------------------------------------------- the middle


def attend_forward(q, k, v, n_heads, bias=None):
    """softmax(Q K^T / sqrt(hs) + bias) V per head.   q, k, v (B, T, C) -> ctx (B, T, C)."""
    H = n_heads
    scale = 1 / math.sqrt(q.shape[-1] // H)  # a Python float: the arrays keep their dtype
    Q, K, V = split_heads(q, H), split_heads(k, H), split_heads(v, H)  # (B, H, T, hs)
    S = Q @ transpose(K) * scale  # (B, H, T, hs) @ (B, H, hs, T) -> (B, H, T, T)
    if bias is not None:
        S = S + bias  # -inf on every forbidden (query, key) pair
    P, _ = softmax_forward(S)  # (B, H, T, T), each row sums to 1 over the keys
    ctx = merge_heads(P @ V)  # (B, H, T, T) @ (B, H, T, hs) -> (B, H, T, hs) -> (B, T, C)
    cache = (Q, K, V, P, scale)  # the heads and the probabilities, for the products
    return ctx, cache


def attend_backward(dctx, cache):
    """dctx (B, T, C) -> (dq, dk, dv) each (B, T, C), {}: three inputs, no parameters."""
    Q, K, V, P, scale = cache
    dctx = split_heads(dctx, Q.shape[1])  # forward was ctx = merge_heads(...): (B, H, T, hs)
    # forward was ctx = P @ V
    dV = transpose(P) @ dctx  # (B, H, T, T) @ (B, H, T, hs) -> (B, H, T, hs)
    dP = dctx @ transpose(V)  # (B, H, T, hs) @ (B, H, hs, T) -> (B, H, T, T)
    # forward was P = softmax(S); masked pairs had P = 0 and get dS = 0
    dS, _ = softmax_backward(dP, P)  # (B, H, T, T)
    # forward was S = Q @ K^T * scale + bias (the bias is a constant)
    dQ = dS @ K * scale  # (B, H, T, T) @ (B, H, T, hs) -> (B, H, T, hs)
    dK = transpose(dS) @ Q * scale  # (B, H, T, T) @ (B, H, T, hs) -> (B, H, T, hs)
    return (merge_heads(dQ), merge_heads(dK), merge_heads(dV)), {}  # each (B, T, C)


# ----------------------------------------------------------------------------- with the projections


def attention_forward(x, w, n_heads, bias=None):
    """The projections, attend_forward, the output projection.

    x (B, T, C), w the weights (module doc), bias None or (B|1, 1, T, T) -> out (B, T, C).
    """
    q, cache_q = linear_forward(x, w["W_q"], w["b_q"])  # (B, T, C) @ (C, C) -> (B, T, C)
    k, cache_k = linear_forward(x, w["W_k"], w["b_k"])  # (B, T, C)
    v, cache_v = linear_forward(x, w["W_v"], w["b_v"])  # (B, T, C)
    ctx, cache_a = attend_forward(q, k, v, n_heads, bias)  # (B, T, C), the heads merged
    out, cache_o = linear_forward(ctx, w["W_o"], w["b_o"])  # (B, T, C) @ (C, C) -> (B, T, C)
    cache = (cache_q, cache_k, cache_v, cache_a, cache_o)
    return out, cache


def attention_backward(dout, cache):
    """dout (B, T, C) -> dx (B, T, C), grads {W_q: (C, C), b_q: (C,), ...}."""
    cache_q, cache_k, cache_v, cache_a, cache_o = cache
    dctx, g_o = linear_backward(dout, cache_o)  # forward was out = ctx W_o + b_o
    (dq, dk, dv), _ = attend_backward(dctx, cache_a)  # (B, T, C) each
    dxq, g_q = linear_backward(dq, cache_q)  # forward was q = x W_q + b_q
    dxk, g_k = linear_backward(dk, cache_k)
    dxv, g_v = linear_backward(dv, cache_v)
    dx = dxq + dxk + dxv  # x fed all three projections: their gradients add
    each = {"q": g_q, "k": g_k, "v": g_v, "o": g_o}
    grads = {f"{name}_{t}": g for t, gs in each.items() for name, g in gs.items()}  # W_q, b_q, ..., b_o
    return dx, grads
