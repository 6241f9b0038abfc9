"""The PyTorch twin (tools/torch_twin.py): the same model from the same weights gives the same loss and
gradients under autograd, for every model the gradient checks build; the comparison is sharp enough
to see a wrong gradient; the commands that use it say in one line how to get PyTorch without it."""
import numpy as np
import pytest

from minitransformer import backend, gradcheck
from minitransformer.tools import gradcheck_command
from minitransformer.__main__ import main as cli
from minitransformer.tools import bench, torch_ops, torch_twin

VARIANTS = gradcheck_command.model_variants()


# ----------------------------------------------------------------------------- without PyTorch


def test_without_pytorch_each_command_says_how_to_get_it(monkeypatch, capsys):
    monkeypatch.setattr(torch_twin, "available", lambda: False)
    for command in (["bench", "--quick", "--against", "torch"], ["gradcheck", "--against", "torch"]):
        assert cli(command) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "pip install .[compare]" in err, err


def test_against_refuses_what_it_does_not_combine_with(capsys):
    assert cli(["bench", "--quick", "--against", "torch", "--profile"]) == 2
    assert "--against" in capsys.readouterr().err


# ----------------------------------------------------------------------------- with PyTorch


@pytest.mark.parametrize("label,norm,head,placement", VARIANTS, ids=[v[0] for v in VARIANTS])
@pytest.mark.parametrize("path", backend.PATHS)
def test_every_gradient_of_every_gradcheck_model_matches_autograd(label, norm, head, placement, path):
    pytest.importorskip("torch")
    model, ids, targets, pad_mask = gradcheck_command._generic_model(norm, head, placement)
    with backend.using(path):
        errors, dloss = torch_twin.compare_gradients(model, ids, targets, pad_mask, head, dropout_seed=7)
    trainable = {n for n, p in model.named_parameters().items() if p.trainable}
    assert set(errors) == trainable  # every trainable parameter compared, no frozen one
    assert dloss < 1e-12
    worst = max(errors.items(), key=lambda kv: kv[1])
    assert worst[1] < torch_twin.THRESHOLD, worst


def test_the_comparison_sees_a_wrong_gradient():
    """A gradient off by a little is flagged: the twin is not an echo of the model."""
    pytest.importorskip("torch")
    model, ids, targets, pad_mask = gradcheck_command._generic_model("post", "cls", "houlsby")
    twin = torch_twin.TorchTwin(model)
    _, loss = twin.loss(ids, targets, pad_mask, "cls", train=True, rng=np.random.default_rng(7))
    loss.backward()
    model.zero_grad()
    model.loss(ids, targets, pad_mask, "cls", train=True, rng=np.random.default_rng(7), backward=True)
    name = "adapters.task.blocks.1.ffn.W_down"
    assert torch_twin.rel_error(model.named_parameters()[name].grad, twin.grads()[name]) < 1e-12
    wrong = model.named_parameters()[name].grad.copy()
    wrong[0, 0] *= 1.001
    assert torch_twin.rel_error(wrong, twin.grads()[name]) > 1e-6
    # other dropout masks: another function, and the losses differ
    errors, dloss = torch_twin.compare_gradients(model, ids, targets, pad_mask, "cls", dropout_seed=7)
    other = torch_twin.TorchTwin(model).loss(ids, targets, pad_mask, "cls", train=True,
                                             rng=np.random.default_rng(8))[1]
    assert abs(float(other.detach()) - float(loss.detach())) > 1e-6 and dloss < 1e-12


def test_parameter_names_map_one_to_one():
    torch = pytest.importorskip("torch")
    model = bench.with_adapters(bench.QUICK, 4)
    model.train_adapter("task")
    twin = torch_twin.TorchTwin(model)
    params = model.named_parameters()
    assert list(twin.p) == list(params)
    for name, t in twin.p.items():
        assert t.requires_grad == params[name].trainable
        assert t.dtype == torch.float32 and np.array_equal(t.detach().numpy(), params[name].value)


def test_gradcheck_prints_autograd_beside_finite_differences(monkeypatch, capsys):
    pytest.importorskip("torch")
    monkeypatch.setattr(gradcheck_command, "operation_checks", lambda: iter(()))
    monkeypatch.setattr(gradcheck_command, "model_variants", lambda: [v for v in VARIANTS if "prefix MLP" in v[0]][:1])
    assert cli(["gradcheck", "--against", "torch"]) == 0
    out = capsys.readouterr().out
    assert "autograd" in out and "finite diff." in out
    row = next(line for line in out.splitlines() if line.strip().startswith("prefix "))
    autograd, fd = (float(x) for x in row.split()[1:3])
    assert autograd < torch_twin.THRESHOLD and fd < gradcheck.MODEL_THRESHOLD


def test_gradcheck_fails_when_autograd_disagrees(monkeypatch, capsys):
    pytest.importorskip("torch")
    monkeypatch.setattr(gradcheck_command, "operation_checks", lambda: iter(()))
    monkeypatch.setattr(gradcheck_command, "model_variants", lambda: VARIANTS[:1])
    monkeypatch.setattr(torch_twin, "THRESHOLD", 0.0)  # roundings differ somewhere: the worst group fails
    assert cli(["gradcheck", "--against", "torch"]) == 1
    assert "PyTorch autograd" in capsys.readouterr().out.splitlines()[-2]


def test_bench_against_torch_checks_then_times_every_case(capsys):
    pytest.importorskip("torch")
    res = torch_twin.against_torch(bench.QUICK, repeats=3, log=lambda *a: None)
    assert res["check_passed"]
    assert set(res["cases"]) == set(torch_twin.CASES) == set(res["checks"])
    for c in res["cases"].values():
        assert c["numpy_ms"] > 0 and c["torch_ms"] > 0
        assert c["ratio_min"] <= c["ratio_q1"] <= c["ratio"] <= c["ratio_q3"] <= c["ratio_max"]
    assert set(res["operations"]) == {"linear (C -> F)", "layernorm", "gelu (B, T, F)", "softmax (B, H, T, T)",
                                      "attention", "adapter"}
    text = torch_twin.table(res)
    assert all(f"| {case} |" in text for case in torch_twin.CASES + tuple(res["operations"]))
    assert cli(["bench", "--quick", "--against", "torch", "--repeats", "2"]) == 0
    assert "NumPy / PyTorch" in capsys.readouterr().out


def test_side_by_side_runs_each_library_in_blocks_of_its_own(monkeypatch):
    monkeypatch.setattr(torch_ops, "SETTLE", 0)  # one untimed run a block
    calls = []
    res = torch_ops.side_by_side(lambda: calls.append("n"), lambda: calls.append("t"), repeats=10)
    blocks = res["blocks"]
    assert blocks == 3  # 10 timed runs each, in blocks of 4
    runs = "".join(calls)
    block = 1 + torch_ops.BLOCK  # one untimed run, then the timed ones
    assert len(runs) == 2 * blocks * block
    expected = "".join(("n" * block + "t" * block) if p % 2 == 0 else ("t" * block + "n" * block)
                       for p in range(blocks))
    assert runs == expected  # NumPy first, then PyTorch first, ...
    assert res["ratio_min"] <= res["ratio_q1"] <= res["ratio"] <= res["ratio_q3"] <= res["ratio_max"]


def test_side_by_side_times_a_block_only_after_it_settled(monkeypatch):
    """Untimed runs fill the first SETTLE seconds of every block, so that the other library's
    spinning threads are quiet before the first timed run. On a clock that each run moves by 1 ms,
    SETTLE = 10.5 ms makes 11 untimed runs a block."""
    from types import SimpleNamespace
    clock = [0.0]
    monkeypatch.setattr(torch_ops, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(torch_ops, "SETTLE", 0.0105)
    calls = []

    def call(lib):
        def run():
            clock[0] += 0.001
            calls.append(lib)
        return run
    res = torch_ops.side_by_side(call("n"), call("t"), repeats=4)
    block = 11 + torch_ops.BLOCK
    expected = "".join(("n" * block + "t" * block) if p % 2 == 0 else ("t" * block + "n" * block)
                       for p in range(res["blocks"]))
    assert "".join(calls) == expected
    assert res["numpy_ms"] == pytest.approx(1.0) and res["ratio"] == pytest.approx(1.0)


def test_each_operation_compared_computes_the_same_gradients_in_both_libraries():
    """The per-operation table times the same work on both sides: every gradient agrees (float32)."""
    pytest.importorskip("torch")
    b = bench.QUICK
    a = bench.operation_arrays(b)
    ours, theirs = torch_ops.numpy_calls(b, a), torch_ops.torch_calls(b, a)
    order = {"linear (C -> F)": ["W", "b"], "layernorm": ["gamma", "beta"], "gelu (B, T, F)": [],
             "softmax (B, H, T, T)": [], "attention": [f"{k}_{n}" for n in "qkvo" for k in "Wb"],
             "adapter": ["W_down", "b_down", "W_up", "b_up"]}
    assert set(order) == set(ours) == set(theirs)
    with backend.using("fast"):
        for name, names in order.items():
            dx, grads = ours[name]()
            got = [dx] + [grads[n] for n in names]
            want = [g.numpy() for g in theirs[name]()]
            want = want[:1] + [g.T if n.startswith("W") else g for n, g in zip(names, want[1:])]  # PyTorch: (out, in)
            assert len(got) == len(want), name
            for mine, other in zip(got, want):
                assert mine.shape == other.shape, name
                assert np.max(np.abs(mine - other)) <= 1e-4 * max(1.0, np.max(np.abs(other))), name


def test_the_table_judges_each_target_case_against_one():
    """The verdict line names every target case with its ratio, on the right side of 1.00."""
    case = {"numpy_ms": 1.0, "torch_ms": 1.0, "ratio_q1": 0.9, "ratio_q3": 1.1, "blocks": 4}
    res = {"cases": {"full step": dict(case, ratio=0.98), "adapter step": dict(case, ratio=1.004),  # prints 1.00
                     "adapter step, LayerNorms frozen": dict(case, ratio=1.30),
                     "forward with adapters": dict(case, ratio=1.02)},
           "load_average_before_after": (0.5, 0.6), "torch_threads": 2, "torch": "x",
           "checks": {"full step": {"loss": 1e-15}}}
    text = torch_twin.table(res)
    assert ("NOT met in this run (at most 1.00: full step 0.98, adapter step 1.00; above: forward with adapters 1.02)"
            in text)
    res["cases"]["forward with adapters"]["ratio"] = 0.97
    text = torch_twin.table(res)
    assert "met in this run (at most 1.00: full step 0.98, adapter step 1.00, forward with adapters 0.97; above: none)" \
        in text and "NOT met" not in text


def test_a_shorter_case_gets_more_runs_so_that_each_is_timed_about_as_long(monkeypatch):
    """_time_alike on calls that take 300, 100 and 30 units of a fake clock: 1, 3 and the cap 4."""
    import time
    clock = [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])

    def takes(units):
        def call():
            clock[0] += units
        return call
    assert torch_twin._time_alike({"step": takes(300), "forward": takes(100), "tiny": takes(30)}) == \
        {"step": 1, "forward": 3, "tiny": 4}
