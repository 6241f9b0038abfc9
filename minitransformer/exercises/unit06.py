"""Checkers for notebooks/06_costs_and_choices.ipynb.

    check_storage_bytes(fn)    fn(cfg, adapter, n_classes, T) -> (bytes with one base and T
                               adapter sets, bytes with T fine-tuned copies), two integers
    check_skipped_flops(fn)    fn(b, train_layernorm) -> the matrix-product flops one adapter
                               step skips against full training of the same network, an integer
    check_break_even(fn)       fn(shared, per_task, per_copy) -> the fewest tasks T at which one
                               shared base plus T adapter sets is strictly smaller than T copies

Fresh cases at every call. The storage is checked against the package's counts (sizes.py),
the flops against tools/bench.step_flops (which tests/test_exercises_06.py checks against a
counted backward); a break-even that tries every T runs out of time.
"""
from ._unit06 import check_break_even, check_skipped_flops, check_storage_bytes

__all__ = ["check_storage_bytes", "check_skipped_flops", "check_break_even"]
