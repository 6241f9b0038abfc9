"""Checkers for notebooks/07_peft_family.ipynb.

    check_lora_backward(fn)    fn(dout, x, A, B, s) -> (dx, dA, dB), the LoRA branch's backward
    check_merge(fn)            fn(W0, A, B, alpha, r) -> W, the LoRA update merged into W0
    check_prefix_backward(fn)  fn(dk, n) -> (dP, dk_own): the gradient through k = [P; k_own]
    check_prefix_count(fn)     fn(n, C, L, hidden, reparameterize) -> the parameters prefix
                               tuning trains (the head aside), an integer
    check_bitfit_count(fn)     fn(C, F, L) -> the parameters BitFit trains (the head aside), an integer

Fresh cases at every call, with no two sizes equal (F never a small multiple of C), against
a float64 reference (threshold 1e-9, 1e-4 in float32) or the counts add_adapter creates; the
merge against W0 + (alpha/r) A B (threshold 1e-12 in float64, 1e-5 in float32, whose dtype must be
kept, W0 left as it was); an answer that calls the package's own backward or merge, or builds the
model to count, FAILs and says so.
"""
from ._unit07 import check_bitfit_count, check_lora_backward, check_merge, check_prefix_backward, check_prefix_count

__all__ = ["check_lora_backward", "check_merge", "check_prefix_backward", "check_prefix_count", "check_bitfit_count"]
