"""The work behind unit08.py (notebooks/08_capstone_block_backward.ipynb): the block, its random
cases, running the student's backward, and comparing it gradient by gradient. unit08.py exposes
the public part; the reference answer is in _block_reference.py.

The tolerance, derived from float64 round-off: one operation rounds to within u = 2^-53 ~ 1.1e-16
of the exact result; a gradient here is the end of at most ~40 dependent steps, each a sum of at
most K ~ 100 products, so two correct orders of computation may differ by about 40 K u ~ 5e-13 of
the gradients' scale (measured: below 1e-14, tests/test_exercises_08.py). TOLERANCE = 1e-10
leaves a margin of 200 over that bound, and stays far below what a slip does: measured on the
tests' catalogue, a LayerNorm without its eps moves its gradient by 7e-7 of its scale at the least,
the exact (erf) GELU by 7e-5, every structural slip (a path, a transpose, a scale) by 7e-3 or more.
"""
import math
import signal
import sys
import threading
import warnings
from pathlib import Path

import numpy as np

from ..gradcheck import rel_error as _rel_error
from ..layers import gelu_forward, softmax_forward  # the forward steps block_forward shows
from . import Result

EPS = 1e-5  # the LayerNorms' epsilon
TOLERANCE = 1e-10  # max relative error of a gradient (module doc: derived from float64 round-off)
CAUSE_TOLERANCE = 1e-8  # an answer this close to a known slip is named as that slip
TIME_LIMIT = 10.0  # seconds for one call of the student's backward (the reference takes ~1 ms)
N_CASES = 3  # random blocks per check


# ----------------------------------------------------------------------------- the block


def init_block(rng, C, n_heads, F, m, r=None):
    """The block's parameters at a generic point, float64: {name: array}.

    C width, n_heads H (C % H == 0), F feed-forward width, m adapter bottleneck, r LoRA rank
    (None: no LoRA). Weights have std ~ 1/sqrt(d_in), biases and betas are nonzero, gammas sit
    around 1 and LoRA's B is not zero, so that every gradient is of order one and none vanishes.
    """
    def w(d_in, d_out):
        return rng.standard_normal((d_in, d_out)) / math.sqrt(d_in)

    def b(n):
        return 0.3 * rng.standard_normal(n)

    p = {}
    for t in ("q", "k", "v", "o"):
        p[f"W_{t}"], p[f"b_{t}"] = w(C, C), b(C)
    p["W_down1"], p["b_down1"], p["W_up1"], p["b_up1"] = w(C, m), b(m), w(m, C), b(C)
    p["gamma1"], p["beta1"] = 1 + 0.3 * rng.standard_normal(C), b(C)
    p["W_1"], p["b_1"], p["W_2"], p["b_2"] = w(C, F), b(F), w(F, C), b(C)
    p["W_down2"], p["b_down2"], p["W_up2"], p["b_up2"] = w(C, m), b(m), w(m, C), b(C)
    p["gamma2"], p["beta2"] = 1 + 0.3 * rng.standard_normal(C), b(C)
    if r is not None:
        for t in ("q", "v"):
            p[f"A_{t}"], p[f"B_{t}"] = w(C, r), w(r, C)
    return p


def block_forward(x, p, n_heads, s=None, nudge=None):
    """The post-LN block with its two Houlsby adapters, and LoRA on W_q and W_v when s is given.

    x (B, T, C), p the parameters (init_block), n_heads H, s the LoRA scale alpha / r (None: no
    LoRA) -> out (B, T, C), cache = (acts, p, H, s); acts {name: array} holds every intermediate,
    and xhat1, rstd1, xhat2, rstd2 kept for the LayerNorms' backward.
    nudge {name: array}: added to that intermediate where it is made (the tests' finite
    differences of the intermediates' gradients); leave it None.
    """
    acts = {"x": x}

    def keep(name, value):  # record an intermediate (nudged only in the tests)
        if nudge is not None and name in nudge:
            value = value + nudge[name]
        acts[name] = value
        return value

    B, T, C = x.shape
    H = n_heads
    hs = C // H

    def split(t):  # (B, T, C) -> (B, H, T, hs)
        return t.reshape(B, T, H, hs).transpose(0, 2, 1, 3)

    def layernorm(r, gamma, beta, n):  # over the last axis, as layers.layernorm_forward
        mu = r.mean(axis=-1, keepdims=True)  # (B, T, 1)
        rstd = 1 / np.sqrt(((r - mu) ** 2).mean(axis=-1, keepdims=True) + EPS)  # (B, T, 1)
        xhat = (r - mu) * rstd  # (B, T, C)
        acts[f"xhat{n}"], acts[f"rstd{n}"] = xhat, rstd
        return xhat * gamma + beta

    # ---- attention sub-layer
    q = x @ p["W_q"] + p["b_q"]  # (B, T, C) @ (C, C) -> (B, T, C)
    v = x @ p["W_v"] + p["b_v"]  # (B, T, C)
    if s is not None:  # LoRA: a low-rank branch beside the frozen W_q and W_v
        uq = keep("uq", x @ p["A_q"])  # (B, T, C) @ (C, r) -> (B, T, r)
        uv = keep("uv", x @ p["A_v"])  # (B, T, r)
        q = q + s * (uq @ p["B_q"])  # (B, T, r) @ (r, C) -> (B, T, C)
        v = v + s * (uv @ p["B_v"])  # (B, T, C)
    q = keep("q", q)
    k = keep("k", x @ p["W_k"] + p["b_k"])  # (B, T, C)
    v = keep("v", v)
    Q, K, V = keep("Q", split(q)), keep("K", split(k)), keep("V", split(v))  # (B, H, T, hs)
    S = keep("S", Q @ K.swapaxes(-1, -2) / math.sqrt(hs))  # (B, H, T, hs) @ (B, H, hs, T) -> (B, H, T, T)
    P = keep("P", softmax_forward(S)[0])  # (B, H, T, T), over the keys (last axis)
    ctx = keep("ctx", P @ V)  # (B, H, T, T) @ (B, H, T, hs) -> (B, H, T, hs)
    merged = keep("merged", ctx.transpose(0, 2, 1, 3).reshape(B, T, C))  # heads merged: (B, T, C)
    att = keep("att", merged @ p["W_o"] + p["b_o"])  # (B, T, C)
    # ---- adapter 1 (Houlsby): on the sub-layer's output, before the residual add
    z1 = keep("z1", att @ p["W_down1"] + p["b_down1"])  # (B, T, C) @ (C, m) -> (B, T, m)
    g1 = keep("g1", gelu_forward(z1)[0])  # (B, T, m)
    a1 = keep("a1", att + g1 @ p["W_up1"] + p["b_up1"])  # (B, T, m) @ (m, C) -> (B, T, C), with skip
    # ---- add & norm 1
    res1 = keep("res1", x + a1)  # (B, T, C)
    h = keep("h", layernorm(res1, p["gamma1"], p["beta1"], 1))  # (B, T, C)
    # ---- feed-forward sub-layer
    e = keep("e", h @ p["W_1"] + p["b_1"])  # (B, T, C) @ (C, F) -> (B, T, F)
    g = keep("g", gelu_forward(e)[0])  # (B, T, F)
    f = keep("f", g @ p["W_2"] + p["b_2"])  # (B, T, F) @ (F, C) -> (B, T, C)
    # ---- adapter 2
    z2 = keep("z2", f @ p["W_down2"] + p["b_down2"])  # (B, T, m)
    g2 = keep("g2", gelu_forward(z2)[0])  # (B, T, m)
    a2 = keep("a2", f + g2 @ p["W_up2"] + p["b_up2"])  # (B, T, C)
    # ---- add & norm 2
    res2 = keep("res2", h + a2)  # (B, T, C)
    out = layernorm(res2, p["gamma2"], p["beta2"], 2)  # (B, T, C)
    return out, (acts, p, H, s)


def gradient_names(lora=False, upto=None):
    """The keys the backward returns, in the order it computes them: d<name> for every
    intermediate and every parameter (LoRA: also duq, duv and the four matrices' gradients).
    upto: the last key wanted ("dh": the feed-forward half, from the output down to h)."""
    names = ["dres2", "dgamma2", "dbeta2", "da2", "dW_up2", "db_up2", "dg2", "dz2", "dW_down2", "db_down2",
             "df", "dW_2", "db_2", "dg", "de", "dW_1", "db_1", "dh",
             "dres1", "dgamma1", "dbeta1", "da1", "dW_up1", "db_up1", "dg1", "dz1", "dW_down1", "db_down1",
             "datt", "dW_o", "db_o", "dmerged", "dctx", "dP", "dV", "dS", "dQ", "dK", "dq", "dk", "dv"]
    if lora:
        names += ["dB_q", "duq", "dA_q", "dB_v", "duv", "dA_v"]
    names += ["dW_q", "db_q", "dW_k", "db_k", "dW_v", "db_v", "dx"]
    return names if upto is None else names[:names.index(upto) + 1]


# ----------------------------------------------------------------------------- the random cases


def _case(rng, lora):
    """One random block: x, p, H, s, dout. B >= 2 (a missing sum over the batch shows), H >= 2
    (a wrong split of the heads shows), T != hs, H != hs, F != C, m and r small and different,
    so that no two slips give the same numbers."""
    H = int(rng.integers(2, 4))
    hs = int(rng.choice([k for k in range(2, 6) if k != H]))  # H = hs would make sqrt(C) = hs
    T = int(rng.choice([t for t in range(2, 7) if t != hs]))
    B = int(rng.integers(2, 4))
    C = H * hs
    F = int(rng.choice([f for f in range(C + 1, 3 * C + 1) if f != C]))
    m = int(rng.integers(2, 5))
    r = int(rng.choice([k for k in (1, 2, 3) if k != m])) if lora else None
    p = init_block(rng, C, H, F, m, r)
    s = float(rng.uniform(1.2, 3.0)) / r if lora else None  # alpha / r, alpha not a round number
    x = rng.standard_normal((B, T, C))
    dout = rng.standard_normal((B, T, C))
    return x, p, H, s, dout


def _unchanged(theirs, cache):
    """Did the student's copy of the cache come back as it went in (same names, same arrays)?"""
    for handed, kept in ((theirs[0], cache[0]), (theirs[1], cache[1])):
        if set(handed) != set(kept):
            return False
        for key, value in kept.items():
            other = handed[key]
            if not (isinstance(other, np.ndarray) and other.shape == value.shape and np.array_equal(other, value)):
                return False
    return True


def _copy(cache):
    acts, p, H, s = cache
    return ({k: v.copy() for k, v in acts.items()}, {k: v.copy() for k, v in p.items()}, H, s)


# ----------------------------------------------------------------------------- running the student's code

_PACKAGE = Path(__file__).resolve().parents[1]
_EXERCISES = Path(__file__).resolve().parent
# what an answer may not call: the package's composite backward passes (the attention's, the
# adapter's, LoRA's, any module's .backward, the fast kernels' of the same names) and finite
# differences. The single operations' backward passes of unit 01 (layers.linear_backward, ...) are
# allowed: composing them is the exercise.
_FORBIDDEN = {"attention_backward", "attend_backward", "adapter_backward", "lora_backward", "backward",
              "numerical_gradient", "check_function", "check_module", "check_model"}


class _TimeUp(BaseException):
    """Raised into the student's code when its time is up (a BaseException, so that an
    `except Exception` in that code does not swallow it; the alarm repeats for a bare `except`)."""


def _run(fn, args, limit=None):
    """fn(*args) -> (value, None, calls) or (None, message, calls); calls: the package's backward
    passes (and finite differences) it called. A run longer than `limit` seconds is stopped: by
    SIGALRM in the main thread; elsewhere (or without SIGALRM) fn runs in a daemon thread that is
    abandoned when the time is up."""
    limit = TIME_LIMIT if limit is None else limit
    calls = []
    slow = f"took longer than {limit:g} s (the reference takes about a millisecond)"

    def profile(frame, event, arg):
        if event == "call":
            code = frame.f_code
            path = Path(code.co_filename)
            if code.co_name in _FORBIDDEN and _PACKAGE in path.parents and _EXERCISES not in path.parents:
                calls.append(f"{path.stem}.{code.co_name}")
            elif path.name == "_block_reference.py" and _EXERCISES == path.parent:
                calls.append("the checker's own reference")

    outcome = {}

    def call():  # -> outcome["value"] or outcome["error"]
        old_profile = sys.getprofile()
        sys.setprofile(profile)
        try:  # a NaN the student's code makes shows in the verdict's line, not as a warning
            with warnings.catch_warnings(), np.errstate(all="ignore"):
                warnings.simplefilter("ignore")
                outcome["value"] = fn(*args)
        except Exception as e:  # the student's code failed
            outcome["error"] = e
        finally:
            sys.setprofile(old_profile)

    if hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread():
        running = [True]  # the alarm interrupts the student's code only, never the lines after it

        def on_alarm(signum, frame):
            if running[0]:
                raise _TimeUp
        old_handler = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, limit, 0.05)  # then every 50 ms until cleared
        try:
            call()
            running[0] = False
        except _TimeUp:
            outcome["slow"] = True
        finally:
            running[0] = False
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old_handler)
    else:
        worker = threading.Thread(target=call, daemon=True)
        worker.start()
        worker.join(limit)
        if worker.is_alive():
            outcome["slow"] = True
    found = sorted(set(calls))
    if outcome.get("slow"):
        return None, slow, found
    error = outcome.get("error")
    if isinstance(error, NotImplementedError):
        return None, NotImplemented, found
    if error is not None:  # say how, in one line
        text = str(error).strip().splitlines()[0].strip() if str(error).strip() else ""
        return None, f"your code raised {type(error).__name__}" + (f": {text}" if text else ""), found
    return outcome.get("value"), None, found


def _shape_hint(key, got, want):
    """Why an answer has the wrong shape, in one clause."""
    if got == want[::-1] and len(want) == 2:
        return "transposed: a weight's gradient has the weight's shape (d_in, d_out)"
    if len(got) > len(want) and got[len(got) - len(want):] == want:
        return ("not summed over the batch and the positions: the parameter is used at every (b, t), so "
                "its gradient sums over both")
    if len(want) == 3 and got == (want[0] * want[1], want[2]):
        return f"flattened: return {key} in the shape of {key[1:]}, (B, T, ...)"
    if len(want) == 4 and len(got) == 3:
        return "the heads are not split: per-head gradients are (B, H, T, hs), or (B, H, T, T) for P and S"
    if len(want) == 3 and len(got) == 4:
        return "the heads are not merged back: (B, H, T, hs) -> (B, T, H, hs) -> (B, T, C)"
    return f"{key} has the shape of {key[1:]}"


def _describe(value):
    if isinstance(value, (list, tuple)):
        return f"a {type(value).__name__} of {len(value)}"
    return type(value).__name__


def _first_divergence(got, ref, cache, dout, names, wanted):
    """-> None when every gradient matches, else (one-line message)."""
    from ._block_reference import CONSUMERS
    for i, key in enumerate(names):
        matched = (f"the {i} before it match" if i > 1 else "the one before it matches" if i == 1
                   else "it is the first in backward order")
        if key not in got:
            if key[1:] in got:
                return (f"no {key!r} in your dict, but a {key[1:]!r}: the keys are 'd' + the name of the "
                        f"variable ('{key}' for {key[1:]}), as in {wanted}")
            if i == 0:
                return (f"no {key!r} in your dict: it must hold a gradient for every name in "
                        f"{wanted}, in any order")
            return f"{i} of {len(names)} gradients match, in backward order; the next, {key!r}, is missing from your dict"
        value = got[key]
        if value is None:
            return f"{key} is None ({matched})"
        try:
            arr = np.asarray(value)
        except Exception:
            return f"{key} is not an array: got {_describe(value)} ({matched})"
        if arr.dtype == object or not np.issubdtype(arr.dtype, np.number):
            return f"{key} is not an array of numbers: got {_describe(value)} of dtype {arr.dtype} ({matched})"
        want = ref[key]
        if arr.shape != want.shape:
            return (f"{key} has shape {arr.shape}, expected {want.shape} ({matched}): "
                    f"{_shape_hint(key, arr.shape, want.shape)}")
        if arr.dtype != np.float64:
            return f"{key} has dtype {arr.dtype}: the block runs in float64, and so must its gradients ({matched})"
        if not np.all(np.isfinite(arr)):
            return f"{key} holds NaN or inf ({matched})"
        err = _rel_error(arr, want, tiny=_floor(key, ref))
        if err <= TOLERANCE:
            continue
        head = f"{key} is the first gradient that diverges: relative error {err:.1e} > {TOLERANCE:.0e} ({matched})"
        if not np.any(arr):
            return f"{head}: it is all zeros"
        cause = _cause(key, arr, want, ref, cache, dout)
        return f"{head}: {cause}" if cause else f"{head}; look at the step that uses {key[1:]}: forward was {CONSUMERS[key]}"
    return None


def _floor(key, ref):
    """The smallest scale a gradient is measured against: a weight's or a bias's is its upstream
    gradient's (db_k is zero in exact arithmetic, and what a correct answer holds there is the
    round-off of summing dk, about u times dk's scale); otherwise rel_error's usual 1e-3."""
    from ._block_reference import WEIGHT_INPUTS
    if key in WEIGHT_INPUTS:
        return max(float(np.max(np.abs(ref[WEIGHT_INPUTS[key][1]]))), 1e-3)
    return 1e-3


def _cause(key, arr, want, ref, cache, dout):
    """The likely cause of a wrong gradient, or None when no known slip explains it."""
    from ._block_reference import CONSUMERS, likely_causes
    with np.errstate(all="ignore"):
        for candidate, cause in likely_causes(key, ref, cache, dout):
            if np.shape(candidate) == arr.shape and _rel_error(arr, candidate) <= CAUSE_TOLERANCE:
                return cause
        norm = float(np.sum(want * want))
        if norm > 0:
            c = float(np.sum(arr * want)) / norm
            if np.isfinite(c) and _rel_error(arr, c * want) <= CAUSE_TOLERANCE:
                what = "the sign is flipped" if abs(c + 1) < 1e-6 else f"{c:.4g} times the right value"
                return f"{what} (forward was {CONSUMERS[key]})"
    return None


def _check(label, fn, lora, seed, upto=None):
    from ._block_reference import reference_backward
    if not callable(fn):
        return Result(label, False, f"expected your backward function, got {_describe(fn)}")
    rng = np.random.default_rng(seed)
    names = gradient_names(lora, upto)
    wanted = "ex.gradient_names(" + ("lora=True" if lora else "upto='dh'" if upto else "") + ")"
    for n in range(N_CASES):
        x, p, H, s, dout = _case(rng, lora)
        _, cache = block_forward(x, p, H, s)
        ref = reference_backward(dout, cache)
        theirs, their_dout = _copy(cache), dout.copy()
        got, message, calls = _run(fn, (their_dout, theirs))
        if message is NotImplemented:
            return Result(label, None, "write your solution in the cell above, run it, then run this cell again")
        if calls:
            return Result(label, False, f"your answer calls {', '.join(calls)}: this exercise is to write the "
                                        "block's backward yourself, from linear, GELU, LayerNorm and softmax steps "
                                        "(layers.linear_backward and the other single operations are allowed)")
        if message is not None:
            return Result(label, False, message)
        if not isinstance(got, dict):
            return Result(label, False, f"expected a dict {{'{names[0]}': array, ...}} with every name in "
                                        f"{wanted}, got {_describe(got)}")
        try:  # a plain dict, read once: a dict subclass of the student's may misbehave
            got = {key: dict.__getitem__(got, key) for key in dict.keys(got)}
        except Exception as e:
            return Result(label, False, f"your dict could not be read: {type(e).__name__}")
        if not np.array_equal(their_dout, dout):
            return Result(label, False, "your backward wrote into dout, the array it was handed: compute "
                                        "new arrays (dx = dout + ..., never dout += ...)")
        if not _unchanged(theirs, cache):
            return Result(label, False, "your backward wrote into the cache (an intermediate or a parameter): "
                                        "compute new arrays instead")
        failure = _first_divergence(got, ref, cache, dout, names, wanted)
        if failure is not None:
            B, T, C = x.shape
            return Result(label, False, f"{failure} [block {n + 1} of {N_CASES}: B={B}, T={T}, C={C}, "
                                        f"H={H}, F={p['W_1'].shape[1]}, m={p['W_down1'].shape[1]}"
                                        + (f", r={p['A_q'].shape[1]}" if lora else "") + "]")
    return Result(label, True, f"all {len(names)} gradients match the reference, in backward order, on "
                               f"{N_CASES} random blocks (relative error below {TOLERANCE:.0e})")


def check_ffn_half_backward(fn, seed=None):
    """fn(dout, cache) -> {"d<name>": array} for every name in gradient_names(upto="dh"): the
    block's backward from the output down to h (add & norm 2, adapter 2, the feed-forward
    sub-layer). seed: the random blocks (None: fresh ones at every call)."""
    return _check("feed-forward half backward", fn, False, seed, upto="dh")


def check_block_backward(fn, seed=None):
    """fn(dout, cache) -> {"d<name>": array} for every name in gradient_names(), for the block of
    block_forward without LoRA. seed: the random blocks (None: fresh ones at every call)."""
    return _check("block backward", fn, False, seed)


def check_lora_backward(fn, seed=None):
    """fn(dout, cache) -> {"d<name>": array} for every name in gradient_names(lora=True), for the
    block of block_forward with LoRA on W_q and W_v (cache[3] = s, the scale alpha / r)."""
    return _check("block backward with LoRA", fn, True, seed)
