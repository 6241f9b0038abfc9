"""The figures pipeline end to end (`figures --quick`), its reproducibility, and the README writer."""
import copy
import json

import numpy as np
import pytest

from minitransformer import AdapterConfig
from minitransformer.tools import data, experiments, plots, train
from minitransformer.tools.cli import UsageError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _quick(out):
    assert experiments.main(["--quick", "--out", str(out)]) == 0
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
    expected = {f"adapter_m{m}" for m in s["adapter_sizes"]} | {f"top_{k}" for k in range(1, n + 1)} \
        | {"layernorm", "head", "full"} | {f"lora_r{r}" for r in s["lora_ranks"]} \
        | {f"prefix_n{p}" for p in s["prefix_lengths"]} | {f"prompt_n{p}" for p in s["prompt_lengths"]} | {"bitfit"}
    assert set(res["runs"]) == set(s["tasks"])
    for task, runs in res["runs"].items():
        assert set(runs) == expected
        for rec in runs.values():
            assert 0 <= rec["test_acc"] <= 1 and 0 <= rec["val_acc"] <= 1
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
    assert all(0 <= r["test_acc"] <= 1 for r in res["init_std"])
    m = s["main_size"]
    for key in (f"adapter_m{m}", "full"):
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


def test_quick_run_is_reproducible(quick, tmp_path):
    _, first = quick
    second = _quick(tmp_path)
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
    plots.write_readme_section(res, path, out)
    text = path.read_text()
    head, rest = text.split("<!-- results:start (generated) -->\n")
    body, tail = rest.split("<!-- results:end -->")
    assert head == README.split("<!-- results:start")[0] and tail == "\n\n## After\nkeep me\n"
    assert "old text" not in body and "| method |" in body
    for name in plots.NAMES:
        assert f"{name}.png)" in body
    plots.write_readme_section(res, path, out)  # idempotent: same numbers, same text
    assert path.read_text() == text


def test_readme_writer_refuses_a_file_without_markers(quick, tmp_path):
    out, res = quick
    path = tmp_path / "README.md"
    path.write_text("# no markers here\n")
    with pytest.raises(ValueError, match=r"README.md: expected the markers '<!-- results:start'"):
        plots.write_readme_section(res, path, out)
    assert path.read_text() == "# no markers here\n"


def test_findings_follow_the_numbers(quick):
    _, res = quick
    res = copy.deepcopy(res)
    m = res["settings"]["main_size"]
    runs = res["runs"][res["settings"]["tasks"][0]]
    runs["full"]["test_acc"], runs[f"adapter_m{m}"]["test_acc"], runs["head"]["test_acc"] = 0.9, 0.6, 0.58
    text = " ".join(plots.findings(res))
    assert "clearly below full fine-tuning (30.0 points lower)" in text and "only 2.0 points below" in text
    runs[f"adapter_m{m}"]["test_acc"], runs["head"]["test_acc"] = 0.89, 0.5
    text = " ".join(plots.findings(res))
    assert "within a few points of full fine-tuning (1.0 points lower)" in text
    assert "clearly worse: 50.0 % (39.0 points below" in text


def test_family_findings_follow_the_numbers(quick):
    _, res = quick
    res = copy.deepcopy(res)
    s = res["settings"]
    runs = res["runs"][s["tasks"][0]]
    lora, prompt = f"lora_r{s['lora_ranks'][0]}", f"prompt_n{s['prompt_lengths'][0]}"
    runs["full"]["test_acc"], runs[lora]["test_acc"], runs[prompt]["test_acc"] = 0.9, 0.89, 0.7
    for key in runs:
        if plots.method_of_key(key) in ("adapter", "prefix", "bitfit"):
            runs[key]["test_acc"] = 0.8
    text = " ".join(plots.findings(res))
    assert f"by average test accuracy: LoRA r={s['lora_ranks'][0]} 89.0 %" in text
    assert f"Within 3 points of full fine-tuning: LoRA r={s['lora_ranks'][0]}." in text
    assert f"prompt n={s['prompt_lengths'][0]} (20.0 points)" in text
    assert f"Prompt tuning (prompt n={s['prompt_lengths'][0]}, " in text
    assert "trained) ends 20.0 points below full fine-tuning" in text
    assert "as Lester et al. found for small models" in text
    runs[prompt]["test_acc"] = 0.895
    assert "closer than Lester et al. found" in " ".join(plots.findings(res))
    res["step_ms"] = {k: 10.0 for k in res["step_ms"]}
    res["step_ms"]["full"], res["step_ms"]["bitfit"] = 20.0, 5.0
    assert "takes 20.0 ms for full fine-tuning; BitFit 5.0 ms (0.25 x)" in " ".join(plots.findings(res))
    mib = res["storage"]["methods"]["prompt"]["bytes"][-1] / 2 ** 20
    assert f"prompt {mib:.2f} MiB" in " ".join(plots.findings(res))


def test_results_from_before_the_other_methods_still_draw_and_write(quick, tmp_path):
    """A results.json with adapter runs only (as committed before LoRA and the rest) redraws."""
    _, res = quick
    res = copy.deepcopy(res)
    for runs in res["runs"].values():
        for key in [k for k in runs if plots.method_of_key(k) in ("lora", "prefix", "prompt", "bitfit")]:
            del runs[key]
    for key in ("step_ms",):
        del res[key]
    del res["storage"]["methods"]
    plots.draw_all(res, tmp_path)
    assert all((tmp_path / f"{n}.png").read_bytes().startswith(PNG_MAGIC) for n in plots.NAMES)
    assert "LoRA" not in " ".join(plots.findings(res))


def test_init_std_finding_follows_the_numbers(quick):
    _, res = quick
    res = copy.deepcopy(res)
    for r in res["init_std"]:
        r["test_acc"] = 0.9
    assert "every std tried stays within 1 point" in " ".join(plots.findings(res))
    largest = max(r["std"] for r in res["init_std"])
    for r in res["init_std"]:
        r["test_acc"] = 0.5 if r["std"] == largest else 0.9
    text = " ".join(plots.findings(res))
    second = sorted({r["std"] for r in res["init_std"]})[-2]
    assert f"within 1 point of the best up to std {second:g} and drops above" in text


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
