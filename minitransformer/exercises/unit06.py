"""Checkers for notebooks/06_costs_and_choices.ipynb.

    check_storage_bytes(fn)    fn(cfg, adapter, n_classes, T) -> (bytes with one base and T
                               adapter sets, bytes with T fine-tuned copies), float32
    check_skipped_flops(fn)    fn(b, train_layernorm) -> the matrix-product flops one adapter
                               step skips against full training of the same network
    check_merge(fn)            fn(W0, A, B, alpha, r) -> W, the LoRA update merged into W0
    check_break_even(fn)       fn(shared, per_task, per_copy) -> the fewest tasks T at which one
                               shared base plus T adapter sets is strictly smaller than T copies

Each returns a Result (one line: PASS / FAIL / not implemented yet). The storage is checked
against the package's own counts (sizes.py), the flops against tools/bench.step_flops (which
tests/test_exercises_06.py checks against a counted backward), the merge by the outputs of the
merged layer against the unmerged LoRA forward, in float64.
"""
from dataclasses import dataclass

import numpy as np

from .. import sizes
from ..adapters import AdapterConfig
from ..gradcheck import rel_error
from ..model import ModelConfig
from ..tools.bench import step_flops
from . import Result, attempt, is_integer

BYTES_PER_PARAMETER = 4  # float32


# ----------------------------------------------------------------------------- storage for T tasks


def encoder_parameters(cfg):
    """What every classification copy needs of the base: all of it but the masked-token head
    (C x V weights and V biases), and no classifier of its own."""
    return sizes.parameter_count(cfg) - (cfg.d_model * cfg.vocab_size + cfg.vocab_size) \
        - (cfg.d_model * cfg.n_classes + cfg.n_classes if cfg.n_classes else 0)


def storage_bytes(cfg, adapter, n_classes, T):
    """The reference: (one base + T adapter sets, T copies of base and head), in bytes."""
    shared = encoder_parameters(cfg)
    per_task = sizes.adapter_parameter_count(cfg, adapter, n_classes)
    per_copy = shared + cfg.d_model * n_classes + n_classes
    return BYTES_PER_PARAMETER * (shared + T * per_task), BYTES_PER_PARAMETER * T * per_copy


def _storage_cases():
    """(cfg, adapter, n_classes) on which a storage answer is checked: the shipped base's shape
    in the paper's setting, AdapterHub's setting with one site, a parallel adapter, odd sizes."""
    shipped = ModelConfig(vocab_size=99, max_len=32, d_model=64, n_heads=4, n_layers=4, d_ff=256)
    odd = ModelConfig(vocab_size=50, max_len=20, d_model=48, n_heads=3, n_layers=3, d_ff=100)
    return [(shipped, AdapterConfig(bottleneck=32), 4),
            (odd, AdapterConfig(bottleneck=5, placement="ffn", train_layernorm=False), 3),
            (odd, AdapterConfig(bottleneck=7, placement="parallel"), 2),
            (shipped, AdapterConfig(reduction_factor=16, train_layernorm=False), 2)]


def _storage_hint(which, diff, cfg, adapter, K, T, got, expected):
    """Why one of the two totals is off by `diff` = got - expected (bytes)."""
    C, L, V = cfg.d_model, cfg.n_layers, cfg.vocab_size
    m, sites = adapter.size(C), len(adapter.sites())
    B = BYTES_PER_PARAMETER
    if expected and got * B == expected:
        return "that is a number of parameters; float32 stores 4 bytes each"
    if expected and got == 2 * expected:
        return "that is float64 (8 bytes); the package stores float32, 4 bytes a parameter"
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
    found = [text for size, text in hints if size == diff and size != 0]
    return found[0] if found else ""


def check_storage_bytes(fn):
    """fn(cfg, adapter, n_classes, T) -> (adapters_bytes, copies_bytes), compared with the
    package's counts on four configurations and T in (1, 5, 20)."""
    name = "storage for T tasks"
    cases = _storage_cases()
    for cfg, adapter, K in cases:
        for T in (1, 5, 20):
            got, failed = attempt(name, fn, cfg, adapter, K, T)
            if failed is not None:  # a Result: not written yet, or it raised
                return failed
            if isinstance(got, (str, bytes)) or not hasattr(got, "__len__") or len(got) != 2 \
                    or not all(is_integer(g) for g in got):
                return Result(name, False, f"expected two integers (adapters_bytes, copies_bytes), "
                                           f"got {got!r}")
            expected = storage_bytes(cfg, adapter, K, T)
            for which, g, e in zip(("adapters", "copies"), got, expected):
                if g != e:
                    hint = _storage_hint(which, g - e, cfg, adapter, K, T, g, e)
                    where = (f"C={cfg.d_model}, L={cfg.n_layers}, m={adapter.size(cfg.d_model)}, "
                             f"placement={adapter.placement!r}, train_layernorm="
                             f"{adapter.train_layernorm}, K={K}, T={T}")
                    return Result(name, False, f"{which}: expected {e:,} bytes, got {g:,} "
                                               f"({where})" + (f": {hint}" if hint else ""))
    return Result(name, True, f"both totals match the package's counts on {len(cases)} "
                              f"configurations, T = 1, 5 and 20")


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
    return step_flops(b, "all", adapters=True) - step_flops(b, "adapters", train_layernorm=train_layernorm)


def _step_shapes():
    return [StepShape(batch=32, seq_len=32, d_model=64, d_ff=256, n_layers=4, bottleneck=32),
            StepShape(batch=3, seq_len=7, d_model=12, d_ff=40, n_layers=2, bottleneck=5),
            StepShape(batch=8, seq_len=128, d_model=768, d_ff=3072, n_layers=12, bottleneck=64)]


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


def check_skipped_flops(fn):
    """fn(b, train_layernorm) -> flops skipped by the adapter step (b has batch, seq_len,
    d_model, d_ff, n_layers, bottleneck), checked on three shapes, both settings."""
    name = "flops the adapter step skips"
    for b in _step_shapes():
        for train_layernorm in (True, False):
            got, failed = attempt(name, fn, b, train_layernorm)
            if failed is not None:  # a Result: not written yet, or it raised
                return failed
            if not is_integer(got):
                return Result(name, False, f"expected an integer number of flops, got "
                                           f"{type(got).__name__} {got!r}")
            expected = skipped_flops(b, train_layernorm)
            if got != expected:
                hint = _flops_hint(got - expected, b, train_layernorm)
                where = (f"B={b.batch}, T={b.seq_len}, C={b.d_model}, F={b.d_ff}, L={b.n_layers}, "
                         f"m={b.bottleneck}, train_layernorm={train_layernorm}")
                return Result(name, False, f"expected {expected:,}, got {got:,} ({where})"
                              + (f": {hint}" if hint else ""))
    return Result(name, True, f"matches tools/bench.step_flops on {len(_step_shapes())} shapes, "
                              f"with the LayerNorms trained and frozen")


# ----------------------------------------------------------------------------- merging LoRA


def merge(W0, A, B, alpha, r):
    """The reference: W = W0 + (alpha / r) A B, in the package's y = x @ W layout."""
    return W0 + (alpha / r) * (A @ B)  # (d_in, r) @ (r, d_out) -> (d_in, d_out)


MERGE_TOLERANCE = 1e-12  # float64: the merged and unmerged forwards differ by round-off only


def _merge_problem(seed=0, dtype=np.float64, d_in=6, d_out=10, r=3, alpha=16, N=5):
    rng = np.random.default_rng(seed)
    W0 = rng.standard_normal((d_in, d_out)).astype(dtype)
    A = rng.standard_normal((d_in, r)).astype(dtype)
    B = (0.1 * rng.standard_normal((r, d_out))).astype(dtype)  # as after training: not zero
    x = rng.standard_normal((N, d_in)).astype(dtype)
    return W0, A, B, alpha, r, x


def check_merge(fn):
    """fn(W0, A, B, alpha, r) -> W (d_in, d_out): x @ W must equal the unmerged LoRA forward
    x @ W0 + (alpha / r) (x @ A) @ B; W0 must come back unchanged; float32 must stay float32."""
    name = "merge LoRA into W"
    W0, A, B, alpha, r, x = _merge_problem()
    W0_before = W0.copy()
    got, failed = attempt(name, fn, W0, A, B, alpha, r)
    if failed is not None:  # a Result: not written yet, or it raised
        return failed
    if not np.array_equal(W0, W0_before):
        return Result(name, False, "your merge changed W0 in place: the base is shared by every "
                                   "task, return a new array (W0 + ..., not W0 += ...)")
    if not isinstance(got, np.ndarray):
        return Result(name, False, f"expected the array W, got {type(got).__name__}")
    d_in, d_out = W0.shape
    if got.shape != W0.shape:
        hint = (": transposed? this package stores W as (d_in, d_out), y = x @ W"
                if got.shape == (d_out, d_in) else "")
        return Result(name, False, f"expected W of shape {W0.shape}, got {got.shape}{hint}")
    if not np.all(np.isfinite(got)):
        return Result(name, False, "W holds NaN or inf")
    unmerged = x @ W0 + (alpha / r) * ((x @ A) @ B)  # (N, d_in) -> (N, d_out), the LoRA forward
    err = rel_error(x @ got, unmerged)
    if err > MERGE_TOLERANCE:
        line = f"x @ W differs from the LoRA forward: max relative error {err:.1e} > {MERGE_TOLERANCE:.0e}"
        wrong = {"W0 + A B": W0 + A @ B, "W0 + (r/alpha) A B": W0 + (r / alpha) * (A @ B),
                 "W0 + alpha A B": W0 + alpha * (A @ B), "(alpha/r) A B": (alpha / r) * (A @ B)}
        reasons = {"W0 + A B": "the update is scaled by alpha / r",
                   "W0 + (r/alpha) A B": "the scale is alpha / r, not r / alpha",
                   "W0 + alpha A B": "the scale is alpha / r, not alpha",
                   "(alpha/r) A B": "that is the update alone: add it to W0"}
        for key, W in wrong.items():
            if rel_error(got, W) < MERGE_TOLERANCE:
                return Result(name, False, f"{line}: you returned {key}; {reasons[key]}")
        return Result(name, False, f"{line}: h = x W0 + (alpha/r) x A B = x (W0 + (alpha/r) A B)")
    # float32 in, float32 out: a NumPy float64 scalar would promote the whole matrix
    W32 = [a.astype(np.float32) for a in (W0, A, B)]
    got32, failed = attempt(name, fn, W32[0], W32[1], W32[2], alpha, r)
    if failed is not None:
        return failed
    if not isinstance(got32, np.ndarray) or got32.dtype != np.float32:
        dt = got32.dtype if isinstance(got32, np.ndarray) else type(got32).__name__
        return Result(name, False, f"float32 inputs gave a {dt} W: keep the base's dtype (a NumPy "
                                   f"float64 scalar such as np.float64(alpha / r) promotes it)")
    return Result(name, True, f"x @ W matches the unmerged LoRA forward; max relative error "
                              f"{'below 1e-14' if err < 1e-14 else f'{err:.0e}'} "
                              f"(threshold {MERGE_TOLERANCE:.0e}); W0 untouched; float32 kept")


# ----------------------------------------------------------------------------- break-even


def break_even(shared, per_task, per_copy):
    """The reference: the fewest T >= 1 with shared + T per_task < T per_copy, or None."""
    if per_task >= per_copy:
        return None  # each task costs the adapters at least as much as a copy: never
    return shared // (per_copy - per_task) + 1  # T (per_copy - per_task) > shared, strictly


def _break_even_cases():
    """(shared, per_task, per_copy): the shipped base with m = 32 (results.json's sizes), a tie,
    a large shared part, adapter sets as big as copies, and bigger."""
    return [(208_448, 34_948, 208_708), (100, 10, 60), (1_000_000, 90, 100), (500, 7, 257),
            (208_448, 208_708, 208_708), (208_448, 266_116, 208_708)]


def check_break_even(fn):
    """fn(shared, per_task, per_copy) -> the smallest integer T >= 1 at which
    shared + T * per_task < T * per_copy, or None when no T does."""
    name = "break-even number of tasks"
    cases = _break_even_cases()
    for shared, per_task, per_copy in cases:
        got, failed = attempt(name, fn, shared, per_task, per_copy)
        if failed is not None:  # a Result: not written yet, or it raised
            return failed
        expected = break_even(shared, per_task, per_copy)
        where = f"shared={shared:,}, per_task={per_task:,}, per_copy={per_copy:,}"
        if expected is None:
            if got is not None:
                return Result(name, False, f"{where}: expected None, got {got!r}: an adapter set "
                                           f"as large as a copy never pays for the shared base")
            continue
        if not is_integer(got):
            return Result(name, False, f"{where}: expected an integer T, got "
                                       f"{type(got).__name__} {got!r}")
        if got == expected:
            continue

        def totals(T):
            return shared + T * per_task, T * per_copy
        a, c = totals(got)
        if got == expected - 1 and a == c:
            why = f"at T={got} both store exactly {a:,}: 'smaller' means strictly fewer"
        elif got < expected:
            why = f"at T={got} the adapters still store {a:,} against {c:,} for the copies"
        else:
            why = f"already at T={expected} the adapters store {totals(expected)[0]:,} against " \
                  f"{totals(expected)[1]:,}"
        return Result(name, False, f"{where}: expected T={expected}, got {got}: {why}")
    return Result(name, True, f"right on {len(cases)} cases (a tie, a never, a large T)")
