"""The performance benchmark: `python -m minitransformer bench [--quick] [--json PATH]`.

On the standard configuration (vocab 128, C 256, 4 layers, 4 heads, F 1024, T 128, B 16,
Houlsby adapters with m = 64, float32, post-LN) it measures, after warm-up, the median of
several repetitions of:
  full_step_s         forward, loss, backward and AdamW update of the base with Houlsby
                      adapters (m = 64), every weight trainable
  adapter_step_s      the same step on the same model, training only the adapters, their
                      LayerNorms and head: the ratio of the two is what freezing saves
  base_full_step_s    (extra) full fine-tuning of the bare base, no adapters, for comparison
  adapter_ln_frozen_step_s  (extra) the adapter step with the LayerNorms frozen (AdapterHub's
                      train_layernorm=False): the gradient then stops at block 0's attention
  forward_s           the inference forward pass of the bare base
  forward_adapters_s  the same with adapters of each size m in {8, 64, 256}
  forward_peft_s      the same with the rest of the family: LoRA (r = 8 on W_q, W_v) unmerged
                      (its branches computed) and merged into W (none computed), a prefix and a
                      soft prompt of 16 (their longer sequences: 16 more keys, or 16 more positions),
                      beside the adapters (m = 64); peft_latency_overhead: each over forward_s, - 1
  matmul_gflops       the float32 matrix-product rate of every product of a step, back to
                      back (block_products); weight_matmul_gflops: the large ones alone
  step_gflops         the counted matrix-product work of a full step / full_step_s
  peak_memory_mb      the tracemalloc peak during one step (see `peak_memory`)

All of the above run on the fast path (backend.use("fast"), tools/kernels.py), as the training
commands do. Beside them, on the reference path (the textbook code, the Python API's default):
  reference.{full_step_s, adapter_step_s, forward_s} and reference_over_fast, their ratios;
  operations: every operation that has a fast kernel, timed on the benchmark's shapes on both
  paths, so that what each kernel's trick saves is a measured number.

The repetitions of every measurement are interleaved (full, adapter, forwards, full, ...),
so that a burst of load from other processes hits all of them alike: the ratios within one
run are the measure, the absolute times vary with the machine and its load.
Every step uses the classification head ("cls"). The process runs as
`python -m minitransformer` runs it: elementwise work on every core, OpenBLAS's idle threads
told not to spin for long, and freed memory kept for reuse (runtime.py). The table's last
lines say which of these were in effect.
"""
import contextlib
import json
import os
import platform
import statistics
import time
import tracemalloc

import numpy as np

try:
    import resource  # Unix only: page-fault counts
except ImportError:
    resource = None

from .. import backend, optim
from . import cli, files, runtime
from ..adapters import AdapterConfig
from ..model import Transformer
from ..peft import LoRAConfig, PrefixConfig, PromptConfig
from .bench_report import page, table
from .benchmodel import QUICK, BenchConfig, block_products, matmul_shapes, step_flops  # noqa: F401


# ----------------------------------------------------------------------------- matrix-product rates


def weight_matmul_gflops(b, repeats):
    """The float32 rate of the large weight products alone (GFLOP/s): one product of each of
    matmul_shapes, back to back, total flops over the median time. A ceiling: the step's
    other products (attention's small per-head ones, the adapters' thin ones) run slower."""
    rng = np.random.default_rng(0)
    pairs = [(rng.standard_normal((n, k), dtype=np.float32), rng.standard_normal((k, c), dtype=np.float32))
             for n, k, c in matmul_shapes(b)]
    flops = sum(2 * n * k * c for n, k, c in matmul_shapes(b))

    def run():
        for x, w in pairs:
            x @ w
    return flops / median_time(run, repeats, warmup=1) / 1e9


def matmul_gflops(b, repeats):
    """The float32 matrix-product rate on the sizes the model uses (GFLOP/s): every product of
    one block's full step (block_products), back to back with nothing in between, total
    flops over the median time. What the step would reach if it did nothing but its products."""
    products = block_products(b)
    flops = sum(f for f, _ in products)

    def run():
        for _, fn in products:
            fn()
    return flops / median_time(run, repeats, warmup=1) / 1e9


# ----------------------------------------------------------------------------- timing


def median_time(fn, repeats, warmup=0):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def paired_ratio(top, bottom):
    """The median of top[i] / bottom[i] over the pairs i (each pair timed back to back), with the
    quartiles of those ratios: {"ratio", "q1", "q3", "pairs"}."""
    ratios = [t / b for t, b in zip(top, bottom, strict=True)]
    q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else ratios * 3
    return {"ratio": statistics.median(ratios), "q1": q1, "q3": q3, "pairs": len(ratios)}


def step_pairs(top, bottom, pairs, clock=time.perf_counter):
    """top's time over bottom's as `pairs` pairs, the two run back to back in each (which goes
    first alternates: the second meets what the first left in the caches), timed by `clock`:
    paired_ratio of them, plus each one's times {"top_s", "bottom_s"}.

    The ratio of two medians from the benchmark's few interleaved repetitions pairs one step's
    middle repetition with another's: a burst of load can slow one and not the other, and each
    step always follows the same job there. A burst that slows a pair slows both of its steps;
    docs/performance.md ("The targets") gives both figures over five runs."""
    got = ([], [])
    for i in range(pairs):
        for j in ((0, 1) if i % 2 == 0 else (1, 0)):
            t0 = clock()
            (top, bottom)[j]()
            got[j].append(clock() - t0)
    return {**paired_ratio(*got), "top_s": got[0], "bottom_s": got[1]}


def cpu_overhead(b, repeats=301, rounds=7):
    """The adapters' latency overhead as work rather than elapsed time: {"overhead", "rounds",
    "spread", "q1", "q3", "base_ms", "adapters_ms", "repeats", "pairs_per_round"}.

    Elapsed time on a shared machine moves with the load (0.03 to 0.26 over five runs here). So
    the latency of one request, one sequence of b.seq_len tokens, is measured on ONE thread (one
    BLAS thread, one elementwise thread) by that thread's CPU clock (time.thread_time), which other
    processes do not advance: the forward with adapters (m = b.bottleneck) and the bare one as a
    pair, `repeats` pairs in all, in `rounds` rounds. Which of a pair goes first alternates (the
    second meets a cache the first has warmed), and each round builds both models afresh (a new
    place in memory: one layout's luck does not decide the figure). Per round the median of its
    pairs' ratios; overhead: the median of the rounds' medians, - 1; rounds: each round's figure;
    spread: their range; q1, q3: the quartiles of every pair's ratio; base_ms, adapters_ms: the
    median times.
    """
    from dataclasses import replace

    from threadpoolctl import threadpool_limits
    one = replace(b, batch=1)
    ids, _ = make_batch(one)
    pairs = max(1, repeats // rounds)
    before = runtime.threads()
    times, per_round = ([], []), []
    try:
        runtime.set_threads(1)
        with threadpool_limits(limits=1, user_api="blas"), backend.using("fast"):
            for _ in range(rounds):
                base, adapted = Transformer(one.model_config(), 0), with_adapters(one, one.bottleneck)
                jobs = [lambda: adapted.forward(ids, head="cls"), lambda: base.forward(ids, head="cls")]
                for fn in jobs + jobs:  # warm-up: first touches of the new models' memory
                    fn()
                got = step_pairs(*jobs, pairs, clock=time.thread_time)  # adapted / bare, pair by pair
                per_round.append(got["ratio"] - 1)
                times[0].extend(got["bottom_s"])
                times[1].extend(got["top_s"])
    finally:
        runtime.set_threads(before)
    every = paired_ratio(times[1], times[0])  # every pair of every round: adapted / bare
    return {"overhead": statistics.median(per_round), "rounds": per_round,
            "spread": max(per_round) - min(per_round), "q1": every["q1"] - 1, "q3": every["q3"] - 1,
            "repeats": every["pairs"],
            "pairs_per_round": pairs, "base_ms": 1e3 * statistics.median(times[0]),
            "adapters_ms": 1e3 * statistics.median(times[1])}


def minor_faults():
    """Minor page faults of this process so far: each fresh page NumPy touches costs one,
    and on a virtual machine they are expensive (see the README's Performance section)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource else 0


def make_batch(b, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, b.vocab_size, (b.batch, b.seq_len))  # (B,T)
    labels = rng.integers(0, 2, b.batch)  # (B,)
    return ids, labels


def with_adapters(b, m, seed=0, train_layernorm=True):
    """The base plus Houlsby adapters of size m, active, every weight still trainable."""
    model = Transformer(b.model_config(), seed)
    model.add_adapter("task", AdapterConfig(bottleneck=m, train_layernorm=train_layernorm), n_classes=2,
                      seed=seed)
    model.set_active_adapter("task")
    return model


def adapter_model(b, m, seed=0, train_layernorm=True):
    """The base plus Houlsby adapters of size m; only adapters, LayerNorms (the paper's
    setting; train_layernorm=False freezes them) and head train."""
    model = with_adapters(b, m, seed, train_layernorm)
    model.train_adapter("task")
    return model, optim.AdamW(model.parameters(), lr=1e-4)


def full_model(b, seed=0):
    """The model of the adapter step (m = b.bottleneck) with every weight trainable."""
    model = with_adapters(b, b.bottleneck, seed)
    return model, optim.AdamW(model.parameters(), lr=1e-4)


def base_full_model(b, seed=0):
    """The bare base with its own classifier, every weight trainable: full fine-tuning."""
    model = Transformer(b.model_config(), seed)
    return model, optim.AdamW(model.parameters(), lr=1e-4)


def peft_models(b, seed=0):
    """{name: model} for the inference latency of the other methods, each task active: LoRA
    unmerged and merged (its B = 0 costs what a trained B costs), a prefix (without its MLP, as
    served), a soft prompt; and the adapters of size b.bottleneck beside them."""
    def with_task(config):
        model = Transformer(b.model_config(), seed)
        model.add_adapter("task", config, n_classes=2, seed=seed)
        model.set_active_adapter("task")
        return model
    merged = with_task(LoRAConfig(r=b.lora_rank))
    merged.merge("task")
    return {"adapter": with_adapters(b, b.bottleneck, seed), "lora": with_task(LoRAConfig(r=b.lora_rank)),
            "lora_merged": merged, "prefix": with_task(PrefixConfig(n_prefix=b.n_prefix, reparameterize=False)),
            "prompt": with_task(PromptConfig(n_prompt=b.n_prompt))}


def on_path(path, fn):
    """fn run on `path` ("reference" or "fast"), whatever the path around it."""
    def run():
        with backend.using(path):
            fn()
    return run


def operation_arrays(b, seed=0):
    """The float32 inputs and output gradients of operation_inputs, by name, at b's sizes (the
    comparison with PyTorch, torch_ops.py, runs its operations on the same arrays)."""
    from ..attention import attention_bias
    rng = np.random.default_rng(seed)
    B, T, C, F, H, m = b.batch, b.seq_len, b.d_model, b.d_ff, b.n_heads, b.bottleneck

    def randn(*shape):
        return rng.standard_normal(shape, dtype=np.float32)
    a = {"x": randn(B, T, C), "xf": randn(B, T, F), "W": randn(C, F), "bf": randn(F), "dx": randn(B, T, C),
         "gamma": randn(C), "beta": randn(C), "att": randn(B, H, T, T)}
    a.update({f"{k}_{n}": randn(C, C) * 0.05 if k == "W" else randn(C) for n in "qkvo" for k in "Wb"})
    a.update({"W_down": randn(C, m) * 0.05, "b_down": randn(m), "W_up": randn(m, C) * 0.05, "b_up": randn(C)})
    a["mask"] = attention_bias(T, False, np.ones((B, T), bool), np.float32)  # (B,1,1,T): padding, none hidden
    return a


def operation_inputs(b, a=None):
    """{operation: (reference call, fast call)} on the benchmark's shapes (the arrays `a` of
    operation_arrays): every operation that has a fast kernel (backend.table("fast")), each
    forward with its own backward; a call returns the backward's (dx, {name: gradient})."""
    from .. import adapters, attention, layers
    from . import kernels, kernels_attention
    a = operation_arrays(b) if a is None else a
    H, x, xf, dx = b.n_heads, a["x"], a["xf"], a["dx"]
    w = {f"{k}_{n}": a[f"{k}_{n}"] for n in "qkvo" for k in "Wb"}
    aw = {k: a[k] for k in ("W_down", "b_down", "W_up", "b_up")}

    def pair(ref, fast, fwd_args, dout):
        """forward then backward, for both paths"""
        def both(fw, bw):
            def go():
                out, cache = fw(*fwd_args)
                return bw(dout, cache)
            return go
        return both(*ref), both(*fast)
    ops = {
        "linear (C -> F)": pair((layers.linear_forward, layers.linear_backward),
                                (kernels.linear_forward, kernels.linear_backward), (x, a["W"], a["bf"]), xf),
        "layernorm": pair((layers.layernorm_forward, layers.layernorm_backward),
                          (kernels.layernorm_forward, kernels.layernorm_backward), (x, a["gamma"], a["beta"]), dx),
        "gelu (B, T, F)": pair((layers.gelu_forward, layers.gelu_backward),
                               (kernels.gelu_forward, kernels.gelu_backward), (xf,), xf),
        "softmax (B, H, T, T)": pair((layers.softmax_forward, layers.softmax_backward),
                                     (kernels.softmax_forward, kernels.softmax_backward), (a["att"],), a["att"]),
        "attention": pair((lambda x: attention.attention_forward(x, w, H, a["mask"]), attention.attention_backward),
                          (lambda x: kernels_attention.attention_forward(x, w, H, a["mask"]),
                           kernels_attention.attention_backward), (x,), dx),
        "adapter": pair((lambda h: adapters.adapter_forward(h, aw), adapters.adapter_backward),
                        (lambda h: kernels_attention.adapter_forward(h, aw), kernels_attention.adapter_backward),
                        (x,), dx),
    }
    rng = np.random.default_rng(1)
    p = [rng.standard_normal((b.d_ff, b.d_model), dtype=np.float32) for _ in range(3)]
    states = [[q.copy(), np.zeros_like(q), np.zeros_like(q)] for q in p]
    ops["adamw update (3 x (F, C))"] = tuple(
        (lambda upd=upd: [upd(w_, p[0], m_, v_, 1, 1e-3, 0.9, 0.999, 1e-8, 0.01) for w_, m_, v_ in states])
        for upd in (optim.adamw_update, kernels.adamw_update))
    return ops


def operation_times(b):
    """{operation: {"reference_ms", "fast_ms", "ratio"}}: medians, each operation's two calls
    interleaved, forward and backward together."""
    out = {}
    for name, (ref, fast) in operation_inputs(b).items():
        ref(), fast()  # warm-up
        tr, tf = [], []
        for _ in range(max(b.repeats, 5)):
            for fn, times in ((ref, tr), (fast, tf)):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        r, f = statistics.median(tr), statistics.median(tf)
        out[name] = {"reference_ms": 1e3 * r, "fast_ms": 1e3 * f, "ratio": r / f}
    return out


def train_step(model, opt, ids, labels):
    opt.zero_grad()
    model.loss(ids, labels, head="cls", backward=True)
    opt.step()


def peak_memory(model, opt, ids, labels):
    """tracemalloc's peak (MB) during one step, and the MB traced before it.

    NumPy reports its array allocations to tracemalloc, so the peak covers every array
    alive during the step: the parameters, gradients and AdamW moments (created before,
    in the warm-up step) and the activations cached for the backward. The model must be
    built after tracemalloc.start(), or its arrays are not seen.
    """
    train_step(model, opt, ids, labels)  # the AdamW moments exist from here on
    tracemalloc.reset_peak()
    before = tracemalloc.get_traced_memory()[0]
    train_step(model, opt, ids, labels)
    return tracemalloc.get_traced_memory()[1] / 2**20, before / 2**20


def check_float32(model, opt):
    """A float32 model must stay float32 through forward, backward and AdamW."""
    bad = [p.name for p in model.parameters() if p.value.dtype != np.float32
           or (p.grad is not None and p.grad.dtype != np.float32)]
    bad += [f"AdamW state of {n}" for n, s in opt.state.items()
            if any(a.dtype != np.float32 for a in s.values())]
    if bad:
        raise AssertionError(f"float32 model: expected float32 throughout, got other dtypes in {bad[:5]}")


# ----------------------------------------------------------------------------- the environment


def environment():
    """CPU, cores, NumPy, the BLAS in use (threadpoolctl) and BLAS-related environment variables."""
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        cpu = platform.processor() or cpu
    blas = []
    try:
        from threadpoolctl import threadpool_info
        blas = [{k: lib.get(k) for k in ("internal_api", "version", "num_threads", "architecture",
                                           "threading_layer")}
                for lib in threadpool_info() if lib.get("user_api") == "blas"]
    except ImportError:
        blas = [{"internal_api": "unknown (threadpoolctl is not installed)"}]
    env_names = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
                 "MKL_NUM_THREADS")
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "numpy": np.__version__, "blas": blas,
            "env": {k: os.environ[k] for k in env_names if k in os.environ}}


# ----------------------------------------------------------------------------- the run


def run(b):
    """Measure everything; returns the results as a JSON-ready dict."""
    load_before = os.getloadavg()[0]
    ids, labels = make_batch(b)
    tracemalloc.start()
    memory = {}
    builders = {"full": full_model, "adapter": lambda b: adapter_model(b, b.bottleneck),
                "base_full": base_full_model}
    for kind, build in builders.items():
        model, opt = build(b)
        memory[kind] = peak_memory(model, opt, ids, labels)
        check_float32(model, opt)
        del model, opt
    tracemalloc.stop()

    full, full_opt = full_model(b)
    adapted, adapted_opt = adapter_model(b, b.bottleneck)
    base, base_opt = base_full_model(b)
    ln_frozen, ln_frozen_opt = adapter_model(b, b.bottleneck, train_layernorm=False)
    inference = {m: adapter_model(b, m)[0] for m in b.sizes}
    jobs = {"full_step": lambda: train_step(full, full_opt, ids, labels),
            "adapter_step": lambda: train_step(adapted, adapted_opt, ids, labels),
            "base_full_step": lambda: train_step(base, base_opt, ids, labels),
            "adapter_ln_frozen_step": lambda: train_step(ln_frozen, ln_frozen_opt, ids, labels),
            "forward": lambda: base.forward(ids, head="cls")}
    jobs.update({f"forward_m{m}": (lambda model=model: model.forward(ids, head="cls"))
                 for m, model in inference.items()})
    jobs.update({f"forward_{name}": (lambda model=model: model.forward(ids, head="cls"))
                 for name, model in peft_models(b).items() if name != "adapter"})  # adapters: forward_m*
    jobs = {name: on_path("fast", fn) for name, fn in jobs.items()}
    jobs.update({f"reference_{name}": on_path("reference", jobs_fn) for name, jobs_fn in (
        ("full_step", lambda: train_step(full, full_opt, ids, labels)),
        ("adapter_step", lambda: train_step(adapted, adapted_opt, ids, labels)),
        ("forward", lambda: base.forward(ids, head="cls")))})
    for _ in range(b.warmup):
        for fn in jobs.values():
            fn()
    times = {name: [] for name in jobs}
    faults = {name: [] for name in jobs}
    matmul, weight_matmul = [], []
    start = time.perf_counter()
    for rep in range(b.repeats):  # interleaved: every measurement sees the same load
        if rep >= 3 and time.perf_counter() - start > b.budget_s:
            break
        for name, fn in jobs.items():
            f0 = minor_faults()
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
            faults[name].append(minor_faults() - f0)
        matmul.append(matmul_gflops(b, repeats=3))
        weight_matmul.append(weight_matmul_gflops(b, repeats=3))
    pairs = step_pairs(jobs["adapter_step"], jobs["full_step"], b.step_pairs)
    for model, opt in ((full, full_opt), (adapted, adapted_opt), (base, base_opt)):
        check_float32(model, opt)
    t = {name: statistics.median(v) for name, v in times.items()}

    flops = step_flops(b)
    res = {
        "config": {k: v for k, v in vars(b).items()},
        "full_step_s": t["full_step"],
        "adapter_step_s": t["adapter_step"],
        "base_full_step_s": t["base_full_step"],
        "adapter_ln_frozen_step_s": t["adapter_ln_frozen_step"],
        "forward_s": t["forward"],
        "forward_adapters_s": t[f"forward_m{b.bottleneck}"],
        "forward_adapters_s_by_m": {str(m): t[f"forward_m{m}"] for m in b.sizes},
        "matmul_gflops": statistics.median(matmul),
        "weight_matmul_gflops": statistics.median(weight_matmul),
        "full_step_gflop": flops / 1e9,
        "adapter_step_gflop": step_flops(b, "adapters") / 1e9,
        "base_full_step_gflop": step_flops(b, adapters=False) / 1e9,
        "step_gflops": flops / t["full_step"] / 1e9,
        "peak_memory_mb": {k: v[0] for k, v in memory.items()},
        "memory_before_step_mb": {k: v[1] for k, v in memory.items()},
        "memory_method": "tracemalloc peak during one step (NumPy arrays included)",
        "page_faults_per_step": {k: statistics.median(faults[f"{k}_step"])
                                 for k in ("full", "adapter", "base_full")},
        "repeats_done": len(times["full_step"]),
        "step_times_s": {k: times[f"{k}_step"] for k in ("full", "adapter", "base_full", "adapter_ln_frozen")},
        "load_average_before_after": [load_before, os.getloadavg()[0]],
        "path": "fast",
        "reference": {f"{k}_s": t[f"reference_{k}"] for k in ("full_step", "adapter_step", "forward")},
    }
    res["reference_over_fast"] = {k: t[f"reference_{k}"] / t[k] for k in ("full_step", "adapter_step", "forward")}
    res["operations"] = operation_times(b)
    # the targets' ratio from its own pairs (step_pairs): the ratio of the two medians beside it
    res["adapter_over_full_step"] = pairs["ratio"]
    res["adapter_over_full_step_pairs"] = pairs
    res["adapter_over_full_step_of_medians"] = res["adapter_step_s"] / res["full_step_s"]
    # the same ratio of counted matrix-product work: what the ratio would be with no elementwise cost
    res["adapter_over_full_flops"] = res["adapter_step_gflop"] / res["full_step_gflop"]
    res["adapter_step_gap_to_flops"] = res["adapter_over_full_step"] - res["adapter_over_full_flops"]
    # against full fine-tuning of the bare base (no adapters to run at all): the paper's comparison
    res["adapter_over_base_full_step"] = res["adapter_step_s"] / res["base_full_step_s"]
    res["adapter_over_base_full_flops"] = res["adapter_step_gflop"] / res["base_full_step_gflop"]
    # AdapterHub's setting, LayerNorms frozen: nothing below block 0's attention wants a gradient
    res["adapter_ln_frozen_over_full_step"] = res["adapter_ln_frozen_step_s"] / res["full_step_s"]
    res["adapter_ln_frozen_over_full_flops"] = step_flops(b, "adapters", train_layernorm=False) / flops
    res["gemm_efficiency"] = res["step_gflops"] / res["matmul_gflops"]
    # the stricter yardstick: as if every product ran at the rate of the large weight products
    res["gemm_efficiency_weight_shapes"] = res["step_gflops"] / res["weight_matmul_gflops"]
    res["adapter_latency_overhead"] = res["forward_adapters_s"] / res["forward_s"] - 1
    res["adapter_latency_overhead_by_m"] = {str(m): t[f"forward_m{m}"] / t["forward"] - 1
                                            for m in b.sizes}
    peft = {"adapter": t[f"forward_m{b.bottleneck}"],
            **{k: t[f"forward_{k}"] for k in ("lora", "lora_merged", "prefix", "prompt")}}
    res["forward_peft_s"] = peft
    res["peft_latency_overhead"] = {k: v / t["forward"] - 1 for k, v in peft.items()}
    res["adapter_latency_overhead_cpu"] = cpu_overhead(b, b.cpu_repeats, b.cpu_rounds)
    res["environment"] = environment()
    res["runtime"] = {"elementwise_threads": runtime.threads(), "blas_idle": runtime.blas_timeout_status(),
                      "blas_kernels": runtime.blas_kernels_status(), "malloc": runtime.memory_status()}
    return res


def profile(b, steps=5, top=12, clock="wall", path="fast"):
    """cProfile of `steps` full training steps (after warm-up) on `path`: the functions with
    the most time of their own, in ms per step. Returns the printed text.

    clock="wall": where the step's elapsed time goes. cProfile follows the calling thread
    only, so a function that hands rows to other threads counts until the last of them is
    done (the wait shows as `wait` and `_thread.lock.acquire`).
    clock="cpu": the process's CPU time, which other processes on a shared machine do not
    inflate. It adds up every thread's time, so use it with --threads 1 to see the work itself.
    """
    import cProfile
    import io
    import pstats
    ids, labels = make_batch(b)
    model, opt = full_model(b)
    with backend.using(path):
        for _ in range(b.warmup):
            train_step(model, opt, ids, labels)
        prof = cProfile.Profile(time.perf_counter if clock == "wall" else time.process_time)
        prof.enable()
        for _ in range(steps):
            train_step(model, opt, ids, labels)
        prof.disable()
    stats = pstats.Stats(prof, stream=io.StringIO())
    total = sum(row[2] for row in stats.stats.values())  # every function's own time
    rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:top]
    what = "elapsed time" if clock == "wall" else "CPU time"
    lines = [f"cProfile of {steps} full steps on the {path} path: {1e3 * total / steps:.1f} ms "
             f"{what} per step; own time per step:"]
    for (file, line, fn), (_, calls, own, _, _) in rows:
        where = f"{os.path.basename(file)}:{line}({fn})" if line else fn
        lines.append(f"  {1e3 * own / steps:8.1f} ms  {calls // steps:5d} calls  {where}")
    return "\n".join(lines)


def main(argv=None):
    parser = cli.parser("bench", __doc__.split("\n")[0])
    parser.add_argument("--json", metavar="PATH",
                        help="also write the results as JSON to PATH (an existing file there must be "
                             "a bench JSON)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: proves the benchmark runs")
    parser.add_argument("--repeats", type=cli.int_in("--repeats", 1, 1000), default=None,
                        help="timed repetitions, 1 to 1000 (median kept)")
    parser.add_argument("--profile", action="store_true",
                        help="instead of the benchmark: cProfile of a few full steps, by function "
                             "(elapsed time; add --cpu for CPU time)")
    parser.add_argument("--cpu", action="store_true", help="with --profile: CPU time, not elapsed time")
    parser.add_argument("--path", choices=backend.PATHS, default="fast",
                        help="with --profile: which code to profile, the fast kernels (default) or the "
                             "reference passes")
    parser.add_argument("--threads", type=cli.int_in("--threads", 1, runtime.MAX_THREADS), default=None,
                        help="limit the BLAS threads (threadpoolctl) and the elementwise threads "
                             f"(runtime.set_threads), 1 to {runtime.MAX_THREADS}; default: every core")
    parser.add_argument("--against", choices=("torch",),
                        help="instead of the benchmark: the same model in PyTorch from the same weights, "
                             "checked in float64, then timed against the fast path step by step (needs "
                             "PyTorch: pip install .[compare]); --docs includes it whenever PyTorch is there")
    parser.add_argument("--docs", metavar="PATH",
                        help="also write the performance page (docs/performance.md) from this run, "
                             "with the profiles of both paths")
    parser.add_argument("--overwrite", action="store_true",
                        help="allow --docs or --json to be shipped work (the repository's "
                             "docs/performance.md)")
    args = parser.parse_args(argv)
    if args.cpu and not args.profile:
        parser.error("--cpu: only used with --profile (it chooses the profile's clock), got it without")
    if args.json and args.profile:
        parser.error("--json: the profile writes no JSON; expected --json without --profile")
    if args.path != "fast" and not args.profile:
        parser.error("--path: only used with --profile (the benchmark measures both paths), got it without")
    if args.docs and args.profile:
        parser.error("--docs: the page needs the benchmark's numbers; expected --docs without --profile")
    if args.against and (args.profile or args.json or args.docs):
        parser.error("--against: the comparison runs on its own; expected it without --profile, --json "
                     "and --docs (--docs includes it when PyTorch is installed)")
    if args.against:
        from . import torch_twin
        if not torch_twin.available():
            raise ImportError(f"--against torch: {torch_twin.INSTALL}")
    if args.docs is not None:
        files.check_output(args.docs, "--docs", lambda path: files.read_bytes(path, "--docs").startswith(
                           b"# Performance"), "a performance page written by bench", overwrite=args.overwrite)
    if args.json is not None:  # checked now, not after minutes of measuring
        files.check_output(args.json, "--json", files.json_with("config", "full_step_s"),
                           "a JSON file written by bench", overwrite=args.overwrite)
    b = QUICK if args.quick else BenchConfig()
    if args.repeats is not None:
        b = BenchConfig(**{**vars(b), "repeats": args.repeats})
    limits = contextlib.nullcontext()
    if args.threads is not None:
        from threadpoolctl import threadpool_limits
        limits = threadpool_limits(limits=args.threads, user_api="blas")
        runtime.set_threads(args.threads)
    with limits:
        if args.profile:
            print(profile(b, clock="cpu" if args.cpu else "wall", path=args.path))
            return 0
        if args.against:
            from . import torch_twin
            res = torch_twin.against_torch(b, args.repeats)
            print(torch_twin.table(res))
            return 0 if res["check_passed"] else 1
        res = run(b)
        profiles = [profile(b, path=path) for path in ("fast", "reference")] if args.docs else []
        torch_res = None
        if args.docs:
            from . import torch_twin
            torch_res = torch_twin.against_torch(b) if torch_twin.available() else None
    print(table(res))
    if args.docs:
        files.write_text(args.docs, page(res, profiles, torch_res))
        print(f"wrote {cli.shown(args.docs)}")
    if args.json:
        files.write_text(args.json, json.dumps(res, indent=2))
        print(f"wrote {cli.shown(args.json)}")
    return 0
