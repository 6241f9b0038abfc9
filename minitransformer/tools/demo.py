"""The demo, `python -m minitransformer`: one task's adapter on the shipped base, end to end.

    python -m minitransformer [--task agreement] [--bottleneck 8] [--steps 300] [--seed 0] [--out PATH]

0. check every argument before any work: the base loads, the adapter fits in memory, the output
   path is free to write (files.check_output);
1. load the shipped pretrained base and fingerprint every base array (sha256 of its bytes), and
   say whether it is the shipped one (pretrain.BASE_SHA256);
2. add a Houlsby adapter for the task, print what trains (by group), train only the adapter;
3. fingerprint again: every base array must be bit-for-bit unchanged (exit 1 if not);
4. train head-only and full fine-tuning from fresh copies of the base, same budget, and compare
   the three test accuracies;
5. save the adapter, load it into a fresh copy of the base, and check that the predictions and
   logits are identical (exit 1 if not).
With --readme README.md --overwrite the run's output also replaces the README's demo section.
"""
import contextlib
import hashlib
import io
import os
import sys
import time

import numpy as np

from . import cli, data, files
from .. import backend, sizes
from ..adapters import AdapterConfig
from .checkpoint import ADAPTER_FORMAT, file_format, load_adapter, save_adapter
from .pretrain import BASE_PATH, BASE_SHA256, checked_base, load_pretrained
from .train import METHOD_LR, TrainConfig, accuracy, fit, predict, prepare


def base_checksums(model):
    """{name: sha256 hex} of every base array (everything not under adapters.)."""
    return {n: hashlib.sha256(np.ascontiguousarray(p.value).tobytes()).hexdigest()
            for n, p in model.named_parameters().items() if not n.startswith("adapters.")}


def digest(checksums):
    """One sha256 over all the per-array checksums, in name order."""
    return hashlib.sha256("".join(f"{n}:{h}" for n, h in sorted(checksums.items())).encode()).hexdigest()


def _config(method, args):
    """The same budget for every method; each with its own learning rate (train.METHOD_LR)."""
    return TrainConfig(steps=args.steps, lr=METHOD_LR[method], warmup=max(args.steps // 10, 1),
                       eval_every=max(args.steps // 4, 10), seed=args.seed, progress=not args.quiet)


def which_base(checksums):
    """One line: is this the shipped base (pretrain.BASE_SHA256), and if not, what it is."""
    mine = digest(checksums)
    if mine == BASE_SHA256:
        return f"the shipped base (sha256 {mine[:12]}...)"
    return (f"NOT the shipped base (sha256 {mine[:12]}..., the shipped one is {BASE_SHA256[:12]}...): "
            "the numbers will differ from the README's")


def run(args, model, out):
    """The demo on `model` (loaded from args.base), saving the adapter to `out` -> exit code."""
    t0 = time.perf_counter()
    task = data.load_task(args.task, seed=args.seed)
    print(f"task {task.name!r}: {task.description}; {task.n_classes} classes, "
          f"{len(task.train)}/{len(task.val)}/{len(task.test)} train/val/test examples")

    # --- the adapter, on the shipped base
    before = base_checksums(model)
    print(f"loaded the pretrained base from {cli.shown(args.base)}: {model.num_parameters():,} "
          f"parameters, {which_base(before)}")
    config = AdapterConfig(bottleneck=args.bottleneck)
    label = prepare(model, "adapter", task.n_classes, seed=args.seed, adapter_config=config, name=task.name)
    print(f"\nadded a Houlsby adapter {task.name!r} (bottleneck m={args.bottleneck}); only it trains:")
    print(model.parameter_report().splitlines()[-1])  # the line adapter libraries print
    groups = ", ".join(f"{g} {tr:,} of {t:,}" for g, (t, tr) in model.parameter_groups().items())
    print(f"trainable by group: {groups}")
    print(f"training {label} for {args.steps} steps ...")
    hist = fit(model, task, _config("adapter", args))
    results = [(label, model.num_parameters(trainable_only=True), accuracy(model, task.test), hist)]
    after = base_checksums(model)
    changed = [n for n in before if before[n] != after[n]]
    print(f"\nbase checksum before adapter training: {digest(before)}")
    print(f"base checksum after adapter training:  {digest(after)}")
    if changed:
        print(f"FAIL: {len(changed)} of {len(before)} base arrays changed, e.g. {changed[0]}")
        return 1
    print(f"all {len(before)} base arrays are bit-for-bit unchanged")

    # --- the baselines, each from a fresh copy of the base
    for method in ("head", "full"):
        print(f"training {method} for {args.steps} steps from a fresh copy of the base ...")
        other = load_pretrained(args.base)
        other_label = prepare(other, method, task.n_classes, seed=args.seed)
        h = fit(other, task, _config(method, args))
        results.append((other_label, other.num_parameters(trainable_only=True), accuracy(other, task.test), h))
    total = model.num_parameters() - results[0][1]  # the base alone
    print(f"\n{'method':<22}{'trained params':>16}{'% of base':>11}{'best val':>10}{'test acc':>10}{'seconds':>9}")
    for lab, n, acc, h in results:
        print(f"{lab:<22}{n:>16,}{100 * n / total:>10.2f}%{h.best_val_acc:>10.3f}{acc:>10.3f}{h.seconds:>9.1f}")

    # --- save, reload into a fresh base, compare
    save_adapter(model, task.name, out, overwrite=args.overwrite)  # checked: shipped only with --overwrite
    print(f"\nsaved the adapter to {cli.shown(out)} ({out.stat().st_size / 1e3:.1f} kB)")
    fresh = load_pretrained(args.base)
    name = load_adapter(fresh, out)
    fresh.set_active_adapter(name)
    logits_a, _ = model.forward(task.test.ids, task.test.pad_mask, head="cls")
    logits_b, _ = fresh.forward(task.test.ids, task.test.pad_mask, head="cls")
    same_pred = np.array_equal(predict(model, task.test), predict(fresh, task.test))
    same_logits = np.array_equal(logits_a, logits_b)
    if not (same_pred and same_logits):
        print(f"FAIL: the reloaded adapter differs (same predictions: {same_pred}, "
              f"same logits: {same_logits})")
        return 1
    print(f"reloaded it into a fresh base: identical predictions and logits on all "
          f"{len(task.test)} test examples")
    print(f"done in {time.perf_counter() - t0:.0f} s on the {backend.current()} path "
          "(backend.py; the commands that train use the fast kernels)")
    return 0


class Tee(io.TextIOBase):
    """stdout that is also kept: what the demo prints goes to the terminal and into `kept`."""

    def __init__(self, stream):
        self.stream, self.kept = stream, io.StringIO()

    def write(self, text):
        self.kept.write(text)
        return self.stream.write(text)

    def flush(self):
        self.stream.flush()


def readme_block(output, argv, seconds):
    """The README's demo section: how it was made, then the run's output as printed."""
    when = time.strftime("%d %b %Y", time.gmtime())
    command = " ".join(["python -m minitransformer", *argv])
    return (f"Written by `{command}` ({when}, {os.cpu_count()} cores, {seconds:.0f} s); "
            f"run it again to refresh this block. Without `--quiet` each training shows a progress bar.\n\n"
            f"```\n{output.rstrip()}\n```")


def check_memory(base, args):
    """Refuse a --bottleneck whose adapter training would not fit in memory (sizes.py)."""
    config = AdapterConfig(bottleneck=args.bottleneck)
    batch = TrainConfig().batch_size
    need = sizes.step_bytes(base.config, batch, data.MAX_LEN, config)
    try:
        sizes.check_fits(need, f"--bottleneck: training an adapter with m={args.bottleneck} "
                               f"(batches of {batch} texts of {data.MAX_LEN} tokens)")
    except ValueError as e:
        raise cli.UsageError(str(e)) from e


def main(argv=None):
    p = cli.parser("demo", __doc__.split("\n")[0])
    p.add_argument("--task", default="agreement", choices=data.TASKS, help="the downstream task")
    p.add_argument("--bottleneck", type=int, default=8, help="adapter bottleneck size m (default 8)")
    p.add_argument("--steps", type=int, default=300, help="training steps per method (default 300)")
    p.add_argument("--seed", type=int, default=0, help="seed of the task data, init and training")
    p.add_argument("--out", default=None,
                   help=f"where to save the adapter (default {files.SCRATCH}/<task>.npz); an existing "
                        "file there must be an adapter checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="allow --out to be shipped work (the package folder, figures/, README.md)")
    p.add_argument("--base", default=str(BASE_PATH), help="the pretrained base (default: the shipped one)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--readme", default=None,
                   help="also write this run's output into the demo section of this README "
                        "(the repository's README.md needs --overwrite)")
    args = p.parse_args(argv)
    for name in ("bottleneck", "steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name}: expected a positive integer, got {getattr(args, name)}")
    if args.seed < 0:
        p.error(f"--seed: expected a non-negative integer, got {args.seed}")
    base = checked_base(args.base)  # a bad file is a bad argument: refused before any work
    check_memory(base, args)
    out = files.check_output(files.SCRATCH / f"{args.task}.npz" if args.out is None else args.out, "--out",
                             lambda path: file_format(path) == ADAPTER_FORMAT, "an adapter checkpoint",
                             args.overwrite, inputs={"--base": args.base})
    readme = None
    if args.readme is not None:
        readme = files.check_output(args.readme, "--readme", files.has_section("demo"),
                                    "a README with the demo markers", args.overwrite)
    if readme is None:
        return run(args, base, out)
    t0, tee = time.perf_counter(), Tee(sys.stdout)
    with contextlib.redirect_stdout(tee):
        code = run(args, base, out)
    if code == 0:
        files.write_section(readme, "demo", readme_block(tee.kept.getvalue(), argv if argv is not None
                                                         else sys.argv[1:], time.perf_counter() - t0))
        print(f"updated the demo section of {cli.shown(readme)}")
    return code
