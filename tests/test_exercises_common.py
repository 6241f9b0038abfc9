"""What every checker of every unit does: a solution not written yet gives passed None; an
exception, a hang or a malformed return gives one FAIL line, never a traceback; the time limit
leaves the signal handler and timer as they were; the modules the notebooks import as `ex`
expose checkers (and documented helpers that give nothing away), no reference answer."""
import signal
import time

import numpy as np
import pytest

import minitransformer.exercises as exercises
from minitransformer import AdapterConfig, ModelConfig, Transformer
from minitransformer.exercises import _reference as ref
from minitransformer.exercises import unit01, unit02, unit03, unit04, unit05, unit06, unit07
from minitransformer.exercises._grads import run_case
from minitransformer.tools.data import Split

UNITS = [unit01, unit02, unit03, unit04, unit05, unit06, unit07]
HELPERS = {"rmsnorm_forward", "pre_ln_attention_forward", "RECEIVERS_SETUP", "WEIGHT_PRODUCTS_SETUP"}


def switch_setup():
    model = Transformer(ModelConfig(vocab_size=11, max_len=8, d_model=8, n_heads=2, n_layers=1, d_ff=16), seed=0)
    model.add_adapter("a", AdapterConfig(bottleneck=2), n_classes=2)
    model.add_adapter("b", AdapterConfig(bottleneck=2), n_classes=3)
    g = np.random.default_rng(0)
    ids = g.integers(0, 11, (12, 6))
    splits = {"a": Split(ids, np.ones((12, 6), bool), g.integers(0, 2, 12)),
              "b": Split(ids[::-1].copy(), np.ones((12, 6), bool), g.integers(0, 3, 12))}
    return model, splits


def checkers():
    """Every unit's check_ functions, as pytest parameters (a list: pytest takes no generators)."""
    return [pytest.param(unit, name, id=f"{unit.__name__[-6:]}.{name}")
            for unit in UNITS for name in unit.__all__ if name.startswith("check_")]


def run(unit, name, student):
    check = getattr(unit, name)
    if name == "check_adapter_backward":
        return check(student, student)
    if name == "check_switch":
        model, splits = switch_setup()
        return check(student, model, splits)
    return check(student)


def test_there_are_29_checkers():
    assert len(list(checkers())) == 29


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.__name__[-6:])
def test_a_unit_exposes_checkers_and_documented_helpers_only(unit):
    public = [n for n in dir(unit) if not n.startswith("_")]
    assert sorted(public) == sorted(unit.__all__)
    for n in public:
        assert n.startswith("check_") or n in HELPERS, f"{unit.__name__}.{n} is public"
        assert n in (unit.__doc__ or ""), f"{unit.__name__}.{n} is not documented in the module's docstring"
    for leaked in ("merge", "break_even", "bitfit_count", "layers", "np", "ref", "storage_bytes", "stored",
                   "head_forward", "weight_products", "measured_ratio", "prefix_count", "skipped_flops"):
        assert not hasattr(unit, leaked), f"{unit.__name__}.{leaked} gives an answer away"


@pytest.mark.parametrize("unit, name", checkers())
def test_not_written_yet(unit, name):
    def student(*args):
        raise NotImplementedError
    result = run(unit, name, student)
    assert result.passed is None and repr(result).startswith("not implemented yet: ")


@pytest.mark.parametrize("unit, name", checkers())
def test_an_exception_is_one_fail_line(unit, name):
    def student(*args):
        raise KeyError("oops")
    result = run(unit, name, student)
    assert result.passed is False and "\n" not in repr(result)
    assert "your code raised KeyError" in result.message


@pytest.mark.parametrize("unit, name", checkers())
def test_a_hang_is_stopped_and_the_alarm_restored(unit, name, monkeypatch):
    monkeypatch.setattr(exercises, "TIME_LIMIT", 0.2)
    handler = signal.getsignal(signal.SIGALRM)

    def student(*args):
        while True:
            time.sleep(0.01)
    start = time.monotonic()
    result = run(unit, name, student)
    assert time.monotonic() - start < 5
    assert result.passed is False and "took longer than 0.2 s" in result.message and "\n" not in repr(result)
    assert signal.getsignal(signal.SIGALRM) is handler and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


MALFORMED = [None, "a string", (1, 2, 3, 4, 5, 6), [[1.0, 2.0], [3.0]], object(), {"dx": 1}, np.zeros((2, 2, 2, 2)),
             (np.zeros(3), np.zeros((2, 2)))]


@pytest.mark.parametrize("unit, name", checkers())
@pytest.mark.parametrize("value", MALFORMED, ids=lambda v: type(v).__name__)
def test_a_malformed_return_is_one_fail_line_saying_what_came_back(unit, name, value):
    result = run(unit, name, lambda *args: value)
    text = repr(result)
    assert result.passed is False and "\n" not in text, text
    assert "could not check" not in text, text  # named by the checker itself, not caught by the net


def test_the_alarm_does_not_swallow_an_outer_timer():
    signal.setitimer(signal.ITIMER_REAL, 30)
    try:
        unit01.check_evaluation_count(lambda m, n: 2 * m * n)
        left = signal.getitimer(signal.ITIMER_REAL)[0]
        assert 25 < left <= 30
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def test_a_loop_that_swallows_every_exception_is_still_stopped_and_the_next_check_runs(monkeypatch):
    monkeypatch.setattr(exercises, "TIME_LIMIT", 0.2)

    def student(m, n):
        while True:
            try:
                time.sleep(0.001)
            except BaseException:  # what a careless `except:` does
                pass
    start = time.monotonic()
    result = unit01.check_evaluation_count(student)
    assert result.passed is False and "took longer" in result.message
    assert time.monotonic() - start < 5
    assert unit01.check_evaluation_count(lambda m, n: 2 * m * n).passed is True


def test_describe_names_what_came_back():
    d = exercises.describe
    assert d(None) == "None (a missing return?)"
    assert d(np.zeros((2, 3), np.float32)) == "a float32 array of shape (2, 3)"
    assert d([[1, 2], [3]]).startswith("a ragged list")
    assert d((np.zeros(2), 1)) == "a tuple of 2: (a float64 array of shape (2,), the int 1)"
    assert d(True) == "the bool True"


def test_an_answer_calling_a_watched_function_is_named_even_when_it_swallows_the_exception():
    from minitransformer import layers

    def student():
        try:
            return layers.gelu_forward(np.zeros(3))
        except BaseException:
            return None
    value, failed = exercises.attempt("x", student, forbid=(layers.gelu_forward,))
    assert value is None and "layers.gelu_forward" in failed.message


def test_calling_the_fast_kernel_is_named_too():
    from minitransformer import backend
    fast = backend.table("fast")["linear_backward"]
    assert fast is not backend.REFERENCE["linear_backward"]

    def student(dout, x, W):
        return fast(dout, (x, W), True, True, True)
    result = unit01.check_linear_backward(student)
    assert result.passed is False and "linear_backward" in result.message and "own" in result.message


def cancelling_sum_case():
    """A float32 linear backward whose db sums six terms of size ~1 to ~1e-5: the correct
    float32 answer carries the terms' rounding, ~1e-7, large beside the sum itself."""
    g = np.random.default_rng(3)
    N, d_in, d_out = 6, 4, 1
    x, W = g.standard_normal((N, d_in)).astype(np.float32), g.standard_normal((d_in, d_out)).astype(np.float32)
    dout = g.standard_normal((N, d_out)).astype(np.float32)
    dout[-1] = -dout[:-1].sum(axis=0, dtype=np.float64) + 1e-5  # the column now sums to ~1e-5
    inputs = tuple(a.astype(np.float64) for a in (dout, x, W))
    reference = (lambda *a: dict(zip(("dx", "dW", "db"), ref.linear_backward(*a))), inputs)
    return (dout, x, W), reference


def in_float32(dout, x, W):  # a correct answer, computed in float32 as a student would
    return dout @ W.T, x.T @ dout, sum(dout[i] for i in range(len(dout)))


def test_a_correct_float32_answer_passes_where_its_sum_cancels():
    args, reference = cancelling_sum_case()
    expected = reference[0](*reference[1])
    _, _, db = in_float32(*args)
    # the case is hard: beside the entry itself, the float32 rounding exceeds the float32 threshold
    assert exercises.rel_error(db, expected["db"]) > exercises.TOL32
    worst, failed = run_case("t", in_float32, args, ("dout", "x", "W"), expected, "here", reference)
    assert failed is None and worst <= exercises.TOL32


@pytest.mark.parametrize("slip", ["first rows", "last row twice"])
def test_a_slip_still_fails_where_the_sum_cancels(slip):
    """A slip that moves db by a term's size fails here too. (One that scales db, a mean for
    a sum, moves it by ~1e-5 only, inside the terms' rounding: this case cannot tell, and
    the checkers' other cases, where db does not cancel, name it.)"""
    args, reference = cancelling_sum_case()
    expected = reference[0](*reference[1])

    def wrong(dout, x, W):
        dx, dW, db = in_float32(dout, x, W)
        return dx, dW, {"first rows": dout[:-1].sum(axis=0), "last row twice": db + dout[-1]}[slip]
    _, failed = run_case("t", wrong, args, ("dout", "x", "W"), expected, "here", reference)
    assert failed is not None and failed.passed is False and failed.message.startswith("db: max relative error")
