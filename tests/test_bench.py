"""The benchmark runs end to end in --quick mode, its numbers are consistent, and a float32
model stays float32. No test asserts a timing: the machine is shared and timings are noisy."""
import json
import statistics

import numpy as np
import pytest

from minitransformer import optim
from minitransformer.tools import bench
from minitransformer.__main__ import main as cli
from minitransformer.adapters import AdapterConfig
from minitransformer.model import ModelConfig, Transformer


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench")
    code = cli(["bench", "--quick", "--json", str(folder / "out.json"), "--docs", str(folder / "performance.md")])
    return code, json.loads((folder / "out.json").read_text()), (folder / "performance.md").read_text()


@pytest.fixture(scope="module")
def docs_page(quick_run):
    return quick_run[2]


def test_the_reference_path_is_measured_beside_the_fast_one(quick_run):
    _, res, _ = quick_run
    assert res["path"] == "fast"
    for key in ("full_step", "adapter_step", "forward"):
        ref = res["reference"][f"{key}_s"]
        assert ref > 0 and res["reference_over_fast"][key] == pytest.approx(ref / res[f"{key}_s"])
    assert set(res["operations"]) >= {"linear (C -> F)", "layernorm", "gelu (B, T, F)", "softmax (B, H, T, T)",
                                      "attention", "adapter", "adamw update (3 x (F, C))"}
    for o in res["operations"].values():
        assert o["reference_ms"] > 0 and o["fast_ms"] > 0
        assert o["ratio"] == pytest.approx(o["reference_ms"] / o["fast_ms"])


def test_the_performance_page_is_written_from_the_run(quick_run, docs_page):
    _, res, _ = quick_run
    assert docs_page.startswith("# Performance")
    assert f"| full step | {1e3 * res['reference']['full_step_s']:.1f} ms |" in docs_page
    assert "cProfile of 5 full steps on the fast path" in docs_page
    assert "cProfile of 5 full steps on the reference path" in docs_page
    assert "/work/" not in docs_page and "/home/" not in docs_page


def test_quick_bench_writes_every_number(quick_run):
    code, res, _ = quick_run
    assert code == 0
    for key in ("full_step_s", "adapter_step_s", "base_full_step_s", "forward_s", "forward_adapters_s",
                "matmul_gflops", "step_gflops", "adapter_over_full_step", "adapter_over_base_full_step",
                "gemm_efficiency", "adapter_latency_overhead"):
        assert np.isfinite(res[key]) and res[key] > -1, key
    for key in ("full_step_s", "adapter_step_s", "forward_s", "forward_adapters_s", "matmul_gflops"):
        assert res[key] > 0, key
    assert set(res["forward_adapters_s_by_m"]) == {str(m) for m in bench.QUICK.sizes}
    assert set(res["adapter_latency_overhead_by_m"]) == {str(m) for m in bench.QUICK.sizes}
    assert set(res["peak_memory_mb"]) == {"full", "adapter", "base_full"}
    assert all(v > 0 for v in res["peak_memory_mb"].values())
    assert res["environment"]["numpy"] == np.__version__
    assert res["environment"]["blas"], "threadpoolctl should see the BLAS NumPy uses"
    assert res["runtime"]["elementwise_threads"] >= 1 and res["runtime"]["malloc"]


def test_ratios_are_computed_from_the_timings(quick_run):
    _, r, _ = quick_run
    steps = r["step_times_s"]  # every repetition's time of each step, in the order they ran
    assert len(steps["full"]) == r["repeats_done"] and r["full_step_s"] == statistics.median(steps["full"])
    # the targets' ratio: the median of its own pairs' ratios (the two steps back to back)
    pairs = r["adapter_over_full_step_pairs"]
    assert pairs["pairs"] == len(pairs["top_s"]) == len(pairs["bottom_s"]) == bench.QUICK.step_pairs
    per_pair = [a / f for a, f in zip(pairs["top_s"], pairs["bottom_s"])]
    assert r["adapter_over_full_step"] == pairs["ratio"] == pytest.approx(statistics.median(per_pair))
    assert pairs["q1"] <= r["adapter_over_full_step"] <= pairs["q3"]
    assert r["adapter_over_full_step_of_medians"] == pytest.approx(r["adapter_step_s"] / r["full_step_s"])
    assert r["adapter_over_base_full_step"] == pytest.approx(r["adapter_step_s"] / r["base_full_step_s"])
    assert r["adapter_ln_frozen_over_full_step"] == pytest.approx(r["adapter_ln_frozen_step_s"] / r["full_step_s"])
    assert r["gemm_efficiency"] == pytest.approx(r["step_gflops"] / r["matmul_gflops"])
    assert r["gemm_efficiency_weight_shapes"] == pytest.approx(r["step_gflops"] / r["weight_matmul_gflops"])
    assert r["step_gflops"] == pytest.approx(r["full_step_gflop"] / r["full_step_s"])
    assert r["adapter_latency_overhead"] == pytest.approx(r["forward_adapters_s"] / r["forward_s"] - 1)
    m = str(bench.QUICK.bottleneck)
    assert r["adapter_latency_overhead_by_m"][m] == pytest.approx(r["adapter_latency_overhead"])
    # the rest of the family beside the adapters: LoRA unmerged and merged, prefix, prompt
    assert set(r["forward_peft_s"]) == {"adapter", "lora", "lora_merged", "prefix", "prompt"}
    assert r["forward_peft_s"]["adapter"] == r["forward_adapters_s"]
    for k, v in r["forward_peft_s"].items():
        assert v > 0 and r["peft_latency_overhead"][k] == pytest.approx(v / r["forward_s"] - 1), k


def test_the_latency_models_are_what_they_say():
    """The merged LoRA model computes no branch, the unmerged one does; the prefix and the prompt
    are the configured lengths; and each gives the logits of its kind."""
    b = bench.QUICK
    models = bench.peft_models(b)
    assert models["lora_merged"].adapters["task"].merged and not models["lora"].adapters["task"].merged
    assert models["lora"].adapters["task"].config.r == b.lora_rank
    assert models["prefix"].adapters["task"].n_prefix() == b.n_prefix
    assert models["prompt"].adapters["task"].n_prompt() == b.n_prompt
    ids, _ = bench.make_batch(b)
    for name, model in models.items():
        logits, cache = model.forward(ids, head="cls")
        assert logits.shape == (b.batch, 2), name
    merged, lora = models["lora_merged"], models["lora"]
    assert "blocks.0.attn.q_proj" not in merged.adapters["task"].plugs(merged)  # merged: no branch plugged in
    assert lora.adapters["task"].plugs(lora)["blocks.0.attn.q_proj"].branch is not None
    # B = 0: merged and unmerged give the bare base's logits (the latency of zeros is the latency)
    np.testing.assert_array_equal(models["lora"].forward(ids, head="cls")[0],
                                  models["lora_merged"].forward(ids, head="cls")[0])


def test_flop_count_matches_the_shapes():
    """2 N C C per projection and so on, recounted here from the model's own parameter shapes."""
    b = bench.BenchConfig(vocab_size=16, d_model=8, n_layers=3, n_heads=2, d_ff=12, seq_len=5, batch=2,
                          bottleneck=3)
    model = Transformer(b.model_config())
    N, T = b.batch * b.seq_len, b.seq_len
    weights = sum(2 * N * p.value.shape[0] * p.value.shape[1] for n, p in model.named_parameters().items()
                  if n.startswith("blocks.") and p.value.ndim == 2)  # every block's matrices
    attention = b.n_layers * 2 * (2 * b.batch * T * T * b.d_model)  # Q K^T and P V
    assert bench.step_flops(b, adapters=False) == 3 * (weights + attention)  # the bare base
    model.add_adapter("t", AdapterConfig(bottleneck=3))
    adapters = sum(2 * N * p.value.shape[0] * p.value.shape[1] for n, p in model.named_parameters().items()
                   if n.startswith("adapters.t.blocks.") and p.value.ndim == 2)
    assert adapters > 0
    assert bench.step_flops(b) == 3 * (weights + attention + adapters)  # the full step: all of it trains
    adapter_step = (weights + attention + adapters) + (weights + 2 * attention + 2 * adapters)
    assert bench.step_flops(b, "adapters") == adapter_step  # every block's input gradient is needed
    block0_attention_backward = 4 * 2 * N * b.d_model ** 2 + 2 * (attention // b.n_layers)
    assert bench.step_flops(b, "adapters", train_layernorm=False) == adapter_step - block0_attention_backward


def test_the_reference_rate_runs_every_product_the_step_counts():
    """matmul_gflops times block_products: one block's products, n_layers of which make up
    exactly the counted work of the full step, and each of them really runs."""
    b = bench.BenchConfig(vocab_size=16, d_model=8, n_layers=3, n_heads=2, d_ff=12, seq_len=5, batch=2,
                          bottleneck=3)
    products = bench.block_products(b)
    assert len(products) == 3 * 10 + 6  # 10 linear layers (3 products each) and 6 batched ones
    assert b.n_layers * sum(f for f, _ in products) == bench.step_flops(b)
    for flops, fn in products:
        out = fn()
        assert out.dtype == np.float32 and 2 * out.size * min(out.shape[-1], 3) <= flops


def test_float32_stays_float32_through_forward_backward_and_adamw():
    cfg = ModelConfig(vocab_size=20, max_len=8, d_model=16, n_heads=2, n_layers=2, d_ff=32, n_classes=3,
                      dropout=0.1)
    model = Transformer(cfg, seed=0)
    model.add_adapter("t", AdapterConfig(bottleneck=4), n_classes=3)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 20, (3, 8))
    pad = np.ones((3, 8), bool)
    pad[0, 5:] = False
    for adapter in (None, "t"):
        if adapter:
            model.train_adapter(adapter)
        opt = optim.AdamW(model.parameters(), lr=1e-3)
        logits, _ = model.forward(ids, pad, head="cls", train=True, rng=rng)
        assert logits.dtype == np.float32
        opt.zero_grad()
        model.loss(ids, np.array([0, 1, 2]), pad, head="cls", train=True, rng=rng, backward=True)
        opt.step()
        grads = [p.grad for p in model.parameters(trainable_only=True) if p.grad is not None]
        assert len(grads) >= 10 and all(g.dtype == np.float32 for g in grads)
        assert all(a.dtype == np.float32 for s in opt.state.values() for a in s.values())
        assert all(p.value.dtype == np.float32 for p in model.parameters())
        bench.check_float32(model, opt)  # the benchmark's own check agrees


def test_check_float32_catches_a_promoted_array():
    model = Transformer(ModelConfig(vocab_size=10, max_len=4, d_model=8, n_heads=2, n_layers=1, d_ff=8))
    opt = optim.AdamW(model.parameters())
    model.named_parameters()["blocks.0.ffn.W_1"].grad = np.zeros((8, 8))  # float64
    with pytest.raises(AssertionError, match="blocks.0.ffn.W_1"):
        bench.check_float32(model, opt)


def test_the_full_step_trains_the_same_model_as_the_adapter_step():
    """The two steps differ only in what is frozen, so their ratio measures what freezing saves."""
    b = bench.QUICK
    full, _ = bench.full_model(b)
    adapted, _ = bench.adapter_model(b, b.bottleneck)
    assert list(full.named_parameters()) == list(adapted.named_parameters())
    assert all(p.trainable for p in full.parameters())
    trains = {n for n, p in adapted.named_parameters().items() if p.trainable}
    assert trains and all(n.startswith("adapters.task.") for n in trains)
    assert not any(p.name.startswith("adapters.") for p in bench.base_full_model(b)[0].parameters())


def test_bad_repeats_is_refused(capsys):
    assert cli(["bench", "--quick", "--repeats", "0"]) == 2
    assert capsys.readouterr().err == "minitransformer bench: error: argument --repeats: expected an integer from 1 to 1000, got 0\n"


def test_the_latency_overhead_that_holds_still_is_reported_with_its_spread(quick_run):
    _, r, page = quick_run
    cpu = r["adapter_latency_overhead_cpu"]
    q = bench.QUICK
    assert len(cpu["rounds"]) == q.cpu_rounds and cpu["repeats"] == q.cpu_rounds * (q.cpu_repeats // q.cpu_rounds)
    assert min(cpu["rounds"]) <= cpu["overhead"] <= max(cpu["rounds"])
    assert cpu["spread"] == pytest.approx(max(cpu["rounds"]) - min(cpu["rounds"]))
    assert cpu["q1"] <= cpu["q3"] and cpu["base_ms"] > 0 and cpu["adapters_ms"] > 0
    assert "adapter_latency_overhead_cpu" in page and f"(spread {cpu['spread']:.3f})" in page
    assert r["adapter_step_gap_to_flops"] == pytest.approx(r["adapter_over_full_step"] - r["adapter_over_full_flops"])


def test_the_page_has_the_comparison_with_pytorch_or_says_how_to_get_it(quick_run):
    from minitransformer.tools import torch_twin
    _, _, page = quick_run
    assert "## Against PyTorch" in page
    if torch_twin.available():
        assert "| full step |" in page.split("## Against PyTorch")[1] and "NumPy / PyTorch" in page
    else:
        assert "pip install .[compare]" in page


def test_the_floor_is_the_steps_products_at_their_own_rate():
    """floor_text's figures follow from the run's: 45 GFLOP at 180 GFLOP/s is 250 ms, beside
    steps of 330 ms (NumPy) and 320 ms (PyTorch)."""
    from minitransformer.tools import bench_report
    res = {"full_step_gflop": 45.0, "matmul_gflops": 180.0}
    torch_res = {"cases": {"full step": {"numpy_ms": 330.0, "torch_ms": 320.0}},
                 "operations": {"linear (C -> F)": {"ratio": 0.92}}}
    text = bench_report.floor_text(res, torch_res)
    for figure in ("(45.0 GFLOP)", "180 GFLOP/s", "take 250 ms", "0.76 of NumPy's", "0.78 of PyTorch's",
                   "(the linear row: 0.92)", "took 80 ms in NumPy and 70 ms in PyTorch", "leave 6 ms"):
        assert figure in text, figure
    assert bench_report.floor_text(res, {"cases": {}}) == ""
    slow_products = {"full_step_gflop": 45.0, "matmul_gflops": 150.0}  # 300 ms, past 0.8 x 320 = 256 ms
    assert "A step at 0.80 of PyTorch's (256 ms) would be shorter than its products alone." in (
        bench_report.floor_text(slow_products, torch_res))


def test_a_ratio_of_steps_is_the_median_of_the_pairs_timed_together():
    # a burst of load that slows one repetition slows both of its steps: the pair's ratio holds,
    # where a median of each step's times taken apart can pair one slow step with one fast one
    adapter = [0.72, 1.44, 0.73, 0.74, 2.16]
    full = [1.00, 2.00, 1.00, 1.00, 3.00]
    pairs = bench.paired_ratio(adapter, full)
    assert pairs["ratio"] == pytest.approx(0.72) and pairs["pairs"] == 5
    assert statistics.median(adapter) / statistics.median(full) == pytest.approx(0.74)
    assert pairs["q1"] == pytest.approx(0.72) and pairs["q3"] == pytest.approx(0.73)
    assert bench.paired_ratio([0.5], [1.0]) == {"ratio": 0.5, "q1": 0.5, "q3": 0.5, "pairs": 1}
    with pytest.raises(ValueError):
        bench.paired_ratio([1.0, 2.0], [1.0])


def test_step_pairs_alternates_which_step_goes_first_and_pairs_the_neighbours():
    ran, clock = [], iter(range(10_000))  # a fake clock: one tick per reading

    def step(name, cost):  # each call advances the fake clock by `cost` ticks
        def run():
            ran.append(name)
            for _ in range(cost - 1):
                next(clock)
        return run
    got = bench.step_pairs(step("top", 3), step("bottom", 4), pairs=4, clock=lambda: next(clock))
    assert ran == ["top", "bottom", "bottom", "top", "top", "bottom", "bottom", "top"]
    assert got["top_s"] == [3] * 4 and got["bottom_s"] == [4] * 4
    assert got["ratio"] == 0.75 and got["pairs"] == 4
