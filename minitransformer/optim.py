"""Optimizers written by hand: SGD with momentum, AdamW, gradient clipping, the LR schedule.

Each optimizer is given the model's parameters and touches only the trainable ones: a frozen
parameter has no state here and is never written to.
"""
import math

import numpy as np

from .tools.runtime import for_each


class Optimizer:
    def __init__(self, params, lr):
        self.params = [p for p in params if p.trainable]  # frozen arrays are not even held
        self.lr = lr
        self.state = {}  # parameter name -> its moment arrays, created on the first step
        self.t = 0

    def step(self):
        self.t += 1
        todo = [p for p in self.params if p.trainable and p.grad is not None]
        # every parameter updates on its own: the threads share them out (runtime.py)
        for_each(self.update, todo, size=lambda p: p.value.size)

    def zero_grad(self):
        for p in self.params:
            p.grad = None


class SGD(Optimizer):
    """v = momentum * v + g;  w -= lr * v   (with weight decay added to g when asked)."""

    def __init__(self, params, lr=0.1, momentum=0.9, weight_decay=0.0):
        super().__init__(params, lr)
        self.momentum, self.weight_decay = momentum, weight_decay

    def update(self, p):
        g = p.grad + self.weight_decay * p.value if self.weight_decay else p.grad
        if self.momentum:
            v = self.state.setdefault(p.name, {"v": np.zeros_like(p.value)})["v"]
            v *= self.momentum
            v += g
            g = v
        p.value -= self.lr * g


class AdamW(Optimizer):
    """Adam with decoupled weight decay (Loshchilov & Hutter):
        m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2
        w -= lr * (m_hat / (sqrt(v_hat) + eps) + wd * w)
    Weight decay applies to matrices only, not to biases, LayerNorm parameters or vectors.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        super().__init__(params, lr)
        self.b1, self.b2 = betas
        self.eps, self.weight_decay = eps, weight_decay

    def update(self, p):
        s = self.state.setdefault(p.name, {"m": np.zeros_like(p.value), "v": np.zeros_like(p.value)})
        m, v, g = s["m"], s["v"], p.grad
        # every step in place on our own arrays; Python-float factors keep the dtype
        m *= self.b1
        m += (1 - self.b1) * g
        v *= self.b2
        g2 = g * g
        g2 *= 1 - self.b2
        v += g2
        # the bias corrections, folded into two scalars: m_hat / (sqrt(v_hat) + eps)
        # = (c2 / c1) * m / (sqrt(v) + eps * c2), with c1 = 1 - b1^t and c2 = sqrt(1 - b2^t)
        c1, c2 = 1 - self.b1 ** self.t, math.sqrt(1 - self.b2 ** self.t)
        update = np.sqrt(v, out=g2)  # g2 is spent: reuse its memory
        update += self.eps * c2
        np.divide(m, update, out=update)
        if self.weight_decay and p.value.ndim >= 2:
            p.value *= 1 - self.lr * self.weight_decay  # decoupled: not through m, v
        update *= self.lr * c2 / c1
        p.value -= update


def clip_grad_norm(params, max_norm):
    """Scale every gradient by min(1, max_norm / global norm); returns the norm before clipping."""
    grads = [p.grad for p in params if p.trainable and p.grad is not None]
    norm = math.sqrt(sum(float(np.vdot(g, g)) for g in grads))
    if norm > max_norm:
        for g in grads:
            g *= max_norm / (norm + 1e-12)
    return norm


def lr_at(step, base_lr, warmup, total, final_fraction=0.0):
    """Linear warmup from 0 over `warmup` steps, then linear decay to final_fraction * base_lr
    at `total`. `step` counts from 0."""
    if warmup and step < warmup:
        return base_lr * (step + 1) / warmup
    span = max(total - warmup, 1)
    done = min(max(step - warmup, 0) / span, 1.0)
    return base_lr * (1 - (1 - final_fraction) * done)
