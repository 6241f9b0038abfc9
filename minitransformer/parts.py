"""The containers of the rest of the family (peft.py's pairs), each a piece a task plugs into
the base without the base's code knowing about it:

    LowRank     LoRA's branch s (x A) B beside one linear layer (a Linear's `branch`)
    LoRA        one block's A_t, B_t for every target t, and their LowRank branches
    PrefixKV    one block's prefix keys and values, put in front by the attention's kv hook
    PrefixMLP   Li & Liang's reparameterisation: every block's prefix from one small P'
    Prompt      prompt tuning's soft prompt, in front of the embedded input (the model's front slot)
    Strip       drops the prompt's positions before the heads (the model's back slot)
"""
import numpy as np

from .backend import ops
from .modules import Module, Parameter, normal
from .peft import init_lora, prefix_bias


class LowRank:
    """The branch s (x A) B on the Parameters A (d_in, r) and B (r, d_out)."""

    def __init__(self, A, B, scale):
        self.A, self.B, self.scale = A, B, scale

    def parameters(self):
        return [self.A, self.B]

    def forward(self, x):
        return ops.lora_forward(x, self.A.value, self.B.value, self.scale)  # (N, d_out)

    def backward(self, dout, cache, need_dx=True):
        dx, grads = ops.lora_backward(dout, cache, need_dx=need_dx, need_dA=self.A.trainable,
                                      need_dB=self.B.trainable)
        for name, g in grads.items():
            getattr(self, name).add_grad(g)  # grads has A and B: the Parameters self.A, self.B
        return dx


class LoRA(Module):
    """One block's LoRA branches (peft.py): A_t (d_in, r) and B_t (r, d_out) for every target t
    of the config ("q", "k", "v", "o" in attention, "ffn1", "ffn2" in the feed-forward)."""

    def __init__(self, path, C, F, config, rng, dtype):
        shapes = {"q": (C, C), "k": (C, C), "v": (C, C), "o": (C, C), "ffn1": (C, F), "ffn2": (F, C)}
        arrays = {}
        for t in config.targets:
            arrays[f"A_{t}"], arrays[f"B_{t}"] = init_lora(config, *shapes[t], rng, dtype)
        super().__init__(path, arrays)
        self.targets, self.scale = config.targets, config.scale
        self.branches = {t: LowRank(self.p[f"A_{t}"], self.p[f"B_{t}"], self.scale) for t in self.targets}


class PrefixKV(Module):
    """One block's prefix keys P_k and values P_v, each (n, C): the attention's kv hook."""

    def __init__(self, path, P_k, P_v, trainable=True):
        super().__init__(path, {"P_k": P_k, "P_v": P_v})
        for p in self.p.values():
            p.trainable = trainable

    def forward(self, k, v, bias=None):
        """k, v (B, T, C), bias None or (B|1, 1, T, T) -> k, v (B, n + T, C), bias None or
        (B|1, 1, T, n + T) (every query may look at the prefix), cache."""
        k, v, cache = ops.prefix_forward(k, v, self.p["P_k"].value, self.p["P_v"].value)
        return k, v, prefix_bias(bias, v.shape[1] - cache, cache), cache

    def backward(self, dk, dv, cache):
        """dk, dv (B, n + T, C) -> dk, dv (B, T, C); dP_k, dP_v into the Parameters."""
        (dk, dv), grads = ops.prefix_backward(dk, dv, cache, need_dP=self.trains())
        self._accumulate(grads)
        return dk, dv


class PrefixMLP(Module):
    """Li & Liang's reparameterisation (peft.prefix_mlp_forward): P' (n, C) -> tanh MLP -> every
    block's P_k, P_v. Its weights start like a linear layer's default (std 1/sqrt(fan_in))."""

    def __init__(self, path, n, C, hidden, n_layers, std, rng, dtype):
        super().__init__(path, {"P0": normal(rng, (n, C), std, dtype),
                                  "W_1": normal(rng, (C, hidden), 1 / np.sqrt(C), dtype),
                                  "b_1": np.zeros(hidden, dtype),
                                  "W_2": normal(rng, (hidden, 2 * n_layers * C), 1 / np.sqrt(hidden), dtype),
                                  "b_2": np.zeros(2 * n_layers * C, dtype)})
        self.n_layers = n_layers

    def forward(self):
        """-> [PrefixKV per block], cache. Each PrefixKV is made for this pass (its P_k, P_v are
        not parameters of the model): the attention accumulates their gradient, and backward
        carries it on through the MLP."""
        w = self.w
        prefixes, cache = ops.prefix_mlp_forward(w["P0"], w, self.n_layers)  # (L, 2, n, C)
        kvs = [PrefixKV(f"{self.path}.blocks.{i}", prefixes[i, 0], prefixes[i, 1], self.trains())
               for i in range(self.n_layers)]
        return kvs, (cache, kvs, prefixes.shape)

    def backward(self, cache):
        """Every block's dP_k, dP_v of this backward on through the MLP. The pass's P_k, P_v
        gradients are taken and cleared, so a second backward on the same cache adds the same
        gradient once more, not twice."""
        cache, kvs, shape = cache
        need = {k for k, p in self.p.items() if p.trainable}
        if not need:
            return
        dprefixes = np.zeros(shape, self.p["P0"].value.dtype)  # (L, 2, n, C)
        for i, kv in enumerate(kvs):
            for j, p in enumerate((kv.p["P_k"], kv.p["P_v"])):
                if p.grad is not None:  # a block the backward did not reach passes no gradient
                    dprefixes[i, j], p.grad = p.grad, None
        _, grads = ops.prefix_mlp_backward(dprefixes, cache, need)
        self._accumulate(grads)


class Prompt(Module):
    """Prompt tuning's soft prompt P (n, C), put in front of the embedded input (peft.py)."""

    def __init__(self, path, n, C, config, W_tok, rng, dtype):
        if config.init == "vocab":  # rows of the token embedding, of tokens drawn at random
            P = W_tok[rng.integers(0, W_tok.shape[0], n)].astype(dtype)  # fancy indexing: a copy
        else:
            P = normal(rng, (n, C), config.init_std, dtype)
        super().__init__(path, {"P": P})

    def forward(self, x, pad_mask=None):
        """x (B, T, C), pad_mask None or (B, T) -> x (B, n + T, C), pad_mask None or (B, n + T), cache."""
        out, cache = ops.prompt_forward(x, self.p["P"].value)  # (B, n + T, C)
        if pad_mask is not None:  # the prompt is never padding
            n = out.shape[1] - x.shape[1]
            pad_mask = np.concatenate([np.ones((x.shape[0], n), bool), pad_mask], axis=1)  # (B, n + T)
        return out, pad_mask, cache

    def backward(self, dout, cache, need_dx=True):
        dx, grads = ops.prompt_backward(dout, cache, need_dx=need_dx, need_dP=self.p["P"].trainable)
        self._accumulate(grads)
        return dx


class Strip:
    """After the last block, keep the T real tokens: the heads never see the n prompt positions."""

    def __init__(self, n):
        self.n = n

    def trains(self):
        return False

    def forward(self, x):
        return ops.strip_prompt_forward(x, self.n)  # (B, n + T, C) -> (B, T, C)

    def backward(self, dout, cache, need_dx=True):
        dx, _ = ops.strip_prompt_backward(dout, cache)  # (B, n + T, C), zero at the prompt
        return dx
