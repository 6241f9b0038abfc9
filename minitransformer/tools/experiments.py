"""The paper's figures re-created at classroom scale: `python -m minitransformer figures`.

Houlsby et al. (2019) show (i) accuracy against the number of trained parameters for adapters of
several sizes, fine-tuning only the top k layers, and full fine-tuning; (ii) what happens when the
trained adapters of a span of layers are removed at inference time; (iii) how robust adapters are to
the std of their initialisation. Here the same experiments run on the shipped pretrained base and the
synthetic tasks of `data.py`, plus the training curves and the storage bill for T tasks. The rest of
the family (LoRA, prefix tuning, prompt tuning, BitFit) runs on the same tasks and base.

How, as the papers do it: every method and size (a row of the table) first trains at each rate of
its method's learning-rate grid (Settings.lr_grid, seed 0); the rate with the best validation
accuracy, averaged over the tasks, is chosen; then the row trains with every seed of
Settings.seeds at that rate (new head and method weights, batch order and dropout), and its test
accuracy is reported as the mean and standard deviation over the seeds. Test accuracy never
chooses anything. Everything is seeded: a re-run reproduces results.json (timings aside), whatever
the number of worker processes.

    tradeoff.png  ablation.png  init_std.png  curves.png  storage.png  results.json
    and, for the repository's figures/, the README section between the results markers and
    docs/results.md (the full tables and sentences)

They go to a scratch folder (files.SCRATCH / "figures") unless --out says otherwise; the
repository's own take `--out figures --overwrite`.

Every run starts from a fresh copy of the same base, so no run sees another's training. The runs
are independent, so they are shared out among --workers processes (default 2), each on one
thread: a run's numbers depend only on its own settings and seed. `--quick` runs tiny sizes on a
small freshly initialised base (for the tests). `--from-json PATH` redraws the figures and the
text from a saved results.json.
"""
import copy
import hashlib
import json
import multiprocessing
import os
import re
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from .. import backend
from . import cli, data, files, plots, report, runtime, train
from ..adapters import AdapterConfig
from .checkpoint import save_adapter, save_base
from ..model import ModelConfig, Transformer
from ..optim import AdamW
from ..peft import BitFitConfig, LoRAConfig, PrefixConfig, PromptConfig
from .pretrain import checked_base, load_pretrained, one_thread

RESULT_KEYS = ("settings", "base", "tasks", "runs", "ablation", "init_std", "curves", "storage", "seconds", "grid")
EVAL_BATCH = 64  # examples per evaluation forward: measured faster here than 256 (cache-sized)


@dataclass
class Settings:
    """Everything that decides the numbers (stored in results.json next to them)."""
    # the downstream tasks: two of data.py's four, to fit every row's grid and seeds in the run's
    # time on a shared 2-core machine. topic, the control task that a bag of words answers (a linear
    # probe on the frozen base already does well), and nesting are left out
    tasks: tuple = ("agreement", "brackets")
    steps: int = 300  # training steps per run (the trainer early-stops and restores the best)
    prompt_steps: int = 300  # prompt tuning's budget (Lester et al. train prompts much longer; here
    #                          the same as the others, and its curve shows whether it still rises)
    batch_size: int = 32
    eval_every: int = 50  # validation every this many steps
    patience: int | None = 3  # early stopping, in evaluations without a new best
    min_fraction: float = 2 / 3  # ... but never before this fraction of the run's budget
    # the learning-rate grid of each method: three rates, 10x from end to end, around the rate a
    # few earlier trials found (train.METHOD_LR); each row of the table chooses its own on validation
    lr_grid: dict = field(default_factory=lambda: {
        "adapter": (1e-3, 3e-3, 1e-2), "head": (3e-3, 1e-2, 3e-2), "layernorm": (3e-3, 1e-2, 3e-2),
        "top_k": (3e-4, 1e-3, 3e-3), "full": (3e-4, 1e-3, 3e-3), "lora": (3e-3, 1e-2, 3e-2),
        "prefix": (1e-3, 3e-3, 1e-2), "prompt": (3e-3, 1e-2, 3e-2), "bitfit": (1e-2, 3e-2, 1e-1)})
    seeds: tuple = (0, 1, 2)  # seeds at the chosen rate; the grid runs with the first
    adapter_sizes: tuple = (8, 32)  # bottleneck m of the adapter rows
    main_size: int = 32  # m used for the ablation, the curves, the init-std sweep and storage
    top_ks: tuple = (2,)  # k of "fine-tune the top k blocks" (the top half of the 4 blocks)
    points: tuple = ("head", "full")  # the rows without a size: any of "layernorm", "head", "full"
    #                                   (full fine-tuning is needed: every comparison is against it)
    lora_ranks: tuple = (8,)  # LoRA's r (on W_q, W_v; LoRAConfig's fixed alpha, as the paper)
    prefix_lengths: tuple = (16,)  # prefix tuning's n
    prefix_mlp: bool = True  # train prefixes through Li & Liang's MLP, dropped after training (a
    #                          direct prefix trained far worse on this budget: see train.METHOD_LR)
    prompt_lengths: tuple = (16,)  # prompt tuning's n
    # the size of each of the other methods in the storage bill
    family_main: dict = field(default_factory=lambda: {"lora": 8, "prefix": 16, "prompt": 16})
    step_repeats: int = 5  # timed training steps per run (after one untimed): the median is kept
    init_stds: tuple = (1e-3, 1e-1, 1.0)  # the init-std sweep (at main_size's rate; 1e-3, the
    #                                      default, reuses the table's runs)
    init_tasks: tuple = ("brackets",)  # tasks of the init-std sweep
    init_seeds: tuple = (0, 1)  # seeds per task of the init-std sweep
    curve_task: str = "agreement"  # the task whose training curves are drawn
    storage_T: int = 20  # tasks in the storage bill (measured sizes, repeated past len(tasks))
    seed: int = 0  # seeds the data (the tasks' examples and splits)
    base: str = "shipped"  # "shipped": pretrain.load_pretrained(); "random": a small fresh base;
    #                        or the path of another base .npz (checkpoint.save_base)

    def __post_init__(self):
        unknown = [t for t in (*self.tasks, *self.init_tasks, self.curve_task) if t not in data.TASKS]
        if unknown:
            raise ValueError(f"tasks: expected names from {data.TASKS}, got {unknown}")
        if self.main_size not in self.adapter_sizes:
            raise ValueError(f"main_size: expected one of adapter_sizes {self.adapter_sizes}, "
                             f"got {self.main_size}")
        for method, sizes in (("lora", "lora_ranks"), ("prefix", "prefix_lengths"), ("prompt", "prompt_lengths")):
            if self.family_main.get(method) not in getattr(self, sizes):
                raise ValueError(f"family_main: expected {method}'s size among {sizes} "
                                 f"{getattr(self, sizes)}, got {self.family_main.get(method)!r}")
        if "full" not in self.points or not set(self.points) <= {"layernorm", "head", "full"}:
            raise ValueError(f"points: expected 'full' and any of 'layernorm', 'head', got {self.points}")
        missing = [m for m in train.METHODS if len(self.lr_grid.get(m, ())) < 1]
        if missing:
            raise ValueError(f"lr_grid: expected at least one rate for every method, none for {missing}")
        if not self.seeds:
            raise ValueError("seeds: expected at least one seed")
        if self.base not in ("shipped", "random") and not Path(self.base).is_file():
            raise ValueError(f"base: expected 'shipped', 'random' or an existing .npz file, "
                             f"got {self.base!r}")

    def steps_of(self, method):
        """The step budget of a run of `method`."""
        return self.prompt_steps if method == "prompt" else self.steps

    def min_steps_of(self, method):
        """The steps a run of `method` takes before early stopping may end it."""
        return round(self.min_fraction * self.steps_of(method))


def quick_settings(seed=0):
    """Tiny sizes that prove the pipeline end to end in seconds (numbers mean nothing)."""
    task = data.TASKS[0]
    return Settings(tasks=(task,), steps=20, prompt_steps=30, batch_size=16, eval_every=10, patience=1,
                    min_fraction=0.5, lr_grid={m: (3e-3, 1e-2, 3e-2) for m in train.METHODS},
                    seeds=(0, 1, 2), adapter_sizes=(2, 8), main_size=8, top_ks=(1,),
                    points=("layernorm", "head", "full"),
                    init_stds=(1e-4, 1e-3, 1.0), init_tasks=(task,), init_seeds=(0, 1),
                    curve_task=task, storage_T=5, lora_ranks=(2,), prefix_lengths=(2,),
                    prompt_lengths=(2,), family_main={"lora": 2, "prefix": 2, "prompt": 2},
                    step_repeats=2, seed=seed, base="random")


def load_base(settings):
    """The base every run copies: the shipped checkpoint, or a small random one (quick runs)."""
    if settings.base == "shipped":
        base = load_pretrained()
    elif settings.base != "random":
        base = load_pretrained(settings.base)
    else:
        cfg = ModelConfig(vocab_size=data.VOCAB_SIZE, max_len=data.MAX_LEN, d_model=32, n_heads=2,
                          n_layers=2, d_ff=64)
        base = Transformer(cfg, seed=settings.seed)
    base.adapters, base.active_adapter = {}, None
    return base


# ----------------------------------------------------------------------------- one training run


def task_config(method, size, settings, init_std=1e-3):
    """The config of a method that adds a task (train.TASK_METHODS) at `size`; None for the others."""
    return {"adapter": lambda: AdapterConfig(bottleneck=size, init_std=init_std),
            "lora": lambda: LoRAConfig(r=size),
            "prefix": lambda: PrefixConfig(n_prefix=size, reparameterize=settings.prefix_mlp),
            "prompt": lambda: PromptConfig(n_prompt=size),
            "bitfit": lambda: BitFitConfig()}.get(method, lambda: None)()


def step_seconds(model, task, settings):
    """The median time of one training step (forward, loss, backward, AdamW) of `model` as it
    trains, on one batch of the task's training split, on a copy (the model is not changed)."""
    model = copy.deepcopy(model)
    opt = AdamW(model.parameters(trainable_only=True), lr=1e-6)
    b = task.train[:settings.batch_size]
    rng = np.random.default_rng(0)
    times = []
    for _ in range(1 + settings.step_repeats):  # the first one untimed: first touches of memory
        t0 = time.perf_counter()
        opt.zero_grad()
        model.loss(b.ids, b.labels, b.pad_mask, head="cls", train=True, rng=rng, backward=True)
        opt.step()
        times.append(time.perf_counter() - t0)
    return float(np.median(times[1:]))


def run(base, task, method, settings, size=None, k=None, init_std=1e-3, seed=0, lr=None):
    """Train one method on a fresh copy of `base` at learning rate `lr` -> (model, record).

    record: test/val accuracy, the rate and seed, trained parameters, total parameters on the
    classification path (all but the masked-token head), % trained, stored parameters (what one
    more task costs: a task's own parameters, a prefix after its MLP is dropped; else the trained
    ones), the median training step time, where the run stopped and which step's weights it kept,
    whether it diverged (then the best weights before that are kept), history, seconds.
    """
    model = copy.deepcopy(base)  # a fresh copy of every array: runs never share weights
    adapter_config = task_config(method, size, settings, init_std)
    label = train.prepare(model, method, task.n_classes, seed=seed, adapter_config=adapter_config, k=k)
    trained = model.num_parameters(trainable_only=True)
    total = model.num_parameters() - lm_head_size(model)  # what classification uses
    steps = settings.steps_of(method)
    config = train.TrainConfig(steps=steps, batch_size=settings.batch_size, lr=lr, warmup=steps // 10,
                               weight_decay=0.01, clip=1.0, eval_every=settings.eval_every,
                               patience=settings.patience, min_steps=settings.min_steps_of(method),
                               seed=seed, progress=False)
    diverged = None
    try:
        history = train.fit(model, task, config)
    except train.DivergedError as e:  # the best weights before it are kept (fit restores them)
        history, diverged = e.history, str(e)
    step = step_seconds(model, task, settings)
    if method == "prefix" and settings.prefix_mlp:
        model.drop_prefix_mlp("task")  # the same forward (tests/test_peft.py), fewer parameters
    stored = sum(p.value.size for p in model.adapters["task"].parameters()) if adapter_config else trained
    record = {"method": method, "label": label, "size": size, "k": k, "lr": lr, "seed": seed,
              "test_acc": train.accuracy(model, task.test, EVAL_BATCH),
              "val_acc": train.accuracy(model, task.val, EVAL_BATCH),
              "trained": int(trained), "total": int(total), "pct": 100.0 * trained / total,
              "stored": int(stored), "step_ms": 1e3 * step, "steps": steps,
              "stop_step": int(history.steps[-1]) if history.steps else -1,
              "best_step": int(history.best_step), "diverged": diverged, "seconds": float(history.seconds),
              "history": {"steps": list(map(int, history.steps)), "loss": list(map(float, history.loss)),
                          "eval_steps": list(map(int, history.eval_steps)),
                          "val_acc": list(map(float, history.val_acc))}}
    return model, record


def saved_size(model, method):
    """What one more task costs on disk: {"params", "bytes"} of the file that stores it (the task's
    adapter file, or for full fine-tuning a whole copy; counts leave out the masked-token head)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "task.npz")
        if method == "full":
            save_base(model, path)
            params = model.num_parameters() - lm_head_size(model)
        else:
            save_adapter(model, "task", path)
            params = sum(p.value.size for p in model.adapters["task"].parameters())
        return {"params": int(params), "bytes": os.path.getsize(path)}


def base_digest(model):
    """sha256 over every base array's name and bytes: which base the numbers came from."""
    h = hashlib.sha256()
    for name, p in model.named_parameters().items():
        h.update(name.encode())
        h.update(np.ascontiguousarray(p.value).tobytes())
    return h.hexdigest()


def lm_head_size(model):
    """Parameters of the masked-token head, which the "cls" path never uses."""
    return sum(p.value.size for p in model.lm_head.parameters())


def method_grid(settings, n_layers):
    """(key, method, size, k) of every row of the table (and point of the tradeoff figure)."""
    bad = [k for k in settings.top_ks if not 1 <= k <= n_layers]
    if bad:
        raise ValueError(f"top_ks: expected numbers of blocks in 1..{n_layers}, got {bad}")
    grid = [(f"adapter_m{m}", "adapter", m, None) for m in settings.adapter_sizes]
    grid += [(f"top_{k}", "top_k", None, k) for k in settings.top_ks]
    grid += [(m, m, None, None) for m in ("layernorm", "head", "full") if m in settings.points]
    grid += [(f"lora_r{r}", "lora", r, None) for r in settings.lora_ranks]
    grid += [(f"prefix_n{n}", "prefix", n, None) for n in settings.prefix_lengths]
    grid += [(f"prompt_n{n}", "prompt", n, None) for n in settings.prompt_lengths]
    return grid + [("bitfit", "bitfit", None, None)]


def storage_size(method, settings):
    """The size (m, r or n; None for BitFit) at which the storage bill counts `method`."""
    return settings.main_size if method == "adapter" else settings.family_main.get(method)


def storage_key(method, settings):
    """The row of `method` at the size the storage bill counts."""
    size = storage_size(method, settings)
    return {"adapter": f"adapter_m{size}", "lora": f"lora_r{size}", "prefix": f"prefix_n{size}",
            "prompt": f"prompt_n{size}", "bitfit": "bitfit"}[method]


# ----------------------------------------------------------------------------- the experiments


def ablation(model, name, split):
    """Accuracy on `split` with the adapters of blocks i..j removed (skipped), for every i <= j.

    -> (N, N) nested list, None below the diagonal. The task's head and LayerNorms stay; the
    removed adapters are put back afterwards, whatever happens.
    """
    blocks = model.adapters[name].blocks
    n = len(blocks)
    grid = [[None] * n for _ in range(n)]
    for i in range(n):
        for j in range(i, n):
            saved = blocks[i:j + 1]
            try:
                blocks[i:j + 1] = [{} for _ in saved]  # an empty dict: the block runs no adapter
                grid[i][j] = train.accuracy(model, split, EVAL_BATCH)
            finally:
                blocks[i:j + 1] = saved
    return grid


def storage(base, settings):
    """Parameters and file bytes to serve T tasks: one base + T task files (per method: adapters,
    LoRA, prefix, prompt, BitFit, at the sizes of storage_key) vs T fine-tuned copies.

    Measured per task of data.TASKS (real counts, real .npz files) on freshly prepared models: a
    file's size depends on its arrays' shapes, not their values (np.savez does not compress), so a
    trained model's file is the same size. Past the measured tasks the sizes repeat in order. Counts
    leave out the masked-token head (classification does not need it); the files are what
    save_base / save_adapter write, that head included.
    """
    task_files, full_files = {m: {} for m in plots.FAMILY}, {}
    for name in data.TASKS:
        n_classes = data.load_task(name, seed=settings.seed).n_classes
        for method in (*plots.FAMILY, "full"):
            model = copy.deepcopy(base)
            size = storage_size(method, settings)
            train.prepare(model, method, n_classes, adapter_config=task_config(method, size, settings))
            if method == "prefix" and settings.prefix_mlp:
                model.drop_prefix_mlp("task")  # what is stored after training
            (full_files if method == "full" else task_files[method])[name] = saved_size(model, method)
    T = settings.storage_T
    names = list(full_files)
    with tempfile.TemporaryDirectory() as tmp:
        save_base(base, os.path.join(tmp, "base.npz"))
        base_bytes = os.path.getsize(os.path.join(tmp, "base.npz"))
    per_task = {name: {"adapter_params": task_files["adapter"][name]["params"],
                       "adapter_bytes": task_files["adapter"][name]["bytes"],
                       "full_params": full_files[name]["params"], "full_bytes": full_files[name]["bytes"]}
                for name in names}

    def cumulative(sizes):  # sizes {task: n} -> n summed over tasks 1..T, repeating in order
        return np.cumsum([sizes[names[t % len(names)]] for t in range(T)]).tolist()
    base_params = base.num_parameters() - lm_head_size(base)
    methods = {m: {"per_task": per, "params": [base_params + c for c in cumulative({n: v["params"] for n, v in per.items()})],
                   "bytes": [base_bytes + c for c in cumulative({n: v["bytes"] for n, v in per.items()})]}
               for m, per in task_files.items()}
    return {"per_task": per_task, "base_params": base_params, "base_bytes": base_bytes, "T": list(range(1, T + 1)),
            "adapters_params": methods["adapter"]["params"], "adapters_bytes": methods["adapter"]["bytes"],
            "copies_params": cumulative({n: v["full_params"] for n, v in per_task.items()}),
            "copies_bytes": cumulative({n: v["full_bytes"] for n, v in per_task.items()}),
            "methods": methods}


def run_all(settings, log=print, workers=1):
    """Every experiment -> the results dict that results.json stores.

    First the grid: every row (method_grid) on every task at every rate of its method's grid, with
    the first seed. Each row's rate is the one with the best validation accuracy averaged over the
    tasks. Then every other seed at that rate, and the init-std sweep at the main adapter's rate.
    """
    t0 = time.perf_counter()
    base = load_base(settings)
    n_layers = base.config.n_layers
    rows = {key: (method, size, k) for key, method, size, k in method_grid(settings, n_layers)}
    main_key = f"adapter_m{settings.main_size}"
    first = settings.seeds[0]
    done = {}  # job id -> record

    def job(task, key, lr, seed, init_std=1e-3):
        method, size, k = rows[key]
        return {"id": (task, key, lr, seed, init_std), "task": task, "key": key, "method": method,
                "size": size, "k": k, "lr": lr, "seed": seed, "init_std": init_std,
                "ablate": key == main_key and seed == first and init_std == 1e-3}

    with Runner(settings, workers) as runner:
        grid_jobs = [job(t, key, lr, first) for t in settings.tasks for key, (method, *_) in rows.items()
                     for lr in settings.lr_grid[method]]
        runner.run(grid_jobs, done, log, t0)
        t_grid = time.perf_counter() - t0
        chosen = {}
        for key, (method, *_) in rows.items():
            mean_val = [np.mean([done[(t, key, lr, first, 1e-3)]["val_acc"] for t in settings.tasks])
                        for lr in settings.lr_grid[method]]
            chosen[key] = settings.lr_grid[method][int(np.argmax(mean_val))]  # ties: the first
        seed_jobs = [job(t, key, chosen[key], seed) for t in settings.tasks for key in rows
                     for seed in settings.seeds[1:]]
        sweep_jobs = [job(t, main_key, chosen[main_key], seed, std) for t in settings.init_tasks
                      for seed in settings.init_seeds for std in settings.init_stds]
        todo = {j["id"]: j for j in seed_jobs + sweep_jobs if j["id"] not in done}  # each run once
        runner.run(list(todo.values()), done, log, t0)

    grid = {key: {"method": method, "lrs": list(settings.lr_grid[method]),
                  "val_acc": {t: [done[(t, key, lr, first, 1e-3)]["val_acc"] for lr in settings.lr_grid[method]]
                              for t in settings.tasks},
                  "mean_val_acc": [float(np.mean([done[(t, key, lr, first, 1e-3)]["val_acc"] for t in settings.tasks]))
                                   for lr in settings.lr_grid[method]],
                  "stop_step": {t: [done[(t, key, lr, first, 1e-3)]["stop_step"] for lr in settings.lr_grid[method]]
                                for t in settings.tasks},
                  "best_step": {t: [done[(t, key, lr, first, 1e-3)]["best_step"] for lr in settings.lr_grid[method]]
                                for t in settings.tasks},
                  "diverged": {t: [done[(t, key, lr, first, 1e-3)]["diverged"] is not None
                                   for lr in settings.lr_grid[method]] for t in settings.tasks},
                  "chosen_lr": chosen[key]}
            for key, (method, *_) in rows.items()}
    runs = {t: {key: row_record([done[(t, key, chosen[key], seed, 1e-3)] for seed in settings.seeds])
                for key in rows} for t in settings.tasks}
    chosen_first = {t: {key: done[(t, key, chosen[key], first, 1e-3)] for key in rows} for t in settings.tasks}
    sweep = [{"task": t, "seed": seed, "std": std, "lr": chosen[main_key],
              **{f: done[(t, main_key, chosen[main_key], seed, std)][f]
                 for f in ("test_acc", "val_acc", "stop_step", "seconds")}}
             for t in settings.init_tasks for seed in settings.init_seeds for std in settings.init_stds]
    curve_task = settings.curve_task if settings.curve_task in runs else settings.tasks[0]
    curve_keys = [main_key, "full", storage_key("prompt", settings)]
    results = {
        "settings": {**asdict(settings), "n_layers": n_layers,
                     "min_steps": {m: settings.min_steps_of(m) for m in train.METHODS},
                     "budget": {m: settings.steps_of(m) for m in train.METHODS}},
        "base": {"source": settings.base, "config": base.config.to_dict(),
                 "n_parameters": base.num_parameters(), "sha256": base_digest(base)},
        "tasks": {n: {"n_classes": task.n_classes, "description": task.description,
                      "sizes": {s: len(getattr(task, s).labels) for s in ("train", "val", "test")}}
                  for n, task in ((n, data.load_task(n, seed=settings.seed)) for n in settings.tasks)},
        "grid": grid,
        "runs": runs,
        "ablation": {t: {"size": settings.main_size, "split": "val", "lr": chosen[main_key], "seed": first,
                         "grid": chosen_first[t][main_key]["ablation"]} for t in settings.tasks},
        "init_std": sweep,
        "curves": {"task": curve_task, **{k: chosen_first[curve_task][k]["history"] for k in curve_keys}},
        "storage": storage(base, settings),
        # the median training step of each row, in ms, averaged over the tasks
        "step_ms": {key: float(np.mean([runs[t][key]["step_ms"] for t in runs])) for key in rows},
    }
    results["seconds"] = {"grid": t_grid, "total": time.perf_counter() - t0, "workers": workers,
                          "runs": len(done)}
    results["path"] = backend.current()  # which code the timings are of (backend.py)
    return results


def row_record(recs):
    """One row of the table on one task from its runs at the chosen rate (one per seed): the
    shared facts, every seed's numbers, their mean and standard deviation, seed 0's history."""
    first = recs[0]
    out = {f: first[f] for f in ("method", "label", "size", "k", "lr", "trained", "total", "pct", "stored", "steps")}
    for f in ("val_acc", "test_acc"):
        values = [r[f] for r in recs]
        out[f] = float(np.mean(values))
        out[f.replace("_acc", "_std")] = float(np.std(values))  # over seeds (population std)
        out[f + "s"] = values
    out.update({"seeds": [r["seed"] for r in recs], "stop_steps": [r["stop_step"] for r in recs],
                "best_steps": [r["best_step"] for r in recs],
                "diverged": [r["diverged"] for r in recs if r["diverged"]],
                "step_ms": float(np.median([r["step_ms"] for r in recs])),
                "seconds": float(sum(r["seconds"] for r in recs)),
                "val_curves": [r["history"]["val_acc"] for r in recs],
                "history": first["history"]})
    return out


# ----------------------------------------------------------------------------- the runs, shared out

_WORKER = {}  # in each process: the settings, the base its runs copy, the tasks loaded so far


def _start(settings, path, one):
    """Set up a process to run jobs: the caller's code path, one thread if `one`, the base."""
    backend.use(path)
    if one:
        runtime.set_threads(1)
        _WORKER["blas"] = one_thread()  # keeps BLAS on one thread from here on
        _WORKER["blas"].__enter__()
    _WORKER.update(settings=settings, base=load_base(settings), tasks={})


def _do(job):
    """Run one job (a dict made by run_all) -> (its id, its record); the record also holds the
    ablation grid when the job asks for it."""
    settings, tasks = _WORKER["settings"], _WORKER["tasks"]
    if job["task"] not in tasks:
        tasks[job["task"]] = data.load_task(job["task"], seed=settings.seed)
    task = tasks[job["task"]]
    model, rec = run(_WORKER["base"], task, job["method"], settings, size=job["size"], k=job["k"],
                     init_std=job["init_std"], seed=job["seed"], lr=job["lr"])
    if job["ablate"]:
        rec["ablation"] = ablation(model, "task", task.val)
    return job["id"], rec


class Runner:
    """Runs jobs here (workers=1) or in a pool of worker processes, each on one thread. A run's
    numbers depend only on its job, so the results are the same whatever the number of workers."""

    def __init__(self, settings, workers):
        self.settings, self.workers, self.pool = settings, workers, None

    def __enter__(self):
        if self.workers > 1:
            ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked threads
            self.pool = ctx.Pool(self.workers, initializer=_start,
                                 initargs=(self.settings, backend.current(), True))
        else:
            _start(self.settings, backend.current(), False)  # the caller chose the threads
        return self

    def __exit__(self, *exc):
        if self.pool is not None:
            self.pool.terminate() if exc[0] else self.pool.close()
            self.pool.join()

    def run(self, jobs, done, log, t0):
        """Run `jobs`, longest first, adding each record to `done` by job id as it ends."""
        s = self.settings
        jobs = sorted(jobs, key=lambda j: -s.steps_of(j["method"]) * COST.get(j["method"], 1.0))
        results = self.pool.imap_unordered(_do, jobs) if self.pool else map(_do, jobs)
        for i, (job_id, rec) in enumerate(results, 1):
            done[job_id] = rec
            task, key, lr, seed, std = job_id
            what = f"{task} {key} lr={lr:g} seed={seed}" + (f" std={std:g}" if std != 1e-3 else "")
            log(f"[{i:>3}/{len(jobs)}] {what:<44} val {rec['val_acc']:.3f}  stopped at {rec['stop_step']:>3}"
                f"{'  DIVERGED' if rec['diverged'] else ''}  {rec['seconds']:.1f}s  "
                f"[{time.perf_counter() - t0:.0f}s so far]", flush=True)


COST = {"head": 0.5, "top_k": 0.7}  # rough step cost against an adapter's, to start long runs first


# ----------------------------------------------------------------------------- command line


def dumps(results):
    """JSON with one key per line but every list of numbers on a single line (diff-friendly)."""
    text = json.dumps(results, indent=1)
    return re.sub(r"\[[-+.\deE,\s]*\]", lambda m: " ".join(m.group(0).split()), text) + "\n"


def read_results(path):
    """The results dict stored at --from-json `path`; cli.UsageError if it is not one: not a
    regular file, not JSON (NaN and Infinity included), or any field the figures read missing or
    of the wrong type or range (tools/schema.py names it)."""
    from . import schema
    data = files.read_bytes(path, "--from-json")  # a regular file, bounded: no FIFO, no /dev/zero
    try:
        results = json.loads(data, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as e:  # bad JSON, not text at all, nested too deep
        raise cli.UsageError(f"--from-json: {cli.shown(path)} is not valid JSON ({e})") from e
    missing = [k for k in RESULT_KEYS if not isinstance(results, dict) or k not in results]
    if missing:
        raise cli.UsageError(f"--from-json: expected a results.json written by this command, with the "
                             f"keys {', '.join(RESULT_KEYS)}; {cli.shown(path)} lacks {', '.join(missing)}")
    try:
        return schema.check(results, schema.RESULTS, cli.shown(path))
    except schema.SchemaError as e:
        raise cli.UsageError(f"--from-json: {e}") from e


def _refuse_constant(name):
    raise ValueError(f"{name} is not a number a results.json holds")


def checked_outputs(args, writes_json):
    """-> (the --out folder, the README to update or None, the results page to write or None),
    all checked before any work."""
    outputs = {f"{name}.png": (files.is_png, "a PNG image") for name in plots.NAMES}
    if writes_json:
        outputs["results.json"] = (files.json_with("settings", "runs"), "a results.json of this command")
    out = files.check_output_dir(files.SCRATCH / "figures" if args.out is None else args.out, "--out",
                                 outputs, args.overwrite)
    # the repository's README and docs show the repository's figures only: other --out folders
    # leave them alone
    own = out.resolve() == files.FIGURES.resolve() and not args.quick
    readme = args.readme if args.readme is not None else (files.README if own else None)
    if readme:
        readme = files.check_output(readme, "--readme", plots.has_markers, "a README with the results "
                                    f"markers {plots.MARK_START!r} ... {plots.MARK_END!r}", args.overwrite)
    page = args.docs if args.docs is not None else (report.DOCS if own else None)
    if page:
        page = files.check_output(page, "--docs", report.is_results_page,
                                  f"a results page of this command (starting {report.TITLE!r})", args.overwrite)
    return out, readme, page


def main(argv=None):
    p = cli.parser("figures", __doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes on a small random base (seconds)")
    p.add_argument("--out", default=None,
                   help=f"folder for the PNGs and results.json (default {files.SCRATCH / 'figures'}); "
                        "the repository's figures/ only with --overwrite")
    p.add_argument("--overwrite", action="store_true",
                   help="allow writing into shipped work: the repository's figures/ and README.md")
    p.add_argument("--readme", default=None,
                   help="README to update (default: the repository's, when --out is its figures/ "
                        "and not --quick)")
    p.add_argument("--docs", default=None,
                   help="results page to write (default: the repository's docs/results.md, when "
                        "--out is its figures/ and not --quick)")
    p.add_argument("--workers", type=cli.int_in("--workers", 1, 64), default=None,
                   help="processes that share out the runs, one thread each (default: 2, or 1 with "
                        "--quick); the numbers do not depend on it")
    p.add_argument("--seed", type=int, default=0, help="seed of the tasks' data")
    p.add_argument("--base", default=None, help="'shipped' (default), 'random', or a base .npz path")
    p.add_argument("--from-json", default=None, help="redraw from this results.json, no training")
    args = p.parse_args(argv)
    if args.seed < 0:
        p.error(f"--seed: expected a non-negative integer, got {args.seed}")
    workers = args.workers or (1 if args.quick else min(2, os.cpu_count() or 1))
    results = read_results(args.from_json) if args.from_json is not None else None
    if args.base not in (None, "shipped", "random"):
        checked_base(args.base)  # loads: a bad file is refused before any training
    # the set in --out is whole: results.json goes with the PNGs, unless it is the very file read
    target = Path(files.SCRATCH / "figures" if args.out is None else args.out) / "results.json"
    writes_json = results is None or not (files.kind(target) == "file"
                                          and target.resolve() == Path(args.from_json).resolve())
    out, readme, page = checked_outputs(args, writes_json=writes_json)
    if results is None:
        settings = quick_settings(args.seed) if args.quick else Settings(seed=args.seed)
        if args.base:
            settings = replace(settings, base=args.base)
        with one_thread():  # reproducible sums, and fair to a shared machine
            results = run_all(settings, workers=workers)
    with files.written_together(out) as stage:  # all of them move in at once, or none
        if writes_json:
            files.write_text(stage / "results.json", dumps(results))
        plots.draw_all(results, stage)
    if readme:
        report.write_readme_section(results, readme, out, page)
    if page:
        report.write_results_page(results, page, out)
    print(f"wrote {', '.join(plots.NAMES)} (.png){' and results.json' if writes_json else ''} to "
          f"{cli.shown(out)}" + (f"; updated {cli.shown(readme)}" if readme else "")
          + (f"; wrote {cli.shown(page)}" if page else ""))
    if out.resolve() != files.FIGURES.resolve():
        print(f"the repository's figures are unchanged; to replace them: --out {cli.shown(files.FIGURES)} "
              "--overwrite")
    return 0
