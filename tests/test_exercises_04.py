"""The checkers of notebooks/04_adapters.ipynb: the reference solutions pass, the usual mistakes
FAIL and say which mistake, and an unwritten solution gives "not implemented yet" (passed None)."""
import numpy as np
import pytest

from minitransformer import layers
from minitransformer.exercises import unit04 as ex


def not_written(*args, **kwargs):
    raise NotImplementedError


# ----------------------------------------------------------------------------- exercise 1: the count


def trained_parameters(C, m, n_layers, n_classes, train_layernorm=True):
    n = 2 * n_layers * (2 * m * C + m + C) + C * n_classes + n_classes
    return n + (2 * n_layers + 1) * 2 * C if train_layernorm else n


def test_count_reference_passes():
    result = ex.check_trained_parameters(trained_parameters)
    assert result.passed is True, result
    assert "10,050" in result.message  # the shipped base's C=64, 4 layers, m=8, 2 classes


@pytest.mark.parametrize("wrong, reason", [
    (lambda C, m, L, K, ln: trained_parameters(C, m, L, K, ln) - 2 * L * (m + C), "biases"),
    (lambda C, m, L, K, ln: trained_parameters(C, m, L, K, ln) - L * (2 * m * C + m + C), "two adapters per block"),
    (lambda C, m, L, K, ln: trained_parameters(C, m, L, K, ln) - (2 * C if ln else 0), "ln_emb"),
    (lambda C, m, L, K, ln: trained_parameters(C, m, L, K, True), "no LayerNorm trains"),
    (lambda C, m, L, K, ln: trained_parameters(C, m, L, K, ln) - C * K - K, "head"),
])
def test_count_mistakes_fail_and_are_named(wrong, reason):
    result = ex.check_trained_parameters(wrong)
    assert result.passed is False
    assert reason in result.message and "expected" in result.message


def test_count_not_written_and_not_a_number():
    assert ex.check_trained_parameters(not_written).passed is None
    assert "not implemented yet" in repr(ex.check_trained_parameters(not_written))
    result = ex.check_trained_parameters(lambda *a: "10050")
    assert result.passed is False and "expected a number" in result.message


# ----------------------------------------------------------------------------- exercises 2 and 3: the passes


def adapter_forward(h, W_down, b_down, W_up, b_up):
    z = h @ W_down + b_down
    a, gelu_cache = layers.gelu_forward(z)
    return h + a @ W_up + b_up, (h, W_down, W_up, a, gelu_cache)


def adapter_backward(dout, cache):
    h, W_down, W_up, a, gelu_cache = cache
    C, m = W_down.shape
    dW_up = a.reshape(-1, m).T @ dout.reshape(-1, C)
    db_up = dout.reshape(-1, C).sum(axis=0)
    dz = layers.gelu_backward(dout @ W_up.T, gelu_cache)
    dW_down = h.reshape(-1, C).T @ dz.reshape(-1, m)
    db_down = dz.reshape(-1, m).sum(axis=0)
    return dz @ W_down.T + dout, dW_down, db_down, dW_up, db_up


def forward_without_skip(h, W_down, b_down, W_up, b_up):
    out, cache = adapter_forward(h, W_down, b_down, W_up, b_up)
    return out - h, cache


def backward_without_skip(dout, cache):
    dh, *rest = adapter_backward(dout, cache)
    return (dh - dout, *rest)


def test_forward_reference_passes():
    result = ex.check_adapter_forward(adapter_forward)
    assert result.passed is True, result
    assert "e-" not in result.message.replace("1e-07", "")  # no measured error: stable across CPUs


def test_forward_without_skip_fails_and_says_so():
    result = ex.check_adapter_forward(forward_without_skip)
    assert result.passed is False
    assert "skip connection is missing" in result.message
    assert "FAIL adapter forward" in repr(result)


@pytest.mark.parametrize("wrong, reason", [
    (lambda h, Wd, bd, Wu, bu: adapter_forward(h, Wd, bd, Wu, 0 * bu), "b_up is missing"),
    (lambda h, Wd, bd, Wu, bu: (h + (h @ Wd + bd) @ Wu + bu, None), "nonlinearity f (GELU) is missing"),
    (lambda h, Wd, bd, Wu, bu: (h + np.maximum(h @ Wd + bd, 0) @ Wu + bu, None), "ReLU"),
])
def test_forward_mistakes_are_named(wrong, reason):
    result = ex.check_adapter_forward(wrong)
    assert result.passed is False and reason in result.message


def test_forward_bad_returns():
    assert ex.check_adapter_forward(not_written).passed is None
    result = ex.check_adapter_forward(lambda h, *w: h)  # the output alone, no cache
    assert result.passed is False and "(out, cache)" in result.message
    result = ex.check_adapter_forward(lambda h, *w: (h[0], None))
    assert result.passed is False and "shape" in result.message
    result = ex.check_adapter_forward(lambda *a: 1 / 0)
    assert result.passed is False and "ZeroDivisionError" in result.message


def test_backward_reference_passes():
    result = ex.check_adapter_backward(adapter_forward, adapter_backward)
    assert result.passed is True, result


def test_backward_without_skip_fails_and_says_so():
    result = ex.check_adapter_backward(adapter_forward, backward_without_skip)
    assert result.passed is False
    assert "(dh)" in result.name and "skip" in result.message and "dout" in result.message


def test_an_adapter_without_skip_fails_even_when_forward_and_backward_agree():
    """Forward and backward both without the skip agree with each other; the checker compares
    with the real adapter, so it still fails, on dh."""
    result = ex.check_adapter_backward(forward_without_skip, backward_without_skip)
    assert result.passed is False and "skip" in result.message


def test_backward_mistakes():
    def bias_not_summed(dout, cache):
        dh, dW_down, db_down, dW_up, db_up = adapter_backward(dout, cache)
        return dh, dW_down, db_down, dW_up, dout  # db_up left per row
    result = ex.check_adapter_backward(adapter_forward, bias_not_summed)
    assert result.passed is False and "(db_up)" in result.name and "sum dout" in result.message

    def no_gelu_slope(dout, cache):  # dz = da, as if f were the identity
        h, W_down, W_up, a, _ = cache
        dh, dW_down, db_down, dW_up, db_up = adapter_backward(dout, cache)
        dz = dout @ W_up.T
        C, m = W_down.shape
        return dz @ W_down.T + dout, h.reshape(-1, C).T @ dz.reshape(-1, m), dz.reshape(-1, m).sum(0), dW_up, db_up
    result = ex.check_adapter_backward(adapter_forward, no_gelu_slope)
    assert result.passed is False and "finite differences" in result.message

    result = ex.check_adapter_backward(adapter_forward, lambda dout, cache: adapter_backward(dout, cache)[:4])
    assert result.passed is False and "expected 5 arrays" in result.message


def test_backward_not_written():
    assert ex.check_adapter_backward(adapter_forward, not_written).passed is None
    assert ex.check_adapter_backward(not_written, adapter_backward).passed is None


# ----------------------------------------------------------------------------- exercise 4: what trains


def is_trained(name, train_layernorm):
    return name.startswith("adapters.task.")


def test_is_trained_reference_passes():
    result = ex.check_is_trained(is_trained)
    assert result.passed is True, result


@pytest.mark.parametrize("wrong, reason", [
    (lambda n, ln: n.startswith("adapters."), "'other' stays frozen"),
    (lambda n, ln: n.startswith("adapters.task.") and ".ln" not in n, "own LayerNorm copies"),
    (lambda n, ln: n.startswith("adapters.task.") or (ln and (".ln" in n or n.startswith("ln_"))),
     "base's LayerNorms stay frozen"),
    (lambda n, ln: n.startswith("adapters.task.") or n.startswith("cls_head"), "base is frozen"),
])
def test_is_trained_mistakes_are_explained(wrong, reason):
    result = ex.check_is_trained(wrong)
    assert result.passed is False and reason in result.message


def test_is_trained_not_written_and_not_a_bool():
    assert ex.check_is_trained(not_written).passed is None
    result = ex.check_is_trained(lambda n, ln: "yes")
    assert result.passed is False and "True or False" in result.message


# ----------------------------------------------------------------------------- exercise 5: init size


def branch_ratio(std, C, m):
    return np.sqrt(C * m) * 0.7737 * std**2 / 2


def test_init_law_reference_passes():
    assert ex.check_init_law(branch_ratio).passed is True


@pytest.mark.parametrize("wrong, reason", [
    (lambda s, C, m: np.sqrt(C * m) * s**2 / 2, "0.774"),
    (lambda s, C, m: np.sqrt(C * m) * 0.7737 * s**2, "GELU's slope"),
    (lambda s, C, m: np.sqrt(C * m) * s / 2, "std^2"),
])
def test_init_law_mistakes_are_named(wrong, reason):
    result = ex.check_init_law(wrong)
    assert result.passed is False and reason in result.message


def test_init_law_not_written():
    assert ex.check_init_law(not_written).passed is None
