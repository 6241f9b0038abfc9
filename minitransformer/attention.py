"""Multi-head self-attention: forward/backward, with causal and key-padding masks.

No Python loop over batch, heads or positions: heads are a reshape of the model width,
and every head of every sequence goes through one batched matrix product.

Shapes: B batch, T sequence length, C model width, H heads, hs = C // H head size.
Weights `w` is a dict of arrays: W_q, W_k, W_v, W_o of shape (C, C) and b_q, b_k, b_v,
b_o of shape (C,), stored as y = x @ W + b like every linear layer of the package.
"""
import numpy as np

from .layers import linear_backward, linear_forward, softmax_backward, softmax_forward
from .tools.runtime import matmul

PROJECTIONS = ("q", "k", "v")


def attention_bias(T, causal=False, pad_mask=None, dtype=np.float32):
    """The additive mask added to the attention scores: 0 where a query may look, -inf where not.

    causal: position t sees only keys 0..t (next-token models).
    pad_mask: (B, T) bool, True for real tokens; padded keys are hidden from every query.
    Returns None (no mask) or an array broadcastable to (B, H, T, T).
    """
    allowed = None
    if causal:
        allowed = np.tril(np.ones((T, T), dtype=bool))[None, None]  # (1,1,T,T)
    if pad_mask is not None:
        keys = pad_mask[:, None, None, :]  # (B,1,1,T): the mask hides keys, not queries
        allowed = keys if allowed is None else (allowed & keys)  # (B,1,T,T)
    if allowed is None:
        return None
    bias = np.zeros(allowed.shape, dtype=dtype)
    bias[~allowed] = -np.inf
    return bias


def split_heads(x, H):
    """(B, T, C) -> (B, H, T, hs): the heads are slices of the width."""
    B, T, C = x.shape
    return x.reshape(B, T, H, C // H).transpose(0, 2, 1, 3)


def merge_heads(x):
    """(B, H, T, hs) -> (B, T, C), the inverse of split_heads (one copy, to contiguous)."""
    B, H, T, hs = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, T, H * hs)


def heads_matmul(a, b):
    """a @ b per head, written straight into the heads' slices of a new (B, T, C) array.

    a (B, H, T, K), b (B, H, K, hs) -> (B, T, C): merge_heads(a @ b) without the merging
    copy, because the product lands in split_heads(out), a view of the result.
    """
    B, H, T, _ = a.shape
    out = np.empty((B, T, H * b.shape[-1]), dtype=a.dtype)
    matmul(a, b, out=split_heads(out, H))  # (B,H,T,K) @ (B,H,K,hs) -> (B,H,T,hs) view of (B,T,C)
    return out


def scores_matmul(a, b):
    """a @ b^T per head: (B, H, T, hs) @ (B, H, hs, T) -> (B, H, T, T), a new array."""
    out = np.empty((*a.shape[:-1], b.shape[-2]), dtype=a.dtype)
    matmul(a, b.transpose(0, 1, 3, 2), out=out)
    return out


def attention_forward(x, w, n_heads, bias=None, keep=None):
    """softmax(Q K^T / sqrt(hs) + bias) V, per head, then the output projection.

    x (B, T, C), w weights (see module doc), bias None or (B|1, 1, T, T) -> out (B, T, C).
    keep: the weight names whose gradient the backward may want (default: all). A frozen
    projection does not keep its input in the cache (see linear_forward's keep_x).
    """
    keep = w.keys() if keep is None else keep
    hs = x.shape[-1] // n_heads
    scale = x.dtype.type(1 / np.sqrt(hs))
    q, cache_q = linear_forward(x, w["W_q"], w["b_q"], keep_x="W_q" in keep)  # (B,T,C)
    k, cache_k = linear_forward(x, w["W_k"], w["b_k"], keep_x="W_k" in keep)
    v, cache_v = linear_forward(x, w["W_v"], w["b_v"], keep_x="W_v" in keep)
    q *= scale  # in place on our fresh q; scaling q is cheaper than scaling (T,T)
    q, k, v = (split_heads(a, n_heads) for a in (q, k, v))  # (B,H,T,hs) views: no copies
    att = scores_matmul(q, k)  # (B,H,T,hs) @ (B,H,hs,T) -> (B,H,T,T)
    if bias is not None:
        att += bias  # -inf on every forbidden (query, key) pair
    p, _ = softmax_forward(att)  # (B,H,T,T); its cache is p itself
    ctx = heads_matmul(p, v)  # (B,H,T,T) @ (B,H,T,hs) -> (B,T,C)
    out, cache_o = linear_forward(ctx, w["W_o"], w["b_o"], keep_x="W_o" in keep)  # (B,T,C)
    # cache: the three projections' inputs (one shared x), the heads and the probabilities
    cache = (cache_q, cache_k, cache_v, cache_o, q, k, v, p, scale, n_heads)
    return out, cache


def attention_backward(dout, cache, need_dx=True, need=None):
    """dout (B, T, C) -> dx (B, T, C) or None, grads {name: array}.

    need: the set of weight names whose gradient is wanted (default: all). A name not in
    `need` is frozen: its weight-gradient product is skipped and it is absent from grads.
    If neither dx nor any of W_q, W_k, W_v (or their biases) is needed, the whole backward
    through softmax and the Q/K/V projections is skipped: nothing below would use it.
    """
    cache_q, cache_k, cache_v, cache_o, q, k, v, p, scale, n_heads = cache
    need = {"W_q", "b_q", "W_k", "b_k", "W_v", "b_v", "W_o", "b_o"} if need is None else need
    grads = {}
    need_core = need_dx or bool(need & {"W_q", "b_q", "W_k", "b_k", "W_v", "b_v"})
    dctx, grads["W_o"], grads["b_o"] = linear_backward(
        dout, cache_o, need_dx=need_core, need_dW="W_o" in need, need_db="b_o" in need)
    if not need_core:  # nothing below the output projection wants a gradient
        return None, {n: g for n, g in grads.items() if g is not None}
    dctx = split_heads(dctx, n_heads)  # (B,T,C) -> (B,H,T,hs) view
    # forward was ctx = p @ v
    dp = scores_matmul(dctx, v)  # (B,H,T,hs) @ (B,H,hs,T) -> (B,H,T,T)
    dv = heads_matmul(p.transpose(0, 1, 3, 2), dctx)  # (B,H,T,T) @ (B,H,T,hs) -> (B,T,C)
    datt = softmax_backward(dp, p)  # (B,H,T,T); masked pairs had p = 0 and get 0
    # forward was att = (q * scale) @ k^T, with q already scaled
    dq = heads_matmul(datt, k)  # (B,H,T,T) @ (B,H,T,hs) -> (B,T,C)
    dq *= scale
    dk = heads_matmul(datt.transpose(0, 1, 3, 2), q)  # (B,H,T,T) @ (B,H,T,hs) -> (B,T,C)
    dx = None
    for name, dh, c in (("q", dq, cache_q), ("k", dk, cache_k), ("v", dv, cache_v)):
        dxi, grads[f"W_{name}"], grads[f"b_{name}"] = linear_backward(
            dh, c, need_dx=need_dx,
            need_dW=f"W_{name}" in need, need_db=f"b_{name}" in need)
        if need_dx and dx is None:
            dx = dxi  # a fresh array from the matmul: safe to accumulate into
        elif need_dx:
            dx += dxi  # x fed all three projections: their gradients add
    return dx, {n: g for n, g in grads.items() if g is not None}
