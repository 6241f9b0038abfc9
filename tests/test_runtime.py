"""runtime.py and the fast kernels that use it: splitting elementwise work among threads gives
bit-for-bit the one-thread result, errors come back to the caller, and the settings are checked."""
import re
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

import pytest

from minitransformer import AdapterConfig, ModelConfig, Transformer, backend, gradcheck
from minitransformer.tools import gradcheck_command, kernels, kernels_attention, runtime
from minitransformer.optim import SGD, AdamW


@pytest.fixture
def split_everything(monkeypatch):
    """Split even tiny arrays, so that the threaded path runs on test-sized inputs; the thread
    count is restored afterwards."""
    monkeypatch.setattr(runtime, "MIN_SIZE", 1)
    before = runtime.threads()
    with backend.using("fast"):  # the threads are the fast kernels' business
        yield
    runtime.set_threads(before)


def on_threads(n, fn):
    runtime.set_threads(n)
    return fn()


def assert_same_bits(a, b):
    """Every array of two nested results equal bit for bit (NaN-free here)."""
    if isinstance(a, dict):
        assert list(a) == list(b)
        assert_same_bits(list(a.values()), list(b.values()))
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_bits(x, y)
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert np.array_equal(a, b), f"max difference {np.max(np.abs(a - b))}"
    else:
        assert a == b


def rowwise_ops(rng, dtype):
    x = rng.standard_normal((7, 5, 33)).astype(dtype)  # 7 rows on axis 0: blocks of 2-3 for 3 threads
    dout = rng.standard_normal((7, 5, 33)).astype(dtype)
    gamma, beta = (rng.standard_normal(33).astype(dtype) for _ in range(2))
    att = rng.standard_normal((7, 2, 5, 5)).astype(dtype)
    att[0, 1, 2] = -np.inf  # a fully masked row takes the special path
    att[3, :, :, 1] = -np.inf  # a masked key
    datt = rng.standard_normal(att.shape).astype(dtype)
    return {
        "layernorm": lambda: kernels.layernorm_forward(x, gamma, beta),
        "layernorm backward": lambda: kernels.layernorm_backward(dout, kernels.layernorm_forward(x, gamma, beta)[1]),
        "gelu": lambda: kernels.gelu_forward(x),
        "gelu backward": lambda: kernels.gelu_backward(dout, kernels.gelu_forward(x)[1]),
        "softmax": lambda: kernels.softmax_forward(att),
        "softmax backward": lambda: kernels.softmax_backward(datt, kernels.softmax_forward(att)[1]),
        "heads matmul": lambda: kernels_attention.heads_matmul(datt, x[:, None, :, :4].repeat(2, axis=1)),
        "scores matmul": lambda: kernels_attention.scores_matmul(x[:, None, :, :8].repeat(2, axis=1),
                                                         dout[:, None, :, :8].repeat(2, axis=1)),
        "attend": lambda: kernels_attention.attend_forward(x[..., :32], dout[..., :32], x[..., 1:], 4, att[:1, :1]),
        "attend backward": lambda: kernels_attention.attend_backward(
            x[..., :32], kernels_attention.attend_forward(x[..., :32], dout[..., :32], x[..., 1:], 4, att[:, :1])[1]),
    }


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("op", list(rowwise_ops(np.random.default_rng(0), np.float32)))
def test_each_rowwise_op_gives_the_same_bits_on_any_number_of_threads(op, dtype, split_everything):
    ops = rowwise_ops(np.random.default_rng(0), dtype)
    one = on_threads(1, ops[op])
    for n in (2, 3):
        assert_same_bits(one, on_threads(n, ops[op]))


def train_steps(optimizer, steps=3):
    """A few steps of a small post-LN model with adapters and padding; returns every parameter."""
    cfg = ModelConfig(vocab_size=23, max_len=9, d_model=16, n_heads=4, n_layers=2, d_ff=40, n_classes=3)
    model = Transformer(cfg, seed=0)
    model.add_adapter("t", AdapterConfig(bottleneck=4, init_std=0.1), n_classes=3, seed=1)
    model.unfreeze()
    rng = np.random.default_rng(0)
    ids, labels = rng.integers(0, 23, (6, 9)), rng.integers(0, 3, 6)
    pad = np.ones((6, 9), bool)
    pad[1, 5:] = False
    opt = optimizer(model.parameters())
    for _ in range(steps):
        opt.zero_grad()
        model.loss(ids, labels, pad, head="cls", backward=True)
        opt.step()
    return [p.value.copy() for p in model.parameters()]


@pytest.mark.parametrize("optimizer", [AdamW, SGD])
def test_a_training_run_is_bit_identical_on_one_and_two_threads(optimizer, split_everything):
    one = on_threads(1, lambda: train_steps(optimizer))
    two = on_threads(2, lambda: train_steps(optimizer))
    assert len(one) > 40
    assert_same_bits(one, two)


def test_gradients_still_check_when_every_operation_is_split(split_everything):
    runtime.set_threads(2)
    model, ids, targets, pad = gradcheck_command._generic_model("post", "cls", placement="houlsby")
    rows = gradcheck.check_model(model, ids, targets, pad, head="cls", dropout_seed=0)
    errors = [err for _, _, trains, err in rows if trains]
    assert len(errors) > 10 and max(errors) < 1e-6  # the model threshold of the gradcheck command


def test_a_kernels_error_reaches_the_caller(split_everything):
    runtime.set_threads(2)
    a = np.zeros((4, 3))

    def kernel(block):
        if block.shape[0] and np.shares_memory(block, a[2:]):  # the worker thread's block
            raise FloatingPointError("in the second block")
    with pytest.raises(FloatingPointError, match="second block"):
        runtime.by_rows(kernel, a)


def test_every_row_is_done_once_and_the_same_threads_do_it_every_call(split_everything):
    runtime.set_threads(3)
    seen, idents = [], set()

    def kernel(block):
        seen.extend(block[:, 0].tolist())
        idents.add(threading.get_ident())
    for _ in range(3):
        runtime.by_rows(kernel, np.arange(18.0).reshape(9, 2))
    assert sorted(seen) == sorted(np.arange(0.0, 18.0, 2).tolist() * 3)  # every row once per call
    assert len(idents) <= 3  # the calling thread and two workers, the same ones every call


def test_a_call_from_inside_a_job_runs_on_its_own_thread_and_does_not_wait_forever(split_everything):
    runtime.set_threads(2)
    inner = np.zeros((4, 2, 3))

    def kernel(block):  # each row hands work over again while the workers are busy
        for i in block[:, 0].astype(int):
            runtime.by_rows(lambda b: b.__iadd__(1), inner[i])
    runtime.by_rows(kernel, np.arange(4.0).repeat(2).reshape(4, 2))
    assert np.array_equal(inner, np.ones((4, 2, 3)))


def test_two_user_threads_calling_at_once_both_get_their_results(split_everything):
    runtime.set_threads(2)
    x = np.random.default_rng(0).standard_normal((64, 33)).astype(np.float32)
    one = kernels.gelu_forward(x)[0]
    with ThreadPoolExecutor(2) as pool:
        outs = list(pool.map(lambda _: kernels.gelu_forward(x)[0], range(40)))
    for out in outs:
        assert np.array_equal(out, one)


def test_arrays_of_different_lengths_are_refused(split_everything):
    runtime.set_threads(2)
    with pytest.raises(ValueError, match=r"arrays: expected the same first axis.*\(4, 3\).*\(5, 3\)"):
        runtime.by_rows(lambda a, b: None, np.zeros((4, 3)), np.zeros((5, 3)))


def test_for_each_does_every_item_once(split_everything):
    runtime.set_threads(3)
    seen = []
    runtime.for_each(seen.append, range(10), size=lambda i: i + 1)
    assert sorted(seen) == list(range(10))


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", True, runtime.MAX_THREADS + 1, 100000])
def test_bad_thread_counts_are_refused(bad):
    with pytest.raises(ValueError, match=r"n: expected an integer number of threads from 1 to 256, got"):
        runtime.set_threads(bad)


@pytest.mark.parametrize("bad", ["0", "two", "-1", "1.5", "\u00b2", "100000", " 2"])
def test_a_bad_thread_count_in_the_environment_is_refused(bad, monkeypatch):
    monkeypatch.setenv("MINITRANSFORMER_THREADS", bad)
    monkeypatch.setattr(runtime, "_threads", None)
    with pytest.raises(ValueError, match=rf"MINITRANSFORMER_THREADS: expected an integer.*from 1 to 256.*{re.escape(repr(bad))}"):
        runtime.threads()


def test_the_process_settings_report_themselves():
    assert isinstance(runtime.keep_freed_memory(), bool)
    assert runtime.memory_status()
    assert "OPENBLAS_THREAD_TIMEOUT" in runtime.blas_timeout_status() or "default" in runtime.blas_timeout_status()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("M, K, N", [(300, 40, 70), (70, 40, 300), (64, 8, 64), (520, 64, 256), (64, 256, 520)])
@pytest.mark.parametrize("transposed", [False, True])
def test_a_product_cut_among_threads_gives_one_calls_bits(dtype, M, K, N, transposed, monkeypatch):
    """runtime.product against np.matmul, for cuts along rows (tall) and columns (wide), with the
    operands as views of transposes (the backward's x.T @ dout and dout @ W.T): the same bits.
    (Blocks this size and larger take BLAS's general path, as one call does; see the next test.)"""
    monkeypatch.setattr(runtime, "MIN_PRODUCT_FLOPS", 1)
    rng = np.random.default_rng(0)
    a = rng.standard_normal((K, M) if transposed else (M, K)).astype(dtype)
    b = rng.standard_normal((N, K) if transposed else (K, N)).astype(dtype)
    a, b = (a.T, b.T) if transposed else (a, b)
    before = runtime.threads()
    try:
        for n in (1, 2, 3):
            runtime.set_threads(n)
            out = runtime.product(a, b)
            assert out.dtype == dtype
            assert_same_bits(a @ b, out)
            into = np.full((M, N), np.nan, dtype)
            assert runtime.product(a, b, out=into) is into
            assert_same_bits(a @ b, into)
            bias = rng.standard_normal(N).astype(dtype)
            with_bias = a @ b
            with_bias += bias
            assert_same_bits(with_bias, runtime.product(a, b, bias=bias))
            residual = rng.standard_normal((M, N)).astype(dtype)
            with_bias += residual
            assert_same_bits(with_bias, runtime.product(a, b, bias=bias, residual=residual))
    finally:
        runtime.set_threads(before)


def test_tiny_blocks_agree_to_round_off(monkeypatch):
    """A block of a few thousand flops may take BLAS's small-matrix path, which adds in another
    order: still the product to round-off (relative 1e-12 in float64)."""
    monkeypatch.setattr(runtime, "MIN_PRODUCT_FLOPS", 1)
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((129, 3)), rng.standard_normal((3, 5))
    before = runtime.threads()
    try:
        runtime.set_threads(2)
        out = runtime.product(a, b)
    finally:
        runtime.set_threads(before)
    assert np.max(np.abs(out - a @ b)) <= 1e-12 * np.max(np.abs(a @ b))


def test_a_small_product_is_one_call(monkeypatch):
    """Under MIN_PRODUCT_FLOPS no thread is involved: a worker's error would show otherwise."""
    calls = []
    monkeypatch.setattr(runtime, "_in_parallel", calls.append)
    a, b = np.ones((128, 4)), np.ones((4, 128))
    assert_same_bits(runtime.product(a, b), a @ b)
    assert calls == []


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_adapter_as_one_chain_per_row_block_gives_the_step_by_step_bits(dtype, split_everything, monkeypatch):
    """The published adapter (GELU, skip) runs its row-wise steps on each thread's rows; the
    output, every cached array and every gradient are bit for bit those of its steps run one
    after another (the path every other adapter takes), on 1, 2 and 3 threads."""
    monkeypatch.setattr(runtime, "MIN_PRODUCT_FLOPS", 1)
    rng = np.random.default_rng(5)
    h = rng.standard_normal((3, 101, 40)).astype(dtype)  # 303 rows: cut after row 151, float32 changed bits
    w = {"W_down": rng.standard_normal((40, 70)).astype(dtype), "b_down": rng.standard_normal(70).astype(dtype),
         "W_up": rng.standard_normal((70, 40)).astype(dtype), "b_up": rng.standard_normal(40).astype(dtype)}

    def step_by_step():
        z, cache_down = kernels.linear_forward(h, w["W_down"], w["b_down"])
        a, cache_act = kernels.gelu_forward(z)
        u = runtime.product(kernels.rows(a), w["W_up"], bias=w["b_up"], residual=kernels.rows(h))
        return u.reshape(h.shape), (cache_down, cache_act, (a, w["W_up"]), "gelu", True, 1.0)

    dout = rng.standard_normal(h.shape).astype(dtype)

    def backward_step_by_step(cache):
        da, g_up = kernels.linear_backward(dout, cache[2])
        dz, _ = kernels.gelu_backward(da, cache[1])
        _, g_down = kernels.linear_backward(dz, cache[0], need_dx=False)
        dh = runtime.product(kernels.rows(dz), w["W_down"].T, residual=kernels.rows(dout)).reshape(h.shape)
        return dh, {"W_up": g_up["W"], "b_up": g_up["b"], "W_down": g_down["W"], "b_down": g_down["b"]}

    want = on_threads(1, step_by_step)
    want_back = on_threads(1, lambda: backward_step_by_step(want[1]))
    for n in (1, 2, 3):
        out, cache = on_threads(n, lambda: kernels_attention.adapter_forward(h, w))
        assert_same_bits(want[0], out)
        assert_same_bits(list(want[1][:3]), list(cache[:3]))
        assert cache[3:] == ("gelu", True, 1.0)
        assert_same_bits(want_back, on_threads(n, lambda: kernels_attention.adapter_backward(dout, cache)))
        dh, grads = on_threads(n, lambda: kernels_attention.adapter_backward(dout, cache, need_dx=False,
                                                                               need={"W_down", "b_up"}))
        assert dh is None and list(grads) == ["b_up", "W_down"]
        assert_same_bits([want_back[1]["b_up"], want_back[1]["W_down"]], [grads["b_up"], grads["W_down"]])


ZEN4 = ("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\n"
        "flags\t\t: fpu sse avx2 avx512f avx512dq\n\nprocessor\t: 1\nvendor_id\t: AuthenticAMD\n")


@pytest.mark.parametrize("text, zen4", [
    (ZEN4, True),
    (ZEN4.replace(" avx512f avx512dq", ""), False),  # Zen 3: family 25, no AVX-512
    (ZEN4.replace("cpu family\t: 25", "cpu family\t: 26"), False),  # Zen 5: AVX-512 at full width
    (ZEN4.replace("AuthenticAMD", "GenuineIntel").replace(": 25", ": 6"), False),
    ("", False)])
def test_the_zen4_kernels_are_asked_for_on_zen4_only(text, zen4):
    assert runtime._zen4(text) is zen4


@pytest.mark.parametrize("numpy_first", [False, True])
def test_a_fresh_process_asks_for_the_kernels_and_writes_down_what_it_has(numpy_first):
    """Imported before NumPy, the runtime asks for the Zen kernels on a Zen 4 and leaves OpenBLAS's
    choice elsewhere; after NumPy, it writes the kernels in use into the environment, for the
    processes a command starts. Either way the status says which."""
    import json
    import os
    import subprocess
    import sys
    code = ("import numpy\n" if numpy_first else "") + (
        "import json, os\nfrom minitransformer.tools import runtime\nfrom threadpoolctl import threadpool_info\n"
        "print(json.dumps([os.environ.get('OPENBLAS_CORETYPE'), runtime.blas_kernels_status(),"
        " [l.get('architecture') for l in threadpool_info() if l.get('internal_api') == 'openblas']]))")
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    coretype, status, arch = json.loads(out)
    if numpy_first:
        assert coretype == (arch[0] if arch else None) and "imported before minitransformer" in status
    elif runtime._zen4():
        assert coretype == "Zen" and "AMD Zen 4" in status and arch in ([], ["Haswell"], ["Zen"])
    else:
        assert coretype is None and status == "OpenBLAS's choice"
