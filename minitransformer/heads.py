"""The heads on top of the last hidden state: per-position logits over the vocabulary (the
language-model head) and one logit vector per sequence (the classifier, pooled)."""
import numpy as np

from .backend import ops
from .modules import Module, normal


class LMHead(Module):
    """Per-position logits over the vocabulary: (B, T, C) -> (B, T, V)."""

    def __init__(self, path, C, V, rng, dtype, std=0.02):
        super().__init__(path, {"W": normal(rng, (C, V), std, dtype), "b": np.zeros(V, dtype)})

    def forward(self, h, pad_mask=None):
        return ops.linear_forward(h, self.p["W"].value, self.p["b"].value)

    def backward(self, dout, cache, need_dx=True):
        dh, grads = ops.linear_backward(dout, cache, need_dx=need_dx, need_dW=self.p["W"].trainable,
                                        need_db=self.p["b"].trainable)
        self._accumulate(grads)
        return dh


class ClassifierHead(Module):
    """Pool the sequence, then one linear layer: (B, T, C) -> (B, K).

    pooling "first": the first position's state (BERT's [CLS]); "mean": the average over
    the positions that are not padding.
    """

    def __init__(self, path, C, n_classes, pooling, rng, dtype, std=0.02):
        super().__init__(path, {"W": normal(rng, (C, n_classes), std, dtype),
                                  "b": np.zeros(n_classes, dtype)})
        if pooling not in ("first", "mean"):
            raise ValueError(f"pooling: expected 'first' or 'mean', got {pooling!r}")
        self.pooling = pooling

    def forward(self, h, pad_mask=None):
        B, T, C = h.shape
        if self.pooling == "first":
            pooled, weights = h[:, 0], None  # (B,C)
        else:
            keep = np.ones((B, T), h.dtype) if pad_mask is None else pad_mask.astype(h.dtype)
            weights = keep / np.maximum(keep.sum(axis=1, keepdims=True), 1)  # (B,T), rows sum to 1
            pooled = np.einsum("bt,btc->bc", weights, h)  # (B,C)
        logits, cache_lin = ops.linear_forward(pooled, self.p["W"].value, self.p["b"].value)  # (B,K)
        return logits, (cache_lin, weights, h.shape)

    def backward(self, dout, cache, need_dx=True):
        cache_lin, weights, shape = cache
        dpooled, grads = ops.linear_backward(dout, cache_lin, need_dx=need_dx,
                                             need_dW=self.p["W"].trainable, need_db=self.p["b"].trainable)
        self._accumulate(grads)
        if not need_dx:
            return None
        if weights is None:  # forward was pooled = h[:, 0]: only position 0 gets a gradient
            dh = np.zeros(shape, dpooled.dtype)
            dh[:, 0] = dpooled
        else:  # forward was pooled = sum_t weights[b,t] h[b,t]
            dh = weights[:, :, None] * dpooled[:, None, :]  # (B,T,1) * (B,1,C) -> (B,T,C)
        return dh
