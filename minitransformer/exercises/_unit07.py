"""The checks of notebook 07 (unit07.py is what the notebook sees)."""
import numpy as np

from .. import peft
from ..model import Transformer
from . import (TOL32, TOL64, Result, as_array, attempt, checker, describe, exact, fail, is_integer, package_ops,
               rel_error, rng)
from . import _reference as ref
from ._grads import matches, run_case

# ----------------------------------------------------------------------------- LoRA's backward


@checker("LoRA backward")
def check_lora_backward(fn):
    name = "LoRA backward"
    g = rng()
    cases = [(2, 3, 5, 2, 4, 1.5, np.float64)]
    while len(cases) < 4:
        B, T, d_in, r, d_out = (int(v) for v in g.integers(2, 10, 5))
        if len({B, T, d_in, r, d_out}) == 5:
            dt = np.float32 if len(cases) == 3 else np.float64
            cases.append((B, T, d_in, r, d_out, float(g.uniform(0.2, 4)), dt))
    passed = []
    for Bn, T, d_in, r, d_out, s, dt in cases:
        dout, x = g.standard_normal((Bn, T, d_out)).astype(dt), g.standard_normal((Bn, T, d_in)).astype(dt)
        A, B = g.standard_normal((d_in, r)).astype(dt), g.standard_normal((r, d_out)).astype(dt)
        where = f"x {x.shape}, r={r}, d_out={d_out}, s={s:.3g}, {np.dtype(dt).name}"
        f64 = (lambda a: a.astype(np.float64))
        inputs = (f64(dout), f64(x), f64(A), f64(B), s)

        def reference(*a):
            return dict(zip(("dx", "dA", "dB"), ref.lora_backward(*a)))
        expected = reference(*inputs)

        def hint(key, got):
            if np.shape(got) == expected[key].shape and matches(got * s, expected[key]):
                return "; it is missing the scale s (forward was out = s (x A) B)"
            if np.shape(got) == expected[key].shape and matches(got / s, expected[key]):
                return "; it has the scale s twice"
            first = dict(zip(("dx", "dA", "dB"), ref.lora_backward(f64(dout)[:1], f64(x)[:1], f64(A), f64(B), s)))
            if key != "dx" and matches(got, first[key]):
                return "; it holds the first sequence's rows only: sum over every row of the batch (reshape to (N, d))"
            if key == "dB" and np.shape(got) == (d_in, d_out):
                return ": dB = u^T dv with u = x A, the rank-r rows, not x"
            return ""
        _, failed = run_case(name, fn, (dout, x, A, B, s), ("dout", "x", "A", "B", "s"), expected, where,
                             (reference, inputs), forbid=package_ops("lora_backward"), hint=hint, passed=passed)
        if failed is not None:
            return failed
        passed.append(where)
    return Result(name, True, f"dx, dA, dB match on {len(cases)} fresh cases (3-D x, float32 too); threshold "
                              f"{TOL64:.0e} in float64, {TOL32:.0e} in float32")


# ----------------------------------------------------------------------------- merging LoRA

MERGE_TOLERANCE = 1e-12  # float64: W0 + s A B summed over r terms, each off by ~1e-16 of the largest entry
MERGE_TOLERANCE32 = 1e-5  # float32: the same sums at 6e-8


@checker("merge LoRA into W")
def check_merge(fn):
    name = "merge LoRA into W"
    g = rng()
    cases = [(6, 10, 3, 16, np.float64)]
    while len(cases) < 4:
        d_in, d_out, r = int(g.integers(2, 30)), int(g.integers(2, 30)), int(g.integers(2, 9))
        alpha = int(g.integers(1, 64))
        if len({d_in, d_out, r}) == 3 and alpha % r and alpha != r:
            cases.append((d_in, d_out, r, alpha, np.float32 if len(cases) == 3 else np.float64))
    for d_in, d_out, r, alpha, dt in cases:
        W0 = g.standard_normal((d_in, d_out)).astype(dt)
        A = g.standard_normal((d_in, r)).astype(dt)
        B = (0.3 * g.standard_normal((r, d_out))).astype(dt)  # as after training: not zero
        where = f"d_in={d_in}, d_out={d_out}, r={r}, alpha={alpha}, {np.dtype(dt).name}"
        W0_before = W0.copy()
        got, failed = attempt(name, fn, W0, A.copy(), B.copy(), alpha, r, where=where, forbid=(peft.lora_merge,))
        if failed is not None:
            return failed
        if not np.array_equal(W0, W0_before):
            return fail(name, "your merge changed W0 in place: the base is shared by every task, return a new "
                              "array (W0 + ..., not W0 += ...)")
        W, problem = as_array(got, "W", (d_in, d_out))
        if problem is not None:
            if isinstance(got, np.ndarray) and got.shape == (d_out, d_in):
                problem += ": this package stores W as (d_in, d_out), y = x @ W"
            return fail(name, f"{problem} on {where}")
        if W.dtype != W0.dtype:
            return fail(name, f"{np.dtype(dt).name} weights gave a {W.dtype} W on {where}: keep the base's dtype "
                              f"(a NumPy float64 scalar such as np.float64(alpha / r) promotes float32)")
        W64, A64, B64, Wr = (a.astype(np.float64) for a in (W0, A, B, W))
        expected = ref.merge(W64, A64, B64, alpha, r)
        tol = MERGE_TOLERANCE if dt == np.float64 else MERGE_TOLERANCE32
        err = rel_error(Wr, expected)
        if err > tol:
            wrong = {"W0 + A B": (W64 + A64 @ B64, "the update is scaled by alpha / r"),
                     "W0 + (r/alpha) A B": (W64 + (r / alpha) * (A64 @ B64), "the scale is alpha / r, not r / alpha"),
                     "W0 + alpha A B": (W64 + alpha * (A64 @ B64), "the scale is alpha / r, not alpha"),
                     "(alpha/r) A B": ((alpha / r) * (A64 @ B64), "that is the update alone: add it to W0"),
                     "W0 + (alpha // r) A B": (W64 + (alpha // r) * (A64 @ B64),
                                               "alpha // r rounds down: the scale is alpha / r")}
            found = next((f": you returned {k}; {t}" for k, (v, t) in wrong.items() if rel_error(Wr, v) <= tol), "")
            return fail(name, f"W: max relative error {err:.1e} > {tol:.0e} on {where}{found}")
    return Result(name, True, f"W = W0 + (alpha/r) A B on {len(cases)} fresh cases (threshold {MERGE_TOLERANCE:.0e} "
                              f"in float64, {MERGE_TOLERANCE32:.0e} in float32); W0 untouched; float32 kept")


# ----------------------------------------------------------------------------- the prefix's gradient


@checker("gradient through the prefix")
def check_prefix_backward(fn):
    name = "gradient through the prefix"
    g = rng()
    cases = [(3, 2, 4, 5)]
    while len(cases) < 4:
        B, n, T, C = (int(v) for v in g.integers(2, 10, 4))
        if len({B, n, T, C}) == 4:
            cases.append((B, n, T, C))
    passed = []
    for B, n, T, C in cases:
        dk = g.standard_normal((B, n + T, C))
        where = f"B={B}, n={n}, T={T}, C={C}"

        def reference(*a):
            return dict(zip(("dP", "dk_own"), ref.prefix_backward(*a)))
        expected = reference(dk, n)

        def hint(key, got):
            wrong = [(dk[0, :n], "the same P went in front of every sequence: sum over the batch"),
                     (dk[:, :n].mean(axis=0), "a sum over the batch, not a mean: every sequence's use of P adds "
                                              "its gradient"),
                     (dk[:, -n:].sum(axis=0), "the prefix rows come first: dk[:, :n]"),
                     (dk[:, :T], "the prefix rows come first: the sequence's own are dk[:, n:]"),
                     (dk[:, :n].sum(axis=1), "sum over the batch axis (0), not over the prefix rows")]
            return next((f"; {t}" for v, t in wrong if matches(got, v)), "")
        _, failed = run_case(name, fn, (dk, n), ("dk", "n"), expected, where,
                             (reference, (dk, n)), forbid=package_ops("prompt_backward"), hint=hint, passed=passed)
        if failed is not None:
            return failed
        passed.append(where)
    return Result(name, True, f"dP and dk_own match on {len(cases)} fresh cases (threshold {TOL64:.0e})")


# ----------------------------------------------------------------------------- counts


@checker("prefix tuning's parameters")
def check_prefix_count(fn):
    name = "prefix tuning's parameters"
    g = rng()
    cases = [(8, 64, 4, 64)]
    while len(cases) < 4:
        n, C, L, h = int(g.integers(1, 30)), int(g.integers(4, 200)), int(g.integers(2, 13)), int(g.integers(2, 600))
        if len({n, C, L, h}) == 4 and n * C != 2 * L * C and h != n:
            cases.append((n, C, L, h))
    cases.append((10, 768, 12, 512))  # BERT-base's size
    for n, C, L, h in cases:
        for reparam in (False, True):
            where = f"n={n}, C={C}, L={L}, hidden={h}, reparameterize={reparam}"
            got, failed = attempt(name, fn, n, C, L, h, reparam, where=where,
                                  forbid=(Transformer.add_adapter, Transformer.num_parameters))
            if failed is not None:
                return failed
            if not is_integer(got):
                return fail(name, f"expected an integer, got {describe(got)} on {where}")
            expected = ref.prefix_count(n, C, L, h, reparam)
            if got != expected:
                hints = {L * n * C: "keys only: each layer has n values too (P_v)",
                         2 * n * C: "one layer's: every one of the L layers has its own P_k and P_v",
                         expected - h - 2 * L * C: "the MLP's biases b_1 (hidden) and b_2 (2LC) train too",
                         expected - n * C: "P' itself (n x C) trains too",
                         expected + L * 2 * n * C: "with the MLP, every layer's P_k, P_v are computed by it, not "
                                                   "trained: they are not parameters then",
                         n * C: "that is the prompt's count: a prefix has keys and values in every layer"}
                hint = hints.get(int(got), "")
                return fail(name, f"expected {exact(expected)} ({where}), got {exact(got)}"
                                  + (f": {hint}" if hint else ""))
    return Result(name, True, f"matches add_adapter on {len(cases) - 1} configurations, with and without the "
                              f"MLP, and at BERT-base's size")


@checker("BitFit's parameters")
def check_bitfit_count(fn):
    name = "BitFit's parameters"
    g = rng()
    cases = [(64, 200, 4)]
    while len(cases) < 5:
        C, F, L = int(g.integers(4, 300)), int(g.integers(4, 1200)), int(g.integers(1, 13))
        shifts = [(2 * L + 1) * C, C, -(2 * L + 1) * C, L * (F - C), L * (F + C), L * C, -L * C]
        if len({C, F, L}) == 3 and F not in (2 * C, 3 * C, 4 * C, 5 * C) and len(set(shifts)) == len(shifts):
            cases.append((C, F, L))
    for C, F, L in cases:
        where = f"C={C}, F={F}, L={L}"
        got, failed = attempt(name, fn, C, F, L, where=where,
                              forbid=(Transformer.add_adapter, Transformer.num_parameters))
        if failed is not None:
            return failed
        if not is_integer(got):
            return fail(name, f"expected an integer, got {describe(got)} on {where}")
        expected = ref.bitfit_count(C, F, L)
        if got != expected:
            hints = {expected - (2 * L + 1) * C: "every LayerNorm's beta is a bias too (the paper counts them): "
                                                 "(2L + 1) C",
                     expected - C: "2L + 1 LayerNorms: ln1 and ln2 in each block, and ln_emb (post-LN) or ln_f "
                                   "(pre-LN)",
                     expected + (2 * L + 1) * C: "gamma is a scale, not a bias: only beta trains",
                     expected - L * (F - C): "the FFN's first bias b_1 has F entries, not C",
                     expected - L * (F + C): "the FFN's biases b_1 (F) and b_2 (C) train too",
                     expected - L * C: "four attention biases per block: b_q, b_k, b_v and b_o",
                     expected + L * C: "four attention biases per block, not five"}
            hint = hints.get(int(got), "")
            return fail(name, f"expected {exact(expected)} ({where}), got {exact(got)}"
                              + (f": {hint}" if hint else ""))
    return Result(name, True, f"matches add_adapter(BitFitConfig()) on {len(cases)} configurations, 4 of them fresh "
                              f"(F never a multiple 2-5 of C)")
