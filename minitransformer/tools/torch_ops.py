"""Each fast kernel beside PyTorch's own operation, at the benchmark's shapes: where the steps of
`bench --against torch` gain or lose their time.

    operation_times(b)   -> {operation: side_by_side's figures}
    side_by_side(ours, theirs, repeats)   the timing protocol, the steps' too
    table(res)           the rows printed under the steps' table

Every operation runs its forward then its backward, on the same float32 arrays in both libraries
(bench.operation_arrays): the NumPy side is bench.operation_inputs' fast call, the PyTorch side the
functions the twin uses (F.linear, F.layer_norm, F.gelu, torch.softmax, the attention as its
products) and torch.autograd.grad with the same output gradient.
Timed as the steps are (side_by_side): each library in runs of its own. Needs PyTorch.
"""
import math
import statistics
import time

OPERATIONS = ("linear (C -> F)", "layernorm", "gelu (B, T, F)", "softmax (B, H, T, T)", "attention", "adapter")


def numpy_calls(b, a):
    """{operation: zero-argument call} on the fast kernels, bench.operation_inputs' own: forward,
    then backward, which the call returns."""
    from .bench import operation_inputs
    return {name: fast for name, (_, fast) in operation_inputs(b, a).items() if name in OPERATIONS}


def torch_calls(b, a):
    """{operation: zero-argument call} in PyTorch on the same arrays: forward, then autograd's
    backward, which the call returns (the gradients of the inputs, then of the weights)."""
    import torch
    import torch.nn.functional as F
    H = b.n_heads
    t = {k: torch.from_numpy(v.T.copy() if k.startswith("W") else v) for k, v in a.items()}  # weights: (out, in)
    for k in t:
        t[k].requires_grad_(k not in ("dx", "mask"))
    x, xf, dx = t["x"], t["xf"], t["dx"]

    def attention(x):
        B, T, C = x.shape
        q, k, v = (F.linear(x, t[f"W_{n}"], t[f"b_{n}"]).view(B, T, H, C // H).transpose(1, 2) for n in "qkv")
        s = q @ k.transpose(-1, -2) * (1 / math.sqrt(C // H)) + t["mask"]  # (B,H,T,T)
        ctx = (torch.softmax(s, dim=-1) @ v).transpose(1, 2).reshape(B, T, C)
        return F.linear(ctx, t["W_o"], t["b_o"])

    def adapter(h):
        z = F.linear(h, t["W_down"], t["b_down"])
        return h + F.linear(F.gelu(z, approximate="tanh"), t["W_up"], t["b_up"])

    def both(forward, inputs, dout, weights=()):
        def go():
            out = forward(*inputs)
            return torch.autograd.grad(out, [*inputs, *weights], dout.detach())  # every gradient NumPy's gives
        return go
    return {
        "linear (C -> F)": both(F.linear, [x, t["W"], t["bf"]], xf),
        "layernorm": both(lambda x, g, b_: F.layer_norm(x, (x.shape[-1],), g, b_), [x, t["gamma"], t["beta"]], dx),
        "gelu (B, T, F)": both(lambda x: F.gelu(x, approximate="tanh"), [xf], xf),
        "softmax (B, H, T, T)": both(lambda s: torch.softmax(s, dim=-1), [t["att"]], t["att"]),
        "attention": both(attention, [x], dx, [t[f"{k}_{n}"] for n in "qkvo" for k in "Wb"]),
        "adapter": both(adapter, [x], dx, [t[k] for k in ("W_down", "b_down", "W_up", "b_up")]),
    }


BLOCK = 4  # timed runs in a row of one library, after the untimed runs of SETTLE
SETTLE = 0.03  # seconds of untimed runs at the start of each block, at least one run. PyTorch's
# OpenMP threads (GNU libgomp) spin on a core for about 8 ms after an operation. Right after five
# PyTorch LayerNorms, NumPy's next four (forward and backward) took 1.45-1.71 ms against 1.13-1.21
# once 15 ms had passed; its softmax 2.0-2.6 against 1.3-1.5 (medians of 40 rounds, run by run)


def side_by_side(ours, theirs, repeats):
    """Time two zero-argument calls, NumPy's and PyTorch's: {"numpy_ms", "torch_ms", "ratio",
    "ratio_q1", "ratio_q3", "ratio_min", "ratio_max", "blocks"}.

    Each library runs in blocks of its own: untimed runs for SETTLE seconds (at least one), then
    BLOCK timed runs; the blocks alternate, which library goes first alternating too, until each
    has about `repeats` timed runs (at least 3 blocks). A run right after the other library's
    measures the handover, not the library: PyTorch's threads keep spinning for some milliseconds
    after an operation and took a core from the NumPy call that followed (the adapter's forward
    and backward, 4.1 ms alone, took 7.9 ms right after PyTorch's), and after a pause PyTorch's
    threads start cold (its LayerNorm, 0.4 ms alone, took 9 ms after 20 ms asleep). In a block,
    every timed run follows a run of the same library, as in a training loop, and starts after the
    other library's threads have gone quiet. The times are the medians of every timed run; the
    ratio is the median over the pairs of neighbouring blocks of median / median, and its quartiles.
    """
    pairs = max(3, -(-repeats // BLOCK))
    times, ratios = ([], []), []
    for p in range(pairs):
        got = ([], [])
        for i in ((0, 1) if p % 2 == 0 else (1, 0)):
            fn = (ours, theirs)[i]
            settled = time.perf_counter() + SETTLE
            fn()  # the handover from the other library, not timed
            while time.perf_counter() < settled:
                fn()
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
    from .bench import operation_arrays
    a = operation_arrays(b)
    ours, theirs = numpy_calls(b, a), torch_calls(b, a)
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
