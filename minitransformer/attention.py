"""Multi-head self-attention, forward and backward, with causal and key-padding masks.

    Q = x W_q + b_q,  K = x W_k + b_k,  V = x W_v + b_v          each (B, T, C), split into H heads
    S = Q K^T / sqrt(hs) + mask                                    (B, H, T, T) scores
    P = softmax(S)                                                 over the keys (last axis)
    ctx = P V                                                      (B, H, T, hs), heads merged
    out = ctx W_o + b_o                                            (B, T, C)

No Python loop over batch, heads or positions: the heads are a reshape of the width, and every
head of every sequence goes through one batched matrix product. The backward is derived step
by step in notebooks/02_attention.ipynb.

Shapes: B batch, T sequence length, C model width, H heads, hs = C // H head size.
The weights `w` are a dict: W_q, W_k, W_v, W_o of shape (C, C) and b_q, b_k, b_v, b_o of
shape (C,), stored as y = x @ W + b like every linear layer of the package.
"""
import numpy as np

from .layers import linear_backward, linear_forward, softmax_backward, softmax_forward

WEIGHTS = ("W_q", "b_q", "W_k", "b_k", "W_v", "b_v", "W_o", "b_o")


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


def attention_forward(x, w, n_heads, bias=None, keep=None):
    """softmax(Q K^T / sqrt(hs) + bias) V per head, then the output projection.

    x (B, T, C), w the weights (module doc), bias None or (B|1, 1, T, T) -> out (B, T, C).
    keep: the weight names whose gradient the backward may want (default: all). A frozen
    projection does not keep its input in the cache (linear_forward's keep_x).
    """
    keep = WEIGHTS if keep is None else keep
    H = n_heads
    hs = x.shape[-1] // H
    scale = x.dtype.type(1 / np.sqrt(hs))
    q, cache_q = linear_forward(x, w["W_q"], w["b_q"], keep_x="W_q" in keep)  # (B, T, C)
    k, cache_k = linear_forward(x, w["W_k"], w["b_k"], keep_x="W_k" in keep)  # (B, T, C)
    v, cache_v = linear_forward(x, w["W_v"], w["b_v"], keep_x="W_v" in keep)  # (B, T, C)
    Q, K, V = split_heads(q, H), split_heads(k, H), split_heads(v, H)  # each (B, H, T, hs)
    S = Q @ transpose(K) * scale  # (B, H, T, hs) @ (B, H, hs, T) -> (B, H, T, T)
    if bias is not None:
        S = S + bias  # -inf on every forbidden (query, key) pair
    P, _ = softmax_forward(S)  # (B, H, T, T), each row sums to 1 over the keys
    ctx = P @ V  # (B, H, T, T) @ (B, H, T, hs) -> (B, H, T, hs)
    merged = merge_heads(ctx)  # (B, T, C)
    out, cache_o = linear_forward(merged, w["W_o"], w["b_o"], keep_x="W_o" in keep)  # (B, T, C)
    cache = {"q": cache_q, "k": cache_k, "v": cache_v, "o": cache_o,  # the four projections
             "Q": Q, "K": K, "V": V, "P": P,  # the heads and the probabilities, for the products
             "scale": scale, "H": H}
    return out, cache


def attention_backward(dout, cache, need_dx=True, need=None):
    """dout (B, T, C) -> dx (B, T, C) or None, grads {name: array}.

    need: the weight names whose gradient is wanted (default: all). A name not in `need` is
    frozen: its weight-gradient product is skipped and it is absent from grads. When neither
    dx nor any of W_q, W_k, W_v (or their biases) is needed, everything below the output
    projection is skipped: nothing would use it.
    """
    c = cache
    Q, K, V, P, scale, H = c["Q"], c["K"], c["V"], c["P"], c["scale"], c["H"]
    need = set(WEIGHTS) if need is None else set(need)
    grads = {}
    below = need_dx or bool(need & {"W_q", "b_q", "W_k", "b_k", "W_v", "b_v"})
    # forward was out = merged @ W_o + b_o
    dmerged, grads["W_o"], grads["b_o"] = linear_backward(
        dout, c["o"], need_dx=below, need_dW="W_o" in need, need_db="b_o" in need)
    if not below:
        return None, {n: g for n, g in grads.items() if g is not None}
    dctx = split_heads(dmerged, H)  # forward was merged = merge_heads(ctx): (B, H, T, hs)
    # forward was ctx = P @ V
    dV = transpose(P) @ dctx  # (B, H, T, T) @ (B, H, T, hs) -> (B, H, T, hs)
    dP = dctx @ transpose(V)  # (B, H, T, hs) @ (B, H, hs, T) -> (B, H, T, T)
    # forward was P = softmax(S); masked pairs had P = 0 and get dS = 0
    dS = softmax_backward(dP, P)  # (B, H, T, T)
    # forward was S = Q @ K^T * scale + bias (the bias is a constant)
    dQ = dS @ K * scale  # (B, H, T, T) @ (B, H, T, hs) -> (B, H, T, hs)
    dK = transpose(dS) @ Q * scale  # (B, H, T, T) @ (B, H, T, hs) -> (B, H, T, hs)
    dx = None
    # forward was Q = split_heads(x @ W_q + b_q), and the same for K and V
    for name, dheads in (("q", dQ), ("k", dK), ("v", dV)):
        dxi, grads[f"W_{name}"], grads[f"b_{name}"] = linear_backward(
            merge_heads(dheads), c[name], need_dx=need_dx,
            need_dW=f"W_{name}" in need, need_db=f"b_{name}" in need)  # dxi (B, T, C)
        if need_dx:
            dx = dxi if dx is None else dx + dxi  # x fed all three projections: their gradients add
    return dx, {n: g for n, g in grads.items() if g is not None}
