"""The bottleneck adapter of Houlsby et al. (2019): forward/backward (its config is
configs.AdapterConfig).

    adapter(h) = h + W_up · f(W_down · h + b_down) + b_up          (sequential, with skip)

Width C goes down to the bottleneck m and back up to C. With W_up small (or zero) the
adapter is (nearly) the identity, so a fresh adapter barely changes the frozen network.

Shapes: N any leading shape (B, T), C model width, m bottleneck size.
"""
import numpy as np

from .configs import PLACEMENTS, AdapterConfig  # noqa: F401  (importable from here too)
from .layers import ACTIVATIONS, linear_backward, linear_forward

def truncated_normal(rng, shape, std, dtype):
    """Normal(0, std) cut at +-2 std by redrawing, like the authors' TensorFlow initializer."""
    x = rng.standard_normal(shape)
    bad = np.abs(x) > 2
    while bad.any():
        x[bad] = rng.standard_normal(bad.sum())
        bad = np.abs(x) > 2
    return (x * std).astype(dtype)


def init_adapter(config, d_model, rng, dtype):
    """Fresh adapter weights {W_down (C,m), b_down (m,), W_up (m,C), b_up (C,)}: near identity."""
    m = config.size(d_model)
    W_up = np.zeros((m, d_model), dtype) if config.zero_init_up \
        else truncated_normal(rng, (m, d_model), config.init_std, dtype)
    return {"W_down": truncated_normal(rng, (d_model, m), config.init_std, dtype),
            "b_down": np.zeros(m, dtype), "W_up": W_up, "b_up": np.zeros(d_model, dtype)}


def adapter_forward(h, w, nonlinearity="gelu", skip=True, scaling=1.0):
    """out = h + s * (f(h @ W_down + b_down) @ W_up + b_up).   h (N, C) -> out (N, C).

    skip=False gives the bare branch (the parallel adapter adds it elsewhere).
    """
    act_forward = ACTIVATIONS[nonlinearity][0]
    z, cache_down = linear_forward(h, w["W_down"], w["b_down"])  # (N, C) @ (C, m) -> (N, m)
    a, cache_act = act_forward(z)  # (N, m), the bottleneck's nonlinearity f
    u, cache_up = linear_forward(a, w["W_up"], w["b_up"])  # (N, m) @ (m, C) -> (N, C)
    branch = scaling * u  # (N, C), s = 1 for Houlsby's adapter
    out = h + branch if skip else branch  # (N, C), the skip connection keeps h
    cache = (cache_down, cache_act, cache_up, nonlinearity, skip, scaling)
    return out, cache


def adapter_backward(dout, cache, need_dx=True, need=None):
    """dout (N, C) -> dh (N, C) or None, grads {name: array} for the names in `need`."""
    cache_down, cache_act, cache_up, nonlinearity, skip, scaling = cache
    need = {"W_down", "b_down", "W_up", "b_up"} if need is None else need
    act_backward = ACTIVATIONS[nonlinearity][1]
    dbranch = dout  # forward was out = h + branch (or out = branch): (N, C)
    du = scaling * dbranch  # forward was branch = s * u: (N, C)
    da, g_up = linear_backward(du, cache_up, need_dW="W_up" in need,
                               need_db="b_up" in need)  # forward was u = a @ W_up + b_up: (N, m)
    dz, _ = act_backward(da, cache_act)  # forward was a = f(z): (N, m)
    dh, g_down = linear_backward(dz, cache_down, need_dx=need_dx, need_dW="W_down" in need,
                                 need_db="b_down" in need)  # forward was z = h @ W_down + b_down: (N, C)
    if need_dx and skip:
        dh = dh + dout  # forward was out = h + branch: the skip passes dout to h unchanged
    grads = {f"{n}_up": g for n, g in g_up.items()} | {f"{n}_down": g for n, g in g_down.items()}
    return dh, grads
