"""Checkers for notebooks/08_capstone_block_backward.ipynb: the whole backward of a post-LN block
with its two Houlsby adapters, then with LoRA on W_q and W_v.

    from minitransformer.exercises import unit08 as ex
    p = ex.init_block(rng, C=12, n_heads=3, F=20, m=4)        # the parameters, a generic point
    out, cache = ex.block_forward(x, p, n_heads=3)             # every intermediate in cache[0]
    ex.gradient_names()                                        # what the backward returns, in order
    ex.check_ffn_half_backward(ffn_half_backward)              # the first 18: from out down to h
    ex.check_block_backward(block_backward)                    # fn(dout, cache) -> {"d<name>": array}
    ex.check_lora_backward(block_backward_lora)                # the same with LoRA (s = alpha / r)

Each check draws fresh random blocks at every call (several shapes, T never equal to the head
size, float64), runs the student's backward on each under a time limit (TIME_LIMIT seconds), and
compares its gradients with a private reference one by one, in backward order. A FAIL names the
first gradient that diverges, by how much, and the likely cause; the gradients before it are
right, so the slip is in the step that computes it. An exception, a malformed return, a time-out,
or an answer that calls one of the package's composite backward passes (the attention's, the
adapter's, LoRA's, a module's) or finite differences is a one-line FAIL.

The tolerance (TOLERANCE = 1e-10 relative to each gradient's scale), derived from float64
round-off in _unit08.py's docstring: two correct answers differ by about 1e-14 (measured), a LayerNorm
without its eps by 7e-7 at the least, every structural slip by 7e-3 or more.
"""
from ._unit08 import (TOLERANCE, block_forward, check_block_backward, check_ffn_half_backward, check_lora_backward,
                      gradient_names, init_block)

__all__ = ["init_block", "block_forward", "gradient_names", "check_ffn_half_backward", "check_block_backward",
           "check_lora_backward", "TOLERANCE"]
