"""The checkers of notebooks/06_costs_and_choices.ipynb: the reference answers pass, known wrong
answers FAIL and say why, a solution not written yet gives passed None; and the flops formula
the checker trusts (tools/bench.step_flops) agrees with a counted training step."""
import contextlib

import numpy as np
import pytest

from minitransformer import AdapterConfig, ModelConfig, Transformer, adapters, attention, backend, layers
from minitransformer.exercises import unit06 as ex


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


def test_storage_reference_passes():
    assert ex.check_storage_bytes(lambda *a: storage(*a)).passed is True
    assert ex.check_storage_bytes(ex.storage_bytes).passed is True


@pytest.mark.parametrize("mistake, reason", [
    ("parameters", "4 bytes each"),
    ("base T times", "stored once"),
    ("no head", "classification head"),
    ("no biases", "biases b_down (m) and b_up (C)"),
    ("norms always", "no LayerNorm copies when train_layernorm=False"),
    ("two sites", "adapter(s) in each block, not 2"),
    ("lm head", "masked-token head"),
])
def test_storage_wrong_answers_fail_and_say_why(mistake, reason):
    r = ex.check_storage_bytes(lambda *a: storage(*a, mistake=mistake))
    assert r.passed is False and reason in r.message, r


def test_storage_other_answers():
    assert ex.check_storage_bytes(todo).passed is None
    r = ex.check_storage_bytes(lambda *a: storage(*a)[0])
    assert r.passed is False and "two integers" in r.message
    r = ex.check_storage_bytes(lambda *a: tuple(float(v) for v in storage(*a)))
    assert r.passed is False and "two integers" in r.message


def test_the_shipped_base_storage_matches_figures_results():
    """The committed measurement (figures/results.json, m = 32) counts the same parameters."""
    import json
    from pathlib import Path
    res = json.loads((Path(__file__).parents[1] / "figures" / "results.json").read_text())["storage"]
    cfg = ModelConfig(vocab_size=99, max_len=32, d_model=64, n_heads=4, n_layers=4, d_ff=256)
    a, c = ex.storage_bytes(cfg, AdapterConfig(bottleneck=32), 4, 1)
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


def test_skipped_flops_reference_passes():
    assert ex.check_skipped_flops(skipped).passed is True


@pytest.mark.parametrize("mistake, reason", [
    ("dx too", "dx = dy W^T still run"),
    ("adapters too", "the adapters train"),
    ("no ffn", "W_1 and W_2 are frozen too"),
    ("no attention", "W_q, W_k, W_v, W_o are frozen too"),
    ("no block 0", "nothing under block 0's attention trains"),
    ("half", "a multiply-add is 2 flops"),
])
def test_skipped_flops_wrong_answers_fail_and_say_why(mistake, reason):
    r = ex.check_skipped_flops(lambda b, tl: skipped(b, tl, mistake))
    assert r.passed is False and reason in r.message, r


def test_skipped_flops_block0_when_layernorms_train():
    r = ex.check_skipped_flops(lambda b, tl: skipped(b, False))  # ignores the setting
    assert r.passed is False and "embedding LayerNorm trains" in r.message, r


def test_skipped_flops_other_answers():
    assert ex.check_skipped_flops(todo).passed is None
    r = ex.check_skipped_flops(lambda b, tl: float(skipped(b, tl)))
    assert r.passed is False and "integer" in r.message


@contextlib.contextmanager
def counted_products():
    """Flops of every linear layer's products (forward x W, backward dy W^T and x^T dy), on the
    reference path, wherever it calls them."""
    tally = {"forward": 0, "dx": 0, "dW": 0}
    fwd, bwd = layers.linear_forward, layers.linear_backward

    def forward(x, W, b, keep_x=True):
        tally["forward"] += 2 * (x.size // x.shape[-1]) * W.size
        return fwd(x, W, b, keep_x)

    def backward(dout, cache, need_dx=True, need_dW=True, need_db=True):
        flops = 2 * (dout.size // dout.shape[-1]) * cache[1].size
        tally["dx"] += flops * bool(need_dx)
        tally["dW"] += flops * bool(need_dW)
        return bwd(dout, cache, need_dx, need_dW, need_db)
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
    b = ex.StepShape(batch=3, seq_len=7, d_model=12, d_ff=40, n_layers=3, bottleneck=5)
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
    assert sum(t_full.values()) + L * 6 * batched - 3 * head == ex.step_flops(b, "all", adapters=True)

    adapted = Transformer(cfg, seed=0)
    adapted.add_adapter("task", AdapterConfig(bottleneck=5, train_layernorm=train_layernorm), K)
    adapted.train_adapter("task")
    with counted_products() as t_ad:
        adapted.loss(ids, labels, head="cls", backward=True)
    backward_blocks = L if train_layernorm else L - 1  # block 0's attention backward is skipped
    counted = sum(t_ad.values()) + L * 2 * batched + backward_blocks * 4 * batched - 3 * head
    assert counted == ex.step_flops(b, "adapters", train_layernorm=train_layernorm)
    assert sum(t_full.values()) - sum(t_ad.values()) + (L - backward_blocks) * 4 * batched \
        == ex.skipped_flops(b, train_layernorm)


# ----------------------------------------------------------------------------- merging LoRA


def test_merge_reference_passes():
    r = ex.check_merge(ex.merge)
    assert r.passed is True and "below 1e-14" in r.message, r


@pytest.mark.parametrize("wrong, reason", [
    (lambda W0, A, B, alpha, r: W0 + A @ B, "scaled by alpha / r"),
    (lambda W0, A, B, alpha, r: W0 + (r / alpha) * (A @ B), "not r / alpha"),
    (lambda W0, A, B, alpha, r: W0 + alpha * (A @ B), "not alpha"),
    (lambda W0, A, B, alpha, r: (alpha / r) * (A @ B), "add it to W0"),
    (lambda W0, A, B, alpha, r: (W0 + (alpha / r) * (A @ B)).T, "transposed"),
    (lambda W0, A, B, alpha, r: W0 + np.float64(alpha / r) * (A @ B), "float64 scalar"),
])
def test_merge_wrong_answers_fail_and_say_why(wrong, reason):
    r = ex.check_merge(wrong)
    assert r.passed is False and reason in r.message, r


def test_merge_in_place_fails():
    def in_place(W0, A, B, alpha, r):
        W0 += (alpha / r) * (A @ B)
        return W0
    r = ex.check_merge(in_place)
    assert r.passed is False and "in place" in r.message


def test_merge_other_answers():
    assert ex.check_merge(todo).passed is None
    assert ex.check_merge(lambda *a: [[0.0]]).passed is False


def test_a_merged_layer_of_the_model_gives_the_lora_outputs():
    """On a real layer: the FFN's W_1 of a small model, float32."""
    model = Transformer(ModelConfig(vocab_size=20, max_len=8, d_model=16, n_heads=2, d_ff=32), seed=0)
    W0 = model.blocks[0].ffn.p["W_1"].value
    rng = np.random.default_rng(1)
    A = rng.standard_normal((16, 4)).astype(np.float32)
    B = (0.01 * rng.standard_normal((4, 32))).astype(np.float32)
    x = rng.standard_normal((5, 16)).astype(np.float32)
    W = ex.merge(W0, A, B, 8, 4)
    assert W.dtype == np.float32
    assert ex.rel_error(x @ W, x @ W0 + 2.0 * (x @ A) @ B) < 1e-6


# ----------------------------------------------------------------------------- break-even


def test_break_even_reference_passes():
    assert ex.check_break_even(ex.break_even).passed is True
    assert ex.break_even(208_448, 34_948, 208_708) == 2
    assert ex.break_even(100, 10, 60) == 3  # T = 2 is a tie


def test_break_even_wrong_answers_fail_and_say_why():
    import math

    def ceil_version(shared, per_task, per_copy):  # misses the tie
        return None if per_task >= per_copy else max(1, math.ceil(shared / (per_copy - per_task)))
    r = ex.check_break_even(ceil_version)
    assert r.passed is False and "strictly fewer" in r.message, r

    def never_none(shared, per_task, per_copy):
        return shared // max(per_copy - per_task, 1) + 1
    r = ex.check_break_even(never_none)
    assert r.passed is False and "expected None" in r.message, r

    def one_more(shared, per_task, per_copy):
        return None if per_task >= per_copy else shared // (per_copy - per_task) + 2
    r = ex.check_break_even(one_more)
    assert r.passed is False and "already at T=" in r.message, r

    def one_less(shared, per_task, per_copy):
        return None if per_task >= per_copy else shared // (per_copy - per_task)
    r = ex.check_break_even(one_less)
    assert r.passed is False and "still store" in r.message, r


def test_break_even_other_answers():
    assert ex.check_break_even(todo).passed is None
    r = ex.check_break_even(lambda s, t, c: float(ex.break_even(s, t, c) or 0))
    assert r.passed is False and "integer" in r.message
