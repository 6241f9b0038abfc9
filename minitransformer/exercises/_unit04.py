"""The checks of notebook 04 (unit04.py is what the notebook sees)."""
import math
from dataclasses import replace

import numpy as np

from .. import sizes
from ..adapters import AdapterConfig
from ..gradcheck import CHECK_CONFIG
from ..model import Transformer
from . import (TOL32, TOL64, Result, apart, attempt, checker, describe, exact, fail, is_integer, is_number, package_ops,
               rng, unchanged, unpack)
from . import _reference as ref
from ._grads import matches, run_case

# ----------------------------------------------------------------------------- parameter count


def _count_hints(C, m, L, K, ln):
    """(difference model - student, what it means); a case is used only when these all differ."""
    per_adapter = 2 * m * C + m + C
    n_norms = 2 * L + 1
    hints = [(2 * L * (m + C), "the adapters' biases b_down (m) and b_up (C) are missing"),
             (L * per_adapter, "there are two adapters per block (attention and feed-forward), not one"),
             (-2 * L * per_adapter, "there are two adapters per block, not four"),
             (C * K + K, "the task head (C x n_classes weights and n_classes biases) is missing")]
    if ln:
        hints += [(n_norms * 2 * C, "the task's LayerNorm copies are missing: a post-LN model has 2 per block "
                                    "plus one after the embeddings, each a gamma and a beta of size C"),
                  (2 * C, "one LayerNorm is missing: post-LN also normalises the embeddings (ln_emb)"),
                  (n_norms * C, "a LayerNorm has two vectors of size C, gamma and beta")]
    else:
        hints.append((-n_norms * 2 * C, "with train_layernorm=False no LayerNorm trains"))
    return hints


def _count_cases(g):
    cases = [(64, 8, 4, 2, True), (64, 8, 4, 2, False)]
    while len(cases) < 6:
        C, m, L, K = int(g.integers(4, 80)), int(g.integers(1, 20)), int(g.integers(1, 6)), int(g.integers(2, 10))
        ln = len(cases) % 2 == 0
        values = [v for v, _ in _count_hints(C, m, L, K, ln)]
        if len({C, m, L, K}) == 4 and len(set(values)) == len(values) and C != 2 * L * m:
            cases.append((C, m, L, K, ln))
    return cases


@checker("trained parameters")
def check_trained_parameters(fn):
    name = "trained parameters"
    cases = _count_cases(rng())
    forbid = (Transformer.num_parameters, Transformer.add_adapter, sizes.adapter_parameter_count)
    for C, m, L, K, ln in cases:
        where = f"C={C}, m={m}, {L} layers, {K} classes, train_layernorm={ln}"
        got, failed = attempt(name, fn, C, m, L, K, ln, where=where, forbid=forbid)
        if failed is not None:
            return failed
        if not is_integer(got):
            return fail(name, f"expected an integer (a count), got {describe(got)} on {where}")
        expected = ref.trained_count(C, m, L, K, ln)
        if got != expected:
            hint = next((f" ({t})" for v, t in _count_hints(C, m, L, K, ln) if v == expected - got), "")
            return fail(name, f"{where}: got {exact(got)}, expected {exact(expected)}{hint}")
    return Result(name, True, f"all {len(cases)} configurations match the model's count (e.g. C=64, m=8, "
                              f"4 layers, 2 classes: {ref.trained_count(64, 8, 4, 2, True):,})")


# ----------------------------------------------------------------------------- forward and backward


def _adapter_cases(g):
    cases = [((2, 4), 6, 3, np.float64)]
    for lead, dt in (((5,), np.float64), ((3, 2), np.float32), ((2, 3), np.float64)):
        while True:
            C, m = int(g.integers(2, 20)), int(g.integers(1, 10))
            if C != m and C not in lead and m not in lead:
                break
        cases.append((lead, C, m, dt))
    return cases


def _adapter_inputs(g, lead, C, m, dt):
    h = g.standard_normal((*lead, C))
    w = (0.5 * g.standard_normal((C, m)), 0.5 * g.standard_normal(m), 0.5 * g.standard_normal((m, C)),
         0.5 * g.standard_normal(C))
    return h.astype(dt), tuple(a.astype(dt) for a in w)


@checker("adapter forward")
def check_adapter_forward(fn):
    name = "adapter forward"
    g = rng()
    passed = []
    cases = _adapter_cases(g)
    for lead, C, m, dt in cases:
        h, w = _adapter_inputs(g, lead, C, m, dt)
        where = f"h {h.shape}, m={m}, {np.dtype(dt).name}"
        h64, w64 = h.astype(np.float64), tuple(a.astype(np.float64) for a in w)
        expected, z = ref.adapter_forward(h64, *w64)

        def hint(key, got):
            W_down, b_down, W_up, b_up = w64
            suspects = [(expected - h64, "the skip connection is missing: the adapter returns h + branch"),
                        (expected - b_up, "b_up is missing"),
                        (h64 + z @ W_up + b_up, "the nonlinearity f (GELU) is missing"),
                        (h64 + np.maximum(z, 0) @ W_up + b_up, "that is ReLU; this package uses GELU"),
                        (h64 + 0.5 * z * (1 + np.vectorize(math.erf)(z / math.sqrt(2))) @ W_up + b_up,
                         "that is the exact (erf) GELU; use the package's tanh form, layers.gelu_forward"),
                        (ref.adapter_forward(h64, W_down, 0 * b_down, W_up, b_up)[0], "b_down is missing")]
            return next((f"; {t}" for value, t in suspects if matches(got, value)), "")

        args, labels = (h, *w), ("h", "W_down", "b_down", "W_up", "b_up")
        copies = [a.copy() for a in args]
        got, failed = attempt(name, fn, *copies, where=where, forbid=package_ops("adapter_forward"))
        if failed is not None:
            return failed
        failed = unchanged(name, args, copies, labels)
        if failed is not None:
            return failed
        pair, failed = unpack(name, got, ("out", "cache"), where)
        if failed is not None:
            return failed
        # the pair's out against the reference
        _, failed = run_case(name, lambda *_: pair[0], args, labels, {"out": expected}, where,
                             (lambda *a: {"out": ref.adapter_forward(*a)[0]}, (h64, *w64)), hint=hint,
                             passed=passed)
        if failed is not None:
            return failed
        passed.append(where)
    return Result(name, True, f"out matches on {len(cases)} fresh cases (2-D and 3-D h, float32 too); "
                              f"threshold {TOL64:.0e} in float64, {TOL32:.0e} in float32")


GRAD_NAMES = ("dh", "dW_down", "db_down", "dW_up", "db_up")


@checker("adapter backward")
def check_adapter_backward(forward, backward):
    name = "adapter backward"
    g = rng()
    passed = []
    cases = _adapter_cases(g)
    for lead, C, m, dt in cases:
        h, w = _adapter_inputs(g, lead, C, m, dt)
        where = f"h {h.shape}, m={m}, {np.dtype(dt).name}"
        pair, failed = attempt(name, forward, h.copy(), *(a.copy() for a in w), where=where)
        if failed is not None:
            return failed
        pair, failed = unpack(name, pair, ("out", "cache"), where)
        if failed is not None:
            return failed
        dout = g.standard_normal(h.shape).astype(dt)
        f64 = (lambda a: a.astype(np.float64))
        inputs = (f64(dout), f64(h), *(f64(a) for a in w))

        def reference(*a):
            return dict(zip(GRAD_NAMES, ref.adapter_backward(*a)))
        expected = reference(*inputs)

        def hint(key, got):
            if key.startswith("db") and np.ndim(got) > 1:
                return ": b was added to every row, so sum dout over all the leading axes"
            if key == "dh" and matches(got + f64(dout), expected["dh"]):
                return "; dh misses the skip connection's dout (forward was out = h + branch)"
            da = f64(dout) @ f64(w[2]).T  # the gradient at GELU's output
            if key == "dW_down" and matches(got, f64(h).reshape(-1, C).T @ da.reshape(-1, m)) or \
                    key == "dh" and matches(got, da @ f64(w[0]).T + f64(dout)):
                return "; the GELU's derivative is missing: dz = da * f'(z)"
            rows = int(np.prod(lead[1:])) if len(lead) > 1 else 0
            if key.startswith("dW") and rows and matches(got, ref.adapter_backward(
                    f64(dout)[:1], f64(h)[:1], *(f64(a) for a in w))[GRAD_NAMES.index(key)]):
                return "; only the first sequence's rows: sum over every row of the batch"
            return ""

        def step(dout_, cache):
            return backward(dout_, cache)
        _, failed = run_case(name, step, (dout, pair[1]), ("dout", "cache"), expected, where,
                             (reference, inputs), forbid=package_ops("adapter_backward"), hint=hint, passed=passed)
        if failed is not None:
            return failed
        passed.append(where)
    return Result(name, True, f"all 5 gradients match on {len(cases)} fresh cases (2-D and 3-D h, float32 "
                              f"too); threshold {TOL64:.0e} in float64, {TOL32:.0e} in float32")


# ----------------------------------------------------------------------------- which parameters train


def _why(name, train_layernorm):
    local = name.rsplit(".", 2)[-2]
    if name.startswith("adapters.other."):
        return "only the adapter set being trained (train_adapter('task')) trains; 'other' stays frozen"
    if name.startswith("adapters.task."):
        if local.startswith("ln"):
            return "train_layernorm=True trains the task's own LayerNorm copies (adapters.task.*.ln*)"
        return "the task's adapters and its head always train"
    if local.startswith("ln"):
        return ("the base's LayerNorms stay frozen in both settings: the paper's setting trains "
                "the task's own copies (adapters.task.<...>.ln1, ...) in their place")
    return "the base is frozen: its weights, its classifier cls_head and its lm_head get no gradient"


@checker("which parameters train")
def check_is_trained(fn):
    label = "which parameters train"
    g = rng()
    L = int(g.integers(2, 4))
    counted = {}
    for ln in (False, True):
        model = Transformer(replace(CHECK_CONFIG, n_layers=L), seed=0)
        model.add_adapter("task", AdapterConfig(bottleneck=2, train_layernorm=ln), n_classes=2)
        model.add_adapter("other", AdapterConfig(bottleneck=2, train_layernorm=not ln), n_classes=3)
        model.train_adapter("task")
        names = list(model.named_parameters().items())
        g.shuffle(names)
        for pname, p in names:
            got, failed = attempt(label, fn, pname, ln, where=f"{pname!r}, train_layernorm={ln}")
            if failed is not None:
                return failed
            if not isinstance(got, (bool, np.bool_)):
                return fail(label, f"expected True or False, got {describe(got)} for {pname!r}")
            if bool(got) != p.trainable:
                said = "trains" if got else "is frozen"
                return fail(label, f"train_layernorm={ln}: you said {pname} {said}, but it "
                                   f"{'trains' if p.trainable else 'is frozen'}: {_why(pname, ln)}")
        counted[ln] = len(names)
    return Result(label, True, "right for every parameter name of a fresh model, with train_layernorm False and True")


# ----------------------------------------------------------------------------- the size of a fresh adapter

INIT_TOLERANCE = 0.005  # 0.5 %: the 0.774 the text gives and the exact 0.77374 differ by 0.03 %,
# while m + 1 for m, or C + 1 for C, moves the ratio by >= 1 % at the sizes drawn (C <= 40, m <= 16)


@checker("size of a fresh adapter's branch")
def check_init_law(fn):
    name = "size of a fresh adapter's branch"
    g = rng()
    cases = [(1e-3, 32, 8)]
    while len(cases) < 4:
        C, m = int(g.integers(4, 41)), int(g.integers(1, 17))
        if C != m:
            cases.append((float(10 ** g.uniform(-4, -2)), C, m))
    for std, C, m in cases:
        where = f"std={std:.3g}, C={C}, m={m}"
        got, failed = attempt(name, fn, std, C, m, where=where)
        if failed is not None:
            return failed
        if isinstance(got, np.ndarray) and got.shape == () and got.dtype.kind == "f":
            got = got[()]
        if not is_number(got):
            return fail(name, f"expected a number, got {describe(got)} on {where}")
        expected = ref.branch_ratio(std, C, m)
        off = got / expected
        if abs(off - 1) <= INIT_TOLERANCE:
            continue
        v = ref.TRUNCATION
        wrong = [(1 / v, "too large by 1/0.774: the cut at +-2 std shrinks each matrix's variance to 0.774 std^2"),
                 (v, "the truncation counted twice per matrix: the variance is 0.774 std^2, the std sqrt(0.774) std"),
                 (2.0, "twice too large: GELU's slope at 0 is 1/2"),
                 (0.5, "twice too small: GELU(z) ~ z / 2 halves the branch once, not twice"),
                 (math.sqrt((m + 1) / m), "m + 1 where m belongs: u sums m terms"),
                 (math.sqrt((C + 1) / C), "C + 1 where C belongs: z sums C terms"),
                 (math.sqrt(m), "the sum over C gives sqrt(C); the sum over m gives sqrt(m): both, sqrt(C m)"),
                 (math.sqrt(C), "the sum over C gives sqrt(C); the sum over m gives sqrt(m): both, sqrt(C m)"),
                 (1 / math.sqrt(m), "both sums count: sqrt(C m), not sqrt(C)"),
                 (1 / math.sqrt(C), "both sums count: sqrt(C m), not sqrt(m)"),
                 (1 / std, "each matrix contributes its std once: the branch scales like std^2, not std")]
        hint = next((t for factor, t in wrong if abs(off / factor - 1) <= INIT_TOLERANCE), None)
        if hint is None:
            hint = ("off by orders of magnitude: the branch is a product of two small matrices, so it scales like std^2"
                    if off > 10 or off < 0.1 else "count the C terms of z and the m terms of u")
        shown, wanted = apart(got, expected, 5)
        return fail(name, f"{where}: you predicted {shown}, expected {wanted} (ratio {off:.4f}; "
                          f"tolerance {INIT_TOLERANCE:.1%}): {hint}")
    return Result(name, True, f"within {INIT_TOLERANCE:.1%} of sqrt(C m) 0.774 std^2 / 2 on {len(cases)} "
                              f"fresh settings")
