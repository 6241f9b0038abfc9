"""Catalogue of notebook 03's exercises: wrong answers rejected for their reason, correct
alternatives accepted (fresh random cases at every call); the setups shown are the ones
checked, and the weight-product count agrees with a measured backward."""
import contextlib

import numpy as np
import pytest
from _catalogue import fails, passes

from minitransformer import ModelConfig, Transformer, attention, backend, sizes
from minitransformer.exercises import _reference as ref
from minitransformer.exercises import unit03 as ex


def count(cfg, forget=None, extra=0):
    V, T, C, L, F, K = cfg.vocab_size, cfg.max_len, cfg.d_model, cfg.n_layers, cfg.d_ff, cfg.n_classes
    parts = {"embeddings": V * C + T * C, "pos": 0, "extra_ln": 2 * C, "attention": L * (4 * C * C + 4 * C),
             "ffn": L * (C * F + F + F * C + C), "block_lns": L * 4 * C, "lm_head": C * V + V,
             "lm_bias": 0, "cls_head": C * K + K if K else 0}
    if forget == "pos":
        parts["embeddings"] -= T * C
    if forget == "lm_bias":
        parts["lm_head"] -= V
    return sum(v for k, v in parts.items() if k != forget) + extra


COUNT_WRONG = [
    (lambda c: count(c, "extra_ln"), "one LayerNorm (2C)"),
    (lambda c: count(c, "lm_head"), "the LM head, W (C, n_vocab) and b (n_vocab)"),
    (lambda c: count(c, "lm_bias"), "the LM head's bias (n_vocab)"),
    (lambda c: count(c, "pos"), "the position embedding"),
    (lambda c: count(c, "block_lns"), "4C per block"),
    (lambda c: count(c, extra=2 * c.d_model), "once too often"),
    (lambda c: count(c, extra=-c.n_layers * (c.d_ff + c.d_model)), "feed-forward biases"),
    (lambda c: count(c, extra=-c.n_layers * (c.d_model ** 2 + c.d_model)), "one attention projection per block"),
    (lambda c: count(c) - (c.d_model * c.n_classes + c.n_classes if c.n_classes else 0), ("classification head", "expected")),
    (lambda c: float(count(c)), "expected an integer, got the float"),
    (lambda c: Transformer(c).num_parameters(), ("Transformer.num_parameters", "sizes.parameter_count")),
    (lambda c: sizes.parameter_count(c), "sizes.parameter_count"),
]


@pytest.mark.parametrize("answer, reason", COUNT_WRONG)
def test_parameter_count_wrong(answer, reason):
    fails(lambda: ex.check_parameter_count(answer), reason)


@pytest.mark.parametrize("answer", [count, lambda c: np.int64(count(c)),
                                    lambda c: ref.parameter_count(c.vocab_size, c.max_len, c.d_model, c.n_layers,
                                                                  c.d_ff, c.n_classes)])
def test_parameter_count_correct(answer):
    passes(lambda: ex.check_parameter_count(answer))


def test_the_count_formula_is_the_models():
    for cfg in [ModelConfig(), ModelConfig(vocab_size=50, max_len=20, d_model=48, n_heads=3, n_layers=3, d_ff=100,
                                           norm="pre", causal=True, n_classes=5)]:
        assert ref.parameter_count(cfg.vocab_size, cfg.max_len, cfg.d_model, cfg.n_layers, cfg.d_ff,
                                   cfg.n_classes) == Transformer(cfg).num_parameters()


# ----------------------------------------------------------------------------- pre-LN backward
# The wrong answers are built from the private reference pieces (not the package's backward,
# whose signature may change): the student's slips are about the paths, not the pieces.


def answer_from(kind):
    def answer(dy, cache):
        x, gamma, beta, w, H, bias = answer.problem[id(cache)]
        dx, da_in, dln = ref.pre_ln_pieces(dy.astype(np.float64), x.astype(np.float64), gamma.astype(np.float64),
                                           beta.astype(np.float64), {k: v.astype(np.float64) for k, v in w.items()},
                                           H, bias.astype(np.float64))
        return {"right": dx, "no residual": dx - dy, "residual only": dy + 0, "no LN": dy + da_in,
                "LN first": dy + dln, "residual twice": dx + dy, "tuple": (dx, None, None),
                "2-D": dx.reshape(-1, dx.shape[-1]), "float16": dx.astype(np.float16)}[kind]
    answer.problem = {}
    return answer


@pytest.fixture
def recording(monkeypatch):
    """The checker's forward, recorded: the answers above look their problem up by its cache."""
    from minitransformer.exercises import _unit03
    made = []
    original = ref.pre_ln_attention_forward

    def forward(x, gamma, beta, w, H, bias=None):
        y, cache = original(x, gamma, beta, w, H, bias)
        for a in made:
            a.problem[id(cache)] = (x, gamma, beta, w, H, bias)
        return y, cache
    monkeypatch.setattr(_unit03.ref, "pre_ln_attention_forward", forward)
    return made


PRE_LN_WRONG = [("no residual", "misses the residual path"), ("residual only", "only the residual path dy"),
                ("no LN", "back through LN"), ("LN first", "through the attention first"),
                ("residual twice", "added twice"), ("tuple", "expected an array of shape"),
                ("2-D", "expected shape"), ("float16", "expected dtype float32 or float64")]


@pytest.mark.parametrize("kind, reason", PRE_LN_WRONG)
def test_pre_ln_backward_wrong(recording, kind, reason):
    answer = answer_from(kind)
    recording.append(answer)
    fails(lambda: ex.check_pre_ln_backward(answer), reason)


def test_pre_ln_backward_wrong_without_a_reason_still_fails():
    fails(lambda: ex.check_pre_ln_backward(lambda dy, cache: dy * 2), "go back through the forward in reverse")
    fails(lambda: ex.check_pre_ln_backward(lambda dy, cache: np.zeros_like(dy)), "max relative error")


def test_pre_ln_backward_correct(recording):
    answer = answer_from("right")
    recording.append(answer)
    passes(lambda: ex.check_pre_ln_backward(answer))

    def as_list(dy, cache):
        return answer(dy, cache).tolist()
    passes(lambda: ex.check_pre_ln_backward(as_list))


# ----------------------------------------------------------------------------- who receives a gradient

RIGHT = {"cls_head.W", "cls_head.b", "blocks.0.ln1.gamma", "blocks.0.ln1.beta", "blocks.1.attn.b_k"}

RECEIVERS_WRONG = [
    (RIGHT - {"blocks.1.attn.b_k"}, "~1e-16, not None"),
    (RIGHT | {"lm_head.W"}, "never uses the LM head"),
    (RIGHT - {"blocks.0.ln1.gamma"}, "through the frozen layers above"),
    (RIGHT - {"cls_head.W"}, "used by head='cls'"),
    (RIGHT | {"blocks.1.attn.W_q"}, "it is frozen"),
    (RIGHT | {"blocks.0.ln1.weight"}, "no parameter is called 'blocks.0.ln1.weight'"),
    ("cls_head.W", "expected a set of parameter names"),
    ({n: 1 for n in RIGHT}, "expected a set of parameter names"),
    ({1, 2}, "expected a set of parameter names"),
    (set(), "does get one"),
]


@pytest.mark.parametrize("value, reason", RECEIVERS_WRONG)
def test_gradient_receivers_wrong(value, reason):
    fails(lambda: ex.check_gradient_receivers(lambda: value), reason, times=1)


def test_gradient_receivers_running_the_setup_is_named():
    def answer():
        model = Transformer(ModelConfig(vocab_size=11, max_len=8, d_model=8, n_heads=2, n_layers=1, d_ff=16,
                                        n_classes=3))
        model.loss(np.zeros((1, 3), int), np.array([0]), head="cls", backward=True)
    fails(lambda: ex.check_gradient_receivers(answer), "Transformer.loss", times=1)


@pytest.mark.parametrize("value", [RIGHT, sorted(RIGHT), tuple(RIGHT), frozenset(RIGHT)], ids=str)
def test_gradient_receivers_correct(value):
    passes(lambda: ex.check_gradient_receivers(lambda: value), times=1)


def test_the_setup_shown_to_the_student_is_the_one_checked():
    assert 'unfreeze("lm_head.*", "cls_head.*", "blocks.0.ln1.*", "blocks.1.attn.b_k")' in ex.RECEIVERS_SETUP
    assert 'unfreeze("blocks.2.*", "blocks.3.*", "lm_head.*")' in ex.WEIGHT_PRODUCTS_SETUP


# ----------------------------------------------------------------------------- weight-gradient products

PRODUCTS_WRONG = [(12, "the LM head's W trains too"), (15, "embeddings are frozen"), (14, "scatter-add"),
                  (6, "6 matrices each"), (8, "four weight matrices"), (17, "four weight matrices"),
                  (25, "blocks 0 and 1"), (30, "skip their product"), (13.0, "expected an integer"),
                  ("13", "expected an integer"), (True, "expected an integer")]


@pytest.mark.parametrize("value, reason", PRODUCTS_WRONG)
def test_weight_products_wrong(value, reason):
    fails(lambda: ex.check_weight_products(value), reason, times=1)
    fails(lambda: ex.check_weight_products(lambda: value), reason, times=1)


@pytest.mark.parametrize("value", [13, np.int64(13), lambda: 2 * 6 + 1], ids=str)
def test_weight_products_correct(value):
    passes(lambda: ex.check_weight_products(value), times=1)


@contextlib.contextmanager
def counted_weight_products():
    """Count the linear backward calls that compute dW, wherever the reference path calls it
    (whatever the backward's return: only its need_dW argument is read)."""
    from minitransformer import layers
    counts = {"dW": 0}
    original = layers.linear_backward

    def counting(dout, cache, *args, **kwargs):
        need_dW = kwargs.get("need_dW", args[1] if len(args) > 1 else True)
        counts["dW"] += bool(need_dW)
        return original(dout, cache, *args, **kwargs)
    backend.ops.linear_backward = attention.linear_backward = counting
    try:
        yield counts
    finally:
        backend.ops.linear_backward = attention.linear_backward = original


def test_weight_products_answer_matches_a_measured_backward():
    model = Transformer(ModelConfig(n_layers=4))
    model.freeze()
    model.unfreeze("blocks.2.*", "blocks.3.*", "lm_head.*")
    g = np.random.default_rng(0)
    ids, targets = g.integers(0, 128, (2, 5)), g.integers(0, 128, (2, 5))
    assert backend.current() == "reference"
    with counted_weight_products() as counts:
        model.loss(ids, targets, head="lm", backward=True)
    assert counts["dW"] == 13
    assert ex.check_weight_products(counts["dW"]).passed is True
