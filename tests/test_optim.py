"""Optimizers against steps computed by hand on tiny arrays; clipping; the learning-rate schedule."""
import numpy as np
import pytest

from minitransformer import ModelConfig, Transformer
from minitransformer.modules import Parameter
from minitransformer.optim import SGD, AdamW, clip_grad_norm, lr_at


def param(name, value, grad=None, trainable=True):
    p = Parameter(name, np.array(value, dtype=np.float64), trainable)
    p.grad = None if grad is None else np.array(grad, dtype=np.float64)
    return p


def test_sgd_momentum_two_steps_by_hand():
    p = param("w", [1.0, 2.0], [0.5, -1.0])
    opt = SGD([p], lr=0.1, momentum=0.9)
    opt.step()  # v = g = [0.5, -1];  w = [1 - 0.05, 2 + 0.1]
    np.testing.assert_allclose(p.value, [0.95, 2.1], rtol=1e-15)
    p.grad = np.array([1.0, 1.0])
    opt.step()  # v = 0.9 [0.5, -1] + [1, 1] = [1.45, 0.1];  w = [0.95 - 0.145, 2.1 - 0.01]
    np.testing.assert_allclose(p.value, [0.805, 2.09], rtol=1e-15)


def test_sgd_weight_decay_by_hand():
    p = param("w", [2.0], [0.5])
    SGD([p], lr=0.1, momentum=0.0, weight_decay=0.5).step()  # g + wd w = 0.5 + 1 = 1.5
    np.testing.assert_allclose(p.value, [2.0 - 0.15], rtol=1e-15)


def test_adamw_two_steps_by_hand():
    W = param("W", [[1.0, -2.0], [3.0, 4.0]], [[0.5, -0.25], [2.0, -1.0]])
    b = param("b", [1.0], [2.0])
    opt = AdamW([W, b], lr=0.1, betas=(0.9, 0.999), eps=0.0, weight_decay=0.1)
    # step 1: m_hat = g, v_hat = g^2, so the Adam step is lr * sign(g); a matrix first decays by
    # lr * wd = 1 %: W = 0.99 W - 0.1 sign(g). A vector (bias) does not decay.
    opt.step()
    np.testing.assert_allclose(W.value, [[0.89, -1.88], [2.87, 4.06]], rtol=1e-14)
    np.testing.assert_allclose(b.value, [0.9], rtol=1e-14)
    # step 2, W with the same gradient: m_hat = g and v_hat = g^2 again -> 0.99 W - 0.1 sign(g)
    # b with gradient 1: m = 0.9 * 0.2 + 0.1 * 1 = 0.28, m_hat = 0.28 / (1 - 0.81);
    #                    v = 0.999 * 0.004 + 0.001 * 1 = 0.004996, v_hat = 0.004996 / (1 - 0.999^2)
    b.grad = np.array([1.0])
    opt.step()
    np.testing.assert_allclose(W.value, [[0.7811, -1.7612], [2.7413, 4.1194]], rtol=1e-14)
    m_hat, v_hat = 0.28 / 0.19, 0.004996 / (1 - 0.998001)
    np.testing.assert_allclose(b.value, [0.9 - 0.1 * m_hat / np.sqrt(v_hat)], rtol=1e-12)


def test_adamw_weight_decay_is_decoupled():
    # zero gradient: Adam's moments stay 0 and its step is 0; only the decay acts, w *= 1 - lr*wd.
    # (L2 regularisation through the gradient would instead move w by ~lr = 0.1 on the first step.)
    W = param("W", [[2.0]], [[0.0]])
    b = param("b", [2.0], [0.0])
    AdamW([W, b], lr=0.1, eps=1e-8, weight_decay=0.5).step()
    np.testing.assert_allclose(W.value, [[2.0 * (1 - 0.05)]], rtol=1e-15)
    np.testing.assert_array_equal(b.value, [2.0])  # vectors are not decayed


def test_clip_grad_norm_by_hand():
    a, b = param("a", [0.0, 0.0], [3.0, 4.0]), param("b", [0.0], [12.0])
    frozen = param("f", [0.0], None, trainable=False)
    assert clip_grad_norm([a, b, frozen], max_norm=20.0) == pytest.approx(13.0)  # sqrt(9+16+144)
    np.testing.assert_array_equal(a.grad, [3.0, 4.0])  # under the limit: unchanged
    assert clip_grad_norm([a, b, frozen], max_norm=6.5) == pytest.approx(13.0)
    np.testing.assert_allclose(a.grad, [1.5, 2.0], rtol=1e-12)  # scaled by 6.5 / 13 = 0.5
    np.testing.assert_allclose(b.grad, [6.0], rtol=1e-12)


def test_lr_at_warmup_then_linear_decay():
    # warmup 4 steps to 1.0, then linear decay to 0.1 at step 10
    got = [lr_at(s, 1.0, warmup=4, total=10, final_fraction=0.1) for s in (0, 1, 3, 4, 7, 10, 20)]
    np.testing.assert_allclose(got, [0.25, 0.5, 1.0, 1.0, 0.55, 0.1, 0.1], rtol=1e-15)
    assert lr_at(0, 0.5, warmup=0, total=4) == 0.5 and lr_at(2, 0.5, warmup=0, total=4) == 0.25


@pytest.mark.parametrize("make", [lambda ps: AdamW(ps, lr=0.1), lambda ps: SGD(ps, lr=0.1)])
def test_optimizers_hold_and_touch_only_trainable(make):
    model = Transformer(ModelConfig(vocab_size=11, max_len=8, d_model=8, n_heads=2, n_layers=1, d_ff=16))
    model.freeze("blocks.*", "embed.*")
    trainable = {p.name for p in model.parameters(trainable_only=True)}
    opt = make(model.parameters())
    assert {p.name for p in opt.params} == trainable and trainable
    ids = np.array([[1, 2, 3, 4]])
    frozen_before = {p.name: p.value.tobytes() for p in model.parameters() if not p.trainable}
    model.loss(ids, ids, backward=True)
    opt.step()
    assert set(opt.state) <= trainable
    assert {p.name: p.value.tobytes() for p in model.parameters() if not p.trainable} == frozen_before
    # a parameter frozen after the optimizer was built is not touched either, even with a grad
    victim = model.named_parameters()["lm_head.b"]
    model.freeze("lm_head.b")
    victim.grad = np.ones_like(victim.value)
    before = victim.value.tobytes()
    opt.step()
    assert victim.value.tobytes() == before


def test_adamw_keeps_float32():
    p = Parameter("W", np.ones((2, 2), np.float32))
    p.grad = np.full((2, 2), 0.5, np.float32)
    opt = AdamW([p], lr=np.float64(0.01), weight_decay=np.float64(0.1))  # even with NumPy float64 scalars
    opt.step()
    assert p.value.dtype == np.float32 and opt.state["W"]["m"].dtype == np.float32
    assert opt.state["W"]["v"].dtype == np.float32
