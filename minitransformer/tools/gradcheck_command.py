"""python -m minitransformer gradcheck: every backward pass against centred finite differences,
in float64, on the reference path, the fast one, or both: every operation (gradcheck.operation_checks),
then every parameter of small models at a generic point (weights of std 0.3, LayerNorms moved off
1 and 0, masks and dropout on) for every norm order, head, adapter placement and method."""
import time
from dataclasses import replace

import numpy as np

from .. import backend
from ..configs import AdapterConfig, BitFitConfig, LoRAConfig, PrefixConfig, PromptConfig
from ..gradcheck import CHECK_CONFIG, MODEL_THRESHOLD, OP_THRESHOLD, check_model, operation_checks
from ..model import Transformer
from . import cli  # the commands' parser: one-line errors, --debug


METHOD_CONFIGS = {  # the other methods at a generic point: large LoRA ranks' A, long-ish prefixes
    "lora": lambda: LoRAConfig(r=2, alpha=2.0, targets=("q", "k", "v", "o", "ffn1", "ffn2")),
    "prefix": lambda: PrefixConfig(n_prefix=2, reparameterize=False, init_std=0.5),
    "prefix MLP": lambda: PrefixConfig(n_prefix=2, hidden=5, init_std=1.0),
    "prompt": lambda: PromptConfig(n_prompt=2, init="normal", init_std=0.5),
    "bitfit": lambda: BitFitConfig(),
}


def _generic_model(norm, head, placement=None, seed=0):
    """A small float64 model at a generic point (see module doc), masks and dropout on.
    placement: None (the bare base), an adapter placement, or a key of METHOD_CONFIGS."""
    cfg = replace(CHECK_CONFIG, norm=norm, causal=head == "lm", pooling="mean" if norm == "pre" else "first",
                  dropout=0.1)
    model = Transformer(cfg, seed=seed)
    rng = np.random.default_rng(seed + 100)
    for ln in model.norms().values():
        for p in ln.parameters():
            p.value += 0.3 * rng.standard_normal(p.value.shape)
    if placement:
        config = METHOD_CONFIGS[placement]() if placement in METHOD_CONFIGS else \
            AdapterConfig(bottleneck=3, init_std=0.3, placement=placement)
        s = model.add_adapter("task", config, n_classes=3, seed=seed)
        for p in s.parameters():  # off the method's start: B = 0 and the base's bias copies
            if ".lora.B_" in p.name or s.method == "bitfit":
                p.value += 0.3 * rng.standard_normal(p.value.shape)
        model.train_adapter("task")
    ids = rng.integers(0, cfg.vocab_size, (3, 6))
    pad_mask = np.ones((3, 6), bool)
    pad_mask[1, 4:] = False  # one padded sequence
    if head == "lm":
        targets = rng.integers(0, cfg.vocab_size, (3, 6))
        targets[~pad_mask] = -100  # padded positions do not count
    else:
        targets = np.array([0, 2, 1])
    return model, ids, targets, pad_mask


def model_variants():
    """(label, norm, head, placement) of every model the command checks: the bare base, the
    three adapter placements, and every other method (METHOD_CONFIGS) under the classification
    head (post-LN pools [CLS], pre-LN the mean) and under the causal LM head (pre-LN)."""
    out = [(f"{norm}-LN, {head} head", norm, head, None) for norm in ("post", "pre") for head in ("lm", "cls")]
    out += [(f"{norm}-LN, cls head, {pl} adapters, base frozen", norm, "cls", pl)
            for norm in ("post", "pre") for pl in ("houlsby", "ffn", "parallel")]
    out += [(f"{norm}-LN, {head} head, {method}, base frozen", norm, head, method)
            for method in METHOD_CONFIGS for norm, head in (("post", "cls"), ("pre", "cls"), ("pre", "lm"))]
    return out


def check_all(log=print, against=None):
    """Every operation, then every parameter of every model, on the current path -> (worst
    error, [what failed]). against: beside each model's rows, another check of its gradients,
    against(model, ids, targets, pad_mask, head, dropout_seed, rows) -> (lines, passed): PyTorch's
    autograd (torch_twin.gradcheck_lines), printed under the model's rows."""
    worst, failed = 0.0, []
    log(f"{'operation':<44}{'input':<12}{'shape':<16}{'rel. error':>12}")
    for op, name, shape, err in operation_checks():
        flag = "" if err <= OP_THRESHOLD else "  FAIL"
        log(f"{op:<44}{name:<12}{str(shape):<16}{err:>12.2e}{flag}")
        worst = max(worst, err)
        if flag:
            failed.append(f"{op}: {name}")
    for label, norm, head, placement in model_variants():
        model, ids, targets, pad_mask = _generic_model(norm, head, placement)
        log(f"\nmodel: {label} (causal={model.config.causal}, padding mask, dropout 0.1 replayed)")
        log(f"{'parameter':<40}{'shape':<12}{'trainable':<11}{'max rel. error':>30}")
        try:
            rows = check_model(model, ids, targets, pad_mask, head, dropout_seed=7)
        except AssertionError as e:  # a frozen parameter received a gradient
            log(f"FAIL: {e}")
            failed.append(f"{label}: {e}")
            continue
        for name, shape, trainable, err in rows:
            if err is None:
                log(f"{name:<40}{str(shape):<12}{'no':<11}{'frozen — no gradient computed':>30}")
                continue
            flag = "" if err <= MODEL_THRESHOLD else "  FAIL"
            log(f"{name:<40}{str(shape):<12}{'yes':<11}{err:>30.2e}{flag}")
            worst = max(worst, err)
            if flag:
                failed.append(f"{label}: {name}")
        if against:
            lines, passed = against(model, ids, targets, pad_mask, head, 7, rows)
            log("\n".join(lines))
            failed += [] if passed else [f"{label}: PyTorch autograd"]
    return worst, failed


def main(argv=None):
    """python -m minitransformer gradcheck: every operation, then every parameter of every model."""
    parser = cli.parser("gradcheck", "Check every backward pass against centred finite differences "
                                     "in float64; exit 0 only if every check passes.")
    parser.add_argument("--path", choices=(*backend.PATHS, "both"), default="reference",
                        help="which code to check: the reference passes (default), the fast kernels, or both")
    parser.add_argument("--against", choices=("torch",), help="also compare every model's gradients with "
                        "PyTorch's autograd (needs PyTorch: pip install .[compare])")
    args = parser.parse_args(argv)
    against = None
    if args.against:
        from . import torch_twin
        if not torch_twin.available():
            raise ImportError(f"--against torch: {torch_twin.INSTALL}")
        against = torch_twin.gradcheck_lines
    paths = backend.PATHS if args.path == "both" else (args.path,)
    start, worst, failed = time.time(), 0.0, []
    for path in paths:
        print(f"Gradient checks of the {path} path, float64, centred differences (h=1e-5). "
              f"Thresholds: {OP_THRESHOLD:.0e} per operation, {MODEL_THRESHOLD:.0e} per model.\n")
        with backend.using(path):
            w, f = check_all(against=against)
        print(f"\n{path} path: {len(f)} check(s) failed; max relative error {w:.2e}\n")
        worst, failed = max(worst, w), failed + [f"{path}: {x}" for x in f]
    print(f"{len(failed)} check(s) failed{': ' + ', '.join(failed) if failed else ''}; "
          f"{time.time() - start:.1f} s")
    print(f"max relative error: {worst:.2e}")
    return 1 if failed else 0
