"""Softmax cross-entropy with ignored positions, stable for logits of any magnitude.

    logits (..., K), targets (...) ints -> mean loss over the positions whose target is not
    ignore_index. Computed through log-softmax (x - max - log sum exp(x - max)), so logits of
    magnitude 1e4 neither overflow nor lose the answer.
"""
import numpy as np


def cross_entropy_forward(logits, targets, ignore_index=-100):
    """logits (..., K), targets (...) -> loss (a Python float), cache."""
    if not isinstance(targets, np.ndarray) or not np.issubdtype(targets.dtype, np.integer):
        got = targets.dtype if isinstance(targets, np.ndarray) else type(targets).__name__
        raise TypeError(f"targets: expected an integer numpy array of labels, got {got}")
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"targets: expected shape {logits.shape[:-1]} to match logits "
                         f"{logits.shape}, got {targets.shape}")
    K = logits.shape[-1]
    keep = targets != ignore_index  # (...)
    bad = keep & ((targets < 0) | (targets >= K))
    if bad.any():
        raise ValueError(f"targets: expected labels in [0, {K}) or ignore_index={ignore_index}, "
                         f"got {targets[bad].flat[0]}")
    n = int(keep.sum())
    shifted = logits - logits.max(axis=-1, keepdims=True)  # (..., K), every row's max is 0
    logp = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))  # log-softmax
    safe = np.where(keep, targets, 0)  # ignored positions pick class 0, then count for nothing
    picked = np.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]  # (...)
    loss = -float(picked[keep].sum()) / n if n else 0.0  # nothing to count: 0.0 (not -0.0)
    cache = (logp, safe, keep, n)  # softmax = exp(logp), recovered in the backward
    return loss, cache


def cross_entropy_backward(cache):
    """-> dlogits (..., K), {}: (softmax - onehot(target)) / n at kept positions, 0 at ignored ones.

    The start of every backward: no dout (the loss is the last output, dloss = 1), and no
    parameters, hence {}.
    """
    logp, safe, keep, n = cache
    K = logp.shape[-1]
    probs = np.exp(logp)  # (..., K), the softmax of the logits
    onehot = np.eye(K, dtype=logp.dtype)[safe]  # (..., K), 1 at each position's target
    # forward was loss = -mean over kept positions of logp[target], logp = log softmax(logits)
    weight = (keep / max(n, 1)).astype(logp.dtype)[..., None]  # (..., 1): 1/n kept, 0 ignored
    dlogits = (probs - onehot) * weight  # (..., K)
    return dlogits, {}
