"""Checkers for notebooks/07_peft_family.ipynb.

    check_lora_backward(fn)    fn(dout, x, A, B, s) -> (dx, dA, dB), the LoRA branch's backward
    check_prefix_backward(fn)  fn(dk, n) -> (dP, dk_own): the gradient through k = [P; k_own]
    check_prefix_count(fn)     fn(n, C, L, hidden, reparameterize) -> the parameters prefix
                               tuning trains (the head aside)
    check_bitfit_count(fn)     fn(C, F, L) -> the parameters BitFit trains (the head aside)

Each returns a Result (one line: PASS / FAIL / not implemented yet). Gradients are checked in
float64 against finite differences (threshold gradcheck.OP_THRESHOLD = 1e-7), counts against
what the package's add_adapter creates.
"""
import numpy as np

from .. import peft
from ..gradcheck import OP_THRESHOLD, numerical_gradient, rel_error
from ..model import ModelConfig, Transformer
from . import Result, attempt, is_integer


# ----------------------------------------------------------------------------- LoRA's backward


def _lora_problem(seed=7):
    """x (2, 3, 5) (two sequences of three rows), A (5, 2), B (2, 4), s = 1.5, dout (2, 3, 4)."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 3, 5)), rng.standard_normal((5, 2)),
            rng.standard_normal((2, 4)), 1.5)


def _lora_hint(name, got, dout, x, A, B, s):
    """Why one of dx, dA, dB is off: a missing or doubled s, only the first sequence's rows."""
    ref = dict(zip(("dx", "dA", "dB"), peft.lora_backward(dout, peft.lora_forward(x, A, B, s)[1])))[name]
    if rel_error(got * s, ref) < 1e-10:
        return "it is missing the scale s (forward was out = s (x A) B)"
    if rel_error(got / s, ref) < 1e-10:
        return "it has the scale s twice"
    first = dict(zip(("dx", "dA", "dB"), peft.lora_backward(dout[:1], peft.lora_forward(x[:1], A, B, s)[1])))[name]
    if name != "dx" and rel_error(got, first) < 1e-10:
        return "it holds the first sequence's rows only: sum over every row of the batch (reshape to (N, d))"
    return ""


def check_lora_backward(fn):
    """fn(dout, x, A, B, s) -> (dx, dA, dB) against finite differences of L = sum(out * dout),
    out = s (x A) B, in float64."""
    name = "LoRA backward"
    dout, x, A, B, s = _lora_problem()
    dout_before = dout.copy()
    got, failed = attempt(name, fn, dout, x.copy(), A.copy(), B.copy(), s)
    if failed is not None:  # a Result: not written yet, or it raised
        return failed
    if not np.array_equal(dout, dout_before):
        return Result(name, False, "your backward wrote into dout: the caller's array must stay as it was")
    if not isinstance(got, (tuple, list)) or len(got) != 3:
        return Result(name, False, f"expected three arrays (dx, dA, dB), got {type(got).__name__}")
    inputs = {"dx": x, "dA": A, "dB": B}
    worst = 0.0
    for (key, array), g in zip(inputs.items(), got):
        if not isinstance(g, np.ndarray) or g.shape != array.shape:
            shape = g.shape if isinstance(g, np.ndarray) else type(g).__name__
            hint = ": transposed?" if isinstance(g, np.ndarray) and g.shape == array.shape[::-1] else ""
            if key == "dB" and isinstance(g, np.ndarray) and g.shape == (x.shape[-1], B.shape[1]):
                hint = ": dB = u^T dv with u = x A, the rank-r rows, not x"
            return Result(name, False, f"{key}: expected shape {array.shape}, got {shape}{hint}")
        numeric = numerical_gradient(lambda: float(np.sum(s * ((x @ A) @ B) * dout)), array)
        err = rel_error(g, numeric)
        if not err <= OP_THRESHOLD:
            hint = _lora_hint(key, g, dout, x, A, B, s)
            return Result(name, False, f"{key}: relative error {err:.1e} > {OP_THRESHOLD:.0e} against finite "
                                       f"differences" + (f"; {hint}" if hint else ""))
        worst = max(worst, err)
    return Result(name, True, f"dx, dA, dB against finite differences: max relative error {worst:.1e} "
                              f"<= {OP_THRESHOLD:.0e}")


# ----------------------------------------------------------------------------- the prefix's gradient


def check_prefix_backward(fn):
    """fn(dk, n) -> (dP, dk_own), the gradients of P (n, C) and k_own (B, T, C) when the forward
    was k = [P; k_own] for every sequence, from dk (B, n + T, C); float64, finite differences."""
    name = "gradient through the prefix"
    rng = np.random.default_rng(11)
    B, n, T, C = 3, 2, 4, 5
    P, k_own, dk = rng.standard_normal((n, C)), rng.standard_normal((B, T, C)), rng.standard_normal((B, n + T, C))
    dk_before = dk.copy()
    got, failed = attempt(name, fn, dk, n)
    if failed is not None:
        return failed
    if not np.array_equal(dk, dk_before):
        return Result(name, False, "your function wrote into dk: the caller's array must stay as it was")
    if not isinstance(got, (tuple, list)) or len(got) != 2:
        return Result(name, False, f"expected two arrays (dP, dk_own), got {type(got).__name__}")

    def L():  # the forward: the same P in front of every sequence's own keys
        k = np.concatenate([np.broadcast_to(P, (B, n, C)), k_own], axis=1)
        return float(np.sum(k * dk))
    worst = 0.0
    for key, array, g in (("dP", P, got[0]), ("dk_own", k_own, got[1])):
        if not isinstance(g, np.ndarray) or g.shape != array.shape:
            shape = g.shape if isinstance(g, np.ndarray) else type(g).__name__
            return Result(name, False, f"{key}: expected shape {array.shape}, got {shape}")
        err = rel_error(g, numerical_gradient(L, array))
        if not err <= OP_THRESHOLD:
            hints = [(dk[0, :n], "the same P went in front of every sequence: sum over the batch"),
                     (dk[:, :n].mean(axis=0), "a sum over the batch, not a mean: every sequence's use of P "
                                              "adds its gradient"),
                     (dk[:, -n:].sum(axis=0), "the prefix rows come first: dk[:, :n]"),
                     (dk[:, :T], "the prefix rows come first: the sequence's own are dk[:, n:]")]
            hint = next((text for wrong, text in hints if wrong.shape == g.shape
                         and np.allclose(g, wrong, rtol=1e-12, atol=1e-12)), "")
            return Result(name, False, f"{key}: relative error {err:.1e} > {OP_THRESHOLD:.0e} against finite "
                                       f"differences" + (f"; {hint}" if hint else ""))
        worst = max(worst, err)
    return Result(name, True, f"dP and dk_own against finite differences: max relative error {worst:.1e} "
                              f"<= {OP_THRESHOLD:.0e}")


# ----------------------------------------------------------------------------- counts


def _task_size(d_model, n_layers, config, d_ff=None, norm="post"):
    """What add_adapter creates for `config` on a small model (the task head aside)."""
    cfg = ModelConfig(vocab_size=11, max_len=8, d_model=d_model, n_heads=1, n_layers=n_layers,
                      d_ff=d_ff or 2 * d_model, norm=norm, dtype="float32")
    s = Transformer(cfg, seed=0).add_adapter("t", config, n_classes=2)
    return sum(p.value.size for p in s.parameters()) - (d_model * 2 + 2)


def prefix_count(n, C, L, hidden, reparameterize):
    """The reference: L x (P_k, P_v) x n x C directly; with the MLP, P' (n, C) and the MLP's
    W_1 (C, h), b_1 (h), W_2 (h, 2LC), b_2 (2LC)."""
    if not reparameterize:
        return L * 2 * n * C
    return n * C + C * hidden + hidden + hidden * 2 * L * C + 2 * L * C


def check_prefix_count(fn):
    """fn(n, C, L, hidden, reparameterize) -> the parameters prefix tuning trains, the head aside;
    against what add_adapter(PrefixConfig(...)) creates, and at BERT-base's size by formula."""
    name = "prefix tuning's parameters"
    cases = [(8, 64, 4, 64), (3, 12, 2, 5), (1, 6, 5, 7)]
    for n, C, L, h in cases:
        for reparam in (False, True):
            got, failed = attempt(name, fn, n, C, L, h, reparam)
            if failed is not None:
                return failed
            if not is_integer(got):
                return Result(name, False, f"expected an integer, got {got!r}")
            expected = _task_size(C, L, peft.PrefixConfig(n_prefix=n, reparameterize=reparam, hidden=h))
            if got != expected:
                where = f"n={n}, C={C}, L={L}, hidden={h}, reparameterize={reparam}"
                hints = {L * n * C: "keys only: each layer has n values too (P_v)",
                         2 * n * C: "one layer's: every one of the L layers has its own P_k and P_v",
                         expected - h - 2 * L * C: "the MLP's biases b_1 (h) and b_2 (2LC) train too",
                         expected - n * C: "P' itself (n x C) trains too",
                         expected + L * 2 * n * C: "with the MLP, every layer's P_k, P_v are computed by "
                                                   "it, not trained: they are not parameters then",
                         n * C: "that is the prompt's count: a prefix has keys and values in every layer"}
                hint = hints.get(got, "")
                return Result(name, False, f"expected {expected:,} ({where}), got {got:,}"
                                           + (f": {hint}" if hint else ""))
    bert, failed = attempt(name, fn, 10, 768, 12, 512, True)
    if failed is not None:
        return failed
    if bert != prefix_count(10, 768, 12, 512, True):
        return Result(name, False, f"BERT-base sizes (n=10, C=768, L=12, hidden=512): expected "
                                   f"{prefix_count(10, 768, 12, 512, True):,}, got {bert!r}")
    return Result(name, True, f"matches add_adapter on {len(cases)} configurations, with and without "
                              f"the MLP, and the formula at BERT-base's size")


def bitfit_count(C, F, L):
    """The reference: per block the six linear biases (b_q, b_k, b_v, b_o: C each; b_1: F; b_2: C),
    and every LayerNorm's beta (2L + 1 LayerNorms of C: ln_emb or ln_f, ln1 and ln2 per block)."""
    return L * (4 * C + F + C) + (2 * L + 1) * C


def check_bitfit_count(fn):
    """fn(C, F, L) -> the parameters BitFit trains (BitFitConfig(): every linear layer's bias and
    every LayerNorm's beta), the head aside; against add_adapter on post-LN and pre-LN models."""
    name = "BitFit's parameters"
    cases = [(64, 256, 4), (8, 20, 2), (6, 6, 3)]
    for C, F, L in cases:
        got, failed = attempt(name, fn, C, F, L)
        if failed is not None:
            return failed
        if not is_integer(got):
            return Result(name, False, f"expected an integer, got {got!r}")
        for norm in ("post", "pre"):
            expected = _task_size(C, L, peft.BitFitConfig(), d_ff=F, norm=norm)
            if got != expected:
                hints = {expected - (2 * L + 1) * C: "every LayerNorm's beta is a bias too (the paper "
                                                     "counts them): (2L + 1) C",
                         expected - C: "2L + 1 LayerNorms: ln1 and ln2 in each block, and ln_emb (post-LN) "
                                       "or ln_f (pre-LN)",
                         expected + (2 * L + 1) * C: "gamma is a scale, not a bias: only beta trains",
                         expected - L * (F - C): "the FFN's first bias b_1 has F entries, not C",
                         expected - L * (F + C): "the FFN's biases b_1 (F) and b_2 (C) train too",
                         expected - L * C: "four attention biases per block: b_q, b_k, b_v and b_o"}
                hint = hints.get(got, "")
                return Result(name, False, f"expected {expected:,} (C={C}, F={F}, L={L}, {norm}-LN), "
                                           f"got {got:,}" + (f": {hint}" if hint else ""))
    return Result(name, True, f"matches add_adapter(BitFitConfig()) on {len(cases)} configurations, "
                              f"post-LN and pre-LN")
