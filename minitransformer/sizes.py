"""How big a model is: its parameters counted part by part, and the memory one step needs.

Counting parameters is the first exercise with any architecture. Here the count also guards the
machine: a size that would not fit in memory is refused before its first array is allocated,
instead of NumPy failing half-way or the system killing the process.

    parameter_count(cfg)                     the base (the shipped one: 214,883)
    adapter_parameter_count(cfg, adapter, K) one task, any method: what it adds, its copies, its head
    step_bytes(cfg, B, T, adapter, K)        parameters, AdamW's state and cached activations
    check_fits(nbytes, what)                 ValueError when nbytes exceed the memory available

Shapes: V vocabulary, T_max positions, C width, F feed-forward width, L blocks, H heads,
m bottleneck, K classes, B batch, T sequence length.
"""
import os

import numpy as np

ALWAYS_FITS = 1 << 28  # 256 MiB: below this there is no need to ask the system for its free memory


def parameter_count(cfg):
    """Parameters of a Transformer(cfg): embeddings, blocks, LayerNorms and heads."""
    V, T_max, C, F, L, K = cfg.vocab_size, cfg.max_len, cfg.d_model, cfg.d_ff, cfg.n_layers, cfg.n_classes
    ln = 2 * C  # gamma, beta
    attn = 4 * (C * C + C)  # W_q, W_k, W_v, W_o (C,C) and their biases
    ffn = C * F + F + F * C + C  # W_1 (C,F), b_1, W_2 (F,C), b_2
    embed = V * C + T_max * C  # W_tok (V,C), W_pos (T_max,C)
    heads = C * V + V + (C * K + K if K else 0)  # lm_head, and the base's classifier if any
    return embed + ln + L * (attn + ffn + 2 * ln) + heads  # + ln_emb (post-LN) or ln_f (pre-LN)


def adapter_parameter_count(cfg, adapter, n_classes):
    """Parameters of one task (model.add_adapter(name, adapter, n_classes)), whatever its method
    (tasks.METHODS): what the method adds, the task's own copies of base parameters, its head."""
    from .tasks import method_of  # here, not at the top: tasks.py builds on model's modules
    C, F, L = cfg.d_model, cfg.d_ff, cfg.n_layers
    method = method_of(adapter)
    head = C * n_classes + n_classes
    if method == "adapter":
        m = adapter.size(C)
        one = C * m + m + m * C + C  # W_down (C,m), b_down, W_up (m,C), b_up
        norms = (2 * L + 1) * 2 * C if adapter.train_layernorm else 0  # the task's LayerNorm copies
        return L * len(adapter.sites()) * one + norms + head
    if method == "lora":  # A (d_in, r) and B (r, d_out) per target, in every block
        dims = {"q": (C, C), "k": (C, C), "v": (C, C), "o": (C, C), "ffn1": (C, F), "ffn2": (F, C)}
        return L * sum(adapter.r * (dims[t][0] + dims[t][1]) for t in adapter.targets) + head
    if method == "prefix":  # P_k, P_v (n, C) per block; or P' (n, C) and the MLP that makes them
        n, h = adapter.n_prefix, adapter.hidden
        if adapter.reparameterize:
            return n * C + C * h + h + h * 2 * L * C + 2 * L * C + head
        return L * 2 * n * C + head
    if method == "prompt":  # P (n, C)
        return adapter.n_prompt * C + head
    widths = {"q": C, "k": C, "v": C, "o": C, "ffn1": F, "ffn2": C}  # bitfit: each bias's length
    betas = (2 * L + 1) * C if adapter.layernorm else 0  # every LayerNorm's beta
    return L * sum(widths[b] for b in adapter.biases) + betas + head


def activation_count(cfg, batch, seq_len, adapter=None):
    """Numbers a forward pass keeps for its backward (an estimate, within a factor of ~2)."""
    from .tasks import method_of
    method = None if adapter is None else method_of(adapter)
    T_keys = seq_len + (adapter.n_prefix if method == "prefix" else 0)  # a prefix adds keys
    T = seq_len + (adapter.n_prompt if method == "prompt" else 0)  # a prompt adds positions
    B, C, F, H, V = batch, cfg.d_model, cfg.d_ff, cfg.n_heads, cfg.vocab_size
    per_token = 12 * C + 2 * F  # LayerNorms, q, k, v, context, sub-layer outputs; FFN's two (F)
    if method == "adapter":  # each adapter: down, its nonlinearity's cache (4 m), up (C)
        per_token += len(adapter.sites()) * (4 * adapter.size(C) + C)
    if method == "lora":  # each branch keeps x A (r)
        per_token += len(adapter.targets) * adapter.r
    per_block = B * T * per_token + 3 * B * H * T * T_keys  # scores, probabilities, dropout
    return cfg.n_layers * per_block + B * T * (4 * C + 2 * V)  # embeddings; LM logits and softmax


def step_bytes(cfg, batch, seq_len, adapter=None, n_classes=2, training=True):
    """Bytes one step needs: the parameters, and when training their gradients and AdamW's two
    moments (the adapter set's only when there is one: the base is frozen then), plus the
    cached activations."""
    base = parameter_count(cfg)
    own = adapter_parameter_count(cfg, adapter, n_classes) if adapter is not None else 0
    trained = (own if adapter is not None else base) if training else 0
    numbers = base + own + 3 * trained + activation_count(cfg, batch, seq_len, adapter)
    return numbers * np.dtype(cfg.dtype).itemsize


def available_memory():
    """Bytes this process can still allocate, as far as the system tells (Linux), or None."""
    room = []
    try:
        with open("/proc/meminfo") as f:
            room += [int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")]
    except (OSError, ValueError):
        pass
    for limit, used in (("memory.max", "memory.current"),  # a container's limit: cgroup v2, v1
                        ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        try:
            with open(f"/sys/fs/cgroup/{limit}") as a, open(f"/sys/fs/cgroup/{used}") as b:
                room.append(int(a.read()) - int(b.read()))
        except (OSError, ValueError):  # no such file, or "max": no limit
            pass
    if not room and hasattr(os, "sysconf"):
        try:
            room.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError):
            pass
    return min(room) if room else None


def human(nbytes):
    """1.5e9 -> '1.5 GB'."""
    for unit in ("bytes", "kB", "MB", "GB", "TB", "PB"):
        if nbytes < 1000 or unit == "PB":
            return f"{nbytes:.0f} {unit}" if unit == "bytes" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000


def check_fits(nbytes, what):
    """Refuse, before allocating, something that would need more memory than is available:
    ValueError('<what> needs about 26.3 GB of memory, more than the 7.1 GB available')."""
    if nbytes < ALWAYS_FITS:
        return
    room = available_memory()
    if room is not None and nbytes > room:
        raise ValueError(f"{what} needs about {human(nbytes)} of memory, more than the "
                         f"{human(room)} available")
