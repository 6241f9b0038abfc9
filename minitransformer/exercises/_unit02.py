"""The checks of notebook 02 (unit02.py is what the notebook sees)."""
import math

import numpy as np

from .. import attention
from . import TOL32, TOL64, Result, attempt, checker, describe, distinct, exact, fail, is_integer, package_ops, rng
from . import _reference as ref
from ._grads import matches, run_case

# ----------------------------------------------------------------------------- the backward of one head


def _head_cases(g):
    cases = [(5, 4, True, np.float64), (4, 9, False, np.float64)]
    for causal, dt in ((True, np.float64), (False, np.float64), (True, np.float32)):
        while True:
            T, hs = int(g.integers(2, 12)), int(g.integers(2, 12))
            if T != hs and (T, hs) not in [(c[0], c[1]) for c in cases]:
                break
        cases.append((T, hs, causal, dt))
    return cases


@checker("attention backward (one head)")
def check_attention_backward(fn):
    name = "attention backward (one head)"
    g = rng()
    passed = []
    cases = _head_cases(g)
    for T, hs, causal, dt in cases:
        Q, K, V, dctx = (g.standard_normal((T, hs)) for _ in range(4))
        bias = ref.causal_mask(T) if causal else None
        _, P = ref.head_forward(Q, K, V, bias)
        Q, K, V, dctx, P = (a.astype(dt) for a in (Q, K, V, dctx, P))
        where = f"T={T}, hs={hs}, {'causal' if causal else 'no'} mask, {np.dtype(dt).name}"
        Q64, K64, V64, d64, P64 = (a.astype(np.float64) for a in (Q, K, V, dctx, P))
        inputs = (d64, Q64, K64, V64, P64)

        def reference(*a):
            return dict(zip(("dQ", "dK", "dV"), ref.head_backward(*a)))
        expected = reference(*inputs)

        def hint(key, got):
            s = math.sqrt(hs)
            if key in ("dQ", "dK"):
                if matches(got, expected[key] * s):
                    return (f"; {key} is sqrt(hs) = {s:.4g} times too large: forward was S = Q K^T / sqrt(hs), so "
                            f"{'dQ = dS K' if key == 'dQ' else 'dK = dS^T Q'} / sqrt(hs)")
                if matches(got, expected[key] / s):
                    return f"; {key} is sqrt(hs) = {s:.4g} times too small: the 1/sqrt(hs) scale was applied twice"
                if matches(got, expected[key] * s / math.sqrt(T)):
                    return "; the scale is 1/sqrt(hs), the head size (the last axis of Q), not 1/sqrt(T)"
                if matches(got, expected[key] * s / hs):
                    return "; the scale is 1/sqrt(hs), not 1/hs"
                if key == "dK" and matches(got, expected["dQ"]):
                    return "; that is dQ: dK = dS^T Q / sqrt(hs)"
                dP = d64 @ V64.T
                if key == "dQ" and matches(got, (P64 * dP) @ K64 / s):
                    return ("; the softmax step misses its second term: dS = P * (dP - rowsum(dP * P)), "
                            "every probability of a row moves when one score does")
                dS = P64 * (dP - (dP * P64).sum(-1, keepdims=True))
                if key == "dK" and matches(got, dS @ Q64 / s):
                    return "; dK = dS^T Q / sqrt(hs): dS transposed (key u gets its gradient from column u of dS)"
                return ("; dV was right, so look at dS = P * (dP - rowsum(dP * P)), dQ = dS K / sqrt(hs), "
                        "dK = dS^T Q / sqrt(hs)")
            if matches(got, P64 @ d64):
                return "; you computed P dctx; forward was ctx = P V, so dV = P^T dctx"
            return ""
        _, failed = run_case(name, fn, (dctx, Q, K, V, P), ("dctx", "Q", "K", "V", "P"), expected, where,
                             (reference, inputs), forbid=package_ops("attention_backward"), hint=hint, passed=passed)
        if failed is not None:
            return failed
        passed.append(where)
    return Result(name, True, f"dQ, dK, dV match on {len(cases)} fresh heads (T != hs, causal and unmasked, "
                              f"float32 too); threshold {TOL64:.0e} in float64, {TOL32:.0e} in float32")


# ----------------------------------------------------------------------------- the causal mask


@checker("causal mask")
def check_causal_mask(fn):
    name = "causal mask"
    g = rng()
    sizes = [1, 3] + [int(T) for T in g.choice(np.arange(4, 20), 2, replace=False)]
    for T in sizes:
        where = f"T={T}"
        got, failed = attempt(name, fn, T, where=where, forbid=(attention.attention_bias,))
        if failed is not None:
            return failed
        if isinstance(got, (list, tuple)):
            try:
                got = np.array(got, dtype=float)
            except (ValueError, TypeError):
                return fail(name, f"expected a (T, T) float array for T={T}, got {describe(got)}")
        if not isinstance(got, np.ndarray):
            return fail(name, f"expected a (T, T) float array for T={T}, got {describe(got)}")
        if got.dtype == bool:
            return fail(name, "expected the additive bias that the scores add (0 where a query may look, "
                              "-inf where not), got a bool array")
        if got.dtype.kind != "f":
            return fail(name, f"expected a float array of 0 and -inf, got {describe(got)}: an integer "
                              f"array cannot hold -inf")
        if got.shape != (T, T):
            extra = " (the scores of one head are (T, T): no batch or head axes here)" if got.ndim > 2 else ""
            return fail(name, f"expected shape ({T}, {T}) for T={T}, got {got.shape}{extra}")
        future = np.triu(np.ones((T, T), bool), k=1)  # key u > query t
        seen = np.argwhere(future & (got != -np.inf))
        if len(seen):
            t, u = seen[0]
            value = got[t, u]
            if np.isfinite(value) and value < -1:
                return fail(name, f"entry [{t}, {u}] is {value:g}: use -inf, so that exp(-inf) = 0 exactly, "
                                  f"in any dtype and whatever the scores")
            return fail(name, f"query {t} can see key {u}, which is in its future (T={T}): entry "
                              f"[{t}, {u}] is {value:g}, expected -inf")
        hidden = np.argwhere(~future & (got != 0))
        if len(hidden):
            t, u = hidden[0]
            what = "its own present" if t == u else "its own past"
            return fail(name, f"query {t} cannot see key {u}, {what} (T={T}): entry [{t}, {u}] is "
                              f"{got[t, u]:g}, expected 0")
    return Result(name, True, f"0 on and below the diagonal, -inf above it (T = 1, 3 and two fresh sizes)")


# ----------------------------------------------------------------------------- costs


def _cost_cases(g):
    cases = [(2, 16, 64, 4)]
    while len(cases) < 4:
        H = int(g.integers(2, 9))
        C = H * int(g.integers(2, 40))
        B, T = int(g.integers(2, 9)), int(g.integers(2, 200))
        if distinct(B, T, C, H, C // H) and T * H != C:
            cases.append((B, T, C, H))
    return cases


@checker("attention costs")
def check_attention_costs(fn):
    name = "attention costs"
    g = rng()
    cases = _cost_cases(g)
    for B, T, C, H in cases:
        where = f"B={B}, T={T}, C={C}, H={H}"
        got, failed = attempt(name, fn, B, T, C, H, where=where)
        if failed is not None:
            return failed
        if not isinstance(got, (tuple, list)) or len(got) != 2:
            return fail(name, f"expected two integers (parameters, flops), got {describe(got)}")
        params, flops = got
        for label, value in (("parameters", params), ("flops", flops)):
            if not is_integer(value):
                return fail(name, f"{label}: expected an integer (a count), got {describe(value)} on {where}")
        exp_params, exp_flops = ref.attention_costs(B, T, C, H)
        if params != exp_params:
            heads = ": the heads are a reshape of the width, so H does not change the parameters"
            hint = {4 * C * C: ": the four biases b_q, b_k, b_v, b_o (C each) are parameters too",
                    3 * C * C + 3 * C: ": the output projection W_o, b_o belongs to the layer too",
                    4 * C * C // H + 4 * C // H: heads,
                    4 * C * C * H + 4 * C * H: heads,
                    4 * C * C + C: ": each of the four projections has its own bias"}.get(int(params), "")
            return fail(name, f"parameters for {where}: expected {exact(exp_params)}, got {exact(params)}{hint}")
        if flops != exp_flops:
            proj, attn = 8 * B * T * C * C, 4 * B * T * T * C
            hint = {exp_flops // 2: ": count a multiply-add as 2 flops, (d1, d2) @ (d2, d3) costs 2 d1 d2 d3",
                    proj: ": the two products per head, Q K^T and P V, cost 2 B T^2 C each over all heads",
                    attn: ": the four projections cost 2 B T C^2 each",
                    proj + attn * H: ": H heads of size C/H cost together what one head of size C costs",
                    proj + attn // H: ": H heads of size C/H cost together what one head of size C costs",
                    6 * B * T * C * C + attn: ": four projections, W_q, W_k, W_v and W_o",
                    proj + attn // 2: ": two products per head, Q K^T and P V"}.get(int(flops), "")
            return fail(name, f"forward flops for {where}: expected {exact(exp_flops)}, got {exact(flops)}{hint}")
    return Result(name, True, f"4 C^2 + 4 C parameters and 8 B T C^2 + 4 B T^2 C forward flops, on "
                              f"{len(cases)} shapes")
