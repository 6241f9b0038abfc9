"""The rest of the parameter-efficient family: LoRA, prefix tuning, prompt tuning and BitFit.
The forward/backward pairs that are new (their configs are in configs.py; BitFit needs no new
operation, only its own copies of biases). None of them changes attention.py: LoRA is a branch
beside a linear layer (modules.Linear), a prefix is put in front of the keys and values between
the projections and attend_forward (modules.Attention's one hook), a prompt in front of the
embedded input.

    LoRA (Hu et al., 2021)           y = x W + b + s (x A) B,   s = alpha / r
        A (d_in, r) random, B (r, d_out) zero: a fresh LoRA is exactly the base. A branch beside
        the frozen W: its backward gives dA and dB through u = x A and never forms x^T dy for W.
        Merging folds it into W (W + s A B): no extra work at inference.
    Prefix tuning (Li & Liang, 2021) n trained keys P_k and values P_v (n, C) in front of every
        layer's own keys and values; every query may attend to them. Optionally produced by a
        small MLP from P' (the paper's reparameterisation), which is dropped after training.
    Prompt tuning (Lester et al., 2021) n trained embeddings P (n, C) in front of the embedded
        input, once, below the first block; the heads never see those positions.
    BitFit (Ben Zaken et al., 2022)  only the biases (every linear layer's b, every LayerNorm's
        beta) and the head train; the task keeps its own copies, so the base never changes.

What "starts at the base" means for each: LoRA (B = 0) and BitFit (copies equal to the base's)
reproduce the bare base bit for bit. A prefix or a prompt cannot: an extra key always takes a
share pi > 0 of every query's softmax, and an extra position is always attended to. The exact
statement for a prefix with P_v = 0: each attention output is the base's times (1 - pi).

Shape legend as in layers.py; n prefix or prompt length, r LoRA rank, L blocks, h the MLP's width.
"""
import numpy as np

from .configs import BIASES, LORA_TARGETS, BitFitConfig, LoRAConfig, PrefixConfig, PromptConfig  # noqa: F401
from .layers import linear_backward, linear_forward, tanh_backward, tanh_forward


# ----------------------------------------------------------------------------- LoRA


def init_lora(config, d_in, d_out, rng, dtype):
    """A (d_in, r) random (config.init), B (r, d_out) zero: the update s A B starts at 0."""
    r = config.r
    if config.init == "gaussian":
        A = rng.standard_normal((d_in, r)) / r
    else:  # kaiming_uniform_(a=sqrt(5)) on a (r, d_in) weight, as loralib: bound 1/sqrt(d_in)
        A = rng.uniform(-1, 1, (d_in, r)) / np.sqrt(d_in)
    return A.astype(dtype), np.zeros((r, d_out), dtype)


def lora_forward(x, A, B, s):
    """The low-rank branch s (x A) B.   x (N, d_in), A (d_in, r), B (r, d_out) -> out (N, d_out).

    It is added to the frozen layer's x W + b by the caller; W itself is never touched.
    """
    u = x @ A  # (N, d_in) @ (d_in, r) -> (N, r): down to rank r
    out = s * (u @ B)  # (N, r) @ (r, d_out) -> (N, d_out)
    cache = (x, A, B, u, s)  # x for dA, u for dB: both products of the forward are reused
    return out, cache


def lora_backward(dout, cache, need_dx=True, need_dA=True, need_dB=True):
    """dout (N, d_out) -> dx (N, d_in) or None, grads {A: (d_in, r), B: (r, d_out)} (what was asked for).

    dx is this branch's share only: the caller adds the frozen layer's dout @ W^T.
    """
    x, A, B, u, s = cache
    dx, grads = None, {}
    dv = s * dout  # forward was out = s * v with v = u @ B: (N, d_out)
    if need_dB:
        grads["B"] = u.reshape(-1, u.shape[-1]).T @ dv.reshape(-1, dv.shape[-1])  # v = u @ B: (r, N) @ (N, d_out)
    if need_dA or need_dx:
        du = dv @ B.T  # forward was v = u @ B: (N, d_out) @ (d_out, r) -> (N, r)
        if need_dA:
            grads["A"] = x.reshape(-1, x.shape[-1]).T @ du.reshape(-1, du.shape[-1])  # u = x @ A: (d_in, N) @ (N, r)
        if need_dx:
            dx = du @ A.T  # forward was u = x @ A: (N, r) @ (r, d_in) -> (N, d_in)
    return dx, grads


def lora_merge(W, A, B, s):
    """W + s A B: the weight that computes x W + s (x A) B in one product.   -> (d_in, d_out).

    Merging back out by W - s A B would not give W bit for bit (rounding in the addition), so
    the model keeps the original array and puts it back to unmerge (Transformer.unmerge).
    """
    return W + s * (A @ B)  # (d_in, r) @ (r, d_out) -> (d_in, d_out)


# ----------------------------------------------------------------------------- prefix tuning


def prefix_forward(k, v, P_k, P_v):
    """The prefix's keys and values in front of the sequence's own.

    k, v (B, T, C), P_k, P_v (n, C) -> k, v (B, n + T, C): every sequence gets the same n rows.
    """
    B = k.shape[0]
    k = np.concatenate([np.broadcast_to(P_k, (B, *P_k.shape)), k], axis=1)  # (B, n + T, C)
    v = np.concatenate([np.broadcast_to(P_v, (B, *P_v.shape)), v], axis=1)  # (B, n + T, C)
    cache = P_k.shape[0]  # n: where the sequence's own rows start
    return k, v, cache


def prefix_backward(dk, dv, cache, need_dP=True):
    """dk, dv (B, n + T, C) -> (dk, dv) each (B, T, C), grads {P_k, P_v: (n, C)} ({} without need_dP)."""
    n = cache
    grads = {}
    if need_dP:  # forward put the same P_k, P_v in front of every sequence: sum over B
        grads["P_k"], grads["P_v"] = dk[:, :n].sum(axis=0), dv[:, :n].sum(axis=0)  # (n, C) each
    return (dk[:, n:], dv[:, n:]), grads  # the sequence's own rows: (B, T, C)


def prefix_bias(bias, T, n):
    """The attention mask with n prefix columns in front, allowed for every query.

    bias None or (B|1, 1, T, T) -> None or (B|1, 1, T, n + T) (attention.attention_bias's).
    """
    if bias is None:
        return None
    front = np.zeros((*bias.shape[:2], T, n), bias.dtype)  # 0: every query sees the prefix
    return np.concatenate([front, np.broadcast_to(bias, (*bias.shape[:2], T, T))], axis=-1)


def prefix_mlp_forward(P0, w, n_layers):
    """Li & Liang's reparameterisation: every layer's prefix keys and values from one small P'.

        y = tanh(P' W_1 + b_1) W_2 + b_2        one row per prefix position, split into
                                                L layers x (keys, values) x C
    P0 (n, C), W_1 (C, h), b_1 (h,), W_2 (h, 2 L C), b_2 (2 L C,) -> prefixes (L, 2, n, C):
    prefixes[i, 0] is layer i's P_k, prefixes[i, 1] its P_v.
    """
    z, cache_1 = linear_forward(P0, w["W_1"], w["b_1"])  # (n, C) @ (C, h) -> (n, h)
    a, cache_t = tanh_forward(z)  # (n, h)
    y, cache_2 = linear_forward(a, w["W_2"], w["b_2"])  # (n, h) @ (h, 2LC) -> (n, 2LC)
    n, C = P0.shape[0], y.shape[1] // (2 * n_layers)
    prefixes = y.reshape(n, n_layers, 2, C).transpose(1, 2, 0, 3)  # (n, L, 2, C) -> (L, 2, n, C)
    cache = (cache_1, cache_t, cache_2)
    return prefixes, cache


def prefix_mlp_backward(dprefixes, cache, need=None):
    """dprefixes (L, 2, n, C) -> None, grads {P0, W_1, b_1, W_2, b_2} for the names in `need`.

    P' is a parameter, so its gradient is in grads; the MLP has no other input, hence None.
    """
    cache_1, cache_t, cache_2 = cache
    need = {"P0", "W_1", "b_1", "W_2", "b_2"} if need is None else need
    L, _, n, C = dprefixes.shape
    dy = dprefixes.transpose(2, 0, 1, 3).reshape(n, 2 * L * C)  # forward was the split: (n, 2LC)
    below = bool(need & {"P0", "W_1", "b_1"})
    da, g = linear_backward(dy, cache_2, need_dx=below, need_dW="W_2" in need,
                            need_db="b_2" in need)  # forward was y = a W_2 + b_2: (n, h)
    grads = {f"{k}_2": v for k, v in g.items()}  # W -> W_2, b -> b_2
    if below:
        dz, _ = tanh_backward(da, cache_t)  # forward was a = tanh(z): (n, h)
        dP0, g = linear_backward(dz, cache_1, need_dx="P0" in need, need_dW="W_1" in need,
                                 need_db="b_1" in need)  # forward was z = P' W_1 + b_1: (n, C)
        grads |= {f"{k}_1": v for k, v in g.items()}
        if dP0 is not None:
            grads["P0"] = dP0
    return None, grads


# ----------------------------------------------------------------------------- prompt tuning


def prompt_forward(x, P):
    """The soft prompt in front of every sequence.   x (B, T, C), P (n, C) -> (B, n + T, C).

    P gets no position embedding: the real tokens keep positions 0..T-1, so the base's max_len
    and everything it learned about positions stay as they were.
    """
    B = x.shape[0]
    out = np.concatenate([np.broadcast_to(P, (B, *P.shape)), x], axis=1)  # (B, n + T, C)
    cache = P.shape[0]
    return out, cache


def prompt_backward(dout, cache, need_dx=True, need_dP=True):
    """dout (B, n + T, C) -> dx (B, T, C) or None, grads {P: (n, C)} (what was asked for)."""
    n = cache
    dx = dout[:, n:].copy() if need_dx else None  # forward put x after the prompt (a copy: never a view of dout)
    grads = {"P": dout[:, :n].sum(axis=0)} if need_dP else {}  # the same P in front of every sequence: sum over B
    return dx, grads


def strip_prompt_forward(h, n):
    """The heads see only the real tokens.   h (B, n + T, C) -> (B, T, C)."""
    return h[:, n:], (n, h.shape)


def strip_prompt_backward(dout, cache):
    """dout (B, T, C) -> dh (B, n + T, C), {}: zero at the prompt positions, which no head used."""
    n, shape = cache
    dh = np.zeros(shape, dout.dtype)  # (B, n + T, C)
    dh[:, n:] = dout  # forward was out = h[:, n:]
    return dh, {}
