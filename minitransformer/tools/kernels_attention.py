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
- the published adapter (GELU, skip) runs its row-wise steps on one block of rows per core in
  one hand-off: the forward whole, the backward up to the weight gradients.
"""
import math

import numpy as np

from ..attention import split_heads
from . import kernels
from .runtime import ALIGN, matmul, product, products_by_rows


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
    """Scale folded into q, heads as views, no merging copy; the whole chain (scale, Q K^T, bias,
    softmax, P V) on one block of sequences per core (`runtime.products_by_rows`): one hand-off
    instead of three, the bias added by the threads, each block's scores still in cache."""
    B, T, C = q.shape
    qs = np.empty(q.shape, q.dtype)  # q * scale, a new array: q is the caller's
    p = np.empty((B, n_heads, T, k.shape[1]), q.dtype)  # (B,H,T,T')
    ctx = np.empty((B, T, v.shape[-1]), q.dtype)  # (B,T,C)
    extra = () if bias is None else (np.broadcast_to(bias, (B, *bias.shape[1:])),)  # (B,1|H,T,T') view
    scale = 1 / math.sqrt(C // n_heads)
    products_by_rows(_attend_forward_rows, q, k, v, qs, p, ctx, *extra, scale=q.dtype.type(scale),
                     n_heads=n_heads)
    q, k, v = (split_heads(a, n_heads) for a in (qs, k, v))  # (B,H,T,hs) views
    return ctx, (q, k, v, p, scale, n_heads)


def _attend_forward_rows(q, k, v, qs, p, ctx, *bias, scale, n_heads):
    np.multiply(q, scale, out=qs)  # on q (B,T,C) rather than on the scores (B,H,T,T): T/hs times fewer
    Q, K, V = (split_heads(a, n_heads) for a in (qs, k, v))  # (B,H,T,hs) views
    np.matmul(Q, K.transpose(0, 1, 3, 2), out=p)  # (B,H,T,hs) @ (B,H,hs,T') -> (B,H,T,T')
    if bias:
        p += bias[0]
    kernels._softmax_forward_rows(p, p)  # in place: (B,H,T,T')
    np.matmul(p, V, out=split_heads(ctx, n_heads))  # (B,H,T,T') @ (B,H,T',hs) -> (B,H,T,hs) view of (B,T,C)


def attend_backward(dctx, cache):
    """The reference's steps, no merging copies, the whole chain on one block of sequences per
    core: one hand-off instead of five, dS made in place in dP."""
    q, k, v, p, scale, n_heads = cache
    dq, dk, dv = (np.empty((a.shape[0], a.shape[2], a.shape[1] * a.shape[3]), dctx.dtype) for a in (q, k, v))
    products_by_rows(_attend_backward_rows, dctx, q, k, v, p, dq, dk, dv, scale=dctx.dtype.type(scale),
                     n_heads=n_heads)
    return (dq, dk, dv), {}


def _attend_backward_rows(dctx, Q, K, V, P, dq, dk, dv, scale, n_heads):
    D = split_heads(dctx, n_heads)  # (B,H,T,hs) view
    t = (0, 1, 3, 2)
    ds = np.matmul(D, V.transpose(t))  # dP = dctx @ V^T: (B,H,T,T')
    np.matmul(P.transpose(t), D, out=split_heads(dv, n_heads))  # dV = P^T @ dctx: (B,H,T',hs)
    kernels._softmax_backward_rows(ds, P, ds)  # dS, in place in dP: (B,H,T,T')
    np.matmul(ds, K, out=split_heads(dq, n_heads))  # dS @ K: (B,H,T,hs)
    dq *= scale  # q was scaled in the forward
    np.matmul(ds.transpose(t), Q, out=split_heads(dk, n_heads))  # dS^T @ (scaled) Q: (B,H,T',hs)


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


def _published(nonlinearity, skip, scaling):
    """The published adapter (GELU, skip, no scaling): the one that runs as a chain per row block."""
    return nonlinearity == "gelu" and skip and scaling == 1


def adapter_forward(h, w, nonlinearity="gelu", skip=True, scaling=1.0):
    """Bias and skip added by the up-projection's threads while each block is in cache
    (runtime.product), scaling in place: two (N, C) arrays and two passes on one core fewer.
    The published adapter (GELU, skip, no scaling) runs whole on one block of rows per core."""
    if _published(nonlinearity, skip, scaling):
        return _houlsby_forward(h, w)
    act_forward = kernels.ACTIVATIONS[nonlinearity][0]
    z, cache_down = kernels.linear_forward(h, w["W_down"], w["b_down"])  # (N,m)
    a, cache_act = act_forward(z)  # (N,m)
    h2, a2 = kernels.rows(h), kernels.rows(a)  # (N,C), (N,m)
    fused = skip and scaling == 1  # else the skip must wait for the scaling
    u = product(a2, w["W_up"], bias=w["b_up"], residual=h2 if fused else None)  # (N,m) @ (m,C) + b_up (+ h)
    if scaling != 1:
        u *= h.dtype.type(scaling)
    if skip and not fused:
        u += h2
    cache_up = (a, w["W_up"])  # kernels.linear_forward's cache
    cache = (cache_down, cache_act, cache_up, nonlinearity, skip, scaling)
    return u.reshape(h.shape), cache


def _houlsby_forward(h, w):
    """adapter_forward with GELU and the skip: the whole chain (down-projection, GELU,
    up-projection, biases, skip) on one block of rows per core (`runtime.products_by_rows`): one
    hand-off instead of two, and the GELU, under by_rows' size for splitting at these sizes, on
    every core too. Each row is computed as by adapter_forward's other path: the same bits."""
    h2 = kernels.rows(h)  # (N,C)
    N, m = h2.shape[0], w["W_down"].shape[1]
    z, a, g = (np.empty((N, m), h.dtype) for _ in range(3))  # (N,m): pre-activation, GELU, its gate
    u = np.empty(h2.shape, h.dtype)  # (N,C)
    products_by_rows(_houlsby_forward_rows, h2, z, a, g, u, row_step=ALIGN, W_down=w["W_down"], b_down=w["b_down"],
                     W_up=w["W_up"], b_up=w["b_up"])  # blocks on product's edges: its bits
    z, a, g = (x.reshape(*h.shape[:-1], m) for x in (z, a, g))  # (..., m) views, as the other path's
    cache = ((h, w["W_down"]), (z, g), (a, w["W_up"]), "gelu", True, 1.0)  # the caches of the other path
    return u.reshape(h.shape), cache


def _houlsby_forward_rows(h, z, a, g, u, W_down, b_down, W_up, b_up):
    np.matmul(h, W_down, out=z)  # (n,C) @ (C,m)
    z += b_down
    kernels._gelu_forward_rows(z, a, g)  # a = GELU(z); g, its gate, for the backward
    np.matmul(a, W_up, out=u)  # (n,m) @ (m,C)
    u += b_up
    u += h  # the skip


def adapter_backward(dout, cache, need_dx=True, need=None):
    """The skip's gradient added by dh's product threads while each block is in cache
    (runtime.product, residual): one pass on one core fewer. The published adapter's row-wise
    steps run on one block of rows per core (_houlsby_backward)."""
    cache_down, cache_act, cache_up, nonlinearity, skip, scaling = cache
    need = {"W_down", "b_down", "W_up", "b_up"} if need is None else need
    if _published(nonlinearity, skip, scaling):
        return _houlsby_backward(dout, cache, need_dx, need)
    act_backward = kernels.ACTIVATIONS[nonlinearity][1]
    du = dout * dout.dtype.type(scaling) if scaling != 1 else dout
    da, g_up = kernels.linear_backward(du, cache_up, need_dW="W_up" in need, need_db="b_up" in need)
    dz, _ = act_backward(da, cache_act)
    _, g_down = kernels.linear_backward(dz, cache_down, need_dx=False, need_dW="W_down" in need,
                                        need_db="b_down" in need)
    dh = None
    if need_dx:  # forward was z = h W_down + b_down, out = ... + h: both feed dh
        W_down = cache_down[1]
        dh = product(kernels.rows(dz), W_down.T, residual=kernels.rows(dout) if skip else None)  # (N,m) @ (m,C)
        dh = dh.reshape(dout.shape)
    return dh, _adapter_grads(g_up, g_down)


def _adapter_grads(g_up, g_down):
    """The two projections' gradients ({"W": ..., "b": ...} each) under the adapter's names."""
    return {f"{n}_up": g for n, g in g_up.items()} | {f"{n}_down": g for n, g in g_down.items()}


def _houlsby_backward(dout, cache, need_dx, need):
    """adapter_backward with GELU and the skip: the row-wise steps (the up-projection's input
    gradient, GELU's backward, dh with the skip's gradient) on one block of rows per core in one
    hand-off, then the weight gradients, each a product over every row. Each entry is computed
    as by the other path: the same bits."""
    (h, W_down), (z, g), (a, W_up) = cache[:3]
    d2 = kernels.rows(dout)  # (N,C)
    N, m = d2.shape[0], W_down.shape[1]
    da, dz = np.empty((N, m), dout.dtype), np.empty((N, m), dout.dtype)  # (N,m)
    dh = [np.empty(d2.shape, dout.dtype)] if need_dx else []  # (N,C)
    products_by_rows(_houlsby_backward_rows, d2, kernels.rows(z), kernels.rows(g), da, dz, *dh, row_step=ALIGN,
                     W_up=W_up, W_down=W_down)
    _, g_up = kernels.linear_backward(d2, (a, W_up), need_dx=False, need_dW="W_up" in need,
                                      need_db="b_up" in need)  # (m,N) @ (N,C), and the rows' sum
    _, g_down = kernels.linear_backward(dz, (h, W_down), need_dx=False, need_dW="W_down" in need,
                                        need_db="b_down" in need)  # (C,N) @ (N,m), and the rows' sum
    return (dh[0].reshape(dout.shape) if dh else None), _adapter_grads(g_up, g_down)


def _houlsby_backward_rows(dout, z, g, da, dz, *dh, W_up, W_down):
    np.matmul(dout, W_up.T, out=da)  # undoes u = a W_up: (n,C) @ (C,m)
    kernels._gelu_backward_rows(da, z, g, dz)  # undoes a = GELU(z)
    if dh:  # undoes z = h W_down + b_down, and the skip out = ... + h
        np.matmul(dz, W_down.T, out=dh[0])  # (n,m) @ (m,C)
        np.add(dh[0], dout, out=dh[0])
