"""Fast kernels for attention and the bottleneck adapter: the same functions as attention.py and
adapters.py, with the same arguments, built on the fast kernels of kernels.py.

The tricks, each named again where it is used:
- heads are never copied: Q, K, V stay views of the projections, and each per-head product
  writes straight into the heads' slices of a (B, T, C) result (`heads_matmul`), which saves the
  merging copy of (B, T, C) per product;
- the scale 1/sqrt(hs) is applied to q (B, T, C), not to the scores (B, H, T, T): T/hs times
  fewer multiplications;
- attention's batched products run one block of sequences per core, each on one BLAS thread
  (`runtime.matmul`): BLAS's own threads cost more than they save on (T x hs) products;
- the adapter scales and adds its skip in place on its own output: two (N, C) arrays fewer.
"""
import math

import numpy as np

from ..attention import split_heads
from . import kernels
from .runtime import matmul


def heads_matmul(a, b):
    """a @ b per head, written into the heads' slices of a new (B, T, C): no merging copy.

    a (B, H, T, K), b (B, H, K, hs) -> (B, T, C).
    """
    B, H, T, _ = a.shape
    out = np.empty((B, T, H * b.shape[-1]), dtype=a.dtype)
    matmul(a, b, out=split_heads(out, H))  # (B,H,T,K) @ (B,H,K,hs) -> (B,H,T,hs) view of (B,T,C)
    return out


def scores_matmul(a, b):
    """a @ b^T per head: (B, H, T, hs) @ (B, H, hs, T) -> (B, H, T, T), one block per core."""
    out = np.empty((*a.shape[:-1], b.shape[-2]), dtype=a.dtype)
    matmul(a, b.transpose(0, 1, 3, 2), out=out)
    return out


def attend_forward(q, k, v, n_heads, bias=None):
    """Scale folded into q, heads as views, products per core, no merging copy."""
    scale = 1 / math.sqrt(q.shape[-1] // n_heads)
    q = q * scale  # on q (B,T,C) rather than on the scores (B,H,T,T); a new array, q is the caller's
    q, k, v = (split_heads(a, n_heads) for a in (q, k, v))  # (B,H,T,hs) views
    att = scores_matmul(q, k)  # (B,H,T,T)
    if bias is not None:
        att += bias
    p, _ = kernels.softmax_forward(att)  # (B,H,T,T)
    ctx = heads_matmul(p, v)  # (B,T,C)
    return ctx, (q, k, v, p, scale, n_heads)


def attend_backward(dctx, cache):
    """The reference's steps with the products per core and no merging copies."""
    q, k, v, p, scale, n_heads = cache
    dctx = split_heads(dctx, n_heads)  # (B,H,T,hs) view
    dp = scores_matmul(dctx, v)  # dP = dctx @ V^T: (B,H,T,T)
    dv = heads_matmul(p.transpose(0, 1, 3, 2), dctx)  # dV = P^T @ dctx: (B,T,C)
    datt, _ = kernels.softmax_backward(dp, p)  # dS: (B,H,T,T)
    dq = heads_matmul(datt, k)  # dS @ K: (B,T,C)
    dq *= scale  # q was scaled in the forward
    dk = heads_matmul(datt.transpose(0, 1, 3, 2), q)  # dS^T @ (scaled) Q: (B,T,C)
    return (dq, dk, dv), {}


def attention_forward(x, w, n_heads, bias=None):
    """The reference's steps on the fast linear and attend kernels."""
    q, cache_q = kernels.linear_forward(x, w["W_q"], w["b_q"])
    k, cache_k = kernels.linear_forward(x, w["W_k"], w["b_k"])
    v, cache_v = kernels.linear_forward(x, w["W_v"], w["b_v"])
    ctx, cache_a = attend_forward(q, k, v, n_heads, bias)
    out, cache_o = kernels.linear_forward(ctx, w["W_o"], w["b_o"])
    return out, (cache_q, cache_k, cache_v, cache_a, cache_o)


def attention_backward(dout, cache):
    """The reference's steps on the fast kernels; dx summed in place into the first fresh array."""
    cache_q, cache_k, cache_v, cache_a, cache_o = cache
    dctx, g_o = kernels.linear_backward(dout, cache_o)
    (dq, dk, dv), _ = attend_backward(dctx, cache_a)
    dx, g_q = kernels.linear_backward(dq, cache_q)
    dxk, g_k = kernels.linear_backward(dk, cache_k)
    dxv, g_v = kernels.linear_backward(dv, cache_v)
    dx += dxk
    dx += dxv
    each = {"q": g_q, "k": g_k, "v": g_v, "o": g_o}
    grads = {f"{name}_{t}": g for t, gs in each.items() for name, g in gs.items()}
    return dx, grads


def adapter_forward(h, w, nonlinearity="gelu", skip=True, scaling=1.0):
    """Scaling and skip added in place on the branch's own output: two (N, C) arrays fewer."""
    act_forward = kernels.ACTIVATIONS[nonlinearity][0]
    z, cache_down = kernels.linear_forward(h, w["W_down"], w["b_down"])  # (N,m)
    a, cache_act = act_forward(z)  # (N,m)
    u, cache_up = kernels.linear_forward(a, w["W_up"], w["b_up"])  # (N,C)
    if scaling != 1:
        u *= h.dtype.type(scaling)
    if skip:
        u += h
    cache = (cache_down, cache_act, cache_up, nonlinearity, skip, scaling)
    return u, cache


def adapter_backward(dout, cache, need_dx=True, need=None):
    """The skip's gradient added in place into the fresh dh."""
    cache_down, cache_act, cache_up, nonlinearity, skip, scaling = cache
    need = {"W_down", "b_down", "W_up", "b_up"} if need is None else need
    act_backward = kernels.ACTIVATIONS[nonlinearity][1]
    du = dout * dout.dtype.type(scaling) if scaling != 1 else dout
    da, g_up = kernels.linear_backward(du, cache_up, need_dW="W_up" in need, need_db="b_up" in need)
    dz, _ = act_backward(da, cache_act)
    dh, g_down = kernels.linear_backward(dz, cache_down, need_dx=need_dx, need_dW="W_down" in need,
                                         need_db="b_down" in need)
    if need_dx and skip:
        dh += dout
    grads = {f"{n}_up": g for n, g in g_up.items()} | {f"{n}_down": g for n, g in g_down.items()}
    return dh, grads
