"""Checkers for notebooks/02_attention.ipynb.

    check_attention_backward(fn)   fn(dctx, Q, K, V, P) -> (dQ, dK, dV), one head
    check_causal_mask(fn)          fn(T) -> (T, T) additive bias, 0 or -inf
    check_attention_costs(fn)      fn(B, T, C, H) -> (parameters, forward flops), integers

Each check draws fresh random cases at every call: heads with T != hs, causal and unmasked,
one in float32; masks of several sizes; shapes whose parameter and flop terms cannot coincide.
The backward is compared with a float64 reference (threshold 1e-9, 1e-4 for float32); an answer
that calls the package's own attention backward or mask FAILs and says so.
"""
from ._unit02 import check_attention_backward, check_attention_costs, check_causal_mask

__all__ = ["check_attention_backward", "check_causal_mask", "check_attention_costs"]
