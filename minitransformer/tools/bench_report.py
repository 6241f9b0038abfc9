"""How a benchmark run is shown: the table `python -m minitransformer bench` prints, the targets'
verdicts, and docs/performance.md (`bench --docs PATH`).

Every number on the page comes from the run that writes it (bench.run and bench.profile); the
prose around them is here, so that the page and the code that measures it change together.
"""
import time

from .benchmodel import BenchConfig

# ----------------------------------------------------------------------------- the table


TARGETS = {"adapter_over_full_step": ("<=", 0.70), "adapter_step_gap_to_flops": ("<=", 0.03),
           "gemm_efficiency": (">=", 0.75), "adapter_latency_overhead": ("<=", 0.12)}


SIZE_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "seq_len", "batch", "bottleneck")


def meets(res):
    """{ratio: True/False} against TARGETS."""
    return {k: (res[k] <= v if op == "<=" else res[k] >= v) for k, (op, v) in TARGETS.items() if k in res}


def targets_apply(config):
    """The targets are set for the standard sizes (BenchConfig()); at others (--quick) they
    say nothing."""
    standard = vars(BenchConfig())
    return all(config[k] == standard[k] for k in SIZE_FIELDS)


def verdict(res, key):
    """'met', 'NOT met', or 'not applicable' when the run's sizes are not the standard ones."""
    if not targets_apply(res["config"]):
        return "not applicable at these sizes (set for the standard ones)"
    return "met" if meets(res)[key] else "NOT met"


def table(res):
    b = res["config"]
    ms = lambda s: f"{1e3 * s:9.1f} ms"  # noqa: E731
    rows = [("full_step_s", ms(res["full_step_s"])), ("adapter_step_s", ms(res["adapter_step_s"])),
            ("base_full_step_s (no adapters)", ms(res["base_full_step_s"])),
            ("adapter_ln_frozen_step_s", ms(res["adapter_ln_frozen_step_s"])), ("forward_s", ms(res["forward_s"]))]
    rows += [(f"forward_adapters_s (m={m})", ms(s)) for m, s in res["forward_adapters_s_by_m"].items()]
    rows += [(f"reference path: {k}", f"{ms(res['reference'][k + '_s'])}   "
              f"{res['reference_over_fast'][k]:5.2f} x the fast path")
             for k in ("full_step", "adapter_step", "forward")]
    rows += [(f"operation: {name}", f"{o['reference_ms']:6.2f} ms reference, {o['fast_ms']:6.2f} ms fast, "
              f"{o['ratio']:5.2f} x") for name, o in res["operations"].items()]
    rows += [("matmul_gflops (every product of a step)", f"{res['matmul_gflops']:9.1f} GFLOP/s"),
             ("weight_matmul_gflops (large products only)", f"{res['weight_matmul_gflops']:9.1f} GFLOP/s"),
             ("step_gflops", f"{res['step_gflops']:9.1f} GFLOP/s "
                             f"({res['full_step_gflop']:.2f} GFLOP counted)")]
    pairs = res["adapter_over_full_step_pairs"]
    rows += [("adapter step / full step, time", f"{res['adapter_over_full_step']:9.3f}   median of "
              f"{pairs['pairs']} pairs' ratios (the two steps back to back), quartiles "
              f"{pairs['q1']:.3f} to {pairs['q3']:.3f}; the medians above give "
              f"{res['adapter_over_full_step_of_medians']:.3f}"),
             ("adapter step / full step, counted flops", f"{res['adapter_over_full_flops']:9.3f}"),
             ("adapter step / base full step, time", f"{res['adapter_over_base_full_step']:9.3f}"),
             ("adapter step / base full step, counted flops", f"{res['adapter_over_base_full_flops']:9.3f}"),
             ("adapter step, LayerNorms frozen / full step, time",
              f"{res['adapter_ln_frozen_over_full_step']:9.3f}"),
             ("adapter step, LayerNorms frozen / full step, counted flops",
              f"{res['adapter_ln_frozen_over_full_flops']:9.3f}")]
    rows += [(f"peak_memory_mb ({k})", f"{v:9.1f} MB") for k, v in res["peak_memory_mb"].items()]
    rows += [(k, f"{res[k]:9.3f}   target {op} {v}: {verdict(res, k)}") for k, (op, v) in TARGETS.items()]
    rows += [("gemm_efficiency against weight_matmul_gflops", f"{res['gemm_efficiency_weight_shapes']:9.3f}")]
    rows += [(f"adapter_latency_overhead (m={m})", f"{v:9.3f}")
             for m, v in res["adapter_latency_overhead_by_m"].items()]
    cpu = res["adapter_latency_overhead_cpu"]
    rows += [(f"adapter_latency_overhead_cpu (m={b['bottleneck']}, B=1, one thread's CPU time)",
              f"{cpu['overhead']:9.3f}   median of {len(cpu['rounds'])} rounds of {cpu['pairs_per_round']} "
              f"alternating pairs; rounds {min(cpu['rounds']):.3f} to {max(cpu['rounds']):.3f} (spread "
              f"{cpu['spread']:.3f}); quartiles of every pair {cpu['q1']:.3f} to {cpu['q3']:.3f} "
              f"({cpu['base_ms']:.1f} ms bare, {cpu['adapters_ms']:.1f} ms with adapters)")]
    what = {"adapter": f"adapters m={b['bottleneck']}", "lora": f"LoRA r={b['lora_rank']} (q, v), unmerged",
            "lora_merged": f"LoRA r={b['lora_rank']} merged into W", "prefix": f"prefix n={b['n_prefix']}",
            "prompt": f"prompt n={b['n_prompt']}"}
    rows += [(f"forward_peft_s ({what[k]})", f"{ms(v)}   overhead {res['peft_latency_overhead'][k]:6.3f}")
             for k, v in res["forward_peft_s"].items()]
    env = res["environment"]
    blas = ", ".join(f"{x.get('internal_api')} {x.get('version')} ({x.get('architecture')}, "
                     f"{x.get('num_threads')} threads)" for x in env["blas"]) or "none found"
    head = (f"minitransformer bench: V={b['vocab_size']} C={b['d_model']} L={b['n_layers']} "
            f"H={b['n_heads']} F={b['d_ff']} T={b['seq_len']} B={b['batch']} m={b['bottleneck']}, "
            f"float32, post-LN; median of {b['repeats']}; fast path (backend.use('fast')) unless "
            f"a row says reference")
    foot = [f"cpu: {env['cpu']} ({env['cores']} cores); numpy {env['numpy']}; BLAS: {blas}"]
    if env["env"]:
        foot.append("env: " + " ".join(f"{k}={v}" for k, v in env["env"].items()))
    load = res["load_average_before_after"]
    faults = res["page_faults_per_step"]
    foot.append(f"page faults per step: full {faults['full']:.0f}, adapter {faults['adapter']:.0f}; "
                f"load average {load[0]:.1f} before, {load[1]:.1f} after, on {env['cores']} cores; "
                f"{res['repeats_done']} repetitions")
    rt = res["runtime"]
    foot.append(f"runtime: {rt['elementwise_threads']} elementwise threads; BLAS idle spin: "
                f"{rt['blas_idle']}; BLAS kernels: {rt.get('blas_kernels', 'not recorded')}; "
                f"freed memory: {rt['malloc']}")
    if max(load) > 0.5 * (env["cores"] or 1):
        foot.append("WARNING: other processes are using the CPU: BLAS threads wait for each other "
                    "and times can be many times longer; ratios are still from one run")
    width = max(len(r[0]) for r in rows)
    return "\n".join([head] + [f"  {k:<{width}}  {v}" for k, v in rows] + foot)


# ----------------------------------------------------------------------------- the page


INTRO = """\
# Performance

Everything on this page was written by one run of

```bash
python -m minitransformer bench --docs docs/performance.md --overwrite     # about a minute on a quiet 2-core machine
```

Other ways to run the benchmark (none of them writes a file unless asked):

```bash
python -m minitransformer bench                     # the table below, printed
python -m minitransformer bench --json out.json     # the same, also as JSON
python -m minitransformer bench --quick             # tiny sizes, under a second: what the tests run
python -m minitransformer bench --profile           # where a step's elapsed time goes, by function
python -m minitransformer bench --against torch     # the same model in PyTorch: checked, then timed
```

## Two paths: the textbook and the fast kernels

The code a student reads (`layers.py`, `attention.py`, `adapters.py`, `losses.py`, `optim.py`) is
written the way its maths is derived, and it is what the Python API runs by default. The same
functions are computed faster by the kernels in `minitransformer/tools/kernels.py` and
`kernels_attention.py` (in-place steps, threads, folded constants); `tests/test_kernels.py` checks
each against its reference. One switch chooses:

```python
from minitransformer import backend
backend.use("fast")                  # the whole process
with backend.using("fast"): ...      # one block
```

The commands that train at size (the demo, `pretrain`, `figures`) use the fast path; the benchmark
measures both. Every time below is on the fast path unless it says reference.
"""

MEASURED = """\
## What is measured

The standard configuration (`BenchConfig` in `minitransformer/tools/benchmodel.py`): vocab 128, C = 256,
4 layers, 4 heads, F = 1024, T = 128, B = 16, Houlsby adapters with m = 64, float32, post-LN. After a
warm-up round the repetitions of all measurements are interleaved, so that a burst of load from other
processes hits all of them alike, and each one's median is kept. A step is forward, loss, backward
and an AdamW update, with the classification head.

- `full_step_s`: the base with m = 64 adapters, every weight trainable. `adapter_step_s`: the same
  step on the same model, training only the adapters, the task's LayerNorms and its head. Their
  ratio is what freezing saves; it is measured on its own as well, the two steps in 30 pairs
  (`adapter step / full step, time`; see the targets). `base_full_step_s`: full fine-tuning of
  the bare base.
  `adapter_ln_frozen_step_s`: the adapter step with the LayerNorms frozen (`train_layernorm=False`).
- `forward_s`, `forward_adapters_s`: inference forwards of the bare base and with adapters of size m.
- `reference path`: the full step, the adapter step and the forward on the textbook code, and how
  many times the fast path's time they take.
- `operation`: every operation that has a fast kernel, forward and backward together, on the
  benchmark's shapes, on each path: what each kernel's trick saves.
- `matmul_gflops`: the rate of every matrix product one block makes in a step, run back to back;
  `weight_matmul_gflops`: the large weight products alone. `step_gflops`: the counted
  matrix-product work of a full step divided by its time (elementwise work is not counted).
- `peak_memory_mb`: tracemalloc's peak during one step, parameters, gradients and AdamW moments
  included.

No test asserts a timing: `tests/test_bench.py` runs `--quick` and checks that the numbers are
consistent, the flop count, and that float32 stays float32.
"""

PROCESS = """\
## How the process runs (the fast path)

`minitransformer/tools/runtime.py`; the table's last lines say which settings were in effect.
- *Elementwise work on every core.* NumPy runs a matrix product on every core but a ufunc such as
  `np.tanh` on one. The fast kernels hand each thread one block of rows of a row-by-row operation
  (`runtime.by_rows`); every row is computed exactly as on one thread, so the result does not depend
  on the number of threads (`tests/test_runtime.py`). `MINITRANSFORMER_THREADS=1` puts everything on
  one thread.
- *Handing work over.* A step hands work to the threads about 125 times. Each worker thread waits
  on a lock of its own, is given its job by the release of that lock, and gives it back through a
  second lock (`runtime._Worker`). `concurrent.futures`, used before, makes a Future, a queue entry
  and a condition each time; with the locks the full step and the adapter step took 0.95 and 0.97
  of their time (medians of 30 alternating pairs in one process). A woken thread still starts some
  tens of microseconds late, when the virtual machine gives it its core back, and the caller waits
  for it at the end: the `acquire` line of the profile below.
- *Attention's small products* run one block of sequences per thread, each on a one-thread BLAS
  (`runtime.matmul`): BLAS's own threads spent more time handing a 128 x 64 x 128 product over than
  computing it.
- *OpenBLAS's idle threads* spin for about 0.1 s after each product and take the core from the
  elementwise threads; importing minitransformer sets `OPENBLAS_THREAD_TIMEOUT=19` (about 0.2 ms)
  unless you set it yourself. It only takes effect if minitransformer is imported before numpy.
- *OpenBLAS's kernels for the CPU.* OpenBLAS chooses its product kernels by the instructions a CPU
  has, and gives an AMD Zen 4 (it has AVX-512) those written for Intel's Skylake-X. Zen 4 runs
  AVX-512 as two halves, and its Zen (AVX2) kernels were faster there: float32 products of the
  benchmark's shapes at 104-111 GFLOP/s on one core against 98-106. In three runs of
  `bench --against torch` with each, alternating, the full step took 0.91-0.97 of PyTorch's time
  with them (1.00-1.01 without), the adapter step 0.98-1.00 (0.97-1.03), the forward 0.96-1.00
  (1.03-1.05). On a Zen 4, importing minitransformer sets `OPENBLAS_CORETYPE=Zen` unless you set it
  yourself; like the idle spin, only if minitransformer is imported before numpy. The products'
  last bits depend on the kernels, so a command's numbers repeat bit for bit on the same kernels;
  the worker processes a command starts are given its kernels.
- *Freed memory kept for reuse.* Every command calls `runtime.keep_freed_memory()` (glibc's
  `mallopt`), so a step does not meet its activations as fresh pages each time;
  `MINITRANSFORMER_KEEP_MEMORY=0` turns it off.
- *Shared cores.* When another process keeps a core busy, the BLAS threads wait for each other and a
  step can take many times longer. Compare runs with `--threads 1` on a shared machine; the table
  warns when the load average is above half the cores.
"""

TARGETS_TEXT = """\
## The targets

The table above gives each target's verdict for this run; what decides them:

- `adapter_step_gap_to_flops` <= 0.03: the adapter step over the full step, in time, minus the same
  ratio in counted matrix-product work. The time ratio is higher because the elementwise work
  (attention's softmax, every LayerNorm, the GELUs) is paid in full by both steps; a gap within 0.03
  means the fast path adds little of its own beyond what the flops predict. The time ratio is the
  median over 30 pairs of the two steps run back to back, which goes first alternating
  (`bench.step_pairs`; the `adapter step / full step, time` line gives the pairs' quartiles). The
  ratio of the two steps' medians in the table, which this figure was before, leans on where each
  step sits in the benchmark's round (the full step right after the large products, the adapter
  step right after the full step) and on bursts of load that reach one median and not the other:
  five runs in separate processes on the 2-core machine gave 0.697 to 0.725 that way and 0.729 to
  0.752 by pairs (a gap of 0.014 to 0.038), where 30 pairs in a process of their own gave 0.729 to
  0.745 in three runs.
- Against PyTorch (`bench --against torch`, above): each of the full step, the adapter step and the
  forward at most 1.00 times PyTorch's eager time, in one run; the verdict is the line under the
  steps' table, on the ratios as printed. A goal beyond, 0.80, is out of reach here: the paragraph
  under the operations' table gives what the step's products alone take, which leaves almost
  nothing for the rest of the step.
- `adapter_latency_overhead` <= 0.12 at m = 64: the adapters' own products are 8NCm flops per
  block against the block's 2N(4C^2 + 2CF) + 4BT^2C, about 7.7 % of the forward at these sizes; the
  thin products also wake sleeping BLAS threads, so the measured overhead moves from run to run
  (0.03 to 0.26 over five runs on a shared machine). `adapter_latency_overhead_cpu` holds still:
  one request (B = 1), one thread, timed by that thread's CPU clock (which other processes do not
  advance); the bare forward and the one with adapters as alternating pairs, 7 rounds of 43 pairs,
  both models built afresh in each round; the median of each round's pair ratios, and the median
  round is the figure. The table gives the rounds' range (the spread within the run) and the
  quartiles of every pair. Five runs in separate processes on the 2-core machine gave 0.095 to 0.108
  under a load of 4.5 to 5.6, and 0.099 to 0.103 under a load of 1.2: within 0.02 of each other.
- `gemm_efficiency` >= 0.75 (it was 0.50): the step at three quarters of the rate of its own
  products. Against the large weight products alone (`gemm_efficiency against weight_matmul_gflops`) it is lower: the small per-head
  and thin adapter products run below that rate even on their own.
- `adapter_over_full_step` <= 0.70 is below what this configuration allows: the counted
  matrix-product work alone gives the `adapter step / full step, counted flops` line. In the paper's
  setting every LayerNorm trains, the embedding LayerNorm below block 0 included, so the gradient
  must flow back through every block; the adapter step skips only the dW products and still pays for
  attention's batched products and all the elementwise work. With the LayerNorms frozen
  (AdapterHub's setting, the `adapter_ln_frozen` lines) the gradient stops at block 0's attention.
"""


def operations_table(res):
    """The per-operation timings as a Markdown table."""
    lines = ["| operation (forward + backward) | reference | fast | reference / fast |",
             "|---|---:|---:|---:|"]
    for name, o in res["operations"].items():
        lines.append(f"| {name} | {o['reference_ms']:.2f} ms | {o['fast_ms']:.2f} ms | {o['ratio']:.2f} |")
    return "\n".join(lines)


def paths_table(res):
    """Reference against fast for the three headline measurements, as a Markdown table."""
    lines = ["| | reference | fast | reference / fast |", "|---|---:|---:|---:|"]
    for key, label in (("full_step", "full step"), ("adapter_step", "adapter step"), ("forward", "forward")):
        ref, fast = res["reference"][f"{key}_s"], res[f"{key}_s"]
        lines.append(f"| {label} | {1e3 * ref:.1f} ms | {1e3 * fast:.1f} ms | {res['reference_over_fast'][key]:.2f} |")
    return "\n".join(lines)


AGAINST_TORCH = """\
## Against PyTorch

`python -m minitransformer bench --against torch` (with the optional extra: `pip install .[compare]`,
PyTorch's CPU build) builds the same model in PyTorch from the same weights
(`minitransformer/tools/torch_twin.py`: every parameter under the same name; F.linear, F.layer_norm,
F.gelu, the attention as its products and softmax, F.cross_entropy, torch.optim.AdamW with the decay
on matrices only), checks in float64 that both give the same loss and gradients, then times both in
float32, case by case, each library in runs of its own (`minitransformer/tools/torch_ops.py`,
`side_by_side`): a block of untimed runs (30 ms' worth, at least one) and four timed ones, then the
other library's block, which goes first alternating; a shorter case runs in more blocks (the
forward, a third of a step, in three times as many), so that each case is timed about as long. A
run right after the other library's measures the handover, not the library: PyTorch's threads spin
for about 8 ms after its work and take a core from whatever follows (NumPy's LayerNorm took
1.45-1.71 ms in the four runs after PyTorch's, 1.13-1.21 ms once 15 ms had passed), and after a
pause they start cold. The second table times each fast kernel beside
PyTorch's operation in the same way (`tests/test_torch_twin.py` checks that both compute the same
gradients), and the line under it sorts them by this run's ratios. LayerNorm and the softmax apply
per-row means, sums and scales as broadcasts; NumPy runs each broadcast through its buffered
iterator, one short inner loop per row: multiplying a (1024, 256) float32 block by a scale per
row took 1.75 times as long as by a (1024, 256) array, where on (16, 16384) it took 0.76 times as
long. The fast LayerNorm makes six passes over its rows forward (four of them such broadcasts) and
nine backward (four); PyTorch's kernel takes each row once or twice while it is in cache. The
row maxima were the softmax's slowest step (x.max(-1) spends most of its time starting each row of
128); np.maximum.reduceat over the rows end to end takes half that, and the fast softmax uses it.
"""


def against_torch_section(res, torch_res):
    """The comparison with PyTorch, or how to get it when it was not installed for the run."""
    from .torch_twin import INSTALL, table as torch_table
    if torch_res is None:
        return AGAINST_TORCH + f"\nThis run had no PyTorch to compare with ({INSTALL}).\n"
    return AGAINST_TORCH + "\n" + torch_table(torch_res) + "\n" + floor_text(res, torch_res) + "\n"


def floor_text(res, torch_res):
    """How close either library can come: the step's products alone at the rate they run back to
    back, beside both libraries' steps of this run."""
    full = torch_res["cases"].get("full step")
    if full is None:
        return ""
    products_ms = 1e3 * res["full_step_gflop"] / res["matmul_gflops"]
    linear = torch_res.get("operations", {}).get("linear (C -> F)")
    same_rate = (f" PyTorch's products run no faster (the linear row: {linear['ratio']:.2f})." if linear else "")
    goal_ms = 0.8 * full["torch_ms"]
    goal = (f"would leave {goal_ms - products_ms:.0f} ms for all of it" if goal_ms >= products_ms else
            f"({goal_ms:.0f} ms) would be shorter than its products alone")
    return (f"How close either library can come, in this run: a full step's counted products "
            f"({res['full_step_gflop']:.1f} GFLOP), at the rate the benchmark's products run back to back "
            f"(`matmul_gflops`, {res['matmul_gflops']:.0f} GFLOP/s), take {products_ms:.0f} ms: "
            f"{products_ms / full['numpy_ms']:.2f} of NumPy's full step and {products_ms / full['torch_ms']:.2f} of "
            f"PyTorch's.{same_rate} The rest of each step (the LayerNorms, GELUs, softmaxes and AdamW, the hand-offs, "
            f"and attention's small products, which run below that rate) took {full['numpy_ms'] - products_ms:.0f} ms "
            f"in NumPy and {full['torch_ms'] - products_ms:.0f} ms in PyTorch. A step at 0.80 of PyTorch's "
            f"{goal}.\n")


def page(res, profiles, torch_res=None, when=None):
    """The whole page: prose, then the run's tables and profiles (and the comparison with PyTorch)."""
    when = when or time.strftime("%d %b %Y, %H:%M UTC", time.gmtime())
    env = res["environment"]
    parts = [INTRO,
             f"## One run\n\n{when}; {env['cpu']}, {env['cores']} cores; Python {env['python']}, "
             f"NumPy {env['numpy']}.\n",
             "The reference path beside the fast one:\n", paths_table(res), "",
             "Each operation that has a fast kernel, on the benchmark's shapes:\n", operations_table(res), "",
             "The whole table, as `python -m minitransformer bench` prints it:\n",
             "```\n" + table(res) + "\n```\n", against_torch_section(res, torch_res), MEASURED, TARGETS_TEXT, PROCESS,
             "## Where the time goes\n\nElapsed time of the full step, by function (`bench --profile`; "
             "`--profile --path reference` for the textbook code):\n"]
    for text in profiles:
        parts.append("```\n" + text + "\n```\n")
    return "\n".join(parts)
