"""The checks of notebook 01 (unit01.py is what the notebook sees). Every call draws fresh
random cases: the first of a fixed shape (so a FAIL line on it reads the same every run), the
others of random shapes, one of them float32."""
import numpy as np

from . import (TOL32, TOL64, Result, apart, attempt, checker, describe, distinct, exact, fail, is_integer, is_number,
               package_ops, rng)
from . import _reference as ref
from ._grads import matches, run_case

# ----------------------------------------------------------------------------- finite differences


@checker("evaluations of a centred check")
def check_evaluation_count(count_evaluations):
    name = "evaluations of a centred check"
    g = rng()
    cases = [(3, 4), (1, 1)] + [tuple(int(v) for v in g.choice(np.arange(2, 400), 2, replace=False)) for _ in range(3)]
    for d1, d2 in cases:
        where = f"d1={d1}, d2={d2}"
        got, failed = attempt(name, count_evaluations, d1, d2, where=where)
        if failed is not None:
            return failed
        expected = ref.count_evaluations(d1, d2)
        if not is_integer(got):
            return fail(name, f"count_evaluations({d1}, {d2}): expected a whole number (an int), got {describe(got)}")
        if got != expected:
            hint = {d1 * d2 + 1: " (that is a forward difference: one shared L(x) plus one per entry)",
                    d1 * d2: " (each entry is moved twice: once up, once down)",
                    2 * d1 * d2 + 1: " (a centred check needs no evaluation at the unmoved point)",
                    2 * (d1 + d2): " (every entry is moved, not every row and column)"}.get(got, "")
            return fail(name, f"count_evaluations({d1}, {d2}) = {exact(got)}, expected {exact(expected)}{hint}")
    return Result(name, True, f"2 d1 d2 on {len(cases)} shapes: {2 * 3 * 4} for a (3, 4) matrix, "
                              f"{2 * 64 * 256:,} for (64, 256)")


@checker("best step h")
def check_best_step(best_step):
    name = "best step h"
    g = rng()
    cases = [(2.0 ** -53, 1.0, 1.0)] + [(10 ** g.uniform(-16, -6), 10 ** g.uniform(-2, 2), 10 ** g.uniform(-2, 2))
                                         for _ in range(4)]
    tol = 1e-12  # a cube root of a product: a few rounding errors of 1.1e-16
    for u, f0, f3 in cases:
        where = f"u={u:.3g}, f0={f0:.3g}, f3={f3:.3g}"
        got, failed = attempt(name, best_step, u, f0, f3, where=where)
        if failed is not None:
            return failed
        if isinstance(got, np.ndarray) and got.shape == () and got.dtype.kind == "f":
            got = got[()]
        if not is_number(got):
            return fail(name, f"best_step({where}): expected a number, got {describe(got)}")
        expected = ref.best_step(u, f0, f3)
        if abs(got - expected) <= tol * expected:
            continue
        wrong = [(np.sqrt(u * f0 / f3), "h ~ sqrt(u f0 / f3) is the forward difference's best step; the centred "
                                        "one's truncation error is h^2, not h"),
                 ((u * f0 / f3) ** (1 / 3), "off by a factor 3^(1/3): set the derivative of E(h) to zero again"),
                 ((6 * u * f0 / f3) ** (1 / 3), "off by a factor 2^(1/3): E'(h) = h f3 / 3 - u f0 / h^2"),
                 ((3 * u * f0 / f3) ** 0.5, "a square root: h^3 = 3 u f0 / f3 gives a cube root"),
                 ((3 * u * f3 / f0) ** (1 / 3), "f0 and f3 swapped: the round-off grows with f0, the truncation with f3"),
                 ((3 * u) ** (1 / 3), "h depends on f0 and f3 too: (3 u f0 / f3)^(1/3)"),
                 (3 * u * f0 / f3 / 3, "(...) ** 1 / 3 divides by 3: write ** (1 / 3)")]
        hint = next((f" ({text})" for value, text in wrong if abs(got - value) <= 1e-9 * abs(value)), "")
        shown, wanted = apart(got, expected)
        return fail(name, f"best_step({where}) = {shown}, expected {wanted} "
                          f"(relative difference {abs(got - expected) / expected:.1e}){hint}")
    return Result(name, True, f"h = (3 u f0 / f3)^(1/3) on {len(cases)} cases, to 1e-12: "
                              f"{(3 * 2.0 ** -53) ** (1 / 3):.1e} in float64, {(3 * 2.0 ** -24) ** (1 / 3):.1e} "
                              f"in float32 (f0 = f3 = 1)")


# ----------------------------------------------------------------------------- linear


def _linear_cases(g):
    cases = [(4, 5, 3, np.float64)]
    while len(cases) < 4:
        N, d_in, d_out = (int(v) for v in g.integers(2, 12, 3))
        if distinct(N, d_in, d_out):
            cases.append((N, d_in, d_out, np.float32 if len(cases) == 3 else np.float64))
    return cases


@checker("linear backward")
def check_linear_backward(linear_backward):
    name = "linear backward"
    g = rng()
    passed = []
    cases = _linear_cases(g)
    for N, d_in, d_out, dt in cases:
        x, W, dout = (g.standard_normal(s).astype(dt) for s in ((N, d_in), (d_in, d_out), (N, d_out)))
        where = f"N={N}, d_in={d_in}, d_out={d_out}, {np.dtype(dt).name}"
        inputs = tuple(a.astype(np.float64) for a in (dout, x, W))

        def reference(*a):
            return dict(zip(("dx", "dW", "db"), ref.linear_backward(*a)))
        expected = reference(*inputs)

        def hint(key, got):
            if key == "db" and np.shape(got) == (N,):
                return "; db sums dout over the rows (axis 0): b was added to every row"
            if key == "db" and np.shape(got) == (N, d_out):
                return "; b was added to every row, so db = dout summed over the rows"
            if key == "db" and matches(got, dout.mean(axis=0)):
                return "; a mean, not a sum: every row's use of b adds its gradient"
            if key == "dW" and matches(got, x.T @ dout / N):
                return "; divided by N: the rows' gradients add, they are not averaged"
            return ""
        worst, failed = run_case(name, linear_backward, (dout, x, W), ("dout", "x", "W"), expected, where,
                                 (reference, inputs), forbid=package_ops("linear_backward"), hint=hint, passed=passed)
        if failed is not None:
            return failed
        passed.append(where)
    return Result(name, True, f"dx, dW, db match on {len(cases)} fresh cases (non-square W, float32 too); "
                              f"threshold {TOL64:.0e} in float64, {TOL32:.0e} in float32")


# ----------------------------------------------------------------------------- softmax + cross-entropy


@checker("softmax cross-entropy backward")
def check_softmax_cross_entropy_backward(softmax_cross_entropy_backward):
    name = "softmax cross-entropy backward"
    g = rng()
    cases = [(6, 5, 2.0, 0.0, np.float64)]
    while len(cases) < 3:
        N, n_cls = (int(v) for v in g.integers(2, 12, 2))
        if N != n_cls:
            cases.append((N, n_cls, 3.0, 0.0, np.float64))
    # a naive exp overflows: exp(800) is inf in float64, exp(100) in float32
    cases += [(7, 4, 3.0, 800.0, np.float64), (5, 9, 3.0, 100.0, np.float32)]
    passed = []
    forbid = package_ops("cross_entropy_forward", "cross_entropy_backward", "softmax_forward", "softmax_backward")
    for N, n_cls, scale, offset, dt in cases:
        logits = (scale * g.standard_normal((N, n_cls)) + offset * g.choice([-1, 1], (N, 1))).astype(dt)
        targets = g.integers(0, n_cls, N)
        where = f"N={N}, n_cls={n_cls}, {np.dtype(dt).name}" + (f", logits near +-{offset:g}" if offset else "")
        inputs = (logits.astype(np.float64), targets)

        def reference(z, t):
            return {"dlogits": ref.cross_entropy_backward(z, t)}
        expected = reference(*inputs)["dlogits"]

        def hint(key, got):
            p = ref.softmax(logits.astype(np.float64))
            if not np.all(np.isfinite(got)):
                return ""
            if matches(got, expected * N):
                return f"; yours is N = {N} times too large: the loss is a mean over the N rows"
            if matches(got, -expected):
                return "; the sign: the gradient is p - onehot, which lowers the target's logit"
            if matches(got, p / N) or matches(got, p):
                return "; the target's -1 is missing: d(-log p_t)/dz = p - onehot(t)"
            if matches(got, expected * N / n_cls):
                return f"; divided by n_cls = {n_cls}: the mean is over the N rows"
            return ""
        _, failed = run_case(name, softmax_cross_entropy_backward, (logits, targets), ("logits", "targets"),
                             {"dlogits": expected}, where, (reference, inputs), forbid=forbid, hint=hint, passed=passed)
        if failed is not None:
            if offset and "NaN or inf" in failed.message:
                failed.message += (": np.exp overflowed on large logits; subtract each row's maximum "
                                   "before np.exp (it does not change the softmax)")
            return failed
        passed.append(where)
    return Result(name, True, f"matches on {len(cases)} fresh cases, logits near +-800 (float64) and "
                              f"+-100 (float32) included; threshold {TOL64:.0e} in float64, {TOL32:.0e} in float32")


# ----------------------------------------------------------------------------- layernorm, rmsnorm


def _norm_cases(g):
    cases = [(4, 6, np.float64)]
    for dt in (np.float64, np.float64, np.float32):
        while True:
            N, C = int(g.integers(2, 9)), int(g.integers(3, 40))  # C = 2: dx ~ 0 (xhat = +-1 whatever x)
            if N != C and C not in [c for _, c, _ in cases]:
                break
        cases.append((N, C, dt))
    return cases


def _norm_hint(fn, centre, xhat, rstd, gamma, dout, got):
    """Why a norm backward failed, when a classic slip explains it -> "; ..." or ""."""
    def formula(d, with_mean):
        return ref.norm_backward(d, xhat, rstd, gamma, with_mean)

    if matches(got * rstd, formula(dout, centre)):
        return "; the whole bracket is multiplied by rstd (xhat = (x - mu) * rstd)"
    if matches(got, formula(dout, centre) * rstd):
        return "; rstd is applied twice"
    if not centre and matches(got, formula(dout, True)):
        return "; RMSNorm does not centre its input: no mu in its forward, so no -mean(dxhat) term"
    if matches(got, formula(dout / gamma, centre)):
        return "; gamma is missing: forward was y = gamma * xhat (+ beta), so dxhat = dout * gamma"
    # inputs on which the true dx is (nearly) zero, each exposing one term of the bracket
    probes = [(xhat / gamma, "for dxhat along xhat (a stretch of the row) dx is ~0, since the scale "
                             "stretches with the row and xhat does not move: the -xhat * mean(dxhat * xhat) term")]
    if centre:
        rows = np.arange(1.0, xhat.shape[0] + 1, dtype=xhat.dtype)[:, None]
        probes.insert(0, (rows / gamma, "for a dxhat that is the same on every entry of a row dx is 0, "
                                        "since a shift of the row moves mu with it: the -mean(dxhat) term"))
    for probe, term in probes:
        out, failed = attempt("probe", fn, probe.copy(), xhat.copy(), rstd.copy(), gamma.copy())
        scale = np.max(np.abs(probe * gamma)) * np.max(rstd)  # the size of dx's terms; dx itself is ~0
        if failed is None and np.shape(out) == xhat.shape and np.all(np.isfinite(out)) and \
                np.max(np.abs(out - formula(probe, centre))) > 1e-6 * scale:
            return f"; {term} is missing or wrong"
    return ""


def _check_norm(name, fn, centre):
    g = rng()
    cases = _norm_cases(g)
    passed = []
    for N, C, dt in cases:
        x = (1.5 * g.standard_normal((N, C)) + g.uniform(-2, 2)).astype(dt)
        gamma = (1 + 0.5 * g.standard_normal(C)).astype(dt)
        xhat, rstd = ref.norm_stats(x, centre)
        dout = g.standard_normal((N, C)).astype(dt)
        where = f"N={N}, C={C}, {np.dtype(dt).name}"
        inputs = tuple(a.astype(np.float64) for a in (dout, xhat, rstd, gamma))

        def reference(*a):
            return {"dx": ref.norm_backward(*a, centre)}
        expected = reference(*inputs)["dx"]

        def hint(key, got):
            return _norm_hint(fn, centre, *(a.astype(np.float64) for a in (xhat, rstd, gamma, dout)), got)
        forbid = package_ops("layernorm_backward")
        _, failed = run_case(name, fn, (dout, xhat, rstd, gamma), ("dout", "xhat", "rstd", "gamma"),
                             {"dx": expected}, where, (reference, inputs), forbid=forbid, hint=hint,
                             passed=passed)
        if failed is not None:
            return failed
        passed.append(where)
    return Result(name, True, f"dx matches on {len(cases)} fresh cases, rows of {len(cases)} lengths, float32 "
                              f"too; threshold {TOL64:.0e} in float64, {TOL32:.0e} in float32")


@checker("layernorm backward")
def check_layernorm_backward(layernorm_backward):
    return _check_norm("layernorm backward", layernorm_backward, centre=True)


@checker("rmsnorm backward")
def check_rmsnorm_backward(rmsnorm_backward):
    return _check_norm("rmsnorm backward", rmsnorm_backward, centre=False)
