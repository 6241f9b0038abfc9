"""The reference answer of notebooks/08_capstone_block_backward.ipynb and the mistakes the
checker recognises. Private: unit08's checkers import it inside their functions, so the module
a notebook imports as `ex` holds no answer.

    reference_backward(dout, cache) -> {"d<name>": array} for every intermediate and parameter
    likely_causes(key, got, ref, cache, dout) -> [(array, cause)]: what a common slip would have
        returned for that gradient, computed from the right upstream gradients

The backward is written out here on purpose, step by step, without the package's backward
functions (they are proved against finite differences in tests/test_exercises_08.py).
Shapes: B batch, T sequence length, C width, H heads, hs = C // H, F feed-forward width,
m adapter bottleneck, r LoRA rank.
"""
import math

import numpy as np


def _gelu_grad(z):
    """GELU'(z) for the tanh form 0.5 z (1 + tanh(k (z + a z^3)))."""
    k, a = math.sqrt(2 / math.pi), 0.044715
    th = np.tanh(k * (z + a * z * z * z))
    return 0.5 * (1 + th) + 0.5 * z * (1 - th * th) * k * (1 + 3 * a * z * z)


def _layernorm_backward(dout, xhat, rstd, gamma):
    """dout (B, T, C) -> dx, dgamma, dbeta for y = xhat * gamma + beta, xhat = (x - mu) * rstd."""
    dxhat = dout * gamma
    dx = rstd * (dxhat - dxhat.mean(-1, keepdims=True) - xhat * (dxhat * xhat).mean(-1, keepdims=True))
    return dx, (dout * xhat).sum(axis=(0, 1)), dout.sum(axis=(0, 1))


def _weight(x, dy):
    """x^T dy summed over every row: x (B, T, d_in), dy (B, T, d_out) -> (d_in, d_out)."""
    return np.einsum("bti,btj->ij", x, dy)


def _split(t, H):
    B, T, C = t.shape
    return t.reshape(B, T, H, C // H).transpose(0, 2, 1, 3)


def _merge(t):
    B, H, T, hs = t.shape
    return t.transpose(0, 2, 1, 3).reshape(B, T, H * hs)


def reference_backward(dout, cache):
    """The whole block's backward, in the order of the notebook: every d<name>."""
    a, p, H, s = cache
    g = {}
    # ---- add & norm 2: out = LN2(res2), res2 = h + a2
    g["dres2"], g["dgamma2"], g["dbeta2"] = _layernorm_backward(dout, a["xhat2"], a["rstd2"], p["gamma2"])
    g["da2"] = g["dres2"]
    # ---- adapter 2: a2 = f + g2 W_up2 + b_up2, g2 = GELU(z2), z2 = f W_down2 + b_down2
    g["dW_up2"], g["db_up2"] = _weight(a["g2"], g["da2"]), g["da2"].sum(axis=(0, 1))
    g["dg2"] = g["da2"] @ p["W_up2"].T
    g["dz2"] = g["dg2"] * _gelu_grad(a["z2"])
    g["dW_down2"], g["db_down2"] = _weight(a["f"], g["dz2"]), g["dz2"].sum(axis=(0, 1))
    g["df"] = g["dz2"] @ p["W_down2"].T + g["da2"]
    # ---- feed-forward: f = g W_2 + b_2, g = GELU(e), e = h W_1 + b_1
    g["dW_2"], g["db_2"] = _weight(a["g"], g["df"]), g["df"].sum(axis=(0, 1))
    g["dg"] = g["df"] @ p["W_2"].T
    g["de"] = g["dg"] * _gelu_grad(a["e"])
    g["dW_1"], g["db_1"] = _weight(a["h"], g["de"]), g["de"].sum(axis=(0, 1))
    g["dh"] = g["de"] @ p["W_1"].T + g["dres2"]
    # ---- add & norm 1: h = LN1(res1), res1 = x + a1
    g["dres1"], g["dgamma1"], g["dbeta1"] = _layernorm_backward(g["dh"], a["xhat1"], a["rstd1"], p["gamma1"])
    g["da1"] = g["dres1"]
    # ---- adapter 1: a1 = att + g1 W_up1 + b_up1, g1 = GELU(z1), z1 = att W_down1 + b_down1
    g["dW_up1"], g["db_up1"] = _weight(a["g1"], g["da1"]), g["da1"].sum(axis=(0, 1))
    g["dg1"] = g["da1"] @ p["W_up1"].T
    g["dz1"] = g["dg1"] * _gelu_grad(a["z1"])
    g["dW_down1"], g["db_down1"] = _weight(a["att"], g["dz1"]), g["dz1"].sum(axis=(0, 1))
    g["datt"] = g["dz1"] @ p["W_down1"].T + g["da1"]
    # ---- attention: att = merged W_o + b_o, merged = merge(ctx), ctx = P V, P = softmax(S), S = Q K^T / sqrt(hs)
    g["dW_o"], g["db_o"] = _weight(a["merged"], g["datt"]), g["datt"].sum(axis=(0, 1))
    g["dmerged"] = g["datt"] @ p["W_o"].T
    g["dctx"] = _split(g["dmerged"], H)
    g["dP"] = g["dctx"] @ a["V"].swapaxes(-1, -2)
    g["dV"] = a["P"].swapaxes(-1, -2) @ g["dctx"]
    g["dS"] = a["P"] * (g["dP"] - (g["dP"] * a["P"]).sum(-1, keepdims=True))
    scale = 1 / math.sqrt(a["Q"].shape[-1])
    g["dQ"] = g["dS"] @ a["K"] * scale
    g["dK"] = g["dS"].swapaxes(-1, -2) @ a["Q"] * scale
    g["dq"], g["dk"], g["dv"] = _merge(g["dQ"]), _merge(g["dK"]), _merge(g["dV"])
    # ---- the projections: q = x W_q + b_q (+ s uq B_q, uq = x A_q), k, v alike
    dx = g["dres1"].copy()  # the residual res1 = x + a1
    for t in ("q", "k", "v"):
        if s is not None and t in "qv":
            g[f"dB_{t}"] = s * _weight(a[f"u{t}"], g[f"d{t}"])
            g[f"du{t}"] = s * g[f"d{t}"] @ p[f"B_{t}"].T
            g[f"dA_{t}"] = _weight(a["x"], g[f"du{t}"])
            dx += g[f"du{t}"] @ p[f"A_{t}"].T
        g[f"dW_{t}"], g[f"db_{t}"] = _weight(a["x"], g[f"d{t}"]), g[f"d{t}"].sum(axis=(0, 1))
        dx += g[f"d{t}"] @ p[f"W_{t}"].T
    g["dx"] = dx
    return g


# ----------------------------------------------------------------------------- the usual slips


def _ln_slips(dout, xhat, rstd, gamma, x):
    """LayerNorm backward gone wrong, each with what went wrong."""
    dxhat = dout * gamma
    mean = dxhat.mean(-1, keepdims=True)
    var_term = xhat * (dxhat * xhat).mean(-1, keepdims=True)
    xc = x - x.mean(-1, keepdims=True)
    rstd0 = 1 / np.sqrt((xc * xc).mean(-1, keepdims=True))  # without eps
    xhat0 = xc * rstd0
    return [
        (rstd0 * (dxhat - mean - xhat0 * (dxhat * xhat0).mean(-1, keepdims=True)),
         "rstd without eps: use the cache's rstd (1/sqrt(var + eps), eps = 1e-5) and xhat"),
        (rstd * (dxhat - var_term), "the LayerNorm's mean term is missing: mu depends on every entry "
                                    "of the row, so dx = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat))"),
        (rstd * (dxhat - mean), "the LayerNorm's variance term -xhat mean(dxhat xhat) is missing: "
                                "rstd depends on every entry of the row too"),
        (rstd * dxhat, "the LayerNorm treated mu and rstd as constants: both mean terms are missing"),
        (rstd * (dout - dout.mean(-1, keepdims=True) - xhat * (dout * xhat).mean(-1, keepdims=True)),
         "gamma is missing: y = xhat gamma + beta, so dxhat = dy * gamma"),
        (dxhat - mean - var_term, "the factor rstd = 1/sqrt(var + eps) is missing"),
        (rstd * (dxhat - dxhat.mean(-2, keepdims=True) - xhat * (dxhat * xhat).mean(-2, keepdims=True)),
         "the means run over the wrong axis: LayerNorm normalises each position over C, the last axis"),
    ]


def _gelu_slips(dgrad, z):
    k, c = math.sqrt(2 / math.pi), 0.044715
    th = np.tanh(k * (z + c * z * z * z))
    Phi = 0.5 * (1 + np.vectorize(math.erf)(z / math.sqrt(2)))
    return [
        (dgrad * (Phi + z * np.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)),
         "that is the derivative of the exact (erf) GELU; the block uses the tanh form, "
         "0.5 z (1 + tanh(sqrt(2/pi) (z + 0.044715 z^3)))"),
        (dgrad, "GELU's derivative is missing: g = GELU(z), so dz = dg * GELU'(z)"),
        (dgrad * 0.5 * z * (1 + th), "multiplied by GELU(z) instead of its derivative GELU'(z)"),
        (dgrad * 0.5 * (1 + th), "only half of GELU's product rule: GELU(z) = 0.5 z (1 + tanh(theta)) "
                                 "also has the term 0.5 z (1 - tanh(theta)^2) dtheta/dz"),
        (dgrad * (z > 0), "that is ReLU's derivative; the block uses GELU (tanh form)"),
    ]


def _split_slip(t, H):
    B, T, C = t.shape
    return t.reshape(B, H, T, C // H)


def _merge_slip(t):
    B, H, T, hs = t.shape
    return t.reshape(B, T, H * hs)


CONSUMERS = {  # what each gradient's forward step is, named in the fallback message
    "dres2": "out = LN2(res2)", "dgamma2": "out = xhat2 gamma2 + beta2", "dbeta2": "out = xhat2 gamma2 + beta2",
    "da2": "res2 = h + a2", "dW_up2": "a2 = f + g2 W_up2 + b_up2", "db_up2": "a2 = f + g2 W_up2 + b_up2",
    "dg2": "a2 = f + g2 W_up2 + b_up2", "dz2": "g2 = GELU(z2)", "dW_down2": "z2 = f W_down2 + b_down2",
    "db_down2": "z2 = f W_down2 + b_down2", "df": "z2 = f W_down2 + b_down2 and a2 = f + ...",
    "dW_2": "f = g W_2 + b_2", "db_2": "f = g W_2 + b_2", "dg": "f = g W_2 + b_2", "de": "g = GELU(e)",
    "dW_1": "e = h W_1 + b_1", "db_1": "e = h W_1 + b_1", "dh": "e = h W_1 + b_1 and res2 = h + a2",
    "dres1": "h = LN1(res1)", "dgamma1": "h = xhat1 gamma1 + beta1", "dbeta1": "h = xhat1 gamma1 + beta1",
    "da1": "res1 = x + a1", "dW_up1": "a1 = att + g1 W_up1 + b_up1", "db_up1": "a1 = att + g1 W_up1 + b_up1",
    "dg1": "a1 = att + g1 W_up1 + b_up1", "dz1": "g1 = GELU(z1)", "dW_down1": "z1 = att W_down1 + b_down1",
    "db_down1": "z1 = att W_down1 + b_down1", "datt": "z1 = att W_down1 + b_down1 and a1 = att + ...",
    "dW_o": "att = merged W_o + b_o", "db_o": "att = merged W_o + b_o", "dmerged": "att = merged W_o + b_o",
    "dctx": "merged = merge(ctx)", "dP": "ctx = P V", "dV": "ctx = P V", "dS": "P = softmax(S)",
    "dQ": "S = Q K^T / sqrt(hs)", "dK": "S = Q K^T / sqrt(hs)",
    "dq": "Q = split(q)", "dk": "K = split(k)", "dv": "V = split(v)",
    "dB_q": "q = x W_q + b_q + s uq B_q", "duq": "q = x W_q + b_q + s uq B_q", "dA_q": "uq = x A_q",
    "dB_v": "v = x W_v + b_v + s uv B_v", "duv": "v = x W_v + b_v + s uv B_v", "dA_v": "uv = x A_v",
    "dW_q": "q = x W_q + b_q", "db_q": "q = x W_q + b_q", "dW_k": "k = x W_k + b_k",
    "db_k": "k = x W_k + b_k", "dW_v": "v = x W_v + b_v", "db_v": "v = x W_v + b_v",
    "dx": "q, k, v = x W + b (and the LoRA branches) and res1 = x + a1",
}


WEIGHT_INPUTS = {  # weight gradient -> (its layer's input, the upstream gradient); a bias: (None, ...)
    "dW_up2": ("g2", "da2"), "db_up2": (None, "da2"), "dW_down2": ("f", "dz2"), "db_down2": (None, "dz2"),
    "dW_2": ("g", "df"), "db_2": (None, "df"), "dW_1": ("h", "de"), "db_1": (None, "de"),
    "dW_up1": ("g1", "da1"), "db_up1": (None, "da1"), "dW_down1": ("att", "dz1"), "db_down1": (None, "dz1"),
    "dW_o": ("merged", "datt"), "db_o": (None, "datt"),
    "dW_q": ("x", "dq"), "db_q": (None, "dq"), "dW_k": ("x", "dk"), "db_k": (None, "dk"),
    "dW_v": ("x", "dv"), "db_v": (None, "dv"),
    "dB_q": ("uq", "dq"), "dA_q": ("x", "duq"), "dB_v": ("uv", "dv"), "dA_v": ("x", "duv"),
}


def likely_causes(key, ref, cache, dout):
    """[(array, cause)]: what `key` would hold after one common slip, the gradients before it
    in backward order being right (they are: the checker stops at the first that diverges)."""
    a, p, H, s = cache
    g = ref
    T = lambda t: t.swapaxes(-1, -2)  # noqa: E731
    hs = a["Q"].shape[-1]
    C = a["x"].shape[-1]
    out = []
    if key == "dres2":
        out += _ln_slips(dout, a["xhat2"], a["rstd2"], p["gamma2"], a["res2"])
    if key == "dres1":
        out += _ln_slips(g["dh"], a["xhat1"], a["rstd1"], p["gamma1"], a["res1"])
    if key == "dres1":  # the LayerNorm fed with the FFN's share of dh only
        from_ffn = g["de"] @ p["W_1"].T
        dxhat = from_ffn * p["gamma1"]
        xh, rs = a["xhat1"], a["rstd1"]
        out.append((rs * (dxhat - dxhat.mean(-1, keepdims=True) - xh * (dxhat * xh).mean(-1, keepdims=True)),
                    "dh (the LayerNorm's upstream) misses the residual path: h also feeds res2 = h + a2"))
    for n, dup, xhat, r in (("2", dout, "xhat2", "res2"), ("1", g["dh"], "xhat1", "res1")):
        if key == f"dgamma{n}":
            out.append(((dup * a[r]).sum(axis=(0, 1)), f"used the LayerNorm's input {r} instead of the "
                                                         f"normalised {xhat}: dgamma = sum(dy * xhat)"))
    if key in ("dz2", "dz1", "de"):
        up, z = {"dz2": ("dg2", "z2"), "dz1": ("dg1", "z1"), "de": ("dg", "e")}[key]
        out += _gelu_slips(g[up], a[z])
    if key == "df":
        out.append((g["df"] - g["da2"], "the adapter's skip connection is missing: a2 = f + ..., so df "
                                        "also receives da2"))
        out.append((g["da2"], "the adapter's branch is missing: df = dz2 W_down2^T + da2"))
    if key == "datt":
        out.append((g["datt"] - g["da1"], "the adapter's skip connection is missing: a1 = att + ..., so "
                                          "datt also receives da1"))
        out.append((g["da1"], "the adapter's branch is missing: datt = dz1 W_down1^T + da1"))
    if key == "dh":
        out.append((g["dh"] - g["dres2"], "the residual path is missing: res2 = h + a2, so dh also receives dres2"))
        out.append((g["dres2"], "the feed-forward path is missing: dh = de W_1^T + dres2"))
    if key == "dx":
        out.append((g["dx"] - g["dres1"], "the residual path is missing: res1 = x + a1, so dx also receives dres1"))
        lora = [(t, g[f"du{t}"] @ p[f"A_{t}"].T) for t in "qv" if s is not None]
        if lora:
            both = sum(d for _, d in lora)
            out.append((g["dx"] - both, "the LoRA branches' paths are missing: x also feeds uq = x A_q and "
                                        "uv = x A_v, so dx gets duq A_q^T + duv A_v^T"))
            for t, d in lora:
                out.append((g["dx"] - d, f"the path through the LoRA branch u{t} = x A_{t} is missing"))
        for t in "qkv":
            out.append((g["dx"] - g[f"d{t}"] @ p[f"W_{t}"].T,
                        f"the path through {t} is missing: x feeds q, k and v, and their gradients add"))
            out.append((g["dx"] - g[f"d{t}"] @ p[f"W_{t}"].T + g[f"d{t}"] @ p[f"W_{t}"],
                        f"W_{t} is used untransposed: {t} = x W_{t} + b_{t}, so x gets d{t} W_{t}^T"))
        out.append((g["dres1"], "only the residual path: x also feeds q, k and v"))
    if key == "dmerged":
        out.append((g["datt"] @ p["W_o"], "W_o is used untransposed: att = merged W_o + b_o, so dmerged = datt W_o^T"))
    if key == "dctx":
        out.append((_split_slip(g["dmerged"], H), "the heads are split wrongly: like the forward, reshape to "
                                             "(B, T, H, hs), then move H forward to (B, H, T, hs)"))
    if key == "dV":
        out.append((a["P"] @ g["dctx"], "P must be transposed: ctx = P V, so dV = P^T dctx"))
    if key == "dP":
        out.append((T(g["dP"]), "transposed: ctx = P V, so dP = dctx V^T, (B, H, T, T) with queries as rows"))
    if key == "dS":
        P, dP = a["P"], g["dP"]
        out += [(P * dP, "the softmax's -sum(dP * P) term is missing: each P depends on every S of its row, "
                         "so dS = P (dP - sum_j dP_j P_j)"),
                (P * (dP - (dP * P).sum(-2, keepdims=True)), "the sum runs over the wrong axis: the softmax "
                                                             "normalises over the keys, the last axis"),
                (P * (dP - (dP * P).sum(-1)[..., None, :]), "the row sum lost its axis: keep it as a column "
                                                             "(keepdims=True), one sum per query (row), not per key"),
                (dP * P * (1 - P), "only the diagonal of the softmax's Jacobian: P_i depends on every S_j "
                                   "of its row, so dS = P (dP - sum_j dP_j P_j)"),
                (dP, "the softmax's backward is missing: P = softmax(S)")]
    for key_, other, left in (("dQ", "K", True), ("dK", "Q", False)):
        if key == key_:
            d = g["dS"] if left else T(g["dS"])
            base = d @ a[other]
            out += [(base, "the 1/sqrt(hs) scale is missing: S = Q K^T / sqrt(hs)"),
                    (base / hs, "divided by hs instead of sqrt(hs): S = Q K^T / sqrt(hs)"),
                    (base / math.sqrt(C), "divided by sqrt(C) instead of sqrt(hs), the head size"),
                    ((T(g["dS"]) if left else g["dS"]) @ a[other] / math.sqrt(hs),
                     "dS is used transposed: S = Q K^T / sqrt(hs), so dQ = dS K / sqrt(hs) and "
                     "dK = dS^T Q / sqrt(hs)")]
    if key in ("dq", "dk", "dv"):
        out.append((_merge_slip(g["dQ" if key == "dq" else "dK" if key == "dk" else "dV"]),
                    "the heads are merged wrongly: move H back first, (B, H, T, hs) -> (B, T, H, hs), "
                    "then reshape to (B, T, C)"))
    if key in WEIGHT_INPUTS:  # a weight or a bias: shared by every row, so its gradient sums over them
        x_name, up = WEIGHT_INPUTS[key]
        dy = g[up]
        B, N = dy.shape[0], dy.shape[0] * dy.shape[1]
        if x_name is None:  # a bias
            out.append((dy[0].sum(axis=0), "only the first sequence: the bias is added at every (b, t), "
                                           "so its gradient sums dy over the batch and the positions"))
            out.append((g[key] / N, "averaged over the rows instead of summed: the bias is added at every "
                                    "(b, t), and each use adds its gradient"))
        else:
            factor = s if key.startswith("dB_") else 1.0
            x = a[x_name]
            out.append((factor * x[0].T @ dy[0], f"only the first sequence: the weight is used by every "
                                                 f"sequence of the batch, so d{key[1:]} = {x_name}^T {up} "
                                                 f"sums over b and t"))
            out.append((g[key] / N, "averaged over the rows instead of summed: every (b, t) adds its "
                                    f"{x_name}^T {up}"))
            if g[key].shape[0] == g[key].shape[1]:
                out.append((g[key].T, f"transposed: the forward multiplies {x_name} @ {key[1:]}, so "
                                      f"{key} = {x_name}^T {up} (shape (d_in, d_out), like the weight)"))
    for t in "qv":
        if s is None:
            continue
        if key in (f"dB_{t}", f"du{t}", f"dA_{t}"):
            out.append((g[key] / s, f"the LoRA scale s = alpha / r is missing: {t} = x W_{t} + b_{t} + s u{t} B_{t}"))
            out.append((g[key] * s, "the LoRA scale s is applied twice"))
    return out

