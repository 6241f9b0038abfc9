"""Parameters and the thin containers that hold them around the pure forward/backward pairs.

A container owns named Parameters and has `forward(x) -> out, cache` and
`backward(dout, cache, need_dx) -> dx`. It calls the forward/backward pairs through
`backend.ops`, which are the reference passes unless `backend.use("fast")` was called. The
backward accumulates each gradient into its Parameter, and only when that parameter is
trainable: for a frozen one the weight-gradient product is never computed (its `grad` stays
None), while dx still flows to the layers below.

A few attributes are slots a task may put a module of its own into (`plug`): a Linear with a
branch beside it, a LayerNorm or a Linear holding the task's own copy of a parameter, the
attention's key/value hook. The containers call whatever is in the slot and never know which
method put it there; each forward keeps in its cache the modules it used, and the backward
sends the gradients to those.
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


def _params(path, arrays):
    return {k: Parameter(f"{path}.{k}", v) for k, v in arrays.items()}


class Module:
    """A named group of Parameters. `self.p[name]` is the Parameter, `self.w[name]` its array."""

    def __init__(self, path, arrays):
        self.path = path
        self.p = _params(path, arrays)

    @property
    def w(self):
        return {k: p.value for k, p in self.p.items()}

    def parameters(self):
        return list(self.p.values())

    def trains(self):
        """Does any parameter of this module (with what is plugged into it) want a gradient?"""
        return any(p.trainable for p in self.parameters())

    def _accumulate(self, grads):
        for k, g in grads.items():
            if g is not None:
                self.p[k].add_grad(g)


def plug(owner, slot, module=None):
    """Put `module` into the attribute `slot` of `owner`; None puts back what the slot held at first."""
    first = owner.__dict__.setdefault("_unplugged", {}).setdefault(slot, getattr(owner, slot))
    setattr(owner, slot, first if module is None else module)


def normal(rng, shape, std, dtype):
    return (rng.standard_normal(shape) * std).astype(dtype)


# ----------------------------------------------------------------------------- containers


class Linear(Module):
    """y = x W + b on two Parameters named by their owner (blocks.0.attn.W_q, ...).

    `branch`: None, or a module whose output is added, fed with the same x (LoRA's low-rank
    update, parts.LowRank). A frozen W does not keep x in the cache (linear_forward's keep_x).
    """

    def __init__(self, W, b, branch=None):
        self.p = {"W": W, "b": b}
        self.branch = branch

    def parameters(self):
        return list(self.p.values()) + (self.branch.parameters() if self.branch else [])

    def forward(self, x):
        W, b = self.p["W"], self.p["b"]
        y, cache = ops.linear_forward(x, W.value, b.value, keep_x=W.trainable)  # (N, d_out)
        cache_branch = None
        if self.branch is not None:
            out, cache_branch = self.branch.forward(x)  # (N, d_out)
            y += out  # y is the product's own fresh array
        return y, (cache, cache_branch)

    def backward(self, dout, cache, need_dx=True):
        cache, cache_branch = cache
        W, b = self.p["W"], self.p["b"]
        dx, grads = ops.linear_backward(dout, cache, need_dx=need_dx, need_dW=W.trainable,
                                        need_db=b.trainable)
        self._accumulate(grads)
        if self.branch is not None:  # forward was y = x W + b + branch(x): x fed both
            dxb = self.branch.backward(dout, cache_branch, need_dx=need_dx)
            if need_dx:
                dx += dxb  # dx is the product's own fresh array
        return dx


class LayerNorm(Module):
    def __init__(self, path, C, dtype, eps=1e-5):
        super().__init__(path, {"gamma": np.ones(C, dtype), "beta": np.zeros(C, dtype)})
        self.eps = eps

    def forward(self, x):
        return ops.layernorm_forward(x, self.p["gamma"].value, self.p["beta"].value, self.eps)

    def backward(self, dout, cache, need_dx=True):
        gamma, beta = self.p["gamma"], self.p["beta"]  # either may be frozen on its own
        dx, grads = ops.layernorm_backward(dout, cache, need_dx=need_dx,
                                           need_dgamma=gamma.trainable, need_dbeta=beta.trainable)
        self._accumulate(grads)
        return dx


def copy_of(module, own):
    """A copy of `module` that uses the Parameters `own` {local name: Parameter} in place of the
    module's (a task's own LayerNorm or bias) and shares the rest."""
    twin = object.__new__(type(module))
    twin.__dict__.update({k: v for k, v in module.__dict__.items() if k != "_unplugged"})
    twin.p = {**module.p, **own}
    return twin


class Attention(Module):
    """Multi-head self-attention; weights W_q, W_k, W_v, W_o (C, C) and their biases.

    q_proj, k_proj, v_proj, o_proj are Linear slots; kv is a hook between the projections and
    attend: None, or a module with forward(k, v, bias) -> k, v, bias, cache and
    backward(dk, dv, cache) -> dk, dv (prefix tuning puts its keys and values in front there).
    """

    def __init__(self, path, C, n_heads, rng, dtype, std=0.02):
        arrays = {}
        for n in ("q", "k", "v", "o"):
            arrays[f"W_{n}"] = normal(rng, (C, C), std, dtype)
            arrays[f"b_{n}"] = np.zeros(C, dtype)
        super().__init__(path, arrays)
        self.n_heads = n_heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (Linear(self.p[f"W_{n}"], self.p[f"b_{n}"])
                                                              for n in "qkvo")
        self.kv = None

    def trains(self):
        used = (self.q_proj, self.k_proj, self.v_proj, self.o_proj, self.kv)
        return any(m.trains() for m in used if m is not None)

    def forward(self, x, bias=None):
        """x (B, T, C), bias None or (B|1, 1, T, T) -> out (B, T, C), cache."""
        used = (self.q_proj, self.k_proj, self.v_proj, self.o_proj, self.kv)
        q, cache_q = self.q_proj.forward(x)  # (B, T, C) each
        k, cache_k = self.k_proj.forward(x)
        v, cache_v = self.v_proj.forward(x)
        cache_kv = None
        if self.kv is not None:
            k, v, bias, cache_kv = self.kv.forward(k, v, bias)  # (B, T', C) each, bias (B|1, 1, T, T')
        ctx, cache_a = ops.attend_forward(q, k, v, self.n_heads, bias)  # (B, T, C)
        out, cache_o = self.o_proj.forward(ctx)  # (B, T, C)
        return out, (used, cache_q, cache_k, cache_v, cache_kv, cache_a, cache_o)

    def backward(self, dout, cache, need_dx=True):
        (q, k, v, o, kv), cache_q, cache_k, cache_v, cache_kv, cache_a, cache_o = cache
        below = need_dx or any(m.trains() for m in (q, k, v, kv) if m is not None)
        dctx = o.backward(dout, cache_o, need_dx=below)  # forward was out = o(ctx)
        if not below:  # nothing under the output projection trains, and no dx is wanted
            return None
        (dq, dk, dv), _ = ops.attend_backward(dctx, cache_a)
        if kv is not None:
            dk, dv = kv.backward(dk, dv, cache_kv)
        dx = q.backward(dq, cache_q, need_dx=need_dx)
        dxk = k.backward(dk, cache_k, need_dx=need_dx)
        dxv = v.backward(dv, cache_v, need_dx=need_dx)
        if need_dx:  # x fed all three projections: their gradients add
            dx += dxk  # dx is a fresh array of the backward
            dx += dxv
        return dx


class FeedForward(Module):
    """linear fc1 (C -> F) -> GELU -> linear fc2 (F -> C)."""

    def __init__(self, path, C, F, rng, dtype, std=0.02):
        super().__init__(path, {"W_1": normal(rng, (C, F), std, dtype), "b_1": np.zeros(F, dtype),
                                  "W_2": normal(rng, (F, C), std, dtype), "b_2": np.zeros(C, dtype)})
        self.fc1, self.fc2 = Linear(self.p["W_1"], self.p["b_1"]), Linear(self.p["W_2"], self.p["b_2"])

    def trains(self):
        return self.fc1.trains() or self.fc2.trains()

    def forward(self, x):
        """x (B, T, C) -> out (B, T, C), cache."""
        h, cache_1 = self.fc1.forward(x)  # (B,T,C) -> (B,T,F)
        a, cache_g = ops.gelu_forward(h)  # (B,T,F)
        out, cache_2 = self.fc2.forward(a)  # (B,T,F) -> (B,T,C)
        return out, ((self.fc1, self.fc2), cache_1, cache_g, cache_2)

    def backward(self, dout, cache, need_dx=True):
        (fc1, fc2), cache_1, cache_g, cache_2 = cache
        da = fc2.backward(dout, cache_2)  # forward was out = fc2(a)
        dh, _ = ops.gelu_backward(da, cache_g)  # forward was a = gelu(h)
        return fc1.backward(dh, cache_1, need_dx=need_dx)  # forward was h = fc1(x)


class Adapter(Module):
    """One bottleneck adapter (see adapters.py); skip=False for the parallel branch."""

    def __init__(self, path, C, config, rng, dtype, skip=True):
        super().__init__(path, init_adapter(config, C, rng, dtype))
        self.nonlinearity, self.skip, self.scaling = config.nonlinearity, skip, config.scaling

    def forward(self, h):
        return ops.adapter_forward(h, self.w, self.nonlinearity, self.skip, self.scaling)

    def backward(self, dout, cache, need_dx=True):
        need = {k for k, p in self.p.items() if p.trainable}
        dh, grads = ops.adapter_backward(dout, cache, need_dx=need_dx, need=need)
        self._accumulate(grads)
        return dh


class Embeddings(Module):
    """Token embedding W_tok (V, C) plus learned position embedding W_pos (T_max, C)."""

    def __init__(self, path, V, T_max, C, rng, dtype, std=0.02):
        super().__init__(path, {"W_tok": normal(rng, (V, C), std, dtype),
                                  "W_pos": normal(rng, (T_max, C), std, dtype)})

    def forward(self, ids):
        tok, cache_tok = ops.embedding_forward(ids, self.p["W_tok"].value)  # (B,T,C)
        pos, cache_pos = ops.position_forward(ids.shape[1], self.p["W_pos"].value)  # (T,C)
        return tok + pos, (cache_tok, cache_pos)

    def backward(self, dout, cache, need_dx=False):
        cache_tok, cache_pos = cache  # token ids are integers: no dx
        if self.p["W_tok"].trainable:
            _, grads = ops.embedding_backward(dout, cache_tok)
            self._accumulate({"W_tok": grads["W"]})
        if self.p["W_pos"].trainable:
            _, grads = ops.position_backward(dout, cache_pos)
            self._accumulate(grads)  # {"W_pos": ...}
        return None
