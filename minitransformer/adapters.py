"""The bottleneck adapter of Houlsby et al. (2019): forward/backward and its config.

    adapter(h) = h + W_up · f(W_down · h + b_down) + b_up          (sequential, with skip)

Width C goes down to the bottleneck m and back up to C. With W_up small (or zero) the
adapter is (nearly) the identity, so a fresh adapter barely changes the frozen network.

Shapes: N any leading shape (B, T), C model width, m bottleneck size.
"""
from dataclasses import asdict, dataclass

import numpy as np

from .layers import ACTIVATIONS, linear_backward, linear_forward
from .validate import flag, integer, number

PLACEMENTS = ("houlsby", "ffn", "parallel")


@dataclass
class AdapterConfig:
    """How one task's adapters look and what trains with them.

    placement:
      "houlsby"  - the paper: an adapter on the attention sub-layer's output and one on the
                   feed-forward sub-layer's output, each *before* the residual add and LayerNorm.
      "ffn"      - Pfeiffer et al. (2021): only the feed-forward adapter, same position.
      "parallel" - He et al. (2022): a branch W_up f(W_down x) without its own skip, fed with the
                   feed-forward sub-layer's input and added to its output.
    train_layernorm:
      True  - the paper: every LayerNorm is trained with the adapters. Each task then keeps its
              own copy of the LayerNorm parameters (~2C per LayerNorm), so tasks never interfere.
      False - the AdapterHub library's default: LayerNorms stay frozen with the base, and only
              the adapters and the head are trained.
    """
    bottleneck: int | None = 64  # m, the adapter's inner width; or set reduction_factor instead
    reduction_factor: float | None = None  # C / m; overrides bottleneck when given
    nonlinearity: str = "gelu"  # f in the bottleneck: "gelu" (authors' code), "relu" or "tanh"
    init_std: float = 1e-3  # std of the truncated normal (cut at +-2 std) for W_down and W_up
    zero_init_up: bool = False  # W_up = 0: the adapter is exactly the identity at init
    placement: str = "houlsby"  # "houlsby", "ffn" or "parallel" (see above)
    train_layernorm: bool = True  # the paper trains LayerNorms; AdapterHub keeps them frozen
    scaling: float = 1.0  # multiplies the bottleneck branch (He et al. use s > 1 for parallel)

    def __post_init__(self):
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement: expected one of {PLACEMENTS}, got {self.placement!r}")
        if self.nonlinearity not in ACTIVATIONS:
            raise ValueError(f"nonlinearity: expected one of {tuple(ACTIVATIONS)}, "
                             f"got {self.nonlinearity!r}")
        if self.bottleneck is None and self.reduction_factor is None:
            raise ValueError("bottleneck: give a bottleneck size m or a reduction_factor, got neither")
        if self.bottleneck is not None:
            integer("bottleneck", self.bottleneck, expected="a positive integer m")
        if self.reduction_factor is not None:
            number("reduction_factor", self.reduction_factor, "a number > 0", lambda r: r > 0)
        number("init_std", self.init_std, "a number >= 0", lambda std: std >= 0)
        flag("zero_init_up", self.zero_init_up)
        flag("train_layernorm", self.train_layernorm)
        number("scaling", self.scaling, "a number > 0", lambda s: s > 0)

    def size(self, d_model):
        """The bottleneck width m for a model of width d_model."""
        m = int(round(d_model / self.reduction_factor)) if self.reduction_factor is not None \
            else self.bottleneck
        if not 1 <= m:
            raise ValueError(f"bottleneck: expected m >= 1 for d_model={d_model}, got {m}")
        return m

    def sites(self):
        """Where in each block this config puts adapters: a subset of ("attn", "ffn", "parallel")."""
        return {"houlsby": ("attn", "ffn"), "ffn": ("ffn",), "parallel": ("parallel",)}[self.placement]

    def to_dict(self):
        return asdict(self)


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
    branch = h.dtype.type(scaling) * u  # (N, C), s = 1 for Houlsby's adapter
    out = h + branch if skip else branch  # (N, C), the skip connection keeps h
    cache = (cache_down, cache_act, cache_up, nonlinearity, skip, scaling)
    return out, cache


def adapter_backward(dout, cache, need_dx=True, need=None):
    """dout (N, C) -> dh (N, C) or None, grads {name: array} for the names in `need`."""
    cache_down, cache_act, cache_up, nonlinearity, skip, scaling = cache
    need = {"W_down", "b_down", "W_up", "b_up"} if need is None else need
    act_backward = ACTIVATIONS[nonlinearity][1]
    grads = {}
    dbranch = dout  # forward was out = h + branch (or out = branch): (N, C)
    du = dout.dtype.type(scaling) * dbranch  # forward was branch = s * u: (N, C)
    da, grads["W_up"], grads["b_up"] = linear_backward(
        du, cache_up, need_dW="W_up" in need, need_db="b_up" in need)  # forward was u = a @ W_up + b_up
    dz = act_backward(da, cache_act)  # forward was a = f(z): (N, m)
    dh, grads["W_down"], grads["b_down"] = linear_backward(
        dz, cache_down, need_dx=need_dx, need_dW="W_down" in need,
        need_db="b_down" in need)  # forward was z = h @ W_down + b_down: (N, C)
    if need_dx and skip:
        dh = dh + dout  # forward was out = h + branch: the skip passes dout to h unchanged
    return dh, {n: g for n, g in grads.items() if g is not None}
