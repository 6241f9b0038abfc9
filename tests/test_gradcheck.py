"""The gradient-check tool itself: its error measure, its finite differences, and that it catches
wrong backwards (a checker that always passes would prove nothing)."""
import numpy as np
import pytest
from conftest import batch, generic_adapter, generic_model

from minitransformer import layers as L
from minitransformer.gradcheck import (MODEL_THRESHOLD, OP_THRESHOLD, check_function, check_model,
                                       numerical_gradient, operation_checks, rel_error)
from minitransformer.tools.gradcheck_command import model_variants


def test_rel_error_by_hand():
    # max|a - n| / (max|a| + max|n|): 0.1 / (2 + 2.1)
    assert rel_error(np.array([1.0, 2.0]), np.array([1.0, 2.1])) == pytest.approx(0.1 / 4.1, rel=1e-12)
    # below the floor tiny = 1e-3 the measure is absolute / 1e-3: 1e-12 / 1e-3 = 1e-9
    assert rel_error(np.array([0.0]), np.array([1e-12])) == pytest.approx(1e-9, rel=1e-12)
    assert rel_error(np.zeros(3), np.zeros(3)) == 0.0
    with pytest.raises(ValueError, match=r"a: expected the shape of the numerical gradient \(3,\), got \(2,\)"):
        rel_error(np.zeros(2), np.zeros(3))


def test_numerical_gradient_accuracy_and_restore(rng):
    x = rng.standard_normal((3, 4))
    before = x.copy()
    # f = sum(x^3): the centred difference's truncation error is f''' h^2 / 6 = h^2 = 1e-10 per entry
    g = numerical_gradient(lambda: float(np.sum(x ** 3)), x)
    np.testing.assert_allclose(g, 3 * before ** 2, rtol=0, atol=1e-8)
    assert x.tobytes() == before.tobytes()  # every entry restored bit for bit
    with pytest.raises(TypeError, match=r"x: expected float64 for a gradient check, got float32"):
        numerical_gradient(lambda: 0.0, np.zeros(2, np.float32))


def test_numerical_gradient_of_a_view_that_is_not_contiguous(rng):
    """A transposed view cannot be flattened without a copy: the nudges must still reach x."""
    base = rng.standard_normal((3, 4))
    x = base.T  # (4, 3), Fortran-ordered
    R = rng.standard_normal((4, 3))
    grad = numerical_gradient(lambda: float(np.sum(np.sin(x) * R)), x)
    assert rel_error(grad, np.cos(x) * R) < 1e-8  # d/dx sum(sin(x) R) = cos(x) R


def test_check_function_catches_wrong_backwards(rng):
    inputs = {"x": rng.standard_normal((3, 4)), "W": rng.standard_normal((4, 2)), "b": rng.standard_normal(2)}

    def wrong_db(d, c):  # forgets to sum over the rows: uses only the first one
        dx, grads = L.linear_backward(d, c)
        return dx, {"W": grads["W"], "b": d[0].copy()}
    errors = check_function(L.linear_forward, wrong_db, inputs)
    assert errors["x"] <= OP_THRESHOLD and errors["W"] <= OP_THRESHOLD
    assert errors["b"] > 1e-2

    x = rng.standard_normal((4, 5))

    def gelu_missing_term(d, c):  # 0.5 (1 + tanh u) only: the derivative of tanh is dropped
        return d * 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3))), {}
    errors = check_function(L.gelu_forward, gelu_missing_term, {"x": x})
    assert errors["x"] > 1e-2


def test_operation_checks_cover_every_operation_below_threshold():
    rows = list(operation_checks())
    ops = {op for op, _, _, _ in rows}
    for needed in ("linear", "token embedding", "position embedding", "layernorm", "layernorm (constant row",
                   "gelu", "relu", "tanh", "softmax (masked)", "dropout", "attention (causal + padding)",
                   "attention (padding)", "adapter (gelu", "adapter (relu", "adapter (tanh",
                   "adapter (gelu, parallel", "cross-entropy (ignored positions)",
                   "attend (causal + padding)", "prefix (2 keys and values in front)",
                   "lora", "prefix MLP", "prompt", "strip prompt"):
        assert any(op.startswith(needed) for op in ops), needed
    bad = [(op, name, err) for op, name, _, err in rows if not err <= OP_THRESHOLD]
    assert not bad, bad


def test_model_variants_cover_norms_heads_and_placements():
    variants = model_variants()
    assert {(norm, head) for _, norm, head, _ in variants} == {(n, h) for n in ("post", "pre") for h in ("lm", "cls")}
    placements = ("houlsby", "ffn", "parallel")
    assert {(norm, pl) for _, norm, _, pl in variants if pl in placements} == {(n, p) for n in ("post", "pre")
                                                                              for p in placements}
    # every other method: post-LN and pre-LN under the classification head, and the causal LM head
    assert {(norm, head, m) for _, norm, head, m in variants if m and m not in placements} == {
        (norm, head, m) for m in ("lora", "prefix", "prefix MLP", "prompt", "bitfit")
        for norm, head in (("post", "cls"), ("pre", "cls"), ("pre", "lm"))}


def test_check_model_refuses_a_frozen_parameter_with_a_gradient(monkeypatch):
    model = generic_model(adapter=generic_adapter())
    ids, targets, pad_mask = batch(model.config, head="cls")
    real = model.backward

    def leaky_backward(dlogits, cache):  # a bug that lets a gradient reach a frozen weight
        real(dlogits, cache)
        p = model.named_parameters()["blocks.1.ffn.W_2"]
        p.grad = np.zeros_like(p.value)
    monkeypatch.setattr(model, "backward", leaky_backward)
    with pytest.raises(AssertionError, match=r"blocks.1.ffn.W_2: frozen, yet it received a gradient"):
        check_model(model, ids, targets, pad_mask, head="cls")


def test_check_model_lists_frozen_parameters_without_error():
    model = generic_model(adapter=generic_adapter(placement="ffn"))
    ids, targets, pad_mask = batch(model.config, head="cls")
    rows = check_model(model, ids, targets, pad_mask, head="cls")
    frozen = [r for r in rows if not r[2]]
    assert frozen and all(err is None for _, _, _, err in frozen)
    assert {name for name, _, _, _ in frozen} == {n for n in model.named_parameters() if not n.startswith("adapters.")}
    assert max(err for _, _, trainable, err in rows if trainable) <= MODEL_THRESHOLD
