"""Checkers for notebooks/01_gradients_by_hand.ipynb.

    check_evaluation_count(count_evaluations)   (d1, d2) -> loss evaluations of a centred check
    check_best_step(best_step)                  (u, f0, f3) -> the step h minimising the error
    check_linear_backward(linear_backward)      (dout, x, W) -> dx, dW, db
    check_softmax_cross_entropy_backward(fn)    (logits, targets) -> dlogits
    check_layernorm_backward(layernorm_backward)  (dout, xhat, rstd, gamma) -> dx
    check_rmsnorm_backward(rmsnorm_backward)    (dout, xhat, rstd, gamma) -> dx
    rmsnorm_forward(x, gamma)                   the forward the RMSNorm exercise differentiates

Each check draws fresh random cases at every call (several shapes, float32 among them; logits
that overflow a naive softmax) and compares with a reference computed in float64, threshold
1e-9 (float64 inputs) or 1e-4 (float32), far below the error of any slip. An answer that calls
the package's own backward for the operation, or takes longer than 10 s, FAILs and says so.
"""
from ._reference import rmsnorm_forward
from ._unit01 import (check_best_step, check_evaluation_count, check_layernorm_backward, check_linear_backward,
                      check_rmsnorm_backward, check_softmax_cross_entropy_backward)

__all__ = ["check_evaluation_count", "check_best_step", "check_linear_backward",
           "check_softmax_cross_entropy_backward", "check_layernorm_backward", "check_rmsnorm_backward",
           "rmsnorm_forward"]
