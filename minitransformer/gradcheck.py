"""Gradient checks: centred finite differences in float64 against the hand-written backward.

    numerical  dL/dx_i ~ (L(x + h e_i) - L(x - h e_i)) / 2h,   h = 1e-5, entry restored after
    rel_error  = max|a - n| / max(max|a| + max|n|, tiny)        over one whole array, tiny = 1e-3

Why over the whole array (max norms) rather than entry by entry: a finite difference carries
round-off of about 1e-16 |L| / h ~ 1e-11, so an entry whose true gradient is ~0 would divide
that noise by ~0 and report a "failure" that is no bug. Why tiny = 1e-3: some gradients are
exactly zero by the maths (the key bias b_k: softmax ignores a shift shared by every key), and
for an array whose gradient is below 1e-3 everywhere the check becomes an absolute one,
|a - n| <= threshold * 1e-3 = 1e-10, still ten times tighter than a wrong backward could pass.
A wrong backward is off by a fraction of the array's scale, not by 1e-7 of it.

Check at a generic point: with the usual 0.02 init, activations are tiny and many gradients
sink to the round-off floor. The checks therefore use larger weights (init_std ~0.3) and
LayerNorm parameters moved away from 1 and 0.

Operations are checked against a random linear functional L = sum(out * R) of their output,
so that every output entry matters with its own weight. Thresholds (float64):
OP_THRESHOLD = 1e-7 for one operation, MODEL_THRESHOLD = 1e-6 for a whole model's loss.
"""
import numpy as np

OP_THRESHOLD = 1e-7
MODEL_THRESHOLD = 1e-6


def rel_error(a, n, tiny=1e-3):
    """Relative error between an analytic and a numerical gradient array (see module doc)."""
    a, n = np.asarray(a, np.float64), np.asarray(n, np.float64)
    if a.shape != n.shape:
        raise ValueError(f"a: expected the shape of the numerical gradient {n.shape}, got {a.shape}")
    if a.size == 0:
        return 0.0
    return float(np.max(np.abs(a - n)) / max(np.max(np.abs(a)) + np.max(np.abs(n)), tiny))


def numerical_gradient(f, x, h=1e-5):
    """dL/dx by centred differences. f() -> float reads x; x is perturbed in place, one entry
    at a time, and every entry is restored exactly before the next."""
    if x.dtype != np.float64:
        raise TypeError(f"x: expected float64 for a gradient check, got {x.dtype}")
    grad = np.zeros_like(x)
    flat, gflat = x.reshape(-1), grad.reshape(-1)  # views: writing flat writes x
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + h
        fp = f()
        flat[i] = old - h
        fm = f()
        flat[i] = old  # restored bit for bit
        gflat[i] = (fp - fm) / (2 * h)
    return grad


def random_functional(shape, seed):
    """R with unit-variance entries scaled by 1/sqrt(size): L = sum(out * R) stays O(1) however
    large the output, and so does the finite differences' round-off (~1e-16 |L| / h)."""
    R = np.random.default_rng(seed).standard_normal(shape)
    return R / np.sqrt(max(R.size, 1))


def check_function(forward, backward, inputs, wrt=None, seed=0, h=1e-5):
    """Check backward against finite differences for every array in `wrt` (default: all inputs).

    forward(**inputs) -> (out, cache);  backward(dout, cache) -> {name: gradient}.
    Returns {name: relative error}.
    """
    wrt = list(inputs) if wrt is None else wrt
    out, cache = forward(**inputs)
    R = random_functional(np.shape(out), seed)
    analytic = backward(R.copy(), cache)  # a copy: a backward must not write into dout, but if it did...

    def L():
        return float(np.sum(forward(**inputs)[0] * R))

    return {name: rel_error(analytic[name], numerical_gradient(L, inputs[name], h)) for name in wrt}


def check_module(module, x, seed=0, **kwargs):
    """Check a container (LayerNorm, Attention, Adapter, ...): its input and every trainable
    parameter. Returns {"x" or parameter name: relative error}."""
    out, cache = module.forward(x, **kwargs)
    R = random_functional(out.shape, seed)
    for p in module.parameters():
        p.grad = None
    dx = module.backward(R.copy(), cache)

    def L():
        return float(np.sum(module.forward(x, **kwargs)[0] * R))

    errors = {"x": rel_error(dx, numerical_gradient(L, x))}
    for p in module.parameters():
        if p.trainable:
            errors[p.name] = rel_error(p.grad, numerical_gradient(L, p.value))
    return errors


def model_loss(model, ids, targets, pad_mask=None, head="lm", dropout_seed=None):
    """L(backward=False) -> the model's loss, a float. With dropout_seed, the model runs in
    training mode and every call draws the same dropout masks from a generator seeded anew."""
    train = dropout_seed is not None

    def L(backward=False):
        rng = np.random.default_rng(dropout_seed) if train else None
        return model.loss(ids, targets, pad_mask, head, train=train, rng=rng, backward=backward)[1]

    return L


def check_model(model, ids, targets, pad_mask=None, head="lm", dropout_seed=None):
    """Check the whole model's loss against every parameter.

    Returns rows (name, shape, trainable, error) with error None for a frozen parameter, and
    raises if a frozen parameter received a gradient. With dropout_seed, the model runs in
    training mode and every forward draws the same dropout masks from a generator seeded anew.
    """
    L = model_loss(model, ids, targets, pad_mask, head, dropout_seed)
    model.zero_grad()
    L(backward=True)
    rows = []
    for name, p in model.named_parameters().items():
        if not p.trainable:
            if p.grad is not None:
                raise AssertionError(f"{name}: frozen, yet it received a gradient")
            rows.append((name, p.value.shape, False, None))
            continue
        # a trainable parameter the loss does not use (the LM head under head="cls") gets no
        # gradient at all; its finite differences must then be zero too
        analytic = np.zeros_like(p.value) if p.grad is None else p.grad
        rows.append((name, p.value.shape, True, rel_error(analytic, numerical_gradient(L, p.value))))
    return rows


# ----------------------------------------------------------------------------- every operation


def operation_checks(seed=0):
    """Check every forward/backward pair of the current path (backend.py) on small random
    float64 inputs.

    Yields (operation, input name, shape, relative error) for each input and parameter.
    """
    from . import layers
    from .attention import attention_bias
    from .backend import ops as L  # the current path's functions: reference, or the fast kernels
    activations = {"gelu": (L.gelu_forward, L.gelu_backward), "relu": layers.ACTIVATIONS["relu"],
                   "tanh": layers.ACTIVATIONS["tanh"]}
    rng = np.random.default_rng(seed)

    def randn(*shape):
        return rng.standard_normal(shape)

    def run(op, fwd, bwd, inputs, wrt=None, h=1e-5):
        for name, err in check_function(fwd, bwd, inputs, wrt, seed, h).items():
            yield op, name, inputs[name].shape, err

    def with_input(name, backward):  # (dx, grads) -> {name: dx, **grads}, the backward called once
        def bwd(d, c):
            dx, grads = backward(d, c)
            return {name: dx, **grads}
        return bwd

    yield from run("linear", L.linear_forward,
                   lambda d, c: dict(zip(("x", "W", "b"), L.linear_backward(d, c))),
                   {"x": randn(2, 3, 4), "W": randn(4, 5), "b": randn(5)})
    ids = np.array([[1, 3, 3], [0, 4, 1]])  # token 3 twice: its gradient rows must add
    yield from run("token embedding", lambda W: L.embedding_forward(ids, W),
                   lambda d, c: {"W": L.embedding_backward(d, c)}, {"W": randn(6, 4)})
    yield from run("position embedding", lambda W: (lambda o, c: (o + np.zeros((2, 1, 1)), c))(
                       *L.position_forward(3, W)),
                   lambda d, c: {"W": L.position_backward(d, c)}, {"W": randn(5, 4)})
    ln_backward = lambda d, c: dict(zip(("x", "gamma", "beta"), L.layernorm_backward(d, c)))  # noqa: E731
    yield from run("layernorm", L.layernorm_forward, ln_backward,
                   {"x": randn(2, 3, 6), "gamma": randn(6), "beta": randn(6)})
    # A constant row has variance 0: the function then curves on the scale sqrt(eps) ~ 3e-3,
    # and h = 1e-5 leaves a truncation error ~ (h / sqrt(eps))^2 ~ 1e-7 (measured: 3.5e-7);
    # h = 1e-6 brings it to 3e-9. The backward itself is exact either way.
    x = randn(2, 3, 6)
    x[0, 1] = 0.7
    yield from run("layernorm (constant row, h=1e-6)", L.layernorm_forward, ln_backward,
                   {"x": x, "gamma": randn(6), "beta": randn(6)}, h=1e-6)
    for act in ("gelu", "relu", "tanh"):
        fwd, bwd = activations[act]
        z = randn(3, 7)
        z[np.abs(z) < 0.05] = 0.5  # keep relu's kink away from the finite differences
        yield from run(act, fwd, lambda d, c, bwd=bwd: {"x": bwd(d, c)}, {"x": z})
    s = randn(2, 3, 5)
    s[0, 0, 1:3] = -np.inf  # masked entries
    s[1, 2, :] = -np.inf  # a fully masked row: output 0, no NaN
    masked = np.isinf(s)
    yield from run("softmax (masked)", lambda x: L.softmax_forward(np.where(masked, -np.inf, x)),
                   lambda d, c: {"x": L.softmax_backward(d, c)}, {"x": np.where(masked, 0.0, s)})
    yield from run("dropout (p=0.3, replayed)",
                   lambda x: L.dropout_forward(x, 0.3, np.random.default_rng(1), True),
                   lambda d, c: {"x": L.dropout_backward(d, c)}, {"x": randn(4, 5)})
    C, H = 6, 2
    w = {f"{k}_{n}": randn(C, C) * 0.5 if k == "W" else randn(C) * 0.5 for n in "qkvo" for k in "Wb"}
    pad = np.array([[True] * 4, [True, True, True, False]])
    for label, bias in (("attention (causal + padding)", attention_bias(4, True, pad, np.float64)),
                        ("attention (padding)", attention_bias(4, False, pad, np.float64))):
        names = list(w)
        yield from run(label,
                       lambda x, **ws: L.attention_forward(x, ws, H, bias),
                       with_input("x", L.attention_backward),
                       {"x": randn(2, 4, C), **{k: v.copy() for k, v in w.items()}}, ["x"] + names)
    yield from run("attend (causal + padding)", lambda q, k, v: L.attend_forward(q, k, v, H, attention_bias(
                       4, True, pad, np.float64)),
                   lambda d, c: dict(zip(("q", "k", "v"), L.attend_backward(d, c))),
                   {"q": randn(2, 4, C), "k": randn(2, 4, C), "v": randn(2, 4, C)})

    def prefix(k, v, P_k, P_v):  # k and v out, stacked: one output for the check
        k, v, cache = L.prefix_forward(k, v, P_k, P_v)
        return np.stack([k, v]), cache
    yield from run("prefix (2 keys and values in front)", prefix,
                   lambda d, c: dict(zip(("k", "v", "P_k", "P_v"), L.prefix_backward(d[0], d[1], c))),
                   {"k": randn(2, 4, C), "v": randn(2, 4, C), "P_k": randn(2, C), "P_v": randn(2, C)})
    yield from run("lora (s = 1.5)", lambda x, A, B: L.lora_forward(x, A, B, 1.5),
                   lambda d, c: dict(zip(("x", "A", "B"), L.lora_backward(d, c))),
                   {"x": randn(2, 3, 5), "A": randn(5, 2), "B": randn(2, 4)})
    mlp = {"P0": randn(3, C), "W_1": randn(C, 5) * 0.5, "b_1": randn(5), "W_2": randn(5, 2 * 2 * C) * 0.5,
           "b_2": randn(2 * 2 * C)}
    yield from run("prefix MLP (2 layers)", lambda **ws: L.prefix_mlp_forward(ws["P0"], ws, 2),
                   lambda d, c: L.prefix_mlp_backward(d, c), mlp)
    yield from run("prompt", L.prompt_forward,
                   lambda d, c: dict(zip(("x", "P"), L.prompt_backward(d, c))), {"x": randn(2, 3, C), "P": randn(2, C)})
    yield from run("strip prompt", lambda h: L.strip_prompt_forward(h, 2),
                   lambda d, c: {"h": L.strip_prompt_backward(d, c)}, {"h": randn(2, 5, C)})
    for act, skip, scaling in (("gelu", True, 1.0), ("relu", True, 1.0), ("tanh", True, 1.0),
                               ("gelu", False, 4.0)):
        label = f"adapter ({act}{', skip' if skip else ', parallel branch, s=4'})"
        aw = {"W_down": randn(C, 3) * 0.5, "b_down": randn(3), "W_up": randn(3, C) * 0.5, "b_up": randn(C)}
        h = randn(2, 4, C)
        h[np.abs(h) < 0.05] = 0.5
        yield from run(label,
                       lambda h, **ws: L.adapter_forward(h, ws, act, skip, scaling),
                       with_input("h", L.adapter_backward),
                       {"h": h, **aw})
    targets = np.array([[1, 0, -100], [2, -100, 3]])  # -100: ignored positions

    def ce_forward(logits):
        loss, cache = L.cross_entropy_forward(logits, targets)
        return np.array(loss), cache
    yield from run("cross-entropy (ignored positions)", ce_forward,
                   lambda d, c: {"logits": float(d) * L.cross_entropy_backward(c)}, {"logits": randn(2, 3, 4)})
