"""The checkers of notebooks/07_peft_family.ipynb: the reference solutions pass, wrong ones fail
and say why, and a solution not written yet says "not implemented yet"."""
import re

import pytest

from minitransformer import peft
from minitransformer.exercises import unit07 as ex


def not_written(*args):
    raise NotImplementedError


# ----------------------------------------------------------------------------- LoRA's backward


def lora_backward(dout, x, A, B, s):
    u = x @ A
    dv = s * dout
    dB = u.reshape(-1, u.shape[-1]).T @ dv.reshape(-1, dv.shape[-1])
    du = dv @ B.T
    dA = x.reshape(-1, x.shape[-1]).T @ du.reshape(-1, du.shape[-1])
    return du @ A.T, dA, dB


def test_lora_backward_reference_passes():
    r = ex.check_lora_backward(lora_backward)
    assert r.passed is True and "max relative error" in r.message and "<= 1e-07" in r.message


@pytest.mark.parametrize("wrong, reason", [
    (lambda d, x, A, B, s: tuple(g / s for g in lora_backward(d, x, A, B, s)), "missing the scale s"),
    (lambda d, x, A, B, s: tuple(g * s for g in lora_backward(d, x, A, B, s)), "the scale s twice"),
    (lambda d, x, A, B, s: (lora_backward(d, x, A, B, s)[0], x[0].T @ (s * d[0] @ B.T), lora_backward(d, x, A, B, s)[2]),
     "the first sequence's rows only"),
    (lambda d, x, A, B, s: (lora_backward(d, x, A, B, s)[0], lora_backward(d, x, A, B, s)[1].T,
                            lora_backward(d, x, A, B, s)[2]), r"dA: expected shape \(5, 2\), got \(2, 5\): transposed"),
    (lambda d, x, A, B, s: (*lora_backward(d, x, A, B, s)[:2], x.reshape(-1, 5).T @ (s * d).reshape(-1, 4)),
     r"dB: expected shape \(2, 4\), got \(5, 4\): dB = u\^T dv with u = x A"),
    (lambda d, x, A, B, s: (d @ B.T @ A.T, *lora_backward(d, x, A, B, s)[1:]), "dx: .*missing the scale s"),
])
def test_lora_backward_wrong_answers_fail_with_the_reason(wrong, reason):
    r = ex.check_lora_backward(wrong)
    assert r.passed is False and re.search(reason, r.message), r.message


def test_lora_backward_that_writes_into_dout_fails():
    def in_place(dout, x, A, B, s):
        dout *= s  # reuses the caller's array
        return lora_backward(dout / s, x, A, B, s)
    r = ex.check_lora_backward(in_place)
    assert r.passed is False and "wrote into dout" in r.message


def test_lora_backward_not_written_and_raising():
    assert ex.check_lora_backward(not_written).passed is None
    r = ex.check_lora_backward(lambda d, x, A, B, s: x.T @ d)  # (5, 3, 2) @ (2, 3, 4): cannot multiply
    assert r.passed is False and "your code raised ValueError" in r.message


# ----------------------------------------------------------------------------- the prefix's gradient


def prefix_backward(dk, n):
    return dk[:, :n].sum(axis=0), dk[:, n:].copy()


def test_prefix_backward_reference_passes_and_is_the_prompts():
    assert ex.check_prefix_backward(prefix_backward).passed is True
    # the same concatenation as the prompt's: peft.prompt_backward gives (dk_own, dP)
    assert ex.check_prefix_backward(lambda dk, n: peft.prompt_backward(dk, n)[::-1]).passed is True


@pytest.mark.parametrize("wrong, reason", [
    (lambda dk, n: (dk[0, :n], dk[:, n:]), "sum over the batch"),
    (lambda dk, n: (dk[:, :n].mean(axis=0), dk[:, n:]), "not a mean"),
    (lambda dk, n: (dk[:, -n:].sum(axis=0), dk[:, n:]), r"the prefix rows come first: dk\[:, :n\]"),
    (lambda dk, n: (dk[:, :n].sum(axis=0), dk[:, :-n]), r"dk_own: .*the sequence's own are dk\[:, n:\]"),
    (lambda dk, n: (dk[:, :n].sum(axis=0),), "expected two arrays"),
])
def test_prefix_backward_wrong_answers_fail_with_the_reason(wrong, reason):
    r = ex.check_prefix_backward(wrong)
    assert r.passed is False and re.search(reason, r.message), r.message


def test_prefix_backward_not_written():
    assert ex.check_prefix_backward(not_written).passed is None


# ----------------------------------------------------------------------------- counts


def test_prefix_count_reference_passes_and_matches_the_model():
    assert ex.check_prefix_count(ex.prefix_count).passed is True
    assert ex.prefix_count(3, 12, 2, 5, True) == ex._task_size(12, 2, peft.PrefixConfig(n_prefix=3, hidden=5))


@pytest.mark.parametrize("wrong, reason", [
    (lambda n, C, L, h, re: L * n * C if not re else ex.prefix_count(n, C, L, h, re), "keys only"),
    (lambda n, C, L, h, re: 2 * n * C if not re else ex.prefix_count(n, C, L, h, re), "every one of the L layers"),
    (lambda n, C, L, h, re: ex.prefix_count(n, C, L, h, re) - (h + 2 * L * C if re else 0), "the MLP's biases"),
    (lambda n, C, L, h, re: ex.prefix_count(n, C, L, h, re) - (n * C if re else 0), "P' itself"),
    (lambda n, C, L, h, re: ex.prefix_count(n, C, L, h, re) + (L * 2 * n * C if re else 0), "computed by it, not trained"),
    (lambda n, C, L, h, re: float(ex.prefix_count(n, C, L, h, re)), "expected an integer"),
])
def test_prefix_count_wrong_answers_fail_with_the_reason(wrong, reason):
    r = ex.check_prefix_count(wrong)
    assert r.passed is False and reason in r.message, r.message


def test_bitfit_count_reference_passes_and_matches_the_model():
    assert ex.check_bitfit_count(ex.bitfit_count).passed is True
    assert ex.check_prefix_count(not_written).passed is None and ex.check_bitfit_count(not_written).passed is None


@pytest.mark.parametrize("wrong, reason", [
    (lambda C, F, L: L * (4 * C + F + C), "every LayerNorm's beta"),
    (lambda C, F, L: L * (4 * C + F + C) + 2 * L * C, "2L + 1 LayerNorms"),
    (lambda C, F, L: L * (4 * C + F + C) + 2 * (2 * L + 1) * C, "gamma is a scale"),
    (lambda C, F, L: L * 6 * C + (2 * L + 1) * C, "b_1 has F entries"),
    (lambda C, F, L: L * 4 * C + (2 * L + 1) * C, "b_1 (F) and b_2 (C)"),
    (lambda C, F, L: L * (3 * C + F + C) + (2 * L + 1) * C, "b_q, b_k, b_v and b_o"),
])
def test_bitfit_count_wrong_answers_fail_with_the_reason(wrong, reason):
    r = ex.check_bitfit_count(wrong)
    assert r.passed is False and reason in r.message, r.message


def test_results_print_as_one_line():
    assert repr(ex.check_bitfit_count(ex.bitfit_count)).startswith("PASS BitFit's parameters: ")
    assert repr(ex.check_bitfit_count(not_written)).startswith("not implemented yet: BitFit's parameters")
