"""What `python -m minitransformer figures` says, computed from the results dict (results.json):
the table of means and standard deviations over seeds, the learning-rate grid, the sentences, the
README's short results section and the full results page (docs/results.md).

A difference between two rows is called "within the noise" when it is no larger than the larger of
their two standard deviations over seeds: one more draw of either could close it. Nothing here
trains or measures; every number comes from the results.
"""
import os
from pathlib import Path

import numpy as np

from . import data, files
from .plots import FAMILY, LABEL_OF_METHOD, README, label, method_of_key

DOCS = files.ROOT / "docs" / "results.md"
TITLE = "# Results of the experiments"
CHANCE = 0.6  # below this mean test accuracy on a task, a row is reported as near chance


def is_results_page(path):
    """Is the file at `path` a results page this module wrote?"""
    try:
        return Path(path).read_text().startswith(TITLE)
    except (OSError, UnicodeDecodeError):
        return False


# ----------------------------------------------------------------------------- the numbers


class Row:
    """One row of the table: a method at one size, its chosen rate, test accuracy over seeds."""

    def __init__(self, key, results):
        runs = results["runs"]
        self.tasks = list(runs)
        recs = [runs[t][key] for t in self.tasks]
        self.key, self.method, self.label = key, method_of_key(key), label(key)
        self.lr = recs[0].get("lr")
        self.test = {t: r["test_acc"] for t, r in zip(self.tasks, recs)}
        self.std = {t: r.get("test_std", 0.0) for t, r in zip(self.tasks, recs)}
        seeds = [r.get("test_accs", [r["test_acc"]]) for r in recs]
        self.per_seed = np.mean(np.array(seeds), axis=0)  # each seed's average over the tasks
        self.mean, self.spread = float(self.per_seed.mean()), float(self.per_seed.std())
        vals = [r.get("val_accs", [r["val_acc"]]) for r in recs]
        self.val = float(np.mean(vals))  # validation: what chooses between rows
        self.trained = float(np.mean([r["trained"] for r in recs]))
        self.pct = float(np.mean([r["pct"] for r in recs]))
        self.n_seeds = len(seeds[0])
        self.chance = [t for t in self.tasks if self.test[t] < CHANCE]


def rows(results):
    """Every row of the table, in the order of the runs."""
    first = next(iter(results["runs"].values()))
    return {key: Row(key, results) for key in first}


def pct(x, std=None):
    """A fraction as a percentage, with its standard deviation: '97.3 ± 0.4'."""
    return f"{100 * x:.1f}" + ("" if std is None else f" ± {100 * std:.1f}")


def compare(a, b):
    """'a is d points above/below b, within the noise / more than the noise' for two rows' averages."""
    d = 100 * (a.mean - b.mean)
    noise = 100 * max(a.spread, b.spread)
    side = "above" if d > 0 else "below"
    size = f"{abs(d):.1f} points {side}" if abs(d) >= 0.05 else "level with"
    if abs(d) <= noise:
        return f"{size} {b.label}, within the noise (std up to {noise:.1f})"
    return f"{size} {b.label}, more than the noise (std up to {noise:.1f})"


def best_by_validation(table, method):
    """The row of `method` with the best validation accuracy (never test)."""
    return max((r for r in table.values() if r.method == method), key=lambda r: r.val)


# ----------------------------------------------------------------------------- the sentences


def findings(results):
    """Sentences computed from the numbers: what they show, whatever that is."""
    table = rows(results)
    s = results["settings"]
    m = s["main_size"]
    ad, full, head = table[f"adapter_m{m}"], table["full"], table["head"]
    out = [f"Adapters with m={m} reach {pct(ad.mean, ad.spread)} % average test accuracy, training "
           f"{ad.pct:.2f} % of the parameters per task; full fine-tuning {pct(full.mean, full.spread)} % "
           f"with all of them: adapters are {compare(ad, full)}."]
    sizes = [r for r in table.values() if r.method == "adapter"]
    if len(sizes) > 1:
        best, worst = max(sizes, key=lambda r: r.mean), min(sizes, key=lambda r: r.mean)
        out.append("Adapter sizes: " + ", ".join(f"{r.label} {pct(r.mean, r.spread)} %" for r in sizes)
                   + f"; the best ({best.label}) is {compare(best, worst)}.")
    out.append(f"The head alone on the frozen base reaches {pct(head.mean, head.spread)} %: "
               f"{compare(head, ad)}.")
    out += _family_findings(results, table) + _chance_findings(results, table)
    out += _ablation_findings(results) + _init_findings(results)
    st = results["storage"]
    T, ours, copies = st["T"][-1], st["adapters_params"][-1], st["copies_params"][-1]
    out.append(f"Serving {T} tasks takes {ours / 1e6:.2f} M parameters as one base plus {T} adapter sets, "
               f"against {copies / 1e6:.2f} M as {T} fine-tuned copies ({copies / ours:.1f} times more).")
    return out + _cost_findings(results, table)


def _family_findings(results, table):
    """Each method's row chosen by validation, against full fine-tuning."""
    full = table["full"]
    best = {m: best_by_validation(table, m) for m in FAMILY if any(r.method == m for r in table.values())}
    ranked = sorted(best.values(), key=lambda r: -r.mean)
    out = ["Each parameter-efficient method's row with the best validation accuracy, by its average test "
           "accuracy: " + "; ".join(f"{r.label} {pct(r.mean, r.spread)} % ({r.pct:.2f} % trained)"
                                    for r in ranked) + f"; full fine-tuning {pct(full.mean, full.spread)} %."]
    level = [r.label for r in ranked if abs(r.mean - full.mean) <= max(r.spread, full.spread)]
    below = [f"{r.label} ({100 * (full.mean - r.mean):.1f} points)" for r in ranked
             if full.mean - r.mean > max(r.spread, full.spread)]
    above = [r.label for r in ranked if r.mean - full.mean > max(r.spread, full.spread)]
    out.append("Within the noise of full fine-tuning: " + (", ".join(level) if level else "none") + "."
               + (" Below it by more than the noise: " + ", ".join(below) + "." if below else "")
               + (" Above it by more than the noise: " + ", ".join(above) + "." if above else ""))
    if "prompt" in best:
        r = best["prompt"]
        rising = _still_rising(results, r.key)
        s = results["settings"]
        budget = (f"the same {s['steps']} steps as the others" if s["prompt_steps"] == s["steps"] else
                  f"{s['prompt_steps']} steps against the others' {s['steps']}")
        out.append(f"Prompt tuning ({r.label}) had {budget}; it ends {compare(r, full)}"
                   + (f"; {rising}" if rising else "") + ".")
    return out


def _still_rising(results, key):
    """Whether the validation curves of row `key` still rise over the last third of the budget."""
    budget = results["settings"]["prompt_steps"]
    early, late = [], []
    for runs in results["runs"].values():
        rec = runs[key]
        for curve in rec.get("val_curves", []):
            steps = rec["history"]["eval_steps"]
            i = min(range(len(curve)), key=lambda j: abs(steps[j] + 1 - 2 * budget / 3)) if curve else None
            if i is not None and len(curve) > i + 1:
                early.append(curve[i])
                late.append(max(curve[i + 1:]))
    if not early:
        return ""
    a, b = 100 * np.mean(early), 100 * np.mean(late)
    if b > a + 0.5:
        return (f"its validation accuracy was still rising, from {a:.1f} % at two thirds of the budget to "
                f"{b:.1f} % after (mean over tasks and seeds)")
    return f"its validation accuracy had levelled off ({a:.1f} % at two thirds of the budget, {b:.1f} % after)"


# why a row can stay near chance whatever its rate, where the package knows (tools/data.py)
REASONS = {"head": "masked-token pretraining never trains the [CLS] state that a linear probe reads, so "
                   "the frozen base gives the head little about the masked word; the tasks are built so"}


def _chance_findings(results, table):
    """Rows whose chosen configuration stays near chance on some task, what was tried, and why
    where it is known."""
    s = results["settings"]
    near = [r for r in table.values() if r.chance]
    seeds = [f"{r.label} on {t} (seed {seed}: {100 * acc:.1f} %)" for r in table.values() if not r.chance
             for t in r.tasks
             for seed, acc in zip(results["runs"][t][r.key].get("seeds", []),
                                  results["runs"][t][r.key].get("test_accs", [])) if acc < CHANCE]
    single = ([f"Single runs near chance at a chosen rate, in rows whose mean is above {100 * CHANCE:.0f} % "
               "(the spread of those rows): " + "; ".join(seeds) + "."] if seeds else [])
    if not near:
        return [f"No row sits near chance (below {100 * CHANCE:.0f} % mean test accuracy) on any task "
                "at its chosen rate."] + single
    return single + [f"Near chance (below {100 * CHANCE:.0f} %) at the chosen rate: " + "; ".join(
        f"{r.label} on {', '.join(f'{t} ({pct(r.test[t], r.std[t])} %)' for t in r.chance)}, after rates "
        f"{', '.join(f'{lr:g}' for lr in s['lr_grid'][r.method])} with {s['budget'][r.method]} steps"
        + (f" ({REASONS[r.method]})" if r.method in REASONS else "")
        for r in near) + "."]


def _cost_findings(results, table):
    out = []
    step = results.get("step_ms", {})
    best = [best_by_validation(table, m) for m in FAMILY if any(r.method == m for r in table.values())]
    if "full" in step and all(r.key in step for r in best):
        parts = "; ".join(f"{r.label} {step[r.key]:.1f} ms ({step[r.key] / step['full']:.2f} x)"
                          for r in sorted(best, key=lambda r: step[r.key]))
        out.append(f"A training step (forward, backward, AdamW; batch {results['settings']['batch_size']}, "
                   f"one thread, median; timings vary with the machine's load) takes {step['full']:.1f} ms "
                   f"for full fine-tuning; {parts}.")
    methods = results["storage"].get("methods", {})
    if len(methods) > 1:
        T = results["storage"]["T"][-1]
        per = sorted(methods.items(), key=lambda kv: kv[1]["bytes"][-1])
        out.append(f"Files to serve {T} tasks (one base plus {T} task files): " + "; ".join(
            f"{LABEL_OF_METHOD[m]} {v['bytes'][-1] / 2 ** 20:.2f} MiB" for m, v in per)
            + f"; {T} fine-tuned copies {results['storage']['copies_bytes'][-1] / 2 ** 20:.2f} MiB.")
    return out


def _ablation_findings(results):
    trained, removed_all, worst, lowest, top = [], [], [], [], []
    for name, ab in results["ablation"].items():
        g, n = ab["grid"], len(ab["grid"])
        seeds = results["runs"][name][f"adapter_m{ab['size']}"].get("val_accs")
        trained.append(seeds[0] if seeds else results["runs"][name][f"adapter_m{ab['size']}"]["val_acc"])
        removed_all.append(g[0][n - 1])
        worst.append(min(g[i][i] for i in range(n)))
        lowest.append(g[0][0])
        top.append(g[n - 1][n - 1])
    if not trained:
        return []
    acc = 100 * np.mean(trained)
    cost_low, cost_top = acc - 100 * np.mean(lowest), acc - 100 * np.mean(top)
    where = ("the lowest layer's adapters matter more than the top layer's here, the opposite of the "
             "paper, where removing the lower layers' adapters cost little" if cost_low > cost_top + 1 else
             "the top layer's adapters matter more than the lowest layer's, as in the paper"
             if cost_top > cost_low + 1 else "the lowest and the top layer's adapters matter about equally")
    return [f"Removing the trained adapters of every layer at inference time (one seed; the task's head "
            f"and LayerNorms stay) takes the validation accuracy from {acc:.1f} % to "
            f"{100 * np.mean(removed_all):.1f} % (mean over tasks); removing one layer's adapters costs "
            f"at most {acc - 100 * np.mean(worst):.1f} points on average. Removing only the lowest "
            f"layer's costs {cost_low:.1f} points, only the top layer's {cost_top:.1f}: {where}."]


def _init_findings(results):
    sweep = results["init_std"]
    stds = sorted({r["std"] for r in sweep})
    if len(stds) < 2:
        return []
    accs = {s: [r["test_acc"] for r in sweep if r["std"] == s] for s in stds}
    mean = {s: 100 * np.mean(a) for s, a in accs.items()}
    spread = {s: 100 * np.std(a) for s, a in accs.items()}
    best = max(stds, key=lambda s: mean[s])
    # a std is "as good" when its mean is within the larger of the two spreads (or 1 point) of the best
    ok = {s: mean[best] - mean[s] <= max(spread[s], spread[best], 1.0) for s in stds}
    fine = [s for s in stds if all(ok[t] for t in stds if t <= s)]  # a prefix
    per_std = ", ".join(f"{s:g}: {mean[s]:.1f} ± {spread[s]:.1f} %" for s in stds)
    if fine and fine[-1] == stds[-1]:
        verdict = "every std tried is within the noise of the best, unlike the paper (worse above ~1e-2)"
    elif fine:
        verdict = (f"accuracy stays within the noise of the best up to std {fine[-1]:g} and drops above "
                   f"(the paper: fine below ~1e-2, worse above)")
    else:
        verdict = "even the smallest std tried is below the best by more than the noise"
    n = len({r["seed"] for r in sweep})
    return [f"Init-std sweep (m={results['settings']['main_size']}, {', '.join(results['settings']['init_tasks'])}, "
            f"{n} seeds per std, test accuracy mean ± std): {per_std}; {verdict}."]


# ----------------------------------------------------------------------------- the text


def _budget(s):
    """'300 steps of batch 32 (600 for prompt tuning)', the prompt's part only if it differs."""
    return (f"{s['steps']} steps of batch {s['batch_size']}"
            + (f" ({s['prompt_steps']} for prompt tuning)" if s["prompt_steps"] != s["steps"] else ""))


def _how(results, rel, cmd=None):
    """How the numbers were made: the command (`--out cmd`), the procedure, the budget, the time."""
    s = results["settings"]
    cmd = rel if cmd is None else cmd
    minutes, secs = divmod(round(results["seconds"]["total"]), 60)
    workers = results["seconds"].get("workers", 1)
    least = s["min_steps"]["adapter"]
    least = f"{least} steps" + (f" ({s['min_steps']['prompt']} for prompt tuning)"
                                if s["min_steps"]["prompt"] != least else "")
    return (f"Generated by `python -m minitransformer figures --out {cmd} --overwrite` from `{cmd}/results.json` "
            f"(base: {results['base']['source']}, {results['base']['n_parameters']:,} parameters; tasks "
            f"{', '.join(s['tasks'])}). Every row trained at each rate of its method's grid with seed "
            f"{s['seeds'][0]}; the rate with the best validation accuracy averaged over the tasks was kept, "
            f"and the row trained again with seeds {', '.join(map(str, s['seeds'][1:]))} at that rate. Runs take "
            f"{_budget(s)}, with early stopping on validation accuracy (patience {s['patience']} evaluations, "
            f"every {s['eval_every']} steps) that never ends a run before {least}; the best weights are kept. "
            f"Test accuracy is the mean ± standard deviation over the {len(s['seeds'])} seeds. The "
            f"{results['seconds'].get('runs', '')} runs took {minutes} min {secs} s on this shared 2-core machine "
            f"({workers} worker process{'es' if workers > 1 else ''} of one thread each, "
            f"{results.get('path', 'fast')} kernels). Re-running the command reproduces every number but the "
            f"timings; adding `--from-json {cmd}/results.json` redraws the figures and text without training.")


def _from_root(out_dir):
    """The --out folder as the command line in the repository would name it."""
    out_dir = Path(out_dir).resolve()
    root = files.ROOT.resolve()
    return os.path.relpath(out_dir, root) if root in out_dir.parents else out_dir.name


def _left_out(results):
    """What the settings leave out of data.py's tasks and of the paper's comparisons, said once."""
    s = results["settings"]
    parts = []
    tasks = [t for t in data.TASKS if t not in s["tasks"]]
    if tasks:
        parts.append(f"the task{'s' if len(tasks) > 1 else ''} {', '.join(tasks)}")
    if not s.get("top_ks"):
        parts.append("fine-tuning only the top k blocks")
    if "layernorm" not in s.get("points", ("layernorm",)):
        parts.append("training only the LayerNorms and the head")
    if len(s["adapter_sizes"]) < 2:
        parts.append(f"adapter sizes other than m = {s['adapter_sizes'][0]}")
    if not parts:
        return ""
    return ("Left out to fit the run's time on a shared 2-core machine: " + ", ".join(parts)
            + ". `Settings` in `tools/experiments.py` puts them back.")


def _table(results, keys, short=False):
    """Markdown table rows: test accuracy mean ± std per task and averaged, the chosen rate, the
    share trained (short); and the trained count and step time (full)."""
    table = rows(results)
    tasks = next(iter(table.values())).tasks
    step = results.get("step_ms", {})
    more = "" if short else " trained params | ms/step |"
    lines = ["| method | " + " | ".join(tasks) + " | average | lr | % trained |" + more,
             "| --- | " + " | ".join("---:" for _ in tasks) + " | ---: | ---: | ---: |" + ("" if short else " ---: | ---: |")]
    for key in keys:
        r = table[key]
        line = (f"| {r.label} | " + " | ".join(pct(r.test[t], r.std[t]) for t in tasks)
                + f" | {pct(r.mean, r.spread)} | {r.lr:g} | {r.pct:.2f} |")
        if not short:
            line += f" {r.trained:,.0f} | " + (f"{step[key]:.1f} |" if key in step else "- |")
        lines.append(line)
    return lines


def headline_keys(results):
    """The README's rows: full fine-tuning, each method that adds a task to the base (its row
    with the best validation accuracy), the head alone."""
    table = rows(results)
    methods = [m for m in FAMILY if any(r.method == m for r in table.values())]
    return ["full"] + [best_by_validation(table, m).key for m in methods] + ["head"]


def grid_lines(results):
    """The learning-rate grid: each row's mean validation accuracy at each rate, the chosen in bold."""
    lines = ["| row | rates tried: mean validation accuracy over the tasks (%) | chosen |",
             "| --- | --- | ---: |"]
    for key, g in results["grid"].items():
        cells = [(f"**{lr:g}: {100 * v:.1f}**" if lr == g["chosen_lr"] else f"{lr:g}: {100 * v:.1f}")
                 + (" (diverged on a task)" if any(d[i] for d in g["diverged"].values()) else "")
                 for i, (lr, v) in enumerate(zip(g["lrs"], g["mean_val_acc"]))]
        lines.append(f"| {label(key)} | " + ", ".join(cells) + f" | {g['chosen_lr']:g} |")
    edge = [label(k) for k, g in results["grid"].items() if g["chosen_lr"] in (g["lrs"][0], g["lrs"][-1])]
    lines += ["", f"{len(results['grid']) - len(edge)} of {len(results['grid'])} rows chose a rate inside "
              "their grid" + (f"; at an end of it: {', '.join(edge)} (a rate beyond might do better)."
                              if edge else ".")]
    return lines


CAPTIONS = {"tradeoff": "accuracy vs trained parameters, every method (error bars: std over seeds)",
            "ablation": "removing adapters of layers i..j", "init_std": "accuracy vs adapter init std",
            "curves": "training curves: adapter, full fine-tuning, prompt tuning",
            "storage": "parameters and bytes stored for T tasks"}


def readme_section(results, readme_dir, out_dir, page=None):
    """The README's short results section: how (in brief), the headline rows, the key sentences,
    the trade-off figure and a link to the full page."""
    rel = os.path.relpath(out_dir, readme_dir)
    s = results["settings"]
    minutes, secs = divmod(round(results["seconds"]["total"]), 60)
    link = os.path.relpath(Path(page).resolve(), Path(readme_dir).resolve()) if page is not None else None
    # the headline findings; single seeds near chance and prompt tuning's budget are on the full page
    keep = [x for x in findings(results) if x.startswith(("Adapters with", "Within the noise", "Near chance",
                                                            "No row sits"))]
    lines = [f"Generated by `python -m minitransformer figures --out {rel} --overwrite` from `{rel}/results.json` "
             f"(tasks {', '.join(s['tasks'])}; each row's learning rate chosen on validation from a "
             f"{len(next(iter(s['lr_grid'].values())))}-point grid per method, then {len(s['seeds'])} seeds; "
             f"{_budget(s)}; {minutes} min {secs} s on this shared 2-core machine). Test accuracy (%), mean ± std over seeds, "
             "of full fine-tuning, the head alone and each method's row with the best validation accuracy:", ""]
    lines += _table(results, headline_keys(results), short=True) + [""] + [f"- {x}" for x in keep] + [""]
    lines.append(f"![{CAPTIONS['tradeoff']}]({rel}/tradeoff.png)")
    if link:
        lines += ["", f"Every row, the learning-rate grid, the method, the other figures and every finding: "
                      f"[{link}]({link})."]
    return "\n".join(lines)


def results_page(results, page_dir, out_dir):
    """docs/results.md: how, the full table, the grid, every sentence, every figure."""
    rel = os.path.relpath(out_dir, page_dir)
    table = rows(results)
    lines = [TITLE, "", "<!-- written by `python -m minitransformer figures`; do not edit by hand -->", "",
             _how(results, rel, _from_root(out_dir)), "", _left_out(results), "", "## Every row", "",
             "Test accuracy (%), mean ± std over seeds, per task and averaged (the average's std is over the "
             "seeds' averages); lr: the rate chosen on validation; trained parameters per task (an adapter set "
             "counts its adapters, its head and its own LayerNorm copies; a prefix counts its reparameterising "
             "MLP, which is dropped after training); % of the parameters the classification uses (all but the "
             "masked-token head); ms/step: the median training step, mean over tasks.", ""]
    lines += _table(results, list(table)) + ["", "## The learning-rate grid", "",
                                              "Seed " + str(results["settings"]["seeds"][0]) + ", every task; "
                                              "test accuracy played no part in the choice.", ""]
    lines += grid_lines(results) + ["", "## What the numbers show", "",
                                    "A difference is *within the noise* when it is no larger than the larger of "
                                    "the two standard deviations over seeds.", ""]
    lines += [f"- {x}" for x in findings(results)] + ["", "## Figures", ""]
    lines += [f"![{text}]({rel}/{name}.png)" for name, text in CAPTIONS.items()]
    return "\n".join(lines) + "\n"


def write_readme_section(results, readme_path=README, out_dir=None, page=None):
    """Replace the text between the results markers of `readme_path`; nothing else changes."""
    readme_path = Path(readme_path)
    out_dir = readme_path.parent / "figures" if out_dir is None else Path(out_dir)
    section = readme_section(results, readme_path.parent.resolve(), Path(out_dir).resolve(), page)
    files.write_section(readme_path, "results", section)


def write_results_page(results, path=DOCS, out_dir=None):
    """Write the full results page at `path` (atomically)."""
    path = Path(path)
    out_dir = files.FIGURES if out_dir is None else Path(out_dir)
    files.write_text(path, results_page(results, path.parent.resolve(), Path(out_dir).resolve()))
