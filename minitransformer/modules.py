"""Parameters and the thin containers that hold them around the pure forward/backward pairs.

A container owns named Parameters and has `forward(x) -> out, cache` and
`backward(dout, cache, need_dx) -> dx`. It calls the forward/backward pairs through
`backend.ops`, which are the reference passes unless `backend.use("fast")` was called. The backward accumulates each gradient into its
Parameter, and only when that parameter is trainable: for a frozen one the weight-gradient
product is never computed (its `grad` stays None), while dx still flows to the layers below.

A task may use its own copy of some of a base container's parameters (a LayerNorm the paper's
adapters train, BitFit's biases): the base containers take `own`, a map {local name: the task's
Parameter}, in forward and backward alike. They read those names from it instead of their own,
and the gradient goes to whichever Parameter was used, so the base's stays untouched.
"""
import numpy as np

from .adapters import init_adapter
from .backend import ops  # ops.X is layers.X, attention.X, ... (or the fast kernel: backend.py)
from .peft import init_lora


class Parameter:
    """One named array: its value, its gradient (None until backward gives it one), and
    whether the optimizer may change it."""
    __slots__ = ("name", "value", "grad", "trainable")

    def __init__(self, name, value, trainable=True):
        self.name, self.value, self.grad, self.trainable = name, value, None, trainable

    def add_grad(self, g):
        """Gradients add: a weight used twice receives the sum of both uses."""
        if not self.trainable:
            raise RuntimeError(f"{self.name}: a frozen parameter must not receive a gradient")
        if self.grad is None:
            self.grad = g  # g is always a fresh array from the backward, never a view of ours
        else:
            self.grad += g

    def __repr__(self):
        state = "trainable" if self.trainable else "frozen"
        return f"Parameter({self.name}, shape={self.value.shape}, {state})"


def _params(prefix, arrays):
    return {k: Parameter(f"{prefix}.{k}", v) for k, v in arrays.items()}


class Module:
    """A named group of Parameters. `self.p[name]` is the Parameter, `self.w[name]` its array."""

    def __init__(self, prefix, arrays):
        self.prefix = prefix
        self.p = _params(prefix, arrays)

    @property
    def w(self):
        return {k: p.value for k, p in self.p.items()}

    def parameters(self):
        return list(self.p.values())

    def params(self, own=None):
        """{local name: Parameter} a forward uses: the task's own copy where `own` has one."""
        return {**self.p, **own} if own else self.p

    def trainable(self, own=None):
        """Names (local, e.g. "W_q") of the parameters that want a gradient."""
        return {k for k, p in self.params(own).items() if p.trainable}

    def _accumulate(self, grads, own=None):
        params = self.params(own)
        for k, g in grads.items():
            params[k].add_grad(g)  # into whichever Parameter the forward used


def normal(rng, shape, std, dtype):
    return (rng.standard_normal(shape) * std).astype(dtype)


# ----------------------------------------------------------------------------- containers


class LayerNorm(Module):
    def __init__(self, prefix, C, dtype, eps=1e-5):
        super().__init__(prefix, {"gamma": np.ones(C, dtype), "beta": np.zeros(C, dtype)})
        self.eps = eps

    def forward(self, x, own=None):
        p = self.params(own)
        return ops.layernorm_forward(x, p["gamma"].value, p["beta"].value, self.eps)

    def backward(self, dout, cache, need_dx=True, own=None):
        trains = self.trainable(own)  # gamma and beta each on their own: either may be frozen
        dx, dgamma, dbeta = ops.layernorm_backward(dout, cache, need_dx=need_dx,
                                                   need_dgamma="gamma" in trains,
                                                   need_dbeta="beta" in trains)
        self._accumulate({k: g for k, g in (("gamma", dgamma), ("beta", dbeta)) if g is not None}, own)
        return dx


class Attention(Module):
    """Multi-head self-attention; weights W_q, W_k, W_v, W_o (C, C) and their biases."""

    def __init__(self, prefix, C, n_heads, rng, dtype, std=0.02):
        arrays = {}
        for n in ("q", "k", "v", "o"):
            arrays[f"W_{n}"] = normal(rng, (C, C), std, dtype)
            arrays[f"b_{n}"] = np.zeros(C, dtype)
        super().__init__(prefix, arrays)
        self.n_heads = n_heads

    def forward(self, x, bias=None, own=None, lora=None, prefix=None):
        """x (B, T, C) -> out (B, T, C), cache. lora: a LoRA container (its q, k, v, o branches);
        prefix: (P_k, P_v) Parameters, each (n, C) (the mask `bias` must cover n + T keys)."""
        p = self.params(own)
        w = {k: q.value for k, q in p.items()}
        branches = lora.branches(("q", "k", "v", "o")) if lora else None
        kv = (prefix[0].value, prefix[1].value) if prefix else None
        return ops.attention_forward(x, w, self.n_heads, bias, keep=self.trainable(own),
                                     lora=branches, prefix=kv)

    def backward(self, dout, cache, need_dx=True, own=None, lora=None, prefix=None):
        extra = _extra_params(lora, ("q", "k", "v", "o"), prefix)  # {"A_q": Parameter, "P_k": ...}
        need = self.trainable(own) | {k for k, q in extra.items() if q.trainable}
        dx, grads = ops.attention_backward(dout, cache, need_dx=need_dx, need=need)
        for k in [k for k in grads if k in extra]:
            extra[k].add_grad(grads.pop(k))
        self._accumulate(grads, own)
        return dx


class FeedForward(Module):
    """linear (C -> F) -> GELU -> linear (F -> C)."""

    def __init__(self, prefix, C, F, rng, dtype, std=0.02):
        super().__init__(prefix, {"W_1": normal(rng, (C, F), std, dtype), "b_1": np.zeros(F, dtype),
                                  "W_2": normal(rng, (F, C), std, dtype), "b_2": np.zeros(C, dtype)})

    def forward(self, x, own=None, lora=None):
        """x (B, T, C) -> out (B, T, C), cache. lora: a LoRA container (its ffn1, ffn2 branches)."""
        p = self.params(own)  # a frozen W does not keep its input (linear_forward's keep_x): less memory
        branches = lora.branches(("ffn1", "ffn2")) if lora else {}
        h, cache_1 = ops.linear_forward(x, p["W_1"].value, p["b_1"].value, p["W_1"].trainable)  # (B,T,C) -> (B,T,F)
        cache_l1 = cache_l2 = None
        if "ffn1" in branches:  # LoRA: x W_1 + b_1 + s (x A) B
            branch, cache_l1 = ops.lora_forward(x, *branches["ffn1"])  # (B,T,F)
            h = h + branch
        a, cache_g = ops.gelu_forward(h)  # (B,T,F)
        out, cache_2 = ops.linear_forward(a, p["W_2"].value, p["b_2"].value, p["W_2"].trainable)  # (B,T,F) -> (B,T,C)
        if "ffn2" in branches:
            branch, cache_l2 = ops.lora_forward(a, *branches["ffn2"])  # (B,T,C)
            out = out + branch
        return out, (cache_1, cache_l1, cache_g, cache_2, cache_l2)

    def backward(self, dout, cache, need_dx=True, own=None, lora=None):
        cache_1, cache_l1, cache_g, cache_2, cache_l2 = cache
        p, extra = self.params(own), _extra_params(lora, ("ffn1", "ffn2"))
        grads = {}
        da, grads["W_2"], grads["b_2"] = ops.linear_backward(dout, cache_2, need_dW=p["W_2"].trainable,
                                                             need_db=p["b_2"].trainable)
        if cache_l2 is not None:  # forward was out = a W_2 + b_2 + s (a A) B: a fed both
            dal, grads["A_ffn2"], grads["B_ffn2"] = ops.lora_backward(
                dout, cache_l2, need_dA=extra["A_ffn2"].trainable, need_dB=extra["B_ffn2"].trainable)
            da = da + dal
        dh = ops.gelu_backward(da, cache_g)
        dx, grads["W_1"], grads["b_1"] = ops.linear_backward(dh, cache_1, need_dx=need_dx,
                                                             need_dW=p["W_1"].trainable,
                                                             need_db=p["b_1"].trainable)
        if cache_l1 is not None:  # forward was h = x W_1 + b_1 + s (x A) B: x fed both
            dxl, grads["A_ffn1"], grads["B_ffn1"] = ops.lora_backward(
                dh, cache_l1, need_dx=need_dx, need_dA=extra["A_ffn1"].trainable,
                need_dB=extra["B_ffn1"].trainable)
            dx = dx + dxl if need_dx else None
        grads = {k: g for k, g in grads.items() if g is not None}
        for k in [k for k in grads if k in extra]:
            extra[k].add_grad(grads.pop(k))
        self._accumulate(grads, own)
        return dx


class Adapter(Module):
    """One bottleneck adapter (see adapters.py); skip=False for the parallel branch."""

    def __init__(self, prefix, C, config, rng, dtype, skip=True):
        super().__init__(prefix, init_adapter(config, C, rng, dtype))
        self.nonlinearity, self.skip, self.scaling = config.nonlinearity, skip, config.scaling

    def forward(self, h):
        return ops.adapter_forward(h, self.w, self.nonlinearity, self.skip, self.scaling)

    def backward(self, dout, cache, need_dx=True):
        dh, grads = ops.adapter_backward(dout, cache, need_dx=need_dx, need=self.trainable())
        self._accumulate(grads)
        return dh


class Embeddings(Module):
    """Token embedding W_tok (V, C) plus learned position embedding W_pos (T_max, C)."""

    def __init__(self, prefix, V, T_max, C, rng, dtype, std=0.02):
        super().__init__(prefix, {"W_tok": normal(rng, (V, C), std, dtype),
                                  "W_pos": normal(rng, (T_max, C), std, dtype)})

    def forward(self, ids):
        tok, cache_tok = ops.embedding_forward(ids, self.p["W_tok"].value)  # (B,T,C)
        pos, cache_pos = ops.position_forward(ids.shape[1], self.p["W_pos"].value)  # (T,C)
        return tok + pos, (cache_tok, cache_pos)

    def backward(self, dout, cache, need_dx=False):
        cache_tok, cache_pos = cache  # token ids are integers: no dx
        grads = {}
        if self.p["W_tok"].trainable:
            grads["W_tok"] = ops.embedding_backward(dout, cache_tok)
        if self.p["W_pos"].trainable:
            grads["W_pos"] = ops.position_backward(dout, cache_pos)
        self._accumulate(grads)
        return None


class LMHead(Module):
    """Per-position logits over the vocabulary: (B, T, C) -> (B, T, V)."""

    def __init__(self, prefix, C, V, rng, dtype, std=0.02):
        super().__init__(prefix, {"W": normal(rng, (C, V), std, dtype), "b": np.zeros(V, dtype)})

    def forward(self, h, pad_mask=None):
        return ops.linear_forward(h, self.p["W"].value, self.p["b"].value)

    def backward(self, dout, cache, need_dx=True):
        dh, dW, db = ops.linear_backward(dout, cache, need_dx=need_dx, need_dW=self.p["W"].trainable,
                                     need_db=self.p["b"].trainable)
        self._accumulate({k: g for k, g in (("W", dW), ("b", db)) if g is not None})
        return dh


class ClassifierHead(Module):
    """Pool the sequence, then one linear layer: (B, T, C) -> (B, K).

    pooling "first": the first position's state (BERT's [CLS]); "mean": the average over
    the positions that are not padding.
    """

    def __init__(self, prefix, C, n_classes, pooling, rng, dtype, std=0.02):
        super().__init__(prefix, {"W": normal(rng, (C, n_classes), std, dtype),
                                  "b": np.zeros(n_classes, dtype)})
        if pooling not in ("first", "mean"):
            raise ValueError(f"pooling: expected 'first' or 'mean', got {pooling!r}")
        self.pooling = pooling

    def forward(self, h, pad_mask=None):
        B, T, C = h.shape
        if self.pooling == "first":
            pooled, weights = h[:, 0], None  # (B,C)
        else:
            keep = np.ones((B, T), h.dtype) if pad_mask is None else pad_mask.astype(h.dtype)
            weights = keep / np.maximum(keep.sum(axis=1, keepdims=True), 1)  # (B,T), rows sum to 1
            pooled = np.einsum("bt,btc->bc", weights, h)  # (B,C)
        logits, cache_lin = ops.linear_forward(pooled, self.p["W"].value, self.p["b"].value)  # (B,K)
        return logits, (cache_lin, weights, h.shape)

    def backward(self, dout, cache, need_dx=True):
        cache_lin, weights, shape = cache
        dpooled, dW, db = ops.linear_backward(dout, cache_lin, need_dx=need_dx,
                                          need_dW=self.p["W"].trainable, need_db=self.p["b"].trainable)
        self._accumulate({k: g for k, g in (("W", dW), ("b", db)) if g is not None})
        if not need_dx:
            return None
        if weights is None:  # forward was pooled = h[:, 0]: only position 0 gets a gradient
            dh = np.zeros(shape, dpooled.dtype)
            dh[:, 0] = dpooled
        else:  # forward was pooled = sum_t weights[b,t] h[b,t]
            dh = weights[:, :, None] * dpooled[:, None, :]  # (B,T,1) * (B,1,C) -> (B,T,C)
        return dh


# ----------------------------------------------------------------------------- the PEFT family's parts


def _extra_params(lora, targets, prefix=None):
    """{gradient name: Parameter} of what a task adds to a base container's pass: the LoRA
    matrices of `targets` (A_q, B_q, ...) and the prefix's P_k, P_v."""
    extra = {k: p for k, p in lora.p.items() if k.split("_", 1)[1] in targets} if lora else {}
    if prefix:
        extra["P_k"], extra["P_v"] = prefix
    return extra


class LoRA(Module):
    """One block's LoRA branches (peft.py): A_t (d_in, r) and B_t (r, d_out) for every target t
    of the config ("q", "k", "v", "o" in attention, "ffn1", "ffn2" in the feed-forward)."""

    def __init__(self, prefix, C, F, config, rng, dtype):
        shapes = {"q": (C, C), "k": (C, C), "v": (C, C), "o": (C, C), "ffn1": (C, F), "ffn2": (F, C)}
        arrays = {}
        for t in config.targets:
            arrays[f"A_{t}"], arrays[f"B_{t}"] = init_lora(config, *shapes[t], rng, dtype)
        super().__init__(prefix, arrays)
        self.targets, self.scale = config.targets, config.scale

    def branches(self, targets):
        """{target: (A, B, s)} for the targets here among `targets`: what the passes take."""
        return {t: (self.p[f"A_{t}"].value, self.p[f"B_{t}"].value, self.scale)
                for t in self.targets if t in targets}


class PrefixKV(Module):
    """One block's prefix keys P_k and values P_v, each (n, C), trained directly."""

    def __init__(self, prefix, P_k, P_v):
        super().__init__(prefix, {"P_k": P_k, "P_v": P_v})

    def pair(self):
        return self.p["P_k"], self.p["P_v"]


class PrefixMLP(Module):
    """Li & Liang's reparameterisation (peft.prefix_mlp_forward): P' (n, C) -> tanh MLP -> every
    block's P_k, P_v. Its weights start like a linear layer's default (std 1/sqrt(fan_in))."""

    def __init__(self, prefix, n, C, hidden, n_layers, std, rng, dtype):
        super().__init__(prefix, {"P0": normal(rng, (n, C), std, dtype),
                                  "W_1": normal(rng, (C, hidden), 1 / np.sqrt(C), dtype),
                                  "b_1": np.zeros(hidden, dtype),
                                  "W_2": normal(rng, (hidden, 2 * n_layers * C), 1 / np.sqrt(hidden), dtype),
                                  "b_2": np.zeros(2 * n_layers * C, dtype)})
        self.n_layers = n_layers

    def forward(self):
        """-> [(P_k, P_v) per block], cache. Each P_k, P_v is a Parameter made for this pass (it
        is not a parameter of the model): the attention accumulates its gradient into it, and
        backward carries those gradients on through the MLP."""
        w = self.w
        prefixes, cache = ops.prefix_mlp_forward(w["P0"], w, self.n_layers)  # (L, 2, n, C)
        trains = bool(self.trainable())
        pairs = [tuple(Parameter(f"{self.prefix}.blocks.{i}.{kv}", prefixes[i, j], trains)
                       for j, kv in enumerate(("P_k", "P_v"))) for i in range(self.n_layers)]
        return pairs, (cache, pairs, prefixes.shape)

    def backward(self, cache):
        cache, pairs, shape = cache
        need = self.trainable()
        if not need:
            return
        dprefixes = np.zeros(shape, self.p["P0"].value.dtype)  # (L, 2, n, C)
        for i, pair in enumerate(pairs):
            for j, q in enumerate(pair):
                if q.grad is not None:  # a block the backward did not reach passes no gradient
                    dprefixes[i, j] = q.grad
        self._accumulate(ops.prefix_mlp_backward(dprefixes, cache, need))


class Prompt(Module):
    """Prompt tuning's soft prompt P (n, C), put in front of the embedded input (peft.py)."""

    def __init__(self, prefix, n, C, config, W_tok, rng, dtype):
        if config.init == "vocab":  # rows of the token embedding, of tokens drawn at random
            P = W_tok[rng.integers(0, W_tok.shape[0], n)].astype(dtype)  # fancy indexing: a copy
        else:
            P = normal(rng, (n, C), config.init_std, dtype)
        super().__init__(prefix, {"P": P})

    def forward(self, x):
        return ops.prompt_forward(x, self.p["P"].value)  # (B, T, C) -> (B, n + T, C)

    def backward(self, dout, cache, need_dx=True):
        dx, dP = ops.prompt_backward(dout, cache, need_dx=need_dx, need_dP=self.p["P"].trainable)
        self._accumulate({"P": dP} if dP is not None else {})
        return dx
