"""Checkers for notebooks/03_transformer.ipynb.

    check_parameter_count(fn)      fn(config) -> the number of parameters of Transformer(config)
    check_pre_ln_backward(fn)      fn(dy, cache) -> dx for y = x + Attn(LN(x))
    check_gradient_receivers(fn)   fn() -> the names that receive a gradient in RECEIVERS_SETUP
    check_weight_products(fn)      fn() -> the weight-gradient products in WEIGHT_PRODUCTS_SETUP

Each returns a Result (one line: PASS / FAIL / not implemented yet). The backward is checked
against centred finite differences in float64 with the package's OP_THRESHOLD = 1e-7; the
counts against the package's own model (Transformer.num_parameters, a real backward).
"""
import numpy as np

from ..attention import attention_backward, attention_bias, attention_forward
from ..gradcheck import OP_THRESHOLD, numerical_gradient, random_functional, rel_error
from ..layers import layernorm_forward
from ..model import ModelConfig, Transformer
from . import Result, attempt, check_number

REPORT_BELOW = 1e-9  # a passing error below this is reported as a bound: the same on every CPU


# ----------------------------------------------------------------------------- parameter count


def _count_configs():
    """The configurations a parameter count is checked on: post- and pre-LN, with and without
    a classification head, odd widths."""
    return [  # the first one has no two parts of the same size, so a wrong count names its part
        ModelConfig(vocab_size=50, max_len=20, d_model=48, n_heads=3, n_layers=3, d_ff=100,
                    norm="pre", causal=True, n_classes=5),
        # the shipped base's shape
        ModelConfig(vocab_size=99, max_len=32, d_model=64, n_heads=4, n_layers=4, d_ff=256),
        ModelConfig(vocab_size=7, max_len=9, d_model=6, n_heads=2, n_layers=1, d_ff=10, n_classes=2),
        ModelConfig(),  # the defaults: post-LN, 2 blocks, no classifier
    ]


def _describe(cfg):
    return (f"V={cfg.vocab_size}, T_max={cfg.max_len}, C={cfg.d_model}, L={cfg.n_layers}, "
            f"F={cfg.d_ff}, K={cfg.n_classes}, {cfg.norm}-LN")


def _count_hint(diff, cfg):
    """What a count off by `diff` (expected - got) most likely forgot."""
    V, T, C, L, F, K = cfg.vocab_size, cfg.max_len, cfg.d_model, cfg.n_layers, cfg.d_ff, cfg.n_classes
    hints = [
        (2 * C, "one LayerNorm (2C): post-LN has ln_emb after the embeddings, pre-LN has ln_f "
                "after the last block"),
        (T * C, "the position embedding W_pos (T_max, C)"),
        (V * C, "one (V, C) matrix: the LM head has its own W (C, V), it is not tied to W_tok"),
        (V, "the LM head's bias (V)"),
        (V * C + V, "the LM head, W (C, V) and b (V)"),
        (L * 4 * C, "4C per block: the attention's four biases, or the block's two LayerNorms (2C each)"),
        (L * 8 * C, "8C per block: the attention's four biases and the block's two LayerNorms"),
        (L * (F + C), "the feed-forward biases b_1 (F) and b_2 (C) of every block"),
        (L * (C * C + C), "one attention projection per block (C^2 + C): W_q, W_k, W_v and W_o"),
        (L * C * C, "one (C, C) matrix per block"),
    ]
    if K:
        hints.append((C * K + K, "the classification head, W (C, K) and b (K)"))
    forgot = [text for size, text in hints if size == diff]
    if forgot:
        return f": did you forget {' or '.join(forgot)}?"
    twice = [text for size, text in hints if size == -diff]
    if twice:
        return f": you counted {' or '.join(twice)} once too often"
    return ""


def check_parameter_count(fn):
    """fn(config) -> the number of parameters of Transformer(config), by formula; compared with
    model.num_parameters() on four configurations."""
    name = "parameter count"
    for cfg in _count_configs():
        got, failed = attempt(name, fn, cfg)
        if failed is not None:  # a Result: not written yet, or it raised
            return failed
        if isinstance(got, bool) or not isinstance(got, (int, np.integer)):
            return Result(name, False, f"expected an integer, got {type(got).__name__} {got!r}")
        expected = Transformer(cfg).num_parameters()
        if got != expected:
            return Result(name, False, f"{_describe(cfg)}: expected {expected:,}, got {got:,} "
                          f"(off by {got - expected:+,}){_count_hint(expected - got, cfg)}")
    return Result(name, True, f"matches model.num_parameters() on {len(_count_configs())} configurations "
                              f"(post- and pre-LN, with and without a classifier)")


# ----------------------------------------------------------------------------- pre-LN residual backward


def pre_ln_attention_forward(x, gamma, beta, w, n_heads, bias=None):
    """The pre-LN (GPT-2) attention sub-layer: y = x + Attn(LN(x)).

    x (B, T, C) -> y (B, T, C), cache = (the LayerNorm's cache, the attention's cache).
    """
    a_in, cache_ln = layernorm_forward(x, gamma, beta)  # (B, T, C)
    a, cache_attn = attention_forward(a_in, w, n_heads, bias)  # (B, T, C)
    return x + a, (cache_ln, cache_attn)  # the residual: x goes around the sub-layer


def _sublayer_problem(seed=0, B=2, T=4, C=6, H=2):
    """x, gamma, beta, w (float64, a generic point), a causal + padding bias, R (the loss is
    L = sum(y * R), so dy = R)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, T, C))
    gamma, beta = 1 + 0.3 * rng.standard_normal(C), 0.3 * rng.standard_normal(C)
    w = {f"{k}_{n}": rng.standard_normal((C, C)) * 0.5 if k == "W" else rng.standard_normal(C) * 0.5
         for n in "qkvo" for k in "Wb"}
    pad = np.ones((B, T), bool)
    pad[1, 3:] = False
    bias = attention_bias(T, True, pad, np.float64)
    return x, gamma, beta, w, H, bias, random_functional((B, T, C), seed + 1)


def check_pre_ln_backward(fn):
    """fn(dy, cache) -> dx for y = x + Attn(LN(x)) (pre_ln_attention_forward's cache), checked
    against finite differences of L = sum(y * dy)."""
    name = "pre-LN residual backward"
    x, gamma, beta, w, H, bias, R = _sublayer_problem()
    y, cache = pre_ln_attention_forward(x, gamma, beta, w, H, bias)
    got, failed = attempt(name, fn, R.copy(), cache)
    if failed is not None:  # a Result: not written yet, or it raised
        return failed
    try:
        got = np.asarray(got, dtype=np.float64)
    except (TypeError, ValueError):
        return Result(name, False, f"expected the array dx, got {type(got).__name__}")
    if got.shape != x.shape:
        return Result(name, False, f"expected dx of shape {x.shape}, got {got.shape}")
    if not np.all(np.isfinite(got)):
        return Result(name, False, "dx holds NaN or inf")

    def L():
        return float(np.sum(pre_ln_attention_forward(x, gamma, beta, w, H, bias)[0] * R))

    numerical = numerical_gradient(L, x)
    err = rel_error(got, numerical)
    if err <= OP_THRESHOLD:
        bound = f"below {REPORT_BELOW:.0e}" if err < REPORT_BELOW else f"{err:.1e}"
        return Result(name, True, f"dx matches finite differences; max relative error {bound} "
                                  f"(threshold {OP_THRESHOLD:.0e})")
    line = f"dx relative error {err:.1e} > {OP_THRESHOLD:.0e}"
    if rel_error(got + R, numerical) <= OP_THRESHOLD:
        return Result(name, False, f"{line}: your dx misses the residual path. Forward was "
                      f"y = x + Attn(LN(x)): x reaches y twice, so dx = dy + (the branch's gradient)")
    if rel_error(got, R) <= OP_THRESHOLD:
        return Result(name, False, f"{line}: your dx is only the residual path dy; the branch "
                      f"Attn(LN(x)) depends on x too, and its gradient adds")
    cache_ln, cache_attn = cache
    da, _ = attention_backward(R, cache_attn)
    if rel_error(got, R + da) <= OP_THRESHOLD:
        return Result(name, False, f"{line}: the branch's gradient must also go back through LN, "
                      f"the branch's first step")
    return Result(name, False, f"{line}: go back through the forward in reverse: the "
                  f"attention's backward, then LN's, then add the residual path")


# ----------------------------------------------------------------------------- who receives a gradient


RECEIVERS_SETUP = """\
model = Transformer(ModelConfig(vocab_size=11, max_len=8, d_model=8, n_heads=2, n_layers=2,
                                d_ff=16, norm="post", n_classes=3, dtype="float64"), seed=0)
model.freeze()                                   # everything frozen, then:
model.unfreeze("lm_head.*", "cls_head.*", "blocks.0.ln1.*", "blocks.1.attn.b_k")
model.loss(ids, labels, pad_mask, head="cls", backward=True)   # one classification step"""


def _receivers_model():
    """The model and batch of RECEIVERS_SETUP, after its one backward."""
    model = Transformer(ModelConfig(vocab_size=11, max_len=8, d_model=8, n_heads=2, n_layers=2,
                                    d_ff=16, norm="post", n_classes=3, dtype="float64"), seed=0)
    model.freeze()
    model.unfreeze("lm_head.*", "cls_head.*", "blocks.0.ln1.*", "blocks.1.attn.b_k")
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 11, (3, 6))
    pad_mask = np.ones((3, 6), bool)
    pad_mask[1, 4:] = False
    model.loss(ids, np.array([0, 2, 1]), pad_mask, head="cls", backward=True)
    return model


def check_gradient_receivers(fn):
    """fn() -> the names of the parameters whose .grad is not None after RECEIVERS_SETUP."""
    name = "who receives a gradient"
    got, failed = attempt(name, fn)
    if failed is not None:  # a Result: not written yet, or it raised
        return failed
    try:
        names = set(got)
    except TypeError:
        names = None
    if isinstance(got, str) or names is None or not all(isinstance(n, str) for n in names):
        return Result(name, False, f"expected a set of parameter names like {{'cls_head.W'}}, got {got!r}")
    got = names
    model = _receivers_model()
    params = model.named_parameters()
    unknown = sorted(got - set(params))
    if unknown:
        return Result(name, False, f"no parameter is called {unknown[0]!r} "
                      f"(names look like 'blocks.0.ln1.gamma')")
    expected = {n for n, p in params.items() if p.grad is not None}
    if got == expected:
        return Result(name, True, f"{len(expected)} parameters: {', '.join(sorted(expected))}")
    reasons = []
    for n in sorted(got - expected):
        if not params[n].trainable:
            why = "it is frozen"
        elif n.startswith("lm_head."):
            why = "trainable, but head='cls' never uses the LM head"
        else:
            why = "trainable, yet its gradient is not written"
        reasons.append(f"{n} gets none ({why})")
    for n in sorted(expected - got):
        if n.endswith(".b_k"):
            why = "trainable and used, so the backward computes it; every entry is ~1e-16, not None"
        elif n.startswith("blocks.0."):
            why = "trainable and used; its gradient reaches it through the frozen layers above"
        else:
            why = "trainable and used by head='cls'"
        reasons.append(f"{n} does get one ({why})")
    return Result(name, False, "; ".join(reasons))


# ----------------------------------------------------------------------------- weight-gradient products


WEIGHT_PRODUCTS_SETUP = """\
model = Transformer(ModelConfig(n_layers=4))     # post-LN, 4 blocks, no classifier
model.freeze()
model.unfreeze("blocks.2.*", "blocks.3.*", "lm_head.*")
model.loss(ids, targets, pad_mask, head="lm", backward=True)"""


def weight_products(model, head="lm"):
    """The weight-gradient matrix products a backward computes: one x^T @ dout for every
    trainable (d_in, d_out) weight the forward uses. Embeddings are row look-ups, and their
    gradient a scatter-add, not a product; biases and LayerNorms are sums."""
    return sum(1 for n, p in model.active_parameters(head).items()
               if p.trainable and p.value.ndim == 2 and not n.startswith("embed."))


def check_weight_products(answer):
    """answer: how many weight-gradient products (x^T @ dout) the backward of
    WEIGHT_PRODUCTS_SETUP computes, a number or a function returning it."""
    n = answer
    if callable(answer):
        n, failed = attempt("weight-gradient products", answer)
        if failed is not None:  # a Result: not written yet, or it raised
            return failed
    model = Transformer(ModelConfig(n_layers=4))
    model.freeze()
    model.unfreeze("blocks.2.*", "blocks.3.*", "lm_head.*")
    result = check_number("weight-gradient products", n, weight_products(model))
    if result.passed is False and isinstance(n, (int, np.integer)) and not isinstance(n, bool):
        if n == 12:
            result.message += ": the LM head's W trains too"
        elif n == 15:
            result.message += (": the token and position embeddings are frozen, and their gradient "
                               "is no product anyway")
        elif n in (6, 7):
            result.message += ": two blocks train, 6 matrices each (W_q, W_k, W_v, W_o, W_1, W_2)"
        elif n in (8, 9, 17):
            result.message += ": an attention has four weight matrices W_q, W_k, W_v, W_o, an FFN two"
        elif n > 13:
            result.message += ": frozen matrices skip their product x^T @ dout"
    return result
