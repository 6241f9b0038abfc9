"""The checks of notebook 03 (unit03.py is what the notebook sees)."""
import numpy as np

from .. import sizes
from ..attention import attention_bias
from ..gradcheck import CHECK_CONFIG
from ..model import ModelConfig, Transformer
from . import TOL32, TOL64, Result, attempt, checker, describe, exact, fail, is_integer, rng
from . import _reference as ref
from ._grads import matches, run_case

# ----------------------------------------------------------------------------- parameter count


def _count_hints(cfg):
    n_vocab, T_max, C, n_layers, F, n_cls = (cfg.vocab_size, cfg.max_len, cfg.d_model, cfg.n_layers, cfg.d_ff,
                                             cfg.n_classes)
    hints = [(2 * C, "one LayerNorm (2C): post-LN has ln_emb after the embeddings, pre-LN has ln_f "
                     "after the last block"),
             (T_max * C, "the position embedding W_pos (T_max, C)"),
             (n_vocab * C, "one (n_vocab, C) matrix: the LM head has its own W (C, n_vocab), it is not tied to W_tok"),
             (n_vocab, "the LM head's bias (n_vocab)"),
             (n_vocab * C + n_vocab, "the LM head, W (C, n_vocab) and b (n_vocab)"),
             (n_layers * 4 * C, "4C per block: the attention's four biases, or the block's two LayerNorms (2C each)"),
             (n_layers * 8 * C, "8C per block: the attention's four biases and the block's two LayerNorms"),
             (n_layers * (F + C), "the feed-forward biases b_1 (F) and b_2 (C) of every block"),
             (n_layers * (C * C + C), "one attention projection per block (C^2 + C): W_q, W_k, W_v and W_o"),
             (n_layers * C * C, "one (C, C) matrix per block")]
    hints.append((C * n_cls + n_cls, "the classification head, W (C, n_cls) and b (n_cls)") if n_cls else
                 (-(C * 2 + 2), "a classification head: n_classes=0 means none"))
    return hints


def _count_configs(g):
    """The first: no two parts of the same size; the others fresh, post- and pre-LN, with and
    without a classifier, kept only when no two hint sizes coincide (a FAIL names one part)."""
    cfgs = [ModelConfig(vocab_size=50, max_len=20, d_model=48, n_heads=3, n_layers=3, d_ff=100,
                        norm="pre", causal=True, n_classes=5)]
    for norm, K in (("post", 0), ("pre", 0), ("post", 3)):
        while True:
            H = int(g.integers(1, 4))
            cfg = ModelConfig(vocab_size=int(g.integers(5, 200)), max_len=int(g.integers(3, 60)),
                              d_model=H * int(g.integers(2, 20)), n_heads=H, n_layers=int(g.integers(1, 5)),
                              d_ff=int(g.integers(3, 150)), norm=norm, n_classes=K or int(g.choice([0, 2, 7])))
            values = [abs(v) for v, _ in _count_hints(cfg)]
            if len(set(values)) == len(values):
                cfgs.append(cfg)
                break
    return cfgs


def _describe(cfg):
    return (f"n_vocab={cfg.vocab_size}, T_max={cfg.max_len}, C={cfg.d_model}, n_layers={cfg.n_layers}, "
            f"F={cfg.d_ff}, n_cls={cfg.n_classes}, {cfg.norm}-LN")


@checker("parameter count")
def check_parameter_count(fn):
    name = "parameter count"
    cfgs = _count_configs(rng())
    for cfg in cfgs:
        where = _describe(cfg)
        got, failed = attempt(name, fn, cfg, where=where,
                              forbid=(Transformer.num_parameters, sizes.parameter_count))
        if failed is not None:
            return failed
        if not is_integer(got):
            return fail(name, f"expected an integer, got {describe(got)} on {where}")
        expected = ref.parameter_count(cfg.vocab_size, cfg.max_len, cfg.d_model, cfg.n_layers, cfg.d_ff,
                                       cfg.n_classes)
        if got != expected:
            diff = expected - int(got)
            forgot = [t for size, t in _count_hints(cfg) if size == diff and size > 0]
            twice = [t for size, t in _count_hints(cfg) if size == -diff and size > 0]
            extra = [t for size, t in _count_hints(cfg) if size == diff and size < 0]
            hint = (f": did you forget {forgot[0]}?" if forgot else f": you counted {twice[0]} once too often"
                    if twice else f": {extra[0]}" if extra else "")
            return fail(name, f"{where}: expected {exact(expected)}, got {exact(got)} (off by {-diff:+,}){hint}")
    return Result(name, True, f"matches model.num_parameters() on {len(cfgs)} configurations (post- and "
                              f"pre-LN, with and without a classifier)")


# ----------------------------------------------------------------------------- pre-LN residual backward


def _sublayer_problem(g, B, T, C, H, dt):
    x = g.standard_normal((B, T, C))
    gamma, beta = 1 + 0.3 * g.standard_normal(C), 0.3 * g.standard_normal(C)
    w = {f"{k}_{n}": g.standard_normal((C, C)) * 0.5 if k == "W" else g.standard_normal(C) * 0.5
         for n in "qkvo" for k in "Wb"}
    pad = np.ones((B, T), bool)
    pad[-1, T - 1:] = False
    bias = attention_bias(T, True, pad, np.float64)
    cast = (lambda a: a.astype(dt))
    return cast(x), cast(gamma), cast(beta), {k: cast(v) for k, v in w.items()}, bias.astype(dt), \
        cast(g.standard_normal((B, T, C)))


@checker("pre-LN residual backward")
def check_pre_ln_backward(fn):
    name = "pre-LN residual backward"
    g = rng()
    cases = [(2, 4, 6, 2, np.float64)]
    for dt in (np.float64, np.float32):
        while True:
            H = int(g.integers(1, 4))
            B, T, C = int(g.integers(1, 4)), int(g.integers(2, 8)), H * int(g.integers(2, 6))
            if len({B, T, C}) == 3 and (B, T, C) != (2, 4, 6):
                break
        cases.append((B, T, C, H, dt))
    passed = []
    for B, T, C, H, dt in cases:
        x, gamma, beta, w, bias, dy = _sublayer_problem(g, B, T, C, H, dt)
        _, cache = ref.pre_ln_attention_forward(x, gamma, beta, w, H, bias)
        where = f"B={B}, T={T}, C={C}, H={H}, {np.dtype(dt).name}"
        f64 = (lambda a: a.astype(np.float64))
        inputs = (f64(dy), f64(x), f64(gamma), f64(beta), {k: f64(v) for k, v in w.items()}, H, f64(bias))
        dx, da_in, dln_only = ref.pre_ln_pieces(*inputs)

        def hint(key, got):
            d64 = f64(dy)
            if matches(got, dx - d64):
                return (": your dx misses the residual path. Forward was y = x + Attn(LN(x)): x reaches y "
                        "twice, so dx = dy + (the branch's gradient)")
            if matches(got, d64):
                return (": your dx is only the residual path dy; the branch Attn(LN(x)) depends on x too, "
                        "and its gradient adds")
            if matches(got, d64 + da_in):
                return ": the branch's gradient must also go back through LN, the branch's first step"
            if matches(got, d64 + dln_only):
                return ": the branch's gradient goes back through the attention first, then LN"
            if matches(got, 2 * d64 + (dx - d64)):
                return ": the residual path dy is added twice"
            return ": go back through the forward in reverse: the attention's backward, then LN's, then add dy"
        _, failed = run_case(name, lambda d, c: fn(d, c), (dy, cache), ("dy", "cache"), {"dx": dx}, where,
                             (lambda *a: {"dx": ref.pre_ln_pieces(*a)[0]}, inputs), hint=hint, passed=passed)
        if failed is not None:
            return failed
        passed.append(where)
    return Result(name, True, f"dx matches on {len(cases)} fresh sub-layers (causal mask and padding, "
                              f"float32 too); threshold {TOL64:.0e} in float64, {TOL32:.0e} in float32")


# ----------------------------------------------------------------------------- who receives a gradient


RECEIVERS_SETUP = """\
model = Transformer(gradcheck.CHECK_CONFIG, seed=0)  # 2 post-LN blocks of width 8, 3 classes, float64
model.freeze()                                   # everything frozen, then:
model.unfreeze("lm_head.*", "cls_head.*", "blocks.0.ln1.*", "blocks.1.attn.b_k")
model.loss(ids, labels, pad_mask, head="cls", backward=True)   # one classification step"""


def _receivers_model():
    model = Transformer(CHECK_CONFIG, seed=0)
    model.freeze()
    model.unfreeze("lm_head.*", "cls_head.*", "blocks.0.ln1.*", "blocks.1.attn.b_k")
    g = np.random.default_rng(0)
    ids = g.integers(0, CHECK_CONFIG.vocab_size, (3, 6))
    pad_mask = np.ones((3, 6), bool)
    pad_mask[1, 4:] = False
    model.loss(ids, np.array([0, 2, 1]), pad_mask, head="cls", backward=True)
    return model


@checker("who receives a gradient")
def check_gradient_receivers(fn):
    name = "who receives a gradient"
    got, failed = attempt(name, fn, forbid=(Transformer.loss,))
    if failed is not None:
        return failed
    if isinstance(got, (str, bytes, dict)) or not isinstance(got, (set, frozenset, list, tuple)) \
            or not all(isinstance(n, str) for n in got):
        return fail(name, f"expected a set of parameter names like {{'cls_head.W'}}, got {describe(got)}")
    got = set(got)
    model = _receivers_model()
    params = model.named_parameters()
    unknown = sorted(got - set(params))
    if unknown:
        return fail(name, f"no parameter is called {unknown[0]!r} (names look like 'blocks.0.ln1.gamma')")
    expected = {n for n, p in params.items() if p.grad is not None}
    if got == expected:
        return Result(name, True, f"{len(expected)} parameters: {', '.join(sorted(expected))}")
    reasons = []
    for n in sorted(got - expected):
        why = ("it is frozen" if not params[n].trainable else
               "trainable, but head='cls' never uses the LM head" if n.startswith("lm_head.") else
               "trainable, yet its gradient is not written")
        reasons.append(f"{n} gets none ({why})")
    for n in sorted(expected - got):
        why = ("trainable and used, so the backward computes it; every entry is ~1e-16, not None"
               if n.endswith(".b_k") else
               "trainable and used; its gradient reaches it through the frozen layers above"
               if n.startswith("blocks.0.") else "trainable and used by head='cls'")
        reasons.append(f"{n} does get one ({why})")
    return fail(name, "; ".join(reasons))


# ----------------------------------------------------------------------------- weight-gradient products


WEIGHT_PRODUCTS_SETUP = """\
model = Transformer(ModelConfig(n_layers=4))     # post-LN, 4 blocks, no classifier
model.freeze()
model.unfreeze("blocks.2.*", "blocks.3.*", "lm_head.*")
model.loss(ids, targets, pad_mask, head="lm", backward=True)"""


def _weight_products():
    model = Transformer(ModelConfig(n_layers=4))
    model.freeze()
    model.unfreeze("blocks.2.*", "blocks.3.*", "lm_head.*")
    return sum(1 for n, p in model.active_parameters("lm").items()
               if p.trainable and p.value.ndim == 2 and not n.startswith("embed."))


@checker("weight-gradient products")
def check_weight_products(answer):
    name = "weight-gradient products"
    n = answer
    if callable(answer):
        n, failed = attempt(name, answer, forbid=(Transformer.loss,))
        if failed is not None:
            return failed
    if not is_integer(n):
        return fail(name, f"expected an integer (a count of products), got {describe(n)}")
    expected = _weight_products()
    if n == expected:
        return Result(name, True, f"{exact(n)}: W_q, W_k, W_v, W_o, W_1, W_2 in blocks 2 and 3, and the LM head's W")
    hint = {12: ": the LM head's W trains too",
            14: ": the embeddings are frozen, and their gradient is a scatter-add, not a product",
            15: ": the token and position embeddings are frozen, and their gradient is no product anyway",
            6: ": two blocks train, 6 matrices each (W_q, W_k, W_v, W_o, W_1, W_2)",
            7: ": two blocks train, 6 matrices each (W_q, W_k, W_v, W_o, W_1, W_2)",
            8: ": an attention has four weight matrices W_q, W_k, W_v, W_o, an FFN two",
            9: ": an attention has four weight matrices W_q, W_k, W_v, W_o, an FFN two",
            17: ": an attention has four weight matrices W_q, W_k, W_v, W_o, an FFN two",
            25: ": frozen matrices (blocks 0 and 1) skip their product x^T @ dout",
            26: ": frozen matrices (blocks 0 and 1) skip their product x^T @ dout"}.get(int(n), "")
    if not hint and n > expected:
        hint = ": frozen matrices skip their product x^T @ dout"
    return fail(name, f"got {exact(n)}, expected {exact(expected)}{hint}")
