"""The figures pipeline end to end (`figures --quick`): the learning-rate grid chosen on validation,
the seeds, the reproducibility whatever the number of workers, the README and results page writers."""
import copy
import json

import numpy as np
import pytest

from minitransformer import AdapterConfig
from minitransformer.tools import data, experiments, plots, report, train
from minitransformer.tools.cli import UsageError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _quick(out, *more):
    assert experiments.main(["--quick", "--out", str(out), *more]) == 0
    return json.loads((out / "results.json").read_text())


def _without_timings(x):
    """The results with every 'seconds' and 'step_ms' entry dropped (wall-clock time differs
    between runs)."""
    if isinstance(x, dict):
        return {k: _without_timings(v) for k, v in x.items() if k not in ("seconds", "step_ms")}
    if isinstance(x, list):
        return [_without_timings(v) for v in x]
    return x


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("figures")
    return out, _quick(out)


def test_quick_run_writes_every_figure(quick):
    out, _ = quick
    for name in plots.NAMES:
        png = (out / f"{name}.png").read_bytes()
        assert png.startswith(PNG_MAGIC) and len(png) > 10_000, name


def test_results_have_the_expected_keys_and_sane_values(quick):
    _, res = quick
    assert set(res) >= {"settings", "base", "tasks", "runs", "ablation", "init_std", "curves", "storage",
                        "seconds"}
    s = res["settings"]
    n = s["n_layers"]
    expected = {f"adapter_m{m}" for m in s["adapter_sizes"]} | {f"top_{k}" for k in s["top_ks"]} \
        | set(s["points"]) | {f"lora_r{r}" for r in s["lora_ranks"]} \
        | {f"prefix_n{p}" for p in s["prefix_lengths"]} | {f"prompt_n{p}" for p in s["prompt_lengths"]} | {"bitfit"}
    assert set(res["runs"]) == set(s["tasks"])
    for task, runs in res["runs"].items():
        assert set(runs) == expected
        for key, rec in runs.items():
            assert 0 <= rec["test_acc"] <= 1 and 0 <= rec["val_acc"] <= 1
            # every seed at the rate the grid chose; the row's numbers are their mean and std
            assert rec["seeds"] == s["seeds"] and rec["lr"] == res["grid"][key]["chosen_lr"]
            for f in ("test", "val"):
                assert len(rec[f"{f}_accs"]) == len(s["seeds"])
                assert rec[f"{f}_acc"] == pytest.approx(np.mean(rec[f"{f}_accs"]))
                assert rec[f"{f}_std"] == pytest.approx(np.std(rec[f"{f}_accs"]))
            # no run stopped before its minimum number of steps (unless it diverged)
            budget, least = s["budget"][rec["method"]], s["min_steps"][rec["method"]]
            assert least == round(s["min_fraction"] * budget) and rec["steps"] == budget
            for stop, best in zip(rec["stop_steps"], rec["best_steps"]):
                assert least - 1 <= stop <= budget - 1 and best <= stop
            assert not rec["diverged"]
            assert 0 < rec["trained"] <= rec["total"]
            assert rec["pct"] == pytest.approx(100 * rec["trained"] / rec["total"])
            assert rec["step_ms"] > 0
            # a prefix stores the prefix its MLP computed, not the MLP; the others what they trained
            assert (rec["stored"] < rec["trained"]) if rec["method"] == "prefix" and s["prefix_mlp"] \
                else rec["stored"] == rec["trained"]
        assert res["step_ms"][f"lora_r{s['lora_ranks'][0]}"] == pytest.approx(
            np.mean([res["runs"][t][f"lora_r{s['lora_ranks'][0]}"]["step_ms"] for t in res["runs"]]))
        assert runs["full"]["pct"] == pytest.approx(100)  # full trains the whole classification path
        assert runs["head"]["trained"] < runs["layernorm"]["trained"] < runs["full"]["trained"]
        grid = res["ablation"][task]["grid"]
        assert len(grid) == n and all(len(row) == n for row in grid)
        for i in range(n):
            for j in range(n):
                assert (grid[i][j] is None) == (j < i)
                assert j < i or 0 <= grid[i][j] <= 1
    assert len(res["init_std"]) == len(s["init_stds"]) * len(s["init_tasks"]) * len(s["init_seeds"])
    main = f"adapter_m{s['main_size']}"
    for r in res["init_std"]:  # the sweep trains at the main adapter's chosen rate; 1e-3 is its default
        assert r["lr"] == res["grid"][main]["chosen_lr"]
        if r["std"] == 1e-3 and r["task"] in res["runs"]:
            assert r["test_acc"] == res["runs"][r["task"]][main]["test_accs"][s["seeds"].index(r["seed"])]
    assert all(0 <= r["test_acc"] <= 1 for r in res["init_std"])
    m = s["main_size"]
    for key in (f"adapter_m{m}", "full", f"prompt_n{s['family_main']['prompt']}"):
        h = res["curves"][key]
        assert len(h["loss"]) == len(h["steps"]) > 0 and len(h["val_acc"]) == len(h["eval_steps"]) > 0
    st = res["storage"]
    assert len(st["T"]) == s["storage_T"]
    assert st["adapters_params"][-1] < st["copies_params"][-1]
    assert set(st["methods"]) == {"adapter", "lora", "prefix", "prompt", "bitfit"}
    for method, values in st["methods"].items():
        assert len(values["params"]) == len(values["bytes"]) == s["storage_T"]
        assert values["bytes"][-1] < st["copies_bytes"][-1], method
    assert st["methods"]["adapter"]["params"] == st["adapters_params"]
    assert set(res["step_ms"]) == expected


def test_the_rate_is_chosen_on_validation_over_the_tasks(quick):
    _, res = quick
    s = res["settings"]
    assert set(res["grid"]) == set(res["runs"][s["tasks"][0]])
    for key, g in res["grid"].items():
        assert g["lrs"] == list(s["lr_grid"][g["method"]]) and len(g["lrs"]) >= 3
        assert max(g["lrs"]) / min(g["lrs"]) >= 9  # about 10x from end to end
        assert set(g["val_acc"]) == set(s["tasks"]) and all(len(v) == len(g["lrs"]) for v in g["val_acc"].values())
        mean = [np.mean([g["val_acc"][t][i] for t in s["tasks"]]) for i in range(len(g["lrs"]))]
        assert g["mean_val_acc"] == pytest.approx(mean)
        assert g["chosen_lr"] == g["lrs"][int(np.argmax(mean))]  # the best on validation, the first of ties
        for t in s["tasks"]:  # the grid's run at the chosen rate is the first seed's run
            i = g["lrs"].index(g["chosen_lr"])
            assert g["val_acc"][t][i] == res["runs"][t][key]["val_accs"][0]
            assert all(0 <= stop < s["budget"][g["method"]] for stop in g["stop_step"][t])
        assert "test_acc" not in json.dumps(g)  # the grid holds no test number: nothing chooses on test


def test_parameter_counts_match_the_models(quick):
    _, res = quick
    settings = experiments.quick_settings()
    base = experiments.load_base(settings)
    task = data.load_task(settings.tasks[0], seed=settings.seed)
    lm_head = sum(p.value.size for p in base.lm_head.parameters())
    stored = {experiments.storage_key(m, settings): m for m in res["storage"]["methods"]}
    for key, rec in res["runs"][task.name].items():
        model = copy.deepcopy(base)
        config = experiments.task_config(rec["method"], rec["size"], settings)
        train.prepare(model, rec["method"], task.n_classes, adapter_config=config, k=rec["k"])
        assert rec["trained"] == model.num_parameters(trainable_only=True), rec["label"]
        assert rec["total"] == model.num_parameters() - lm_head, rec["label"]
        if rec["method"] == "prefix":  # stored: L layers x (P_k, P_v) x n x C, and the head
            C, L = base.config.d_model, base.config.n_layers
            assert rec["stored"] == L * 2 * rec["size"] * C + C * task.n_classes + task.n_classes
        if key in stored:
            assert res["storage"]["methods"][stored[key]]["per_task"][task.name]["params"] == rec["stored"]
        if rec["method"] == "adapter":
            per_task = res["storage"]["per_task"][task.name]
            if rec["size"] == settings.main_size:
                assert per_task["adapter_params"] == rec["trained"]
    st = res["storage"]
    assert st["base_params"] == base.num_parameters() - lm_head
    assert st["adapters_params"][0] == st["base_params"] + st["per_task"][task.name]["adapter_params"]
    assert st["copies_params"][0] == res["runs"][task.name]["full"]["total"]


def test_quick_run_is_reproducible_whatever_the_number_of_workers(quick, tmp_path):
    _, first = quick  # one process
    second = _quick(tmp_path, "--workers", "2")  # the runs shared out between two processes
    assert second["seconds"]["workers"] == 2
    assert _without_timings(second) == _without_timings(first)


def test_ablation_restores_the_adapters():
    settings = experiments.quick_settings()
    base = experiments.load_base(settings)
    task = data.load_task(settings.tasks[0], seed=settings.seed)
    model = copy.deepcopy(base)
    train.prepare(model, "adapter", task.n_classes, adapter_config=AdapterConfig(8, init_std=1.0))
    blocks = list(model.adapters["task"].blocks)
    split = task.val[:64]
    before, _ = model.forward(split.ids, split.pad_mask, head="cls")
    grid = experiments.ablation(model, "task", split)
    restored = model.adapters["task"].blocks
    assert len(restored) == len(blocks) and all(a is b for a, b in zip(restored, blocks))
    after, _ = model.forward(split.ids, split.pad_mask, head="cls")
    np.testing.assert_array_equal(before, after)
    model.adapters["task"].blocks[:] = [{} for _ in blocks]  # every adapter removed by hand
    assert grid[0][-1] == train.accuracy(model, split)


README = ("# title\n\nintro\n\n## Results\n\n<!-- results:start (generated) -->\nold text\n"
          "<!-- results:end -->\n\n## After\nkeep me\n")


def test_readme_writer_replaces_only_the_marked_section(quick, tmp_path):
    out, res = quick
    path = tmp_path / "README.md"
    path.write_text(README)
    page = tmp_path / "docs" / "results.md"
    report.write_readme_section(res, path, out, page)
    text = path.read_text()
    head, rest = text.split("<!-- results:start (generated) -->\n")
    body, tail = rest.split("<!-- results:end -->")
    assert head == README.split("<!-- results:start")[0] and tail == "\n\n## After\nkeep me\n"
    assert "old text" not in body and "| method |" in body and "tradeoff.png)" in body
    assert "[docs/results.md](docs/results.md)" in body
    report.write_readme_section(res, path, out, page)  # idempotent: same numbers, same text
    assert path.read_text() == text


def test_readme_writer_refuses_a_file_without_markers(quick, tmp_path):
    out, res = quick
    path = tmp_path / "README.md"
    path.write_text("# no markers here\n")
    with pytest.raises(ValueError, match=r"README.md: expected the markers '<!-- results:start'"):
        report.write_readme_section(res, path, out)
    assert path.read_text() == "# no markers here\n"


def test_results_page_holds_every_row_the_grid_and_every_figure(quick, tmp_path):
    out, res = quick
    page = tmp_path / "results.md"
    assert experiments.main(["--from-json", str(out / "results.json"), "--out", str(tmp_path / "f"),
                             "--docs", str(page)]) == 0
    text = page.read_text()
    assert text.startswith(report.TITLE) and report.is_results_page(page)
    for key in res["runs"][res["settings"]["tasks"][0]]:
        assert f"| {plots.label(key)} |" in text  # in the table and in the grid
    for name in plots.NAMES:
        assert f"f/{name}.png)" in text
    other = tmp_path / "notes.md"
    other.write_text("my notes\n")
    with pytest.raises(UsageError, match="--docs: .*notes.md exists and is not a results page"):
        experiments.main(["--from-json", str(out / "results.json"), "--out", str(tmp_path / "f"),
                          "--docs", str(other)])
    assert other.read_text() == "my notes\n"


def _set(res, key, accs):
    """Give row `key` these test accuracies (one per seed) on every task."""
    for runs in res["runs"].values():
        runs[key]["test_accs"] = list(accs)
        runs[key]["test_acc"], runs[key]["test_std"] = float(np.mean(accs)), float(np.std(accs))


def test_findings_say_within_the_noise_only_where_the_spread_covers_the_gap(quick):
    _, res = quick
    res = copy.deepcopy(res)
    m = res["settings"]["main_size"]
    _set(res, "full", [0.90, 0.90, 0.90])
    _set(res, f"adapter_m{m}", [0.80, 0.90, 1.00])  # mean 0.90, std 8.2 points
    text = " ".join(report.findings(res))
    assert "90.0 ± 8.2 % average test accuracy" in text
    assert "adapters are level with full fine-tuning, within the noise (std up to 8.2)" in text
    _set(res, f"adapter_m{m}", [0.60, 0.61, 0.62])  # 29 points below, std 0.8
    text = " ".join(report.findings(res))
    assert "adapters are 29.0 points below full fine-tuning, more than the noise (std up to 0.8)" in text


def test_family_findings_choose_each_method_s_row_on_validation(quick):
    _, res = quick
    res = copy.deepcopy(res)
    s = res["settings"]
    lora, prompt = f"lora_r{s['lora_ranks'][0]}", f"prompt_n{s['prompt_lengths'][0]}"
    for key in res["runs"][s["tasks"][0]]:
        _set(res, key, [0.7, 0.7, 0.7])
    _set(res, "full", [0.9, 0.9, 0.9])
    _set(res, lora, [0.89, 0.90, 0.91])
    text = " ".join(report.findings(res))
    assert f"Within the noise of full fine-tuning: LoRA r={s['lora_ranks'][0]}." in text
    assert f"prompt n={s['prompt_lengths'][0]} (20.0 points)" in text
    assert f"Prompt tuning (prompt n={s['prompt_lengths'][0]}) had {s['prompt_steps']} steps against the " \
        f"others' {s['steps']}; it ends 20.0 points below full fine-tuning, more than the noise" in text
    # the adapter row with the better validation accuracy is the one reported, whatever its test
    a, b = (f"adapter_m{m}" for m in s["adapter_sizes"][:2])
    _set(res, a, [0.95, 0.95, 0.95])
    for runs in res["runs"].values():
        runs[a]["val_accs"], runs[b]["val_accs"] = [0.5] * 3, [0.6] * 3
    text = " ".join(report.findings(res))
    assert f"{plots.label(b)} 70.0 ± 0.0 %" in text.split("Each parameter-efficient")[1]
    assert f"{plots.label(a)} 95.0" not in text.split("Each parameter-efficient")[1].split("Within")[0]
    res["step_ms"] = {k: 10.0 for k in res["step_ms"]}
    res["step_ms"]["full"], res["step_ms"]["bitfit"] = 20.0, 5.0
    assert "takes 20.0 ms for full fine-tuning; BitFit 5.0 ms (0.25 x)" in " ".join(report.findings(res))


def test_rows_near_chance_are_named_with_the_rates_tried(quick):
    _, res = quick
    res = copy.deepcopy(res)
    s = res["settings"]
    for key in res["runs"][s["tasks"][0]]:
        _set(res, key, [0.9, 0.9, 0.9])
    assert "No row sits near chance" in " ".join(report.findings(res))
    prefix = f"prefix_n{s['prefix_lengths'][0]}"
    _set(res, prefix, [0.5, 0.5, 0.56])
    rates = ", ".join(f"{lr:g}" for lr in s["lr_grid"]["prefix"])
    assert (f"Near chance (below 60 %) at the chosen rate: {plots.label(prefix)} on {s['tasks'][0]} "
            f"(52.0 ± 2.8 %), after rates {rates} with {s['steps']} steps.") in " ".join(report.findings(res))


def test_an_old_results_json_without_the_grid_is_refused_in_one_line(quick, tmp_path):
    out, res = quick
    old = {k: v for k, v in res.items() if k != "grid"}
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))
    with pytest.raises(UsageError, match="--from-json: expected a results.json .*old.json lacks grid"):
        experiments.main(["--from-json", str(path), "--out", str(tmp_path / "f")])


def test_init_std_finding_follows_the_numbers(quick):
    _, res = quick
    res = copy.deepcopy(res)
    for r in res["init_std"]:
        r["test_acc"] = 0.9
    assert "every std tried is within the noise of the best" in " ".join(report.findings(res))
    largest = max(r["std"] for r in res["init_std"])
    for r in res["init_std"]:
        r["test_acc"] = 0.5 if r["std"] == largest else 0.9
    text = " ".join(report.findings(res))
    second = sorted({r["std"] for r in res["init_std"]})[-2]
    assert f"within the noise of the best up to std {second:g} and drops above" in text


def test_from_json_redraws_without_training(quick, tmp_path):
    out, _ = quick
    redraw = tmp_path / "redraw"
    readme = plots.README.read_text()
    assert experiments.main(["--from-json", str(out / "results.json"), "--out", str(redraw)]) == 0
    assert plots.README.read_text() == readme  # another --out leaves the repository's README alone
    for name in plots.NAMES:
        assert (redraw / f"{name}.png").read_bytes().startswith(PNG_MAGIC)
    # the folder holds one whole set: the PNGs beside the results they were drawn from
    assert (redraw / "results.json").read_bytes() == (out / "results.json").read_bytes()
    with pytest.raises(UsageError, match="--from-json: .*missing.json does not exist"):
        experiments.main(["--from-json", str(tmp_path / "missing.json"), "--out", str(redraw)])
