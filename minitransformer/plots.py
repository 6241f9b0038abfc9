"""The figures of `python -m minitransformer figures`, drawn from the results dict (results.json).

Each function takes the results and a path and writes one PNG; nothing here trains or computes a
number that is not in the results. matplotlib runs with the Agg backend (no display needed).
"""
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402

NAMES = ("tradeoff", "ablation", "init_std", "curves", "storage")
COLORS = {"adapter": "tab:blue", "top_k": "tab:orange", "layernorm": "tab:green", "head": "tab:red",
          "full": "black"}


def _panels(n, width=4.2, height=3.6, cols=4, **kw):
    """A grid (up to `cols` wide) of n panels -> (figure, flat list of n axes)."""
    cols = min(n, cols)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False, **kw)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def _save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def tradeoff(results, path):
    """Test accuracy vs trained parameters (log x), one panel per task."""
    fig, axes = _panels(len(results["runs"]), width=5.2, height=3.8, cols=2, sharey=True)
    for ax, (task, runs) in zip(axes, results["runs"].items()):
        for method, marker, text in (("adapter", "o", "adapters (m)"), ("top_k", "s", "top k layers (k)")):
            recs = [r for r in runs.values() if r["method"] == method]
            ax.plot([r["trained"] for r in recs], [r["test_acc"] for r in recs], marker=marker,
                    color=COLORS[method], label=text)
            for r in recs:
                ax.annotate(str(r["size"] if method == "adapter" else r["k"]), (r["trained"], r["test_acc"]),
                            textcoords="offset points", xytext=(4, -10), fontsize=8, color=COLORS[method])
        for method, marker, text in (("layernorm", "^", "LayerNorm + head"), ("head", "v", "head only"),
                                     ("full", "*", "full fine-tuning")):
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
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=5, fontsize=9,
               frameon=False)
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
    fig.savefig(path, dpi=110)
    plt.close(fig)


def init_std(results, path):
    """Test accuracy vs the adapters' init std (log x), one line per task and seed."""
    fig, ax = plt.subplots(figsize=(6, 4))
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
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
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
    """Parameters (and file megabytes) stored to serve T tasks: base + T adapters vs T copies."""
    st = results["storage"]
    n_measured = len(st["per_task"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, unit, scale, ylabel in ((axes[0], "params", 1e6, "parameters stored (millions)"),
                                    (axes[1], "bytes", 2 ** 20, "files on disk (MiB)")):
        T = np.array(st["T"])
        for key, text, color in (("adapters", "one base + T adapter sets", COLORS["adapter"]),
                                 ("copies", "T fine-tuned copies", COLORS["full"])):
            y = np.array(st[f"{key}_{unit}"]) / scale
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
