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
LoRA's branches and the prefix (peft.py) take the reference's own steps inside these kernels
(peft.lora_forward, one concatenation of the prefix), added in place where the array is fresh.
"""
import numpy as np

from .. import peft
from ..attention import BELOW_O, WEIGHTS, split_heads
from . import _kb as kernels
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


def attention_forward(x, w, n_heads, bias=None, keep=None, lora=None, prefix=None):
    """Scale folded into q, heads as views, products per core, no merging copy. LoRA's branches
    and the prefix are the reference's steps (peft.lora_forward, one concatenation)."""
    keep = w.keys() if keep is None else keep
    lora = {} if lora is None else lora
    hs = x.shape[-1] // n_heads
    scale = x.dtype.type(1 / np.sqrt(hs))
    proj, caches = {}, {}
    for t in ("q", "k", "v"):
        proj[t], caches[t] = kernels.linear_forward(x, w[f"W_{t}"], w[f"b_{t}"], keep_x=f"W_{t}" in keep)
        if t in lora:
            branch, caches[f"lora_{t}"] = peft.lora_forward(x, *lora[t])
            proj[t] += branch  # proj[t] is the kernel's own fresh array
    q, k, v = proj["q"], proj["k"], proj["v"]
    n_prefix = 0
    if prefix is not None:  # (B, n + T, C): the prefix rows first
        n_prefix, B = prefix[0].shape[0], x.shape[0]
        k = np.concatenate([np.broadcast_to(prefix[0], (B, *prefix[0].shape)), k], axis=1)
        v = np.concatenate([np.broadcast_to(prefix[1], (B, *prefix[1].shape)), v], axis=1)
    q *= scale  # on q (B,T,C) rather than on the scores (B,H,T,n+T)
    q, k, v = (split_heads(a, n_heads) for a in (q, k, v))  # (B,H,T,hs), (B,H,n+T,hs) views
    att = scores_matmul(q, k)  # (B,H,T,n+T)
    if bias is not None:
        att += bias
    p, _ = kernels.softmax_forward(att)  # (B,H,T,n+T)
    ctx = heads_matmul(p, v)  # (B,T,C)
    out, caches["o"] = kernels.linear_forward(ctx, w["W_o"], w["b_o"], keep_x="W_o" in keep)
    if "o" in lora:
        branch, caches["lora_o"] = peft.lora_forward(ctx, *lora["o"])
        out += branch
    cache = (caches, q, k, v, p, scale, n_heads, tuple(lora), n_prefix)
    return out, cache


def attention_backward(dout, cache, need_dx=True, need=None):
    """The reference's steps with the products per core and no merging copies."""
    caches, q, k, v, p, scale, n_heads, lora, n = cache
    if need is None:
        need = set(WEIGHTS) | {f"{m}_{t}" for t in lora for m in "AB"} | ({"P_k", "P_v"} if n else set())
    grads = {}
    need_core = need_dx or bool(need & BELOW_O)
    dctx, grads["W_o"], grads["b_o"] = kernels.linear_backward(
        dout, caches["o"], need_dx=need_core, need_dW="W_o" in need, need_db="b_o" in need)
    if "o" in lora:
        dcl, grads["A_o"], grads["B_o"] = peft.lora_backward(dout, caches["lora_o"], need_dx=need_core,
                                                             need_dA="A_o" in need, need_dB="B_o" in need)
        if need_core:
            dctx += dcl  # dctx is the kernel's fresh array
    if not need_core:
        return None, {name: g for name, g in grads.items() if g is not None}
    dctx = split_heads(dctx, n_heads)  # (B,H,T,hs) view
    dp = scores_matmul(dctx, v)  # dP = dctx @ V^T: (B,H,T,n+T)
    dv = heads_matmul(p.transpose(0, 1, 3, 2), dctx)  # dV = P^T @ dctx: (B,n+T,C)
    datt = kernels.softmax_backward(dp, p)  # dS: (B,H,T,n+T)
    dq = heads_matmul(datt, k)  # dS @ K: (B,T,C)
    dq *= scale  # q was scaled in the forward
    dk = heads_matmul(datt.transpose(0, 1, 3, 2), q)  # dS^T @ (scaled) Q: (B,n+T,C)
    if n:  # the prefix rows: summed over the batch; the rest are the sequence's own (views)
        if "P_k" in need:
            grads["P_k"] = dk[:, :n].sum(axis=0)
        if "P_v" in need:
            grads["P_v"] = dv[:, :n].sum(axis=0)
        dk, dv = dk[:, n:], dv[:, n:]
    dx = None
    for name, dh in (("q", dq), ("k", dk), ("v", dv)):
        dxi, grads[f"W_{name}"], grads[f"b_{name}"] = kernels.linear_backward(
            dh, caches[name], need_dx=need_dx, need_dW=f"W_{name}" in need, need_db=f"b_{name}" in need)
        if name in lora:
            dxl, grads[f"A_{name}"], grads[f"B_{name}"] = peft.lora_backward(
                dh, caches[f"lora_{name}"], need_dx=need_dx, need_dA=f"A_{name}" in need,
                need_dB=f"B_{name}" in need)
            if need_dx:
                dxi += dxl  # dxi is the kernel's fresh array
        if need_dx and dx is None:
            dx = dxi  # a fresh array: safe to accumulate into
        elif need_dx:
            dx += dxi
    return dx, {name: g for name, g in grads.items() if g is not None}


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
    grads = {}
    da, grads["W_up"], grads["b_up"] = kernels.linear_backward(
        du, cache_up, need_dW="W_up" in need, need_db="b_up" in need)
    dz = act_backward(da, cache_act)
    dh, grads["W_down"], grads["b_down"] = kernels.linear_backward(
        dz, cache_down, need_dx=need_dx, need_dW="W_down" in need, need_db="b_down" in need)
    if need_dx and skip:
        dh += dout
    return dh, {n: g for n, g in grads.items() if g is not None}
