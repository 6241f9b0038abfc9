"""Checkers for notebooks/03_transformer.ipynb.

    check_parameter_count(fn)      fn(config) -> the number of parameters of Transformer(config), an int
    check_pre_ln_backward(fn)      fn(dy, cache) -> dx for y = x + Attn(LN(x))
    check_gradient_receivers(fn)   fn() -> the names that receive a gradient in RECEIVERS_SETUP
    check_weight_products(fn)      fn() (or the number) -> the weight-gradient products in WEIGHT_PRODUCTS_SETUP
    pre_ln_attention_forward(x, gamma, beta, w, n_heads, bias)   the forward of exercise 2
    RECEIVERS_SETUP, WEIGHT_PRODUCTS_SETUP                       the code exercises 3 and 4 ask about

The count is checked on fresh configurations whose parts all differ in size (so a wrong total
names the part), the backward on fresh sub-layers (float32 too) against a float64 reference,
threshold 1e-9 (1e-4 in float32).
"""
from ._reference import pre_ln_attention_forward
from ._unit03 import (RECEIVERS_SETUP, WEIGHT_PRODUCTS_SETUP, check_gradient_receivers, check_parameter_count,
                      check_pre_ln_backward, check_weight_products)

__all__ = ["check_parameter_count", "check_pre_ln_backward", "check_gradient_receivers", "check_weight_products",
           "pre_ln_attention_forward", "RECEIVERS_SETUP", "WEIGHT_PRODUCTS_SETUP"]
