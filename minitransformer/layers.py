"""Pure forward/backward pairs for the transformer's building blocks.

Every operation comes as two functions that sit next to each other:

    out, cache = X_forward(...)      # cache: exactly what the backward needs
    dx, ...    = X_backward(dout, cache)

The backward unpacks its cache on its first line and replays the forward in reverse.
The row-by-row operations (LayerNorm, GELU, softmax) do their passes over memory in a
`_..._rows` function that writes into arrays made by the caller. `by_rows` (runtime.py) hands
each thread one block of rows. Each row is computed on its own, so the result does not
depend on the number of threads.
Every function keeps the dtype of its input (float32 for training, float64 for gradient
checks): constants are cast to the input's dtype, because a NumPy float64 scalar would
silently promote a float32 array.

Shape legend (used in comments throughout the package):
    B  batch size            T  sequence length        C  model width (d_model)
    H  number of heads       hs head size (C // H)     V  vocabulary size
    F  feed-forward width    m  adapter bottleneck     N  any leading shape (B, T, ...)
"""
import numpy as np

from .tools.runtime import by_rows

# ----------------------------------------------------------------------------- helpers


def row_sum(x):
    """Sum over the last axis, kept as an axis of 1.   x (..., K) -> (..., 1).

    The same as x.sum(axis=-1, keepdims=True); einsum is 2-3x faster on short rows (K of
    a few hundred), which is every LayerNorm and softmax row here.
    """
    return np.einsum("...k->...", x)[..., None]


# ----------------------------------------------------------------------------- linear


def linear_forward(x, W, b, keep_x=True):
    """y = x @ W + b.   x (..., d_in), W (d_in, d_out), b (d_out,) -> y (..., d_out).

    The leading axes are flattened to one (N = B*T rows) so that BLAS runs one large
    matrix product; a 3-D @ 2-D product would be a loop of B small ones.
    keep_x=False (a frozen W): x is needed only for dW, so the cache does not hold it and
    its memory can be freed as soon as nothing else uses it. PyTorch does the same: a
    linear layer saves its input for the backward only when the weight requires grad.
    """
    out = x.reshape(-1, x.shape[-1]) @ W  # (N, d_in) @ (d_in, d_out) -> (N, d_out)
    out += b  # in place: out is our own fresh array
    cache = (x if keep_x else None, W, x.shape)  # x is needed for dW, W for dx
    return out.reshape(*x.shape[:-1], W.shape[1]), cache


def linear_backward(dout, cache, need_dx=True, need_dW=True, need_db=True):
    """dout (..., d_out) -> dx (..., d_in), dW (d_in, d_out), db (d_out,).

    A gradient that is not needed is not computed and comes back as None: a frozen
    weight skips its matrix product `x.T @ dout` entirely (that is where training only
    adapters saves compute), while dx still flows down to the layers below.
    """
    x, W, x_shape = cache
    d2 = dout.reshape(-1, dout.shape[-1])  # (N, d_out)
    dx = (d2 @ W.T).reshape(x_shape) if need_dx else None  # (N, d_out) @ (d_out, d_in) -> (N, d_in)
    dW = db = None
    if need_dW:
        if x is None:
            raise ValueError("need_dW: the forward ran with keep_x=False (a frozen weight), so x "
                             "was not kept; unfreeze before the forward, not between it and the backward")
        x2 = x.reshape(-1, x.shape[-1])  # (N, d_in), a view: no copy
        dW = x2.T @ d2  # forward was y = x @ W, so dW = x.T @ dy: (d_in, N) @ (N, d_out)
    if need_db:
        db = d2.sum(axis=0)  # b was broadcast over every row, so its gradient sums them
    return dx, dW, db


# ----------------------------------------------------------------------------- embeddings


def embedding_forward(ids, W):
    """Token embedding lookup.   ids (B, T) ints, W (V, C) -> out (B, T, C)."""
    out = W[ids]  # fancy indexing copies the rows
    cache = (ids, W.shape)
    return out, cache


def embedding_backward(dout, cache):
    """dout (B, T, C) -> dW (V, C). Ids have no gradient.

    A token that appears twice receives both rows' gradients: np.add.at accumulates
    over repeated indices, where dW[ids] += dout would keep only one of them.
    """
    ids, W_shape = cache
    dW = np.zeros(W_shape, dtype=dout.dtype)
    np.add.at(dW, ids.reshape(-1), dout.reshape(-1, W_shape[1]))
    return dW


def position_forward(T, W_pos):
    """Learned position embedding.   W_pos (T_max, C) -> out (T, C), broadcast over B."""
    out = W_pos[:T]  # a view: the caller adds it, never writes it
    cache = (T, W_pos.shape)
    return out, cache


def position_backward(dout, cache):
    """dout (B, T, C) -> dW_pos (T_max, C): rows beyond T got no gradient."""
    T, W_shape = cache
    dW = np.zeros(W_shape, dtype=dout.dtype)
    dW[:T] = dout.sum(axis=0)  # the same row was added to every sequence of the batch
    return dW


# ----------------------------------------------------------------------------- layernorm


def layernorm_forward(x, gamma, beta, eps=1e-5):
    """y = gamma * (x - mean) / sqrt(var + eps) + beta over the last axis.

    x (..., C), gamma (C,), beta (C,) -> y (..., C). A constant row has var = 0 and
    gives xhat = 0 with the finite scale 1/sqrt(eps): no NaN, finite gradients.
    """
    out, xhat = np.empty_like(x), np.empty_like(x)  # (..., C)
    rstd = np.empty((*x.shape[:-1], 1), dtype=x.dtype)  # (..., 1)
    by_rows(_layernorm_forward_rows, x, out, xhat, rstd, gamma=gamma, beta=beta, eps=x.dtype.type(eps))
    cache = (xhat, rstd, gamma)  # xhat and rstd make the backward one pass, no recompute
    return out, cache


def _layernorm_forward_rows(x, out, xhat, rstd, gamma, beta, eps):
    C = x.shape[-1]
    mu = row_sum(x) / C  # (..., 1), the mean
    np.subtract(x, mu, out=xhat)  # (..., C), centred; normalised in place below
    var = np.einsum("...c,...c->...", xhat, xhat)[..., None] / C  # (..., 1), biased like PyTorch
    np.divide(1, np.sqrt(var + eps), out=rstd)  # (..., 1), in x's dtype
    xhat *= rstd  # (..., C)
    np.multiply(xhat, gamma, out=out)
    out += beta


def layernorm_backward(dout, cache, need_dx=True, need_dparams=True):
    """dout (..., C) -> dx (..., C), dgamma (C,), dbeta (C,)."""
    xhat, rstd, gamma = cache
    dgamma = dbeta = None
    if need_dparams:
        C = dout.shape[-1]
        d2, xh2 = dout.reshape(-1, C), xhat.reshape(-1, C)
        dgamma = np.einsum("nc,nc->c", d2, xh2)  # forward was y = xhat * gamma + beta
        dbeta = d2.sum(axis=0)
    dx = None
    if need_dx:
        dx = np.empty_like(dout)
        by_rows(_layernorm_backward_rows, dout, xhat, rstd, dx, gamma=gamma)
    return dx, dgamma, dbeta


def _layernorm_backward_rows(dout, xhat, rstd, dx, gamma):
    C = dout.shape[-1]
    dxhat = dout * gamma  # (..., C)
    # xhat = (x - mu) * rstd, with mu and rstd themselves functions of x. Written out
    # (derived in the notebooks): dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
    m1 = row_sum(dxhat) / C  # (..., 1), mean(dxhat)
    m2 = np.einsum("...c,...c->...", dxhat, xhat)[..., None] / C  # (..., 1), no (..., C) temporary
    np.multiply(xhat, m2, out=dx)
    np.subtract(dxhat, dx, out=dx)  # dxhat - xhat * m2
    dx -= m1
    dx *= rstd


# ----------------------------------------------------------------------------- activations


def gelu_forward(x):
    """GELU, tanh form: 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3))).  x (N) -> (N)."""
    out, g = np.empty_like(x), np.empty_like(x)
    by_rows(_gelu_forward_rows, x, out, g)
    cache = (x, g)  # tanh is the expensive part: store the gate rather than recompute it
    return out, cache


def _gelu_forward_rows(x, out, g):
    t = x.dtype.type
    k, a = t(np.sqrt(2.0 / np.pi)), t(0.044715)  # constants in x's dtype (see STYLE.md)
    np.multiply(x, x, out=g)  # x^2, then built up in place: each step is one pass over memory
    g *= a * k
    g += k
    g *= x  # u = k (x + a x^3)
    np.tanh(g, out=g)
    g *= t(0.5)
    g += t(0.5)  # g = 0.5 (1 + tanh(u)), the gate
    np.multiply(x, g, out=out)  # y = x * g


def gelu_backward(dout, cache):
    """dout (N) -> dx (N).

    forward was y = x g, g = 0.5 (1 + tanh(u)), u = k (x + a x^3). With tanh' = 1 - tanh^2
    = 4 g (1 - g):  dy/dx = g + x * 2 g (1 - g) * k (1 + 3 a x^2).
    """
    x, g = cache
    dx = np.empty_like(dout)
    by_rows(_gelu_backward_rows, dout, x, g, dx)
    return dx


def _gelu_backward_rows(dout, x, g, du):
    t = x.dtype.type
    k, a = t(np.sqrt(2.0 / np.pi)), t(0.044715)
    np.multiply(x, x, out=du)
    du *= t(6) * a * k
    du += t(2) * k
    du *= x  # x * 2 k (1 + 3 a x^2)
    gg = g * g
    np.subtract(g, gg, out=gg)  # g (1 - g)
    du *= gg
    du += g  # dy/dx
    du *= dout


def relu_forward(x):
    """max(x, 0).   x (N) -> (N)."""
    out = np.maximum(x, 0)
    return out, x > 0


def relu_backward(dout, cache):
    positive = cache
    return dout * positive  # a new array: dout is the caller's and stays untouched


def tanh_forward(x):
    """tanh(x).   x (N) -> (N)."""
    out = np.tanh(x)
    return out, out


def tanh_backward(dout, cache):
    out = cache
    return dout * (1 - out * out)  # d tanh / dx = 1 - tanh^2


ACTIVATIONS = {
    "gelu": (gelu_forward, gelu_backward),
    "relu": (relu_forward, relu_backward),
    "tanh": (tanh_forward, tanh_backward),
}


# ----------------------------------------------------------------------------- softmax


def softmax_forward(x):
    """Numerically stable softmax over the last axis.   x (..., K) -> p (..., K).

    Subtracting the row maximum keeps exp() from overflowing. Entries equal to -inf are
    masked out and get probability 0; a row that is -inf everywhere (a query with no key
    it may attend to) gets all zeros instead of 0/0 = NaN.
    """
    p = np.empty_like(x)
    by_rows(_softmax_forward_rows, x, p)
    cache = p  # the backward needs only the output
    return p, cache


def _softmax_forward_rows(x, p):
    m = x.max(axis=-1, keepdims=True)
    m[~np.isfinite(m)] = 0  # fully masked rows: subtract nothing, exp(-inf) = 0 everywhere
    np.subtract(x, m, out=p)
    np.exp(p, out=p)
    s = row_sum(p)  # (..., 1)
    s[s == 0] = 1  # fully masked rows stay 0 instead of 0/0
    p /= s


def softmax_backward(dout, cache):
    """dout (..., K) -> dx (..., K).   forward was p = exp(x) / sum exp(x), so
    dx = p * (dout - sum(dout * p)). Masked entries have p = 0 and get no gradient."""
    p = cache
    dx = np.empty_like(dout)
    by_rows(_softmax_backward_rows, dout, p, dx)
    return dx


def _softmax_backward_rows(dout, p, dx):
    s = np.einsum("...k,...k->...", dout, p)[..., None]  # (..., 1) sum(dout * p), no temporary
    np.subtract(dout, s, out=dx)
    dx *= p  # p * (dout - sum(dout * p))


# ----------------------------------------------------------------------------- dropout


def dropout_forward(x, p, rng=None, train=True):
    """Inverted dropout: zero each entry with probability p, scale the rest by 1/(1-p).

    x (N) -> (N). In eval mode (train=False) or with p = 0 it is the identity. The mask
    comes from `rng` (a np.random.Generator), so a gradient check can replay it by
    passing a generator seeded the same way.
    """
    if not train or p == 0:
        return x, None
    if not 0 <= p < 1:
        raise ValueError(f"dropout p: expected 0 <= p < 1, got {p}")
    if rng is None:
        raise ValueError("rng: dropout in training mode needs a np.random.Generator, got None")
    mask = rng.random(x.shape, dtype=x.dtype) >= p  # keep with probability 1 - p
    scale = x.dtype.type(1 / (1 - p))
    out = x * mask * scale
    cache = (mask, scale)
    return out, cache


def dropout_backward(dout, cache):
    if cache is None:
        return dout  # identity: the gradient passes unchanged (and is not written to)
    mask, scale = cache
    return dout * mask * scale
