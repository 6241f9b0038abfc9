"""Checkers for notebooks/02_attention.ipynb.

    check_attention_backward(fn)   fn(dctx, Q, K, V, P) -> (dQ, dK, dV), one head
    check_causal_mask(fn)          fn(T) -> (T, T) additive bias, 0 or -inf
    check_attention_costs(fn)      fn(B, T, C, H) -> (parameters, forward flops)

Each returns a Result (one line: PASS / FAIL / not implemented yet). The backward is checked
against centred finite differences in float64 (gradcheck.numerical_gradient), not against the
package's own backward, with the package's threshold OP_THRESHOLD = 1e-7. When the answer is
wrong in a way we have seen before (no 1/sqrt(hs) scale, P dctx instead of P^T dctx, a mask
that lets a query see the future), the FAIL line says which.
"""
import numpy as np

from ..attention import attention_bias
from ..gradcheck import OP_THRESHOLD, numerical_gradient, random_functional, rel_error
from ..layers import softmax_forward
from . import Result, attempt, is_number

REPORT_BELOW = 1e-9  # a passing error below this is reported as "below 1e-9" (see _errors_line)


def _errors_line(errors, tolerance):
    """'max relative error below 1e-9 (threshold 1e-7)' when every error is that small, else the
    measured errors by name. Errors near the round-off floor (~1e-11) differ in their digits from
    one CPU to another; a bound keeps the line the same on every machine."""
    worst = max(errors.values())
    if worst < REPORT_BELOW:
        return f"max relative error below {REPORT_BELOW:.0e} (threshold {tolerance:.0e})"
    parts = ", ".join(f"{k} {v:.1e}" for k, v in errors.items())
    return f"relative errors {parts} (threshold {tolerance:.0e})"


# ----------------------------------------------------------------------------- the backward of one head


def head_forward(Q, K, V, bias=None):
    """One head: S = Q K^T / sqrt(hs) + bias, P = softmax(S), ctx = P V.

    Q, K, V (T, hs), bias None or (T, T) -> ctx (T, hs), P (T, T).
    """
    hs = Q.shape[-1]
    S = Q @ K.T / np.sqrt(hs)  # (T, hs) @ (hs, T) -> (T, T)
    if bias is not None:
        S = S + bias
    P, _ = softmax_forward(S)  # (T, T)
    return P @ V, P  # (T, T) @ (T, hs) -> (T, hs)


def _head_problem(T, hs, causal, seed):
    """Q, K, V (T, hs) float64 at a generic point, the bias (T, T) or None, and R (T, hs):
    the loss is L = sum(ctx * R), so dctx = R."""
    rng = np.random.default_rng(seed)
    Q, K, V = (rng.standard_normal((T, hs)) for _ in range(3))
    bias = attention_bias(T, causal=True, dtype=np.float64)[0, 0] if causal else None
    R = random_functional((T, hs), seed + 1)
    return Q, K, V, bias, R


def check_attention_backward(fn):
    """fn(dctx, Q, K, V, P) -> (dQ, dK, dV) for one head (arrays (T, hs), P (T, T)), checked
    against finite differences of L = sum(ctx * dctx) on two problems (causal T=5, hs=4;
    unmasked T=4, hs=9)."""
    name = "attention backward (one head)"
    errors = {"dQ": 0.0, "dK": 0.0, "dV": 0.0}
    for T, hs, causal, seed in ((5, 4, True, 0), (4, 9, False, 10)):
        Q, K, V, bias, R = _head_problem(T, hs, causal, seed)
        ctx, P = head_forward(Q, K, V, bias)
        got, failed = attempt(name, fn, R.copy(), Q.copy(), K.copy(), V.copy(), P.copy())
        if failed is not None:  # a Result: not written yet, or it raised
            return failed
        if not isinstance(got, (tuple, list)) or len(got) != 3:
            length = f" of length {len(got)}" if hasattr(got, "__len__") else ""
            return Result(name, False, f"expected three arrays (dQ, dK, dV), got {type(got).__name__}{length}")

        def L():
            return float(np.sum(head_forward(Q, K, V, bias)[0] * R))

        numerical = {"dQ": numerical_gradient(L, Q), "dK": numerical_gradient(L, K),
                     "dV": numerical_gradient(L, V)}
        for key, g in zip(numerical, got):
            try:
                g = np.asarray(g, dtype=np.float64)
            except (TypeError, ValueError):
                return Result(name, False, f"{key}: expected an array, got {type(g).__name__}")
            if g.shape != numerical[key].shape:
                return Result(name, False, f"{key}: expected shape {numerical[key].shape} (T={T}, "
                              f"hs={hs}), got {g.shape}")
            if not np.all(np.isfinite(g)):
                return Result(name, False, f"{key} holds NaN or inf (T={T}, hs={hs}, "
                              f"{'causal' if causal else 'no'} mask)")
            err = rel_error(g, numerical[key])
            if err > OP_THRESHOLD:
                return Result(name, False, _diagnose(key, g, numerical[key], err, P, R, hs, causal))
            errors[key] = max(errors[key], err)
    return Result(name, True, f"dQ, dK, dV match finite differences; {_errors_line(errors, OP_THRESHOLD)}")


def _diagnose(key, got, numerical, err, P, dctx, hs, causal):
    """One line naming the mistake when it is one we know, else the measured error."""
    where = f"hs={hs}, {'causal' if causal else 'no'} mask"
    line = f"{key} relative error {err:.1e} > {OP_THRESHOLD:.0e} ({where})"
    s = np.sqrt(hs)
    if key in ("dQ", "dK"):
        if rel_error(got / s, numerical) <= OP_THRESHOLD:
            return (f"{line}: {key} is sqrt(hs) = {s:g} times too large. You left out the "
                    f"1/sqrt(hs) scale: forward was S = Q K^T / sqrt(hs), so "
                    f"{'dQ = dS K' if key == 'dQ' else 'dK = dS^T Q'} / sqrt(hs)")
        if rel_error(got * s, numerical) <= OP_THRESHOLD:
            return (f"{line}: {key} is sqrt(hs) = {s:g} times too small: the 1/sqrt(hs) scale "
                    f"was applied twice")
        return (f"{line}. dV was right, so look at the softmax step "
                f"dS = P * (dP - rowsum(dP * P)) and at dQ = dS K / sqrt(hs), dK = dS^T Q / sqrt(hs)")
    untransposed = P @ dctx  # the usual slip: P dctx instead of P^T dctx
    if key == "dV" and rel_error(got, untransposed) <= OP_THRESHOLD < rel_error(untransposed, numerical):
        return f"{line}: you computed P dctx; forward was ctx = P V, so dV = P^T dctx"
    return line


# ----------------------------------------------------------------------------- the causal mask


def check_causal_mask(fn):
    """fn(T) -> (T, T) additive bias: 0 where key u <= query t (the past and the present),
    -inf where u > t (the future). Checked for T = 1, 3, 6."""
    name = "causal mask"
    for T in (1, 3, 6):
        got, failed = attempt(name, fn, T)
        if failed is not None:  # a Result: not written yet, or it raised
            return failed
        got = np.asarray(got)
        if got.dtype == bool:
            return Result(name, False, "expected the additive bias that the scores add (0 where a "
                          "query may look, -inf where not), got a bool array")
        if not np.issubdtype(got.dtype, np.floating):
            return Result(name, False, f"expected a float array of 0 and -inf, got dtype {got.dtype}")
        if got.shape != (T, T):
            return Result(name, False, f"expected shape ({T}, {T}) for T={T}, got {got.shape}")
        future = np.triu(np.ones((T, T), bool), k=1)  # key u > query t
        seen = np.argwhere(future & (got != -np.inf))  # future keys left visible, row by row
        if len(seen):
            t, u = seen[0]
            value = got[t, u]
            if np.isfinite(value) and value < -1:
                return Result(name, False, f"entry [{t}, {u}] is {value:g}: use -inf, so that "
                              f"exp(-inf) = 0 exactly, in any dtype and whatever the scores")
            return Result(name, False, f"query {t} can see key {u}, which is in its future "
                          f"(T={T}): entry [{t}, {u}] is {value:g}, expected -inf")
        hidden = np.argwhere(~future & (got != 0))  # past or present keys hidden or shifted
        if len(hidden):
            t, u = hidden[0]
            return Result(name, False, f"query {t} cannot see key {u} <= {t}, its own past or "
                          f"present (T={T}): entry [{t}, {u}] is {got[t, u]:g}, expected 0")
    return Result(name, True, "0 on and below the diagonal, -inf above it (T = 1, 3, 6)")


# ----------------------------------------------------------------------------- costs


def _attention_costs(B, T, C, H):
    """Parameters and forward flops (a multiply-add = 2 flops, matrix products only) of one
    multi-head attention layer on a (B, T, C) input with H heads."""
    params = 4 * C * C + 4 * C  # W_q, W_k, W_v, W_o (C, C) and their biases (C,)
    projections = 4 * 2 * B * T * C * C  # four (B*T, C) @ (C, C) products
    scores = 2 * B * H * T * T * (C // H)  # Q K^T: (T, hs) @ (hs, T) per head
    mixing = 2 * B * H * T * T * (C // H)  # P V: (T, T) @ (T, hs) per head
    return params, projections + scores + mixing


def check_attention_costs(fn):
    """fn(B, T, C, H) -> (parameters, forward flops), checked on three shapes."""
    name = "attention costs"
    for B, T, C, H in ((2, 16, 64, 4), (1, 128, 768, 12), (8, 32, 48, 3)):
        got, failed = attempt(name, fn, B, T, C, H)
        if failed is not None:  # a Result: not written yet, or it raised
            return failed
        if not isinstance(got, (tuple, list)) or len(got) != 2:
            return Result(name, False, f"expected two numbers (parameters, flops), got {got!r}")
        params, flops = got
        exp_params, exp_flops = _attention_costs(B, T, C, H)
        shape = f"B={B}, T={T}, C={C}, H={H}"
        for label, value in (("parameters", params), ("flops", flops)):
            if not is_number(value):
                return Result(name, False, f"{label}: expected a number, got {type(value).__name__}")
        if params != exp_params:
            hint = ""
            if params == 4 * C * C:
                hint = ": the four biases b_q, b_k, b_v, b_o (C each) are parameters too"
            elif params == 3 * C * C + 3 * C:
                hint = ": the output projection W_o, b_o belongs to the layer too"
            elif params == 4 * C * C // H + 4 * C // H or params == 4 * C * C * H + 4 * C * H:
                hint = ": the heads are a reshape of the width, so H does not change the parameters"
            return Result(name, False, f"parameters for {shape}: expected {exp_params:,}, "
                          f"got {params:,}{hint}")
        if flops != exp_flops:
            proj, attn = 8 * B * T * C * C, 4 * B * T * T * C
            hint = ""
            if flops * 2 == exp_flops:
                hint = ": count a multiply-add as 2 flops, (n, k) @ (k, m) costs 2 n k m"
            elif flops == proj:
                hint = ": the two products per head, Q K^T and P V, cost 2 B T^2 C each over all heads"
            elif flops == attn:
                hint = ": the four projections cost 2 B T C^2 each"
            elif flops in (proj + attn * H, proj + attn // H):
                hint = ": H heads of size C/H cost together what one head of size C costs"
            return Result(name, False, f"forward flops for {shape}: expected {exp_flops:,}, "
                          f"got {flops:,}{hint}")
    return Result(name, True, "4 C^2 + 4 C parameters and 8 B T C^2 + 4 B T^2 C forward flops, "
                              "on three shapes")
