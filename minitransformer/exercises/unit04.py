"""Checkers for notebooks/04_adapters.ipynb: the adapter's parameter count, its forward and
backward, which parameters train, and the size of a fresh adapter's branch.

    from minitransformer.exercises import unit04 as ex
    ex.check_trained_parameters(trained_parameters)
    ex.check_adapter_forward(adapter_forward)
    ex.check_adapter_backward(adapter_forward, adapter_backward)
    ex.check_is_trained(is_trained)
    ex.check_init_law(branch_ratio)

A PASS line names the threshold that was met, not the measured error itself: the last digits
of a float64 error differ from one CPU to the next, and the notebooks' outputs are compared.
A FAIL line gives the measured numbers and, where the mistake is a common one, names it.
"""
import numpy as np

from . import Result, attempt, check_number, compare, is_number
from ..adapters import AdapterConfig, adapter_forward, init_adapter
from ..gradcheck import OP_THRESHOLD, numerical_gradient, random_functional, rel_error
from ..model import ModelConfig, Transformer

TRUNCATION = 0.7737  # variance of a standard normal cut at +-2 std (what truncated_normal draws)


def _passed(name, message):
    return Result(name, True, message)


def _tiny_model(C, n_layers, n_classes=0, seed=0):
    """A small post-LN model of width C (float64; its weights do not matter for counting)."""
    return Transformer(ModelConfig(vocab_size=11, max_len=8, d_model=C, n_heads=2, n_layers=n_layers,
                                   d_ff=2 * C, n_classes=n_classes, dtype="float64"), seed=seed)


# ----------------------------------------------------------------------------- parameter count

COUNT_CASES = ((64, 8, 4, 2, True), (64, 8, 4, 2, False), (16, 3, 2, 3, True), (32, 4, 1, 4, False),
               (48, 12, 3, 2, True))


def trained_count(C, m, n_layers, n_classes, train_layernorm):
    """The count the model reports: add a Houlsby adapter to a post-LN model and train it."""
    model = _tiny_model(C, n_layers)
    model.add_adapter("task", AdapterConfig(bottleneck=m, train_layernorm=train_layernorm), n_classes)
    model.train_adapter("task")
    return model.num_parameters(trainable_only=True)


def _count_hint(diff, C, m, L, K, train_layernorm):
    """What a difference (model's count - student's count) usually means, or None."""
    per_adapter = 2 * m * C + m + C
    n_norms = 2 * L + 1  # post-LN: ln1 and ln2 in every block, and ln_emb after the embeddings
    if diff == 2 * L * (m + C):
        return "the adapters' biases b_down (m) and b_up (C) are missing"
    if diff == L * per_adapter:
        return "there are two adapters per block (attention and feed-forward), not one"
    if train_layernorm and diff == n_norms * 2 * C:
        return ("the task's LayerNorm copies are missing: a post-LN model has 2 per block plus one "
                "after the embeddings, each a gamma and a beta of size C")
    if train_layernorm and diff == 2 * C:
        return "one LayerNorm is missing: post-LN also normalises the embeddings (ln_emb)"
    if not train_layernorm and diff == -n_norms * 2 * C:
        return "with train_layernorm=False no LayerNorm trains"
    if diff == C * K + K:
        return "the task head (C x K weights and K biases) is missing"
    return None


def check_trained_parameters(fn):
    """fn(C, m, n_layers, n_classes, train_layernorm) -> trained parameters of a post-LN model
    with Houlsby adapters (two per block), compared with the model's own count."""
    name = "trained parameters"
    for C, m, L, K, ln in COUNT_CASES:
        got, failed = attempt(name, fn, C, m, L, K, ln)
        if failed is not None:
            return failed
        expected = trained_count(C, m, L, K, ln)
        where = f"C={C}, m={m}, {L} layers, {K} classes, train_layernorm={ln}"
        result = check_number(name, got, expected)
        if not result.passed:
            hint = _count_hint(expected - got, C, m, L, K, ln) if isinstance(got, (int, np.integer)) else None
            return Result(name, False, f"{where}: {result.message}" + (f" ({hint})" if hint else ""))
    C, m, L, K, ln = COUNT_CASES[0]
    return _passed(name, f"all {len(COUNT_CASES)} configurations match the model's count "
                         f"(e.g. C={C}, m={m}, {L} layers, {K} classes: {trained_count(C, m, L, K, ln):,})")


# ----------------------------------------------------------------------------- forward and backward


def _adapter_case(seed, C=6, m=3):
    """Float64 inputs at a generic point: h (2, 4, C) and weights of order 0.5 with nonzero biases."""
    rng = np.random.default_rng(seed)
    h = rng.standard_normal((2, 4, C))
    w = {"W_down": 0.5 * rng.standard_normal((C, m)), "b_down": 0.5 * rng.standard_normal(m),
         "W_up": 0.5 * rng.standard_normal((m, C)), "b_up": 0.5 * rng.standard_normal(C)}
    return h, w


def _unpack_forward(name, fn, h, w):
    """Call the student's forward -> (out, None) or (None, Result)."""
    got, failed = attempt(name, fn, h.copy(), *(w[k].copy() for k in ("W_down", "b_down", "W_up", "b_up")))
    if failed is not None:
        return None, failed
    if not (isinstance(got, tuple) and len(got) == 2):
        return None, Result(name, False, f"expected a pair (out, cache), got {type(got).__name__}")
    return got, None


def check_adapter_forward(fn):
    """fn(h, W_down, b_down, W_up, b_up) -> (out, cache), compared with adapters.adapter_forward
    (GELU) on three random float64 cases."""
    name = "adapter forward"
    for seed, (C, m) in enumerate(((6, 3), (8, 2), (5, 4))):
        h, w = _adapter_case(seed, C, m)
        got, failed = _unpack_forward(name, fn, h, w)
        if failed is not None:
            return failed
        out = got[0]
        expected, _ = adapter_forward(h, w)
        result = compare(name, out, expected, OP_THRESHOLD)
        if result.passed:
            continue
        if np.shape(out) == expected.shape and np.all(np.isfinite(out)):
            z = h @ w["W_down"] + w["b_down"]
            suspects = [(expected - h, "the skip connection is missing: the adapter returns h + branch, "
                                       "you returned the branch alone"),
                        (expected - w["b_up"], "b_up is missing"),
                        (h + z @ w["W_up"] + w["b_up"], "the nonlinearity f (GELU) is missing"),
                        (h + np.maximum(z, 0) @ w["W_up"] + w["b_up"], "that is ReLU; the authors' "
                                                                       "code (and this package) use GELU")]
            for value, hint in suspects:
                if rel_error(out, value) <= OP_THRESHOLD:
                    return Result(name, False, f"{result.message}: {hint}")
        return result
    return _passed(name, f"matches adapters.adapter_forward on 3 random cases "
                         f"(max relative error below {OP_THRESHOLD:.0e})")


GRAD_NAMES = ("dh", "dW_down", "db_down", "dW_up", "db_up")


def check_adapter_backward(forward, backward):
    """forward as in check_adapter_forward; backward(dout, cache) -> (dh, dW_down, db_down,
    dW_up, db_up). Each gradient is compared with centred finite differences of the adapter
    h + W_up f(W_down h + b_down) + b_up (adapters.adapter_forward, float64)."""
    name = "adapter backward"
    h, w = _adapter_case(7)
    got, failed = _unpack_forward(name, forward, h, w)
    if failed is not None:
        return failed
    R = random_functional((2, 4, 6), seed=3)  # L = sum(out * R), so dout = R
    grads, failed = attempt(name, backward, R.copy(), got[1])
    if failed is not None:
        return failed
    if not (isinstance(grads, tuple) and len(grads) == 5):
        return Result(name, False, f"expected 5 arrays (dh, dW_down, db_down, dW_up, db_up), got "
                                   f"{type(grads).__name__}" + (f" of {len(grads)}" if isinstance(grads, tuple) else ""))
    inputs = {"h": h, **w}

    def L():
        return float(np.sum(adapter_forward(inputs["h"], {k: inputs[k] for k in w})[0] * R))

    for gname, key, g in zip(GRAD_NAMES, ("h", "W_down", "b_down", "W_up", "b_up"), grads):
        numerical = numerical_gradient(L, inputs[key])
        result = compare(f"{name} ({gname})", g, numerical, OP_THRESHOLD, "relative error vs finite differences")
        if result.passed:
            continue
        if key.startswith("b") and np.ndim(g) > 1:
            return Result(result.name, False, f"{result.message}: b was added to every row, so sum "
                                              "dout over all the leading axes (B and T)")
        if key == "h" and np.shape(g) == h.shape and rel_error(np.asarray(g) + R, numerical) <= OP_THRESHOLD:
            return Result(result.name, False, f"{result.message}: dh misses the skip connection's "
                                              "dout (forward was out = h + branch, so dh = dz W_down^T + dout)")
        return result
    return _passed(name, f"all 5 gradients match centred finite differences "
                         f"(max relative error below {OP_THRESHOLD:.0e})")


# ----------------------------------------------------------------------------- which parameters train


def _why(name, train_layernorm):
    """One sentence on whether `name` trains under train_adapter('task')."""
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


def check_is_trained(fn):
    """fn(name, train_layernorm) -> bool: does parameter `name` train after
    model.train_adapter("task"), in a post-LN model holding two adapter sets, "task" (with the
    given train_layernorm) and "other"?"""
    label = "which parameters train"
    counted = {}
    for ln in (False, True):
        model = _tiny_model(8, 2, n_classes=3)
        model.add_adapter("task", AdapterConfig(bottleneck=2, train_layernorm=ln), n_classes=2)
        model.add_adapter("other", AdapterConfig(bottleneck=2), n_classes=3)
        model.train_adapter("task")
        for pname, p in model.named_parameters().items():
            got, failed = attempt(label, fn, pname, ln)
            if failed is not None:
                return failed
            if not isinstance(got, (bool, np.bool_)):
                return Result(label, False, f"expected True or False, got {type(got).__name__} for {pname!r}")
            if bool(got) != p.trainable:
                said = "trains" if got else "is frozen"
                return Result(label, False, f"train_layernorm={ln}: you said {pname} {said}, but it "
                                            f"{'trains' if p.trainable else 'is frozen'}: {_why(pname, ln)}")
        counted[ln] = sum(p.trainable for p in model.named_parameters().values())
    return _passed(label, f"right for every parameter name: {counted[False]} arrays train with "
                          f"train_layernorm=False, {counted[True]} with True")


# ----------------------------------------------------------------------------- the size of a fresh adapter

INIT_CASES = ((1e-3, 64, 8), (1e-4, 32, 8), (3e-4, 128, 16))


def measured_ratio(std, C, m, seeds=16, rows=128):
    """|branch| / |h| of fresh adapters (init std `std`, bias 0, GELU) on unit-variance h (rows, C),
    averaged over a few seeds: how far a new adapter moves its input."""
    ratios = []
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        w = init_adapter(AdapterConfig(bottleneck=m, init_std=std), C, rng, np.float64)
        h = rng.standard_normal((rows, C))
        branch = adapter_forward(h, w, skip=False)[0]
        ratios.append(np.linalg.norm(branch) / np.linalg.norm(h))
    return float(np.mean(ratios))


def check_init_law(fn, tolerance=0.1):
    """fn(std, C, m) -> the predicted ratio |branch| / |h| of a fresh adapter, compared with
    measured_ratio within `tolerance` (relative) for three settings."""
    name = "size of a fresh adapter's branch"
    for std, C, m in INIT_CASES:
        got, failed = attempt(name, fn, std, C, m)
        if failed is not None:
            return failed
        if not is_number(got):
            return Result(name, False, f"expected a number, got {type(got).__name__}")
        measured = measured_ratio(std, C, m)
        off = got / measured
        if abs(off - 1) <= tolerance:
            continue
        where = f"std={std:g}, C={C}, m={m}: you predicted {got:.3g}, measured {measured:.3g}"
        if abs(off * TRUNCATION - 1) <= tolerance:
            hint = ("too large by 1/0.774: the truncation at +-2 std shrinks each matrix's variance "
                    "to 0.774 std^2")
        elif abs(off - 2) <= 2 * tolerance:
            hint = "twice too large: GELU's slope at 0 is 1/2"
        elif off > 10 or off < 0.1:
            hint = "off by orders of magnitude: the branch is a product of two small matrices, so it scales like std^2"
        else:
            hint = "within a factor of a few: count the m terms of z and the C outputs of u"
        return Result(name, False, f"{where} ({hint})")
    return _passed(name, f"within {tolerance:.0%} of the measured ratio in all {len(INIT_CASES)} settings")
