"""What `python -m minitransformer figures` shows, drawn from the results dict (results.json):
the five figures, and the README's results section (a table and sentences computed from the numbers).
A results.json from before the other methods (LoRA, prefix, prompt, BitFit) still draws.

Each figure function takes the results and a path and writes one PNG; nothing here trains or
measures. The figures are matplotlib Figure objects drawn without pyplot, so importing this
module changes no backend (a notebook keeps showing its own plots). Every file is written
atomically (files.atomic_write).
"""
import os
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from . import files

README = files.README
MARK_START, MARK_END = files.markers("results")
NAMES = ("tradeoff", "ablation", "init_std", "curves", "storage")
COLORS = {"adapter": "tab:blue", "top_k": "tab:orange", "layernorm": "tab:green", "head": "tab:red",
          "full": "black", "lora": "tab:purple", "prefix": "tab:brown", "prompt": "tab:pink",
          "bitfit": "tab:olive"}
# the methods drawn as a curve over their size: (marker, legend text, the record's size field)
CURVES = {"adapter": ("o", "adapters (m)", "size"), "top_k": ("s", "top k layers (k)", "k"),
          "lora": ("D", "LoRA (r)", "size"), "prefix": ("P", "prefix tuning (n)", "size"),
          "prompt": ("X", "prompt tuning (n)", "size")}
POINTS = {"layernorm": ("^", "LayerNorm + head"), "head": ("v", "head only"), "bitfit": ("h", "BitFit"),
          "full": ("*", "full fine-tuning")}
FAMILY = ("adapter", "lora", "prefix", "prompt", "bitfit")  # the methods that add a task to the base


def _panels(n, width=4.2, height=3.6, cols=4, **kw):
    """A grid (up to `cols` wide) of n panels -> (figure, flat list of n axes)."""
    cols = min(n, cols)
    rows = -(-n // cols)
    fig = Figure(figsize=(width * cols, height * rows))
    axes = fig.subplots(rows, cols, squeeze=False, **kw)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def _write(fig, path, **options):
    """Write `fig` as a PNG at `path` (atomically) and free it."""
    files.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110, **options))


def _save(fig, path):
    fig.tight_layout()
    _write(fig, path)


def tradeoff(results, path):
    """Test accuracy vs trained parameters (log x), every method, one panel per task."""
    fig, axes = _panels(len(results["runs"]), width=5.6, height=4.2, cols=2, sharey=True)
    for ax, (task, runs) in zip(axes, results["runs"].items()):
        for method, (marker, text, size) in CURVES.items():
            recs = [r for r in runs.values() if r["method"] == method]
            if not recs:  # a results.json from before the other methods
                continue
            ax.plot([r["trained"] for r in recs], [r["test_acc"] for r in recs], marker=marker,
                    color=COLORS[method], label=text)
            for r in recs:
                ax.annotate(str(r[size]), (r["trained"], r["test_acc"]), textcoords="offset points",
                            xytext=(4, -10), fontsize=8, color=COLORS[method])
        for method, (marker, text) in POINTS.items():
            if method not in runs:
                continue
            r = runs[method]
            ax.plot(r["trained"], r["test_acc"], marker=marker, markersize=11 if method == "full" else 8,
                    linestyle="none", color=COLORS[method], label=text)
        ax.axhline(runs["full"]["test_acc"], color="black", linewidth=0.7, linestyle=":")
        ax.set_xscale("log")
        ax.set_title(task)
        ax.set_xlabel("trained parameters (log scale)")
        ax.set_ylabel("test accuracy")
        ax.grid(True, which="major", alpha=0.3)
        ax.yaxis.set_tick_params(labelleft=True)
    fig.suptitle("Accuracy vs number of trained parameters (dotted: full fine-tuning)")
    fig.tight_layout()
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0), fontsize=9, frameon=False,
               ncol=5 if len(axes) > 1 else 3)
    _write(fig, path, bbox_inches="tight")  # the legend below the panels included


def ablation(results, path):
    """Validation accuracy with the adapters of layers i..j removed, one heat map per task."""
    fig, axes = _panels(len(results["ablation"]), width=3.6, height=3.9)
    grids = {task: np.array([[np.nan if v is None else v for v in row] for row in ab["grid"]])
             for task, ab in results["ablation"].items()}
    lo = min(np.nanmin(g) for g in grids.values())  # one colour scale for every task
    for ax, (task, ab) in zip(axes, results["ablation"].items()):
        grid = grids[task]
        n = len(grid)
        im = ax.imshow(grid, cmap="viridis", origin="upper", vmin=lo, vmax=1.0)
        for i in range(n):
            for j in range(i, n):
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if grid[i, j] < (lo + 1.0) / 2 else "black")
        ax.set_xticks(range(n))
        ax.set_yticks(range(n))
        ax.set_xlabel("last layer removed (j)")
        ax.set_ylabel("first layer removed (i)")
        full = results["runs"][task][f"adapter_m{ab['size']}"]["val_acc"]
        ax.set_title(f"{task} (nothing removed: {full:.2f})", fontsize=10)
    fig.suptitle("Removing the trained adapters of layers i..j at inference (no retraining)")
    fig.tight_layout(rect=(0, 0, 0.93, 0.97))
    cax = fig.add_axes((0.94, 0.2, 0.012, 0.6))
    fig.colorbar(im, cax=cax, label=f"{ab['split']} accuracy")
    _write(fig, path)


def init_std(results, path):
    """Test accuracy vs the adapters' init std (log x), one line per task and seed."""
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    sweep = results["init_std"]
    for task, seed in sorted({(r["task"], r["seed"]) for r in sweep}):
        rs = sorted((r for r in sweep if r["task"] == task and r["seed"] == seed), key=lambda r: r["std"])
        ax.plot([r["std"] for r in rs], [r["test_acc"] for r in rs], marker="o", label=f"{task}, seed {seed}")
    ax.axvline(1e-2, color="gray", linestyle=":", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("adapter init std (log scale)")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"Robustness to the adapter init std (m={results['settings']['main_size']})")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def _smooth(y, w):
    """Moving average over w steps (shorter at the start), same length as y."""
    c = np.cumsum(np.insert(np.asarray(y, float), 0, 0.0))
    idx = np.arange(1, len(y) + 1)
    lo = np.maximum(idx - w, 0)
    return (c[idx] - c[lo]) / (idx - lo)


def curves(results, path):
    """Training loss and validation accuracy vs step: adapter vs full fine-tuning on one task."""
    cv = results["curves"]
    fig = Figure(figsize=(10, 3.8))
    ax_loss, ax_acc = fig.subplots(1, 2)
    m = results["settings"]["main_size"]
    for key, text, color in ((f"adapter_m{m}", f"adapter m={m}", COLORS["adapter"]),
                             ("full", "full fine-tuning", COLORS["full"])):
        h = cv[key]
        ax_loss.plot(h["steps"], h["loss"], color=color, alpha=0.2, linewidth=0.8)
        ax_loss.plot(h["steps"], _smooth(h["loss"], 20), color=color, label=f"{text} (mean of 20 steps)")
        ax_acc.plot(h["eval_steps"], h["val_acc"], marker="o", markersize=3, color=color, label=text)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("training loss")
    ax_acc.set_xlabel("step")
    ax_acc.set_ylabel("validation accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Training curves on '{cv['task']}'")
    _save(fig, path)


def storage(results, path):
    """Parameters (and file megabytes) stored to serve T tasks: one base + T task files, per
    method, vs T fine-tuned copies."""
    st = results["storage"]
    n_measured = len(st["per_task"])
    fig = Figure(figsize=(11, 4.2))
    axes = fig.subplots(1, 2)
    for ax, unit, scale, ylabel in ((axes[0], "params", 1e6, "parameters stored (millions)"),
                                    (axes[1], "bytes", 2 ** 20, "files on disk (MiB)")):
        T = np.array(st["T"])
        methods = st.get("methods", {"adapter": {"params": st["adapters_params"], "bytes": st["adapters_bytes"]}})
        lines = [(m, st_m[unit], f"one base + T {LABEL_OF_METHOD[m]} files", COLORS[m]) for m, st_m in methods.items()]
        lines.append(("full", st[f"copies_{unit}"], "T fine-tuned copies", COLORS["full"]))
        for _, values, text, color in lines:
            y = np.array(values) / scale
            ax.plot(T, y, color=color, label=text)
            ax.plot(T[:n_measured], y[:n_measured], "o", color=color, markersize=4)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(bottom=0)
        ax.set_xlabel(f"number of tasks T (dots: the {n_measured} measured; beyond, sizes repeat)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Storage for T tasks")
    _save(fig, path)


def draw_all(results, out_dir):
    """Write every figure of NAMES into out_dir as <name>.png."""
    draw = {"tradeoff": tradeoff, "ablation": ablation, "init_std": init_std, "curves": curves,
            "storage": storage}
    for name in NAMES:
        draw[name](results, Path(out_dir) / f"{name}.png")


# ----------------------------------------------------------------------------- summaries and README

LABELS = {"head": "head only", "layernorm": "LayerNorm + head", "full": "full fine-tuning", "bitfit": "BitFit"}
LABEL_OF_METHOD = {"adapter": "adapter", "lora": "LoRA", "prefix": "prefix", "prompt": "prompt", "bitfit": "BitFit"}


def label(key):
    """A readable name for a run key: adapter_m8 -> 'adapter m=8', top_2 -> 'top 2 layers',
    lora_r4 -> 'LoRA r=4', prefix_n8 -> 'prefix n=8', prompt_n8 -> 'prompt n=8'."""
    for start, text in (("adapter_m", "adapter m="), ("lora_r", "LoRA r="), ("prefix_n", "prefix n="),
                        ("prompt_n", "prompt n=")):
        if key.startswith(start):
            return f"{text}{key[len(start):]}"
    if key.startswith("top_"):
        k = int(key[len("top_"):])
        return f"top {k} layer{'s' if k > 1 else ''}"
    return LABELS[key]


def table(results):
    """-> [(key, {task: test acc}, mean acc, mean trained, mean %)] in the order of the runs."""
    runs = results["runs"]
    tasks = list(runs)
    rows = []
    for key in runs[tasks[0]]:
        recs = [runs[t][key] for t in tasks]
        rows.append((key, {t: runs[t][key]["test_acc"] for t in tasks},
                     float(np.mean([r["test_acc"] for r in recs])),
                     float(np.mean([r["trained"] for r in recs])), float(np.mean([r["pct"] for r in recs]))))
    return rows


def method_of_key(key):
    """The method of a run key: adapter_m8 -> "adapter", lora_r4 -> "lora", top_2 -> "top_k"."""
    for start, method in (("adapter_m", "adapter"), ("lora_r", "lora"), ("prefix_n", "prefix"),
                          ("prompt_n", "prompt"), ("top_", "top_k")):
        if key.startswith(start):
            return method
    return key


def findings(results):
    """Sentences computed from the numbers: what they show, whatever that is."""
    rows = {key: (mean, trained, pct) for key, _, mean, trained, pct in table(results)}
    m = results["settings"]["main_size"]
    ad, full, head = rows[f"adapter_m{m}"], rows["full"], rows["head"]
    gap = 100 * (full[0] - ad[0])
    if gap <= 0:
        verdict = f"at or above full fine-tuning ({-gap:.1f} points higher)"
    elif gap <= 3:
        verdict = f"within a few points of full fine-tuning ({gap:.1f} points lower)"
    else:
        verdict = f"clearly below full fine-tuning ({gap:.1f} points lower), not within a few points"
    out = [f"Adapters with m={m} reach {100 * ad[0]:.1f} % average test accuracy against "
           f"{100 * full[0]:.1f} % for full fine-tuning, training {ad[2]:.2f} % of the parameters "
           f"per task instead of {full[2]:.0f} %: {verdict}."]
    best = max((k for k in rows if k.startswith("adapter_m")), key=lambda k: rows[k][0])
    if best != f"adapter_m{m}":
        out.append(f"The best adapter size on average is {label(best)} ({100 * rows[best][0]:.1f} %).")
    small = [k for k in rows if k.startswith("adapter_m") and rows[k][2] < 10]
    if small:  # the bar to clear: within a few points of full fine-tuning while training < 10 %
        k = max(small, key=lambda k: rows[k][0])
        sgap = 100 * (full[0] - rows[k][0])
        out.append(f"The best adapter that trains under 10 % of the parameters is {label(k)}: "
                   f"{100 * rows[k][0]:.1f} % with {rows[k][2]:.2f} % trained, "
                   f"{abs(sgap):.1f} points {'below' if sgap >= 0 else 'above'} full fine-tuning.")
    hgap = 100 * (ad[0] - head[0])
    if hgap >= 5:
        out.append(f"Training the head alone on the frozen base is clearly worse: {100 * head[0]:.1f} % "
                   f"({hgap:.1f} points below the adapters).")
    else:
        out.append(f"Training the head alone reaches {100 * head[0]:.1f} %, only {hgap:.1f} points "
                   f"{'below' if hgap >= 0 else 'above'} the adapters: on these tasks the frozen "
                   f"base's features already carry much of what a linear probe needs.")
    out += _ablation_findings(results) + _init_findings(results)
    st = results["storage"]
    T, ours, copies = st["T"][-1], st["adapters_params"][-1], st["copies_params"][-1]
    out.append(f"Serving {T} tasks takes {ours / 1e6:.2f} M parameters as one base plus {T} adapter sets, "
               f"against {copies / 1e6:.2f} M as {T} fine-tuned copies ({copies / ours:.1f} times more).")
    return out + _family_findings(results)


def _family_findings(results):
    """The other methods against adapters and full fine-tuning: accuracy, size, step time, storage."""
    rows = {key: (mean, trained, pct) for key, _, mean, trained, pct in table(results)}
    best = {}  # each method's best run key by mean test accuracy
    for key in rows:
        m = method_of_key(key)
        if m in FAMILY and (m not in best or rows[key][0] > rows[best[m]][0]):
            best[m] = key
    if set(best) <= {"adapter"}:  # a results.json from before the other methods
        return []
    full = rows["full"][0]
    ranked = sorted(best.values(), key=lambda k: -rows[k][0])
    out = ["The best run of each parameter-efficient method, by average test accuracy: " + "; ".join(
        f"{label(k)} {100 * rows[k][0]:.1f} % ({rows[k][2]:.2f} % of the parameters trained)" for k in ranked)
        + f"; full fine-tuning {100 * full:.1f} %."]
    close = [label(k) for k in ranked if 100 * (full - rows[k][0]) <= 3]
    far = [f"{label(k)} ({100 * (full - rows[k][0]):.1f} points)" for k in ranked if 100 * (full - rows[k][0]) > 3]
    out.append(("Within 3 points of full fine-tuning: " + (", ".join(close) if close else "none") + ". "
                + ("More than 3 points below it: " + ", ".join(far) + "." if far else "")).strip())
    if "prompt" in best:
        gap = 100 * (full - rows[best["prompt"]][0])
        n_base = results["base"]["n_parameters"]
        verdict = ("as Lester et al. found for small models (it closes the gap only at billions of parameters)"
                   if gap > 3 else "closer than Lester et al. found for small models")
        out.append(f"Prompt tuning ({label(best['prompt'])}, {rows[best['prompt']][2]:.2f} % of the parameters "
                   f"trained) ends {abs(gap):.1f} points {'below' if gap >= 0 else 'above'} full fine-tuning "
                   f"on this base of {n_base / 1e3:.0f} k parameters: {verdict}.")
    step = results.get("step_ms", {})
    if "full" in step and all(k in step for k in best.values()):
        parts = "; ".join(f"{label(k)} {step[k]:.1f} ms ({step[k] / step['full']:.2f} x)"
                          for k in sorted(best.values(), key=lambda k: step[k]))
        out.append(f"A training step (forward, backward, AdamW; batch {results['settings']['batch_size']}, "
                   f"one BLAS thread, median) takes {step['full']:.1f} ms for full fine-tuning; {parts}.")
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
        trained.append(results["runs"][name][f"adapter_m{ab['size']}"]["val_acc"])
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
    return [f"Removing the trained adapters of every layer at inference time (the task's head and "
            f"LayerNorms stay) takes the validation "
            f"accuracy from {acc:.1f} % to {100 * np.mean(removed_all):.1f} % (mean over tasks); removing "
            f"one layer's adapters costs at most {acc - 100 * np.mean(worst):.1f} points on average. "
            f"Removing only the lowest layer's costs {cost_low:.1f} points, only the top layer's "
            f"{cost_top:.1f}: {where}."]


def _init_findings(results):
    sweep = results["init_std"]
    stds = sorted({r["std"] for r in sweep})
    if len(stds) < 2:
        return []
    mean = {s: 100 * np.mean([r["test_acc"] for r in sweep if r["std"] == s]) for s in stds}
    best = max(mean.values())
    fine = [s for s in stds if all(mean[t] >= best - 1 for t in stds if t <= s)]  # a prefix
    per_std = ", ".join(f"{s:g}: {mean[s]:.1f} %" for s in stds)
    if fine and fine[-1] == stds[-1]:
        verdict = "every std tried stays within 1 point of the best, unlike the paper (worse above ~1e-2)"
    elif fine:
        verdict = (f"accuracy stays within 1 point of the best up to std {fine[-1]:g} and drops above "
                   f"(the paper: fine below ~1e-2, worse above)")
    else:
        verdict = "even the smallest std tried is more than 1 point below the best"
    return [f"Init-std sweep (m={results['settings']['main_size']}, mean test accuracy over "
            f"{len({(r['task'], r['seed']) for r in sweep})} task/seed runs per std): {per_std}; {verdict}."]


def readme_section(results, readme_dir, out_dir):
    """The markdown between the README's results markers, from results.json's numbers."""
    s, rel = results["settings"], os.path.relpath(out_dir, readme_dir)
    tasks = list(results["runs"])
    minutes, secs = divmod(round(results["seconds"]["total"]), 60)
    lines = [f"Generated by `python -m minitransformer figures --out {rel} --overwrite` from `{rel}/results.json` "
             f"(base: {results['base']['source']}, {results['base']['n_parameters']:,} parameters; "
             f"{s['steps']} steps of batch {s['batch_size']} per run with early stopping, seed {s['seed']}). "
             f"The run took {minutes} min {secs} s on this shared 2-core machine (one BLAS thread, "
             f"{results.get('path', 'fast')} kernels). "
             f"Re-run it with the same "
             f"command; adding `--from-json {rel}/results.json` redraws figures and this section without training.",
             "", "Test accuracy (%) per task, and the parameters each method trains per task "
             "(mean over tasks; an adapter set counts its adapters, its head and its own LayerNorm copies; "
             "a prefix counts its reparameterising MLP, which is dropped after training; % of the "
             "parameters the classification uses, i.e. all but the masked-token head); ms/step: the median "
             "training step, mean over tasks:",
             "", "| method | " + " | ".join(tasks) + " | average | trained params | % of total | ms/step |",
             "| --- | " + " | ".join("---:" for _ in tasks) + " | ---: | ---: | ---: | ---: |"]
    step = results.get("step_ms", {})
    for key, accs, mean, trained, pct in table(results):
        lines.append(f"| {label(key)} | " + " | ".join(f"{100 * accs[t]:.1f}" for t in tasks)
                     + f" | {100 * mean:.1f} | {trained:,.0f} | {pct:.2f} | "
                     + (f"{step[key]:.1f} |" if key in step else "- |"))
    lines += [""] + [f"- {sentence}" for sentence in findings(results)] + [""]
    captions = {"tradeoff": "accuracy vs trained parameters, every method",
                "ablation": "removing adapters of layers i..j", "init_std": "accuracy vs adapter init std",
                "curves": "training curves, adapter vs full", "storage": "parameters and bytes stored for T tasks"}
    lines.append(" ".join(f"![{text}]({rel}/{name}.png)" for name, text in captions.items()))
    return "\n".join(lines)


def has_markers(path):
    """Does the file at `path` hold the results markers (a README this module may write)?"""
    return files.has_section("results")(path)


def write_readme_section(results, readme_path=README, out_dir=None):
    """Replace the text between the results markers of `readme_path`; nothing else changes."""
    readme_path = Path(readme_path)
    out_dir = readme_path.parent / "figures" if out_dir is None else Path(out_dir)
    section = readme_section(results, readme_path.parent.resolve(), Path(out_dir).resolve())
    files.write_section(readme_path, "results", section)
