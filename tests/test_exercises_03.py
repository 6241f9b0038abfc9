"""The checkers of notebooks/03_transformer.ipynb: the reference answers pass, known wrong answers
FAIL and say why, a solution not written yet gives passed None."""
import contextlib

import numpy as np
import pytest

from minitransformer import ModelConfig, Transformer, attention, backend
from minitransformer.attention import attention_backward
from minitransformer.exercises import unit03 as ex
from minitransformer.layers import layernorm_backward


def todo(*args):
    raise NotImplementedError


# ----------------------------------------------------------------------------- parameter count


def count(cfg, forget=None):
    V, T, C, L, F, K = cfg.vocab_size, cfg.max_len, cfg.d_model, cfg.n_layers, cfg.d_ff, cfg.n_classes
    parts = {
        "embeddings": V * C + T * C,
        "extra_ln": 2 * C,  # ln_emb (post-LN) or ln_f (pre-LN)
        "attention": L * (4 * C * C + 4 * C),
        "ffn": L * (C * F + F + F * C + C),
        "block_lns": L * 4 * C,
        "lm_head": C * V + V,
        "cls_head": C * K + K if K else 0,
    }
    return sum(v for k, v in parts.items() if k != forget)


def test_parameter_count_reference_passes():
    r = ex.check_parameter_count(count)
    assert r.passed is True, r


@pytest.mark.parametrize("forget, reason", [
    ("extra_ln", "one LayerNorm (2C)"),
    ("lm_head", "the LM head, W (C, V) and b (V)"),
    ("cls_head", "the classification head"),
    ("block_lns", "two LayerNorms"),
])
def test_parameter_count_wrong_answers_fail(forget, reason):
    r = ex.check_parameter_count(lambda cfg: count(cfg, forget))
    assert r.passed is False and reason in r.message, r


def test_parameter_count_other_answers():
    assert ex.check_parameter_count(todo).passed is None
    r = ex.check_parameter_count(lambda cfg: float(count(cfg)))
    assert r.passed is False and "integer" in r.message
    r = ex.check_parameter_count(lambda cfg: count(cfg) + 2 * cfg.d_model)
    assert r.passed is False and "once too often" in r.message


# ----------------------------------------------------------------------------- pre-LN residual backward


def pre_ln_backward(dy, cache, residual=True, branch=True, through_ln=True):
    cache_ln, cache_attn = cache
    da_in, _ = attention_backward(dy, cache_attn)
    dx_branch = layernorm_backward(da_in, cache_ln)[0] if through_ln else da_in
    return (dy if residual else 0) + (dx_branch if branch else 0)


def test_pre_ln_backward_reference_passes():
    r = ex.check_pre_ln_backward(pre_ln_backward)
    assert r.passed is True and "below 1e-09" in r.message, r


def test_pre_ln_backward_without_the_residual_fails_and_says_so():
    r = ex.check_pre_ln_backward(lambda dy, c: pre_ln_backward(dy, c, residual=False))
    assert r.passed is False and "misses the residual path" in r.message


def test_pre_ln_backward_without_the_branch_fails():
    r = ex.check_pre_ln_backward(lambda dy, c: pre_ln_backward(dy, c, branch=False))
    assert r.passed is False and "only the residual path" in r.message


def test_pre_ln_backward_skipping_the_layernorm_fails():
    r = ex.check_pre_ln_backward(lambda dy, c: pre_ln_backward(dy, c, through_ln=False))
    assert r.passed is False and "back through LN" in r.message


def test_pre_ln_backward_other_answers():
    assert ex.check_pre_ln_backward(todo).passed is None
    r = ex.check_pre_ln_backward(lambda dy, c: (pre_ln_backward(dy, c), {}))
    assert r.passed is False
    r = ex.check_pre_ln_backward(lambda dy, c: dy.sum(axis=0))
    assert r.passed is False and "expected dx of shape" in r.message


# ----------------------------------------------------------------------------- who receives a gradient

EXPECTED = {"cls_head.W", "cls_head.b", "blocks.0.ln1.gamma", "blocks.0.ln1.beta", "blocks.1.attn.b_k"}


def test_gradient_receivers_reference_passes():
    r = ex.check_gradient_receivers(lambda: EXPECTED)
    assert r.passed is True, r
    assert ex.check_gradient_receivers(lambda: sorted(EXPECTED)).passed is True  # a list will do


def test_gradient_receivers_wrong_answers_fail():
    r = ex.check_gradient_receivers(lambda: EXPECTED | {"lm_head.W", "lm_head.b"})
    assert r.passed is False and "head='cls' never uses the LM head" in r.message
    r = ex.check_gradient_receivers(lambda: EXPECTED - {"blocks.1.attn.b_k"})
    assert r.passed is False and "~1e-16, not None" in r.message
    r = ex.check_gradient_receivers(lambda: EXPECTED - {"blocks.0.ln1.gamma"})
    assert r.passed is False and "through the frozen layers above" in r.message
    r = ex.check_gradient_receivers(lambda: EXPECTED | {"blocks.0.attn.W_q"})
    assert r.passed is False and "frozen" in r.message
    r = ex.check_gradient_receivers(lambda: EXPECTED | {"blocks.0.attention.W_q"})
    assert r.passed is False and "no parameter is called" in r.message
    assert ex.check_gradient_receivers(lambda: "cls_head.W").passed is False
    assert ex.check_gradient_receivers(lambda: 3).passed is False
    assert ex.check_gradient_receivers(todo).passed is None


def test_the_setup_shown_to_the_student_is_the_one_checked():
    assert 'unfreeze("lm_head.*", "cls_head.*", "blocks.0.ln1.*", "blocks.1.attn.b_k")' in ex.RECEIVERS_SETUP
    assert 'unfreeze("blocks.2.*", "blocks.3.*", "lm_head.*")' in ex.WEIGHT_PRODUCTS_SETUP


# ----------------------------------------------------------------------------- weight-gradient products


@contextlib.contextmanager
def counted_weight_products():
    """Count the linear_backward calls that compute dW, wherever the reference path calls it."""
    from minitransformer import layers
    counts = {"dW": 0}
    original = layers.linear_backward

    def counting(dout, cache, need_dx=True, need_dW=True, need_db=True):
        counts["dW"] += bool(need_dW)
        return original(dout, cache, need_dx, need_dW, need_db)
    backend.ops.linear_backward = attention.linear_backward = counting
    try:
        yield counts
    finally:
        backend.ops.linear_backward = attention.linear_backward = original


def test_weight_products_reasoning_matches_a_measured_backward():
    model = Transformer(ModelConfig(n_layers=4))
    model.freeze()
    model.unfreeze("blocks.2.*", "blocks.3.*", "lm_head.*")
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 128, (2, 5))
    targets = rng.integers(0, 128, (2, 5))
    assert backend.current() == "reference"
    with counted_weight_products() as counts:
        model.loss(ids, targets, head="lm", backward=True)
    assert counts["dW"] == ex.weight_products(model) == 13


def test_weight_products_checker():
    assert ex.check_weight_products(13).passed is True
    r = ex.check_weight_products(12)
    assert r.passed is False and "LM head" in r.message
    r = ex.check_weight_products(15)
    assert r.passed is False and "embeddings" in r.message
    r = ex.check_weight_products(25)
    assert r.passed is False and "skip their product" in r.message
    assert ex.check_weight_products("13").passed is False
    assert ex.check_weight_products(lambda: 13).passed is True
    assert ex.check_weight_products(todo).passed is None
