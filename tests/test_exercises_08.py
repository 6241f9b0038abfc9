"""The capstone's checker (notebooks/08_capstone_block_backward.ipynb): its private reference is
right (centred finite differences, float64, threshold OP_THRESHOLD = 1e-7 per gradient), the
solution and other correct answers pass, the usual slips FAIL naming the first gradient that
diverges and the cause, and whatever else comes back is a one-line FAIL, never a traceback."""
import math

import numpy as np
import pytest

from minitransformer import layers
from minitransformer.adapters import adapter_forward
from minitransformer.attention import attention_forward
from minitransformer.exercises import _block_reference as reference
from minitransformer.exercises import _unit08 as work
from minitransformer.exercises import unit08 as ex
from minitransformer.gradcheck import OP_THRESHOLD, numerical_gradient, rel_error

SEEDS = (0, 1, 2)


def case(seed=0, lora=False):
    x, p, H, s, dout = work._case(np.random.default_rng(seed), lora)
    out, cache = ex.block_forward(x, p, H, s)
    return x, p, H, s, dout, out, cache


# ----------------------------------------------------------------------------- the reference


@pytest.mark.parametrize("lora", [False, True])
def test_reference_matches_finite_differences(lora):
    """Every gradient the checker compares, the intermediates' included (through block_forward's
    nudge), within 1e-7 of centred finite differences."""
    x, p, H, s, dout, _, cache = case(3, lora)
    dout = dout / np.sqrt(dout.size)  # L = sum(out * dout) stays O(1), and so does its round-off
    acts = cache[0]
    ref = reference.reference_backward(dout, cache)
    assert set(ref) == set(ex.gradient_names(lora))
    nudges = {}

    def loss():
        return float(np.sum(ex.block_forward(x, p, H, s, nudge=nudges)[0] * dout))

    errors = {}
    for key in ex.gradient_names(lora):
        name = key[1:]
        if name in p:
            numerical = numerical_gradient(loss, p[name])
        elif name == "x":
            numerical = numerical_gradient(loss, x)
        else:
            nudges.clear()
            nudges[name] = np.zeros(acts[name].shape)  # C-contiguous: numerical_gradient writes through a flat view
            numerical = numerical_gradient(loss, nudges[name])
            nudges.clear()
        errors[key] = rel_error(ref[key], numerical)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= OP_THRESHOLD, (worst, errors[worst])


def test_forward_is_the_package_block():
    """block_forward computes what the package's attention, LoRA branch, adapter and LayerNorm
    compute (their forward functions, whose signatures are stable)."""
    from minitransformer.peft import lora_forward
    x, p, H, s, dout, out, cache = case(4, lora=False)
    w = {k: p[k] for k in ("W_q", "b_q", "W_k", "b_k", "W_v", "b_v", "W_o", "b_o")}
    assert rel_error(cache[0]["att"], attention_forward(x, w, H)[0]) < 1e-13
    x, p, H, s, dout, out, cache = case(4, lora=True)
    a = cache[0]
    for t in "qv":
        expected = x @ p[f"W_{t}"] + p[f"b_{t}"] + lora_forward(x, p[f"A_{t}"], p[f"B_{t}"], s)[0]
        assert rel_error(a[t], expected) < 1e-13
    ad1 = {k: p[k + "1"] for k in ("W_down", "b_down", "W_up", "b_up")}
    assert rel_error(a["a1"], adapter_forward(a["att"], ad1)[0]) < 1e-13
    assert rel_error(a["h"], layers.layernorm_forward(a["res1"], p["gamma1"], p["beta1"])[0]) < 1e-13
    assert rel_error(out, layers.layernorm_forward(a["res2"], p["gamma2"], p["beta2"])[0]) < 1e-13


def test_cases_vary_and_keep_their_promises():
    shapes = set()
    for seed in range(20):
        x, p, H, s, dout, _, cache = case(seed, lora=True)
        B, T, C = x.shape
        hs = C // H
        assert B >= 2 and H >= 2 and T != hs and H != hs and p["W_1"].shape[1] != C
        assert p["A_q"].shape[1] != p["W_down1"].shape[1] and x.dtype == np.float64
        shapes.add((B, T, C, H))
    assert len(shapes) >= 8
    # seed None: fresh blocks at every call
    draws = {work._case(np.random.default_rng(), False)[0].tobytes() for _ in range(3)}
    assert len(draws) == 3


# ----------------------------------------------------------------------------- answers


def block_backward(dout, cache):
    """The notebook's solution: plain NumPy, the reshapes written out."""
    a, p, H, s = cache
    B, T, C = a["x"].shape
    hs = C // H
    g = {}

    def layernorm_backward(dy, xhat, rstd, gamma):
        dxhat = dy * gamma
        dx = rstd * (dxhat - dxhat.mean(-1, keepdims=True) - xhat * (dxhat * xhat).mean(-1, keepdims=True))
        return dx, (dy * xhat).sum(axis=(0, 1)), dy.sum(axis=(0, 1))

    def linear_backward(dy, x, W):
        dW = x.reshape(-1, x.shape[-1]).T @ dy.reshape(-1, dy.shape[-1])
        return dy @ W.T, dW, dy.sum(axis=(0, 1))

    def gelu_backward(dy, z):
        k = math.sqrt(2 / math.pi)
        th = np.tanh(k * (z + 0.044715 * z ** 3))
        return dy * (0.5 * (1 + th) + 0.5 * z * (1 - th ** 2) * k * (1 + 3 * 0.044715 * z ** 2))

    g["dres2"], g["dgamma2"], g["dbeta2"] = layernorm_backward(dout, a["xhat2"], a["rstd2"], p["gamma2"])
    g["da2"] = g["dres2"]
    g["dg2"], g["dW_up2"], g["db_up2"] = linear_backward(g["da2"], a["g2"], p["W_up2"])
    g["dz2"] = gelu_backward(g["dg2"], a["z2"])
    df, g["dW_down2"], g["db_down2"] = linear_backward(g["dz2"], a["f"], p["W_down2"])
    g["df"] = df + g["da2"]
    g["dg"], g["dW_2"], g["db_2"] = linear_backward(g["df"], a["g"], p["W_2"])
    g["de"] = gelu_backward(g["dg"], a["e"])
    dh, g["dW_1"], g["db_1"] = linear_backward(g["de"], a["h"], p["W_1"])
    g["dh"] = dh + g["dres2"]
    g["dres1"], g["dgamma1"], g["dbeta1"] = layernorm_backward(g["dh"], a["xhat1"], a["rstd1"], p["gamma1"])
    g["da1"] = g["dres1"]
    g["dg1"], g["dW_up1"], g["db_up1"] = linear_backward(g["da1"], a["g1"], p["W_up1"])
    g["dz1"] = gelu_backward(g["dg1"], a["z1"])
    datt, g["dW_down1"], g["db_down1"] = linear_backward(g["dz1"], a["att"], p["W_down1"])
    g["datt"] = datt + g["da1"]
    g["dmerged"], g["dW_o"], g["db_o"] = linear_backward(g["datt"], a["merged"], p["W_o"])
    g["dctx"] = g["dmerged"].reshape(B, T, H, hs).transpose(0, 2, 1, 3)
    g["dP"] = g["dctx"] @ a["V"].swapaxes(-1, -2)
    g["dV"] = a["P"].swapaxes(-1, -2) @ g["dctx"]
    g["dS"] = a["P"] * (g["dP"] - (g["dP"] * a["P"]).sum(-1, keepdims=True))
    g["dQ"] = g["dS"] @ a["K"] / math.sqrt(hs)
    g["dK"] = g["dS"].swapaxes(-1, -2) @ a["Q"] / math.sqrt(hs)
    for t in "qkv":
        g[f"d{t}"] = g[f"d{t.upper()}"].transpose(0, 2, 1, 3).reshape(B, T, C)
    dx = g["dres1"]
    for t in "qkv":
        dxt, g[f"dW_{t}"], g[f"db_{t}"] = linear_backward(g[f"d{t}"], a["x"], p[f"W_{t}"])
        dx = dx + dxt
    g["dx"] = dx
    return g


def lora_part(g, cache):
    """What LoRA adds to block_backward's gradients (in place on g, a fresh dict)."""
    a, p, H, s = cache
    x = a["x"].reshape(-1, a["x"].shape[-1])
    for t in "qv":
        d, u = g[f"d{t}"], a[f"u{t}"]
        g[f"dB_{t}"] = s * u.reshape(-1, u.shape[-1]).T @ d.reshape(-1, d.shape[-1])
        g[f"du{t}"] = s * d @ p[f"B_{t}"].T
        g[f"dA_{t}"] = x.T @ g[f"du{t}"].reshape(-1, u.shape[-1])
        g["dx"] = g["dx"] + g[f"du{t}"] @ p[f"A_{t}"].T
    return g


def block_backward_lora(dout, cache):
    return lora_part(block_backward(dout, cache), cache)


def einsum_backward(dout, cache):
    """A correct answer written differently: einsum everywhere, heads kept in 4-D for the
    projections, LayerNorm through dvar and dmu (CS231n's form), GELU' through cosh."""
    a, p, H, s = cache
    B, T, C = a["x"].shape
    hs = C // H
    g = {}

    def ln(dy, r, gamma):
        mu = r.mean(-1, keepdims=True)
        var = ((r - mu) ** 2).mean(-1, keepdims=True)
        std = np.sqrt(var + work.EPS)
        dxhat = dy * gamma
        dvar = np.sum(dxhat * (r - mu), -1, keepdims=True) * -0.5 * std ** -3
        dmu = -np.sum(dxhat / std, -1, keepdims=True) + dvar * np.mean(-2 * (r - mu), -1, keepdims=True)
        dx = dxhat / std + dvar * 2 * (r - mu) / C + dmu / C
        return dx, np.einsum("btc,btc->c", dy, (r - mu) / std), np.einsum("btc->c", dy)

    def gelu_grad(z):
        k = math.sqrt(2 / math.pi)
        u = k * (z + 0.044715 * z ** 3)
        v = np.clip(u, -300, 300)  # cosh(300)^2 is finite; sech^2 there is 0 to the last bit anyway
        return 0.5 * (1 + np.tanh(u)) + 0.5 * z / np.cosh(v) ** 2 * k * (1 + 0.134145 * z ** 2)

    def lin(dy, x, W):
        return (np.einsum("btj,ij->bti", dy, W), np.einsum("bti,btj->ij", x, dy), np.einsum("btj->j", dy))

    g["dres2"], g["dgamma2"], g["dbeta2"] = ln(dout, a["res2"], p["gamma2"])
    g["da2"] = g["dres2"]
    g["dg2"], g["dW_up2"], g["db_up2"] = lin(g["da2"], a["g2"], p["W_up2"])
    g["dz2"] = g["dg2"] * gelu_grad(a["z2"])
    df, g["dW_down2"], g["db_down2"] = lin(g["dz2"], a["f"], p["W_down2"])
    g["df"] = g["da2"] + df
    g["dg"], g["dW_2"], g["db_2"] = lin(g["df"], a["g"], p["W_2"])
    g["de"] = g["dg"] * gelu_grad(a["e"])
    dh, g["dW_1"], g["db_1"] = lin(g["de"], a["h"], p["W_1"])
    g["dh"] = g["dres2"] + dh
    g["dres1"], g["dgamma1"], g["dbeta1"] = ln(g["dh"], a["res1"], p["gamma1"])
    g["da1"] = g["dres1"]
    g["dg1"], g["dW_up1"], g["db_up1"] = lin(g["da1"], a["g1"], p["W_up1"])
    g["dz1"] = g["dg1"] * gelu_grad(a["z1"])
    datt, g["dW_down1"], g["db_down1"] = lin(g["dz1"], a["att"], p["W_down1"])
    g["datt"] = g["da1"] + datt
    g["dmerged"], g["dW_o"], g["db_o"] = lin(g["datt"], a["merged"], p["W_o"])
    g["dctx"] = np.einsum("bthd->bhtd", g["dmerged"].reshape(B, T, H, hs))
    g["dP"] = np.einsum("bhid,bhjd->bhij", g["dctx"], a["V"])
    g["dV"] = np.einsum("bhij,bhid->bhjd", a["P"], g["dctx"])
    g["dS"] = a["P"] * g["dP"] - a["P"] * np.einsum("bhij,bhij->bhi", a["P"], g["dP"])[..., None]
    g["dQ"] = np.einsum("bhij,bhjd->bhid", g["dS"], a["K"]) / math.sqrt(hs)
    g["dK"] = np.einsum("bhij,bhid->bhjd", g["dS"], a["Q"]) / math.sqrt(hs)
    for t in "qkv":
        g[f"d{t}"] = np.einsum("bhtd->bthd", g[f"d{t.upper()}"]).reshape(B, T, C)
    dx = np.zeros_like(a["x"])
    dx += g["dres1"]
    for t in "qkv":
        # per head: W_t's columns of head h meet dQ's head h
        Wh = p[f"W_{t}"].reshape(C, H, hs)
        dx += np.einsum("bhtd,chd->btc", g[f"d{t.upper()}"], Wh)
        g[f"dW_{t}"] = np.einsum("btc,bhtd->chd", a["x"], g[f"d{t.upper()}"]).reshape(C, C)
        g[f"db_{t}"] = g[f"d{t.upper()}"].sum(axis=(0, 2)).reshape(C)
    if s is not None:
        for t in "qv":
            g[f"dB_{t}"] = s * np.einsum("btr,btc->rc", a[f"u{t}"], g[f"d{t}"])
            g[f"du{t}"] = s * np.einsum("btc,rc->btr", g[f"d{t}"], p[f"B_{t}"])
            g[f"dA_{t}"] = np.einsum("bti,btr->ir", a["x"], g[f"du{t}"])
            dx += np.einsum("btr,ir->bti", g[f"du{t}"], p[f"A_{t}"])
    g["dx"] = dx
    return g


def reversed_order_backward(dout, cache):
    """Correct, returned as a list of pairs turned into a dict in another order, with the
    gradients of x accumulated into a fresh array by +=, and float64 lists for the biases."""
    g = block_backward_lora(dout, cache) if cache[3] is not None else block_backward(dout, cache)
    out = {k: g[k] for k in reversed(list(g))}
    for k in out:
        if k.startswith("db_"):
            out[k] = out[k].tolist()
    return out


@pytest.mark.parametrize("seed", SEEDS)
def test_solution_passes(seed):
    result = ex.check_block_backward(block_backward, seed=seed)
    assert result.passed is True, result
    assert "all 48 gradients match" in result.message
    result = ex.check_lora_backward(block_backward_lora, seed=seed)
    assert result.passed is True, result
    assert "all 54 gradients match" in result.message


@pytest.mark.parametrize("answer", [einsum_backward, reversed_order_backward])
def test_correct_alternatives_pass(answer):
    for seed in SEEDS:
        assert ex.check_block_backward(answer, seed=seed).passed is True, ex.check_block_backward(answer, seed=seed)
        assert ex.check_lora_backward(answer, seed=seed).passed is True, ex.check_lora_backward(answer, seed=seed)


def test_round_off_between_correct_answers_is_far_below_the_tolerance():
    """The module doc's claim: two correct ways of computing differ by far less than TOLERANCE."""
    worst = 0.0
    for seed in range(6):
        for lora in (False, True):
            _, _, _, _, dout, _, cache = case(seed, lora)
            ref = reference.reference_backward(dout, cache)
            for answer in (block_backward_lora if lora else block_backward, einsum_backward):
                got = answer(dout, cache)
                worst = max(worst, max(rel_error(got[k], ref[k], tiny=work._floor(k, ref)) for k in ref))
    assert worst < 1e-13 < ex.TOLERANCE / 100


# ----------------------------------------------------------------------------- the usual slips


def with_change(change, lora=False):
    """The solution with one slip: change(g, cache, dout) edits the gradients after the fact,
    and recomputes what follows from them where the slip would propagate."""
    def answer(dout, cache):
        g = block_backward_lora(dout, cache) if lora else block_backward(dout, cache)
        change(g, cache, dout)
        return g
    return answer


def _sqrt_hs(cache):
    return math.sqrt(cache[0]["Q"].shape[-1])


def _set(key, fn):
    def change(g, cache, dout):
        a, p, H, s = cache
        g[key] = fn(g, a, p, s, dout)
    return change


def ln_without_eps(dy, r, gamma):
    xc = r - r.mean(-1, keepdims=True)
    rstd = 1 / np.sqrt((xc ** 2).mean(-1, keepdims=True))
    xhat, dxhat = xc * rstd, dy * gamma
    return rstd * (dxhat - dxhat.mean(-1, keepdims=True) - xhat * (dxhat * xhat).mean(-1, keepdims=True))


def erf_gelu_grad(z):
    cdf = 0.5 * (1 + np.array([math.erf(v / math.sqrt(2)) for v in z.ravel()]).reshape(z.shape))
    return cdf + z * np.exp(-z ** 2 / 2) / math.sqrt(2 * math.pi)


SLIPS = [  # (name, change, lora, the gradient named first, words of the cause)
    ("transposed dW_q", _set("dW_q", lambda g, a, p, s, d: g["dW_q"].T), False, "dW_q", "transposed"),
    ("transposed dW_1", _set("dW_1", lambda g, a, p, s, d: g["dW_1"].T), False, "dW_1", "transposed"),
    ("bias not summed over the batch", _set("db_1", lambda g, a, p, s, d: g["de"].sum(axis=1)), False,
     "db_1", "not summed over the batch"),
    ("bias of the first sequence only", _set("db_o", lambda g, a, p, s, d: g["datt"][0].sum(axis=0)), False,
     "db_o", "only the first sequence"),
    ("weight of the first sequence only",
     _set("dW_down2", lambda g, a, p, s, d: a["f"][0].T @ g["dz2"][0]), False, "dW_down2", "only the first sequence"),
    ("dh without the residual", _set("dh", lambda g, a, p, s, d: g["dh"] - g["dres2"]), False, "dh", "residual path"),
    ("dx without the residual", _set("dx", lambda g, a, p, s, d: g["dx"] - g["dres1"]), False, "dx", "residual path"),
    ("dx without the path through k", _set("dx", lambda g, a, p, s, d: g["dx"] - g["dk"] @ p["W_k"].T), False,
     "dx", "path through k"),
    ("adapter skip forgotten", _set("datt", lambda g, a, p, s, d: g["datt"] - g["da1"]), False, "datt",
     "skip connection"),
    ("missing 1/sqrt(hs)", lambda g, c, d: g.update(dQ=g["dQ"] * _sqrt_hs(c)), False, "dQ", "1/sqrt(hs)"),
    ("sqrt(C) for sqrt(hs)", lambda g, c, d: g.update(dK=g["dK"] * _sqrt_hs(c) / math.sqrt(c[0]["x"].shape[-1])),
     False, "dK", "sqrt(C) instead of sqrt(hs)"),
    ("LayerNorm mean term missing", _set("dres2", lambda g, a, p, s, d: a["rstd2"] * (
        d * p["gamma2"] - a["xhat2"] * (d * p["gamma2"] * a["xhat2"]).mean(-1, keepdims=True))), False,
     "dres2", "mean term"),
    ("LayerNorm without gamma", _set("dres1", lambda g, a, p, s, d: a["rstd1"] * (
        g["dh"] - g["dh"].mean(-1, keepdims=True) - a["xhat1"] * (g["dh"] * a["xhat1"]).mean(-1, keepdims=True))),
     False, "dres1", "gamma is missing"),
    ("dgamma from the LayerNorm's input", _set("dgamma2", lambda g, a, p, s, d: (d * a["res2"]).sum(axis=(0, 1))),
     False, "dgamma2", "instead of the normalised xhat2"),
    ("softmax without its sum term", _set("dS", lambda g, a, p, s, d: a["P"] * g["dP"]), False, "dS",
     "-sum(dP * P) term is missing"),
    ("P not transposed in dV", _set("dV", lambda g, a, p, s, d: a["P"] @ g["dctx"]), False, "dV",
     "P must be transposed"),
    ("heads split without the transpose", _set("dctx", lambda g, a, p, s, d: g["dmerged"].reshape(g["dctx"].shape)), False,
     "dctx", "split wrongly"),
    ("GELU's derivative missing", _set("dz2", lambda g, a, p, s, d: g["dg2"]), False, "dz2", "GELU's derivative"),
    ("half of GELU's product rule", _set("de", lambda g, a, p, s, d: g["dg"] * 0.5 * (
        1 + np.tanh(math.sqrt(2 / math.pi) * (a["e"] + 0.044715 * a["e"] ** 3)))), False, "de", "half of GELU"),
    ("LayerNorm without eps", _set("dres2", lambda g, a, p, s, d: ln_without_eps(d, a["res2"], p["gamma2"])),
     False, "dres2", "rstd without eps"),
    ("row sum as a row", _set("dS", lambda g, a, p, s, d: a["P"] * (g["dP"] - (g["dP"] * a["P"]).sum(-1)[..., None, :])),
     False, "dS", "lost its axis"),
    ("erf GELU", _set("dz1", lambda g, a, p, s, d: g["dg1"] * erf_gelu_grad(a["z1"])), False, "dz1", "exact (erf) GELU"),
    ("sign flipped", _set("dg1", lambda g, a, p, s, d: -g["dg1"]), False, "dg1", "sign is flipped"),
    ("LoRA scale missing in dB_q", _set("dB_q", lambda g, a, p, s, d: g["dB_q"] / s), True, "dB_q", "LoRA scale"),
    ("LoRA scale missing in duv", _set("duv", lambda g, a, p, s, d: g["duv"] / s), True, "duv", "LoRA scale"),
    ("dx without the LoRA paths", _set("dx", lambda g, a, p, s, d: g["dx"] - g["duq"] @ p["A_q"].T
                                       - g["duv"] @ p["A_v"].T), True, "dx", "LoRA branches"),
]


@pytest.mark.parametrize("name, change, lora, first, cause", SLIPS, ids=[s[0] for s in SLIPS])
def test_slips_fail_naming_the_first_gradient_and_the_cause(name, change, lora, first, cause):
    check = ex.check_lora_backward if lora else ex.check_block_backward
    for seed in SEEDS:
        result = check(with_change(change, lora), seed=seed)
        assert result.passed is False, (name, result)
        message = result.message
        assert message.startswith(f"{first} "), (name, message)
        assert cause in message, (name, message)
        assert "\n" not in message


def test_a_slip_propagates_but_only_its_first_gradient_is_named():
    """Forgetting the residual in dh makes every gradient below it wrong; the message names dh
    and says how many came before it."""
    names = ex.gradient_names()
    result = ex.check_block_backward(with_change(SLIPS[5][1]), seed=0)
    assert f"(the {names.index('dh')} before it match)" in result.message


def test_an_unknown_slip_points_at_the_forward_step():
    result = ex.check_block_backward(with_change(_set("dP", lambda g, a, p, s, d: g["dP"] + 0.1 * a["P"])), seed=0)
    assert result.passed is False
    assert result.message.startswith("dP is the first") and "forward was ctx = P V" in result.message


# ----------------------------------------------------------------------------- anything else that comes back


def not_written(dout, cache):
    raise NotImplementedError


def raises(dout, cache):
    return {"dx": 1 / 0}


def test_a_row_sum_without_keepdims_fails_in_one_line():
    """(B, H, T, T) minus (B, H, T): NumPy raises unless H = T (then the values are wrong, and
    named as "the row sum lost its axis", test above)."""
    slip = with_change(_set("dS", lambda g, a, p, s, d: a["P"] * (g["dP"] - (g["dP"] * a["P"]).sum(-1))))
    result = ex.check_block_backward(slip, seed=0)
    assert result.passed is False and result.message.startswith("your code raised ValueError: operands could not")
    assert not result.message.endswith(" ") and "\n" not in result.message


def test_not_written_and_exceptions_are_one_line():
    assert ex.check_block_backward(not_written).passed is None
    assert "not implemented yet" in repr(ex.check_block_backward(not_written))
    result = ex.check_block_backward(raises)
    assert result.passed is False and result.message == "your code raised ZeroDivisionError: division by zero"
    shape_error = ex.check_block_backward(lambda d, c: {"dP": c[0]["ctx"] @ c[0]["V"]})
    assert shape_error.passed is False and shape_error.message.startswith("your code raised ValueError: matmul")
    assert "\n" not in shape_error.message


@pytest.mark.parametrize("answer, words", [
    (lambda d, c: None, "expected a dict"),
    (lambda d, c: tuple(block_backward(d, c).values()), "got a tuple of 48"),
    (lambda d, c: {}, "no 'dres2' in your dict"),
    (lambda d, c: {k[1:]: v for k, v in block_backward(d, c).items()}, "the keys are 'd' + the name"),
    (lambda d, c: {k: v for k, v in block_backward(d, c).items() if k != "dW_2"}, "the next, 'dW_2', is missing"),
    (lambda d, c: {**block_backward(d, c), "dh": None}, "dh is None"),
    (lambda d, c: {**block_backward(d, c), "dz2": [[1.0, 2.0], [3.0]]}, "dz2 is not an array"),
    (lambda d, c: {**block_backward(d, c), "dres2": "dres2"}, "dres2 is not an array of numbers"),
    (lambda d, c: {**block_backward(d, c), "df": block_backward(d, c)["df"].astype(np.float32)}, "dtype float32"),
    (lambda d, c: {**block_backward(d, c), "dg": block_backward(d, c)["dg"].reshape(-1, block_backward(d, c)["dg"].shape[-1])},
     "flattened"),
    (lambda d, c: {**block_backward(d, c), "dQ": block_backward(d, c)["dq"]}, "heads are not split"),
    (lambda d, c: {**block_backward(d, c), "dz1": np.full(c[0]["z1"].shape, np.nan)}, "NaN"),
    (lambda d, c: {**block_backward(d, c), "dW_up1": np.zeros_like(c[1]["W_up1"])}, "all zeros"),
    ("not a function", "expected your backward function"),
])
def test_malformed_returns_are_one_line_fails(answer, words):
    result = ex.check_block_backward(answer, seed=0)
    assert result.passed is False, result
    assert words in result.message, result.message
    assert "\n" not in result.message


def test_writing_into_what_it_was_handed_fails():
    def into_dout(dout, cache):
        g = block_backward(dout, cache)
        dout *= 2
        return g

    def into_cache(dout, cache):
        g = block_backward(dout, cache)
        cache[0]["P"][...] = 0
        return g
    def drops_a_parameter(dout, cache):
        g = block_backward(dout, cache)
        del cache[1]["W_q"]
        return g
    assert "wrote into dout" in ex.check_block_backward(into_dout, seed=0).message
    assert "wrote into the cache" in ex.check_block_backward(into_cache, seed=0).message
    assert "wrote into the cache" in ex.check_block_backward(drops_a_parameter, seed=0).message


def test_a_dict_that_misbehaves_is_read_as_a_plain_dict():
    class Odd(dict):
        def __getitem__(self, key):
            raise KeyError(key)

        def __contains__(self, key):
            raise RuntimeError("no")
    assert ex.check_block_backward(lambda d, c: Odd(block_backward(d, c)), seed=0).passed is True


def test_calling_the_package_backward_or_finite_differences_is_named():
    from minitransformer import attention, gradcheck
    from minitransformer.adapters import adapter_backward

    def through_attention(dout, cache):
        g = block_backward(dout, cache)
        a, p, H, s = cache
        w = {k: p[k] for k in ("W_q", "b_q", "W_k", "b_k", "W_v", "b_v", "W_o", "b_o")}
        _, c = attention.attention_forward(a["x"], w, H)
        attention.attention_backward(g["datt"], c)
        return g

    def through_adapter(dout, cache):
        g = block_backward(dout, cache)
        a, p, H, s = cache
        ad = {k: p[k + "1"] for k in ("W_down", "b_down", "W_up", "b_up")}
        adapter_backward(g["da1"], adapter_forward(a["att"], ad)[1])
        return g

    def by_finite_differences(dout, cache):
        g = block_backward(dout, cache)
        x = cache[0]["x"].copy()
        gradcheck.numerical_gradient(lambda: float(np.sum(x)), x)
        return g

    for answer, name in ((through_attention, "attention_backward"), (through_adapter, "adapter_backward"),
                         (by_finite_differences, "numerical_gradient")):
        result = ex.check_block_backward(answer, seed=0)
        assert result.passed is False and name in result.message, result
        assert "write the block's backward yourself" in result.message
    # the reference itself is not a way out either
    result = ex.check_block_backward(lambda d, c: reference.reference_backward(d, c), seed=0)
    assert result.passed is False and "the checker's own reference" in result.message


def test_a_backward_that_never_returns_is_stopped(monkeypatch):
    monkeypatch.setattr(work, "TIME_LIMIT", 0.3)

    def forever(dout, cache):
        while True:
            pass
    result = ex.check_block_backward(forever, seed=0)
    assert result.passed is False and result.message.startswith("took longer than 0.3 s")

    def swallows(dout, cache):  # a loop that catches everything it can
        while True:
            try:
                while True:
                    pass
            except Exception:
                pass
    assert ex.check_block_backward(swallows, seed=0).message.startswith("took longer than 0.3 s")


def test_the_module_holds_the_checkers_and_the_block_only():
    public = {n for n in dir(ex) if not n.startswith("_")}
    assert public == set(ex.__all__) == {"init_block", "block_forward", "gradient_names", "check_ffn_half_backward",
                                         "check_block_backward", "check_lora_backward", "TOLERANCE"}


# ----------------------------------------------------------------------------- exercise 1: the feed-forward half


def ffn_half(dout, cache):
    g = block_backward(dout, cache)
    return {k: g[k] for k in ex.gradient_names(upto="dh")}


def test_the_feed_forward_half():
    assert len(ex.gradient_names(upto="dh")) == 18 and ex.gradient_names(upto="dh")[-1] == "dh"
    for seed in SEEDS:
        result = ex.check_ffn_half_backward(ffn_half, seed=seed)
        assert result.passed is True and "all 18 gradients match" in result.message, result
    assert ex.check_ffn_half_backward(block_backward, seed=0).passed is True  # more than asked: fine
    slip = with_change(_set("df", lambda g, a, p, s, d: g["df"] - g["da2"]))
    result = ex.check_ffn_half_backward(slip, seed=0)
    assert result.passed is False and result.message.startswith("df is the first") and "skip connection" in result.message
    result = ex.check_ffn_half_backward(lambda d, c: {k: v for k, v in ffn_half(d, c).items() if k != "dh"}, seed=0)
    assert result.passed is False and "17 of 18 gradients match" in result.message and "'dh', is missing" in result.message
    assert "ex.gradient_names(upto='dh')" in ex.check_ffn_half_backward(lambda d, c: [], seed=0).message
    assert ex.check_ffn_half_backward(not_written).passed is None


def test_the_single_operations_of_unit_01_are_allowed():
    """An answer may compose the package's single-operation passes: here the softmax's."""
    def with_softmax(dout, cache):
        g = block_backward(dout, cache)
        g["dS"], _ = layers.softmax_backward(g["dP"], cache[0]["P"])  # dx, {} as every backward
        return g
    assert ex.check_block_backward(with_softmax, seed=0).passed is True


def test_the_notebooks_own_solutions_pass():
    """The solution cells of the committed notebook, run as they are, pass every checker."""
    import json
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "notebooks" / "08_capstone_block_backward.ipynb"
    cells = json.loads(path.read_text())["cells"]
    sources = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
    solutions = [src for src in sources if "### BEGIN SOLUTION" in src]
    assert len(solutions) == 3
    namespace = {"np": np, "math": math, "layers": layers, "ex": ex}
    for src in solutions:
        exec(compile(src, str(path), "exec"), namespace)
    for seed in SEEDS:
        assert ex.check_ffn_half_backward(namespace["ffn_half_backward"], seed=seed).passed is True
        assert ex.check_block_backward(namespace["block_backward"], seed=seed).passed is True
        assert ex.check_lora_backward(namespace["block_backward_lora"], seed=seed).passed is True


def test_outside_the_main_thread_the_limit_still_holds(monkeypatch):
    """Without SIGALRM (another thread, or Windows) the answer runs in a thread that is abandoned."""
    import threading
    monkeypatch.setattr(work, "TIME_LIMIT", 0.3)
    results = {}

    def forever(dout, cache):
        import time
        while not results.get("done"):
            time.sleep(0.01)

    def run():
        results["slow"] = ex.check_block_backward(forever, seed=0)
        results["right"] = ex.check_block_backward(block_backward, seed=0)
        results["forbidden"] = ex.check_block_backward(lambda d, c: reference.reference_backward(d, c), seed=0)
        results["raises"] = ex.check_block_backward(raises, seed=0)
    thread = threading.Thread(target=run)
    thread.start()
    thread.join(30)
    results["done"] = True
    assert results["slow"].message.startswith("took longer than 0.3 s")
    assert results["right"].passed is True
    assert "the checker's own reference" in results["forbidden"].message
    assert results["raises"].message == "your code raised ZeroDivisionError: division by zero"


def test_the_student_copy_runs_and_says_not_implemented_yet(tmp_path):
    """The student copy of notebook 08 runs top to bottom: each check cell says "not implemented
    yet", the demonstration of a FAIL too (it wraps the student's function), and nothing raises."""
    nbformat = pytest.importorskip("nbformat")
    pytest.importorskip("nbclient")
    from pathlib import Path
    from minitransformer.tools import course
    path = Path(__file__).resolve().parents[1] / "notebooks" / "08_capstone_block_backward.ipynb"
    copy = tmp_path / path.name
    nbformat.write(course.student_copy(nbformat.read(path, as_version=4), path.name), copy)
    nb = course.execute(copy)
    shown = []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            assert output.output_type != "error", (cell.source, output.get("evalue"))
            shown.append(output.get("data", {}).get("text/plain", "") + output.get("text", ""))
    checks = [text for text in shown if "block backward" in text or "half backward" in text]
    assert len(checks) == 4 and all(text.startswith("not implemented yet: ") for text in checks), checks
