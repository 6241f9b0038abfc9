"""The update of one array, written as in the papers: SGD with momentum, AdamW, and the loop
over parameters. optim.py's optimizers keep the state and call these (through backend.ops, so
the fast path can swap in tools/kernels.py's versions).
"""
import numpy as np

def sgd_update(w, g, velocity, lr, momentum, weight_decay):
    """SGD with momentum on one array, in place on w and velocity (None: no momentum).

        g = g + wd * w            (weight decay as an L2 term added to the gradient)
        velocity = momentum * velocity + g
        w = w - lr * velocity
    """
    g = g + weight_decay * w  # (same shape as w)
    if velocity is not None:
        velocity[...] = momentum * velocity + g  # written into the optimizer's own array
        g = velocity
    w -= lr * g


def adamw_update(w, g, m, v, t, lr, b1, b2, eps, weight_decay):
    """One AdamW step on one array (Loshchilov & Hutter), in place on w, m and v; t counts from 1.

        m = b1 m + (1 - b1) g                       running mean of the gradient
        v = b2 v + (1 - b2) g^2                     running mean of its square
        m_hat = m / (1 - b1^t);  v_hat = v / (1 - b2^t)      corrects the start at m = v = 0
        w = w - lr * (m_hat / (sqrt(v_hat) + eps) + wd * w)  decay decoupled from m and v
    """
    m[...] = b1 * m + (1 - b1) * g
    v[...] = b2 * v + (1 - b2) * g * g
    m_hat = m / (1 - b1**t)
    v_hat = v / (1 - b2**t)
    w -= lr * (m_hat / (np.sqrt(v_hat) + eps) + weight_decay * w)


def each_parameter(fn, params):
    """fn(p) for every parameter, one after another."""
    for p in params:
        fn(p)
