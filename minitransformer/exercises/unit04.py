"""Checkers for notebooks/04_adapters.ipynb: the adapter's parameter count, its forward and
backward, which parameters train, and the size of a fresh adapter's branch.

    from minitransformer.exercises import unit04 as ex
    ex.check_trained_parameters(trained_parameters)    (C, m, n_layers, n_classes, train_layernorm) -> int
    ex.check_adapter_forward(adapter_forward)          (h, W_down, b_down, W_up, b_up) -> (out, cache)
    ex.check_adapter_backward(adapter_forward, adapter_backward)   (dout, cache) -> 5 gradients
    ex.check_is_trained(is_trained)                    (name, train_layernorm) -> bool
    ex.check_init_law(branch_ratio)                    (std, C, m) -> |branch| / |h|

Fresh random cases at every call; counts on sizes whose parts cannot coincide; forward and
backward against a float64 reference (threshold 1e-9, 1e-4 in float32); the init law against
its closed form sqrt(C m) 0.774 std^2 / 2 within 0.5 %. A PASS line names the threshold met,
so it reads the same on every run.
"""
from ._unit04 import (check_adapter_backward, check_adapter_forward, check_init_law, check_is_trained,
                      check_trained_parameters)

__all__ = ["check_trained_parameters", "check_adapter_forward", "check_adapter_backward", "check_is_trained",
           "check_init_law"]
