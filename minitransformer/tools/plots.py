"""What `python -m minitransformer figures` shows, drawn from the results dict (results.json):
the five figures (tools/report.py writes the text). Accuracies are means over seeds with their
standard deviation as error bars.

Each figure function takes the results and a path and writes one PNG; nothing here trains or
measures. The figures are matplotlib Figure objects drawn without pyplot, so importing this
module changes no backend (a notebook keeps showing its own plots). Every file is written
atomically (files.atomic_write).
"""
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
    """Test accuracy (mean over seeds, std as error bars) vs trained parameters (log x), every
    method, one panel per task."""
    fig, axes = _panels(len(results["runs"]), width=5.6, height=4.2, cols=3, sharey=True)
    for ax, (task, runs) in zip(axes, results["runs"].items()):
        for method, (marker, text, size) in CURVES.items():
            recs = [r for r in runs.values() if r["method"] == method]
            if not recs:
                continue
            ax.errorbar([r["trained"] for r in recs], [r["test_acc"] for r in recs],
                        yerr=[r.get("test_std", 0.0) for r in recs], marker=marker, color=COLORS[method],
                        label=text, capsize=3)
            for r in recs:
                ax.annotate(str(r[size]), (r["trained"], r["test_acc"]), textcoords="offset points",
                            xytext=(4, -10), fontsize=8, color=COLORS[method])
        for method, (marker, text) in POINTS.items():
            if method not in runs:
                continue
            r = runs[method]
            ax.errorbar(r["trained"], r["test_acc"], yerr=r.get("test_std", 0.0), marker=marker,
                        markersize=11 if method == "full" else 8, linestyle="none", color=COLORS[method],
                        label=text, capsize=3)
        ax.axhline(runs["full"]["test_acc"], color="black", linewidth=0.7, linestyle=":")
        ax.set_xscale("log")
        ax.set_title(task)
        ax.set_xlabel("trained parameters (log scale)")
        ax.set_ylabel("test accuracy")
        ax.grid(True, which="major", alpha=0.3)
        ax.yaxis.set_tick_params(labelleft=True)
    n_seeds = len(next(iter(results["runs"][task].values())).get("seeds", [0]))
    fig.suptitle(f"Accuracy vs number of trained parameters (mean ± std over {n_seeds} seeds at the rate "
                 "chosen on validation; dotted: full fine-tuning)")
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
        rec = results["runs"][task][f"adapter_m{ab['size']}"]
        full = rec["val_accs"][0] if "val_accs" in rec else rec["val_acc"]  # the run the grid comes from
        ax.set_title(f"{task} (nothing removed: {full:.2f})", fontsize=10)
    fig.suptitle("Removing the trained adapters of layers i..j at inference (no retraining)")
    fig.tight_layout(rect=(0, 0, 0.93, 0.97))
    cax = fig.add_axes((0.94, 0.2, 0.012, 0.6))
    fig.colorbar(im, cax=cax, label=f"{ab['split']} accuracy")
    _write(fig, path)


def init_std(results, path):
    """Test accuracy (mean over seeds, std as error bars) vs the adapters' init std (log x), one
    line per task."""
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    sweep = results["init_std"]
    for task in sorted({r["task"] for r in sweep}):
        stds = sorted({r["std"] for r in sweep if r["task"] == task})
        accs = [[r["test_acc"] for r in sweep if r["task"] == task and r["std"] == s] for s in stds]
        ax.errorbar(stds, [np.mean(a) for a in accs], yerr=[np.std(a) for a in accs], marker="o", capsize=3,
                    label=f"{task}, {len(accs[0])} seeds")
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
    """Training loss and validation accuracy vs step on one task (seed 0, the chosen rates):
    adapter, full fine-tuning and, with its longer budget, prompt tuning."""
    cv = results["curves"]
    fig = Figure(figsize=(10, 3.8))
    ax_loss, ax_acc = fig.subplots(1, 2)
    for key in [k for k in cv if k != "task"]:
        h, method = cv[key], method_of_key(key)
        text = "full fine-tuning" if key == "full" else label(key)
        ax_loss.plot(h["steps"], h["loss"], color=COLORS[method], alpha=0.2, linewidth=0.8)
        ax_loss.plot(h["steps"], _smooth(h["loss"], 20), color=COLORS[method], label=f"{text} (mean of 20 steps)")
        ax_acc.plot(h["eval_steps"], h["val_acc"], marker="o", markersize=3, color=COLORS[method], label=text)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("training loss")
    ax_acc.set_xlabel("step")
    ax_acc.set_ylabel("validation accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Training curves on '{cv['task']}' (seed 0, each at its chosen rate)")
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


# ----------------------------------------------------------------------------- names and markers

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


def method_of_key(key):
    """The method of a run key: adapter_m8 -> "adapter", lora_r4 -> "lora", top_2 -> "top_k"."""
    for start, method in (("adapter_m", "adapter"), ("lora_r", "lora"), ("prefix_n", "prefix"),
                          ("prompt_n", "prompt"), ("top_", "top_k")):
        if key.startswith(start):
            return method
    return key


def has_markers(path):
    """Does the file at `path` hold the results markers (a README this module may write)?"""
    return files.has_section("results")(path)
