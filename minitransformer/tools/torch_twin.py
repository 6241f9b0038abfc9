"""The same model in PyTorch, built from the same weights: autograd checks the hand-written
backward, and PyTorch's eager step is the yardstick of the NumPy one.

Optional: it needs PyTorch (`pip install .[compare]`, the CPU build is enough). Nothing else in the
package imports it; `available()` says whether it can run.

    twin = TorchTwin(model)            # every named parameter copied, the names one to one
    logits, loss = twin.loss(ids, targets, pad_mask, head="cls")   # torch tensors
    loss.backward(); twin.grads()      # {name: array} of every trainable parameter
    compare_gradients(model, ids, targets, ...)   -> {name: relative error}, loss difference
    against_torch(b)                   # `bench --against torch`: checked, then timed

The twin reads only the model's public surface: its config, `named_parameters()` (a task's own
copy of a base parameter, adapters.<task>.blocks.0.ln1.gamma, stands in for blocks.0.ln1.gamma,
as the model's `own` does), the active task's config and whether a LoRA task is merged. Its
forward is written in PyTorch's own idiom (F.linear, F.layer_norm, F.gelu, F.cross_entropy,
torch.optim.AdamW), the attention as its matrix products and softmax, as attention.py writes it.
Dropout replays the model's masks: the same generator draws the same arrays in the same order.
"""
import math

import numpy as np

from ..report import group_of

INSTALL = "PyTorch is not installed: pip install .[compare] (or pip install torch, the CPU build) to compare with it"
THRESHOLD = 1e-9  # float64: the two computations differ only by the order of their roundings


def available():
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def _torch():
    import torch
    import torch.nn.functional as F
    return torch, F


def rel_error(a, b):
    """max|a - b| / max(max|a| + max|b|, 1e-3), over a whole array (gradcheck.rel_error's measure)."""
    from ..gradcheck import rel_error as measure
    return measure(a, b)


# ----------------------------------------------------------------------------- the twin


class TorchTwin:
    """A PyTorch copy of a Transformer's parameters and its forward (see the module doc)."""

    def __init__(self, model):
        torch, _ = _torch()
        self.model, self.config = model, model.config
        self.p = {name: torch.tensor(p.value).requires_grad_(p.trainable)
                  for name, p in model.named_parameters().items()}
        self.task = model.adapters[model.active_adapter] if model.active_adapter else None
        self.pre = f"adapters.{model.active_adapter}." if self.task else None

    # ------------------------------------------------------------------ what the optimizer sees

    def trainable(self):
        return {n: t for n, t in self.p.items() if t.requires_grad}

    def adamw(self, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        """torch.optim.AdamW as optim.AdamW: decay on matrices only."""
        torch, _ = _torch()
        ps = list(self.trainable().values())
        groups = [{"params": [t for t in ps if t.ndim >= 2], "weight_decay": weight_decay},
                  {"params": [t for t in ps if t.ndim < 2], "weight_decay": 0.0}]
        return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas, eps=eps)

    def grads(self):
        """{name: gradient array} of every trainable parameter (zeros where the loss never used it)."""
        return {n: (t.grad.numpy() if t.grad is not None else np.zeros(tuple(t.shape), self.model.dtype))
                for n, t in self.trainable().items()}

    # ------------------------------------------------------------------ parameters by name

    def w(self, path, local):
        """The active task's own copy of path.local if it has one, else the base's."""
        own = f"{self.pre}{path}.{local}" if self.pre else None
        return self.p[own] if own in self.p else self.p[f"{path}.{local}"]

    def task_p(self, name):
        """The active task's parameter `name` (adapters.<task>.name), or None."""
        return self.p.get(f"{self.pre}{name}") if self.pre else None

    # ------------------------------------------------------------------ the forward

    def forward(self, ids, pad_mask=None, head="lm", train=False, rng=None):
        """As Transformer.forward: ids (B, T) -> logits (B, T, V) or (B, K), a torch tensor."""
        torch, F = _torch()
        cfg, L, C = self.config, self.config.n_layers, self.config.d_model
        B, T = ids.shape
        drop = self._dropout(train, rng)
        ids_t = torch.from_numpy(np.ascontiguousarray(ids))
        x = self.p["embed.W_tok"][ids_t] + self.p["embed.W_pos"][:T]  # (B,T,C)
        prompt = self.task_p("prompt.P")
        n = 0 if prompt is None else prompt.shape[0]
        keys = None if pad_mask is None else torch.from_numpy(np.ascontiguousarray(pad_mask))
        if n:
            x = torch.cat([prompt.expand(B, n, C), x], dim=1)  # (B,n+T,C)
            if keys is not None:
                keys = torch.cat([torch.ones(B, n, dtype=torch.bool), keys], dim=1)
        if cfg.norm == "post":
            x = self._ln(x, "ln_emb")
        x = drop(x)
        prefixes = self._prefixes()
        n_prefix = 0 if prefixes is None else prefixes[0][0].shape[0]
        bias = self._bias(B, n + T, keys, n_prefix, x.dtype)
        for i in range(L):
            x = self._block(i, x, bias, None if prefixes is None else prefixes[i], drop)
        if cfg.norm == "pre":
            x = self._ln(x, "ln_f")
        x = x[:, n:]  # the heads see the real tokens only
        if head == "lm":
            return F.linear(x, self.p["lm_head.W"].T, self.p["lm_head.b"])  # (B,T,V)
        name = f"{self.pre}head" if self.pre else "cls_head"
        if cfg.pooling == "first":
            pooled = x[:, 0]  # (B,C)
        else:
            keep = torch.ones(B, T, dtype=x.dtype) if pad_mask is None else \
                torch.from_numpy(pad_mask.astype(self.model.dtype))
            pooled = torch.einsum("bt,btc->bc", keep / keep.sum(1, keepdim=True).clamp(min=1), x)
        return F.linear(pooled, self.p[f"{name}.W"].T, self.p[f"{name}.b"])  # (B,K)

    def loss(self, ids, targets, pad_mask=None, head="lm", train=False, rng=None, ignore_index=-100):
        """-> (logits, mean cross-entropy over the targets that are not ignore_index)."""
        torch, F = _torch()
        logits = self.forward(ids, pad_mask, head, train, rng)
        t = torch.from_numpy(np.ascontiguousarray(targets)).long()
        return logits, F.cross_entropy(logits.reshape(-1, logits.shape[-1]), t.reshape(-1),
                                       ignore_index=ignore_index)

    def _dropout(self, train, rng):
        """The model's inverted dropout, its masks drawn from `rng` exactly as layers.dropout_forward."""
        p, dtype = self.config.dropout, self.model.dtype
        if not train or p == 0:
            return lambda x: x
        torch, _ = _torch()
        scale = float(dtype.type(1 / (1 - p)))
        return lambda x: x * torch.from_numpy(rng.random(tuple(x.shape), dtype=dtype) >= p) * scale

    def _bias(self, B, T, keys, n_prefix, dtype):
        """0 where a query may see a key, -inf where not: (B|1, 1, T, n_prefix + T), or None."""
        torch, _ = _torch()
        if not self.config.causal and keys is None:
            return None
        allowed = torch.ones(1, 1, T, T, dtype=torch.bool)
        if self.config.causal:
            allowed = allowed & torch.ones(T, T, dtype=torch.bool).tril()
        if keys is not None:
            allowed = allowed & keys[:, None, None, :]
        allowed = torch.cat([torch.ones(*allowed.shape[:3], n_prefix, dtype=torch.bool), allowed], dim=-1)
        return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, float("-inf"))

    def _ln(self, x, path):
        _, F = _torch()
        return F.layer_norm(x, (x.shape[-1],), self.w(path, "gamma"), self.w(path, "beta"), self.config.ln_eps)

    def _linear(self, x, path, W, b, lora_target=None, block=None):
        """x W + b, plus the active LoRA task's branch s (x A) B on this weight (unless merged)."""
        _, F = _torch()
        out = F.linear(x, self.w(path, W).T, self.w(path, b))
        A = self.task_p(f"blocks.{block}.lora.A_{lora_target}") if lora_target else None
        if A is not None and not self.task.merged:
            out = out + self.task.config.scale * ((x @ A) @ self.task_p(f"blocks.{block}.lora.B_{lora_target}"))
        return out

    def _adapter(self, i, site, h):
        """Houlsby's bottleneck: h + s (f(h W_down + b_down) W_up + b_up); the parallel branch has no skip."""
        torch, F = _torch()
        a = f"blocks.{i}.{site}"
        z = F.linear(h, self.task_p(f"{a}.W_down").T, self.task_p(f"{a}.b_down"))
        f = {"gelu": lambda z: F.gelu(z, approximate="tanh"), "relu": torch.relu,
             "tanh": torch.tanh}[self.task.config.nonlinearity]
        u = F.linear(f(z), self.task_p(f"{a}.W_up").T, self.task_p(f"{a}.b_up"))
        s = self.task.config.scaling
        u = u * s if s != 1 else u
        return u if site == "parallel" else h + u

    def _attention(self, i, x, bias, prefix):
        torch, _ = _torch()
        B, T, C = x.shape
        H = self.config.n_heads
        hs = C // H
        path = f"blocks.{i}.attn"
        q, k, v = (self._linear(x, path, f"W_{t}", f"b_{t}", t, i) for t in "qkv")  # (B,T,C)
        if prefix is not None:  # the prefix's keys and values in front of the sequence's own
            k = torch.cat([prefix[0].expand(B, *prefix[0].shape), k], dim=1)  # (B,n+T,C)
            v = torch.cat([prefix[1].expand(B, *prefix[1].shape), v], dim=1)
        q, k, v = (t.view(B, t.shape[1], H, hs).transpose(1, 2) for t in (q, k, v))  # (B,H,T,hs)
        s = q @ k.transpose(-1, -2) * (1 / math.sqrt(hs))  # (B,H,T,n+T)
        if bias is not None:
            s = s + bias
        ctx = (torch.softmax(s, dim=-1) @ v).transpose(1, 2).reshape(B, T, C)  # (B,T,C)
        return self._linear(ctx, path, "W_o", "b_o", "o", i)

    def _ffn(self, i, x):
        _, F = _torch()
        path = f"blocks.{i}.ffn"
        h = F.gelu(self._linear(x, path, "W_1", "b_1", "ffn1", i), approximate="tanh")  # (B,T,F)
        return self._linear(h, path, "W_2", "b_2", "ffn2", i)

    def _has(self, i, site):
        return self.task_p(f"blocks.{i}.{site}.W_down") is not None

    def _block(self, i, x, bias, prefix, drop):
        pre = self.config.norm == "pre"
        a = self._attention(i, self._ln(x, f"blocks.{i}.ln1") if pre else x, bias, prefix)
        a = drop(a)
        if self._has(i, "attn"):
            a = self._adapter(i, "attn", a)
        h = x + a
        if not pre:
            h = self._ln(h, f"blocks.{i}.ln1")
        f_in = self._ln(h, f"blocks.{i}.ln2") if pre else h
        f = drop(self._ffn(i, f_in))
        if self._has(i, "ffn"):
            f = self._adapter(i, "ffn", f)
        if self._has(i, "parallel"):
            f = f + self._adapter(i, "parallel", f_in)
        out = h + f
        return self._ln(out, f"blocks.{i}.ln2") if not pre else out

    def _prefixes(self):
        """[(P_k, P_v)] per block, each (n, C): direct, or from Li & Liang's MLP; None without."""
        torch, F = _torch()
        L, C = self.config.n_layers, self.config.d_model
        if self.task_p("blocks.0.prefix.P_k") is not None:
            return [(self.task_p(f"blocks.{i}.prefix.P_k"), self.task_p(f"blocks.{i}.prefix.P_v")) for i in range(L)]
        P0 = self.task_p("prefix_mlp.P0")
        if P0 is None:
            return None
        mlp = lambda k: self.task_p(f"prefix_mlp.{k}")  # noqa: E731
        y = F.linear(torch.tanh(F.linear(P0, mlp("W_1").T, mlp("b_1"))), mlp("W_2").T, mlp("b_2"))  # (n, 2LC)
        kv = y.reshape(P0.shape[0], L, 2, C).permute(1, 2, 0, 3)  # (L, 2, n, C)
        return [(kv[i, 0], kv[i, 1]) for i in range(L)]


# ----------------------------------------------------------------------------- gradients


def compare_gradients(model, ids, targets, pad_mask=None, head="lm", dropout_seed=None):
    """The model's own backward against PyTorch's autograd on the same batch, float64.

    Returns ({trainable parameter name: relative error}, |loss difference|). With dropout_seed,
    both run in training mode with the masks of a generator seeded anew (gradcheck.model_loss).
    """
    train = dropout_seed is not None
    rng = (lambda: np.random.default_rng(dropout_seed)) if train else (lambda: None)
    model.zero_grad()
    _, loss = model.loss(ids, targets, pad_mask, head, train=train, rng=rng(), backward=True)
    twin = TorchTwin(model)
    _, tloss = twin.loss(ids, targets, pad_mask, head, train=train, rng=rng())
    tloss.backward()
    theirs = twin.grads()
    errors = {}
    for name, p in model.named_parameters().items():
        if p.trainable:
            errors[name] = rel_error(np.zeros_like(p.value) if p.grad is None else p.grad, theirs[name])
    return errors, abs(loss - float(tloss.detach()))


def by_group(errors):
    """{parameter group (tasks.group_of): worst relative error}, in the order first seen."""
    out = {}
    for name, err in errors.items():
        g = group_of(name)
        out[g] = max(out.get(g, 0.0), err)
    return out


def gradcheck_lines(model, ids, targets, pad_mask=None, head="lm", dropout_seed=None, rows=()):
    """What `gradcheck --against torch` prints under a model's rows, and whether it passed: per
    parameter group, the worst relative error against PyTorch's autograd, beside the worst against
    finite differences (rows: check_model's (name, shape, trainable, error))."""
    errors, dloss = compare_gradients(model, ids, targets, pad_mask, head, dropout_seed)
    groups = by_group(errors)
    fd = by_group({name: err for name, _, _, err in rows if err is not None})
    worst = max([dloss, *groups.values()])
    lines = [f"per group, worst relative error: PyTorch autograd (same weights and dropout masks; |loss "
             f"difference| {dloss:.1e}) beside finite differences",
             f"  {'group':<24}{'autograd':>12}{'finite diff.':>14}"]
    for g, err in groups.items():
        lines.append(f"  {g:<24}{err:>12.2e}{fd[g] if g in fd else float('nan'):>14.2e}"
                     f"{'' if err <= THRESHOLD else '  FAIL (autograd threshold ' + f'{THRESHOLD:.0e})'}")
    return lines, worst <= THRESHOLD


# ----------------------------------------------------------------------------- bench --against torch


CASES = ("full step", "adapter step", "adapter step, LayerNorms frozen", "forward with adapters")
TARGET = 1.00  # NumPy / PyTorch at most this, each, for the cases below
TARGET_CASES = ("full step", "adapter step", "forward with adapters")


def _models(b, seed=0):
    """{case: (model, AdamW or None)} on the benchmark's builders, in b's dtype."""
    from .bench import adapter_model, full_model, with_adapters
    return {"full step": full_model(b, seed), "adapter step": adapter_model(b, b.bottleneck, seed),
            "adapter step, LayerNorms frozen": adapter_model(b, b.bottleneck, seed, train_layernorm=False),
            "forward with adapters": (with_adapters(b, b.bottleneck, seed), None)}


def check_float64(b):
    """{case: (|loss difference|, worst gradient relative error)} at b's sizes in float64: the
    NumPy fast path (as timed) against autograd on the benchmark's batch."""
    from dataclasses import replace

    from .. import backend
    from .bench import make_batch
    ids, labels = make_batch(b)
    b64 = replace(b, dtype="float64")
    out = {}
    with backend.using("fast"):
        for case, (model, _) in _models(b64).items():
            if case == "forward with adapters":  # the forward alone: compare the logits
                logits, _ = model.forward(ids, head="cls")
                with _torch()[0].no_grad():
                    theirs = TorchTwin(model).forward(ids, head="cls").numpy()
                out[case] = (rel_error(logits, theirs), 0.0)
                continue
            errors, dloss = compare_gradients(model, ids, labels, head="cls")
            out[case] = (dloss, max(errors.values()))
    return out


def against_torch(b, repeats=None, log=print):
    """Check (float64), then time the NumPy fast path against PyTorch eager (float32): each case
    (full step, adapter step, LayerNorm-frozen step, forward) by torch_ops.side_by_side, each library
    in runs of its own, then each fast kernel beside PyTorch's operation (torch_ops). Returns a
    JSON-ready dict.

    Case by case: a run's time depends on what ran just before it. With one repetition of every
    case after another, PyTorch's forward right after a PyTorch training step took 113 ms where
    after a forward of either library it took 120-125 ms (medians of 12, one process, 2 cores)."""
    import os

    import torch

    from .. import backend
    from . import runtime
    from .bench import make_batch, train_step
    from .torch_ops import operation_times, side_by_side
    torch.set_num_threads(runtime.threads())  # as many threads as the fast path's (bench --threads)
    checks = check_float64(b)
    worst = max(max(v) for v in checks.values())
    log(f"float64 check at these sizes (fast path against autograd): worst |loss difference| or gradient "
        f"relative error {worst:.1e} (threshold {THRESHOLD:.0e})")
    ids, labels = make_batch(b)
    jobs = {}
    for case, (model, opt) in _models(b).items():
        twin = TorchTwin(model)
        if opt is None:
            def np_job(model=model):
                model.forward(ids, head="cls")

            def torch_job(twin=twin):
                with torch.no_grad():
                    twin.forward(ids, head="cls")
        else:
            topt = twin.adamw()

            def np_job(model=model, opt=opt):
                train_step(model, opt, ids, labels)

            def torch_job(twin=twin, topt=topt):
                topt.zero_grad(set_to_none=True)
                twin.loss(ids, labels, head="cls")[1].backward()
                topt.step()
        jobs[case] = (np_job, torch_job)
    repeats = repeats or max(b.repeats, 16)
    load = os.getloadavg()[0]
    with backend.using("fast"):
        scale = _time_alike({case: pair[0] for case, pair in jobs.items()})
        timed = {case: side_by_side(*pair, repeats * scale[case]) for case, pair in jobs.items()}
    operations = operation_times(b, repeats)
    res = {"checks": {c: {"loss_difference": v[0], "worst_gradient_error": v[1]} for c, v in checks.items()},
           "check_passed": worst <= THRESHOLD, "repeats": repeats, "torch": torch.__version__,
           "torch_threads": torch.get_num_threads(), "load_average_before_after": [load, os.getloadavg()[0]]}
    res["cases"], res["operations"] = timed, operations
    return res


def _time_alike(calls, most=4):
    """{case: how many times the repeats of the longest case}, so that each case is timed for about
    as long: the forward, a third of a step, gets three times the runs. Timed for a third of a
    step's time, the forward's ratio drifted most from run to run (0.96 to 1.04 over five runs; the
    steps' within 0.04). One warm-up and one timed run of each case's NumPy call decide."""
    from .bench import median_time
    seconds = {case: median_time(call, 1, warmup=1) for case, call in calls.items()}
    longest = max(seconds.values())
    return {case: min(most, max(1, round(longest / t))) for case, t in seconds.items()}


def table(res):
    """The comparison as printed (and on docs/performance.md): the steps, then the operations."""
    from .torch_ops import BLOCK, SETTLE, table as operations_table
    lines = ["| | NumPy fast path | PyTorch eager | NumPy / PyTorch (median; quartiles) |",
             "|---|---:|---:|---:|"]
    for case, c in res["cases"].items():
        lines.append(f"| {case} | {c['numpy_ms']:.1f} ms | {c['torch_ms']:.1f} ms | "
                     f"{c['ratio']:.2f} ({c['ratio_q1']:.2f}-{c['ratio_q3']:.2f}) |")
    load = res["load_average_before_after"]
    n = res["torch_threads"]
    blocks = ", ".join(f"{case} {c['blocks']}" for case, c in res["cases"].items())
    lines.append(f"\nPyTorch {res['torch']} ({n} thread{'s' if n > 1 else ''}), float32, eager; case by case, each "
                 f"library in blocks of {BLOCK} timed runs after {SETTLE * 1e3:.0f} ms of untimed ones, the blocks "
                 f"alternating, a shorter case in more blocks so that each is timed about as long ({blocks} blocks); "
                 f"the ratio over pairs of neighbouring blocks. Load average {load[0]:.1f} before, {load[1]:.1f} after.")
    judged = [(case, round(res["cases"][case]["ratio"], 2))  # as printed: 1.004 is the 1.00 the table shows
              for case in TARGET_CASES if case in res["cases"]]
    if judged:
        met = [f"{case} {r:.2f}" for case, r in judged if r <= TARGET]
        missed = [f"{case} {r:.2f}" for case, r in judged if r > TARGET]
        lines.append(f"Target, NumPy / PyTorch at most {TARGET:.2f} for each of {', '.join(c for c, _ in judged)}: "
                     + ("met" if not missed else "NOT met") + f" in this run (at most {TARGET:.2f}: "
                     f"{', '.join(met) or 'none'}; above: {', '.join(missed) or 'none'}).")
    worst = max(max(c.values()) for c in res["checks"].values())
    lines.append(f"Same model, same weights: in float64 the loss and every gradient agree to {worst:.1e} "
                 f"(relative, worst of the four cases).")
    if res.get("operations"):
        lines.append("\n" + operations_table(res["operations"]))
    return "\n".join(lines)
