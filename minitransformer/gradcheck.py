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

from .configs import ModelConfig

OP_THRESHOLD = 1e-7
MODEL_THRESHOLD = 1e-6

# The one tiny float64 model of the checks (tests, `python -m minitransformer gradcheck`, the
# course): large weights (init_std 0.3) for a generic point; vary a field with dataclasses.replace.
CHECK_CONFIG = ModelConfig(vocab_size=11, max_len=8, d_model=8, n_heads=2, n_layers=2, d_ff=16, norm="post",
                           causal=False, pooling="first", n_classes=3, dropout=0.0, init_std=0.3,
                           dtype="float64")


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
    for i in np.ndindex(x.shape):  # indexing x itself: a transposed view is nudged as well
        old = x[i]
        x[i] = old + h
        fp = f()
        x[i] = old - h
        fm = f()
        x[i] = old  # restored bit for bit
        grad[i] = (fp - fm) / (2 * h)
    return grad


def random_functional(shape, seed):
    """R with unit-variance entries scaled by 1/sqrt(size): L = sum(out * R) stays O(1) however
    large the output, and so does the finite differences' round-off (~1e-16 |L| / h)."""
    R = np.random.default_rng(seed).standard_normal(shape)
    return R / np.sqrt(max(R.size, 1))


def check_function(forward, backward, inputs, wrt=None, seed=0, h=1e-5):
    """Check backward against finite differences for every array in `wrt` (default: all inputs).

    forward(**inputs) -> (out, cache);  backward(dout, cache) -> dx, grads, as every backward
    returns it: grads {name: gradient} for the inputs that are parameters, dx for the others in
    the order of `inputs` (one array, a tuple for several, None for none).
    Returns {name: relative error}.
    """
    wrt = list(inputs) if wrt is None else wrt
    out, cache = forward(**inputs)
    R = random_functional(np.shape(out), seed)
    dx, grads = backward(R.copy(), cache)  # a copy: a backward must not write into dout, but if it did...
    dxs = () if dx is None else dx if isinstance(dx, tuple) else (dx,)
    analytic = dict(zip([n for n in inputs if n not in grads], dxs, strict=True)) | grads

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
    float64 inputs: a table of cases (label, forward, backward, inputs[, wrt, h]), each
    backward called once, as it is.

    Yields (operation, input name, shape, relative error) for each input and parameter.
    """
    from . import layers
    from .attention import attention_bias
    from .backend import ops  # the current path's functions: reference, or the fast kernels
    activations = {"gelu": (ops.gelu_forward, ops.gelu_backward), "relu": layers.ACTIVATIONS["relu"],
                   "tanh": layers.ACTIVATIONS["tanh"]}
    rng = np.random.default_rng(seed)

    def randn(*shape):
        return rng.standard_normal(shape)

    C, H = 6, 2
    ids = np.array([[1, 3, 3], [0, 4, 1]])  # token 3 twice: its gradient rows must add
    # A constant row has variance 0: the function then curves on the scale sqrt(eps) ~ 3e-3,
    # and h = 1e-5 leaves a truncation error ~ (h / sqrt(eps))^2 ~ 1e-7 (measured: 3.5e-7);
    # h = 1e-6 brings it to 3e-9. The backward itself is exact either way.
    flat = randn(2, 3, 6)
    flat[0, 1] = 0.7
    s = randn(2, 3, 5)
    s[0, 0, 1:3] = -np.inf  # masked entries
    s[1, 2, :] = -np.inf  # a fully masked row: output 0, no NaN
    masked = np.isinf(s)
    w = {f"{k}_{n}": randn(C, C) * 0.5 if k == "W" else randn(C) * 0.5 for n in "qkvo" for k in "Wb"}
    pad = np.array([[True] * 4, [True, True, True, False]])
    causal_pad, pad_only = attention_bias(4, True, pad, np.float64), attention_bias(4, False, pad, np.float64)
    targets = np.array([[1, 0, -100], [2, -100, 3]])  # -100: ignored positions

    def position(W):  # the (T, C) rows added to a batch of 2: the backward sums over it
        out, cache = ops.position_forward(3, W)
        return out + np.zeros((2, 1, 1)), cache

    def prefix(k, v, P_k, P_v):  # k and v out, stacked: one output for the check
        k, v, cache = ops.prefix_forward(k, v, P_k, P_v)
        return np.stack([k, v]), cache

    def ce_forward(logits):  # the loss as a 0-d array; its backward starts at dloss = 1
        loss, cache = ops.cross_entropy_forward(logits, targets)
        return np.array(loss), cache

    def ce_backward(dloss, cache):
        dlogits, grads = ops.cross_entropy_backward(cache)
        return float(dloss) * dlogits, grads

    def no_kink(*shape):  # relu's kink kept away from the finite differences
        z = randn(*shape)
        z[np.abs(z) < 0.05] = 0.5
        return z

    cases = [
        ("linear", ops.linear_forward, ops.linear_backward, {"x": randn(2, 3, 4), "W": randn(4, 5), "b": randn(5)}),
        ("token embedding", lambda W: ops.embedding_forward(ids, W), ops.embedding_backward, {"W": randn(6, 4)}),
        ("position embedding", lambda W_pos: position(W_pos), ops.position_backward, {"W_pos": randn(5, 4)}),
        ("layernorm", ops.layernorm_forward, ops.layernorm_backward,
         {"x": randn(2, 3, 6), "gamma": randn(6), "beta": randn(6)}),
        ("layernorm (constant row, h=1e-6)", ops.layernorm_forward, ops.layernorm_backward,
         {"x": flat, "gamma": randn(6), "beta": randn(6)}, None, 1e-6),
        *((act, *activations[act], {"x": no_kink(3, 7)}) for act in ("gelu", "relu", "tanh")),
        ("softmax (masked)", lambda x: ops.softmax_forward(np.where(masked, -np.inf, x)), ops.softmax_backward,
         {"x": np.where(masked, 0.0, s)}),
        ("dropout (p=0.3, replayed)", lambda x: ops.dropout_forward(x, 0.3, np.random.default_rng(1), True),
         ops.dropout_backward, {"x": randn(4, 5)}),
        ("attention (causal + padding)", lambda x, **ws: ops.attention_forward(x, ws, H, causal_pad),
         ops.attention_backward, {"x": randn(2, 4, C), **{k: v.copy() for k, v in w.items()}}),
        ("attention (padding)", lambda x, **ws: ops.attention_forward(x, ws, H, pad_only),
         ops.attention_backward, {"x": randn(2, 4, C), **{k: v.copy() for k, v in w.items()}}),
        ("attend (causal + padding)", lambda q, k, v: ops.attend_forward(q, k, v, H, causal_pad), ops.attend_backward,
         {"q": randn(2, 4, C), "k": randn(2, 4, C), "v": randn(2, 4, C)}),
        ("prefix (2 keys and values in front)", prefix, lambda d, c: ops.prefix_backward(d[0], d[1], c),
         {"k": randn(2, 4, C), "v": randn(2, 4, C), "P_k": randn(2, C), "P_v": randn(2, C)}),
        ("lora (s = 1.5)", lambda x, A, B: ops.lora_forward(x, A, B, 1.5), ops.lora_backward,
         {"x": randn(2, 3, 5), "A": randn(5, 2), "B": randn(2, 4)}),
        ("prefix MLP (2 layers)", lambda **ws: ops.prefix_mlp_forward(ws["P0"], ws, 2), ops.prefix_mlp_backward,
         {"P0": randn(3, C), "W_1": randn(C, 5) * 0.5, "b_1": randn(5), "W_2": randn(5, 2 * 2 * C) * 0.5,
          "b_2": randn(2 * 2 * C)}),
        ("prompt", ops.prompt_forward, ops.prompt_backward, {"x": randn(2, 3, C), "P": randn(2, C)}),
        ("strip prompt", lambda h: ops.strip_prompt_forward(h, 2), ops.strip_prompt_backward, {"h": randn(2, 5, C)}),
        *((f"adapter ({act}{', skip' if skip else ', parallel branch, s=4'})",
           lambda h, act=act, skip=skip, scaling=scaling, **ws: ops.adapter_forward(h, ws, act, skip, scaling),
           ops.adapter_backward,
           {"h": no_kink(2, 4, C), "W_down": randn(C, 3) * 0.5, "b_down": randn(3), "W_up": randn(3, C) * 0.5,
            "b_up": randn(C)})
          for act, skip, scaling in (("gelu", True, 1.0), ("relu", True, 1.0), ("tanh", True, 1.0),
                                     ("gelu", False, 4.0))),
        ("cross-entropy (ignored positions)", ce_forward, ce_backward, {"logits": randn(2, 3, 4)}),
    ]
    for op, forward, backward, inputs, *rest in cases:
        wrt, h = rest if rest else (None, 1e-5)
        for name, err in check_function(forward, backward, inputs, wrt, seed, h).items():
            yield op, name, inputs[name].shape, err
