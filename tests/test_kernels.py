"""The fast kernels compute what the reference passes compute, and the reference is the default.

Tolerances, on max |fast - reference| divided by the largest entry of the whole result (all of
its arrays): the key bias's gradient is exactly zero in exact arithmetic (softmax ignores a shift
shared by every key), so both paths return round-off noise there, which only the result's own
scale can judge.
    float64: 1e-12   (the two paths add in a different order: round-off of ~1e-16 per step)
    float32: 1e-5    (the same, at float32's ~6e-8)
Each operation runs on a small input and on one large enough (>= runtime.MIN_SIZE elements) for
the fast kernels to split it among threads.
"""
import subprocess
import sys

import numpy as np
import pytest
from conftest import batch, generic_adapter, generic_model

from minitransformer import (AdapterConfig, BitFitConfig, LoRAConfig, ModelConfig, PrefixConfig, PromptConfig,
                             Transformer, backend, gradcheck)
from minitransformer import adapters, attention, layers, losses, optim, peft
from minitransformer.optim import AdamW
from minitransformer.tools import kernels, kernels_attention

TOLERANCE = {np.float64: 1e-12, np.float32: 1e-5}
DTYPES = [np.float64, np.float32]


def largest(result):
    """The largest |entry| of any array in a nested result (arrays, tuples, dicts, None)."""
    if isinstance(result, dict):
        result = list(result.values())
    if isinstance(result, (tuple, list)):
        return max([largest(r) for r in result] + [0.0])
    return float(np.max(np.abs(result))) if isinstance(result, np.ndarray) and result.size else 0.0


def assert_close(fast, ref, dtype, what, scale=None):
    """Nested results (arrays, tuples, dicts, None) agree to the dtype's tolerance, dtype kept."""
    scale = largest(ref) if scale is None else scale
    if isinstance(ref, dict):
        assert set(fast) == set(ref), what
        for k in ref:
            assert_close(fast[k], ref[k], dtype, f"{what}[{k}]", scale)
    elif isinstance(ref, (tuple, list)):
        assert len(fast) == len(ref), what
        for i, (f, r) in enumerate(zip(fast, ref)):
            assert_close(f, r, dtype, f"{what}[{i}]", scale)
    elif isinstance(ref, np.ndarray):
        assert fast.dtype == ref.dtype == dtype and fast.shape == ref.shape, what
        diff = float(np.max(np.abs(fast.astype(np.float64) - ref))) / scale if ref.size else 0.0
        assert diff <= TOLERANCE[dtype], f"{what}: difference {diff:.2e} of the result's scale {scale:.2e}"
    else:
        assert fast is None and ref is None, what


def randn(rng, dtype, *shape):
    return rng.standard_normal(shape).astype(dtype)


SIZES = {"small": (3, 5, 16), "large": (16, 128, 256)}  # large: 2^19 elements, split among threads


def test_the_fast_path_has_a_kernel_for_every_heavy_operation():
    fast = backend.table("fast")
    own = {n for n in backend.REFERENCE if fast[n] is not backend.REFERENCE[n]}
    assert own == {"linear_forward", "linear_backward", "embedding_backward", "layernorm_forward", "layernorm_backward",
                   "gelu_forward", "gelu_backward", "softmax_forward", "softmax_backward",
                   "attention_forward", "attention_backward", "attend_forward", "attend_backward",
                   "adapter_forward", "adapter_backward",
                   "sgd_update", "adamw_update", "each_parameter"}


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear(size, dtype):
    rng = np.random.default_rng(0)
    B, T, C = SIZES[size]
    x, W, b, d = randn(rng, dtype, B, T, C), randn(rng, dtype, C, 2 * C), randn(rng, dtype, 2 * C), \
        randn(rng, dtype, B, T, 2 * C)
    (yf, cf), (yr, cr) = kernels.linear_forward(x, W, b), layers.linear_forward(x, W, b)
    assert_close(yf, yr, dtype, "y")
    assert_close(kernels.linear_backward(d, cf), layers.linear_backward(d, cr), dtype, "dx, grads")
    skip = dict(need_dx=False, need_dW=True, need_db=False)
    assert_close(kernels.linear_backward(d, cf, **skip), layers.linear_backward(d, cr, **skip), dtype, "dW only")


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_embedding_backward_with_repeated_and_unused_tokens(size, dtype):
    rng = np.random.default_rng(8)
    B, T, C = SIZES[size]
    V = 11
    ids, d = rng.integers(0, V - 2, (B, T)), randn(rng, dtype, B, T, C)  # the last two tokens unused
    ids[0, :3] = 4  # one token three times in a row
    (_, cf), (_, cr) = (layers.embedding_forward(ids, randn(rng, dtype, V, C)),) * 2
    fast, ref = kernels.embedding_backward(d, cf), layers.embedding_backward(d, cr)
    assert_close(fast, ref, dtype, "None, {W}")
    assert np.array_equal(fast[1]["W"], ref[1]["W"])  # each token's rows added in the same order: np.add.at's bits
    assert not fast[1]["W"][V - 2:].any()


def test_embedding_backward_of_no_tokens():
    _, cache = layers.embedding_forward(np.zeros((2, 0), int), np.ones((5, 3), np.float32))
    _, grads = kernels.embedding_backward(np.zeros((2, 0, 3), np.float32), cache)
    assert grads["W"].shape == (5, 3) and grads["W"].dtype == np.float32 and not grads["W"].any()


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_layernorm(size, dtype):
    rng = np.random.default_rng(1)
    B, T, C = SIZES[size]
    x, g, b, d = randn(rng, dtype, B, T, C), randn(rng, dtype, C), randn(rng, dtype, C), randn(rng, dtype, B, T, C)
    x[0, 1] = 0.5  # a constant row
    (yf, cf), (yr, cr) = kernels.layernorm_forward(x, g, b), layers.layernorm_forward(x, g, b)
    assert_close(yf, yr, dtype, "y")
    assert_close(kernels.layernorm_backward(d, cf), layers.layernorm_backward(d, cr), dtype, "dx, grads")
    only_beta = dict(need_dx=False, need_dgamma=False)
    assert_close(kernels.layernorm_backward(d, cf, **only_beta), layers.layernorm_backward(d, cr, **only_beta),
                 dtype, "dbeta only")


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gelu(size, dtype):
    rng = np.random.default_rng(2)
    x, d = randn(rng, dtype, *SIZES[size]) * 3, randn(rng, dtype, *SIZES[size])
    (yf, cf), (yr, cr) = kernels.gelu_forward(x), layers.gelu_forward(x)
    assert_close(yf, yr, dtype, "y")
    assert_close(kernels.gelu_backward(d, cf), layers.gelu_backward(d, cr), dtype, "dx")


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_with_masked_entries_and_rows(size, dtype):
    rng = np.random.default_rng(3)
    B, T, C = SIZES[size]
    x, d = randn(rng, dtype, B, 2, T, T) * 4, randn(rng, dtype, B, 2, T, T)
    x[0, 0, 1, 2:] = -np.inf  # masked keys
    x[0, 1, 0] = -np.inf  # a fully masked row: all zeros
    (pf, cf), (pr, cr) = kernels.softmax_forward(x), layers.softmax_forward(x)
    assert_close(pf, pr, dtype, "p")
    assert_close(kernels.softmax_backward(d, cf), layers.softmax_backward(d, cr), dtype, "dx")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 5, 7), (4, 1), (2, 0, 6), (6, 0), (1, 128)])
def test_row_max_is_the_rows_maximum_bit_for_bit(dtype, shape):
    """row_max (np.maximum.reduceat over the rows laid end to end) against x.max(axis=-1),
    with -inf, NaN and signed zeros in rows, on arrays and on views that are not contiguous."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal(shape).astype(dtype)
    if x.size:
        flat = x.reshape(-1, shape[-1])
        flat[0] = -np.inf  # a fully masked row
        flat[-1, 0] = np.nan
        flat[len(flat) // 2] = -0.0
    for a in (x, x[..., ::-1], np.swapaxes(x, 0, -1).copy().swapaxes(0, -1)):
        if shape[-1] == 0:  # rows of nothing have no maximum, and both say so
            for fn in (kernels.row_max, lambda a: a.max(axis=-1, keepdims=True)):
                with pytest.raises(ValueError):
                    fn(a)
            continue
        got, want = kernels.row_max(a), a.max(axis=-1, keepdims=True)
        assert got.shape == want.shape and got.dtype == want.dtype
        assert np.array_equal(got, want, equal_nan=True)


@pytest.mark.parametrize("size", ["small", "large"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_with_masks(size, dtype):
    rng = np.random.default_rng(4)
    B, T, C = (3, 5, 16) if size == "small" else (8, 64, 128)
    w = {f"{k}_{n}": randn(rng, dtype, *((C, C) if k == "W" else (C,))) / np.sqrt(C).astype(dtype)
         for n in "qkvo" for k in "Wb"}
    x, d = randn(rng, dtype, B, T, C), randn(rng, dtype, B, T, C)
    pad = np.ones((B, T), bool)
    pad[1, T - 2:] = False
    bias = attention.attention_bias(T, True, pad, dtype)
    (of, cf), (orf, cr) = kernels_attention.attention_forward(x, w, 4, bias), \
        attention.attention_forward(x, w, 4, bias)
    assert_close(of, orf, dtype, "out")
    assert_close(kernels_attention.attention_backward(d, cf), attention.attention_backward(d, cr), dtype, "dx, grads")


@pytest.mark.parametrize("size", ["small", "large"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_prefix, causal", [(0, True), (3, False), (2, True)])
def test_attend_with_a_prefix(size, dtype, n_prefix, causal):
    """attend alone, with n prefix keys and values in front (peft.prefix_forward): the fast
    kernel computes what the reference does, forward and backward."""
    rng = np.random.default_rng(7)
    B, T, C = (3, 5, 16) if size == "small" else (8, 64, 128)
    q, k, v, d = (randn(rng, dtype, B, T, C) for _ in range(4))
    pad = np.ones((B, T), bool)
    pad[1, T - 2:] = False
    bias = attention.attention_bias(T, causal, pad, dtype)
    if n_prefix:
        k, v, _ = peft.prefix_forward(k, v, randn(rng, dtype, n_prefix, C), randn(rng, dtype, n_prefix, C))
        bias = peft.prefix_bias(bias, T, n_prefix)
    (of, cf), (orf, cr) = kernels_attention.attend_forward(q, k, v, 4, bias), attention.attend_forward(q, k, v, 4, bias)
    assert_close(of, orf, dtype, "ctx")
    assert_close(kernels_attention.attend_backward(d, cf), attention.attend_backward(d, cr), dtype, "(dq, dk, dv), {}")


@pytest.mark.parametrize("size", ["small", "large"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nonlinearity, skip, scaling", [("gelu", True, 1.0), ("relu", True, 1.0),
                                                         ("tanh", True, 1.0), ("gelu", False, 4.0),
                                                         ("gelu", True, 0.5)])
def test_adapter(size, dtype, nonlinearity, skip, scaling):
    """large: the products above runtime.MIN_PRODUCT_FLOPS, cut among the threads."""
    rng = np.random.default_rng(5)
    (B, T, C), m = ((64, 32, 64), 8) if size == "small" else ((16, 128, 256), 64)
    w = {"W_down": randn(rng, dtype, C, m) * 0.3, "b_down": randn(rng, dtype, m),
         "W_up": randn(rng, dtype, m, C) * 0.3, "b_up": randn(rng, dtype, C)}
    h, d = randn(rng, dtype, B, T, C), randn(rng, dtype, B, T, C)
    (of, cf) = kernels_attention.adapter_forward(h, w, nonlinearity, skip, scaling)
    (orf, cr) = adapters.adapter_forward(h, w, nonlinearity, skip, scaling)
    assert_close(of, orf, dtype, "out")
    assert_close(kernels_attention.adapter_backward(d, cf), adapters.adapter_backward(d, cr), dtype, "dh, grads")


@pytest.mark.parametrize("dtype", DTYPES)
def test_optimizer_updates(dtype):
    rng = np.random.default_rng(6)
    w, g = randn(rng, dtype, 300, 40), randn(rng, dtype, 300, 40)
    states = [[w.copy(), np.zeros_like(w), np.zeros_like(w)] for _ in range(2)]
    for t in (1, 2, 3):  # three steps: the bias corrections change with t
        for update, (ww, m, v) in zip((kernels.adamw_update, optim.adamw_update), states):
            update(ww, g, m, v, t, 1e-2, 0.9, 0.999, 1e-8, 0.01)
    assert_close(states[0], states[1], dtype, "w, m, v after AdamW")
    sgd = [[w.copy(), np.zeros_like(w)] for _ in range(2)]
    for _ in range(3):
        for update, (ww, vel) in zip((kernels.sgd_update, optim.sgd_update), sgd):
            update(ww, g, vel, 0.1, 0.9, 1e-3)
    assert_close(sgd[0], sgd[1], dtype, "w, velocity after SGD")


def test_cross_entropy_is_shared_by_both_paths():
    assert backend.table("fast")["cross_entropy_forward"] is losses.cross_entropy_forward


# ----------------------------------------------------------------------------- whole models


@pytest.mark.parametrize("path", backend.PATHS)
@pytest.mark.parametrize("norm", ["post", "pre"])
def test_a_whole_model_checks_on_each_path(path, norm):
    """Every parameter of a model with adapters on a frozen base, checked on each path."""
    model = generic_model(adapter=generic_adapter(), norm=norm, causal=True)
    ids, _, pad = batch(model.config, head="cls")
    with backend.using(path):
        rows = gradcheck.check_model(model, ids, np.array([0, 2, 1]), pad, head="cls")
    errors = [err for _, _, trains, err in rows if trains]
    assert len(errors) >= 20 and max(errors) <= gradcheck.MODEL_THRESHOLD


METHODS = {"lora": LoRAConfig(r=2, alpha=2.0, targets=("q", "k", "v", "o", "ffn1", "ffn2")),
           "prefix": PrefixConfig(n_prefix=2, reparameterize=False),
           "prefix_mlp": PrefixConfig(n_prefix=2, hidden=5, init_std=1.0),
           "prompt": PromptConfig(n_prompt=2, init="normal", init_std=0.5),
           "bitfit": BitFitConfig()}


@pytest.mark.parametrize("path", backend.PATHS)
@pytest.mark.parametrize("method", METHODS)
def test_every_method_checks_on_each_path(path, method):
    """Every parameter of a LoRA, prefix, prompt or BitFit task on a frozen pre-LN base, causal
    LM head and padding, checked against finite differences on each path."""
    model = generic_model(norm="pre", causal=True, pooling="mean")
    s = model.add_adapter("task", METHODS[method], n_classes=3, seed=1)
    rng = np.random.default_rng(3)
    for p in s.parameters():  # off the exact start (B = 0, BitFit's copies = the base's)
        p.value += 0.3 * rng.standard_normal(p.value.shape)
    model.train_adapter("task")
    ids, targets, pad = batch(model.config, head="lm")
    with backend.using(path):
        rows = gradcheck.check_model(model, ids, targets, pad, head="lm", dropout_seed=5)
    errors = [err for name, _, trains, err in rows if trains and ".head." not in name]
    assert errors and max(errors) <= gradcheck.MODEL_THRESHOLD  # the prompt: one array


@pytest.mark.parametrize("method", METHODS)
def test_a_few_steps_of_every_method_give_the_same_weights_on_both_paths(method):
    def steps(path):
        model = Transformer(ModelConfig(vocab_size=23, max_len=16, d_model=32, n_heads=4, n_layers=2,
                                        d_ff=64, n_classes=3, dropout=0.1, dtype="float64"), seed=0)
        model.add_adapter("t", METHODS[method], n_classes=3, seed=1)
        model.train_adapter("t")
        model.freeze("*.b_k")  # its gradient is round-off noise (see train() below)
        rng = np.random.default_rng(0)
        ids, labels = rng.integers(0, 23, (8, 16)), rng.integers(0, 3, 8)
        pad = np.ones((8, 16), bool)
        pad[1, 9:] = False
        with backend.using(path):
            opt, drop = AdamW(model.parameters(), lr=1e-2), np.random.default_rng(1)
            for _ in range(4):
                opt.zero_grad()
                model.loss(ids, labels, pad, head="cls", train=True, rng=drop, backward=True)
                opt.step()
        return {n: p.value for n, p in model.named_parameters().items()}
    ref, fast = steps("reference"), steps("fast")
    for n in ref:
        assert_close(fast[n], ref[n], np.float64, n, scale=max(1.0, largest(ref[n])))


def train(path, dtype, steps=5):
    """A few AdamW steps of a small post-LN model with adapters and padding -> {name: value}."""
    cfg = ModelConfig(vocab_size=23, max_len=16, d_model=32, n_heads=4, n_layers=2, d_ff=64,
                      n_classes=3, dropout=0.1, dtype=dtype)
    model = Transformer(cfg, seed=0)
    model.add_adapter("t", AdapterConfig(bottleneck=4, init_std=0.1), n_classes=3, seed=1)
    model.unfreeze()
    # b_k changes no output (softmax ignores a shift shared by every key): its gradient is
    # round-off noise, which AdamW would scale up to full steps of lr in a random direction
    model.freeze("*.b_k")
    rng = np.random.default_rng(0)
    ids, labels = rng.integers(0, 23, (8, 16)), rng.integers(0, 3, 8)
    pad = np.ones((8, 16), bool)
    pad[1, 9:] = False
    with backend.using(path):
        opt = AdamW(model.parameters(), lr=1e-2)
        drop = np.random.default_rng(1)
        for _ in range(steps):
            opt.zero_grad()
            model.loss(ids, labels, pad, head="cls", train=True, rng=drop, backward=True)
            opt.step()
    return model


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_a_few_training_steps_give_the_same_weights_on_both_paths(dtype):
    ref, fast, start = (train(path, dtype, steps) for path, steps in
                        (("reference", 5), ("fast", 5), ("reference", 0)))
    ref, fast, start = ({n: p.value for n, p in m.named_parameters().items()} for m in (ref, fast, start))
    for n in ref:
        assert_close(fast[n], ref[n], np.dtype(dtype).type, n, scale=max(1.0, largest(ref[n])))
    # the steps did train: every array the classifier's forward uses, b_k aside, moved
    used = {n for n in train("reference", dtype, 0).active_parameters("cls") if not n.endswith(".b_k")}
    moved = {n for n in ref if not np.array_equal(ref[n], start[n])}
    assert moved == used and len(used) > 30


# ----------------------------------------------------------------------------- the default


def test_the_reference_path_is_the_default_of_the_python_api():
    """In a fresh interpreter, a model built through the Python API runs the reference passes:
    a spy on layers.layernorm_forward sees the model's forward call it."""
    code = """
import numpy as np
from minitransformer import ModelConfig, Transformer, backend, layers
assert backend.current() == "reference", backend.current()
assert backend.ops.layernorm_forward is layers.layernorm_forward
calls = []
real = layers.layernorm_forward
backend.ops.layernorm_forward = lambda *a, **k: calls.append(1) or real(*a, **k)
model = Transformer(ModelConfig(n_layers=1))
model.forward(np.zeros((1, 4), int))
assert calls, "the forward did not go through the reference LayerNorm"
print("reference")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "reference"


def test_using_restores_the_path_before_it_even_on_error():
    assert backend.current() == "reference"
    with pytest.raises(RuntimeError):
        with backend.using("fast"):
            assert backend.current() == "fast" and backend.ops.gelu_forward is kernels.gelu_forward
            raise RuntimeError
    assert backend.current() == "reference" and backend.ops.gelu_forward is layers.gelu_forward
    with pytest.raises(ValueError, match=r"path: expected one of \('reference', 'fast'\), got 'quick'"):
        backend.use("quick")


# ----------------------------------------------------------------------------- cache-sized blocks


@pytest.mark.parametrize("shape", [(16, 128, 256), (7, 37, 1031), (3, 5, 16)])
def test_cache_sized_blocks_change_no_bit(monkeypatch, shape):
    """kernels.chunked runs each row as one call would: the results of every blocked kernel are
    equal bit for bit to those of one pass over the whole array (rows cut at odd places too)."""
    rng = np.random.default_rng(0)
    x, d = randn(rng, np.float32, *shape), randn(rng, np.float32, *shape)
    g, b = randn(rng, np.float32, shape[-1]), randn(rng, np.float32, shape[-1])
    att = x.copy()
    att[0, 0, :3] = -np.inf
    att[0, 1, :] = -np.inf  # a fully masked row

    def run():
        out = {}
        out["ln"], c = kernels.layernorm_forward(x, g, b)
        out["ln_back"] = kernels.layernorm_backward(d, c)
        out["gelu"], c = kernels.gelu_forward(x)
        out["gelu_back"] = kernels.gelu_backward(d, c)
        out["softmax"], c = kernels.softmax_forward(att)
        out["softmax_back"] = kernels.softmax_backward(d, c)
        w, m, v = x.copy(), d.copy(), np.abs(x)
        kernels.adamw_update(w, d, m, v, 3, 1e-3, 0.9, 0.999, 1e-8, 0.01)
        out["adamw"] = (w, m, v)
        return out
    def flat(out):  # every array of the nested results (dicts in key order), None kept
        if isinstance(out, dict):
            return [a for k in sorted(out) for a in flat(out[k])]
        return [a for o in out for a in flat(o)] if isinstance(out, tuple) else [out]
    blocked = flat(run())
    for chunk in (1 << 40, 999):  # one block (one pass over the whole array), and blocks of a row or two
        monkeypatch.setattr(kernels, "CHUNK", chunk)
        for a, c in zip(flat(run()), blocked, strict=True):
            assert (a is None and c is None) or np.array_equal(a, c, equal_nan=True), chunk
