"""The fast kernels: the same functions as the reference passes, computed with fewer passes over
memory and on every core. Same arguments, same results (tests/test_kernels.py), chosen with
`backend.use("fast")`; the commands that train at size use them.

Each kernel says in one line which trick it uses and what it saves. The tricks:
- `out=` and in-place steps: every step writes into one array made up front, so a chain of
  elementwise steps makes no temporaries (each temporary is a fresh allocation and a pass over
  memory the size of the activations).
- threads: a row-by-row operation runs as one block of rows per core (`runtime.by_rows`): NumPy
  runs a ufunc such as np.tanh on one core, and lets go of the GIL inside it. A large product runs
  as one block of its output per core, each on one BLAS thread (`runtime.product`).
- einsum row sums: np.einsum("...k->...") is 2-3x faster than x.sum(-1) on rows of a few hundred.
- reduceat row maxima: np.maximum.reduceat over the rows end to end is 2x faster than x.max(-1)
  on rows of 128 (the softmax's).
- folded constants: k and a of GELU multiplied once into one scalar, AdamW's bias corrections
  folded into two scalars, so each costs one pass instead of two or three.
- blocks that stay in cache (`chunked`): a long chain of elementwise passes (GELU's, LayerNorm's)
  runs on one block of about 1 MiB at a time, so every pass after the first
  reads the cache instead of memory. Every element goes through the same operations in the
  same order, so the results are bit for bit those of one pass over the whole array.

Attention and the adapter are in kernels_attention.py. Shape legend as in layers.py.
"""
import math

import numpy as np

from .. import layers
from .runtime import by_rows, for_each, product


CHUNK = 1 << 18  # elements per block of `chunked` (1 MiB of float32). Blocks trade passes over
# memory for Python calls, and the balance is the machine's: on an Intel Xeon, blocks of 2^16 took a
# (16, 128, 1024) GELU forward and backward from 11.5 to 9.3 ms of one thread's CPU time; on a 2-core
# AMD EPYC they cost more than they saved (LayerNorm on (16, 128, 256): 0.9 ms in blocks of 2^16, 0.5 in
# one), and 2^18 took the full step, the adapter step and the forward to 0.92, 0.91 and 0.93 of their
# 2^16 times (wall time, 2 threads, medians of 8 alternating rounds; bits unchanged)


def chunked(kernel):
    """kernel(*arrays, **shared) on consecutive blocks of rows of about CHUNK elements, one after
    another. Rows are cut along the first axis, as by_rows cuts them; each row is computed as in one
    call, so the result is the same bit for bit."""
    def run(*arrays, **shared):
        rows = arrays[0].shape[0]
        step = max(1, CHUNK * rows // max(arrays[0].size, 1))
        if step >= rows:
            kernel(*arrays, **shared)
            return
        for lo in range(0, rows, step):
            kernel(*(a[lo:lo + step] for a in arrays), **shared)
    return run


def rows(a):
    """a as (rows, last axis): a view of a fresh (C-contiguous) array, so writing it writes a."""
    return a.reshape(-1, a.shape[-1])


def row_sum(x):
    """x.sum(axis=-1, keepdims=True) by einsum: 2-3x faster on short rows (K of a few hundred)."""
    return np.einsum("...k->...", x)[..., None]


def row_max(x):
    """x.max(axis=-1, keepdims=True), by np.maximum.reduceat over the rows laid end to end: on
    rows of 128 float32 it took half the time (the reduction spends most of its time starting
    each short row). A maximum is exact: any order finds the same value (but for the sign of a
    zero, which exp(x - m) does not see), so the softmax keeps its bits."""
    K = x.shape[-1]
    if not (x.flags.c_contiguous and x.size):
        return x.max(axis=-1, keepdims=True)
    flat = x.reshape(-1)  # (rows * K,), a view
    return np.maximum.reduceat(flat, np.arange(0, flat.size, K)).reshape(*x.shape[:-1], 1)


# ----------------------------------------------------------------------------- linear


def linear_forward(x, W, b, keep_x=True):
    """One 2-D product over every row, one block of rows per core (runtime.product: no BLAS
    hand-off or spinning threads), the bias added in place by each block's thread while the block
    is in cache: saves one (N, d_out) array and a pass on one core."""
    out = product(x.reshape(-1, x.shape[-1]), W, bias=b)  # (N, d_in) @ (d_in, d_out) + b -> (N, d_out)
    cache = (x if keep_x else None, W)
    return out.reshape(*x.shape[:-1], W.shape[1]), cache


def linear_backward(dout, cache, need_dx=True, need_dW=True, need_db=True):
    """Rows flattened once to (N, d_out); the reference's products, one block per core
    (runtime.product)."""
    x, W = cache
    d2 = dout.reshape(-1, dout.shape[-1])  # (N, d_out)
    dx = product(d2, W.T).reshape(*dout.shape[:-1], W.shape[0]) if need_dx else None
    grads = {}
    if need_dW:
        if x is None:
            raise ValueError("need_dW: the forward ran with keep_x=False (a frozen weight), so x "
                             "was not kept; unfreeze before the forward, not between it and the backward")
        grads["W"] = product(x.reshape(-1, x.shape[-1]).T, d2)  # (d_in, N) @ (N, d_out)
    if need_db:
        grads["b"] = d2.sum(axis=0)
    return dx, grads


# ----------------------------------------------------------------------------- embedding


def embedding_backward(dout, cache):
    """np.add.at's scatter, one row at a time, replaced by one fancy-indexed add per rank: the
    first occurrence of every token at once, then every second one, ... Each token's rows are
    still added one after another in their order, so the bits are np.add.at's; on (B*T, C) =
    (2048, 256) with V = 128 that is ~20 vectorised adds instead of 2048 scalar-loop rows."""
    ids, W_shape = cache
    ids = ids.reshape(-1)  # (N,)
    d2 = rows(dout)  # (N, C)
    dW = np.zeros(W_shape, dtype=dout.dtype)  # (V, C): rows of unused tokens stay 0
    if not ids.size:
        return None, {"W": dW}
    order = np.argsort(ids, kind="stable")  # each token's rows together, in their original order
    sorted_ids = ids[order]
    starts = np.flatnonzero(np.concatenate(([True], sorted_ids[1:] != sorted_ids[:-1])))
    counts = np.diff(np.append(starts, ids.size))  # rows per token used
    rank = np.arange(ids.size) - np.repeat(starts, counts)  # 0 for a token's first row, 1 for its second, ...
    by_rank = np.argsort(rank, kind="stable")
    edges = np.cumsum(np.bincount(rank))
    for lo, hi in zip(np.concatenate(([0], edges[:-1])), edges):
        pos = by_rank[lo:hi]  # one row of each token that has this many: distinct tokens
        dW[sorted_ids[pos]] += d2[order[pos]]
    return None, {"W": dW}


# ----------------------------------------------------------------------------- layernorm


def layernorm_forward(x, gamma, beta, eps=1e-5):
    """Rows on every core in cache-sized blocks, in place into three arrays made up front: no (..., C)
    temporaries."""
    out, xhat = np.empty(x.shape, x.dtype), np.empty(x.shape, x.dtype)  # (..., C)
    rstd = np.empty((*x.shape[:-1], 1), dtype=x.dtype)  # (..., 1)
    by_rows(chunked(_layernorm_forward_rows), rows(x), rows(out), rows(xhat), rows(rstd), gamma=gamma, beta=beta,
            eps=x.dtype.type(eps))
    cache = (xhat, rstd, gamma)
    return out, cache


def _layernorm_forward_rows(x, out, xhat, rstd, gamma, beta, eps):
    C = x.shape[-1]
    mu = row_sum(x) / C  # (..., 1)
    np.subtract(x, mu, out=xhat)  # centred; normalised in place below
    var = np.einsum("...c,...c->...", xhat, xhat)[..., None] / C  # (..., 1), no (..., C) square
    np.divide(1, np.sqrt(var + eps), out=rstd)
    xhat *= rstd
    np.multiply(xhat, gamma, out=out)
    out += beta


def layernorm_backward(dout, cache, need_dx=True, need_dgamma=True, need_dbeta=True):
    """Parameter sums by einsum (no dout * xhat temporary), dx rows on every core in cache-sized
    blocks, in place."""
    xhat, rstd, gamma = cache
    C = dout.shape[-1]
    d2 = dout.reshape(-1, C)
    grads = {}
    if need_dgamma:
        grads["gamma"] = np.einsum("nc,nc->c", d2, xhat.reshape(-1, C))
    if need_dbeta:
        grads["beta"] = d2.sum(axis=0)
    dx = None
    if need_dx:
        dx = np.empty(dout.shape, dout.dtype)
        by_rows(chunked(_layernorm_backward_rows), rows(dout), rows(xhat), rows(rstd), rows(dx), gamma=gamma)
    return dx, grads


def _layernorm_backward_rows(dout, xhat, rstd, dx, gamma):
    C = dout.shape[-1]
    dxhat = dout * gamma  # (..., C)
    m1 = row_sum(dxhat) / C  # (..., 1), mean(dxhat)
    m2 = np.einsum("...c,...c->...", dxhat, xhat)[..., None] / C  # (..., 1), mean(dxhat * xhat)
    np.multiply(xhat, m2, out=dx)
    np.subtract(dxhat, dx, out=dx)
    dx -= m1
    dx *= rstd


# ----------------------------------------------------------------------------- GELU


def gelu_forward(x):
    """Rows on every core in cache-sized blocks; the gate built in place in one array, with a * k
    folded: 2 arrays, not 6."""
    out, g = np.empty(x.shape, x.dtype), np.empty(x.shape, x.dtype)
    by_rows(chunked(_gelu_forward_rows), rows(x), rows(out), rows(g))
    cache = (x, g)  # g = 0.5 (1 + tanh(u)), the gate
    return out, cache


def _gelu_forward_rows(x, out, g):
    t = x.dtype.type
    k, a = t(np.sqrt(2.0 / np.pi)), t(0.044715)
    np.multiply(x, x, out=g)  # x^2
    g *= a * k
    g += k
    g *= x  # u = k (x + a x^3)
    np.tanh(g, out=g)
    g *= t(0.5)
    g += t(0.5)  # g = 0.5 (1 + tanh(u))
    np.multiply(x, g, out=out)  # y = x g


def gelu_backward(dout, cache):
    """Rows on every core in cache-sized blocks; with tanh' = 4 g (1 - g) and 2k, 6ak folded, in
    place in dx."""
    x, g = cache
    dx = np.empty(dout.shape, dout.dtype)
    by_rows(chunked(_gelu_backward_rows), rows(dout), rows(x), rows(g), rows(dx))
    return dx, {}


def _gelu_backward_rows(dout, x, g, dx):
    t = x.dtype.type
    k, a = t(np.sqrt(2.0 / np.pi)), t(0.044715)
    np.multiply(x, x, out=dx)
    dx *= t(6) * a * k
    dx += t(2) * k
    dx *= x  # x * 2 k (1 + 3 a x^2)
    gg = g * g
    np.subtract(g, gg, out=gg)  # g (1 - g) = (1 - tanh^2(u)) / 4
    dx *= gg
    dx += g  # dy/dx = g + x * 0.5 (1 - tanh^2(u)) * k (1 + 3 a x^2)
    dx *= dout


ACTIVATIONS = dict(layers.ACTIVATIONS, gelu=(gelu_forward, gelu_backward))


# ----------------------------------------------------------------------------- softmax


def softmax_forward(x):
    """Rows on every core, exp and the division in place in the output: one (..., K) array. (Blocks
    that stay in cache measured 10 % slower here: a chain of four passes gains less than the calls cost.)"""
    p = np.empty_like(x)
    by_rows(_softmax_forward_rows, x, p)
    return p, p


def _softmax_forward_rows(x, p):
    m = row_max(x)  # (..., 1)
    m[~np.isfinite(m)] = 0  # fully masked rows: subtract nothing, exp(-inf) = 0 everywhere
    np.subtract(x, m, out=p)
    np.exp(p, out=p)
    s = row_sum(p)  # (..., 1)
    s[s == 0] = 1  # fully masked rows stay 0 instead of 0/0
    p /= s


def softmax_backward(dout, cache):
    """Rows on every core; sum(dout * p) by einsum, no (..., K) temporary."""
    p = cache
    dx = np.empty_like(dout)
    by_rows(_softmax_backward_rows, dout, p, dx)
    return dx, {}


def _softmax_backward_rows(dout, p, dx):
    s = np.einsum("...k,...k->...", dout, p)[..., None]  # (..., 1)
    np.subtract(dout, s, out=dx)
    dx *= p


# ----------------------------------------------------------------------------- optimizers


def adamw_update(w, g, m, v, t, lr, b1, b2, eps, weight_decay):
    """In place, the bias corrections folded into two scalars: 2 passes fewer, 1 array instead of 4.
    (Blocks that stay in cache measured 5 % slower on the benchmark's (F, C) weights.)

    m_hat / (sqrt(v_hat) + eps) = (c2 / c1) * m / (sqrt(v) + eps * c2),
    with c1 = 1 - b1^t and c2 = sqrt(1 - b2^t).
    """
    m *= b1
    m += (1 - b1) * g
    v *= b2
    g2 = g * g
    g2 *= 1 - b2
    v += g2
    c1, c2 = 1 - b1 ** t, math.sqrt(1 - b2 ** t)
    update = np.sqrt(v, out=g2)  # g2 is spent: reuse its memory
    update += eps * c2
    np.divide(m, update, out=update)
    if weight_decay:
        w *= 1 - lr * weight_decay
    update *= lr * c2 / c1
    w -= update


def sgd_update(w, g, velocity, lr, momentum, weight_decay):
    """The velocity updated in place: one array fewer per step."""
    if weight_decay:
        g = g + weight_decay * w
    if velocity is not None:
        velocity *= momentum
        velocity += g
        g = velocity
    w -= lr * g


def each_parameter(fn, params):
    """The parameters shared out among the threads (runtime.for_each): one hand-off per step."""
    for_each(fn, params, size=lambda p: p.value.size)
