"""The checks of notebook 06 (unit06.py is what the notebook sees)."""
from dataclasses import dataclass

import numpy as np

from .. import sizes
from ..adapters import AdapterConfig
from ..model import ModelConfig
from ..tools import benchmodel
from . import Result, attempt, checker, describe, exact, fail, is_integer, rng
from . import _reference as ref

BYTES_PER_PARAMETER = 4  # float32


# ----------------------------------------------------------------------------- storage for T tasks


def encoder_parameters(cfg):
    """What every classification copy needs of the base: all of it but the masked-token head."""
    return sizes.parameter_count(cfg) - (cfg.d_model * cfg.vocab_size + cfg.vocab_size) \
        - (cfg.d_model * cfg.n_classes + cfg.n_classes if cfg.n_classes else 0)


def storage_bytes(cfg, adapter, n_classes, T):
    """The reference: (one base + T adapter sets, T copies of base and head), in bytes."""
    shared = encoder_parameters(cfg)
    per_task = sizes.adapter_parameter_count(cfg, adapter, n_classes)
    per_copy = shared + cfg.d_model * n_classes + n_classes
    return BYTES_PER_PARAMETER * (shared + T * per_task), BYTES_PER_PARAMETER * T * per_copy


def _storage_cases(g):
    """The shipped base's shape in the paper's setting, then fresh configurations (every
    placement, LayerNorms trained or not, m or a reduction factor), T drawn for each."""
    shipped = ModelConfig(vocab_size=99, max_len=32, d_model=64, n_heads=4, n_layers=4, d_ff=256)
    cases = [(shipped, AdapterConfig(bottleneck=32), 4, 5)]
    for placement, ln in (("houlsby", False), ("ffn", True), ("parallel", False), ("houlsby", True)):
        for tries in range(1000):  # a draw whose hint sizes all differ comes within a few tries
            H = int(g.integers(1, 4))
            cfg = ModelConfig(vocab_size=int(g.integers(20, 300)), max_len=int(g.integers(8, 64)),
                              d_model=H * 4 * int(g.integers(2, 10)), n_heads=H, n_layers=int(g.integers(2, 6)),
                              d_ff=int(g.integers(10, 300)))
            adapter = (AdapterConfig(bottleneck=int(g.integers(2, 40)), placement=placement, train_layernorm=ln)
                       if g.random() < 0.7 else
                       AdapterConfig(reduction_factor=int(g.choice([2, 4])), placement=placement, train_layernorm=ln))
            K, T = int(g.integers(2, 12)), int(g.integers(2, 40))
            if all(_no_two_alike([s for s in _storage_hint_sizes(which, cfg, adapter, K, T) if s]) for which in
                   ("adapters", "copies")) or tries == 999:
                cases.append((cfg, adapter, K, T))
                break
    return cases


def _no_two_alike(values):
    return len(set(values)) == len(values)


def _storage_hint_sizes(which, cfg, adapter, K, T):
    return [size for size, _ in _storage_hints(which, cfg, adapter, K, T)]


def _storage_hints(which, cfg, adapter, K, T):
    """Why one of the two totals is off by `diff` = got - expected (bytes)."""
    C, L, V = cfg.d_model, cfg.n_layers, cfg.vocab_size
    m, sites = adapter.size(C), len(adapter.sites())
    B = BYTES_PER_PARAMETER
    norms = (2 * L + 1) * 2 * C  # the task's LayerNorm copies: ln_emb and two per block
    one = 2 * C * m + m + C  # W_down, b_down, W_up, b_up
    shared = encoder_parameters(cfg)
    hints = {
        "adapters": [
            (B * (T - 1) * shared, "the base is shared by every task: it is stored once"),
            (-B * shared, "the shared base is stored once, and it counts"),
            (-B * T * norms, "the task's own LayerNorm copies ((2L+1) x 2C) when "
                             "train_layernorm=True"),
            (B * T * norms, "no LayerNorm copies when train_layernorm=False: the task uses the "
                            "base's own, frozen"),
            (-B * T * (C * K + K), "the task's classification head (C K + K)"),
            (-B * T * L * sites * (m + C), "the adapters' biases b_down (m) and b_up (C)"),
            (B * T * L * (2 - sites) * one, f"placement={adapter.placement!r} puts "
                                            f"{sites} adapter(s) in each block, not 2"),
            (-B * T * L * (sites - 1) * one, f"placement={adapter.placement!r} puts "
                                             f"{sites} adapters in each block"),
            (-B * T * (L - 1) * sites * one, "an adapter set has adapters in every one of the "
                                             "L blocks"),
            (B * (C * V + V), "the masked-token head (C V + V): classification does not use it"),
        ],
        "copies": [
            (B * T * (C * V + V), "the masked-token head (C V + V): a classification copy does "
                                  "not need it"),
            (-B * T * (C * K + K), "each copy's classification head (C K + K)"),
            (-B * (T - 1) * shared, "every task needs its own copy of the whole network"),
            (-B * T * shared, "a copy holds the whole network, not only its head"),
        ],
    }[which]
    return hints


def _storage_hint(which, diff, cfg, adapter, K, T, got, expected):
    """Why one of the two totals is off by `diff` = got - expected (bytes)."""
    if expected and got * BYTES_PER_PARAMETER == expected:
        return "that is a number of parameters; float32 stores 4 bytes each"
    if expected and got == 2 * expected:
        return "that is float64 (8 bytes); the package stores float32, 4 bytes a parameter"
    found = [text for size, text in _storage_hints(which, cfg, adapter, K, T) if size == diff and size != 0]
    return found[0] if found else ""




@checker("storage for T tasks")
def check_storage_bytes(fn):
    name = "storage for T tasks"
    cases = _storage_cases(rng())
    for cfg, adapter, K, T in cases:
        where = (f"C={cfg.d_model}, L={cfg.n_layers}, V={cfg.vocab_size}, m={adapter.size(cfg.d_model)}, "
                 f"placement={adapter.placement!r}, train_layernorm={adapter.train_layernorm}, K={K}, T={T}")
        got, failed = attempt(name, fn, cfg, adapter, K, T, where=where, forbid=(sizes.adapter_parameter_count,))
        if failed is not None:
            return failed
        if isinstance(got, np.ndarray) and got.shape == (2,) and got.dtype.kind in "iu":
            got = tuple(got)
        if not isinstance(got, (tuple, list)) or len(got) != 2 or not all(is_integer(v) for v in got):
            return fail(name, f"expected two integers (adapters_bytes, copies_bytes), got {describe(got)}")
        expected = storage_bytes(cfg, adapter, K, T)
        for which, g_, e in zip(("adapters", "copies"), got, expected):
            if g_ != e:
                hint = _storage_hint(which, int(g_) - e, cfg, adapter, K, T, int(g_), e)
                return fail(name, f"{which}: expected {exact(e)} bytes, got {exact(g_)} ({where})"
                                  + (f": {hint}" if hint else ""))
    return Result(name, True, f"both totals match the package's counts on {len(cases)} configurations, "
                              f"{len(cases) - 1} of them fresh (every placement, LayerNorms trained or not)")


# ----------------------------------------------------------------------------- what freezing skips


@dataclass
class StepShape:
    """The sizes step_flops reads (a BenchConfig has them too)."""
    batch: int  # B
    seq_len: int  # T
    d_model: int  # C
    d_ff: int  # F
    n_layers: int  # L
    bottleneck: int  # m


def skipped_flops(b, train_layernorm=True):
    """The reference: full training of the network with its adapters, minus the adapter step."""
    return benchmodel.step_flops(b, "all", adapters=True) - \
        benchmodel.step_flops(b, "adapters", train_layernorm=train_layernorm)


def _step_shapes(g):
    shapes = [StepShape(batch=32, seq_len=32, d_model=64, d_ff=256, n_layers=4, bottleneck=32)]
    while len(shapes) < 4:
        b = StepShape(batch=int(g.integers(2, 40)), seq_len=int(g.integers(3, 200)), d_model=int(g.integers(8, 200)),
                      d_ff=int(g.integers(8, 900)), n_layers=int(g.integers(2, 13)), bottleneck=int(g.integers(2, 70)))
        fields = (b.batch, b.seq_len, b.d_model, b.d_ff, b.n_layers, b.bottleneck)
        if len(set(fields)) == len(fields) and b.d_ff != 4 * b.d_model and b.seq_len != b.d_model:
            shapes.append(b)
    return shapes


def _flops_hint(diff, b, train_layernorm):
    """Why a count is off by `diff` = got - expected."""
    N, C, F, T, m, L = b.batch * b.seq_len, b.d_model, b.d_ff, b.seq_len, b.bottleneck, b.n_layers
    weights = 2 * N * (4 * C * C + 2 * C * F)  # one block's weight products, forward
    attn = 2 * 2 * b.batch * T * T * C  # one block's two batched products, forward
    adapter = 2 * 2 * 2 * N * C * m  # one block's two adapters, down and up, forward
    block0 = 2 * N * 4 * C * C + 2 * attn  # block 0's attention backward below W_o's input
    hints = [
        (L * weights, "the input-gradient products dx = dy W^T still run in every frozen layer: "
                      "only the weight gradients dW = x^T dy are skipped"),
        (L * adapter, "the adapters train: their dW products run"),
        (-L * 2 * N * 2 * C * F, "the feed-forward weights W_1 and W_2 are frozen too (2 x 2NCF "
                                 "per block)"),
        (-L * 2 * N * 4 * C * C, "the attention's W_q, W_k, W_v, W_o are frozen too (4 x 2NC^2 "
                                 "per block)"),
        (L * 2 * attn, "Q K^T and P V have no weights: their backward runs wherever the gradient "
                       "flows"),
    ]
    if train_layernorm:
        hints.append((block0, "with train_layernorm=True the embedding LayerNorm trains, so the "
                              "gradient must still go through block 0's attention"))
    else:
        hints.append((-block0, "with train_layernorm=False nothing under block 0's attention "
                               "trains: its whole backward (4 projections' dx, 4 batched products) "
                               "is skipped too"))
    found = [text for size, text in hints if size == diff]
    expected = skipped_flops(b, train_layernorm)
    if not found and expected and 2 * (expected + diff) == expected:
        found = ["a multiply-add is 2 flops: a product (n, k) @ (k, c) costs 2 n k c"]
    return found[0] if found else ""


@checker("flops the adapter step skips")
def check_skipped_flops(fn):
    name = "flops the adapter step skips"
    shapes = _step_shapes(rng())
    for b in shapes:
        for train_layernorm in (True, False):
            where = (f"B={b.batch}, T={b.seq_len}, C={b.d_model}, F={b.d_ff}, L={b.n_layers}, "
                     f"m={b.bottleneck}, train_layernorm={train_layernorm}")
            got, failed = attempt(name, fn, b, train_layernorm, where=where, forbid=(benchmodel.step_flops,))
            if failed is not None:
                return failed
            if not is_integer(got):
                return fail(name, f"expected an integer number of flops, got {describe(got)} on {where}")
            expected = skipped_flops(b, train_layernorm)
            if got != expected:
                hint = _flops_hint(int(got) - expected, b, train_layernorm)
                return fail(name, f"expected {exact(expected)}, got {exact(got)} ({where})"
                                  + (f": {hint}" if hint else ""))
    return Result(name, True, f"matches tools/bench.step_flops on {len(shapes)} shapes, {len(shapes) - 1} of them "
                              f"fresh, with the LayerNorms trained and frozen")


# ----------------------------------------------------------------------------- break-even


def _break_even_cases(g):
    """The shipped base with m = 32, a tie, never (equal and larger sets), a T near 10^17 (no
    loop reaches it in time), and fresh draws."""
    cases = [(208_448, 34_948, 208_708), (100, 10, 60), (208_448, 208_708, 208_708), (208_448, 266_116, 208_708),
             (10 ** 17 + 7, 999, 1_000)]
    d = int(g.integers(2, 1000))
    per_task = int(g.integers(10, 10_000))
    cases.append((d * int(g.integers(2, 10_000)), per_task, per_task + d))  # a tie at T = shared / d
    cases.append((int(g.integers(1, 10 ** 9)), int(g.integers(1, 10 ** 5)), int(g.integers(10 ** 5, 10 ** 6))))
    return cases


@checker("break-even number of tasks")
def check_break_even(fn):
    name = "break-even number of tasks"
    cases = _break_even_cases(rng())
    for shared, per_task, per_copy in cases:
        where = f"shared={shared:,}, per_task={per_task:,}, per_copy={per_copy:,}"
        got, failed = attempt(name, fn, shared, per_task, per_copy, where=where)
        if failed is not None:
            if "took longer" in failed.message:
                failed.message += (": solve the inequality shared + T per_task < T per_copy for T instead of "
                                   "trying every T")
            return failed
        expected = ref.break_even(shared, per_task, per_copy)
        if expected is None:
            if got is not None:
                return fail(name, f"{where}: expected None, got {describe(got)}: an adapter set as large as a "
                                  f"copy never pays for the shared base")
            continue
        if not is_integer(got):
            return fail(name, f"{where}: expected an integer T, got {describe(got)}")
        if got == expected:
            continue

        def totals(T):
            return shared + T * per_task, T * per_copy
        a, c = totals(int(got))
        if got == expected - 1 and a == c:
            why = f"at T={exact(got)} both store exactly {exact(a)}: 'smaller' means strictly fewer"
        elif got < expected:
            why = f"at T={exact(got)} the adapters still store {exact(a)} against {exact(c)} for the copies"
        else:
            why = (f"already at T={exact(expected)} the adapters store {exact(totals(expected)[0])} against "
                   f"{exact(totals(expected)[1])}")
        if expected > 2 ** 53 and abs(got - expected) <= expected * 2.0 ** -50:  # a float's rounding
            why += " (float division rounds numbers this large: use integer arithmetic, //)"
        return fail(name, f"{where}: expected T={exact(expected)}, got {exact(got)}: {why}")
    return Result(name, True, f"right on {len(cases)} cases (a tie, never, a T near 10^17, fresh draws)")
