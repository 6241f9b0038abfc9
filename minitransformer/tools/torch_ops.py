"""Each fast kernel beside PyTorch's own operation, at the benchmark's shapes: where the steps of
`bench --against torch` gain or lose their time.

    operation_times(b)   -> {operation: side_by_side's figures}
    side_by_side(ours, theirs, repeats)   the timing protocol, the steps' too
    table(res)           the rows printed under the steps' table

Every operation runs its forward then its backward, on the same float32 arrays in both libraries:
the NumPy side calls the fast kernels (kernels.py, kernels_attention.py) with the backward's
output gradient, the PyTorch side the functions the twin uses (F.linear, F.layer_norm, F.gelu,
torch.softmax, the attention as its products) and torch.autograd.grad with the same gradient.
Timed as the steps are (side_by_side): each library in runs of its own. Needs PyTorch.
"""
import math
import statistics
import time

import numpy as np


def _arrays(b, seed=0):
    """The inputs and output gradients, float32, at b's sizes."""
    rng = np.random.default_rng(seed)
    B, T, C, F, H, m = b.batch, b.seq_len, b.d_model, b.d_ff, b.n_heads, b.bottleneck

    def randn(*shape, scale=1.0):
        return (rng.standard_normal(shape) * scale).astype(np.float32)
    a = {"x": randn(B, T, C), "xf": randn(B, T, F), "dx": randn(B, T, C), "dxf": randn(B, T, F),
         "W": randn(C, F, scale=0.05), "bf": randn(F), "gamma": randn(C), "beta": randn(C),
         "att": randn(B, H, T, T)}
    a.update({f"{k}_{n}": randn(C, C, scale=0.05) if k == "W" else randn(C) for n in "qkvo" for k in "Wb"})
    a.update({"W_down": randn(C, m, scale=0.05), "b_down": randn(m), "W_up": randn(m, C, scale=0.05),
              "b_up": randn(C)})
    return a


def _numpy_calls(a, H):
    """{operation: zero-argument call} on the fast kernels: forward, then backward."""
    from . import kernels, kernels_attention as ka
    attention_w = {f"{k}_{n}": a[f"{k}_{n}"] for n in "qkvo" for k in "Wb"}
    adapter_w = {k: a[k] for k in ("W_down", "b_down", "W_up", "b_up")}

    def both(forward, backward, args, dout):
        def go():  # -> the backward's (dx, {name: gradient})
            _, cache = forward(*args)
            return backward(dout, cache)
        return go
    return {
        "linear (C -> F)": both(kernels.linear_forward, kernels.linear_backward, (a["x"], a["W"], a["bf"]), a["dxf"]),
        "layernorm": both(kernels.layernorm_forward, kernels.layernorm_backward,
                          (a["x"], a["gamma"], a["beta"]), a["dx"]),
        "gelu (B, T, F)": both(kernels.gelu_forward, kernels.gelu_backward, (a["xf"],), a["dxf"]),
        "softmax (B, H, T, T)": both(kernels.softmax_forward, kernels.softmax_backward, (a["att"],), a["att"]),
        "attention": both(lambda x: ka.attention_forward(x, attention_w, H), ka.attention_backward,
                          (a["x"],), a["dx"]),
        "adapter": both(lambda h: ka.adapter_forward(h, adapter_w), ka.adapter_backward, (a["x"],), a["dx"]),
    }


def _torch_calls(a, H):
    """{operation: zero-argument call} in PyTorch: forward, then autograd's backward."""
    import torch
    import torch.nn.functional as F
    t = {k: torch.from_numpy(v.T.copy() if k.startswith("W") else v).requires_grad_(not k.startswith("d"))
         for k, v in a.items()}  # weights as PyTorch keeps them: (out, in)

    def attention(x):
        B, T, C = x.shape
        q, k, v = (F.linear(x, t[f"W_{n}"], t[f"b_{n}"]).view(B, T, H, C // H).transpose(1, 2) for n in "qkv")
        s = q @ k.transpose(-1, -2) * (1 / math.sqrt(C // H))  # (B,H,T,T)
        ctx = (torch.softmax(s, dim=-1) @ v).transpose(1, 2).reshape(B, T, C)
        return F.linear(ctx, t["W_o"], t["b_o"])

    def adapter(h):
        z = F.linear(h, t["W_down"], t["b_down"])
        return h + F.linear(F.gelu(z, approximate="tanh"), t["W_up"], t["b_up"])

    def both(forward, inputs, dout, weights=()):
        def go():  # -> the gradients of the inputs, then of the weights
            out = forward(*inputs)
            return torch.autograd.grad(out, [*inputs, *weights], dout)  # every gradient NumPy's gives
        return go
    attention_w = [t[f"{k}_{n}"] for n in "qkvo" for k in "Wb"]
    adapter_w = [t[k] for k in ("W_down", "b_down", "W_up", "b_up")]
    x, dx, dxf = t["x"], t["dx"], t["dxf"]
    return {
        "linear (C -> F)": both(F.linear, [x, t["W"], t["bf"]], dxf),
        "layernorm": both(lambda x, g, b_: F.layer_norm(x, (x.shape[-1],), g, b_), [x, t["gamma"], t["beta"]], dx),
        "gelu (B, T, F)": both(lambda x: F.gelu(x, approximate="tanh"), [t["xf"]], dxf),
        "softmax (B, H, T, T)": both(lambda s: torch.softmax(s, dim=-1), [t["att"]], t["att"].detach()),
        "attention": both(attention, [x], dx, attention_w),
        "adapter": both(adapter, [x], dx, adapter_w),
    }


BLOCK = 4  # timed runs in a row of one library, after one run that is not timed


def side_by_side(ours, theirs, repeats):
    """Time two zero-argument calls, NumPy's and PyTorch's: {"numpy_ms", "torch_ms", "ratio",
    "ratio_q1", "ratio_q3", "ratio_min", "ratio_max", "blocks"}.

    Each library runs in blocks of its own: one run not timed, then BLOCK timed runs; the blocks
    alternate, which library goes first alternating too, until each has about `repeats` timed runs
    (at least 3 blocks). A run right after the other library's measures the handover, not the
    library: PyTorch's threads keep spinning for some milliseconds after an operation and took a
    core from the NumPy call that followed (the adapter's forward and backward, 4.1 ms alone, took
    7.9 ms right after PyTorch's), and after a pause PyTorch's threads start cold (its LayerNorm,
    0.4 ms alone, took 9 ms after 20 ms asleep). In a block, every run but the first follows a run
    of the same library, as in a training loop. The times are the medians of every timed run; the
    ratio is the median over the pairs of neighbouring blocks of median / median, and its quartiles.
    """
    pairs = max(3, -(-repeats // BLOCK))
    times, ratios = ([], []), []
    for p in range(pairs):
        got = ([], [])
        for i in ((0, 1) if p % 2 == 0 else (1, 0)):
            fn = (ours, theirs)[i]
            fn()  # the handover from the other library, not timed
            for _ in range(BLOCK):
                t0 = time.perf_counter()
                fn()
                got[i].append(time.perf_counter() - t0)
        ratios.append(statistics.median(got[0]) / statistics.median(got[1]))
        times[0].extend(got[0])
        times[1].extend(got[1])
    q = statistics.quantiles(sorted(ratios), n=4, method="inclusive")
    return {"numpy_ms": 1e3 * statistics.median(times[0]), "torch_ms": 1e3 * statistics.median(times[1]),
            "ratio": statistics.median(ratios), "ratio_q1": q[0], "ratio_q3": q[2], "ratio_min": min(ratios),
            "ratio_max": max(ratios), "blocks": pairs}


def operation_times(b, repeats=None):
    """{operation: side_by_side's figures}, as the module doc says."""
    import torch

    from .. import backend
    from . import runtime
    torch.set_num_threads(runtime.threads())  # as many threads as the fast path's
    a = _arrays(b)
    ours, theirs = _numpy_calls(a, b.n_heads), _torch_calls(a, b.n_heads)
    with backend.using("fast"):
        return {name: side_by_side(ours[name], theirs[name], repeats or max(b.repeats, 16)) for name in ours}


def table(res):
    """The operations' rows, forward and backward together, as printed."""
    lines = ["| operation (forward and backward) | NumPy fast kernel | PyTorch | NumPy / PyTorch (median; quartiles) |",
             "|---|---:|---:|---:|"]
    for name, r in res.items():
        lines.append(f"| {name} | {r['numpy_ms']:.2f} ms | {r['torch_ms']:.2f} ms | "
                     f"{r['ratio']:.2f} ({r['ratio_q1']:.2f}-{r['ratio_q3']:.2f}) |")
    level = [n for n, r in res.items() if r["ratio"] <= 1.05]
    slower = [n for n, r in res.items() if r["ratio"] > 1.05]
    lines.append(f"\nNumPy faster or within 5 %: {', '.join(level) or 'none'}; slower: {', '.join(slower) or 'none'}.")
    return "\n".join(lines)
