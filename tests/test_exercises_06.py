"""Catalogue of notebook 06's exercises: wrong answers rejected for their reason, correct
alternatives accepted (fresh cases at every call); and the flops formula the checker trusts
(tools/bench.step_flops) agrees with a counted training step."""
import contextlib
import math

import numpy as np
import pytest

from _catalogue import fails, passes

from minitransformer import AdapterConfig, ModelConfig, Transformer, adapters, attention, backend, layers, sizes
from minitransformer.exercises import _reference as ref
from minitransformer.exercises import _unit06 as impl
from minitransformer.exercises import unit06 as ex
from minitransformer.tools.benchmodel import step_flops


def todo(*args):
    raise NotImplementedError


# ----------------------------------------------------------------------------- storage for T tasks


def storage(cfg, adapter, K, T, mistake=None):
    """A formula written from the config's fields; `mistake` leaves one thing out or in."""
    C, L, V, m = cfg.d_model, cfg.n_layers, cfg.vocab_size, adapter.size(cfg.d_model)
    shared = (V * C + cfg.max_len * C + 2 * C
              + L * (4 * C * C + 4 * C + 2 * C * cfg.d_ff + cfg.d_ff + C + 4 * C))
    sites = len(adapter.sites()) if mistake != "two sites" else 2
    one = 2 * C * m + (m + C if mistake != "no biases" else 0)
    norms = (2 * L + 1) * 2 * C if adapter.train_layernorm or mistake == "norms always" else 0
    head = C * K + K
    per_task = L * sites * one + norms + (head if mistake != "no head" else 0)
    per_copy = shared + head + (C * V + V if mistake == "lm head" else 0)
    nbytes = 1 if mistake == "parameters" else 4
    base_times = T if mistake == "base T times" else 1
    return nbytes * (base_times * shared + T * per_task), nbytes * T * per_copy


def storage_by_hand(cfg, adapter, K, T):
    C, L, V = cfg.d_model, cfg.n_layers, cfg.vocab_size
    m = adapter.size(C)
    shared = sizes.parameter_count(cfg) - (C * V + V)
    per_task = L * len(adapter.sites()) * (2 * C * m + m + C) + (C * K + K) + \
        ((2 * L + 1) * 2 * C if adapter.train_layernorm else 0)
    return [4 * (shared + T * per_task), 4 * T * (shared + C * K + K)]


@pytest.mark.parametrize("answer", [lambda *a: storage(*a), storage_by_hand, lambda *a: np.array(storage(*a))])
def test_storage_correct(answer):
    passes(lambda: ex.check_storage_bytes(answer))


STORAGE_WRONG = [
    ("parameters", "4 bytes each"),
    ("base T times", "stored once"),
    ("no head", "classification head"),
    ("no biases", "biases b_down (m) and b_up (C)"),
    ("norms always", "no LayerNorm copies when train_layernorm=False"),
    ("two sites", ("adapter(s) in each block, not 2", "adapters in each block")),
    ("lm head", "masked-token head"),
]


@pytest.mark.parametrize("mistake, reason", STORAGE_WRONG)
def test_storage_wrong(mistake, reason):
    fails(lambda: ex.check_storage_bytes(lambda *a: storage(*a, mistake=mistake)), reason)


@pytest.mark.parametrize("answer, reason", [
    (lambda *a: tuple(float(v) for v in storage(*a)), "two integers"),
    (lambda *a: tuple(2 * v for v in storage(*a)), "that is float64"),
    (lambda *a: storage(*a)[0], "two integers"),
    (lambda cfg, ad, K, T: (storage(cfg, ad, K, T)[0], storage(cfg, ad, K, 1)[1]), "copies: expected"),
    (lambda cfg, ad, K, T: (4 * sizes.adapter_parameter_count(cfg, ad, K), 0), "sizes.adapter_parameter_count"),
])
def test_storage_other_wrong(answer, reason):
    fails(lambda: ex.check_storage_bytes(answer), reason)


def test_the_shipped_base_storage_matches_figures_results():
    """The committed measurement (figures/results.json, m = 32) counts the same parameters."""
    import json
    from pathlib import Path
    res = json.loads((Path(__file__).parents[1] / "figures" / "results.json").read_text())["storage"]
    cfg = ModelConfig(vocab_size=99, max_len=32, d_model=64, n_heads=4, n_layers=4, d_ff=256)
    a, c = impl.storage_bytes(cfg, AdapterConfig(bottleneck=32), 4, 1)
    assert a // 4 == res["base_params"] + res["per_task"]["topic"]["adapter_params"]
    assert c // 4 == res["per_task"]["topic"]["full_params"]


# ----------------------------------------------------------------------------- what freezing skips


def skipped(b, train_layernorm, mistake=None):
    N, C, F, T, L, m = b.batch * b.seq_len, b.d_model, b.d_ff, b.seq_len, b.n_layers, b.bottleneck
    attn_w, ffn_w = 2 * N * 4 * C * C, 2 * N * 2 * C * F
    out = L * ((attn_w if mistake != "no attention" else 0) + (ffn_w if mistake != "no ffn" else 0))
    block0 = 2 * N * 4 * C * C + 2 * 2 * 2 * b.batch * T * T * C  # 4 projections' dx, 4 batched
    if not train_layernorm and mistake != "no block 0":
        out += block0
    if mistake == "dx too":
        out += L * (attn_w + ffn_w)
    if mistake == "adapters too":
        out += L * 2 * 2 * 2 * N * C * m
    if mistake == "half":
        out //= 2
    return out


def skipped_by_difference(b, train_layernorm):
    return step_flops(b, "all") - step_flops(b, "adapters", train_layernorm=train_layernorm)


@pytest.mark.parametrize("answer", [skipped, lambda b, tl: np.int64(skipped(b, tl))])
def test_skipped_flops_correct(answer):
    passes(lambda: ex.check_skipped_flops(answer))


@pytest.mark.parametrize("mistake, reason", [
    ("dx too", "dx = dy W^T still run"),
    ("adapters too", "the adapters train"),
    ("no ffn", "W_1 and W_2 are frozen too"),
    ("no attention", "W_q, W_k, W_v, W_o are frozen too"),
    ("no block 0", "nothing under block 0's attention trains"),
    ("half", "a multiply-add is 2 flops"),
])
def test_skipped_flops_wrong(mistake, reason):
    fails(lambda: ex.check_skipped_flops(lambda b, tl: skipped(b, tl, mistake)), reason)


@pytest.mark.parametrize("answer, reason", [
    (lambda b, tl: skipped(b, False), "embedding LayerNorm trains"),  # ignores the setting
    (lambda b, tl: float(skipped(b, tl)), "integer"),
    (skipped_by_difference, "benchmodel.step_flops"),
    (lambda b, tl: skipped(b, tl) + 1, "expected"),
])
def test_skipped_flops_other_wrong(answer, reason):
    fails(lambda: ex.check_skipped_flops(answer), reason)


@contextlib.contextmanager
def counted_products():
    """Flops of every linear layer's products (forward x W, backward dy W^T and x^T dy), on the
    reference path, wherever it calls them."""
    tally = {"forward": 0, "dx": 0, "dW": 0}
    fwd, bwd = layers.linear_forward, layers.linear_backward

    def forward(x, W, b, keep_x=True):
        tally["forward"] += 2 * (x.size // x.shape[-1]) * W.size
        return fwd(x, W, b, keep_x)

    def backward(dout, cache, *args, **kwargs):  # reads only need_dx, need_dW: whatever the return
        need_dx = kwargs.get("need_dx", args[0] if args else True)
        need_dW = kwargs.get("need_dW", args[1] if len(args) > 1 else True)
        flops = 2 * (dout.size // dout.shape[-1]) * cache[1].size
        tally["dx"] += flops * bool(need_dx)
        tally["dW"] += flops * bool(need_dW)
        return bwd(dout, cache, *args, **kwargs)
    modules = (backend.ops, attention, adapters)
    for mod in modules:
        mod.linear_forward, mod.linear_backward = forward, backward
    try:
        yield tally
    finally:
        for mod in modules:
            mod.linear_forward, mod.linear_backward = fwd, bwd


@pytest.mark.parametrize("train_layernorm", [True, False])
def test_step_flops_matches_a_counted_step(train_layernorm):
    """Counted linear products + the attention's batched products (by formula) - the head's
    products = step_flops, for the full step and the adapter step alike."""
    b = impl.StepShape(batch=3, seq_len=7, d_model=12, d_ff=40, n_layers=3, bottleneck=5)
    cfg = ModelConfig(vocab_size=20, max_len=7, d_model=12, n_heads=3, n_layers=3, d_ff=40)
    ids = np.random.default_rng(0).integers(0, 20, (3, 7))
    labels = np.array([0, 1, 1])
    B, T, C, K, L = b.batch, b.seq_len, b.d_model, 2, b.n_layers
    batched = 2 * B * T * T * C  # one of Q K^T, P V and their four backward products
    head = 2 * B * C * K  # one product of the (C, K) head
    assert backend.current() == "reference"

    full = Transformer(cfg, seed=0)
    full.add_adapter("task", AdapterConfig(bottleneck=5, train_layernorm=train_layernorm), K)
    full.set_active_adapter("task")  # everything trains
    with counted_products() as t_full:
        full.loss(ids, labels, head="cls", backward=True)
    assert sum(t_full.values()) + L * 6 * batched - 3 * head == step_flops(b, "all", adapters=True)

    adapted = Transformer(cfg, seed=0)
    adapted.add_adapter("task", AdapterConfig(bottleneck=5, train_layernorm=train_layernorm), K)
    adapted.train_adapter("task")
    with counted_products() as t_ad:
        adapted.loss(ids, labels, head="cls", backward=True)
    backward_blocks = L if train_layernorm else L - 1  # block 0's attention backward is skipped
    counted = sum(t_ad.values()) + L * 2 * batched + backward_blocks * 4 * batched - 3 * head
    assert counted == step_flops(b, "adapters", train_layernorm=train_layernorm)
    assert sum(t_full.values()) - sum(t_ad.values()) + (L - backward_blocks) * 4 * batched \
        == impl.skipped_flops(b, train_layernorm)


# ----------------------------------------------------------------------------- break-even


def test_break_even_reference_values():
    assert ref.break_even(208_448, 34_948, 208_708) == 2
    assert ref.break_even(100, 10, 60) == 3  # T = 2 is a tie
    assert ref.break_even(5, 7, 7) is None


def brute_force(shared, per_task, per_copy):
    if per_task >= per_copy:
        return None
    T = 1
    while shared + T * per_task >= T * per_copy:
        T += 1
    return T


def ceil_version(shared, per_task, per_copy):  # misses the tie
    return None if per_task >= per_copy else max(1, math.ceil(shared / (per_copy - per_task)))


BREAK_EVEN_WRONG = [
    (ceil_version, "strictly fewer"),
    (lambda s, t, c: s // max(c - t, 1) + 1, "expected None"),
    (lambda s, t, c: None if t >= c else s // (c - t) + 2, "already at T="),
    (lambda s, t, c: None if t >= c else s // (c - t), "still store"),
    (lambda s, t, c: None if t >= c else float(s // (c - t) + 1), "expected an integer T"),
    (lambda s, t, c: None if t >= c else int(s / (c - t)) + 1, "use integer arithmetic"),
    (lambda s, t, c: 0 if t >= c else s // (c - t) + 1, "expected None, got the int 0"),
    (lambda s, t, c: float("inf") if t >= c else s // (c - t) + 1, "expected None"),
    (lambda s, t, c: None if t > c else s // (c - t) + 1 if c != t else 10 ** 9, "expected None"),
    (lambda s, t, c: None if t >= c else s // (c - t) + 1 if s < 10 ** 6 else 2, ("still store", "expected T=")),
]


@pytest.mark.parametrize("answer, reason", BREAK_EVEN_WRONG)
def test_break_even_wrong(answer, reason):
    fails(lambda: ex.check_break_even(answer), reason)


def test_break_even_brute_force_runs_out_of_time(monkeypatch):
    import minitransformer.exercises as exercises
    monkeypatch.setattr(exercises, "TIME_LIMIT", 0.5)
    fails(lambda: ex.check_break_even(brute_force), "solve the inequality", times=1)


def solved_with_ceil(shared, per_task, per_copy):
    if per_task >= per_copy:
        return None
    d = per_copy - per_task
    return -(-(shared + 1) // d)  # the smallest T with T d >= shared + 1


@pytest.mark.parametrize("answer", [ref.break_even, solved_with_ceil,
                                    lambda s, t, c: None if t >= c else np.int64(s // (c - t) + 1)])
def test_break_even_correct(answer):
    passes(lambda: ex.check_break_even(answer))
