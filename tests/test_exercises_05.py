"""The checkers of notebooks/05_adapting_a_pretrained_base.ipynb: the reference solutions pass,
the usual mistakes FAIL and say which mistake, and an unwritten solution gives "not implemented
yet" (passed None)."""
import numpy as np
import pytest

from minitransformer import AdapterConfig, ModelConfig, Transformer
from minitransformer.exercises import unit05 as ex
from minitransformer.tools import data, train
from minitransformer.tools.pretrain import load_pretrained


def not_written(*args, **kwargs):
    raise NotImplementedError


# ----------------------------------------------------------------------------- exercise 1: storage


def stored_parameters(T, n_base, n_task, n_head):
    return n_base + T * n_task, T * (n_base + n_head)


def test_storage_reference_passes():
    result = ex.check_storage(stored_parameters)
    assert result.passed is True, result
    assert "4.6x" in result.message


@pytest.mark.parametrize("wrong, reason", [
    (lambda T, b, t, h: (T * (b + t), T * (b + h)), "stored once and shared"),
    (lambda T, b, t, h: (T * t, T * (b + h)), "must be stored too, once"),
    (lambda T, b, t, h: (b + T * t, T * b), "its own head"),
    (lambda T, b, t, h: (b + T * t, b + T * h), "a whole copy"),
])
def test_storage_mistakes_are_named(wrong, reason):
    result = ex.check_storage(wrong)
    assert result.passed is False and reason in result.message


def test_storage_not_written_and_bad_returns():
    assert ex.check_storage(not_written).passed is None
    result = ex.check_storage(lambda T, b, t, h: b + T * t)
    assert result.passed is False and "pair of numbers" in result.message


# ----------------------------------------------------------------------------- exercise 2: switching


@pytest.fixture(scope="module")
def two_tasks():
    """A tiny model with adapters "a" (2 classes) and "b" (3 classes); each split is labelled
    with its own adapter's predictions, so measuring it through the other adapter gives a
    different accuracy."""
    cfg = ModelConfig(vocab_size=data.VOCAB_SIZE, max_len=8, d_model=16, n_heads=2, n_layers=1, d_ff=32)
    model = Transformer(cfg, seed=0)
    rng = np.random.default_rng(0)
    splits = {}
    for name, K in (("a", 2), ("b", 3)):
        model.add_adapter(name, AdapterConfig(bottleneck=4, init_std=0.5), n_classes=K, seed=len(splits))
        ids = rng.integers(data.DOT, data.VOCAB_SIZE, (60, 8))
        ids[:, 0] = data.CLS
        split = data.Split(ids, np.ones_like(ids, bool), np.zeros(60, np.int64))
        model.set_active_adapter(name)
        split.labels = train.predict(model, split)
        splits[name] = split
    model.set_active_adapter(None)
    return model, splits


def task_accuracy(model, name, split):
    model.set_active_adapter(name)
    return train.accuracy(model, split)


def test_switch_reference_passes_and_restores_the_active_adapter(two_tasks):
    model, splits = two_tasks
    result = ex.check_switch(task_accuracy, model, splits)
    assert result.passed is True, result
    assert "a 1.00, b 1.00" in result.message
    assert model.active_adapter is None


def test_switch_mistakes_fail(two_tasks):
    model, splits = two_tasks
    result = ex.check_switch(lambda model, name, split: train.accuracy(model, split), model, splits)
    assert result.passed is False and "set_active_adapter('a')" in result.message

    def measures_then_switches(model, name, split):
        acc = train.accuracy(model, split)
        model.set_active_adapter(name)
        return acc
    result = ex.check_switch(measures_then_switches, model, splits)
    assert result.passed is False and "expected 1.000" in result.message

    result = ex.check_switch(lambda model, name, split: f"{task_accuracy(model, name, split):.2f}", model, splits)
    assert result.passed is False and "expected an accuracy" in result.message
    assert model.active_adapter is None


def test_switch_not_written(two_tasks):
    model, splits = two_tasks
    assert ex.check_switch(not_written, model, splits).passed is None
    with pytest.raises(ValueError, match="at least two"):
        ex.check_switch(task_accuracy, model, {"a": splits["a"]})


# ----------------------------------------------------------------------------- exercise 3: trained %


def trained_percent(m, n_classes, train_layernorm=True):
    C, L, n_base = 64, 4, 214_883
    trained = 2 * L * (2 * m * C + m + C) + C * n_classes + n_classes
    if train_layernorm:
        trained += (2 * L + 1) * 2 * C
    return 100 * trained / (n_base + trained)


@pytest.fixture(scope="module")
def base():
    return load_pretrained()


def test_trained_percent_reference_passes_and_leaves_the_base_as_it_was(base):
    result = ex.check_trained_percent(trained_percent, base)
    assert result.passed is True, result
    assert "4.47 %" in result.message  # print_trainable_parameters: 10,050 of 224,933
    assert base.adapters == {} and all(p.trainable for p in base.parameters())


@pytest.mark.parametrize("wrong, reason", [
    (lambda m, K, ln: trained_percent(m, K, ln) / 100, "a percentage, not a fraction"),
    (lambda m, K, ln: 100 * (1 / (100 / trained_percent(m, K, ln) - 1)), "new adapter set included"),
    (lambda m, K, ln: trained_percent(m, K, True), "train_layernorm=False"),
])
def test_trained_percent_mistakes_fail(base, wrong, reason):
    result = ex.check_trained_percent(wrong, base)
    assert result.passed is False and reason in result.message


def test_trained_percent_not_written(base):
    assert ex.check_trained_percent(not_written, base).passed is None
