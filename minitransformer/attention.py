"""Multi-head self-attention, forward and backward, with causal and key-padding masks.

    Q = x W_q + b_q,  K = x W_k + b_k,  V = x W_v + b_v          each (B, T, C), split into H heads
    S = Q K^T / sqrt(hs) + mask                                    (B, H, T, T) scores
    P = softmax(S)                                                 over the keys (last axis)
    ctx = P V                                                      (B, H, T, hs), heads merged
    out = ctx W_o + b_o                                            (B, T, C)

No Python loop over batch, heads or positions: the heads are a reshape of the width, and every
head of every sequence goes through one batched matrix product. The backward is derived step
by step in notebooks/02_attention.ipynb.

Two optional arguments serve the parameter-efficient family (peft.py):
    lora    {"q"|"k"|"v"|"o": (A, B, s)}: that projection becomes x W + b + s (x A) B
    prefix  (P_k, P_v), each (n, C): n keys and values put in front of every sequence's own,
            after the projections; the scores are then (B, H, T, n + T), and the mask must
            cover the n prefix columns (attention_bias(..., n_prefix=n): every query sees them)

Shapes: B batch, T sequence length, C model width, H heads, hs = C // H head size.
The weights `w` are a dict: W_q, W_k, W_v, W_o of shape (C, C) and b_q, b_k, b_v, b_o of
shape (C,), stored as y = x @ W + b like every linear layer of the package.
"""
import numpy as np

from .layers import linear_backward, linear_forward, softmax_backward, softmax_forward
from .peft import lora_backward, lora_forward

WEIGHTS = ("W_q", "b_q", "W_k", "b_k", "W_v", "b_v", "W_o", "b_o")
BELOW_O = {"W_q", "b_q", "W_k", "b_k", "W_v", "b_v", "A_q", "B_q", "A_k", "B_k", "A_v", "B_v",
           "P_k", "P_v"}  # what trains under the output projection


def attention_bias(T, causal=False, pad_mask=None, dtype=np.float32, n_prefix=0):
    """The mask added to the scores: 0 where a query may look at a key, -inf where not.

    causal: position t sees only keys 0..t (next-token models).
    pad_mask: (B, T) bool, True for real tokens; padded keys are hidden from every query.
    n_prefix: that many prefix keys in front of the T keys (prefix tuning), seen by every query.
    Returns None (no mask) or an array that broadcasts to (B, H, T, n_prefix + T).
    """
    allowed = None
    if causal:
        allowed = np.tril(np.ones((T, T), dtype=bool))[None, None]  # (1, 1, T, T): key <= query
    if pad_mask is not None:
        keys = pad_mask[:, None, None, :]  # (B, 1, 1, T): the mask hides keys, not queries
        allowed = keys if allowed is None else (allowed & keys)  # (B, 1, T, T)
    if allowed is None:
        return None
    if n_prefix:  # the prefix columns come first, allowed for every query: (B|1, 1, T, n + T)
        front = np.ones((*allowed.shape[:2], T, n_prefix), dtype=bool)
        allowed = np.concatenate([front, np.broadcast_to(allowed, (*allowed.shape[:2], T, T))], axis=-1)
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


def attention_forward(x, w, n_heads, bias=None, keep=None, lora=None, prefix=None):
    """softmax(Q K^T / sqrt(hs) + bias) V per head, then the output projection.

    x (B, T, C), w the weights (module doc), bias None or (B|1, 1, T, n + T) -> out (B, T, C).
    keep: the weight names whose gradient the backward may want (default: all). A frozen
    projection does not keep its input in the cache (linear_forward's keep_x).
    lora, prefix: see the module doc (None: plain attention).
    """
    keep = WEIGHTS if keep is None else keep
    lora = {} if lora is None else lora
    H = n_heads
    hs = x.shape[-1] // H
    scale = x.dtype.type(1 / np.sqrt(hs))
    c = {}  # the cache, filled as we go
    proj = {}
    for t in ("q", "k", "v"):
        proj[t], c[t] = linear_forward(x, w[f"W_{t}"], w[f"b_{t}"], keep_x=f"W_{t}" in keep)  # (B, T, C)
        if t in lora:  # LoRA: the frozen projection plus its low-rank branch s (x A) B
            branch, c[f"lora_{t}"] = lora_forward(x, *lora[t])  # (B, T, C)
            proj[t] = proj[t] + branch
    q, k, v = proj["q"], proj["k"], proj["v"]
    n_prefix = 0
    if prefix is not None:  # prefix tuning: n trained keys and values before the sequence's own
        P_k, P_v = prefix  # each (n, C)
        n_prefix, B = P_k.shape[0], x.shape[0]
        k = np.concatenate([np.broadcast_to(P_k, (B, *P_k.shape)), k], axis=1)  # (B, n + T, C)
        v = np.concatenate([np.broadcast_to(P_v, (B, *P_v.shape)), v], axis=1)  # (B, n + T, C)
    Q, K, V = split_heads(q, H), split_heads(k, H), split_heads(v, H)  # (B, H, T, hs), (B, H, n + T, hs)
    S = Q @ transpose(K) * scale  # (B, H, T, hs) @ (B, H, hs, n + T) -> (B, H, T, n + T)
    if bias is not None:
        S = S + bias  # -inf on every forbidden (query, key) pair
    P, _ = softmax_forward(S)  # (B, H, T, n + T), each row sums to 1 over the keys
    ctx = P @ V  # (B, H, T, n + T) @ (B, H, n + T, hs) -> (B, H, T, hs)
    merged = merge_heads(ctx)  # (B, T, C)
    out, c["o"] = linear_forward(merged, w["W_o"], w["b_o"], keep_x="W_o" in keep)  # (B, T, C)
    if "o" in lora:
        branch, c["lora_o"] = lora_forward(merged, *lora["o"])  # (B, T, C)
        out = out + branch
    # the heads and the probabilities, for the products; which branches and how long a prefix
    c.update(Q=Q, K=K, V=V, P=P, scale=scale, H=H, lora=tuple(lora), n_prefix=n_prefix)
    return out, c


def attention_backward(dout, cache, need_dx=True, need=None):
    """dout (B, T, C) -> dx (B, T, C) or None, grads {name: array}.

    need: the names whose gradient is wanted (default: the weights, and every LoRA matrix
    A_q, B_q, ... and prefix P_k, P_v the forward had). A name not in `need` is frozen: its
    weight-gradient product is skipped and it is absent from grads. When neither dx nor
    anything under the output projection is needed, everything below it is skipped: nothing
    would use it.
    """
    c = cache
    Q, K, V, P, scale, H, lora, n = (c[k] for k in ("Q", "K", "V", "P", "scale", "H", "lora", "n_prefix"))
    if need is None:
        need = set(WEIGHTS) | {f"{m}_{t}" for t in lora for m in "AB"} | ({"P_k", "P_v"} if n else set())
    need = set(need)
    grads = {}
    below = need_dx or bool(need & BELOW_O)
    # forward was out = merged @ W_o + b_o (+ s (merged A_o) B_o)
    dmerged, grads["W_o"], grads["b_o"] = linear_backward(
        dout, c["o"], need_dx=below, need_dW="W_o" in need, need_db="b_o" in need)
    if "o" in lora:
        dml, grads["A_o"], grads["B_o"] = lora_backward(dout, c["lora_o"], need_dx=below,
                                                        need_dA="A_o" in need, need_dB="B_o" in need)
        dmerged = dmerged + dml if below else None  # merged fed the projection and the branch
    if not below:
        return None, {name: g for name, g in grads.items() if g is not None}
    dctx = split_heads(dmerged, H)  # forward was merged = merge_heads(ctx): (B, H, T, hs)
    # forward was ctx = P @ V
    dV = transpose(P) @ dctx  # (B, H, n + T, T) @ (B, H, T, hs) -> (B, H, n + T, hs)
    dP = dctx @ transpose(V)  # (B, H, T, hs) @ (B, H, hs, n + T) -> (B, H, T, n + T)
    # forward was P = softmax(S); masked pairs had P = 0 and get dS = 0
    dS = softmax_backward(dP, P)  # (B, H, T, n + T)
    # forward was S = Q @ K^T * scale + bias (the bias is a constant)
    dQ = dS @ K * scale  # (B, H, T, n + T) @ (B, H, n + T, hs) -> (B, H, T, hs)
    dK = transpose(dS) @ Q * scale  # (B, H, n + T, T) @ (B, H, T, hs) -> (B, H, n + T, hs)
    dproj = {"q": merge_heads(dQ), "k": merge_heads(dK), "v": merge_heads(dV)}  # (B, T, C), (B, n + T, C)
    if n:  # forward was k = [P_k; k], v = [P_v; v], the same prefix for every sequence
        if "P_k" in need:
            grads["P_k"] = dproj["k"][:, :n].sum(axis=0)  # (n, C), summed over the batch
        if "P_v" in need:
            grads["P_v"] = dproj["v"][:, :n].sum(axis=0)  # (n, C)
        dproj["k"], dproj["v"] = dproj["k"][:, n:], dproj["v"][:, n:]  # the sequence's own: (B, T, C)
    dx = None
    # forward was q = x @ W_q + b_q (+ s (x A_q) B_q), and the same for k and v
    for name in ("q", "k", "v"):
        dxi, grads[f"W_{name}"], grads[f"b_{name}"] = linear_backward(
            dproj[name], c[name], need_dx=need_dx,
            need_dW=f"W_{name}" in need, need_db=f"b_{name}" in need)  # dxi (B, T, C)
        if name in lora:  # the branch's dA, dB through u = x A; never the frozen W's x^T dq
            dxl, grads[f"A_{name}"], grads[f"B_{name}"] = lora_backward(
                dproj[name], c[f"lora_{name}"], need_dx=need_dx,
                need_dA=f"A_{name}" in need, need_dB=f"B_{name}" in need)
            dxi = dxi + dxl if need_dx else None  # x fed the projection and its branch
        if need_dx:
            dx = dxi if dx is None else dx + dxi  # x fed all three projections: their gradients add
    return dx, {name: g for name, g in grads.items() if g is not None}
