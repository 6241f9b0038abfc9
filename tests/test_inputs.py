"""Bad input raises a clear error that names the argument, says what was expected and what came."""
import numpy as np
import pytest

from minitransformer import AdapterConfig, ModelConfig, Transformer
from minitransformer.layers import dropout_forward
from minitransformer.losses import cross_entropy_forward


@pytest.fixture(scope="module")
def model():
    return Transformer(ModelConfig(vocab_size=11, max_len=8, d_model=8, n_heads=2, n_layers=1, d_ff=16,
                                   n_classes=3), seed=0)


IDS = np.array([[1, 2, 3], [4, 5, 6]])


# ----------------------------------------------------------------------------- token ids


@pytest.mark.parametrize("ids, error, message", [
    (np.array([[1, 11, 2]]), ValueError, r"ids: expected token ids in \[0, 11\), got 11"),
    (np.array([[1, -1, 2]]), ValueError, r"ids: expected token ids in \[0, 11\), got -1"),
    (np.array([[1.0, 2.0]]), TypeError, r"ids: expected an integer numpy array of token ids, got float64"),
    ([[1, 2]], TypeError, r"ids: expected an integer numpy array of token ids, got list"),
    (np.array([1, 2, 3]), ValueError, r"ids: expected shape \(batch, seq_len\), got shape \(3,\)"),
    (np.zeros((2, 9), int), ValueError, r"ids: expected seq_len <= max_len=8, got seq_len=9"),
])
def test_bad_ids(model, ids, error, message):
    with pytest.raises(error, match=message):
        model.forward(ids)


@pytest.mark.parametrize("pad_mask, message", [
    (np.ones((2, 2), bool), r"pad_mask: expected a bool array of shape \(2, 3\), got .*\(2, 2\)"),
    (np.ones((2, 3), int), r"pad_mask: expected a bool array of shape \(2, 3\), got .*int64"),
    ([[True] * 3] * 2, r"pad_mask: expected a bool array of shape \(2, 3\), got .*list"),
])
def test_bad_pad_mask(model, pad_mask, message):
    with pytest.raises(ValueError, match=message):
        model.forward(IDS, pad_mask)


def test_unknown_head(model):
    with pytest.raises(ValueError, match=r"head: expected 'lm' or 'cls', got 'mlm'"):
        model.forward(IDS, head="mlm")


def test_cls_head_without_classifier():
    bare = Transformer(ModelConfig(vocab_size=11, max_len=8, d_model=8, n_heads=2, n_layers=1, d_ff=16))
    with pytest.raises(ValueError, match=r"head: 'cls' needs an active adapter or a base classifier"):
        bare.forward(IDS, head="cls")


# ----------------------------------------------------------------------------- labels


@pytest.mark.parametrize("head, targets, message", [
    ("lm", np.array([1, 2]), r"targets: expected shape \(2, 3\) to match logits \(2, 3, 11\), got \(2,\)"),
    ("lm", np.zeros((2, 4), int), r"targets: expected shape \(2, 3\) to match logits \(2, 3, 11\), got \(2, 4\)"),
    ("cls", np.array([0, 1, 2]), r"targets: expected shape \(2,\) to match logits \(2, 3\), got \(3,\)"),
    ("cls", np.array([[0], [1]]), r"targets: expected shape \(2,\) to match logits \(2, 3\), got \(2, 1\)"),
    ("cls", np.array([0, 3]), r"targets: expected labels in \[0, 3\) or ignore_index=-100, got 3"),
])
def test_bad_labels(model, head, targets, message):
    with pytest.raises(ValueError, match=message):
        model.loss(IDS, targets, head=head, backward=True)


def test_labels_not_integers():
    with pytest.raises(TypeError, match=r"targets: expected an integer numpy array of labels, got float64"):
        cross_entropy_forward(np.zeros((2, 3)), np.array([0.0, 1.0]))


# ----------------------------------------------------------------------------- configs


@pytest.mark.parametrize("fields, message", [
    (dict(d_model=10, n_heads=4), r"d_model: expected a multiple of n_heads=4, got d_model=10"),
    (dict(n_layers=0), r"n_layers: expected a positive integer, got 0"),
    (dict(d_model=8.0), r"d_model: expected a positive integer, got 8.0"),
    (dict(n_layers=True), r"n_layers: expected a positive integer, got True"),
    (dict(n_classes=-1), r"n_classes: expected a non-negative integer, got -1"),
    (dict(n_classes=2.0), r"n_classes: expected a non-negative integer, got 2.0"),
    (dict(norm="middle"), r"norm: expected 'post' or 'pre', got 'middle'"),
    (dict(pooling="max"), r"pooling: expected 'first' or 'mean', got 'max'"),
    (dict(dtype="float16"), r"dtype: expected 'float32' or 'float64', got 'float16'"),
    (dict(dropout=1.0), r"dropout: expected 0 <= p < 1, got 1.0"),
])
def test_bad_model_config(fields, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**fields)


@pytest.mark.parametrize("fields, message", [
    (dict(placement="after_ln"), r"placement: expected one of \('houlsby', 'ffn', 'parallel'\), got 'after_ln'"),
    (dict(nonlinearity="swish"), r"nonlinearity: expected one of \('gelu', 'relu', 'tanh'\), got 'swish'"),
    (dict(bottleneck=None), r"bottleneck: give a bottleneck size m or a reduction_factor, got neither"),
    (dict(bottleneck=0), r"bottleneck: expected a positive integer m, got 0"),
    (dict(bottleneck=-4), r"bottleneck: expected a positive integer m, got -4"),
    (dict(bottleneck=2.5), r"bottleneck: expected a positive integer m, got 2.5"),
    (dict(reduction_factor=0), r"reduction_factor: expected a number > 0, got 0"),
    (dict(init_std=-1e-3), r"init_std: expected a number >= 0, got -0.001"),
    (dict(init_std=float("nan")), r"init_std: expected a number >= 0, got nan"),
])
def test_bad_adapter_config(fields, message):
    with pytest.raises(ValueError, match=message):
        AdapterConfig(**fields)


def test_reduction_factor_sets_the_bottleneck():
    assert AdapterConfig(reduction_factor=4).size(64) == 16
    assert AdapterConfig(bottleneck=None, reduction_factor=2).size(8) == 4
    with pytest.raises(ValueError, match=r"bottleneck: expected m >= 1 for d_model=8, got 0"):
        AdapterConfig(reduction_factor=100).size(8)


# ----------------------------------------------------------------------------- adapters and freezing


def test_bad_adapter_names_and_patterns():
    m = Transformer(ModelConfig(vocab_size=11, max_len=8, d_model=8, n_heads=2, n_layers=1, d_ff=16))
    with pytest.raises(ValueError, match=r"name: expected an identifier like 'sentiment', got 'my task'"):
        m.add_adapter("my task", AdapterConfig(bottleneck=2))
    m.add_adapter("a", AdapterConfig(bottleneck=2))
    with pytest.raises(ValueError, match=r"name: an adapter called 'a' exists already"):
        m.add_adapter("a", AdapterConfig(bottleneck=2))
    with pytest.raises(KeyError, match=r"name: expected one of the adapters \['a'\], got 'b'"):
        m.set_active_adapter("b")
    with pytest.raises(KeyError, match=r"got 'b'"):
        m.delete_adapter("b")
    with pytest.raises(ValueError, match=r"patterns: expected at least one parameter name to match"):
        m.freeze("block.*")  # a typo: "blocks"


def test_dropout_needs_a_generator_and_a_valid_p():
    x = np.ones((2, 2))
    with pytest.raises(ValueError, match=r"rng: dropout in training mode needs a np.random.Generator, got None"):
        dropout_forward(x, 0.1, None, train=True)
    with pytest.raises(ValueError, match=r"dropout p: expected 0 <= p < 1, got 1.5"):
        dropout_forward(x, 1.5, np.random.default_rng(0), train=True)
