"""The checks of notebook 05 (unit05.py is what the notebook sees)."""
import numpy as np

from .. import sizes
from ..model import Transformer
from . import Result, apart, attempt, checker, describe, exact, fail, is_integer, is_number, rng
from . import _reference as ref

# ----------------------------------------------------------------------------- storage


def _storage_cases(g):
    cases = [(20, 208_448, 34_818, 130), (1, 1000, 50, 10), (0, 7, 2, 1)]
    while len(cases) < 6:
        T = int(g.integers(2, 60))
        n_base, n_task = int(g.integers(10_000, 10_000_000)), int(g.integers(100, 9_000))
        n_head = int(g.integers(2, 90))
        if len({T, n_base, n_task, n_head}) == 4:
            cases.append((T, n_base, n_task, n_head))
    return cases


@checker("storage for T tasks")
def check_storage(fn):
    name = "storage for T tasks"
    for T, n_base, n_task, n_head in _storage_cases(rng()):
        where = f"T={T}, n_base={n_base:,}, n_task={n_task:,}, n_head={n_head:,}"
        got, failed = attempt(name, fn, T, n_base, n_task, n_head, where=where)
        if failed is not None:
            return failed
        if isinstance(got, np.ndarray) and got.shape == (2,) and got.dtype.kind in "iu":
            got = tuple(got)  # an array of two integers is a fine pair
        if not (isinstance(got, (tuple, list)) and len(got) == 2):
            return fail(name, f"expected a pair of integers (with adapters, with copies), got {describe(got)}")
        if not all(is_integer(v) for v in got):
            return fail(name, f"expected a pair of integers (counts of parameters), got {describe(got)} on {where}")
        (a, c), (ea, ec) = got, ref.stored(T, n_base, n_task, n_head)
        if a != ea:
            hint = {T * (n_base + n_task): "the base is stored once and shared by every task, not once per task",
                    T * n_task: "the shared base itself must be stored too, once",
                    n_base + T * (n_task + n_head): "n_task already holds the task's head",
                    ec: "that is the copies' total: the pair is (with adapters, with copies)"}.get(a)
            return fail(name, f"{where}: with adapters you got {exact(a)}, expected {exact(ea)}"
                              + (f" ({hint})" if hint else ""))
        if c != ec:
            hint = {T * n_base: "each fine-tuned copy also holds its own head",
                    n_base + T * n_head: "full fine-tuning changes every base weight, so each task needs a whole copy",
                    T * (n_base + n_task): "a copy holds the base and its head (n_head), not an adapter set"}.get(c)
            return fail(name, f"{where}: with copies you got {exact(c)}, expected {exact(ec)}"
                              + (f" ({hint})" if hint else ""))
    a, c = ref.stored(20, 208_448, 34_818, 130)
    return Result(name, True, f"right on 6 cases, 3 of them fresh; e.g. T=20: {a:,} parameters with adapters, "
                              f"{c:,} with copies ({c / a:.1f}x)")


# ----------------------------------------------------------------------------- switching adapters


@checker("switching adapters")
def check_switch(fn, model, splits):
    """fn(model, name, split) -> the accuracy of task `name` on `split`, whatever adapter is
    active when it is called. Each task is asked on its whole split and on two fresh random
    subsets of it, with another adapter active, and with none; the model's active adapter is
    restored at the end (a function may restore it too, or leave its task active)."""
    from ..tools.train import accuracy
    name = "switching adapters"
    names = list(splits)
    if len(names) < 2:
        return fail(name, f"splits: expected at least two tasks to switch between, got {names}")
    g = rng()
    before = model.active_adapter
    try:
        results = []
        for i, task in enumerate(names):
            split = splits[task]
            subsets = [split] + [split[np.sort(g.choice(len(split), max(1, len(split) // k), replace=False))]
                                 for k in (2, 3)]
            for j, part in enumerate(subsets):
                model.set_active_adapter(task)
                expected = accuracy(model, part)
                other = names[(i + 1) % len(names)] if j != 1 else None  # another adapter, or none
                model.set_active_adapter(other)
                wrong = accuracy(model, part) if other is not None else None
                what = "its whole split" if j == 0 else f"a random subset of {len(part)} examples"
                got, failed = attempt(name, fn, model, task, part, where=f"{task!r}, {what}")
                if failed is not None:
                    return failed
                if isinstance(got, np.ndarray) and got.shape == () and got.dtype.kind == "f":
                    got = got[()]
                if not is_number(got):
                    return fail(name, f"expected an accuracy (a number), got {describe(got)} for {task!r}")
                if abs(got - expected) > 1e-12:
                    if wrong is not None and abs(got - wrong) <= 1e-12:
                        hint = (f": that is the accuracy of adapter {other!r}, the one active when your function was "
                                f"called; call model.set_active_adapter({task!r}) first")
                    elif abs(got - 100 * expected) <= 1e-9:
                        hint = ": an accuracy is a fraction between 0 and 1, as train.accuracy returns it"
                    elif j and abs(got - accuracy_on(model, task, split)) <= 1e-12:
                        hint = ": that is the accuracy on the whole split; measure the split you are given"
                    else:
                        hint = ""
                    shown, wanted = apart(got, expected)
                    return fail(name, f"{task!r} on {what}: got {shown}, expected {wanted}{hint}")
            results.append(f"{task} {accuracy_on(model, task, split):.2f}")
    finally:
        model.set_active_adapter(before)
    return Result(name, True, "each task through its own adapter and head, on its split and on random "
                              "subsets: " + ", ".join(results))


def accuracy_on(model, task, split):
    from ..tools.train import accuracy
    active = model.active_adapter
    model.set_active_adapter(task)
    try:
        return accuracy(model, split)
    finally:
        model.set_active_adapter(active)


# ----------------------------------------------------------------------------- trained fraction


@checker("trained percentage")
def check_trained_percent(fn):
    name = "trained percentage"
    g = rng()
    cases = [(8, 2, True), (64, 3, False)] + [(int(g.integers(1, 129)), int(g.integers(2, 11)), bool(ln))
                                               for ln in (True, False)]
    forbid = (Transformer.num_parameters, Transformer.add_adapter, Transformer.print_trainable_parameters,
              sizes.adapter_parameter_count)
    tol = 1e-9  # relative: a handful of float64 operations on exact integers
    for m, K, ln in cases:
        where = f"m={m}, {K} classes, train_layernorm={ln}"
        got, failed = attempt(name, fn, m, K, ln, where=where, forbid=forbid)
        if failed is not None:
            return failed
        if isinstance(got, np.ndarray) and got.shape == () and got.dtype.kind == "f":
            got = got[()]
        if not is_number(got):
            return fail(name, f"expected a number (a percentage), got {describe(got)} on {where}")
        expected = ref.trained_percent(m, K, ln)
        if abs(got - expected) <= tol * expected:
            continue
        trained = ref.trained_count(64, m, 4, K, ln)
        wrong = [(expected / 100, "a percentage, not a fraction: multiply by 100"),
                 (100 * trained / ref.SHIPPED_BASE, "divide by all parameters, the new adapter set included "
                                                    "(as print_trainable_parameters does)"),
                 (ref.trained_percent(m, K, not ln), f"train_layernorm={ln}: the task's LayerNorm copies "
                                                     f"({9 * 2 * 64:,} parameters) train only when it is True"),
                 (100 * (trained - 64 * K - K) / (ref.SHIPPED_BASE + trained), "the task's head (C K + K) trains too"),
                 (100 * (trained - K * 64 - K) / (ref.SHIPPED_BASE + trained - K * 64 - K),
                  "the task's head (C K + K) trains too, and counts among all parameters")]
        hint = next((f" ({t})" for v, t in wrong if abs(got - v) <= tol * abs(v)), "")
        shown, wanted = apart(got, expected)
        return fail(name, f"{where}: got {shown}, expected {wanted}{hint}")
    return Result(name, True, f"right in {len(cases)} cases, 2 of them fresh; e.g. m=8, 2 classes: "
                              f"{ref.trained_percent(8, 2, True):.2f} %")
