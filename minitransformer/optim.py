"""Optimizers written by hand: SGD with momentum, AdamW, gradient clipping, the LR schedule.

Each optimizer is given the model's parameters and touches only the trainable ones: a frozen
parameter has no state here and is never written to. The update of one array is a plain
function (sgd_update, adamw_update) written as in the papers; the optimizer classes keep the
state (moments, step count) and call it for every parameter that has a gradient.
"""
import math

import numpy as np

from . import backend
from .updates import adamw_update, each_parameter, sgd_update  # noqa: F401  (the reference updates)

# ----------------------------------------------------------------------------- the optimizers


class Optimizer:
    def __init__(self, params, lr):
        self.params = [p for p in params if p.trainable]  # frozen arrays are not even held
        self.lr = lr
        self.state = {}  # parameter name -> its moment arrays, created on the first step
        self.t = 0

    def step(self):
        """Update every trainable parameter that has a gradient (backend.ops: one by one, or
        shared out among threads on the fast path)."""
        self.t += 1
        todo = [p for p in self.params if p.trainable and p.grad is not None]
        backend.ops.each_parameter(self.update, todo)

    def zero_grad(self):
        for p in self.params:
            p.grad = None


class SGD(Optimizer):
    """v = momentum * v + g;  w -= lr * v   (with weight decay added to g when asked)."""

    def __init__(self, params, lr=0.1, momentum=0.9, weight_decay=0.0):
        super().__init__(params, lr)
        self.momentum, self.weight_decay = momentum, weight_decay

    def update(self, p):
        velocity = None
        if self.momentum:
            velocity = self.state.setdefault(p.name, {"v": np.zeros_like(p.value)})["v"]
        backend.ops.sgd_update(p.value, p.grad, velocity, self.lr, self.momentum, self.weight_decay)


class AdamW(Optimizer):
    """Adam with decoupled weight decay (adamw_update). The decay applies to matrices only,
    not to biases, LayerNorm parameters or other vectors."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        super().__init__(params, lr)
        self.b1, self.b2 = betas
        self.eps, self.weight_decay = eps, weight_decay

    def update(self, p):
        s = self.state.setdefault(p.name, {"m": np.zeros_like(p.value), "v": np.zeros_like(p.value)})
        decay = self.weight_decay if p.value.ndim >= 2 else 0.0
        backend.ops.adamw_update(p.value, p.grad, s["m"], s["v"], self.t, self.lr, self.b1, self.b2,
                                 self.eps, decay)


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
