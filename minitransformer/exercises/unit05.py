"""Checkers for notebooks/05_adapting_a_pretrained_base.ipynb: the storage bill for T tasks,
switching between a base's adapters, and the trained fraction of the shipped base.

    from minitransformer.exercises import unit05 as ex
    ex.check_storage(stored_parameters)        (T, n_base, n_task, n_head) -> a pair of integers
    ex.check_switch(task_accuracy, model, {"agreement": task.val, "topic": topic.val})
    ex.check_trained_percent(trained_percent)  (m, n_classes, train_layernorm) -> a percentage

Fresh cases at every call; the switch is asked with another adapter active and with none, on
each split and on random subsets of it.
"""
from ._unit05 import check_storage, check_switch, check_trained_percent

__all__ = ["check_storage", "check_switch", "check_trained_percent"]
