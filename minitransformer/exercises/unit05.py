"""Checkers for notebooks/05_adapting_a_pretrained_base.ipynb: the storage bill for T tasks,
switching between a base's adapters, and the trained fraction of the shipped base.

    from minitransformer.exercises import unit05 as ex
    ex.check_storage(stored_parameters)
    ex.check_switch(task_accuracy, model, {"agreement": task.test, "topic": topic.test})
    ex.check_trained_percent(trained_percent)
"""
import numpy as np

from . import Result, attempt, is_number
from ..adapters import AdapterConfig

# ----------------------------------------------------------------------------- storage

STORAGE_CASES = ((1, 1000, 50, 10), (20, 208_448, 34_818, 130), (9, 5, 3, 1), (0, 7, 2, 1))


def stored(T, n_base, n_task, n_head):
    """(one shared base + T task sets, T fine-tuned copies each with its head)."""
    return n_base + T * n_task, T * (n_base + n_head)


def check_storage(fn):
    """fn(T, n_base, n_task, n_head) -> (parameters stored with adapters, with full copies).

    n_base: the base's parameters; n_task: what one task adds with adapters (adapters, its
    LayerNorm copies, its head); n_head: one classification head (what a fine-tuned copy adds
    to the base's parameters)."""
    name = "storage for T tasks"
    for T, n_base, n_task, n_head in STORAGE_CASES:
        got, failed = attempt(name, fn, T, n_base, n_task, n_head)
        if failed is not None:
            return failed
        if not (isinstance(got, tuple) and len(got) == 2 and all(map(is_number, got))):
            return Result(name, False, f"expected a pair of numbers (with adapters, with copies), got {got!r}")
        (a, c), (ea, ec) = got, stored(T, n_base, n_task, n_head)
        where = f"T={T}, n_base={n_base:,}, n_task={n_task:,}, n_head={n_head:,}"
        if a != ea:
            hint = {T * (n_base + n_task): "the base is stored once and shared by every task, not once per task",
                    T * n_task: "the shared base itself must be stored too, once"}.get(a)
            return Result(name, False, f"{where}: with adapters you got {a:,}, expected {ea:,}"
                                       + (f" ({hint})" if hint else ""))
        if c != ec:
            hint = {T * n_base: "each fine-tuned copy also holds its own head",
                    n_base + T * n_head: "full fine-tuning changes every base weight, so each task needs a whole copy"}.get(c)
            return Result(name, False, f"{where}: with copies you got {c:,}, expected {ec:,}"
                                       + (f" ({hint})" if hint else ""))
    T, n_base, n_task, n_head = STORAGE_CASES[1]
    a, c = stored(T, n_base, n_task, n_head)
    return Result(name, True, f"right in all {len(STORAGE_CASES)} cases; e.g. T={T}: {a:,} parameters "
                              f"with adapters, {c:,} with copies ({c / a:.1f}x)")


# ----------------------------------------------------------------------------- switching adapters


def check_switch(fn, model, splits):
    """fn(model, name, split) -> the accuracy of task `name` (its adapter, its head) on `split`.

    splits: {adapter name: Split}. Before each call another adapter is made active, so a
    function that forgets to switch measures the wrong task. The model's active adapter is
    restored at the end."""
    from ..tools.train import accuracy
    name = "switching adapters"
    names = list(splits)
    if len(names) < 2:
        raise ValueError(f"splits: expected at least two tasks to switch between, got {names}")
    before = model.active_adapter
    try:
        results = []
        for i, task in enumerate(names):
            model.set_active_adapter(task)
            expected = accuracy(model, splits[task])
            other = names[(i + 1) % len(names)]
            model.set_active_adapter(other)  # the wrong adapter is active when fn is called
            got, failed = attempt(name, fn, model, task, splits[task])
            if failed is not None:
                return failed
            if isinstance(got, bool) or not isinstance(got, (float, np.floating, int, np.integer)):
                return Result(name, False, f"expected an accuracy (a number), got {type(got).__name__}")
            if model.active_adapter != task:
                return Result(name, False, f"after your function, {model.active_adapter!r} is active, not "
                                           f"{task!r}: call model.set_active_adapter({task!r}) first")
            if abs(got - expected) > 1e-12:
                return Result(name, False, f"{task}: got {got:.3f}, expected {expected:.3f}")
            results.append(f"{task} {expected:.2f}")
    finally:
        model.set_active_adapter(before)
    return Result(name, True, "each task through its own adapter and head: " + ", ".join(results))


# ----------------------------------------------------------------------------- trained fraction

PERCENT_CASES = ((8, 2, True), (32, 4, True), (2, 2, False), (64, 3, False))


def trained_percent_of(base, m, n_classes, train_layernorm):
    """What print_trainable_parameters reports after adding one adapter set to `base` and
    training it: 100 * trainable / all parameters (the new set included). `base` is unchanged."""
    base.add_adapter("probe", AdapterConfig(bottleneck=m, train_layernorm=train_layernorm), n_classes)
    trainable = {p.name: p.trainable for p in base.parameters()}
    try:
        base.train_adapter("probe")
        return 100 * base.num_parameters(trainable_only=True) / base.num_parameters()
    finally:
        base.delete_adapter("probe")
        for p in base.parameters():
            p.trainable = trainable[p.name]


def check_trained_percent(fn, base=None):
    """fn(m, n_classes, train_layernorm) -> the percentage of the shipped base's parameters
    (with the new adapter set) that train, as print_trainable_parameters() shows it."""
    from ..tools.pretrain import load_pretrained
    name = "trained percentage"
    base = load_pretrained() if base is None else base
    for m, K, ln in PERCENT_CASES:
        got, failed = attempt(name, fn, m, K, ln)
        if failed is not None:
            return failed
        if not is_number(got):
            return Result(name, False, f"expected a number (a percentage), got {type(got).__name__}")
        expected = trained_percent_of(base, m, K, ln)
        if abs(got - expected) <= 1e-6 * expected:
            continue
        where = f"m={m}, {K} classes, train_layernorm={ln}: got {got:.4f}, expected {expected:.4f}"
        trained = expected * base.num_parameters() / (100 - expected)  # the set's own count
        if abs(100 * got - expected) <= 1e-6 * expected:
            hint = "a percentage, not a fraction: multiply by 100"
        elif abs(got - 100 * trained / base.num_parameters()) <= 1e-6 * expected:
            hint = "divide by all parameters, the new adapter set included (as print_trainable_parameters does)"
        else:
            hint = None
        return Result(name, False, where + (f" ({hint})" if hint else ""))
    m, K, ln = PERCENT_CASES[0]
    return Result(name, True, f"right in all {len(PERCENT_CASES)} cases; e.g. m={m}, {K} classes: "
                              f"{trained_percent_of(base, m, K, ln):.2f} %")
