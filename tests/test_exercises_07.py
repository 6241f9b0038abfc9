"""Catalogue of notebook 07's exercises: wrong answers rejected for their reason, correct
alternatives accepted (fresh cases at every call); the count formulas are what add_adapter creates."""
import numpy as np
import pytest
from _catalogue import fails, passes

from minitransformer import ModelConfig, Transformer, peft
from minitransformer.exercises import _reference as ref
from minitransformer.exercises import unit07 as ex

# ----------------------------------------------------------------------------- LoRA's backward


def lora(dout, x, A, B, s, scale=1.0, first=False, swap=False):
    if first:
        dout, x = dout[:1], x[:1]
    u = x @ A
    dv = s * scale * dout
    du = dv @ B.T
    dA = x.reshape(-1, x.shape[-1]).T @ du.reshape(-1, du.shape[-1])
    dB = u.reshape(-1, u.shape[-1]).T @ dv.reshape(-1, dv.shape[-1])
    return (du @ A.T, dB, dA) if swap else (du @ A.T, dA, dB)


def writes_into_dout(dout, x, A, B, s):
    dout *= s
    return lora(dout, x, A, B, 1.0)


LORA_WRONG = [
    (lambda *a: lora(*a, scale=1 / a[4]), "missing the scale s"),
    (lambda *a: lora(*a, scale=a[4]), "the scale s twice"),
    (lambda d, x, A, B, s: (lora(d, x, A, B, s)[0],) + lora(d, x, A, B, s, first=True)[1:], "first sequence's rows only"),
    (lambda *a: lora(*a, swap=True), ("return them in the order", "expected shape")),
    (lambda d, x, A, B, s: (lora(d, x, A, B, s)[0], lora(d, x, A, B, s)[1],
                            x.reshape(-1, x.shape[-1]).T @ d.reshape(-1, d.shape[-1])), "the rank-r rows, not x"),
    (lambda d, x, A, B, s: tuple(g.T for g in lora(d, x, A, B, s)), "expected shape"),
    (writes_into_dout, "wrote into its argument dout"),
    (lambda d, x, A, B, s: lora(d, x, A, B, s)[1:], "expected 3 values"),
    (lambda d, x, A, B, s: peft.lora_backward(d, peft.lora_forward(x, A, B, s)[1]), "peft.lora_backward"),
    (lambda d, x, A, B, s: (d @ B.T @ A.T,) + lora(d, x, A, B, s)[1:], "missing the scale s"),
]


@pytest.mark.parametrize("answer, reason", LORA_WRONG)
def test_lora_backward_wrong(answer, reason):
    fails(lambda: ex.check_lora_backward(answer), reason)


def lora_einsum(dout, x, A, B, s):
    dv = s * dout
    du = dv @ B.T
    return du @ A.T, np.einsum("bti,btr->ir", x, du), np.einsum("btr,bto->ro", x @ A, dv)


@pytest.mark.parametrize("answer", [lora, lora_einsum, lambda *a: list(lora(*a))])
def test_lora_backward_correct(answer):
    passes(lambda: ex.check_lora_backward(answer))


# ----------------------------------------------------------------------------- merging LoRA


def in_place(W0, A, B, alpha, r):
    W0 += (alpha / r) * (A @ B)
    return W0


MERGE_WRONG = [
    (lambda W0, A, B, alpha, r: W0 + A @ B, "scaled by alpha / r"),
    (lambda W0, A, B, alpha, r: W0 + (r / alpha) * (A @ B), "not r / alpha"),
    (lambda W0, A, B, alpha, r: W0 + alpha * (A @ B), "not alpha"),
    (lambda W0, A, B, alpha, r: (alpha / r) * (A @ B), "add it to W0"),
    (lambda W0, A, B, alpha, r: W0 + (alpha // r) * (A @ B), "alpha // r rounds down"),
    (lambda W0, A, B, alpha, r: (W0 + (alpha / r) * (A @ B)).T, "this package stores W as (d_in, d_out)"),
    (lambda W0, A, B, alpha, r: W0 + np.float64(alpha / r) * (A @ B), "float64 scalar"),
    (in_place, "in place"),
    (lambda W0, A, B, alpha, r: peft.lora_merge(W0, A, B, alpha / r), "peft.lora_merge"),
    (lambda W0, A, B, alpha, r: [[0.0]], "expected shape"),
    (lambda W0, A, B, alpha, r: (W0 + (alpha / r) * (A @ B), None), "expected an array of shape"),
]


@pytest.mark.parametrize("answer, reason", MERGE_WRONG)
def test_merge_wrong(answer, reason):
    fails(lambda: ex.check_merge(answer), reason)


@pytest.mark.parametrize("answer", [ref.merge, lambda W0, A, B, alpha, r: W0 + (A * alpha) @ B / r,
                                    lambda W0, A, B, alpha, r: np.add(W0, (alpha / r) * np.einsum("ir,ro->io", A, B))])
def test_merge_correct(answer):
    passes(lambda: ex.check_merge(answer))


def test_a_merged_layer_of_the_model_gives_the_lora_outputs():
    """On a real layer: the FFN's W_1 of a small model, float32."""
    model = Transformer(ModelConfig(vocab_size=20, max_len=8, d_model=16, n_heads=2, d_ff=32), seed=0)
    W0 = model.blocks[0].ffn.p["W_1"].value
    rng = np.random.default_rng(1)
    A = rng.standard_normal((16, 4)).astype(np.float32)
    B = (0.01 * rng.standard_normal((4, 32))).astype(np.float32)
    x = rng.standard_normal((5, 16)).astype(np.float32)
    W = ref.merge(W0, A, B, 8, 4)
    assert W.dtype == np.float32
    assert np.max(np.abs(x @ W - (x @ W0 + 2.0 * (x @ A) @ B))) < 1e-5


# ----------------------------------------------------------------------------- the prefix's gradient


def writes_into_dk(dk, n):
    dk[:, :n] *= 1.0
    dk[0, 0, 0] += 1
    return dk[:, :n].sum(axis=0), dk[:, n:].copy()


PREFIX_WRONG = [
    (lambda dk, n: (dk[0, :n], dk[:, n:]), "sum over the batch"),
    (lambda dk, n: (dk[:, :n].mean(axis=0), dk[:, n:]), "a sum over the batch, not a mean"),
    (lambda dk, n: (dk[:, -n:].sum(axis=0), dk[:, n:]), "the prefix rows come first: dk[:, :n]"),
    (lambda dk, n: (dk[:, :n].sum(axis=0), dk[:, :-n]), ("the sequence's own are dk[:, n:]", "max relative error")),
    (lambda dk, n: (dk[:, :n].sum(axis=1), dk[:, n:]), ("not over the prefix rows", "expected shape")),
    (lambda dk, n: (dk[:, n:], dk[:, :n].sum(axis=0)), ("return them in the order", "expected shape")),
    (lambda dk, n: dk[:, :n].sum(axis=0), "expected 2 values (dP, dk_own)"),
    (writes_into_dk, "wrote into its argument dk"),
    (lambda dk, n: peft.prompt_backward(dk, n)[::-1], "peft.prompt_backward"),
    (lambda dk, n: (dk[:, :2].sum(axis=0), dk[:, 2:]), ("is a size written into your code", "expected shape")),
]


@pytest.mark.parametrize("answer, reason", PREFIX_WRONG)
def test_prefix_backward_wrong(answer, reason):
    fails(lambda: ex.check_prefix_backward(answer), reason)


@pytest.mark.parametrize("answer", [ref.prefix_backward, lambda dk, n: (np.add.reduce(dk[:, :n], axis=0), dk[:, n:]),
                                    lambda dk, n: (sum(dk[b, :n] for b in range(len(dk))), dk[:, n:].tolist())])
def test_prefix_backward_correct(answer):
    passes(lambda: ex.check_prefix_backward(answer))


# ----------------------------------------------------------------------------- counts


def prefix(n, C, L, h, reparam):
    return ref.prefix_count(n, C, L, h, reparam)


PREFIX_COUNT_WRONG = [
    (lambda n, C, L, h, r: L * n * C if not r else prefix(n, C, L, h, r), "keys only"),
    (lambda n, C, L, h, r: 2 * n * C if not r else prefix(n, C, L, h, r), "every one of the L layers"),
    (lambda n, C, L, h, r: prefix(n, C, L, h, r) - (h + 2 * L * C) * r, "biases b_1 (hidden) and b_2 (2LC)"),
    (lambda n, C, L, h, r: prefix(n, C, L, h, r) - n * C * r, "P' itself"),
    (lambda n, C, L, h, r: prefix(n, C, L, h, r) + L * 2 * n * C * r, "not parameters then"),
    (lambda n, C, L, h, r: n * C, ("the prompt's count", "expected")),
    (lambda n, C, L, h, r: float(prefix(n, C, L, h, r)), "expected an integer"),
    (lambda n, C, L, h, r: prefix(n, C, L, h, False), "expected"),  # ignores reparameterize
    (lambda n, C, L, h, r: prefix(8, 64, 4, 64, r), "expected"),  # the first case written in
    (lambda n, C, L, h, r: Transformer(ModelConfig(vocab_size=5, max_len=4, d_model=C, n_heads=1, n_layers=L,
                                                   d_ff=C)).add_adapter("p", peft.PrefixConfig(n_prefix=n)),
     "TaskMethods.add_adapter"),
]


@pytest.mark.parametrize("answer, reason", PREFIX_COUNT_WRONG)
def test_prefix_count_wrong(answer, reason):
    fails(lambda: ex.check_prefix_count(answer), reason)


@pytest.mark.parametrize("answer", [prefix, lambda n, C, L, h, r: np.int64(n * C + h * (C + 1) + 2 * L * C * (h + 1))
                                    if r else np.int64(2 * L * n * C)])
def test_prefix_count_correct(answer):
    passes(lambda: ex.check_prefix_count(answer))


def bitfit(C, F, L):
    return ref.bitfit_count(C, F, L)


BITFIT_WRONG = [
    (lambda C, F, L: L * (5 * C + F), "every LayerNorm's beta is a bias too"),
    (lambda C, F, L: bitfit(C, F, L) - C, "2L + 1 LayerNorms"),
    (lambda C, F, L: bitfit(C, F, L) + (2 * L + 1) * C, "gamma is a scale, not a bias"),
    (lambda C, F, L: bitfit(C, F, L) - L * (F - C), "b_1 has F entries, not C"),
    (lambda C, F, L: bitfit(C, F, L) - L * (F + C), "b_1 (F) and b_2 (C) train too"),
    (lambda C, F, L: bitfit(C, F, L) - L * C, "four attention biases per block"),
    (lambda C, F, L: bitfit(C, F, L) + L * C, "not five"),
    (lambda C, F, L: bitfit(C, 4 * C, L), "expected"),  # F = 4C assumed
    (lambda C, F, L: float(bitfit(C, F, L)), "expected an integer"),
    (lambda C, F, L: Transformer(ModelConfig(vocab_size=5, max_len=4, d_model=C, n_heads=1, n_layers=L,
                                             d_ff=F)).add_adapter("b", peft.BitFitConfig()), "TaskMethods.add_adapter"),
]


@pytest.mark.parametrize("answer, reason", BITFIT_WRONG)
def test_bitfit_count_wrong(answer, reason):
    fails(lambda: ex.check_bitfit_count(answer), reason)


@pytest.mark.parametrize("answer", [bitfit, lambda C, F, L: np.int64(L * (7 * C + F) + C)])
def test_bitfit_count_correct(answer):
    passes(lambda: ex.check_bitfit_count(answer))


def task_size(model, config):
    created = model.add_adapter("t", config, n_classes=2)
    return sum(p.value.size for p in created.parameters()) - (model.config.d_model * 2 + 2)


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_the_count_formulas_are_what_add_adapter_creates(norm):
    for n, C, L, h in ((3, 12, 2, 5), (1, 6, 5, 7)):
        for reparam in (False, True):
            model = Transformer(ModelConfig(vocab_size=11, max_len=8, d_model=C, n_heads=1, n_layers=L, d_ff=2 * C,
                                            norm=norm), seed=0)
            assert task_size(model, peft.PrefixConfig(n_prefix=n, reparameterize=reparam, hidden=h)) == \
                ref.prefix_count(n, C, L, h, reparam)
    for C, F, L in ((8, 20, 2), (6, 13, 3)):
        model = Transformer(ModelConfig(vocab_size=11, max_len=8, d_model=C, n_heads=1, n_layers=L, d_ff=F, norm=norm))
        assert task_size(model, peft.BitFitConfig()) == ref.bitfit_count(C, F, L)
