"""The reference answers the checkers compare with. Private: the unit modules a notebook
imports as `ex` expose checkers only, so nothing here is one attribute away from a student.

None of these calls a package backward: each backward is written out here, and
tests/test_exercises_reference.py checks every one against centred finite differences. Counts
are closed forms, checked there against what the package's models hold.
"""
import math

import numpy as np

from ..layers import gelu_forward, layernorm_forward, softmax_forward

# ----------------------------------------------------------------------------- unit 01


def count_evaluations(d1, d2):
    return 2 * d1 * d2  # every entry of a (d1, d2) input moved up once and down once


def best_step(u, f0, f3):
    return (3 * u * f0 / f3) ** (1 / 3)  # E'(h) = h f3 / 3 - u f0 / h^2 = 0


def linear_backward(dout, x, W):
    """y = x @ W + b.  dout (N, d_out), x (N, d_in), W (d_in, d_out) -> dx, dW, db."""
    return dout @ W.T, x.T @ dout, dout.sum(axis=0)


def softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def cross_entropy_backward(logits, targets):
    """L = mean over the n rows of -log softmax(logits)[target] -> dlogits (n, K), float64."""
    z = np.asarray(logits, np.float64)
    n = z.shape[0]
    d = softmax(z)
    d[np.arange(n), targets] -= 1
    return d / n


def norm_stats(x, centre, eps=1e-5):
    """-> xhat, rstd (N, 1) of LayerNorm (centre=True) or RMSNorm, in x's dtype."""
    mu = x.mean(axis=-1, keepdims=True) if centre else 0.0
    rstd = 1 / np.sqrt(((x - mu) ** 2).mean(axis=-1, keepdims=True) + eps)
    return (x - mu) * rstd, rstd


def norm_backward(dout, xhat, rstd, gamma, centre):
    """dx of y = gamma * xhat (+ beta), xhat = (x - mu) * rstd (mu = 0 for RMSNorm)."""
    dxhat = dout * gamma
    centred = dxhat - dxhat.mean(axis=-1, keepdims=True) if centre else dxhat
    return rstd * (centred - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True))


def rmsnorm_forward(x, gamma, beta=None, eps=1e-5):
    """RMSNorm: y = gamma * x / sqrt(mean(x^2) + eps) over the last axis -> y, (xhat, rstd, gamma)."""
    xhat, rstd = norm_stats(x, centre=False, eps=eps)
    return xhat * gamma, (xhat, rstd, gamma)


# ----------------------------------------------------------------------------- unit 02


def head_forward(Q, K, V, bias=None):
    """One head: S = Q K^T / sqrt(hs) + bias, P = softmax(S), ctx = P V -> ctx, P."""
    S = Q @ K.T / math.sqrt(Q.shape[-1])  # (T, hs) @ (hs, T) -> (T, T)
    if bias is not None:
        S = S + bias
    P, _ = softmax_forward(S)
    return P @ V, P


def head_backward(dctx, Q, K, V, P):
    """-> dQ, dK, dV of one head, from the forward's P."""
    scale = 1 / math.sqrt(Q.shape[-1])
    dV = P.T @ dctx  # ctx = P V
    dP = dctx @ V.T
    dS = P * (dP - (dP * P).sum(axis=-1, keepdims=True))  # P = softmax(S)
    return dS @ K * scale, dS.T @ Q * scale, dV  # S = Q K^T scale


def causal_mask(T):
    return np.triu(np.full((T, T), -np.inf), k=1)


def attention_costs(B, T, C, H):
    """-> (parameters, forward flops) of one attention layer (matrix products, 2 per multiply-add)."""
    hs = C // H
    return 4 * C * C + 4 * C, 4 * 2 * B * T * C * C + B * H * 2 * (2 * T * T * hs)


# ----------------------------------------------------------------------------- unit 03


def parameter_count(V, T_max, C, L, F, K):
    """Transformer(cfg).num_parameters() from the fields (either LN family: one extra LN)."""
    block = (4 * C * C + 4 * C) + (C * F + F + F * C + C) + 2 * (2 * C)
    return V * C + T_max * C + L * block + 2 * C + (C * V + V) + (C * K + K if K else 0)


def attention_forward(x, w, H, bias=None):
    """Multi-head attention, written out: x (B, T, C) -> out (B, T, C), the tensors the backward needs."""
    B, T, C = x.shape
    hs = C // H

    def heads(a):  # (B, T, C) -> (B, H, T, hs)
        return a.reshape(B, T, H, hs).transpose(0, 2, 1, 3)
    q, k, v = (x @ w[f"W_{t}"] + w[f"b_{t}"] for t in "qkv")
    Q, K, V = heads(q), heads(k), heads(v)
    S = Q @ K.transpose(0, 1, 3, 2) / math.sqrt(hs)  # (B, H, T, T)
    if bias is not None:
        S = S + bias
    P = softmax(S)
    merged = (P @ V).transpose(0, 2, 1, 3).reshape(B, T, C)
    return merged @ w["W_o"] + w["b_o"], (x, Q, K, V, P, merged)


def attention_dx(dout, w, H, saved):
    """dx of attention_forward (the weights' gradients are not needed here)."""
    x, Q, K, V, P, merged = saved
    B, T, C = x.shape
    hs = C // H
    dctx = (dout @ w["W_o"].T).reshape(B, T, H, hs).transpose(0, 2, 1, 3)  # (B, H, T, hs)
    dV = P.transpose(0, 1, 3, 2) @ dctx
    dP = dctx @ V.transpose(0, 1, 3, 2)
    dS = P * (dP - (dP * P).sum(axis=-1, keepdims=True)) / math.sqrt(hs)
    dQ, dK = dS @ K, dS.transpose(0, 1, 3, 2) @ Q

    def merge(a):
        return a.transpose(0, 2, 1, 3).reshape(B, T, C)
    return merge(dQ) @ w["W_q"].T + merge(dK) @ w["W_k"].T + merge(dV) @ w["W_v"].T


def pre_ln_attention_forward(x, gamma, beta, w, n_heads, bias=None):
    """The pre-LN (GPT-2) attention sub-layer: y = x + Attn(LN(x)), with the package's forwards.

    x (B, T, C) -> y (B, T, C), cache = (the LayerNorm's cache, the attention's cache).
    """
    from ..attention import attention_forward as package_attention_forward
    a_in, cache_ln = layernorm_forward(x, gamma, beta)  # (B, T, C)
    a, cache_attn = package_attention_forward(a_in, w, n_heads, bias)  # (B, T, C)
    return x + a, (cache_ln, cache_attn)  # the residual: x goes around the sub-layer


def pre_ln_pieces(dy, x, gamma, beta, w, H, bias):
    """The pieces of dx for y = x + Attn(LN(x)): (dx, the attention's dx, LN's dx of dy)."""
    xhat, rstd = norm_stats(x, centre=True)
    a_in = xhat * gamma + beta
    _, saved = attention_forward(a_in, w, H, bias)
    da_in = attention_dx(dy, w, H, saved)
    dx_branch = norm_backward(da_in, xhat, rstd, gamma, centre=True)
    return dy + dx_branch, da_in, norm_backward(dy, xhat, rstd, gamma, centre=True)


# ----------------------------------------------------------------------------- unit 04


def trained_count(C, m, L, K, train_layernorm):
    """Houlsby adapters (two per block) on a post-LN model, its head, its LayerNorm copies."""
    n = 2 * L * (2 * C * m + m + C) + C * K + K
    return n + ((2 * L + 1) * 2 * C if train_layernorm else 0)


def adapter_forward(h, W_down, b_down, W_up, b_up):
    """h + GELU(h W_down + b_down) W_up + b_up, with the package's tanh GELU -> out, z."""
    z = h @ W_down + b_down
    a, _ = gelu_forward(z)
    return h + a @ W_up + b_up, z


def gelu_grad(z):
    """d GELU(z) / dz for the tanh form 0.5 z (1 + tanh(k (z + a z^3)))."""
    k, a = math.sqrt(2 / math.pi), 0.044715
    t = np.tanh(k * (z + a * z ** 3))
    return 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * k * (1 + 3 * a * z * z)


def adapter_backward(dout, h, W_down, b_down, W_up, b_up):
    """-> dh, dW_down, db_down, dW_up, db_up for h of any leading shape."""
    C, m = W_down.shape
    z = h @ W_down + b_down
    a, _ = gelu_forward(z)
    d2, h2, a2 = dout.reshape(-1, C), h.reshape(-1, C), a.reshape(-1, m)
    dz = (dout @ W_up.T) * gelu_grad(z)
    dz2 = dz.reshape(-1, m)
    return dz @ W_down.T + dout, h2.T @ dz2, dz2.sum(axis=0), a2.T @ d2, d2.sum(axis=0)


TRUNCATION = 1 - 4 * math.exp(-2) / math.sqrt(2 * math.pi) / math.erf(2 / math.sqrt(2))
# = 0.77374: the variance of a standard normal cut at +-2 std (1 - 2 * 2 phi(2) / (2 Phi(2) - 1))


def branch_ratio(std, C, m):
    """|u| / |h| of a fresh adapter in the small-std limit: z = h W_down has variance C v std^2,
    GELU(z) ~ z / 2, u = GELU(z) W_up has variance m v std^2 C v std^2 / 4 per entry."""
    return math.sqrt(C * m) * TRUNCATION * std ** 2 / 2


# ----------------------------------------------------------------------------- unit 05


def stored(T, n_base, n_task, n_head):
    """(one shared base + T task sets, T fine-tuned copies each with its head)."""
    return n_base + T * n_task, T * (n_base + n_head)


SHIPPED_BASE = 214_883  # parameters of the shipped base (notebook 05 states it; the tests check it)


def trained_percent(m, K, train_layernorm, n_base=SHIPPED_BASE, C=64, L=4):
    trained = trained_count(C, m, L, K, train_layernorm)
    return 100 * trained / (n_base + trained)


# ----------------------------------------------------------------------------- unit 06


def break_even(shared, per_task, per_copy):
    """The fewest T >= 1 with shared + T per_task < T per_copy, or None."""
    if per_task >= per_copy:
        return None
    return shared // (per_copy - per_task) + 1  # T (per_copy - per_task) > shared, strictly


# ----------------------------------------------------------------------------- unit 07


def lora_backward(dout, x, A, B, s):
    """out = s (x A_W) B_W, x (..., d_in) -> dx, dA, dB (weights summed over every row)."""
    u = x @ A
    dv = s * dout
    du = dv @ B.T
    d_in, r = A.shape
    return du @ A.T, x.reshape(-1, d_in).T @ du.reshape(-1, r), u.reshape(-1, r).T @ dv.reshape(-1, B.shape[1])


def merge(W0, A, B, alpha, r):
    """W0 (d_in, d_out), A = A_W (d_in, r), B = B_W (r, d_out) -> the merged W0 + (alpha / r) A_W B_W."""
    return W0 + (alpha / r) * (A @ B)


def prefix_backward(dk, n):
    return dk[:, :n].sum(axis=0), dk[:, n:].copy()


def prefix_count(n, C, L, hidden, reparameterize):
    if not reparameterize:
        return L * 2 * n * C  # P_k and P_v in every one of the L = n_layers layers
    return n * C + C * hidden + hidden + hidden * 2 * L * C + 2 * L * C  # P', W'_1, b'_1, W'_2, b'_2 (the prefix MLP's)


def bitfit_count(C, F, L):
    return L * (4 * C + F + C) + (2 * L + 1) * C  # six biases per block, every LayerNorm's beta
