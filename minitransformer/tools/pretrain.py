"""Pretrain the shipped base: a small post-LN BERT trained by masked tokens on data.py's corpus.

    python -m minitransformer pretrain [--steps N] [--seed S] [--out PATH] [--overwrite] [--quiet]

It writes to a scratch folder (files.SCRATCH) unless --out says otherwise; replacing the shipped
file takes `--out minitransformer/assets/base.npz --overwrite`.

Deterministic: the corpus, the masks, the dropout and the batch order all come from --seed, and
the matrix products run on one BLAS thread (threadpoolctl), so a re-run on the same machine
writes bit-identical weights.

The shipped file (minitransformer/assets/base.npz) is BASE_CONFIG (post-LN, 4 blocks, 4 heads,
d_model 64, d_ff 256, vocabulary 99, max_len 32, dropout 0.1): 214,883 parameters, a 0.88 MB
file, trained for STEPS = 4000 steps of 64 texts with seed 0. Measured with `time python -m
minitransformer pretrain --quiet` on the shared 2-core machine, other jobs running: 363 s and
365 s (up to 479 s when busier); held-out masked-token loss 1.8551, accuracy 0.4392. (Much of
the text is unpredictable by design: which noun, which adjective.) Those two runs wrote
bit-identical arrays (all 71 compared). The weights depend on the exact order of floating-point
operations, so a change to the numerics of layers.py or optim.py moves their last bits (~1e-6):
re-run this command and commit the new file after such a change.
"""
import contextlib
import time

import numpy as np

from .. import backend
from . import cli, data, files
from ..model import ModelConfig, Transformer
from ..optim import AdamW, clip_grad_norm, lr_at
from .train import DivergedError

BASE_PATH = files.ASSETS / "base.npz"
# sha256 over the shipped base's arrays (demo.digest(demo.base_checksums(model))): the demo
# says so when it runs on any other base. Re-pretraining the shipped file changes it.
BASE_SHA256 = "6aa2a314e48ba429fe7bb9475c8feb5edb922267f91313f303460cca896b283b"
BASE_CONFIG = ModelConfig(vocab_size=data.VOCAB_SIZE, max_len=data.MAX_LEN, d_model=64, n_heads=4,
                          n_layers=4, d_ff=256, norm="post", causal=False, pooling="first",
                          dropout=0.1)
STEPS = 4000  # optimizer steps of the shipped base
BATCH = 64  # texts per step
LR, WARMUP, FINAL = 1e-3, 200, 0.1  # peak LR, warmup steps, final LR as a fraction of the peak
CORPUS = 50_000  # texts in the pretraining corpus


def load_pretrained(path=BASE_PATH):
    """The shipped pretrained base, as a fresh Transformer (no adapters, no classifier)."""
    from .checkpoint import load_base
    return load_base(path)


def checked_base(path, arg="--base"):
    """The base at `path`, given as argument `arg` -> Transformer; cli.UsageError if the file is
    not a loadable base or not one for data.py's texts (its vocabulary and length)."""
    from .checkpoint import CheckpointError
    try:
        model = load_pretrained(path)
    except CheckpointError as e:
        raise cli.UsageError(f"{arg}: {str(e).removeprefix('path: ')}") from e
    cfg = model.config
    if cfg.vocab_size < data.VOCAB_SIZE or cfg.max_len < data.MAX_LEN:
        raise cli.UsageError(f"{arg}: expected a base for data.py's texts (vocab_size >= {data.VOCAB_SIZE}, "
                             f"max_len >= {data.MAX_LEN}), got vocab_size={cfg.vocab_size}, "
                             f"max_len={cfg.max_len}")
    return model


def one_thread():
    """Run NumPy's BLAS on one thread: reproducible sums, and fair to a shared machine."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # the package itself needs only NumPy
        return contextlib.nullcontext()
    return threadpool_limits(limits=1)


def mlm_eval(model, split, rng, batch_size=256):
    """Masked-token loss and accuracy on `split` with masks drawn from `rng` -> (loss, acc)."""
    total = correct = 0
    loss_sum = 0.0
    for start in range(0, len(split), batch_size):
        part = split[start:start + batch_size]
        inputs, targets = data.mask_tokens(part.ids, part.pad_mask, rng)
        logits, loss = model.loss(inputs, targets, part.pad_mask, head="lm")
        keep = targets != -100  # (b,T)
        n = int(keep.sum())
        loss_sum += loss * n
        total += n
        correct += int((logits.argmax(-1)[keep] == targets[keep]).sum())
    return loss_sum / total, correct / total


def pretrain(steps=STEPS, seed=0, config=BASE_CONFIG, progress=True, log=print, n_texts=CORPUS):
    """Masked-token pretraining from scratch on n_texts texts -> (model, {"loss", "acc",
    "seconds"}) where loss and acc are measured on 2000 held-out texts."""
    from tqdm import tqdm
    t0 = time.perf_counter()
    corpus = data.pretraining_corpus(n_texts, seed)
    held_out = data.pretraining_corpus(2000, seed + 1)
    model = Transformer(config, seed)
    params = model.parameters(trainable_only=True)
    opt = AdamW(params, lr=LR, weight_decay=0.01)
    rng = np.random.default_rng([seed, 7])  # masks, dropout and batch order
    stream = data.batches(corpus, BATCH, rng)
    bar = tqdm(range(steps), disable=not progress, desc="pretrain", dynamic_ncols=True)
    for step in bar:
        b = next(stream)
        inputs, targets = data.mask_tokens(b.ids, b.pad_mask, rng)
        opt.lr = lr_at(step, LR, WARMUP, steps, FINAL)
        opt.zero_grad()
        _, loss = model.loss(inputs, targets, b.pad_mask, head="lm", train=True, rng=rng, backward=True)
        if not np.isfinite(loss):  # nothing is saved: an existing checkpoint stays as it was
            raise DivergedError(f"pretraining stopped at step {step}: the masked-token loss became "
                                f"{loss} (learning rate {opt.lr:.3g}); nothing was written")
        clip_grad_norm(params, 1.0)
        opt.step()
        if step % 50 == 0:
            bar.set_postfix(mlm_loss=f"{loss:.3f}")
        if log and (step + 1) % 500 == 0 and not progress:
            log(f"step {step + 1}/{steps}: batch MLM loss {loss:.4f}")
    opt.zero_grad()
    loss, acc = mlm_eval(model, held_out, np.random.default_rng([seed, 8]))
    return model, {"loss": loss, "acc": acc, "seconds": time.perf_counter() - t0}


def main(argv=None):
    p = cli.parser("pretrain", __doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=STEPS, help=f"optimizer steps (default {STEPS})")
    p.add_argument("--seed", type=int, default=0, help="seed of corpus, init, masks (default 0)")
    p.add_argument("--out", default=None,
                   help=f"where to write the base (default {files.SCRATCH / 'base.npz'}); an existing "
                        "file there must be a base checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="allow --out to be shipped work, e.g. the shipped base "
                        "minitransformer/assets/base.npz")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error(f"--steps: expected a positive integer, got {args.steps}")
    if args.seed < 0:
        p.error(f"--seed: expected a non-negative integer, got {args.seed}")
    from .checkpoint import BASE_FORMAT, file_format, save_base
    out = files.check_output(files.SCRATCH / "base.npz" if args.out is None else args.out, "--out",
                             lambda path: file_format(path) == BASE_FORMAT, "a base checkpoint",
                             args.overwrite)
    with one_thread():
        model, result = pretrain(args.steps, args.seed, progress=not args.quiet, n_texts=CORPUS)
    save_base(model, out, overwrite=args.overwrite)  # checked above: shipped only with --overwrite
    print(f"pretrained {model.num_parameters():,} parameters for {args.steps} steps in "
          f"{result['seconds']:.0f} s on the {backend.current()} path; held-out masked-token loss {result['loss']:.4f}, "
          f"accuracy {result['acc']:.4f}")
    print(f"wrote {cli.shown(out)} ({out.stat().st_size / 1e6:.2f} MB)")
    if out.resolve() != BASE_PATH.resolve():
        print(f"the shipped base is unchanged; to replace it: --out {cli.shown(BASE_PATH)} --overwrite")
    return 0
