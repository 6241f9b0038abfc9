"""Checkers for the course's exercises (notebooks/): each takes what the student wrote and
returns a Result, shown in the notebook as one line, PASS or FAIL, with the measured error or
the expected value.

    from minitransformer.exercises import unit01 as ex
    ex.check_linear_backward(linear_backward)      # -> PASS linear backward: ...

One module per unit: unit01.py for notebook 01, ... A unit module holds its checkers and
nothing that gives an answer away; the work is in _unitNN.py, the reference answers in
_reference.py. The helpers below are what every checker is made of:

- every call of the student's code goes through `attempt`: a time limit (TIME_LIMIT seconds, a
  signal alarm in the main thread, so a loop that never ends is stopped and the kernel keeps
  going), any exception turned into one FAIL line, and a watch on the package functions the
  exercise asks the student to write (an answer that merely calls them FAILs and says so);
- `describe` says in a few words what came back, so a malformed return is named, not a traceback;
- `checker` wraps each check: should anything still go wrong while checking, the student sees
  one FAIL line saying so, never a traceback.
"""
import functools
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass

import numpy as np

TIME_LIMIT = 10.0  # seconds for one call of the student's code; every reference answer takes < 0.1 s

# Tolerances, derived from floating-point error. The reference is computed in float64 from the
# same inputs; a correct answer differs from it only by rounding: a few dozen operations on
# O(1) numbers, each off by at most 2^-53 ~ 1.1e-16 relative, so ~1e-14 of the largest entry.
# 1e-9 leaves a factor 10^4-10^5 for a different order of operations, and sits far below the
# error of a slip: measured over the tests' catalogues of wrong answers, 1e-2 and more for a
# missing term or factor or a transpose, 3e-5 for the exact (erf) GELU in place of the tanh form.
TOL64 = 1e-9
# float32 inputs: 2^-24 ~ 6e-8 per operation, the same few dozen operations -> ~1e-6; 1e-4
# leaves a factor 100 and sits 100 below the structural slips (every check also runs float64
# cases, which catch the erf GELU).
TOL32 = 1e-4


@dataclass
class Result:
    """The outcome of one check: `passed` (None: not implemented yet) and one line saying why."""
    name: str
    passed: bool | None
    message: str

    def __bool__(self):
        return bool(self.passed)

    def __repr__(self):
        if self.passed is None:
            return f"not implemented yet: {self.name} ({self.message})"
        return f"{'PASS' if self.passed else 'FAIL'} {self.name}: {self.message}"

    _repr_pretty_ = lambda self, p, cycle: p.text(repr(self))  # noqa: E731  (IPython's display)


def fail(name, message):
    return Result(name, False, message)


def one_line(text, limit=160):
    """The first line of `text`, cut to `limit` characters: a message stays one line."""
    text = str(text).strip().splitlines()[0] if str(text).strip() else ""
    return text if len(text) <= limit else text[:limit - 3] + "..."


# ----------------------------------------------------------------------------- describing a value


def describe(value, depth=0):
    """A few words on what a value is: 'a float64 array of shape (3, 4)', 'a tuple of 3: (...)',
    'None (a missing return?)', 'a ragged list of 2 rows' ..."""
    if value is None:
        return "None (a missing return?)" if depth == 0 else "None"
    if isinstance(value, np.ndarray):
        return f"a {value.dtype} array of shape {value.shape}"
    if isinstance(value, (bool, np.bool_)):
        return f"the bool {value}"
    if isinstance(value, (int, np.integer)):
        return f"the {type(value).__name__} {value}"
    if isinstance(value, (float, np.floating)):
        return f"the {type(value).__name__} {value!r}"
    if isinstance(value, (str, bytes)):
        return f"the {type(value).__name__} {one_line(repr(value), 40)}"
    if isinstance(value, (tuple, list)):
        kind = type(value).__name__
        if depth >= 1:
            return f"a {kind} of {len(value)}"
        if value and all(isinstance(v, (list, tuple)) for v in value) and len({len(v) for v in value}) > 1:
            return f"a ragged {kind} (rows of lengths {sorted({len(v) for v in value})})"
        parts = ", ".join(describe(v, depth + 1) for v in value[:5]) + (", ..." if len(value) > 5 else "")
        return f"a {kind} of {len(value)}: ({parts})"
    if isinstance(value, dict):
        return f"a dict with keys {one_line(repr(list(value)[:5]), 60)}"
    if isinstance(value, (set, frozenset)):
        return f"a {type(value).__name__} of {len(value)}"
    return f"a {type(value).__name__}"


def is_number(value):
    """A real number (Python's or NumPy's), and not a bool (True is not the answer 1)."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def is_integer(value):
    """An int (Python's or NumPy's), and not a bool: a count the student gives."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def exact(value):
    """An integer printed with thousands separators, a float with all the digits that tell two
    floats apart (repr), so two different numbers are never shown alike."""
    if is_integer(value):
        return f"{int(value):,}"
    return repr(float(value)) if is_number(value) else describe(value)


def apart(got, expected, digits=6):
    """The two floats with `digits` significant digits, or more until they print differently:
    a FAIL line never reads "got 13.9887, expected 13.9887"."""
    for d in range(digits, 18):
        a, b = f"{float(got):.{d}g}", f"{float(expected):.{d}g}"
        if a != b:
            return a, b
    return repr(float(got)), repr(float(expected))


def as_array(value, what, shape, dtypes=None):
    """The student's `value` as a float array of `shape` -> (array, None), or (None, message)
    saying what came back: a list is accepted when it is a proper numeric array; a ragged
    list, strings, a bool or integer array, a wrong shape (the transpose named), NaN or inf
    are not. dtypes: the float dtypes allowed (default float32 and float64)."""
    if isinstance(value, np.ndarray):
        arr = value
    elif isinstance(value, (list, tuple)) or is_number(value):
        try:
            arr = np.array(value)
        except (ValueError, TypeError):
            return None, f"{what}: expected an array of shape {shape}, got {describe(value)}"
        if arr.dtype == object:
            return None, f"{what}: expected an array of shape {shape}, got {describe(value)}"
    else:
        return None, f"{what}: expected an array of shape {shape}, got {describe(value)}"
    if arr.dtype.kind not in "f":
        return None, f"{what}: expected a float array, got {describe(arr)}"
    allowed = dtypes or (np.float32, np.float64)
    if arr.dtype not in [np.dtype(d) for d in allowed]:
        return None, f"{what}: expected dtype {' or '.join(np.dtype(d).name for d in allowed)}, got {arr.dtype}"
    if arr.shape != tuple(shape):
        hint = ""
        if arr.ndim == 2 and arr.shape == tuple(shape)[::-1] and shape[0] != shape[1]:
            hint = " (the transpose?)"
        return None, f"{what}: expected shape {tuple(shape)}, got {arr.shape}{hint}"
    if not np.all(np.isfinite(arr)):
        return None, f"{what} holds NaN or inf"
    return arr, None


def rel_error(a, b, floor=1e-300):
    """max |a - b| / max(|a|max + |b|max, floor), in float64: the error relative to the
    largest entry (gradcheck.rel_error's form), or to `floor` when that is larger: the size
    of the terms summed into an entry that cancels (_grads.term_sizes measures it)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.size == 0:
        return 0.0
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(a)) + np.max(np.abs(b)), floor, 1e-300))


# ----------------------------------------------------------------------------- calling the student's code


class _TimeUp(BaseException):
    """Raised by the alarm inside the student's code (a BaseException: `except Exception` in
    the student's loop does not swallow it)."""


class _Forbidden(BaseException):
    """Raised when the student's code calls a package function the exercise asks them to write."""

    def __init__(self, label):
        super().__init__(label)
        self.label = label


def _run(fn, args, limit, watched):
    """fn(*args) under a time limit, with watched code objects -> value; raises _TimeUp or
    _Forbidden. In the main thread (a notebook's cells run there) a SIGALRM at `limit` raises
    _TimeUp inside the student's code. Should the code swallow it (a bare `except:` in a loop),
    the alarm repeats every 5 ms and makes the student's frames raise _TimeUp at their next line,
    which an except clause's own body cannot catch. The previous handler, timer and trace
    function are restored. Elsewhere than the main thread: a daemon thread joined for `limit`
    (a call that never ends then keeps its thread: Python cannot stop another thread)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        return _run_in_thread(fn, args, limit, watched)
    state = {"armed": True, "alarms": 0}
    here = sys._getframe()
    traced = []

    def stop_at_next_line(frame, event, arg):
        if state["armed"]:
            raise _TimeUp
        return None

    def on_alarm(signum, frame):
        if not state["armed"]:
            return
        state["alarms"] += 1
        if state["alarms"] == 1:
            raise _TimeUp
        f = frame  # swallowed: trace the student's frames, down from here to this call
        while f is not None and f is not here:
            f.f_trace, f.f_trace_lines = stop_at_next_line, True
            traced.append(f)
            f = f.f_back
        sys.settrace(stop_at_next_line)

    seen = []
    old_profile, old_trace = sys.getprofile(), sys.gettrace()
    old_handler = signal.signal(signal.SIGALRM, on_alarm)
    old_timer = signal.setitimer(signal.ITIMER_REAL, limit, 0.005)
    start = time.monotonic()
    try:
        if watched:
            sys.setprofile(_watcher(watched, seen))
        try:
            value = fn(*args)
        finally:
            state["armed"] = False
            sys.setprofile(old_profile)
        if seen:  # the student's code caught the exception: it still called the function
            raise _Forbidden(seen[0])
        return value
    finally:
        state["armed"] = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_handler)
        if traced:
            sys.settrace(old_trace)
            for f in traced:
                f.f_trace = None
        if old_timer[0] > 0:  # someone else's alarm was pending: give it back what is left of it
            signal.setitimer(signal.ITIMER_REAL, max(old_timer[0] - (time.monotonic() - start), 1e-3),
                             old_timer[1])


def _run_in_thread(fn, args, limit, watched):
    box, seen = {}, []

    def target():
        try:
            if watched:
                sys.setprofile(_watcher(watched, seen))
            box["value"] = fn(*args)
        except BaseException as e:  # handed back to the caller's thread
            box["error"] = e
        finally:
            sys.setprofile(None)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(limit)
    if thread.is_alive():
        raise _TimeUp
    if seen:
        raise _Forbidden(seen[0])
    if "error" in box:
        raise box["error"]
    return box["value"]


def _watcher(watched, seen):
    """A profile function that notes, and raises _Forbidden, when a watched code object is entered."""
    def profile(frame, event, arg):
        if event == "call" and frame.f_code in watched:
            seen.append(watched[frame.f_code])
            raise _Forbidden(watched[frame.f_code])
    return profile


def attempt(name, fn, *args, where="", forbid=(), limit=None, **kwargs):
    """Call the student's fn(*args, **kwargs) -> (value, None), or (None, Result): not written
    yet (passed None), raised, took longer than the limit (TIME_LIMIT seconds unless `limit`),
    or called one of `forbid` (package functions the exercise asks the student to write).
    `where` names the case in the line."""
    limit = TIME_LIMIT if limit is None else limit
    watched = {f.__code__: f"{f.__module__.replace('minitransformer.', '')}.{f.__qualname__}"
               for f in forbid}
    on = f" on {where}" if where else ""
    if not callable(fn):
        return None, fail(name, f"expected your function, got {describe(fn)}")
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):  # its NaN shows in the line, not as a warning
            warnings.simplefilter("ignore")
            call = functools.partial(fn, **kwargs) if kwargs else fn
            return _run(call, args, limit, watched), None
    except NotImplementedError:
        return None, Result(name, None, "write your solution in the cell above, run it, then run this cell again")
    except _TimeUp:
        return None, fail(name, f"your code took longer than {limit:g} s{on} and was stopped")
    except _Forbidden as e:
        return None, fail(name, f"your answer calls the package's own {e.label}, the operation this "
                                f"exercise asks you to write: write it yourself")
    except RecursionError:
        return None, fail(name, f"your code raised RecursionError{on}: a function that calls itself without end?")
    except (Exception, SystemExit) as e:  # the student's code failed: say how, in one line
        return None, fail(name, f"your code raised {type(e).__name__}{on}: {one_line(e)}")


def checker(name):
    """Decorator for a check: whatever escapes it becomes one FAIL line naming it, never a
    traceback (the checks are written not to let anything escape; this is the net)."""
    def wrap(check):
        @functools.wraps(check)
        def run(*args, **kwargs):
            try:
                result = check(*args, **kwargs)
            except (_TimeUp, _Forbidden, KeyboardInterrupt):
                raise
            except Exception as e:
                return fail(name, f"could not check your answer ({type(e).__name__}: {one_line(e, 100)})")
            return result
        return run
    return wrap


def check_number(name, got, expected, tolerance=0.0):
    """A number the student worked out: PASS when |got - expected| <= tolerance."""
    if not is_number(got):
        return fail(name, f"expected a number, got {describe(got)}")
    ok = abs(got - expected) <= tolerance
    return Result(name, ok, f"got {exact(got)}" + ("" if ok else f", expected {exact(expected)}"))


def unpack(name, got, names, where=""):
    """The student's returned tuple (or list) of len(names) -> (items, None), or (None, Result)
    saying what came back instead."""
    on = f" on {where}" if where else ""
    if isinstance(got, (tuple, list)) and len(got) == len(names):
        return list(got), None
    return None, fail(name, f"expected {len(names)} values ({', '.join(names)}), got {describe(got)}{on}")


def unchanged(name, originals, copies, labels):
    """None when every array handed to the student is as it was, else the FAIL naming it."""
    for original, copy, label in zip(originals, copies, labels):
        if isinstance(original, np.ndarray) and not np.array_equal(original, copy, equal_nan=True):
            return fail(name, f"your function wrote into its argument {label}: leave what you "
                              f"were handed unchanged (the caller still needs it)")
    return None


def rng():
    """A fresh generator for every call: the cases are new each time a check runs."""
    return np.random.default_rng()


def distinct(*sizes):
    """True when no two of the sizes are equal (so a swapped pair of axes changes a shape)."""
    return len(set(sizes)) == len(sizes)


def package_ops(*names):
    """The package's own functions for the operations `names` (backend.REFERENCE's keys), on
    both paths: the reference in layers.py, ... and the fast kernel where there is one. A
    check passes them as `forbid` to attempt."""
    from .. import backend, tools  # noqa: F401  (tools installs the path "fast")
    fast = backend.table("fast")
    return tuple({backend.REFERENCE[n] for n in names} | {fast[n] for n in names})
