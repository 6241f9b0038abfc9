"""The transformer's building blocks as forward/backward pairs, written the way they are derived.

Every operation comes as two functions that sit next to each other:

    out, cache = X_forward(...)      # cache: exactly what the backward needs
    dx, grads  = X_backward(dout, cache)

dx is the gradient of the input (None when the input is integers, or when it is not needed),
grads a dict {parameter name: gradient} of the parameters whose gradient was asked for ({} for
an operation without parameters). The names are the forward's argument names: W, b, gamma, ...

The backward unpacks its cache on its first line and undoes the forward's steps in reverse
order; each of its lines names the forward step it undoes. The derivations are in the course:
notebooks/01_gradients_by_hand.ipynb (linear, GELU, softmax, LayerNorm, cross-entropy).

Every function keeps the dtype of its input (float32 to train, float64 for gradient checks).
Constants are Python floats (0.5 * x, k = math.sqrt(2 / math.pi)): NumPy 2 treats a Python
float as a weak scalar, so 0.5 * x stays float32. (A NumPy float64 scalar such as
np.sqrt(2 / np.pi) would silently turn a float32 array into float64; tests/test_model.py checks
that float32 stays float32 through the whole model.)

These are the reference passes. tools/kernels.py computes the same functions faster (in place,
on every core); `backend.use("fast")` switches the model to them.

Shape legend (used in comments throughout the package):
    B  batch size            T  sequence length        C  model width (d_model)
    H  number of heads       hs head size (C // H)     V  vocabulary size
    F  feed-forward width    m  adapter bottleneck     N  any leading shape (B, T, ...)
"""
import math

import numpy as np

# ----------------------------------------------------------------------------- linear


def linear_forward(x, W, b, keep_x=True):
    """y = x @ W + b.   x (N, d_in), W (d_in, d_out), b (d_out,) -> y (N, d_out).

    keep_x=False (a frozen W): x is needed only for dW, so the cache does not hold it. PyTorch
    does the same: a linear layer saves its input only when its weight requires a gradient.
    """
    y = x @ W + b  # (N, d_in) @ (d_in, d_out) + (d_out,) -> (N, d_out)
    cache = (x if keep_x else None, W)  # x for dW, W for dx
    return y, cache


def linear_backward(dout, cache, need_dx=True, need_dW=True, need_db=True):
    """dout (N, d_out) -> dx (N, d_in), grads {W: (d_in, d_out), b: (d_out,)}.

    A gradient that is not needed is not computed: dx comes back as None, W or b is left out of
    grads. A frozen weight skips its product x^T @ dout entirely (where training only adapters
    saves compute), while dx still flows down to the layers below.
    """
    x, W = cache
    dx, grads = None, {}
    if need_dx:
        dx = dout @ W.T  # forward was y = x @ W, so dx = dy @ W^T: (N, d_out) @ (d_out, d_in)
    if need_dW:
        if x is None:
            raise ValueError("need_dW: the forward ran with keep_x=False (a frozen weight), so x "
                             "was not kept; unfreeze before the forward, not between it and the backward")
        x2 = x.reshape(-1, x.shape[-1])  # (N, d_in): every position is one row
        d2 = dout.reshape(-1, dout.shape[-1])  # (N, d_out)
        grads["W"] = x2.T @ d2  # forward was y = x @ W, so dW = x^T @ dy, summed over rows: (d_in, d_out)
    if need_db:
        grads["b"] = dout.reshape(-1, dout.shape[-1]).sum(axis=0)  # b was added to every row: (d_out,)
    return dx, grads


# ----------------------------------------------------------------------------- embeddings


def embedding_forward(ids, W):
    """Token embedding lookup.   ids (B, T) ints, W (V, C) -> out (B, T, C)."""
    out = W[ids]  # row ids[b, t] of W for every position: (B, T, C)
    cache = (ids, W.shape)
    return out, cache


def embedding_backward(dout, cache):
    """dout (B, T, C) -> None, grads {W: (V, C)}. Ids are integers: no dx, hence None.

    A token that appears twice receives both rows' gradients: np.add.at accumulates over
    repeated indices, where dW[ids] += dout would keep only one of them.
    """
    ids, W_shape = cache
    dW = np.zeros(W_shape, dtype=dout.dtype)  # (V, C): rows of unused tokens stay 0
    # forward was out[b, t] = W[ids[b, t]], so dW[ids[b, t]] += dout[b, t], position by position
    np.add.at(dW, ids.reshape(-1), dout.reshape(-1, W_shape[1]))  # (B*T,) ids, (B*T, C) rows
    return None, {"W": dW}


def position_forward(T, W_pos):
    """Learned position embedding.   W_pos (T_max, C) -> out (T, C), added to every sequence."""
    out = W_pos[:T]  # (T, C)
    cache = (T, W_pos.shape)
    return out, cache


def position_backward(dout, cache):
    """dout (B, T, C) -> None, grads {W_pos: (T_max, C)}: T is an integer (no dx); rows beyond T
    got no gradient."""
    T, W_shape = cache
    dW = np.zeros(W_shape, dtype=dout.dtype)  # (T_max, C)
    dW[:T] = dout.sum(axis=0)  # forward added the same row t to every sequence: sum over B
    return None, {"W_pos": dW}


# ----------------------------------------------------------------------------- layernorm


def layernorm_forward(x, gamma, beta, eps=1e-5):
    """y = gamma * (x - mean) / sqrt(var + eps) + beta, over the last axis.

    x (N, C), gamma (C,), beta (C,) -> y (N, C). A constant row has var = 0 and gives
    xhat = 0 with the finite scale 1/sqrt(eps): no NaN, finite gradients.
    """
    mu = x.mean(axis=-1, keepdims=True)  # (N, 1)
    xc = x - mu  # (N, C), centred
    var = (xc * xc).mean(axis=-1, keepdims=True)  # (N, 1), biased (divides by C) like PyTorch
    rstd = 1 / np.sqrt(var + eps)  # (N, 1), the reciprocal standard deviation
    xhat = xc * rstd  # (N, C), normalised: mean 0, variance 1 per row
    y = xhat * gamma + beta  # (N, C)
    cache = (xhat, rstd, gamma)  # enough for the backward without recomputing mu and var
    return y, cache


def layernorm_backward(dout, cache, need_dx=True, need_dgamma=True, need_dbeta=True):
    """dout (N, C) -> dx (N, C) or None, grads {gamma: (C,), beta: (C,)} (what was asked for)."""
    xhat, rstd, gamma = cache
    C = dout.shape[-1]
    dx, grads = None, {}
    if need_dgamma:
        grads["gamma"] = (dout * xhat).reshape(-1, C).sum(axis=0)  # forward was y = xhat * gamma + beta
    if need_dbeta:
        grads["beta"] = dout.reshape(-1, C).sum(axis=0)  # beta was added to every row
    if need_dx:
        dxhat = dout * gamma  # (N, C), forward was y = xhat * gamma + beta
        # forward was xhat = (x - mu) * rstd, where mu and rstd depend on x too (derived in
        # notebooks/01_gradients_by_hand.ipynb): the two means remove what moves every entry
        # of the row alike (mu) and what stretches the row (rstd)
        dx = rstd * (dxhat - dxhat.mean(axis=-1, keepdims=True)
                     - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True))  # (N, C)
    return dx, grads


# ----------------------------------------------------------------------------- activations


def gelu_forward(x):
    """GELU, tanh form: y = 0.5 x (1 + tanh(k (x + a x^3))), k = sqrt(2/pi), a = 0.044715.

    x (N) -> y (N), any shape.
    """
    k, a = math.sqrt(2 / math.pi), 0.044715
    u = k * (x + a * x * x * x)  # (N); x * x * x, because x**3 calls the slow general power
    th = np.tanh(u)  # (N)
    y = 0.5 * x * (1 + th)  # (N)
    cache = (x, th)  # tanh is the expensive part: keep it rather than recompute it
    return y, cache


def gelu_backward(dout, cache):
    """dout (N) -> dx (N), {}."""
    x, th = cache
    k, a = math.sqrt(2 / math.pi), 0.044715
    du_dx = k * (1 + 3 * a * x * x)  # forward was u = k (x + a x^3)
    dth_du = 1 - th * th  # forward was th = tanh(u), and tanh' = 1 - tanh^2
    dy_dx = 0.5 * (1 + th) + 0.5 * x * dth_du * du_dx  # forward was y = 0.5 x (1 + th)
    dx = dout * dy_dx
    return dx, {}


def relu_forward(x):
    """y = max(x, 0).   x (N) -> y (N)."""
    y = np.maximum(x, 0)
    return y, x > 0


def relu_backward(dout, cache):
    """dout (N) -> dx (N), {}."""
    positive = cache
    return dout * positive, {}  # forward was y = x where x > 0, else 0


def tanh_forward(x):
    """y = tanh(x).   x (N) -> y (N)."""
    y = np.tanh(x)
    return y, y


def tanh_backward(dout, cache):
    """dout (N) -> dx (N), {}."""
    y = cache
    return dout * (1 - y * y), {}  # forward was y = tanh(x), and tanh' = 1 - tanh^2


ACTIVATIONS = {
    "gelu": (gelu_forward, gelu_backward),
    "relu": (relu_forward, relu_backward),
    "tanh": (tanh_forward, tanh_backward),
}


# ----------------------------------------------------------------------------- softmax


def softmax_forward(x):
    """p = exp(x) / sum(exp(x)) over the last axis, computed stably.   x (N, K) -> p (N, K).

    Subtracting the row maximum keeps exp() from overflowing and does not change p. Entries
    equal to -inf are masked out and get probability 0; a row that is -inf everywhere (a
    query with no key it may attend to) gets all zeros instead of 0/0 = NaN.
    """
    m = x.max(axis=-1, keepdims=True)  # (N, 1)
    m = np.where(np.isfinite(m), m, 0)  # a fully masked row: subtract nothing
    e = np.exp(x - m)  # (N, K), every entry in [0, 1]
    s = e.sum(axis=-1, keepdims=True)  # (N, 1)
    s = np.where(s == 0, 1, s)  # a fully masked row stays 0 instead of 0/0
    p = e / s  # (N, K)
    cache = p  # the backward needs only the output
    return p, cache


def softmax_backward(dout, cache):
    """dout (N, K) -> dx (N, K), {}. Masked entries have p = 0 and get no gradient."""
    p = cache
    # forward was p_i = exp(x_i) / sum_j exp(x_j), so dp_i/dx_j = p_i (delta_ij - p_j) and
    # dx_j = sum_i dout_i p_i (delta_ij - p_j) = p_j (dout_j - sum_i dout_i p_i)
    dx = p * (dout - (dout * p).sum(axis=-1, keepdims=True))  # (N, K)
    return dx, {}


# ----------------------------------------------------------------------------- dropout


def dropout_forward(x, p, rng=None, train=True):
    """Inverted dropout: zero each entry with probability p, scale the rest by 1/(1-p).

    x (N) -> (N). In eval mode (train=False) or with p = 0 it is the identity. The mask comes
    from `rng` (a np.random.Generator), so a gradient check can replay it by passing a
    generator seeded the same way.
    """
    if not train or p == 0:
        return x, None
    if not 0 <= p < 1:
        raise ValueError(f"dropout p: expected 0 <= p < 1, got {p}")
    if rng is None:
        raise ValueError("rng: dropout in training mode needs a np.random.Generator, got None")
    mask = rng.random(x.shape, dtype=x.dtype) >= p  # keep with probability 1 - p
    scale = 1 / (1 - p)
    out = x * mask * scale
    cache = (mask, scale)
    return out, cache


def dropout_backward(dout, cache):
    """dout (N) -> dx (N), {}."""
    if cache is None:
        return dout, {}  # forward was the identity: the gradient passes unchanged
    mask, scale = cache
    return dout * mask * scale, {}  # forward was out = x * mask * scale
