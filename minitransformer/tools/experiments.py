"""The paper's figures re-created at classroom scale: `python -m minitransformer figures`.

Houlsby et al. (2019) show (i) accuracy against the number of trained parameters for adapters of
several sizes, fine-tuning only the top k layers, and full fine-tuning; (ii) what happens when the
trained adapters of a span of layers are removed at inference time; (iii) how robust adapters are to
the std of their initialisation. Here the same experiments run on the shipped pretrained base and the
synthetic tasks of `data.py`, plus the training curves of adapter vs full fine-tuning and the storage
bill for T tasks. The rest of the family (LoRA, prefix tuning, prompt tuning, BitFit) runs on the
same tasks, base and budget, in the tradeoff and storage figures, each run with its training step
time. Everything is seeded: a re-run reproduces results.json (timings aside).

    tradeoff.png  ablation.png  init_std.png  curves.png  storage.png  results.json
    and, for the repository's figures/, the README section between the results markers

They go to a scratch folder (files.SCRATCH / "figures") unless --out says otherwise; the
repository's own take `--out figures --overwrite` (which also rewrites the README's section).

Every run starts from a fresh copy of the same base (loaded once, deep-copied per run), so no run
sees another's training. `--quick` runs tiny sizes on a small freshly initialised base (for the tests).
`--from-json PATH` redraws the figures and the README section from a saved results.json.
"""
import copy
import hashlib
import json
import os
import re
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from .. import backend
from . import cli, data, files, plots, train
from ..adapters import AdapterConfig
from .checkpoint import save_adapter, save_base
from ..model import ModelConfig, Transformer
from ..optim import AdamW
from ..peft import BitFitConfig, LoRAConfig, PrefixConfig, PromptConfig
from .plots import write_readme_section
from .pretrain import checked_base, load_pretrained, one_thread

RESULT_KEYS = ("settings", "base", "tasks", "runs", "ablation", "init_std", "curves", "storage", "seconds")
EVAL_BATCH = 64  # examples per evaluation forward: measured faster here than 256 (cache-sized)


@dataclass
class Settings:
    """Everything that decides the numbers (stored in results.json next to them)."""
    tasks: tuple = data.TASKS  # the downstream tasks (one tradeoff panel and ablation grid each)
    steps: int = 300  # training steps per run (the trainer early-stops and restores the best)
    batch_size: int = 32
    eval_every: int = 50  # validation every this many steps
    patience: int | None = 3  # early stopping, in evaluations
    # peak learning rate per method: the best of the few tried at 200-400 steps (LoRA, prefix,
    # prompt and BitFit: the trial recorded at train.METHOD_LR, on this budget)
    lr: dict = field(default_factory=lambda: {
        "adapter": 5e-3, "head": 1e-2, "layernorm": 5e-3, "top_k": 1e-3, "full": 1e-3,
        **{m: train.METHOD_LR[m] for m in ("lora", "prefix", "prompt", "bitfit")}})
    adapter_sizes: tuple = (2, 8, 32, 64)  # bottleneck m of the tradeoff's adapter curve
    main_size: int = 32  # m used for the ablation, the curves, the init-std sweep and storage
    lora_ranks: tuple = (1, 4, 16)  # LoRA's r (on W_q, W_v; LoRAConfig's fixed alpha, as the paper)
    prefix_lengths: tuple = (4, 16)  # prefix tuning's n
    prefix_mlp: bool = True  # train prefixes through Li & Liang's MLP, dropped after training (a
    #                          direct prefix trained far worse on this budget: see train.METHOD_LR)
    prompt_lengths: tuple = (4, 16)  # prompt tuning's n
    # the size of each of the other methods in the storage bill
    family_main: dict = field(default_factory=lambda: {"lora": 4, "prefix": 16, "prompt": 16})
    step_repeats: int = 5  # timed training steps per run (after one untimed): the median is kept
    init_stds: tuple = (1e-7, 1e-5, 1e-3, 1e-2, 1e-1, 1.0)  # the init-std sweep
    init_tasks: tuple = ("nesting",)  # tasks of the init-std sweep
    init_seeds: tuple = (0, 1)  # seeds per task of the init-std sweep
    curve_task: str = "agreement"  # the task whose training curves are drawn
    storage_T: int = 20  # tasks in the storage bill (measured sizes, repeated past len(tasks))
    seed: int = 0  # seeds the data, the new heads and adapters, and the batches
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
        if self.base not in ("shipped", "random") and not Path(self.base).is_file():
            raise ValueError(f"base: expected 'shipped', 'random' or an existing .npz file, "
                             f"got {self.base!r}")


def quick_settings(seed=0):
    """Tiny sizes that prove the pipeline end to end in seconds (numbers mean nothing)."""
    task = data.TASKS[0]
    return Settings(tasks=(task,), steps=30, batch_size=16, eval_every=10, patience=None,
                    adapter_sizes=(2, 8), main_size=8, init_stds=(1e-4, 1e-2, 1.0),
                    init_tasks=(task,), init_seeds=(0,), curve_task=task, storage_T=5,
                    lora_ranks=(2,), prefix_lengths=(2,), prompt_lengths=(2,),
                    family_main={"lora": 2, "prefix": 2, "prompt": 2}, step_repeats=2,
                    seed=seed, base="random")


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


def run(base, task, method, settings, size=None, k=None, init_std=1e-3, seed=None):
    """Train one method on a fresh copy of `base` -> (model, record).

    record: test/val accuracy, trained parameters, total parameters on the classification path
    (all but the masked-token head), % trained, stored parameters (what one more task costs: a
    task's own parameters, a prefix after its MLP is dropped; else the trained ones), the median
    training step time, history, seconds.
    """
    seed = settings.seed if seed is None else seed
    model = copy.deepcopy(base)  # a fresh copy of every array: runs never share weights
    adapter_config = task_config(method, size, settings, init_std)
    label = train.prepare(model, method, task.n_classes, seed=seed, adapter_config=adapter_config, k=k)
    trained = model.num_parameters(trainable_only=True)
    total = model.num_parameters() - lm_head_size(model)  # what classification uses
    config = train.TrainConfig(steps=settings.steps, batch_size=settings.batch_size,
                               lr=settings.lr[method], warmup=settings.steps // 10, weight_decay=0.01,
                               clip=1.0, eval_every=settings.eval_every, patience=settings.patience,
                               seed=seed, progress=False)
    history = train.fit(model, task, config)
    step = step_seconds(model, task, settings)
    if method == "prefix" and settings.prefix_mlp:
        model.drop_prefix_mlp("task")  # the same forward (tests/test_peft.py), fewer parameters
    stored = sum(p.value.size for p in model.adapters["task"].parameters()) if adapter_config else trained
    record = {"method": method, "label": label, "size": size, "k": k,
              "test_acc": train.accuracy(model, task.test, EVAL_BATCH),
              "val_acc": train.accuracy(model, task.val, EVAL_BATCH),
              "trained": int(trained), "total": int(total), "pct": 100.0 * trained / total,
              "stored": int(stored), "step_ms": 1e3 * step,
              "best_step": int(history.best_step), "seconds": float(history.seconds),
              "history": {"steps": list(map(int, history.steps)), "loss": list(map(float, history.loss)),
                          "eval_steps": list(map(int, history.eval_steps)),
                          "val_acc": list(map(float, history.val_acc))}}
    return model, record


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
    """(key, method, size, k) of every run in the tradeoff figure."""
    grid = [(f"adapter_m{m}", "adapter", m, None) for m in settings.adapter_sizes]
    grid += [(f"top_{k}", "top_k", None, k) for k in range(1, n_layers + 1)]
    grid += [("layernorm", "layernorm", None, None), ("head", "head", None, None), ("full", "full", None, None)]
    grid += [(f"lora_r{r}", "lora", r, None) for r in settings.lora_ranks]
    grid += [(f"prefix_n{n}", "prefix", n, None) for n in settings.prefix_lengths]
    grid += [(f"prompt_n{n}", "prompt", n, None) for n in settings.prompt_lengths]
    return grid + [("bitfit", "bitfit", None, None)]


def storage_key(method, settings):
    """The run key whose models the storage bill measures for `method`."""
    size = settings.main_size if method == "adapter" else settings.family_main.get(method)
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


def storage(base, task_models, full_models, T):
    """Parameters and file bytes to serve T tasks: one base + T task files (per method: adapters,
    LoRA, prefix, prompt, BitFit) vs T fine-tuned copies.

    task_models: {method: {task name: trained model}}. Sizes are measured per task (real counts,
    real .npz files); past the measured tasks they repeat in order. Counts leave out the
    masked-token head (classification does not need it); the files are what save_base /
    save_adapter write, that head included.
    """
    names = list(full_models)
    with tempfile.TemporaryDirectory() as tmp:
        save_base(base, os.path.join(tmp, "base.npz"))
        base_bytes = os.path.getsize(os.path.join(tmp, "base.npz"))
        per_method = {}
        for method, models in task_models.items():
            per_method[method] = {}
            for name in names:
                path = os.path.join(tmp, f"{name}_{method}.npz")
                save_adapter(models[name], "task", path)
                per_method[method][name] = {
                    "params": sum(p.value.size for p in models[name].adapters["task"].parameters()),
                    "bytes": os.path.getsize(path)}
        per_task = {}
        for name in names:
            f_path = os.path.join(tmp, f"{name}_full.npz")
            save_base(full_models[name], f_path)
            per_task[name] = {"adapter_params": per_method["adapter"][name]["params"],
                              "adapter_bytes": per_method["adapter"][name]["bytes"],
                              "full_params": full_models[name].num_parameters() - lm_head_size(full_models[name]),
                              "full_bytes": os.path.getsize(f_path)}

    def cumulative(sizes):  # sizes {task: n} -> n summed over tasks 1..T, repeating in order
        return np.cumsum([sizes[names[t % len(names)]] for t in range(T)]).tolist()
    base_params = base.num_parameters() - lm_head_size(base)
    methods = {m: {"per_task": per, "params": [base_params + c for c in cumulative({n: v["params"] for n, v in per.items()})],
                   "bytes": [base_bytes + c for c in cumulative({n: v["bytes"] for n, v in per.items()})]}
               for m, per in per_method.items()}
    return {"per_task": per_task, "base_params": base_params, "base_bytes": base_bytes, "T": list(range(1, T + 1)),
            "adapters_params": methods["adapter"]["params"], "adapters_bytes": methods["adapter"]["bytes"],
            "copies_params": cumulative({n: v["full_params"] for n, v in per_task.items()}),
            "copies_bytes": cumulative({n: v["full_bytes"] for n, v in per_task.items()}),
            "methods": methods}


def run_all(settings, log=print):
    """Every experiment -> the results dict that results.json stores."""
    t0 = time.perf_counter()
    base = load_base(settings)
    tasks = {name: data.load_task(name, seed=settings.seed) for name in settings.tasks}
    n_layers = base.config.n_layers
    grid = method_grid(settings, n_layers)
    n_sweep = len(settings.init_tasks) * len(settings.init_seeds) * len(settings.init_stds)
    n_runs = len(tasks) * len(grid) + n_sweep
    done = 0

    def note(what, rec):
        nonlocal done
        done += 1
        log(f"[{done:>3}/{n_runs}] {what:<40} test {rec['test_acc']:.3f}  val {rec['val_acc']:.3f}  "
            f"trained {rec['trained']:>9,} ({rec['pct']:.2f}%)  {rec['seconds']:.1f}s  "
            f"[{time.perf_counter() - t0:.0f}s so far]", flush=True)

    runs, ablations, full_models = {}, {}, {}
    stored_keys = {storage_key(m, settings): m for m in ("adapter", "lora", "prefix", "prompt", "bitfit")}
    task_models = {m: {} for m in stored_keys.values()}
    for name, task in tasks.items():
        runs[name] = {}
        for key, method, size, k in grid:
            model, rec = run(base, task, method, settings, size=size, k=k)
            runs[name][key] = rec
            note(f"{name} {key}", rec)
            if key in stored_keys:
                task_models[stored_keys[key]][name] = model
            if key == f"adapter_m{settings.main_size}":
                ablations[name] = {"size": settings.main_size, "split": "val",
                                   "grid": ablation(model, "task", task.val)}
            elif key == "full":
                full_models[name] = model
    t_tradeoff = time.perf_counter() - t0

    sweep = []
    for name in settings.init_tasks:
        task = tasks[name] if name in tasks else data.load_task(name, seed=settings.seed)
        for seed in settings.init_seeds:
            for std in settings.init_stds:
                _, rec = run(base, task, "adapter", settings, size=settings.main_size, init_std=std,
                             seed=seed)
                sweep.append({"task": name, "seed": seed, "std": std, "test_acc": rec["test_acc"],
                              "val_acc": rec["val_acc"], "seconds": rec["seconds"]})
                note(f"{name} init_std={std:g} seed={seed}", rec)

    curve_keys = (f"adapter_m{settings.main_size}", "full")
    curve_task = settings.curve_task if settings.curve_task in runs else next(iter(runs))
    results = {
        "settings": {**asdict(settings), "n_layers": n_layers},
        "base": {"source": settings.base, "config": base.config.to_dict(),
                 "n_parameters": base.num_parameters(), "sha256": base_digest(base)},
        "tasks": {n: {"n_classes": t.n_classes, "description": t.description,
                      "sizes": {s: len(getattr(t, s).labels) for s in ("train", "val", "test")}}
                  for n, t in tasks.items()},
        "runs": runs,
        "ablation": ablations,
        "init_std": sweep,
        "curves": {"task": curve_task, **{k: runs[curve_task][k]["history"] for k in curve_keys}},
        "storage": storage(base, task_models, full_models, settings.storage_T),
        # the median training step of each run, in ms, averaged over the tasks
        "step_ms": {key: float(np.mean([runs[t][key]["step_ms"] for t in runs])) for key, *_ in grid},
    }
    results["seconds"] = {"tradeoff_and_ablation": t_tradeoff, "total": time.perf_counter() - t0}
    results["path"] = backend.current()  # which code the timings are of (backend.py)
    return results


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
    """-> (the --out folder, the README to update or None), both checked before any work."""
    outputs = {f"{name}.png": (files.is_png, "a PNG image") for name in plots.NAMES}
    if writes_json:
        outputs["results.json"] = (files.json_with("settings", "runs"), "a results.json of this command")
    out = files.check_output_dir(files.SCRATCH / "figures" if args.out is None else args.out, "--out",
                                 outputs, args.overwrite)
    # the repository's README shows the repository's figures only: other --out folders leave it alone
    readme = args.readme if args.readme is not None else (
        files.README if out.resolve() == files.FIGURES.resolve() and not args.quick else None)
    if readme:
        readme = files.check_output(readme, "--readme", plots.has_markers, "a README with the results "
                                    f"markers {plots.MARK_START!r} ... {plots.MARK_END!r}", args.overwrite)
    return out, readme


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
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--base", default=None, help="'shipped' (default), 'random', or a base .npz path")
    p.add_argument("--from-json", default=None, help="redraw from this results.json, no training")
    args = p.parse_args(argv)
    if args.seed < 0:
        p.error(f"--seed: expected a non-negative integer, got {args.seed}")
    results = read_results(args.from_json) if args.from_json is not None else None
    if args.base not in (None, "shipped", "random"):
        checked_base(args.base)  # loads: a bad file is refused before any training
    # the set in --out is whole: results.json goes with the PNGs, unless it is the very file read
    target = Path(files.SCRATCH / "figures" if args.out is None else args.out) / "results.json"
    writes_json = results is None or not (files.kind(target) == "file"
                                          and target.resolve() == Path(args.from_json).resolve())
    out, readme = checked_outputs(args, writes_json=writes_json)
    if results is None:
        settings = quick_settings(args.seed) if args.quick else Settings(seed=args.seed)
        if args.base:
            settings = replace(settings, base=args.base)
        with one_thread():  # reproducible sums, and fair to a shared machine
            results = run_all(settings)
    with files.written_together(out) as stage:  # all of them move in at once, or none
        if writes_json:
            files.write_text(stage / "results.json", dumps(results))
        plots.draw_all(results, stage)
    if readme:
        write_readme_section(results, readme, out)
    print(f"wrote {', '.join(plots.NAMES)} (.png){' and results.json' if writes_json else ''} to "
          f"{cli.shown(out)}" + (f"; updated {cli.shown(readme)}" if readme else ""))
    if out.resolve() != files.FIGURES.resolve():
        print(f"the repository's figures are unchanged; to replace them: --out {cli.shown(files.FIGURES)} "
              "--overwrite")
    return 0
