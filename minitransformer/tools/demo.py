"""The demo, `python -m minitransformer`: one task's adapter on the shipped base, end to end.

    python -m minitransformer [--task agreement] [--bottleneck 8] [--steps 300] [--seed 0] [--out PATH]

1. load the shipped pretrained base and fingerprint every base array (sha256 of its bytes);
2. add a Houlsby adapter for the task, print the parameter report, train only the adapter;
3. fingerprint again: every base array must be bit-for-bit unchanged (exit 1 if not);
4. train head-only and full fine-tuning from fresh copies of the base, same budget, and compare
   the three test accuracies;
5. save the adapter, load it into a fresh copy of the base, and check that the predictions and
   logits are identical (exit 1 if not).
"""
import argparse
import hashlib
import tempfile
import time
from pathlib import Path

import numpy as np

from . import data
from ..adapters import AdapterConfig
from .checkpoint import load_adapter, save_adapter
from .pretrain import BASE_PATH, load_pretrained
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


def run(args):
    t0 = time.perf_counter()
    task = data.load_task(args.task, seed=args.seed)
    print(f"task {task.name!r}: {task.description}; {task.n_classes} classes, "
          f"{len(task.train)}/{len(task.val)}/{len(task.test)} train/val/test examples")

    # --- the adapter, on the shipped base
    model = load_pretrained(args.base)
    print(f"loaded the pretrained base from {args.base}: {model.num_parameters():,} parameters")
    before = base_checksums(model)
    config = AdapterConfig(bottleneck=args.bottleneck)
    label = prepare(model, "adapter", task.n_classes, seed=args.seed, adapter_config=config, name=task.name)
    print(f"\nadded a Houlsby adapter {task.name!r} (bottleneck m={args.bottleneck}); only it trains:")
    model.print_trainable_parameters()
    print(f"\ntraining {label} for {args.steps} steps ...")
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
        print(f"\ntraining {method} for {args.steps} steps from a fresh copy of the base ...")
        other = load_pretrained(args.base)
        other_label = prepare(other, method, task.n_classes, seed=args.seed)
        h = fit(other, task, _config(method, args))
        results.append((other_label, other.num_parameters(trainable_only=True), accuracy(other, task.test), h))
    total = model.num_parameters() - results[0][1]  # the base alone
    print(f"\n{'method':<22}{'trained params':>16}{'% of base':>11}{'best val':>10}{'test acc':>10}{'seconds':>9}")
    for lab, n, acc, h in results:
        print(f"{lab:<22}{n:>16,}{100 * n / total:>10.2f}%{h.best_val_acc:>10.3f}{acc:>10.3f}{h.seconds:>9.1f}")

    # --- save, reload into a fresh base, compare
    out = Path(args.out) if args.out else Path(tempfile.gettempdir()) / "minitransformer" / f"{task.name}.npz"
    save_adapter(model, task.name, out)
    print(f"\nsaved the adapter to {out} ({out.stat().st_size / 1e3:.1f} kB)")
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
    print(f"done in {time.perf_counter() - t0:.0f} s")
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m minitransformer", description=__doc__.split("\n")[0])
    p.add_argument("--task", default="agreement", choices=data.TASKS, help="the downstream task")
    p.add_argument("--bottleneck", type=int, default=8, help="adapter bottleneck size m (default 8)")
    p.add_argument("--steps", type=int, default=300, help="training steps per method (default 300)")
    p.add_argument("--seed", type=int, default=0, help="seed of the task data, init and training")
    p.add_argument("--out", default=None, help="where to save the adapter (default: a temp folder)")
    p.add_argument("--base", default=str(BASE_PATH), help="the pretrained base (default: the shipped one)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    for name in ("bottleneck", "steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name}: expected a positive integer, got {getattr(args, name)}")
    if args.seed < 0:
        p.error(f"--seed: expected a non-negative integer, got {args.seed}")
    return run(args)
