"""Parameters and the thin containers that hold them around the pure forward/backward pairs.

A container owns named Parameters and has `forward(x) -> out, cache` and
`backward(dout, cache, need_dx) -> dx`. It calls the forward/backward pairs through
`backend.ops`, which are the reference passes unless `backend.use("fast")` was called. The backward accumulates each gradient into its
Parameter, and only when that parameter is trainable: for a frozen one the weight-gradient
product is never computed (its `grad` stays None), while dx still flows to the layers below.
"""
import numpy as np

from .adapters import init_adapter
from .backend import ops  # ops.X is layers.X, attention.X, ... (or the fast kernel: backend.py)


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

    def trainable(self):
        """Names (local, e.g. "W_q") of the parameters that want a gradient."""
        return {k for k, p in self.p.items() if p.trainable}

    def _accumulate(self, grads):
        for k, g in grads.items():
            self.p[k].add_grad(g)


def normal(rng, shape, std, dtype):
    return (rng.standard_normal(shape) * std).astype(dtype)


# ----------------------------------------------------------------------------- containers


class LayerNorm(Module):
    def __init__(self, prefix, C, dtype, eps=1e-5):
        super().__init__(prefix, {"gamma": np.ones(C, dtype), "beta": np.zeros(C, dtype)})
        self.eps = eps

    def forward(self, x):
        return ops.layernorm_forward(x, self.p["gamma"].value, self.p["beta"].value, self.eps)

    def backward(self, dout, cache, need_dx=True):
        trains = self.trainable()  # gamma and beta each on their own: either may be frozen
        dx, dgamma, dbeta = ops.layernorm_backward(dout, cache, need_dx=need_dx,
                                                   need_dgamma="gamma" in trains,
                                                   need_dbeta="beta" in trains)
        self._accumulate({k: g for k, g in (("gamma", dgamma), ("beta", dbeta)) if g is not None})
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

    def forward(self, x, bias=None):
        return ops.attention_forward(x, self.w, self.n_heads, bias, keep=self.trainable())

    def backward(self, dout, cache, need_dx=True):
        dx, grads = ops.attention_backward(dout, cache, need_dx=need_dx, need=self.trainable())
        self._accumulate(grads)
        return dx


class FeedForward(Module):
    """linear (C -> F) -> GELU -> linear (F -> C)."""

    def __init__(self, prefix, C, F, rng, dtype, std=0.02):
        super().__init__(prefix, {"W_1": normal(rng, (C, F), std, dtype), "b_1": np.zeros(F, dtype),
                                  "W_2": normal(rng, (F, C), std, dtype), "b_2": np.zeros(C, dtype)})

    def forward(self, x):
        p = self.p  # a frozen W does not keep its input (linear_forward's keep_x): less memory
        h, cache_1 = ops.linear_forward(x, p["W_1"].value, p["b_1"].value, p["W_1"].trainable)  # (B,T,C) -> (B,T,F)
        a, cache_g = ops.gelu_forward(h)  # (B,T,F)
        out, cache_2 = ops.linear_forward(a, p["W_2"].value, p["b_2"].value, p["W_2"].trainable)  # (B,T,F) -> (B,T,C)
        return out, (cache_1, cache_g, cache_2)

    def backward(self, dout, cache, need_dx=True):
        cache_1, cache_g, cache_2 = cache
        p = self.p
        da, dW_2, db_2 = ops.linear_backward(dout, cache_2, need_dW=p["W_2"].trainable,
                                         need_db=p["b_2"].trainable)
        dh = ops.gelu_backward(da, cache_g)
        dx, dW_1, db_1 = ops.linear_backward(dh, cache_1, need_dx=need_dx,
                                         need_dW=p["W_1"].trainable, need_db=p["b_1"].trainable)
        self._accumulate({k: g for k, g in (("W_1", dW_1), ("b_1", db_1), ("W_2", dW_2),
                                            ("b_2", db_2)) if g is not None})
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
