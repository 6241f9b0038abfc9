"""Catalogue of notebook 05's exercises: wrong answers rejected for their reason, correct
alternatives accepted (fresh cases at every call); the trained-percentage formula is the
shipped base's, measured."""
import numpy as np
import pytest
from _catalogue import fails, passes

from minitransformer import AdapterConfig, ModelConfig, Transformer
from minitransformer.exercises import _reference as ref
from minitransformer.exercises import unit05 as ex
from minitransformer.tools import data, train

# ----------------------------------------------------------------------------- exercise 1: storage


def stored(T, n_base, n_task, n_head):
    return n_base + T * n_task, T * (n_base + n_head)


STORAGE_WRONG = [
    (lambda T, b, t, h: (T * (b + t), stored(T, b, t, h)[1]), "stored once and shared"),
    (lambda T, b, t, h: (T * t, stored(T, b, t, h)[1]), "must be stored too"),
    (lambda T, b, t, h: (b + T * (t + h), stored(T, b, t, h)[1]), "n_task already holds the task's head"),
    (lambda T, b, t, h: stored(T, b, t, h)[::-1], "the pair is (with adapters, with copies)"),
    (lambda T, b, t, h: (stored(T, b, t, h)[0], T * b), "its own head"),
    (lambda T, b, t, h: (stored(T, b, t, h)[0], b + T * h), "a whole copy"),
    (lambda T, b, t, h: (stored(T, b, t, h)[0], T * (b + t)), "not an adapter set"),
    (lambda T, b, t, h: tuple(float(v) for v in stored(T, b, t, h)), "expected a pair of integers"),
    (lambda T, b, t, h: stored(T, b, t, h)[0], "expected a pair of integers"),
    (lambda T, b, t, h: {"adapters": 1, "copies": 2}, "expected a pair of integers"),
    (lambda T, b, t, h: stored(20, 208_448, 34_818, 130), "expected"),  # the notebook's case written in
]


@pytest.mark.parametrize("answer, reason", STORAGE_WRONG)
def test_storage_wrong(answer, reason):
    fails(lambda: ex.check_storage(answer), reason)


@pytest.mark.parametrize("answer", [stored, lambda *a: list(stored(*a)), lambda *a: np.array(stored(*a))])
def test_storage_correct(answer):
    passes(lambda: ex.check_storage(answer))


# ----------------------------------------------------------------------------- exercise 2: switching


@pytest.fixture(scope="module")
def two_tasks():
    """A tiny model with adapters "a" (2 classes) and "b" (3 classes); each split is labelled
    partly with its own adapter's predictions, so the other adapter, the whole split and a
    subset give different accuracies."""
    cfg = ModelConfig(vocab_size=data.VOCAB_SIZE, max_len=8, d_model=16, n_heads=2, n_layers=1, d_ff=32)
    model = Transformer(cfg, seed=0)
    g = np.random.default_rng(0)
    splits = {}
    for name, K in (("a", 2), ("b", 3)):
        model.add_adapter(name, AdapterConfig(bottleneck=4, init_std=0.5), n_classes=K, seed=len(splits))
        ids = g.integers(data.DOT, data.VOCAB_SIZE, (60, 8))
        ids[:, 0] = data.CLS
        split = data.Split(ids, np.ones_like(ids, bool), np.zeros(60, np.int64))
        model.set_active_adapter(name)
        labels = train.predict(model, split)
        flip = g.random(60) < 0.4
        split.labels = np.where(flip, (labels + 1) % K, labels)
        splits[name] = split
    model.set_active_adapter(None)
    return model, splits


def task_accuracy(model, name, split):
    model.set_active_adapter(name)
    return train.accuracy(model, split)


def restoring(model, name, split):
    before = model.active_adapter
    model.set_active_adapter(name)
    try:
        return train.accuracy(model, split)
    finally:
        model.set_active_adapter(before)


def by_hand(model, name, split):
    model.set_active_adapter(name)
    return np.float64(np.mean(train.predict(model, split) == split.labels))


@pytest.mark.parametrize("answer", [task_accuracy, restoring, by_hand])
def test_switch_correct_and_the_active_adapter_restored(two_tasks, answer):
    model, splits = two_tasks
    model.set_active_adapter("b")
    passes(lambda: ex.check_switch(answer, model, splits))
    assert model.active_adapter == "b"


def measures_then_switches(model, name, split):
    acc = train.accuracy(model, split)
    model.set_active_adapter(name)
    return acc


def whole_split(model, name, split):
    model.set_active_adapter(name)
    return train.accuracy(model, whole_split.splits[name])


SWITCH_WRONG = [
    (lambda model, name, split: train.accuracy(model, split), ("the one active when your function was called",
                                                               "raised")),
    (measures_then_switches, ("the one active when your function was called", "raised")),
    (whole_split, "the accuracy on the whole split"),
    (lambda model, name, split: f"{task_accuracy(model, name, split):.2f}", "expected an accuracy (a number)"),
    (lambda model, name, split: 100 * task_accuracy(model, name, split), "a fraction between 0 and 1"),
    (lambda model, name, split: round(task_accuracy(model, name, split), 2), "expected"),
    (lambda model, name, split: (task_accuracy(model, name, split), name), "expected an accuracy"),
    (lambda model, name, split: 1 - task_accuracy(model, name, split), "expected"),
    (lambda model, name, split: model.set_active_adapter(name), "expected an accuracy (a number), got None"),
]


@pytest.mark.parametrize("answer, reason", SWITCH_WRONG)
def test_switch_wrong(two_tasks, answer, reason):
    model, splits = two_tasks
    whole_split.splits = splits
    model.set_active_adapter("a")
    fails(lambda: ex.check_switch(answer, model, splits), reason)
    assert model.active_adapter == "a"  # restored, whatever the answer did


def test_switch_needs_two_tasks(two_tasks):
    model, splits = two_tasks
    result = ex.check_switch(task_accuracy, model, {"a": splits["a"]})
    assert result.passed is False and "at least two tasks" in result.message


# ----------------------------------------------------------------------------- exercise 3: trained %


def percent(m, K, ln=True, n_base=214_883, head=True, norms=True, denominator=True):
    C, L = 64, 4
    trained = 2 * L * (2 * m * C + m + C) + (C * K + K if head else 0) + ((2 * L + 1) * 2 * C if ln and norms else 0)
    return 100 * trained / (n_base + (trained if denominator else 0))


PERCENT_WRONG = [
    (lambda m, K, ln: percent(m, K, ln) / 100, "a percentage, not a fraction"),
    (lambda m, K, ln: percent(m, K, ln, denominator=False), "the new adapter set included"),
    (lambda m, K, ln: percent(m, K, True), "train only when it is True"),
    (lambda m, K, ln: percent(m, K, not ln), "train only when it is True"),
    (lambda m, K, ln: percent(m, K, ln, head=False), "the task's head (C K + K) trains too"),
    (lambda m, K, ln: percent(m, K, ln, norms=False), ("train only when it is True", "expected")),
    (lambda m, K, ln: percent(m, K, ln, n_base=210_000), "expected"),
    (lambda m, K, ln: f"{percent(m, K, ln):.2f} %", "expected a number (a percentage)"),
    (lambda m, K, ln: round(percent(m, K, ln), 2), "expected"),
]


@pytest.mark.parametrize("answer, reason", PERCENT_WRONG)
def test_trained_percent_wrong(answer, reason):
    fails(lambda: ex.check_trained_percent(answer), reason)


def test_trained_percent_by_building_the_model_is_named():
    def answer(m, K, ln):
        model = Transformer(ModelConfig(vocab_size=11, max_len=8, d_model=8, n_heads=1, n_layers=1, d_ff=8))
        model.add_adapter("t", AdapterConfig(bottleneck=m), K)
        return 1.0
    fails(lambda: ex.check_trained_percent(answer), "TaskMethods.add_adapter")


@pytest.mark.parametrize("answer", [percent, lambda m, K, ln: np.float32(1) * 0 + percent(m, K, ln),
                                    lambda m, K, ln: 100 - 100 * 214_883 / (214_883 + ref.trained_count(64, m, 4, K, ln))])
def test_trained_percent_correct(answer):
    passes(lambda: ex.check_trained_percent(answer))


def test_the_percentage_is_what_print_trainable_parameters_shows_on_the_shipped_base():
    from minitransformer.tools.pretrain import load_pretrained
    base = load_pretrained()
    assert base.num_parameters() == ref.SHIPPED_BASE
    for m, K, ln in ((8, 2, True), (5, 3, False)):
        base.add_adapter("probe", AdapterConfig(bottleneck=m, train_layernorm=ln), K)
        base.train_adapter("probe")
        measured = 100 * base.num_parameters(trainable_only=True) / base.num_parameters()
        base.delete_adapter("probe")
        assert abs(measured - ref.trained_percent(m, K, ln)) < 1e-12
