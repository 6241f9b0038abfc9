"""Proof that a change to the fast kernels leaves training bit for bit as it was.

    python tests/fast_path_bits.py --save DIR      # on the tree before the change
    python tests/fast_path_bits.py --compare DIR   # on the tree after it: exit 0 only if equal

Trains the shipped base for 20 AdamW steps with each of adapters, full fine-tuning, LoRA and a
prefix through its MLP (plus BitFit and a prompt), on the fast path, with one BLAS thread
(threadpoolctl) and one elementwise thread, dropout on, on batches of a real task with padding;
then saves (or compares with np.array_equal) every parameter, every loss and the last logits.
One thread because that is how the long experiments run (pretrain and figures pin BLAS to one
thread so that sums repeat): the bits that must not move are those. The run also repeats the
same with two elementwise threads (by_rows splits rows only, so the bits must not change either).
"""
import argparse
import sys
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from minitransformer import backend, optim
from minitransformer.adapters import AdapterConfig
from minitransformer.peft import BitFitConfig, LoRAConfig, PrefixConfig, PromptConfig
from minitransformer.tools import data, runtime
from dataclasses import replace

from minitransformer.model import Transformer
from minitransformer.tools.checkpoint import load_base
from minitransformer.tools.pretrain import BASE_PATH, load_pretrained

STEPS = 20
METHODS = {"adapter": lambda: AdapterConfig(bottleneck=16), "full": lambda: None,
           "lora": lambda: LoRAConfig(r=8), "prefix": lambda: PrefixConfig(n_prefix=8),
           "prompt": lambda: PromptConfig(n_prompt=8), "bitfit": lambda: BitFitConfig(),
           "adapter_ln_frozen": lambda: AdapterConfig(bottleneck=16, train_layernorm=False)}


def train(method, threads):
    runtime.set_threads(threads)
    model = load_base(BASE_PATH, Transformer(replace(load_pretrained().config, dropout=0.1)))
    task = data.load_task(data.TASKS[0])
    config = METHODS[method]()
    if config is None:
        model.add_classifier(task.n_classes, seed=3)
    else:
        model.add_adapter("task", config, n_classes=task.n_classes, seed=3)
        model.train_adapter("task")
    opt = optim.AdamW(model.parameters(), lr=1e-3)
    rng, drop = np.random.default_rng(0), np.random.default_rng(1)
    out = {}
    for step in range(STEPS):
        idx = rng.choice(len(task.train), 32, replace=False)
        batch = task.train[idx]
        opt.zero_grad()
        logits, loss = model.loss(batch.ids, batch.labels, batch.pad_mask, head="cls", train=True,
                                  rng=drop, backward=True)
        opt.step()
        out[f"loss_{step}"] = np.array(loss)
    out["logits"] = logits
    out.update({f"param:{n}": p.value for n, p in model.named_parameters().items()})
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--save", metavar="DIR")
    what.add_argument("--compare", metavar="DIR")
    args = parser.parse_args(argv)
    backend.use("fast")
    bad = 0
    with threadpool_limits(limits=1, user_api="blas"):
        for method in METHODS:
            for threads in (1, 2):
                arrays = train(method, threads)
                path = Path(args.save or args.compare) / f"{method}_threads{threads}.npz"
                if args.save:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    np.savez(path, **arrays)
                    print(f"saved {method} ({threads} elementwise threads): {len(arrays)} arrays")
                    continue
                ref = np.load(path)
                diff = [k for k in arrays if k not in ref or not np.array_equal(arrays[k], ref[k])]
                diff += [k for k in ref.files if k not in arrays]
                bad += bool(diff)
                print(f"{method} ({threads} elementwise threads): "
                      f"{'bit-identical' if not diff else f'{len(diff)} arrays differ, e.g. {diff[:3]}'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
