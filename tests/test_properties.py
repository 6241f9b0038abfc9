"""Property tests over random small configurations (width, heads, layers, length, batch, masks):
shapes, dtypes, finiteness, and a float64 gradient check of the loss on random parameters."""
import numpy as np
from conftest import move_layernorms
from hypothesis import given, settings
from hypothesis import strategies as st

from minitransformer import AdapterConfig, ModelConfig, Transformer
from minitransformer.gradcheck import MODEL_THRESHOLD, model_loss, numerical_gradient, rel_error
from minitransformer.optim import AdamW

V, K = 7, 3  # vocabulary size, classes


@st.composite
def setups(draw, dtype, min_width=1):
    """A random small model config plus a batch: ids, pad_mask (any pattern, rows may be all padding)."""
    n_heads = draw(st.integers(1, 3))
    head_size = draw(st.integers(-(-min_width // n_heads), 4))  # d_model = n_heads * head_size >= min_width
    cfg = ModelConfig(vocab_size=V, max_len=6, d_model=n_heads * head_size, n_heads=n_heads,
                      n_layers=draw(st.integers(1, 2)), d_ff=draw(st.integers(2, 8)),
                      norm=draw(st.sampled_from(["post", "pre"])), causal=draw(st.booleans()),
                      pooling=draw(st.sampled_from(["first", "mean"])), n_classes=K,
                      dropout=draw(st.sampled_from([0.0, 0.2])), dtype=dtype,
                      init_std=0.02 if dtype == "float32" else 0.3)
    B, T = draw(st.integers(1, 3)), draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, V, (B, T))
    pad_mask = rng.random((B, T)) < 0.8
    pad_mask[np.arange(B), rng.integers(0, T, B)] = True  # a real token in every row (padding only is refused)
    placement = draw(st.sampled_from([None, "houlsby", "ffn", "parallel"]))
    return cfg, ids, pad_mask, placement, seed


def build(cfg, placement, seed, init_std=1e-3):
    model = Transformer(cfg, seed=seed)
    if placement:
        model.add_adapter("t", AdapterConfig(bottleneck=2, placement=placement, init_std=init_std),
                          n_classes=K, seed=seed)
        model.train_adapter("t")
    return model


@settings(max_examples=25, deadline=None)
@given(setup=setups("float32"), head=st.sampled_from(["lm", "cls"]))
def test_float32_shapes_dtypes_finite_through_forward_backward_and_adamw(setup, head):
    cfg, ids, pad_mask, placement, seed = setup
    model = build(cfg, placement, seed)
    B, T = ids.shape
    targets = np.where(pad_mask, ids, -100) if head == "lm" else ids[:, 0] % K
    rng = np.random.default_rng(seed)
    logits, loss = model.loss(ids, targets, pad_mask, head=head, train=True, rng=rng, backward=True)
    assert logits.shape == ((B, T, V) if head == "lm" else (B, K))
    assert logits.dtype == np.float32 and np.all(np.isfinite(logits)) and np.isfinite(loss)
    trainable = model.parameters(trainable_only=True)
    for p in model.parameters():
        if p.grad is not None:
            assert p.trainable and p.grad.shape == p.value.shape and p.grad.dtype == np.float32
            assert np.all(np.isfinite(p.grad))
    AdamW(trainable, lr=1e-3).step()
    assert all(p.value.dtype == np.float32 and np.all(np.isfinite(p.value)) for p in model.parameters())


@settings(max_examples=12, deadline=None)
@given(setup=setups("float64", min_width=4), head=st.sampled_from(["lm", "cls"]), data=st.data())
def test_gradcheck_loss_on_random_parameters(setup, head, data):
    """Two random parameters (trainable ones: with an adapter, adapter parameters) at a generic
    point (init_std 0.3, LayerNorms moved); dropout replayed; threshold MODEL_THRESHOLD = 1e-6.

    Width >= 4: at d_model 2 a LayerNorm maps every row to gamma * (+-1, -+1) + beta, a step
    smoothed over only ~sqrt(eps), and the finite differences' truncation error, not the
    backward, exceeds 1e-6 (found by this test: 1.3e-5 at h = 1e-5, 1.0e-7 at h = 1e-6).
    """
    cfg, ids, pad_mask, placement, seed = setup
    model = build(cfg, placement, seed, init_std=0.3)
    move_layernorms(model, seed)
    targets = np.where(pad_mask, ids, -100) if head == "lm" else ids[:, 0] % K
    L = model_loss(model, ids, targets, pad_mask, head, dropout_seed=seed if cfg.dropout > 0 else None)
    model.zero_grad()
    L(backward=True)
    names = sorted(p.name for p in model.parameters(trainable_only=True))
    for name in data.draw(st.lists(st.sampled_from(names), min_size=2, max_size=2, unique=True)):
        p = model.named_parameters()[name]
        analytic = np.zeros_like(p.value) if p.grad is None else p.grad
        err = rel_error(analytic, numerical_gradient(L, p.value))
        assert err <= MODEL_THRESHOLD, (name, err)


@settings(max_examples=15, deadline=None)
@given(setup=setups("float32"), train_layernorm=st.booleans())
def test_zero_init_adapter_is_exactly_the_base_for_any_config(setup, train_layernorm):
    cfg, ids, pad_mask, placement, seed = setup
    model = Transformer(cfg, seed=seed)
    base, _ = model.forward(ids, pad_mask)
    model.add_adapter("t", AdapterConfig(bottleneck=2, placement=placement or "houlsby", zero_init_up=True,
                                         train_layernorm=train_layernorm), seed=seed)
    model.set_active_adapter("t")
    assert np.array_equal(model.forward(ids, pad_mask)[0], base)
