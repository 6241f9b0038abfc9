"""Catalogue of notebook 04's exercises: wrong answers rejected for their reason, correct
alternatives accepted (fresh random cases at every call)."""
import math

import numpy as np
import pytest
from _catalogue import fails, passes

from minitransformer import AdapterConfig, ModelConfig, Transformer, adapters, layers
from minitransformer.exercises import _reference as ref
from minitransformer.exercises import unit04 as ex


def trained(C, m, L, K, ln=True, adapters_per_block=2, biases=True, norms=None, head=True):
    n = adapters_per_block * L * (2 * m * C + (m + C if biases else 0)) + (C * K + K if head else 0)
    norms = (2 * L + 1) if norms is None else norms
    return n + (norms * 2 * C if ln else 0)


COUNT_WRONG = [
    (lambda C, m, L, K, ln: trained(C, m, L, K, ln, biases=False), "biases b_down (m) and b_up (C)"),
    (lambda C, m, L, K, ln: trained(C, m, L, K, ln, adapters_per_block=1), "two adapters per block"),
    (lambda C, m, L, K, ln: trained(C, m, L, K, ln, adapters_per_block=4), "not four"),
    (lambda C, m, L, K, ln: trained(C, m, L, K, ln, head=False), "task head"),
    (lambda C, m, L, K, ln: trained(C, m, L, K, False), ("LayerNorm copies are missing", "no LayerNorm trains")),
    (lambda C, m, L, K, ln: trained(C, m, L, K, True), "with train_layernorm=False no LayerNorm trains"),
    (lambda C, m, L, K, ln: trained(C, m, L, K, ln, norms=2 * L), ("one LayerNorm is missing", "expected")),
    (lambda C, m, L, K, ln: trained(C, m, L, K, ln) - (2 * L + 1) * C * ln, ("gamma and beta", "expected")),
    (lambda C, m, L, K, ln: float(trained(C, m, L, K, ln)), "expected an integer"),
    (lambda C, m, L, K, ln: trained(64, 8, 4, 2, ln), "expected"),  # the notebook's case written in
]


@pytest.mark.parametrize("answer, reason", COUNT_WRONG)
def test_trained_parameters_wrong(answer, reason):
    fails(lambda: ex.check_trained_parameters(answer), reason)


def test_trained_parameters_by_building_the_model_is_named():
    def answer(C, m, L, K, ln):
        model = Transformer(ModelConfig(vocab_size=11, max_len=8, d_model=C, n_heads=1, n_layers=L, d_ff=2 * C))
        model.add_adapter("t", AdapterConfig(bottleneck=m, train_layernorm=ln), K)
        model.train_adapter("t")
        return model.num_parameters(trainable_only=True)
    fails(lambda: ex.check_trained_parameters(answer), "TaskMethods.add_adapter")


@pytest.mark.parametrize("answer", [trained, lambda C, m, L, K, ln: np.int64(trained(C, m, L, K, bool(ln)))])
def test_trained_parameters_correct(answer):
    passes(lambda: ex.check_trained_parameters(answer))


def test_the_count_formula_is_the_models():
    for C, m, L, K, ln in ((16, 3, 2, 3, True), (12, 5, 3, 2, False)):
        model = Transformer(ModelConfig(vocab_size=11, max_len=8, d_model=C, n_heads=2, n_layers=L, d_ff=2 * C))
        model.add_adapter("t", AdapterConfig(bottleneck=m, train_layernorm=ln), K)
        model.train_adapter("t")
        assert ref.trained_count(C, m, L, K, ln) == model.num_parameters(trainable_only=True)


# ----------------------------------------------------------------------------- forward


def fwd(h, W_down, b_down, W_up, b_up, f=lambda z: layers.gelu_forward(z)[0], skip=True, bu=True, bd=True):
    z = h @ W_down + (b_down if bd else 0)
    a = f(z)
    out = (h if skip else 0) + a @ W_up + (b_up if bu else 0)
    return out, (h, W_down, W_up, z)


def erf_gelu(z):
    return 0.5 * z * (1 + np.vectorize(math.erf)(z / math.sqrt(2)))


FORWARD_WRONG = [
    (lambda *a: fwd(*a, skip=False), "skip connection is missing"),
    (lambda *a: fwd(*a, bu=False), "b_up is missing"),
    (lambda *a: fwd(*a, bd=False), "b_down is missing"),
    (lambda *a: fwd(*a, f=lambda z: z), "nonlinearity f (GELU) is missing"),
    (lambda *a: fwd(*a, f=lambda z: np.maximum(z, 0)), "that is ReLU"),
    (lambda *a: fwd(*a, f=erf_gelu), "exact (erf) GELU"),
    (lambda *a: fwd(*a)[0], "expected 2 values (out, cache)"),
    (lambda *a: (fwd(*a)[0].reshape(-1, a[0].shape[-1]), None), "expected shape"),
    (lambda *a: (fwd(*a)[0] * 0 + 1, None), "max relative error"),
    (lambda *a: adapters.adapter_forward(a[0], dict(zip(("W_down", "b_down", "W_up", "b_up"), a[1:]))),
     "adapters.adapter_forward"),
]


@pytest.mark.parametrize("answer, reason", FORWARD_WRONG)
def test_adapter_forward_wrong(answer, reason):
    fails(lambda: ex.check_adapter_forward(answer), reason)


def fwd_tanh(h, W_down, b_down, W_up, b_up):
    z = h @ W_down + b_down
    a = 0.5 * z * (1 + np.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z ** 3)))
    return h + a @ W_up + b_up, (h, z)


@pytest.mark.parametrize("answer", [fwd, fwd_tanh, lambda *a: list(fwd(*a))])
def test_adapter_forward_correct(answer):
    passes(lambda: ex.check_adapter_forward(answer))


# ----------------------------------------------------------------------------- backward


def bwd(dout, cache, skip=True, gelu=True, sum_db=True, first_only=False, order=None):
    h, W_down, W_up, z = cache
    C, m = W_down.shape
    a = layers.gelu_forward(z)[0]
    if first_only:
        dout_, h_, a_ = dout[:1], h[:1], a[:1]
    else:
        dout_, h_, a_ = dout, h, a
    dW_up = a_.reshape(-1, m).T @ dout_.reshape(-1, C)
    db_up = dout.reshape(-1, C).sum(0) if sum_db else dout
    dz = (dout @ W_up.T) * (ref.gelu_grad(z) if gelu else 1.0)
    dW_down = h_.reshape(-1, C).T @ (dz[:1] if first_only else dz).reshape(-1, m)
    db_down = dz.reshape(-1, m).sum(0)
    dh = dz @ W_down.T + (dout if skip else 0)
    grads = (dh, dW_down, db_down, dW_up, db_up)
    return tuple(grads[i] for i in order) if order else grads


BACKWARD_WRONG = [
    (lambda d, c: bwd(d, c, skip=False), "misses the skip connection's dout"),
    (lambda d, c: bwd(d, c, gelu=False), "GELU's derivative is missing"),
    (lambda d, c: bwd(d, c, sum_db=False), "sum dout over all the leading axes"),
    (lambda d, c: bwd(d, c, first_only=True), ("only the first sequence's rows", "max relative error")),
    (lambda d, c: bwd(d, c, order=(0, 3, 4, 1, 2)), ("return them in the order", "expected shape")),
    (lambda d, c: bwd(d, c)[:4], "expected 5 values"),
    (lambda d, c: {"dh": bwd(d, c)[0]}, "expected 5 values"),
    (lambda d, c: tuple(g.T for g in bwd(d, c)), ("expected shape", "the transpose")),
    (lambda d, c: bwd(d * 2, c), "max relative error"),
    (lambda d, c: adapters.adapter_backward(d, c), ("adapters.adapter_backward", "raised")),
]


@pytest.mark.parametrize("answer, reason", BACKWARD_WRONG)
def test_adapter_backward_wrong(answer, reason):
    fails(lambda: ex.check_adapter_backward(fwd, answer), reason)


def test_adapter_backward_calling_the_package_is_named():
    def forward(h, W_down, b_down, W_up, b_up):
        return adapters.adapter_forward.__wrapped__(h) if False else \
            adapters.adapter_forward(h, dict(W_down=W_down, b_down=b_down, W_up=W_up, b_up=b_up))

    def backward(dout, cache):
        return adapters.adapter_backward(dout, cache)
    fails(lambda: ex.check_adapter_backward(lambda *a: fwd(*a), lambda d, c: backward(
        d, adapters.adapter_forward(c[0], dict(W_down=c[1], b_down=np.zeros(c[1].shape[1]), W_up=c[2],
                                                 b_up=np.zeros(c[0].shape[-1])))[1])), "adapters.adapter_backward")


def bwd_einsum(dout, cache):
    h, W_down, W_up, z = cache
    a = layers.gelu_forward(z)[0]
    dz = (dout @ W_up.T) * ref.gelu_grad(z)
    lead = tuple(range(dout.ndim - 1))
    return (dz @ W_down.T + dout, np.tensordot(h, dz, axes=(lead, lead)), dz.sum(axis=lead),
            np.tensordot(a, dout, axes=(lead, lead)), dout.sum(axis=lead))


@pytest.mark.parametrize("answer", [bwd, bwd_einsum, lambda d, c: list(bwd(d, c))])
def test_adapter_backward_correct(answer):
    passes(lambda: ex.check_adapter_backward(fwd, answer))


# ----------------------------------------------------------------------------- which parameters train

IS_TRAINED_WRONG = [
    (lambda n, ln: n.startswith("adapters."), "'other' stays frozen"),
    (lambda n, ln: n.startswith("adapters.task.") or (ln and ".ln" in n), "base's LayerNorms stay frozen"),
    (lambda n, ln: n.startswith("adapters.task.") and ".ln" not in n, "trains the task's own LayerNorm copies"),
    (lambda n, ln: n.startswith("adapters.task.") or n.startswith("cls_head"), "its classifier cls_head"),
    (lambda n, ln: n.startswith("adapters.task.") or n.startswith("lm_head"), "lm_head"),
    (lambda n, ln: n.startswith("adapters.task.") and "head" not in n, "its head always train"),
    (lambda n, ln: int(n.startswith("adapters.task.")), "expected True or False, got the int"),
    (lambda n, ln: "True" if n.startswith("adapters.task.") else "False", "expected True or False, got the str"),
    (lambda n, ln: n.startswith("adapters.task.blocks.0") or n.startswith("adapters.task.head"), "is frozen"),
    (lambda n, ln: True, "but it is frozen"),
]


@pytest.mark.parametrize("answer, reason", IS_TRAINED_WRONG)
def test_is_trained_wrong(answer, reason):
    fails(lambda: ex.check_is_trained(answer), reason)


@pytest.mark.parametrize("answer", [lambda n, ln: n.startswith("adapters.task."),
                                    lambda n, ln: np.bool_(n.split(".")[:2] == ["adapters", "task"])])
def test_is_trained_correct(answer):
    passes(lambda: ex.check_is_trained(answer))


# ----------------------------------------------------------------------------- the init law


def law(std, C, m, v=0.7737, slope=0.5):
    return math.sqrt(C * m) * v * std ** 2 * slope


INIT_WRONG = [
    (lambda s, C, m: law(s, C, m + 1), "m + 1"),
    (lambda s, C, m: law(s, C + 1, m), "C + 1"),
    (lambda s, C, m: law(s, C, m, v=1.0), "1/0.774"),
    (lambda s, C, m: law(s, C, m, slope=1.0), "GELU's slope at 0 is 1/2"),
    (lambda s, C, m: law(s, C, m, slope=0.25), "halves the branch once"),
    (lambda s, C, m: law(s, C, m) / math.sqrt(m), "sqrt(C m), not sqrt(C)"),
    (lambda s, C, m: law(s, C, m) / math.sqrt(C), "sqrt(C m), not sqrt(m)"),
    (lambda s, C, m: law(s, C, m) * math.sqrt(m), "both, sqrt(C m)"),
    (lambda s, C, m: law(s, C, m) / s, "not std"),
    (lambda s, C, m: law(s, C, m, v=0.7737 ** 2), "counted twice"),
    (lambda s, C, m: law(s, C, m) * 1.03, "count the C terms"),
    (lambda s, C, m: np.array([law(s, C, m)]), "expected a number"),
]


@pytest.mark.parametrize("answer, reason", INIT_WRONG)
def test_init_law_wrong(answer, reason):
    fails(lambda: ex.check_init_law(answer), reason)


@pytest.mark.parametrize("answer", [law, lambda s, C, m: law(s, C, m, v=0.774),
                                    lambda s, C, m: law(s, C, m, v=ref.TRUNCATION),
                                    lambda s, C, m: np.float32(law(s, C, m))])
def test_init_law_correct(answer):
    passes(lambda: ex.check_init_law(answer))


def test_the_closed_form_is_what_a_fresh_adapter_measures():
    """Measured |branch| / |h| of fresh adapters (the package's init and forward) agrees with
    the closed form within 2 % (sampling noise of 64 seeds x 256 rows ~ 0.5 %)."""
    std, C, m = 1e-3, 32, 8
    ratios = []
    for seed in range(64):
        g = np.random.default_rng(seed)
        w = adapters.init_adapter(AdapterConfig(bottleneck=m, init_std=std), C, g, np.float64)
        h = g.standard_normal((256, C))
        ratios.append(np.linalg.norm(adapters.adapter_forward(h, w, skip=False)[0]) / np.linalg.norm(h))
    assert abs(np.mean(ratios) / ref.branch_ratio(std, C, m) - 1) < 0.02
